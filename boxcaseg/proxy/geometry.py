"""Integer windows for boxes: where an annotation is cropped and where its mask may live.

Boxes arrive as COCO ``xywh`` floats. The *box window* is the smallest pixel rectangle
that contains the box, clipped to the image (at least 1 px, since a usable box has
positive size and meets the image). The *crop window* is the box scaled ``context``
times around its centre, rounded outwards; it may extend past the image (padded with
the mean colour). With ``context == 1`` the crop window is the box window.
"""

from __future__ import annotations

import math
from typing import Sequence


Window = tuple[int, int, int, int]  # x0, y0, x1, y1 (pixel edges, x1/y1 exclusive)


def box_window(bbox_xywh: Sequence[float], width: int, height: int) -> Window:
    """Pixel window [x0, x1) x [y0, y1) enclosing a usable box, clipped to the image."""
    x, y, w, h = (float(v) for v in bbox_xywh)
    x0 = max(0, min(width - 1, math.floor(x)))
    y0 = max(0, min(height - 1, math.floor(y)))
    x1 = min(width, max(x0 + 1, math.ceil(x + w)))
    y1 = min(height, max(y0 + 1, math.ceil(y + h)))
    return x0, y0, x1, y1


def crop_window(bbox_xywh: Sequence[float], width: int, height: int, context: float = 1.0) -> Window:
    """The region cropped for the model: the box ``context`` times around its centre.

    ``context == 1``: the box window itself. Otherwise rounded outwards, not clipped;
    it always contains the box window.
    """
    if context == 1.0:
        return box_window(bbox_xywh, width, height)
    x, y, w, h = (float(v) for v in bbox_xywh)
    cx, cy = x + w / 2.0, y + h / 2.0
    bx0, by0, bx1, by1 = box_window(bbox_xywh, width, height)
    x0 = min(bx0, math.floor(cx - context * w / 2.0))
    y0 = min(by0, math.floor(cy - context * h / 2.0))
    x1 = max(bx1, math.ceil(cx + context * w / 2.0))
    y1 = max(by1, math.ceil(cy + context * h / 2.0))
    return x0, y0, x1, y1


def clipped_box_xyxy(bbox_xywh: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    """The GT box as continuous ``xyxy`` clipped to the image (what a mask can reach)."""
    x, y, w, h = (float(v) for v in bbox_xywh)
    return max(0.0, x), max(0.0, y), min(float(width), x + w), min(float(height), y + h)
