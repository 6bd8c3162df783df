"""Inference engines with one interface: ``predict(batch [B, 3, S, S]) -> probs [B, 1, s, s]``.

``batch``: uint8 or float RGB pixels 0..255 (numpy or torch, NCHW); ``probs``: numpy
float32, s = S / output_stride. Every engine is per-sample (BatchNorm folded), so a
sample's answer does not depend on what else is in its batch.

``predict`` is ``submit(batch).result()``: ``submit`` starts a batch and returns a
:class:`Pending` whose ``result()`` waits for it, so a caller can pack the next batch
while one runs. ``input_buffers(B)`` gives the host buffers to pack into (page-locked
on CUDA, so that the copy to the device is asynchronous). Only the torch engine on CUDA
runs asynchronously (:class:`TorchEngine`: its own copy stream, double-buffered device
inputs, an optional CUDA graph, the results copied back into page-locked buffers);
everywhere else ``submit`` computes the batch before it returns (the same API, one
pipeline).

- :class:`TorchEngine`: a ``boxcaseg train`` checkpoint, run through the same
  export wrapper in PyTorch (CUDA when present);
- :class:`OnnxEngine`: an exported ``.onnx`` through ONNX Runtime (TensorRT or CUDA
  execution provider when ``onnxruntime-gpu`` is installed, CPU otherwise). ONNX Runtime
  is an extra (``boxcaseg[cpu]`` or ``boxcaseg[gpu]``): without it ``auto`` runs
  checkpoints on PyTorch and ``onnx`` stops with one line saying what to install;
- :class:`TrtEngine`: a TensorRT plan from ``boxcaseg export --trt``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from boxcaseg.dist import resolve_device
from boxcaseg.errors import BoxcasegError
from boxcaseg.export.ort import import_onnxruntime, onnxruntime_available
from boxcaseg.io import short_name

log = logging.getLogger(__name__)

ENGINE_KINDS = ("torch", "onnx", "trt")


# The most a batch's input tensor (B x 3 x S x S float32) may take. The network's activations are
# tens of times more (--batch-size 512 at S = 256, 768 MiB of input, took 15 GB on the CPU; 1024
# failed in ONNX Runtime's allocator), and batches past a few dozen crops run no faster.
MAX_BATCH_INPUT_BYTES = 128 * 2**20


def capped_batch_size(requested: int, infer_size: int, flag: str = "--batch-size") -> int:
    """``requested``, or the largest batch whose float32 input fits :data:`MAX_BATCH_INPUT_BYTES`
    (logged in one line when it caps: 170 crops at S = 256, 109 at S = 320)."""
    per_crop = 3 * int(infer_size) ** 2 * 4
    cap = max(1, MAX_BATCH_INPUT_BYTES // per_crop)
    if requested <= cap:
        return int(requested)
    log.warning("%s %d: a batch of %dx%d crops would take %.0f MiB of input (float32, and tens of times that "
                "while the network runs); capped at %d (%d MiB of input)", flag, requested, infer_size, infer_size,
                requested * per_crop / 2**20, cap, MAX_BATCH_INPUT_BYTES // 2**20)
    return int(cap)


PRECISIONS = ("fp32", "fp16", "bf16", "int8")  # fp16 / bf16: the torch engine's network; int8: an int8 ONNX graph
                                                # on ONNX Runtime's CPU provider (model_files.resolve_model)


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise BoxcasegError(f"--precision {precision!r}: choose from {', '.join(PRECISIONS)}")


class Pending(Protocol):
    def result(self) -> np.ndarray: ...      # the probabilities [B, 1, s, s] float32 (a fresh array)

    def timings(self) -> dict | None: ...    # {"h2d", "gpu"} seconds by CUDA events; None off CUDA


class Engine(Protocol):
    kind: str
    infer_size: int
    output_stride: int
    description: str

    def predict(self, batch: Any) -> np.ndarray: ...

    def submit(self, batch: Any) -> Pending: ...

    def input_buffers(self, batch_size: int, n: int = 2) -> list[np.ndarray]: ...


class Ready:
    """A batch computed before ``submit`` returned (every engine but torch on CUDA)."""

    def __init__(self, probs: np.ndarray):
        self.probs = probs

    def result(self) -> np.ndarray:
        return self.probs

    def timings(self) -> None:
        return None


class _SyncEngine:
    """``submit`` = ``predict`` now; plain host buffers."""

    def submit(self, batch: Any) -> Ready:
        return Ready(self.predict(batch))

    def input_buffers(self, batch_size: int, n: int = 2) -> list[np.ndarray]:
        return [np.zeros((batch_size, 3, self.infer_size, self.infer_size), np.uint8) for _ in range(n)]


def _as_numpy_f32(batch: Any) -> np.ndarray:
    if hasattr(batch, "numpy") and not isinstance(batch, np.ndarray):
        batch = batch.cpu().numpy()
    return np.ascontiguousarray(batch, dtype=np.float32)


def check_engine_options(kind: str, precision: str = "fp32", channels_last: bool = False,
                         cuda_graph: bool = False) -> None:
    """BoxcasegError in one line for a torch-engine option given to another engine, int8 off the
    ONNX engine, or an unknown precision."""
    check_precision(precision)
    if precision == "int8" and kind != "onnx":
        raise BoxcasegError(f"--precision int8 runs an int8 ONNX graph on ONNX Runtime (CPU), not --engine {kind}: "
                            "leave --engine out (or --engine onnx)")
    if kind != "torch":
        asked = [f for f, on in (("--precision " + precision, precision not in ("fp32", "int8")),
                                 ("--channels-last", channels_last), ("--cuda-graph", cuda_graph)) if on]
        if asked:
            raise BoxcasegError(f"{', '.join(asked)}: options of the torch engine (--engine torch with a checkpoint), "
                                f"not of --engine {kind}")


def torch_channels_last(channels_last: bool | None, device_type: str) -> bool:
    """The torch engine's memory format: NHWC when asked (True), NCHW when refused (False);
    by default (None) NHWC on the CPU, where the shipped Lite0 runs about 3x faster with the same
    scores (bench/RESULTS.md "torch_cpu"), NCHW on CUDA, where it was not measured."""
    return device_type == "cpu" if channels_last is None else bool(channels_last)


class TorchEngine(_SyncEngine):
    """A checkpoint run directly: the export wrapper in PyTorch (CUDA when available).

    ``precision``: fp32 (default), fp16 (CUDA only) or bf16: the network (body and heads)
    in that type, the normalisation and the final sigmoid in float32 (the wrapper's
    ``half_precision_copy``). ``channels_last``: NHWC memory format for the network; None
    (the default) picks it by device (:func:`torch_channels_last`).
    ``cuda_graph`` (CUDA only; ignored on the CPU): each batch size is captured once in a
    CUDA graph (after three eager warm-up passes) and replayed from a static input.

    On CUDA, :meth:`submit` is asynchronous: the batch (uint8) is copied on a copy stream
    into one of two device buffers (events order it after the batch that last read that
    buffer), the network runs on a compute stream, and the probabilities are copied back
    into one of two page-locked host buffers; :meth:`input_buffers` gives page-locked
    buffers to pack into. A buffer passed to ``submit`` must stay unchanged until that
    batch's ``result()`` returned. On the CPU ``submit`` computes the batch at once.
    """

    kind = "torch"

    def __init__(self, path: str | Path, device: str | None = None, threads: int = 0, precision: str = "fp32",
                 channels_last: bool | None = None, cuda_graph: bool = False):
        import torch

        from boxcaseg.export.wrapper import ProxyExportModel
        from boxcaseg.model import load_checkpoint_model

        check_engine_options("torch", precision)
        if threads:
            torch.set_num_threads(threads)
        model, cfg = load_checkpoint_model(str(path))
        self.infer_size = int(cfg.model.infer_size)
        self.device = resolve_device(device or "auto", "--device")  # this rank's GPU under torchrun
        self.cuda = self.device.type == "cuda"
        if precision == "fp16" and not self.cuda:
            raise BoxcasegError("--precision fp16: needs a CUDA device (bf16 runs on the CPU too)")
        self.precision, self.channels_last = precision, torch_channels_last(channels_last, self.device.type)
        self.cuda_graph = bool(cuda_graph) and self.cuda
        with torch.no_grad():
            module = ProxyExportModel(model, self.infer_size).eval()
            if precision != "fp32":
                module = module.half_precision_copy({"fp16": torch.float16, "bf16": torch.bfloat16}[precision])
            if self.channels_last:
                module = module.to(memory_format=torch.channels_last)
            self.module = module.to(self.device)
        self.output_stride = int(self.module.stride)
        extra = [precision] if precision != "fp32" else []
        extra += ["channels_last"] * self.channels_last + ["cuda graph"] * self.cuda_graph
        self.description = f"torch ({', '.join([str(self.device), cfg.model.backbone, *extra])})"
        self._lanes: dict[int, _CudaLane] = {}
        self._pinned: dict[tuple, Any] = {}  # (data pointer, shape) -> page-locked tensor given out
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
            self.compute_stream = torch.cuda.Stream(self.device)

    def _forward(self, x):
        """uint8 or float pixels already on the engine's device -> float32 probabilities there."""
        import torch

        x = x.float()
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.module(x).float()

    def predict(self, batch: Any) -> np.ndarray:
        if self.cuda:
            return self.submit(batch).result()
        import torch

        x = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(batch))
        with torch.inference_mode():
            return self._forward(x.to(self.device)).cpu().numpy()

    def submit(self, batch: Any) -> "Pending":
        return self._submit_cuda(batch) if self.cuda else super().submit(batch)

    def input_buffers(self, batch_size: int, n: int = 2) -> list[np.ndarray]:
        """``n`` host buffers [B, 3, S, S] uint8 to pack batches into (page-locked on CUDA)."""
        if not self.cuda:
            return super().input_buffers(batch_size, n)
        import torch

        shape = (batch_size, 3, self.infer_size, self.infer_size)
        out = []
        for _ in range(n):
            t = torch.zeros(shape, dtype=torch.uint8, pin_memory=True)
            self._pinned[(t.data_ptr(), shape)] = t
            out.append(t.numpy())
        return out

    # ----------------------------------------------------------------------- CUDA only

    def _host_tensor(self, batch: Any):
        """``batch`` as a CPU uint8/float tensor: one of our page-locked buffers when it is one."""
        import torch

        if isinstance(batch, torch.Tensor):
            return batch
        if isinstance(batch, np.ndarray):
            t = self._pinned.get((batch.__array_interface__["data"][0], batch.shape))
            if t is not None and batch.dtype == np.uint8:
                return t
        return torch.from_numpy(np.ascontiguousarray(batch))

    def _lane(self, x) -> "_CudaLane":
        key = (tuple(x.shape), x.dtype)
        lane = self._lanes.get(key)
        if lane is None:
            import torch

            with torch.cuda.device(self.device):  # the capture and the pools on the engine's GPU, from any thread
                lane = self._lanes[key] = _CudaLane(self, tuple(x.shape), x.dtype)
        return lane

    def _submit_cuda(self, batch: Any) -> "CudaPending":
        import torch

        host = self._host_tensor(batch)
        if host.device.type != "cpu":  # already on a device: copy on the copy stream all the same
            host = host.to(self.device)
        lane = self._lane(host)
        i = lane.next
        lane.next ^= 1
        if lane.owner[i] is not None:  # that slot's previous result not read yet: read it out first
            lane.owner[i]._fetch()
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        with torch.no_grad(), torch.cuda.device(self.device):
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(lane.free[i])        # no earlier batch still reads dev_in[i]
                ev[0].record(self.copy_stream)
                lane.dev_in[i].copy_(host, non_blocking=True)
                ev[1].record(self.copy_stream)
            self.compute_stream.wait_event(ev[1])
            with torch.cuda.stream(self.compute_stream):
                ev[2].record(self.compute_stream)
                if lane.graph is not None:
                    lane.static_in.copy_(lane.dev_in[i])
                    lane.free[i].record(self.compute_stream)
                    lane.graph.replay()
                    out = lane.static_out
                else:
                    out = self._forward(lane.dev_in[i])
                    lane.free[i].record(self.compute_stream)
                lane.host_out[i].copy_(out, non_blocking=True)
                ev[3].record(self.compute_stream)
        pending = CudaPending(lane, i, ev)
        lane.owner[i] = pending
        return pending


class _CudaLane:
    """Buffers (and the CUDA graph) of one input shape: two device inputs, two page-locked outputs."""

    def __init__(self, engine: TorchEngine, shape: tuple, dtype):
        import torch

        dev = engine.device
        self.dev_in = [torch.zeros(shape, dtype=dtype, device=dev) for _ in range(2)]
        self.free = [torch.cuda.Event() for _ in range(2)]
        self.owner: list = [None, None]
        self.next = 0
        self.graph = self.static_in = None
        with torch.no_grad():
            if engine.cuda_graph:
                self.static_in = torch.zeros(shape, dtype=dtype, device=dev)
                side = torch.cuda.Stream(dev)
                side.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(side):
                    for _ in range(3):  # allocator and cuDNN warm-up before the capture
                        engine._forward(self.static_in)
                torch.cuda.current_stream(dev).wait_stream(side)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.static_out = engine._forward(self.static_in)
                out_shape = tuple(self.static_out.shape)
            else:
                out_shape = tuple(engine._forward(self.dev_in[0]).shape)
        torch.cuda.synchronize(dev)
        self.host_out = [torch.empty(out_shape, dtype=torch.float32, pin_memory=True) for _ in range(2)]


class CudaPending:
    """A batch in flight on the GPU; ``result()`` waits for its copy back."""

    def __init__(self, lane: _CudaLane, slot: int, events: list):
        self.lane, self.slot, self.events = lane, slot, events
        self.probs: np.ndarray | None = None

    def _fetch(self) -> None:
        if self.probs is None:
            self.events[3].synchronize()
            self.probs = self.lane.host_out[self.slot].numpy().copy()
            if self.lane.owner[self.slot] is self:
                self.lane.owner[self.slot] = None

    def result(self) -> np.ndarray:
        self._fetch()
        return self.probs

    def timings(self) -> dict:
        """Seconds by CUDA events: the host-to-device copy, and the GPU from the network's
        start to the end of the copy back (both after ``result()``)."""
        self._fetch()
        e = self.events
        return {"h2d": e[0].elapsed_time(e[1]) / 1000.0, "gpu": e[2].elapsed_time(e[3]) / 1000.0}


def onnx_providers(cache_dir: str | Path | None = None, device: str | None = None,
                   available: list[str] | None = None) -> list:
    """ONNX Runtime providers to use, best first: TensorRT, CUDA, CPU (what is installed).

    ``onnxruntime-gpu`` brings the CUDA (and, with TensorRT libraries, the TensorRT)
    provider; the plain ``onnxruntime`` package has the CPU provider only. The GPU
    providers run on ``device`` (:func:`boxcaseg.dist.resolve_device`: this rank's GPU
    under torchrun, "cuda:K" by hand; "cpu" keeps ONNX Runtime on the CPU). The TensorRT
    provider runs in fp16 and caches its engines in ``cache_dir``. ``available``: the
    providers to choose from (default: what ONNX Runtime has).
    """
    if available is None:
        available = import_onnxruntime().get_available_providers()
    providers: list = []
    gpu = {"TensorrtExecutionProvider", "CUDAExecutionProvider"} & set(available)
    if gpu and device != "cpu":
        device_id = resolve_device(device or "cuda", "--device").index
        if "TensorrtExecutionProvider" in gpu:
            opts = {"device_id": device_id, "trt_fp16_enable": True, "trt_engine_cache_enable": True}
            if cache_dir is not None:
                opts["trt_engine_cache_path"] = str(cache_dir)
            providers.append(("TensorrtExecutionProvider", opts))
        if "CUDAExecutionProvider" in gpu:
            providers.append(("CUDAExecutionProvider", {"device_id": device_id}))
    providers.append("CPUExecutionProvider")
    return providers


def check_input_shape(shape: list, infer_size: int, path: str | Path) -> None:
    """A graph's input shape as ONNX Runtime reports it (a number where fixed, a name or None
    where free) must be [any batch, 3, S, S] with S its ``boxcaseg.infer_size``: a graph made
    elsewhere with a fixed batch (of 1, say) would fail at its first batch of another size."""
    dims = list(shape)
    fixed = [d if isinstance(d, int) else None for d in dims]
    if len(dims) != 4:
        raise BoxcasegError(f"{path}: the graph's input has shape {dims}, not [batch, 3, S, S]")
    if fixed[0] is not None:
        raise BoxcasegError(f"{path}: the graph has a fixed batch of {fixed[0]} (its input is {dims}); boxcaseg runs "
                            "batches of any size: re-export it with `boxcaseg export`")
    want = [3, infer_size, infer_size]
    bad = [(d, w) for d, w in zip(fixed[1:], want) if d is not None and d != w]
    if bad:
        raise BoxcasegError(f"{path}: the graph's input is {dims}, its metadata says [batch, 3, {infer_size}, "
                            f"{infer_size}]; re-export it with `boxcaseg export`")


class OnnxEngine(_SyncEngine):
    """An exported ONNX file through ONNX Runtime."""

    kind = "onnx"

    def __init__(self, path: str | Path, providers: list | None = None, threads: int = 0,
                 device: str | None = None):
        from boxcaseg.export.onnx_export import INPUT_NAME, OUTPUT_NAME, read_onnx_metadata
        from boxcaseg.infer_settings import settings_from_metadata

        ort = import_onnxruntime()
        meta = read_onnx_metadata(path)
        self.metadata = meta
        st = settings_from_metadata(meta, str(path))
        self.infer_size, self.output_stride = st["infer_size"], st["output_stride"]
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        try:
            cache = Path(path).with_name(short_name(Path(path).stem, len(".ort-trt-cache")) + ".ort-trt-cache")
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers or onnx_providers(cache, device))
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise BoxcasegError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:200]})") from e
        self.input_name, self.output_name = INPUT_NAME, OUTPUT_NAME
        names = [i.name for i in self.session.get_inputs()]
        if names != [INPUT_NAME]:
            raise BoxcasegError(f"{path}: expected one input {INPUT_NAME!r}, found {names}")
        check_input_shape(self.session.get_inputs()[0].shape, self.infer_size, path)
        from boxcaseg.export.quantize import is_quantized

        self.precision = "int8" if is_quantized(meta) else "fp32"
        self.description = f"onnx ({self.session.get_providers()[0]}" + (", int8)" if self.precision == "int8" else ")")

    def predict(self, batch: Any) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: _as_numpy_f32(batch)})[0]


class TrtEngine(_SyncEngine):
    """A TensorRT plan written by ``boxcaseg export --trt`` (needs TensorRT and a CUDA GPU)."""

    kind = "trt"

    def __init__(self, path: str | Path, device: str | None = None):
        import torch

        from boxcaseg.export.tensorrt import import_tensorrt, read_trt_metadata
        from boxcaseg.infer_settings import settings_from_metadata

        trt = import_tensorrt()
        meta = read_trt_metadata(path)
        self.metadata = meta
        st = settings_from_metadata(meta, str(path))
        self.infer_size, self.output_stride = st["infer_size"], st["output_stride"]
        self.max_batch = int(meta.get("tensorrt.max_batch", 1))
        self.device = resolve_device(device or "cuda", "--device")  # this rank's GPU under torchrun
        torch.cuda.set_device(self.device)  # TensorRT deserialises onto the current device
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise BoxcasegError(f"{path}: not a TensorRT engine for this TensorRT {trt.__version__} / GPU")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.stream = torch.cuda.Stream(self.device)
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


def load_engine(kind: str, path: str | Path, threads: int = 0, device: str | None = None, precision: str = "fp32",
                channels_last: bool | None = None, cuda_graph: bool = False) -> Engine:
    """Open ``path`` as a ``kind`` engine ("torch": checkpoint, "onnx": .onnx, "trt": plan).

    ``precision``, ``channels_last``, ``cuda_graph``: the torch engine's options
    (:class:`TorchEngine`); another engine given one raises BoxcasegError. ``precision``
    "int8" (an int8 graph, :func:`boxcaseg.model_files.resolve_model`) keeps ONNX Runtime on the CPU.
    A file that is not what ``kind`` expects raises BoxcasegError in one line.
    """
    path = Path(path)
    if not path.is_file():
        raise BoxcasegError(f"{path}: model file not found")
    check_engine_options(kind, precision, channels_last, cuda_graph)
    if kind == "torch":
        return TorchEngine(path, device=device, threads=threads, precision=precision, channels_last=channels_last,
                           cuda_graph=cuda_graph)
    if kind == "onnx":
        return OnnxEngine(path, threads=threads, device=_onnx_device(device, precision))
    if kind == "trt":
        return TrtEngine(path, device=device)
    raise BoxcasegError(f"unknown engine {kind!r} (choose from {', '.join(ENGINE_KINDS)})")


def _onnx_device(device: str | None, precision: str) -> str | None:
    """An int8 graph runs on ONNX Runtime's CPU provider (its kernels are the CPU's); others where asked."""
    return "cpu" if precision == "int8" else device


def engine_device(kind: str, device: str | None = None, precision: str = "fp32") -> str:
    """Where ``kind`` will run (part of a proxy run's fingerprint): a provider or a device
    type; never a GPU index, so that ranks on different GPUs write joinable shards."""
    if kind == "onnx":
        first = onnx_providers(device=_onnx_device(device, precision))[0]
        return first[0] if isinstance(first, tuple) else first
    if kind == "trt":
        return "cuda"
    return resolve_device(device or "auto", "--device").type
