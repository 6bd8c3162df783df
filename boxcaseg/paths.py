"""The one resolver from a COCO json's ``file_name`` to an image file inside ``--images``.

A json may come from a stranger: containment is about the *name* it gives. A
``file_name`` must be a relative path that stays inside the image folder once
normalised (no absolute names, no ``..`` that climbs out of the folder). What the
user's own folder holds is then followed as it is: a symbolic link to a file elsewhere
(datasets made by linking images into split folders, as COCO and Ultralytics users do)
is read like any file. Only regular files are read (:mod:`boxcaseg.images`), so a name
that leads to a FIFO or a device cannot block a run. Every reader of images (training,
proxy, Mask R-CNN, visualize, the baselines) goes through :func:`resolve_image_path`;
:func:`check_image_paths` checks a whole json's images up front, before any work starts.
"""

from __future__ import annotations

import ntpath
import os
import posixpath
from pathlib import Path, PureWindowsPath
from typing import Any, Iterable

from boxcaseg.errors import BoxcasegError


def _climbs_out(file_name: str) -> bool:
    """Does the normalised name leave the folder (``..`` as its first part, or no name at all)?"""
    for norm in (posixpath.normpath(file_name), ntpath.normpath(file_name).replace("\\", "/")):
        if norm in (".", "..") or norm.startswith("../"):
            return True
    return False


def resolve_image_path(image_dir: str | os.PathLike, file_name: Any, image_id: Any,
                       root: Path | None = None) -> Path:
    """``image_dir / file_name``, its name checked to stay inside ``image_dir``.

    BoxcasegError (one line naming the image id and the file name) when ``file_name`` is
    not a non-empty string, holds a NUL, is absolute, or climbs out of the folder once
    normalised (``a/../../x``). Symbolic links inside the folder are followed wherever
    they point: the folder is the user's own. ``root`` is accepted for compatibility and
    unused. Returns the folder joined with the normalised name (links not resolved, so
    messages show the names users know).
    """
    image_dir = Path(image_dir)
    what = f"image id {image_id!r}: file_name {file_name!r}"
    if not isinstance(file_name, str) or not file_name.strip():
        raise BoxcasegError(f"{what} is not a file name (a relative path inside the image folder {image_dir})")
    if "\x00" in file_name:
        raise BoxcasegError(f"{what} holds a NUL character")
    if os.path.isabs(file_name) or PureWindowsPath(file_name).anchor or file_name.startswith(("/", "\\")):
        raise BoxcasegError(f"{what} is an absolute path; it must be relative to the image folder {image_dir}")
    if _climbs_out(file_name):
        raise BoxcasegError(f"{what} leads outside the image folder {image_dir}")
    return image_dir / posixpath.normpath(file_name)  # normalised: "link/../x" must not climb out through a link


def check_image_paths(image_dir: str | os.PathLike, images: Iterable[tuple[Any, Any]]) -> dict[Any, Path]:
    """:func:`resolve_image_path` for every ``(image id, file_name)``: ``{image id: path}``.

    Readers call it when they load a json, so a bad name stops the run before any work.
    """
    image_dir = Path(image_dir)
    return {image_id: resolve_image_path(image_dir, name, image_id) for image_id, name in images}
