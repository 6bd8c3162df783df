"""int8 calibration on proxy crops: the crops a proxy run would cut from real boxes
(:func:`calibration_crops`: the same task list, context and crop cutting as
:mod:`~boxcaseg.proxy.decode`), and the whole int8 recipe (:func:`quantize_calibrated`:
those crops into :func:`boxcaseg.export.quantize.quantize_onnx`; ``boxcaseg export --int8``,
the shipped model's int8 graph).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from boxcaseg.errors import BoxcasegError
from boxcaseg.infer_settings import InferSettings


def calibration_crops(ann: str | Path, images: str | Path, size: int, context: float, n: int,
                      seed: int = 0) -> np.ndarray:
    """``n`` crops (uint8 [n, 3, S, S]) of usable boxes of ``ann``: images in a seeded random
    order, every usable box of each until ``n`` are cut."""
    from boxcaseg.cocojson import load_coco
    from boxcaseg.paths import check_image_paths
    from boxcaseg.proxy.tasks import build_tasks
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


def quantize_calibrated(onnx_in: str | Path, onnx_out: str | Path, calib_ann: str | Path, calib_images: str | Path,
                        n: int = 256, seed: int = 0) -> Path:
    """The int8 graph of ``onnx_in`` calibrated on ``n`` crops of ``calib_ann``'s boxes, cut at the
    graph's size and context (:func:`calibration_crops`, seeded: the same inputs give the same bytes)."""
    from boxcaseg.export.onnx_export import read_onnx_metadata
    from boxcaseg.export.quantize import quantize_onnx

    st = InferSettings.from_metadata(read_onnx_metadata(onnx_in), str(onnx_in))
    crops = calibration_crops(calib_ann, calib_images, st.infer_size, st.context, n, seed)
    source = "/".join(Path(calib_ann).parts[-2:])  # no machine's folders in the file
    return quantize_onnx(onnx_in, onnx_out, crops, f"{source}, seed {seed}")
