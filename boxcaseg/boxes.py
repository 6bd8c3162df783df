"""Box helpers: COCO ``xywh`` at the edges of the system, ``xyxy`` inside."""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import numpy as np

REACH = 1.0  # how far (in image widths / heights) a usable box may reach beyond its image


def xywh_to_xyxy(box: Sequence[float]) -> tuple[float, float, float, float]:
    x, y, w, h = (float(v) for v in box)
    return x, y, x + w, y + h


def is_finite_number(v: Any) -> bool:
    """A real number a float can hold: not a bool or a string, not inf / NaN (json's 1e400),
    not an int past float's range (10**400)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def box_numbers_problem(box: Any) -> str | None:
    """Why ``box`` is not four finite numbers, or None.

    Strings and booleans are not numbers (``"1234"`` is not the box [1, 2, 3, 4]).
    """
    if not isinstance(box, (list, tuple, np.ndarray)) or len(box) != 4:
        return "bbox is not 4 numbers"
    if any(isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real) for v in box):
        return "bbox is not numeric (4 numbers; strings and booleans are not numbers)"
    if not all(is_finite_number(v) for v in box):
        return "bbox has non-finite values"
    return None


def degenerate_reason(box_xywh: Any, width: int, height: int) -> str | None:
    """Why a COCO box cannot be used, or None when it is fine: the one box rule.

    Usable: four finite numbers (:func:`box_numbers_problem`), a positive width and
    height, meeting its ``width`` x ``height`` image, and within reach of it: no edge
    further than ``REACH`` image widths (heights) beyond the image, so that a crop of it
    stays the size of images (``[-1e12, -1e12, 2e12, 2e12]`` is not a box of a photo).
    """
    problem = box_numbers_problem(box_xywh)
    if problem is not None:
        return problem
    x, y, w, h = (float(v) for v in box_xywh)
    if w <= 0 or h <= 0:
        return "bbox has non-positive size"
    x1, y1 = x + w, y + h
    if x >= width or y >= height or x1 <= 0 or y1 <= 0:
        return "bbox lies entirely outside its image"
    if x < -REACH * width or y < -REACH * height or x1 > (1 + REACH) * width or y1 > (1 + REACH) * height:
        return f"bbox reaches more than {REACH:g} image size(s) beyond its {width}x{height} image"
    return None


def box_iou_xyxy(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two ``xyxy`` boxes (continuous coordinates)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def merge_order(areas: Sequence[float]) -> np.ndarray:
    """The smaller-object-better order of one image's instances, [N] int64 indices, the winner
    first: by box area ascending, equal areas in the order listed (the one listed first wins).
    A pixel claimed by several instances goes to the earliest of them in this order: the
    proxy's merge (:func:`boxcaseg.proxy.merge_drop.merge_masks`, whose Numba kernel asks
    the same question pairwise) and the png writer's painting order
    (:func:`boxcaseg.formats.write_instance_pngs`, which paints it backwards) follow it.
    ``areas``: finite numbers (a GT box's ``w * h``)."""
    return np.argsort(np.asarray(areas, np.float64).reshape(-1), kind="stable")
