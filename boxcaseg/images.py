"""Image files: the one place where a file on disk becomes pixels.

Every reader of images (training, proxy, Segmenter, Mask R-CNN, visualize, the
baselines, the YOLO and salient readers) opens files through :func:`open_rgb` /
:func:`read_rgb` (the network's RGB pixels), :func:`read_image` (masks: Pillow, in their
own mode) or :func:`image_size` (header only), so they agree on what can be read:

- only regular files (a link to one counts): a FIFO or a device named by a json would
  block a reader forever;
- Pillow's own limits hold (``Image.MAX_IMAGE_PIXELS``: a decompression bomb is refused),
  truncated files are errors (``ImageFile.LOAD_TRUNCATED_IMAGES = False``);
- the frame: a photo with an EXIF orientation is stored rotated or mirrored and shown
  upright. Boxes drawn on it (and YOLO labels, normalised to it, as Ultralytics reads
  them) are in the *displayed* frame, which ``ImageOps.exif_transpose`` gives. When the
  annotations say which size they expect (a COCO json's ``width`` / ``height``), the
  frame of that size is used: the displayed one, else the raw one (a tool that ignored
  the orientation recorded the raw size), else it is an error naming the file. When both
  frames have one size (orientations 2-4: mirrored or upside down) the displayed frame is
  taken, as detectron2, Ultralytics and OpenCV read such files.

Every problem is one BoxcasegError line naming the file (and ``where``: the image id).

Pixels: :func:`to_rgb8` is the one rule that turns decoded pixels (a file's, a PIL image's,
a numpy array handed to :class:`~boxcaseg.predictor.Segmenter`) into the network's
[H, W, 3] uint8 RGB:

- 8-bit images are unchanged (Pillow's conversions: palette, CMYK, ``1`` -> RGB; alpha dropped);
- integer images of more bits (16-bit, 32-bit) are scaled by robust bounds: the 0.5 and
  99.5 percentiles of all colour channels together (one pair per image, so the colour
  balance is kept) map to 0 and 255, values outside are clipped; when the two percentiles
  are equal the minimum and maximum are the bounds, and a constant image is all 0;
- float images with every value in [0, 1] (within ``FLOAT_TOL``) are multiplied by 255;
  other float images follow the percentile rule; NaN and infinite pixels count as 0 (an
  image with no finite pixel is refused);
- grey (H x W, or one channel) is repeated in R, G and B; grey + alpha (2 channels) is the
  grey, alpha dropped; RGBA drops alpha; more than 4 channels is an error naming the file.

Values are rounded to the nearest integer (``np.rint``).

Decoders, one per kind of file: Pillow reads the header of every file (sizes, EXIF
orientation, its pixel limits) and decodes the pixels when its modes hold them exactly:
every 8-bit image, and one-channel 16-bit, 32-bit and float TIFF (modes ``I;16``, ``I``,
``F``). Pillow would cut 16-bit colour to 8 bits or cannot read them at all, so:
16-bit PNG files are decoded by OpenCV (``IMREAD_UNCHANGED``, BGR turned to RGB), and TIFF
files with more than one channel of more than 8 bits (16-bit RGB, float RGB, 2 or 5
channels ...) by tifffile (the first page; compressions other than none, deflate and
packbits need the ``imagecodecs`` package). Their EXIF / TIFF orientation is applied as
Pillow applies it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from boxcaseg.errors import BoxcasegError

ImageFile.LOAD_TRUNCATED_IMAGES = False

SWAPPED = (5, 6, 7, 8)  # EXIF orientations that exchange width and height
#: the transposition of each EXIF orientation (as ``ImageOps.exif_transpose``)
TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
             5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_90}
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # Pillow modes of more than 8 bits (one channel)
PERCENTILES = (0.5, 99.5)  # the robust bounds of non-8-bit images
FLOAT_TOL = 1e-6  # a float image within [-tol, 1 + tol] is taken as [0, 1]
MAX_CHANNELS = 4
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


# --------------------------------------------------------------------------- the pixel rule


def channels_error(name: str, channels: int) -> BoxcasegError:
    return BoxcasegError(f"{name}: {channels} channels; an image has 1 (grey), 2 (grey + alpha), "
                         f"3 (RGB) or 4 (RGBA)")


def _to_uint8(a: np.ndarray, name: str) -> np.ndarray:
    """[H, W, C] pixels of any number type -> uint8 by the rule of the module doc."""
    if a.dtype == np.uint8:
        return a
    if a.dtype.kind not in "iuf":
        raise BoxcasegError(f"{name}: pixels of type {a.dtype}; an image holds integers or floats")
    x = a.astype(np.float64)
    if a.dtype.kind == "f":
        finite = np.isfinite(x)
        if not finite.any():
            raise BoxcasegError(f"{name}: no finite pixel (all NaN or infinite)")
        if not finite.all():
            x[~finite] = 0.0
        if x.min() >= -FLOAT_TOL and x.max() <= 1.0 + FLOAT_TOL:
            return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
    lo, hi = np.percentile(x, PERCENTILES)
    if hi <= lo:
        lo, hi = x.min(), x.max()
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.rint(np.clip((x - lo) / (hi - lo) * 255.0, 0.0, 255.0)).astype(np.uint8)


def _pil_8bit_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit PIL mode (L, LA, P, PA, CMYK, RGBA, 1 ...) -> RGB by Pillow, alpha dropped."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        return img.convert("RGBA").convert("RGB")
    return img.convert("RGB")


def to_rgb8(pixels: Any, name: str = "image") -> np.ndarray:
    """The one pixel rule (module doc): decoded pixels -> [H, W, 3] uint8 RGB.

    ``pixels``: a PIL image (any mode) or an array [H, W] or [H, W, C] (C = 1..4, channels
    in R, G, B, A order) of any integer or float type. ``name`` begins error messages.
    """
    if isinstance(pixels, Image.Image):
        if pixels.mode not in WIDE_MODES:
            return np.asarray(_pil_8bit_rgb(pixels))
        pixels = np.asarray(pixels)
    a = np.asarray(pixels)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[0] < 1 or a.shape[1] < 1:
        raise BoxcasegError(f"{name}: expected an H x W or H x W x C image, got shape {list(a.shape)}")
    c = a.shape[2]
    if not 1 <= c <= MAX_CHANNELS:
        raise channels_error(name, c)
    out = _to_uint8(a[:, :, :1] if c <= 2 else a[:, :, :3], name)
    if out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    return np.ascontiguousarray(out)


def to_rgb_image(pixels: Any, name: str = "image") -> Image.Image:
    """:func:`to_rgb8` as a PIL RGB image (an 8-bit RGB PIL image is returned itself)."""
    if isinstance(pixels, Image.Image) and pixels.mode not in WIDE_MODES:
        return _pil_8bit_rgb(pixels)
    return Image.fromarray(to_rgb8(pixels, name), "RGB")


# --------------------------------------------------------------------------- files


def _check_regular(path: Path, what: str, where: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BoxcasegError(f"{path}: {what} file not found{where}") from None
    except OSError as e:
        raise BoxcasegError(f"{path}: unreadable {what}{where} ({e.strerror or type(e).__name__})") from e
    if not stat.S_ISREG(st.st_mode):
        raise BoxcasegError(f"{path}: {what} is not a regular file{where}")


def _unreadable(path: Path, what: str, where: str, e: Exception) -> BoxcasegError:
    msg = " ".join(str(e).split())[:160]
    return BoxcasegError(f"{path}: unreadable {what}{where} ({type(e).__name__}{': ' + msg if msg else ''})")


def orientation(im: Image.Image) -> int:
    """The EXIF orientation (1..8) of an opened image; 1 when it has none (or a bad one)."""
    try:
        value = im.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is no orientation
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright(im: Image.Image) -> Image.Image:
    """An opened image as displayed: its EXIF orientation applied (the image itself when it has none)."""
    return ImageOps.exif_transpose(im) if orientation(im) != 1 else im


def _sizes(im: Image.Image) -> tuple[tuple[int, int], tuple[int, int], int]:
    """(raw size, displayed size, orientation) of an opened image, both sizes (width, height)."""
    o = orientation(im)
    raw = im.size
    return raw, ((raw[1], raw[0]) if o in SWAPPED else raw), o


def _describe(raw: tuple[int, int], shown: tuple[int, int], o: int) -> str:
    if o == 1:
        return f"{shown[0]}x{shown[1]} pixels"
    return f"{shown[0]}x{shown[1]} pixels as displayed ({raw[0]}x{raw[1]} as stored, EXIF orientation {o})"


def _frame_problem(path: Path, raw: tuple[int, int], shown: tuple[int, int], o: int,
                   size: tuple[int, int] | None, where: str) -> BoxcasegError | None:
    if size is None or tuple(size) in (shown, raw):
        return None
    return BoxcasegError(f"{path}: image is {_describe(raw, shown, o)}, the json says {size[0]}x{size[1]}{where}")


class _Head(NamedTuple):
    raw: tuple[int, int]    # (width, height) as stored
    shown: tuple[int, int]  # as displayed (EXIF orientation applied)
    orientation: int
    decoder: str            # "pillow", "opencv" (16-bit PNG) or "tifffile" (wide multi-channel TIFF)


def _pillow_decoder(im: Image.Image, first: bytes) -> str:
    """Who decodes the pixels of a file Pillow opened (module doc): Pillow, unless its mode
    would cut them to 8 bits (16-bit PNG, TIFF of several channels of more than 8 bits)."""
    if im.format == "PNG" and first[12:16] == b"IHDR" and len(first) > 24 and first[24] == 16:
        return "opencv"
    if im.format == "TIFF":
        bits = im.tag_v2.get(258, (1,))
        bits = bits if isinstance(bits, tuple) else (bits,)
        if int(im.tag_v2.get(277, 1)) > 1 and max(bits) > 8:
            return "tifffile"
    return "pillow"


def _tiff_head(path: Path, name: str) -> _Head:
    """The header of a TIFF Pillow cannot open (2 or 5 channels of 16 bits, float RGB ...), by tifffile."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        raw = (int(page.imagewidth), int(page.imagelength))
        samples = int(page.samplesperpixel)
        tag = page.tags.get(274)
    o = tag.value if tag is not None and isinstance(tag.value, int) and 1 <= tag.value <= 8 else 1
    if samples > MAX_CHANNELS:
        raise channels_error(name, samples)
    limit = Image.MAX_IMAGE_PIXELS
    if limit and raw[0] * raw[1] > 2 * limit:  # Pillow's decompression-bomb limit, for the files it does not open
        raise BoxcasegError(f"{name}: {raw[0]}x{raw[1]} pixels, more than Pillow's limit of {2 * limit}")
    return _Head(raw, (raw[1], raw[0]) if o in SWAPPED else raw, o, "tifffile")


def _head(path: Path, what: str, where: str) -> _Head:
    """Sizes, orientation and decoder of an image file, from its header; errors name the file."""
    _check_regular(path, what, where)
    try:
        with open(path, "rb") as f:
            first = f.read(32)
        try:
            im = Image.open(path)
        except UnidentifiedImageError:
            if not first.startswith(TIFF_MAGIC):
                raise
            return _tiff_head(path, f"{path}{where}")
        with im:
            raw, shown, o = _sizes(im)
            decoder = _pillow_decoder(im, first)
        if decoder == "tifffile":  # tifffile's own header: Pillow gives a TIFF's size already turned
            return _tiff_head(path, f"{path}{where}")
        return _Head(raw, shown, o, decoder)
    except BoxcasegError:
        raise
    except Exception as e:  # noqa: BLE001 - Pillow and tifffile raise many types on crafted files
        raise _unreadable(path, what, where, e) from e


def image_size(path: str | os.PathLike, what: str = "image", where: str = "",
               size: tuple[int, int] | None = None) -> tuple[int, int]:
    """The (width, height) of an image file from its header (no decoding): the displayed
    size, or the stored one when ``size`` (what the json says) is that (see the module doc)."""
    path = Path(path)
    head = _head(path, what, where)
    problem = _frame_problem(path, head.raw, head.shown, head.orientation, size, where)
    if problem is not None:
        raise problem
    return tuple(size) if size is not None else head.shown


def read_image(path: str | os.PathLike, what: str = "image", where: str = "",
               size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image file by Pillow, in its own mode, in the frame its annotations use
    (masks; images for the network go through :func:`open_rgb`).

    ``size``: the (width, height) the annotations expect (a COCO json's), which picks
    the displayed or the raw frame (see the module doc); None: the displayed frame.
    ``what`` / ``where`` name the file in messages ("image", " (image id 7)").
    """
    path = Path(path)
    _check_regular(path, what, where)
    try:
        with Image.open(path) as im:
            raw, shown, o = _sizes(im)
            problem = _frame_problem(path, raw, shown, o, size, where)
            if problem is not None:
                raise problem
            if o == 1 or (size is not None and tuple(size) != shown):  # no orientation, or the stored frame
                im.load()
                return im
            return ImageOps.exif_transpose(im)
    except BoxcasegError:
        raise
    except Exception as e:  # noqa: BLE001 - decompression bombs, truncated data, crafted headers ...
        raise _unreadable(path, what, where, e) from e


def _decode_opencv(path: Path) -> np.ndarray:
    """A 16-bit PNG's pixels [H, W] or [H, W, C] (RGB order) by OpenCV."""
    import cv2

    a = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
    if a is None:
        raise ValueError("OpenCV cannot decode it")
    if a.ndim == 3 and a.shape[2] in (3, 4):
        a = a[:, :, [2, 1, 0, 3][:a.shape[2]]]  # BGR(A) -> RGB(A)
    return a


def _decode_tiff(path: Path, what: str, where: str) -> np.ndarray:
    """A TIFF's first page [H, W] or [H, W, C] by tifffile (planar channels moved last)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            a, axes = page.asarray(), page.axes
    except ValueError as e:
        if "imagecodecs" not in str(e):
            raise
        raise BoxcasegError(f"{path}: unreadable {what}{where} (its TIFF compression needs the imagecodecs "
                            f"package: pip install imagecodecs)") from e
    if a.ndim == 3 and axes.startswith("S"):
        a = np.moveaxis(a, 0, -1)
    return a


def open_rgb(path: str | os.PathLike, what: str = "image", size: tuple[int, int] | None = None,
             where: str = "") -> Image.Image:
    """An image file as the network's RGB (a PIL image; pixels by :func:`to_rgb8`), in the
    frame of ``size`` (the json's (width, height)) when given, else as displayed; every
    problem is a BoxcasegError naming the file (and ``where``)."""
    path = Path(path)
    head = _head(path, what, where)
    problem = _frame_problem(path, head.raw, head.shown, head.orientation, size, where)
    if problem is not None:
        raise problem
    name = f"{path}{where}"
    if head.decoder == "pillow":
        return to_rgb_image(read_image(path, what, where, size), name)
    try:
        arr = _decode_opencv(path) if head.decoder == "opencv" else _decode_tiff(path, what, where)
    except BoxcasegError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or crafted files
        raise _unreadable(path, what, where, e) from e
    img = Image.fromarray(to_rgb8(arr, name), "RGB")
    if img.size != head.raw:
        raise BoxcasegError(f"{name}: decoded {img.size[0]}x{img.size[1]} pixels, its header says "
                            f"{head.raw[0]}x{head.raw[1]}")
    if head.orientation != 1 and (size is None or tuple(size) == head.shown):
        img = img.transpose(TRANSPOSE[head.orientation])
    return img


def read_rgb(path: str | os.PathLike, what: str = "image", size: tuple[int, int] | None = None,
             where: str = "") -> np.ndarray:
    """:func:`open_rgb` as an array [H, W, 3] uint8."""
    return np.asarray(open_rgb(path, what, size, where))


def check_image(path: str | os.PathLike, what: str = "image", where: str = "", decode: bool = False,
                size: tuple[int, int] | None = None) -> str | None:
    """Why the image file cannot be used, or None: missing, not a regular file, an unreadable
    header, a size that matches neither frame of ``size`` or, with ``decode``, pixels that
    do not decode (a truncated file)."""
    try:
        if decode:
            open_rgb(path, what, size, where)
        else:
            image_size(path, what, where, size)
    except BoxcasegError as e:
        return e.one_line()
    return None
