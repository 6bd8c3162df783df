"""`Segmenter`: masks for a few boxes of one image, from Python.

    from boxcaseg import Segmenter
    seg = Segmenter()                                   # the shipped model, its settings
    masks = seg.predict("street.jpg", [[48, 30, 120, 200], [300, 60, 80, 90]])  # xywh
    masks.shape, masks.dtype                            # (2, H, W) bool

The same code path as ``boxcaseg proxy`` and ``boxcaseg segment``: the model is resolved
by :func:`boxcaseg.export.engines.resolve_model`, the boxes become windows with
:func:`boxcaseg.proxy.coco.build_tasks`, crops are made by
:func:`boxcaseg.data.transforms.crop_resize`, and maps become masks with
:func:`boxcaseg.proxy.postprocess.masks_from_probs` (and, with ``merge=True``,
:func:`boxcaseg.proxy.merge_drop.merge_and_drop`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from boxcaseg.errors import BoxcasegError

BOX_FORMATS = ("xywh", "xyxy")


def as_rgb_image(image: Any, what: str = "image"):
    """A path, a PIL image or an HxWx3 (or HxW) uint8 array -> PIL RGB image.

    A file or a PIL image with an EXIF orientation is turned upright (as displayed: the
    frame people draw boxes in; :mod:`boxcaseg.images`).
    """
    from PIL import Image

    from boxcaseg.data.transforms import open_rgb, to_rgb
    from boxcaseg.images import upright

    if isinstance(image, (str, Path)):
        return open_rgb(image, what)
    if isinstance(image, Image.Image):
        return to_rgb(upright(image))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise BoxcasegError(f"{what}: expected an HxWx3 uint8 array, got {image.dtype} {list(image.shape)}")
        if image.shape[0] < 1 or image.shape[1] < 1:
            raise BoxcasegError(f"{what}: empty array {list(image.shape)}")
        return to_rgb(Image.fromarray(np.ascontiguousarray(image)))
    raise BoxcasegError(f"{what}: expected a file path, a PIL image or a uint8 array, got {type(image).__name__}")


def boxes_xywh(boxes: Any, box_format: str = "xywh") -> np.ndarray:
    """Boxes [K, 4] in ``box_format`` -> float64 COCO xywh; malformed input raises BoxcasegError."""
    if box_format not in BOX_FORMATS:
        raise BoxcasegError(f"box_format {box_format!r}: choose from {', '.join(BOX_FORMATS)}")
    try:
        arr = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise BoxcasegError(f"boxes: not numbers ({e})") from e
    if arr.size == 0:  # no boxes: [], [[]] or an empty K x 4 array alike
        arr = arr.reshape(0, 4)
    if arr.ndim == 1 and arr.size == 4:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise BoxcasegError(f"boxes: expected K x 4 numbers ({box_format}), got shape {list(arr.shape)}")
    if box_format == "xyxy":
        arr = np.stack([arr[:, 0], arr[:, 1], arr[:, 2] - arr[:, 0], arr[:, 3] - arr[:, 1]], 1)
    return arr


class Segmenter:
    """A BoxCaseg model ready to turn boxes into masks.

    model: None / ``"pretrained"`` (the model shipped with boxcaseg), a checkpoint, an
    ``.onnx`` file or a TensorRT plan. engine: ``auto`` (by file; see
    :func:`~boxcaseg.export.engines.resolve_model`), ``torch``, ``onnx`` or ``trt``.
    precision: ``fp32`` (default), ``int8`` (the shipped model's int8 graph on ONNX
    Runtime's CPU provider, or ``model`` = your own int8 graph), ``fp16`` / ``bf16`` (the
    torch engine); the masks of anything but fp32 differ a little.
    context / threshold / prior_weight: None takes the model's own settings.
    """

    def __init__(self, model: str | Path | None = None, *, engine: str = "auto", device: str | None = None,
                 precision: str = "fp32", threads: int = 0, context: float | None = None,
                 threshold: float | None = None, prior_weight: float | None = None, batch_size: int = 32):
        from boxcaseg.export.engines import load_engine, resolve_model
        from boxcaseg.infer_settings import check_setting

        self.model = resolve_model(model, engine, device, precision)
        self.precision = self.model.precision
        st = self.model.settings
        self.context = st.context if context is None else float(context)
        self.threshold = st.threshold if threshold is None else float(threshold)
        self.prior_weight = st.prior_weight if prior_weight is None else float(prior_weight)
        for name in ("context", "threshold", "prior_weight"):
            check_setting(name, getattr(self, name))
        if batch_size < 1:
            raise BoxcasegError(f"batch_size {batch_size}: must be >= 1")
        self.batch_size = int(batch_size)
        self.engine = load_engine(self.model.kind, self.model.path, threads=threads, device=device,
                                  precision=self.precision)
        self.infer_size = int(self.engine.infer_size)

    def describe(self) -> str:
        """One line: the model, the engine and the settings in force."""
        st = self.model.settings
        return (f"model {self.model.label} on {self.engine.description}: S={st.infer_size}, context {self.context:g}, "
                f"threshold {self.threshold:g}, prior weight {self.prior_weight:g}, alpha {st.alpha:g}")

    def predict(self, image: Any, boxes: Sequence, box_format: str = "xywh", merge: bool = False) -> np.ndarray:
        """Masks [K, H, W] bool for ``boxes`` (K x 4, ``box_format`` xywh or xyxy) on ``image``.

        ``image``: a path, a PIL image or an HxWx3 uint8 RGB array. A box partly outside
        the image is clipped to it (the mask stays inside the box); a box of zero size,
        non-finite or entirely outside raises BoxcasegError naming it. ``merge``: a pixel
        claimed by several boxes goes to the smallest (the proxy's merge); default off,
        every box gets its own mask.
        """
        return self.predict_with_agreement(image, boxes, box_format, merge)[0]

    def predict_with_agreement(self, image: Any, boxes: Sequence, box_format: str = "xywh",
                               merge: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`predict` and each mask's box agreement (IoU of its tight box and the box)."""
        from boxcaseg.boxes import degenerate_reason
        from boxcaseg.data.transforms import crop_resize
        from boxcaseg.proxy.coco import build_tasks
        from boxcaseg.proxy.merge_drop import merge_and_drop
        from boxcaseg.proxy.postprocess import masks_from_probs

        img = as_rgb_image(image)
        W, H = img.size
        xywh = boxes_xywh(boxes, box_format)
        data = {"images": [{"id": 0, "file_name": "", "width": W, "height": H}],
                "annotations": [{"id": k, "image_id": 0, "bbox": [float(v) for v in b]} for k, b in enumerate(xywh)]}
        given = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        for k, b in enumerate(xywh):
            reason = degenerate_reason(b, W, H)
            if reason is not None:
                raise BoxcasegError(f"box {k} {[round(float(v), 3) for v in given[k]]} ({box_format}) "
                                    f"on a {W}x{H} image: {reason.removeprefix('bbox ')}")
        (task,) = build_tasks(data, self.context, True, "boxes")
        n = len(task.crops)
        S = self.infer_size
        batch = np.zeros((n, 3, S, S), np.uint8)
        for k in range(n):
            batch[k] = np.asarray(crop_resize(img, tuple(int(v) for v in task.crops[k]), S)).transpose(2, 0, 1)
        probs = [self.engine.predict(batch[i:i + self.batch_size]) for i in range(0, n, self.batch_size)]
        probs = np.concatenate(probs, 0) if probs else np.zeros((0, 1, 1, 1), np.float32)
        local = masks_from_probs(probs, task.crops, task.boxes, self.threshold, False, S, self.engine.output_stride,
                                 task.gt_xyxy, self.prior_weight)
        local, agreement = merge_and_drop(task.boxes, local, task.gt_xyxy, task.areas, merge=merge)
        out = np.zeros((n, H, W), bool)
        for k, m in enumerate(local):
            x0, y0, x1, y1 = (int(v) for v in task.boxes[k])
            out[k, y0:y1, x0:x1] = m.astype(bool)
        return out, agreement

