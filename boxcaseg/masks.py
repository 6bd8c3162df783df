"""Mask representations and the one mask-IoU function.

COCO segmentations come as polygons, uncompressed RLE or compressed RLE; everything is
converted to compressed RLE (pycocotools, ``counts`` as ``str`` in files) here.
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from boxcaseg.boxes import is_finite_number
from boxcaseg.errors import BoxcasegError


def encode(mask: np.ndarray) -> dict:
    """Binary mask [H, W] -> compressed RLE with ``counts`` as str (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8, copy=False)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


class UnreadableMask(BoxcasegError):
    """A compressed RLE whose ``counts`` do not decode to a mask of its ``size``."""


# A polygon vertex may lie outside its image (COCO polygons often do, a little), but
# not further than this many image sizes: pycocotools rasterises the whole outline, so
# a coordinate of 1e9 would take gigabytes.
POLYGON_REACH = 4.0


def _as_bytes_rle(rle: dict) -> dict:
    counts = rle["counts"]
    if isinstance(counts, str):
        return {"size": list(rle["size"]), "counts": counts.encode("ascii")}
    return rle


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def polygons(segm: list, height: int, width: int, ann_id: Any = None) -> list[list[float]]:
    """The polygons of a COCO polygon segmentation, checked before pycocotools sees them.

    Each polygon is a list of an even number of finite numbers (x, y pairs) within
    ``POLYGON_REACH`` image sizes of the image; anything else is a BoxcasegError naming
    the annotation. Polygons of fewer than 3 points enclose nothing and are left out (as
    pycocotools' COCO API does), so an empty list is an empty mask.
    """
    lim_x, lim_y = POLYGON_REACH * max(width, 1), POLYGON_REACH * max(height, 1)
    out = []
    for k, poly in enumerate(segm):
        where = f"annotation {ann_id}: polygon {k}"
        if not isinstance(poly, (list, tuple)) or not all(_is_number(v) for v in poly):
            raise BoxcasegError(f"{where} is not a list of numbers")
        if len(poly) % 2:
            raise BoxcasegError(f"{where} has an odd number of coordinates ({len(poly)}; x, y pairs)")
        if not all(is_finite_number(v) for v in poly):  # before NumPy: 10**400 would overflow there
            raise BoxcasegError(f"{where} has non-finite coordinates")
        xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        if (np.abs(xy[:, 0] - width / 2) > lim_x + width / 2).any() or \
                (np.abs(xy[:, 1] - height / 2) > lim_y + height / 2).any():
            raise BoxcasegError(f"{where} reaches more than {POLYGON_REACH:g} image sizes beyond its "
                                f"{width}x{height} image")
        if len(xy) >= 3:
            out.append([float(v) for v in poly])
    return out


def rle_counts(counts: bytes) -> np.ndarray | None:
    """The run lengths of a COCO compressed RLE string (int64), None when it is not one.

    The format (pycocotools' ``rleToString``): each run is a little-endian group of
    6-bit characters (``chr(48 + c)``; bit 5: another character follows, 5 data bits),
    the last character's bit 4 is the sign; from the third run on, a run is stored as
    its difference to the run two places before it.
    """
    c = np.frombuffer(counts, dtype=np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros(0, np.int64)
    if ((c < 0) | (c > 63)).any():
        return None
    more = (c & 0x20) != 0
    if more[-1]:
        return None  # the last run is cut short
    ends = np.flatnonzero(~more)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > 12:  # more than 60 bits: not a run length
        return None
    group = np.repeat(np.arange(len(ends)), lengths)
    shift = 5 * (np.arange(c.size) - starts[group])
    x = np.zeros(len(ends), np.int64)
    np.add.at(x, group, (c & 0x1F) << shift)
    negative = (c[ends] & 0x10) != 0
    x[negative] |= np.left_shift(np.int64(-1), 5 * lengths[negative])
    runs = x.copy()
    runs[1::2] = np.cumsum(x[1::2])  # run m >= 3 is stored as run m - run (m - 2)
    runs[2::2] = np.cumsum(x[2::2])
    return runs


def _size_of(segm: dict, ann_id: Any) -> tuple[int, int]:
    size = segm.get("size")
    if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(
            isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_)) and v >= 0 for v in size):
        raise BoxcasegError(f"annotation {ann_id}: RLE size {size!r} is not two non-negative integers [height, width]")
    return int(size[0]), int(size[1])


def _checked_rle(segm: dict, ann_id: Any) -> dict:
    """A compressed RLE (bytes counts) whose counts were checked to cover its size exactly."""
    h, w = _size_of(segm, ann_id)
    counts = segm["counts"]
    if isinstance(counts, str):
        try:
            counts = counts.encode("ascii")
        except UnicodeEncodeError:
            counts = None
    runs = rle_counts(counts) if isinstance(counts, bytes) else None
    if runs is None or (runs < 0).any() or int(runs.sum()) != h * w:
        raise UnreadableMask(f"annotation {ann_id}: RLE counts do not decode to a {h}x{w} mask")
    return {"size": [h, w], "counts": counts}


def _checked_uncompressed(segm: dict, ann_id: Any) -> tuple[int, int, list[int]]:
    h, w = _size_of(segm, ann_id)
    counts = segm["counts"]
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_)) and 0 <= v for v in counts) \
            or sum(counts) != h * w:
        raise UnreadableMask(f"annotation {ann_id}: uncompressed RLE counts are not non-negative integers "
                             f"adding up to its {h}x{w} size")
    return h, w, [int(v) for v in counts]


def check_segmentation(segm: Any, height: int, width: int, ann_id: Any = None) -> tuple[int, int]:
    """The checks of :func:`to_rle` without rasterising anything (cheap enough for every
    annotation of a training json up front); returns the mask's (height, width)."""
    if isinstance(segm, list):
        polygons(segm, height, width, ann_id)
        return height, width
    if isinstance(segm, dict) and isinstance(segm.get("counts"), list):
        h, w, _ = _checked_uncompressed(segm, ann_id)
        return h, w
    if isinstance(segm, dict) and "counts" in segm:
        return tuple(_checked_rle(segm, ann_id)["size"])
    raise BoxcasegError(f"annotation {ann_id}: segmentation is neither polygons nor RLE")


def to_rle(segm: Any, height: int, width: int, ann_id: Any = None) -> dict:
    """Any COCO segmentation (polygons, RLE, uncompressed RLE) -> compressed RLE (bytes counts).

    Checked before pycocotools sees it (its C code trusts its input): polygons by
    :func:`polygons`, RLE ``size`` two non-negative integers, uncompressed ``counts``
    non-negative integers and compressed ``counts`` (:func:`rle_counts`) runs that cover
    exactly ``size`` (else :class:`UnreadableMask`). Problems are BoxcasegErrors naming
    the annotation.
    """
    if isinstance(segm, list):
        polys = polygons(segm, height, width, ann_id)
        if not polys:
            return mask_utils.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
        return _pycocotools(lambda: mask_utils.merge(mask_utils.frPyObjects(polys, height, width)), ann_id)
    if isinstance(segm, dict) and isinstance(segm.get("counts"), list):
        h, w, counts = _checked_uncompressed(segm, ann_id)
        return _pycocotools(lambda: mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w), ann_id)
    if isinstance(segm, dict) and "counts" in segm:
        return _checked_rle(segm, ann_id)
    raise BoxcasegError(f"annotation {ann_id}: segmentation is neither polygons nor RLE")


def _pycocotools(fn, ann_id: Any) -> dict:
    try:
        return fn()
    except Exception as e:  # pycocotools raises plain Exceptions on malformed input
        raise BoxcasegError(f"annotation {ann_id}: malformed segmentation ({e})") from e


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


def mask_iou_pairs(a: Sequence[dict], b: Sequence[dict]) -> np.ndarray:
    """IoU of ``a[i]`` with ``b[i]`` for each i: the diagonal of :func:`mask_iou` (``[K]`` float64)
    without its ``K x K`` matrix (8,000 masks on one image would take 0.5 GB, 130,000 126 GiB).

    ``a``, ``b``: equal-length lists of compressed RLEs. Each pair goes through
    pycocotools' ``iou`` on its own, the computation of the matrix's diagonal entry.
    """
    if len(a) != len(b):
        raise ValueError(f"mask_iou_pairs: {len(a)} masks against {len(b)}")
    out = np.zeros(len(a), dtype=np.float64)
    for i, (x, y) in enumerate(zip(a, b)):
        out[i] = np.asarray(mask_utils.iou([_as_bytes_rle(x)], [_as_bytes_rle(y)], [0]), dtype=np.float64)[0, 0]
    return out


def tight_box_xyxy(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight box of a binary mask in pixel-edge ``xyxy`` (x1, y1 exclusive), None if empty."""
    ys = np.flatnonzero(mask.any(axis=1))
    if ys.size == 0:
        return None
    xs = np.flatnonzero(mask.any(axis=0))
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


def area(rles: Sequence[dict]) -> np.ndarray:
    """Pixel counts ``[len(rles)]`` uint32 of compressed RLEs. One at a time: pycocotools'
    list form sizes its loop counter as uint8 under NumPy 2 (OverflowError at 256 masks)."""
    return np.array([mask_utils.area(_as_bytes_rle(r)) for r in rles], dtype=np.uint32)


def empty_rle(height: int, width: int) -> dict:
    """Compressed RLE (str counts) of an all-zero ``height`` x ``width`` mask: one run of zeros.
    (A mask's RLE from its box window: :func:`boxcaseg.proxy.merge_drop.encode_window`.)"""
    h, w = int(height), int(width)
    rle = mask_utils.frPyObjects({"size": [h, w], "counts": [h * w]}, h, w)
    rle["counts"] = rle["counts"].decode("ascii")
    return rle
