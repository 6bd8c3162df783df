"""Backend selection for the MIL and smoothness losses.

Placeholder dispatcher: only the reference backend is wired until the kernels land.
"""

from __future__ import annotations

import torch

from boxcaseg import losses as _losses


def mil_loss(logits: torch.Tensor, box_mask: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    return _losses.mil_loss_reference(logits, box_mask)


def smoothness_loss(logits: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    return _losses.smoothness_loss_reference(logits)
