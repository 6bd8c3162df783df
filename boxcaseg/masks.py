"""Mask representations and the one mask-IoU function.

COCO segmentations come as polygons, uncompressed RLE or compressed RLE; everything is
converted to compressed RLE (pycocotools, ``counts`` as ``str`` in files) here.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from boxcaseg.errors import BoxcasegError


def encode(mask: np.ndarray) -> dict:
    """Binary mask [H, W] -> compressed RLE with ``counts`` as str (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8, copy=False)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _as_bytes_rle(rle: dict) -> dict:
    counts = rle["counts"]
    if isinstance(counts, str):
        return {"size": list(rle["size"]), "counts": counts.encode("ascii")}
    return rle


def to_rle(segm: Any, height: int, width: int, ann_id: Any = None) -> dict:
    """Any COCO segmentation (polygons, RLE, uncompressed RLE) -> compressed RLE (bytes counts)."""
    try:
        if isinstance(segm, list):
            polys = [p for p in segm if len(p) >= 6]
            if not polys:
                return mask_utils.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
            return mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
        if isinstance(segm, dict) and isinstance(segm.get("counts"), list):
            return mask_utils.frPyObjects(segm, height, width)
        if isinstance(segm, dict) and "counts" in segm:
            return _as_bytes_rle(segm)
    except Exception as e:  # pycocotools raises plain Exceptions on malformed input
        raise BoxcasegError(f"annotation {ann_id}: malformed segmentation ({e})") from e
    raise BoxcasegError(f"annotation {ann_id}: segmentation is neither polygons nor RLE")


def decode(segm: Any, height: int, width: int, ann_id: Any = None) -> np.ndarray:
    """Any COCO segmentation -> binary mask [H, W] uint8."""
    return mask_utils.decode(to_rle(segm, height, width, ann_id)).astype(np.uint8)


def mask_iou(a: Any, b: Any) -> np.ndarray | float:
    """IoU between masks: the single mask-IoU function of the project.

    ``a``, ``b``: binary arrays [H, W] (returns a float) or lists of compressed RLEs
    (returns an [len(a), len(b)] float64 matrix). Two empty masks have IoU 0.
    """
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        a = a.astype(bool, copy=False)
        b = b.astype(bool, copy=False)
        union = np.logical_or(a, b).sum()
        return float(np.logical_and(a, b).sum() / union) if union else 0.0
    a = [_as_bytes_rle(r) for r in a]
    b = [_as_bytes_rle(r) for r in b]
    if not a or not b:
        return np.zeros((len(a), len(b)), dtype=np.float64)
    return np.asarray(mask_utils.iou(a, b, [0] * len(b)), dtype=np.float64).reshape(len(a), len(b))


def tight_box_xyxy(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight box of a binary mask in pixel-edge ``xyxy`` (x1, y1 exclusive), None if empty."""
    ys = np.flatnonzero(mask.any(axis=1))
    if ys.size == 0:
        return None
    xs = np.flatnonzero(mask.any(axis=0))
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


def area(rles: Sequence[dict]) -> np.ndarray:
    return np.asarray(mask_utils.area([_as_bytes_rle(r) for r in rles]))


def encode_window(window: np.ndarray, x0: int, y0: int, height: int, width: int) -> dict:
    """Compressed RLE (``counts`` as str) of a ``height`` x ``width`` mask that is zero
    outside the box-local ``window`` [h, w] placed with its top-left pixel at (x0, y0).

    Equal to ``encode(full)`` with ``full[y0:y0+h, x0:x0+w] = window``, without building
    the full-image mask: O(window area). The window must lie inside the image.
    """
    wh, ww = window.shape
    if x0 < 0 or y0 < 0 or x0 + ww > width or y0 + wh > height:
        raise ValueError(f"window {ww}x{wh} at ({x0}, {y0}) is not inside a {width}x{height} image")
    total = int(height) * int(width)
    if wh == 0 or ww == 0:
        changes = np.zeros(0, dtype=np.int64)
    else:
        # column-major (COCO/Fortran) order: one padded row of zeros above and below each column
        cols = np.zeros((ww, wh + 2), dtype=np.int8)
        cols[:, 1:-1] = window.T.astype(bool)
        c, j = np.nonzero(np.diff(cols, axis=1))
        changes = (x0 + c).astype(np.int64) * height + y0 + j
        if wh == height and changes.size > 1:
            # a full-height window: a run may go on from the bottom of one column to the top
            # of the next; the two transitions at that position cancel
            pos, n = np.unique(changes, return_counts=True)
            changes = pos[n % 2 == 1]
        changes = changes[changes < total]  # a run that ends with the image has no transition
    counts = np.diff(np.concatenate(([0], changes, [total]))).astype(np.uint32)
    rle = mask_utils.frPyObjects({"size": [int(height), int(width)], "counts": counts.tolist()}, int(height), int(width))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def empty_rle(height: int, width: int) -> dict:
    """Compressed RLE (str counts) of an all-zero ``height`` x ``width`` mask."""
    return encode_window(np.zeros((0, 0), np.uint8), 0, 0, height, width)
