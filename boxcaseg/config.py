"""TOML configs mapped onto dataclasses, with ``${ENV}`` expansion and dotted overrides.

A config file has one table per section (``[model]``, ``[data]``, ``[train]``); any
field can be overridden as ``section.field=value`` (the value parsed as TOML, falling
back to a plain string). ``${NAME}`` in string values expands from the environment;
``${BOXCASEG_DATA}`` defaults to ``../shared/data`` relative to the working directory.
The config stored in a checkpoint is untrusted input: :func:`config_from_checkpoint` reads it
without expansion and accepts only plain model fields.

Configs ship in the package (``boxcaseg/configs/NAME.toml``): wherever a config file is
expected, a shipped name (``cpu``, ``paper-coco``, ``maskrcnn-cpu`` ...) works too
(:func:`resolve_config`; ``boxcaseg config list`` lists them).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from boxcaseg.errors import BoxcasegError
from boxcaseg.infer_settings import FIELDS as INFER_FIELDS
from boxcaseg.infer_settings import InferSettings, check_setting
from boxcaseg.io import read_text

T = TypeVar("T")
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def default_data_root() -> Path:
    """``$BOXCASEG_DATA``, default ``../shared/data`` (relative to the working directory)."""
    env = os.environ.get("BOXCASEG_DATA")
    return Path(env) if env else (Path.cwd().parent / "shared" / "data")


def expand_env(value: str, source: str = "config") -> str:
    def repl(m: re.Match) -> str:
        name = m.group(1)
        if name in os.environ:
            return os.environ[name]
        if name == "BOXCASEG_DATA":
            return str(default_data_root())
        raise BoxcasegError(f"{source}: environment variable ${{{name}}} is not set")

    return _ENV_RE.sub(repl, value)


# --------------------------------------------------------------------------- schema


@dataclass
class ModelConfig:
    backbone: str = "hrnet_w48"           # any timm model name (features_only=True)
    pretrained: bool = False              # timm's ordinary pretrained download (online users)
    backbone_weights: str = ""            # a local weight file for the backbone (offline)
    out_indices: list[int] = field(default_factory=list)  # feature levels; [] = all at stride >= 4
    backbone_kwargs: dict = field(default_factory=dict)   # extra timm.create_model arguments
    neck_channels: int = 0                # 0 = the paper's HRNetV2 concat; K > 0 = an FPN neck of width K
    neck_convs: int = 1                   # 3x3 conv-BN-ReLU layers after the neck's stride-4 sum
    head_channels: int = 0                # hidden width of each head; 0 = backbone concat width
    transfer_hidden: int = 0              # hidden width of the weight-transfer MLPs; 0 = the variant's default
    # "ours": hidden = input width, default init, the transferred head owns its biases;
    # "published" (the authors' code): hidden = 4x input, N(0, 0.01) init, biases k*b_weak + b
    transfer_mlp: str = "ours"
    alpha: float = InferSettings.alpha    # fused = alpha*salient + (1-alpha)*transferred
    # "logit": alpha blends the two heads' logits (the authors' code); "prob": it blends their
    # probabilities, as the paper's Eq. 3 writes (the fused map is then the logit of that blend)
    fusion: str = "logit"
    infer_size: int = InferSettings.infer_size  # proxy-mask inference size S
    # Recommended inference settings that travel with the checkpoint (and its ONNX export):
    # `boxcaseg proxy` / `boxcaseg segment` / `Segmenter` use them unless told otherwise
    # (with alpha and infer_size: boxcaseg.infer_settings.InferSettings, its defaults and ranges).
    infer_context: float = InferSettings.context  # crop R x the box around its centre (1: exactly the box)
    infer_threshold: float = InferSettings.threshold  # foreground threshold on the probability
    infer_prior_weight: float = InferSettings.prior_weight  # blend of a soft inscribed ellipse before the threshold (0: off)


@dataclass
class DataConfig:
    # Any number of box sets (COCO json + image folder each, paired by position) and salient
    # folders: one string or a list. Patches are drawn across the sets of a kind in proportion
    # to their sizes, or to box_weights / salient_weights (one positive number per set).
    box_ann: str | list[str] = ""         # COCO instances json(s) (boxes)
    box_images: str | list[str] = ""      # their image folder(s), one per json
    salient_dir: str | list[str] = ""     # folder(s) with images/ and masks/
    box_weights: list[float] = field(default_factory=list)      # [] = in proportion to the sets' boxes
    salient_weights: list[float] = field(default_factory=list)  # [] = in proportion to the folders' pairs
    patch_size: int = 288
    salient_resize: int = 320
    salient_box_crop: float = 0.0         # P(salient sample = its object's jittered box, as proxy sees it)
    box_per_batch: int = 9
    salient_per_batch: int = 7
    jitter_shift: float = 0.25
    jitter_scale_min: float = 0.5
    jitter_scale_max: float = 1.5
    hflip_box: bool = False               # horizontal flip of box patches too
    pseudo_ann: str = ""                  # self-training: a `boxcaseg proxy` json of box_ann's annotations
    workers: int = 2
    skip_bad: bool = False
    strict: bool = False

    def box_sets(self) -> list[tuple[str, str]]:
        """The box sets as (json, image folder) pairs; BoxcasegError when the lists do not pair."""
        anns, dirs = _as_list(self.box_ann), _as_list(self.box_images)
        if anns and not dirs:
            raise BoxcasegError("data.box_ann is set but data.box_images (the image folder) is not")
        if dirs and not anns:
            raise BoxcasegError("data.box_images is set but data.box_ann (the COCO json) is not")
        if len(anns) != len(dirs):
            raise BoxcasegError(f"{len(anns)} box json(s) (data.box_ann / --box-ann) but {len(dirs)} image "
                                "folder(s) (data.box_images / --box-images): give one folder per json, in order")
        _check_weights("data.box_weights", self.box_weights, len(anns))
        return list(zip(anns, dirs))

    def salient_sets(self) -> list[str]:
        """The salient folders; BoxcasegError when salient_weights does not fit them."""
        dirs = _as_list(self.salient_dir)
        _check_weights("data.salient_weights", self.salient_weights, len(dirs))
        return dirs


def _as_list(value: str | list[str]) -> list[str]:
    """A config path field as a list of its non-empty entries."""
    items = value if isinstance(value, list) else [value]
    return [str(v) for v in items if str(v)]


def _check_weights(name: str, weights: list[float], n_sets: int) -> None:
    if not weights:
        return
    if len(weights) != n_sets:
        raise BoxcasegError(f"{name}: {len(weights)} weight(s) for {n_sets} set(s) (one per set, or none: "
                            "in proportion to their sizes)")
    for w in weights:
        if not (isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w > 0):
            raise BoxcasegError(f"{name}: {w!r} is not a finite number > 0")


@dataclass
class TrainConfig:
    max_iters: int = 40000
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    warmup_iters: int = 0
    seed: int = 0
    ckpt_every: int = 500
    backend: str = "auto"                 # loss backend: auto | triton | torch | reference
    device: str = "auto"                  # auto | cpu | cuda
    amp: bool = True                      # bf16 autocast on CUDA
    sync_bn: bool = False                 # SyncBatchNorm under DDP on GPU
    threads: int = 0                      # torch CPU threads; 0 = torch's default
    channels_last: bool = True            # NHWC memory format for the network (same maths; ~1.5x faster
                                          # forward+backward of the CPU recipe on oneDNN, bench/RESULTS.md)
    # Not in the paper (off by default): extra losses on the *fused* map of box patches.
    fused_mil_weight: float = 0.0         # MIL (row/column bags) on the fused map
    pairwise_weight: float = 0.0          # BoxInst colour-gated pairwise loss on the fused map
    pairwise_tau: float = 0.3             # Lab colour similarity a pair needs to count
    pairwise_dilation: int = 2            # neighbour distance in map pixels
    pairwise_ramp: int = 0                # iterations over which pairwise_weight ramps up from 0
    pseudo_weight: float = 0.0            # soft BCE of the fused map of box patches vs data.pseudo_ann
    init_from: str = ""                   # start from this checkpoint's weights (a new schedule; not --resume)
    # Not in the paper (off by default): optimisation levers screened for the CPU recipe.
    ema_decay: float = 0.0                # > 0: keep an exponential moving average of the weights; it is
                                          # what last.pt's "model" holds (the live weights: "model_live")
    backbone_lr_mult: float = 1.0         # the backbone's learning rate = lr x this (heads keep lr)
    freeze_backbone_bn: bool = False      # backbone BatchNorm statistics stay the pretrained ones


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- loading


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # str | list[str]: a list stays a list
        options = typing.get_args(tp)
        is_list = [typing.get_origin(o) is list for o in options]
        for option in [o for o, lst in zip(options, is_list) if lst == isinstance(value, list)]:
            try:
                return _coerce(value, option, where)
            except BoxcasegError:
                continue
        raise BoxcasegError(f"{where}: expected {' or '.join(getattr(o, '__name__', str(o)) for o in options)}, "
                            f"got {value!r}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise BoxcasegError(f"{where}: expected a table, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise BoxcasegError(f"{where}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, inner, where) for v in value]
    if tp in (int, float, bool, str) and not isinstance(value, tp):
        raise BoxcasegError(f"{where}: expected {tp.__name__}, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise BoxcasegError(f"{where}: expected int, got {value!r}")
    return value


def _expand_strings(value: Any, source: str) -> Any:
    """``${ENV}`` expanded in a string value or in the strings of a list value."""
    if isinstance(value, str):
        return expand_env(value, source)
    if isinstance(value, list):
        return [expand_env(v, source) if isinstance(v, str) else v for v in value]
    return value


def from_dict(cls: type[T], data: dict, source: str = "config", expand: bool = True) -> T:
    """Build dataclass ``cls`` from a nested dict; unknown keys raise BoxcasegError.

    ``expand``: ``${ENV}`` in string values expands from the environment (config files
    the user gives); False keeps the text as it is (a checkpoint's stored config, see
    :func:`config_from_checkpoint`).
    """
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            raise BoxcasegError(f"{source}: unknown key {key!r} in [{cls.__name__}] (known: {sorted(known)})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise BoxcasegError(f"{source}: [{key}] must be a table")
            kwargs[key] = from_dict(tp, value, source, expand)
        else:
            if expand:
                value = _expand_strings(value, source)
            kwargs[key] = _coerce(value, tp, f"{source}: {key}")
    return cls(**kwargs)


# --------------------------------------------------------------------------- checkpoints

# The timm.create_model arguments a checkpoint's model.backbone_kwargs may hold: architecture
# hyper-parameters with plain values. Anything else is refused, above all what names a file,
# a cache, a hub or a loader (checkpoint_path, pretrained_cfg, pretrained_cfg_overlay,
# cache_dir ...) or decides how the network is built or filled (pretrained, features_only,
# out_indices: a field of its own, in_chans: boxcaseg feeds RGB).
CHECKPOINT_BACKBONE_KWARGS = frozenset({
    "drop_rate",          # dropout before the (unused) classifier
    "drop_path_rate",     # stochastic depth
    "drop_block_rate",    # DropBlock (ResNets)
    "output_stride",      # dilated last stages (ResNets, EfficientNets ...): 8, 16 or 32
    "feature_location",   # HRNet / EfficientNet features ("" = the raw branch outputs, as boxcaseg sets)
    "img_size",           # the input size of models that fix one (ViTs)
})
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9_.\-]{0,64}")


def _checkpoint_value_ok(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, (int, float)):
        return value == value and abs(value) < 1e9  # finite and sane
    if isinstance(value, str):
        return _PLAIN_VALUE.fullmatch(value) is not None
    if isinstance(value, list) and len(value) <= 4:
        return all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 100000 for v in value)
    return False


def check_checkpoint_backbone(name: str, source: str, timm_prefix: bool = False) -> None:
    """BoxcasegError unless ``name`` is a plain timm model name (``resnet50``, ``hrnet_w48.ms_in1k``):
    no hub (``hf-hub:``), URL, path or ``${ENV}``. ``timm_prefix``: one leading ``timm:`` is
    allowed (Mask R-CNN's ``timm:NAME``)."""
    plain = name[len("timm:"):] if timm_prefix and name.startswith("timm:") else name
    if _PLAIN_NAME.fullmatch(plain) is None or ".." in plain:
        raise BoxcasegError(f"{source}: model.backbone {name!r} is not a plain timm model name (a checkpoint may "
                            "not name a hub, a URL or a path)")


# [model] fields that are sizes of layers: 0 means "the default", negative means nothing
_MODEL_SIZES = ("head_channels", "neck_channels", "neck_convs", "transfer_hidden")


def check_model_values(model: ModelConfig, source: str) -> None:
    """The values of a [model] section, not only its keys: the inference settings by
    :func:`boxcaseg.infer_settings.check_setting`, layer sizes >= 0, feature indices >= 0.
    (What timm itself refuses -- a kwarg the backbone does not take, a feature index it
    does not have -- is a one-line error when the network is built.) BoxcasegError naming
    ``source`` and the field."""
    for setting, f in INFER_FIELDS.items():  # the [model] keys of the inference settings
        if f.config_key is not None:
            check_setting(setting, getattr(model, f.config_key), f"{source}: model.{f.config_key}")
    for name in _MODEL_SIZES:
        v = getattr(model, name)
        if v < 0:
            raise BoxcasegError(f"{source}: model.{name} {v!r}: must be >= 0 (0: the default)")
    if any(i < 0 for i in model.out_indices):
        raise BoxcasegError(f"{source}: model.out_indices {model.out_indices!r}: feature indices are >= 0")


def config_from_checkpoint(data: Any, source: str, cls: type[T] = Config) -> T:
    """The config stored in a checkpoint, read as untrusted input.

    Unlike a config file: no ``${ENV}`` expansion (the text stays as it is); the backbone
    must be a plain timm model name (:func:`check_checkpoint_backbone`); ``backbone_kwargs``
    keys must be in :data:`CHECKPOINT_BACKBONE_KWARGS` with plain values (numbers, booleans,
    short names, short lists of ints). For a BoxCaseg :class:`Config` the values are
    checked too (:func:`check_model_values`: inference settings, layer sizes), and ``model.pretrained``
    becomes False and ``model.backbone_weights`` and ``train.init_from`` are cleared: the
    checkpoint holds every weight, so building its network reads no other file and nothing
    from the network. ``data.*`` paths are kept as text and read by nothing. (A Mask R-CNN
    config keeps ``pretrained`` / ``backbone_weights``: they decide which BatchNorms are
    frozen, i.e. the architecture; its checkpoints are built with ``load_weights=False``.)
    Every problem is a one-line BoxcasegError naming ``source``.
    """
    if not isinstance(data, dict):
        raise BoxcasegError(f"{source}: the checkpoint's config is not a table")
    cfg = from_dict(cls, data, source, expand=False)
    model = getattr(cfg, "model", None)
    if model is not None:
        check_checkpoint_backbone(model.backbone, source, timm_prefix=not isinstance(cfg, Config))
        for key, value in getattr(model, "backbone_kwargs", {}).items():
            if key not in CHECKPOINT_BACKBONE_KWARGS:
                raise BoxcasegError(f"{source}: model.backbone_kwargs key {key!r} is not allowed in a checkpoint "
                                    f"(allowed: {', '.join(sorted(CHECKPOINT_BACKBONE_KWARGS))})")
            if not _checkpoint_value_ok(value):
                raise BoxcasegError(f"{source}: model.backbone_kwargs.{key} = {str(value)[:60]!r} is not a plain "
                                    "number, boolean or short name")
    if isinstance(cfg, Config):
        check_model_values(cfg.model, source)
        cfg.model.pretrained = False
        cfg.model.backbone_weights = ""
        cfg.train.init_from = ""
    return cfg


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(cfg: T, overrides: dict[str, Any] | list[str] | None) -> T:
    """Apply ``{"train.lr": 0.1}`` or ``["train.lr=0.1"]`` to a config dataclass in place."""
    if not overrides:
        return cfg
    items = overrides.items() if isinstance(overrides, dict) else []
    if isinstance(overrides, list):
        parsed = []
        for item in overrides:
            if "=" not in item:
                raise BoxcasegError(f"override {item!r}: expected section.field=value")
            k, v = item.split("=", 1)
            parsed.append((k.strip(), _parse_value(v.strip())))
        items = parsed
    for key, value in items:
        if value is None:
            continue
        obj = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            if not hasattr(obj, p):
                raise BoxcasegError(f"override {key!r}: unknown section {p!r}")
            obj = getattr(obj, p)
        name = parts[-1]
        if not dataclasses.is_dataclass(obj) or name not in {f.name for f in dataclasses.fields(obj)}:
            raise BoxcasegError(f"override {key!r}: unknown field")
        tp = typing.get_type_hints(type(obj))[name]
        value = _expand_strings(value, f"override {key}")
        setattr(obj, name, _coerce(value, tp, f"override {key}"))
    return cfg


def load_toml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise BoxcasegError(f"{path}: config file not found")
    text = read_text(path, "config")  # UTF-8, a byte-order mark allowed
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise BoxcasegError(f"{path}: malformed TOML ({e})") from e
    except RecursionError:
        raise BoxcasegError(f"{path}: malformed TOML (nested too deeply)") from None


def shipped_configs() -> dict[str, Path]:
    """The configs shipped in the package: ``{name: path}`` (name = file name without .toml), sorted."""
    from importlib.resources import files

    folder = files("boxcaseg") / "configs"
    if not folder.is_dir():
        return {}
    found = {e.name[: -len(".toml")]: e for e in folder.iterdir() if e.name.endswith(".toml") and e.is_file()}
    return {name: Path(str(found[name])) for name in sorted(found)}


def resolve_config(name_or_path: str | os.PathLike) -> Path:
    """A config file: an existing file path as given, else a shipped config by name
    (``cpu`` or ``cpu.toml``); else BoxcasegError listing the shipped names."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    text = str(name_or_path)
    name = text[: -len(".toml")] if text.endswith(".toml") else text
    shipped = shipped_configs()
    if name in shipped and "/" not in text and os.sep not in text:
        return shipped[name]
    raise BoxcasegError(f"config {text!r}: neither a file nor a shipped config name "
                        f"(shipped: {', '.join(shipped) or 'none'}; `boxcaseg config list`)")


def load_config(path: str | os.PathLike | None = None, overrides=None, cls: type[T] = Config) -> T:
    """Load ``cls`` from a TOML file or a shipped config name (defaults when ``path`` is None)
    plus overrides."""
    if path:
        path = resolve_config(path)
    cfg = from_dict(cls, load_toml(path), str(path)) if path else cls()
    return apply_overrides(cfg, overrides)
