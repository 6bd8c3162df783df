"""PNG overlays of proxy masks: GT boxes, kept masks, flagged masks, the GT mask beside them.

``visualize(ann, images, out_dir, gt=None, limit=None)`` writes one PNG per image of
``ann`` (a proxy json or any COCO json with masks):

- left panel: the image with each annotation's box (white outline), its mask filled in
  a colour of its own, and masks flagged ``ignore_mask`` filled in red with a red box;
- right panel (with ``gt``): the GT masks of the same annotation ids, in the same
  colours, each labelled with its IoU to the proxy mask;
- with ``gt``, also ``worst_iou.png``: a contact sheet of the instances with the lowest
  IoU (proxy crop beside GT crop, annotation id and IoU under each pair).
"""

from __future__ import annotations

import io as _io
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from boxcaseg.boxes import degenerate_reason
from boxcaseg.cocojson import CocoData, id_order, is_crowd, load_coco
from boxcaseg.data.transforms import read_rgb
from boxcaseg.errors import BoxcasegError
from boxcaseg.evaluate import instance_ious
from boxcaseg.io import atomic_write_bytes, check_output_dir, check_outputs, short_name, staged_folder
from boxcaseg.masks import decode
from boxcaseg.paths import resolve_image_path

log = logging.getLogger(__name__)

FLAGGED = (230, 25, 25)
BOX = (255, 255, 255)
# tab10 without its red (kept masks never look flagged)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
ALPHA = 0.45


@dataclass
class VisualizeResult:
    overlays: list[Path]
    sheet: Path | None


def _colour(ann_id) -> tuple[int, int, int]:
    """A palette colour of its own for an id (an int, or a string id: by its CRC-32)."""
    k = ann_id if isinstance(ann_id, int) else zlib.crc32(str(ann_id).encode())
    return PALETTE[k % len(PALETTE)]


def _boundary(m: np.ndarray) -> np.ndarray:
    """Pixels of ``m`` [H, W] bool with a 4-neighbour outside it."""
    inner = m.copy()
    inner[1:] &= m[:-1]
    inner[:-1] &= m[1:]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner


def _paint(canvas: np.ndarray, m: np.ndarray, colour: tuple[int, int, int]) -> None:
    """Blend ``colour`` into ``canvas`` [H, W, 3] uint8 where ``m``; solid outline."""
    if not m.any():
        return
    c = np.asarray(colour, np.float32)
    canvas[m] = (canvas[m].astype(np.float32) * (1 - ALPHA) + c * ALPHA).astype(np.uint8)
    canvas[_boundary(m)] = colour


def _save_png(img, path: Path) -> None:
    buf = _io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def _draw_boxes(img, anns: list[dict], labels: dict[int, str] | None = None) -> None:
    from PIL import ImageDraw

    d = ImageDraw.Draw(img)
    for a in anns:
        if degenerate_reason(a.get("bbox"), *img.size) is not None:  # no box, or none to draw (the one box rule)
            continue
        x, y, w, h = (float(v) for v in a["bbox"])
        colour = FLAGGED if a.get("ignore_mask") else BOX
        d.rectangle([x, y, x + w - 1, y + h - 1], outline=colour, width=2 if a.get("ignore_mask") else 1)
        if labels and a.get("id") in labels:
            d.text((x + 2, y + 1), labels[a["id"]], fill=colour)


def draw_masks(img, masks: np.ndarray, boxes, box_format: str, out: Path) -> None:
    """The overlay of ``boxcaseg segment``: the image at full size, mask k filled and outlined
    in colour k, its box drawn and numbered; written as a PNG to ``out`` (atomically)."""
    from PIL import Image, ImageDraw

    canvas = np.array(img.convert("RGB"))
    for k, m in enumerate(masks):
        _paint(canvas, np.asarray(m, bool), _colour(k))
    pic = Image.fromarray(canvas)
    d = ImageDraw.Draw(pic)
    for k, b in enumerate(boxes):
        x0, y0, a, c = (float(v) for v in b)
        x1, y1 = (a, c) if box_format == "xyxy" else (x0 + a, y0 + c)
        d.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=_colour(k), width=2)
        d.text((x0 + 3, y0 + 2), str(k), fill=BOX)
    _save_png(pic, Path(out))


def render_overlay(rgb: np.ndarray, anns: list[dict], coco: CocoData, gt_anns: list[dict] | None = None,
                   gt: CocoData | None = None, ious: dict[int, float] | None = None):
    """The overlay of one image as a PIL image (see the module doc); ``rgb`` [H, W, 3] uint8."""
    from PIL import Image, ImageDraw

    h, w = rgb.shape[:2]
    left = rgb.copy()
    # flagged masks first, kept ones on top: a kept object stays readable where both overlap
    for a in sorted(anns, key=lambda a: not a.get("ignore_mask", False)):
        if a.get("segmentation") is None:
            continue
        m = decode(coco.rle(a, (h, w)), h, w, a.get("id")).astype(bool)
        _paint(left, m, FLAGGED if a.get("ignore_mask") else _colour(a.get("id", 0)))
    left_img = Image.fromarray(left)
    labels = {k: f"{v:.2f}" for k, v in ious.items()} if ious else None
    _draw_boxes(left_img, anns, labels)
    d = ImageDraw.Draw(left_img)
    n_flag = sum(1 for a in anns if a.get("ignore_mask"))
    d.text((3, 2), f"proxy: {len(anns) - n_flag} kept, {n_flag} flagged", fill=(255, 255, 0))
    if gt_anns is None or gt is None:
        return left_img
    right = rgb.copy()
    for a in gt_anns:
        if a.get("segmentation") is None or is_crowd(a):
            continue
        m = decode(gt.rle(a, (h, w)), h, w, a.get("id")).astype(bool)
        _paint(right, m, _colour(a.get("id", 0)))
    right_img = Image.fromarray(right)
    _draw_boxes(right_img, [dict(a, ignore_mask=False) for a in gt_anns if not is_crowd(a)])
    ImageDraw.Draw(right_img).text((3, 2), "GT", fill=(255, 255, 0))
    both = Image.new("RGB", (2 * w + 4, h), (0, 0, 0))
    both.paste(left_img, (0, 0))
    both.paste(right_img, (w + 4, 0))
    return both


def _crop_tile(rgb: np.ndarray, m: np.ndarray, box, colour, tile: int):
    """A ``tile`` x ``tile`` letterboxed crop around ``box`` (xywh, with a 15% margin) with ``m`` painted."""
    from PIL import Image

    h, w = rgb.shape[:2]
    x, y, bw, bh = (float(v) for v in box)
    mx, my = 0.15 * bw + 2, 0.15 * bh + 2
    x0, y0 = int(max(0, np.floor(x - mx))), int(max(0, np.floor(y - my)))
    x1, y1 = int(min(w, np.ceil(x + bw + mx))), int(min(h, np.ceil(y + bh + my)))
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
    crop = rgb[y0:y1, x0:x1].copy()
    _paint(crop, m[y0:y1, x0:x1], colour)
    im = Image.fromarray(crop)
    s = tile / max(im.width, im.height)
    im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.NEAREST)
    out = Image.new("RGB", (tile, tile), (20, 20, 20))
    out.paste(im, ((tile - im.width) // 2, (tile - im.height) // 2))
    return out


def worst_iou_sheet(coco: CocoData, gt: CocoData, image_dir: Path, n: int = 24, tile: int = 112, cols: int = 4):
    """Contact sheet (PIL image) of the ``n`` GT instances with the lowest proxy-mask IoU, or None."""
    from PIL import Image, ImageDraw

    records = sorted(instance_ious(gt, coco), key=lambda r: (r.iou, id_order(r.ann_id)))[:n]
    if not records:
        return None
    pred_by_id = {a["id"]: a for a in coco.anns if "id" in a}
    gt_by_id = {a["id"]: a for a in gt.anns}
    label_h = 14
    cell_w, cell_h = 2 * tile + 2, tile + label_h
    rows = (len(records) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (cell_w + 6), rows * (cell_h + 6)), (0, 0, 0))
    d = ImageDraw.Draw(sheet)
    cache: dict[int, np.ndarray] = {}
    for i, r in enumerate(records):
        img = gt.images[r.image_id]
        if r.image_id not in cache:
            cache = {r.image_id: read_rgb(resolve_image_path(image_dir, img.get("file_name"), r.image_id), r.image_id,
                                          (int(img["width"]), int(img["height"])))}
        rgb = cache[r.image_id]
        h, w = rgb.shape[:2]
        g = gt_by_id[r.ann_id]
        gm = decode(gt.rle(g, (h, w)), h, w, r.ann_id).astype(bool)
        p = pred_by_id.get(r.ann_id)
        pm = decode(coco.rle(p, (h, w)), h, w, r.ann_id).astype(bool) if p is not None else np.zeros_like(gm)
        colour = FLAGGED if (p is not None and p.get("ignore_mask")) else _colour(r.ann_id)
        box = g.get("bbox") if degenerate_reason(g.get("bbox"), w, h) is None else [0, 0, w, h]
        cx, cy = (i % cols) * (cell_w + 6) + 3, (i // cols) * (cell_h + 6) + 3
        sheet.paste(_crop_tile(rgb, pm, box, colour, tile), (cx, cy))
        sheet.paste(_crop_tile(rgb, gm, box, (60, 200, 60), tile), (cx + tile + 2, cy))
        flag = " flagged" if colour == FLAGGED else ("" if r.found else " missing")
        d.text((cx, cy + tile + 1), f"ann {r.ann_id} IoU {r.iou:.2f}{flag}", fill=(255, 255, 255))
    return sheet


def visualize(ann: str | os.PathLike, images: str | os.PathLike, out_dir: str | os.PathLike,
              gt: str | os.PathLike | None = None, limit: int | None = None, worst: int = 24) -> VisualizeResult:
    """Write overlays of ``ann``'s masks for its images (at most ``limit``) into ``out_dir``;
    with ``gt``, the GT panel and the worst-IoU contact sheet too (see the module doc)."""
    image_dir = Path(images)
    if not image_dir.is_dir():
        raise BoxcasegError(f"{image_dir}: image folder not found")
    out = check_output_dir(out_dir, "-o")  # before any work; overlays never replace images nor go among them
    check_outputs(folders={"-o": out}, inputs={"--images": image_dir, "--ann": ann, "--gt": gt})
    gt_data = load_coco(gt, "ground-truth") if gt is not None else None
    coco = load_coco(ann, "annotation", images_from=gt_data)
    if not coco.images:
        raise BoxcasegError(f"{ann}: no images listed (give --gt for a bare results list)")
    # every file_name must stay inside the image folder: checked before any PNG is written
    paths = coco.paths(image_dir)
    if gt_data is not None:
        gt_data.paths(image_dir)
    ids = [i for i in sorted(coco.images, key=id_order) if coco.by_image.get(i)]
    if limit is not None:
        ids = ids[:max(0, limit)]
    ious: dict[int, float] = {}
    if gt_data is not None and any("id" in a for a in coco.anns):
        ious = {r.ann_id: r.iou for r in instance_ious(gt_data, coco)}
    with staged_folder(out) as stage:  # all PNGs, or none (an unreadable image stops the run)
        written = _write_overlays(coco, gt_data, ids, paths, ious, image_dir, worst, out, stage)
    sheet_path = written.pop() if written and written[-1].name == "worst_iou.png" else None
    log.info("visualize: %d overlay(s)%s in %s", len(written), " and worst_iou.png" if sheet_path else "", out)
    return VisualizeResult(written, sheet_path)


def _write_overlays(coco, gt_data, ids, paths, ious, image_dir, worst, out, stage) -> list[Path]:
    """Render every overlay (and the contact sheet last) into ``stage``; the paths they will have in ``out``."""
    written = []
    for image_id in ids:
        img = coco.images[image_id]
        rgb = read_rgb(paths[image_id], image_id, (int(img["width"]), int(img["height"])))
        anns = coco.by_image[image_id]
        gt_anns = gt_data.by_image.get(image_id, []) if gt_data is not None else None
        overlay = render_overlay(rgb, anns, coco, gt_anns, gt_data, {k: ious[k] for k in
                                 (a.get("id") for a in anns) if k in ious})
        stem = Path(img["file_name"]).stem  # cut where the overlay's name would pass 255 bytes
        path = out / f"{short_name(stem, 4)}.png"
        if path in written or path.name == "worst_iou.png":
            path = out / f"{short_name(stem, len(f'-{image_id}.png'.encode()))}-{image_id}.png"
        _save_png(overlay, stage / path.name)
        written.append(path)
    if gt_data is not None and worst > 0 and ious:
        sheet = worst_iou_sheet(coco, gt_data, image_dir, worst)
        if sheet is not None:
            _save_png(sheet, stage / "worst_iou.png")
            written.append(out / "worst_iou.png")
    return written


def write_overlays(ann: str | os.PathLike, images: str | os.PathLike, out_dir: str | os.PathLike,
                   gt: str | os.PathLike | None = None, limit: int | None = None, worst: int = 24) -> list[Path]:
    """:func:`visualize`, returning the PNGs written (the overlays, then the contact sheet if any)."""
    res = visualize(ann, images, out_dir, gt=gt, limit=limit, worst=worst)
    return res.overlays + ([res.sheet] if res.sheet is not None else [])
