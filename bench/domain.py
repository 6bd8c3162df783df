"""The RESULTS "domain" table: masks from boxes on images unlike COCO (dsb2018-nuclei), by image type.

    python bench/domain.py baselines                               # box-fill, inscribed ellipse -> records box-fill, ellipse
    python bench/domain.py eval --name shipped --model pretrained  # boxcaseg proxy with the model's own settings
    python bench/domain.py eval --name ft --model runs/ft/last.pt [--context C --threshold T --prior-weight W --merge]
    python bench/domain.py eval --name ft-grid --model runs/ft/last.pt --sweep --context 1.0,1.2 --threshold 0.3,0.4,0.5 --prior-weight 0,0.3
    python bench/sam_baseline.py --ann $BOXCASEG_DATA/dsb2018-nuclei/dev/instances.json \\
        --images $BOXCASEG_DATA/dsb2018-nuclei/dev/images -o runs/domain/mobilesam-dev.json
    python bench/domain.py score --name mobilesam --pred runs/domain/mobilesam-dev.json
    python bench/domain.py throughput                              # proxy inst/s: dsb2018-nuclei/dev vs coco-val, one run
    python bench/domain.py report [--write]                        # the table -> bench/RESULTS.md "domain"

Every method is scored the same way: each GT instance of ``${BOXCASEG_DATA}/dsb2018-nuclei/<split>``
against the prediction with its annotation id, through ``boxcaseg.evaluate`` (``instance_ious``,
``summarize_ious``: the functions ``boxcaseg evaluate masks`` uses), grouped by the image's ``type``
(fluo, he, brightfield) and overall: n, mIoU* (one category here: it equals mIoU), IoU@75, IoU@50;
for proxy runs also the share of masks flagged ``ignore_mask`` and the mean true IoU of flagged and
of unflagged masks. Each command leaves a record ``bench/records/domain/NAME.json`` (committed);
``report`` builds the table from the records.

``eval`` runs ``boxcaseg proxy`` through the library (``ProxyConfig`` / ``generate_proxy``: the
model's own settings unless ``--context`` / ``--threshold`` / ``--prior-weight`` are given), keeps
its output in ``runs/domain/NAME-SPLIT.json`` (for ``boxcaseg visualize``) and records the run's
instances/s, the model file's sha256 and, for a checkpoint with a ``metrics.jsonl`` beside it, the
fine-tuning time. ``--sweep`` scores every setting of the grid (comma lists; a flag left out keeps
the model's value) in one go: per context the network runs once per image (``Segmenter``, the
proxy's windows, crops and masks path) and its maps are kept while every threshold and prior
weight is applied to them by the library's own post-processing; the record keeps every row.
Settings chosen on the split they are scored on are an upper bound, not a held-out figure: the
report says which set each row's settings were chosen on (``--chosen-on``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import add_write_flag, command_line, data_root, require_data, write_section  # noqa: E402

RECORDS = REPO / "bench" / "records" / "domain"
RUNS = REPO / "runs" / "domain"
DATASET = "dsb2018-nuclei"
TYPES = ("fluo", "he", "brightfield")
TYPE_NAMES = {"fluo": "fluorescence", "he": "H&E tissue", "brightfield": "brightfield", "all": "all"}
# report rows in this order first; any other record follows, by name
KNOWN_ROWS = {"box-fill": "box-fill", "ellipse": "inscribed ellipse", "mobilesam": "MobileSAM, same boxes",
              "shipped": "shipped model, zero-shot"}
THROUGHPUT = "throughput"  # the record of `throughput` (not a method row)
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


# --------------------------------------------------------------------------- data and records


def split_paths(split: str, root: Path | None = None) -> tuple[Path, Path]:
    """(instances.json, images/) of ``dsb2018-nuclei/<split>`` under the data root (exits when absent)."""
    ann = require_data(DATASET, split, "instances.json", root=root, script="domain.py")
    return ann, ann.parent / "images"


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name) or name == THROUGHPUT:
        raise SystemExit(f"domain.py: --name {name!r}: letters, digits, '.', '_' or '-' (at most 64), not {THROUGHPUT!r}")
    return name


def write_record(name: str, record: dict, records: Path | None = None) -> Path:
    records = Path(records or RECORDS)
    records.mkdir(parents=True, exist_ok=True)
    path = records / f"{name}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def _shown(path: Path) -> str:
    """A path as printed and recorded: relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def load_records(records: Path | None = None) -> dict[str, dict]:
    records = Path(records or RECORDS)
    if not records.is_dir():
        return {}
    return {p.stem: json.loads(p.read_text()) for p in sorted(records.glob("*.json"))}


# --------------------------------------------------------------------------- scoring


def _mean(values: list[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def image_types(gt) -> list[str]:
    """The image types of a GT json, the known ones first (an image without ``type`` counts as 'untyped')."""
    seen = {str(im.get("type", "untyped")) for im in gt.images.values()}
    return [t for t in TYPES if t in seen] + sorted(seen - set(TYPES))


def figures(gt, pred, flags: bool) -> dict:
    """Scores of ``pred`` (a COCO json path, a proxy json or a list of predictions carrying the GT
    annotation ids) against ``gt`` (:class:`boxcaseg.cocojson.CocoData`), overall (``all``) and by
    image type: ``summarize_ious``'s ``n, miou_star, miou, iou50, iou75``, plus ``missing``
    (instances without a usable prediction, scored 0) and, with ``flags`` (the predictions carry
    ``ignore_mask``), ``flagged_share``, ``iou_flagged`` and ``iou_unflagged`` (mean true IoU)."""
    from boxcaseg.evaluate import instance_ious, summarize_ious

    recs = instance_ious(gt, pred)
    kind = {i: str(im.get("type", "untyped")) for i, im in gt.images.items()}
    groups = {"all": recs, **{t: [r for r in recs if kind[r.image_id] == t] for t in image_types(gt)}}
    out = {}
    for name, rs in groups.items():
        s = summarize_ious(rs)
        s["missing"] = sum(1 for r in rs if not r.found)
        if flags:
            flagged = [r.iou for r in rs if r.ignored]
            s["flagged_share"] = len(flagged) / len(rs) if rs else None
            s["iou_flagged"] = _mean(flagged)
            s["iou_unflagged"] = _mean([r.iou for r in rs if not r.ignored])
        out[name] = s
    return out


def figures_line(figs: dict) -> str:
    parts = []
    for name, s in figs.items():
        if s["n"]:
            flag = f", flagged {100 * s['flagged_share']:.0f}%" if s.get("flagged_share") is not None else ""
            parts.append(f"{name} (n {s['n']}): mIoU* {s['miou_star']:.4f} IoU@75 {s['iou75']:.4f}{flag}")
    return "; ".join(parts)


# --------------------------------------------------------------------------- fine-tuning provenance


def model_provenance(model: str) -> dict:
    """What a model file says of its fine-tuning: the training time and iterations read from the
    ``metrics.jsonl`` beside a checkpoint (over its resumes), the sets it trained on."""
    if model == "pretrained":
        return {"train_s": None, "iters": None, "trained_on": "the shipped model (coco-train boxes + duts-tr)"}
    path = Path(model)
    out: dict = {"train_s": None, "iters": None, "trained_on": None}
    metrics = path.parent / "metrics.jsonl"
    if path.suffix == ".pt" and metrics.is_file():
        from bench.data_scaling import training_seconds
        from boxcaseg.io import read_jsonl

        recs = read_jsonl(metrics)
        if recs:
            out["train_s"] = round(training_seconds(recs), 1)
            out["iters"] = recs[-1].get("iter")
    if path.suffix == ".pt":
        from boxcaseg.io import safe_torch_load

        ck = safe_torch_load(path)
        sets = ck.get("data_sets") if isinstance(ck, dict) else None
        if sets:
            out["trained_on"] = sets
    return out


def model_file(model: str) -> Path:
    """The model file a ``--model`` names: the shipped .pt for 'pretrained' (its sha256 checked)."""
    if model == "pretrained":
        from boxcaseg.weights import pretrained_path

        return Path(pretrained_path())
    return Path(model_arg(model))


def model_arg(model: str) -> str | Path:
    if model == "pretrained":
        return model
    path = Path(model)
    if not path.is_file():
        raise SystemExit(f"domain.py: --model {model}: no such file (a checkpoint, an .onnx file or 'pretrained')")
    return path


def _floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"domain.py: {flag} {text!r}: numbers separated by commas") from None


def _default_chosen_on(model: str, given: bool, split: str) -> str:
    if given:
        return "given on the command line"
    if model == "pretrained":
        return "the model's own settings (chosen on coco-val)"
    return "the model's own settings"


# --------------------------------------------------------------------------- eval: one proxy run


def proxy_eval(ann: Path, images: Path, model: str, out: Path, *, context=None, threshold=None, prior_weight=None,
               merge: bool = False, threads: int = 1, engine: str = "auto", progress: bool = True) -> tuple[dict, dict]:
    """``boxcaseg proxy`` on ``ann`` through the library (the model's settings unless given) and its
    figures by image type: (figures, proxy summary)."""
    from boxcaseg.cocojson import load_coco
    from boxcaseg.proxy import ProxyConfig, generate_proxy

    out.parent.mkdir(parents=True, exist_ok=True)
    summary = generate_proxy(ProxyConfig(ann=ann, images=images, out=out, model=model_arg(model), context=context,
                                         threshold=threshold, prior_weight=prior_weight, merge=merge, workers=1,
                                         threads=threads, engine=engine, progress=progress))
    return figures(load_coco(ann, "ground-truth"), out, flags=True), summary


def cmd_eval(args) -> dict:
    from boxcaseg.io import file_sha256

    name = check_name(args.name)
    ann, images = split_paths(args.split)
    given = {"context": _floats(args.context, "--context"), "threshold": _floats(args.threshold, "--threshold"),
             "prior_weight": _floats(args.prior_weight, "--prior-weight")}
    if args.sweep:
        return cmd_sweep(args, name, ann, images, given)
    for k, v in given.items():
        if v is not None and len(v) != 1:
            raise SystemExit(f"domain.py: --{k.replace('_', '-')}: one value without --sweep")
    settings = {k: (v[0] if v else None) for k, v in given.items()}
    out = RUNS / f"{name}-{args.split}.json"
    figs, summary = proxy_eval(ann, images, args.model, out, merge=args.merge, threads=args.threads,
                               engine=args.engine, progress=not args.no_progress, **settings)
    info = summary["settings"]
    record = {
        "name": name, "kind": "proxy", "label": args.label, "split": f"{DATASET}/{args.split}",
        "model": args.model, "model_sha256": file_sha256(model_file(args.model)),
        "engine_model_sha256": info["model_sha256"],
        "settings": {k: info.get(k) for k in ("infer_size", "context", "threshold", "prior_weight", "relative",
                                              "merge", "drop_thresh", "drop_slack")},
        "chosen_on": args.chosen_on or _default_chosen_on(args.model, any(v is not None for v in settings.values()),
                                                          args.split),
        "engine": summary["engine"], "threads": args.threads,
        "instances_per_s": summary["instances_per_s"], "steady_instances_per_s": summary["steady_instances_per_s"],
        "proxy_seconds": summary["seconds"], **model_provenance(args.model),
        "figures": figs, "output": _shown(out),
        "command": command_line(), "load_average": _load(),
    }
    path = write_record(name, record)
    print(f"{name}: {figures_line(figs)}; {summary['instances_per_s']} inst/s -> {_shown(path)}")
    return record


# --------------------------------------------------------------------------- eval --sweep


class MapCache:
    """An engine that keeps the maps of the crops it has seen (until :meth:`clear`): the same
    crops under another threshold or prior weight are not run again. Every call runs a batch of
    exactly ``batch_size`` (zero-padded), as a proxy run does."""

    def __init__(self, engine, batch_size: int):
        self.engine, self.batch_size = engine, batch_size
        self.output_stride, self.infer_size = engine.output_stride, engine.infer_size
        self.cache: dict[bytes, object] = {}
        self.network_s = 0.0
        self.runs = self.hits = 0

    def predict(self, batch):
        import numpy as np

        batch = np.ascontiguousarray(batch)
        key = hashlib.blake2b(batch.tobytes(), digest_size=16).digest() + bytes(str(batch.shape), "ascii")
        hit = self.cache.get(key)
        if hit is not None:
            self.hits += 1
            return hit
        n = len(batch)
        full = np.zeros((self.batch_size, *batch.shape[1:]), batch.dtype)
        full[:n] = batch
        t0 = time.perf_counter()
        probs = np.array(self.engine.predict(full)[:n], copy=True)
        self.network_s += time.perf_counter() - t0
        self.runs += 1
        self.cache[key] = probs
        return probs

    def clear(self) -> None:
        self.cache.clear()


def sweep_predictions(ann: Path, images: Path, model: str, contexts, thresholds, priors, *, merge: bool = False,
                      threads: int = 1, engine: str = "auto", progress: bool = True,
                      every: int = 1) -> tuple[dict, dict]:
    """Predictions for every (context, threshold, prior weight) of the grid, the network run once
    per context and image: ``{(c, t, w): [prediction with id, image_id, segmentation, ignore_mask]}``
    and the run's timings. A value None is the model's own setting. The masks come from
    :meth:`boxcaseg.Segmenter.predict_with_flags` (the proxy's windows, crops and post-processing);
    a mask is flagged as the proxy flags it (``Segmenter``'s drop rule: the proxy's defaults
    ``--drop-thresh`` and ``--drop-slack``), a degenerate box gets an empty flagged mask,
    as in a proxy run. ``every`` K: every K-th image of the json (by image id), for a quick look."""
    import numpy as np
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from boxcaseg import Segmenter
    from boxcaseg.cocojson import is_crowd, load_coco
    from boxcaseg.data.transforms import open_rgb
    from boxcaseg.masks import empty_rle, encode

    gt = load_coco(ann, "COCO annotation")
    paths = gt.paths(images)
    seg = Segmenter(None if model == "pretrained" else model_arg(model), engine=engine, threads=threads)
    own = seg.settings
    cache = MapCache(seg.engine, seg.batch_size)
    seg.engine = cache
    contexts = contexts or [own.context]
    thresholds = thresholds or [own.threshold]
    priors = priors or [own.prior_weight]
    grid = [(c, t, w) for c in contexts for t in thresholds for w in priors]
    preds: dict = {g: [] for g in grid}
    work = [(i, [a for a in anns if not is_crowd(a)]) for i, anns in gt.by_image.items()]
    work = [(i, anns) for i, anns in work if anns]
    work = sorted(work, key=lambda x: str(x[0]))[::max(1, every)]
    t0 = time.perf_counter()
    with Progress(TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  disable=not progress) as prog:
        task = prog.add_task("sweep", total=len(contexts) * len(work))
        for c in contexts:
            seg.context = c
            for image_id, anns in work:
                w_, h_ = gt.image_size(image_id)
                img = np.asarray(open_rgb(paths[image_id], "image", (w_, h_), f" (image id {image_id})"))
                usable = [a for a in anns if gt.box_problem(a) is None]
                boxes = np.array([[float(v) for v in a["bbox"]] for a in usable], np.float64).reshape(-1, 4)
                for t in thresholds:
                    for w in priors:
                        seg.threshold, seg.prior_weight = t, w
                        masks, agreement, flags = seg.predict_with_flags(img, boxes, merge=merge)
                        got = {a["id"]: (encode(m), float(g), bool(f))
                               for a, m, g, f in zip(usable, masks, agreement, flags)}
                        for a in anns:
                            rle, agr, flag = got.get(a["id"], (empty_rle(h_, w_), 0.0, True))
                            preds[(c, t, w)].append({"id": a["id"], "image_id": image_id,
                                                     "category_id": a.get("category_id", 1), "segmentation": rle,
                                                     "proxy_agreement": agr, "ignore_mask": flag})
                cache.clear()
                prog.advance(task)
    seconds = time.perf_counter() - t0
    n = sum(len(anns) for _, anns in work)
    timing = {"seconds": round(seconds, 2), "network_s": round(cache.network_s, 2), "network_batches": cache.runs,
              "reused_batches": cache.hits, "instances": n, "settings_scored": len(grid),
              "instances_per_s_per_setting": round(n * len(grid) / seconds, 2) if seconds else None,
              "model_settings": {"infer_size": own.infer_size, "context": own.context, "threshold": own.threshold,
                                 "prior_weight": own.prior_weight},
              "model_label": seg.model.label}
    return preds, timing


def cmd_sweep(args, name: str, ann: Path, images: Path, given: dict) -> dict:
    from boxcaseg.cocojson import load_coco
    from boxcaseg.io import file_sha256

    from boxcaseg.proxy.options import DROP_SLACK, DROP_THRESH

    preds, timing = sweep_predictions(ann, images, args.model, given["context"], given["threshold"],
                                      given["prior_weight"], merge=args.merge, threads=args.threads,
                                      engine=args.engine, progress=not args.no_progress, every=args.every)
    gt = None if args.boxes_only else load_coco(ann, "ground-truth")
    rows = []
    for (c, t, w), p in preds.items():
        row = {"context": c, "threshold": t, "prior_weight": w,
               "mean_agreement": _mean([q["proxy_agreement"] for q in p]),
               "flagged_share": _mean([float(q["ignore_mask"]) for q in p])}
        if gt is not None:
            row["figures"] = figures(gt, p, flags=True)
        rows.append(row)
        print(f"c{c:g} t{t:g} p{w:g}: mean agreement {row['mean_agreement']:.4f}, flagged "
              f"{100 * row['flagged_share']:.1f}%" + (f"; {figures_line({'all': row['figures']['all']})}"
                                                      if gt is not None else ""), flush=True)
    record = {
        "name": name, "kind": "sweep", "label": args.label, "split": f"{DATASET}/{args.split}", "model": args.model,
        "model_sha256": file_sha256(model_file(args.model)), "merge": args.merge, "drop_thresh": DROP_THRESH,
        "drop_slack": DROP_SLACK, "boxes_only": bool(args.boxes_only), "every": args.every,
        "threads": args.threads, **timing, **model_provenance(args.model), "rows": rows,
        "command": command_line(), "load_average": _load(),
    }
    path = write_record(name, record)
    if gt is None:
        top = agreement_row(rows)
        print(f"{name}: highest mean agreement on {args.split}'s boxes c{top['context']:g} t{top['threshold']:g} "
              f"p{top['prior_weight']:g} ({top['mean_agreement']:.4f}) -> {_shown(path)}")
        return record
    best = best_row(rows)
    print(f"{name}: best on {args.split} itself c{best['context']:g} t{best['threshold']:g} "
          f"p{best['prior_weight']:g}: {figures_line({'all': best['figures']['all']})} -> {_shown(path)}")
    return record


def agreement_row(rows: list[dict]) -> dict:
    """The mask-free choice: the grid's row with the highest mean box agreement (the boxes alone)."""
    return max(rows, key=lambda r: r["mean_agreement"])


def best_row(rows: list[dict]) -> dict:
    """The grid's best row by overall mIoU*, then IoU@75."""
    return max(rows, key=lambda r: (r["figures"]["all"]["miou_star"], r["figures"]["all"]["iou75"]))


# --------------------------------------------------------------------------- baselines and predictions


def cmd_baselines(args) -> list[dict]:
    from boxcaseg.baselines import box_fill_predictions, ellipse_predictions
    from boxcaseg.cocojson import load_coco

    ann, _ = split_paths(args.split)
    gt = load_coco(ann, "ground-truth")
    out = []
    for name, fn in (("box-fill", box_fill_predictions), ("ellipse", ellipse_predictions)):
        t0 = time.perf_counter()
        preds = fn(gt)
        seconds = time.perf_counter() - t0
        figs = figures(gt, preds, flags=False)
        record = {"name": name, "kind": "baseline", "label": KNOWN_ROWS[name], "split": f"{DATASET}/{args.split}",
                  "chosen_on": "no settings", "instances_per_s": round(len(preds) / seconds, 1) if seconds else None,
                  "threads": 1, "train_s": None, "figures": figs, "command": command_line(), "load_average": _load()}
        path = write_record(name, record)
        print(f"{name}: {figures_line(figs)} -> {_shown(path)}")
        out.append(record)
    return out


def cmd_score(args) -> dict:
    from boxcaseg.cocojson import load_coco
    from boxcaseg.io import file_sha256, load_json

    name = check_name(args.name)
    ann, _ = split_paths(args.split)
    pred = Path(args.pred)
    data = load_json(pred, "predictions")
    anns = data if isinstance(data, list) else data.get("annotations", []) if isinstance(data, dict) else []
    flags = any(isinstance(a, dict) and "ignore_mask" in a for a in anns)
    figs = figures(load_coco(ann, "ground-truth"), data, flags=flags)
    run = None
    sidecar = pred.with_name(pred.stem + ".run.json")  # bench/sam_baseline.py's run record
    if sidecar.is_file():
        run = json.loads(sidecar.read_text())
    record = {"name": name, "kind": "predictions", "label": args.label or KNOWN_ROWS.get(name),
              "split": f"{DATASET}/{args.split}", "predictions": str(pred), "predictions_sha256": file_sha256(pred),
              "chosen_on": args.chosen_on or "the method's own settings",
              "instances_per_s": run.get("instances_per_s") if run else None,
              "threads": run.get("threads") if run else None, "train_s": None, "run": run,
              "figures": figs, "command": command_line(),
              "load_average": {"1min": run.get("load_average_1min"), "cores": run.get("cores")} if run else None}
    path = write_record(name, record)
    print(f"{name}: {figures_line(figs)} -> {_shown(path)}")
    return record


# --------------------------------------------------------------------------- throughput


def _load() -> dict:
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return {}
    return {"1min": round(one, 2), "5min": round(five, 2), "cores": os.cpu_count()}


def cmd_throughput(args) -> dict:
    """Proxy instances/s on dsb2018-nuclei/<split> (hundreds of small boxes per image) and on
    coco-val (a few large ones), the same model and options, alternating ``--rounds`` times."""
    import statistics

    from boxcaseg.io import load_json

    sets = {f"{DATASET}/{args.split}": split_paths(args.split)}
    coco = require_data("coco-val", "instances.json", script="domain.py")
    sets = {"coco-val": (coco, coco.parent / "images"), **sets}
    runs: dict = {k: [] for k in sets}
    before = _load()
    for r in range(args.rounds):
        for key, (ann, images) in sets.items():
            out = RUNS / f"throughput-{key.replace('/', '-')}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            from boxcaseg.proxy import ProxyConfig, generate_proxy

            s = generate_proxy(ProxyConfig(ann=ann, images=images, out=out, model=model_arg(args.model), workers=1,
                                           threads=args.threads, progress=False))
            runs[key].append({k: s[k] for k in ("instances_per_s", "steady_instances_per_s", "seconds", "masks")}
                             | {"timings": s["timings"], "load_average": _load()})
            print(f"round {r + 1} {key}: {s['masks']} masks, {s['instances_per_s']} inst/s "
                  f"({s['steady_instances_per_s']} steady)", flush=True)
            out.unlink()
    result = {}
    for key, (ann, _) in sets.items():
        data = load_json(ann, "annotation json")
        n_img = len({a["image_id"] for a in data["annotations"]})
        result[key] = {"images": n_img, "boxes": len(data["annotations"]),
                       "boxes_per_image": round(len(data["annotations"]) / max(1, n_img), 1),
                       "instances_per_s": statistics.median(x["instances_per_s"] for x in runs[key]),
                       "steady_instances_per_s": statistics.median(x["steady_instances_per_s"] for x in runs[key]),
                       "runs": runs[key]}
    after = _load()
    busy = max(before.get("1min", 0), after.get("1min", 0)) > 0.5 * (os.cpu_count() or 1)
    record = {"name": THROUGHPUT, "kind": "throughput", "model": args.model, "threads": args.threads, "workers": 1,
              "rounds": args.rounds, "sets": result, "load_average_before": before, "load_average_after": after,
              "machine": (f"{os.cpu_count()} cores, " + ("shared with other jobs: loaded (load average "
                          f"{before.get('1min')} -> {after.get('1min')})" if busy else
                          f"quiet (load average {before.get('1min')} -> {after.get('1min')})")),
              "command": command_line()}
    path = write_record(THROUGHPUT, record)
    print(throughput_line(record) + f" -> {_shown(path)}")
    return record


def throughput_line(rec: dict) -> str:
    parts = [f"{k} ({v['boxes_per_image']:g} boxes/image): {v['instances_per_s']:.1f} inst/s "
             f"({v['steady_instances_per_s']:.1f} steady)" for k, v in rec["sets"].items()]
    return (f"Proxy throughput, {rec['model']} model, {rec['threads']} engine thread(s), one decoding worker, "
            f"median of {rec['rounds']} alternating run(s): " + "; ".join(parts) + f". Machine: {rec['machine']}.")


# --------------------------------------------------------------------------- report


def _cell(s: dict | None) -> str:
    if not s or not s.get("n"):
        return "-"
    return f"{s['miou_star']:.3f} / {s['iou75']:.3f}"


def _minutes(seconds) -> str:
    return f"{seconds / 60:.0f} min" if seconds else "-"


def _label(name: str, rec: dict) -> str:
    return rec.get("label") or KNOWN_ROWS.get(name) or name


def report_rows(records: dict[str, dict], split: str) -> list[tuple[str, dict]]:
    """The method rows (records with figures on ``split``), known methods first, then by name."""
    rows = [(n, r) for n, r in records.items() if r.get("figures") and r.get("split") == f"{DATASET}/{split}"]
    order = {n: i for i, n in enumerate(KNOWN_ROWS)}
    return sorted(rows, key=lambda nr: (order.get(nr[0], len(order)), nr[0]))


def _delta(a: dict, b: dict) -> tuple[float, float]:
    return 100 * (a["miou_star"] - b["miou_star"]), 100 * (a["iou75"] - b["iou75"])


GOAL = (5.0, 10.0)  # issue 36: mIoU* and IoU@75 points above MobileSAM on every image type


def conclusions(rows: list[tuple[str, dict]], groups: list[str]) -> str:
    """Where each boxcaseg row wins and loses against MobileSAM and the inscribed ellipse, and the
    issue's goal, computed from the rows."""
    by = dict(rows)
    lines = []
    for name, rec in rows:
        if rec.get("kind") not in ("proxy",):
            continue
        for ref_name, ref_label in (("mobilesam", "MobileSAM"), ("ellipse", "the inscribed ellipse")):
            ref = by.get(ref_name)
            if ref is None:
                continue
            deltas = {g: _delta(rec["figures"][g], ref["figures"][g]) for g in groups
                      if rec["figures"].get(g, {}).get("n") and ref["figures"].get(g, {}).get("n")}
            wins = [g for g, (m, i) in deltas.items() if m > 0 and i > 0]
            loses = [g for g, (m, i) in deltas.items() if m < 0 and i < 0]
            mixed = [g for g in deltas if g not in wins and g not in loses]
            text = ", ".join(f"{TYPE_NAMES.get(g, g)} {m:+.1f} / {i:+.1f}" for g, (m, i) in deltas.items())
            verdict = "; ".join(x for x in (
                f"wins on {', '.join(TYPE_NAMES.get(g, g) for g in wins)}" if wins else "",
                f"loses on {', '.join(TYPE_NAMES.get(g, g) for g in loses)}" if loses else "",
                f"mixed on {', '.join(TYPE_NAMES.get(g, g) for g in mixed)}" if mixed else "") if x)
            lines.append(f"- {_label(name, rec)} against {ref_label} (mIoU* / IoU@75 points): {text}: {verdict}.")
            if ref_name == "mobilesam":
                short = {g: (GOAL[0] - m, GOAL[1] - i) for g, (m, i) in deltas.items() if g != "all"
                         and (m < GOAL[0] or i < GOAL[1])}
                if short:
                    lines.append("  The goal (+5 mIoU*, +10 IoU@75 over MobileSAM on every image type) is not met: "
                                 + ", ".join(f"{TYPE_NAMES.get(g, g)} short by {max(0, a):.1f} / {max(0, b):.1f}"
                                             for g, (a, b) in short.items()) + ".")
                else:
                    lines.append("  The goal (+5 mIoU*, +10 IoU@75 over MobileSAM on every image type) is met.")
    return "\n".join(lines)


def sweep_table(records: dict[str, dict], split: str) -> str:
    from boxcaseg.report import markdown_table

    rows = []
    for name, rec in records.items():
        if rec.get("kind") != "sweep" or rec.get("split") != f"{DATASET}/{split}" or rec.get("boxes_only"):
            continue
        best = best_row(rec["rows"])
        own = rec.get("model_settings", {})
        at_own = next((r for r in rec["rows"] if all(r[k] == own.get(k) for k in ("context", "threshold",
                                                                                  "prior_weight"))), None)
        for what, r in (("best on this split (upper bound)", best), ("the model's own settings", at_own)):
            if r is None:
                continue
            f = r["figures"]
            rows.append([name, what, f"c{r['context']:g} t{r['threshold']:g} p{r['prior_weight']:g}",
                         *[_cell(f.get(g)) for g in ("all", *TYPES)],
                         f"{100 * f['all']['flagged_share']:.0f}%" if f["all"].get("flagged_share") is not None
                         else "-"])
    if not rows:
        return ""
    return markdown_table(["sweep", "row", "setting", "all", *[TYPE_NAMES[t] for t in TYPES], "flagged"], rows)


def _setting(r: dict) -> tuple:
    return (r["context"], r["threshold"], r["prior_weight"])


def settings_rule_table(records: dict[str, dict], split: str) -> str:
    """Issue 36's question, per model with a scored grid on ``split`` (dev): how the settings a
    rule without masks picks score there against the best on ``split`` itself (an upper bound
    that needs its masks). Rules: the model's own settings (fixed: the shipped ones, carried
    by a fine-tuned model); the highest mean box agreement on the same grid over the *train*
    split's boxes (a boxes-only sweep of the same model file: ``eval --sweep --boxes-only
    --split train``); the highest mean box agreement on ``split``'s own boxes (no masks read)."""
    from boxcaseg.report import markdown_table

    rows = []
    for name, rec in records.items():
        if rec.get("kind") != "sweep" or rec.get("split") != f"{DATASET}/{split}" or rec.get("boxes_only"):
            continue
        by_setting = {_setting(r): r for r in rec["rows"]}
        own = rec.get("model_settings", {})
        picks = [("the model's own settings (fixed)", (own.get("context"), own.get("threshold"), own.get("prior_weight")))]
        for other_name, other in records.items():
            if (other.get("kind") == "sweep" and other.get("boxes_only") and other.get("model_sha256") == rec.get(
                    "model_sha256") and other.get("split") != rec.get("split")):
                top = agreement_row(other["rows"])
                picks.append((f"highest box agreement on {other['split']}'s boxes ({other_name})", _setting(top)))
        picks.append((f"highest box agreement on {split}'s own boxes (no masks)", _setting(agreement_row(rec["rows"]))))
        picks.append((f"best on {split} (its masks: upper bound)", _setting(best_row(rec["rows"]))))
        for what, key in picks:
            r = by_setting.get(key)
            cells = [_cell(r["figures"].get(g)) if r else "not in the grid" for g in ("all", *TYPES)]
            rows.append([name, what, "c{:g} t{:g} p{:g}".format(*key) if None not in key else "-", *cells])
    if not rows:
        return ""
    return markdown_table(["grid", "rule", "setting", "all", *[TYPE_NAMES[t] for t in TYPES]], rows)


def machine_note(records) -> str:
    """How loaded the machine was while the rows' runs went, from the load averages they recorded."""
    seen = [(r["load_average"].get("1min"), r["load_average"].get("cores")) for r in records
            if isinstance(r.get("load_average"), dict) and r["load_average"].get("1min") is not None]
    if not seen:
        return "machine load not recorded"
    cores = max(c or 0 for _, c in seen) or os.cpu_count()
    lo, hi = min(v for v, _ in seen), max(v for v, _ in seen)
    busy = hi > 0.5 * cores
    return (f"{cores} cores, load average {lo:g} to {hi:g} at the end of the runs: "
            + ("a machine shared with other jobs, so speeds are low and noisy" if busy else "a quiet machine"))


def cmd_report(args) -> str:
    from boxcaseg.report import markdown_table

    records = load_records()
    rows = report_rows(records, args.split)
    groups = ["all", *TYPES]
    for _, rec in rows:
        for g in rec["figures"]:
            if g not in groups:
                groups.append(g)
    n_by = {}
    for _, rec in rows:
        for g in groups:
            n_by.setdefault(g, rec["figures"].get(g, {}).get("n"))
    header = ["method", *[f"{TYPE_NAMES.get(g, g)} (n {n_by.get(g) or 0:,})" for g in groups], "inst/s (threads)",
              "flagged", "fine-tuning", "settings chosen on"]
    table_rows = []
    for name, rec in rows:
        f = rec["figures"]
        ips = rec.get("steady_instances_per_s") or rec.get("instances_per_s")
        flagged = f["all"].get("flagged_share")
        train = _minutes(rec.get("train_s"))
        if rec.get("iters") and rec.get("train_s"):
            train += f" ({rec['iters']:,} it)"
        table_rows.append([_label(name, rec), *[_cell(f.get(g)) for g in groups],
                           f"{ips:,.1f} ({rec.get('threads') or '?'})" if ips else "-",
                           f"{100 * flagged:.0f}%" if flagged is not None else "-", train,
                           rec.get("chosen_on") or "-"])
    table = markdown_table(header, table_rows)
    text = conclusions(rows, groups)
    sweeps = sweep_table(records, args.split)
    rules = settings_rule_table(records, args.split)
    tp = records.get(THROUGHPUT)
    body = (f"## domain: masks from GT boxes on {DATASET}/{args.split}, by image type "
            "(`python bench/domain.py report --write`)\n\n"
            f"Each cell: mIoU* / IoU@75 against the GT masks, every instance scored by `boxcaseg.evaluate` "
            "(the prediction with the GT annotation id; one category, so mIoU* = mIoU). Rows come from "
            "bench/records/domain/ (each record holds its command). inst/s: the method's own run with the "
            f"threads given, after the model's load and warm-up ({machine_note(r for _, r in rows)}); box-fill "
            "and the ellipse cost no network. "
            "flagged: masks the proxy marks `ignore_mask`. The settings of the shipped model were "
            "chosen on coco-val (COCO objects), not on this set.\n\n" + table + "\n")
    if text:
        body += "\n" + text + "\n"
    if sweeps:
        body += ("\nSettings grids (`eval --sweep`): the best row is chosen on the split it is scored on, an upper "
                 "bound for a rule that needs no masks.\n\n" + sweeps + "\n")
    if rules:
        body += ("\nSettings without masks: what each rule picks on the same grid, scored on "
                 f"{args.split} (a user has no masks; the last row needs them).\n\n" + rules + "\n")
    if tp:
        body += "\n" + throughput_line(tp) + "\n"
    if args.write:
        write_section("domain", body)
    print(body)
    return body


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p, threads=True):
        p.add_argument("--split", default="dev", choices=["dev", "train"], help=f"{DATASET}/<split> (default dev)")
        if threads:
            p.add_argument("--threads", type=int, default=1, help="engine CPU threads (default 1)")

    p = sub.add_parser("eval", help="boxcaseg proxy on the split, scored by image type (--sweep: a settings grid)")
    common(p)
    p.add_argument("--name", required=True, help="the record's name (bench/records/domain/NAME.json)")
    p.add_argument("--model", required=True, help="'pretrained', a checkpoint (last.pt), a packed model or an .onnx file")
    p.add_argument("--context", help="crop context (with --sweep: a comma list); default: the model's")
    p.add_argument("--threshold", help="foreground threshold (with --sweep: a comma list); default: the model's")
    p.add_argument("--prior-weight", help="ellipse prior weight (with --sweep: a comma list); default: the model's")
    p.add_argument("--merge", action="store_true", help="the proxy's --merge")
    p.add_argument("--engine", default="auto", choices=["auto", "torch", "onnx", "trt"],
                   help="the proxy's --engine (default auto: ONNX Runtime on a CPU, PyTorch on a GPU)")
    p.add_argument("--sweep", action="store_true", help="score every setting of the grid, the network once per context")
    p.add_argument("--boxes-only", action="store_true", help="with --sweep: no masks read, each setting's mean box "
                   "agreement and flagged share only (the mask-free rule, e.g. on --split train)")
    p.add_argument("--every", type=int, default=1, help="with --sweep: every K-th image of the split (default 1)")
    p.add_argument("--label", help="the row's name in the report (default: NAME)")
    p.add_argument("--chosen-on", help="which set the settings were chosen on, for the report "
                   "(default: the model's own settings / given on the command line)")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("baselines", help="box-fill and the inscribed ellipse on the split -> records box-fill, ellipse")
    common(p, threads=False)

    p = sub.add_parser("score", help="score a predictions json (e.g. bench/sam_baseline.py's) the same way")
    common(p, threads=False)
    p.add_argument("--name", required=True, help="the record's name (mobilesam for MobileSAM's row)")
    p.add_argument("--pred", required=True, help="COCO json or results list whose ids are the GT annotation ids")
    p.add_argument("--label", help="the row's name in the report")
    p.add_argument("--chosen-on", help="which set the method's settings were chosen on")

    p = sub.add_parser("throughput", help="proxy inst/s on the split and on coco-val, same model, same run")
    common(p)
    p.add_argument("--model", default="pretrained", help="default: the shipped model")
    p.add_argument("--rounds", type=int, default=2, help="alternating runs per set (median; default 2)")

    p = sub.add_parser("report", help="the table from the records (--write: bench/RESULTS.md 'domain')")
    p.add_argument("--split", default="dev", choices=["dev", "train"])
    add_write_flag(p, "domain")

    args = ap.parse_args(argv)
    from boxcaseg.errors import BoxcasegError

    try:
        {"eval": cmd_eval, "baselines": cmd_baselines, "score": cmd_score, "throughput": cmd_throughput,
         "report": cmd_report}[args.command](args)
    except BoxcasegError as e:
        print(f"domain.py: {e.one_line()}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
