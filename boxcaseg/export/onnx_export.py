"""`export_onnx`: a BoxCaseg checkpoint -> an ONNX inference graph (and a TensorRT engine).

The graph is :class:`~boxcaseg.export.wrapper.ProxyExportModel`: input ``image``
[B, 3, S, S] float32 RGB in 0..255 (dynamic B, S from the checkpoint's
``model.infer_size``), output ``probs`` [B, 1, S/4, S/4] float32. What the file needs to
be used without its checkpoint is in the ONNX ``metadata_props`` (``boxcaseg.*`` keys,
see :func:`read_onnx_metadata`).
"""

from __future__ import annotations

import io
import logging
import warnings
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

from boxcaseg.errors import BoxcasegError
from boxcaseg.infer_settings import InferSettings, check_setting
from boxcaseg.io import file_sha256

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"
INPUT_NAME = "image"
OUTPUT_NAME = "probs"
PARITY_TOL = 1e-4


@dataclass
class ExportReport:
    """What :func:`export_onnx` produced and measured."""

    onnx_path: Path
    infer_size: int
    output_stride: int
    exporter: str                   # "dynamo" or "torchscript"
    max_abs_diff: float             # ONNX Runtime vs the PyTorch training model, float32
    bn_folded: int
    bn_left: int
    engine_path: Path | None = None
    metadata: dict = field(default_factory=dict)
    check_skipped: str | None = None  # why the ONNX Runtime check did not run (max_abs_diff is then nan)


def strip_node_metadata(proto) -> None:
    """Drop the exporter's per-node metadata (source file paths and line numbers of the
    stack traces, FX names): a graph's bytes then depend on the model alone, not on the
    folder or the lines of the code that exported it (rebuilt files keep their sha256)."""
    graphs = [proto.graph, *(f for f in proto.functions)]
    while graphs:
        g = graphs.pop()
        for node in g.node:
            del node.metadata_props[:]
            for attr in node.attribute:
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)


def _metadata(cfg, wrapper, exporter: str, ckpt_sha: str, size: int) -> dict[str, str]:
    """The file's ``boxcaseg.*`` metadata: the checkpoint's inference settings at ``size``
    (:meth:`InferSettings.to_metadata`, the recommended `boxcaseg proxy/segment` defaults)
    and what the graph is. Key order and texts as always (files keep their bytes)."""
    settings = InferSettings.from_model_config(cfg.model).merged(infer_size=size).to_metadata()
    size_key = "boxcaseg.infer_size"
    return {
        "boxcaseg.format": FORMAT_VERSION,
        size_key: settings.pop(size_key),
        "boxcaseg.tta": "hflip" if wrapper.flip_tta else "none",
        **settings,
        "boxcaseg.backbone": cfg.model.backbone,
        "boxcaseg.input": "image: float32 [B,3,S,S] RGB 0..255 (raw pixels)",
        "boxcaseg.normalization": "in graph: ImageNet mean/std",
        "boxcaseg.output": "probs: float32 [B,1,s,s] sigmoid(alpha*salient+(1-alpha)*transferred)",
        "boxcaseg.output_stride": str(int(wrapper.stride)),
        "boxcaseg.exporter": exporter,
        "boxcaseg.checkpoint_sha256": ckpt_sha,
    }


def _torch_export(wrapper, example, dynamo: bool):
    """Run torch.onnx.export; returns an onnx.ModelProto (exporter chatter silenced)."""
    quiet = [logging.getLogger(n) for n in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export", "torch._dynamo")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            return _run_exporter(wrapper, example, dynamo)
    finally:
        for q, lv in zip(quiet, levels):
            q.setLevel(lv)


def _run_exporter(wrapper, example, dynamo: bool):
    import onnx
    import torch

    if dynamo:
        prog = torch.onnx.export(
            wrapper, (example,), None, dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=65536)}}, optimize=True, verbose=False,
        )
        return prog.model_proto
    buf = io.BytesIO()
    torch.onnx.export(
        wrapper, (example,), buf, dynamo=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=17,
        do_constant_folding=True, verbose=False,
    )
    return onnx.load_from_string(buf.getvalue())


def to_onnx_proto(wrapper, infer_size: int, prefer_dynamo: bool = True):
    """Export ``wrapper`` (an eval-mode module [B,3,S,S] -> [B,1,s,s]); returns (ModelProto, exporter).

    ``torch.onnx.export(dynamo=True)`` first; the TorchScript exporter if that fails.
    """
    import torch

    example = torch.rand(2, 3, infer_size, infer_size) * 255.0
    if prefer_dynamo:
        try:
            return _torch_export(wrapper, example, dynamo=True), "dynamo"
        except Exception as e:  # noqa: BLE001 - any exporter failure -> the other exporter
            log.warning("dynamo ONNX export failed (%s: %s); using the TorchScript exporter",
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    return _torch_export(wrapper, example, dynamo=False), "torchscript"


def parity_check(onnx_bytes: bytes, model, infer_size: int, batch: int = 2, seed: int = 0,
                 full_resolution: bool = False, flip_tta: bool = False) -> float:
    """Max abs difference between ONNX Runtime (CPU) and the PyTorch training model (float32).

    Random RGB input [batch, 3, S, S] in 0..255; the reference is sigmoid(fused) of
    ``model`` (unfolded, with the weak head and the weight-transfer MLPs).
    """
    import numpy as np
    import torch

    from boxcaseg.export.ort import import_onnxruntime
    from boxcaseg.export.wrapper import reference_probs

    ort = import_onnxruntime("the ONNX Runtime vs PyTorch check")

    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, infer_size, infer_size, generator=g) * 255.0
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    got = sess.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    ref = reference_probs(model, x, full_resolution, flip_tta).numpy()
    if got.shape != ref.shape:
        raise BoxcasegError(f"ONNX output shape {got.shape} differs from PyTorch {ref.shape}")
    return float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max())


def export_onnx(
    ckpt: str | Path,
    out: str | Path,
    *,
    trt: bool = False,
    fp16: bool = False,
    max_batch: int = 64,
    engine_out: str | Path | None = None,
    full_resolution: bool = False,
    prefer_dynamo: bool = True,
    check: bool = True,
    infer_size: int | None = None,
    flip_tta: bool = False,
    alpha: float | None = None,
) -> ExportReport:
    """Export a ``boxcaseg train`` checkpoint to ONNX (and optionally a TensorRT engine).

    ckpt: checkpoint with ``model`` and ``config``; out: the ``.onnx`` file (written
    atomically). The graph takes ``image`` [B, 3, S, S] float32 RGB 0..255, S =
    ``config.model.infer_size``, and returns ``probs`` [B, 1, S/4, S/4] (stride-4 map;
    ``full_resolution=True`` gives [B, 1, S, S], kept for the measurement in bench/).
    The file is checked with ``onnx.checker``, and ONNX Runtime is compared with the
    PyTorch model on random input: max abs difference <= 1e-4 or BoxcasegError. Without
    ONNX Runtime (an extra: ``boxcaseg[cpu]`` / ``boxcaseg[gpu]``) that comparison is
    skipped with one warning and the file is still written (``report.check_skipped``).

    infer_size: the input size S of the graph instead of the checkpoint's
    ``model.infer_size`` (a multiple of the output stride, 4). flip_tta: average each
    prediction with that of the mirrored crop (horizontal-flip test-time augmentation,
    in the graph; twice the inference work). alpha: the fusion weight
    ``alpha*salient + (1-alpha)*transferred`` instead of the checkpoint's ``model.alpha``
    (1 = the salient head alone, 0 = the transferred head alone). All three are recorded
    in the file's metadata.

    trt: also build a TensorRT engine (``engine_out``, default ``out`` with suffix
    ``.engine``) with an optimisation profile for batch 1..``max_batch``; ``fp16`` enables
    half precision. Without TensorRT or a CUDA GPU this raises BoxcasegError naming what
    is missing (before anything is written).
    """
    if fp16 and not trt:
        raise BoxcasegError("--fp16 applies to the TensorRT engine: add --trt")
    import onnx
    import torch

    from boxcaseg.export.ort import ONNXRUNTIME_HINT, onnxruntime_available
    from boxcaseg.export.tensorrt import build_trt_engine, trt_missing
    from boxcaseg.export.wrapper import ProxyExportModel
    from boxcaseg.io import atomic_write_bytes, check_output_file, check_outputs
    from boxcaseg.model import load_checkpoint_model

    if trt:
        missing = trt_missing()
        if missing:
            raise BoxcasegError("--trt cannot build an engine here: missing " + " and ".join(missing))
    if max_batch < 1:
        raise BoxcasegError(f"--max-batch must be >= 1 (got {max_batch})")
    ckpt, out = Path(ckpt), Path(out)
    check_output_file(out, "-o")  # before any work; never over the checkpoint
    trt_out = (Path(engine_out) if engine_out else out.with_suffix(".engine")) if trt else None
    if trt_out is not None:
        check_output_file(trt_out, "--engine-out")
    check_outputs({"-o": out, "--engine-out": trt_out}, {"CKPT": ckpt})
    if alpha is not None:
        check_setting("alpha", alpha, "--alpha")
    if infer_size is not None:
        check_setting("infer_size", infer_size, "--infer-size")
    model, cfg = load_checkpoint_model(str(ckpt))  # its own settings checked (config_from_checkpoint)
    if alpha is not None:
        model.alpha = cfg.model.alpha = float(alpha)
    size = int(infer_size if infer_size is not None else cfg.model.infer_size)
    what = "--infer-size" if infer_size is not None else "model.infer_size"
    with torch.no_grad():
        wrapper = ProxyExportModel(model, size, full_resolution=full_resolution, flip_tta=flip_tta).eval()
    if size % wrapper.stride:
        raise BoxcasegError(f"{ckpt}: {what} {size} is not a multiple of the output stride {wrapper.stride}")
    proto, exporter = to_onnx_proto(wrapper, size, prefer_dynamo)
    meta = _metadata(cfg, wrapper, exporter, file_sha256(ckpt), size)
    del proto.metadata_props[:]
    strip_node_metadata(proto)
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    skipped = None
    if check and not onnxruntime_available():
        skipped = "onnxruntime is not installed"
        log.warning("ONNX Runtime vs PyTorch check skipped: %s (%s); onnx.checker passed", skipped, ONNXRUNTIME_HINT)
        check = False
    diff = parity_check(data, model, size, full_resolution=full_resolution, flip_tta=flip_tta) if check else float("nan")
    if check and not diff <= PARITY_TOL:
        raise BoxcasegError(f"{ckpt}: ONNX Runtime differs from PyTorch by {diff:.3g} (> {PARITY_TOL:g})")
    atomic_write_bytes(out, data)
    report = ExportReport(out, size, wrapper.stride, exporter, diff, wrapper.bn_folded, wrapper.bn_left, metadata=meta,
                          check_skipped=skipped)
    if trt:
        engine_out = Path(engine_out) if engine_out else out.with_suffix(".engine")
        half_proto = None
        if fp16:
            half_proto = lambda: to_onnx_proto(wrapper.half_precision_copy(), size, prefer_dynamo)[0]  # noqa: E731
        build_trt_engine(out, engine_out, meta, fp16=fp16, max_batch=max_batch, half_onnx=half_proto)
        report.engine_path = engine_out
    return report


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    """The ``boxcaseg.*`` metadata of an exported file; BoxcasegError if it is not one."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise BoxcasegError(f"{path}: model file not found")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises assorted errors on garbage
        raise BoxcasegError(f"{path}: not a valid ONNX model ({type(e).__name__})") from e
    meta = {p.key: p.value for p in proto.metadata_props}
    if "boxcaseg.infer_size" not in meta or not proto.graph.input:
        raise BoxcasegError(f"{path}: an ONNX model, but not one written by `boxcaseg export` (no boxcaseg metadata)")
    return meta
