"""The one inference path: boxes -> masks, in two stages that every caller composes.

- :func:`crop_masks`: maps -> box-local masks for any crops (of one image or of many), with
  the :class:`~boxcaseg.infer_settings.InferSettings` in force
  (:func:`~boxcaseg.proxy.postprocess.masks_from_probs`);
- :func:`finish_image`: one image's box-local masks -> merged masks, box agreements and
  the drop rule's ``ignore_mask`` flags (:func:`~boxcaseg.proxy.merge_drop.merge_masks`,
  :func:`~boxcaseg.proxy.merge_drop.ignore_flags`).

:func:`image_masks` runs the whole path for one image (the windows of
:func:`~boxcaseg.proxy.tasks.image_task`, the crops of :func:`~boxcaseg.proxy.decode.cut_crops`,
the engine, the two stages): :class:`boxcaseg.Segmenter` and so ``boxcaseg segment`` call it.
The proxy run's chunk writer (:mod:`boxcaseg.proxy.chunk_writer`) calls the same two stages:
:func:`crop_masks` on each batch, whose crops come from many images, and :func:`finish_image`
on each image at its chunk's end. A change to a window, a crop or a post-processing step is
made in one of these functions and reaches the proxy run, ``Segmenter`` and ``segment`` alike.
"""

from __future__ import annotations

import numpy as np

from boxcaseg.infer_settings import InferSettings
from boxcaseg.proxy.options import DROP_SLACK, DROP_THRESH
from boxcaseg.proxy.tasks import ImageTask, image_task


def crop_masks(probs: np.ndarray, refs: list[tuple[ImageTask, int]], settings: InferSettings, *, stride: int,
               relative: bool = False) -> list[np.ndarray]:
    """Box-local masks (uint8, the box window's size) for ``refs`` [(task, slot)], the crops of
    one image or of many, from their maps ``probs`` [len(refs), 1, h, w] (same order)."""
    from boxcaseg.proxy.postprocess import masks_from_probs

    crops = np.stack([t.crops[s] for t, s in refs])
    boxes = np.stack([t.boxes[s] for t, s in refs])
    gt = np.stack([t.gt_xyxy[s] for t, s in refs])
    return masks_from_probs(probs, crops, boxes, settings, stride=stride, relative=relative, gt_xyxy=gt)


def finish_image(task: ImageTask, masks: list[np.ndarray], *, merge: bool, drop_thresh: float = DROP_THRESH,
                 drop_slack: float = DROP_SLACK) -> tuple[list, np.ndarray, np.ndarray]:
    """One image's box-local ``masks`` (one per usable box, in slot order) -> the masks as
    written (``merge``: a pixel claimed by several boxes goes to the smallest), each box's
    agreement with its mask, and its ``ignore_mask`` flag (agreement below the box's drop
    threshold: ``drop_thresh`` with ``drop_slack`` px forgiven per axis)."""
    from boxcaseg.proxy.merge_drop import ignore_flags, merge_masks

    merged, agreement = merge_masks(task.boxes, masks, task.gt_xyxy, task.areas, merge=merge)
    return merged, agreement, ignore_flags(agreement, task.gt_xyxy, drop_thresh, drop_slack)


def image_masks(img, boxes_xywh: np.ndarray, settings: InferSettings, engine, *, batch_size: int = 32,
                merge: bool = False, relative: bool = False, drop_thresh: float = DROP_THRESH,
                drop_slack: float = DROP_SLACK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masks [K, H, W] bool, box agreements [K] and ``ignore_mask`` flags [K] bool for
    ``boxes_xywh`` [K, 4] (COCO xywh, checked by the caller) on ``img`` (PIL RGB, W x H), with
    ``settings`` (context, threshold, prior weight, S) and ``engine`` (``predict(batch [B, 3, S, S])
    -> probs``, batches of at most ``batch_size``). ``merge``: a pixel claimed by several boxes
    goes to the smallest; ``relative``: threshold the per-instance min-max normalised map;
    ``drop_thresh`` / ``drop_slack``: the drop rule of :func:`finish_image`."""
    from boxcaseg.proxy.decode import cut_crops

    W, H = img.size
    task = image_task(W, H, boxes_xywh, settings.context)
    n = len(task.crops)
    out = np.zeros((n, H, W), bool)
    if n == 0:
        return out, np.zeros(0), np.zeros(0, bool)
    batch = cut_crops(img, task.crops, settings.infer_size)
    probs = np.concatenate([engine.predict(batch[i:i + batch_size]) for i in range(0, n, batch_size)], 0)
    local = crop_masks(probs, [(task, s) for s in range(n)], settings, stride=engine.output_stride, relative=relative)
    merged, agreement, flags = finish_image(task, local, merge=merge, drop_thresh=drop_thresh, drop_slack=drop_slack)
    for k, m in enumerate(merged):
        x0, y0, x1, y1 = (int(v) for v in task.boxes[k])
        out[k, y0:y1, x0:x1] = m.astype(bool)
    return out, agreement, flags
