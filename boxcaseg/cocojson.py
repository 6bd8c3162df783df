"""The one reader of COCO instances jsons (and of COCO results lists).

Training's box dataset, the proxy's task builder, evaluation, Mask R-CNN's dataset,
visualize and the baselines load their json through :func:`load_coco` (or
:func:`parse_coco` for a json already in memory), so they agree on what a valid file is:

- top level: an object with an ``images`` list and an ``annotations`` list (``categories``,
  when present, a list). A results list (a top-level list of annotations, or an object
  without ``images``) is read only with ``images_from``: the ground truth gives its images.
- ids (of images, annotations, categories; an annotation's ``category_id``) are integers
  or strings, kept as given, never cast: ``7`` and ``"7"`` are two different ids. An id
  appears once. An annotation needs an ``id`` (in a results list it may lack one) and the
  ``image_id`` of an image of the json (``skip_orphans``: set aside in ``orphans`` instead).
- an image needs a non-empty ``file_name`` and whole-number ``width`` and ``height`` from 1
  to ``MAX_SIDE`` (at most ``MAX_PIXELS`` in all; json's 1e400 and 10**400 are not numbers);
- an annotation's ``area``, when given, is a finite number >= 0, its ``score`` a finite number;
  its file is found through :mod:`boxcaseg.paths`'s resolver (:meth:`CocoData.paths`).
- ``iscrowd`` is absent, 0, 1, false or true; a crowd annotation is one where it is true
  (:func:`is_crowd`).
- a box is degenerate (:func:`box_problem`) when it is not four finite numbers (strings
  and booleans are not numbers), has a zero or negative width or height, lies entirely
  outside its image, or reaches more than one image size beyond it. What to do with
  one is the consumer's choice: training and Mask R-CNN skip it, the proxy flags it,
  ``--strict`` makes it an error (:func:`degenerate_error`).

Every problem is one BoxcasegError line naming the file and the image or annotation.
This module reads json only: it imports no model, command, proxy or evaluation code.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from boxcaseg.boxes import degenerate_reason, is_finite_number
from boxcaseg.errors import BoxcasegError
from boxcaseg.io import load_json
from boxcaseg.paths import check_image_paths


def is_crowd(ann: dict) -> bool:
    """The crowd rule: ``iscrowd`` true (1); absent counts as 0."""
    return bool(ann.get("iscrowd", 0))


def id_order(i: Any) -> tuple:
    """A sort key for ids that may mix integers and strings (integers first, each kind in order)."""
    return (1, i) if isinstance(i, str) else (0, i)


def int_ids(ids: Iterable) -> dict[Any, int]:
    """Integer stand-ins for ids, for libraries that sort and compare them (pycocotools): each
    id as it is when all are integers, else 1, 2, ... in :func:`id_order` (``7`` and ``"7"``
    get two numbers). Map back with the inverse where ids are written out."""
    uniq = set(ids)
    if all(isinstance(i, int) and not isinstance(i, bool) for i in uniq):
        return {i: i for i in uniq}
    return {i: k for k, i in enumerate(sorted(uniq, key=id_order), start=1)}


def box_problem(bbox: Any, width: int, height: int) -> str | None:
    """The degenerate-box rule (:func:`boxcaseg.boxes.degenerate_reason`): why a COCO ``xywh``
    box on a ``width`` x ``height`` image cannot be used, or None."""
    return degenerate_reason(bbox, width, height)


def degenerate_error(src: Any, ann: dict, image_id: Any, reason: str) -> BoxcasegError:
    """The error for a degenerate box where it must not be skipped (``--strict``)."""
    return BoxcasegError(f"{src}: annotation id {ann.get('id')!r} (image id {image_id!r}): {reason} "
                         f"({ann.get('bbox')!r})")


def check_image_file(path: Path, image_id: Any, decode: bool = False, size: tuple[int, int] | None = None) -> str | None:
    """Why the image file at ``path`` cannot be used (missing, not a regular file, unreadable
    header, a size other than ``size`` (width, height) in either frame or, with ``decode``,
    pixels that do not decode), or None (:func:`boxcaseg.images.check_image`)."""
    from boxcaseg.images import check_image

    return check_image(path, "image", f" (image id {image_id})", decode=decode, size=size)


@dataclass
class CocoData:
    """A validated COCO instances json (or a results list with the GT's images).

    ``images``: id -> image entry (``file_name``, ``width``, ``height``), in file order;
    ``anns``: the annotation / result entries in file order (orphans left out);
    ``categories``: id -> category entry (empty when the json has none);
    ``by_image``: image id -> its annotations; ``orphans``: annotations pointing at an
    unknown image (only with ``skip_orphans``); ``data``: the json object as loaded.
    """

    source: str
    images: dict[Any, dict]
    anns: list[dict]
    categories: dict[Any, dict]
    by_image: dict[Any, list[dict]] = field(default_factory=dict)
    orphans: list[dict] = field(default_factory=list)
    data: dict | None = None

    def __post_init__(self) -> None:
        if not self.by_image:
            by_image: dict[Any, list[dict]] = defaultdict(list)
            for a in self.anns:
                by_image[a["image_id"]].append(a)
            self.by_image = dict(by_image)

    def image_hw(self, image_id: Any, ann_id: Any = None) -> tuple[int, int]:
        img = self.images.get(image_id)
        if img is None:
            raise BoxcasegError(f"{self.source}: annotation {ann_id} refers to unknown image id {image_id}")
        return int(img["height"]), int(img["width"])

    def image_size(self, image_id: Any) -> tuple[int, int]:
        """(width, height) the json records for an image: the frame its boxes are in."""
        img = self.images[image_id]
        return int(img["width"]), int(img["height"])

    def box_problem(self, ann: dict) -> str | None:
        """:func:`box_problem` of the annotation's ``bbox`` on its image."""
        img = self.images[ann["image_id"]]
        return box_problem(ann.get("bbox"), img["width"], img["height"])

    def paths(self, image_dir: str | os.PathLike, ids: Iterable | None = None) -> dict[Any, Path]:
        """``{image id: file}`` for ``ids`` (default: every image), each checked to stay
        inside ``image_dir`` (:func:`boxcaseg.paths.check_image_paths`)."""
        ids = self.images if ids is None else ids
        return check_image_paths(image_dir, ((i, self.images[i].get("file_name")) for i in ids))

    def check_mask(self, ann: dict) -> None:
        """The checks of :meth:`rle` (:func:`boxcaseg.masks.check_segmentation`, the size of its
        image) without rasterising: for every annotation of a json before any work."""
        from boxcaseg.masks import check_segmentation

        h, w = self.image_hw(ann["image_id"], ann.get("id"))
        size = check_segmentation(ann["segmentation"], h, w, ann.get("id"))
        if list(size) != [h, w]:
            raise BoxcasegError(f"{self.source}: annotation {ann.get('id')}: mask size {size[0]}x{size[1]} differs "
                                f"from image {ann['image_id']} size {h}x{w}")

    def rle(self, ann: dict, hw: tuple[int, int] | None = None) -> dict:
        """The annotation's mask as compressed RLE (bytes counts), checked against its image size."""
        from boxcaseg.masks import to_rle

        h, w = hw if hw is not None else self.image_hw(ann["image_id"], ann.get("id"))
        if "segmentation" not in ann:
            raise BoxcasegError(f"{self.source}: annotation {ann.get('id')} has no segmentation")
        rle = to_rle(ann["segmentation"], h, w, ann_id=ann.get("id"))
        size = [int(s) for s in rle["size"]]
        if size != [h, w]:
            raise BoxcasegError(
                f"{self.source}: annotation {ann.get('id')}: mask size {size[0]}x{size[1]} differs from "
                f"image {ann['image_id']} size {h}x{w}"
            )
        return rle


def load_coco(src: str | os.PathLike | dict | list, what: str = "annotation", images_from: CocoData | None = None,
              *, skip_orphans: bool = False, unique_ids: bool = True) -> CocoData:
    """Read and validate a COCO json (a path, or the json object itself) by the module's rules.

    ``what`` names the file in messages (``"<what> file not found"``); ``images_from``:
    the ground truth whose images a results list refers to; ``unique_ids=False``: an
    annotation id may repeat (predictions whose consumer counts repeats, ``evaluate masks``).
    """
    if isinstance(src, (str, os.PathLike)):
        return parse_coco(load_json(src, what), src, images_from, skip_orphans=skip_orphans, unique_ids=unique_ids)
    return parse_coco(src, f"<{what}>", images_from, skip_orphans=skip_orphans, unique_ids=unique_ids)


def _check_id(value: Any, src: str, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise BoxcasegError(f"{src}: {what} id {value!r} is neither an integer nor a string")


MAX_SIDE = 1 << 20  # pixels a recorded width or height may have (a mask of it is rasterised)
MAX_PIXELS = 1 << 32  # and their product


def _int_size(img: dict, key: str, src: str) -> int:
    v = img.get(key)
    if not is_finite_number(v) or v <= 0 or int(v) != v or v > MAX_SIDE:
        raise BoxcasegError(f"{src}: image id {img.get('id')!r} has no valid {key!r} ({repr(v)[:40]}): a whole "
                            f"number from 1 to {MAX_SIDE}")
    return int(v)


def _check_numbers(a: dict, src: str, name: str) -> None:
    """The numbers of an annotation that no other rule checks: ``area`` (absent, null or a
    finite number >= 0) and ``score`` (absent or a finite number); a box's go through the
    box rule (:func:`box_problem`), a mask's through :mod:`boxcaseg.masks`."""
    area = a.get("area")
    if area is not None and (not is_finite_number(area) or area < 0):
        raise BoxcasegError(f"{src}: {name}: area {str(area)[:40]!r} is not a finite number >= 0")
    if "score" in a and not is_finite_number(a["score"]):
        raise BoxcasegError(f"{src}: {name}: score {str(a['score'])[:40]!r} is not a finite number")


def _images(entries: list, src: str) -> dict[Any, dict]:
    images: dict[Any, dict] = {}
    for img in entries:
        if not isinstance(img, dict) or "id" not in img:
            raise BoxcasegError(f"{src}: malformed COCO json (an image entry without 'id': {str(img)[:80]})")
        iid = img["id"]
        _check_id(iid, src, "image")
        if iid in images:
            raise BoxcasegError(f"{src}: image id {iid!r} appears twice")
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            raise BoxcasegError(f"{src}: image id {iid!r} has no 'file_name'")
        if _int_size(img, "width", src) * _int_size(img, "height", src) > MAX_PIXELS:
            raise BoxcasegError(f"{src}: image id {iid!r}: {img['width']}x{img['height']} is more than {MAX_PIXELS} "
                                "pixels")
        images[iid] = img
    return images


def _categories(entries: Any, src: str) -> dict[Any, dict]:
    if entries is None:
        return {}
    if not isinstance(entries, list):
        raise BoxcasegError(f"{src}: malformed COCO json ('categories' is not a list)")
    cats: dict[Any, dict] = {}
    for c in entries:
        if not isinstance(c, dict) or "id" not in c:
            raise BoxcasegError(f"{src}: malformed COCO json (a category entry without 'id': {str(c)[:80]})")
        _check_id(c["id"], src, "category")
        if c["id"] in cats:
            raise BoxcasegError(f"{src}: category id {c['id']!r} appears twice")
        cats[c["id"]] = c
    return cats


def parse_coco(data: Any, source: str | os.PathLike, images_from: CocoData | None = None,
               *, skip_orphans: bool = False, unique_ids: bool = True) -> CocoData:
    """Validate a COCO json already loaded (``source`` names it in messages); see :func:`load_coco`."""
    src = str(source)
    if isinstance(data, list):
        data = {"annotations": data}
    if not isinstance(data, dict):
        raise BoxcasegError(f"{src}: malformed COCO json (top level is not an object)")
    instances = "images" in data  # a results list has no images of its own (and may lack ids)
    if not isinstance(data.get("images", []), list):
        raise BoxcasegError(f"{src}: malformed COCO json (no 'images' list)")
    if not instances and images_from is None:
        raise BoxcasegError(f"{src}: malformed COCO json (no 'images' list; a results list is read with the "
                            "ground-truth json for its images)")
    if not isinstance(data.get("annotations"), list):
        raise BoxcasegError(f"{src}: malformed COCO json (no 'annotations' list)")
    images = _images(data.get("images", []), src)
    if not images and images_from is not None:
        images = images_from.images
    categories = _categories(data.get("categories"), src)
    anns: list[dict] = []
    orphans: list[dict] = []
    seen: set = set()
    for k, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or (instances and "id" not in a):
            raise BoxcasegError(f"{src}: malformed COCO json (an annotation without 'id': {str(a)[:80]})")
        name = f"annotation {a['id']!r}" if "id" in a else f"annotation #{k} (no id)"
        if "id" in a:
            _check_id(a["id"], src, "annotation")
            if unique_ids and a["id"] in seen:
                raise BoxcasegError(f"{src}: annotation id {a['id']!r} appears twice")
            seen.add(a["id"])
        if "image_id" not in a:
            raise BoxcasegError(f"{src}: {name} has no image_id")
        if "category_id" in a:
            _check_id(a["category_id"], f"{src}: {name}", "category")
        _check_numbers(a, src, name)
        crowd = a.get("iscrowd", 0)
        if not (isinstance(crowd, bool) or (isinstance(crowd, int) and crowd in (0, 1))):
            raise BoxcasegError(f"{src}: {name}: iscrowd {crowd!r} is not 0 or 1")
        try:
            known = a["image_id"] in images
        except TypeError:  # an unhashable image_id (a list, an object)
            known = False
        if not known:
            if not skip_orphans:
                raise BoxcasegError(f"{src}: {name} points at unknown image id {a['image_id']!r}")
            orphans.append(a)
            continue
        anns.append(a)
    return CocoData(src, images, anns, categories, orphans=orphans, data=data)


__all__ = ["CocoData", "box_problem", "check_image_file", "degenerate_error", "id_order", "int_ids", "is_crowd",
           "load_coco", "parse_coco"]
