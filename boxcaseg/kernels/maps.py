"""Conventions shared by every loss on ``[N, 1, H, W]`` maps: the shape check and the 8-neighbourhood.
No reference of its own: checked through its users (tests/test_losses.py loops, tests/test_kernels.py).

Used by the MIL + smoothness family (reference and fast paths) and by the pairwise colour
term of :mod:`boxcaseg.losses`; imports nothing from the rest of the package.
"""

from __future__ import annotations

import torch

#: The 8 neighbour offsets (dy, dx) of a pixel, row by row.
NEIGHBOUR_OFFSETS: tuple[tuple[int, int], ...] = (
    (-1, -1), (-1, 0), (-1, 1),
    (0, -1),           (0, 1),
    (1, -1),  (1, 0),  (1, 1),
)


def check_map(name: str, t: torch.Tensor) -> None:
    """Raise ValueError unless ``t`` is ``[N, 1, H, W]``."""
    if t.dim() != 4 or t.shape[1] != 1:
        raise ValueError(f"{name} must be [N, 1, H, W], got {tuple(t.shape)}")


def pair_slices(h: int, w: int, dy: int, dx: int) -> tuple[slice, slice, slice, slice] | None:
    """Slices (centre y, centre x, neighbour y, neighbour x) of the pairs at offset (dy, dx)
    in an ``h x w`` map; None when the offset leaves no pair."""
    ys, ye = max(0, -dy), h - max(0, dy)
    xs, xe = max(0, -dx), w - max(0, dx)
    if ye <= ys or xe <= xs:
        return None
    return slice(ys, ye), slice(xs, xe), slice(ys + dy, ye + dy), slice(xs + dx, xe + dx)
