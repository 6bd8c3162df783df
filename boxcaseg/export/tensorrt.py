"""TensorRT engine building (``tensorrt`` is imported lazily: it is an optional extra).

The engine file has a JSON sidecar ``<engine>.json`` with the ONNX file's ``boxcaseg.*``
metadata (TensorRT plans carry no free-form metadata), so `boxcaseg proxy --engine trt`
knows S without the checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from boxcaseg.errors import BoxcasegError

log = logging.getLogger(__name__)


def trt_missing() -> list[str]:
    """What `--trt` lacks on this machine ([] when TensorRT and a CUDA GPU are there)."""
    missing = []
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        missing.append("TensorRT (not installed: pip install 'boxcaseg[trt]')")
    except Exception as e:  # noqa: BLE001 - a broken install (missing libnvinfer ...)
        missing.append(f"a working TensorRT (import failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    import torch

    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (none visible)")
    return missing


def import_tensorrt():
    missing = trt_missing()
    if missing:
        raise BoxcasegError("TensorRT engine: missing " + " and ".join(missing))
    import tensorrt as trt

    return trt


def sidecar_path(engine_path: str | Path) -> Path:
    return Path(str(engine_path) + ".json")


def build_trt_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    metadata: dict[str, str],
    *,
    fp16: bool = False,
    max_batch: int = 64,
    opt_batch: int | None = None,
    workspace_gb: float = 4.0,
    half_onnx: Callable[[], object] | None = None,
) -> Path:
    """Build a TensorRT engine from an exported ONNX file (input ``image`` [B, 3, S, S]).

    One optimisation profile: batch 1 .. ``max_batch`` (optimum ``opt_batch``, default
    ``max_batch``). ``fp16``: TensorRT 10 builds the float32 graph with the FP16 builder
    flag; TensorRT 11 (strong typing only) builds the float16 graph that
    ``half_onnx()`` returns (an onnx.ModelProto with float32 input/output). The plan and
    its JSON sidecar are written atomically.
    """
    from boxcaseg.io import atomic_write_bytes, atomic_write_json

    trt = import_tensorrt()
    size = int(metadata["boxcaseg.infer_size"])
    opt_batch = min(max_batch, opt_batch or max_batch)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag_enum = trt.NetworkDefinitionCreationFlag
    weak_fp16 = fp16 and hasattr(trt.BuilderFlag, "FP16")
    flags = 0
    major = int(str(trt.__version__).split(".")[0])
    if major < 10 and hasattr(flag_enum, "EXPLICIT_BATCH"):
        flags |= 1 << int(flag_enum.EXPLICIT_BATCH)
    if fp16 and not weak_fp16:
        if half_onnx is None:
            raise BoxcasegError(f"TensorRT {trt.__version__} has no FP16 builder flag; export the fp16 graph from the checkpoint")
        data = half_onnx().SerializeToString()
        if hasattr(flag_enum, "STRONGLY_TYPED"):
            flags |= 1 << int(flag_enum.STRONGLY_TYPED)
    else:
        data = Path(onnx_path).read_bytes()
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(data):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BoxcasegError(f"{onnx_path}: TensorRT could not parse the ONNX graph ({errors})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if weak_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    profile.set_shape(name, (1, 3, size, size), (opt_batch, 3, size, size), (max_batch, 3, size, size))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BoxcasegError(f"{onnx_path}: TensorRT failed to build an engine (see the TensorRT log above)")
    engine_path = Path(engine_path)
    atomic_write_bytes(engine_path, bytes(plan))
    side = dict(metadata)
    side.update({"tensorrt.version": str(trt.__version__), "tensorrt.fp16": str(bool(fp16)),
                 "tensorrt.max_batch": str(int(max_batch)), "tensorrt.input": name})
    atomic_write_json(sidecar_path(engine_path), side, indent=1)
    log.info("TensorRT engine %s (batch 1..%d, fp16=%s)", engine_path, max_batch, fp16)
    return engine_path


def read_trt_metadata(engine_path: str | Path) -> dict[str, str]:
    """The sidecar of an engine written by :func:`build_trt_engine`."""
    from boxcaseg.io import load_json

    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise BoxcasegError(f"{engine_path}: model file not found")
    side = sidecar_path(engine_path)
    if not side.is_file():
        raise BoxcasegError(f"{engine_path}: no {side.name} next to it; not an engine written by `boxcaseg export --trt`")
    meta = load_json(side, "engine metadata")
    if not isinstance(meta, dict) or "boxcaseg.infer_size" not in meta:
        raise BoxcasegError(f"{side}: not boxcaseg engine metadata")
    return {str(k): str(v) for k, v in meta.items()}
