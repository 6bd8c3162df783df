"""Merge (smaller object better) and drop (proxy box agreement) on box-local windows.

Numba kernels; no full-image label map is ever built.

- **merge**: a pixel claimed by several masks of one image goes to the annotation with
  the smallest GT box area (``w * h`` of its bbox); on equal areas the annotation listed
  first in the image wins: the order of :func:`boxcaseg.boxes.merge_order`, the package's
  one merge order (the png writer paints by it too), which the kernel's pairwise
  :func:`_wins` answers. Only overlapping windows are compared.
- **drop**: agreement = IoU (float64, the operations of
  :func:`boxcaseg.boxes.box_iou_xyxy`) between the merged mask's box *measured in the
  GT box's continuous frame* (below) and the GT box clipped to the image
  (:func:`boxcaseg.proxy.geometry.clipped_box_xyxy`); an empty mask has agreement 0.
  ``ignore_mask = agreement < drop_threshold``, where a box of ``w x h`` px (clipped to the
  image) is held to ``min(drop_thresh, (w - slack)(h - slack) / (w h))``
  (:func:`drop_thresholds`): an edge error of up to ``slack`` px per axis
  (:data:`boxcaseg.proxy.options.DROP_SLACK`, 0.5) is not held against a small box. At 0.95 a one-pixel edge
  error fails a 19 px box (agreement 0.95) while a 200 px box may miss five: on nuclei
  (median box 19 px) the bare threshold flagged 15.8% of masks with IoU >= 0.75 to the
  truth and 35% of those under 0.5; the slack flags 10.9% and 35% (of boxes under 12 px:
  15.6% -> 1.4% of the good ones); bench/drop_by_size.py, RESULTS "drop_by_size_dev".
- **encode**: COCO RLE straight from a window (column-major runs), compressed by
  pycocotools (:func:`encode_window`, the package's one windowed encoder).

The mask's box in the GT's frame
--------------------------------
A mask is a set of whole pixels, the GT box has fractional edges. Comparing the mask's
tight box in pixel edges (first column ``c0`` -> ``c0``, last column ``c1`` -> ``c1 + 1``)
with the fractional GT box, as before, biases the rule by box size: the perfect mask of
a 20.4 px wide box at x = 10.3 spans 21 px, so its agreement is at most (20.4/21)^2 =
0.94 and it is dropped at 0.95 whatever its quality; every box under ~40 px with
fractional edges was, so the dropped share depended on the pixel grid, not the masks.

Instead, a mask edge stands for every continuous edge that rasterises to it under
either common convention, "pixels the box touches" (first column ``floor(x0)``, last
``ceil(x1) - 1``) or "pixels whose centre is inside" (first ``ceil(x0 - 0.5)``, last
``floor(x1 - 0.5)``), ties at pixel borders / centres counted either way. A first
column ``c0`` therefore admits a left edge ``x0`` in ``[c0 - 0.5, c0 + 1]`` and a last
column ``c1`` a right edge ``x1`` in ``[c1, c1 + 1.5]`` (rows alike). The mask's box is
the GT box with each edge clamped into its range::

    e0 = clamp(g0, c0 - 0.5, c0 + 1)    e1 = clamp(g1, c1, c1 + 1.5)

Its IoU with the GT box is the best any continuous box consistent with the mask reaches
(moving one edge towards the GT's never lowers the IoU). So a mask filling exactly the
touched pixels, or exactly the pixels with the centre inside, has agreement 1.0 at any
size and offset; a mask short of a pixel column loses what the box covers of that
column beyond half a pixel (a fully covered column: half a pixel), and a mask reaching a
column the box does not touch loses the gap between that column and the box edge.
(Within the pipeline the masks live in the box window, the touched pixels, so only the
inner bounds can bind.) The GT is kept continuous rather than snapped to the grid: a
snapped GT box would turn the centre raster of a box at x = 10.7 into a one-pixel miss,
and would charge a whole pixel for a column the box barely covers, a size bias of its own.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from pycocotools import mask as mask_utils


@njit(cache=True, nogil=True)
def _wins(areas, j, i):
    """Does annotation j take a pixel that i also claims? (j comes before i in
    :func:`boxcaseg.boxes.merge_order`.)"""
    return areas[j] < areas[i] or (areas[j] == areas[i] and j < i)


@njit(cache=True, nogil=True)
def merge_masks_kernel(windows, masks, offsets, gt_xyxy, areas, has_mask, merged, agreement, do_merge=True):
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
        # first / last column and row of the merged mask; rows scanned from both ends
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
        # the mask's box in the GT's continuous frame: each GT edge clamped into the range
        # of edges that rasterise to the mask's first / last column and row (module doc)
        c0, r0 = float(x0 + cmin), float(y0 + rmin)
        c1, r1 = float(x0 + cmax), float(y0 + rmax)
        b0, b1, b2, b3 = gt_xyxy[i, 0], gt_xyxy[i, 1], gt_xyxy[i, 2], gt_xyxy[i, 3]
        a0 = min(max(b0, c0 - 0.5), c0 + 1.0)
        a1 = min(max(b1, r0 - 0.5), r0 + 1.0)
        a2 = min(max(b2, c1), c1 + 1.5)
        a3 = min(max(b3, r1), r1 + 1.5)
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


def encode_window(win: np.ndarray, x0: int, y0: int, height: int, width: int) -> dict:
    """Compressed RLE (``counts`` as str) of a ``height`` x ``width`` mask that is zero outside
    the box-local ``win`` [h, w] placed with its top-left pixel at (x0, y0): equal to
    :func:`boxcaseg.masks.encode` of the full mask with ``full[y0:y0+h, x0:x0+w] = win``,
    without building it (O(window area), runs by :func:`window_rle_counts`, compressed by
    pycocotools). The window must lie inside the image (ValueError otherwise)."""
    wh, ww = win.shape
    if x0 < 0 or y0 < 0 or x0 + ww > width or y0 + wh > height:
        raise ValueError(f"window {ww}x{wh} at ({x0}, {y0}) is not inside a {width}x{height} image")
    counts = window_rle_counts(np.ascontiguousarray(win, dtype=np.uint8), int(x0), int(y0), int(height), int(width))
    rle = mask_utils.frPyObjects({"size": [int(height), int(width)], "counts": counts.tolist()}, int(height), int(width))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def mask_box_in_gt_frame(tight_xyxy: np.ndarray, gt_xyxy: np.ndarray) -> np.ndarray:
    """The masks' boxes in the GT's continuous frame (module doc), numpy, [..., 4] float64.

    tight_xyxy: tight boxes in pixel edges (:func:`boxcaseg.masks.tight_box_xyxy`: first
    column, first row, last column + 1, last row + 1); gt_xyxy: the clipped GT boxes.
    """
    t = np.asarray(tight_xyxy, np.float64)
    g = np.asarray(gt_xyxy, np.float64)
    lo = np.stack([t[..., 0] - 0.5, t[..., 1] - 0.5, t[..., 2] - 1.0, t[..., 3] - 1.0], -1)
    hi = np.stack([t[..., 0] + 1.0, t[..., 1] + 1.0, t[..., 2] + 0.5, t[..., 3] + 0.5], -1)
    return np.minimum(np.maximum(g, lo), hi)


def box_agreement(tight_xyxy: np.ndarray, gt_xyxy: np.ndarray, grid: bool = False) -> np.ndarray:
    """Agreement [...] of masks with tight boxes ``tight_xyxy`` (pixel edges) and GT boxes,
    as :func:`merge_masks` scores it (bit-identical); ``grid`` True: the former rule,
    the tight box in pixel edges itself against the GT (kept for before/after reports).
    Empty masks are the caller's (agreement 0)."""
    g = np.asarray(gt_xyxy, np.float64)
    a = np.asarray(tight_xyxy, np.float64) if grid else mask_box_in_gt_frame(tight_xyxy, g)
    ix = np.maximum(0.0, np.minimum(a[..., 2], g[..., 2]) - np.maximum(a[..., 0], g[..., 0]))
    iy = np.maximum(0.0, np.minimum(a[..., 3], g[..., 3]) - np.maximum(a[..., 1], g[..., 1]))
    inter = ix * iy
    union = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1]) + (g[..., 2] - g[..., 0]) * (g[..., 3] - g[..., 1]) - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def drop_thresholds(gt_xyxy: np.ndarray, drop_thresh: float, slack: float) -> np.ndarray:
    """The agreement each box must reach to keep its mask, [...] float64: ``drop_thresh``,
    lowered for a box of ``w x h`` px (``gt_xyxy``: clipped to the image) to
    ``(w - slack)(h - slack) / (w h)``, the agreement of a mask whose box is ``slack`` px
    short on each axis. ``slack`` 0: ``drop_thresh`` for every box."""
    g = np.asarray(gt_xyxy, np.float64)
    w = g[..., 2] - g[..., 0]
    h = g[..., 3] - g[..., 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.maximum(w - slack, 0.0) * np.maximum(h - slack, 0.0) / (w * h)
    return np.minimum(float(drop_thresh), np.where((w > 0) & (h > 0), frac, 1.0))


def ignore_flags(agreement: np.ndarray, gt_xyxy: np.ndarray, drop_thresh: float, slack: float) -> np.ndarray:
    """``ignore_mask`` [N] bool: agreement below the box's :func:`drop_thresholds`."""
    return np.asarray(agreement, np.float64) < drop_thresholds(gt_xyxy, drop_thresh, slack)


def merge_masks(
    windows: np.ndarray,
    masks: list[np.ndarray | None],
    gt_xyxy: np.ndarray,
    areas: np.ndarray,
    merge: bool = True,
) -> tuple[list[np.ndarray | None], np.ndarray]:
    """Merge and score the masks of one image (``merge`` False: score them as they are).

    windows: [N, 4] int (x0, y0, x1, y1) box windows; masks: N uint8/bool arrays
    [y1-y0, x1-x0] (None: no mask); gt_xyxy: [N, 4] GT boxes clipped to the image;
    areas: [N] GT box areas (merge priority). Returns (merged masks, agreement [N]); the
    drop rule's flags come from the agreement (:func:`ignore_flags`).
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
    merge_masks_kernel(windows, flat, offsets, np.ascontiguousarray(gt_xyxy, dtype=np.float64).reshape(n, 4),
                      np.ascontiguousarray(areas, dtype=np.float64), has, merged, agreement, bool(merge))
    out = [None if not has[i] else merged[offsets[i]:offsets[i + 1]].reshape(masks[i].shape) for i in range(n)]
    return out, agreement
