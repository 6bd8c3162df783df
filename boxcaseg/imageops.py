"""Image tensor ops shared by the data pipeline and the losses: the ImageNet normalisation
(and its inverse) and the sRGB -> CIE-Lab conversion. Imports nothing from the package."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from PIL import Image

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def normalize(img: np.ndarray | Image.Image) -> torch.Tensor:
    """HxWx3 uint8 RGB -> [3, H, W] float32, ImageNet mean/std."""
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def normalize_batch_uint8(x: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] uint8 (or float in 0..255) -> normalised float32 (torch ops)."""
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1) * 255.0
    return (x.float() - mean) / std


def denormalize_batch(x: torch.Tensor) -> torch.Tensor:
    """Normalised [N, 3, H, W] (ImageNet mean/std) -> float32 RGB in 0..1 (the inverse)."""
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return x.float() * std + mean


_RGB_TO_XYZ = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_WHITE_D65 = (0.95047, 1.0, 1.08883)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], [N, 3, H, W] -> CIE-Lab (D65; L in [0, 100]), same shape."""
    rgb = rgb.clamp(0.0, 1.0)
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = torch.tensor(_RGB_TO_XYZ, dtype=rgb.dtype, device=rgb.device)
    xyz = torch.einsum("ij,njhw->nihw", m, lin)
    xyz = xyz / torch.tensor(_WHITE_D65, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    eps = 216.0 / 24389.0
    f = torch.where(xyz > eps, xyz.clamp(min=eps) ** (1.0 / 3.0), (24389.0 / 27.0 * xyz + 16.0) / 116.0)
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)
