"""`boxcaseg evaluate masks | coco | voc`: mask quality given GT boxes, COCO AP, VOC instance AP."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from boxcaseg.commands.options import command_group

GT_HELP = "Ground-truth COCO instances json (RLE or polygon masks)."
JSON_HELP = "Print one JSON object instead of a table."


def evaluate_masks_command(
    gt: Path = typer.Option(..., "--gt", help=GT_HELP),
    pred: Path = typer.Option(..., "--pred", help="Predicted masks: a COCO json (e.g. a proxy json) whose "
                              "annotation ids match the GT's."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    strict: bool = typer.Option(False, "--strict", help="A prediction without a segmentation or with an "
                                "unreadable RLE, or an id that repeats, is an error (default: scored 0 and counted "
                                "in the table's header; a repeat: the first scored)."),
) -> None:
    """Class-agnostic mask quality given GT boxes: mIoU*, mIoU, IoU@50, IoU@75, by COCO size.

    Each non-crowd GT annotation is compared with the predicted mask of the same
    annotation id (missing = IoU 0); predictions with other ids are counted, not scored,
    and when none has a GT annotation's id it is an error. Values are fractions in JSON,
    percentages in the table.
    """
    from boxcaseg.evaluate import mask_quality, mask_quality_table

    result = mask_quality(gt, pred, strict=strict)
    _emit(result, as_json, lambda: mask_quality_table(result))


def evaluate_coco_command(
    gt: Path = typer.Option(..., "--gt", help=GT_HELP),
    pred: Path = typer.Option(..., "--pred", help="COCO results json (list of detections with score, "
                              "RLE/polygon masks and/or boxes)."),
    iou_type: list[str] = typer.Option(["segm", "bbox"], "--type", help="segm and/or bbox."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """COCO AP (pycocotools COCOeval) for masks and boxes."""
    from boxcaseg.evaluate import coco_eval, coco_eval_table

    result = coco_eval(gt, pred, iou_type)
    _emit(result, as_json, lambda: coco_eval_table(result))


def evaluate_voc_command(
    gt: Path = typer.Option(..., "--gt", help=GT_HELP),
    pred: Path = typer.Option(..., "--pred", help="COCO results json with masks and scores."),
    thresholds: list[float] = typer.Option([0.25, 0.5, 0.7, 0.75], "--iou", help="Mask IoU thresholds."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Instance AP at mask IoU 0.25/0.5/0.7/0.75 by the SDS protocol (the paper's Table 1)."""
    from boxcaseg.cocojson import load_coco
    from boxcaseg.evaluate import voc_ap_table, voc_instance_ap

    gt_data = load_coco(gt, "ground-truth")
    result = voc_instance_ap(gt_data, pred, thresholds)
    _emit(result, as_json, lambda: voc_ap_table(result, gt_data.categories))


def _emit(result: dict, as_json: bool, table) -> None:
    if as_json:
        typer.echo(json.dumps(result))
    else:
        from rich.console import Console

        Console().print(table())


def register(app: typer.Typer) -> None:
    """Add the `evaluate` command group to the main app."""
    command_group(app, "evaluate", "Score masks and detections against a COCO ground truth (one mask-IoU function "
                  "for all).", {"masks": evaluate_masks_command, "coco": evaluate_coco_command, "voc": evaluate_voc_command})
