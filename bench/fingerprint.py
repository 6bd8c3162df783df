"""Behaviour fingerprint: what a refactor must leave unchanged, recorded before and compared after.

    python bench/fingerprint.py record  runs/fp/before.json
    python bench/fingerprint.py compare runs/fp/before.json   # records again, reports every difference

It records, with one thread, on ``${BOXCASEG_DATA}``:

* the losses of a fixed-seed 10-iteration ``boxcaseg train --config cpu`` (coco-train boxes + duts-tr);
* the losses of a fixed-seed 10-iteration ``boxcaseg maskrcnn train --config maskrcnn-cpu`` on
  pennfudan's GT masks (a fingerprint, not a model);
* the sha256 of ``boxcaseg proxy`` with no flag on coco-val (the shipped model, ONNX engine), and of
  the same with ``--merge --engine torch``.

Losses are compared exactly (float repr); the proxy outputs byte for byte. Exit status 1 when
anything differs. Takes about 2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import require_data  # noqa: E402


def _run(args: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "boxcaseg", *args], env=env, cwd=REPO,
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"boxcaseg {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")


def _losses(metrics: Path) -> list[dict]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in row.items() if k == "iter" or k.startswith("loss")} for row in rows]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def record() -> dict:
    data = require_data("coco-val", "instances.json").parents[1]
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        _run(["train", "--config", "cpu", "--out", str(t / "train"), "--max-iters", "10",
              "--set", "train.ckpt_every=10", "--set", "train.seed=0"])
        out["train_losses"] = _losses(t / "train" / "metrics.jsonl")
        _run(["maskrcnn", "train", "--config", "maskrcnn-cpu", "--out", str(t / "mr"),
              "--ann", str(data / "pennfudan" / "instances.json"), "--images", str(data / "pennfudan" / "images"),
              "--max-iters", "10", "--set", "train.ckpt_every=10"])
        out["maskrcnn_losses"] = _losses(t / "mr" / "metrics.jsonl")
        val = ["--ann", str(data / "coco-val" / "instances.json"), "--images", str(data / "coco-val" / "images")]
        _run(["proxy", *val, "-o", str(t / "p.json")])
        out["proxy_default_sha256"] = _sha(t / "p.json")
        _run(["proxy", *val, "-o", str(t / "pm.json"), "--merge", "--engine", "torch"])
        out["proxy_merge_torch_sha256"] = _sha(t / "pm.json")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("record", "compare"),
                    help="record: write the fingerprint to PATH; compare: record again and compare with PATH")
    ap.add_argument("path", type=Path, metavar="PATH", help="the fingerprint json")
    args = ap.parse_args(argv)
    path = args.path
    if args.action == "compare" and not path.is_file():
        ap.error(f"no fingerprint at {path} (record one first)")
    now = record()
    if args.action == "record":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(now, indent=1))
        print(f"recorded {path}")
        return
    before = json.loads(path.read_text())
    diffs = [k for k in before if before[k] != now.get(k)]
    for k in diffs:
        print(f"DIFFERS {k}:\n  before {before[k]}\n  now    {now.get(k)}")
    for k in before:
        if k not in diffs:
            print(f"same    {k}")
    sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    main()
