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


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.LeakyReLU(0.1), nn.Linear(hidden, dim))


class WeightTransfer(nn.Module):
    """Maps weak-head conv weights to transferred-head conv weights, per output channel.

    w1: [M, C, 1, 1] -> [M, C, 1, 1] (each of the M rows through ``mlp1``: C -> H1 -> C);
    w2: [1, M, 1, 1] -> [1, M, 1, 1] (the single row through ``mlp2``: M -> H2 -> M).
    """

    def __init__(self, in_channels: int, mid_channels: int, hidden: int = 0):
        super().__init__()
        self.mlp1 = _mlp(in_channels, hidden or in_channels)
        self.mlp2 = _mlp(mid_channels, hidden or mid_channels)

    def forward(self, w1: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, c = w1.shape[:2]
        t1 = self.mlp1(w1.reshape(m, c)).reshape_as(w1)
        t2 = self.mlp2(w2.reshape(w2.shape[0], -1)).reshape_as(w2)
        return t1, t2


class TransferredHead(nn.Module):
    """The transferred head: own BN and biases, conv weights given at call time."""

    def __init__(self, mid_channels: int):
        super().__init__()
        self.bias1 = nn.Parameter(torch.zeros(mid_channels))
        self.bn = nn.BatchNorm2d(mid_channels)
        self.bias2 = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(F.conv2d(x, w1.to(x.dtype), self.bias1.to(x.dtype))))
        return F.conv2d(h, w2.to(h.dtype), self.bias2.to(h.dtype))
