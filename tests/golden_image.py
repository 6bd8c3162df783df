"""A fixed test image and its boxes for the golden-mask test (tests/test_golden_masks.py):
drawn from numpy's seeded PCG64 generator (stable across numpy versions), no files."""

from __future__ import annotations

import numpy as np


def golden_image_and_boxes() -> tuple[np.ndarray, np.ndarray]:
    """A 160 x 120 RGB uint8 image (textured background, four filled ellipses, two of them
    overlapping) and their boxes [4, 4] (COCO xywh, float)."""
    rng = np.random.Generator(np.random.PCG64(20261204))
    h, w = 120, 160
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.empty((h, w, 3), np.float64)
    img[..., 0] = 90 + 40 * xx / w
    img[..., 1] = 110 + 30 * yy / h
    img[..., 2] = 100
    img += rng.normal(0, 12, (h, w, 3))
    shapes = [(40, 45, 22, 30, (220, 60, 50)), (110, 40, 28, 18, (40, 70, 200)),
              (95, 85, 30, 22, (240, 220, 60)), (120, 95, 16, 14, (30, 160, 70))]
    boxes = []
    for cx, cy, rx, ry, color in shapes:
        inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        img[inside] = np.asarray(color, np.float64) + rng.normal(0, 8, (int(inside.sum()), 3))
        boxes.append([cx - rx - 2, cy - ry - 2, 2 * rx + 4, 2 * ry + 4])
    return np.clip(img, 0, 255).astype(np.uint8), np.asarray(boxes, np.float64)
