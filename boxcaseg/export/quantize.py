"""int8 ONNX graphs for CPUs: ONNX Runtime static quantization calibrated on real crops.

:func:`quantize_onnx` turns an exported float32 graph (``boxcaseg export``) into a QDQ
int8 graph: weights int8 per output channel, activations uint8 with ranges calibrated
(min/max) on crops of real boxes, cut exactly as a proxy run cuts them
(:func:`boxcaseg.proxy.calibration.calibration_crops`). The graph keeps its
float32 input (RGB 0..255) and output (probabilities) and every ``boxcaseg.*`` metadata
entry, so every engine, ``proxy`` and ``segment`` take it like the float32 file;
``boxcaseg.quantization`` says how it was made (crops, their source, method, library
versions: the same versions give the same bytes on one machine, and on another the same
scales and zero points within the tolerances tests/test_int8.py states). :func:`boxcaseg.proxy.calibration.quantize_calibrated`
is the whole recipe (``boxcaseg export --int8``, the shipped model's int8 graph).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from boxcaseg.errors import BoxcasegError

log = logging.getLogger(__name__)

QUANT_KEY = "boxcaseg.quantization"  # metadata entry of an int8 graph: how it was made


def is_quantized(meta: dict) -> bool:
    """Whether ONNX metadata (:func:`~boxcaseg.export.onnx_export.read_onnx_metadata`) is an int8 graph's."""
    return QUANT_KEY in meta


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over crops, a batch at a time."""

    def __init__(self, input_name: str, crops: np.ndarray, batch: int = 16):
        self.input_name, self.crops, self.batch, self.pos = input_name, crops, batch, 0

    def get_next(self):
        if self.pos >= len(self.crops):
            return None
        x = self.crops[self.pos:self.pos + self.batch].astype(np.float32)
        self.pos += self.batch
        return {self.input_name: x}

    def rewind(self) -> None:
        self.pos = 0


def quantize_onnx(onnx_in: str | Path, onnx_out: str | Path, crops: np.ndarray, source: str = "") -> Path:
    """The int8 QDQ graph of ``onnx_in`` (float32, from ``boxcaseg export``) calibrated on
    ``crops`` (uint8 [n, 3, S, S] at the graph's S), written atomically to ``onnx_out``.
    ``source``: where the crops come from, for the record (e.g. "coco-train/instances.json, seed 0")."""
    import tempfile

    import onnx
    import torch

    from boxcaseg.export.onnx_export import INPUT_NAME, read_onnx_metadata, strip_node_metadata
    from boxcaseg.export.ort import import_onnxruntime
    from boxcaseg.io import atomic_write_bytes

    ort = import_onnxruntime("--int8")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    meta = read_onnx_metadata(onnx_in)
    size = int(meta["boxcaseg.infer_size"])
    if crops.ndim != 4 or crops.shape[1:] != (3, size, size):
        raise BoxcasegError(f"calibration crops are {tuple(crops.shape)}, the graph takes [n, 3, {size}, {size}]")
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        out = Path(tmp) / "int8.onnx"
        quant_pre_process(str(onnx_in), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out), _Reader(INPUT_NAME, crops), quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        proto = onnx.load(str(out))
    strip_node_metadata(proto)  # a user's graph exported elsewhere: the same bytes from the same weights
    kept = {p.key for p in proto.metadata_props}
    for key, value in meta.items():
        if key not in kept:
            proto.metadata_props.add(key=key, value=value)
    of = f" of {source}" if source else ""
    proto.metadata_props.add(key=QUANT_KEY,
                             value=f"int8 static QDQ (per-channel int8 weights, uint8 activations, "
                                   f"min/max on {len(crops)} crops{of}); onnxruntime {ort.__version__}, "
                                   f"torch {torch.__version__.split('+')[0]}")
    atomic_write_bytes(onnx_out, proto.SerializeToString())
    return Path(onnx_out)
