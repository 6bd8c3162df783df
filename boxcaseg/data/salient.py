"""Salient-object pairs (DUTS layout: ``images/NAME.jpg`` + ``masks/NAME.png``).

Two views of a pair, chosen per sample:

- *whole image* (the paper's): resize to ``resize`` x ``resize``, random ``patch_size``
  crop;
- *box crop* (with probability ``box_crop``): the object's bounding box (of the mask
  binarised at 128) jittered like a box patch (centre shift U(-shift, shift) * w and *
  h, sides scaled by U(a, b)), cropped (mean-colour padding outside the image) and
  resized to ``patch_size`` -- the view the proxy stage gives the network, where the
  crop is the box itself.

Then a random horizontal flip; the mask is binarised at 128.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from boxcaseg.data.box_patches import jitter_box
from boxcaseg.data.transforms import crop_resize, open_rgb
from boxcaseg.images import read_image
from boxcaseg.imageops import normalize
from boxcaseg.errors import BoxcasegError
from boxcaseg.paths import walk_files

log = logging.getLogger(__name__)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def open_mask(path: Path) -> Image.Image:
    """A mask file as an L image (16-bit and float masks scaled to 0..255), read by
    :func:`boxcaseg.images.read_image` (regular files only, as displayed)."""
    im = read_image(path, "mask")
    try:
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            arr = np.asarray(im, dtype=np.float64)
            hi = arr.max() if arr.size else 0
            arr = arr * (255.0 / hi) if hi > 255 else arr
            return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
        return im.convert("L")
    except Exception as e:  # noqa: BLE001 - a mode Pillow cannot convert
        raise BoxcasegError(f"{path}: unreadable mask ({type(e).__name__}: {e})") from e


def object_box(mask: Image.Image) -> tuple[float, float, float, float] | None:
    """xyxy box (pixel edges) of the mask's pixels >= 128; None for an empty mask."""
    m = np.asarray(mask) >= 128
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    if rows.size == 0:
        return None
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


class SalientDataset(torch.utils.data.Dataset):
    """Item key ``(index, seed)`` or ``index`` -> (image [3,S,S], mask [1,S,S] {0,1}, True)."""

    def __init__(
        self,
        root: str | Path,
        resize: int = 320,
        patch_size: int = 288,
        skip_bad: bool = False,
        box_crop: float = 0.0,
        shift: float = 0.25,
        scale: tuple[float, float] = (0.5, 1.5),
    ):
        root = Path(root)
        img_dir, mask_dir = root / "images", root / "masks"
        if not img_dir.is_dir() or not mask_dir.is_dir():
            raise BoxcasegError(f"{root}: salient folder needs images/ and masks/ subfolders")
        masks = {p.stem: p for p in walk_files(mask_dir, IMAGE_EXTS, recursive=False)}
        pairs, missing = [], []
        for p in walk_files(img_dir, IMAGE_EXTS, recursive=False):
            if p.stem in masks:
                pairs.append((p, masks[p.stem]))
            else:
                missing.append(p.name)
        if missing:
            if not skip_bad:
                raise BoxcasegError(f"{img_dir / missing[0]}: no matching mask in {mask_dir} ({len(missing)} image(s) without mask)")
            log.warning("%s: %d image(s) without a mask skipped (--skip-bad)", root, len(missing))
        if not pairs:
            raise BoxcasegError(f"{root}: no image/mask pairs found")
        self.pairs = pairs
        self.resize = resize
        self.patch_size = patch_size
        if resize < patch_size:
            raise BoxcasegError(f"salient resize {resize} is smaller than the patch size {patch_size}")
        if not 0.0 <= box_crop <= 1.0:
            raise BoxcasegError(f"salient box-crop probability {box_crop} is not in [0, 1]")
        self.box_crop = box_crop
        self.shift = shift
        self.scale = scale

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key):
        idx, seed = key if isinstance(key, tuple) else (key, key)
        rng = np.random.default_rng(seed)
        ip, mp = self.pairs[idx]
        img, mask = open_rgb(ip, "salient image"), open_mask(mp)
        box = None
        if self.box_crop > 0 and rng.random() < self.box_crop:
            if img.size != mask.size:
                mask = mask.resize(img.size, Image.BILINEAR)
            box = object_box(mask)
        if box is not None:
            region = jitter_box(box, rng, self.shift, *self.scale)
            s = self.patch_size
            arr = np.asarray(crop_resize(img, region, s))
            m = (np.asarray(crop_resize(mask, region, s, fill=0)) >= 128).astype(np.float32)
        else:
            img = img.resize((self.resize, self.resize), Image.BILINEAR)
            mask = mask.resize((self.resize, self.resize), Image.BILINEAR)
            top = int(rng.integers(0, self.resize - self.patch_size + 1))
            left = int(rng.integers(0, self.resize - self.patch_size + 1))
            s = self.patch_size
            arr = np.asarray(img)[top:top + s, left:left + s]
            m = (np.asarray(mask)[top:top + s, left:left + s] >= 128).astype(np.float32)
        if rng.random() < 0.5:
            arr, m = arr[:, ::-1], m[:, ::-1]
        return normalize(arr), torch.from_numpy(np.ascontiguousarray(m))[None], True
