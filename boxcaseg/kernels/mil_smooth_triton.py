"""Fused Triton kernels of the MIL + smoothness loss: three launches per forward + backward.
Checked against :mod:`boxcaseg.kernels.mil_smooth_reference` (float64) by tests/test_kernels.py
(interpreter, CPU) and tests/test_kernels_cuda.py (compiled, GPU).

Inputs: the logits ``[N, 1, H, W]`` (any strides) and the bag labels in compact form,
``uint8 [N, H + W]`` (row labels, then column labels; :func:`~boxcaseg.kernels.mil_smooth_common.bag_labels`
makes them from a dense mask, the training data loader from the box extent or the
salient mask). No dense label map is read.

1. ``_tile_kernel``, grid ``(N, ceil(H / BLOCK_H), ceil(W / BLOCK_W))``, one pass over the
   map: each program loads its tile once, takes the sigmoid once per pixel (plus a
   one-pixel halo: the row above and below, the column left and right, the four
   corners), forms the neighbours' probabilities by register shuffles (``tl.gather``),
   and

   - writes the tile's weighted share of the smoothness sum (each unordered pixel pair
     is owned by its upper/left pixel) into a per-tile slot,
   - writes the tile's per-row and per-column max with the first argmax into per-tile
     slots (no atomics),
   - when a gradient is asked for, writes ``b * dsmooth/dlogits`` of every pixel once,
     in the logits' dtype.

2. ``_bags_kernel``, grid ``(N,)``: reduces each image's per-tile maxima to its bag
   scores (first argmax kept, tiles visited in order: deterministic), sums the
   BCE-with-logits of its H + W bags and, with a gradient, adds ``a * dmil/dbag`` at
   each bag's argmax (rows, then after a barrier columns: a row's and a column's argmax
   may be the same pixel), keeping per bag its argmax, ``dmil/dbag`` and the value the
   pixel held before (the sparse MIL part, for the backward). The last program to finish
   (an integer ticket: order-free) sums the per-image and per-tile partials in a fixed
   order and writes the two loss scalars. No host synchronisation, no float atomics:
   the result is bitwise reproducible.

3. ``_backward_kernel``, same grid as (1), run by the autograd backward: it reads the
   upstream gradients on the device and, when they equal the weights the forward made
   the gradient for (training: ``mil + w * smooth``), returns at once, so the backward
   moves no memory; otherwise it rescales the dense part in place and rewrites the
   argmax pixels exactly from the kept values. Repeated backward passes through a
   retained graph are exact: the weights the buffer holds are kept on the device.

Bytes of a forward + backward with a gradient: the logits read once and the gradient
written once (plus the halo re-reads, which caches serve), the per-tile partials
``8 * N * (H * W_tiles + W * H_tiles)`` bytes, the bag labels ``N * (H + W)``.

On CPU tensors the kernels run in Triton's interpreter, which must be switched on with
``TRITON_INTERPRET=1`` *before* this module is imported; the launcher then defaults to
one tile per map.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from boxcaseg.kernels.mil_smooth_common import (
    bag_labels,
    check_bag_labels,
    check_inputs,
    compute_dtype,
    mil_bag_count,
    smooth_weights,
)

#: True when the kernels below were built for Triton's interpreter (CPU tensors).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

# coefficient slots of the small device tensor the kernels read (compute dtype): 0-2 the
# smoothness gradient weights 2 * b / (4 count_d), 3 unused, 4 = 1 / bags, 5-7 the smoothness
# loss weights 1 / (4 count_d), 8-9 the weights (a, b) the forward's gradient is made for
_C_A, _C_B = 8, 9                      # the weights (a, b) the forward's gradient is made for


@triton.jit
def _sigmoid(v):
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def _load_p(xbase, r, c, sxh, sxw, ok, CT: tl.constexpr):
    """sigmoid of the logits at (r, c) where ``ok`` (halo loads; 0.5 elsewhere)."""
    return _sigmoid(tl.load(xbase + r * sxh + c * sxw, mask=ok, other=0.0).to(CT))


@triton.jit
def _shift1(v, fill, BLOCK: tl.constexpr, D: tl.constexpr):
    """1-D: ``v[j + D]``, ``fill`` (a scalar) where ``j + D`` leaves the block."""
    j = tl.arange(0, BLOCK)
    src = tl.minimum(tl.maximum(j + D, 0), BLOCK - 1)
    edge = (j + D < 0) | (j + D >= BLOCK)
    return tl.where(edge, fill, tl.gather(v, src, 0))


@triton.jit
def _shift_cols(t, fill, idx, edge):
    """2-D: ``t`` shifted along its columns by the index map ``idx``; where ``edge``, ``fill``
    (a column vector [BLOCK_H], broadcast over the columns)."""
    return tl.where(edge, fill[:, None], tl.gather(t, idx, 1))


@triton.jit
def _shift_rows(t, fill, idx, edge):
    """2-D: ``t`` shifted along its rows by the index map ``idx``; where ``edge``, ``fill``
    (a row vector [BLOCK_W], broadcast over the rows). (One helper per axis: code after an
    early ``return`` under a constexpr ``if`` is still compiled, and the other axis's
    broadcast fails to compile for any tile that is not square.)"""
    return tl.where(edge, fill[None, :], tl.gather(t, idx, 0))


@triton.jit
def _tile_kernel(
    x_ptr, sxn, sxh, sxw,
    g_ptr, part_ptr,
    rmax_ptr, rarg_ptr, cmax_ptr, carg_ptr,
    H, W, n_rb, n_wb,
    coef_ptr,
    HAS_MIL: tl.constexpr, HAS_SMOOTH: tl.constexpr, WRITE_GRAD: tl.constexpr,
    CT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """One tile. x: [N, H, W] strided; g: [N, H, W] contiguous; part: [N, n_rb, n_wb] in CT
    (the tile's weighted smoothness sum); rmax/rarg: [N, n_wb, H]; cmax/carg: [N, n_rb, W]."""
    n = tl.program_id(0).to(tl.int64)
    rb = tl.program_id(1)
    wb = tl.program_id(2)
    r1 = (rb * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    c1 = (wb * BLOCK_W + tl.arange(0, BLOCK_W)).to(tl.int64)
    rows = r1[:, None]
    cols = c1[None, :]
    in_r = r1 < H
    in_c = c1 < W
    inside = in_r[:, None] & in_c[None, :]
    xbase = x_ptr + n * sxn
    x = tl.load(xbase + rows * sxh + cols * sxw, mask=inside, other=0.0).to(CT)

    if HAS_SMOOTH:
        p = _sigmoid(x)                                   # once per pixel of the tile
        ii = tl.arange(0, BLOCK_H)[:, None] + tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.int32)
        jj = tl.arange(0, BLOCK_W)[None, :] + tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.int32)
        j_next = tl.minimum(jj + 1, BLOCK_W - 1)
        j_prev = tl.maximum(jj - 1, 0)
        i_next = tl.minimum(ii + 1, BLOCK_H - 1)
        last_c = jj == BLOCK_W - 1
        first_c = jj == 0
        last_r = ii == BLOCK_H - 1
        r_lo = rb.to(tl.int64) * BLOCK_H - 1
        r_hi = rb.to(tl.int64) * BLOCK_H + BLOCK_H
        c_lo = wb.to(tl.int64) * BLOCK_W - 1
        c_hi = wb.to(tl.int64) * BLOCK_W + BLOCK_W
        # the halo: column right and left, row below, its two corners
        p_rc = _load_p(xbase, r1, c_hi, sxh, sxw, in_r & (c_hi < W), CT)
        p_lc = _load_p(xbase, r1, c_lo, sxh, sxw, in_r & (c_lo >= 0), CT)
        p_br = _load_p(xbase, r_hi, c1, sxh, sxw, in_c & (r_hi < H), CT)
        p_br_r = _shift1(p_br, _load_p(xbase, r_hi, c_hi, sxh, sxw, (r_hi < H) & (c_hi < W), CT), BLOCK_W, 1)
        p_br_l = _shift1(p_br, _load_p(xbase, r_hi, c_lo, sxh, sxw, (r_hi < H) & (c_lo >= 0), CT), BLOCK_W, -1)
        # neighbours right, left, down, down-right, down-left
        p_r = _shift_cols(p, p_rc, j_next, last_c)
        p_l = _shift_cols(p, p_lc, j_prev, first_c)
        p_d = _shift_rows(p, p_br, i_next, last_r)
        p_dr = _shift_rows(p_r, p_br_r, i_next, last_r)
        p_dl = _shift_rows(p_l, p_br_l, i_next, last_r)
        ok_d = inside & (rows + 1 < H)
        d_r = tl.where(inside & (cols + 1 < W), p_r - p, 0.0)
        d_d = tl.where(ok_d, p_d - p, 0.0)
        d_dr = tl.where(ok_d & (cols + 1 < W), p_dr - p, 0.0)
        d_dl = tl.where(ok_d & (cols >= 1), p_dl - p, 0.0)
        lh = tl.load(coef_ptr + 5)
        lv = tl.load(coef_ptr + 6)
        ld = tl.load(coef_ptr + 7)
        s = (lh * tl.sum(tl.sum(d_r * d_r, axis=1), axis=0)
             + lv * tl.sum(tl.sum(d_d * d_d, axis=1), axis=0)
             + ld * tl.sum(tl.sum(d_dr * d_dr + d_dl * d_dl, axis=1), axis=0))
        tl.store(part_ptr + (n * n_rb + rb) * n_wb + wb, s)
        if WRITE_GRAD:
            i_prev = tl.maximum(ii - 1, 0)
            first_r = ii == 0
            p_ar = _load_p(xbase, r_lo, c1, sxh, sxw, in_c & (r_lo >= 0), CT)
            p_ar_r = _shift1(p_ar, _load_p(xbase, r_lo, c_hi, sxh, sxw, (r_lo >= 0) & (c_hi < W), CT), BLOCK_W, 1)
            p_ar_l = _shift1(p_ar, _load_p(xbase, r_lo, c_lo, sxh, sxw, (r_lo >= 0) & (c_lo >= 0), CT), BLOCK_W, -1)
            p_u = _shift_rows(p, p_ar, i_prev, first_r)
            p_ul = _shift_rows(p_l, p_ar_l, i_prev, first_r)
            p_ur = _shift_rows(p_r, p_ar_r, i_prev, first_r)
            ok_u = inside & (rows >= 1)
            d_l = tl.where(inside & (cols >= 1), p_l - p, 0.0)
            d_u = tl.where(ok_u, p_u - p, 0.0)
            d_ul = tl.where(ok_u & (cols >= 1), p_ul - p, 0.0)
            d_ur = tl.where(ok_u & (cols + 1 < W), p_ur - p, 0.0)
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
        xm = tl.where(inside, x, float("-inf"))
        r_max, r_arg = tl.max(xm, axis=1, return_indices=True, return_indices_tie_break_left=True)
        r_off = (n * n_wb + wb) * H + r1
        tl.store(rmax_ptr + r_off, r_max, mask=in_r)
        tl.store(rarg_ptr + r_off, (r_arg + wb * BLOCK_W).to(tl.int32), mask=in_r)
        c_max, c_arg = tl.max(xm, axis=0, return_indices=True, return_indices_tie_break_left=True)
        c_off = (n * n_rb + rb) * W + c1
        tl.store(cmax_ptr + c_off, c_max, mask=in_c)
        tl.store(carg_ptr + c_off, (c_arg + rb * BLOCK_H).to(tl.int32), mask=in_c)


@triton.jit
def _bce_with_logits(s, lab):
    """BCE-with-logits of score s against label lab; log1p by a series for tiny terms."""
    z = tl.exp(-tl.abs(s))
    log1p_z = tl.where(z < 1e-4, z * (1.0 - 0.5 * z), tl.log(1.0 + z))
    return tl.maximum(s, 0.0) - s * lab + log1p_z


@triton.jit
def _reduce_bags(
    g_ptr, max_ptr, arg_ptr, lab_ptr, slab, sp_arg_ptr, sp_d_ptr, sp_old_ptr,
    L, n_part, mil_coef, inv_bags, g_stride_bag, g_stride_arg, g_img,
    WRITE_GRAD: tl.constexpr, CT: tl.constexpr, P_PART: tl.constexpr, BLOCK: tl.constexpr,
):
    """Bags of one kind (rows or columns) of one image: partials [n_part, L] -> the sum of
    their BCE terms. The tiles' partials are visited P_PART at a time, in tile order, and
    a later tile's maximum replaces the running one only when it is strictly larger: the
    first argmax of the whole bag is kept. With a gradient, adds ``mil_coef * dmil/dbag``
    at each bag's argmax (g at bag * g_stride_bag + arg * g_stride_arg) and keeps per bag
    the argmax, ``dmil/dbag`` (times 1 / bags) and the value the pixel held before."""
    k = tl.arange(0, P_PART)[:, None]
    acc = tl.zeros([BLOCK], dtype=CT)
    for l0 in range(0, L, BLOCK):
        l1 = l0 + tl.arange(0, BLOCK)
        l_ok = l1 < L
        s = tl.full([BLOCK], float("-inf"), CT)
        arg = tl.zeros([BLOCK], dtype=tl.int32)
        for k0 in range(0, n_part, P_PART):
            ok = (k0 + k < n_part) & l_ok[None, :]
            off = (k0 + k) * L + l1[None, :]
            v = tl.load(max_ptr + off, mask=ok, other=float("-inf"))
            a = tl.load(arg_ptr + off, mask=ok, other=0)
            s_k, which = tl.max(v, axis=0, return_indices=True, return_indices_tie_break_left=True)
            arg_k = tl.sum(tl.where(k == which[None, :], a, 0), axis=0)
            take = (s_k > s) | (k0 == 0)
            arg = tl.where(take, arg_k, arg)
            s = tl.where(take, s_k, s)
        lab = tl.load(lab_ptr + l1 * slab, mask=l_ok, other=0).to(CT)
        s = tl.where(l_ok, s, 0.0)
        acc += tl.where(l_ok, _bce_with_logits(s, lab), 0.0)
        if WRITE_GRAD:
            ptr = g_ptr + g_img + l1.to(tl.int64) * g_stride_bag + arg.to(tl.int64) * g_stride_arg
            # sigmoid(s) - lab, without the cancellation of a confident bag
            dbag = ((1.0 - lab) * _sigmoid(s) - lab * _sigmoid(-s)) * inv_bags
            old = tl.load(ptr, mask=l_ok, other=0.0).to(CT)
            tl.store(ptr, (old + dbag * mil_coef).to(g_ptr.dtype.element_ty), mask=l_ok)
            tl.store(sp_arg_ptr + l1, arg, mask=l_ok)
            tl.store(sp_d_ptr + l1, dbag, mask=l_ok)
            tl.store(sp_old_ptr + l1, old, mask=l_ok)
    return tl.sum(acc, axis=0)


@triton.jit
def _bags_kernel(
    g_ptr, lab_ptr, slab_n, slab_l,
    rmax_ptr, rarg_ptr, cmax_ptr, carg_ptr,
    sp_arg_ptr, sp_d_ptr, sp_old_ptr,
    img_ptr, part_ptr, n_parts, ticket_ptr, mil_ptr, smooth_ptr,
    N, H, W, n_rb, n_wb, coef_ptr,
    HAS_MIL: tl.constexpr, HAS_SMOOTH: tl.constexpr, WRITE_GRAD: tl.constexpr, CT: tl.constexpr,
    P_PART: tl.constexpr, BLOCK: tl.constexpr, RBLOCK: tl.constexpr,
):
    """One image's bags: img[n] = the sum of its row and column BCE terms; sp_*: [N, H + W]
    (rows, then columns). The last program to take a ticket writes mil (mean over the
    bags) and smooth (the sum of the per-tile parts) and puts the ticket counter back to 0."""
    n = tl.program_id(0).to(tl.int64)
    if HAS_MIL:
        mil_coef = tl.load(coef_ptr + 8)
        inv_bags = tl.load(coef_ptr + 4)
        g_img = n * H * W
        b_img = n * (H + W)
        lab = lab_ptr + n * slab_n
        s_r = _reduce_bags(g_ptr, rmax_ptr + n * n_wb * H, rarg_ptr + n * n_wb * H, lab, slab_l,
                           sp_arg_ptr + b_img, sp_d_ptr + b_img, sp_old_ptr + b_img,
                           H, n_wb, mil_coef, inv_bags, W, 1, g_img, WRITE_GRAD, CT, P_PART, BLOCK)
        tl.debug_barrier()
        s_c = _reduce_bags(g_ptr, cmax_ptr + n * n_rb * W, carg_ptr + n * n_rb * W, lab + H * slab_l, slab_l,
                           sp_arg_ptr + b_img + H, sp_d_ptr + b_img + H, sp_old_ptr + b_img + H,
                           W, n_rb, mil_coef, inv_bags, 1, W, g_img, WRITE_GRAD, CT, P_PART, BLOCK)
        tl.store(img_ptr + n, s_r + s_c)
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
    if ticket == N - 1:                                   # every other image is done
        mil = tl.zeros([RBLOCK], dtype=CT)
        if HAS_MIL:
            for i0 in range(0, N, RBLOCK):
                i1 = i0 + tl.arange(0, RBLOCK)
                mil += tl.load(img_ptr + i1, mask=i1 < N, other=0.0, cache_modifier=".cg")
        tl.store(mil_ptr, tl.sum(mil, axis=0) * tl.load(coef_ptr + 4))
        sm = tl.zeros([RBLOCK], dtype=CT)
        if HAS_SMOOTH:
            for i0 in range(0, n_parts, RBLOCK):
                i1 = i0 + tl.arange(0, RBLOCK)
                sm += tl.load(part_ptr + i1, mask=i1 < n_parts, other=0.0, cache_modifier=".cg")
        tl.store(smooth_ptr, tl.sum(sm, axis=0))
        tl.atomic_xchg(ticket_ptr, 0, sem="relaxed", scope="gpu")


@triton.jit
def _backward_kernel(
    g_ptr, gm_ptr, gs_ptr, state_ptr, new_state_ptr, coef_ptr,
    sp_arg_ptr, sp_d_ptr, sp_old_ptr, H, W,
    HAS_MIL: tl.constexpr, HAS_SMOOTH: tl.constexpr, CT: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """g holds ``a_cur * dmil + b_cur * dsmooth`` (state = (a_cur, b_cur)); make it
    ``gm * dmil + gs * dsmooth`` in place, or return at once when it already is."""
    a_cur = tl.load(state_ptr)
    b_cur = tl.load(state_ptr + 1)
    gm = a_cur
    gs = b_cur
    if HAS_MIL:
        gm = tl.load(gm_ptr).to(CT)
    if HAS_SMOOTH:
        gs = tl.load(gs_ptr).to(CT)
    first = (tl.program_id(0) == 0) & (tl.program_id(1) == 0) & (tl.program_id(2) == 0)
    if first:
        tl.store(new_state_ptr, gm)
        tl.store(new_state_ptr + 1, gs)
    if (gm != a_cur) | (gs != b_cur):
        n = tl.program_id(0).to(tl.int64)
        r1 = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
        c1 = (tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)).to(tl.int64)
        rows = r1[:, None]
        cols = c1[None, :]
        in_r = r1 < H
        in_c = c1 < W
        inside = in_r[:, None] & in_c[None, :]
        ptr = g_ptr + (n * H + rows) * W + cols
        g = tl.load(ptr, mask=inside, other=0.0).to(CT)
        if HAS_SMOOTH:
            # b_cur == 0 (an earlier backward with a zero smoothness weight) kept no
            # smoothness gradient to rescale: NaN unless it is still asked to be 0
            zero_g = tl.where(gs == 0.0, 0.0, float("nan"))
            scale = tl.where(b_cur == 0.0, zero_g, gs / tl.where(b_cur == 0.0, 1.0, b_cur))
            out = g * scale
        else:
            out = g
        if HAS_MIL:
            b_img = n * (H + W)
            ra = tl.load(sp_arg_ptr + b_img + r1, mask=in_r, other=-1)
            rd = tl.load(sp_d_ptr + b_img + r1, mask=in_r, other=0.0)
            ro = tl.load(sp_old_ptr + b_img + r1, mask=in_r, other=0.0)
            ca = tl.load(sp_arg_ptr + b_img + H + c1, mask=in_c, other=-1)
            cd = tl.load(sp_d_ptr + b_img + H + c1, mask=in_c, other=0.0)
            co = tl.load(sp_old_ptr + b_img + H + c1, mask=in_c, other=0.0)
            is_r = cols == ra[:, None].to(tl.int64)
            is_c = rows == ca[None, :].to(tl.int64)
            old = tl.where(is_r, ro[:, None], co[None, :])   # the pixel before any MIL term
            dm = tl.where(is_r, rd[:, None], 0.0) + tl.where(is_c, cd[None, :], 0.0)
            if HAS_SMOOTH:
                k = gs / tl.load(coef_ptr + 9)
                exact = k * old + gm * dm
            else:
                exact = gm * dm
            out = tl.where(is_r | is_c, exact, out)
        tl.store(ptr, out.to(g_ptr.dtype.element_ty), mask=inside)


#: The tile shapes the launcher uses on a GPU, 2,048 elements each (8 warps): 16 x 128 for maps
#: wider than 64 pixels, 32 x 64 up to 64, 64 x 32 up to 32. A finite set, so that every
#: configuration the launcher can choose is compiled ahead by tests/test_triton_compile.py.
GPU_TILES: tuple[tuple[int, int], ...] = ((16, 128), (32, 64), (64, 32))
#: Bag reduction: tiles' partials visited P_PART at a time, bags BAGS_BLOCK at a time, the
#: final sums REDUCE_BLOCK at a time (on a GPU; the interpreter takes larger blocks).
P_PART = 8
BAGS_BLOCK, REDUCE_BLOCK = 128, 256


def tile_shape(h: int, w: int, on_gpu: bool) -> tuple[int, int]:
    """Tile shape (BLOCK_H, BLOCK_W). GPU: one of :data:`GPU_TILES` by the map's width
    (untuned: no GPU measured yet). Interpreter: the whole map in one tile (up to 2**20
    elements; the interpreter pays per program, not per element)."""
    if on_gpu:
        bw = min(max(triton.next_power_of_2(w), 32), 128)
        return 2048 // bw, bw
    bw = min(triton.next_power_of_2(w), 1024)
    return min(triton.next_power_of_2(h), max(1, (1 << 20) // bw)), bw


def tile_warps(block_h: int, block_w: int) -> int:
    return 8 if block_h * block_w >= 2048 else 4


def bags_blocks(h: int, w: int) -> tuple[int, int]:
    """(BLOCK, RBLOCK) of the bags kernel: fixed on a GPU, the whole map in the interpreter."""
    if INTERPRETED:
        return min(triton.next_power_of_2(max(h, w)), 1024), 1024
    return BAGS_BLOCK, REDUCE_BLOCK


#: Coefficient tensors by (values, dtype, device), never evicted: a captured CUDA graph may
#: point to any of them, so none is ever freed or replaced.
_coefs: dict[tuple, torch.Tensor] = {}


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _coef_tensor(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The kernels' float coefficients as a device tensor in the compute dtype (Triton
    passes Python floats as float32, too coarse for float64 maps). A training loop asks
    for the same few, so the host-to-device copy (a synchronisation) happens once each,
    and never inside a CUDA-graph capture: there a coefficient set not seen before is an
    error (run the call once before capturing it)."""
    key = (values, dtype, device)
    t = _coefs.get(key)
    if t is None:
        if _capturing(device):
            raise RuntimeError("MIL/smoothness Triton kernels: these shapes and weights were not run before the "
                               "CUDA-graph capture; run the same call once eagerly first (its coefficients need a "
                               "host-to-device copy, which a capture cannot hold)")
        t = _coefs[key] = torch.tensor(values, dtype=dtype).to(device)
    return t


_tickets: dict[tuple, torch.Tensor] = {}


def _stream_key(device: torch.device) -> tuple:
    """The device and the stream a launch goes to (CPU: the device alone)."""
    if device.type == "cuda":
        return device, torch.cuda.current_stream(device).cuda_stream
    return device, 0


def _ticket(device: torch.device) -> torch.Tensor:
    """The bags kernel's ticket counter: zeroed once, put back to 0 by every launch.

    One per stream of ``device``: launches on one stream run one after the other, and
    launches on two streams never share a counter. Inside a CUDA-graph capture, a counter
    of the graph's own (allocated in its memory pool, zeroed by a node of the graph), so a
    replay shares it with no eager launch; replay one graph on one stream at a time."""
    if _capturing(device):
        return torch.zeros(1, dtype=torch.int32, device=device)
    key = _stream_key(device)
    t = _tickets.get(key)
    if t is None:
        t = _tickets[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return t


class _Launch:
    """What one forward launch leaves for the backward."""

    __slots__ = ("g", "sparse", "coef", "grid", "blocks", "hw", "flags")


def _launch(logits, labels, has_mil, has_smooth, grad_weights, block_h=None, block_w=None):
    """Forward kernels (1) and (2). Returns ``(mil, smooth, launch)``; ``launch.g`` is
    ``a * dmil/dlogits + b * dsmooth/dlogits`` for ``grad_weights=(a, b)`` ([N, H, W],
    logits' dtype) or None without a gradient."""
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
    bh, bw = tile_shape(h, w, dev.type == "cuda" and not INTERPRETED)
    bh, bw = block_h or bh, block_w or bw
    n_rb, n_wb = triton.cdiv(h, bh), triton.cdiv(w, bw)
    write_grad = grad_weights is not None
    a, b = grad_weights if write_grad else (0.0, 0.0)
    lwh, lwv, lwd = smooth_weights(n, h, w)
    n_bags = mil_bag_count(n, h, w)
    coef = _coef_tensor((2.0 * b * lwh, 2.0 * b * lwv, 2.0 * b * lwd, 0.0, 1.0 / n_bags,
                         lwh, lwv, lwd, float(a), float(b)), ct_torch, dev)
    g = torch.empty((n, h, w), dtype=logits.dtype, device=dev) if write_grad else x
    parts = torch.empty((n, n_rb, n_wb), dtype=ct_torch, device=dev)
    if has_mil:
        lab = labels.view(torch.uint8) if labels.dtype == torch.bool else labels
        rmax = torch.empty((n, n_wb, h), dtype=ct_torch, device=dev)
        rarg = torch.empty((n, n_wb, h), dtype=torch.int32, device=dev)
        cmax = torch.empty((n, n_rb, w), dtype=ct_torch, device=dev)
        carg = torch.empty((n, n_rb, w), dtype=torch.int32, device=dev)
        img = torch.empty((n,), dtype=ct_torch, device=dev)
    else:
        lab = rmax = rarg = cmax = carg = img = parts
    _tile_kernel[(n, n_rb, n_wb)](
        x, x.stride(0), x.stride(1), x.stride(2),
        g, parts, rmax, rarg, cmax, carg,
        h, w, n_rb, n_wb, coef,
        HAS_MIL=has_mil, HAS_SMOOTH=has_smooth, WRITE_GRAD=write_grad,
        CT=ct, BLOCK_H=bh, BLOCK_W=bw,
        num_warps=tile_warps(bh, bw),
    )
    sparse = None
    if write_grad and has_mil:
        sparse = (torch.empty((n, h + w), dtype=torch.int32, device=dev),
                  torch.empty((n, h + w), dtype=ct_torch, device=dev),
                  torch.empty((n, h + w), dtype=ct_torch, device=dev))
    sp = sparse or (parts, parts, parts)
    mil = torch.empty((), dtype=ct_torch, device=dev)
    smooth = torch.empty((), dtype=ct_torch, device=dev)
    block, rblock = bags_blocks(h, w)
    _bags_kernel[(n,)](
        g, lab, lab.stride(0) if has_mil else 0, lab.stride(1) if has_mil else 0,
        rmax, rarg, cmax, carg, *sp,
        img, parts, n * n_rb * n_wb, _ticket(dev), mil, smooth,
        n, h, w, n_rb, n_wb, coef,
        HAS_MIL=has_mil, HAS_SMOOTH=has_smooth, WRITE_GRAD=write_grad, CT=ct,
        P_PART=P_PART, BLOCK=block, RBLOCK=rblock,
        num_warps=4,
    )
    launch = _Launch()
    launch.g = g if write_grad else None
    launch.sparse, launch.coef = sparse, coef
    launch.grid, launch.blocks, launch.hw = (n, n_rb, n_wb), (bh, bw), (h, w)
    launch.flags = (has_mil, has_smooth, ct)
    return mil, smooth, launch


def _as_labels(logits: torch.Tensor, labels: torch.Tensor | None, has_mil: bool) -> torch.Tensor | None:
    """Checks the logits; compact bag labels [N, H + W] from compact labels or a dense
    [N, 1, H, W] mask (None without MIL)."""
    if has_mil and labels is not None and labels.dim() == 4:
        check_inputs(logits, labels)
        return bag_labels(labels)
    check_inputs(logits, None)
    if not has_mil:
        return None
    check_bag_labels(labels, logits)
    return labels


def mil_smooth_forward(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    has_mil: bool,
    has_smooth: bool,
    grad_weights: tuple[float, float] | None,
    block_h: int | None = None,
    block_w: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the forward kernels: ``(mil, smooth, G or None)``.

    logits: [N, 1, H, W] float32/float64/bfloat16/float16, any strides; labels: bag labels
    uint8/bool [N, H + W] (rows, then columns) or a dense {0, 1} mask [N, 1, H, W] (None
    without MIL). ``grad_weights=(a, b)`` also returns ``a * dmil/dlogits + b *
    dsmooth/dlogits`` ([N, 1, H, W], logits' dtype). ``block_h``/``block_w`` (powers of
    two) override the tile shape.
    """
    labels = _as_labels(logits, labels, has_mil)
    mil, smooth, launch = _launch(logits, labels, has_mil, has_smooth, grad_weights, block_h, block_w)
    return mil, smooth, (launch.g.unsqueeze(1) if launch.g is not None else None)


def _backward(launch: _Launch, state: torch.Tensor, g_mil: torch.Tensor, g_smooth: torch.Tensor) -> torch.Tensor:
    """Kernel (3): launch.g becomes ``g_mil * dmil + g_smooth * dsmooth`` in place (nothing
    moves when it already is); returns the new device state (the weights g now holds)."""
    has_mil, has_smooth, ct = launch.flags
    h, w = launch.hw
    new_state = torch.empty(2, dtype=state.dtype, device=state.device)
    sp = launch.sparse or (state, state, state)
    _backward_kernel[launch.grid](
        launch.g, g_mil, g_smooth, state, new_state, launch.coef, *sp, h, w,
        HAS_MIL=has_mil, HAS_SMOOTH=has_smooth, CT=ct,
        BLOCK_H=launch.blocks[0], BLOCK_W=launch.blocks[1],
        num_warps=tile_warps(*launch.blocks),
    )
    return new_state


class TritonMilSmoothFunction(torch.autograd.Function):
    """(mil, smooth) = f(logits, bag labels) by the Triton kernels; three launches per
    forward + backward, no host synchronisation.

    The forward writes ``G = a * dmil + b * dsmooth`` for the caller's weights
    ``grad_weights=(a, b)`` (a zero weight on a term in use is replaced by 1, so that the
    term's gradient is kept). The backward hands G back: untouched when the upstream
    gradients are ``(a, b)`` (decided on the device by kernel (3), which then moves
    nothing), else rewritten in place for the upstream ones (any weighting, exact at the
    argmax pixels). Caveats of the in-place buffer: a later backward through a retained
    graph rewrites the gradient an earlier one returned (a leaf's ``.grad`` is a copy and
    is safe), and after a backward with a zero smoothness upstream gradient a later one
    with a non-zero one through the same graph gives NaN (the term was not kept).
    """

    @staticmethod
    def forward(ctx, logits, labels, has_mil, has_smooth, grad_weights, blocks):
        need_grad = ctx.needs_input_grad[0]
        a, b = grad_weights
        weights = (a if a != 0.0 or not has_mil else 1.0, b if b != 0.0 or not has_smooth else 1.0)
        mil, smooth, launch = _launch(logits, labels, has_mil, has_smooth,
                                      weights if need_grad else None, *(blocks or (None, None)))
        if need_grad:
            ctx.launch = launch
            ctx.state = launch.coef[_C_A:_C_B + 1]
        return mil, smooth

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_mil, g_smooth):
        launch = ctx.launch
        ctx.state = _backward(launch, ctx.state, g_mil, g_smooth)
        return launch.g.unsqueeze(1), None, None, None, None, None


def mil_smooth_loss_triton(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    has_mil: bool = True,
    has_smooth: bool = True,
    grad_weights: tuple[float, float] = (1.0, 1.0),
    blocks: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mil, smooth) through :class:`TritonMilSmoothFunction`. ``labels``: bag labels
    uint8/bool [N, H + W] or a dense mask [N, 1, H, W] (turned into bag labels first);
    ``blocks=(block_h, block_w)`` overrides the tile shape (bench/mil_kernel.py's sweep)."""
    lab = _as_labels(logits, labels, has_mil)
    return TritonMilSmoothFunction.apply(logits, lab, has_mil, has_smooth, tuple(map(float, grad_weights)), blocks)
