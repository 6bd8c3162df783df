"""`boxcaseg visualize`: PNG overlays of proxy masks (and GT masks beside them)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from boxcaseg.commands.options import add_command


def visualize_command(
    ann: Path = typer.Option(..., "--ann", help="COCO json with masks to show (a proxy json, a GT json, ...)."),
    images: Path = typer.Option(..., "--images", help="Image folder of --ann."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the PNGs."),
    gt: Optional[Path] = typer.Option(None, "--gt", help="GT json: GT masks beside the proxy masks, IoU labels "
                                      "and a contact sheet of the worst-IoU instances (worst_iou.png)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most this many images (in image-id order)."),
    worst: int = typer.Option(24, "--worst", help="Instances on the worst-IoU contact sheet (0: none)."),
) -> None:
    """PNG overlays: GT box, proxy mask, flagged (ignored) masks in red; the GT mask beside it with --gt."""
    from boxcaseg.visualize import visualize

    res = visualize(ann, images, out, gt=gt, limit=limit, worst=worst)
    sheet = f", contact sheet {res.sheet}" if res.sheet else ""
    typer.echo(f"{out}: {len(res.overlays)} overlay(s){sheet}")


def register(app: typer.Typer) -> None:
    add_command(app, "visualize", visualize_command)
