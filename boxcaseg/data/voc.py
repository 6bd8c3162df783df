"""PASCAL VOC / SBD style folders to a COCO instances json with RLE masks.

Layout read (``VOCROOT`` is e.g. ``VOCdevkit/VOC2012``)::

    Annotations/NAME.xml              boxes and class names (required)
    JPEGImages/NAME.jpg               the images (only their names are used)
    SegmentationObject/NAME.png       instance ids (palette PNG; 0 background, 255 void)
    SegmentationClass/NAME.png        class ids (palette PNG), optional, used as a check
    ImageSets/Segmentation/SPLIT.txt  image-set lists (or ImageSets/Main/SPLIT.txt)

SBD's ``inst/NAME.mat`` + ``cls/NAME.mat`` are read instead of the PNGs when the PNGs
are absent and scipy is installed.

Instance ``k`` of ``SegmentationObject`` is the ``k``-th object of the XML file (the VOC
convention); its class must agree with the XML's. An image without an instance PNG
keeps its boxes, with the box filled as mask and ``ignore_mask: true`` so that a Mask
R-CNN trained on the file does not learn from these rectangles (so does an object the
instance PNG does not show). VOC boxes are 1-based
inclusive pixel indices: ``xmin..xmax`` becomes COCO ``x = xmin - 1, w = xmax - xmin + 1``.

This module depends only on the standard library, numpy, Pillow and boxcaseg.masks.
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from boxcaseg.errors import BoxcasegError
from boxcaseg.io import read_text
from boxcaseg.masks import area as rle_area
from boxcaseg.masks import encode
from boxcaseg.paths import walk_files

log = logging.getLogger(__name__)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
VOID = 255


@dataclass
class VocObject:
    name: str
    box_xyxy: tuple[float, float, float, float]  # pixel edges, 0-based
    difficult: bool


def _text(node: ET.Element, tag: str, xml: Path) -> str:
    child = node.find(tag)
    if child is None or child.text is None:
        raise BoxcasegError(f"{xml}: missing <{tag}>")
    return child.text.strip()


def parse_voc_xml(xml: Path) -> tuple[str, int, int, list[VocObject]]:
    """(file_name, height, width, objects) of one VOC annotation file."""
    try:
        root = ET.parse(xml).getroot()
    except (ET.ParseError, OSError) as e:
        raise BoxcasegError(f"{xml}: not a readable VOC annotation XML ({e})") from e
    file_name = root.findtext("filename", default=f"{xml.stem}.jpg").strip()
    size = root.find("size")
    if size is None:
        raise BoxcasegError(f"{xml}: missing <size>")
    try:
        width, height = int(float(_text(size, "width", xml))), int(float(_text(size, "height", xml)))
    except ValueError as e:
        raise BoxcasegError(f"{xml}: non-numeric image size ({e})") from e
    objects = []
    for i, obj in enumerate(root.findall("object")):
        name = _text(obj, "name", xml)
        bb = obj.find("bndbox")
        if bb is None:
            raise BoxcasegError(f"{xml}: object {i} ({name}) has no <bndbox>")
        try:
            x0, y0, x1, y1 = (float(_text(bb, t, xml)) for t in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError as e:
            raise BoxcasegError(f"{xml}: object {i} ({name}) has a non-numeric box ({e})") from e
        if x1 < x0 or y1 < y0:
            raise BoxcasegError(f"{xml}: object {i} ({name}) has xmax < xmin or ymax < ymin")
        difficult = obj.findtext("difficult", default="0").strip() in ("1", "true")
        objects.append(VocObject(name, (x0 - 1.0, y0 - 1.0, x1, y1), difficult))
    return file_name, height, width, objects


def _read_png(path: Path) -> np.ndarray:
    from boxcaseg.images import read_image

    im = read_image(path, "PNG")
    if im.mode not in ("P", "L"):
        raise BoxcasegError(f"{path}: expected an indexed (palette) or grey PNG, got mode {im.mode}")
    return np.asarray(im)


def _read_sbd_mat(path: Path, key: str) -> np.ndarray:
    try:
        from scipy.io import loadmat
    except ImportError as e:  # pragma: no cover - scipy is optional
        raise BoxcasegError(f"{path}: reading SBD .mat files needs scipy (pip install scipy)") from e
    try:
        return np.asarray(loadmat(path)[key][0, 0]["Segmentation"])
    except Exception as e:  # scipy raises many types on a bad file
        raise BoxcasegError(f"{path}: not an SBD {key} .mat file ({e})") from e


def _instance_maps(root: Path, name: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    obj_png, cls_png = root / "SegmentationObject" / f"{name}.png", root / "SegmentationClass" / f"{name}.png"
    inst = _read_png(obj_png) if obj_png.is_file() else None
    cls = _read_png(cls_png) if cls_png.is_file() else None
    if inst is None and (root / "inst" / f"{name}.mat").is_file():
        inst = _read_sbd_mat(root / "inst" / f"{name}.mat", "GTinst")
        if (root / "cls" / f"{name}.mat").is_file():
            cls = _read_sbd_mat(root / "cls" / f"{name}.mat", "GTcls")
    return inst, cls


def read_image_set(root: Path, split: str | None) -> list[str]:
    """Image names of ``split`` (a name under ImageSets/Segmentation or ImageSets/Main, or a
    path to a list file); all ``Annotations/*.xml`` in sorted order when ``split`` is None."""
    if split is None:
        names = sorted(p.stem for p in walk_files(root / "Annotations", (".xml",), recursive=False))
        if not names:
            raise BoxcasegError(f"{root / 'Annotations'}: no VOC annotation XML files")
        return names
    candidates = [Path(split), root / "ImageSets" / "Segmentation" / f"{split}.txt",
                  root / "ImageSets" / "Main" / f"{split}.txt", root / f"{split}.txt"]
    for c in candidates:
        if c.suffix == ".txt" and c.is_file():
            # Main/ lists of one class hold "name flag"; keep the first column
            return [line.split()[0] for line in read_text(c, "image list").splitlines() if line.strip()]
    raise BoxcasegError(f"{root}: image set {split!r} not found (looked for "
                        f"{', '.join(str(c) for c in candidates[1:])})")


def voc_to_coco(root: str | os.PathLike, split: str | None = None,
                classes: tuple[str, ...] = VOC_CLASSES) -> dict:
    """Convert a VOC/SBD folder (see the module doc) to a COCO instances dict.

    Category ids are 1..K in ``classes`` order, followed by any other class name met in
    the XML files (sorted). Image ids are 1..N in image-set order; ``file_name`` is the
    XML's ``<filename>`` (relative to ``JPEGImages``).
    """
    root = Path(root)
    if not (root / "Annotations").is_dir():
        raise BoxcasegError(f"{root}: no Annotations/ folder (expected a VOC root such as VOCdevkit/VOC2012)")
    names = read_image_set(root, split)
    parsed = []
    for name in names:
        xml = root / "Annotations" / f"{name}.xml"
        if not xml.is_file():
            raise BoxcasegError(f"{xml}: listed in the image set but missing")
        parsed.append((name, xml, *parse_voc_xml(xml)))
    extra = sorted({o.name for *_, objs in parsed for o in objs} - set(classes))
    all_classes = list(classes) + extra
    cat_id = {c: i + 1 for i, c in enumerate(all_classes)}

    images, annotations = [], []
    n_masked = n_box_only = 0
    for image_id, (name, xml, file_name, height, width, objects) in enumerate(parsed, start=1):
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        inst, cls = _instance_maps(root, name)
        if inst is not None and inst.shape != (height, width):
            raise BoxcasegError(f"{root}: instance mask of {name} is {inst.shape[0]}x{inst.shape[1]}, "
                                f"the XML says {height}x{width}")
        ids = [] if inst is None else sorted(int(v) for v in np.unique(inst) if v not in (0, VOID))
        if inst is not None and ids and ids[-1] > len(objects):
            raise BoxcasegError(f"{root}: instance mask of {name} holds instance {ids[-1]} but {xml} "
                                f"lists {len(objects)} objects")
        for k, obj in enumerate(objects, start=1):
            x0, y0, x1, y1 = obj.box_xyxy
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": cat_id[obj.name],
                   "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0, "difficult": int(obj.difficult)}
            m = inst == k if inst is not None else None
            if m is not None and m.any():
                if cls is not None and m.any() and obj.name in classes:
                    vals, counts = np.unique(cls[m], return_counts=True)
                    major = int(vals[counts.argmax()])
                    if major != classes.index(obj.name) + 1:
                        raise BoxcasegError(f"{root}: instance {k} of {name} has class index {major} in "
                                            f"SegmentationClass, but {xml} object {k} is {obj.name!r}")
                ann["segmentation"] = encode(m)
                n_masked += 1
            else:
                # no instance mask: the filled box, flagged so that no mask loss learns from it
                m = np.zeros((height, width), np.uint8)
                m[int(round(y0)):int(round(y1)), int(round(x0)):int(round(x1))] = 1
                ann["segmentation"] = encode(m)
                ann["ignore_mask"] = True
                n_box_only += 1
            ann["area"] = float(rle_area([ann["segmentation"]])[0])
            annotations.append(ann)
    log.info("VOC %s: %d images, %d objects with masks, %d box-only (ignore_mask)",
             root, len(images), n_masked, n_box_only)
    return {
        "info": {"description": f"converted from {root}" + (f" ({split})" if split else "")},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cat_id[c], "name": c, "supercategory": "voc"} for c in all_classes],
    }


def write_voc_as_coco(root: str | os.PathLike, out: str | os.PathLike, split: str | None = None) -> dict:
    """:func:`voc_to_coco` written atomically to ``out``; returns the dict."""
    from boxcaseg.io import atomic_write_json, check_output_file, check_outputs

    check_output_file(out, "-o")  # before any work; never among the files it reads
    r = Path(root)
    check_outputs({"-o": out}, {f"VOC_ROOT/{d}": r / d for d in ("Annotations", "SegmentationObject",
                                                                  "SegmentationClass", "ImageSets", "inst", "cls")}
                  | {"--split": split if split and Path(split).is_file() else None})
    coco = voc_to_coco(root, split)
    atomic_write_json(out, coco)
    return coco
