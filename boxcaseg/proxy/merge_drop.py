"""Merge (smaller object better) and drop (proxy box agreement) on box-local windows.

Numba kernels; no full-image label map is ever built.

- **merge**: a pixel claimed by several masks of one image goes to the annotation with
  the smallest GT box area (``w * h`` of its bbox); on equal areas the annotation listed
  first in the image wins. Only overlapping windows are compared.
- **drop**: agreement = IoU (:func:`boxcaseg.boxes.box_iou_xyxy`, same float64
  operations) between the merged mask's tight box (pixel edges, as
  :func:`boxcaseg.masks.tight_box_xyxy`) and the GT box clipped to the image; an empty
  mask has agreement 0. ``ignore_mask = agreement < drop_thresh``.
- **encode**: COCO RLE straight from a window (column-major runs), compressed by
  pycocotools.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from pycocotools import mask as mask_utils


@njit(cache=True, nogil=True)
def _wins(areas, j, i):
    """Does annotation j take a pixel that i also claims?"""
    return areas[j] < areas[i] or (areas[j] == areas[i] and j < i)


@njit(cache=True, nogil=True)
def merge_drop_kernel(windows, masks, offsets, gt_xyxy, areas, has_mask, merged, agreement, do_merge=True):
    """windows: [N, 4] int64 (x0, y0, x1, y1); masks/merged: uint8 flat, instance i at
    ``offsets[i]`` row-major [y1-y0, x1-x0]; gt_xyxy: [N, 4] float64; areas: [N] float64;
    has_mask: [N] bool (False: no mask, takes no pixel, agreement 0). Fills ``merged``
    and ``agreement`` [N] float64. ``do_merge`` False: every mask stays its own (only the
    agreement is computed)."""
    n = windows.shape[0]
    for i in range(n):
        agreement[i] = 0.0
        if not has_mask[i]:
            continue
        x0, y0, x1, y1 = windows[i, 0], windows[i, 1], windows[i, 2], windows[i, 3]
        w = x1 - x0
        off = offsets[i]
        merged[off:offsets[i + 1]] = masks[off:offsets[i + 1]]
        for j in range(n if do_merge else 0):
            if j == i or not has_mask[j] or not _wins(areas, j, i):
                continue
            jx0, jy0, jx1, jy1 = windows[j, 0], windows[j, 1], windows[j, 2], windows[j, 3]
            ox0, oy0 = max(x0, jx0), max(y0, jy0)
            ox1, oy1 = min(x1, jx1), min(y1, jy1)
            if ox0 >= ox1 or oy0 >= oy1:
                continue
            jw = jx1 - jx0
            joff = offsets[j]
            for yy in range(oy0, oy1):
                for xx in range(ox0, ox1):
                    if masks[joff + (yy - jy0) * jw + (xx - jx0)] != 0:
                        merged[off + (yy - y0) * w + (xx - x0)] = 0
        # tight box of the merged mask (pixel edges); rows scanned from both ends
        rmin, rmax, cmin, cmax = -1, -1, w, -1
        for r in range(y1 - y0):
            base = off + r * w
            first = -1
            for c in range(w):
                if merged[base + c] != 0:
                    first = c
                    break
            if first < 0:
                continue
            last = first
            for c in range(w - 1, first, -1):
                if merged[base + c] != 0:
                    last = c
                    break
            if first < cmin:
                cmin = first
            if last > cmax:
                cmax = last
            if rmin < 0:
                rmin = r
            rmax = r
        if rmin < 0:
            continue
        a0, a1 = float(x0 + cmin), float(y0 + rmin)
        a2, a3 = float(x0 + cmax + 1), float(y0 + rmax + 1)
        b0, b1, b2, b3 = gt_xyxy[i, 0], gt_xyxy[i, 1], gt_xyxy[i, 2], gt_xyxy[i, 3]
        ix = max(0.0, min(a2, b2) - max(a0, b0))
        iy = max(0.0, min(a3, b3) - max(a1, b1))
        inter = ix * iy
        union = (a2 - a0) * (a3 - a1) + (b2 - b0) * (b3 - b1) - inter
        agreement[i] = inter / union if union > 0 else 0.0


@njit(cache=True, nogil=True)
def window_rle_counts(win, x0, y0, height, width):
    """Uncompressed COCO RLE counts of a ``height`` x ``width`` mask that is ``win`` [h, w]
    at (x0, y0) and zero elsewhere (column-major runs, starting with zeros)."""
    wh, ww = win.shape
    total = height * width
    out = np.empty(ww * (wh + 1) + 2, np.int64)
    n = 0
    last = 0
    prev = False
    for c in range(ww):
        base = (x0 + c) * height + y0
        for r in range(wh):
            v = win[r, c] != 0
            if v != prev:
                pos = base + r
                out[n] = pos - last
                n += 1
                last = pos
                prev = v
        if prev and not (wh == height and c < ww - 1):
            pos = base + wh
            if pos < total:
                out[n] = pos - last
                n += 1
                last = pos
            prev = False
    out[n] = total - last
    n += 1
    return out[:n]


def encode_window_fast(win: np.ndarray, x0: int, y0: int, height: int, width: int) -> dict:
    """Same answer as :func:`boxcaseg.masks.encode_window` (RLE, str counts), Numba runs."""
    counts = window_rle_counts(np.ascontiguousarray(win, dtype=np.uint8), int(x0), int(y0), int(height), int(width))
    rle = mask_utils.frPyObjects({"size": [int(height), int(width)], "counts": counts.tolist()}, int(height), int(width))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def merge_and_drop(
    windows: np.ndarray,
    masks: list[np.ndarray | None],
    gt_xyxy: np.ndarray,
    areas: np.ndarray,
    merge: bool = True,
) -> tuple[list[np.ndarray | None], np.ndarray]:
    """Merge and score the masks of one image (``merge`` False: score them as they are).

    windows: [N, 4] int (x0, y0, x1, y1) box windows; masks: N uint8/bool arrays
    [y1-y0, x1-x0] (None: no mask); gt_xyxy: [N, 4] GT boxes clipped to the image;
    areas: [N] GT box areas (merge priority). Returns (merged masks, agreement [N]).
    """
    n = len(masks)
    windows = np.ascontiguousarray(windows, dtype=np.int64).reshape(n, 4)
    sizes = np.array([0 if m is None else m.size for m in masks], np.int64)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    flat = np.zeros(int(offsets[-1]), np.uint8)
    has = np.zeros(n, np.bool_)
    for i, m in enumerate(masks):
        if m is not None:
            if m.shape != (windows[i, 3] - windows[i, 1], windows[i, 2] - windows[i, 0]):
                raise ValueError(f"mask {i} has shape {m.shape}, its window is {windows[i].tolist()}")
            flat[offsets[i]:offsets[i + 1]] = m.reshape(-1)
            has[i] = True
    merged = np.zeros_like(flat)
    agreement = np.zeros(n, np.float64)
    merge_drop_kernel(windows, flat, offsets, np.ascontiguousarray(gt_xyxy, dtype=np.float64).reshape(n, 4),
                      np.ascontiguousarray(areas, dtype=np.float64), has, merged, agreement, bool(merge))
    out = [None if not has[i] else merged[offsets[i]:offsets[i + 1]].reshape(masks[i].shape) for i in range(n)]
    return out, agreement
