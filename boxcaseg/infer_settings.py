"""The ranges of the inference settings, checked in one place.

A model carries the settings it was tuned with (size, context, threshold, prior weight,
alpha): in a checkpoint's ``[model]`` section (``infer_size``, ``infer_context``,
``infer_threshold``, ``infer_prior_weight``, ``alpha``), in an ONNX file's or a TensorRT
engine's ``boxcaseg.*`` metadata, and as flags (``--context`` ...). A file may come from a
stranger, so wherever a setting enters -- a checkpoint's config
(:func:`boxcaseg.config.config_from_checkpoint`), a model file's metadata
(:func:`settings_from_metadata`), a flag or a ``Segmenter`` argument -- its value goes
through :func:`check_setting`, the one statement of what each setting may be:

- ``infer_size``: an integer, a multiple of 4 (the network's output stride), at least 8;
- ``context``: a finite number >= 1 (1 crops exactly the box);
- ``threshold``, ``prior_weight``, ``alpha``: finite numbers in [0, 1].
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from boxcaseg.errors import BoxcasegError

SETTINGS = ("infer_size", "context", "threshold", "prior_weight", "alpha")
DEFAULTS = {"context": 1.0, "threshold": 0.5, "prior_weight": 0.0, "alpha": 0.7}  # files from before they travelled
META_PREFIX = "boxcaseg."


def setting_problem(name: str, value: Any) -> str | None:
    """Why ``value`` cannot be the inference setting ``name``, or None."""
    if name not in SETTINGS:
        raise KeyError(f"unknown inference setting {name!r} (one of {', '.join(SETTINGS)})")
    if name == "infer_size":
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            return "must be an integer"
        return None if value >= 8 and value % 4 == 0 else "must be a multiple of 4, at least 8"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return "must be a finite number"
    if name == "context":
        return None if value >= 1.0 else "must be >= 1 (1 crops exactly the box)"
    return None if 0.0 <= value <= 1.0 else "must be in [0, 1]"


def check_setting(name: str, value: Any, label: str | None = None) -> Any:
    """``value`` when it is a valid ``name`` (:func:`setting_problem`), else a BoxcasegError
    ``"<label> <value>: <why>"``; ``label`` names where it came from (a flag, a file's key)."""
    problem = setting_problem(name, value)
    if problem is not None:
        raise BoxcasegError(f"{label or name} {value!r}: {problem}")
    return value


def settings_from_metadata(meta: dict[str, str], source: str) -> dict[str, Any]:
    """The inference settings (and ``output_stride``) of a model file's ``boxcaseg.*`` metadata.

    ``infer_size`` must be there; a setting that is not takes :data:`DEFAULTS` (files
    written before the settings travelled); one that is there must parse and be valid
    (:func:`check_setting`), else a BoxcasegError naming ``source`` and the key -- a value
    is never silently replaced. ``output_stride`` (default 4) must be a positive integer
    dividing ``infer_size``.
    """
    def text(key: str) -> str:
        return str(meta[META_PREFIX + key]).strip()

    def integer(key: str) -> int:
        t = text(key)
        if not t.isdigit():
            raise BoxcasegError(f"{source}: metadata {META_PREFIX}{key} {t[:40]!r} is not an integer")
        return int(t)

    if META_PREFIX + "infer_size" not in meta:
        raise BoxcasegError(f"{source}: no {META_PREFIX}infer_size in its metadata")
    out: dict[str, Any] = {"infer_size": check_setting("infer_size", integer("infer_size"),
                                                       f"{source}: metadata {META_PREFIX}infer_size")}
    for name, default in DEFAULTS.items():
        if META_PREFIX + name not in meta:
            out[name] = default
            continue
        try:
            value = float(text(name))
        except ValueError:
            raise BoxcasegError(f"{source}: metadata {META_PREFIX}{name} {text(name)[:40]!r} is not a number") from None
        out[name] = check_setting(name, value, f"{source}: metadata {META_PREFIX}{name}")
    stride = integer("output_stride") if META_PREFIX + "output_stride" in meta else 4
    if stride < 1 or out["infer_size"] % stride:
        raise BoxcasegError(f"{source}: metadata {META_PREFIX}output_stride {stride} does not divide "
                            f"{META_PREFIX}infer_size {out['infer_size']}")
    out["output_stride"] = stride
    return out
