"""Classical floors for box-to-mask: box-fill, the inscribed ellipse, GrabCut.

Each reads its COCO json with :mod:`boxcaseg.cocojson` and returns a list of predictions
``{id, image_id, category_id, segmentation}`` (one per non-crowd annotation with a usable
box -- the reader's degenerate-box rule --, RLE with str counts) that
:func:`boxcaseg.evaluate.mask_quality` reads. Rasterisation is by pixel centre: pixel
(row i, column j) belongs to the shape when its centre (j + 0.5, i + 0.5) does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np

from boxcaseg.cocojson import CocoData, is_crowd, load_coco
from boxcaseg.masks import encode

log = logging.getLogger(__name__)


def _centres(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(h)[:, None] + 0.5, np.arange(w)[None, :] + 0.5


def box_fill_mask(bbox, h: int, w: int) -> np.ndarray:
    x, y, bw, bh = (float(v) for v in bbox)
    cy, cx = _centres(h, w)
    return ((cx >= x) & (cx <= x + bw) & (cy >= y) & (cy <= y + bh)).astype(np.uint8)


def ellipse_mask(bbox, h: int, w: int) -> np.ndarray:
    x, y, bw, bh = (float(v) for v in bbox)
    cy, cx = _centres(h, w)
    return ((((cx - x - bw / 2) / (bw / 2)) ** 2 + ((cy - y - bh / 2) / (bh / 2)) ** 2) <= 1.0).astype(np.uint8)


def _predict_all(ann_file: str | Path | dict | CocoData, fn: Callable[[dict, dict], np.ndarray]) -> list[dict]:
    coco = ann_file if isinstance(ann_file, CocoData) else load_coco(ann_file, "COCO annotation")
    out = []
    for a in coco.anns:
        if is_crowd(a) or coco.box_problem(a):
            continue
        m = fn(a, coco.images[a["image_id"]])
        out.append({"id": a["id"], "image_id": a["image_id"], "category_id": a.get("category_id", 1),
                    "segmentation": encode(m), "score": 1.0})
    return out


def box_fill_predictions(ann_file: str | Path) -> list[dict]:
    return _predict_all(ann_file, lambda a, im: box_fill_mask(a["bbox"], im["height"], im["width"]))


def ellipse_predictions(ann_file: str | Path) -> list[dict]:
    return _predict_all(ann_file, lambda a, im: ellipse_mask(a["bbox"], im["height"], im["width"]))


def grabcut_predictions(ann_file: str | Path, image_dir: str | Path, iters: int = 5) -> list[dict]:
    """OpenCV GrabCut initialised with each GT box (needs opencv-python-headless)."""
    import cv2

    from boxcaseg.data.transforms import open_rgb

    coco = load_coco(ann_file, "COCO annotation")
    # every file_name must stay inside the image folder: checked before any work
    paths = coco.paths(image_dir)
    cache: dict = {}

    def fn(a, im):
        if im["id"] not in cache:
            cache.clear()
            cache[im["id"]] = np.asarray(open_rgb(paths[im["id"]], "image", (int(im["width"]), int(im["height"])),
                                                  f" (image id {im['id']})"))[:, :, ::-1].copy()
        img = cache[im["id"]]
        h, w = img.shape[:2]
        x, y, bw, bh = (float(v) for v in a["bbox"])
        x0, y0 = max(0, int(np.floor(x))), max(0, int(np.floor(y)))
        x1, y1 = min(w, int(np.ceil(x + bw))), min(h, int(np.ceil(y + bh)))
        rect = (x0, y0, max(1, x1 - x0), max(1, y1 - y0))
        mask = np.zeros((h, w), np.uint8)
        try:
            bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
            cv2.grabCut(img, mask, rect, bgd, fgd, iters, cv2.GC_INIT_WITH_RECT)
            out = ((mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)).astype(np.uint8)
        except cv2.error:
            out = np.zeros((h, w), np.uint8)  # GrabCut fails on boxes too small to model
        return out & box_fill_mask(a["bbox"], h, w)

    return _predict_all(coco, fn)
