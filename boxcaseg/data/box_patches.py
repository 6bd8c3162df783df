"""COCO instances json -> box patches for MIL training.

One sample per non-crowd annotation with a usable box. The GT box is jittered (centre
shift U(-s, s) * w and * h, width and height scaled by U(a, b) independently), the
jittered region is cropped (padding with the mean colour where it leaves the image, so
the box stays where the label says) and resized to ``patch_size``; the label is the GT
box drawn as a binary mask in patch coordinates.

With ``pseudo_ann`` (a ``boxcaseg proxy`` output json for the same annotations: self-training)
the label gets a second channel: the annotation's proxy mask, cropped and resized the same
way (bilinear, so it is soft at its edges), or -1 (ignore) everywhere for an annotation the
proxy json marks ``ignore_mask`` or lacks.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from boxcaseg.boxes import xywh_to_xyxy
from boxcaseg.cocojson import check_image_file, degenerate_error, id_order, is_crowd, load_coco
from boxcaseg.data.transforms import crop_resize, open_rgb
from boxcaseg.imageops import normalize
from boxcaseg.errors import BoxcasegError
from boxcaseg.io import load_json

log = logging.getLogger(__name__)


@dataclass
class CocoIndex:
    """What a COCO instances json says about images and usable boxes."""

    images: dict[int, dict]                 # image id -> image record
    boxes: list[tuple[int, int, tuple]]     # (annotation id, image id, xywh)
    n_crowd: int
    n_degenerate: int
    n_bad_image: int
    paths: dict[int, Path] = field(default_factory=dict)  # image id -> its file (checked: inside the folder)


def read_coco_boxes(
    ann_file: str | Path,
    image_dir: str | Path,
    skip_bad: bool = False,
    strict: bool = False,
    check_images: bool = True,
) -> CocoIndex:
    """Read a COCO json (:func:`boxcaseg.cocojson.load_coco`: its rules and errors) and
    list its usable boxes.

    With ``skip_bad``, an annotation pointing at an unknown image and the annotations of
    a missing or unreadable image file are skipped and counted instead of raising; every
    image is then decoded up front, so a truncated file is one of them. Without it, the
    headers are read up front (a file that does not decode stops the run when it is met).
    Degenerate boxes (:func:`boxcaseg.cocojson.box_problem`) and annotations whose
    ``area`` is given and not positive are skipped and counted in one warning line
    (``strict``: an error). A ``file_name`` that leads outside ``image_dir`` is always an
    error, checked for every image first.
    """
    ann_file = Path(ann_file)
    image_dir = Path(image_dir)
    coco = load_coco(ann_file, "COCO annotation", skip_orphans=skip_bad)
    if not image_dir.is_dir():
        raise BoxcasegError(f"{image_dir}: image folder not found")
    # every file_name must stay inside image_dir (even with --skip-bad): checked before any work
    paths = coco.paths(image_dir)
    bad_images: set = set()
    boxes = []
    n_crowd = n_degenerate = 0
    degenerate_examples = []
    for ann in coco.orphans:  # only with skip_bad
        if is_crowd(ann):
            n_crowd += 1
        else:
            bad_images.add(("unknown", ann["image_id"]))
    for ann in coco.anns:
        aid = ann["id"]
        if is_crowd(ann):
            n_crowd += 1
            continue
        reason = coco.box_problem(ann)
        if reason is None and float(ann.get("area", 1) or 0) <= 0 and "area" in ann:
            reason = "non-positive area"
        if reason is not None:
            if strict:
                raise degenerate_error(ann_file, ann, ann["image_id"], reason)
            n_degenerate += 1
            if len(degenerate_examples) < 3:
                degenerate_examples.append(f"{aid} ({reason})")
            continue
        boxes.append((aid, ann["image_id"], tuple(float(v) for v in ann["bbox"])))
    if check_images:
        used = sorted({b[1] for b in boxes}, key=id_order)
        for iid in used:
            # with skip_bad every image is decoded: a truncated file is skipped here, not met mid-run
            err = check_image_file(paths[iid], iid, decode=skip_bad, size=coco.image_size(iid))
            if err:
                if not skip_bad:
                    raise BoxcasegError(err)
                bad_images.add(iid)
        if bad_images:
            before = len(boxes)
            boxes = [b for b in boxes if b[1] not in bad_images]
            log.warning("%s: skipped %d bad image(s) / references and their %d annotation(s) (--skip-bad)",
                        ann_file, len(bad_images), before - len(boxes))
    if n_degenerate:
        log.warning("%s: skipped %d annotation(s) with degenerate boxes, e.g. %s (--strict makes this an error)",
                    ann_file, n_degenerate, ", ".join(degenerate_examples))
    if not boxes:
        raise BoxcasegError(f"{ann_file}: no usable (non-crowd, non-degenerate) box annotation")
    return CocoIndex(coco.images, boxes, n_crowd, n_degenerate, len(bad_images), paths)


def jitter_box(xyxy: tuple, rng: np.random.Generator, shift: float, smin: float, smax: float) -> tuple:
    """Paper jitter: centre += U(-shift, shift) * (w, h); w, h *= U(smin, smax) each."""
    x0, y0, x1, y1 = xyxy
    w, h = x1 - x0, y1 - y0
    cx = (x0 + x1) / 2 + rng.uniform(-shift, shift) * w
    cy = (y0 + y1) / 2 + rng.uniform(-shift, shift) * h
    nw = w * rng.uniform(smin, smax)
    nh = h * rng.uniform(smin, smax)
    return cx - nw / 2, cy - nh / 2, cx + nw / 2, cy + nh / 2


def box_label(gt: tuple, region: tuple, size: int) -> np.ndarray:
    """GT ``xyxy`` box drawn as a {0,1} mask in the patch of ``region`` resized to size.

    A patch pixel (i, j) is inside when its centre maps inside the GT box. A box that
    is smaller than a pixel still marks the pixel containing its centre.
    """
    rx0, ry0, rx1, ry1 = region
    sx = size / (rx1 - rx0)
    sy = size / (ry1 - ry0)
    gx0, gy0 = (gt[0] - rx0) * sx, (gt[1] - ry0) * sy
    gx1, gy1 = (gt[2] - rx0) * sx, (gt[3] - ry0) * sy
    c0 = int(np.clip(math.ceil(gx0 - 0.5), 0, size))
    c1 = int(np.clip(math.ceil(gx1 - 0.5), 0, size))
    r0 = int(np.clip(math.ceil(gy0 - 0.5), 0, size))
    r1 = int(np.clip(math.ceil(gy1 - 0.5), 0, size))
    if c1 <= c0:
        cx = int(np.clip(math.floor((gx0 + gx1) / 2), 0, size - 1))
        c0, c1 = cx, cx + 1
    if r1 <= r0:
        cy = int(np.clip(math.floor((gy0 + gy1) / 2), 0, size - 1))
        r0, r1 = cy, cy + 1
    m = np.zeros((size, size), np.float32)
    m[r0:r1, c0:c1] = 1.0
    return m


def read_pseudo_masks(path: str | Path, index: CocoIndex) -> dict:
    """annotation id -> RLE (pycocotools form) of a proxy-mask json, for the ids of ``index``.

    Annotations marked ``ignore_mask`` (dropped by merge/drop) are left out (ignored in
    training). Errors name the file and the annotation.
    """
    from boxcaseg.masks import to_rle

    data = load_json(path, "pseudo-mask json")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise BoxcasegError(f"{path}: not a COCO json (no 'annotations' list)")
    wanted = {aid: iid for aid, iid, _ in index.boxes}
    out = {}
    for ann in data["annotations"]:
        aid = ann.get("id")
        if aid not in wanted or ann.get("ignore_mask") or ann.get("iscrowd"):
            continue
        seg = ann.get("segmentation")
        img = index.images[wanted[aid]]
        h, w = int(img["height"]), int(img["width"])
        try:
            rle = to_rle(seg, h, w, aid)
        except BoxcasegError as e:
            raise BoxcasegError(f"{path}: {e}") from e
        out[aid] = rle
    if not out:
        raise BoxcasegError(f"{path}: no usable mask for any annotation of the box json")
    log.info("pseudo masks %s: %d of %d box annotations", path, len(out), len(wanted))
    return out


class BoxPatchDataset(torch.utils.data.Dataset):
    """Box patches of a COCO json. Item key: ``(index, seed)`` or ``index``.

    Returns (image [3, S, S] float32 normalised, label [1, S, S] float32, is_salient=False).
    """

    def __init__(
        self,
        ann_file: str | Path,
        image_dir: str | Path,
        patch_size: int = 288,
        shift: float = 0.25,
        scale: tuple[float, float] = (0.5, 1.5),
        hflip: bool = False,
        skip_bad: bool = False,
        strict: bool = False,
        pseudo_ann: str | Path | None = None,
    ):
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        self.index = read_coco_boxes(ann_file, image_dir, skip_bad=skip_bad, strict=strict)
        self.patch_size = patch_size
        self.shift = shift
        self.scale = scale
        self.hflip = hflip
        self.skip_bad = skip_bad
        self.pseudo: dict | None = None
        self.pseudo_file = Path(pseudo_ann) if pseudo_ann else None
        if pseudo_ann:
            self.pseudo = read_pseudo_masks(pseudo_ann, self.index)

    def __len__(self) -> int:
        return len(self.index.boxes)

    def image_path(self, image_id: int) -> Path:
        return self.index.paths[image_id]

    def __getitem__(self, key):
        idx, seed = key if isinstance(key, tuple) else (key, key)
        rng = np.random.default_rng(seed)
        aid, iid, xywh = self.index.boxes[idx]
        rec = self.index.images[iid]
        img = open_rgb(self.image_path(iid), "image", (int(rec["width"]), int(rec["height"])),
                       f" (image id {iid}, annotation {aid})")
        gt = xywh_to_xyxy(xywh)
        region = jitter_box(gt, rng, self.shift, *self.scale)
        patch = crop_resize(img, region, self.patch_size)
        label = box_label(gt, region, self.patch_size)[None]
        if self.pseudo is not None:
            label = np.concatenate([label, self._pseudo_label(aid, img.size, region)[None]])
        arr = np.asarray(patch)
        if self.hflip and rng.random() < 0.5:
            arr = arr[:, ::-1]
            label = label[:, :, ::-1]
        return normalize(arr), torch.from_numpy(np.ascontiguousarray(label)), False

    def _pseudo_label(self, aid, image_size: tuple[int, int], region: tuple) -> np.ndarray:
        seg = self.pseudo.get(aid)
        if seg is None:
            return np.full((self.patch_size, self.patch_size), -1.0, np.float32)
        from pycocotools import mask as mask_utils

        w, h = image_size
        m = mask_utils.decode(seg)
        if m.shape != (h, w):
            raise BoxcasegError(f"{self.pseudo_file}: annotation {aid}: mask is {m.shape[1]}x{m.shape[0]}, "
                                f"its image {w}x{h}")
        crop = crop_resize(Image.fromarray(m * np.uint8(255)), region, self.patch_size, fill=0)
        return np.asarray(crop, dtype=np.float32) / 255.0
