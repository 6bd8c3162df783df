"""The three heads of BoxCaseg and the weight-transfer MLPs.

Every head has one shape: 1x1 conv (C -> M), BN, ReLU, 1x1 conv (M -> 1).
The transferred head owns its BN and conv biases; its two conv weight tensors are
*produced* from the detached weak-head conv weights by :class:`WeightTransfer`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SegHead(nn.Module):
    """x: [N, C, h, w] -> logits [N, 1, h, w]."""

    def __init__(self, in_channels: int, mid_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 1)
        self.bn = nn.BatchNorm2d(mid_channels)
        self.conv2 = nn.Conv2d(mid_channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.bn(self.conv1(x))))


def _mlp(dim: int, hidden: int, init_std: float = 0.0) -> nn.Sequential:
    mlp = nn.Sequential(nn.Linear(dim, hidden), nn.LeakyReLU(0.1), nn.Linear(hidden, dim))
    if init_std > 0:
        for layer in (mlp[0], mlp[2]):
            nn.init.normal_(layer.weight, std=init_std)
            nn.init.normal_(layer.bias, std=init_std)
    return mlp


TRANSFER_VARIANTS = ("ours", "published")


class WeightTransfer(nn.Module):
    """Maps weak-head conv weights to transferred-head conv weights, per output channel.

    w1: [M, C, 1, 1] -> [M, C, 1, 1] (each of the M rows through ``mlp1``: C -> H1 -> C);
    w2: [1, M, 1, 1] -> [1, M, 1, 1] (the single row through ``mlp2``: M -> H2 -> M).

    ``variant="ours"``: hidden width = input width, PyTorch's default init.
    ``variant="published"`` (the authors' code): hidden width 4x the input, weights and
    biases drawn from N(0, 0.01). ``hidden`` > 0 overrides the width of either.
    """

    def __init__(self, in_channels: int, mid_channels: int, hidden: int = 0, variant: str = "ours"):
        super().__init__()
        widen, std = (4, 0.01) if variant == "published" else (1, 0.0)
        self.mlp1 = _mlp(in_channels, hidden or widen * in_channels, std)
        self.mlp2 = _mlp(mid_channels, hidden or widen * mid_channels, std)

    def forward(self, w1: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, c = w1.shape[:2]
        t1 = self.mlp1(w1.reshape(m, c)).reshape_as(w1)
        t2 = self.mlp2(w2.reshape(w2.shape[0], -1)).reshape_as(w2)
        return t1, t2


class TransferredHead(nn.Module):
    """The transferred head: own BN, conv weights given at call time.

    Its conv biases are its own (``bias1`` [M], ``bias2`` [1]) or, with
    ``bias_from_weak=True`` (the authors' code), transferred like the weights:
    ``k * b_weak + b`` with one learnt scalar pair per conv (k = 1, b = 0 at start).
    """

    def __init__(self, mid_channels: int, bias_from_weak: bool = False):
        super().__init__()
        self.bias_from_weak = bool(bias_from_weak)
        if self.bias_from_weak:
            self.bias_k = nn.Parameter(torch.ones(2))
            self.bias_b = nn.Parameter(torch.zeros(2))
            self.bn = nn.BatchNorm2d(mid_channels)
        else:  # this order keeps the parameter order (optimizer state) of earlier checkpoints
            self.bias1 = nn.Parameter(torch.zeros(mid_channels))
            self.bn = nn.BatchNorm2d(mid_channels)
            self.bias2 = nn.Parameter(torch.zeros(1))

    def biases(self, weak_b1: torch.Tensor, weak_b2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Conv biases [M], [1] given the (detached) weak-head biases."""
        if not self.bias_from_weak:
            return self.bias1, self.bias2
        return (self.bias_k[0] * weak_b1 + self.bias_b[0], self.bias_k[1] * weak_b2 + self.bias_b[1])

    def forward(self, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(F.conv2d(x, w1.to(x.dtype), b1.to(x.dtype))))
        return F.conv2d(h, w2.to(h.dtype), b2.to(h.dtype))
