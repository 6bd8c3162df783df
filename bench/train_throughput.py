"""Joint-training throughput (patches per second) of the CPU recipe's model on any device.

    python bench/train_throughput.py [--device cuda] [--iters 80] [--batch-size 64] \
        [--backends auto,torch] [--amp on,off] [--synthetic-salient N]

Runs `boxcaseg.joint_training.train` (the library's loop: loader, forward, losses, backward, step)
with the shipped ``cpu`` config's model and losses for ``--iters`` iterations per setting, and
reports the steady-state rate from metrics.jsonl: patches between the end of iteration
``--skip`` and the last one, over the time between them (the first iterations hold the
loader's start-up, cuDNN / Triton compilation and autotuning).

Data: the config's box set (``$BOXCASEG_DATA/coco-train``); salient pairs from
``$BOXCASEG_DATA/duts-tr`` when it is there, else ``--synthetic-salient`` synthetic pairs
(boxcaseg.data.synthetic, 640x480) made in a temporary folder: the output says which.
The last line is JSON; ``--write`` puts the rows into bench/RESULTS.md, section
"train_throughput_cpu" or "train_throughput_cuda".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import add_write_flag, write_section  # noqa: E402


def steady_rate(metrics: Path, skip: int) -> tuple[float, int]:
    from boxcaseg.io import read_jsonl

    recs = read_jsonl(metrics)
    if len(recs) <= skip + 1:
        raise SystemExit(f"{metrics}: {len(recs)} iterations, need more than --skip {skip} + 1")
    a, b = recs[skip - 1] if skip else {"time": 0.0}, recs[-1]
    n_iters = len(recs) - skip
    return n_iters / (b["time"] - a["time"]), n_iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="cpu", help="a shipped config name or a TOML file")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there)")
    ap.add_argument("--iters", type=int, default=80)
    ap.add_argument("--skip", type=int, default=20, help="iterations left out of the rate (start-up)")
    ap.add_argument("--batch-size", type=int, default=0, help="patches per batch (0: the config's)")
    ap.add_argument("--workers", type=int, default=0, help="loader workers (0: the config's)")
    ap.add_argument("--backends", default="auto", help="loss backends to compare, e.g. auto,torch")
    ap.add_argument("--amp", default="on", help="bf16 autocast on CUDA: on, off or on,off")
    ap.add_argument("--synthetic-salient", type=int, default=300)
    ap.add_argument("--set", action="append", default=[], help="config override section.field=value")
    add_write_flag(ap, "train_throughput_cpu / train_throughput_cuda")
    args = ap.parse_args()

    import torch

    from boxcaseg.config import load_config
    from boxcaseg.data.synthetic import make_synthetic_dataset
    from boxcaseg.joint_training import train

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg0 = load_config(args.config, overrides=args.set)
        dirs = cfg0.data.salient_sets()  # one folder or several (the pretrained recipe: duts-tr + duts-tr-extra)
        salient = " + ".join("/".join(Path(d).parts[-1:]) for d in dirs)
        if not all((Path(d) / "images").is_dir() for d in dirs):
            syn = make_synthetic_dataset(Path(tmp) / "syn", n_images=1, n_salient=args.synthetic_salient,
                                         image_size=(640, 480), seed=0)
            salient = f"synthetic ({args.synthetic_salient} pairs, 640x480)"
        for backend in filter(None, args.backends.split(",")):
            for amp in filter(None, args.amp.split(",")):
                cfg = load_config(args.config, overrides=args.set)
                if salient.startswith("synthetic"):
                    cfg.data.salient_dir, cfg.data.salient_weights = str(syn.salient_dir), []
                if args.batch_size:
                    tot = cfg.data.box_per_batch + cfg.data.salient_per_batch
                    cfg.data.box_per_batch = max(1, round(args.batch_size * cfg.data.box_per_batch / tot))
                    cfg.data.salient_per_batch = max(1, args.batch_size - cfg.data.box_per_batch)
                if args.workers:
                    cfg.data.workers = args.workers
                cfg.train.device = args.device
                cfg.train.backend = backend
                cfg.train.amp = amp == "on"
                cfg.train.max_iters, cfg.train.ckpt_every = args.iters, 0
                out = Path(tmp) / f"run_{backend}_{amp}"
                res = train(cfg, out, show_progress=False)
                it_s, n = steady_rate(out / "metrics.jsonl", args.skip)
                bs = cfg.data.box_per_batch + cfg.data.salient_per_batch
                row = {"backend": backend, "amp": amp, "batch": bs, "workers": cfg.data.workers,
                       "iters_timed": n, "it_s": round(it_s, 2), "patches_s": round(it_s * bs, 1),
                       "loss_first_last": [round(res.first_loss, 3), round(res.last_loss, 3)]}
                print(json.dumps(row), flush=True)
                rows.append(row)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    summary = {"device": dev, "torch": torch.__version__, "salient": salient,
               "model": cfg0.model.backbone, "patch": cfg0.data.patch_size, "rows": rows}
    if args.write:
        kind = "cuda" if args.device.startswith("cuda") else "cpu"
        write_section(f"train_throughput_{kind}", section_text(summary, args.skip))
    print(json.dumps(summary))


def section_text(summary: dict, skip: int) -> str:
    """RESULTS.md's section of one run: the device line and one table row per backend x amp."""
    lines = [f"## train_throughput ({summary['device']}): joint-training patches/s "
             "(`python bench/train_throughput.py`)", "",
             f"torch {summary['torch']}; model {summary['model']}, {summary['patch']} px patches; salient pairs "
             f"{summary['salient']}; steady rate after iteration {skip}.", "",
             "| backend | amp | batch | workers | iterations timed | it/s | patches/s | loss first / last |",
             "|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        lines.append(f"| {r['backend']} | {r['amp']} | {r['batch']} | {r['workers']} | {r['iters_timed']} | "
                     f"{r['it_s']} | {r['patches_s']} | {r['loss_first_last'][0]} / {r['loss_first_last'][1]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
