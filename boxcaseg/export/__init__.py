"""Export a trained BoxCaseg to ONNX / TensorRT (int8 graphs: :mod:`~boxcaseg.export.quantize`),
and the inference engines that run the files (:mod:`~boxcaseg.export.engines`; which file a model
name means and the ONNX cache: :mod:`boxcaseg.model_files`).

- :func:`export_onnx` (checkpoint -> ``.onnx`` [+ TensorRT plan]),
- :class:`ProxyExportModel` (the export-only inference module),
- :func:`load_engine` -> :class:`TorchEngine` / :class:`OnnxEngine` / :class:`TrtEngine`,
  each ``predict(batch [B, 3, S, S] uint8|float 0..255) -> probs [B, 1, S/4, S/4]``.
"""

import importlib

# name -> the submodule it lives in, loaded on first use (importing one submodule loads only it)
_EXPORTS = {
    "ENGINE_KINDS": "engines", "OnnxEngine": "engines", "TorchEngine": "engines", "TrtEngine": "engines",
    "load_engine": "engines",
    "ExportReport": "onnx_export", "export_onnx": "onnx_export", "read_onnx_metadata": "onnx_export",
    "build_trt_engine": "tensorrt", "trt_missing": "tensorrt",
    "ProxyExportModel": "wrapper",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
