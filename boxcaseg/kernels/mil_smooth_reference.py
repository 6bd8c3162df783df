"""Reference formulation of the MIL + smoothness loss (paper Eq. 1-2), straightforward torch: the definition.
It checks every fast path in float64 (tests/test_kernels.py); plain Python loops check it (tests/test_losses.py).

The fast paths: :mod:`~boxcaseg.kernels.mil_smooth_torch`, :mod:`~boxcaseg.kernels.mil_smooth_numba`,
:mod:`~boxcaseg.kernels.mil_smooth_triton`. This module is also the ``"reference"`` backend of
:mod:`boxcaseg.kernels.dispatch`. Maps are ``[N, 1, H, W]``; logits are raw scores.

- :func:`mil_loss_reference`: every row and every column is a bag; bag score = max logit
  along it, bag label = max of the box mask along it; mean BCE-with-logits over N*(H+W)
  bags.
- :func:`smoothness_loss_reference`: p = sigmoid(logits); for each of the 8 neighbour
  offsets the mean of (p - p_neighbour)^2 over pixels whose neighbour lies inside the
  map; the mean of the 8.

The weak map's loss in training is ``mil + SMOOTH_WEIGHT * smooth``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from boxcaseg.kernels.maps import NEIGHBOUR_OFFSETS, check_map, pair_slices

#: The paper's weight of the smoothness term (``mil + 0.05 * smooth``); the fused fast
#: paths make the gradient of that combination in their forward pass by default.
SMOOTH_WEIGHT = 0.05


def mil_loss_reference(logits: torch.Tensor, box_mask: torch.Tensor) -> torch.Tensor:
    """MIL loss, straightforward definition.

    logits: [N, 1, H, W] float; box_mask: [N, 1, H, W] in {0, 1}. Returns a scalar.
    """
    check_map("logits", logits)
    check_map("box_mask", box_mask)
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
    check_map("logits", logits)
    p = torch.sigmoid(logits)
    h, w = p.shape[-2:]
    terms = []
    for dy, dx in NEIGHBOUR_OFFSETS:
        sl = pair_slices(h, w, dy, dx)
        if sl is None:
            terms.append(p.sum() * 0.0)
            continue
        cy, cx, ny, nx = sl
        terms.append(((p[..., cy, cx] - p[..., ny, nx]) ** 2).mean())
    return torch.stack(terms).mean()
