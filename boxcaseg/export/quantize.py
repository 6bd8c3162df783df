"""int8 ONNX graphs for CPUs: ONNX Runtime static quantization calibrated on real crops.

:func:`quantize_onnx` turns an exported float32 graph (``boxcaseg export``) into a QDQ
int8 graph: weights int8 per output channel, activations uint8 with ranges calibrated
(min/max) on ``n`` crops of real boxes, cut exactly as a proxy run cuts them (the same
task list, context and :func:`~boxcaseg.data.transforms.crop_resize`). The graph keeps its
float32 input (RGB 0..255) and output (probabilities) and every ``boxcaseg.*`` metadata
entry, so every engine, ``proxy`` and ``segment`` take it like the float32 file;
``boxcaseg.quantization`` says how it was made (crops, their source, method, library
versions: the same versions give the same bytes). :func:`quantize_calibrated` is the
whole recipe (``boxcaseg export --int8``, the shipped model's int8 graph).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np

from boxcaseg.errors import BoxcasegError

log = logging.getLogger(__name__)

QUANT_KEY = "boxcaseg.quantization"  # metadata entry of an int8 graph: how it was made


def is_quantized(meta: dict) -> bool:
    """Whether ONNX metadata (:func:`~boxcaseg.export.onnx_export.read_onnx_metadata`) is an int8 graph's."""
    return QUANT_KEY in meta


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


def quantize_calibrated(onnx_in: str | Path, onnx_out: str | Path, calib_ann: str | Path, calib_images: str | Path,
                        n: int = 256, seed: int = 0) -> Path:
    """The int8 graph of ``onnx_in`` calibrated on ``n`` crops of ``calib_ann``'s boxes, cut at the
    graph's size and context (:func:`calibration_crops`, seeded: the same inputs give the same bytes)."""
    from boxcaseg.export.onnx_export import read_onnx_metadata

    meta = read_onnx_metadata(onnx_in)
    crops = calibration_crops(calib_ann, calib_images, int(meta["boxcaseg.infer_size"]),
                              float(meta.get("boxcaseg.context", 1.0)), n, seed)
    source = "/".join(Path(calib_ann).parts[-2:])  # no machine's folders in the file
    return quantize_onnx(onnx_in, onnx_out, crops, f"{source}, seed {seed}")
