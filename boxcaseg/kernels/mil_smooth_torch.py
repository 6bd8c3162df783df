"""Plain-torch fast path of the MIL + smoothness loss (CPU, or GPUs without Triton).
Checked against :mod:`boxcaseg.kernels.mil_smooth_reference` (float64) by tests/test_kernels.py.

Same definition as the reference, written for speed with ordinary autograd:

- MIL: ``max`` over one axis (no pooling windows); its gradient goes to the first
  position of each bag's maximum (see :mod:`boxcaseg.kernels.mil_smooth_common`).
- smoothness: four shifted-slice differences (one per unordered direction) instead of
  eight shifted copies or eight 3x3 convolutions.

Half-precision inputs are upcast to float32 (the loss accumulates in float32). The
functions are ``torch.compile``-friendly (``bench/mil_kernel.py`` compiles
:func:`mil_smooth_loss_torch`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from boxcaseg.kernels.mil_smooth_common import check_inputs, compute_dtype, smooth_weights


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """logits [N, 1, H, W] -> [N, H, W] in the compute dtype (a view when possible)."""
    x = logits[:, 0]
    ct = compute_dtype(logits.dtype)
    return x if x.dtype == ct else x.to(ct)


def mil_loss_torch(logits: torch.Tensor, box_mask: torch.Tensor) -> torch.Tensor:
    """MIL loss. logits, box_mask: [N, 1, H, W]. Returns a float32 (float64) scalar."""
    check_inputs(logits, box_mask)
    x = _upcast(logits)
    m = box_mask[:, 0].to(x.dtype)
    scores = torch.cat([x.max(dim=2).values, x.max(dim=1).values], dim=1)    # [N, H+W]
    labels = torch.cat([m.amax(dim=2), m.amax(dim=1)], dim=1)
    # The N*(H+W) bags are few: float64 keeps sigmoid(s) - label exact for confident bags.
    loss = F.binary_cross_entropy_with_logits(scores.double(), labels.double(), reduction="mean")
    return loss.to(x.dtype)


def smoothness_loss_torch(logits: torch.Tensor) -> torch.Tensor:
    """8-neighbour smoothness of sigmoid(logits). logits: [N, 1, H, W]. Returns a scalar."""
    check_inputs(logits, None)
    p = torch.sigmoid(_upcast(logits))
    n, h, w = p.shape
    wh, wv, wd = smooth_weights(n, h, w)
    dh = p[:, :, 1:] - p[:, :, :-1]
    dv = p[:, 1:, :] - p[:, :-1, :]
    d1 = p[:, 1:, 1:] - p[:, :-1, :-1]
    d2 = p[:, 1:, :-1] - p[:, :-1, 1:]
    return (
        wh * dh.square().sum()
        + wv * dv.square().sum()
        + wd * (d1.square().sum() + d2.square().sum())
    )


def mil_smooth_loss_torch(logits: torch.Tensor, box_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mil, smooth) of one map, sharing the upcast. Same values as the two functions."""
    return mil_loss_torch(logits, box_mask), smoothness_loss_torch(logits)
