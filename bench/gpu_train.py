"""The steps of bench/gpu_train.sh: one training on a lent GPU, packed, scored, brought back.

    python bench/gpu_train.py setup probe --bundle B --work W --seconds S [--iters 80 --skip 30]
    python bench/gpu_train.py train    --bundle B --work W [--max-iters N]
    python bench/gpu_train.py pack score --bundle B --work W --out OUT
    python bench/gpu_train.py losscmp  --bundle B --out OUT [--batches 16,64]
    python bench/gpu_train.py check    --out OUT

Several steps given together run in that order in one process (bench/gpu_train.sh runs four
processes: setup + probe, train, pack + score, losscmp; then check).

The recipe is the ``cpu`` config (EfficientNet-Lite0 from ImageNet, 192 px patches, 9 box + 7
salient per batch, SGD lr 0.03 poly, the fused-map MIL and pairwise losses) on the bundle of
``python bench/gpu_data.py --train`` (coco-train + coco-train-extra boxes, its salient pairs,
Lite0's ImageNet weights), with only the length changed: as many iterations as fit in
``--seconds`` at the rate ``probe`` measures on the machine (a short training of the same
config, which also checks the data, the weights, the loss kernels and the device). Common
options: ``--device`` (default cuda when there), ``--workers`` (loader processes), ``--amp``
(bf16 autocast; default off: the GPU screen of bench/RESULTS.md "gpu_sweep" that matched the
CPU figures ran in float32), ``--batch-size`` (default the recipe's 16), ``--set`` (more
overrides).

- ``setup`` checks what the steps import (one line of what is missing), names the device and the
  versions, and checks the bundle's files; exit 1 when something is missing.
- ``probe`` writes W/probe.json: steady iterations/s (after ``--skip``), the start-up seconds,
  and ``max_iters`` = (``--seconds`` - start-up) x rate x 0.92.
- ``train`` trains W/main (``max_iters`` from W/probe.json unless given); it resumes from
  W/main/last.pt when one is there (a warm machine's second call).
- ``pack`` writes OUT/boxcaseg-gpu.pt (float16, the shipped model's inference settings:
  S=256, context 1.2, threshold 0.4, prior 0.3) and OUT/metrics.jsonl (the training log; gzip
  when over 15 MiB) and copies W/probe.json to OUT.
- ``score`` scores OUT/boxcaseg-gpu.pt on the bundle's coco-val (per instance, the torch engine
  on the device in float32; the model card's ONNX Runtime path gives the same masks to about
  1e-5 of probability, bench/RESULTS.md "torch_cpu", and back here the model is scored that way)
  at the shipped settings and at context 1.1 (``--contexts``; ``--model``, ``--engine onnx`` score a
  checkpoint the way the model card does): OUT/score.json (``miou_star``, ``iou75``,
  ``miou``, ``iou50`` at the shipped settings, every row under ``rows``).
- ``losscmp`` times the training step (forward, loss, backward, SGD step; one fixed batch
  of the bundle on the device) with the MIL + smoothness loss computed by our Triton
  kernels, by plain torch, and by torch.compile of the torch path, in interleaved rounds
  (medians): OUT/losscmp.json. On a CPU (the dry run) Numba and torch only.
- ``check`` says whether OUT holds what the call must bring back (the model loads into its
  network, the log parses, the score has its keys); exit 1 when not.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gpu_data import BOX_SETS, IMAGENET_FILE  # noqa: E402

MODEL_FILE = "boxcaseg-gpu.pt"
SHIPPED = {"context": 1.2, "threshold": 0.4, "prior_weight": 0.3}  # the shipped model's embedded settings
SAFETY = 0.92           # of the probed rate: the main run's rate varies a little
METRICS_MAX = 15 * 2**20  # a file brought back through $OUT is at most 16 MiB
#: what OUT holds after a complete call (bench/gpu_train.sh adds gpu_train.log and summary.txt)
OUT_FILES = (MODEL_FILE, "metrics.jsonl", "probe.json", "score.json", "losscmp.json")


def recipe(bundle: Path, device: str, workers: int, amp: bool, batch_size: int = 0, extra: list[str] = ()):
    """The ``cpu`` config on the bundle's data and weights, on ``device`` (the GPU recipe but its length)."""
    from boxcaseg.config import load_config
    from boxcaseg.errors import BoxcasegError

    manifest = json.loads((bundle / "bundle.json").read_text())
    overrides = [f"data.box_ann={json.dumps([str(bundle / s / 'instances.json') for s in BOX_SETS])}",
                 f"data.box_images={json.dumps([str(bundle / s / 'images') for s in BOX_SETS])}",
                 f"data.salient_dir={json.dumps(str(bundle / manifest['salient_dir']))}",
                 f"model.backbone_weights={json.dumps(str(bundle / IMAGENET_FILE))}",
                 f"data.workers={workers}", f"train.device={json.dumps(device)}",
                 f"train.amp={'true' if amp else 'false'}", "train.seed=0", *extra]
    cfg = load_config("cpu", overrides)
    if cfg.data.salient_resize != manifest["salient_size"]:
        raise BoxcasegError(f"{bundle}: its salient pairs are stored at {manifest['salient_size']} px, the recipe "
                            f"resizes them to {cfg.data.salient_resize} (rebuild it with --salient-size)")
    if batch_size:
        d = cfg.data
        total = d.box_per_batch + d.salient_per_batch
        d.box_per_batch = max(1, round(batch_size * d.box_per_batch / total))
        d.salient_per_batch = max(1, batch_size - d.box_per_batch)
    return cfg


def _cfg(args, extra: list[str] = ()):
    return recipe(Path(args.bundle), args.device, args.workers, args.amp, args.batch_size, [*args.set, *extra])


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)


def device_name(device: str) -> str:
    import os

    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores)"


# --------------------------------------------------------------------------- steps

NEEDED = ("torch", "torchvision", "timm", "numba", "pycocotools", "onnx", "onnxscript", "onnxruntime", "PIL",
          "numpy", "typer", "rich", "cv2", "boxcaseg")


def cmd_setup(args) -> int:
    import importlib

    missing = []
    for name in NEEDED + (("triton",) if args.device.startswith("cuda") else ()):
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - listed, not raised
            missing.append(f"{name} ({type(e).__name__}: {e})")
    print("MISSING: " + (", ".join(missing) if missing else "none"), flush=True)
    import torch

    problems = []
    versions = {"torch": torch.__version__}
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    else:
        versions["device"] = device_name(args.device)
    if args.device.startswith("cuda") and "triton" not in " ".join(missing):
        import triton

        versions["triton"] = triton.__version__
    bundle = Path(args.bundle)
    try:
        manifest = json.loads((bundle / "bundle.json").read_text())
        for part in [*BOX_SETS, manifest["salient_dir"], "coco-val", IMAGENET_FILE]:
            if not (bundle / part).exists():
                problems.append(f"{bundle / part} is missing")
        versions["bundle"] = {k: v for k, v in manifest["travel_bytes"].items()}
    except (OSError, ValueError, KeyError) as e:
        problems.append(f"{bundle / 'bundle.json'}: {type(e).__name__}: {e}")
    print(json.dumps(versions), flush=True)
    for p in problems:
        print(f"error: {p}", flush=True)
    return 1 if missing or problems else 0


def cmd_probe(args) -> dict:
    from bench.train_throughput import steady_rate
    from boxcaseg.joint_training import train

    cfg = _cfg(args, [f"train.max_iters={args.iters}", "train.ckpt_every=0"])
    out = Path(args.work) / "probe"
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    res = train(cfg, out, show_progress=False)
    wall = time.perf_counter() - t0
    it_s, timed = steady_rate(out / "metrics.jsonl", args.skip)
    startup = max(0.0, wall - args.iters / it_s)
    max_iters = int(max(0.0, args.seconds - startup) * it_s * SAFETY)
    batch = cfg.data.box_per_batch + cfg.data.salient_per_batch
    rec = {"device": device_name(args.device), "it_s": round(it_s, 3), "patches_s": round(it_s * batch, 1),
           "batch": batch, "iters_timed": timed, "probe_wall_s": round(wall, 1), "startup_s": round(startup, 1),
           "seconds": args.seconds, "max_iters": max_iters, "amp": args.amp, "workers": args.workers,
           "loss_first_last": [round(res.first_loss, 3), round(res.last_loss, 3)]}
    if args.max_iters:  # given (the dry run): the probe still measures and checks
        rec["max_iters"] = args.max_iters
    _write_json(Path(args.work) / "probe.json", rec)
    print(json.dumps(rec), flush=True)
    if rec["max_iters"] < args.min_iters:
        sys.exit(f"probe: {rec['max_iters']} iterations fit in {args.seconds} s at {it_s:.2f} it/s, fewer than "
                 f"--min-iters {args.min_iters}: not worth the call")
    return rec


def cmd_train(args) -> None:
    from boxcaseg.joint_training import CKPT_NAME, train

    work = Path(args.work)
    iters = args.max_iters or json.loads((work / "probe.json").read_text())["max_iters"]
    cfg = _cfg(args, [f"train.max_iters={iters}", f"train.ckpt_every={args.ckpt_every}"])
    out = work / "main"
    resume = (out / CKPT_NAME).is_file()
    res = train(cfg, out, resume=resume, show_progress=False)
    print(json.dumps({"iters": res.iters, "seconds": round(res.seconds, 1), "patches_s": round(res.images_per_s, 1),
                      "loss_first_last": [round(res.first_loss, 3), round(res.last_loss, 3)], "resumed": resume}),
          flush=True)


def cmd_pack(args) -> None:
    from boxcaseg.io import read_jsonl
    from boxcaseg.joint_training import CKPT_NAME
    from boxcaseg.model.pack import pack_checkpoint

    work, out = Path(args.work), Path(args.out)
    main = work / "main"
    recs = read_jsonl(main / "metrics.jsonl")
    from bench.data_scaling import training_seconds

    obj = pack_checkpoint(main / CKPT_NAME, out / MODEL_FILE, infer_size=256, **SHIPPED,
                          extra={"name": "boxcaseg-gpu", "trained_on": device_name(args.device),
                                 "train_seconds": round(training_seconds(recs), 1)})
    metrics = main / "metrics.jsonl"
    if metrics.stat().st_size <= METRICS_MAX:
        shutil.copyfile(metrics, out / "metrics.jsonl")
    else:
        with open(metrics, "rb") as src, gzip.open(out / "metrics.jsonl.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
    if (work / "probe.json").is_file():
        shutil.copyfile(work / "probe.json", out / "probe.json")
    print(f"packed iteration {obj['iter']} -> {out / MODEL_FILE} ({(out / MODEL_FILE).stat().st_size / 1e6:.2f} MB)")


def cmd_score(args) -> dict:
    from bench.data_scaling import score_on_val

    work, out = Path(args.work), Path(args.out)
    model = Path(args.model) if args.model else out / MODEL_FILE
    t0 = time.perf_counter()
    settings = [dict(SHIPPED, context=float(c)) for c in args.contexts.split(",")]
    rows = score_on_val(model, Path(args.bundle) / "coco-val", settings, work, args.threads, str(model.name),
                        workers=args.proxy_workers, engine=args.engine, device=args.device)
    from boxcaseg.io import safe_torch_load

    meta = safe_torch_load(model)
    shipped = rows[0]
    rec = {"model": str(args.model or MODEL_FILE), "iter": meta["iter"], "trained_on": meta.get("trained_on"),
           "train_seconds": meta.get("train_seconds"), "set": "coco-val (the bundle's copy, byte-identical)",
           "engine": f"{args.engine}, {args.device}, float32", "per_instance": True,
           **{k: shipped[k] for k in ("miou_star", "iou75", "miou", "iou50", "n")}, "settings": settings[0],
           "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
    _write_json(out / "score.json", rec)
    print(json.dumps({k: rec[k] for k in ("iter", "miou_star", "iou75", "n")}), flush=True)
    return rec


def fixed_batch(cfg):
    """One mixed batch of the recipe's data (the first of seed 0), collated."""
    from boxcaseg.data.sampler import MixedBatchSampler, MixedDataset, collate
    from boxcaseg.joint_training import batch_composition, build_datasets, set_mixes

    box_ds, sal_ds = build_datasets(cfg)
    n_box, n_sal = batch_composition(cfg, box_ds is not None, sal_ds is not None)
    box_mix, sal_mix = set_mixes(cfg, box_ds, sal_ds)
    sampler = MixedBatchSampler(box_mix, sal_mix, n_box, n_sal, seed=0, rank=0, world_size=1, start_step=0, end_step=1)
    data = MixedDataset(box_ds, sal_ds)
    return collate([data[k] for k in next(iter(sampler))])


class CompiledTorchLoss:
    """While entered, the ``torch`` loss backend runs through torch.compile: the torch path's MIL +
    smoothness functions (what bench/mil_kernel.py's ``compile`` row compiles), compiled once."""

    NAMES = ("mil_smooth_loss_torch", "mil_loss_torch")

    def __init__(self):
        import torch

        from boxcaseg.kernels import mil_smooth_torch

        self.module = mil_smooth_torch
        self.plain = {n: getattr(mil_smooth_torch, n) for n in self.NAMES}
        self.compiled = {n: torch.compile(fn) for n, fn in self.plain.items()}

    def __enter__(self):
        for n, fn in self.compiled.items():
            setattr(self.module, n, fn)

    def __exit__(self, *exc):
        for n, fn in self.plain.items():
            setattr(self.module, n, fn)


def cmd_losscmp(args) -> dict:
    import torch

    from bench.common import time_cuda, time_fn
    from boxcaseg.joint_training import loss_step
    from boxcaseg.kernels.dispatch import resolve_backend
    from boxcaseg.model import build_model

    out = Path(args.out)
    cuda = args.device.startswith("cuda")
    dev = torch.device(args.device)
    backends = ["triton", "torch", "compile"] if cuda else ["numba", "torch"]
    rec = {"device": device_name(args.device), "torch": torch.__version__, "amp": args.amp,
           "auto_picks": resolve_backend(torch.zeros(1, device=dev)), "backends": backends, "rows": [],
           "what": "ms per training step (forward, loss, backward, SGD step) on one fixed batch, median of "
                   f"{args.rounds} interleaved rounds" + (" (triton.testing.do_bench each)" if cuda else "")}
    if not cuda:
        rec["skipped"] = "no GPU: triton and torch.compile not timed"
    compiled = CompiledTorchLoss() if "compile" in backends else None
    for batch_size in (int(b) for b in args.batches.split(",")):
        cfg = recipe(Path(args.bundle), args.device, 0, args.amp, batch_size, list(args.set))
        batch = fixed_batch(cfg)
        model = build_model(cfg.model).to(dev).to(memory_format=torch.channels_last)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)  # lr 0: the same work, the weights stay
        fns = {}
        for b in backends:
            cfg.train.backend = "torch" if b == "compile" else b
            step = loss_step(cfg, model, dev)

            def one(step=step, b=b):
                with compiled if b == "compile" else contextlib.nullcontext():
                    losses, _ = step(batch, 1000)
                opt.zero_grad(set_to_none=True)
                losses["loss"].backward()
                opt.step()
            fns[b] = one
        times: dict[str, list[float]] = {b: [] for b in backends}
        t0 = time.perf_counter()
        for b, fn in fns.items():  # warm-up: compilation and autotuning out of the timed rounds
            for _ in range(args.warmup):
                fn()
        warm = time.perf_counter() - t0
        for _ in range(args.rounds):
            for b, fn in fns.items():
                times[b].append(time_cuda(fn).median_ms if cuda else time_fn(fn, warmup=0, repeat=1).median_ms)
        row = {"batch": batch_size, "warmup_s": round(warm, 1),
               **{f"{b}_ms": round(statistics.median(v), 3) for b, v in times.items()}}
        if cuda:
            row["compile_over_triton"] = round(row["compile_ms"] / row["triton_ms"], 3)
            row["torch_over_triton"] = round(row["torch_ms"] / row["triton_ms"], 3)
        rec["rows"].append(row)
        _write_json(out / "losscmp.json", rec)  # each batch size as soon as it is measured
        print(json.dumps(row), flush=True)
    return rec


def cmd_check(args) -> int:
    """What a complete call leaves in OUT; one line per problem, exit 1 when there is one."""
    import torch

    from boxcaseg.config import config_from_checkpoint
    from boxcaseg.io import safe_torch_load
    from boxcaseg.model import build_checkpoint_model

    out = Path(args.out)
    problems = []
    try:
        obj = safe_torch_load(out / MODEL_FILE)
        cfg = config_from_checkpoint(obj["config"], MODEL_FILE)
        build_checkpoint_model(cfg.model, MODEL_FILE).load_state_dict(
            {k: v.float() if v.is_floating_point() else v for k, v in obj["model"].items()})
        assert all(v.dtype != torch.float32 for v in obj["model"].values()), "not packed in float16"
    except Exception as e:  # noqa: BLE001 - reported, not raised
        problems.append(f"{MODEL_FILE}: {type(e).__name__}: {e}")
    log = out / "metrics.jsonl"
    try:
        text = log.read_text() if log.is_file() else gzip.open(out / "metrics.jsonl.gz", "rt").read()
        recs = [json.loads(line) for line in text.splitlines() if line.strip()]
        assert recs and all("iter" in r and "loss" in r for r in recs), "no iterations logged"
    except Exception as e:  # noqa: BLE001
        problems.append(f"metrics.jsonl: {type(e).__name__}: {e}")
    notes = []
    for name, keys in (("score.json", ("miou_star", "iou75", "miou", "iou50", "n", "iter", "rows")),
                       ("probe.json", ("it_s", "max_iters", "device")), ("losscmp.json", ("rows", "auto_picks"))):
        try:
            rec = json.loads((out / name).read_text())
            missing = [k for k in keys if k not in rec]
            assert not missing, f"missing {missing}"
        except Exception as e:  # noqa: BLE001
            # the step timing is the call's second question: without it the model still counts
            (notes if name == "losscmp.json" else problems).append(f"{name}: {type(e).__name__}: {e}")
    if problems:
        print("check: incomplete: " + "; ".join(problems + notes))
    else:
        print("check: complete" + (f" but for the step timing ({'; '.join(notes)})" if notes else
                                   f" ({', '.join(OUT_FILES)})"))
    return 1 if problems else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("steps", nargs="+", choices=["setup", "probe", "train", "pack", "score", "losscmp", "check"],
                    help="one or more, run in this order in one process (a non-zero step stops the rest)")
    ap.add_argument("--bundle", default=str(REPO / ".gpu-train"))
    ap.add_argument("--work", default=str(REPO / "runs" / "gpu_train_call"))
    ap.add_argument("--out", default="gpu-train-out")
    ap.add_argument("--device", default=None, help="default: cuda when there, else cpu")
    ap.add_argument("--workers", type=int, default=12, help="loader processes")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (default: float32)")
    ap.add_argument("--batch-size", type=int, default=0, help="patches per batch (0: the recipe's 16)")
    ap.add_argument("--set", action="append", default=[], help="more config overrides section.field=value")
    ap.add_argument("--seconds", type=float, default=280, help="probe: the main training's time")
    ap.add_argument("--iters", type=int, default=80, help="probe: iterations")
    ap.add_argument("--skip", type=int, default=30, help="probe: iterations left out of the rate")
    ap.add_argument("--min-iters", type=int, default=3000, help="probe: fail below this many (the cpu recipe's)")
    ap.add_argument("--max-iters", type=int, default=0, help="train (and probe): this many, not the probe's")
    ap.add_argument("--ckpt-every", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=0, help="score: ONNX Runtime threads (0: all)")
    ap.add_argument("--proxy-workers", type=int, default=4, help="score: decode processes")
    ap.add_argument("--model", default="", help="score: this checkpoint or model file (default: OUT/boxcaseg-gpu.pt)")
    ap.add_argument("--engine", default="torch", help="score: torch (on --device) or onnx (ONNX Runtime, CPU)")
    ap.add_argument("--contexts", default="1.2,1.1", help="score: contexts (threshold 0.4, prior 0.3); the first "
                                                          "is the top-level figure")
    ap.add_argument("--batches", default="16,64", help="losscmp: batch sizes")
    ap.add_argument("--rounds", type=int, default=3, help="losscmp: interleaved rounds")
    ap.add_argument("--warmup", type=int, default=3, help="losscmp: untimed steps of each backend first")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.steps != ["check"]:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.work).mkdir(parents=True, exist_ok=True)
    steps = {"setup": cmd_setup, "probe": cmd_probe, "train": cmd_train, "pack": cmd_pack, "score": cmd_score,
             "losscmp": cmd_losscmp, "check": cmd_check}
    for name in args.steps:
        if name in ("setup", "check") and steps[name](args):
            sys.exit(1)
        elif name not in ("setup", "check"):
            steps[name](args)

if __name__ == "__main__":
    main()
