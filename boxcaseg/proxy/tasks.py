"""COCO instances json for proxy masks: validation, the per-image work list, the output.

The json is validated by the one COCO reader (:mod:`boxcaseg.cocojson`: its rules for
ids, ``iscrowd``, degenerate boxes and missing keys); this module builds the proxy's
work on top of it.

The output is the input json with every non-crowd annotation's ``segmentation``
replaced by a compressed RLE (``counts`` as str) and two fields added:
``proxy_agreement`` (float) and ``ignore_mask`` (bool). Crowd annotations, images,
categories and every other field are left as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from boxcaseg.cocojson import CocoData, box_problem, degenerate_error, is_crowd, parse_coco
from boxcaseg.errors import BoxcasegError
from boxcaseg.proxy.geometry import box_window, clipped_box_xyxy, crop_window


@dataclass
class ImageTask:
    """One image and its non-crowd annotations, in annotation-list order."""

    index: int                      # position in the image-id order
    image_id: Any
    file_name: str
    width: int
    height: int
    ann_ids: list = field(default_factory=list)
    bboxes: list = field(default_factory=list)
    reasons: list = field(default_factory=list)  # None = usable, else why it is flagged
    boxes: np.ndarray | None = None              # [n, 4] int64 box windows (usable only)
    crops: np.ndarray | None = None              # [n, 4] int64 crop windows (usable only)
    gt_xyxy: np.ndarray | None = None            # [n, 4] float64 GT clipped to the image
    areas: np.ndarray | None = None              # [n] float64 GT box areas (merge priority)

    @property
    def usable(self) -> list[int]:
        return [i for i, r in enumerate(self.reasons) if r is None]


def validate_coco(data: Any, src: str | Path) -> CocoData:
    """Check ``data`` by the reader's rules (:func:`boxcaseg.cocojson.parse_coco`); a
    problem raises BoxcasegError naming the file and the id. Returns the parsed json."""
    return parse_coco(data, src)


def build_tasks(data: dict, context: float, strict: bool, src: str | Path) -> list[ImageTask]:
    """Every image (sorted by id) with its non-crowd annotations and their windows.

    A box that is non-finite, has non-positive size or lies entirely outside its image
    is flagged (``strict``: BoxcasegError naming the annotation).
    """
    images = sorted(data["images"], key=lambda im: (str(type(im["id"])), im["id"]))
    by_id: dict[Any, ImageTask] = {}
    tasks = []
    for i, img in enumerate(images):
        t = ImageTask(i, img["id"], img["file_name"], int(img["width"]), int(img["height"]))
        by_id[img["id"]] = t
        tasks.append(t)
    for ann in data["annotations"]:
        if is_crowd(ann):
            continue
        t = by_id[ann["image_id"]]
        bbox = ann.get("bbox")
        reason = box_problem(bbox, t.width, t.height)
        if reason is not None:
            if strict:
                raise degenerate_error(src, ann, t.image_id, reason)
            reason = f"degenerate box: {reason}"
        t.ann_ids.append(ann["id"])
        t.bboxes.append(bbox)
        t.reasons.append(reason)
    for t in tasks:
        _set_windows(t, context)
    return tasks


def image_task(width: int, height: int, boxes_xywh, context: float) -> ImageTask:
    """The task of one image of ``width`` x ``height`` and its boxes (COCO xywh, in order; ann
    ids 0..K-1), windows as :func:`build_tasks` makes them. A box that a COCO json would flag
    raises BoxcasegError naming it (callers check the boxes first, in their own words)."""
    t = ImageTask(0, 0, "", int(width), int(height))
    for k, b in enumerate(boxes_xywh):
        bbox = [float(v) for v in b]
        reason = box_problem(bbox, t.width, t.height)
        if reason is not None:
            raise BoxcasegError(f"box {k} {bbox}: {reason}")
        t.ann_ids.append(k)
        t.bboxes.append(bbox)
        t.reasons.append(None)
    _set_windows(t, context)
    return t


def _set_windows(t: ImageTask, context: float) -> None:
    """The usable boxes' windows: box, crop (``context`` x the box), clipped GT box, GT area."""
    use = t.usable
    t.boxes = np.array([box_window(t.bboxes[i], t.width, t.height) for i in use], np.int64).reshape(-1, 4)
    t.crops = np.array([crop_window(t.bboxes[i], t.width, t.height, context) for i in use], np.int64).reshape(-1, 4)
    t.gt_xyxy = np.array([clipped_box_xyxy(t.bboxes[i], t.width, t.height) for i in use], np.float64).reshape(-1, 4)
    t.areas = np.array([float(t.bboxes[i][2]) * float(t.bboxes[i][3]) for i in use], np.float64)


def apply_results(data: dict, results: dict, info: dict | None = None) -> dict:
    """The output json: ``data`` with ``results[ann_id] = (rle, agreement, ignore)`` applied.

    Every non-crowd annotation must have a result (nothing is dropped silently).
    ``info``: the model and settings of the run, recorded as ``info.boxcaseg_proxy``.
    """
    out = dict(data)
    if info is not None:
        base = data.get("info") if isinstance(data.get("info"), dict) else {}
        out["info"] = {**base, "boxcaseg_proxy": info}
    anns = []
    for ann in data["annotations"]:
        if is_crowd(ann):
            anns.append(ann)
            continue
        res = results.get(ann_key(ann["id"]))
        if res is None:
            raise BoxcasegError(f"annotation id {ann['id']!r}: no proxy mask was produced for it (incomplete shards?)")
        rle, agreement, ignore = res
        new = dict(ann)
        new["segmentation"] = rle
        new["proxy_agreement"] = float(agreement)
        new["ignore_mask"] = bool(ignore)
        anns.append(new)
    out["annotations"] = anns
    return out


def ann_key(ann_id: Any) -> str:
    """Annotation ids as JSON object keys (ints and strings kept apart)."""
    return f"{type(ann_id).__name__}:{ann_id}"
