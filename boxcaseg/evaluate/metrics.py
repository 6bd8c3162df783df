"""The metrics: class-agnostic mask quality given GT boxes, COCO AP, VOC instance AP@k.

Three evaluations, all on COCO-format inputs (read by :mod:`boxcaseg.cocojson`) and all
through the one mask-IoU function :func:`boxcaseg.masks.mask_iou`:

- :func:`mask_quality` -- the class-agnostic stage (paper Tab. 2-4): every non-crowd GT
  annotation is compared with the predicted mask that carries the *same annotation id*
  (a proxy json, or any COCO json); a missing prediction counts as IoU 0. Reports
  mIoU* (mean IoU per category, then the mean over the categories present), the mean
  IoU over instances, IoU@50 / IoU@75 (share of instances with IoU >= 0.5 / 0.75),
  each also split by COCO object size (small < 32^2 <= medium < 96^2 <= large, by the
  GT annotation's ``area``).
- :func:`coco_eval` -- COCOeval (pycocotools) ``segm`` and ``bbox`` on a results list.
- :func:`voc_instance_ap` -- instance AP at mask IoU 0.25 / 0.5 / 0.7 / 0.75 by the
  SDS protocol (Hariharan et al. 2014, used by BBTP and the paper's Tab. 1).

All metric values are fractions in [0, 1] (:mod:`boxcaseg.evaluate.tables` prints them
as percentages). A value that is undefined (no instance in a size bucket) is ``None``.
Ids are compared as the jsons give them (the reader never casts them).
"""

from __future__ import annotations

import contextlib
import io as _io
import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from boxcaseg.boxes import box_numbers_problem
from boxcaseg.cocojson import CocoData, id_order, int_ids, is_crowd, load_coco
from boxcaseg.errors import BoxcasegError
from boxcaseg.masks import area as rle_area
from boxcaseg.masks import UnreadableMask, mask_iou, mask_iou_pairs, to_rle

log = logging.getLogger(__name__)

SMALL_MAX = 32**2   # COCO: small < 32^2
MEDIUM_MAX = 96**2  # COCO: medium < 96^2 <= large
SIZE_NAMES = ("small", "medium", "large")
VOC_THRESHOLDS = (0.25, 0.5, 0.7, 0.75)


# --------------------------------------------------------------------------- mask quality


def _coco_size(area: float) -> str:
    if area < SMALL_MAX:
        return "small"
    if area < MEDIUM_MAX:
        return "medium"
    return "large"


@dataclass
class InstanceIoU:
    """IoU of one GT instance with the predicted mask of the same annotation id."""

    ann_id: Any          # ids as the json gives them
    image_id: Any
    category_id: Any
    area: float          # the GT annotation's area (COCO size split)
    iou: float           # 0 when the prediction is missing
    found: bool          # a prediction with this id and a usable mask exists
    ignored: bool = False  # the prediction is flagged ``ignore_mask`` (proxy json)
    problem: str | None = None  # a prediction exists but scores 0: NO_MASK or UNREADABLE_MASK


NO_MASK = "no segmentation"
UNREADABLE_MASK = "unreadable RLE"


def _load_pair(gt, pred) -> tuple[CocoData, CocoData]:
    gt = gt if isinstance(gt, CocoData) else load_coco(gt, "ground-truth")
    if not isinstance(pred, CocoData):  # a repeated id is counted (match_predictions), not refused
        pred = load_coco(pred, "prediction", images_from=gt, unique_ids=False)
    return gt, pred


def match_predictions(gt: CocoData, pred: CocoData, strict: bool = False) -> tuple[dict[Any, dict], dict[str, int]]:
    """The predictions of ``pred`` by annotation id, and what did not match.

    Returns ``({id: prediction}, {"unmatched_predictions", "duplicate_predictions",
    "crowd_predictions"})``: predictions whose id is no GT annotation's (a proxy json of
    the whole set scored on a few checked images has many), later predictions repeating
    an id (the first in file order is the one scored; ``strict``: an error) and
    predictions for a crowd GT annotation (not scored). Predictions none of which has the
    id of a scored GT annotation are an error: the ids come from another numbering.
    """
    by_id: dict[Any, dict] = {}
    duplicates = 0
    for a in pred.anns:
        if "id" not in a:
            raise BoxcasegError(f"{pred.source}: a prediction on image {a.get('image_id')} has no annotation id "
                                "(mask quality matches predictions to GT by annotation id)")
        if a["id"] in by_id:
            if strict:
                raise BoxcasegError(f"{pred.source}: annotation id {a['id']!r} appears twice (--strict; without it "
                                    "the first is scored and the others counted)")
            duplicates += 1
            continue
        by_id[a["id"]] = a
    gt_ids = {a["id"]: is_crowd(a) for a in gt.anns}
    matched = sum(1 for i in by_id if i in gt_ids and not gt_ids[i])
    counts = {"unmatched_predictions": sum(1 for i in by_id if i not in gt_ids),
              "duplicate_predictions": duplicates,
              "crowd_predictions": sum(1 for i in by_id if gt_ids.get(i, False))}
    if by_id and not matched and any(not c for c in gt_ids.values()):
        example = next(iter(by_id))
        raise BoxcasegError(f"{pred.source}: none of its {len(by_id)} prediction id(s) (e.g. {example!r}) is the id of "
                            f"a non-crowd annotation of {gt.source} (mask quality matches predictions to GT by "
                            "annotation id)")
    return by_id, counts


def instance_ious(gt: CocoData | str | os.PathLike, pred: CocoData | str | os.PathLike | list,
                  strict: bool = False) -> list[InstanceIoU]:
    """IoU of every non-crowd GT annotation with the prediction of the same annotation id.

    ``pred`` may be a full COCO instances json (a proxy json) or a list of annotations
    carrying ``id``; a prediction matches the GT annotation whose id equals its own (as
    given: ``7`` and ``"7"`` differ). Image sizes come from the GT json. A prediction
    without a segmentation, or whose RLE counts do not decode to a mask of its size
    (:class:`boxcaseg.masks.UnreadableMask`), scores 0 and says so in ``problem``
    (``strict``: a BoxcasegError naming it). Any other malformed mask (a polygon with
    NaN, an RLE size that is not two integers) is a BoxcasegError; so are predictions
    none of which matches (:func:`match_predictions`, which also says what a repeated
    id means).
    """
    gt, pred = _load_pair(gt, pred)
    by_id, _ = match_predictions(gt, pred, strict)

    out: list[InstanceIoU] = []
    for image_id, anns in gt.by_image.items():
        anns = [a for a in anns if not is_crowd(a)]
        if not anns:
            continue
        hw = gt.image_hw(image_id, anns[0].get("id"))
        gt_rles, pred_rles, slots = [], [], []
        for a in anns:
            p = by_id.get(a["id"])
            problem = None
            if p is not None and p["image_id"] != image_id:
                raise BoxcasegError(f"{pred.source}: annotation {a['id']} is on image {p['image_id']}, "
                                    f"the GT on image {image_id}")
            rle = None
            if p is not None and p.get("segmentation") is None:
                problem = NO_MASK  # an annotation kept without a mask scores 0
            elif p is not None:
                try:
                    rle = pred.rle(p, hw)
                except UnreadableMask:
                    problem = UNREADABLE_MASK
            if problem is not None and strict:
                raise BoxcasegError(f"{pred.source}: annotation {a['id']} (image id {image_id}): the prediction has "
                                    f"{'no segmentation' if problem == NO_MASK else 'RLE counts that do not decode to its mask size'}"
                                    " (--strict)")
            if rle is not None:
                gt_rles.append(gt.rle(a, hw))
                pred_rles.append(rle)
                slots.append(len(out))
            area = float(a["area"]) if a.get("area") is not None else float(rle_area([gt.rle(a, hw)])[0])
            out.append(InstanceIoU(a["id"], image_id, a.get("category_id", 0), area, 0.0,
                                   rle is not None, bool(p.get("ignore_mask", False)) if rle is not None else False,
                                   problem))
        if slots:
            ious = mask_iou_pairs(gt_rles, pred_rles)
            for slot, v in zip(slots, ious):
                out[slot].iou = float(v)
    return out


def summarize_ious(records: Sequence[InstanceIoU]) -> dict:
    """``{miou_star, miou, iou50, iou75, n}`` over ``records`` (values None when n == 0).

    mIoU*: the mean IoU of each category present in ``records``, then the mean over
    those categories (categories with no instance do not count).
    """
    n = len(records)
    if n == 0:
        return {"miou_star": None, "miou": None, "iou50": None, "iou75": None, "n": 0}
    ious = np.array([r.iou for r in records], dtype=np.float64)
    per_cat: dict[int, list[float]] = defaultdict(list)
    for r in records:
        per_cat[r.category_id].append(r.iou)
    return {
        "miou_star": float(np.mean([np.mean(v) for v in per_cat.values()])),
        "miou": float(ious.mean()),
        "iou50": float((ious >= 0.5).mean()),
        "iou75": float((ious >= 0.75).mean()),
        "n": n,
    }


def mask_quality(gt: CocoData | str | os.PathLike, pred: CocoData | str | os.PathLike | list,
                 strict: bool = False) -> dict:
    """Class-agnostic mask quality given GT boxes; see the module docstring.

    Returns ``{miou_star, miou, iou50, iou75, n, missing, without_mask, unreadable_mask,
    small: {...}, medium: {...}, large: {...}}`` where each size object has the first
    five keys. ``missing``: GT instances scored 0 for want of a usable prediction, among
    them ``without_mask`` (the prediction has no segmentation) and ``unreadable_mask``
    (its RLE does not decode); ``strict`` makes those two an error (:func:`instance_ious`).
    Also ``unmatched_predictions``, ``duplicate_predictions`` and ``crowd_predictions``:
    predictions not scored (:func:`match_predictions`).
    """
    gt, pred = _load_pair(gt, pred)
    _, counts = match_predictions(gt, pred, strict)
    records = instance_ious(gt, pred, strict)
    result = summarize_ious(records)
    result["missing"] = sum(1 for r in records if not r.found)
    result["without_mask"] = sum(1 for r in records if r.problem == NO_MASK)
    result["unreadable_mask"] = sum(1 for r in records if r.problem == UNREADABLE_MASK)
    for size in SIZE_NAMES:
        result[size] = summarize_ious([r for r in records if _coco_size(r.area) == size])
    result.update(counts)
    return result


# --------------------------------------------------------------------------- COCO AP

COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _results_list(pred: CocoData, gt: CocoData) -> list[dict]:
    """Normalise detections: RLE (str counts) masks at the GT image size, a score, known ids."""
    out = []
    for a in pred.anns:
        image_id = a["image_id"]
        if image_id not in gt.images:
            raise BoxcasegError(f"{pred.source}: detection on image id {image_id}, which the GT json lacks")
        cat = a.get("category_id", -1)
        if gt.categories and cat not in gt.categories:
            raise BoxcasegError(f"{pred.source}: detection on image {image_id} has category_id {cat}, "
                                "which the GT json lacks")
        score = a.get("score", 1.0)
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not np.isfinite(score):
            raise BoxcasegError(f"{pred.source}: {_name(a)} on image {image_id}: score {score!r} is not a finite number")
        r = {"image_id": image_id, "category_id": cat, "score": float(score)}
        if "segmentation" in a and a["segmentation"] is not None:
            rle = pred.rle(a, gt.image_hw(image_id, a.get("id")))
            r["segmentation"] = {"size": [int(s) for s in rle["size"]],
                                 "counts": rle["counts"].decode("ascii") if isinstance(rle["counts"], bytes)
                                 else rle["counts"]}
        if a.get("bbox") is not None:
            problem = box_numbers_problem(a["bbox"])
            if problem is not None:
                raise BoxcasegError(f"{pred.source}: {_name(a)} on image {image_id}: {problem} ({a['bbox']!r:.60})")
            r["bbox"] = [float(v) for v in a["bbox"]]
        out.append(r)
    return out


def _name(a: dict) -> str:
    return f"annotation {a['id']!r}" if "id" in a else "a detection"


def _id_maps(gt: CocoData, results: list[dict]) -> dict[str, dict]:
    """pycocotools sorts ids: integer stand-ins (:func:`~boxcaseg.cocojson.int_ids`) for the GT's
    image, category and annotation ids, the detections' categories included."""
    cats = list(gt.categories) + [a["category_id"] for a in gt.anns] + [r["category_id"] for r in results]
    return {"image": int_ids(gt.images), "category": int_ids(cats), "ann": int_ids(a["id"] for a in gt.anns)}


def _coco_api(gt: CocoData, maps: dict[str, dict]):
    from pycocotools.coco import COCO

    anns = []
    for orig in gt.anns:
        a = dict(orig)
        a.setdefault("iscrowd", 0)
        problem = box_numbers_problem(a.get("bbox")) if "bbox" in a or "segmentation" not in a else None
        if problem is not None:
            raise BoxcasegError(f"{gt.source}: annotation {a.get('id')!r}: {problem} ({a.get('bbox')!r:.60})")
        if a.get("segmentation") is not None:
            gt.check_mask(orig)  # pycocotools rasterises it: the mask checks first
        if a.get("area") is None:
            a["area"] = float(rle_area([gt.rle(orig)])[0]) if "segmentation" in a else float(a["bbox"][2] * a["bbox"][3])
        a.update(id=maps["ann"][a["id"]], image_id=maps["image"][a["image_id"]],
                 category_id=maps["category"][a["category_id"]])
        anns.append(a)
    api = COCO()
    api.dataset = {"images": [dict(img, id=maps["image"][i]) for i, img in gt.images.items()], "annotations": anns,
                   "categories": [dict(c, id=maps["category"][i]) for i, c in gt.categories.items()]
                   or [{"id": c} for c in sorted({a["category_id"] for a in anns})]}
    with contextlib.redirect_stdout(_io.StringIO()):
        api.createIndex()
    return api


def coco_eval(gt: CocoData | str | os.PathLike, pred: CocoData | str | os.PathLike | list,
              iou_types: Iterable[str] = ("segm", "bbox")) -> dict[str, dict[str, float] | None]:
    """COCOeval on a results list (or a COCO json whose annotations carry ``score``).

    Returns ``{iou_type: {AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl}}``;
    an iou type the results cannot be scored on (``segm`` without masks) maps to None.
    Empty results score 0 everywhere. Masks are evaluated with their own area and tight
    box (the segm pass sees no ``bbox``), boxes with theirs (the bbox pass sees no mask).
    """
    from pycocotools.cocoeval import COCOeval

    gt = gt if isinstance(gt, CocoData) else load_coco(gt, "ground-truth")
    if not isinstance(pred, CocoData):
        pred = load_coco(pred, "results", images_from=gt)
    results = _results_list(pred, gt)
    maps = _id_maps(gt, results)
    results = [dict(r, image_id=maps["image"][r["image_id"]], category_id=maps["category"][r["category_id"]])
               for r in results]
    api = _coco_api(gt, maps)
    out: dict[str, dict[str, float] | None] = {}
    for iou_type in iou_types:
        if iou_type not in ("segm", "bbox"):
            raise BoxcasegError(f"unknown COCO iou type {iou_type!r} (segm, bbox)")
        key = "segmentation" if iou_type == "segm" else "bbox"
        if results and not all(key in r for r in results):
            if iou_type == "bbox" and all("segmentation" in r for r in results):
                pass  # boxes come from the masks
            else:
                out[iou_type] = None
                continue
        if not results:
            out[iou_type] = {k: 0.0 for k in COCO_STAT_NAMES}
            continue
        if iou_type == "segm":
            dets = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
        else:
            dets = []
            for r in results:
                d = {k: v for k, v in r.items() if k != "segmentation"}
                if "bbox" not in d:
                    from pycocotools import mask as mask_utils

                    seg = dict(r["segmentation"], counts=r["segmentation"]["counts"].encode("ascii"))
                    d["bbox"] = [float(v) for v in mask_utils.toBbox(seg)]
                dets.append(d)
        with contextlib.redirect_stdout(_io.StringIO()):
            dt = api.loadRes(dets)
            ev = COCOeval(api, dt, iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        # COCOeval reports -1 where nothing can be measured (no GT in a size range)
        out[iou_type] = {k: float(v) for k, v in zip(COCO_STAT_NAMES, ev.stats)}
    return out


# --------------------------------------------------------------------------- VOC instance AP


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """All-point interpolated AP (VOC 2010+): area under the monotone precision envelope.

    ``recall``, ``precision``: [K] cumulative values along the score-sorted detections.
    """
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    idx = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


def _sds_labels(scores: np.ndarray, ious: np.ndarray, crowd_ious: np.ndarray, thr: float) -> np.ndarray:
    """TP (1) / FP (0) / ignored (-1) labels of one image's detections of one class.

    ``scores``: [D]; ``ious``: [G, D] with the image's non-crowd GT of the class;
    ``crowd_ious``: [C, D] with its crowd regions of the class.

    SDS: each detection is assigned to the GT it overlaps most; going down the
    score-ranked list, it is a true positive when that overlap reaches ``thr`` and its
    GT is not covered yet (the GT becomes covered), otherwise a false positive. Crowd
    regions (VOC's "difficult") are not counted as GT; a detection that is not a true
    positive but overlaps a crowd region by ``thr`` is ignored instead of counted false.
    """
    labels = np.zeros(scores.shape[0], dtype=np.int8)
    if ious.shape[0]:
        assigned = ious.argmax(axis=0)
        best = ious.max(axis=0)
    else:
        assigned = np.zeros(scores.shape[0], dtype=np.int64)
        best = np.zeros(scores.shape[0])
    covered = np.zeros(ious.shape[0], dtype=bool)
    for i in np.argsort(-scores, kind="stable"):
        if ious.shape[0] and best[i] >= thr and not covered[assigned[i]]:
            covered[assigned[i]] = True
            labels[i] = 1
        elif crowd_ious.shape[0] and crowd_ious[:, i].max() >= thr:
            labels[i] = -1
    return labels


def voc_instance_ap(gt: CocoData | str | os.PathLike, pred: CocoData | str | os.PathLike | list,
                    thresholds: Sequence[float] = VOC_THRESHOLDS) -> dict:
    """Instance AP at mask IoU ``thresholds`` by the SDS protocol, on COCO-format inputs.

    Per class: all detections of the class sorted by score, matched per image (see
    :func:`_sds_labels`), precision/recall along the ranked list, all-point interpolated
    AP; then the mean over the classes that have at least one non-crowd GT instance (a
    class with GT but no detections has AP 0). Returns ``{"ap25": .., "ap50": ..,
    "ap70": .., "ap75": .., "per_class": {category_id: {"ap25": .., ...}}, "n_gt": ..,
    "n_det": ..}`` (keys ``ap{round(100*t)}``).
    """
    gt = gt if isinstance(gt, CocoData) else load_coco(gt, "ground-truth")
    if not isinstance(pred, CocoData):
        pred = load_coco(pred, "results", images_from=gt)
    results = _results_list(pred, gt)
    if any("segmentation" not in r for r in results):
        raise BoxcasegError(f"{pred.source}: VOC instance AP needs a mask (segmentation) on every detection")
    keys = [f"ap{round(100 * t)}" for t in thresholds]

    gt_by: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for a in gt.anns:
        gt_by[(a["image_id"], a["category_id"])].append(a)
    det_by: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for r in results:
        det_by[(r["image_id"], r["category_id"])].append(r)

    classes = sorted({c for (_, c), anns in gt_by.items() if any(not is_crowd(a) for a in anns)}, key=id_order)
    npos = defaultdict(int)
    for (_, c), anns in gt_by.items():
        npos[c] += sum(1 for a in anns if not is_crowd(a))

    # per class: (score, label) pairs for every threshold
    scored: dict[int, list[tuple[np.ndarray, list[np.ndarray]]]] = defaultdict(list)
    for (image_id, c), dets in det_by.items():
        hw = gt.image_hw(image_id)
        anns = gt_by.get((image_id, c), [])
        normal = [gt.rle(a, hw) for a in anns if not is_crowd(a)]
        crowd = [gt.rle(a, hw) for a in anns if is_crowd(a)]
        det_rles = [to_rle(d["segmentation"], *hw) for d in dets]
        ious = np.asarray(mask_iou(normal, det_rles)).reshape(len(normal), len(dets))
        crowd_ious = np.asarray(mask_iou(crowd, det_rles)).reshape(len(crowd), len(dets))
        scores = np.array([d["score"] for d in dets], dtype=np.float64)
        scored[c].append((scores, [_sds_labels(scores, ious, crowd_ious, t) for t in thresholds]))

    per_class: dict[int, dict[str, float]] = {}
    for c in classes:
        per_class[c] = {}
        chunks = scored.get(c, [])
        for ti, key in enumerate(keys):
            if not chunks:
                per_class[c][key] = 0.0
                continue
            scores = np.concatenate([s for s, _ in chunks])
            labels = np.concatenate([lab[ti] for _, lab in chunks])
            keep = labels >= 0
            scores, labels = scores[keep], labels[keep]
            order = np.argsort(-scores, kind="stable")
            tp = np.cumsum(labels[order] == 1)
            fp = np.cumsum(labels[order] == 0)
            rec = tp / npos[c]
            prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
            per_class[c][key] = voc_ap(rec, prec) if len(order) else 0.0
    out: dict[str, Any] = {}
    for key in keys:
        out[key] = float(np.mean([per_class[c][key] for c in classes])) if classes else None
    out["per_class"] = per_class
    out["n_gt"] = int(sum(npos[c] for c in classes))
    out["n_det"] = len(results)
    return out
