"""The printed tables of the metrics (rich Tables; values as percentages)."""

from __future__ import annotations

import math

from boxcaseg.evaluate.metrics import COCO_STAT_NAMES, SIZE_NAMES


def _pct(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def mask_quality_table(result: dict):
    """A rich Table of :func:`~boxcaseg.evaluate.metrics.mask_quality`'s result (percentages)."""
    from rich.table import Table

    title = "Mask quality given GT boxes (class-agnostic)"
    bad = [f"{result[k]} prediction(s) {what}" for k, what in (("without_mask", "without a segmentation"),
                                                                  ("unreadable_mask", "with an unreadable RLE"))
           if result.get(k)]
    if bad:
        title += "\n" + " and ".join(bad) + " scored 0 (--strict: an error)"
    t = Table(title=title)
    for col in ("subset", "n", "mIoU*", "mIoU", "IoU@50", "IoU@75"):
        t.add_column(col, justify="right" if col != "subset" else "left")
    for name, r in [("all", result)] + [(s, result[s]) for s in SIZE_NAMES]:
        t.add_row(name, str(r["n"]), _pct(r["miou_star"]), _pct(r["miou"]), _pct(r["iou50"]), _pct(r["iou75"]))
    caption = []
    if result.get("missing"):
        caption.append(f"{result['missing']} GT instance(s) without a prediction counted as IoU 0")
    for key, what in (("unmatched_predictions", "whose id is no GT annotation's"),
                      ("duplicate_predictions", "repeating an id (the first is scored)"),
                      ("crowd_predictions", "for a crowd GT annotation")):
        if result.get(key):
            caption.append(f"{result[key]} prediction(s) {what}: not scored")
    if caption:
        t.caption = "\n".join(caption)
    return t


def coco_eval_table(result: dict):
    """A rich Table of :func:`~boxcaseg.evaluate.metrics.coco_eval`'s result: one row per COCO statistic."""
    from rich.table import Table

    t = Table(title="COCO AP (pycocotools)")
    t.add_column("metric")
    for iou_type in result:
        t.add_column(iou_type, justify="right")
    for k in COCO_STAT_NAMES:
        row = []
        for stats in result.values():
            v = None if stats is None else stats[k]
            row.append("n/a" if stats is None else ("-" if v < 0 else _pct(v)))
        t.add_row(k, *row)
    return t


def voc_ap_table(result: dict, categories: dict | None = None):
    """A rich Table of :func:`~boxcaseg.evaluate.metrics.voc_instance_ap`'s result: a row per class, then the mean."""
    from rich.table import Table

    keys = [k for k in result if k.startswith("ap")]
    t = Table(title="VOC instance AP (SDS protocol)")
    t.add_column("class")
    for k in keys:
        t.add_column(f"AP@{int(k[2:]) / 100:g}", justify="right")
    for c, aps in result["per_class"].items():
        name = (categories or {}).get(c, {}).get("name", str(c))
        t.add_row(name, *(_pct(aps[k]) for k in keys))
    t.add_row("[bold]mean[/bold]", *(_pct(result[k]) for k in keys))
    return t
