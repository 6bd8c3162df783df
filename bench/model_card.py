"""The shipped model: choose its inference settings, pack it, and measure its model card.

    python bench/model_card.py sweep --ckpt runs/pretrained/last.pt   # settings on coco-val
    python bench/model_card.py pack --ckpt runs/pretrained/last.pt --context 1.2 --threshold 0.4 --prior-weight 0.3
    python bench/model_card.py int8                                    # the int8 graph alone (pack does it too)
    python bench/model_card.py card                                    # the shipped model, no flags

``sweep`` runs proxy masks of ``${BOXCASEG_DATA}/coco-val`` (GT boxes given) through the
checkpoint's ONNX graph for each context x threshold x prior weight, per instance and
merged, and prints mIoU* / IoU@75 (the settings are chosen on coco-val itself: the card
says so). ``pack`` writes ``boxcaseg/weights/boxcaseg-lite0.pt`` (fp16, the settings in
its config) and then, as ``int8`` does, its int8 graph ``boxcaseg-lite0.int8.onnx``: the
packed file's ONNX graph quantized by ONNX Runtime, calibrated on ``--calib-crops`` crops
of the model's own training boxes (``--calib-ann`` / ``--calib-images``, default
``${BOXCASEG_DATA}/coco-train``; the same inputs and library versions give the same bytes on
one machine, and on another the same scales and zero points within 1% / 2 steps).
Both sha256 go into ``boxcaseg/weights/__init__.py``, the int8 graph's size and calibration
into ``MODEL.md``. ``card`` runs
the shipped model exactly as ``boxcaseg proxy`` does without flags (and with
``--merge``), scores it with ``boxcaseg evaluate masks``'s function beside box-fill
and the inscribed ellipse, lists the worst instances, and writes the table into
``boxcaseg/weights/MODEL.md`` and bench/RESULTS.md (section "model_card"; ``--no-write``:
MODEL.md only).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.common import add_write_flag, data_root, replace_between, require_data, write_section  # noqa: E402

WEIGHTS = REPO / "boxcaseg" / "weights"  # where pack writes (the package's own folder)
CARD = WEIGHTS / "MODEL.md"
WEIGHTS_INIT = WEIGHTS / "__init__.py"


def _val() -> tuple[Path, Path]:
    ann = require_data("coco-val", "instances.json")
    return ann, ann.parent / "images"


def _proxy(model, out: Path, merge: bool, **settings) -> dict:
    from boxcaseg.proxy import ProxyConfig, generate_proxy

    ann, images = _val()
    return generate_proxy(ProxyConfig(ann=ann, images=images, out=out, model=model, merge=merge, workers=1,
                                      progress=False, **settings))


def sweep(args) -> None:
    from boxcaseg.evaluate import mask_quality

    ann, _ = _val()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for ctx in (float(x) for x in args.contexts.split(",")):
        for thr in (float(x) for x in args.thresholds.split(",")):
            for pw in (float(x) for x in args.prior_weights.split(",")):
                for merge in (False, True):
                    pj = out / f"sweep_c{ctx}_t{thr}_p{pw}_{'merged' if merge else 'own'}.json"
                    _proxy(args.ckpt, pj, merge, engine="onnx", context=ctx, threshold=thr, prior_weight=pw)
                    q = mask_quality(ann, pj)
                    rows.append({"context": ctx, "threshold": thr, "prior_weight": pw, "merge": merge,
                                 "miou_star": q["miou_star"], "iou75": q["iou75"], "miou": q["miou"]})
                    print(f"context {ctx} threshold {thr} prior {pw} {'merged' if merge else 'per-instance'}: "
                          f"mIoU* {q['miou_star']:.4f} IoU@75 {q['iou75']:.4f}", flush=True)
    (out / "sweep.json").write_text(json.dumps(rows, indent=1))
    for merge in (False, True):
        best = max((r for r in rows if r["merge"] == merge), key=lambda r: (r["miou_star"] + r["iou75"]))
        print(f"best {'merged' if merge else 'per-instance'} (mIoU* + IoU@75): {best}")


def pack(args) -> None:
    """The shipped model file from a checkpoint, then its int8 graph (:func:`int8`)."""
    from boxcaseg import weights
    from boxcaseg.io import file_sha256
    from boxcaseg.model.pack import pack_checkpoint

    _calibration_set(args)  # before the model file changes: its int8 graph must follow
    dst = WEIGHTS / weights.FILE
    pack_checkpoint(args.ckpt, dst, context=args.context, threshold=args.threshold, prior_weight=args.prior_weight,
                    infer_size=args.infer_size, extra={"name": weights.NAME})
    sha = file_sha256(dst)
    _record_sha("SHA256", sha)
    print(f"wrote {dst}: {dst.stat().st_size / 1e6:.2f} MB, sha256 {sha}")
    int8(args)


def int8(args) -> None:
    """The int8 graph of the packed model file: its ONNX graph quantized, calibrated on crops of
    its training boxes; sha256 into weights/__init__.py, size and calibration into MODEL.md."""
    import tempfile

    from boxcaseg import weights
    from boxcaseg.export import export_onnx
    from boxcaseg.export.onnx_export import read_onnx_metadata
    from boxcaseg.export.quantize import QUANT_KEY
    from boxcaseg.io import file_sha256, safe_torch_load
    from boxcaseg.proxy.calibration import quantize_calibrated

    ann, images = _calibration_set(args)
    src, dst = WEIGHTS / weights.FILE, WEIGHTS / weights.INT8_FILE
    name = "/".join(ann.parts[-2:])
    trained_on = [r["source"] for r in safe_torch_load(src).get("data_sets") or [] if r.get("kind") == "box"]
    if trained_on and name not in trained_on:
        print(f"note: {name} is not among the model's training box sets ({', '.join(trained_on)})")
    with tempfile.TemporaryDirectory() as tmp:
        rep = export_onnx(src, Path(tmp) / "m.onnx")
        quantize_calibrated(rep.onnx_path, dst, ann, images, args.calib_crops, args.calib_seed)
    sha, sha_pt = file_sha256(dst), file_sha256(src)
    meta = read_onnx_metadata(dst)
    _record_sha("INT8_SHA256", sha)
    mb = dst.stat().st_size / 1e6
    _write_card_section("int8", (
        f"`{weights.INT8_FILE}`, {mb:.1f} MB, sha256 `{sha[:16]}...`: the ONNX graph of `{weights.FILE}` "
        f"(sha256 `{sha_pt[:16]}...`) quantized for CPUs, run by `--precision int8` (`boxcaseg proxy`, `boxcaseg "
        f"segment`, `Segmenter(precision=\"int8\")`). Quantization: {meta[QUANT_KEY]}; the crops are cut as a proxy "
        f"run cuts them (S={meta['boxcaseg.infer_size']}, context {float(meta['boxcaseg.context']):g}) from the "
        "model's own training boxes (never coco-val). Built by `python bench/model_card.py pack` with the model file "
        "(alone: `python bench/model_card.py int8`); the same inputs and library versions give the same bytes on one machine, "
        "and on another the same scales and zero points within 1% / 2 steps. "
        "Speed and masks against fp32: bench/RESULTS.md \"int8\" (`python bench/int8.py`)."))
    print(f"wrote {dst}: {mb:.2f} MB, sha256 {sha} ({meta[QUANT_KEY]})")


def _calibration_set(args) -> tuple[Path, Path]:
    """The boxes that calibrate the int8 graph: ``--calib-ann`` / ``--calib-images``, default coco-train."""
    ann = Path(args.calib_ann or data_root() / "coco-train" / "instances.json")
    images = Path(args.calib_images or ann.parent / "images")
    if not ann.is_file() or not images.is_dir():
        sys.exit(f"calibration boxes not found: {ann} and {images} (set BOXCASEG_DATA or --calib-ann/--calib-images)")
    return ann, images


def _record_sha(name: str, sha: str) -> None:
    """``NAME = "<sha>"`` in weights/__init__.py."""
    text, n = re.subn(rf'^{name} = ".*?"(.*)$', lambda m: f'{name} = "{sha}"{m.group(1)}', WEIGHTS_INIT.read_text(),
                      count=1, flags=re.M)
    if n != 1:
        sys.exit(f"{WEIGHTS_INIT}: no line {name} = \"...\" to record the sha256 in")
    WEIGHTS_INIT.write_text(text)


def _write_card_section(name: str, body: str) -> None:
    """Replace MODEL.md's section ``name`` (its markers must be there; bench/common.py replace_between)."""
    try:
        CARD.write_text(replace_between(CARD.read_text(), name, body, append=False))
    except ValueError as e:
        sys.exit(f"{CARD}: {e}")


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def data_line() -> str:
    """What the shipped model was trained on, from its file (``data_sets``, written by ``pack``)."""
    from boxcaseg import weights
    from boxcaseg.io import safe_torch_load

    sets = safe_torch_load(weights.pretrained_path()).get("data_sets")
    if not sets:
        return "Training data: not recorded in the model file (packed before data sets were recorded)."
    parts = []
    for kind, unit in (("box", "boxes"), ("salient", "pairs")):
        mine = [r for r in sets if r["kind"] == kind]
        if mine:
            parts.append(f"{kind} sets " + ", ".join(
                f"{r['source']} ({r['items']:,} {unit}, {100 * r['share']:.0f}% of the draws"
                + (f", weight {r['weight']:g}" if r.get("weight") else "") + ")" for r in mine))
    return "Training data (recorded in the model file): " + "; ".join(parts) + "."


def card(args) -> None:
    from boxcaseg.baselines import box_fill_predictions, ellipse_predictions
    from boxcaseg.evaluate import instance_ious, mask_quality
    from boxcaseg.io import load_json

    ann, _ = _val()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    timing = {}
    for merge in (False, True):
        pj = out / f"card_{'merged' if merge else 'own'}.json"
        t = time.perf_counter()
        s = _proxy(None, pj, merge)  # exactly `boxcaseg proxy` without flags (and with --merge)
        timing[merge] = (time.perf_counter() - t, s)
        results["merged (--merge)" if merge else "per instance (default)"] = mask_quality(ann, pj)
    results["box-fill"] = mask_quality(ann, box_fill_predictions(ann))
    results["inscribed ellipse"] = mask_quality(ann, ellipse_predictions(ann))
    info = load_json(out / "card_own.json")["info"]["boxcaseg_proxy"]
    lines = ["| masks (coco-val, 585 GT boxes) | size | n | mIoU* | mIoU | IoU@50 | IoU@75 |", "|---|---|---|---|---|---|---|"]
    for name, q in results.items():
        for size in ("all", "small", "medium", "large"):
            r = q if size == "all" else q[size]
            lines.append(f"| {name if size == 'all' else ''} | {size} | {r['n']} | {_pct(r['miou_star'])} | {_pct(r['miou'])} | "
                         f"{_pct(r['iou50'])} | {_pct(r['iou75'])} |")
    # worst instances (per instance masks), by category
    gt = load_json(ann)
    cats = {c["id"]: c["name"] for c in gt["categories"]}
    anns = {a["id"]: a for a in gt["annotations"]}
    recs = sorted(instance_ious(ann, out / "card_own.json"), key=lambda r: r.iou)
    worst = []
    for r in recs[:args.worst]:
        a = anns[r.ann_id]
        worst.append(f"{cats.get(a['category_id'], '?')} (ann {r.ann_id}, {a['bbox'][2]:.0f}x{a['bbox'][3]:.0f} px): IoU {r.iou:.2f}")
    by_cat: dict[str, list] = {}
    for r in recs:
        by_cat.setdefault(cats.get(anns[r.ann_id]["category_id"], "?"), []).append(r.iou)
    weak = sorted(((sum(v) / len(v), k, len(v)) for k, v in by_cat.items() if len(v) >= 5))[:6]
    s_default = timing[False][1]
    body = "\n".join([
        data_line(),
        "",
        f"Settings in force (embedded in the model, chosen on coco-val): S={info['infer_size']}, context {info['context']:g}, "
        f"threshold {info['threshold']:g}, prior weight {info['prior_weight']:g}, alpha {info['alpha']:g}; engine "
        f"{info['engine']} (ONNX Runtime, CPU); drop below agreement {info['drop_thresh']:g}.",
        "",
        *lines,
        "",
        f"Command: `boxcaseg proxy --ann coco-val/instances.json --images coco-val/images -o p.json` (no other flag; "
        f"`--merge` for the merged rows), then `boxcaseg evaluate masks --gt coco-val/instances.json --pred p.json`. "
        f"{s_default['instances']} instances, {s_default['flagged']} flagged ignore_mask (default run), "
        f"{timing[False][0]:.1f} s for the default run on this machine (2 cores, ONNX Runtime; the first use of the model "
        "also builds its ONNX graph into the cache).",
        "",
        "Weakest categories (per-instance mIoU, >= 5 instances): "
        + "; ".join(f"{k} {100 * m:.0f} (n={n})" for m, k, n in weak) + ".",
        "",
        "Worst instances: " + "; ".join(worst) + ".",
    ])
    (out / "card.md").write_text(body + "\n")
    _write_card_section("card", body)
    if args.write:
        write_section("model_card", "## model_card: the shipped model on coco-val (`python bench/model_card.py card`)\n\n" + body)
    print(body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sweep")
    s.add_argument("--ckpt", required=True)
    s.add_argument("--out", default=str(REPO / "runs" / "card"))
    s.add_argument("--contexts", default="1.1,1.2")
    s.add_argument("--thresholds", default="0.4,0.5")
    s.add_argument("--prior-weights", default="0,0.3")
    p = sub.add_parser("pack")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--context", type=float, required=True)
    p.add_argument("--threshold", type=float, required=True)
    p.add_argument("--prior-weight", type=float, required=True)
    p.add_argument("--infer-size", type=int, default=None)
    q = sub.add_parser("int8")
    for sp in (p, q):
        sp.add_argument("--calib-ann", default=None, help="training boxes (default: ${BOXCASEG_DATA}/coco-train/instances.json)")
        sp.add_argument("--calib-images", default=None, help="their images (default: images/ beside --calib-ann)")
        sp.add_argument("--calib-crops", type=int, default=256)
        sp.add_argument("--calib-seed", type=int, default=0)
    c = sub.add_parser("card")
    c.add_argument("--out", default=str(REPO / "runs" / "card"))
    c.add_argument("--worst", type=int, default=8)
    add_write_flag(c, "model_card", default=True)  # MODEL.md's card is always written
    args = ap.parse_args()
    {"sweep": sweep, "pack": pack, "int8": int8, "card": card}[args.cmd](args)


if __name__ == "__main__":
    main()
