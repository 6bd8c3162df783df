"""Synthetic data in the formats the toolkit reads: textured shapes on textured backgrounds.

``make_synthetic_dataset(root)`` writes
- ``root/coco/images/*.png`` + ``root/coco/instances.json`` (COCO instances, GT masks
  as RLE, one category per shape kind, some objects overlapping);
- ``root/salient/images/*.png`` + ``root/salient/masks/*.png`` (one object per image).
Used by ``boxcaseg demo`` and the tests; deterministic for a given seed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from boxcaseg.masks import encode, tight_box_xyxy

SHAPES = ("ellipse", "triangle", "star", "blob")


@dataclass
class SyntheticPaths:
    root: Path
    ann_file: Path
    image_dir: Path
    salient_dir: Path


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random colour texture: stripes or blotches of two colours plus noise."""
    c1, c2 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    kind = rng.integers(0, 3)
    if kind == 0:
        ang, freq = rng.uniform(0, math.pi), rng.uniform(0.05, 0.3)
        t = 0.5 + 0.5 * np.sin((xx * math.cos(ang) + yy * math.sin(ang)) * freq)
    elif kind == 1:
        small = rng.random((max(2, h // 16), max(2, w // 16))).astype(np.float32)
        t = np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float32) / 255
    else:
        cell = int(rng.integers(4, 16))
        t = (((yy // cell) + (xx // cell)) % 2).astype(np.float32)
    img = t[..., None] * c1 + (1 - t[..., None]) * c2 + rng.normal(0, 12, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_mask(rng: np.random.Generator, kind: str, h: int, w: int, box: tuple) -> np.ndarray:
    x0, y0, x1, y1 = box
    im = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(im)
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    if kind == "ellipse":
        d.ellipse([x0, y0, x1, y1], fill=255)
    elif kind == "triangle":
        apex = x0 + rng.uniform(0.2, 0.8) * (x1 - x0)
        d.polygon([(apex, y0), (x1, y1), (x0, y1)], fill=255)
    elif kind == "star":
        k = int(rng.integers(5, 8))
        rot = rng.uniform(0, math.pi)
        pts = []
        for i in range(2 * k):
            r = 1.0 if i % 2 == 0 else 0.45
            a = rot + i * math.pi / k
            pts.append((cx + r * rx * math.cos(a), cy + r * ry * math.sin(a)))
        d.polygon(pts, fill=255)
    else:
        n = 12
        radii = 0.6 + 0.4 * rng.random(n)
        pts = [(cx + radii[i] * rx * math.cos(2 * math.pi * i / n), cy + radii[i] * ry * math.sin(2 * math.pi * i / n)) for i in range(n)]
        d.polygon(pts, fill=255)
        im = im.filter(ImageFilter.GaussianBlur(2)).point(lambda v: 255 if v >= 128 else 0)
    return np.asarray(im) >= 128


def _random_box(rng, h, w, min_frac=0.15, max_frac=0.6) -> tuple:
    bw = rng.uniform(min_frac, max_frac) * w
    bh = rng.uniform(min_frac, max_frac) * h
    x0 = rng.uniform(0, w - bw)
    y0 = rng.uniform(0, h - bh)
    return x0, y0, x0 + bw, y0 + bh


def make_synthetic_dataset(
    root: str | Path,
    n_images: int = 40,
    n_salient: int = 40,
    image_size: tuple[int, int] = (192, 144),
    max_objects: int = 3,
    seed: int = 0,
) -> SyntheticPaths:
    """Write a synthetic COCO set and a salient folder under ``root`` (see module doc)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    w, h = image_size
    coco_dir, sal_dir = root / "coco", root / "salient"
    (coco_dir / "images").mkdir(parents=True, exist_ok=True)
    (sal_dir / "images").mkdir(parents=True, exist_ok=True)
    (sal_dir / "masks").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
    images, annotations = [], []
    ann_id = 1
    for i in range(n_images):
        canvas = _texture(rng, h, w)
        n_obj = int(rng.integers(1, max_objects + 1))
        taken = np.zeros((h, w), bool)
        objs = []
        for _ in range(n_obj):
            kind_i = int(rng.integers(0, len(SHAPES)))
            box = _random_box(rng, h, w)
            m = _shape_mask(rng, SHAPES[kind_i], h, w, box)
            if m.sum() < 30:
                continue
            canvas[m] = _texture(rng, h, w)[m]
            taken[m] = True
            # later objects occlude earlier ones
            objs = [(k, om & ~m) for k, om in objs]
            objs.append((kind_i, m))
        file_name = f"{i:06d}.png"
        Image.fromarray(canvas).save(coco_dir / "images" / file_name)
        images.append({"id": i + 1, "file_name": file_name, "width": w, "height": h})
        for kind_i, m in objs:
            tb = tight_box_xyxy(m)
            if tb is None or m.sum() < 10:
                continue
            x0, y0, x1, y1 = tb
            annotations.append({
                "id": ann_id, "image_id": i + 1, "category_id": kind_i + 1, "iscrowd": 0,
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "area": float(m.sum()), "segmentation": encode(m),
            })
            ann_id += 1
    with open(coco_dir / "instances.json", "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    for i in range(n_salient):
        canvas = _texture(rng, h, w)
        box = _random_box(rng, h, w, 0.35, 0.8)
        m = _shape_mask(rng, SHAPES[int(rng.integers(0, len(SHAPES)))], h, w, box)
        canvas[m] = _texture(rng, h, w)[m]
        Image.fromarray(canvas).save(sal_dir / "images" / f"s{i:05d}.png")
        Image.fromarray((m * 255).astype(np.uint8)).save(sal_dir / "masks" / f"s{i:05d}.png")
    return SyntheticPaths(root, coco_dir / "instances.json", coco_dir / "images", sal_dir)
