"""Pieces shared by the fast paths of the MIL + smoothness loss: checks, weights, fused autograd.
The fast paths are checked against :mod:`boxcaseg.kernels.mil_smooth_reference` (tests/test_kernels.py).

The fused op computes, for ``logits [N, 1, H, W]`` and ``box_mask [N, 1, H, W]``:

- ``mil``: mean BCE-with-logits over the N*(H+W) row and column bags (bag score = max
  logit along the bag, label = max of the mask along it);
- ``smooth``: the 8-neighbour smoothness of ``p = sigmoid(logits)``. The offsets
  (dy, dx) and (-dy, -dx) see the same unordered pixel pairs, so the mean of the 8
  per-offset means is ``sum_d S_d / (4 * count_d)`` over the four directions
  d = horizontal, vertical, diagonal, anti-diagonal, with ``S_d`` the sum of squared
  differences over the ``count_d = N * pairs_d`` pairs of that direction (0 when the
  map has no such pair, as in the reference);
- when asked, the gradient ``G = a * dmil/dlogits + b * dsmooth/dlogits`` for chosen
  weights (a, b), in the same pass (the Liger-Kernel trick: forward writes the
  gradient, backward hands it back, scaled only when the upstream gradients are not
  the expected ``c * (a, b)``).

MIL ties: a bag's gradient goes to the **first** position of its maximum (lowest x
for a row, lowest y for a column), as ``torch.argmax``/``torch.max(dim)`` pick it.
``torch.amax``'s gradient (used by the reference) splits it evenly among ties
instead; the two agree whenever the maximum is unique. NaN logits are not supported
(the bag choice is then unspecified).
"""

from __future__ import annotations

import torch

from boxcaseg.kernels.maps import check_map

#: float dtypes accepted by the fast paths; half types are computed in float32.
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

#: relative tolerance when checking that upstream gradients are proportional to the
#: weights the forward pass used (float32 rounding of e.g. 1.0 * 0.05).
_PROPORTIONAL_RTOL = 1e-6


def check_inputs(logits: torch.Tensor, box_mask: torch.Tensor | None) -> None:
    """Validate shapes and dtypes: logits [N, 1, H, W] float, box_mask same shape."""
    check_map("logits", logits)
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"logits must be one of {SUPPORTED_DTYPES}, got {logits.dtype}")
    if box_mask is not None:
        check_map("box_mask", box_mask)
        if box_mask.shape != logits.shape:
            raise ValueError(f"box_mask {tuple(box_mask.shape)} != logits {tuple(logits.shape)}")
        if box_mask.device != logits.device:
            raise ValueError(f"box_mask on {box_mask.device}, logits on {logits.device}")
    if logits.numel() == 0:
        raise ValueError(f"empty logits {tuple(logits.shape)}")


def bag_labels(mask: torch.Tensor) -> torch.Tensor:
    """Compact MIL bag labels of a dense mask: ``uint8 [N, H + W]``, each row's label (1 when
    the row has a non-zero pixel) then each column's. What the reference's
    ``mask.amax`` along a bag gives for a {0, 1} mask."""
    check_map("mask", mask)
    m = mask[:, 0] != 0
    return torch.cat([m.any(dim=2), m.any(dim=1)], dim=1).to(torch.uint8)


def expand_bag_labels(labels: torch.Tensor, h: int, w: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A dense {0, 1} mask [N, 1, H, W] whose row and column maxima are ``labels`` [N, H + W]
    (the outer product of row and column labels). Exact for labels made from any mask:
    a labelled row then always meets a labelled column."""
    rows = labels[:, :h].to(dtype)
    cols = labels[:, h:].to(dtype)
    return (rows[:, :, None] * cols[:, None, :])[:, None]


def check_bag_labels(labels: torch.Tensor | None, logits: torch.Tensor) -> None:
    """Raise unless ``labels`` is uint8/bool [N, H + W] on the logits' device."""
    n, _, h, w = logits.shape
    if labels is None:
        raise ValueError("MIL needs bag labels [N, H + W] or a box mask [N, 1, H, W]")
    if labels.dtype not in (torch.uint8, torch.bool):
        raise TypeError(f"bag labels must be uint8 or bool, got {labels.dtype}")
    if tuple(labels.shape) != (n, h + w):
        raise ValueError(f"bag labels must be [N, H + W] = [{n}, {h + w}] for logits {tuple(logits.shape)}, "
                         f"got {tuple(labels.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"bag labels on {labels.device}, logits on {logits.device}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def smooth_weights(n: int, h: int, w: int) -> tuple[float, float, float]:
    """Loss weights ``1 / (4 * count_d)`` of the horizontal, vertical and diagonal sums.

    Both diagonals share the last weight. A direction without pairs gets weight 0.
    """

    def one(count: int) -> float:
        return 1.0 / (4.0 * count) if count > 0 else 0.0

    return one(n * h * (w - 1)), one(n * (h - 1) * w), one(n * (h - 1) * (w - 1))


def mil_bag_count(n: int, h: int, w: int) -> int:
    return n * (h + w)


def gradient_scale(
    g_mil: torch.Tensor | None,
    g_smooth: torch.Tensor | None,
    a: float,
    b: float,
) -> tuple[float, float, float | None]:
    """Upstream gradients as floats, and c with ``(g_mil, g_smooth) == c * (a, b)``.

    Returns ``(gm, gs, c)``; ``c`` is None when the pair is not proportional to the
    weights the forward pass used (the caller then recomputes the gradient). Calls
    ``.item()`` (a device sync on GPU, as Liger-Kernel's fused losses do).
    """
    gm = 0.0 if g_mil is None else float(g_mil.item())
    gs = 0.0 if g_smooth is None else float(g_smooth.item())
    if a != 0.0:
        c = gm / a
        ok = abs(gs - c * b) <= _PROPORTIONAL_RTOL * max(abs(gs), abs(c * b))
    elif b != 0.0:
        c = gs / b
        ok = gm == 0.0
    else:
        c, ok = 0.0, gm == 0.0 and gs == 0.0
    return gm, gs, (c if ok else None)


def scale_saved_gradient(grad: torch.Tensor, c: float) -> torch.Tensor:
    """``c * grad``, handing ``grad`` back untouched when c == 1 (no extra pass)."""
    if c == 1.0:
        return grad
    return grad * c


def fused_forward(ctx, launch, logits, box_mask, has_mil, has_smooth, grad_weights):
    """Shared ``forward`` of the fused autograd Functions.

    ``launch(logits, box_mask, has_mil, has_smooth, grad_weights or None)`` returns
    ``(mil, smooth, G or None)``. G is made here when logits need a gradient.
    """
    need_grad = ctx.needs_input_grad[0]
    mil, smooth, g = launch(logits, box_mask, has_mil, has_smooth, grad_weights if need_grad else None)
    ctx.flags = (has_mil, has_smooth, grad_weights)
    ctx.launch = launch
    if need_grad:
        ctx.save_for_backward(logits, box_mask if has_mil else None, g)
    return mil, smooth


def fused_backward(ctx, g_mil, g_smooth):
    """Shared ``backward``: the saved G, scaled, or a recomputation with the actual weights."""
    has_mil, has_smooth, (a, b) = ctx.flags
    logits, box_mask, g = ctx.saved_tensors
    gm, gs, c = gradient_scale(g_mil if has_mil else None, g_smooth if has_smooth else None, a, b)
    if c is not None:
        out = scale_saved_gradient(g, c)
    else:
        out = ctx.launch(logits, box_mask, has_mil, has_smooth, (gm, gs))[2]
    return out, None, None, None, None
