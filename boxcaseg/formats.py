"""Other dataset formats: YOLO detection labels in, YOLO segmentation labels / instance PNGs out.

In
    ``yolo_to_coco``: an Ultralytics detection dataset (``images/`` + ``labels/<stem>.txt``
    with ``class cx cy w h`` lines normalised to 0..1, class names from a names.txt or a
    data.yaml) -> a COCO instances dict with boxes only (``segmentation: []``), which
    ``boxcaseg proxy`` turns into masks. Images without a label file are kept without
    annotations (YOLO background images). A label line with more than 5 numbers that is an
    Ultralytics *segmentation* line (``class x1 y1 x2 y2 x3 y3 ...``: an even number >= 6 of
    coordinates) becomes the tight box of its polygon (what Ultralytics itself does with
    such labels in a detection dataset); the polygon itself is not kept.

Out (from a COCO json with masks, e.g. the output of ``boxcaseg proxy``)
    ``write_yolo_seg``: Ultralytics segmentation labels, one ``class x1 y1 x2 y2 ...`` line
    per mask, coordinates normalised by the image width / height. The polygon is the
    mask's outer contour (``cv2.findContours``, RETR_EXTERNAL, CHAIN_APPROX_SIMPLE; pixel
    centre coordinates, as Ultralytics' own mask converter writes them and as its
    ``cv2.fillPoly`` rasteriser reads them back). Holes are not represented (filled). A
    mask of several parts becomes ONE polygon: the parts are joined by zero-width bridges
    (each bridge walked there and back) along a minimum spanning tree of the shortest
    part-to-part distances -- the idea of Ultralytics' ``merge_multi_segment``; rasterised
    with ``cv2.fillPoly`` the bridges add a one-pixel line each, keeping only the largest
    part would drop the other parts entirely (``multi_part="largest"``).
    ``write_instance_pngs``: one single-channel PNG per image (8-bit when it has < 256
    instances, else 16-bit), 0 = background, value ``k`` = the k-th written annotation of
    the image (json order); where masks overlap the annotation with the smaller box is on
    top (painted in order of decreasing box area; equal boxes: the earlier annotation on
    top). ``instances.json`` maps each value back to the annotation and category id.

Both writers skip crowd annotations and empty masks (counted), write flagged masks
(``ignore_mask: true``) unless ``skip_flagged`` (then counted), give every image an output
file (an empty label file / an all-zero PNG tells YOLO / the reader it is background),
and write every file atomically (temporary file + rename).
"""

from __future__ import annotations

import io
import logging
import math
import os
import posixpath
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

from boxcaseg.boxes import merge_order
from boxcaseg.errors import BoxcasegError
from boxcaseg.images import image_size
from boxcaseg.io import atomic_write_bytes, atomic_write_json, check_input_file, read_text
from boxcaseg.masks import decode, tight_box_xyxy
from boxcaseg.paths import walk_files

log = logging.getLogger(__name__)

# Ultralytics' image suffixes (lower-case)
IMAGE_SUFFIXES = (".bmp", ".dng", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp", ".pfm", ".heic")
FORMATS = ("coco", "yolo-seg", "png")
FORMAT_INDEX = {"yolo-seg": "classes.txt", "png": "instances.json"}  # the file of a folder output beside the per-image ones
_TOL = 1e-6


# --------------------------------------------------------------------------- YOLO -> COCO

def read_names(names: str | os.PathLike) -> list[str]:
    """Class names from a names.txt (one per line) or an Ultralytics data.yaml (``names:``
    as a list or a dict ``{id: name}`` with ids 0..n-1)."""
    path = check_input_file(names, "class names")
    text = read_text(path, "class names", errors="replace")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml  # PyYAML, a dependency of timm
        except ImportError as e:  # pragma: no cover - timm requires PyYAML
            raise BoxcasegError(f"{path}: reading a data.yaml needs PyYAML (pip install pyyaml)") from e
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise BoxcasegError(f"{path}: malformed YAML ({' '.join(str(e).split())})") from e
        except RecursionError:
            raise BoxcasegError(f"{path}: malformed YAML (nested too deeply)") from None
        raw = data.get("names") if isinstance(data, dict) else None
        if isinstance(raw, list):
            out = [str(n) for n in raw]
        elif isinstance(raw, dict):
            try:
                ids = sorted(int(k) for k in raw)
            except (TypeError, ValueError):
                raise BoxcasegError(f"{path}: 'names' keys must be class indices 0..n-1") from None
            if ids != list(range(len(raw))):
                raise BoxcasegError(f"{path}: 'names' keys must be the class indices 0..{len(raw) - 1}, got {ids}")
            out = [str(raw[k]) for k in sorted(raw, key=int)]
        else:
            raise BoxcasegError(f"{path}: no 'names' list or {{id: name}} mapping")
        nc = data.get("nc")
        if nc is not None and nc != len(out):
            raise BoxcasegError(f"{path}: nc is {nc} but 'names' has {len(out)} entries")
    else:
        lines = [ln.strip() for ln in text.splitlines()]
        while lines and not lines[-1]:
            lines.pop()
        for i, ln in enumerate(lines):
            if not ln:
                raise BoxcasegError(f"{path}:{i + 1}: empty class name")
        out = lines
    if not out:
        raise BoxcasegError(f"{path}: no class names")
    return out


def _parse_label_line(tokens: list[str], n_classes: int, where: str) -> tuple[int, float, float, float, float, bool]:
    """One label line -> (class, cx, cy, w, h, from_polygon); errors name ``where`` (file:line)."""
    try:
        vals = [float(t) for t in tokens]
    except ValueError:
        got = " ".join(tokens)[:60]
        raise BoxcasegError(f"{where}: malformed line (expected 'class cx cy w h' numbers, got {got!r})") from None
    n = len(vals)
    if not all(math.isfinite(v) for v in vals):
        raise BoxcasegError(f"{where}: non-finite value")
    cls = vals[0]
    if cls != int(cls):
        raise BoxcasegError(f"{where}: class index {tokens[0]!r} is not an integer")
    cls = int(cls)
    if not 0 <= cls < n_classes:
        raise BoxcasegError(f"{where}: class index {cls} out of range (the names file has {n_classes} classes: "
                            f"0..{n_classes - 1})")
    coords = vals[1:]
    if any(v < -_TOL or v > 1 + _TOL for v in coords):
        raise BoxcasegError(f"{where}: value out of the normalised range 0..1 ({' '.join(tokens[1:])[:60]})")
    if n == 5:
        cx, cy, w, h = coords
        if w <= 0 or h <= 0:
            raise BoxcasegError(f"{where}: zero or negative box size (w={tokens[3]}, h={tokens[4]})")
        return cls, cx, cy, w, h, False
    if n >= 7 and len(coords) % 2 == 0:
        # an Ultralytics segmentation line: class x1 y1 x2 y2 x3 y3 ... -> the polygon's box
        xs, ys = coords[0::2], coords[1::2]
        w, h = max(xs) - min(xs), max(ys) - min(ys)
        if w <= 0 or h <= 0:
            raise BoxcasegError(f"{where}: segmentation polygon with zero width or height")
        return cls, (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2, w, h, True
    raise BoxcasegError(f"{where}: malformed line: {n} numbers, expected 5 ('class cx cy w h')"
                        + (" or a segmentation polygon 'class x1 y1 x2 y2 x3 y3 ...'" if n > 5 else ""))


def yolo_to_coco(images_dir: str | os.PathLike, labels_dir: str | os.PathLike,
                 names: str | os.PathLike) -> dict:
    """An Ultralytics detection dataset -> a COCO instances dict (boxes, ``segmentation: []``).

    Images are the files with an image suffix under ``images_dir`` (recursively, sorted);
    ``IMAGE.ext`` (relative path) pairs with ``labels_dir/IMAGE.txt``. ``width`` / ``height``
    are the size as displayed (a photo's EXIF orientation applied), the frame YOLO labels
    are normalised to, as Ultralytics reads them. ``file_name`` is the path relative to
    ``images_dir``; image ids and annotation ids count from 1;
    ``category_id`` = class index + 1. ``info`` holds the conversion counts
    (``images_without_label_file``, ``polygon_lines``).

    Errors (BoxcasegError naming the file and, for label lines, the line number): a
    malformed line, a class index outside the names, a non-finite value or one outside
    0..1 (1e-6 tolerance), a zero / negative box size, a label file without an image
    (a LabelImg ``classes.txt`` at the top of ``labels_dir`` and the names file are not
    label files), two images sharing one label file, an unreadable image.
    """
    images_dir, labels_dir, names_path = Path(images_dir), Path(labels_dir), Path(names)
    class_names = read_names(names_path)
    if not images_dir.is_dir():
        raise BoxcasegError(f"{images_dir}: image folder not found")
    if not labels_dir.is_dir():
        raise BoxcasegError(f"{labels_dir}: label folder not found")

    images = walk_files(images_dir, IMAGE_SUFFIXES)  # links to split folders followed
    if not images:
        raise BoxcasegError(f"{images_dir}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    label_of: dict[Path, Path] = {}
    for p in images:
        rel = p.relative_to(images_dir)
        lab = (labels_dir / rel).with_suffix(".txt")
        if lab in label_of:
            raise BoxcasegError(f"{p}: shares the label file {lab} with {label_of[lab]}")
        label_of[lab] = p
    names_resolved = names_path.resolve()
    for lab in walk_files(labels_dir, (".txt",)):
        if lab in label_of or lab.resolve() == names_resolved:
            continue
        if lab.parent == labels_dir and lab.name == "classes.txt":
            continue  # LabelImg writes its class list here
        raise BoxcasegError(f"{lab}: label file without an image (no {lab.relative_to(labels_dir).with_suffix('.*')} "
                            f"under {images_dir})")

    out_images, out_anns = [], []
    n_without, n_poly = 0, 0
    for image_id, (lab, p) in enumerate(label_of.items(), start=1):
        width, height = image_size(p)  # as displayed: YOLO labels are normalised to the upright photo
        out_images.append({"id": image_id, "file_name": p.relative_to(images_dir).as_posix(),
                           "width": int(width), "height": int(height)})
        if not lab.is_file():
            n_without += 1
            continue
        text = read_text(lab, "label")
        for lineno, line in enumerate(text.splitlines(), start=1):
            tokens = line.split()
            if not tokens:
                continue
            cls, cx, cy, w, h, poly = _parse_label_line(tokens, len(class_names), f"{lab}:{lineno}")
            n_poly += poly
            bw, bh = w * width, h * height
            out_anns.append({"id": len(out_anns) + 1, "image_id": image_id, "category_id": cls + 1,
                             "bbox": [(cx - w / 2) * width, (cy - h / 2) * height, bw, bh],
                             "area": bw * bh, "iscrowd": 0, "segmentation": []})
    if n_poly:
        log.info("%s: %d segmentation-polygon line(s) converted to their boxes", labels_dir, n_poly)
    return {
        "info": {"description": f"converted from YOLO labels {labels_dir} by boxcaseg",
                 "images_without_label_file": n_without, "polygon_lines": n_poly},
        "images": out_images,
        "annotations": out_anns,
        "categories": [{"id": k + 1, "name": n} for k, n in enumerate(class_names)],
    }


# --------------------------------------------------------------------------- masks -> polygons

def _nearest_pairs(a: np.ndarray, b: np.ndarray, owner: np.ndarray, n_owner: int):
    """For each owner part of the points ``b``: the smallest squared distance to ``a``,
    the index into ``a`` and the index into ``b`` realising it."""
    best_d = np.full(len(b), np.iinfo(np.int64).max, dtype=np.int64)
    best_a = np.zeros(len(b), dtype=np.int64)
    step = max(1, 2_000_000 // max(1, len(b)))
    for s in range(0, len(a), step):
        d = ((a[s:s + step, None, :] - b[None, :, :]) ** 2).sum(-1)
        i = d.argmin(0)
        di = d[i, np.arange(len(b))]
        better = di < best_d
        best_d[better] = di[better]
        best_a[better] = i[better] + s
    out = []
    for k in range(n_owner):
        idx = np.flatnonzero(owner == k)
        j = idx[best_d[idx].argmin()]
        out.append((int(best_d[j]), int(best_a[j]), int(j)))
    return out


def join_parts(parts: list[np.ndarray]) -> np.ndarray:
    """Join closed polygons [Ni, 2] into one by zero-width bridges (walked there and back).

    Prim's minimum spanning tree over the shortest point-to-point distances between parts,
    rooted at the part with most points, then one walk: every part is traversed once, and at
    a point where a child part hangs the walk detours through the child's subtree and comes
    back to the same point. Under the even-odd fill rule the bridges cancel (apart from the
    pixels on the bridge lines themselves).
    """
    parts = [np.asarray(p, dtype=np.int64).reshape(-1, 2) for p in parts]
    if len(parts) == 1:
        return parts[0]
    root = max(range(len(parts)), key=lambda k: len(parts[k]))
    remaining = [k for k in range(len(parts)) if k != root]
    # best[r] = (squared distance, tree part, index in tree part, index in r)
    best: dict[int, tuple[int, int, int, int]] = {}
    children: dict[int, dict[int, list[tuple[int, int]]]] = {k: {} for k in range(len(parts))}

    def relax(t: int) -> None:
        if not remaining:
            return
        pts = np.concatenate([parts[r] for r in remaining])
        owner = np.concatenate([np.full(len(parts[r]), i) for i, r in enumerate(remaining)])
        offsets = np.concatenate(([0], np.cumsum([len(parts[r]) for r in remaining])))
        for i, (d, ia, jb) in enumerate(_nearest_pairs(parts[t], pts, owner, len(remaining))):
            r = remaining[i]
            if r not in best or d < best[r][0]:
                best[r] = (d, t, ia, jb - int(offsets[i]))

    relax(root)
    while remaining:
        r = min(remaining, key=lambda k: best[k][0])
        _, t, it, ir = best.pop(r)
        remaining.remove(r)
        children[t].setdefault(it, []).append((r, ir))
        relax(r)

    def pieces(k: int, entry: int) -> list:
        """Part k walked once from ``entry`` back to it, split where children hang: point
        arrays to emit and (child, child entry) detours, in walking order."""
        n = len(parts[k])
        order = (entry + np.arange(n + 1)) % n
        res: list = []
        prev = 0
        for s in sorted({(i - entry) % n for i in children[k]}):
            res.append(parts[k][order[prev:s + 1]])
            for child in children[k][int(order[s])]:
                res.append(child)
                res.append(parts[k][order[s]][None])  # the bridge back
            prev = s + 1
        res.append(parts[k][order[prev:]])
        return res

    out: list[np.ndarray] = []
    todo = pieces(root, 0)[::-1]  # an explicit stack: no recursion limit on many parts
    while todo:
        item = todo.pop()
        if isinstance(item, tuple):
            todo.extend(pieces(*item)[::-1])
        else:
            out.append(item)
    poly = np.concatenate(out)
    keep = np.ones(len(poly), dtype=bool)
    keep[1:] = np.any(poly[1:] != poly[:-1], axis=1)  # drop consecutive duplicates
    return poly[keep]


def mask_to_polygon(mask: np.ndarray, multi_part: str = "join") -> np.ndarray | None:
    """Binary mask [H, W] -> one polygon [N, 2] (int pixel-centre x, y; N >= 3), None if empty.

    ``multi_part``: "join" (parts joined by zero-width bridges, see ``join_parts``) or
    "largest" (the part with the largest contour area only).
    """
    import cv2

    contours, _ = cv2.findContours(np.ascontiguousarray(mask, dtype=np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    parts = [c.reshape(-1, 2).astype(np.int64) for c in contours if len(c)]
    if not parts:
        return None
    if len(parts) == 1:
        poly = parts[0]
    elif multi_part == "largest":
        poly = max(parts, key=lambda c: (cv2.contourArea(c.astype(np.int32)), len(c)))
    elif multi_part == "join":
        poly = join_parts(parts)
    else:
        raise ValueError(f"multi_part must be 'join' or 'largest', not {multi_part!r}")
    if len(poly) < 3:  # one or two pixels: a degenerate polygon that fillPoly still draws
        poly = np.concatenate([poly, np.repeat(poly[-1:], 3 - len(poly), axis=0)])
    return poly


# --------------------------------------------------------------------------- COCO -> writers

def _image_size_of(img: dict, src: str = "COCO json") -> tuple[int, int]:
    h, w = img.get("height"), img.get("width")
    for key, v in (("height", h), ("width", w)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0 or int(v) != v:
            raise BoxcasegError(f"{src}: image id {img.get('id')!r} has no valid {key!r} ({v!r})")
    return int(h), int(w)


def _out_path(out_dir: Path, file_name: Any, suffix: str, image_id: Any) -> Path:
    """``out_dir/<file_name without suffix><suffix>``, subfolders kept; never outside out_dir.

    The name is read as the proxy reads it (:func:`boxcaseg.paths.resolve_image_path`):
    relative, normalised (``sub/../x.jpg`` is ``x.jpg``), a ``:`` is a character of the name
    (ISO timestamps), only a Windows drive (``C:``) or a leading slash makes it absolute."""
    if not isinstance(file_name, str) or not file_name:
        raise BoxcasegError(f"image id {image_id!r}: missing file_name")
    rel = file_name.replace("\\", "/")
    norm = posixpath.normpath(rel)
    if rel.startswith("/") or PureWindowsPath(file_name).anchor or norm in (".", "..") or norm.startswith("../"):
        raise BoxcasegError(f"image id {image_id!r}: file_name {file_name!r} must be a relative path inside "
                            "the image folder")
    return out_dir.joinpath(*PurePosixPath(norm).with_suffix(suffix).parts)


class _Plan:
    """Validated view of a COCO dict: images in order, their annotations, class indices."""

    def __init__(self, coco: dict, out_dir: Path, suffix: str):
        if not isinstance(coco, dict) or not isinstance(coco.get("images"), list) \
                or not isinstance(coco.get("annotations"), list):
            raise BoxcasegError("malformed COCO json (needs 'images' and 'annotations' lists)")
        cats = coco.get("categories") or []
        if not isinstance(cats, list) or not all(isinstance(c, dict) and "id" in c for c in cats):
            raise BoxcasegError("malformed COCO json ('categories' must be a list of {id, name})")
        try:
            self.categories = sorted(cats, key=lambda c: c["id"])
        except TypeError:
            kinds = sorted({type(c["id"]).__name__ for c in cats})
            raise BoxcasegError(f"categories: ids of mixed types ({', '.join(kinds)}) cannot be put in class order; "
                                "give every category an integer id") from None
        self.class_of = {c["id"]: k for k, c in enumerate(self.categories)}
        self.images: list[dict] = []
        self.paths: list[Path] = []
        self.anns: dict[Any, list[dict]] = {}
        seen: dict[Path, Any] = {}
        for img in coco["images"]:
            if not isinstance(img, dict) or "id" not in img:
                raise BoxcasegError(f"malformed image record {str(img)[:80]}")
            _image_size_of(img)
            path = _out_path(out_dir, img.get("file_name"), suffix, img["id"])
            if path in seen:
                raise BoxcasegError(f"image ids {seen[path]!r} and {img['id']!r} both map to {path}")
            if img["id"] in self.anns:
                raise BoxcasegError(f"duplicate image id {img['id']!r}")
            seen[path] = img["id"]
            self.images.append(img)
            self.paths.append(path)
            self.anns[img["id"]] = []
        for ann in coco["annotations"]:
            if not isinstance(ann, dict) or "id" not in ann:
                raise BoxcasegError(f"malformed annotation record {str(ann)[:80]}")
            if ann.get("image_id") not in self.anns:
                raise BoxcasegError(f"annotation {ann['id']}: unknown image id {ann.get('image_id')!r}")
            if not ann.get("iscrowd", 0) and ann.get("category_id") not in self.class_of:
                raise BoxcasegError(f"annotation {ann['id']}: category id {ann.get('category_id')!r} is not "
                                    "in 'categories'")
            self.anns[ann["image_id"]].append(ann)


def _masks_of(anns: list[dict], height: int, width: int, skip_flagged: bool, counts: dict):
    """Yield (annotation, mask [H, W] uint8) of the annotations to write; counts the rest."""
    for ann in anns:
        if ann.get("iscrowd", 0):
            counts["skipped_crowd"] += 1
            continue
        if skip_flagged and ann.get("ignore_mask"):
            counts["skipped_flagged"] += 1
            continue
        segm = ann.get("segmentation")
        if segm is None or (isinstance(segm, list) and not segm):
            counts["skipped_empty"] += 1
            continue
        try:
            m = decode(segm, height, width, ann["id"])
        except BoxcasegError:
            raise
        except Exception as e:  # pycocotools raises plain Exceptions on corrupt RLE strings
            raise BoxcasegError(f"annotation {ann['id']}: malformed segmentation ({e})") from e
        if m.shape != (height, width):
            raise BoxcasegError(f"annotation {ann['id']}: mask is {m.shape[1]}x{m.shape[0]}, its image "
                                f"(id {ann['image_id']!r}) is {width}x{height}")
        if not m.any():
            counts["skipped_empty"] += 1
            continue
        yield ann, m


def _counts(n_images: int) -> dict:
    return {"images": n_images, "labels_written": 0, "skipped_empty": 0, "skipped_flagged": 0, "skipped_crowd": 0}


def write_yolo_seg(coco: dict, out_dir: str | os.PathLike, skip_flagged: bool = False,
                   multi_part: str = "join") -> dict:
    """COCO dict with masks -> Ultralytics segmentation labels under ``out_dir``.

    ``out_dir/<file_name stem>.txt`` (subfolders of ``file_name`` kept) for every image,
    one ``class x1 y1 x2 y2 ...`` line per written mask (6 decimals, x / width, y / height,
    pixel-centre coordinates), ``class`` = the index of the category in ``categories``
    sorted by id; ``out_dir/classes.txt`` lists the names in that order (the ``names`` of
    a data.yaml). Returns the summary: images, labels_written, skipped_empty,
    skipped_flagged, skipped_crowd, classes_file.
    """
    out_dir = Path(out_dir)
    plan = _Plan(coco, out_dir, ".txt")
    summary = _counts(len(plan.images))
    for img, path in zip(plan.images, plan.paths):
        h, w = _image_size_of(img)
        lines = []
        for ann, m in _masks_of(plan.anns[img["id"]], h, w, skip_flagged, summary):
            poly = mask_to_polygon(m, multi_part)
            xy = poly.astype(np.float64) / np.array([w, h], dtype=np.float64)
            lines.append(f"{plan.class_of[ann['category_id']]} " + " ".join(f"{v:.6f}" for v in xy.reshape(-1)))
            summary["labels_written"] += 1
        atomic_write_bytes(path, "".join(ln + "\n" for ln in lines).encode("ascii"))
    classes = out_dir / "classes.txt"
    atomic_write_bytes(classes, "".join(f"{c.get('name', c['id'])}\n" for c in plan.categories).encode("utf-8"))
    summary["classes_file"] = str(classes)
    return summary


def write_instance_pngs(coco: dict, out_dir: str | os.PathLike, skip_flagged: bool = False) -> dict:
    """COCO dict with masks -> one instance-id PNG per image under ``out_dir``.

    ``out_dir/<file_name stem>.png``: single channel, 8-bit when the image has < 256
    written instances, else 16-bit; 0 = background, ``k`` = the k-th written annotation of
    the image in json order. Overlaps: the smaller object is on top (box area: the
    annotation's ``bbox``, else the mask's tight box), for equal areas the earlier
    annotation: the proxy merge's order, :func:`boxcaseg.boxes.merge_order`.
    ``out_dir/instances.json``: ``{"images": [{"image_id", "file_name", "png", "instances": [{"value",
    "annotation_id", "category_id", "visible_pixels"}]}], "categories": [...]}``.
    Returns the summary: images, labels_written, skipped_empty, skipped_flagged,
    skipped_crowd, fully_hidden (instances with no visible pixel), mapping_file.
    """
    from PIL import Image

    out_dir = Path(out_dir)
    plan = _Plan(coco, out_dir, ".png")
    summary = _counts(len(plan.images))
    summary["fully_hidden"] = 0
    records = []
    for img, path in zip(plan.images, plan.paths):
        h, w = _image_size_of(img)
        kept = list(_masks_of(plan.anns[img["id"]], h, w, skip_flagged, summary))
        if len(kept) > 65535:
            raise BoxcasegError(f"image id {img['id']!r}: {len(kept)} instances do not fit a 16-bit PNG")
        dtype = np.uint8 if len(kept) < 256 else np.uint16
        canvas = np.zeros((h, w), dtype=dtype)

        def box_area(k: int) -> float:
            ann, m = kept[k]
            b = ann.get("bbox")
            if isinstance(b, (list, tuple)) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b):
                return float(b[2]) * float(b[3])
            x0, y0, x1, y1 = tight_box_xyxy(m)
            return float((x1 - x0) * (y1 - y0))

        # the merge order painted backwards: the winner (smaller box, else listed first) ends on top
        for k in merge_order([box_area(k) for k in range(len(kept))])[::-1]:
            canvas[kept[k][1].astype(bool)] = k + 1
        visible = np.bincount(canvas.reshape(-1), minlength=len(kept) + 1)
        instances = []
        for k, (ann, _) in enumerate(kept):
            instances.append({"value": k + 1, "annotation_id": ann["id"], "category_id": ann["category_id"],
                              "visible_pixels": int(visible[k + 1])})
            summary["fully_hidden"] += int(visible[k + 1] == 0)
        summary["labels_written"] += len(kept)
        buf = io.BytesIO()
        Image.fromarray(canvas).save(buf, format="PNG")
        atomic_write_bytes(path, buf.getvalue())
        records.append({"image_id": img["id"], "file_name": img["file_name"],
                        "png": path.relative_to(out_dir).as_posix(), "instances": instances})
    mapping = out_dir / "instances.json"
    atomic_write_json(mapping, {"description": "pixel value -> annotation of each PNG (0 = background); "
                                               "overlaps: the smaller box on top",
                                "images": records, "categories": plan.categories})
    summary["mapping_file"] = str(mapping)
    return summary


SUFFIX = {"yolo-seg": ".txt", "png": ".png"}  # the per-image file of each folder format


def check_format_names(coco: dict, fmt: str, out: str | os.PathLike) -> int:
    """Before any work: ``coco`` (the input json: the proxy keeps its images, annotations and
    categories) can be written as ``fmt`` into ``out``: every file_name gives a file inside
    ``out``, no two images give one file, every category is listed and the ids can be
    ordered. BoxcasegError (one line) otherwise; returns the number of per-image files."""
    if fmt == "coco":
        return 0
    if fmt not in SUFFIX:
        raise BoxcasegError(f"unknown output format {fmt!r} (choose from {', '.join(FORMATS)})")
    return len(_Plan(coco, Path(out), SUFFIX[fmt]).paths)


def write_outputs(coco: dict, fmt: str, out: str | os.PathLike, skip_flagged: bool = False) -> dict:
    """Write ``coco`` as ``fmt``: "yolo-seg" (``write_yolo_seg``) or "png"
    (``write_instance_pngs``) into the folder ``out``. "coco" writes nothing (the caller
    writes the json itself) and returns ``{"format": "coco"}``."""
    if fmt == "coco":
        return {"format": "coco"}
    if fmt == "yolo-seg":
        return {"format": fmt, **write_yolo_seg(coco, out, skip_flagged)}
    if fmt == "png":
        return {"format": fmt, **write_instance_pngs(coco, out, skip_flagged)}
    raise BoxcasegError(f"unknown output format {fmt!r} (choose from {', '.join(FORMATS)})")
