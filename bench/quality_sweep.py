"""Screen recipe levers side by side: several `bench/quality.py` runs at once, one table.

    python bench/quality_sweep.py --out runs/sweep --deadline 540 \
        base="" lr02="--set train.lr=0.02" ema="--set train.ema_decay=0.998"

Each NAME="ARGS" is one run of ``bench/quality.py --out OUT/NAME --no-write ARGS COMMON``
(COMMON: ``--common``; by default the CPU recipe's evaluation: S=256, context 1.0,
thresholds 0.3/0.4, TTA none/flip, prior 0/0.3). The runs start together (on a GPU they
share it: each trains the CPU recipe's batches and iterations, so a lever that wins
here is worth a CPU run; timings are not comparable with the CPU's). Every 30 s the
iteration each run has reached is printed; at ``--deadline`` seconds the unfinished
ones are stopped. Writes OUT/sweep.md (one row per run and evaluation setting, the best
per run first) and OUT/sweep.json, and prints the table; ``--write`` also puts it into
bench/RESULTS.md, section "quality_sweep".
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import add_write_flag, write_section  # noqa: E402

COMMON = ("--no-grabcut --infer-sizes 256 --tta none,flip --contexts 1.0 --thresholds 0.3,0.4 "
          "--prior-weights 0,0.3 --threads 1")


def parse_runs(specs: list[str]) -> dict[str, list[str]]:
    runs = {}
    for spec in specs:
        name, sep, args = spec.partition("=")
        if not sep or not name.replace("_", "").replace("-", "").isalnum():
            sys.exit(f"run {spec!r}: expected NAME=\"ARGS\" with NAME of letters, digits, - and _")
        if name in runs:
            sys.exit(f"run {name!r} given twice")
        runs[name] = shlex.split(args)
    return runs


def last_iter(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = f.read().decode(errors="replace").strip().splitlines()
        return int(json.loads(lines[-1])["iter"]) if lines else 0
    except (OSError, ValueError, KeyError, IndexError):
        return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar='NAME="ARGS"')
    ap.add_argument("--out", required=True)
    ap.add_argument("--deadline", type=float, default=0, help="stop unfinished runs after this many seconds (0: none)")
    ap.add_argument("--common", default=COMMON, help="arguments every run gets")
    add_write_flag(ap, "quality_sweep")
    args = ap.parse_args()

    from boxcaseg.io import read_jsonl
    from boxcaseg.report import markdown_table

    runs = parse_runs(args.runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    procs = {}
    t0 = time.monotonic()
    for name, extra in runs.items():
        cmd = [sys.executable, str(REPO / "bench" / "quality.py"), "--out", str(out / name), "--no-write",
               *shlex.split(args.common), *extra]
        log = open(out / f"{name}.log", "w")
        log.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
        log.flush()
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log)
    print(f"{len(procs)} runs started", flush=True)
    while any(p.poll() is None for p, _ in procs.values()):
        time.sleep(min(30.0, max(1.0, args.deadline - (time.monotonic() - t0))) if args.deadline else 30.0)
        el = time.monotonic() - t0
        print(f"{el:5.0f} s  " + "  ".join(
            f"{n}:{'done' if p.poll() == 0 else ('rc%d' % p.returncode if p.poll() is not None else last_iter(out / n / 'train' / 'metrics.jsonl'))}"
            for n, (p, _) in procs.items()), flush=True)
        if args.deadline and el >= args.deadline:
            for n, (p, _) in procs.items():
                if p.poll() is None:
                    print(f"{n}: stopped at the deadline", flush=True)
                    p.kill()
            break
    results = {}
    for name, (p, log) in procs.items():
        p.wait()
        log.close()
        text = (out / f"{name}.log").read_text(errors="replace")
        rows, train_s = [], None
        for line in text.splitlines():
            if line.startswith('{"rows"'):
                res = json.loads(line)
                rows, train_s = [r for r in res["rows"] if r["masks"].startswith("BoxCaseg")], res["train_s"]
            elif not rows and line.startswith("BoxCaseg ") and ": mIoU* " in line:  # an unfinished run's rows so far
                head, _, tail = line.partition(": mIoU* ")
                parts = tail.split()
                rows.append({"masks": head, "miou_star": float(parts[0]), "iou75": float(parts[2]), "partial": True})
        metrics = read_jsonl(out / name / "train" / "metrics.jsonl") if (out / name / "train" / "metrics.jsonl").is_file() else []
        results[name] = {"args": runs[name], "rc": p.returncode, "rows": rows, "train_s": train_s,
                         "iters": metrics[-1]["iter"] if metrics else 0,
                         "loss_last": sum(r["loss"] for r in metrics[-50:]) / max(1, len(metrics[-50:])) if metrics else None}
    (out / "sweep.json").write_text(json.dumps(results, indent=1))
    table = []
    order = sorted(results, key=lambda n: -max((r["miou_star"] for r in results[n]["rows"]), default=0))
    for name in order:
        r = results[name]
        for row in sorted(r["rows"], key=lambda x: -x["miou_star"]):
            setting = row["masks"].split(", ", 2)[-1] if ", " in row["masks"] else row["masks"]
            table.append([name, " ".join(r["args"]) or "(recipe)", setting, row["miou_star"], row["iou75"],
                          r["iters"], f"{r['train_s'] / 60:.1f}" if r["train_s"] else "-"])
        if not r["rows"]:
            table.append([name, " ".join(r["args"]) or "(recipe)", f"no result (rc {r['rc']})", 0.0, 0.0, r["iters"], "-"])
    md = markdown_table(["run", "overrides", "evaluation", "mIoU*", "IoU@75", "iters", "train min"], table)
    (out / "sweep.md").write_text(md + "\n")
    print(md)
    if args.write:
        write_section("quality_sweep", "## quality_sweep: recipe levers side by side (`python bench/quality_sweep.py`)"
                      f"\n\nEvaluation of every run: `{args.common}`.\n\n{md}")


if __name__ == "__main__":
    main()
