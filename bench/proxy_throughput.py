"""Proxy-mask throughput on real COCO images: the published-style pipeline vs ours.

    python bench/proxy_throughput.py [--ckpt last.pt | --model lite0|hrnet_w48] [--limit-images N]
        [--min-instances N] [--precision fp16 --cuda-graph --channels-last --post-workers K] [--quality]

(a) published-style, re-written here from DESIGN.md: the image re-read per annotation,
    crop resized to S in float64 (skimage.transform.resize, as the published loader),
    one loader worker, batched forward of the training model, then per instance and
    serially: min-max normalise, PIL resize to the box, threshold, paste into a
    full-image mask, RLE encode. (No merge/drop: that is bench/merge_drop.py.)
(b) ours, --engine torch (the checkpoint run directly);
(c) ours, --engine onnx (ONNX Runtime; CPU here);
(d) ours, --engine trt when TensorRT and a GPU are there.
Ours is the whole `generate_proxy` call: json load, decode, crop, inference, masks,
merge/drop, RLE, progress files and the output json. Instances/s = masks produced /
wall seconds; steady = after the warm-up (engine load, first batch, kernels); one line per
engine gives every stage's seconds (decode, post, masks, write summed over workers; h2d and
gpu by CUDA events, "-" without CUDA). Without --ckpt / --model, the CPU recipe's model
(the shipped ``cpu`` config: efficientnet_lite0, S = 256) is built with fixed random
weights (speed does not depend on training); ``--model lite0`` is the shipped model
(S = 256), ``--model hrnet_w48`` the paper's (``paper-coco`` config, S = 320, random weights).
``--min-instances N`` repeats the images (new ids, same files) until the json holds at
least N instances. ``--quality`` adds each run's mIoU* against the json's GT masks and,
for a torch run not in fp32, the fp32 torch run beside it. `--variants` also times the
export choices (stride-4 vs full resolution output, normalisation in the graph vs in
numpy). ``--write``: the engines' table into bench/RESULTS.md, section
"proxy_throughput_cpu" or "proxy_throughput_cuda", and with ``--variants`` their table into
section "proxy_export_choices" (inside section "proxy"). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench.common import add_write_flag, data_root, require_data, time_cpu_interleaved, write_section  # noqa: E402


def make_checkpoint(path: Path, backbone: str | None, config: str = "cpu") -> Path:
    import torch

    from boxcaseg.config import load_config
    from boxcaseg.model import build_model

    for var in ("COCO_ROOT", "DUTS_SINGLE"):  # data paths of the paper configs: unused, no data is read here
        os.environ.setdefault(var, str(data_root()))
    cfg = load_config(config)
    if backbone:
        cfg.model.backbone = backbone
    cfg.model.pretrained = False
    cfg.model.backbone_weights = ""          # random weights: speed does not depend on them
    torch.manual_seed(0)
    model = build_model(cfg)
    # BN statistics as a trained model has them (running stats = the activations' own
    # statistics), so BN folding is exercised and the network stays well conditioned
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(8, 3, 160, 160, generator=g))
    for m in bns:
        m.momentum = 0.1
    model.eval()
    torch.save({"model": model.state_dict(), "config": cfg.to_dict()}, path)
    return path


def subset_json(ann: Path, limit: int | None, out: Path, min_instances: int = 0) -> Path:
    """The first ``limit`` images (0: all), repeated (new image and annotation ids, the same
    files) until the json holds at least ``min_instances`` non-crowd instances."""
    if not limit and not min_instances:
        return ann
    data = json.loads(ann.read_text())
    images = sorted(data["images"], key=lambda im: im["id"])
    if limit:
        images = images[:limit]
    keep = {im["id"] for im in images}
    anns = [a for a in data["annotations"] if a["image_id"] in keep]
    per_pass = sum(1 for a in anns if not a.get("iscrowd", 0))
    repeats = max(1, -(-min_instances // per_pass)) if min_instances and per_pass else 1
    if repeats > 1:
        new_images, new_anns = [], []
        for r in range(repeats):
            ids = {im["id"]: r * 10_000_000 + k for k, im in enumerate(images)}
            new_images += [{**im, "id": ids[im["id"]]} for im in images]
            new_anns += [{**a, "id": r * 10_000_000 + k, "image_id": ids[a["image_id"]]} for k, a in enumerate(anns)]
        images, anns = new_images, new_anns
    data["images"], data["annotations"] = images, anns
    out.write_text(json.dumps(data))
    return out


# --------------------------------------------------------------------------- (a) published style


class PublishedStyleDataset:
    """One item per annotation: the image read again, the box crop resized in float64."""

    def __init__(self, items, size):
        self.items, self.size = items, size

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        import torch
        from PIL import Image
        from skimage import transform

        path, (x0, y0, x1, y1), _h, _w = self.items[i]
        img = np.asarray(Image.open(path).convert("RGB"))
        crop = img[y0:y1, x0:x1]
        crop = transform.resize(crop, (self.size, self.size), mode="constant")  # float64 in [0, 1]
        mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
        crop = (crop - mean) / std
        return torch.from_numpy(crop.transpose(2, 0, 1).copy()), i


def published_items(ann: Path, images: Path):
    from boxcaseg.boxes import degenerate_reason
    from boxcaseg.paths import resolve_image_path

    data = json.loads(ann.read_text())
    imgs = {im["id"]: im for im in data["images"]}
    items = []
    for a in data["annotations"]:
        if a.get("iscrowd", 0):
            continue
        im = imgs[a["image_id"]]
        if degenerate_reason(a.get("bbox"), im["width"], im["height"]):
            continue
        x, y, w, h = a["bbox"]
        x0, y0 = max(0, int(x)), max(0, int(y))
        x1, y1 = min(im["width"], max(x0 + 1, int(x + w))), min(im["height"], max(y0 + 1, int(y + h)))
        items.append((str(resolve_image_path(images, im.get("file_name"), im["id"])), (x0, y0, x1, y1),
                      im["height"], im["width"]))
    return items


def run_published(ckpt: Path, ann: Path, images: Path, batch_size: int) -> dict:
    import torch
    from PIL import Image
    from pycocotools import mask as mask_util
    from torch.utils.data import DataLoader

    from boxcaseg.model import load_checkpoint_model

    model, cfg = load_checkpoint_model(str(ckpt))
    size = cfg.model.infer_size
    t0 = time.perf_counter()
    items = published_items(ann, images)
    loader = DataLoader(PublishedStyleDataset(items, size), batch_size=batch_size, num_workers=1, shuffle=False)
    t_inf = t_post = 0.0
    results = []
    with torch.no_grad():
        for x, idx in loader:
            t1 = time.perf_counter()
            pred = torch.sigmoid(model(x.float())["fused"])[:, 0]
            mx = pred.flatten(1).max(1).values.view(-1, 1, 1)
            mn = pred.flatten(1).min(1).values.view(-1, 1, 1)
            pred = ((pred - mn) / (mx - mn)).numpy()
            t2 = time.perf_counter()
            for n, i in enumerate(idx.tolist()):
                _, (x0, y0, x1, y1), h, w = items[i]
                im = Image.fromarray(pred[n] * 255).convert("L")
                imo = np.array(im.resize((x1 - x0, y1 - y0), resample=Image.BILINEAR)) / 255.0 > 0.5
                mask = np.zeros((h, w), dtype=np.uint8)
                mask[y0:y1, x0:x1] = imo.astype(np.uint8)
                rle = mask_util.encode(np.array(mask[:, :, np.newaxis], order="F"))[0]
                rle["counts"] = rle["counts"].decode("utf-8")
                results.append(rle)
            t3 = time.perf_counter()
            t_inf += t2 - t1
            t_post += t3 - t2
    wall = time.perf_counter() - t0
    return {"instances": len(results), "seconds": round(wall, 2), "instances_per_s": round(len(results) / wall, 2),
            "inference_s": round(t_inf, 2), "post_s": round(t_post, 2),
            "loader_wait_s": round(wall - t_inf - t_post, 2)}


# --------------------------------------------------------------------------- ours


STAGES = ("prepare", "warmup", "decode", "wait", "pack", "inference", "h2d", "gpu", "post", "masks", "write", "steady")


def run_ours(engine: str, model: Path, ann: Path, images: Path, out: Path, batch_size: int, workers: int,
             **opts) -> dict:
    """One ``generate_proxy`` call; ``opts``: ProxyConfig options (precision, cuda_graph, post_workers, ...)."""
    from boxcaseg.proxy import ProxyConfig, generate_proxy

    t0 = time.perf_counter()
    s = generate_proxy(ProxyConfig(ann=ann, images=images, out=out, model=model, engine=engine,
                                   batch_size=batch_size, workers=workers, progress=False, **opts))
    wall = time.perf_counter() - t0
    t = s["timings"]
    busy = t["decode"] + t["inference"] + t["post"]
    return {"engine": s["engine"], "instances": s["masks"], "seconds": round(wall, 2),
            "instances_per_s": round(s["masks"] / wall, 2), "steady_instances_per_s": s["steady_instances_per_s"],
            "post_workers": s["post_workers"], "timings_s": t,
            "shares": {k: round(t[k] / busy, 3) for k in ("decode", "inference", "post")}}


def stage_line(r: dict) -> str:
    """One number per stage (seconds; decode/post/masks/write summed over workers; h2d, gpu by CUDA events)."""
    t = r["timings_s"]
    return ", ".join(f"{k} {t[k]:.2f}" if t.get(k) is not None else f"{k} -" for k in STAGES)


def run_variants(ckpt: Path, tmp: Path, batch_size: int) -> dict:
    """Export choices, timed interleaved (bench/common.py) so machine load hits all alike.

    ONNX Runtime ms/instance for a stride-4 output vs a full-resolution output (plus the
    post-processing of each: map -> box mask for 128x128 boxes), and the numpy cost of
    normalising outside the graph vs only casting (normalisation in the graph).
    """
    from boxcaseg.imageops import MEAN, STD
    from boxcaseg.export import OnnxEngine, export_onnx
    from boxcaseg.infer_settings import InferSettings
    from boxcaseg.proxy import masks_from_probs

    r4 = export_onnx(ckpt, tmp / "s4.onnx")
    export_onnx(ckpt, tmp / "full.onnx", full_resolution=True)
    size = r4.infer_size
    x = np.random.default_rng(0).integers(0, 256, (batch_size, 3, size, size), dtype=np.uint8)
    engines = {name: OnnxEngine(tmp / f"{name}.onnx") for name in ("s4", "full")}
    probs = {name: e.predict(x) for name, e in engines.items()}
    boxes = np.tile(np.array([[10, 10, 138, 138]]), (batch_size, 1))
    mean = (np.array(MEAN, np.float32) * 255).reshape(1, 3, 1, 1)
    std = (np.array(STD, np.float32) * 255).reshape(1, 3, 1, 1)
    fns = {
        "ort_s4": lambda: engines["s4"].predict(x),
        "ort_full": lambda: engines["full"].predict(x),
        "post_s4": lambda: masks_from_probs(probs["s4"], boxes, boxes, InferSettings(size, threshold=0.5), stride=4),
        "post_full": lambda: masks_from_probs(probs["full"], boxes, boxes, InferSettings(size, threshold=0.5), stride=1),
        "cast_only": lambda: x.astype(np.float32),
        "cast_and_normalise": lambda: (x.astype(np.float32) - mean) / std,
    }
    t = time_cpu_interleaved(fns, warmup=2, rounds=5, round_budget_s=0.5)
    return {"infer_size": size, **{f"{k}_ms_per_instance": round(v.median_ms / batch_size, 3) for k, v in t.items()}}


VARIANT_LABELS = {
    "ort_s4": "ONNX Runtime, output stride-4 map [B,1,{m},{m}]",
    "ort_full": "ONNX Runtime, output full resolution [B,1,{s},{s}]",
    "post_s4": "post-processing (map -> 128x128 box mask), from the stride-4 map",
    "post_full": "post-processing, from the full-resolution map",
    "cast_only": "main process: uint8 -> float32 cast only (normalisation in the graph)",
    "cast_and_normalise": "main process: cast + ImageNet normalisation in numpy",
}


def variants_table(variants: dict, infer_size: int | None = None) -> str:
    """The export choices as a markdown table (``variants``: run_variants' result), ms per instance."""
    size = infer_size or variants.get("infer_size")
    lines = ["| choice | ms / instance |", "|---|---|"]
    for key, label in VARIANT_LABELS.items():
        v = variants[f"{key}_ms_per_instance"]
        lines.append(f"| {label.format(s=size, m=size // 4)} | {v:.3f} |" if v < 1 else
                     f"| {label.format(s=size, m=size // 4)} | {v:.2f} |")
    return "\n".join(lines)


def throughput_text(report: dict, labels: dict[str, str]) -> str:
    """RESULTS.md's section of one run: what ran, then one row per pipeline."""
    res = report["results"]
    ratio = report.get("ratio_to_published", {})
    lines = ["## proxy_throughput: proxy masks per second (`python bench/proxy_throughput.py`)", "",
             f"{report['config']}; {report['instances_in_json']} instances ({report['images']} images of "
             f"`{Path(report['data']).name}`), batch {report['batch_size']}, {report['workers']} decode workers; "
             f"{report['cpus']} CPUs, load average {report['loadavg_start']} at the start, {report['loadavg_end']} "
             "at the end.", "",
             "| pipeline | instances | inst/s (whole run) | steady inst/s | mIoU* | ratio to (a) | stages (s) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        if "skipped" in r:
            lines.append(f"| {labels.get(name, name)} | skipped: {r['skipped']} | | | | | |")
            continue
        steady = r.get("steady_instances_per_s")
        lines.append(f"| {labels.get(name, name)} | {r['instances']} | {r['instances_per_s']} | "
                     f"{steady if steady is not None else '-'} | {r.get('miou_star', '-')} | "
                     f"{ratio.get(name, 1 if name == 'published' else '-')} | "
                     f"{stage_line(r) if 'timings_s' in r else '-'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="COCO folder with instances.json and images/ (default $BOXCASEG_DATA/coco-train)")
    ap.add_argument("--ckpt", type=Path, default=None, help="a boxcaseg checkpoint (default: CPU recipe, random weights)")
    ap.add_argument("--model", default=None, choices=("lite0", "hrnet_w48"),
                    help="lite0: the shipped model (S=256); hrnet_w48: the paper-coco config, S=320, random weights")
    ap.add_argument("--backbone", default=None, help="backbone of the generated checkpoint (default: the cpu config's)")
    ap.add_argument("--limit-images", type=int, default=0, help="first N images only (0: all)")
    ap.add_argument("--min-instances", type=int, default=0, help="repeat the images until at least N instances (0: once)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="decode workers of our pipeline (the CLI default)")
    ap.add_argument("--post-workers", type=int, default=None, help="post-processing processes (default: the CLI's, by cores)")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"), help="torch engine's network type")
    ap.add_argument("--cuda-graph", action="store_true", help="torch engine: replay the batch from a CUDA graph")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                    help="torch engine: NHWC memory format (default: the engine's, on for the CPU)")
    ap.add_argument("--device", default=None, help="engines' device (default: cuda when there)")
    ap.add_argument("--threads", type=int, default=0, help="engine CPU threads (0: its default)")
    ap.add_argument("--quality", action="store_true",
                    help="mIoU* of each run against the json's GT masks (and the fp32 torch run beside a non-fp32 one)")
    ap.add_argument("--engines", default="published,torch,onnx,trt")
    ap.add_argument("--variants", action="store_true", help="also time the export variants")
    ap.add_argument("--json", action="store_true", help="(kept for symmetry: the last line is always JSON)")
    add_write_flag(ap, "proxy_throughput_cpu|cuda (and proxy_export_choices with --variants)")
    args = ap.parse_args()

    ann = require_data("instances.json", root=args.data or data_root() / "coco-train")
    folder, images = ann.parent, ann.parent / "images"
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    torch_opts = {"precision": args.precision, "cuda_graph": args.cuda_graph, "channels_last": args.channels_last}
    common = {"post_workers": args.post_workers, "device": args.device, "threads": args.threads}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.ckpt:
            ckpt = args.ckpt
        elif args.model == "lite0":
            from boxcaseg import weights

            ckpt = weights.pretrained_path()
        elif args.model == "hrnet_w48":
            ckpt = make_checkpoint(tmp / "ckpt.pt", None, "paper-coco")
        else:
            ckpt = make_checkpoint(tmp / "ckpt.pt", args.backbone)
        ann_used = subset_json(ann, args.limit_images, tmp / "subset.json", args.min_instances)
        from boxcaseg.config import config_from_checkpoint
        from boxcaseg.io import safe_torch_load

        cfg = config_from_checkpoint(safe_torch_load(ckpt)["config"], str(ckpt))
        n_inst = sum(1 for a in json.loads(ann_used.read_text())["annotations"] if not a.get("iscrowd", 0))
        report = {"data": str(folder), "images": args.limit_images or "all", "instances_in_json": n_inst,
                  "backbone": cfg.model.backbone, "infer_size": cfg.model.infer_size, "batch_size": args.batch_size,
                  "workers": args.workers, **torch_opts, **common,
                  "cpus": os.cpu_count(), "loadavg_start": [round(v, 2) for v in os.getloadavg()], "results": {}}
        from quality import config_summary

        report["config"] = config_summary(cfg, str(args.ckpt or args.model or "cpu (random weights)"))
        print(f"{report['config']}; data {folder} ({args.limit_images or 'all'} images, {n_inst} instances)")
        res = report["results"]
        labels = {"published": "(a) published-style"}

        def ours(name: str, kind: str, model: Path, label: str, **opts) -> None:
            labels[name] = label
            res[name] = run_ours(kind, model, ann_used, images, tmp / f"out_{name}.json", args.batch_size, args.workers,
                                 **common, **opts)
            if args.quality:
                from boxcaseg.evaluate.metrics import mask_quality

                res[name]["miou_star"] = round(mask_quality(ann_used, tmp / f"out_{name}.json")["miou_star"], 5)
            print(f"{label}:", json.dumps(res[name]))
            print(f"  stages (s): {stage_line(res[name])}")

        if "published" in engines:
            res["published"] = run_published(ckpt, ann_used, images, args.batch_size)
            print("(a) published-style:", json.dumps(res["published"]))
        if "torch" in engines:
            ours("torch", "torch", ckpt, "(b) ours, torch engine", **torch_opts)
            if args.quality and args.precision != "fp32":
                ours("torch_fp32", "torch", ckpt, "(b') ours, torch engine fp32 (reference)",
                     cuda_graph=args.cuda_graph, channels_last=args.channels_last)
                report["miou_star_minus_fp32"] = round(res["torch"]["miou_star"] - res["torch_fp32"]["miou_star"], 5)
                print("mIoU* minus fp32's:", report["miou_star_minus_fp32"])
        onnx_path = None
        if "onnx" in engines or "trt" in engines:
            from boxcaseg.export import export_onnx

            onnx_path = export_onnx(ckpt, tmp / "model.onnx").onnx_path
        if "onnx" in engines:
            ours("onnx", "onnx", onnx_path, "(c) ours, onnx engine")
        if "trt" in engines:
            from boxcaseg.export import trt_missing

            missing = trt_missing()
            if missing:
                res["trt"] = {"skipped": "missing " + " and ".join(missing)}
                print("(d) ours, trt engine:", json.dumps(res["trt"]))
            else:
                from boxcaseg.export import export_onnx

                rep = export_onnx(ckpt, tmp / "trt.onnx", trt=True, fp16=True, max_batch=args.batch_size)
                ours("trt", "trt", rep.engine_path, "(d) ours, trt engine")
        base = res.get("published", {}).get("instances_per_s")
        if base:
            report["ratio_to_published"] = {k: round(v["instances_per_s"] / base, 2)
                                            for k, v in res.items() if k != "published" and "instances_per_s" in v}
            print("ratios to (a):", json.dumps(report["ratio_to_published"]))
        if args.variants:
            report["variants"] = run_variants(ckpt, tmp, args.batch_size)
            print("export variants:", json.dumps(report["variants"]))
            if args.write:
                write_section("proxy_export_choices", variants_table(report["variants"]))
    report["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    if args.write and report["results"]:
        import torch

        on_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        write_section(f"proxy_throughput_{'cuda' if on_cuda else 'cpu'}", throughput_text(report, labels))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
