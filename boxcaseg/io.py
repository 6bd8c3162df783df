"""Atomic writes, JSON Lines metrics, safe loading of files users hand us."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from boxcaseg.errors import BoxcasegError


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (process-global, a moment only)
    os.umask(mask)
    return mask


def _final_mode(path: Path) -> int:
    """The mode ``open(path, "w")`` would leave: an existing file's own, else 0o666 & ~umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~current_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file in the same folder and rename it into place.

    The file ends up with the mode ``open(path, "w")`` would give it: a file it replaces
    keeps its mode, a new one gets 0o666 less the umask (not mkstemp's 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _final_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)
            else:  # pragma: no cover - Windows before Python 3.13
                os.chmod(tmp, mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=indent).encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a temporary file and a rename."""
    import io as _io

    import torch

    buf = _io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def safe_torch_load(path: str | os.PathLike, map_location: str = "cpu") -> Any:
    """Load a checkpoint or weight file with ``weights_only=True``: no code runs."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise BoxcasegError(f"{path}: file not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BoxcasegError(f"{path}: not a loadable torch weights/checkpoint file ({first})") from e


def load_json(path: str | os.PathLike, what: str = "json") -> Any:
    """Load a JSON file; a missing or malformed file raises BoxcasegError naming it."""
    path = Path(path)
    if not path.is_file():
        raise BoxcasegError(f"{path}: {what} file not found")
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BoxcasegError(f"{path}: malformed {what} ({e})") from e


class JsonlWriter:
    """Append one JSON object per line (metrics); flushes every write."""

    def __init__(self, path: str | os.PathLike, truncate_after_iter: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after_iter is not None and self.path.exists():
            # a resumed run: keep the lines up to the checkpoint's iteration only
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("iter", 0) <= truncate_after_iter:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue
            atomic_write_bytes(self.path, ("\n".join(kept) + ("\n" if kept else "")).encode())
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, obj: dict) -> None:
        self._f.write(json.dumps(obj) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
