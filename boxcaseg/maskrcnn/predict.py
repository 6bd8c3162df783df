"""Run a trained Mask R-CNN over images: a COCO results json (RLE masks, boxes, scores).

``evaluate coco`` and ``evaluate voc`` read what this writes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from boxcaseg.errors import BoxcasegError
from boxcaseg.cocojson import id_order, load_coco
from boxcaseg.io import atomic_write_json, check_output_file, check_outputs
from boxcaseg.data.transforms import read_rgb
from boxcaseg.dist import check_device_name, resolve_device
from boxcaseg.maskrcnn.trainer import load_checkpoint, model_from_checkpoint
from boxcaseg.masks import encode
from boxcaseg.paths import check_image_paths, walk_files

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def list_images(images: str | os.PathLike, ann: str | os.PathLike | None = None,
                image_ids: list[int] | None = None) -> list[tuple[int, Path, tuple[int, int] | None]]:
    """(image id, path, (width, height) the json records or None) triples: the images of
    ``ann`` (optionally only ``image_ids``), or every image file of the folder in sorted
    name order with ids 1..N (read as displayed)."""
    images = Path(images)
    if not images.is_dir():
        raise BoxcasegError(f"{images}: image folder not found")
    if ann is not None:
        coco = load_coco(ann, "annotation")
        ids = sorted(coco.images, key=id_order) if not image_ids else list(image_ids)
        missing = [i for i in ids if i not in coco.images]
        if missing:
            raise BoxcasegError(f"{ann}: image ids {missing[:5]} not in the json")
        paths = check_image_paths(images, ((i, coco.images[i].get("file_name")) for i in ids))  # inside --images
        return [(i, paths[i], (int(coco.images[i]["width"]), int(coco.images[i]["height"]))) for i in ids]
    files = walk_files(images, IMAGE_SUFFIXES, recursive=False)
    if not files:
        raise BoxcasegError(f"{images}: no image files")
    return [(i, p, None) for i, p in enumerate(files, start=1)]


@torch.inference_mode()
def predict_maskrcnn(
    checkpoint: str | os.PathLike,
    images: str | os.PathLike,
    out: str | os.PathLike | None = None,
    ann: str | os.PathLike | None = None,
    image_ids: list[int] | None = None,
    score_thresh: float | None = None,
    mask_thresh: float | None = None,
    max_dets: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    show_progress: bool = True,
) -> list[dict]:
    """Detections of the checkpoint's model on ``images`` as a COCO results list.

    Each result: ``{image_id, category_id (the training json's id), bbox [x, y, w, h],
    score, segmentation (compressed RLE, str counts)}``; masks are the model's mask
    probabilities pasted at the image size and thresholded at ``mask_thresh``. Defaults
    come from the checkpoint's ``[predict]`` config. Written atomically to ``out`` if given.
    """
    check_device_name(device, "--device")
    if out is not None:
        check_output_file(out, "-o")  # before any work
        check_outputs({"-o": out}, {"--checkpoint": checkpoint, "--images": images, "--ann": ann})
    items = list_images(images, ann, image_ids)  # a bad json or file name stops before the model loads
    ckpt = load_checkpoint(checkpoint)
    model, cfg, cats = model_from_checkpoint(ckpt, str(checkpoint))
    p = cfg.predict
    score_thresh = p.score_thresh if score_thresh is None else score_thresh
    mask_thresh = p.mask_thresh if mask_thresh is None else mask_thresh
    max_dets = p.max_dets if max_dets is None else max_dets
    batch_size = p.batch_size if batch_size is None else batch_size
    model.roi_heads.score_thresh = score_thresh
    model.roi_heads.detections_per_img = max_dets
    dev = resolve_device(device, "--device")
    model.to(dev)

    if ann is None:
        log.info("no --ann: image ids are 1..%d in sorted file-name order of %s", len(items), images)
    results: list[dict] = []
    from rich.progress import Progress

    with Progress(disable=not show_progress) as progress:
        task = progress.add_task("predict", total=len(items))
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            batch = [torch.from_numpy(np.array(read_rgb(path, image_id, size))).permute(2, 0, 1).float().div_(255).to(dev)
                     for image_id, path, size in chunk]
            outputs = model(batch)
            for (image_id, _, _), o in zip(chunk, outputs):
                masks = (o["masks"][:, 0] >= mask_thresh).cpu().numpy().astype(np.uint8)
                boxes = o["boxes"].cpu().numpy()
                for box, label, score, m in zip(boxes, o["labels"].tolist(), o["scores"].tolist(), masks):
                    x0, y0, x1, y1 = (float(v) for v in box)
                    results.append({
                        "image_id": int(image_id), "category_id": cats[label - 1],
                        "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                        "score": round(float(score), 5), "segmentation": encode(m),
                    })
            progress.update(task, advance=len(chunk))
    if out is not None:
        atomic_write_json(out, results)
    return results
