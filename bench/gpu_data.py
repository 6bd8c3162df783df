"""The data bench/gpu_checks.sh needs on a lent GPU machine, small enough to carry there.

    python bench/gpu_data.py [--out .gpu-data] [--train-images 60]

Writes ``OUT/coco-train`` (the first ``--train-images`` images of $BOXCASEG_DATA/coco-train by
id, byte-identical, with their annotations) and ``OUT/coco-val`` (all of coco-val, byte-identical):
real files, not links (a link travels to the device machine as a link). The device tool carries
at most 64 MiB with the repository; the script prints the total and refuses more than 40 MB.
On the GPU machine the script then runs with ``BOXCASEG_DATA=.gpu-data``. DUTS-TR does not
fit: training throughput uses synthetic salient pairs there (bench/train_throughput.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import require_data  # noqa: E402

LIMIT = 40_000_000


def subset(src: Path, dst: Path, n_images: int | None) -> int:
    data = json.loads((src / "instances.json").read_text())
    images = sorted(data["images"], key=lambda im: im["id"])
    if n_images:
        images = images[:n_images]
    keep = {im["id"] for im in images}
    out = dict(data, images=images, annotations=[a for a in data["annotations"] if a["image_id"] in keep])
    (dst / "images").mkdir(parents=True, exist_ok=True)
    size = 0
    for im in images:
        target = dst / "images" / im["file_name"]
        shutil.copyfile(src / "images" / im["file_name"], target)
        size += target.stat().st_size
    (dst / "instances.json").write_text(json.dumps(out))
    size += (dst / "instances.json").stat().st_size
    print(f"{dst}: {len(images)} images, {sum(1 for a in out['annotations'] if not a.get('iscrowd'))} boxes, "
          f"{size / 1e6:.1f} MB")
    return size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / ".gpu-data")
    ap.add_argument("--train-images", type=int, default=60)
    args = ap.parse_args()
    root = require_data("coco-train", "instances.json").parents[1]
    if args.out.exists():
        shutil.rmtree(args.out)
    total = subset(root / "coco-train", args.out / "coco-train", args.train_images)
    total += subset(root / "coco-val", args.out / "coco-val", None)
    print(f"total {total / 1e6:.1f} MB")
    if total > LIMIT:
        sys.exit(f"{total / 1e6:.1f} MB is over the {LIMIT / 1e6:.0f} MB this may take of the 64 MiB carried")


if __name__ == "__main__":
    main()
