"""Image loading and the one crop-and-resize (the normalisation is :mod:`boxcaseg.imageops`'s).

Files become RGB in :mod:`boxcaseg.images` (``open_rgb``, re-exported here for the readers)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from boxcaseg.imageops import MEAN
from boxcaseg import images
from boxcaseg.images import open_rgb  # noqa: F401 - the readers' import

MEAN_RGB255 = tuple(int(round(m * 255)) for m in MEAN)  # fill colour for padding


def read_rgb(path: str | Path, image_id=None, size: tuple[int, int] | None = None) -> np.ndarray:
    """An image file as [H, W, 3] uint8 RGB (:func:`boxcaseg.images.read_rgb`: the one pixel
    rule); errors name the file and the image id. ``size``: the (width, height) its json
    records (picks the frame, see :mod:`boxcaseg.images`)."""
    where = f" (image id {image_id})" if image_id is not None else ""
    return images.read_rgb(path, "image", size, where)


def crop_resize(img: Image.Image, region, size: int, fill=None) -> Image.Image:
    """Crop ``region`` (``xyxy``, float or int pixel edges) and resize it to size x size.

    The one resize of the package, used alike by training patches (jittered float boxes),
    salient box crops (image and mask) and proxy crops (integer windows): PIL's bilinear
    filter, antialiased when shrinking, straight from the source region. Parts of the
    region outside the image are ``fill`` (the mean colour for RGB, 0 for masks).
    """
    x0, y0, x1, y1 = (float(v) for v in region)
    W, H = img.size
    if fill is None:
        fill = MEAN_RGB255 if img.mode == "RGB" else 0
    if x0 >= 0 and y0 >= 0 and x1 <= W and y1 <= H:
        return img.resize((size, size), Image.BILINEAR, box=(x0, y0, x1, y1))
    # pad onto a canvas covering the region's whole-pixel envelope, then resize from it
    ex0, ey0 = math.floor(x0), math.floor(y0)
    ex1, ey1 = max(ex0 + 1, math.ceil(x1)), max(ey0 + 1, math.ceil(y1))
    canvas = Image.new(img.mode, (ex1 - ex0, ey1 - ey0), fill)
    ix0, iy0, ix1, iy1 = max(ex0, 0), max(ey0, 0), min(ex1, W), min(ey1, H)
    if ix1 > ix0 and iy1 > iy0:
        canvas.paste(img.crop((ix0, iy0, ix1, iy1)), (ix0 - ex0, iy0 - ey0))
    if (ex0, ey0, ex1, ey1) == (x0, y0, x1, y1):
        return canvas.resize((size, size), Image.BILINEAR)
    return canvas.resize((size, size), Image.BILINEAR, box=(x0 - ex0, y0 - ey0, x1 - ex0, y1 - ey0))

