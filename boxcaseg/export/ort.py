"""ONNX Runtime as an optional dependency: is it there, import it, or say in one line how to get it.

ONNX Runtime is an extra: ``boxcaseg[cpu]`` (onnxruntime) or ``boxcaseg[gpu]``
(onnxruntime-gpu); the two must not be installed together.
"""

from __future__ import annotations

from boxcaseg.errors import BoxcasegError


def onnxruntime_available() -> bool:
    """Whether an ONNX Runtime (``onnxruntime`` or ``onnxruntime-gpu``: both install it) is there."""
    import importlib.util

    try:
        return importlib.util.find_spec("onnxruntime") is not None
    except (ImportError, ValueError):
        return False


ONNXRUNTIME_HINT = 'pip install "boxcaseg[cpu]" (or [gpu] for onnxruntime-gpu)'


def import_onnxruntime(what: str = "--engine onnx"):
    """``import onnxruntime``; BoxcasegError in one line when neither ONNX Runtime package is installed.

    ONNX Runtime is an extra: ``boxcaseg[cpu]`` (onnxruntime) or ``boxcaseg[gpu]``
    (onnxruntime-gpu); the two must not be installed together.
    """
    try:
        import onnxruntime
    except ImportError as e:
        raise BoxcasegError(f"{what} needs ONNX Runtime: {ONNXRUNTIME_HINT}") from e
    return onnxruntime
