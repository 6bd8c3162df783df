"""Inference engines with one interface: ``predict(batch [B, 3, S, S]) -> probs [B, 1, s, s]``.

``batch``: uint8 or float RGB pixels 0..255 (numpy or torch, NCHW); ``probs``: numpy
float32, s = S / output_stride. Every engine is per-sample (BatchNorm folded), so a
sample's answer does not depend on what else is in its batch.

- :class:`TorchEngine`: a ``boxcaseg train`` checkpoint, run through the same
  export wrapper in PyTorch (CUDA when present);
- :class:`OnnxEngine`: an exported ``.onnx`` through ONNX Runtime (TensorRT or CUDA
  execution provider when ``onnxruntime-gpu`` is installed, CPU otherwise);
- :class:`TrtEngine`: a TensorRT plan from ``boxcaseg export --trt``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from boxcaseg.errors import BoxcasegError

log = logging.getLogger(__name__)

ENGINE_KINDS = ("torch", "onnx", "trt")


class Engine(Protocol):
    kind: str
    infer_size: int
    output_stride: int
    description: str

    def predict(self, batch: Any) -> np.ndarray: ...


def _as_numpy_f32(batch: Any) -> np.ndarray:
    if hasattr(batch, "numpy") and not isinstance(batch, np.ndarray):
        batch = batch.cpu().numpy()
    return np.ascontiguousarray(batch, dtype=np.float32)


class TorchEngine:
    """A checkpoint run directly: the export wrapper in PyTorch (CUDA when available)."""

    kind = "torch"

    def __init__(self, path: str | Path, device: str | None = None, threads: int = 0):
        import torch

        from boxcaseg.export.wrapper import ProxyExportModel
        from boxcaseg.model import load_checkpoint_model

        if threads:
            torch.set_num_threads(threads)
        model, cfg = load_checkpoint_model(str(path))
        self.infer_size = int(cfg.model.infer_size)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        with torch.no_grad():
            self.module = ProxyExportModel(model, self.infer_size).eval().to(self.device)
        self.output_stride = int(self.module.stride)
        self.description = f"torch ({self.device.type}, {cfg.model.backbone})"

    def predict(self, batch: Any) -> np.ndarray:
        import torch

        x = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(batch))
        with torch.inference_mode():
            x = x.to(self.device, non_blocking=True).float()
            return self.module(x).float().cpu().numpy()


def onnx_providers(cache_dir: str | Path | None = None) -> list:
    """ONNX Runtime providers to use, best first: TensorRT, CUDA, CPU (what is installed).

    ``onnxruntime-gpu`` brings the CUDA (and, with TensorRT libraries, the TensorRT)
    provider; the plain ``onnxruntime`` package has the CPU provider only. The TensorRT
    provider runs in fp16 and caches its engines in ``cache_dir``.
    """
    import onnxruntime as ort

    avail = ort.get_available_providers()
    providers: list = []
    if "TensorrtExecutionProvider" in avail:
        opts = {"trt_fp16_enable": True, "trt_engine_cache_enable": True}
        if cache_dir is not None:
            opts["trt_engine_cache_path"] = str(cache_dir)
        providers.append(("TensorrtExecutionProvider", opts))
    if "CUDAExecutionProvider" in avail:
        providers.append("CUDAExecutionProvider")
    providers.append("CPUExecutionProvider")
    return providers


class OnnxEngine:
    """An exported ONNX file through ONNX Runtime."""

    kind = "onnx"

    def __init__(self, path: str | Path, providers: list | None = None, threads: int = 0):
        import onnxruntime as ort

        from boxcaseg.export.onnx_export import INPUT_NAME, OUTPUT_NAME, read_onnx_metadata

        meta = read_onnx_metadata(path)
        self.metadata = meta
        self.infer_size = int(meta["boxcaseg.infer_size"])
        self.output_stride = int(meta.get("boxcaseg.output_stride", 4))
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        try:
            cache = Path(path).with_name(Path(path).stem + ".ort-trt-cache")
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers or onnx_providers(cache))
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise BoxcasegError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:200]})") from e
        self.input_name, self.output_name = INPUT_NAME, OUTPUT_NAME
        names = [i.name for i in self.session.get_inputs()]
        if names != [INPUT_NAME]:
            raise BoxcasegError(f"{path}: expected one input {INPUT_NAME!r}, found {names}")
        self.description = f"onnx ({self.session.get_providers()[0]})"

    def predict(self, batch: Any) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: _as_numpy_f32(batch)})[0]


class TrtEngine:
    """A TensorRT plan written by ``boxcaseg export --trt`` (needs TensorRT and a CUDA GPU)."""

    kind = "trt"

    def __init__(self, path: str | Path):
        import torch

        from boxcaseg.export.tensorrt import import_tensorrt, read_trt_metadata

        trt = import_tensorrt()
        meta = read_trt_metadata(path)
        self.metadata = meta
        self.infer_size = int(meta["boxcaseg.infer_size"])
        self.output_stride = int(meta.get("boxcaseg.output_stride", 4))
        self.max_batch = int(meta.get("tensorrt.max_batch", 1))
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise BoxcasegError(f"{path}: not a TensorRT engine for this TensorRT {trt.__version__} / GPU")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.device = torch.device("cuda")
        self.stream = torch.cuda.Stream()
        self.description = f"trt (TensorRT {trt.__version__}, fp16={meta.get('tensorrt.fp16')})"

    def _run(self, x) -> np.ndarray:
        import torch

        with torch.cuda.stream(self.stream):
            x = x.to(self.device, non_blocking=True).float().contiguous()
            self.context.set_input_shape(self.input_name, tuple(x.shape))
            shape = tuple(self.context.get_tensor_shape(self.output_name))
            out = torch.empty(shape, dtype=torch.float32, device=self.device)
            self.context.set_tensor_address(self.input_name, int(x.data_ptr()))
            self.context.set_tensor_address(self.output_name, int(out.data_ptr()))
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            result = out.cpu()
        self.stream.synchronize()
        return result.numpy()

    def predict(self, batch: Any) -> np.ndarray:
        import torch

        x = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(batch))
        parts = [self._run(x[i:i + self.max_batch]) for i in range(0, x.shape[0], self.max_batch)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, 0)


def load_engine(kind: str, path: str | Path, threads: int = 0, device: str | None = None) -> Engine:
    """Open ``path`` as a ``kind`` engine ("torch": checkpoint, "onnx": .onnx, "trt": plan).

    A file that is not what ``kind`` expects raises BoxcasegError in one line.
    """
    path = Path(path)
    if not path.is_file():
        raise BoxcasegError(f"{path}: model file not found")
    if kind == "torch":
        return TorchEngine(path, device=device, threads=threads)
    if kind == "onnx":
        return OnnxEngine(path, threads=threads)
    if kind == "trt":
        return TrtEngine(path)
    raise BoxcasegError(f"unknown engine {kind!r} (choose from {', '.join(ENGINE_KINDS)})")


def engine_device(kind: str, device: str | None = None) -> str:
    """Where ``kind`` will run (part of a proxy run's fingerprint): a provider or a device."""
    if kind == "onnx":
        first = onnx_providers()[0]
        return first[0] if isinstance(first, tuple) else first
    if kind == "trt":
        return "cuda"
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def read_model_info(kind: str, path: str | Path) -> int:
    """The inference size S of a model file, without building the engine.

    BoxcasegError in one line when the file is not a ``kind`` model of ours.
    """
    path = Path(path)
    if not path.is_file():
        raise BoxcasegError(f"{path}: model file not found")
    if kind == "onnx":
        from boxcaseg.export.onnx_export import read_onnx_metadata

        return int(read_onnx_metadata(path)["boxcaseg.infer_size"])
    if kind == "trt":
        from boxcaseg.export.tensorrt import read_trt_metadata, trt_missing

        missing = trt_missing()
        if missing:
            raise BoxcasegError("--engine trt: missing " + " and ".join(missing))
        return int(read_trt_metadata(path)["boxcaseg.infer_size"])
    if kind == "torch":
        from boxcaseg.io import safe_torch_load

        ckpt = safe_torch_load(path)
        try:
            return int(ckpt["config"]["model"].get("infer_size", 320))
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise BoxcasegError(f"{path}: not a boxcaseg checkpoint (no config.model)") from e
    raise BoxcasegError(f"unknown engine {kind!r} (choose from {', '.join(ENGINE_KINDS)})")
