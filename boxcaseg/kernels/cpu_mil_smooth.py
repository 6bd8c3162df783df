"""Fused CPU kernel of the MIL + smoothness loss (Numba), forward and backward.

One pass over each map, in parallel over the images (``prange`` over N): the sigmoid of
every pixel is computed once into a two-row rolling buffer; the same pass takes the row
and column maxima with their first argmax, the bag labels from the box mask, the four
directional sums of squared probability differences, and (when a gradient is needed)
writes ``G = a * dmil/dx + b * dsmooth/dx`` row by row. The MIL part of G is added at
the argmax positions once an image is done. The loss partial sums are kept per row in
the compute dtype and summed in float64.

Layout follows Liger-Kernel: kernel, the :func:`mil_smooth_forward` launcher (the
backward reruns it with the actual upstream weights when needed) and :class:`NumbaMilSmoothFunction` side by side.
Float32 and float64 are computed natively, half types in float32. Compiled lazily on
first use with ``cache=True`` (a few seconds per dtype combination, then cached on disk).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch
from numba import njit

from boxcaseg.kernels._common import (
    check_inputs,
    compute_dtype,
    fused_backward,
    fused_forward,
    mil_bag_count,
    smooth_weights,
)

# Reassociation lets LLVM vectorise the row reductions. "nnan": NaN logits are not
# supported (documented in _common); no "ninf", so logits of any magnitude stay exact.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp", "nnan"}

# Column of the per-image partial sums.
_S_H, _S_V, _S_D1, _S_D2, _S_ROW, _S_COL = range(6)


@njit(fastmath=_FASTMATH, cache=True, inline="always")
def _better(m, a, mk, ak):  # pragma: no cover - numba
    if mk > m or (mk == m and ak < a):
        return mk, ak
    return m, a


@njit(fastmath=_FASTMATH, cache=True, inline="always")
def _row_max_first_arg(row):  # pragma: no cover - numba
    """(max, first index of the max) of a 1-D array; four independent lanes for ILP."""
    w = row.shape[0]
    m0 = m1 = m2 = m3 = row[0]
    a0 = a1 = a2 = a3 = 0
    w4 = w - w % 4
    for i in range(0, w4, 4):
        v = row[i]
        if v > m0:
            m0 = v
            a0 = i
        v = row[i + 1]
        if v > m1:
            m1 = v
            a1 = i + 1
        v = row[i + 2]
        if v > m2:
            m2 = v
            a2 = i + 2
        v = row[i + 3]
        if v > m3:
            m3 = v
            a3 = i + 3
    m, a = _better(m0, a0, m1, a1)
    m, a = _better(m, a, m2, a2)
    m, a = _better(m, a, m3, a3)
    for i in range(w4, w):
        if row[i] > m:
            m = row[i]
            a = i
    return m, a


@njit(fastmath=_FASTMATH, cache=True, nogil=True)
def _mil_smooth_kernel(x, p, mask, has_mil, has_smooth, write_grad, grad, sums, wh, wv, wd, mil_coef, n_start, n_stop):  # pragma: no cover - numba
    """x: [N, H, W] f32/f64 logits; p: sigmoid(x) (unused without smoothness);
    mask: [N, H, W] u8 or x's dtype (unused without MIL); grad: [N, H, W] like x
    (unused unless write_grad); sums: [N, 6] f64 out. wh, wv, wd: gradient weight per
    neighbour (2 * b * loss weight), x's dtype; mil_coef: a / (N * (H + W)), float64."""
    n_img, h, w = x.shape
    zero = np.zeros(1, x.dtype)[0]
    one = np.ones(1, x.dtype)[0]
    for n in range(n_start, n_stop):
        gc = np.zeros(w, x.dtype)     # d smooth / d p of the current row
        gd = np.zeros(w, x.dtype)     # ... of the next row, from pairs with the current one
        col_max = np.empty(w, x.dtype)
        col_arg = np.zeros(w, np.int32)
        col_lab = np.empty(w, mask.dtype)
        row_max = np.empty(h, x.dtype)
        row_arg = np.zeros(h, np.int64)
        row_lab = np.zeros(h, np.float64)
        s_h = 0.0
        s_v = 0.0
        s_d1 = 0.0
        s_d2 = 0.0
        if has_mil:
            col_max[:] = x[n, 0]
            col_lab[:] = mask[n, 0]
        for y in range(h):
            if has_mil:
                xr = x[n, y]
                m, a = _row_max_first_arg(xr)
                row_max[y] = m
                row_arg[y] = a
                for i in range(w):
                    v = xr[i]
                    gt = v > col_max[i]
                    col_max[i] = v if gt else col_max[i]
                    col_arg[i] = y if gt else col_arg[i]
                mr = mask[n, y]
                lab, _ = _row_max_first_arg(mr)
                row_lab[y] = lab
                for i in range(w):
                    col_lab[i] = max(col_lab[i], mr[i])
            if has_smooth:
                pc = p[n, y]
                acc_h = zero
                for i in range(w - 1):
                    d = pc[i + 1] - pc[i]
                    acc_h += d * d
                    gc[i] -= wh * d
                for i in range(w - 1):
                    gc[i + 1] += wh * (pc[i + 1] - pc[i])
                s_h += acc_h
                if y + 1 < h:
                    pd = p[n, y + 1]
                    acc_v = zero
                    for i in range(w):
                        d = pd[i] - pc[i]
                        acc_v += d * d
                        gc[i] -= wv * d
                        gd[i] = wv * d
                    acc_1 = zero
                    acc_2 = zero
                    for i in range(w - 1):
                        d1 = pd[i + 1] - pc[i]
                        d2 = pd[i] - pc[i + 1]
                        acc_1 += d1 * d1
                        acc_2 += d2 * d2
                        gc[i] -= wd * d1
                        gd[i] += wd * d2
                    for i in range(w - 1):
                        gc[i + 1] -= wd * (pd[i] - pc[i + 1])
                        gd[i + 1] += wd * (pd[i + 1] - pc[i])
                    s_v += acc_v
                    s_d1 += acc_1
                    s_d2 += acc_2
                if write_grad:
                    gy = grad[n, y]
                    for i in range(w):
                        q = pc[i]
                        gy[i] = gc[i] * q * (one - q)
                tmp = gc
                gc = gd
                gd = tmp
                gd[:] = zero
            elif write_grad:
                grad[n, y, :] = zero
        s_row = 0.0
        s_col = 0.0
        if has_mil:
            for y in range(h):
                s = np.float64(row_max[y])
                lab = row_lab[y]
                s_row += max(s, 0.0) - s * lab + np.log1p(np.exp(-abs(s)))
                if write_grad:
                    grad[n, y, row_arg[y]] += ((1.0 - lab) / (1.0 + np.exp(-s)) - lab / (1.0 + np.exp(s))) * mil_coef
            for i in range(w):
                s = np.float64(col_max[i])
                lab = np.float64(col_lab[i])
                s_col += max(s, 0.0) - s * lab + np.log1p(np.exp(-abs(s)))
                if write_grad:
                    grad[n, col_arg[i], i] += ((1.0 - lab) / (1.0 + np.exp(-s)) - lab / (1.0 + np.exp(s))) * mil_coef
        sums[n, _S_H] = s_h
        sums[n, _S_V] = s_v
        sums[n, _S_D1] = s_d1
        sums[n, _S_D2] = s_d2
        sums[n, _S_ROW] = s_row
        sums[n, _S_COL] = s_col


def _as_arrays(logits: torch.Tensor, box_mask: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    """[N, H, W] contiguous numpy views: logits in the compute dtype, mask as u8 or that dtype."""
    ct = compute_dtype(logits.dtype)
    x = logits.detach()[:, 0].to(ct).contiguous()
    if box_mask is None:
        m = torch.zeros((1, 1, 1), dtype=torch.uint8)
    else:
        m = box_mask.detach()[:, 0]
        if m.dtype == torch.bool:
            m = m.contiguous().view(torch.uint8)
        elif m.dtype != torch.uint8:
            m = m.to(ct)
        m = m.contiguous()
    return x.numpy(), m.numpy()


_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_MIN_PIXELS_PER_THREAD = 1 << 15


def _run_chunks(args: tuple, n: int, pixels_per_image: int) -> None:
    """Run the kernel over images [0, n) split in contiguous chunks, one per thread
    (``torch.get_num_threads()`` of them; the kernel releases the GIL)."""
    global _POOL, _POOL_SIZE
    threads = max(1, min(torch.get_num_threads(), n, (n * pixels_per_image) // _MIN_PIXELS_PER_THREAD))
    if threads == 1:
        _mil_smooth_kernel(*args, 0, n)
        return
    if _POOL is None or _POOL_SIZE < threads - 1:
        _POOL = ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="boxcaseg-mil")
        _POOL_SIZE = threads - 1
    bounds = [n * i // threads for i in range(threads + 1)]
    futures = [_POOL.submit(_mil_smooth_kernel, *args, bounds[i], bounds[i + 1]) for i in range(1, threads)]
    _mil_smooth_kernel(*args, bounds[0], bounds[1])
    for f in futures:
        f.result()


def mil_smooth_forward(
    logits: torch.Tensor,
    box_mask: torch.Tensor | None,
    has_mil: bool,
    has_smooth: bool,
    grad_weights: tuple[float, float] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run the fused kernel on CPU tensors.

    logits: [N, 1, H, W] any supported float dtype, any strides; box_mask: [N, 1, H, W]
    (bool/uint8/float) or None when ``has_mil`` is False. ``grad_weights=(a, b)`` also
    returns ``G = a * dmil/dlogits + b * dsmooth/dlogits`` ([N, 1, H, W], logits'
    dtype). Returns ``(mil, smooth, G or None)``; the losses are float32 scalars (float64
    for float64 logits); a term not asked for is 0.
    """
    if logits.device.type != "cpu":
        raise ValueError(f"the Numba kernel runs on CPU tensors, got {logits.device}")
    n, _, h, w = logits.shape
    x, m = _as_arrays(logits, box_mask if has_mil else None)
    np_dt = x.dtype.type
    write_grad = grad_weights is not None
    a, b = grad_weights if write_grad else (0.0, 0.0)
    grad = np.empty(x.shape, x.dtype) if write_grad else np.empty((1, 1, 1), x.dtype)
    sums = np.zeros((n, 6), np.float64)
    lwh, lwv, lwd = smooth_weights(n, h, w)
    # sigmoid by torch (vectorised, multithreaded); everything else in the kernel
    p = torch.sigmoid(torch.from_numpy(x)).numpy() if has_smooth else x
    args = (
        x, p, m, bool(has_mil), bool(has_smooth), write_grad, grad, sums,
        np_dt(2.0 * b * lwh), np_dt(2.0 * b * lwv), np_dt(2.0 * b * lwd),
        float(a) / mil_bag_count(n, h, w),
    )
    _run_chunks(args, n, h * w)
    tot = sums.sum(axis=0)
    out_dt = compute_dtype(logits.dtype)
    mil = (tot[_S_ROW] + tot[_S_COL]) / mil_bag_count(n, h, w) if has_mil else 0.0
    smooth = lwh * tot[_S_H] + lwv * tot[_S_V] + lwd * (tot[_S_D1] + tot[_S_D2]) if has_smooth else 0.0
    g = None
    if write_grad:
        g = torch.from_numpy(grad).unsqueeze(1)
        if g.dtype != logits.dtype:
            g = g.to(logits.dtype)
    return torch.tensor(mil, dtype=out_dt), torch.tensor(smooth, dtype=out_dt), g


class NumbaMilSmoothFunction(torch.autograd.Function):
    """(mil, smooth) = f(logits, box_mask) on CPU; the gradient is made in the forward pass.

    ``grad_weights=(a, b)``: the upstream gradients the caller expects, e.g. (1, 0.05)
    for ``mil + 0.05 * smooth``; the forward writes ``a * dmil + b * dsmooth`` and the
    backward returns it (scaled when the upstream pair is ``c * (a, b)``, recomputed by
    rerunning the kernel with the actual pair otherwise).
    """

    @staticmethod
    def forward(ctx, logits, box_mask, has_mil, has_smooth, grad_weights):
        return fused_forward(ctx, mil_smooth_forward, logits, box_mask, has_mil, has_smooth, grad_weights)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_mil, g_smooth):
        return fused_backward(ctx, g_mil, g_smooth)


def mil_smooth_loss_numba(
    logits: torch.Tensor,
    box_mask: torch.Tensor | None,
    has_mil: bool = True,
    has_smooth: bool = True,
    grad_weights: tuple[float, float] = (1.0, 1.0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mil, smooth) through :class:`NumbaMilSmoothFunction`. CPU tensors only."""
    check_inputs(logits, box_mask if has_mil else None)
    return NumbaMilSmoothFunction.apply(logits, box_mask, has_mil, has_smooth, tuple(map(float, grad_weights)))


def warm_up() -> None:
    """Compile (or load from the on-disk cache) the float32 kernel."""
    x = torch.zeros(1, 1, 2, 2)
    mil_smooth_forward(x, x, True, True, (1.0, 1.0))


__all__ = [
    "NumbaMilSmoothFunction",
    "mil_smooth_forward",
    "mil_smooth_loss_numba",
    "numba",
    "warm_up",
]
