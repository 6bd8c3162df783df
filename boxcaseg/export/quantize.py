"""int8 ONNX graphs for CPUs: ONNX Runtime static quantization calibrated on real crops.

:func:`quantize_onnx` turns an exported float32 graph (``boxcaseg export``) into a QDQ
int8 graph: weights int8 per output channel, activations uint8 with ranges calibrated
(min/max) on ``n`` crops of real boxes, cut exactly as a proxy run cuts them (the same
task list, context and :func:`~boxcaseg.data.transforms.crop_resize`). The graph keeps its
float32 input (RGB 0..255) and output (probabilities) and every ``boxcaseg.*`` metadata
entry, so every engine, ``proxy`` and ``segment`` take it like the float32 file;
``boxcaseg.quantization`` says how it was made.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np

from boxcaseg.errors import BoxcasegError

log = logging.getLogger(__name__)


def calibration_crops(ann: str | Path, images: str | Path, size: int, context: float, n: int,
                      seed: int = 0) -> np.ndarray:
    """``n`` crops (uint8 [n, 3, S, S]) of usable boxes of ``ann``: images in a seeded random
    order, every usable box of each until ``n`` are cut."""
    from boxcaseg.cocojson import load_coco
    from boxcaseg.paths import check_image_paths
    from boxcaseg.proxy.coco import build_tasks
    from boxcaseg.proxy.decode import DecodeDataset

    coco = load_coco(ann, "calibration")
    tasks = [t for t in build_tasks(coco.data, context, False, ann) if t.usable]
    random.Random(seed).shuffle(tasks)
    crops: list[np.ndarray] = []
    count = 0
    for start in range(0, len(tasks), 16):
        batch = tasks[start:start + 16]
        paths = check_image_paths(images, ((t.image_id, t.file_name) for t in batch))
        ds = DecodeDataset(batch, paths, size)
        for i in range(len(ds)):
            item = ds[i]
            if "error" in item:
                raise BoxcasegError(f"calibration: {item['error']}")
            arr = item["crops"].numpy()
            crops.append(arr)
            count += len(arr)
            if count >= n:
                return np.concatenate(crops)[:n]
    if not crops:
        raise BoxcasegError(f"{ann}: no usable box to calibrate on")
    return np.concatenate(crops)


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


def quantize_onnx(onnx_in: str | Path, onnx_out: str | Path, crops: np.ndarray) -> Path:
    """The int8 QDQ graph of ``onnx_in`` (float32, from ``boxcaseg export``) calibrated on
    ``crops`` (uint8 [n, 3, S, S] at the graph's S), written atomically to ``onnx_out``."""
    import tempfile

    import onnx

    from boxcaseg.export.onnx_export import INPUT_NAME, read_onnx_metadata
    from boxcaseg.export.ort import import_onnxruntime
    from boxcaseg.io import atomic_write_bytes

    import_onnxruntime("--int8")
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
    kept = {p.key for p in proto.metadata_props}
    for key, value in meta.items():
        if key not in kept:
            proto.metadata_props.add(key=key, value=value)
    proto.metadata_props.add(key="boxcaseg.quantization",
                             value=f"int8 static QDQ (per-channel int8 weights, uint8 activations, "
                                   f"min/max on {len(crops)} crops)")
    atomic_write_bytes(onnx_out, proto.SerializeToString())
    return Path(onnx_out)
