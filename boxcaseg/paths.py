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
from typing import Any, Iterable, Iterator

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


def walk_files(root: str | os.PathLike, suffixes: Iterable[str] | None = None, recursive: bool = True) -> list[Path]:
    """The regular files under ``root`` (sorted paths spelt from ``root``, links not resolved).

    Links are followed, to files and to folders alike; a folder link that leads back to a
    folder above it (a cycle) is not entered again. Hidden files (a name starting with
    ``.``) are left out; ``suffixes`` (lower-case, with the dot) keeps only those, in any
    case. ``recursive=False`` lists ``root`` itself only. A folder that cannot be listed is a
    BoxcasegError naming it.
    """
    keep = None if suffixes is None else tuple(s.lower() for s in suffixes)
    root = Path(root)
    out: list[Path] = []
    stack: list[tuple[Path, frozenset]] = [(root, frozenset({_dir_id(root)}))]
    while stack:
        folder, above = stack.pop()
        for entry in _entries(folder):
            path = folder / entry.name
            if _is_dir(entry):
                if recursive:
                    fid = _dir_id(path)
                    if fid not in above:  # else a link back up the tree: listed once already
                        stack.append((path, above | {fid}))
            elif _is_file(entry) and not entry.name.startswith(".") and (keep is None or path.suffix.lower() in keep):
                out.append(path)
    return sorted(out)


def _entries(folder: Path) -> Iterator[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return iter(list(it))
    except OSError as e:
        raise BoxcasegError(f"{folder}: cannot list the folder ({e.strerror or type(e).__name__})") from e


def _dir_id(path: Path) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError as e:
        raise BoxcasegError(f"{path}: cannot list the folder ({e.strerror or type(e).__name__})") from e
    return st.st_dev, st.st_ino


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # a link to a folder counts
    except OSError:
        return False


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()  # a link to a file counts; a dangling link, a FIFO, a device do not
    except OSError:
        return False
