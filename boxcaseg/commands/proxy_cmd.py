"""``boxcaseg proxy``: proxy masks for every box of a COCO json (and ``--merge-shards``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from boxcaseg.commands.options import (Context, Device, DropSlack, DropThresh, Engine, Merge, Model, Precision,
                                       PriorWeight, Threshold, add_command)
from boxcaseg.proxy.options import DROP_SLACK, DROP_THRESH


def proxy_command(
    ann: Path = typer.Option(..., "--ann", help="COCO instances json whose boxes get proxy masks."),
    out: Path = typer.Option(..., "--out", "-o", help="Output json (the input with RLE masks, proxy_agreement, ignore_mask); with --format yolo-seg|png a folder (it also gets that json as boxcaseg-proxy.json)."),
    fmt: str = typer.Option("coco", "--format", help="coco (a COCO json with RLE masks) | yolo-seg (Ultralytics segmentation labels: one <image stem>.txt per image, one polygon per mask, classes.txt) | png (one instance-id PNG per image + instances.json)."),
    skip_flagged: bool = typer.Option(False, "--skip-flagged", help="yolo-seg / png: leave out masks flagged ignore_mask (default: written like the others; YOLO has no ignore flag and a missing label teaches a detector background)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image folder of --ann."),
    model: Model = None,
    engine: Engine = "auto",
    context: Context = None,
    threshold: Threshold = None,
    relative: bool = typer.Option(False, "--relative", help="Threshold the per-instance min-max normalised map (the published rule)."),
    prior_weight: PriorWeight = None,
    drop_thresh: DropThresh = DROP_THRESH,
    drop_slack: DropSlack = DROP_SLACK,
    merge: Merge = False,
    batch_size: int = typer.Option(32, "--batch-size", help="Instances per inference batch."),
    workers: int = typer.Option(2, "--workers", help="Decode/crop worker processes (0: in the main process)."),
    threads: int = typer.Option(0, "--threads", help="Inference CPU threads (0: the engine's default)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="K/N: process shard K (0-based) of N; default torchrun's RANK/WORLD_SIZE."),
    checkpoint_every: int = typer.Option(256, "--checkpoint-every", help="Save progress every N images (resume by rerunning the command)."),
    restart: bool = typer.Option(False, "--restart", help="Start over: delete the unfinished progress an earlier, killed or failed run of this -o left (OUT.progress/), instead of resuming it."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="A missing/corrupt image flags its annotations instead of stopping."),
    strict: bool = typer.Option(False, "--strict", help="A degenerate box stops the run instead of being flagged."),
    join_shards: bool = typer.Option(False, "--merge-shards", help="Join OUT's shard files (OUT-stem.shard-K-of-N.json, from --shard K/N runs) into OUT (no --images needed)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    device: Device = None,
    precision: Precision = "fp32",
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last", help="Torch engine: NHWC memory format. Default: on for the CPU (the shipped model runs about 3x faster there, same scores), off on CUDA. Recorded in the output's info."),
    cuda_graph: bool = typer.Option(False, "--cuda-graph/--no-cuda-graph", help="Torch engine on CUDA: capture the fixed-size batch once in a CUDA graph and replay it (ignored on the CPU)."),
    post_workers: Optional[int] = typer.Option(None, "--post-workers", help="Post-processing processes (masks, merge/drop, RLE, chunk files), one chunk each; 0: one thread. Default: 0 up to 4 cores, else cores/4 (at most 4). Same output either way."),
) -> None:
    """Turn every non-crowd box of a COCO json into a proxy mask, and flag (ignore_mask)
    masks whose tight box disagrees with the GT box; --merge also applies the paper's
    smaller-object-wins merge. --merge-shards joins the shard files of --shard K/N runs.

    Without --model the model shipped with boxcaseg runs. The inference settings
    (size, context, threshold, prior weight, alpha) default to the ones the model
    carries; a flag overrides one. The first line printed names the model and the
    settings in force, and the output json records them (info.boxcaseg_proxy).

    Example: boxcaseg proxy --ann instances.json --images images/ -o proxy.json
    """
    from rich.console import Console

    from boxcaseg.dist import env_rank_world
    from boxcaseg.errors import BoxcasegError
    from boxcaseg.proxy import ProxyConfig, generate_proxy_torchrun, merge_shards
    from boxcaseg.proxy.options import resolve_proxy_config
    from boxcaseg.proxy.report import (merged_shards_line, output_paths, settings_line, summary_json, summary_lines,
                                       write_format, wrote_whole_json)

    con = Console(highlight=False, soft_wrap=True, stderr=False)
    from boxcaseg.weights import user_model_file

    inputs = {"--ann": ann} if join_shards else {"--ann": ann, "--images": images, "--model": user_model_file(model)}
    out, folder = output_paths(out, fmt, inputs)
    check_names = None
    if folder is not None:  # --format yolo-seg|png: its file names checked before any work
        from boxcaseg.formats import check_format_names

        check_names = lambda data: check_format_names(data, fmt, folder)  # noqa: E731
    if join_shards:
        if check_names is not None:
            from boxcaseg.io import load_json

            check_names(load_json(ann, "COCO annotation json"))
        s = merge_shards(ann, out)
        con.print(merged_shards_line(s))
        _print(con, write_format(fmt, out, folder, skip_flagged))
        return
    if images is None:
        raise BoxcasegError("--images is required (except with --merge-shards)")
    cfg = ProxyConfig(
        ann=ann, images=images, out=out, model=model, engine=engine, context=context, threshold=threshold,
        relative=relative, prior_weight=prior_weight, drop_thresh=drop_thresh, drop_slack=drop_slack, merge=merge, batch_size=batch_size, workers=workers, threads=threads,
        shard=shard, checkpoint_every=checkpoint_every, skip_bad=skip_bad, strict=strict, restart=restart,
        progress=not no_progress and env_rank_world()[0] == 0, device=device, precision=precision,
        channels_last=channels_last, cuda_graph=cuda_graph, post_workers=post_workers,
    )
    resolved = resolve_proxy_config(cfg)
    cfg, rm = resolved
    if env_rank_world()[0] == 0:
        con.print(settings_line(cfg, rm))
    s = generate_proxy_torchrun(cfg, resolved, check_names)
    for line in summary_lines(s):
        con.print(line)
    if wrote_whole_json(s, out):
        _print(con, write_format(fmt, out, folder, skip_flagged))
    con.print(summary_json(s))


def _print(con, line: str | None) -> None:
    if line is not None:
        con.print(line)


def register(app: typer.Typer) -> None:
    add_command(app, "proxy", proxy_command)
