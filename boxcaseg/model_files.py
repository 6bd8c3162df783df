"""Which file and engine a model name means, and what settings it carries.

- :func:`resolve_model`: a model as users name it (None / ``"pretrained"``, a checkpoint,
  an ``.onnx`` file, a TensorRT plan) plus the engine and precision asked -> a
  :class:`ResolvedModel` (engine kind, the file it opens, its :class:`InferSettings`);
- :func:`cached_onnx`: a checkpoint's ONNX graph, exported once into the per-user cache
  (:func:`boxcaseg.usercache.cache_dir`);
- :func:`read_model_settings`: the :class:`~boxcaseg.infer_settings.InferSettings` a model
  file carries (a checkpoint's config, an ONNX file's or a TensorRT engine's metadata),
  without building an engine; :func:`file_kind`: what a model file is, by its name.

The engines that run the files: :mod:`boxcaseg.export.engines`. This module sits above
``export`` (it exports and reads model files); ``infer_settings`` below both holds the
settings type and its metadata text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from boxcaseg.errors import BoxcasegError
from boxcaseg.export.engines import ENGINE_KINDS, check_engine_options, check_precision
from boxcaseg.export.ort import import_onnxruntime, onnxruntime_available
from boxcaseg.infer_settings import InferSettings
from boxcaseg.io import file_sha256, safe_torch_load, short_name
from boxcaseg.usercache import cache_dir

log = logging.getLogger(__name__)


@dataclass
class ResolvedModel:
    """A model as the user named it, resolved to an engine kind and a file."""

    kind: str                 # torch | onnx | trt
    path: Path                # the file the engine opens (an ONNX cache file for a converted checkpoint)
    source: Path              # the file the user gave (or the shipped checkpoint)
    label: str                # how to name it to the user
    settings: InferSettings
    precision: str = "fp32"   # the network's number type: fp32 | fp16 | bf16 (torch) | int8 (an int8 ONNX graph)


def read_model_settings(kind: str, path: str | Path) -> InferSettings:
    """The inference settings a model file carries, without building the engine.

    Files written before the settings travelled give the paper's (context 1, threshold
    0.5, no prior). BoxcasegError in one line when the file is not a ``kind`` model of ours.
    """
    path = Path(path)
    if not path.is_file():
        raise BoxcasegError(f"{path}: model file not found")
    if kind == "onnx":
        from boxcaseg.export.onnx_export import read_onnx_metadata

        return InferSettings.from_metadata(read_onnx_metadata(path), path)
    if kind == "trt":
        from boxcaseg.export.tensorrt import read_trt_metadata, trt_missing

        missing = trt_missing()
        if missing:
            raise BoxcasegError("--engine trt: missing " + " and ".join(missing))
        return InferSettings.from_metadata(read_trt_metadata(path), path)
    if kind == "torch":
        from boxcaseg.config import config_from_checkpoint

        ckpt = safe_torch_load(path)
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict):
            raise BoxcasegError(f"{path}: not a boxcaseg checkpoint (no config)")
        return InferSettings.from_model_config(config_from_checkpoint(ckpt["config"], str(path)).model)
    raise BoxcasegError(f"unknown engine {kind!r} (choose from {', '.join(ENGINE_KINDS)})")


def file_kind(path: Path) -> str:
    """What a model file is, by its name: onnx (.onnx), trt (.engine / .plan) or torch (a checkpoint)."""
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in (".engine", ".plan", ".trt"):
        return "trt"
    return "torch"


def cached_onnx(ckpt: Path) -> Path:
    """The ONNX graph of a checkpoint, exported on first use into :func:`cache_dir`.

    The file name holds the checkpoint's sha256 and the export format version: new
    weights or settings (both live in the checkpoint file) get a new graph. A cached
    file is used only when its metadata names that same checkpoint.
    """
    from boxcaseg.export.onnx_export import FORMAT_VERSION, export_onnx, read_onnx_metadata

    sha = file_sha256(ckpt)
    tail = f"-{sha[:20]}-v{FORMAT_VERSION}.onnx"
    out = cache_dir() / "onnx" / f"{short_name(ckpt.stem, len(tail))}{tail}"
    if out.is_file():
        try:
            if read_onnx_metadata(out).get("boxcaseg.checkpoint_sha256") == sha:
                return out
        except BoxcasegError:
            pass
    log.info("building the ONNX graph of %s into %s (once)", ckpt, out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BoxcasegError(f"{out.parent}: cannot create the model cache ({e.strerror}); set BOXCASEG_CACHE") from e
    export_onnx(ckpt, out)
    return out


def _wants_gpu(device: str | None) -> bool:
    """Whether a run would use a GPU: ``device`` names one, or none (or auto) is named and CUDA is
    there (:func:`boxcaseg.dist.device_type`, the device resolver's own rule)."""
    from boxcaseg.dist import device_type

    return device_type(device, "--device") == "cuda"


def _resolve_int8(model, engine: str, device: str | None) -> ResolvedModel:
    """``--precision int8``: the shipped model's int8 graph, or a user's own int8 graph, on ONNX
    Runtime's CPU provider; one line (BoxcasegError) where that cannot be."""
    from boxcaseg import weights
    from boxcaseg.export.onnx_export import read_onnx_metadata
    from boxcaseg.export.quantize import is_quantized

    check_engine_options("onnx" if engine == "auto" else engine, "int8")  # torch / trt: refused
    if _wants_gpu(device):
        raise BoxcasegError(f"--precision int8: the int8 graph is for CPUs and this run would use the GPU "
                            f"({device or 'cuda'}): on a GPU keep fp32 (or --engine torch --precision fp16/bf16), "
                            "or add --device cpu")
    import_onnxruntime("--precision int8")
    path, label = _named_model(model, weights.int8_path)
    kind = file_kind(path)
    meta = read_onnx_metadata(path) if kind == "onnx" else {}
    if not weights.is_alias(model) and not is_quantized(meta):
        ckpt = path if kind == "torch" else "CHECKPOINT"
        raise BoxcasegError(f"--precision int8: {path} is not an int8 graph; make one with `boxcaseg export {ckpt} "
                            "-o m.onnx --int8 --calib-ann TRAIN.json --calib-images TRAIN/` (calibrated on your "
                            "training boxes) and pass --model m.int8.onnx")
    return ResolvedModel("onnx", path, path, label, InferSettings.from_metadata(meta, path), "int8")


def checkpoint_path(name: str | Path) -> Path:
    """The checkpoint a name means: the shipped model's for "pretrained", else the path as
    given (its reader checks it)."""
    from boxcaseg import weights

    return weights.pretrained_path() if weights.is_alias(name) else Path(name)


def _named_model(model, shipped) -> tuple[Path, str]:
    """The file a model name means and how to name it to the user: the shipped file
    (``shipped()``) for None / "pretrained", else the user's file, which must exist."""
    from boxcaseg import weights

    if weights.is_alias(model):
        return shipped(), f"{weights.NAME} (shipped)"
    path = Path(model)
    if not path.is_file():
        raise BoxcasegError(f"{path}: model file not found")
    return path, str(path)


def resolve_model(model: str | Path | None = None, engine: str = "auto", device: str | None = None,
                  precision: str = "fp32") -> ResolvedModel:
    """Name a model the way users do and get what runs it, in the precision asked.

    ``model``: None or ``"pretrained"`` (the shipped model), a checkpoint, an ``.onnx``
    file or a TensorRT plan. ``engine``: ``auto`` picks by file (a checkpoint runs on
    PyTorch when CUDA is there, ``device`` names it or ``precision`` is fp16/bf16, else
    through its ONNX graph on ONNX Runtime when installed, else on PyTorch's CPU), or
    ``torch`` / ``onnx`` / ``trt``. A checkpoint asked to run on ``onnx`` is exported once
    into the per-user cache. ``precision`` "int8": an int8 ONNX graph on the CPU (the
    shipped model's own, ``weights.int8_path()``, or the user's ``--model m.int8.onnx``);
    a GPU, another engine, a model without an int8 graph or no ONNX Runtime is refused in
    one line. An int8 ``.onnx`` given as the model resolves to precision int8 whatever was asked.
    """
    from boxcaseg import weights
    from boxcaseg.dist import check_device_name

    if engine not in ("auto", *ENGINE_KINDS):
        raise BoxcasegError(f"--engine {engine!r}: choose from auto, {', '.join(ENGINE_KINDS)}")
    check_device_name(device, "--device")
    check_precision(precision)
    if precision == "int8":
        return _resolve_int8(model, engine, device)
    source, label = _named_model(model, weights.pretrained_path)
    kind = file_kind(source)
    if engine == "auto":
        if kind == "torch":
            gpu = _wants_gpu(device)
            engine = "torch" if gpu or precision != "fp32" or not onnxruntime_available() else "onnx"
        else:
            engine = kind
    if engine == "onnx" and kind in ("torch", "onnx"):  # one line, before any export, without ONNX Runtime
        import_onnxruntime("--engine onnx" if kind == "torch" else f"{source} (an ONNX model)")
    if engine == "trt":
        from boxcaseg.export.tensorrt import trt_missing

        missing = trt_missing()
        if missing:
            raise BoxcasegError("--engine trt: missing " + " and ".join(missing))
    if engine == "onnx" and kind == "torch":
        path = cached_onnx(source)
    elif engine != kind:
        raise BoxcasegError(f"{source}: a {kind} model file cannot run on --engine {engine}")
    else:
        path = source
    if engine != "onnx":
        return ResolvedModel(engine, path, source, label, read_model_settings(engine, path), precision)
    from boxcaseg.export.onnx_export import read_onnx_metadata
    from boxcaseg.export.quantize import is_quantized

    meta = read_onnx_metadata(path)
    if precision == "fp32" and is_quantized(meta):  # the user's own int8 graph: say so in the info
        precision = "int8"
    return ResolvedModel(engine, path, source, label, InferSettings.from_metadata(meta, path), precision)
