"""The per-user cache folder: what boxcaseg compiles or converts once and keeps.

``$BOXCASEG_CACHE``, else ``$XDG_CACHE_HOME/boxcaseg``, else ``~/.cache/boxcaseg``. It
holds the ONNX graphs of checkpoints (``onnx/``, :func:`boxcaseg.model_files.cached_onnx`)
and Numba's compiled kernels (``numba/``). Nothing is ever written into the installed
package: a package folder may be read-only (a system install, a container run as another
user), and files ``pip`` did not install there outlive ``pip uninstall`` (a leftover
``proxy/__pycache__`` of Numba index files turned a later editable install's
``boxcaseg.proxy`` into an empty namespace package).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def cache_dir() -> Path:
    """Per-user cache: ``$BOXCASEG_CACHE``, else ``$XDG_CACHE_HOME/boxcaseg``, else ``~/.cache/boxcaseg``."""
    if os.environ.get("BOXCASEG_CACHE"):
        return Path(os.environ["BOXCASEG_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "boxcaseg"


def numba_cache_dir() -> Path:
    return cache_dir() / "numba"


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
