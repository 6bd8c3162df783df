"""Evaluation: class-agnostic mask quality given GT boxes, COCO AP, VOC instance AP.

- :mod:`boxcaseg.evaluate.metrics`: mIoU*, mIoU, IoU@50/75 (:func:`mask_quality`),
  COCOeval glue (:func:`coco_eval`), SDS instance AP@k (:func:`voc_instance_ap`);
- :mod:`boxcaseg.evaluate.tables`: their printed tables.

The jsons are read by :mod:`boxcaseg.cocojson`. The public names below are what
``boxcaseg evaluate``, the bench scripts and the tests import from ``boxcaseg.evaluate``.
"""

from boxcaseg.evaluate.metrics import (
    COCO_STAT_NAMES,
    MEDIUM_MAX,
    SIZE_NAMES,
    SMALL_MAX,
    VOC_THRESHOLDS,
    InstanceIoU,
    coco_eval,
    instance_ious,
    mask_quality,
    summarize_ious,
    voc_ap,
    voc_instance_ap,
)
from boxcaseg.evaluate.tables import coco_eval_table, mask_quality_table, voc_ap_table

__all__ = [
    "COCO_STAT_NAMES", "MEDIUM_MAX", "SIZE_NAMES", "SMALL_MAX", "VOC_THRESHOLDS",
    "InstanceIoU", "instance_ious", "summarize_ious", "mask_quality",
    "coco_eval", "voc_ap", "voc_instance_ap", "mask_quality_table", "coco_eval_table", "voc_ap_table",
]
