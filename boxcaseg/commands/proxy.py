"""``boxcaseg proxy``: proxy masks for every box of a COCO json (and ``--merge-shards``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def proxy_command(
    ann: Path = typer.Option(..., "--ann", help="COCO instances json whose boxes get proxy masks."),
    out: Path = typer.Option(..., "--out", "-o", help="Output json (the input with RLE masks, proxy_agreement, ignore_mask)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image folder of --ann."),
    model: Optional[Path] = typer.Option(None, "--model", help="model.onnx (onnx), a checkpoint (torch) or model.engine (trt)."),
    engine: str = typer.Option("onnx", "--engine", help="torch | onnx | trt."),
    context: float = typer.Option(1.0, "--context", help="Crop R x the box around its centre (1: exactly the box); masks stay inside the box."),
    threshold: float = typer.Option(0.5, "--threshold", help="Foreground threshold on the probability."),
    relative: bool = typer.Option(False, "--relative", help="Threshold the per-instance min-max normalised map (the published rule)."),
    prior_weight: float = typer.Option(0.0, "--prior-weight", help="Blend w of a soft ellipse inscribed in the box into the probability before the threshold: (1-w) p + w ellipse (0: off, the paper)."),
    drop_thresh: float = typer.Option(0.95, "--drop-thresh", help="Agreement (IoU of mask tight box and GT box) below this flags ignore_mask."),
    no_merge: bool = typer.Option(False, "--no-merge", help="Keep each box's own mask: no smaller-object-better merge of overlapping masks (agreement and --drop-thresh still apply). The merge cleans masks for training; per-instance quality (mIoU*, as `evaluate masks` measures it) is higher without it on COCO (bench/RESULTS.md)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Instances per inference batch."),
    workers: int = typer.Option(2, "--workers", help="Decode/crop worker processes (0: in the main process)."),
    threads: int = typer.Option(0, "--threads", help="Inference CPU threads (0: the engine's default)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="K/N: process shard K (0-based) of N; default torchrun's RANK/WORLD_SIZE."),
    checkpoint_every: int = typer.Option(256, "--checkpoint-every", help="Save progress every N images (resume by rerunning the command)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="A missing/corrupt image flags its annotations instead of stopping."),
    strict: bool = typer.Option(False, "--strict", help="A degenerate box stops the run instead of being flagged."),
    merge: bool = typer.Option(False, "--merge-shards", help="Join OUT's shard files (OUT-stem.shard-K-of-N.json) into OUT."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    device: Optional[str] = typer.Option(None, "--device", help="Device of --engine torch (default: cuda when available)."),
) -> None:
    """Turn every non-crowd box of a COCO json into a proxy mask; merge (smaller object
    better) and flag masks whose tight box disagrees with the GT box.

    Example: boxcaseg proxy --engine onnx --model model.onnx --ann instances.json --images images/ -o proxy.json
    """
    import json

    from rich.console import Console

    from boxcaseg.errors import BoxcasegError
    from boxcaseg.dist import env_rank_world
    from boxcaseg.proxy import ProxyConfig, generate_proxy_torchrun, merge_shards

    con = Console(highlight=False, soft_wrap=True, stderr=False)
    if merge:
        s = merge_shards(ann, out)
        con.print(f"[green]merged[/] {s['shards']} shards into {s['output']}: {s['instances']} instances, "
                  f"{s['flagged']} flagged ignore_mask")
        return
    if images is None or model is None:
        raise BoxcasegError("--images and --model are required (except with --merge-shards)")
    cfg = ProxyConfig(
        ann=ann, images=images, out=out, model=model, engine=engine, context=context, threshold=threshold,
        relative=relative, prior_weight=prior_weight, drop_thresh=drop_thresh, merge=not no_merge, batch_size=batch_size, workers=workers, threads=threads,
        shard=shard, checkpoint_every=checkpoint_every, skip_bad=skip_bad, strict=strict,
        progress=not no_progress and env_rank_world()[0] == 0, device=device,
    )
    s = generate_proxy_torchrun(cfg)
    t = s["timings"]
    busy = t["decode"] + t["inference"] + t["post"]
    shares = ", ".join(f"{k} {100 * t[k] / busy:.0f}%" for k in ("decode", "inference", "post")) if busy else "-"
    speed = f"{s['instances_per_s']:.1f} inst/s" if s["instances_per_s"] else "all chunks resumed"
    con.print(
        f"[green]wrote[/] {s['output']} (shard {s['shard']}, {s['engine']}): {s['images']} images, {s['instances']} instances, "
        f"{s['masks']} masks; flagged ignore_mask {s['flagged']} (agreement < {drop_thresh}: {s['low_agreement']}, "
        f"degenerate boxes: {s['degenerate']}, in {s['bad_images']} bad images: {s['bad_image_annotations']}); "
        f"empty masks {s['empty_masks']}; mean agreement {s['mean_agreement']:.3f}; crowd left as is {s['crowd']}")
    con.print(f"{speed} over {s['seconds']:.1f} s; time shares {shares}; resumed chunks {s['resumed_chunks']}/{s['chunks']}")
    if "merged" in s:
        m = s["merged"]
        con.print(f"[green]rank 0 merged[/] {m['shards']} shards into {m['output']}")
    con.print(json.dumps(s))


def register(app: typer.Typer) -> None:
    app.command("proxy")(proxy_command)
