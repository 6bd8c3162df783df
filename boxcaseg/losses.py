"""Reference losses of BoxCaseg (paper Eq. 1-4): the definitions every fast path matches.

All maps are ``[N, 1, H, W]``; logits are raw (pre-sigmoid) scores.

- :func:`mil_loss`: every row and every column is a bag; bag score = max logit along
  it, bag label = max of the box mask along it; mean BCE-with-logits over N*(H+W) bags.
- :func:`smoothness_loss`: p = sigmoid(logits); for each of the 8 neighbour offsets the
  mean of (p - p_neighbour)^2 over pixels whose neighbour lies inside the map; the mean
  of the 8.
- :func:`pixel_loss`: mean BCE-with-logits.
- :func:`boxcaseg_loss`: the training objective
  ``mil(weak) + 0.05 * smooth(weak)`` on every patch ``+ pixel(fused)`` on salient ones.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Backend = Literal["auto", "triton", "numba", "torch", "reference"]

SMOOTH_WEIGHT = 0.05
NEIGHBOUR_OFFSETS: tuple[tuple[int, int], ...] = (
    (-1, -1), (-1, 0), (-1, 1),
    (0, -1),           (0, 1),
    (1, -1),  (1, 0),  (1, 1),
)


def _check_map(name: str, t: torch.Tensor) -> None:
    if t.dim() != 4 or t.shape[1] != 1:
        raise ValueError(f"{name} must be [N, 1, H, W], got {tuple(t.shape)}")


def mil_loss_reference(logits: torch.Tensor, box_mask: torch.Tensor) -> torch.Tensor:
    """MIL loss, straightforward definition.

    logits: [N, 1, H, W] float; box_mask: [N, 1, H, W] in {0, 1}. Returns a scalar.
    """
    _check_map("logits", logits)
    _check_map("box_mask", box_mask)
    if box_mask.shape != logits.shape:
        raise ValueError(f"box_mask {tuple(box_mask.shape)} != logits {tuple(logits.shape)}")
    mask = box_mask.to(logits.dtype)
    row_score = logits.amax(dim=3).flatten(1)   # [N, H]
    col_score = logits.amax(dim=2).flatten(1)   # [N, W]
    row_label = mask.amax(dim=3).flatten(1)
    col_label = mask.amax(dim=2).flatten(1)
    scores = torch.cat([row_score, col_score], dim=1)
    labels = torch.cat([row_label, col_label], dim=1)
    return F.binary_cross_entropy_with_logits(scores, labels, reduction="mean")


def smoothness_loss_reference(logits: torch.Tensor) -> torch.Tensor:
    """8-neighbour smoothness of sigmoid probabilities, straightforward definition.

    logits: [N, 1, H, W] float. Returns a scalar. An offset with no valid pixel pair
    (H or W == 1) contributes 0 to the mean of the 8.
    """
    _check_map("logits", logits)
    p = torch.sigmoid(logits)
    h, w = p.shape[-2:]
    terms = []
    for dy, dx in NEIGHBOUR_OFFSETS:
        ys, ye = max(0, -dy), h - max(0, dy)
        xs, xe = max(0, -dx), w - max(0, dx)
        if ye <= ys or xe <= xs:
            terms.append(p.sum() * 0.0)
            continue
        centre = p[..., ys:ye, xs:xe]
        neigh = p[..., ys + dy:ye + dy, xs + dx:xe + dx]
        terms.append(((centre - neigh) ** 2).mean())
    return torch.stack(terms).mean()


def pixel_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits between ``logits`` and a {0,1} ``mask`` of the same shape."""
    return F.binary_cross_entropy_with_logits(logits, mask.to(logits.dtype), reduction="mean")


def mil_loss(logits: torch.Tensor, box_mask: torch.Tensor, backend: Backend = "auto") -> torch.Tensor:
    """MIL loss (see module docstring), computed by ``backend``.

    backend: ``"reference"`` (this module), ``"torch"`` (plain torch: max over one axis),
    ``"numba"`` (fused CPU kernel), ``"triton"`` (fused Triton kernel; CPU tensors only
    under ``TRITON_INTERPRET=1``) or ``"auto"`` (Triton on CUDA, Numba on CPU, torch
    elsewhere). See :mod:`boxcaseg.kernels.dispatch`. On an exact tie of a bag's maximum
    the fast paths send the gradient to its first position (the reference splits it).
    """
    from boxcaseg.kernels import dispatch

    return dispatch.mil_loss(logits, box_mask, backend)


def smoothness_loss(logits: torch.Tensor, backend: Backend = "auto") -> torch.Tensor:
    """8-neighbour smoothness loss (see module docstring), computed by ``backend``."""
    from boxcaseg.kernels import dispatch

    return dispatch.smoothness_loss(logits, backend)


def boxcaseg_loss(
    weak_logits: torch.Tensor,
    fused_logits: torch.Tensor,
    target: torch.Tensor,
    is_salient: torch.Tensor,
    backend: Backend = "auto",
    smooth_weight: float = SMOOTH_WEIGHT,
) -> dict[str, torch.Tensor]:
    """The joint training loss.

    weak_logits, fused_logits: [N, 1, h, w] (any resolution; upsampled bilinearly to the
    target's); target: [N, 1, H, W] {0,1} (box mask for box patches, pixel mask for
    salient ones); is_salient: [N] bool. Returns a dict with ``loss``, ``loss_mil``,
    ``loss_smooth``, ``loss_pixel``.
    """
    size = target.shape[-2:]
    weak = weak_logits
    if weak.shape[-2:] != size:
        weak = F.interpolate(weak, size=size, mode="bilinear", align_corners=False)
    from boxcaseg.kernels import dispatch

    # One fused pass for both weak-map terms (its gradient is made for this weighting).
    l_mil, l_smooth = dispatch.mil_smooth_loss(weak, target, smooth_weight, backend)
    if bool(is_salient.any()):
        fused = fused_logits[is_salient]
        if fused.shape[-2:] != size:
            fused = F.interpolate(fused, size=size, mode="bilinear", align_corners=False)
        l_pix = pixel_loss(fused, target[is_salient])
    else:
        l_pix = fused_logits.sum() * 0.0
    total = l_mil + smooth_weight * l_smooth + l_pix
    return {"loss": total, "loss_mil": l_mil, "loss_smooth": l_smooth, "loss_pixel": l_pix}
