"""`--precision int8` against the fp32 default on a CPU: steady instances/s and coco-val mIoU*.

    python bench/int8.py [--rounds 2] [--threads 0] [--write]

Runs ``boxcaseg proxy`` (the library call, every stage: json, decode, crop, inference,
masks, RLE, output) on ``${BOXCASEG_DATA}/coco-val`` with the shipped model as a user
would, with no flag but the precision: the fp32 default (its ONNX graph on ONNX Runtime)
and ``--precision int8`` (the shipped int8 graph, calibrated on coco-train: coco-val is
only measured), alternating A B A B for ``--rounds`` rounds in one process. The fp32
graph is built into the cache before the first round, so no round pays for it.
instances/s: masks / seconds after the engine's warm-up (``steady_instances_per_s``),
median over rounds (whole-run figures beside them); ``boxcaseg evaluate masks``'s mIoU*
/ IoU@75 score each precision's masks (every round writes the same bytes). Goal (issue
29): int8 >= 1.8x fp32 steady instances/s, mIoU* within 0.005. The load average is printed:
figures from a shared CPU are not the machine's. ``--write`` puts the table into
bench/RESULTS.md (section "int8"). The last line is JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import add_write_flag, require_data, write_section  # noqa: E402

PRECISIONS = ("fp32", "int8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: its default, all cores)")
    add_write_flag(ap, "int8")
    args = ap.parse_args()

    import onnxruntime
    import torch

    from boxcaseg.evaluate import mask_quality
    from boxcaseg.proxy import ProxyConfig, generate_proxy
    from boxcaseg.proxy.options import resolve_proxy_config

    val = require_data("coco-val", "instances.json").parent
    load_before = os.getloadavg()
    speed: dict[str, list[float]] = {k: [] for k in PRECISIONS}
    whole: dict[str, list[float]] = {k: [] for k in PRECISIONS}
    quality: dict[str, dict] = {}
    labels: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        def cfg(precision: str, r: int) -> ProxyConfig:
            return ProxyConfig(ann=val / "instances.json", images=val / "images", out=Path(tmp) / f"{precision}-{r}.json",
                               precision=precision, threads=args.threads, progress=False)

        for p in PRECISIONS:  # the fp32 default's ONNX graph into the cache, before any timing
            labels[p] = resolve_proxy_config(cfg(p, 0))[1].path.name
        for r in range(args.rounds):
            for p in PRECISIONS:
                s = generate_proxy(cfg(p, r))
                speed[p].append(float(s["steady_instances_per_s"]))
                whole[p].append(float(s["instances_per_s"]))
                if p not in quality:
                    quality[p] = mask_quality(str(val / "instances.json"), s["output"])
                print(f"round {r} {p}: {s['steady_instances_per_s']:.1f} inst/s steady "
                      f"({s['instances_per_s']:.1f} whole run), engine {s['engine']}", flush=True)
    load_after = os.getloadavg()
    med = {k: statistics.median(v) for k, v in speed.items()}
    res = {
        "machine": f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, torch "
                   f"{torch.__version__}, onnxruntime {onnxruntime.__version__}",
        "load_average": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in load_after]},
        "graphs": labels, "rounds": args.rounds, "steady_instances_per_s": med, "runs_steady": speed,
        "runs_whole": whole, "speedup": round(med["int8"] / med["fp32"], 3),
        "miou_star": {k: round(v["miou_star"], 4) for k, v in quality.items()},
        "iou75": {k: round(v["iou75"], 4) for k, v in quality.items()},
    }
    res["miou_star_drop"] = round(res["miou_star"]["fp32"] - res["miou_star"]["int8"], 4)
    rows = [f"| precision (graph) | steady instances/s (median of {args.rounds}; runs) | whole-run instances/s | "
            "mIoU* | IoU@75 |", "|---|---|---|---|---|"]
    for k in PRECISIONS:
        rows.append(f"| {k} ({labels[k]}) | {med[k]:.1f} ({', '.join(f'{x:.1f}' for x in speed[k])}) | "
                    f"{', '.join(f'{x:.1f}' for x in whole[k])} | {res['miou_star'][k]:.4f} | {res['iou75'][k]:.4f} |")
    verdict = "met" if res["speedup"] >= 1.8 and res["miou_star_drop"] <= 0.005 else "not met"
    summary = (f"int8 / fp32: **{res['speedup']:.2f}x** steady instances/s, mIoU* {-res['miou_star_drop']:+.4f} "
               f"(goal: >= 1.8x within 0.005: {verdict}). Load average (1, 5, 15 min) {res['load_average']['before']} "
               f"before, {res['load_average']['after']} after (2 cores: above 2 means other work shared the CPU).")
    print("\n".join(rows))
    print(summary)
    if args.write:
        write_section("int8", "\n".join([
            f"## int8: `--precision int8` against the fp32 default on coco-val (`python bench/int8.py --rounds {args.rounds}`)",
            "",
            f"{datetime.date.today()}, {res['machine']}. `boxcaseg proxy` on coco-val's 585 boxes with the shipped model "
            "and no flag but `--precision`, alternating fp32 / int8 in one process; steady instances/s = masks / "
            "seconds after the engine's warm-up. int8: the shipped graph (boxcaseg/weights/MODEL.md: calibrated on "
            "256 crops of coco-train boxes).",
            "", *rows, "", summary]))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
