"""Fused Triton kernels of the MIL + smoothness loss, forward and backward.
Checked against :mod:`boxcaseg.kernels.mil_smooth_reference` (float64) by tests/test_kernels.py
(interpreter, CPU) and tests/test_kernels_cuda.py (compiled, GPU).

Two launches per call:

1. ``_mil_smooth_tile_kernel``, grid ``(N, ceil(H / BLOCK_H), ceil(W / BLOCK_W))``: each
   program reads one ``BLOCK_H x BLOCK_W`` tile of the logits (any strides; the eight
   neighbour tiles are re-reads that the caches serve) and

   - adds the tile's share of the four directional sums of squared sigmoid
     differences (each unordered pair is owned by its upper/left pixel),
   - takes the tile's per-row and per-column max with the first argmax, and the
     per-row/column max of the box mask (the bag labels),
   - when a gradient is asked for, writes ``b * dsmooth/dlogits`` of every pixel of the
     tile (through the sigmoid), in the logits' dtype.

2. ``_mil_bags_kernel``, grid ``(N,)``: reduces the per-tile row/column maxima to the
   bag scores (first argmax kept across tiles), sums the BCE-with-logits of the
   N*(H+W) bags and, with a gradient, adds ``a * dmil/dbag`` at each bag's argmax (a
   read-modify-write of H + W values per image) and keeps each bag's argmax index and
   ``dmil/dbag`` (the sparse MIL gradient, for the backward).

Bytes: the logits are read once from DRAM and the gradient written once; the partial
row/column buffers are ``12 * N * (H * W_tiles + W * H_tiles)`` bytes.

Launchers :func:`mil_smooth_forward` (loss, and the gradient for expected upstream
weights in the same pass) and :class:`TritonMilSmoothFunction` follow Liger-Kernel:
the forward makes the gradient, the backward scales it by the upstream gradient and
adds the sparse MIL part, all on the device: no host sync (see the class). Float
coefficients reach the kernels as a small device tensor in the compute dtype, float32
(float64 for float64 logits).

On CPU tensors the kernels run in Triton's interpreter, which must be switched on with
``TRITON_INTERPRET=1`` *before* this module is imported; the launcher then defaults to
one tile per map so that the interpreter runs 2N programs.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from boxcaseg.kernels.mil_smooth_common import (
    check_inputs,
    compute_dtype,
    mil_bag_count,
    smooth_weights,
)

#: True when the kernels below were built for Triton's interpreter (CPU tensors).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@triton.jit
def _sigmoid(v):
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def _neighbour_p(xbase, rows, cols, sxh, sxw, H, W, inside, DY: tl.constexpr, DX: tl.constexpr, CT: tl.constexpr):
    """sigmoid of the tile shifted by (DY, DX), and where that neighbour exists."""
    r = rows + DY
    c = cols + DX
    ok = inside & (r >= 0) & (r < H) & (c >= 0) & (c < W)
    v = tl.load(xbase + r * sxh + c * sxw, mask=ok, other=0.0).to(CT)
    return _sigmoid(v), ok


@triton.jit
def _mil_smooth_tile_kernel(
    x_ptr, sxn, sxh, sxw,
    m_ptr, smn, smh, smw,
    g_ptr,
    sums_ptr,
    rmax_ptr, rarg_ptr, rlab_ptr,
    cmax_ptr, carg_ptr, clab_ptr,
    H, W, n_rb, n_wb,
    coef_ptr,
    HAS_MIL: tl.constexpr, HAS_SMOOTH: tl.constexpr, WRITE_GRAD: tl.constexpr,
    CT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """One tile. x: [N, H, W] strided; g: [N, H, W] contiguous; sums: [N, n_rb, n_wb, 4]
    in CT; rmax/rarg/rlab: [N, n_wb, H]; cmax/carg/clab: [N, n_rb, W]; coef: [5] in CT, the
    smoothness gradient weights (horizontal, vertical, diagonal) at 0..2."""
    n = tl.program_id(0).to(tl.int64)
    rb = tl.program_id(1)
    wb = tl.program_id(2)
    r1 = rb * BLOCK_H + tl.arange(0, BLOCK_H)
    c1 = wb * BLOCK_W + tl.arange(0, BLOCK_W)
    rows = r1[:, None].to(tl.int64)
    cols = c1[None, :].to(tl.int64)
    inside = (rows < H) & (cols < W)
    xbase = x_ptr + n * sxn
    x = tl.load(xbase + rows * sxh + cols * sxw, mask=inside, other=0.0).to(CT)

    if HAS_SMOOTH:
        p = _sigmoid(x)
        p_r, ok_r = _neighbour_p(xbase, rows, cols, sxh, sxw, H, W, inside, 0, 1, CT)
        p_d, ok_d = _neighbour_p(xbase, rows, cols, sxh, sxw, H, W, inside, 1, 0, CT)
        p_dr, ok_dr = _neighbour_p(xbase, rows, cols, sxh, sxw, H, W, inside, 1, 1, CT)
        p_dl, ok_dl = _neighbour_p(xbase, rows, cols, sxh, sxw, H, W, inside, 1, -1, CT)
        d_r = tl.where(ok_r, p_r - p, 0.0)
        d_d = tl.where(ok_d, p_d - p, 0.0)
        d_dr = tl.where(ok_dr, p_dr - p, 0.0)
        d_dl = tl.where(ok_dl, p_dl - p, 0.0)
        sbase = sums_ptr + ((n * n_rb + rb) * n_wb + wb) * 4
        tl.store(sbase + 0, tl.sum(tl.sum(d_r * d_r, axis=1), axis=0))
        tl.store(sbase + 1, tl.sum(tl.sum(d_d * d_d, axis=1), axis=0))
        tl.store(sbase + 2, tl.sum(tl.sum(d_dr * d_dr, axis=1), axis=0))
        tl.store(sbase + 3, tl.sum(tl.sum(d_dl * d_dl, axis=1), axis=0))
        if WRITE_GRAD:
            p_l, ok_l = _neighbour_p(xbase, rows, cols, sxh, sxw, H, W, inside, 0, -1, CT)
            p_u, ok_u = _neighbour_p(xbase, rows, cols, sxh, sxw, H, W, inside, -1, 0, CT)
            p_ul, ok_ul = _neighbour_p(xbase, rows, cols, sxh, sxw, H, W, inside, -1, -1, CT)
            p_ur, ok_ur = _neighbour_p(xbase, rows, cols, sxh, sxw, H, W, inside, -1, 1, CT)
            d_l = tl.where(ok_l, p_l - p, 0.0)
            d_u = tl.where(ok_u, p_u - p, 0.0)
            d_ul = tl.where(ok_ul, p_ul - p, 0.0)
            d_ur = tl.where(ok_ur, p_ur - p, 0.0)
            # d loss / d p_i = sum_j w_d * (p_i - p_j) = -sum_j w_d * (p_j - p_i)
            wh = tl.load(coef_ptr + 0)
            wv = tl.load(coef_ptr + 1)
            wd = tl.load(coef_ptr + 2)
            gp = -(wh * (d_r + d_l) + wv * (d_d + d_u) + wd * (d_dr + d_dl + d_ul + d_ur))
            g = gp * p * (1.0 - p)
            tl.store(g_ptr + (n * H + rows) * W + cols, g.to(g_ptr.dtype.element_ty), mask=inside)
    elif WRITE_GRAD:
        zero = tl.zeros([BLOCK_H, BLOCK_W], dtype=g_ptr.dtype.element_ty)
        tl.store(g_ptr + (n * H + rows) * W + cols, zero, mask=inside)

    if HAS_MIL:
        neg = float("-inf")
        xm = tl.where(inside, x, neg)
        mk = tl.load(m_ptr + n * smn + rows * smh + cols * smw, mask=inside, other=0).to(CT)
        mk = tl.where(inside, mk, neg)
        r_max, r_arg = tl.max(xm, axis=1, return_indices=True, return_indices_tie_break_left=True)
        r_lab = tl.max(mk, axis=1)
        r_off = (n * n_wb + wb) * H + r1
        r_ok = r1 < H
        tl.store(rmax_ptr + r_off, r_max, mask=r_ok)
        tl.store(rarg_ptr + r_off, (r_arg + wb * BLOCK_W).to(tl.int32), mask=r_ok)
        tl.store(rlab_ptr + r_off, r_lab, mask=r_ok)
        c_max, c_arg = tl.max(xm, axis=0, return_indices=True, return_indices_tie_break_left=True)
        c_lab = tl.max(mk, axis=0)
        c_off = (n * n_rb + rb) * W + c1
        c_ok = c1 < W
        tl.store(cmax_ptr + c_off, c_max, mask=c_ok)
        tl.store(carg_ptr + c_off, (c_arg + rb * BLOCK_H).to(tl.int32), mask=c_ok)
        tl.store(clab_ptr + c_off, c_lab, mask=c_ok)


@triton.jit
def _bce_with_logits(s, lab):
    """BCE-with-logits of score s against label lab; log1p by a series for tiny terms."""
    z = tl.exp(-tl.abs(s))
    log1p_z = tl.where(z < 1e-4, z * (1.0 - 0.5 * z), tl.log(1.0 + z))
    return tl.maximum(s, 0.0) - s * lab + log1p_z


@triton.jit
def _reduce_bags(
    n, g_ptr, max_ptr, arg_ptr, lab_ptr, bag_ptr, idx_ptr, d_ptr,
    L, n_part, mil_coef, inv_bags, g_stride_bag, g_stride_arg, g_img,
    WRITE_GRAD: tl.constexpr, ADD_GRAD: tl.constexpr, CT: tl.constexpr, P_PART: tl.constexpr, BLOCK: tl.constexpr,
):
    """Bags of one kind (rows or columns) of image n: partials [N, n_part, L] -> loss sum,
    and the gradient at each bag's argmax, g[n, ...] at bag * g_stride_bag + arg * g_stride_arg.
    With a gradient, also each bag's flat argmax index into g (idx, int64) and its
    d mil / d score (d, CT): the sparse MIL gradient the backward needs; ADD_GRAD also
    adds a * d into g."""
    k = tl.arange(0, P_PART)[:, None]
    acc = tl.zeros([BLOCK], dtype=CT)
    for l0 in range(0, L, BLOCK):
        l1 = l0 + tl.arange(0, BLOCK)
        l_ok = l1 < L
        ok = (k < n_part) & l_ok[None, :]
        off = (n * n_part + k) * L + l1[None, :]
        v = tl.load(max_ptr + off, mask=ok, other=float("-inf"))
        a = tl.load(arg_ptr + off, mask=ok, other=0)
        lb = tl.load(lab_ptr + off, mask=ok, other=float("-inf"))
        s, which = tl.max(v, axis=0, return_indices=True, return_indices_tie_break_left=True)
        arg = tl.sum(tl.where(k == which[None, :], a, 0), axis=0)
        lab = tl.max(lb, axis=0)
        s = tl.where(l_ok, s, 0.0)
        lab = tl.where(l_ok, lab, 0.0)
        acc += tl.where(l_ok, _bce_with_logits(s, lab), 0.0)
        if WRITE_GRAD:
            flat = g_img + l1.to(tl.int64) * g_stride_bag + arg.to(tl.int64) * g_stride_arg
            # sigmoid(s) - lab, without the cancellation of a confident bag
            dbag = (1.0 - lab) * _sigmoid(s) - lab * _sigmoid(-s)
            if ADD_GRAD:
                ptr = g_ptr + flat
                old = tl.load(ptr, mask=l_ok, other=0.0).to(CT)
                tl.store(ptr, (old + dbag * mil_coef).to(g_ptr.dtype.element_ty), mask=l_ok)
            tl.store(idx_ptr + l1, flat, mask=l_ok)
            tl.store(d_ptr + l1, dbag * inv_bags, mask=l_ok)
    tl.store(bag_ptr, tl.sum(acc, axis=0))


@triton.jit
def _mil_bags_kernel(
    g_ptr, bags_ptr, idx_ptr, d_ptr,
    rmax_ptr, rarg_ptr, rlab_ptr,
    cmax_ptr, carg_ptr, clab_ptr,
    H, W, n_rb, n_wb, coef_ptr,
    WRITE_GRAD: tl.constexpr, ADD_GRAD: tl.constexpr, CT: tl.constexpr,
    P_WB: tl.constexpr, P_RB: tl.constexpr, BLOCK: tl.constexpr,
):
    """One image: row bags, then (after a barrier, as a row's and a column's argmax may
    be the same pixel) column bags. bags: [N, 2] (row, column BCE sums); idx, d:
    [N, H + W] (rows, then columns); coef[3] = a / bags, coef[4] = 1 / bags."""
    n = tl.program_id(0).to(tl.int64)
    g_img = n * H * W
    mil_coef = tl.load(coef_ptr + 3)
    inv_bags = tl.load(coef_ptr + 4)
    b_img = n * (H + W)
    _reduce_bags(n, g_ptr, rmax_ptr, rarg_ptr, rlab_ptr, bags_ptr + n * 2, idx_ptr + b_img, d_ptr + b_img,
                 H, n_wb, mil_coef, inv_bags, W, 1, g_img, WRITE_GRAD, ADD_GRAD, CT, P_WB, BLOCK)
    tl.debug_barrier()
    _reduce_bags(n, g_ptr, cmax_ptr, carg_ptr, clab_ptr, bags_ptr + n * 2 + 1, idx_ptr + b_img + H, d_ptr + b_img + H,
                 W, n_rb, mil_coef, inv_bags, 1, W, g_img, WRITE_GRAD, ADD_GRAD, CT, P_RB, BLOCK)


def _default_blocks(h: int, w: int, on_gpu: bool) -> tuple[int, int]:
    """Tile shape. GPU: ~2K elements per program (untuned: no GPU measured yet).
    Interpreter: the whole map in one tile (up to 2**20 elements)."""
    bw = triton.next_power_of_2(w)
    bh = triton.next_power_of_2(h)
    if on_gpu:
        bw = min(bw, 128)
        bh = min(bh, max(1, 2048 // bw))
    else:
        bw = min(bw, 1024)
        bh = min(bh, max(1, (1 << 20) // bw))
    return bh, bw


@functools.lru_cache(maxsize=256)
def _coef_tensor(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The kernels' float coefficients as a device tensor in the compute dtype (Triton
    passes Python floats as float32, too coarse for float64 maps). Cached: a training
    loop asks for the same few, so the host-to-device copy (a sync) happens once each."""
    return torch.tensor(values, dtype=dtype).to(device)


def mil_smooth_forward(
    logits: torch.Tensor,
    box_mask: torch.Tensor | None,
    has_mil: bool,
    has_smooth: bool,
    grad_weights: tuple[float, float] | None,
    block_h: int | None = None,
    block_w: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the kernels. Same contract as :func:`boxcaseg.kernels.mil_smooth_numba.mil_smooth_forward`.

    logits: [N, 1, H, W] float32/float64/bfloat16/float16, any strides; box_mask:
    [N, 1, H, W] bool/int/float (or None without MIL). ``grad_weights=(a, b)`` also
    returns ``a * dmil/dlogits + b * dsmooth/dlogits`` ([N, 1, H, W], logits' dtype).
    ``block_h``/``block_w`` (powers of two) override the tile shape.
    """
    mil, smooth, g, _ = _launch(logits, box_mask, has_mil, has_smooth, grad_weights, block_h, block_w)
    return mil, smooth, g


def _launch(logits, box_mask, has_mil, has_smooth, grad_weights, block_h=None, block_w=None, add_mil=True):
    """:func:`mil_smooth_forward` plus, with a gradient and MIL, the sparse MIL gradient
    ``(idx, d)``: ``dmil/dlogits`` is ``d`` scattered at the flat indices ``idx`` into
    [N * H * W] (both [N, H + W]; rows first), else None. ``add_mil=False`` leaves the
    MIL part out of the dense gradient (it is then ``b * dsmooth/dlogits`` only)."""
    if logits.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 set before "
            "boxcaseg.kernels.mil_smooth_triton is imported"
        )
    n, _, h, w = logits.shape
    dev = logits.device
    x = logits.detach()[:, 0]
    ct_torch = compute_dtype(logits.dtype)
    ct = tl.float64 if ct_torch == torch.float64 else tl.float32
    if has_mil:
        m = box_mask.detach()[:, 0]
        if m.dtype == torch.bool:
            m = m.view(torch.uint8)
    else:
        m = x
    bh, bw = _default_blocks(h, w, dev.type == "cuda" and not INTERPRETED)
    bh, bw = block_h or bh, block_w or bw
    n_rb, n_wb = triton.cdiv(h, bh), triton.cdiv(w, bw)
    write_grad = grad_weights is not None
    a, b = grad_weights if write_grad else (0.0, 0.0)
    lwh, lwv, lwd = smooth_weights(n, h, w)

    n_bags = mil_bag_count(n, h, w)
    coef = _coef_tensor((2.0 * b * lwh, 2.0 * b * lwv, 2.0 * b * lwd, float(a) / n_bags, 1.0 / n_bags), ct_torch, dev)
    g = torch.empty((n, h, w), dtype=logits.dtype, device=dev) if write_grad else x
    sums = torch.zeros((n, n_rb, n_wb, 4), dtype=ct_torch, device=dev)
    dummy = sums
    if has_mil:
        rmax = torch.empty((n, n_wb, h), dtype=ct_torch, device=dev)
        rarg = torch.empty((n, n_wb, h), dtype=torch.int32, device=dev)
        rlab = torch.empty((n, n_wb, h), dtype=ct_torch, device=dev)
        cmax = torch.empty((n, n_rb, w), dtype=ct_torch, device=dev)
        carg = torch.empty((n, n_rb, w), dtype=torch.int32, device=dev)
        clab = torch.empty((n, n_rb, w), dtype=ct_torch, device=dev)
    else:
        rmax = rarg = rlab = cmax = carg = clab = dummy
    _mil_smooth_tile_kernel[(n, n_rb, n_wb)](
        x, x.stride(0), x.stride(1), x.stride(2),
        m, m.stride(0), m.stride(1), m.stride(2),
        g, sums, rmax, rarg, rlab, cmax, carg, clab,
        h, w, n_rb, n_wb, coef,
        HAS_MIL=has_mil, HAS_SMOOTH=has_smooth, WRITE_GRAD=write_grad,
        CT=ct, BLOCK_H=bh, BLOCK_W=bw,
        num_warps=8 if bh * bw >= 2048 else 4,
    )
    out_dt = ct_torch
    if has_smooth:
        tot = sums.to(torch.float64).sum(dim=(0, 1, 2))
        smooth = (lwh * tot[0] + lwv * tot[1] + lwd * (tot[2] + tot[3])).to(out_dt)
    else:
        smooth = torch.zeros((), dtype=out_dt, device=dev)
    sparse = None
    if has_mil:
        bags = torch.empty((n, 2), dtype=ct_torch, device=dev)
        if write_grad:
            sparse = (torch.empty((n, h + w), dtype=torch.int64, device=dev),
                      torch.empty((n, h + w), dtype=ct_torch, device=dev))
        idx, d = sparse if write_grad else (dummy, dummy)
        _mil_bags_kernel[(n,)](
            g, bags, idx, d, rmax, rarg, rlab, cmax, carg, clab,
            h, w, n_rb, n_wb, coef,
            WRITE_GRAD=write_grad, ADD_GRAD=write_grad and add_mil, CT=ct,
            P_WB=triton.next_power_of_2(n_wb), P_RB=triton.next_power_of_2(n_rb),
            BLOCK=min(triton.next_power_of_2(max(h, w)), 1024 if INTERPRETED else 128),
            num_warps=4,
        )
        mil = (bags.to(torch.float64).sum() / n_bags).to(out_dt)
    else:
        mil = torch.zeros((), dtype=out_dt, device=dev)
    return mil, smooth, (g.unsqueeze(1) if write_grad else None), sparse


class TritonMilSmoothFunction(torch.autograd.Function):
    """(mil, smooth) = f(logits, box_mask) by the Triton kernels, with a backward that
    needs no device-to-host sync.

    With both terms, the forward writes the dense smoothness gradient ``b * dsmooth``
    (``grad_weights=(a, b)``, b the caller's smoothness weight) and keeps the MIL gradient
    in sparse form (one value per bag, at its argmax). For any upstream ``(gm, gs)`` the
    backward returns ``(gs / b) * G + gm * dmil`` (one pass over G plus a scatter of
    N * (H + W) values), exact whatever the weighting. MIL alone keeps the MIL part in G
    and returns ``(gm / a) * G``; smoothness alone ``(gs / b) * G``. A zero weight on a
    term in use (b = 0 with smoothness) falls back to reading the upstream values (a sync)
    and recomputing.
    """

    @staticmethod
    def forward(ctx, logits, box_mask, has_mil, has_smooth, grad_weights, blocks):
        need_grad = ctx.needs_input_grad[0]
        b = grad_weights[1]
        split = has_mil and has_smooth and b != 0.0      # dense smoothness + sparse MIL
        mil, smooth, g, sparse = _launch(logits, box_mask, has_mil, has_smooth,
                                         grad_weights if need_grad else None, *(blocks or (None, None)),
                                         add_mil=not split)
        ctx.flags = (has_mil, has_smooth, grad_weights, split)
        if need_grad:
            idx, d = sparse if split else (None, None)
            ctx.save_for_backward(logits, box_mask if has_mil else None, g, idx, d)
        return mil, smooth

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_mil, g_smooth):
        has_mil, has_smooth, (a, b), split = ctx.flags
        logits, box_mask, g, idx, d = ctx.saved_tensors
        if split:
            out = g * (g_smooth / b)
            out.view(-1).index_add_(0, idx.view(-1), (d * g_mil).view(-1).to(out.dtype))
            return out, None, None, None, None, None
        if has_smooth and not has_mil and b != 0.0:
            return g * (g_smooth / b), None, None, None, None, None
        if has_mil and not has_smooth and a != 0.0:
            return g * (g_mil / a), None, None, None, None, None
        # a zero weight on a term in use: read the upstream values (a sync) and recompute
        gm = float(g_mil.item()) if has_mil else 0.0
        gs = float(g_smooth.item()) if has_smooth else 0.0
        return _launch(logits, box_mask, has_mil, has_smooth, (gm, gs))[2], None, None, None, None, None


def mil_smooth_loss_triton(
    logits: torch.Tensor,
    box_mask: torch.Tensor | None,
    has_mil: bool = True,
    has_smooth: bool = True,
    grad_weights: tuple[float, float] = (1.0, 1.0),
    blocks: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mil, smooth) through :class:`TritonMilSmoothFunction`; ``blocks=(block_h, block_w)``
    overrides the tile shape (bench/mil_kernel.py's sweep)."""
    check_inputs(logits, box_mask if has_mil else None)
    return TritonMilSmoothFunction.apply(logits, box_mask, has_mil, has_smooth, tuple(map(float, grad_weights)), blocks)
