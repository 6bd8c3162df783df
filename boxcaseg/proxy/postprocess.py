"""Probability map -> binary box-local mask (Numba, releases the GIL).

The model sees the crop window resized to S x S and answers a map [s, s] (s = S/stride).
For every pixel of the *box* window the map is sampled bilinearly (PyTorch's
``align_corners=False`` convention) at that pixel's place in the crop window, and
compared with the threshold. Pixels outside the box window are never produced: the
mask is confined to the box.

Optional box-shape prior (``prior_weight`` w > 0; not in the paper): before the
threshold the sampled probability p becomes ``(1 - w) p + w e`` where
``e = sigmoid(PRIOR_SHARPNESS * (1 - r2))`` and ``r2 = ((x - cx) / rx)^2 + ((y - cy) / ry)^2``
is the pixel centre's squared normalised distance in the ellipse inscribed in the GT
box (``gt_xyxy``, continuous coordinates): a soft inscribed ellipse, 0.5 on its rim.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from boxcaseg.infer_settings import InferSettings

PRIOR_SHARPNESS = 4.0


@njit(cache=True, nogil=True)
def _axis_weights(n_out, first, crop_len, size, stride, n_map):
    """Source index pairs and weights for ``n_out`` pixels starting ``first`` px into the crop."""
    i0 = np.empty(n_out, np.int64)
    i1 = np.empty(n_out, np.int64)
    lam = np.empty(n_out, np.float64)
    scale = size / crop_len / stride
    for k in range(n_out):
        src = (first + k + 0.5) * scale - 0.5
        if src < 0.0:
            src = 0.0
        a = int(np.floor(src))
        if a > n_map - 1:
            a = n_map - 1
        b = a + 1 if a < n_map - 1 else a
        i0[k] = a
        i1[k] = b
        lam[k] = src - a
    return i0, i1, lam


@njit(cache=True, nogil=True)
def _sample(prob, y0, y1, ly, x0, x1, lx):
    top = (1.0 - lx) * prob[y0, x0] + lx * prob[y0, x1]
    bot = (1.0 - lx) * prob[y1, x0] + lx * prob[y1, x1]
    return (1.0 - ly) * top + ly * bot


@njit(cache=True, nogil=True)
def resize_threshold_batch(probs, crops, boxes, offsets, threshold, relative, size, stride, out,
                           gt_xyxy, prior_weight, sharpness):
    """Box-local masks for a batch of instances, written into ``out``.

    probs: [N, s, s] float32; crops, boxes: [N, 4] int64 windows (x0, y0, x1, y1) in
    image pixels (the box window inside the crop window); offsets: [N + 1] int64 into
    ``out`` (uint8, row-major [h, w] per instance). ``relative``: the threshold applies
    to the map min-max normalised per instance (a constant map is all foreground).
    gt_xyxy: [N, 4] float64 GT boxes for the shape prior (used when prior_weight > 0).
    """
    n, n_map_y, n_map_x = probs.shape
    for i in range(n):
        cx0, cy0, cx1, cy1 = crops[i, 0], crops[i, 1], crops[i, 2], crops[i, 3]
        bx0, by0, bx1, by1 = boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3]
        bw, bh = bx1 - bx0, by1 - by0
        p = probs[i]
        thr = threshold
        if relative:
            mn = p[0, 0]
            mx = p[0, 0]
            for yy in range(n_map_y):
                for xx in range(n_map_x):
                    v = p[yy, xx]
                    if v < mn:
                        mn = v
                    if v > mx:
                        mx = v
            if mx > mn:
                thr = mn + threshold * (mx - mn)
            else:
                thr = -1.0
        yi0, yi1, ly = _axis_weights(bh, by0 - cy0, cy1 - cy0, size, stride, n_map_y)
        xi0, xi1, lx = _axis_weights(bw, bx0 - cx0, cx1 - cx0, size, stride, n_map_x)
        off = offsets[i]
        gx0, gy0, gx1, gy1 = gt_xyxy[i, 0], gt_xyxy[i, 1], gt_xyxy[i, 2], gt_xyxy[i, 3]
        ecx, ecy = 0.5 * (gx0 + gx1), 0.5 * (gy0 + gy1)
        erx, ery = max(0.5 * (gx1 - gx0), 1e-6), max(0.5 * (gy1 - gy0), 1e-6)
        for r in range(bh):
            dy = (by0 + r + 0.5 - ecy) / ery
            for c in range(bw):
                v = _sample(p, yi0[r], yi1[r], ly[r], xi0[c], xi1[c], lx[c])
                if prior_weight > 0.0:
                    dx = (bx0 + c + 0.5 - ecx) / erx
                    e = 1.0 / (1.0 + np.exp(-sharpness * (1.0 - dx * dx - dy * dy)))
                    v = (1.0 - prior_weight) * v + prior_weight * e
                out[off + r * bw + c] = 1 if v > thr else 0


@njit(cache=True, nogil=True)
def resize_bilinear(prob, crop_h, crop_w, size, stride):
    """The map resized to the whole crop window [crop_h, crop_w] float64 (for tests)."""
    n_y, n_x = prob.shape
    yi0, yi1, ly = _axis_weights(crop_h, 0, crop_h, size, stride, n_y)
    xi0, xi1, lx = _axis_weights(crop_w, 0, crop_w, size, stride, n_x)
    out = np.empty((crop_h, crop_w), np.float64)
    for r in range(crop_h):
        for c in range(crop_w):
            out[r, c] = _sample(prob, yi0[r], yi1[r], ly[r], xi0[c], xi1[c], lx[c])
    return out


def masks_from_probs(
    probs: np.ndarray,
    crops: np.ndarray,
    boxes: np.ndarray,
    settings: InferSettings,
    *,
    stride: int,
    relative: bool = False,
    gt_xyxy: np.ndarray | None = None,
) -> list[np.ndarray]:
    """probs [N, 1 or none, s, s] -> N box-local uint8 masks [h_i, w_i] (views of one buffer).

    ``settings``: the inference settings in force (:class:`~boxcaseg.infer_settings.InferSettings`:
    ``infer_size`` S the maps were computed at, ``threshold``, ``prior_weight``); ``stride``:
    the engine's output stride (s = S / stride); ``relative``: threshold the per-instance
    min-max normalised map. ``prior_weight`` > 0 blends in the soft inscribed ellipse of
    ``gt_xyxy`` (module docstring).
    """
    size, threshold, prior_weight = settings.infer_size, settings.threshold, settings.prior_weight
    probs = np.ascontiguousarray(probs.reshape(probs.shape[0], probs.shape[-2], probs.shape[-1]), dtype=np.float32)
    crops = np.ascontiguousarray(crops, dtype=np.int64).reshape(-1, 4)
    boxes = np.ascontiguousarray(boxes, dtype=np.int64).reshape(-1, 4)
    sizes = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    offsets = np.zeros(len(boxes) + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    out = np.empty(int(offsets[-1]), np.uint8)
    if prior_weight > 0 and gt_xyxy is None:
        raise ValueError("prior_weight > 0 needs gt_xyxy")
    gt = (np.zeros((len(boxes), 4)) if gt_xyxy is None
          else np.ascontiguousarray(gt_xyxy, dtype=np.float64).reshape(-1, 4))
    resize_threshold_batch(probs, crops, boxes, offsets, float(threshold), bool(relative), float(size), float(stride), out,
                           gt, float(prior_weight), PRIOR_SHARPNESS)
    return [out[offsets[i]:offsets[i + 1]].reshape(boxes[i, 3] - boxes[i, 1], boxes[i, 2] - boxes[i, 0])
            for i in range(len(boxes))]
