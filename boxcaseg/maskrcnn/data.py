"""Mask R-CNN training data: a COCO json (GT or proxy masks) and an iteration-indexed sampler.

Every item is a pure function of (seed, iteration, rank, slot): the image index comes
from a per-epoch permutation of a seeded generator and the flip from a generator seeded
by the item's global position. So a resumed run sees exactly the batches the
uninterrupted one would have seen, whatever the number of loader workers.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from boxcaseg.cocojson import CocoData, check_image_file, id_order, int_ids, is_crowd, load_coco
from boxcaseg.data.transforms import read_rgb
from boxcaseg.errors import BoxcasegError
from boxcaseg.masks import decode

log = logging.getLogger(__name__)


class CocoMaskDataset(Dataset):
    """Images + boxes + masks of a COCO instances json, as torchvision detection targets.

    ``load(i, flip)`` returns ``(image [3, H, W] float32 in 0..1, target)`` with target
    ``{boxes [G, 4] float32 xyxy, labels [G] int64 (1..K), masks [G, H, W] uint8,
    ignore_mask [G] bool, image_id int64}``. The json is read by :mod:`boxcaseg.cocojson`
    (a string image id becomes an integer ``image_id``: :func:`~boxcaseg.cocojson.int_ids`). Crowd annotations are left
    out; degenerate boxes (the reader's rule) and boxes under one pixel inside their image
    are skipped with a warning; every mask is checked (not rasterised) and every image's
    header read up front; an annotation without segmentation keeps its box
    and is flagged ``ignore_mask``. Labels are the rank of the category id among
    ``category_ids`` (the json's categories sorted by id, unless given).
    """

    def __init__(self, ann_file: str | os.PathLike, image_dir: str | os.PathLike,
                 category_ids: list[int] | None = None, use_ignore: bool = True, skip_empty: bool = True,
                 image_ids: list[int] | None = None):
        self.coco: CocoData = load_coco(ann_file, "annotation")
        self.int_id = int_ids(self.coco.images)  # the target's image_id tensor: integer stand-ins for string ids
        self.image_dir = Path(image_dir)
        # every file_name must stay inside the image folder: checked before any work
        self.paths = self.coco.paths(self.image_dir)
        if category_ids is None:
            category_ids = (sorted(self.coco.categories, key=id_order)
                            or sorted({a["category_id"] for a in self.coco.anns}, key=id_order))
        self.category_ids = list(category_ids)
        self.label_of = {c: i + 1 for i, c in enumerate(self.category_ids)}
        self.use_ignore = use_ignore
        wanted = set(image_ids) if image_ids else None
        if wanted is not None and (missing := wanted - set(self.coco.images)):
            raise BoxcasegError(f"{ann_file}: data.image_ids lists ids the json lacks: {sorted(missing, key=id_order)[:5]}")
        self.entries: list[tuple[dict, list[dict]]] = []
        skipped = 0
        for image_id in sorted(self.coco.images, key=id_order):
            if wanted is not None and image_id not in wanted:
                continue
            img = self.coco.images[image_id]
            h, w = int(img["height"]), int(img["width"])
            anns = []
            for a in self.coco.by_image.get(image_id, []):
                if is_crowd(a):
                    continue
                cat = a.get("category_id", -1)
                if cat not in self.label_of:
                    raise BoxcasegError(f"{ann_file}: annotation {a.get('id')} has category_id {cat}, "
                                        "not among the model's categories")
                reason = self.coco.box_problem(a)
                if reason is None:
                    x, y, bw, bh = (float(v) for v in a["bbox"])
                    x0, y0, x1, y1 = max(0.0, x), max(0.0, y), min(float(w), x + bw), min(float(h), y + bh)
                    if x1 - x0 < 1 or y1 - y0 < 1:
                        reason = "bbox is under one pixel inside its image"
                if reason is None and a.get("segmentation") is not None:
                    try:  # a mask that cannot be read stops the run here, before any work
                        self.coco.check_mask(a)
                    except BoxcasegError as e:
                        raise BoxcasegError(f"{ann_file}: {e.one_line()}" if str(ann_file) not in str(e) else str(e)) from e
                if reason is not None:
                    skipped += 1
                    log.warning("%s: annotation %s on image %s skipped: %s", ann_file, a.get("id"), image_id, reason)
                    continue
                anns.append(a)
            if anns or not skip_empty:
                self.entries.append((img, anns))
        if skipped:
            log.warning("%s: %d annotation(s) with degenerate boxes skipped", ann_file, skipped)
        if not self.entries:
            raise BoxcasegError(f"{ann_file}: no image with a usable annotation")
        for img, _ in self.entries:  # headers up front (as the BoxCaseg trainer reads them): a bad file stops here
            err = check_image_file(self.paths[img["id"]], img["id"], size=(int(img["width"]), int(img["height"])))
            if err:
                raise BoxcasegError(err)

    def __len__(self) -> int:
        return len(self.entries)

    def load(self, index: int, flip: bool = False) -> tuple[torch.Tensor, dict]:
        img, anns = self.entries[index]
        image_id = img["id"]
        h, w = int(img["height"]), int(img["width"])
        path = self.paths[image_id]
        rgb = read_rgb(path, image_id, (w, h))  # in the frame of the json's size (EXIF orientation)
        boxes = np.zeros((len(anns), 4), np.float32)
        masks = np.zeros((len(anns), h, w), np.uint8)
        ignore = np.zeros(len(anns), bool)
        labels = np.zeros(len(anns), np.int64)
        for i, a in enumerate(anns):
            x, y, bw, bh = (float(v) for v in a["bbox"])
            boxes[i] = (max(0.0, x), max(0.0, y), min(float(w), x + bw), min(float(h), y + bh))
            labels[i] = self.label_of[a["category_id"]]
            if a.get("segmentation") is None:
                ignore[i] = True
            else:
                masks[i] = decode(self.coco.rle(a, (h, w)), h, w, a.get("id"))
                ignore[i] = self.use_ignore and bool(a.get("ignore_mask", False))
        if flip:
            rgb = rgb[:, ::-1]
            masks = masks[:, :, ::-1]
            boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
        image = torch.from_numpy(np.array(rgb, dtype=np.float32)).permute(2, 0, 1).div_(255)  # a writable copy
        target = {
            "boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels),
            "masks": torch.from_numpy(np.ascontiguousarray(masks)), "ignore_mask": torch.from_numpy(ignore),
            "image_id": torch.tensor(self.int_id[image_id], dtype=torch.int64),
        }
        return image, target

    def __getitem__(self, item: tuple[int, bool]):
        index, flip = item
        return self.load(index, flip)


class IterationSampler(Sampler):
    """Batches for iterations ``[start_iter, end_iter)``, a pure function of the iteration.

    The item in slot ``j`` of rank ``r`` at iteration ``it`` sits at global position
    ``p = (it * world_size + r) * batch_size + j`` of an endless stream that walks a fresh
    seeded permutation of the dataset every epoch; its horizontal flip is drawn from a
    generator seeded with ``(seed, p)``. Yields lists of ``(index, flip)``.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start_iter: int = 0, end_iter: int = 1, hflip: float = 0.0):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.start_iter, self.end_iter, self.hflip = start_iter, end_iter, hflip
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def item(self, it: int, slot: int) -> tuple[int, bool]:
        p = (it * self.world_size + self.rank) * self.batch_size + slot
        epoch, k = divmod(p, self.n)
        flip = bool(self.hflip > 0 and np.random.default_rng([self.seed, 1, p]).random() < self.hflip)
        return int(self._perm(epoch)[k]), flip

    def __iter__(self):
        for it in range(self.start_iter, self.end_iter):
            yield [self.item(it, j) for j in range(self.batch_size)]

    def __len__(self) -> int:
        return max(0, self.end_iter - self.start_iter)


def collate(batch):
    """Lists of images and targets (torchvision detection models take lists)."""
    return [b[0] for b in batch], [b[1] for b in batch]
