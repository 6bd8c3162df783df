"""What the merge is for: a Proxy Mask R-CNN on PennFudan trained on merged vs per-instance masks.

    python bench/merge_maskrcnn.py --merge on  --out runs/merge-on  --threads 1 &
    python bench/merge_maskrcnn.py --merge off --out runs/merge-off --threads 1 &
    python bench/merge_maskrcnn.py --report runs/merge-on runs/merge-off   # table -> RESULTS "merge_maskrcnn"

Same split, Mask R-CNN and schedule as ``bench/proxy_maskrcnn.py`` (120 training images,
50 held out, 800 iterations x 2 images, EfficientNet-Lite0-FPN); the proxy masks of the
training boxes come from the shipped model with its embedded settings (``boxcaseg proxy``
without flags), once with the smaller-object-wins merge and once without. Flagged masks
(``ignore_mask``) are left out of the mask loss in both.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench.common import add_write_flag, data_root, write_section  # noqa: E402


def run(args) -> None:
    import proxy_maskrcnn as pm

    from boxcaseg.evaluate import mask_quality
    from boxcaseg.io import atomic_write_json, load_json
    from boxcaseg.proxy import ProxyConfig, generate_proxy

    data = Path(args.data)
    images = data / "images"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    coco = load_json(data / "instances.json")
    train_ids, test_ids = pm.split_ids([im["id"] for im in coco["images"]], 120, 50, 0)
    train_json, test_json = out / "train-gt.json", out / "test-gt.json"
    atomic_write_json(train_json, pm.subset(coco, train_ids))
    atomic_write_json(test_json, pm.subset(coco, test_ids))
    proxy = out / "proxy.json"
    if not proxy.is_file():
        generate_proxy(ProxyConfig(ann=train_json, images=images, out=proxy, merge=args.merge == "on", workers=1,
                                   threads=args.threads, progress=False))
    q = mask_quality(train_json, proxy)
    flagged = sum(1 for a in load_json(proxy)["annotations"] if a.get("ignore_mask"))
    ns = argparse.Namespace(backbone="timm:efficientnet_lite0", backbone_weights="", min_size=320, max_size=512,
                            mr_iters=args.mr_iters, lr=0.01, seed=0, threads=args.threads, no_progress=True)
    t = time.perf_counter()
    row = pm.run_variant(ns, "proxy", proxy, images, test_json, out)
    row.update({"merge": args.merge, "train_miou_star": q["miou_star"], "train_iou75": q["iou75"], "flagged": flagged,
                "n": q["n"], "seconds": time.perf_counter() - t})
    atomic_write_json(out / "merge-result.json", row, indent=1)
    print(json.dumps(row))


def report(dirs: list[str], write: bool = True) -> None:
    rows = [json.loads((Path(d) / "merge-result.json").read_text()) for d in dirs]
    lines = ["| proxy masks of the 120 training images | their mIoU* / IoU@75 | flagged | mask AP | mask AP50 | "
             "VOC AP@0.5 | VOC AP@0.75 | box AP50 |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {'merged (smaller object wins)' if r['merge'] == 'on' else 'per instance (no merge)'} | "
                     f"{100 * r['train_miou_star']:.1f} / {100 * r['train_iou75']:.1f} | {r['flagged']} of {r['n']} | "
                     f"{100 * r['mask_AP']:.1f} | {100 * r['mask_AP50']:.1f} | {100 * r['voc_AP50']:.1f} | "
                     f"{100 * r['voc_AP75']:.1f} | {100 * r['box_AP50']:.1f} |")
    body = ("## merge_maskrcnn: does the merge train a better Mask R-CNN? (`python bench/merge_maskrcnn.py`)\n\n"
            + "\n".join(lines) + "\n\nPennFudan, 50 held-out images; Mask R-CNN EfficientNet-Lite0-FPN, 320-512 px, "
            f"{rows[0].get('mr_iters', 800)} iterations x 2 images, 1 thread each (the two runs side by side); "
            "proxy masks from the shipped model with its embedded settings.")
    if write:
        write_section("merge_maskrcnn", body)
    print(body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--merge", choices=("on", "off"))
    ap.add_argument("--out")
    ap.add_argument("--data", default=str(data_root() / "pennfudan"))
    ap.add_argument("--mr-iters", type=int, default=800)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report", nargs="+", metavar="DIR", help="the table of these runs' results")
    add_write_flag(ap, "merge_maskrcnn", default=True)  # --report writes unless --no-write
    args = ap.parse_args()
    if args.report:
        report(args.report, args.write)
    else:
        if not args.merge or not args.out:
            ap.error("--merge and --out (or --report DIR ...)")
        run(args)


if __name__ == "__main__":
    main()
