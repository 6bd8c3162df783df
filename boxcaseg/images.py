"""Image files: the one place where a file on disk becomes pixels.

Every reader of images (training, proxy, Segmenter, Mask R-CNN, visualize, the
baselines, the YOLO and salient readers) opens files through :func:`read_image` (pixels)
or :func:`image_size` (header only), so they agree on what can be read:

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
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from PIL import ExifTags, Image, ImageFile, ImageOps

from boxcaseg.errors import BoxcasegError

ImageFile.LOAD_TRUNCATED_IMAGES = False

SWAPPED = (5, 6, 7, 8)  # EXIF orientations that exchange width and height


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


def image_size(path: str | os.PathLike, what: str = "image", where: str = "",
               size: tuple[int, int] | None = None) -> tuple[int, int]:
    """The (width, height) of an image file from its header (no decoding): the displayed
    size, or the stored one when ``size`` (what the json says) is that (see the module doc)."""
    path = Path(path)
    _check_regular(path, what, where)
    try:
        with Image.open(path) as im:
            raw, shown, o = _sizes(im)
    except Exception as e:  # noqa: BLE001 - Pillow raises many types on crafted files
        raise _unreadable(path, what, where, e) from e
    problem = _frame_problem(path, raw, shown, o, size, where)
    if problem is not None:
        raise problem
    return tuple(size) if size is not None else shown


def read_image(path: str | os.PathLike, what: str = "image", where: str = "",
               size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image file (in its own mode) in the frame its annotations use.

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


def check_image(path: str | os.PathLike, what: str = "image", where: str = "", decode: bool = False,
                size: tuple[int, int] | None = None) -> str | None:
    """Why the image file cannot be used, or None: missing, not a regular file, an unreadable
    header, a size that matches neither frame of ``size`` or, with ``decode``, pixels that
    do not decode (a truncated file)."""
    try:
        if decode:
            read_image(path, what, where, size)
        else:
            image_size(path, what, where, size)
    except BoxcasegError as e:
        return e.one_line()
    return None
