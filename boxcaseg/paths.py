"""The one resolver from a COCO json's ``file_name`` to an image file inside ``--images``.

A json may come from a stranger: its ``file_name`` must not lead anywhere but into the
image folder. Every reader of images (training, proxy, Mask R-CNN, visualize, the
baselines) goes through :func:`resolve_image_path`; :func:`check_image_paths` checks a
whole json's images up front, before any work starts.
"""

from __future__ import annotations

import os
from pathlib import Path, PureWindowsPath
from typing import Any, Iterable

from boxcaseg.errors import BoxcasegError


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop (RuntimeError before Python 3.13)
        raise BoxcasegError(f"{path}: cannot resolve ({type(e).__name__}: {e})") from e


def resolve_image_path(image_dir: str | os.PathLike, file_name: Any, image_id: Any,
                       root: Path | None = None) -> Path:
    """``image_dir / file_name``, checked to stay inside ``image_dir``.

    BoxcasegError (one line naming the image id and the file name) when ``file_name`` is
    not a non-empty string, is absolute, or leads outside the folder once ``..`` and
    symbolic links are resolved (a link inside the folder to a file outside counts as
    outside). ``root``: ``Path(image_dir).resolve()``, when the caller has it already.
    Returns the path as joined (not resolved), so messages show the names users know.
    """
    image_dir = Path(image_dir)
    what = f"image id {image_id!r}: file_name {file_name!r}"
    if not isinstance(file_name, str) or not file_name.strip():
        raise BoxcasegError(f"{what} is not a file name (a relative path inside the image folder {image_dir})")
    if "\x00" in file_name:
        raise BoxcasegError(f"{what} holds a NUL character")
    if os.path.isabs(file_name) or PureWindowsPath(file_name).anchor or file_name.startswith(("/", "\\")):
        raise BoxcasegError(f"{what} is an absolute path; it must be relative to the image folder {image_dir}")
    path = image_dir / file_name
    root = root if root is not None else _resolved(image_dir)
    target = _resolved(path)
    if target == root or not target.is_relative_to(root):
        raise BoxcasegError(f"{what} leads outside the image folder {image_dir}")
    return path


def check_image_paths(image_dir: str | os.PathLike, images: Iterable[tuple[Any, Any]]) -> dict[Any, Path]:
    """:func:`resolve_image_path` for every ``(image id, file_name)``: ``{image id: path}``.

    Readers call it when they load a json, so a bad name stops the run before any work.
    """
    image_dir = Path(image_dir)
    root = _resolved(image_dir)
    return {image_id: resolve_image_path(image_dir, name, image_id, root) for image_id, name in images}
