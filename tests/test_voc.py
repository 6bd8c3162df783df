"""`boxcaseg data voc-to-coco` on a tiny VOC tree written by the test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from boxcaseg.data.voc import VOC_CLASSES, voc_to_coco
from boxcaseg.errors import BoxcasegError
from boxcaseg.masks import decode

H, W = 10, 12


def _xml(name: str, objects: list[tuple[str, tuple[int, int, int, int], int]]) -> str:
    objs = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b, d in objects)
    return (f"<annotation><filename>{name}.jpg</filename><size><width>{W}</width><height>{H}</height>"
            f"<depth>3</depth></size>{objs}</annotation>")


def _png(path: Path, arr: np.ndarray) -> None:
    im = Image.fromarray(arr.astype(np.uint8), mode="P")
    im.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [200] * (253 * 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def make_voc(root: Path) -> Path:
    """Image a: a dog (instance 1) and a person (instance 2, difficult) with masks and a void
    border; image b: a cat with no PNGs. Split lists: train = a, val = b."""
    (root / "Annotations").mkdir(parents=True)
    # VOC boxes: 1-based inclusive pixel indices
    (root / "Annotations" / "a.xml").write_text(_xml("a", [("dog", (1, 1, 4, 5), 0), ("person", (7, 2, 12, 10), 1)]))
    (root / "Annotations" / "b.xml").write_text(_xml("b", [("cat", (3, 3, 6, 8), 0)]))
    inst = np.zeros((H, W), np.uint8)
    inst[0:5, 0:4] = 1          # dog: rows 0..4, cols 0..3 (box xmin=1..xmax=4)
    inst[1:10, 6:12] = 2        # person
    inst[5, 0:4] = 255          # void border below the dog: not part of any mask
    inst[1, 6:12] = 255         # void row over the person
    cls = np.where(inst == 1, VOC_CLASSES.index("dog") + 1, 0)
    cls = np.where(inst == 2, VOC_CLASSES.index("person") + 1, cls)
    cls = np.where(inst == 255, 255, cls)
    _png(root / "SegmentationObject" / "a.png", inst)
    _png(root / "SegmentationClass" / "a.png", cls)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("a\n")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("b\n")
    (root / "JPEGImages").mkdir()
    for n in ("a", "b"):
        Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(root / "JPEGImages" / f"{n}.jpg")
    return root


def test_voc_to_coco_masks_boxes_and_classes(tmp_path):
    root = make_voc(tmp_path / "VOC")
    coco = voc_to_coco(root)
    assert [im["file_name"] for im in coco["images"]] == ["a.jpg", "b.jpg"]
    assert all(im["height"] == H and im["width"] == W for im in coco["images"])
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    assert len(cats) == 20 and cats[12] == "dog" and cats[15] == "person" and cats[8] == "cat"
    dog, person, cat = coco["annotations"]
    assert dog["category_id"] == 12 and dog["bbox"] == [0.0, 0.0, 4.0, 5.0]
    assert person["difficult"] == 1 and person["bbox"] == [6.0, 1.0, 6.0, 9.0]
    m = decode(dog["segmentation"], H, W)
    assert m.sum() == 20 and m[0:5, 0:4].all() and not m[5].any()  # void row excluded
    m = decode(person["segmentation"], H, W)
    assert m.sum() == 8 * 6 and not m[1].any()
    assert dog["area"] == 20.0
    assert "ignore_mask" not in dog
    # b has no PNG: box-filled mask, flagged
    assert cat["ignore_mask"] is True and cat["category_id"] == 8 and cat["bbox"] == [2.0, 2.0, 4.0, 6.0]
    assert decode(cat["segmentation"], H, W)[2:8, 2:6].all() and cat["area"] == 24.0


def test_voc_to_coco_split_and_cli(tmp_path, capsys):
    from boxcaseg.cli import main
    from boxcaseg.evaluate import mask_quality

    root = make_voc(tmp_path / "VOC")
    assert [im["file_name"] for im in voc_to_coco(root, "train")["images"]] == ["a.jpg"]
    out = tmp_path / "val.json"
    try:
        main(["data", "voc-to-coco", str(root), "-o", str(out), "--split", "train"])
    except SystemExit as e:
        assert e.code in (0, None)
    coco = json.loads(out.read_text())
    assert len(coco["annotations"]) == 2
    assert "2 objects" in capsys.readouterr().out
    # the converted file is a valid GT: against itself every instance has IoU 1
    assert mask_quality(out, out)["miou"] == pytest.approx(1.0)


def test_voc_to_coco_errors_name_the_file(tmp_path):
    root = make_voc(tmp_path / "VOC")
    with pytest.raises(BoxcasegError, match="image set 'test' not found"):
        voc_to_coco(root, "test")
    # class disagreement between the XML and SegmentationClass
    (root / "Annotations" / "a.xml").write_text(_xml("a", [("cat", (1, 1, 4, 5), 0), ("person", (7, 2, 12, 10), 1)]))
    with pytest.raises(BoxcasegError, match="a.xml object 1 is 'cat'"):
        voc_to_coco(root)
    (root / "Annotations" / "a.xml").write_text(_xml("a", [("dog", (1, 1, 4, 5), 0)]))
    with pytest.raises(BoxcasegError, match="holds instance 2"):
        voc_to_coco(root)
    (root / "Annotations" / "a.xml").write_text("<annotation><size>")
    with pytest.raises(BoxcasegError, match="a.xml"):
        voc_to_coco(root)
    with pytest.raises(BoxcasegError, match="no Annotations"):
        voc_to_coco(tmp_path)


def test_voc_to_coco_unknown_class_is_appended(tmp_path):
    root = make_voc(tmp_path / "VOC")
    (root / "Annotations" / "b.xml").write_text(_xml("b", [("unicorn", (3, 3, 6, 8), 0)]))
    coco = voc_to_coco(root)
    assert coco["categories"][-1] == {"id": 21, "name": "unicorn", "supercategory": "voc"}
    assert coco["annotations"][-1]["category_id"] == 21
