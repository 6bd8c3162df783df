"""``boxcaseg train``: joint BoxCaseg training."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from boxcaseg.commands.options import Resume, SetFields, StopAt, add_command


def train_command(
    config: Optional[str] = typer.Option(None, "--config", "-c", metavar="NAME|FILE",
                                         help="A shipped config by name (cpu, paper-coco, paper-voc: "
                                         "`boxcaseg config list`) or a TOML file; paths in it may use ${ENV}."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: last.pt (checkpoint) and metrics.jsonl."),
    box_ann: Optional[list[str]] = typer.Option(
        None, "--box-ann", metavar="JSON", help="COCO instances json with training boxes (data.box_ann). Repeatable: several box "
        "sets, each with its own --box-images, in the same order. Data sets given on the command line replace "
        "the config's sets of both kinds: without --salient-dir, training runs on these boxes only."),
    box_images: Optional[list[str]] = typer.Option(
        None, "--box-images", metavar="DIR", help="Image folder of a --box-ann, one per json (data.box_images)."),
    salient_dir: Optional[list[str]] = typer.Option(
        None, "--salient-dir", metavar="DIR", help="Salient folder with images/ and masks/ (data.salient_dir). Repeatable. Data sets "
        "given on the command line replace the config's sets of both kinds: without --box-ann, no box set."),
    box_weight: Optional[list[float]] = typer.Option(
        None, "--box-weight", metavar="W", help="Draw weight of each box set, one per set (data.box_weights); default: "
        "in proportion to the sets' boxes."),
    salient_weight: Optional[list[float]] = typer.Option(
        None, "--salient-weight", metavar="W", help="Draw weight of each salient folder (data.salient_weights); default: "
        "in proportion to their pairs."),
    max_iters: Optional[int] = typer.Option(None, help="Iterations of the poly schedule (train.max_iters)."),
    batch_size: Optional[int] = typer.Option(None, help="Patches per batch per process; the box:salient ratio of the config is kept."),
    lr: Optional[float] = typer.Option(None, help="Base learning rate (train.lr)."),
    workers: Optional[int] = typer.Option(None, help="Data loader worker processes (data.workers)."),
    backend: Optional[str] = typer.Option(None, help="Loss backend: auto | triton | torch | reference."),
    resume: Resume = False,
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip and count bad images/annotations instead of stopping."),
    strict: bool = typer.Option(False, "--strict", help="Degenerate boxes are errors instead of skipped with a warning."),
    stop_at: StopAt = None,
    init_from: Optional[str] = typer.Option(None, "--init-from", help="Start from these weights on a new schedule: "
                                            "'pretrained' (the model shipped with boxcaseg) or a checkpoint. The network "
                                            "(\\[model] section, inference settings included) is taken from it."),
    set_: SetFields = [],
) -> None:
    """Jointly train the BoxCaseg network on box patches and salient patches.

    Example: boxcaseg train --config cpu --out runs/cpu --max-iters 40

    Fine-tune the shipped model on your boxes (boxes only; add --salient-dir for a salient set):
    boxcaseg train --config finetune --init-from pretrained --box-ann A.json --box-images DIR --out runs/ft

    Data sets given on the command line (--box-ann/--box-images, --salient-dir) replace the
    config's data sets of both kinds: a kind you do not give is not used (boxes without
    --salient-dir train on boxes only). Without any of them the config's sets are used.
    """
    from rich.console import Console

    from boxcaseg import dist
    from boxcaseg.config import apply_overrides, load_config
    from boxcaseg.data.sampler import split_batch
    from boxcaseg.joint_training import adopt_init_model, boxes_only_note, train

    overrides = {**data_set_overrides(box_ann, box_images, salient_dir, box_weight, salient_weight),
                 "train.max_iters": max_iters, "train.lr": lr, "data.workers": workers, "train.backend": backend}
    cfg = load_config(config, overrides)
    if init_from or cfg.train.init_from:  # the network of the weights it starts from (--init-from wins)
        adopt_init_model(cfg, init_from or cfg.train.init_from)
    apply_overrides(cfg, list(set_))
    if dist.is_main() and not cfg.data.salient_sets() and cfg.data.box_sets():
        Console().print(f"[yellow]boxes only[/] (no data.salient_dir): {boxes_only_note(cfg.train)}")
    if skip_bad:
        cfg.data.skip_bad = True
    if strict:
        cfg.data.strict = True
    if batch_size is not None:
        cfg.data.box_per_batch, cfg.data.salient_per_batch = split_batch(
            batch_size, cfg.data.box_per_batch, cfg.data.salient_per_batch)
    res = train(cfg, out, resume=resume, stop_at=stop_at)
    if dist.is_main():
        Console().print(
            f"[green]done[/]: {res.iters} iterations, loss {res.first_loss:.4f} -> {res.last_loss:.4f}, "
            f"{res.images_per_s:.1f} img/s; checkpoint {res.out_dir / 'last.pt'}, metrics {res.out_dir / 'metrics.jsonl'}")
    dist.cleanup()


def data_set_overrides(box_ann, box_images, salient_dir, box_weight, salient_weight) -> dict:
    """The config overrides of the data-set flags. Data sets given on the command line (any of
    --box-ann, --box-images, --salient-dir) replace the config's data sets of both kinds: a kind
    not given is empty (boxes given without --salient-dir train on boxes only), and the config's
    draw weights go with its sets. No data-set flag: the config's sets and weights stay."""
    if not (box_ann or box_images or salient_dir):
        return {"data.box_weights": box_weight or None, "data.salient_weights": salient_weight or None}
    return {"data.box_ann": _one_or_list(box_ann) or "", "data.box_images": _one_or_list(box_images) or "",
            "data.salient_dir": _one_or_list(salient_dir) or "", "data.box_weights": list(box_weight or []),
            "data.salient_weights": list(salient_weight or [])}


def _one_or_list(values: Optional[list[str]]):
    """A repeatable path flag as a config value: None (not given), one string, or a list."""
    if not values:
        return None
    return values[0] if len(values) == 1 else list(values)


def register(app: typer.Typer) -> None:
    add_command(app, "train", train_command)
