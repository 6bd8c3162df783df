"""YOLO detection labels -> COCO, COCO masks -> YOLO segmentation labels / instance PNGs.

References are independent of boxcaseg.formats: the generated labels themselves, polygons
rasterised again with ``cv2.fillPoly`` (the rasteriser Ultralytics uses on its polygons),
masks decoded with pycocotools directly, hole filling with scipy.ndimage, and the expected
instance PNG computed as "the smallest box covering the pixel" rather than by painting.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage

from boxcaseg.errors import BoxcasegError
from boxcaseg.formats import mask_to_polygon, write_instance_pngs, write_outputs, write_yolo_seg, yolo_to_coco
from boxcaseg.masks import encode
from conftest import run_cli


def _rle(mask: np.ndarray) -> dict:
    return encode(mask.astype(np.uint8))


def _gt_decode(segm, h: int, w: int) -> np.ndarray:
    """pycocotools only (not boxcaseg.masks)."""
    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    elif isinstance(segm["counts"], list):
        rle = mask_utils.frPyObjects(segm, h, w)
    else:
        counts = segm["counts"]
        rle = {"size": segm["size"], "counts": counts.encode() if isinstance(counts, str) else counts}
    return mask_utils.decode(rle).astype(np.uint8)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return float((a & b).sum() / (a | b).sum())


# --------------------------------------------------------------------------- YOLO -> COCO

def _make_yolo(root: Path, rng: np.random.Generator, n_classes: int):
    """Random images (random sizes, one in a subfolder) and random labels; returns the truth."""
    images, labels = root / "images", root / "labels"
    truth = {}
    stems = ["a", "b", "sub/c", "d", "sub/deeper/e"]
    for k, stem in enumerate(stems):
        w, h = int(rng.integers(16, 300)), int(rng.integers(16, 300))
        ext = [".jpg", ".png"][k % 2]
        p = images / f"{stem}{ext}"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
        rows = []
        if stem != "d":  # d: a background image without a label file
            for _ in range(int(rng.integers(0, 6))):  # 0 boxes: an empty label file
                bw, bh = rng.uniform(0.01, 1.0, 2)
                cx, cy = rng.uniform(bw / 2, 1 - bw / 2), rng.uniform(bh / 2, 1 - bh / 2)
                rows.append((int(rng.integers(0, n_classes)), *map(float, (cx, cy, bw, bh))))
            lab = labels / f"{stem}.txt"
            lab.parent.mkdir(parents=True, exist_ok=True)
            lab.write_text("".join(f"{c} {x!r} {y!r} {bw!r} {bh!r}\n" for c, x, y, bw, bh in rows) + "\n")
        truth[f"{stem}{ext}"] = (w, h, rows)
    return images, labels, truth


@pytest.mark.parametrize("names_kind", ["txt", "yaml-list", "yaml-dict"])
def test_yolo_to_coco_round_trip(tmp_path, names_kind):
    rng = np.random.default_rng(zlib.crc32(names_kind.encode()))
    class_names = [f"class {k}" for k in range(int(rng.integers(2, 7)))]
    images, labels, truth = _make_yolo(tmp_path, rng, len(class_names))
    if names_kind == "txt":
        names = tmp_path / "names.txt"
        names.write_text("\n".join(class_names) + "\n\n")
    elif names_kind == "yaml-list":
        names = tmp_path / "data.yaml"
        names.write_text("path: .\ntrain: images\nnames:\n" + "".join(f"  - {n}\n" for n in class_names))
    else:
        names = tmp_path / "data.yaml"
        order = rng.permutation(len(class_names))  # dict keys in any order
        names.write_text(f"nc: {len(class_names)}\nnames:\n" + "".join(f"  {k}: {class_names[k]}\n" for k in order))

    coco = yolo_to_coco(images, labels, names)

    assert [c["name"] for c in coco["categories"]] == class_names
    assert [c["id"] for c in coco["categories"]] == list(range(1, len(class_names) + 1))
    assert sorted(i["file_name"] for i in coco["images"]) == sorted(truth)
    assert [i["id"] for i in coco["images"]] == list(range(1, len(truth) + 1))
    assert [a["id"] for a in coco["annotations"]] == list(range(1, len(coco["annotations"]) + 1))
    assert coco["info"]["images_without_label_file"] == 1
    by_image = {i["id"]: [] for i in coco["images"]}
    for a in coco["annotations"]:
        by_image[a["image_id"]].append(a)
    for img in coco["images"]:
        w, h, rows = truth[img["file_name"]]
        assert (img["width"], img["height"]) == (w, h)
        anns = by_image[img["id"]]
        assert len(anns) == len(rows)
        for a, (c, cx, cy, bw, bh) in zip(anns, rows):
            x, y, bwp, bhp = a["bbox"]
            back = ((x + bwp / 2) / w, (y + bhp / 2) / h, bwp / w, bhp / h)
            assert np.allclose(back, (cx, cy, bw, bh), rtol=0, atol=1e-9)
            assert a["category_id"] - 1 == c and coco["categories"][a["category_id"] - 1]["name"] == class_names[c]
            assert a["area"] == pytest.approx(bw * w * bh * h, rel=1e-12)
            assert a["iscrowd"] == 0 and a["segmentation"] == []
    assert by_image[next(i["id"] for i in coco["images"] if i["file_name"] == "d.png")] == []


def test_yolo_segmentation_line_becomes_its_box(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.new("RGB", (200, 100)).save(tmp_path / "images" / "x.png")
    (tmp_path / "labels" / "x.txt").write_text("1 0.1 0.2 0.5 0.3 0.3 0.9 0.2 0.6\n")
    (tmp_path / "names.txt").write_text("a\nb\n")
    coco = yolo_to_coco(tmp_path / "images", tmp_path / "labels", tmp_path / "names.txt")
    (ann,) = coco["annotations"]
    assert ann["category_id"] == 2
    assert np.allclose(ann["bbox"], [0.1 * 200, 0.2 * 100, 0.4 * 200, 0.7 * 100])
    assert coco["info"]["polygon_lines"] == 1


def _error_case(tmp_path: Path, case: str):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    (tmp_path / "names.txt").write_text("a\nb\nc\n")
    Image.new("RGB", (40, 30)).save(tmp_path / "images" / "ok.jpg")
    good = "0 0.5 0.5 0.2 0.2\n"
    bad = {
        "malformed": "1 0.5 0.5 0.2\n",
        "not-a-number": "1 0.5 zero 0.2 0.2\n",
        "bad-class": "3 0.5 0.5 0.2 0.2\n",
        "negative-class": "-1 0.5 0.5 0.2 0.2\n",
        "fractional-class": "1.5 0.5 0.5 0.2 0.2\n",
        "out-of-range": "1 0.5 1.2 0.2 0.2\n",
        "non-finite": "1 0.5 nan 0.2 0.2\n",
        "zero-size": "1 0.5 0.5 0.0 0.2\n",
        "six-numbers": "1 0.5 0.5 0.2 0.2 0.9\n",
    }.get(case)
    lab = tmp_path / "labels" / "ok.txt"
    if bad is not None:
        lab.write_text(good + "\n" + bad)  # the bad line is line 3
        return lab, ":3:"
    lab.write_text(good)
    orphan = tmp_path / "labels" / "orphan.txt"
    orphan.write_text(good)
    return orphan, None


ERROR_CASES = ["malformed", "not-a-number", "bad-class", "negative-class", "fractional-class", "out-of-range",
               "non-finite", "zero-size", "six-numbers", "label-without-image"]


@pytest.mark.parametrize("case", ERROR_CASES)
def test_yolo_to_coco_errors_name_file_and_line(tmp_path, case):
    path, line = _error_case(tmp_path, case)
    with pytest.raises(BoxcasegError) as e:
        yolo_to_coco(tmp_path / "images", tmp_path / "labels", tmp_path / "names.txt")
    msg = e.value.one_line()
    assert str(path) in msg and "\n" not in str(e.value)
    if line:
        assert f"{path}{line}" in msg
    if case == "bad-class":
        assert "out of range" in msg
    if case == "six-numbers":
        assert "segmentation" in msg


def test_yolo_tolerance_accepts_rounding(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    (tmp_path / "names.txt").write_text("a\n")
    Image.new("L", (10, 10)).save(tmp_path / "images" / "x.png")
    (tmp_path / "labels" / "x.txt").write_text("0 1.0000005 -0.0000005 0.5 1\n")
    (tmp_path / "labels" / "classes.txt").write_text("a\n")  # LabelImg's list: not a label file
    assert len(yolo_to_coco(tmp_path / "images", tmp_path / "labels", tmp_path / "names.txt")["annotations"]) == 1


def test_cli_yolo_to_coco(tmp_path, capsys):
    rng = np.random.default_rng(7)
    images, labels, truth = _make_yolo(tmp_path, rng, 3)
    (tmp_path / "names.txt").write_text("x\ny\nz\n")
    out = tmp_path / "out" / "instances.json"
    argv = ["data", "yolo-to-coco", "--images", str(images), "--labels", str(labels),
            "--names", str(tmp_path / "names.txt"), "-o", str(out)]
    assert run_cli(argv) == 0
    written = json.loads(out.read_text())
    assert written == yolo_to_coco(images, labels, tmp_path / "names.txt")
    n_boxes = sum(len(r) for _, _, r in truth.values())
    printed = capsys.readouterr().out
    assert f"{len(truth)} images, {n_boxes} boxes, 3 classes, 1 images without labels" in printed

    bad = labels / "a.txt"
    bad.write_text("0 0.5 0.5 0.1 0.1\n7 0.5 0.5 0.1 0.1\n")
    out2 = tmp_path / "out2.json"
    assert run_cli([*argv[:-1], str(out2)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{bad}:2:" in err
    assert not out2.exists()


# --------------------------------------------------------------------------- masks -> YOLO seg

def _random_blob(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    cx, cy = int(rng.integers(5, w - 5)), int(rng.integers(5, h - 5))
    if rng.random() < 0.5:
        axes = (int(rng.integers(3, w // 3)), int(rng.integers(3, h // 3)))
        cv2.ellipse(m, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    else:
        x2, y2 = int(rng.integers(cx + 2, w)), int(rng.integers(cy + 2, h))
        m[cy:y2, cx:x2] = 1
    return m


def _read_polygons(path: Path, w: int, h: int) -> list[tuple[int, np.ndarray]]:
    """Label lines -> (class, polygon rasterised with cv2.fillPoly in pixel-centre coordinates)."""
    out = []
    for line in path.read_text().splitlines():
        vals = line.split()
        xy = np.asarray(vals[1:], dtype=np.float64).reshape(-1, 2) * [w, h]
        assert len(xy) >= 3 and np.all(xy >= 0) and np.all(xy[:, 0] <= w) and np.all(xy[:, 1] <= h)
        m = np.zeros((h, w), np.uint8)
        cv2.fillPoly(m, [np.round(xy).astype(np.int32)], 1)
        out.append((int(vals[0]), m))
    return out


def _synthetic_coco(rng: np.random.Generator):
    """Three images of random blobs plus special cases; category ids not contiguous, not sorted."""
    cats = [{"id": 12, "name": "twelve"}, {"id": 3, "name": "three"}, {"id": 7, "name": "seven"}]
    images, anns, masks = [], [], {}

    def add(image_id, mask, cat, **extra):
        aid = len(anns) + 1
        seg = extra.pop("segmentation", None)
        anns.append({"id": aid, "image_id": image_id, "category_id": cat, "iscrowd": 0,
                     "segmentation": seg if seg is not None else _rle(mask), **extra})
        masks[aid] = mask

    for i, name in enumerate(["p.jpg", "dir/q.png", "dir/sub/r.jpg"], start=1):
        h, w = int(rng.integers(60, 160)), int(rng.integers(60, 160))
        images.append({"id": i, "file_name": name, "width": w, "height": h})
        for _ in range(int(rng.integers(2, 6))):
            add(i, _random_blob(rng, h, w), int(rng.choice([3, 7, 12])))
    # image 4: a two-part mask, a ring (hole), a polygon segmentation, a flagged mask, an empty
    # mask, a crowd annotation; image 5: background (no annotation)
    h, w = 90, 120
    images.append({"id": 4, "file_name": "s.jpg", "width": w, "height": h})
    images.append({"id": 5, "file_name": "background.jpg", "width": 50, "height": 40})
    two = np.zeros((h, w), np.uint8)
    cv2.circle(two, (20, 25), 12, 1, -1)
    two[50:80, 60:110] = 1
    add(4, two, 3, note="two-part")
    ring = np.zeros((h, w), np.uint8)
    cv2.circle(ring, (60, 45), 30, 1, -1)
    cv2.circle(ring, (60, 45), 12, 0, -1)
    add(4, ring, 7, note="ring")
    poly = [[10.0, 60.0, 40.0, 60.0, 40.0, 85.0, 10.0, 85.0]]
    add(4, _gt_decode(poly, h, w), 12, segmentation=poly)
    add(4, _random_blob(rng, h, w), 7, ignore_mask=True)
    add(4, np.zeros((h, w), np.uint8), 3, note="empty")
    anns.append({"id": len(anns) + 1, "image_id": 4, "category_id": 3, "iscrowd": 1,
                 "segmentation": _rle(_random_blob(rng, h, w))})
    return {"images": images, "annotations": anns, "categories": cats}, masks


@pytest.mark.parametrize("skip_flagged", [False, True])
def test_yolo_seg_round_trip_synthetic(tmp_path, skip_flagged):
    rng = np.random.default_rng(11 + skip_flagged)
    coco, masks = _synthetic_coco(rng)
    summary = write_yolo_seg(coco, tmp_path, skip_flagged=skip_flagged)

    n_written = len(coco["annotations"]) - 2 - skip_flagged  # crowd, empty (, flagged)
    assert summary == {"images": 5, "labels_written": n_written, "skipped_empty": 1,
                       "skipped_flagged": int(skip_flagged), "skipped_crowd": 1,
                       "classes_file": str(tmp_path / "classes.txt")}
    assert (tmp_path / "classes.txt").read_text().splitlines() == ["three", "seven", "twelve"]
    class_of = {3: 0, 7: 1, 12: 2}
    assert (tmp_path / "background.txt").read_text() == ""
    figures = {}
    n_lines = 0
    for img in coco["images"]:
        w, h = img["width"], img["height"]
        label = tmp_path / Path(img["file_name"]).with_suffix(".txt")
        got = _read_polygons(label, w, h)
        expected = [a for a in coco["annotations"] if a["image_id"] == img["id"] and not a["iscrowd"]
                    and masks[a["id"]].any() and not (skip_flagged and a.get("ignore_mask"))]
        assert len(got) == len(expected)
        n_lines += len(got)
        for a, (cls, raster) in zip(expected, got):
            m = masks[a["id"]]
            assert cls == class_of[a["category_id"]]
            assert not np.any(m.astype(bool) & ~raster.astype(bool))  # every mask pixel is inside
            iou = _iou(raster, m)
            if a.get("note") == "ring":
                # RETR_EXTERNAL: the hole is filled, nothing else changes
                assert np.array_equal(raster.astype(bool), ndimage.binary_fill_holes(m))
                figures["ring"] = iou
            elif a.get("note") == "two-part":
                figures["two-part"] = iou
                largest = mask_to_polygon(m, multi_part="largest")
                only = np.zeros_like(m)
                cv2.fillPoly(only, [largest.astype(np.int32)], 1)
                figures["two-part, largest part only"] = _iou(only, m)
                assert iou >= 0.95 and figures["two-part, largest part only"] < 0.8
            else:  # one part, no hole: the polygon gives the mask back exactly
                assert iou == 1.0
    assert n_lines == n_written
    print("yolo-seg round trip IoU:", {k: round(v, 4) for k, v in figures.items()})


def test_polygon_of_tiny_and_many_part_masks():
    rng = np.random.default_rng(3)
    for shape in [(1, 1), (1, 2), (2, 2)]:
        m = np.zeros((10, 10), np.uint8)
        m[4:4 + shape[0], 5:5 + shape[1]] = 1
        poly = mask_to_polygon(m)
        assert len(poly) >= 3
        back = np.zeros_like(m)
        cv2.fillPoly(back, [poly.astype(np.int32)], 1)
        assert np.array_equal(back, m)
    # salt noise: many parts, all inside one polygon; the extra pixels are the bridge lines
    m = (rng.random((50, 70)) < 0.15).astype(np.uint8)
    poly = mask_to_polygon(m)
    back = np.zeros_like(m)
    cv2.fillPoly(back, [poly.astype(np.int32)], 1)
    assert not np.any(m.astype(bool) & ~back.astype(bool))
    n_parts = ndimage.label(m, structure=np.ones((3, 3)))[1]
    # a minimum spanning tree: at most one bridge line per part, each no longer than the gap
    assert back.sum() - m.sum() < 6 * n_parts
    assert mask_to_polygon(np.zeros((5, 5), np.uint8)) is None


def test_yolo_seg_round_trip_coco_val(tmp_path, data_root):
    """coco-val GT masks (mostly COCO polygons) -> yolo-seg polygons -> cv2.fillPoly.

    One-part masks come back exactly except for their holes (RETR_EXTERNAL fills them).
    Multi-part masks lose precision only to the one-pixel bridge lines joining the parts, so
    the masks under 0.95 are not the smallest ones but multi-part masks of a few hundred
    pixels whose parts are far apart; we assert the mean, the share under 0.95, that no mask
    pixel is lost, and 0.95 on every one-part mask.
    """
    ann_file = data_root / "coco-val" / "instances.json"
    if not ann_file.is_file():
        pytest.skip(f"{ann_file} not found")
    coco = json.loads(ann_file.read_text())
    summary = write_yolo_seg(coco, tmp_path)
    n_crowd = sum(1 for a in coco["annotations"] if a.get("iscrowd"))
    assert summary["skipped_crowd"] == n_crowd
    assert summary["labels_written"] + summary["skipped_empty"] == len(coco["annotations"]) - n_crowd
    ious, areas, one_part = [], [], []
    for img in coco["images"]:
        w, h = img["width"], img["height"]
        got = _read_polygons(tmp_path / Path(img["file_name"]).with_suffix(".txt"), w, h)
        anns = [a for a in coco["annotations"] if a["image_id"] == img["id"] and not a.get("iscrowd")]
        gts = [_gt_decode(a["segmentation"], h, w) for a in anns]
        gts = [m for m in gts if m.any()]
        assert len(got) == len(gts)
        for m, (_, raster) in zip(gts, got):
            assert not np.any(m.astype(bool) & ~raster.astype(bool))
            ious.append(_iou(raster, m))
            areas.append(int(m.sum()))
            one_part.append(ndimage.label(m, structure=np.ones((3, 3)))[1] == 1)
    ious, one_part = np.asarray(ious), np.asarray(one_part)
    share = float((ious < 0.95).mean())
    print(f"coco-val yolo-seg round trip: {len(ious)} masks, mean IoU {ious.mean():.4f}, "
          f"{share:.2%} under 0.95, min {ious.min():.3f}; one-part masks: {one_part.sum()} "
          f"min {ious[one_part].min():.3f}; multi-part: {(~one_part).sum()} mean {ious[~one_part].mean():.4f}")
    assert ious.mean() >= 0.99
    assert share <= 0.02
    assert ious[one_part].min() >= 0.95


# --------------------------------------------------------------------------- instance PNGs

def _expected_png(anns: list[dict], masks: dict, h: int, w: int) -> np.ndarray:
    """Per pixel: the value of the covering annotation with the smallest box (ties: earliest)."""
    value = np.zeros((h, w), np.int64)
    best = np.full((h, w), np.inf)
    for k, a in enumerate(anns):
        key = a["bbox"][2] * a["bbox"][3] + k * 1e-9  # strictly increasing for equal boxes
        take = masks[a["id"]].astype(bool) & (key < best)
        value[take] = k + 1
        best[take] = key
    return value


@pytest.mark.parametrize("skip_flagged", [False, True])
def test_instance_pngs(tmp_path, skip_flagged):
    rng = np.random.default_rng(5 + skip_flagged)
    coco, masks = _synthetic_coco(rng)
    for a in coco["annotations"]:  # a box per annotation: the mask's box, sometimes a larger one
        ys, xs = np.nonzero(masks.get(a["id"], np.ones((1, 1))))
        if len(xs):
            a["bbox"] = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1 + rng.integers(0, 20)),
                         float(ys.max() - ys.min() + 1)]
        else:
            a["bbox"] = [0.0, 0.0, 1.0, 1.0]
    # equal boxes on image 1: the earlier annotation must stay on top
    first = [a for a in coco["annotations"] if a["image_id"] == 1][:2]
    first[1]["bbox"] = list(first[0]["bbox"])
    summary = write_instance_pngs(coco, tmp_path, skip_flagged=skip_flagged)

    mapping = json.loads((tmp_path / "instances.json").read_text())
    assert summary["images"] == 5 and summary["skipped_crowd"] == 1 and summary["skipped_empty"] == 1
    assert summary["skipped_flagged"] == int(skip_flagged)
    assert summary["labels_written"] == len(coco["annotations"]) - 2 - skip_flagged
    records = {r["image_id"]: r for r in mapping["images"]}
    hidden = 0
    for img in coco["images"]:
        png = tmp_path / Path(img["file_name"]).with_suffix(".png")
        assert records[img["id"]]["png"] == Path(img["file_name"]).with_suffix(".png").as_posix()
        with Image.open(png) as im:
            assert im.mode == "L"
            got = np.asarray(im).astype(np.int64)
        kept = [a for a in coco["annotations"] if a["image_id"] == img["id"] and not a["iscrowd"]
                and masks[a["id"]].any() and not (skip_flagged and a.get("ignore_mask"))]
        assert np.array_equal(got, _expected_png(kept, masks, img["height"], img["width"]))
        inst = records[img["id"]]["instances"]
        assert [(r["value"], r["annotation_id"], r["category_id"]) for r in inst] == \
            [(k + 1, a["id"], a["category_id"]) for k, a in enumerate(kept)]
        assert [r["visible_pixels"] for r in inst] == [int((got == k + 1).sum()) for k in range(len(kept))]
        hidden += sum(r["visible_pixels"] == 0 for r in inst)
    assert summary["fully_hidden"] == hidden
    assert not np.asarray(Image.open(tmp_path / "background.png")).any()


def test_instance_png_16_bit(tmp_path):
    h, w = 20, 20
    anns, masks = [], {}
    for k in range(300):  # 300 one-pixel instances: 16-bit
        m = np.zeros((h, w), np.uint8)
        m[k // w, k % w] = 1
        anns.append({"id": 1000 + k, "image_id": 1, "category_id": 1, "bbox": [k % w, k // w, 1, 1],
                     "segmentation": _rle(m)})
        masks[1000 + k] = m
    coco = {"images": [{"id": 1, "file_name": "x.png", "width": w, "height": h}], "annotations": anns,
            "categories": [{"id": 1, "name": "thing"}]}
    write_instance_pngs(coco, tmp_path)
    got = cv2.imread(str(tmp_path / "x.png"), cv2.IMREAD_UNCHANGED)
    assert got.dtype == np.uint16
    expected = np.zeros((h, w), np.int64)
    expected.reshape(-1)[:300] = np.arange(1, 301)
    assert np.array_equal(got.astype(np.int64), expected)


# --------------------------------------------------------------------------- dispatch, errors

def test_write_outputs_dispatch_and_errors(tmp_path):
    rng = np.random.default_rng(9)
    coco, _ = _synthetic_coco(rng)
    assert write_outputs(coco, "coco", tmp_path / "c", False) == {"format": "coco"}
    assert not (tmp_path / "c").exists()
    assert write_outputs(coco, "yolo-seg", tmp_path / "y", True)["skipped_flagged"] == 1
    assert (tmp_path / "y" / "dir" / "sub" / "r.txt").is_file()
    assert write_outputs(coco, "png", tmp_path / "p", False)["format"] == "png"
    with pytest.raises(BoxcasegError, match="coco, yolo-seg, png"):
        write_outputs(coco, "voc", tmp_path / "v", False)

    bad = json.loads(json.dumps(coco))
    bad["annotations"][-3]["segmentation"] = _rle(np.ones((3, 3), np.uint8))  # not the image's size
    for fmt in ("yolo-seg", "png"):
        with pytest.raises(BoxcasegError, match=f"annotation {bad['annotations'][-3]['id']}"):
            write_outputs(bad, fmt, tmp_path / f"bad-{fmt}", False)
        assert not list((tmp_path / f"bad-{fmt}").rglob("*.tmp"))  # no half-written file left

    escape = json.loads(json.dumps(coco))
    escape["images"][0]["file_name"] = "../outside.jpg"
    with pytest.raises(BoxcasegError, match="relative path"):
        write_yolo_seg(escape, tmp_path / "e")
    unknown = json.loads(json.dumps(coco))
    unknown["annotations"][0]["category_id"] = 99
    with pytest.raises(BoxcasegError, match="category id 99"):
        write_instance_pngs(unknown, tmp_path / "u")
