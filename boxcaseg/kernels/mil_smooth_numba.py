"""Fused CPU kernel of the MIL + smoothness loss (Numba), forward and backward.
Checked against :mod:`boxcaseg.kernels.mil_smooth_reference` (float64) by tests/test_kernels.py.

One pass over each map: for every row the kernel takes the row max with its first
argmax, updates the running column max/argmax, takes the bag labels from the box mask,
adds the row's share of the four directional sums of squared probability differences,
and (when a gradient is needed) writes ``G = b * dsmooth/dlogits`` of the row by
gathering the 8 neighbours of each pixel from the rows above and below (no shifted
copies, no accumulators). Once an image is done its bag losses are summed in float64
and ``a * dmil/dlogits`` is added at the argmax positions. The image's sigmoid is made
first into a per-thread buffer that stays in cache (a vectorised float32 exp, see
:func:`_sigmoid_rows`).

Images are processed in chunks on ``torch.get_num_threads()`` threads (the kernel
releases the GIL; the threads pull chunks in turn, which keeps a shared machine's load
from stalling them). No torch op runs in parallel on the way and no OpenMP threading
layer is involved, so Numba's and torch's thread pools never spin against each other.

Layout follows Liger-Kernel: kernel, the :func:`mil_smooth_forward` launcher (the
backward reuses the gradient made in the forward pass, or reruns the launcher with the
actual upstream weights) and :class:`NumbaMilSmoothFunction` side by side. Float32 and
float64 are computed natively, half types in float32. Compiled lazily on first use with
``cache=True`` (about 2 s per dtype combination, then loaded from the on-disk cache).
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from numba import njit

from boxcaseg.kernels.mil_smooth_common import (
    check_inputs,
    compute_dtype,
    fused_backward,
    fused_forward,
    mil_bag_count,
    smooth_weights,
)

# Reassociation lets LLVM vectorise the row reductions. "nnan": NaN logits are not
# supported (documented in mil_smooth_common); no "ninf", so logits of any magnitude stay exact.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp", "nnan"}

# Column of the per-image partial sums.
_S_H, _S_V, _S_D1, _S_D2, _S_ROW, _S_COL = range(6)


@njit(fastmath=_FASTMATH, error_model="numpy", cache=True, inline="always")
def _better(m, a, mk, ak):  # pragma: no cover - numba
    if mk > m or (mk == m and ak < a):
        return mk, ak
    return m, a


@njit(fastmath=_FASTMATH, error_model="numpy", cache=True, inline="always")
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


@njit(fastmath=_FASTMATH, error_model="numpy", cache=True, inline="always")
def _row_max(row):  # pragma: no cover - numba
    """max of a 1-D array; eight independent lanes for ILP."""
    w = row.shape[0]
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = row[0]
    w8 = w - w % 8
    for i in range(0, w8, 8):
        m0 = max(m0, row[i])
        m1 = max(m1, row[i + 1])
        m2 = max(m2, row[i + 2])
        m3 = max(m3, row[i + 3])
        m4 = max(m4, row[i + 4])
        m5 = max(m5, row[i + 5])
        m6 = max(m6, row[i + 6])
        m7 = max(m7, row[i + 7])
    m = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
    for i in range(w8, w):
        m = max(m, row[i])
    return m


@njit(fastmath=_FASTMATH, error_model="numpy", cache=True, inline="always")
def _sigmoid_rows(src, dst, scale_bits, fast):  # pragma: no cover - numba
    """dst = sigmoid(src) for [H, W] arrays.

    fast (float32): exp(-v) = 2^k * e^r with |r| <= ln2/2, e^r by the Cephes expf
    polynomial, 2^k put together in the exponent bits of a float32 (vectorises; Numba's
    exp is a scalar libm call). |error| < 1e-7, as torch's float32 sigmoid. The argument
    is clamped to [-87, 87], so exp(-v) stays a normal float. Otherwise: np.exp.
    """
    h, w = src.shape
    scale = scale_bits.view(np.float32)
    one = np.ones(1, dst.dtype)[0]
    for y in range(h):
        s = src[y]
        d = dst[y]
        if fast:
            for i in range(w):
                z = min(max(-s[i], np.float32(-87.0)), np.float32(87.0))
                k = np.floor(z * np.float32(1.4426950408889634) + np.float32(0.5))
                r = z - k * np.float32(0.693359375) + k * np.float32(2.12194440e-4)
                q = np.float32(1.9875691500e-4)
                q = q * r + np.float32(1.3981999507e-3)
                q = q * r + np.float32(8.3334519073e-3)
                q = q * r + np.float32(4.1665795894e-2)
                q = q * r + np.float32(1.6666665459e-1)
                q = q * r + np.float32(5.0000001201e-1)
                d[i] = q * r * r + r + np.float32(1.0)
                scale_bits[i] = (np.int32(k) + np.int32(127)) << np.int32(23)
            for i in range(w):
                d[i] = one / (one + d[i] * scale[i])
        else:
            for i in range(w):
                d[i] = one / (one + np.exp(-s[i]))


@njit(fastmath=_FASTMATH, error_model="numpy", cache=True, inline="always")
def _edge_grad(pc, pu, pdn, i, wh, wvu, wvd, wdu, wdd, one):  # pragma: no cover - numba
    """Smoothness gradient of pixel i of a row at the left or right border."""
    w = pc.shape[0]
    c = pc[i]
    t = wvu * (c - pu[i]) + wvd * (c - pdn[i])
    if i > 0:
        t += wh * (c - pc[i - 1]) + wdu * (c - pu[i - 1]) + wdd * (c - pdn[i - 1])
    if i + 1 < w:
        t += wh * (c - pc[i + 1]) + wdu * (c - pu[i + 1]) + wdd * (c - pdn[i + 1])
    return t * c * (one - c)


@njit(fastmath=_FASTMATH, error_model="numpy", cache=True, nogil=True)
def _mil_smooth_kernel(x, mask, has_mil, has_smooth, write_grad, grad, sums, wh, wv, wd, mil_coef, fast_sigmoid, n_start, n_stop):  # pragma: no cover - numba
    """x: [N, H, W] f32/f64 logits; fast_sigmoid: the float32 sigmoid (see _sigmoid_rows);
    mask: [N, H, W] u8 or x's dtype (unused without MIL); grad: [N, H, W] like x
    (unused unless write_grad); sums: [N, 6] f64 out. wh, wv, wd: gradient weight per
    neighbour (2 * b * loss weight), x's dtype; mil_coef: a / (N * (H + W)), float64.
    Processes images [n_start, n_stop)."""
    _, h, w = x.shape
    zero = np.zeros(1, x.dtype)[0]
    one = np.ones(1, x.dtype)[0]
    p = np.empty((h, w), x.dtype)          # sigmoid of the current image
    scale_bits = np.empty(w, np.int32)
    for n in range(n_start, n_stop):
        if has_smooth:
            _sigmoid_rows(x[n], p, scale_bits, fast_sigmoid)
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
                row_lab[y] = _row_max(mr)
                for i in range(w):
                    col_lab[i] = max(col_lab[i], mr[i])
            if has_smooth:
                pc = p[y]
                up = y > 0
                dn = y + 1 < h
                pu = p[y - 1] if up else pc      # a stand-in row when there is none,
                pdn = p[y + 1] if dn else pc     # its weights are then 0
                # loss: the pairs owned by row y (right, down, down-right, down-left)
                acc_h = zero
                for i in range(w - 1):
                    d = pc[i + 1] - pc[i]
                    acc_h += d * d
                s_h += acc_h
                if dn:
                    acc_v = zero
                    for i in range(w):
                        d = pdn[i] - pc[i]
                        acc_v += d * d
                    acc_1 = zero
                    acc_2 = zero
                    for i in range(w - 1):
                        d1 = pdn[i + 1] - pc[i]
                        d2 = pdn[i] - pc[i + 1]
                        acc_1 += d1 * d1
                        acc_2 += d2 * d2
                    s_v += acc_v
                    s_d1 += acc_1
                    s_d2 += acc_2
                if write_grad:
                    # d smooth / d p_i = sum over the 8 neighbours j of w_dir * (p_i - p_j)
                    wvu = wv if up else zero
                    wdu = wd if up else zero
                    wvd = wv if dn else zero
                    wdd = wd if dn else zero
                    gy = grad[n, y]
                    for i in range(1, w - 1):
                        c = pc[i]
                        c2 = c + c
                        t = (wh * (c2 - pc[i - 1] - pc[i + 1])
                             + wvu * (c - pu[i]) + wvd * (c - pdn[i])
                             + wdu * (c2 - pu[i - 1] - pu[i + 1])
                             + wdd * (c2 - pdn[i - 1] - pdn[i + 1]))
                        gy[i] = t * c * (one - c)
                    gy[0] = _edge_grad(pc, pu, pdn, 0, wh, wvu, wvd, wdu, wdd, one)
                    if w > 1:
                        gy[w - 1] = _edge_grad(pc, pu, pdn, w - 1, wh, wvu, wvd, wdu, wdd, one)
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
_CHUNKS_PER_THREAD = 4


def _run_chunks(args: tuple, n: int, pixels_per_image: int) -> None:
    """Run the kernel over images [0, n) on ``torch.get_num_threads()`` threads (the
    kernel releases the GIL). The images are cut in a few chunks per thread that the
    threads pull in turn, so a thread slowed down by other load on the machine does not
    hold the others up."""
    global _POOL, _POOL_SIZE
    threads = max(1, min(torch.get_num_threads(), n, (n * pixels_per_image) // _MIN_PIXELS_PER_THREAD))
    if threads == 1:
        _mil_smooth_kernel(*args, 0, n)
        return
    if _POOL is None or _POOL_SIZE < threads - 1:
        _POOL = ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="boxcaseg-mil")
        _POOL_SIZE = threads - 1
    n_chunks = min(n, threads * _CHUNKS_PER_THREAD)
    bounds = [n * i // n_chunks for i in range(n_chunks + 1)]
    ticket = itertools.count()          # next() is atomic under the GIL

    def worker() -> None:
        while (i := next(ticket)) < n_chunks:
            _mil_smooth_kernel(*args, bounds[i], bounds[i + 1])

    futures = [_POOL.submit(worker) for _ in range(threads - 1)]
    worker()
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
    args = (
        x, m, bool(has_mil), bool(has_smooth), write_grad, grad, sums,
        np_dt(2.0 * b * lwh), np_dt(2.0 * b * lwv), np_dt(2.0 * b * lwd),
        float(a) / mil_bag_count(n, h, w), x.dtype == np.float32,
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
    "warm_up",
]
