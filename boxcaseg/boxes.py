"""Box helpers: COCO ``xywh`` at the edges of the system, ``xyxy`` inside."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def xywh_to_xyxy(box: Sequence[float]) -> tuple[float, float, float, float]:
    x, y, w, h = (float(v) for v in box)
    return x, y, x + w, y + h


def xyxy_to_xywh(box: Sequence[float]) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return x0, y0, x1 - x0, y1 - y0


def degenerate_reason(box_xywh: Sequence[float], width: int, height: int) -> str | None:
    """Why a COCO box cannot be used, or None when it is fine.

    Degenerate: wrong length, non-finite values, non-positive width/height, or a box
    that lies entirely outside its ``width`` x ``height`` image.
    """
    if box_xywh is None or len(box_xywh) != 4:
        return "bbox is not 4 numbers"
    try:
        x, y, w, h = (float(v) for v in box_xywh)
    except (TypeError, ValueError):
        return "bbox is not numeric"
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return "bbox has non-finite values"
    if w <= 0 or h <= 0:
        return "bbox has non-positive size"
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        return "bbox lies entirely outside its image"
    return None


def box_iou_xyxy(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two ``xyxy`` boxes (continuous coordinates)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0
