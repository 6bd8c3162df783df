"""The CPU recipe end to end on real data: train -> export -> proxy -> evaluate.

    python bench/quality.py                      # train the shipped cpu config, then evaluate
    python bench/quality.py --ckpt runs/x/last.pt  # evaluate an existing checkpoint

Trains on ${BOXCASEG_DATA}/coco-train boxes + duts-tr salient pairs, exports to ONNX,
makes proxy masks for ${BOXCASEG_DATA}/coco-val (GT boxes given) with the ONNX engine
and compares mIoU* / IoU@75 with the classical floors measured on the same set in the
same run (box-fill, inscribed ellipse, GrabCut). Prints the table and writes it into
bench/RESULTS.md (section "quality"). A benchmark, not a test.

The goal is judged on per-instance masks (``proxy --no-merge``): each box's own mask,
as the floors are measured and as the paper's mIoU* scores the class-agnostic model.
Rows "merged" are the same masks after the smaller-object-better merge, the cleaning
step `boxcaseg proxy` applies by default for training a Mask R-CNN.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.common import add_write_flag, require_data, write_section  # noqa: E402

GOAL = {"miou_star": 0.71, "iou75": 0.53}


def config_summary(cfg, name: str = "") -> str:
    """One line naming the config a bench section measured (its model, data and schedule)."""
    m, d, t = cfg.model, cfg.data, cfg.train
    return (f"config {name + ': ' if name else ''}{m.backbone}, head {m.head_channels}, S={m.infer_size} "
            f"(context {m.infer_context:g}, threshold {m.infer_threshold:g}, prior {m.infer_prior_weight:g}), "
            f"alpha {m.alpha:g}; patches {d.patch_size} px, {d.box_per_batch} box + {d.salient_per_batch} salient; "
            f"{t.max_iters} iterations, lr {t.lr:g}, fused MIL {t.fused_mil_weight:g}, pairwise {t.pairwise_weight:g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="cpu", help="a shipped config name or a TOML file")
    ap.add_argument("--ckpt", help="evaluate this checkpoint instead of training")
    ap.add_argument("--out", default=str(REPO / "runs" / "quality"))
    ap.add_argument("--contexts", default="1.0,1.1,1.2", help="inference crop ratios to report")
    ap.add_argument("--thresholds", default="0.4", help="probability thresholds to report")
    ap.add_argument("--infer-sizes", default="", help="engine input sizes S to report (default: the checkpoint's)")
    ap.add_argument("--tta", default="none,flip", help="test-time augmentations to report: none, flip")
    ap.add_argument("--prior-weights", default="0,0.3", help="box-shape prior blends to report (proxy --prior-weight)")
    ap.add_argument("--merge", default="off,on",
                    help="off: per-instance masks (proxy --no-merge; the goal is judged on these), "
                         "on: after the smaller-object-better merge (proxy's default)")
    ap.add_argument("--alphas", default="", help="fusion weights alpha to report (default: the checkpoint's)")
    ap.add_argument("--no-grabcut", action="store_true")
    add_write_flag(ap, "quality", default=True)
    ap.add_argument("--set", action="append", default=[], help="config override section.field=value")
    ap.add_argument("--threads", type=int, default=0,
                    help="ONNX Runtime threads of each proxy run (0: its default, all cores)")
    ap.add_argument("--self-train", type=int, default=0, metavar="ITERS",
                    help="self-training: after the first training, proxy masks of the training boxes "
                         "(flip TTA, --pseudo-threshold) become a soft pixel target of a second training "
                         "of ITERS iterations started from the first one's weights; the time counts all three")
    ap.add_argument("--pseudo-threshold", type=float, default=0.4)
    ap.add_argument("--pseudo-weight", type=float, default=1.0)
    ap.add_argument("--pseudo-drop", type=float, default=0.95,
                    help="proxy --drop-thresh for the pseudo masks (dropped ones are ignored in training)")
    ap.add_argument("--pseudo-prior", type=float, default=0.3, help="proxy --prior-weight for the pseudo masks")
    ap.add_argument("--self-train-lr", type=float, default=0.0, help="second training's lr (default: the config's)")
    args = ap.parse_args()
    merges = args.merge.split(",")
    if not merges or any(m not in ("off", "on") for m in merges):
        sys.exit(f"--merge {args.merge!r}: choose off, on or off,on")

    import torch

    from boxcaseg.baselines import box_fill_predictions, ellipse_predictions, grabcut_predictions
    from boxcaseg.config import apply_overrides, load_config
    from boxcaseg.evaluate import mask_quality
    from boxcaseg.io import read_jsonl
    from boxcaseg.export import export_onnx
    from boxcaseg.proxy import ProxyConfig, generate_proxy
    from boxcaseg.report import markdown_table
    from boxcaseg.joint_training import train

    val_ann = require_data("coco-val", "instances.json")
    root, val_img = val_ann.parents[1], val_ann.parent / "images"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rows, notes = [], []
    t = time.perf_counter()
    floors = {"box-fill": box_fill_predictions(val_ann), "ellipse": ellipse_predictions(val_ann)}
    if not args.no_grabcut:
        floors["GrabCut (box init)"] = grabcut_predictions(val_ann, val_img)
    for name, preds in floors.items():
        q = mask_quality(val_ann, preds)
        rows.append([name, q["miou_star"], q["miou"], q["iou50"], q["iou75"], q["small"]["miou"] or 0.0])
    floor_s = time.perf_counter() - t

    train_s = None
    if args.ckpt:
        ckpt = Path(args.ckpt)
        cfg = None
    else:
        cfg = load_config(args.config, args.set)
        t = time.perf_counter()
        res = train(cfg, out / "train")
        train_s = time.perf_counter() - t
        ckpt = out / "train" / "last.pt"
        notes.append(config_summary(cfg, str(args.config)) + (f"; overrides {' '.join(args.set)}" if args.set else ""))
        notes.append(f"training: {cfg.model.backbone}, {res.iters} iterations, {train_s / 60:.1f} min, "
                     f"{res.images_per_s:.1f} img/s, loss {res.first_loss:.3f} -> {res.last_loss:.3f}")
    if train_s is None:  # an existing checkpoint: its training time from its metrics.jsonl
        log = ckpt.parent / "metrics.jsonl"
        if log.is_file():
            recs = read_jsonl(log)
            if recs:
                train_s = float(recs[-1]["time"])
                notes.append(f"training ({ckpt}): {recs[-1]['iter']} iterations, {train_s / 60:.1f} min "
                             f"(from its metrics.jsonl), loss {recs[0]['loss']:.3f} -> {recs[-1]['loss']:.3f}")
    if args.self_train:
        if cfg is None:  # stage 1 = the given checkpoint; its config (data paths) drives stage 2
            from boxcaseg.config import config_from_checkpoint
            from boxcaseg.io import safe_torch_load

            cfg = config_from_checkpoint(safe_torch_load(ckpt)["config"], str(ckpt))
            apply_overrides(cfg, args.set)
        import copy

        t = time.perf_counter()
        export_onnx(ckpt, out / "model_pseudo.onnx", flip_tta=True)
        pseudo = out / "pseudo_train.json"
        st = generate_proxy(ProxyConfig(ann=Path(cfg.data.box_ann), images=Path(cfg.data.box_images), out=pseudo,
                                        model=out / "model_pseudo.onnx", engine="onnx",
                                        threshold=args.pseudo_threshold, prior_weight=args.pseudo_prior,
                                        drop_thresh=args.pseudo_drop,
                                        workers=1, progress=False))
        proxy_s = time.perf_counter() - t
        cfg2 = copy.deepcopy(cfg)
        cfg2.data.pseudo_ann = str(pseudo)
        cfg2.train.pseudo_weight = args.pseudo_weight
        cfg2.train.init_from = str(ckpt)
        cfg2.train.max_iters = args.self_train
        if args.self_train_lr:
            cfg2.train.lr = args.self_train_lr
        t = time.perf_counter()
        res2 = train(cfg2, out / "train2")
        t2 = time.perf_counter() - t
        train_s += proxy_s + t2
        ckpt = out / "train2" / "last.pt"
        notes.append(f"self-training: proxy masks of the training boxes in {proxy_s:.0f} s "
                     f"({st['instances_per_s'] or 0:.1f} inst/s, threshold {args.pseudo_threshold}, prior {args.pseudo_prior}, drop below {args.pseudo_drop}: "
                     f"{st['flagged']} of {st['instances']} ignored, flip TTA), then "
                     f"{res2.iters} iterations from those weights with pseudo weight {args.pseudo_weight} "
                     f"(lr {cfg2.train.lr}) in {t2 / 60:.1f} min, loss {res2.first_loss:.3f} -> "
                     f"{res2.last_loss:.3f}; training time in all {train_s / 60:.1f} min")
    sizes = [int(x) for x in args.infer_sizes.split(",") if x] or [None]
    best, diffs = None, []
    alphas = [float(x) for x in args.alphas.split(",") if x] or [None]
    combos = [(size, alpha, tta) for size in sizes for alpha in alphas for tta in args.tta.split(",")]
    for size, alpha, tta in combos:
        tag = f"s{size or 'ckpt'}_a{alpha if alpha is not None else 'ckpt'}_{tta}"
        exp = export_onnx(ckpt, out / f"model_{tag}.onnx", infer_size=size, flip_tta=tta == "flip", alpha=alpha)
        diffs.append(exp.max_abs_diff)
        for ctx in (float(c) for c in args.contexts.split(",")):
            for thr, pw, merge in ((float(x), float(w), m) for x in args.thresholds.split(",")
                                   for w in args.prior_weights.split(",") for m in merges):
                pj = out / f"proxy_{tag}_c{ctx}_t{thr}_p{pw}{'_merged' if merge == 'on' else ''}.json"
                stats = generate_proxy(ProxyConfig(ann=val_ann, images=val_img, out=pj, model=out / f"model_{tag}.onnx",
                                                   engine="onnx", context=ctx, threshold=thr, prior_weight=pw,
                                                   merge=merge == "on", workers=1, threads=args.threads, progress=False))
                q = mask_quality(val_ann, pj)
                name = (f"BoxCaseg S={exp.infer_size}, alpha {exp.metadata['boxcaseg.alpha']}, TTA {tta}, "
                        f"context {ctx}, threshold {thr}" + (f", prior {pw}" if pw else "")
                        + (", merged" if merge == "on" else ""))
                rows.append([name, q["miou_star"], q["miou"], q["iou50"], q["iou75"], q["small"]["miou"] or 0.0])
                print(f"{name}: mIoU* {q['miou_star']:.4f} IoU@75 {q['iou75']:.4f} "
                      f"({stats['instances_per_s']:.1f} inst/s)", flush=True)
                if merge == "off":
                    ok = q["miou_star"] >= GOAL["miou_star"] and q["iou75"] >= GOAL["iou75"]
                    if best is None or (ok, q["miou_star"]) > (best[3], best[1]):
                        best = (name, q["miou_star"], q["iou75"], ok)
    table = markdown_table(["masks on coco-val (GT boxes given)", "mIoU*", "mIoU", "IoU@50", "IoU@75", "small mIoU"], rows)
    if best is None:
        sys.exit("no per-instance row (--merge off) to judge the goal on")
    met = best[3]
    body = (
        "## quality: the CPU recipe on real data (`python bench/quality.py`)\n\n"
        f"Machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads. "
        f"Data: {root.name}/coco-train boxes + duts-tr pairs for training; coco-val for evaluation "
        f"({int(mask_quality(val_ann, floors['box-fill'])['n'])} non-crowd instances).\n"
        + "".join(f"- {n}\n" for n in notes)
        + f"- ONNX export: max abs diff vs PyTorch <= {max(diffs):.2e}\n"
        f"- floors measured in the same run ({floor_s:.0f} s)\n\n{table}\n\n"
        f"Best per-instance row (no merge, as the floors): {best[0]}: mIoU* {best[1]:.3f}, IoU@75 {best[2]:.3f} "
        f"— goal mIoU* >= {GOAL['miou_star']}, IoU@75 >= {GOAL['iou75']}: {'met' if met else 'NOT met'}.\n"
    )
    print(body)
    print(json.dumps({"rows": [dict(zip(["masks", "miou_star", "miou", "iou50", "iou75", "small_miou"], r)) for r in rows],
                      "train_s": train_s, "goal_met": met}))
    if args.write:
        write_section("quality", body)


if __name__ == "__main__":
    main()
