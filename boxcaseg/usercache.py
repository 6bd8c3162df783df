"""The per-user cache folder: what boxcaseg compiles or converts once and keeps.

``$BOXCASEG_CACHE``, else ``$XDG_CACHE_HOME/boxcaseg``, else ``~/.cache/boxcaseg``. It
holds the ONNX graphs of checkpoints (``onnx/``, :func:`boxcaseg.model_files.cached_onnx`)
and Numba's compiled kernels (``numba/``; where it cannot be written, a folder in the
temp folder: :func:`numba_cache_dir`). Nothing is ever written into the installed
package: a package folder may be read-only (a system install, a container run as another
user), and files ``pip`` did not install there outlive ``pip uninstall`` (a leftover
``proxy/__pycache__`` of Numba index files turned a later editable install's
``boxcaseg.proxy`` into an empty namespace package).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """Per-user cache: ``$BOXCASEG_CACHE``, else ``$XDG_CACHE_HOME/boxcaseg``, else ``~/.cache/boxcaseg``."""
    if os.environ.get("BOXCASEG_CACHE"):
        return Path(os.environ["BOXCASEG_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "boxcaseg"


def _writable(folder: Path) -> bool:
    """Whether files can be made in ``folder`` (made if missing): tried, not asked (os.access
    says yes to root where a read-only mount says no)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
        return True
    except OSError:
        return False


def numba_cache_dir() -> Path:
    """``<cache_dir>/numba`` where it can be written, else a folder of this user's in the temp
    folder. Numba itself, given a folder it cannot write, falls back to ``__pycache__``
    beside the kernels' source: into the installed package."""
    preferred = cache_dir() / "numba"
    if _writable(preferred):
        return preferred
    uid = os.getuid() if hasattr(os, "getuid") else os.getlogin()
    fallback = Path(tempfile.gettempdir()) / f"boxcaseg-numba-{uid}"
    return fallback if _writable(fallback) else preferred


def use_user_cache_for_numba() -> None:
    """Numba's ``cache=True`` kernels compile into :func:`numba_cache_dir`, not beside their source.

    Called when ``boxcaseg`` is imported, before any of its modules imports Numba: it sets
    ``NUMBA_CACHE_DIR`` (which Numba reads when it is imported), or, when Numba is already
    imported, Numba's ``config.CACHE_DIR``. A cache folder the user chose
    (``NUMBA_CACHE_DIR``) is left as it is.
    """
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    folder = str(numba_cache_dir())
    if "numba" in sys.modules:
        from numba.core import config

        if not config.CACHE_DIR:
            config.CACHE_DIR = folder
        return
    os.environ["NUMBA_CACHE_DIR"] = folder
