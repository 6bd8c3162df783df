"""`Segmenter`: masks for a few boxes of one image, from Python.

    from boxcaseg import Segmenter
    seg = Segmenter()                                   # the shipped model, its settings
    masks = seg.predict("street.jpg", [[48, 30, 120, 200], [300, 60, 80, 90]])  # xywh
    masks.shape, masks.dtype                            # (2, H, W) bool

The same code path as ``boxcaseg proxy`` and ``boxcaseg segment``: the model is resolved
by :func:`boxcaseg.model_files.resolve_model`, its :class:`~boxcaseg.infer_settings.InferSettings`
merged with the arguments given, and the boxes become masks through
:func:`boxcaseg.proxy.image_masks.image_masks` (the proxy run's windows, crops,
post-processing and merge).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from boxcaseg.errors import BoxcasegError
from boxcaseg.proxy.options import DROP_SLACK, DROP_THRESH, check_drop_rule

BOX_FORMATS = ("xywh", "xyxy")


def as_rgb_image(image: Any, what: str = "image"):
    """A path, a PIL image or an array [H, W] / [H, W, C] (C = 1..4: grey, grey + alpha, RGB,
    RGBA; uint8, 16-bit, 32-bit or float) -> PIL RGB image, by the one pixel rule
    (:func:`boxcaseg.images.to_rgb8`: 8-bit unchanged, other types scaled).

    A file or a PIL image with an EXIF orientation is turned upright (as displayed: the
    frame people draw boxes in; :mod:`boxcaseg.images`).
    """
    from PIL import Image

    from boxcaseg.images import open_rgb, to_rgb_image, upright

    if isinstance(image, (str, Path)):
        return open_rgb(image, what)
    if isinstance(image, Image.Image):
        return to_rgb_image(upright(image), what)
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3):
            raise BoxcasegError(f"{what}: expected an HxW or HxWxC array, got {image.dtype} {list(image.shape)}")
        if image.shape[0] < 1 or image.shape[1] < 1:
            raise BoxcasegError(f"{what}: empty array {list(image.shape)}")
        return to_rgb_image(image, what)
    raise BoxcasegError(f"{what}: expected a file path, a PIL image or an array, got {type(image).__name__}")


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
    :func:`~boxcaseg.model_files.resolve_model`), ``torch``, ``onnx`` or ``trt``.
    precision: ``fp32`` (default), ``int8`` (the shipped model's int8 graph on ONNX
    Runtime's CPU provider, or ``model`` = your own int8 graph), ``fp16`` / ``bf16`` (the
    torch engine); the masks of anything but fp32 differ a little.
    context / threshold / prior_weight: None takes the model's own settings. relative:
    threshold the per-instance min-max normalised map (``boxcaseg proxy --relative``).
    drop_thresh / drop_slack: the proxy's drop rule (``--drop-thresh`` / ``--drop-slack``),
    which flags a mask ``ignore_mask`` (:meth:`predict_with_flags`).
    """

    def __init__(self, model: str | Path | None = None, *, engine: str = "auto", device: str | None = None,
                 precision: str = "fp32", threads: int = 0, context: float | None = None,
                 threshold: float | None = None, prior_weight: float | None = None, relative: bool = False,
                 drop_thresh: float = DROP_THRESH, drop_slack: float = DROP_SLACK, batch_size: int = 32):
        from boxcaseg.export.engines import capped_batch_size, load_engine
        from boxcaseg.model_files import resolve_model

        self._drop = check_drop_rule(drop_thresh, drop_slack, ("drop_thresh", "drop_slack"))  # before any work
        self.relative = bool(relative)
        self.model = resolve_model(model, engine, device, precision)
        self.precision = self.model.precision
        # the settings in force: the model's, merged with what was given here (None keeps the model's)
        self.settings = self.model.settings.merged(context=context, threshold=threshold, prior_weight=prior_weight)
        self.settings.check()
        if batch_size < 1:
            raise BoxcasegError(f"batch_size {batch_size}: must be >= 1")
        self.batch_size = int(batch_size)
        self.engine = load_engine(self.model.kind, self.model.path, threads=threads, device=device,
                                  precision=self.precision)
        self.infer_size = int(self.engine.infer_size)
        self.batch_size = capped_batch_size(self.batch_size, self.infer_size, "batch_size")

    # the overridable settings as attributes, as before (setting one merges it into self.settings, checked)
    def _set(self, name: str, value: float) -> None:
        self.settings = self.settings.merged(**{name: value}).check()

    context = property(lambda self: self.settings.context, lambda self, v: self._set("context", v))
    threshold = property(lambda self: self.settings.threshold, lambda self, v: self._set("threshold", v))
    prior_weight = property(lambda self: self.settings.prior_weight, lambda self, v: self._set("prior_weight", v))

    # the drop rule, checked when set
    def _set_drop(self, thresh: float, slack: float) -> None:
        self._drop = check_drop_rule(thresh, slack, ("drop_thresh", "drop_slack"))

    drop_thresh = property(lambda self: self._drop[0], lambda self, v: self._set_drop(v, self._drop[1]))
    drop_slack = property(lambda self: self._drop[1], lambda self, v: self._set_drop(self._drop[0], v))

    def describe(self) -> str:
        """One line: the model, the engine and the settings in force."""
        return f"model {self.model.label} on {self.engine.description}: {self.settings.describe()}"

    def predict(self, image: Any, boxes: Sequence, box_format: str = "xywh", merge: bool = False) -> np.ndarray:
        """Masks [K, H, W] bool for ``boxes`` (K x 4, ``box_format`` xywh or xyxy) on ``image``.

        ``image``: a path, a PIL image or an array (HxWx3 uint8 RGB; grey, RGBA, 16-bit and
        float arrays by :func:`~boxcaseg.images.to_rgb8`). A box partly outside the image
        is clipped to it (the mask stays inside the box); a box of zero size,
        non-finite or entirely outside raises BoxcasegError naming it. ``merge``: a pixel
        claimed by several boxes goes to the smallest (the proxy's merge); default off,
        every box gets its own mask.
        """
        return self.predict_with_flags(image, boxes, box_format, merge)[0]

    def predict_with_agreement(self, image: Any, boxes: Sequence, box_format: str = "xywh",
                               merge: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`predict` and each mask's box agreement (IoU of its tight box and the box)."""
        return self.predict_with_flags(image, boxes, box_format, merge)[:2]

    def predict_with_flags(self, image: Any, boxes: Sequence, box_format: str = "xywh",
                           merge: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`predict`, each mask's box agreement and its ``ignore_mask`` flag [K] bool: the
        agreement below the box's drop threshold (:attr:`drop_thresh`, lowered for a small box
        by :attr:`drop_slack` px per axis), the verdict ``boxcaseg proxy`` writes."""
        from boxcaseg.boxes import degenerate_reason
        from boxcaseg.proxy.image_masks import image_masks

        img = as_rgb_image(image)
        W, H = img.size
        xywh = boxes_xywh(boxes, box_format)
        given = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        for k, b in enumerate(xywh):
            reason = degenerate_reason(b, W, H)
            if reason is not None:
                raise BoxcasegError(f"box {k} {[round(float(v), 3) for v in given[k]]} ({box_format}) "
                                    f"on a {W}x{H} image: {reason.removeprefix('bbox ')}")
        return image_masks(img, xywh, self.settings, self.engine, batch_size=self.batch_size, merge=merge,
                           relative=self.relative, drop_thresh=self.drop_thresh, drop_slack=self.drop_slack)
