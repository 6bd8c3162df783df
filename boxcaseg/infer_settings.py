"""The inference settings: one type, its defaults, its ranges, its serialisation, its merge.

A model carries the settings it was tuned with (size, context, threshold, prior weight,
alpha) as one :class:`InferSettings`, the same object from the training config to the
user's call:

- a training config / checkpoint: the ``[model]`` keys of :data:`FIELDS` (``infer_size``,
  ``infer_context``, ``infer_threshold``, ``infer_prior_weight``, ``alpha``):
  :meth:`InferSettings.from_model_config`;
- an ONNX file's or a TensorRT engine's ``boxcaseg.*`` metadata:
  :meth:`InferSettings.to_metadata` / :meth:`InferSettings.from_metadata`;
- the model as resolved (:class:`boxcaseg.model_files.ResolvedModel` ``.settings``), then
  merged with what the user asked (:meth:`InferSettings.merged`: a None override keeps the
  model's value) in ``boxcaseg proxy`` (:class:`~boxcaseg.proxy.options.ProxyConfig`),
  ``boxcaseg segment`` and :class:`~boxcaseg.Segmenter`, and handed whole to the
  post-processing (:func:`boxcaseg.proxy.postprocess.masks_from_probs`) and to the output's
  ``info`` (:meth:`InferSettings.as_info`).

A file may come from a stranger, so wherever a setting enters its value goes through
:func:`check_setting`, the one statement of what each setting may be:

- ``infer_size``: an integer, a multiple of 4 (the network's output stride), at least 8;
- ``context``: a finite number >= 1 (1 crops exactly the box);
- ``threshold``, ``prior_weight``, ``alpha``: finite numbers in [0, 1].

A new setting is a field of :class:`InferSettings` (with its default), its entry in
:data:`FIELDS` (config key, metadata text, range) and its flag; everything else iterates
over these two.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable

from boxcaseg.errors import BoxcasegError

META_PREFIX = "boxcaseg."


def _integer_problem(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return "must be an integer"
    return None if value >= 8 and value % 4 == 0 else "must be a multiple of 4, at least 8"


def _number_problem(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return "must be a finite number"
    return None


def _context_problem(value: Any) -> str | None:
    return _number_problem(value) or (None if value >= 1.0 else "must be >= 1 (1 crops exactly the box)")


def _unit_problem(value: Any) -> str | None:
    return _number_problem(value) or (None if 0.0 <= value <= 1.0 else "must be in [0, 1]")


@dataclass(frozen=True)
class Field:
    """How one setting is named, written and checked outside :class:`InferSettings`."""

    config_key: str | None               # its [model] key in a training config / checkpoint (None: not there)
    kind: type                           # int | float: what a value is converted to (flags, metadata)
    problem: Callable[[Any], str | None]  # why a value cannot be this setting, or None
    describe: str                        # how :meth:`InferSettings.describe` names it ("{}" the value)
    baked: bool = False                  # part of the network (a model file's graph): the user cannot override it

    def to_text(self, value: Any) -> str:
        """The metadata text: ``str(int)`` for an integer, ``repr(float)`` for a number."""
        return str(int(value)) if self.kind is int else repr(float(value))


#: The settings in metadata order (files written before keep their bytes): name -> :class:`Field`.
FIELDS: dict[str, Field] = {
    "infer_size": Field("infer_size", int, _integer_problem, "S={}", baked=True),
    "alpha": Field("alpha", float, _unit_problem, "alpha {:g}", baked=True),
    "context": Field("infer_context", float, _context_problem, "context {:g}"),
    "threshold": Field("infer_threshold", float, _unit_problem, "threshold {:g}"),
    "prior_weight": Field("infer_prior_weight", float, _unit_problem, "prior weight {:g}"),
}


@dataclass(frozen=True)
class InferSettings:
    """How a model is meant to be run. The defaults are those of files written before a
    setting travelled (the paper's: context 1, threshold 0.5, no prior, alpha 0.7)."""

    infer_size: int = 320
    context: float = 1.0
    threshold: float = 0.5
    prior_weight: float = 0.0
    alpha: float = 0.7

    # ------------------------------------------------------------------ checks, merge

    def check(self, label: Callable[[str], str] | None = None) -> "InferSettings":
        """Self when every value is valid (:func:`check_setting`), else BoxcasegError;
        ``label(name)`` names where a value came from (a flag, a file's key)."""
        for name in FIELDS:
            check_setting(name, getattr(self, name), label(name) if label else None)
        return self

    def merged(self, **overrides: Any) -> "InferSettings":
        """These settings with the user's ``overrides`` (setting name -> value; None keeps
        this value), each converted to the setting's type; not checked (:meth:`check`)."""
        new = {}
        for name, value in overrides.items():
            if name not in FIELDS:
                raise KeyError(f"unknown inference setting {name!r} (one of {', '.join(FIELDS)})")
            if value is not None:
                new[name] = FIELDS[name].kind(value)
        return dataclasses.replace(self, **new)

    def overrides_of(self, obj: Any) -> "InferSettings":
        """:meth:`merged` with the attributes of ``obj`` named like an overridable setting
        (a :class:`~boxcaseg.proxy.options.ProxyConfig`'s ``context``, ``threshold`` ...)."""
        return self.merged(**{n: getattr(obj, n) for n, f in FIELDS.items() if not f.baked and hasattr(obj, n)})

    # ------------------------------------------------------------------ serialisation

    def to_metadata(self) -> dict[str, str]:
        """The ``boxcaseg.*`` metadata entries (ONNX ``metadata_props``, a TensorRT side file)."""
        return {META_PREFIX + name: f.to_text(getattr(self, name)) for name, f in FIELDS.items()}

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: str) -> "InferSettings":
        """The settings of a model file's ``boxcaseg.*`` metadata (see :func:`settings_from_metadata`)."""
        st = settings_from_metadata(meta, source)
        return cls(**{name: st[name] for name in FIELDS})

    @classmethod
    def from_model_config(cls, model: Any) -> "InferSettings":
        """The settings of a training config's ``[model]`` section (a ``ModelConfig``, read
        from a config file or a checkpoint); a setting without a config key takes its default."""
        return cls(**{name: f.kind(getattr(model, f.config_key)) for name, f in FIELDS.items()
                      if f.config_key is not None and hasattr(model, f.config_key)})

    def as_info(self) -> dict[str, Any]:
        """The settings as an output's ``info`` records them (metadata order)."""
        return {name: getattr(self, name) for name in FIELDS}

    def describe(self) -> str:
        """One line: S first, then the post-processing settings, then the other baked ones."""
        order = sorted(FIELDS, key=lambda n: (n != "infer_size", FIELDS[n].baked))
        return ", ".join(FIELDS[n].describe.format(getattr(self, n)) for n in order)


def setting_problem(name: str, value: Any) -> str | None:
    """Why ``value`` cannot be the inference setting ``name``, or None."""
    if name not in FIELDS:
        raise KeyError(f"unknown inference setting {name!r} (one of {', '.join(FIELDS)})")
    return FIELDS[name].problem(value)


def check_setting(name: str, value: Any, label: str | None = None) -> Any:
    """``value`` when it is a valid ``name`` (:func:`setting_problem`), else a BoxcasegError
    ``"<label> <value>: <why>"``; ``label`` names where it came from (a flag, a file's key)."""
    problem = setting_problem(name, value)
    if problem is not None:
        raise BoxcasegError(f"{label or name} {value!r}: {problem}")
    return value


def flag_label(name: str) -> str:
    """A setting's command-line flag (``prior_weight`` -> ``--prior-weight``)."""
    return "--" + name.replace("_", "-")


def settings_from_metadata(meta: dict[str, str], source: str) -> dict[str, Any]:
    """The inference settings (and ``output_stride``) of a model file's ``boxcaseg.*`` metadata.

    ``infer_size`` must be there; a setting that is not takes its default (files written
    before the settings travelled); one that is there must parse and be valid
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
    out: dict[str, Any] = {}
    for name, f in FIELDS.items():
        if META_PREFIX + name not in meta:
            out[name] = getattr(InferSettings, name)
            continue
        if f.kind is int:
            value: Any = integer(name)
        else:
            try:
                value = float(text(name))
            except ValueError:
                raise BoxcasegError(f"{source}: metadata {META_PREFIX}{name} {text(name)[:40]!r} "
                                    "is not a number") from None
        out[name] = check_setting(name, value, f"{source}: metadata {META_PREFIX}{name}")
    stride = integer("output_stride") if META_PREFIX + "output_stride" in meta else 4
    if stride < 1 or out["infer_size"] % stride:
        raise BoxcasegError(f"{source}: metadata {META_PREFIX}output_stride {stride} does not divide "
                            f"{META_PREFIX}infer_size {out['infer_size']}")
    out["output_stride"] = stride
    return out
