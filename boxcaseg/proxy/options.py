"""What a proxy run is: its options (:class:`ProxyConfig`, the `boxcaseg proxy` flags),
their completion from the model (:func:`resolve_proxy_config`), the fingerprint that
progress chunks and shard files carry (:func:`fingerprint`: every input and option that
changes the answer) and the record the output json keeps (:func:`run_info`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from boxcaseg.errors import BoxcasegError
from boxcaseg.infer_settings import FIELDS, check_setting, flag_label
from boxcaseg.io import check_name_length, check_output_file, check_outputs, file_sha256
from boxcaseg.proxy.shards import FORMAT, Shard

DROP_THRESH = 0.95  # the paper's drop rule: agreement below it flags ignore_mask
DROP_SLACK = 0.5    # px per axis a small box's drop threshold forgives (merge_drop.drop_thresholds)


@dataclass
class ProxyConfig:
    """Options of :func:`generate_proxy` (the `boxcaseg proxy` flags)."""

    ann: Path                        # COCO instances json (boxes)
    images: Path                     # its image folder
    out: Path                        # output json (shard files / progress next to it)
    model: Any = None                # None/"pretrained" (the shipped model), a checkpoint, .onnx or .engine
    engine: str = "auto"             # auto | torch | onnx | trt (auto: by file, see model_files.resolve_model)
    context: float | None = None     # crop R x the box around its centre (>= 1); None: the model's
    threshold: float | None = None   # on the probability (or min-max normalised with relative); None: the model's
    relative: bool = False           # the published per-instance min-max normalisation
    prior_weight: float | None = None  # blend of a soft inscribed-ellipse prior before the threshold; None: the model's
    drop_thresh: float = DROP_THRESH  # agreement below -> ignore_mask
    drop_slack: float = DROP_SLACK   # px per axis a small box's drop threshold forgives (merge_drop.drop_thresholds)
    merge: bool = False              # True: smaller object better across the masks of an image; False (default):
                                     # each box's own mask (trains an equal or better Mask R-CNN: RESULTS "merge_maskrcnn")
    batch_size: int = 32             # instances per inference batch (fixed; part of the fingerprint)
    workers: int = 2                 # decode/crop worker processes (0: in the main process)
    threads: int = 0                 # engine CPU threads (0: its default)
    shard: Any = None                # "K/N" or (K, N); None: torchrun RANK/WORLD_SIZE, else 0/1
    checkpoint_every: int = 256      # images per progress chunk
    skip_bad: bool = False           # a missing/corrupt image flags its annotations instead of stopping
    strict: bool = False             # a degenerate box stops the run instead of being flagged
    progress: bool = True            # rich progress bar
    device: str | None = None        # every engine's device (default: this rank's GPU when CUDA is there)
    precision: str = "fp32"          # fp32 | fp16 (torch, CUDA) | bf16 (torch) | int8 (the int8 ONNX graph, CPU;
                                     # model_files.resolve_model); the network's type, fingerprinted
    channels_last: bool | None = None  # torch engine: NHWC memory format; None: on the CPU yes, on CUDA no
                                     # (engines.torch_channels_last; fingerprinted: other kernels, other last bits)
    cuda_graph: bool = False         # torch engine on CUDA: the fixed-size batch replayed from a CUDA graph
    restart: bool = False            # unfinished progress of this output (a killed or failed run) is deleted,
                                     # not resumed: the run starts over (not fingerprinted)
    post_workers: int | None = None  # post-processing processes, one chunk each (0: one thread; None: by the cores,
                                     # pipeline.default_post_workers); the same bytes either way

    def check(self) -> None:
        from boxcaseg.export.engines import ENGINE_KINDS, check_engine_options, engine_device

        if self.engine not in ENGINE_KINDS:
            raise BoxcasegError(f"--engine {self.engine!r}: choose from {', '.join(ENGINE_KINDS)}")
        check_engine_options(self.engine, self.precision, self.channels_last, self.cuda_graph)
        if self.precision == "fp16" and engine_device(self.engine, self.device) != "cuda":  # before any work
            raise BoxcasegError("--precision fp16: needs a CUDA device (bf16 runs on the CPU too)")
        if self.post_workers is not None and self.post_workers < 0:
            raise BoxcasegError(f"--post-workers {self.post_workers}: must be >= 0 (0: a thread)")
        names = settings_flags(self)
        if any(getattr(self, name) is None for name in names):
            raise RuntimeError("ProxyConfig.check() before resolve_proxy_config()")
        for name in names:
            check_setting(name, getattr(self, name), flag_label(name))
        check_drop_rule(self.drop_thresh, self.drop_slack)
        if self.batch_size < 1 or self.checkpoint_every < 1 or self.workers < 0:
            raise BoxcasegError("--batch-size and --checkpoint-every must be >= 1, --workers >= 0")
        if not Path(self.images).is_dir():
            raise BoxcasegError(f"{self.images}: image folder not found")
        check_proxy_output(self)


def check_drop_rule(drop_thresh: float, drop_slack: float, labels: tuple[str, str] = ("--drop-thresh", "--drop-slack")):
    """The drop rule's settings (:func:`~boxcaseg.proxy.merge_drop.ignore_flags`) as floats:
    ``drop_thresh`` in [0, 1], ``drop_slack`` in [0, 8] px; else a BoxcasegError naming them
    by ``labels`` (the flags, or the Python keywords)."""
    for value, label in zip((drop_thresh, drop_slack), labels):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise BoxcasegError(f"{label} {value!r}: not a number")
    if not 0.0 <= drop_thresh <= 1.0:
        raise BoxcasegError(f"{labels[0]} {drop_thresh}: must be in [0, 1]")
    if not (math.isfinite(drop_slack) and 0.0 <= drop_slack <= 8.0):
        raise BoxcasegError(f"{labels[1]} {drop_slack}: must be in [0, 8] px")
    return float(drop_thresh), float(drop_slack)


def check_proxy_output(cfg: ProxyConfig) -> None:
    """``cfg.out`` can be written and is none of the run's inputs (the json, the image folder
    or a file in it, the user's model file): :func:`~boxcaseg.io.check_outputs`; the names made
    from it (progress folder, shard file) fit a file name."""
    from boxcaseg.proxy.shards import progress_dir, shard_file
    from boxcaseg.weights import user_model_file

    check_output_file(cfg.out, "-o")
    check_outputs({"-o": cfg.out}, {"--ann": cfg.ann, "--images": cfg.images, "--model": user_model_file(cfg.model)})
    shard = Shard.parse(cfg.shard)  # the names made from -o's, before any work
    check_name_length(progress_dir(Path(cfg.out), shard), "-o (its progress folder)")
    if shard.count > 1:
        check_name_length(shard_file(Path(cfg.out), shard), "-o (its shard file)")


def settings_flags(cfg: ProxyConfig) -> list[str]:
    """The inference settings a proxy run may override: the :data:`~boxcaseg.infer_settings.FIELDS`
    not baked into the model that are options of :class:`ProxyConfig` (None: the model's)."""
    return [name for name, f in FIELDS.items() if not f.baked and hasattr(cfg, name)]


def fingerprint(cfg: ProxyConfig, shard: Shard, size: int) -> dict:
    """The run's identity: a progress chunk or shard file is reused or joined only under an equal one."""
    from boxcaseg.export.engines import engine_device

    fp = {
        "format": FORMAT,
        "ann_sha256": file_sha256(cfg.ann),
        "model_sha256": file_sha256(cfg.model),
        "engine": cfg.engine,
        "device": engine_device(cfg.engine, cfg.device, cfg.precision),
        "infer_size": size,
        **{name: FIELDS[name].kind(getattr(cfg, name)) for name in settings_flags(cfg)},
        "relative": bool(cfg.relative),
        "drop_thresh": float(cfg.drop_thresh),
        "drop_slack": float(cfg.drop_slack),
        "merge": bool(cfg.merge),
        "batch_size": int(cfg.batch_size),
        "checkpoint_every": int(cfg.checkpoint_every),
        "skip_bad": bool(cfg.skip_bad),
        "strict": bool(cfg.strict),
        "shard": [shard.index, shard.count],
    }
    fp.update(_torch_options(cfg))  # only off the plain fp32 NCHW path: its progress and shard files stay valid
    return fp


def _torch_options(cfg: ProxyConfig) -> dict:
    """The engine options that change the answer, when they are not the defaults: the precision
    (the torch engine's fp16 / bf16, an int8 graph's int8) and the torch engine's memory format."""
    from boxcaseg.export.engines import engine_device, torch_channels_last

    out: dict = {}
    if cfg.precision != "fp32":
        out["precision"] = cfg.precision
    if cfg.engine == "torch" and torch_channels_last(cfg.channels_last, engine_device("torch", cfg.device)):
        out["channels_last"] = True
    return out


def resolve_proxy_config(cfg: ProxyConfig):
    """``cfg`` with its model resolved (engine kind and file) and every setting left
    None taken from the model; returns (resolved config, :class:`ResolvedModel` whose
    ``settings`` are the ones in force: the model's merged with ``cfg``'s,
    :meth:`InferSettings.merged`)."""
    from boxcaseg.model_files import resolve_model

    if not Path(cfg.images).is_dir():
        raise BoxcasegError(f"{cfg.images}: image folder not found")
    check_proxy_output(cfg)  # before the model is resolved (maybe exported)
    rm = resolve_model(cfg.model, cfg.engine, cfg.device, cfg.precision)
    st = rm.settings.overrides_of(cfg)
    out = ProxyConfig(**{
        **asdict(cfg), "ann": Path(cfg.ann), "images": Path(cfg.images), "out": Path(cfg.out),
        "model": rm.path, "engine": rm.kind, "precision": rm.precision,
        **{name: getattr(st, name) for name in settings_flags(cfg)},
    })
    return out, dataclasses.replace(rm, settings=st)


def run_info(cfg: ProxyConfig, rm, fingerprint: dict) -> dict:
    """What the output json records in ``info.boxcaseg_proxy``: the model and the settings in force."""
    from boxcaseg import __version__

    return {"version": __version__, "model": rm.label, "model_sha256": fingerprint["model_sha256"],
            "engine": cfg.engine, **rm.settings.overrides_of(cfg).as_info(),
            "relative": cfg.relative, "merge": cfg.merge, "drop_thresh": cfg.drop_thresh, "drop_slack": cfg.drop_slack, **_torch_options(cfg)}

