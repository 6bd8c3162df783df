"""Metric functions on hand-computed cases: mask quality, VOC instance AP, COCO AP."""

from __future__ import annotations

import json

import numpy as np
import pytest

from boxcaseg.errors import BoxcasegError
from boxcaseg.evaluate import coco_eval, mask_quality, voc_ap, voc_instance_ap
from boxcaseg.masks import encode
from conftest import run_cli  # noqa: E402


def _mask(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def _ann(aid, image_id, cat, m, **extra):
    ys, xs = np.nonzero(m)
    box = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)] if len(xs) else [0, 0, 1, 1]
    return {"id": aid, "image_id": image_id, "category_id": cat, "segmentation": encode(m),
            "area": float(m.sum()), "bbox": box, "iscrowd": 0, **extra}


def _coco(images, anns, cats=(1, 2, 3)):
    return {"images": [{"id": i, "height": h, "width": w, "file_name": f"{i}.png"} for i, h, w in images],
            "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in cats]}


# --------------------------------------------------------------------------- mask quality


def _quality_case():
    H = W = 100
    gt = _coco([(1, H, W), (2, H, W)], [
        _ann(1, 1, 1, _mask(H, W, 0, 5, 0, 5)),        # small, cat 1
        _ann(2, 1, 1, _mask(H, W, 50, 55, 50, 55)),    # small, cat 1
        _ann(3, 1, 2, _mask(H, W, 10, 50, 60, 100)),   # 1600 px: medium, cat 2, no prediction
        _ann(4, 1, 1, _mask(H, W, 90, 100, 0, 100), iscrowd=1),  # crowd: excluded
        _ann(5, 2, 1, _mask(H, W, 0, 100, 0, 100)),    # 10000 px: large, cat 1
    ])  # category 3 is declared but has no instance
    pred = _coco([(1, H, W), (2, H, W)], [
        _ann(1, 1, 1, _mask(H, W, 0, 5, 0, 10)),       # 25 / 50 -> IoU 0.5
        _ann(2, 1, 1, _mask(H, W, 50, 55, 50, 55)),    # IoU 1
        _ann(4, 1, 1, _mask(H, W, 0, 1, 0, 1)),        # prediction for the crowd GT: ignored
        _ann(5, 2, 1, _mask(H, W, 0, 80, 0, 100)),     # 8000 / 10000 -> IoU 0.8
    ])
    return gt, pred


def test_mask_quality_hand_computed():
    gt, pred = _quality_case()
    r = mask_quality(gt, pred)
    # instances: IoU 0.5, 1.0 (cat 1, small), 0.0 (cat 2, medium, missing), 0.8 (cat 1, large)
    assert r["n"] == 4 and r["missing"] == 1
    assert r["miou"] == pytest.approx((0.5 + 1.0 + 0.0 + 0.8) / 4)
    # mIoU*: cat 1 mean (0.5+1+0.8)/3, cat 2 mean 0; category 3 (no instance) does not count
    assert r["miou_star"] == pytest.approx(((0.5 + 1.0 + 0.8) / 3 + 0.0) / 2)
    assert r["iou50"] == pytest.approx(3 / 4)
    assert r["iou75"] == pytest.approx(2 / 4)
    assert r["small"] == pytest.approx({"miou_star": 0.75, "miou": 0.75, "iou50": 1.0, "iou75": 0.5, "n": 2})
    assert r["medium"] == pytest.approx({"miou_star": 0.0, "miou": 0.0, "iou50": 0.0, "iou75": 0.0, "n": 1})
    assert r["large"] == pytest.approx({"miou_star": 0.8, "miou": 0.8, "iou50": 1.0, "iou75": 1.0, "n": 1})


def test_mask_quality_empty_predictions_and_empty_bucket(tmp_path):
    gt, _ = _quality_case()
    gt["annotations"] = [a for a in gt["annotations"] if a["id"] in (1, 2)]  # small only
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    r = mask_quality(tmp_path / "gt.json", [])
    assert r["n"] == 2 and r["missing"] == 2
    assert r["miou"] == 0.0 and r["miou_star"] == 0.0 and r["iou50"] == 0.0
    assert r["large"] == {"miou_star": None, "miou": None, "iou50": None, "iou75": None, "n": 0}
    # a prediction kept without a mask counts as missing
    nomask = [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": None}]
    assert mask_quality(tmp_path / "gt.json", nomask)["missing"] == 2


def test_mask_quality_polygon_predictions_and_list_input():
    H = W = 20
    gt = _coco([(1, H, W)], [_ann(7, 1, 1, _mask(H, W, 0, 10, 0, 10))])
    # a polygon covering exactly the same 10x10 pixel square (pixel-edge coordinates)
    pred = [{"id": 7, "image_id": 1, "category_id": 1, "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10]]}]
    r = mask_quality(gt, pred)
    assert r["miou"] > 0.8


def test_mask_quality_errors_name_the_annotation():
    gt, pred = _quality_case()
    pred["annotations"][0]["segmentation"] = encode(np.zeros((50, 50), np.uint8))
    with pytest.raises(BoxcasegError, match="annotation 1"):
        mask_quality(gt, pred)
    _, pred = _quality_case()
    pred["annotations"].append(dict(pred["annotations"][0], segmentation=encode(np.zeros((100, 100), np.uint8))))
    with pytest.raises(BoxcasegError, match="annotation id 1 appears twice .--strict"):
        mask_quality(gt, pred, strict=True)
    r = mask_quality(gt, pred)  # without --strict: the first is scored, the repeat counted
    assert r["duplicate_predictions"] == 1 and r["miou"] == pytest.approx((0.5 + 1.0 + 0.0 + 0.8) / 4)


# --------------------------------------------------------------------------- VOC AP


def test_voc_ap_all_point_interpolation():
    # ranks TP, FP, TP with 2 GT: precision 1, 1/2, 2/3; recall 1/2, 1/2, 1
    # envelope: 1 up to recall 1/2, then 2/3 -> AP = 0.5*1 + 0.5*2/3 = 5/6
    assert voc_ap(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])) == pytest.approx(5 / 6)
    assert voc_ap(np.array([0.0]), np.array([0.0])) == 0.0


def _strip(x0, x1, H=10, W=100):
    """A mask covering columns [x0, x1) of every row: IoUs between strips are interval IoUs."""
    return _mask(H, W, 0, H, x0, x1)


def _voc_case():
    # class 1 on image 1: GT A = cols [0,40), B = cols [60,80)
    #   d1 (0.9) = [0,32):  IoU(A) = 32/40 = 0.8, IoU(B) = 0
    #   d2 (0.8) = [10,80): IoU(A) = 30/80 = 0.375, IoU(B) = 20/70 = 0.286 -> assigned to A (max)
    #   d3 (0.7) = [60,92): IoU(A) = 0, IoU(B) = 20/32 = 0.625
    # class 2: one GT on image 1, no detection -> AP 0 at every threshold
    # class 3: declared, no instance -> not in the mean
    gt = _coco([(1, 10, 100), (2, 10, 100)], [
        _ann(1, 1, 1, _strip(0, 40)), _ann(2, 1, 1, _strip(60, 80)), _ann(3, 1, 2, _strip(0, 10)),
    ])
    dets = [
        {"image_id": 1, "category_id": 1, "score": 0.9, "segmentation": encode(_strip(0, 32))},
        {"image_id": 1, "category_id": 1, "score": 0.8, "segmentation": encode(_strip(10, 80))},
        {"image_id": 1, "category_id": 1, "score": 0.7, "segmentation": encode(_strip(60, 92))},
    ]
    return gt, dets


def test_voc_instance_ap_hand_computed():
    gt, dets = _voc_case()
    r = voc_instance_ap(gt, dets)
    # IoU 0.25 and 0.5: d1 TP (covers A); d2's best GT is A, already covered -> FP (SDS
    # assigns a detection to its best-overlap GT, it does not fall back to B);
    # d3 TP with B -> TP, FP, TP over 2 GT: AP = 5/6 (see test_voc_ap_all_point_interpolation)
    # IoU 0.7 and 0.75: d1 TP (0.8), d2 FP, d3 FP (0.625) -> precision 1 at recall 1/2: AP = 1/2
    c1 = r["per_class"][1]
    assert c1 == pytest.approx({"ap25": 5 / 6, "ap50": 5 / 6, "ap70": 0.5, "ap75": 0.5})
    assert r["per_class"][2] == {"ap25": 0.0, "ap50": 0.0, "ap70": 0.0, "ap75": 0.0}
    assert 3 not in r["per_class"]
    assert r["ap50"] == pytest.approx((5 / 6 + 0) / 2)
    assert r["ap75"] == pytest.approx(0.25)
    assert r["n_gt"] == 3 and r["n_det"] == 3


def test_voc_instance_ap_empty_predictions():
    gt, _ = _voc_case()
    r = voc_instance_ap(gt, [])
    assert r["ap25"] == 0.0 and r["ap50"] == 0.0 and r["n_det"] == 0


def test_voc_instance_ap_crowd_gt_is_ignored_not_false():
    gt, dets = _voc_case()
    # image 2 holds only a crowd region of class 1; d4 (top score) covers it exactly
    gt["annotations"].append(_ann(9, 2, 1, _strip(0, 50), iscrowd=1))
    d4 = {"image_id": 2, "category_id": 1, "score": 0.95, "segmentation": encode(_strip(0, 50))}
    r = voc_instance_ap(gt, dets + [d4])
    assert r["per_class"][1]["ap50"] == pytest.approx(5 / 6)  # d4 neither TP nor FP
    assert r["n_gt"] == 3
    # without a class-1 crowd region there, d4 is a plain false positive
    gt["annotations"][-1]["iscrowd"] = 0
    gt["annotations"][-1]["category_id"] = 2
    r = voc_instance_ap(gt, dets + [d4])
    # ranks FP (d4), TP, FP, TP: precision 0, 1/2, 1/3, 1/2 at recall 0, 1/2, 1/2, 1 -> AP = 1/2
    assert r["per_class"][1]["ap50"] == pytest.approx(0.5)


def test_voc_instance_ap_rejects_unknown_image():
    gt, dets = _voc_case()
    dets[0]["image_id"] = 99
    with pytest.raises(BoxcasegError, match="image id 99"):
        voc_instance_ap(gt, dets)


# --------------------------------------------------------------------------- COCO AP


def test_coco_eval_perfect_and_empty():
    gt, _ = _voc_case()
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
                "segmentation": a["segmentation"]} for a in gt["annotations"]]
    r = coco_eval(gt, perfect)
    assert r["segm"]["AP"] == pytest.approx(1.0)
    assert r["bbox"]["AP50"] == pytest.approx(1.0)  # boxes from the masks
    r = coco_eval(gt, [])
    assert r["segm"]["AP"] == 0.0 and r["bbox"]["AP"] == 0.0
    # boxes only: segm cannot be scored
    boxes = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0, "bbox": a["bbox"]}
             for a in gt["annotations"]]
    r = coco_eval(gt, boxes)
    assert r["segm"] is None and r["bbox"]["AP"] == pytest.approx(1.0)


def test_coco_eval_half_right():
    gt, dets = _voc_case()
    r = coco_eval(gt, dets)
    assert 0.0 < r["segm"]["AP50"] < 1.0


# --------------------------------------------------------------------------- CLI




def test_cli_evaluate_masks_json_and_errors(tmp_path, capsys):
    gt, pred = _quality_case()
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.json").write_text(json.dumps(pred))
    assert run_cli(["evaluate", "masks", "--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "pred.json"),
                    "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"miou_star", "miou", "iou50", "iou75", "n", "small", "medium", "large"}
    assert out["n"] == 4
    assert run_cli(["evaluate", "masks", "--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "pred.json")]) == 0
    assert "mIoU*" in capsys.readouterr().out
    assert run_cli(["evaluate", "masks", "--gt", str(tmp_path / "nope.json"), "--pred", str(tmp_path / "pred.json")]) == 2
    assert "nope.json" in capsys.readouterr().err


def test_cli_evaluate_voc_and_coco_json(tmp_path, capsys):
    gt, dets = _voc_case()
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    run_cli(["evaluate", "voc", "--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "dets.json"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["ap50"] == pytest.approx(5 / 12)
    run_cli(["evaluate", "coco", "--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "dets.json"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"segm", "bbox"}


# --------------------------------------------------------------------------- real data


def test_real_coco_val_self_and_box_fill(data_root):
    """On the COCO dev-val set: GT against itself scores 1 everywhere (crowd regions left
    out); the box-fill floor scores below it; perfect detections give VOC AP 1."""
    gt_path = data_root / "coco-val" / "instances.json"
    gt = json.loads(gt_path.read_text())
    r = mask_quality(gt_path, gt_path)
    n_noncrowd = sum(1 for a in gt["annotations"] if not a.get("iscrowd", 0))
    assert r["n"] == n_noncrowd and r["miou"] == pytest.approx(1.0) and r["miou_star"] == pytest.approx(1.0)
    assert r["small"]["n"] + r["medium"]["n"] + r["large"]["n"] == n_noncrowd
    from boxcaseg.baselines import box_fill_predictions

    box = mask_quality(gt_path, box_fill_predictions(gt_path))
    assert 0.3 < box["miou"] < 0.9
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
             "segmentation": a["segmentation"]} for a in gt["annotations"] if not a.get("iscrowd", 0)]
    voc = voc_instance_ap(gt_path, dets)
    assert voc["ap50"] == pytest.approx(1.0) and voc["ap75"] == pytest.approx(1.0)
