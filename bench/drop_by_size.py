"""Share of masks flagged by the drop rule, by COCO object size: former rule vs current;
and, when the GT has masks, flagged share against the masks' true IoU by box size, without
and with the small-box slack (``--drop-slack``, issue 36).

    python bench/drop_by_size.py --gt GT.json [--proxy PROXY.json] [--drop-thresh 0.95] [--drop-slack 0.5] [--no-remerge]

The drop rule flags a mask (``ignore_mask``) whose agreement, the IoU of its box with
the GT box clipped to the image, is below the threshold. The *former* rule took the
mask's tight box in pixel edges, biased against small boxes with fractional edges; the
*current* one (:mod:`boxcaseg.proxy.merge_drop`) measures the mask's box in the GT's
continuous frame. Both are recomputed here from the masks in the json, so one proxy run
gives before and after without rerunning the model.

- ``--proxy``: a ``boxcaseg proxy`` output json (RLE masks). Written with ``--no-merge``
  (``info.boxcaseg_proxy.merge`` false), its masks are the per-instance ones, and the
  merged masks are recomputed from them with :func:`boxcaseg.proxy.merge_masks`,
  exactly as the default run merges the same model masks: both are reported. Written
  with the default merge: the merged masks only. Without ``--proxy``: the GT json's own
  masks, each cropped to its box window, stand for the proxy (per-instance and merged):
  what each rule does to masks as good as the annotation.
- Size: COCO's small (area < 32^2), medium (< 96^2), large, by the GT annotation's
  ``area`` (in COCO the mask area, what COCOeval uses) when it has a segmentation (its
  mask area computed when ``area`` is missing), else by the box area ``w * h``; the
  count of each basis is printed.
- Counted: every non-crowd annotation of the proxy json (of the GT json without
  ``--proxy``). A degenerate box or an empty mask has agreement 0 under both rules
  (flagged either way), as in the pipeline.
- When the proxy json has ``proxy_agreement``: how many stored values equal the
  recomputed former / current agreement (which code wrote the json).

- By true IoU (``--proxy`` given and the GT with segmentations): for boxes by side
  (``sqrt(w h)`` of the GT box: under 12, 12-20, 20-32, 32-96, 96 px and more), the stored
  masks' IoU with their GT masks, and the share flagged by the current rule with no slack
  and with ``--drop-slack`` px (:func:`boxcaseg.proxy.merge_drop.drop_thresholds`) among
  good masks (IoU >= 0.75) and bad ones (IoU < 0.5): a fair rule flags few good masks at
  every size and keeps flagging the bad ones.

Prints a markdown table per variant (size | n | flagged old % | flagged new %), then the
by-true-IoU table; the last line is JSON. ``--write``: the tables into bench/RESULTS.md, section
"drop_by_size_<the GT json's folder>" (e.g. drop_by_size_coco_val), one per data set.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import add_write_flag, write_section  # noqa: E402

SIZES = (("small", 0.0, 32.0 ** 2), ("medium", 32.0 ** 2, 96.0 ** 2), ("large", 96.0 ** 2, math.inf))
SIDES = (("< 12 px", 0.0, 12.0), ("12-20 px", 12.0, 20.0), ("20-32 px", 20.0, 32.0), ("32-96 px", 32.0, 96.0),
         (">= 96 px", 96.0, math.inf))
GOOD, BAD = 0.75, 0.5  # true IoU of a good / a clearly wrong mask


def _key(ann_id) -> str:
    return f"{type(ann_id).__name__}:{ann_id}"


def _size(gt_ann: dict, h: int, w: int) -> tuple[float, str]:
    """(area, basis): the GT mask area (COCO ``area``) when there is a segmentation, else the box area."""
    from pycocotools import mask as mask_utils

    from boxcaseg.masks import to_rle

    segm = gt_ann.get("segmentation")
    if segm:
        if isinstance(gt_ann.get("area"), (int, float)):
            return float(gt_ann["area"]), "mask"
        return float(mask_utils.area(to_rle(segm, h, w, gt_ann.get("id")))), "mask"
    bbox = gt_ann.get("bbox") or [0, 0, 0, 0]
    return float(bbox[2]) * float(bbox[3]), "box"


def _agreements(windows, masks, gt_xyxy, areas, merge: bool) -> tuple[np.ndarray, np.ndarray]:
    """(former, current) agreement of the masks of one image after (optional) merging."""
    from boxcaseg.masks import tight_box_xyxy
    from boxcaseg.proxy.merge_drop import box_agreement, merge_masks

    merged, new = merge_masks(windows, masks, gt_xyxy, areas, merge=merge)
    old = np.zeros(len(masks))
    for k, m in enumerate(merged):
        tb = None if m is None else tight_box_xyxy(m)
        if tb is not None:
            x0, y0 = windows[k, 0], windows[k, 1]
            old[k] = float(box_agreement(np.array([x0 + tb[0], y0 + tb[1], x0 + tb[2], y0 + tb[3]], float),
                                         gt_xyxy[k], grid=True))
    return old, new


def flag_shares(proxy: dict | None, gt: dict, drop: float = 0.95, remerge: bool = True, slack: float = 0.5) -> dict:
    """The report as a dict: ``variants[name]`` = rows (size, n, flagged_old, flagged_new),
    ``size_basis``, ``stored`` (how the proxy json's masks were made), ``stored_matches``
    (stored ``proxy_agreement`` equal to the former / current recomputed value) and
    ``outside_window`` (masks with pixels outside their box window: cropped away)."""
    from boxcaseg.boxes import degenerate_reason
    from boxcaseg.masks import decode
    from boxcaseg.proxy.geometry import box_window, clipped_box_xyxy

    images = {im["id"]: im for im in gt["images"]}
    gt_by_key = {_key(a["id"]): a for a in gt["annotations"]}
    src = proxy if proxy is not None else gt
    if proxy is None:
        stored = "gt"
    else:
        rec = (proxy.get("info") or {}).get("boxcaseg_proxy") or {}
        stored = {True: "merged", False: "per-instance"}.get(rec.get("merge"), "unknown")
    if stored in ("gt", "per-instance"):
        variants = {"per-instance": False} | ({"merged": True} if remerge else {})
    else:  # the stored masks as they are (already merged, or unknown)
        variants = {"merged" if stored == "merged" else "as stored": False}

    by_img: dict = {}
    for a in src["annotations"]:
        if not a.get("iscrowd", 0):
            by_img.setdefault(a["image_id"], []).append(a)
    sizes: list[float] = []
    basis: dict[str, int] = {}
    old: dict[str, list] = {v: [] for v in variants}
    new: dict[str, list] = {v: [] for v in variants}
    matches = {"old": 0, "new": 0, "n": 0}
    outside = 0
    true_iou: list[float] = []  # the stored mask against the GT mask (nan: no GT mask)
    sides: list[float] = []
    gts_all: list = []
    for image_id in sorted(by_img, key=str):
        im = images[image_id]
        h, w = int(im["height"]), int(im["width"])
        anns = by_img[image_id]
        use, windows, masks, gts, areas = [], [], [], [], []
        for k, a in enumerate(anns):
            g = gt_by_key.get(_key(a["id"]))
            if g is None:
                raise SystemExit(f"annotation id {a['id']!r} of the proxy json is not in the GT json")
            area, b = _size(g, h, w)
            sizes.append(area)
            true_iou.append(_true_iou(a, g, h, w) if proxy is not None else math.nan)
            gts_all.append(clipped_box_xyxy(g["bbox"], w, h) if degenerate_reason(g.get("bbox"), w, h) is None
                           else (0.0, 0.0, 0.0, 0.0))
            sides.append(math.sqrt(max(gts_all[-1][2] - gts_all[-1][0], 0.0) * max(gts_all[-1][3] - gts_all[-1][1], 0.0)))
            basis[b] = basis.get(b, 0) + 1
            if degenerate_reason(a.get("bbox"), w, h) is not None:
                continue
            win = box_window(a["bbox"], w, h)
            full = decode(a["segmentation"], h, w, a["id"])
            x0, y0, x1, y1 = win
            m = np.ascontiguousarray(full[y0:y1, x0:x1])
            outside += int(m.sum() != full.sum())
            use.append(k)
            windows.append(win)
            masks.append(m)
            gts.append(clipped_box_xyxy(a["bbox"], w, h))
            areas.append(float(a["bbox"][2]) * float(a["bbox"][3]))
        res = {}
        if use:
            for name, merge in variants.items():
                res[name] = _agreements(np.array(windows, np.int64), masks, np.array(gts, np.float64),
                                        np.array(areas, np.float64), merge)
        slot = {k: s for s, k in enumerate(use)}
        for k, a in enumerate(anns):
            for name in variants:
                s = slot.get(k)
                old[name].append(0.0 if s is None else float(res[name][0][s]))
                new[name].append(0.0 if s is None else float(res[name][1][s]))
            if proxy is not None and isinstance(a.get("proxy_agreement"), (int, float)):
                first = next(iter(variants))
                matches["n"] += 1
                matches["old"] += abs(a["proxy_agreement"] - old[first][-1]) <= 1e-12
                matches["new"] += abs(a["proxy_agreement"] - new[first][-1]) <= 1e-12

    sizes_a = np.array(sizes, np.float64)
    out_variants = {}
    for name in variants:
        o, n_ = np.array(old[name]) < drop, np.array(new[name]) < drop
        rows = []
        for label, lo, hi in SIZES + (("all", -math.inf, math.inf),):
            sel = (sizes_a >= lo) & (sizes_a < hi)
            rows.append({"size": label, "n": int(sel.sum()), "flagged_old": int(o[sel].sum()),
                         "flagged_new": int(n_[sel].sum())})
        out_variants[name] = rows
    by_iou = None
    ious = np.array(true_iou, np.float64)
    if proxy is not None and np.isfinite(ious).any():
        from boxcaseg.proxy.merge_drop import drop_thresholds

        first = next(iter(variants))
        agr = np.array(new[first], np.float64)
        thr = {"bare": np.full(len(agr), drop), "slack": drop_thresholds(np.array(gts_all, np.float64), drop, slack)}
        side_a = np.array(sides, np.float64)
        by_iou = {"variant": first, "slack": slack, "rows": []}
        for label, lo, hi in SIDES + (("all", -math.inf, math.inf),):
            sel = (side_a >= lo) & (side_a < hi) & np.isfinite(ious)
            good, bad = sel & (ious >= GOOD), sel & (ious < BAD)
            row = {"side": label, "n": int(sel.sum()), "mean_iou": float(ious[sel].mean()) if sel.any() else None,
                   "good": int(good.sum()), "bad": int(bad.sum())}
            for rule, t in thr.items():
                flagged = agr < t
                row[f"flagged_{rule}"] = int((flagged & sel).sum())
                row[f"good_flagged_{rule}"] = int((flagged & good).sum())
                row[f"bad_flagged_{rule}"] = int((flagged & bad).sum())
            by_iou["rows"].append(row)
    return {"drop": drop, "stored": stored, "variants": out_variants, "size_basis": basis,
            "stored_matches": matches if matches["n"] else None, "outside_window": outside, "by_true_iou": by_iou}


def _true_iou(pred: dict, g: dict, h: int, w: int) -> float:
    """IoU of a proxy annotation's mask with its GT annotation's mask (nan: the GT has none)."""
    from pycocotools import mask as mask_utils

    from boxcaseg.masks import to_rle

    if not g.get("segmentation") or not pred.get("segmentation"):
        return math.nan
    p = to_rle(pred["segmentation"], h, w, pred.get("id"))
    t = to_rle(g["segmentation"], h, w, g.get("id"))
    return float(mask_utils.iou([p], [t], [0])[0, 0])


def markdown(res: dict) -> str:
    """One table per variant: size | n | flagged old % | flagged new %."""
    def pct(k, n):
        return f"{100.0 * k / n:.1f}" if n else "-"

    parts = []
    for name, rows in res["variants"].items():
        how = {"gt": "GT masks as the proxy", "per-instance": "stored", "merged": "stored",
               "unknown": "stored"}[res["stored"]]
        if name == "merged" and res["stored"] in ("gt", "per-instance"):
            how += ", merged here"
        lines = [f"{name} masks ({how}), drop at agreement < {res['drop']}:", "",
                 "| size | n | flagged old % | flagged new % |", "|---|---|---|---|"]
        lines += [f"| {r['size']} | {r['n']} | {pct(r['flagged_old'], r['n'])} | {pct(r['flagged_new'], r['n'])} |"
                  for r in rows]
        parts.append("\n".join(lines))
    b = res.get("by_true_iou")
    if b:
        lines = [f"{b['variant']} masks against their GT masks: flagged share by box side (sqrt(w h)), "
                 f"drop at agreement < {res['drop']} with no slack / with {b['slack']:g} px slack per axis; "
                 f"good: IoU >= {GOOD}, bad: IoU < {BAD}:", "",
                 "| box side | n | mean IoU | flagged % | flagged with slack % | good | good flagged % | "
                 "good flagged with slack % | bad | bad flagged % | bad flagged with slack % |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in b["rows"]:
            miou = f"{r['mean_iou']:.3f}" if r["mean_iou"] is not None else "-"
            lines.append(f"| {r['side']} | {r['n']} | {miou} | {pct(r['flagged_bare'], r['n'])} | "
                         f"{pct(r['flagged_slack'], r['n'])} | {r['good']} | {pct(r['good_flagged_bare'], r['good'])} | "
                         f"{pct(r['good_flagged_slack'], r['good'])} | {r['bad']} | {pct(r['bad_flagged_bare'], r['bad'])} | "
                         f"{pct(r['bad_flagged_slack'], r['bad'])} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gt", type=Path, required=True, help="COCO GT json (sizes; the masks without --proxy)")
    ap.add_argument("--proxy", type=Path, default=None, help="boxcaseg proxy output json (default: GT masks)")
    ap.add_argument("--drop-thresh", type=float, default=0.95)
    ap.add_argument("--drop-slack", type=float, default=0.5, help="px per axis (the by-true-IoU table's second rule)")
    ap.add_argument("--no-remerge", action="store_true", help="per-instance json: skip the recomputed merged masks")
    add_write_flag(ap, "drop_by_size_<GT folder>")
    args = ap.parse_args()
    gt = json.loads(args.gt.read_text())
    proxy = json.loads(args.proxy.read_text()) if args.proxy else None
    res = flag_shares(proxy, gt, args.drop_thresh, remerge=not args.no_remerge, slack=args.drop_slack)
    print(f"GT {args.gt}; proxy {args.proxy or '(the GT masks)'}; size basis {res['size_basis']}")
    if res["stored_matches"]:
        m = res["stored_matches"]
        print(f"stored proxy_agreement equal to the former rule: {m['old']} of {m['n']}, to the current rule: {m['new']}")
    if res["outside_window"]:
        print(f"{res['outside_window']} masks had pixels outside their box window (cropped away)")
    print()
    print(markdown(res))
    print()
    print(json.dumps({"gt": str(args.gt), "proxy": str(args.proxy) if args.proxy else None, **res}))
    if args.write:
        name = section_name(args.gt)
        write_section(name, f"## {name}: masks flagged by the drop rule, by COCO size, former vs current rule"
                            f"{'; by true IoU and box side, with and without the slack' if res['by_true_iou'] else ''}\n\n"
                            f"GT `{args.gt.parent.name}/{args.gt.name}`; masks "
                            f"{'`' + args.proxy.name + '`' if args.proxy else 'the GT masks'}; size basis "
                            f"{res['size_basis']}.\n\n{markdown(res)}")


def section_name(gt: Path) -> str:
    """``drop_by_size_`` + the GT json's folder (``coco-val/instances.json`` -> ``drop_by_size_coco_val``)."""
    return "drop_by_size_" + (re.sub(r"\W+", "_", gt.resolve().parent.name).strip("_").lower() or "gt")


if __name__ == "__main__":
    main()
