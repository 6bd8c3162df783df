"""`boxcaseg maskrcnn train | predict`: the Proxy Mask R-CNN (step 3)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from boxcaseg.commands.options import Resume, SetFields, StopAt, command_group


def maskrcnn_train_command(
    config: Optional[str] = typer.Option(None, "--config", "-c", metavar="NAME|FILE",
                                         help="A shipped config by name (maskrcnn-cpu, maskrcnn-coco: "
                                         "`boxcaseg config list`) or a TOML file."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: last.pt (checkpoint) and metrics.jsonl."),
    ann: Optional[str] = typer.Option(None, help="COCO json with boxes + masks: GT or a proxy json (data.ann)."),
    images: Optional[str] = typer.Option(None, help="Image folder of --ann (data.images)."),
    max_iters: Optional[int] = typer.Option(None, help="Schedule length (train.max_iters)."),
    batch_size: Optional[int] = typer.Option(None, help="Images per process per iteration (data.batch_size)."),
    lr: Optional[float] = typer.Option(None, help="Base learning rate (train.lr)."),
    workers: Optional[int] = typer.Option(None, help="Data loader worker processes (data.workers)."),
    resume: Resume = False,
    stop_at: StopAt = None,
    set_: SetFields = [],
) -> None:
    """Train Mask R-CNN on a COCO json (RLE or polygon masks); torchrun for several processes.

    Example: boxcaseg maskrcnn train -c maskrcnn-cpu -o runs/mr --ann proxy.json --images DIR
    """
    from rich.console import Console

    from boxcaseg import dist
    from boxcaseg.config import apply_overrides, load_config
    from boxcaseg.maskrcnn.recipe import MaskRCNNConfig
    from boxcaseg.maskrcnn.trainer import train_maskrcnn

    cfg = load_config(config, {"data.ann": ann, "data.images": images, "train.max_iters": max_iters,
                               "data.batch_size": batch_size, "train.lr": lr, "data.workers": workers},
                      cls=MaskRCNNConfig)
    apply_overrides(cfg, list(set_))
    res = train_maskrcnn(cfg, out, resume=resume, stop_at=stop_at)
    if dist.is_main():
        Console().print(f"[green]done[/]: {res.iters} iterations, loss {res.first_loss:.4f} -> "
                        f"{res.last_loss:.4f}, {res.images_per_s:.2f} img/s; checkpoint "
                        f"{res.out_dir / 'last.pt'}, metrics {res.out_dir / 'metrics.jsonl'}")
    dist.cleanup()


def maskrcnn_predict_command(
    checkpoint: Path = typer.Option(..., "--checkpoint", "--ckpt", help="A `maskrcnn train` checkpoint (last.pt)."),
    images: Path = typer.Option(..., "--images", help="Image folder."),
    out: Path = typer.Option(..., "--out", "-o", help="COCO results json to write."),
    ann: Optional[Path] = typer.Option(None, "--ann", help="COCO json naming the images and their ids "
                                       "(e.g. the GT to evaluate against); default: every image of "
                                       "--images, ids 1..N in name order."),
    score_thresh: Optional[float] = typer.Option(None, help="Minimum detection score."),
    mask_thresh: Optional[float] = typer.Option(None, help="Mask probability threshold."),
    batch_size: Optional[int] = typer.Option(None, help="Images per forward pass."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
) -> None:
    """Write a COCO results json (RLE masks, boxes, scores) for `evaluate coco` / `evaluate voc`."""
    from boxcaseg.maskrcnn.predict import predict_maskrcnn

    results = predict_maskrcnn(checkpoint, images, out, ann, score_thresh=score_thresh,
                               mask_thresh=mask_thresh, batch_size=batch_size, device=device)
    n_images = len({r["image_id"] for r in results})
    typer.echo(f"{out}: {len(results)} detections on {n_images} images")


def register(app: typer.Typer) -> None:
    """Add the `maskrcnn` command group to the main app."""
    command_group(app, "maskrcnn", "Mask R-CNN on boxes + proxy masks; flagged masks (ignore_mask) leave the mask "
                  "loss only.", {"train": maskrcnn_train_command, "predict": maskrcnn_predict_command})
