"""int8 calibration on proxy crops: the crops a proxy run would cut from real boxes
(:func:`calibration_crops`: the same task list, context and crop cutting as
:mod:`~boxcaseg.proxy.decode`), the check of a calibration set before any work
(:func:`check_calibration`), and the whole int8 recipe (:func:`quantize_calibrated`:
those crops into :func:`boxcaseg.export.quantize.quantize_onnx`; ``boxcaseg export --int8``,
the shipped model's int8 graph).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from boxcaseg.errors import BoxcasegError
from boxcaseg.infer_settings import InferSettings


@dataclass(frozen=True)
class Calibration:
    """A checked calibration set: a COCO json, its image folder, how many crops."""

    ann: Path
    images: Path
    crops: int = 256


def int8_path(onnx_out: str | Path) -> Path:
    """Where ``boxcaseg export --int8`` writes the int8 graph beside ``onnx_out``."""
    return Path(onnx_out).with_suffix(".int8.onnx")


def check_calibration(ann: str | Path | None, images: str | Path | None, crops: int, onnx_out: str | Path,
                      inputs: dict | list) -> Calibration:
    """Everything ``--int8`` needs, checked before any work (each problem: BoxcasegError, one
    line): both ``ann`` and ``images`` given, ``crops`` >= 1, the json readable and valid, its
    images inside ``images``, and the int8 output (:func:`int8_path` of ``onnx_out``) writable
    and none of ``inputs`` ({option: path}) nor of the calibration set (:func:`~boxcaseg.io.check_outputs`)."""
    from boxcaseg.cocojson import load_coco
    from boxcaseg.io import check_input_file, check_output_file, check_outputs

    if not (ann and images):
        raise BoxcasegError("--int8 needs --calib-ann and --calib-images (boxes to calibrate on)")
    if crops < 1:
        raise BoxcasegError(f"--calib-crops {crops}: must be at least 1")
    check_input_file(ann, "calibration")
    if not Path(images).is_dir():
        raise BoxcasegError(f"{images}: not a folder (--calib-images)")
    check_output_file(int8_path(onnx_out), "-o (int8)")
    check_outputs({"-o": onnx_out, "-o (int8)": int8_path(onnx_out)},
                  [*(inputs.items() if isinstance(inputs, dict) else inputs), ("--calib-ann", ann),
                   ("--calib-images", images)])
    load_coco(ann, "calibration").paths(images)
    return Calibration(Path(ann), Path(images), crops)


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
