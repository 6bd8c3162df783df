"""Atomic writes, JSON Lines metrics, safe loading of files users hand us, file hashes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import threading
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


def read_text(path: str | os.PathLike, what: str = "text", errors: str = "strict") -> str:
    """A text file users hand us (class names, data.yaml, YOLO labels, image lists, TOML
    configs): UTF-8 with or without a byte-order mark (``utf-8-sig``; Windows editors write
    one, and it must not become part of the first class name). ``errors``: Python's decoding
    errors setting. A missing file, a folder or text that is not UTF-8 is a BoxcasegError
    naming the file."""
    path = check_input_file(path, what)
    try:
        return path.read_text(encoding="utf-8-sig", errors=errors)
    except UnicodeDecodeError as e:
        raise BoxcasegError(f"{path}: {what} file is not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise BoxcasegError(f"{path}: cannot read the {what} file ({e.strerror or type(e).__name__})") from e


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


def _file_id(path: str | os.PathLike) -> tuple[int, int] | None:
    """(st_dev, st_ino) of what ``path`` names (links followed), None when nothing is there."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def path_key(path: str | os.PathLike) -> tuple:
    """What ``path`` names on this machine, for comparing two spellings of it.

    ``..`` and links are resolved (:func:`os.path.realpath`), the deepest part that exists
    is known by its (st_dev, st_ino) (so hard links, bind mounts and another case on a
    case-insensitive file system give one key) and the parts below it are compared by
    name (:func:`os.path.normcase`). Two paths name one file iff their keys are equal.
    """
    cur = Path(os.path.realpath(path))
    rest: list[str] = []
    while True:
        fid = _file_id(cur)
        if fid is not None or cur.parent == cur:
            return fid, tuple(os.path.normcase(part) for part in reversed(rest))
        rest.append(cur.name)
        cur = cur.parent


def _folder_ids_above(path: str | os.PathLike) -> set[tuple[int, int]]:
    """The (st_dev, st_ino) of every existing folder ``path`` lies in (itself included), links resolved."""
    cur = Path(os.path.realpath(path))
    ids = set()
    for p in (cur, *cur.parents):
        fid = _file_id(p)
        if fid is not None:
            ids.add(fid)
    return ids


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
    """Before any work: ``path`` can be written as a file (and is none of ``inputs``:
    :func:`check_outputs`, which commands call with every output and input they have).

    BoxcasegError (one line, ``what`` naming the option) when it is a folder or another
    non-regular file, or when its folder is a file or cannot be written.
    """
    path = Path(path)
    check_name_length(path, what)  # first: stat() on such a name raises
    if path.is_dir():
        raise BoxcasegError(f"{what} {path}: is a folder, not a file")
    if path.exists() and not path.is_file():
        raise BoxcasegError(f"{what} {path}: exists and is not a regular file")
    _check_writable(path, what)
    check_outputs({what: path}, inputs=list(inputs))
    return path


def check_output_dir(path: str | os.PathLike, what: str = "-o",
                     input_dirs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Before any work: ``path`` is (or can be made) a folder to write files in (and none of
    ``input_dirs``, nor inside one: :func:`check_outputs`)."""
    path = Path(path)
    check_name_length(path, what)  # first: stat() on such a name raises
    if path.exists() and not path.is_dir():
        raise BoxcasegError(f"{what} {path}: is a file, not a folder")
    _check_writable(path / ".boxcaseg-probe", what)
    check_outputs(folders={what: path}, inputs=list(input_dirs))
    return path


def check_outputs(files: dict[str, str | os.PathLike | None] | None = None,
                  inputs: dict[str, str | os.PathLike | None] | Iterable[str | os.PathLike | None] | None = None,
                  folders: dict[str, str | os.PathLike | None] | None = None) -> None:
    """The one rule for what a command writes, checked before any work: nothing a user gave
    is ever written over.

    ``files``: {option: output file}; ``folders``: {option: output folder (the command writes
    files inside it)}; ``inputs``: {option: file or folder the command reads} (a folder: every
    file inside it is read, as an images folder; or a list of paths or (option, path) pairs).
    None values are skipped, and so are inputs that do not exist (nothing there to lose).
    Paths are compared by :func:`path_key`, so ``..``, symbolic links, hard links and case on
    a case-insensitive file system do not hide a clash. BoxcasegError (one line naming both)
    when an output file is an input file or lies in an input folder, when an output folder is
    an input folder or lies in one, or when two output files are one file.
    """
    def given(v) -> bool:  # an unset config path is "" (Path("") would be the working folder)
        return v is not None and str(v) != ""

    out_files = [(k, Path(v)) for k, v in (files or {}).items() if given(v)]
    out_dirs = [(k, Path(v)) for k, v in (folders or {}).items() if given(v)]
    pairs = (inputs or {}).items() if isinstance(inputs, dict) else \
        (v if isinstance(v, tuple) else ("", v) for v in inputs or ())
    ins = [(k, Path(v)) for k, v in pairs if given(v) and os.path.exists(v)]

    def name(label: str, p: Path) -> str:
        return f"{label} {p}" if label else str(p)

    for label, inp in ins:
        if os.path.isdir(inp):
            in_id = _file_id(inp)
            for what, out in out_dirs:
                if path_key(out) == path_key(inp):
                    raise BoxcasegError(f"{what} {out}: is the input folder {name(label, inp)}; write elsewhere")
            for what, out in (*out_files, *out_dirs):
                if in_id in _folder_ids_above(out):
                    raise BoxcasegError(f"{what} {out}: is inside the input folder {name(label, inp)}; "
                                        "write elsewhere (a command never writes among what it reads)")
        else:
            key = path_key(inp)
            for what, out in out_files:
                if path_key(out) == key:
                    raise BoxcasegError(f"{what} {out}: is an input of this command ({name(label, inp)}); "
                                        "it is never written over")
    seen: dict[tuple, tuple[str, Path]] = {}
    for what, out in out_files:
        key = path_key(out)
        if key in seen:
            w0, o0 = seen[key]
            raise BoxcasegError(f"{w0} {o0} and {what} {out} are the same file: give two files")
        seen[key] = (what, out)


@contextmanager
def staged_files(*paths: str | os.PathLike | None) -> Iterator[list[Path | None]]:
    """A temporary path beside each of ``paths`` (None stays None) for the block to write; when
    it ends without an error each is renamed into place (with the mode ``open(path, "w")``
    would leave), else removed with the folders made for it: a command that fails midway
    leaves every output as it was (an existing file is not replaced by half of a result)."""
    temps: list[Path | None] = []
    made: list[Path] = []
    try:
        for p in paths:
            if p is None:
                temps.append(None)
                continue
            p = Path(p)
            d = p.parent
            while not d.exists():
                made.append(d)
                d = d.parent
            p.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=f".partial{p.suffix}", dir=p.parent)
            os.close(fd)
            temps.append(Path(tmp))
        yield temps
        for p, tmp in zip(paths, temps):
            if tmp is not None:
                os.chmod(tmp, _final_mode(Path(p)))
                os.replace(tmp, p)
    except BaseException:
        for tmp in temps:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
        for d in sorted(set(made), key=lambda x: len(x.parts), reverse=True):  # innermost first
            try:
                d.rmdir()
            except OSError:
                pass
        raise


def lock_path(out: str | os.PathLike) -> Path:
    """The lock file of an output (:func:`output_lock`): hidden, beside it (``..`` and links
    resolved, so every spelling of the output has one lock)."""
    out = Path(os.path.realpath(out))
    return out.with_name(f".{short_name(out.name, len('..lock'))}.lock")


@contextmanager
def output_lock(out: str | os.PathLike, what: str = "-o") -> Iterator[None]:
    """Hold the lock of output ``out`` while the block runs: a second run writing the same
    output stops at once (BoxcasegError, one line) instead of mixing its files with this one's.

    An advisory POSIX record lock (``lockf``) on :func:`lock_path` (non-blocking; the kernel
    drops it when the process dies, so a killed run leaves no lock held; unlike ``flock`` it
    is not shared with the worker processes forked while it is held, which may outlive a
    killed run for a moment), and, since a process's record locks never block itself, the
    lock paths this process holds (:data:`_HELD`) for a second run in the same process. The
    lock file, and folders made for it, are removed at the end. Where ``fcntl`` is missing
    (Windows) the block runs unlocked.
    """
    try:
        import fcntl  # noqa: F401  (only: is there one)
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    out = Path(out)
    lock = lock_path(out)
    busy = BoxcasegError(f"{what} {out}: another run is writing this output now (it holds {lock}); "
                         f"wait for it to end, or give another {what}")
    with _HELD_GUARD:
        if str(lock) in _HELD:
            raise busy
        _HELD.add(str(lock))
    try:
        with _file_lock(lock, busy):
            yield
    finally:
        with _HELD_GUARD:
            _HELD.discard(str(lock))


_HELD: set[str] = set()  # lock files this process holds (output_lock)
_HELD_GUARD = threading.Lock()


@contextmanager
def _file_lock(lock: Path, busy: BoxcasegError) -> Iterator[None]:
    """``lockf`` on ``lock`` (made, with its folders, and removed at the end), or ``busy``."""
    import fcntl

    made = make_parents(lock)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            remove_empty(made)
            raise busy from None
        try:  # the run that held it may have removed the file meanwhile: lock the file that is there
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        try:
            os.unlink(lock)
        except FileNotFoundError:
            pass
        os.close(fd)
        remove_empty(made)  # a folder that now holds the output stays


def make_parents(path: Path) -> list[Path]:
    """Make the missing folders above ``path``; returns them innermost first (for :func:`remove_empty`)."""
    missing = []
    p = path.parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir()
    return missing


def remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (innermost first, as :func:`make_parents` gives them) up to the first
    that is not empty."""
    for d in folders:
        try:
            d.rmdir()
        except OSError:
            break


@contextmanager
def staged_folder(out: str | os.PathLike) -> Iterator[Path]:
    """A folder to write a command's files in; they appear in ``out`` only when the block
    ends without an error (each moved into place by a rename), so a failing command leaves
    no partial output. Folders made for it are removed again on an error."""
    out = Path(out)
    missing = make_parents(out)
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
        remove_empty(missing)
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
            for line in self.path.read_text(encoding="utf-8").splitlines():
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
    return [json.loads(line) for line in read_text(path, "JSON Lines").splitlines() if line.strip()]
