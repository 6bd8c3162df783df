"""int8 vs float32 ONNX on CPU: end-to-end proxy throughput and mask quality, side by side.

    python bench/int8.py [--ckpt pretrained] [--calib-crops 256] [--rounds 2] [--threads 0]

The model (default: the shipped one) is exported to float32 ONNX and quantized to int8
(`boxcaseg export --int8`'s code) with calibration crops from ``${BOXCASEG_DATA}/coco-train``
(never the set measured on). Then ``boxcaseg proxy`` (the library call, every stage:
json, decode, crop, inference, masks, RLE, output) runs on coco-val with each graph,
alternating A B A B for ``--rounds`` rounds; instances/s is masks / wall seconds of
the run (median over rounds), and ``boxcaseg evaluate masks``'s mIoU* / IoU@75 score
the masks. Goal (issue 19): int8 >= 2x float32 instances/s with mIoU* within 0.005.
The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="pretrained")
    ap.add_argument("--calib-crops", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: its default, all cores)")
    args = ap.parse_args()

    import torch

    from boxcaseg import weights
    from boxcaseg.evaluate import mask_quality
    from boxcaseg.export import export_onnx
    from boxcaseg.export.onnx_export import read_onnx_metadata
    from boxcaseg.export.quantize import calibration_crops, quantize_onnx
    from boxcaseg.proxy import ProxyConfig, generate_proxy

    data = Path(os.environ.get("BOXCASEG_DATA", REPO.parent / "shared" / "data"))
    val, train = data / "coco-val", data / "coco-train"
    if not (val / "instances.json").is_file() or not (train / "instances.json").is_file():
        sys.exit(f"bench/int8.py: no coco-val/coco-train under {data} (set BOXCASEG_DATA)")
    ckpt = weights.pretrained_path() if weights.is_alias(args.ckpt) else Path(args.ckpt)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rep = export_onnx(ckpt, tmp / "m.onnx")
        meta = read_onnx_metadata(rep.onnx_path)
        crops = calibration_crops(train / "instances.json", train / "images", rep.infer_size,
                                  float(meta.get("boxcaseg.context", 1.0)), args.calib_crops)
        q = quantize_onnx(rep.onnx_path, tmp / "m.int8.onnx", crops)
        graphs = {"float32": rep.onnx_path, "int8": q}
        speed: dict[str, list[float]] = {k: [] for k in graphs}
        quality: dict[str, dict] = {}
        for r in range(args.rounds):
            for name, path in graphs.items():
                out = tmp / f"{name}-{r}.json"
                cfg = ProxyConfig(ann=str(val / "instances.json"), images=str(val / "images"), out=str(out),
                                  model=str(path), engine="onnx", threads=args.threads, progress=False)
                summary = generate_proxy(cfg)
                speed[name].append(float(summary["instances_per_s"]))
                if name not in quality:
                    quality[name] = mask_quality(str(val / "instances.json"), str(out))
        sizes = {k: round(Path(v).stat().st_size / 1e6, 2) for k, v in graphs.items()}
    med = {k: statistics.median(v) for k, v in speed.items()}
    res = {
        "machine": f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, torch {torch.__version__}",
        "model": str(args.ckpt), "calibration": f"{len(crops)} crops of coco-train", "rounds": args.rounds,
        "instances_per_s": med, "runs": speed, "speedup": round(med["int8"] / med["float32"], 3),
        "miou_star": {k: round(v["miou_star"], 4) for k, v in quality.items()},
        "iou75": {k: round(v["iou75"], 4) for k, v in quality.items()},
        "mb": sizes,
    }
    res["miou_star_drop"] = round(res["miou_star"]["float32"] - res["miou_star"]["int8"], 4)
    print(f"| graph | MB | instances/s (median of {args.rounds}) | mIoU* | IoU@75 |")
    print("|---|---|---|---|---|")
    for k in graphs:
        print(f"| {k} | {sizes[k]} | {med[k]:.1f} | {res['miou_star'][k]:.4f} | {res['iou75'][k]:.4f} |")
    print(f"int8 / float32: {res['speedup']:.2f}x instances/s, mIoU* {-res['miou_star_drop']:+.4f}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
