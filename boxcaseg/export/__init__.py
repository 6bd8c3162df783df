"""Export a trained BoxCaseg to ONNX / TensorRT, and the inference engines that run it.

- :func:`export_onnx` (checkpoint -> ``.onnx`` [+ TensorRT plan]),
- :class:`ProxyExportModel` (the export-only inference module),
- :func:`load_engine` -> :class:`TorchEngine` / :class:`OnnxEngine` / :class:`TrtEngine`,
  each ``predict(batch [B, 3, S, S] uint8|float 0..255) -> probs [B, 1, S/4, S/4]``.
"""

from boxcaseg.export.engines import ENGINE_KINDS, OnnxEngine, TorchEngine, TrtEngine, load_engine
from boxcaseg.export.onnx_export import ExportReport, export_onnx, read_onnx_metadata
from boxcaseg.export.tensorrt import build_trt_engine, trt_missing
from boxcaseg.export.wrapper import ProxyExportModel

__all__ = [
    "ENGINE_KINDS", "ExportReport", "OnnxEngine", "ProxyExportModel", "TorchEngine", "TrtEngine",
    "build_trt_engine", "export_onnx", "load_engine", "read_onnx_metadata", "trt_missing",
]
