"""One image's boxes -> masks: the proxy path for a single image, used by
:class:`boxcaseg.Segmenter` (and so by ``boxcaseg segment``).

It is made of the proxy run's own parts, the one place each lives:

- the boxes' windows: :func:`boxcaseg.proxy.tasks.image_task` (as :func:`~boxcaseg.proxy.tasks.build_tasks`);
- the crops: :func:`boxcaseg.proxy.decode.cut_crops` (the decoding workers' crops);
- the maps -> box-local masks: :func:`boxcaseg.proxy.postprocess.masks_from_probs` with the
  :class:`~boxcaseg.infer_settings.InferSettings` in force (the chunk writer's call);
- merge and box agreement: :func:`boxcaseg.proxy.merge_drop.merge_and_drop` (the chunk files').

A change to crops or post-processing is made in those functions and reaches the proxy run,
``Segmenter`` and ``segment`` alike.
"""

from __future__ import annotations

import numpy as np

from boxcaseg.infer_settings import InferSettings
from boxcaseg.proxy.tasks import image_task
from boxcaseg.proxy.decode import cut_crops
from boxcaseg.proxy.merge_drop import merge_and_drop
from boxcaseg.proxy.postprocess import masks_from_probs


def image_masks(img, boxes_xywh: np.ndarray, settings: InferSettings, engine, *, batch_size: int = 32,
                merge: bool = False, relative: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Masks [K, H, W] bool and box agreements [K] for ``boxes_xywh`` [K, 4] (COCO xywh, checked
    by the caller) on ``img`` (PIL RGB, W x H), with ``settings`` (context, threshold, prior
    weight, S) and ``engine`` (``predict(batch [B, 3, S, S]) -> probs``, batches of at most
    ``batch_size``). ``merge``: a pixel claimed by several boxes goes to the smallest."""
    W, H = img.size
    task = image_task(W, H, boxes_xywh, settings.context)
    n = len(task.crops)
    batch = cut_crops(img, task.crops, settings.infer_size)
    probs = [engine.predict(batch[i:i + batch_size]) for i in range(0, n, batch_size)]
    probs = np.concatenate(probs, 0) if probs else np.zeros((0, 1, 1, 1), np.float32)
    local = masks_from_probs(probs, task.crops, task.boxes, settings, stride=engine.output_stride, relative=relative,
                             gt_xyxy=task.gt_xyxy)
    local, agreement = merge_and_drop(task.boxes, local, task.gt_xyxy, task.areas, merge=merge)
    out = np.zeros((n, H, W), bool)
    for k, m in enumerate(local):
        x0, y0, x1, y1 = (int(v) for v in task.boxes[k])
        out[k, y0:y1, x0:x1] = m.astype(bool)
    return out, agreement
