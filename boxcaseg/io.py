"""Atomic writes, JSON Lines metrics, safe loading of files users hand us, file hashes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from boxcaseg.errors import BoxcasegError


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """The sha256 hex digest of a file's bytes (read in ``chunk``-byte pieces)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


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


NAME_MAX = 255  # bytes in one file or folder name (ext4, XFS, btrfs, APFS, NTFS in UTF-16 units)


def short_name(name: str, room: int) -> str:
    """``name`` cut (at a character, from its end) so that it and ``room`` more bytes fit one
    file name (:data:`NAME_MAX`): for the names made from a user's (temporary files, caches)."""
    budget = max(1, NAME_MAX - room)
    data = name.encode("utf-8", "surrogateescape")
    if len(data) <= budget:
        return name
    return data[:budget].decode("utf-8", "ignore") or "_"


def check_name_length(path: str | os.PathLike, what: str) -> None:
    """BoxcasegError (one line naming it) when a part of ``path`` is longer than a file name can be."""
    for part in Path(path).parts:
        n = len(part.encode("utf-8", "surrogateescape"))
        if n > NAME_MAX:
            raise BoxcasegError(f"{what} {path}: the name {part[:40]}... is {n} bytes; a file name holds at most "
                                f"{NAME_MAX}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file in the same folder and rename it into place.

    The file ends up with the mode ``open(path, "w")`` would give it: a file it replaces
    keeps its mode, a new one gets 0o666 less the umask (not mkstemp's 0600). The temporary
    name is the file's, cut to leave room for what mkstemp adds (a 255-byte name works).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _final_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{short_name(path.name, 14)}.", suffix=".tmp", dir=path.parent)
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


def check_input_file(path: str | os.PathLike, what: str = "input") -> Path:
    """``path`` as a Path when it is a regular file (a link to one counts); else a BoxcasegError
    naming it: missing, or not a regular file (a folder, a FIFO, a device: reading those
    blocks or means nothing)."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BoxcasegError(f"{path}: {what} file not found") from None
    except OSError as e:
        raise BoxcasegError(f"{path}: cannot read the {what} file ({e.strerror or type(e).__name__})") from e
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise BoxcasegError(f"{path}: {what} file is {kind}")
    return path


def safe_torch_load(path: str | os.PathLike, map_location: str = "cpu") -> Any:
    """Load a checkpoint or weight file with ``weights_only=True``: no code runs."""
    import pickle

    import torch

    path = check_input_file(path, "checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BoxcasegError(f"{path}: not a loadable torch weights/checkpoint file ({first})") from e


def load_json(path: str | os.PathLike, what: str = "json") -> Any:
    """Load a JSON file; a missing, malformed or absurdly nested file raises BoxcasegError naming it."""
    path = check_input_file(path, what)
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BoxcasegError(f"{path}: malformed {what} ({e})") from e
    except RecursionError:
        raise BoxcasegError(f"{path}: malformed {what} (nested too deeply)") from None


# --------------------------------------------------------------------------- outputs


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def _check_writable(path: Path, what: str) -> None:
    """The folder ``path`` will be written in is a folder (or can be made one) where files can be created."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise BoxcasegError(f"{what} {path}: {folder} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=folder).close()  # the real test (os.access says yes to root under /sys)
    except OSError as e:
        raise BoxcasegError(f"{what} {path}: cannot write in {folder} ({e.strerror or type(e).__name__})") from e


def check_output_file(path: str | os.PathLike, what: str = "-o",
                      inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Before any work: ``path`` can be written as a file, and is none of ``inputs``.

    BoxcasegError (one line, ``what`` naming the option) when it is a folder or another
    non-regular file, when its folder is a file or cannot be written, or when it is one
    of the command's inputs (a command never writes over what it reads).
    """
    path = Path(path)
    check_name_length(path, what)  # first: stat() on such a name raises
    if path.is_dir():
        raise BoxcasegError(f"{what} {path}: is a folder, not a file")
    if path.exists() and not path.is_file():
        raise BoxcasegError(f"{what} {path}: exists and is not a regular file")
    for inp in inputs:
        if inp is not None and Path(inp).exists() and path.exists() and _same_file(path, Path(inp)):
            raise BoxcasegError(f"{what} {path}: is an input of this command ({inp}); it is never written over")
    _check_writable(path, what)
    return path


def check_output_dir(path: str | os.PathLike, what: str = "-o",
                     input_dirs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Before any work: ``path`` is (or can be made) a folder to write files in, and none of
    ``input_dirs`` (files named after the inputs would replace them)."""
    path = Path(path)
    check_name_length(path, what)  # first: stat() on such a name raises
    if path.exists() and not path.is_dir():
        raise BoxcasegError(f"{what} {path}: is a file, not a folder")
    for inp in input_dirs:
        if inp is not None and path.is_dir() and Path(inp).is_dir() and _same_file(path, Path(inp)):
            raise BoxcasegError(f"{what} {path}: is the input folder {inp}; write elsewhere")
    _check_writable(path / ".boxcaseg-probe", what)
    return path


@contextmanager
def staged_folder(out: str | os.PathLike) -> Iterator[Path]:
    """A folder to write a command's files in; they appear in ``out`` only when the block
    ends without an error (each moved into place by a rename), so a failing command leaves
    no partial output. Folders made for it are removed again on an error."""
    out = Path(out)
    missing = []
    p = out.parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir()
    stage = Path(tempfile.mkdtemp(prefix=f".{short_name(out.name, 18)}.", suffix=".partial", dir=out.parent))
    try:
        yield stage
        out.mkdir(exist_ok=True)
        for f in sorted(stage.rglob("*")):
            if f.is_file():
                target = out / f.relative_to(stage)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(f, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for d in missing:  # innermost first
            try:
                d.rmdir()
            except OSError:
                break
        raise
    shutil.rmtree(stage, ignore_errors=True)


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
