"""The one COCO reader (boxcaseg.cocojson): its rules on small jsons, and every consumer reading through it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from boxcaseg.cocojson import box_problem, is_crowd, load_coco, parse_coco
from boxcaseg.errors import BoxcasegError

W, H = 64, 48


def _image(iid, name="a.png", **extra):
    return {"id": iid, "file_name": name, "width": W, "height": H, **extra}


def _ann(aid, image_id=1, bbox=(4, 4, 20, 16), **extra):
    return {"id": aid, "image_id": image_id, "category_id": 1, "bbox": list(bbox), "iscrowd": 0, **extra}


def _coco(images=None, anns=None) -> dict:
    return {"images": [_image(1)] if images is None else images, "annotations": [_ann(1)] if anns is None else anns,
            "categories": [{"id": 1, "name": "thing"}]}


def _write(tmp_path: Path, data, name="c.json", images: dict | None = None) -> Path:
    """``data`` as ``tmp_path/name``; ``images``: file name -> write a W x H png of that name."""
    (tmp_path / "img").mkdir(exist_ok=True)
    for fname in images or {}:
        Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "img" / fname)
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


def _error(fn, *args, **kw) -> str:
    with pytest.raises(BoxcasegError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# --------------------------------------------------------------------------- ids


def test_ids_are_kept_as_given_strings_and_ints_apart(tmp_path):
    data = _coco([_image(1, "a.png"), _image("1", "b.png")],
                 [_ann(7, 1), _ann("7", "1"), _ann("x", 1)])
    coco = load_coco(_write(tmp_path, data))
    assert list(coco.images) == [1, "1"] and [type(i) for i in coco.images] == [int, str]
    assert [a["id"] for a in coco.anns] == [7, "7", "x"]  # 7 and "7" are two ids, neither cast
    assert [a["id"] for a in coco.by_image[1]] == [7, "x"] and [a["id"] for a in coco.by_image["1"]] == ["7"]


def test_an_image_id_given_as_a_string_is_not_the_integer(tmp_path):
    p = _write(tmp_path, _coco(anns=[_ann(3, "1")]))
    msg = _error(load_coco, p)
    assert msg.startswith(str(p)) and "annotation 3 points at unknown image id '1'" in msg


@pytest.mark.parametrize("where", ["image", "annotation", "category"])
@pytest.mark.parametrize("bad", [1.0, True, None, [1]])
def test_ids_must_be_integers_or_strings(tmp_path, where, bad):
    data = _coco()
    {"image": data["images"][0], "annotation": data["annotations"][0], "category": data["categories"][0]}[where]["id"] = bad
    if where == "image":
        data["annotations"] = []
    p = _write(tmp_path, data)
    msg = _error(load_coco, p)
    assert msg.startswith(str(p)) and f"{where} id {bad!r} is neither an integer nor a string" in msg


@pytest.mark.parametrize("where", ["image", "annotation", "category"])
def test_an_id_appears_once(tmp_path, where):
    data = _coco([_image(1), _image(2, "b.png")], [_ann(1), _ann(2)])
    data["categories"].append({"id": 2})
    key = {"image": "images", "annotation": "annotations", "category": "categories"}[where]
    data[key][1]["id"] = 1
    p = _write(tmp_path, data)
    assert f"{p}: {where} id 1 appears twice" in _error(load_coco, p)


# --------------------------------------------------------------------------- crowd


def test_crowd_rule(tmp_path):
    anns = [_ann(1), _ann(2, iscrowd=1), _ann(3, iscrowd=True), _ann(4, iscrowd=False), _ann(5)]
    del anns[4]["iscrowd"]
    coco = load_coco(_write(tmp_path, _coco(anns=anns)))
    assert [is_crowd(a) for a in coco.anns] == [False, True, True, False, False]


@pytest.mark.parametrize("bad", [2, "1", None, 0.5])
def test_iscrowd_must_be_0_or_1(tmp_path, bad):
    p = _write(tmp_path, _coco(anns=[_ann(9, iscrowd=bad)]))
    assert f"{p}: annotation 9: iscrowd {bad!r} is not 0 or 1" in _error(load_coco, p)


def test_every_consumer_skips_crowd_annotations(tmp_path):
    from boxcaseg.baselines import box_fill_predictions
    from boxcaseg.data.box_patches import read_coco_boxes
    from boxcaseg.proxy.tasks import build_tasks

    data = _coco(anns=[_ann(1), _ann(2, iscrowd=1)])
    p = _write(tmp_path, data, images={"a.png": 1})
    index = read_coco_boxes(p, tmp_path / "img")
    assert [b[0] for b in index.boxes] == [1] and index.n_crowd == 1
    assert [t.ann_ids for t in build_tasks(data, 1.2, False, p)] == [[1]]
    assert [r["id"] for r in box_fill_predictions(p)] == [1]


# --------------------------------------------------------------------------- degenerate boxes


@pytest.mark.parametrize("bbox, reason", [
    ((4, 4, 0, 10), "non-positive size"),          # zero width
    ((4, 4, 10, -3), "non-positive size"),         # negative height
    ((W, 4, 5, 5), "entirely outside"),            # starts at the right edge
    ((-10, 4, 10, 5), "entirely outside"),         # ends at the left edge
    ((4, H + 1, 5, 5), "entirely outside"),        # below the image
    ((float("nan"), 4, 5, 5), "non-finite"),
    ((4, 4, 5), "not 4 numbers"),
    (("a", 4, 5, 5), "not numeric"),
])
def test_degenerate_boxes(tmp_path, bbox, reason):
    from boxcaseg.baselines import box_fill_predictions
    from boxcaseg.data.box_patches import read_coco_boxes
    from boxcaseg.proxy.tasks import build_tasks

    data = _coco(anns=[_ann(1), _ann(2, bbox=bbox)])
    p = _write(tmp_path, data, images={"a.png": 1})
    coco = load_coco(p)
    assert coco.box_problem(coco.anns[0]) is None and reason in coco.box_problem(coco.anns[1])
    # training skips and counts it, --strict makes it an error naming the file and the annotation
    index = read_coco_boxes(p, tmp_path / "img")
    assert [b[0] for b in index.boxes] == [1] and index.n_degenerate == 1
    msg = _error(read_coco_boxes, p, tmp_path / "img", strict=True)
    assert msg.startswith(f"{p}: annotation id 2 (image id 1): ") and reason in msg
    # the proxy flags it (strict: the same error), the baselines skip it
    (task,) = build_tasks(json.loads(p.read_text()), 1.2, False, p)
    assert task.reasons[0] is None and reason in task.reasons[1]
    assert _error(build_tasks, json.loads(p.read_text()), 1.2, True, p) == msg
    assert [r["id"] for r in box_fill_predictions(p)] == [1]


def test_boxes_partly_outside_or_below_a_pixel_are_usable():
    assert box_problem([W - 2, H - 2, 30, 30], W, H) is None
    assert box_problem([-5, -5, 6, 6], W, H) is None
    assert box_problem([3.2, 4.7, 0.3, 0.2], W, H) is None


# --------------------------------------------------------------------------- missing keys


@pytest.mark.parametrize("change, needle", [
    (lambda d: d.pop("images"), "malformed COCO json (no 'images' list"),
    (lambda d: d.update(images={}), "malformed COCO json (no 'images' list)"),
    (lambda d: d.pop("annotations"), "malformed COCO json (no 'annotations' list)"),
    (lambda d: d.update(categories={}), "'categories' is not a list"),
    (lambda d: d["images"][0].pop("id"), "an image entry without 'id'"),
    (lambda d: d["images"][0].pop("file_name"), "image id 1 has no 'file_name'"),
    (lambda d: d["images"][0].update(file_name=""), "image id 1 has no 'file_name'"),
    (lambda d: d["images"][0].pop("width"), "image id 1 has no valid 'width' (None)"),
    (lambda d: d["images"][0].update(height=0), "image id 1 has no valid 'height' (0)"),
    (lambda d: d["images"][0].update(height=47.5), "image id 1 has no valid 'height' (47.5)"),
    (lambda d: d["annotations"][0].pop("id"), "an annotation without 'id'"),
    (lambda d: d["annotations"][0].pop("image_id"), "annotation 1 has no image_id"),
    (lambda d: d["annotations"][0].update(image_id=5), "annotation 1 points at unknown image id 5"),
    (lambda d: d["annotations"].append(7), "an annotation without 'id': 7"),
])
def test_missing_keys_are_one_line_errors_naming_the_file(tmp_path, change, needle):
    data = _coco()
    change(data)
    p = _write(tmp_path, data)
    msg = _error(load_coco, p)
    assert msg.startswith(f"{p}: ") and needle in msg


def test_results_list_takes_its_images_from_the_ground_truth(tmp_path):
    gt = load_coco(_write(tmp_path, _coco(anns=[_ann(1), _ann(2)])))
    dets = [{"image_id": 1, "category_id": 1, "score": 0.5, "bbox": [1, 1, 5, 5]}]  # no ids in a results list
    res = parse_coco(dets, "dets.json", gt)
    assert res.images is gt.images and res.by_image == {1: dets}
    assert "dets.json: annotation #0 (no id) points at unknown image id 3" in _error(
        parse_coco, [dict(dets[0], image_id=3)], "dets.json", gt)
    # without the GT it has no images to refer to
    assert "dets.json: malformed COCO json (no 'images' list" in _error(parse_coco, dets, "dets.json")


def test_skip_orphans_sets_them_aside(tmp_path):
    p = _write(tmp_path, _coco(anns=[_ann(1), _ann(2, image_id=9)]))
    coco = load_coco(p, skip_orphans=True)
    assert [a["id"] for a in coco.anns] == [1] and [a["id"] for a in coco.orphans] == [2]


def test_every_consumer_rejects_an_unknown_image_the_same_way(tmp_path):
    from boxcaseg.baselines import box_fill_predictions
    from boxcaseg.data.box_patches import read_coco_boxes
    from boxcaseg.evaluate import mask_quality
    from boxcaseg.maskrcnn.data import CocoMaskDataset
    from boxcaseg.proxy.tasks import validate_coco

    data = _coco(anns=[_ann(1, segmentation=[[4, 4, 24, 4, 24, 20, 4, 20]]), _ann(2, image_id=9)])
    p = _write(tmp_path, data, images={"a.png": 1})
    want = f"{p}: annotation 2 points at unknown image id 9"
    img = tmp_path / "img"
    for call in (lambda: read_coco_boxes(p, img), lambda: validate_coco(json.loads(p.read_text()), p),
                 lambda: mask_quality(p, []), lambda: box_fill_predictions(p), lambda: CocoMaskDataset(p, img)):
        assert _error(call) == want


# --------------------------------------------------------------------------- files


def test_a_missing_image_file_names_it(tmp_path):
    from boxcaseg.data.box_patches import read_coco_boxes

    data = _coco([_image(1, "a.png"), _image(2, "gone.png")], [_ann(1, 1), _ann(2, 2)])
    p = _write(tmp_path, data, images={"a.png": 1})
    msg = _error(read_coco_boxes, p, tmp_path / "img")
    assert msg == f"{tmp_path / 'img' / 'gone.png'}: image file not found (image id 2)"
    index = read_coco_boxes(p, tmp_path / "img", skip_bad=True)
    assert [b[0] for b in index.boxes] == [1] and index.n_bad_image == 1


def test_image_paths_go_through_the_resolver(tmp_path):
    p = _write(tmp_path, _coco([_image(1, "a.png"), _image(2, "../c.json")], []))
    coco = load_coco(p)
    assert coco.paths(tmp_path / "img", [1]) == {1: tmp_path / "img" / "a.png"}
    msg = _error(coco.paths, tmp_path / "img")
    assert "image id 2: file_name '../c.json' leads outside the image folder" in msg


@pytest.mark.parametrize("text, needle", [
    ('{"images": [', "malformed COCO annotation"),
    ("[1, 2", "malformed COCO annotation"),
    ('"just a string"', "malformed COCO json (top level is not an object)"),
    ("\xff\xfe", "malformed COCO annotation"),
])
def test_a_bad_json_is_one_line_naming_the_file(tmp_path, text, needle):
    p = tmp_path / "bad.json"
    p.write_bytes(text.encode("latin-1"))
    msg = _error(load_coco, p, "COCO annotation")
    assert msg.startswith(f"{p}: ") and needle in msg
    assert _error(load_coco, tmp_path / "none.json", "COCO annotation") == f"{tmp_path / 'none.json'}: COCO annotation file not found"


def test_the_reader_imports_no_model_command_proxy_or_evaluation_code():
    import subprocess
    import sys

    code = ("import sys, boxcaseg.cocojson; "
            "bad = [m for m in sys.modules if m.startswith(('torch', 'boxcaseg.proxy', 'boxcaseg.evaluate', "
            "'boxcaseg.commands', 'boxcaseg.model', 'boxcaseg.maskrcnn'))]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
