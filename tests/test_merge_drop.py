"""Merge (smaller object better), drop (proxy box agreement), RLE from windows, map -> mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from boxcaseg.masks import decode, empty_rle, encode, mask_iou, tight_box_xyxy
from boxcaseg.infer_settings import InferSettings
from boxcaseg.proxy import encode_window, masks_from_probs, merge_masks
from boxcaseg.proxy.geometry import box_window, clipped_box_xyxy
from boxcaseg.proxy.merge_drop import box_agreement
from boxcaseg.proxy.postprocess import resize_bilinear


def paste(h, w, window, m):
    full = np.zeros((h, w), np.uint8)
    x0, y0, x1, y1 = window
    full[y0:y1, x0:x1] = m
    return full


def agreement_reference(mask, x0, y0, gt):
    """The drop rule in plain Python float64 (loops), independent of the kernel: the mask's
    first/last column c0/c1 (row r0/r1, image coordinates) admit GT edges in
    [c0 - 0.5, c0 + 1] / [c1, c1 + 1.5]; the mask's box is the GT's clamped into those;
    agreement = its IoU with the GT box; an empty mask: 0."""
    h, w = len(mask), len(mask[0]) if len(mask) else 0
    cols = [c for c in range(w) if any(mask[r][c] for r in range(h))]
    rows = [r for r in range(h) if any(mask[r][c] for c in range(w))]
    if not cols:
        return 0.0
    c0, c1 = x0 + min(cols), x0 + max(cols)
    r0, r1 = y0 + min(rows), y0 + max(rows)
    g0, g1, g2, g3 = (float(v) for v in gt)

    def clamp(v, lo, hi):
        return lo if v < lo else (hi if v > hi else v)

    e0, e2 = clamp(g0, c0 - 0.5, c0 + 1.0), clamp(g2, float(c1), c1 + 1.5)
    e1, e3 = clamp(g1, r0 - 0.5, r0 + 1.0), clamp(g3, float(r1), r1 + 1.5)
    iw, ih = min(e2, g2) - max(e0, g0), min(e3, g3) - max(e1, g1)
    inter = iw * ih if iw > 0 and ih > 0 else 0.0
    union = (e2 - e0) * (e3 - e1) + (g2 - g0) * (g3 - g1) - inter
    return inter / union if union > 0 else 0.0


def label_map_reference(h, w, windows, masks, gt, areas):
    """The published way: full-image label map painted in descending area (ties: first listed wins)."""
    label = np.zeros((h, w), np.int64)
    for k in np.argsort(areas, kind="stable")[::-1]:
        if masks[k] is not None:
            label = np.where(paste(h, w, windows[k], masks[k]) == 1, k + 1, label)
    out = []
    for k in range(len(areas)):
        binary = (label == k + 1).astype(np.uint8)
        out.append((binary, agreement_reference(binary.tolist(), 0, 0, gt[k])))
    return out


def test_merge_hand_made_overlaps_expected_pixels():
    h, w = 10, 12
    # A: big box, full mask; B: medium box overlapping A, full; C: small box inside both, only its left column
    windows = np.array([[0, 0, 7, 7], [4, 3, 10, 9], [5, 4, 7, 6]])
    masks = [np.ones((7, 7), np.uint8), np.ones((6, 6), np.uint8), np.array([[1, 0], [1, 0]], np.uint8)]
    gt = windows.astype(float)
    areas = np.array([49.0, 36.0, 4.0])
    merged, agreement = merge_masks(windows, masks, gt, areas)
    full = [paste(h, w, windows[k], merged[k]) for k in range(3)]
    exp_c = np.zeros((h, w), np.uint8)
    exp_c[4:6, 5] = 1
    exp_b = np.zeros((h, w), np.uint8)
    exp_b[3:9, 4:10] = 1
    exp_b[4:6, 5] = 0  # C's pixels
    exp_a = np.zeros((h, w), np.uint8)
    exp_a[0:7, 0:7] = 1
    exp_a[3:7, 4:7] = 0  # B's window (B claims it all)
    np.testing.assert_array_equal(full[2], exp_c)
    np.testing.assert_array_equal(full[1], exp_b)
    np.testing.assert_array_equal(full[0], exp_a)
    # every pixel has at most one owner, and the union is unchanged
    assert (sum(full) <= 1).all()
    assert (sum(full) > 0).sum() == (sum(paste(h, w, windows[k], masks[k]) for k in range(3)) > 0).sum()
    # agreement: A and B keep their full extent; C has column 5 of the 2x2 GT box [5, 7) x [4, 6):
    # its right edge may lie anywhere in [5, 6.5] (touched pixels up to 6, centres up to 6.5)
    assert agreement[0] == 1.0 and agreement[1] == 1.0
    assert agreement[2] == pytest.approx(1.5 * 2 / 4)


def test_merge_ties_go_to_the_first_listed_and_missing_masks_take_nothing():
    windows = np.array([[0, 0, 4, 4], [2, 0, 6, 4], [0, 0, 6, 4]])
    masks = [np.ones((4, 4), np.uint8), np.ones((4, 4), np.uint8), None]
    areas = np.array([16.0, 16.0, 1.0])  # the smallest box has no mask: it takes no pixel
    merged, agreement = merge_masks(windows, masks, windows.astype(float), areas)
    assert merged[2] is None and agreement[2] == 0.0
    assert merged[0].all()  # first listed wins the tie
    np.testing.assert_array_equal(merged[1][:, :2], 0)
    assert merged[1][:, 2:].all()
    # columns 4-5 of the GT box [2, 6): the left edge may reach 3.5 (centre convention), not 2
    assert agreement[1] == pytest.approx(2.5 * 4 / 16)


def test_drop_empty_mask_has_zero_agreement():
    merged, agreement = merge_masks(np.array([[1, 1, 4, 4]]), [np.zeros((3, 3), np.uint8)],
                                       np.array([[1.0, 1.0, 4.0, 4.0]]), np.array([9.0]))
    assert not merged[0].any() and agreement[0] == 0.0


def test_merge_drop_equals_label_map_reference_on_random_images():
    rng = np.random.default_rng(0)
    for _ in range(60):
        h, w = rng.integers(5, 40, 2)
        n = int(rng.integers(1, 7))
        windows, masks, gt, areas = [], [], [], []
        for k in range(n):
            x0, y0 = rng.integers(0, w), rng.integers(0, h)
            x1, y1 = rng.integers(x0 + 1, w + 1), rng.integers(y0 + 1, h + 1)
            windows.append([x0, y0, x1, y1])
            masks.append((rng.random((y1 - y0, x1 - x0)) < rng.uniform(0.2, 1.0)).astype(np.uint8)
                         if rng.random() > 0.1 else None)
            bx = [x0 + rng.uniform(0, 0.9), y0 + rng.uniform(0, 0.9), x1 - rng.uniform(0, 0.9), y1 - rng.uniform(0, 0.9)]
            gt.append(bx)
            areas.append(float(rng.choice([4.0, 9.0, (bx[2] - bx[0]) * (bx[3] - bx[1])])))  # ties happen
        windows, gt, areas = np.array(windows), np.array(gt), np.array(areas)
        merged, agreement = merge_masks(windows, masks, gt, areas)
        ref = label_map_reference(h, w, windows, masks, gt, areas)
        for k in range(n):
            got = np.zeros((h, w), np.uint8) if merged[k] is None else paste(h, w, windows[k], merged[k])
            np.testing.assert_array_equal(got, ref[k][0])
            assert agreement[k] == pytest.approx(ref[k][1], abs=1e-12)


def test_rle_from_windows_is_pycocotools_encode_of_the_pasted_mask():
    """The one windowed encoder against pycocotools' ``mask.encode`` of the full mask, on random
    windows (full-height ones join runs across columns; empty, full and one-pixel windows)."""
    rng = np.random.default_rng(1)
    for t in range(400):
        h, w = (int(v) for v in rng.integers(1, 30, 2))
        wh = h if t % 3 == 0 else int(rng.integers(1, h + 1))  # full-height windows join columns
        ww = int(rng.integers(1, w + 1))
        if t % 11 == 0:
            wh, ww = (0, ww) if t % 2 else (wh, 0)  # an empty window
        y0, x0 = int(rng.integers(0, h - wh + 1)), int(rng.integers(0, w - ww + 1))
        win = (rng.random((wh, ww)) < rng.random()).astype(np.uint8)
        if t % 7 == 0:
            win[:] = 1
        full = paste(h, w, (x0, y0, x0 + ww, y0 + wh), win)
        ref = mask_utils.encode(np.asfortranarray(full))
        rle = encode_window(win.astype(bool) if t % 5 == 0 else win, x0, y0, h, w)
        assert isinstance(rle["counts"], str) and rle["size"] == [h, w]
        assert rle == {"size": [h, w], "counts": ref["counts"].decode("ascii")}, t
        np.testing.assert_array_equal(decode(rle, h, w), full)
        assert mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode()}) == full.sum()
    assert mask_iou(decode(encode(full), h, w), full) in (0.0, 1.0)
    for h, w in ((1, 1), (7, 3), (40, 25)):
        assert empty_rle(h, w) == encode(np.zeros((h, w), np.uint8))
    for x0, y0 in ((-1, 0), (0, -1), (3, 0), (0, 5)):  # a window that does not fit the image
        with pytest.raises(ValueError, match="not inside"):
            encode_window(np.ones((3, 3), np.uint8), x0, y0, 7, 5)


def test_resize_matches_torch_bilinear():
    p = np.random.default_rng(2).random((16, 16)).astype(np.float32)
    for h, w in [(7, 13), (64, 64), (150, 33), (1, 1)]:
        ref = F.interpolate(torch.from_numpy(p)[None, None].double(), size=(h, w), mode="bilinear", align_corners=False)
        np.testing.assert_allclose(resize_bilinear(p, h, w, 64.0, 4.0), ref[0, 0].numpy(), atol=1e-12)


def test_masks_from_probs_threshold_relative_and_confined_to_box():
    s = 16
    prob = np.zeros((1, 1, s, s), np.float32)
    prob[..., : s // 2] = 0.3  # left half below 0.5, right half just above
    prob[..., s // 2:] = 0.45
    crop = np.array([[0, 0, 40, 20]])  # context crop, larger than the box
    box = np.array([[10, 5, 30, 15]])
    absolute = masks_from_probs(prob, crop, box, InferSettings(64, threshold=0.5), stride=4)[0]
    assert absolute.shape == (10, 20) and not absolute.any()
    relative = masks_from_probs(prob, crop, box, InferSettings(64, threshold=0.5), stride=4, relative=True)[0]
    # the crop's right half (x >= 20) is the maximum: foreground there and only inside the box
    assert relative[:, 10:].all() and not relative[:, :9].any()
    const = masks_from_probs(np.full((1, 1, s, s), 0.2, np.float32), box, box, InferSettings(64, threshold=0.5),
                             stride=4, relative=True)[0]
    assert const.all()  # relative rule on a constant map: always a foreground


def test_masks_from_probs_ellipse_prior_matches_loop():
    """The shape prior against a float64 loop: bilinear sample (torch), blend, threshold."""
    import math

    rng = np.random.default_rng(11)
    s, size = 16, 64
    n = 5
    probs = rng.random((n, 1, s, s)).astype(np.float32)
    boxes, crops, gts = [], [], []
    for _ in range(n):
        x0, y0 = rng.integers(0, 30, 2)
        w, h = rng.integers(3, 40, 2)
        gx0, gy0 = x0 + rng.random() * 0.9, y0 + rng.random() * 0.9
        gt = (gx0, gy0, gx0 + w - 1 + rng.random(), gy0 + h - 1 + rng.random())
        box = (math.floor(gt[0]), math.floor(gt[1]), math.ceil(gt[2]), math.ceil(gt[3]))
        pad = rng.integers(0, 6)
        boxes.append(box)
        crops.append((box[0] - pad, box[1] - pad, box[2] + pad, box[3] + 2 * pad))
        gts.append(gt)
    boxes, crops, gts = np.array(boxes), np.array(crops), np.array(gts)
    for w_prior, thr in [(0.0, 0.5), (0.3, 0.45), (1.0, 0.5)]:
        got = masks_from_probs(probs, crops, boxes, InferSettings(size, threshold=thr, prior_weight=w_prior), stride=4,
                               gt_xyxy=gts)
        for i in range(n):
            cx0, cy0, cx1, cy1 = crops[i]
            up = F.interpolate(torch.from_numpy(probs[i:i + 1]).double(), size=(int(cy1 - cy0), int(cx1 - cx0)),
                               mode="bilinear", align_corners=False)[0, 0].numpy()
            bx0, by0, bx1, by1 = boxes[i]
            g = gts[i]
            ref = np.zeros((by1 - by0, bx1 - bx0), np.uint8)
            for r in range(by1 - by0):
                for c in range(bx1 - bx0):
                    v = up[by0 - cy0 + r, bx0 - cx0 + c]
                    dx = (bx0 + c + 0.5 - (g[0] + g[2]) / 2) / ((g[2] - g[0]) / 2)
                    dy = (by0 + r + 0.5 - (g[1] + g[3]) / 2) / ((g[3] - g[1]) / 2)
                    e = 1.0 / (1.0 + math.exp(-4.0 * (1.0 - dx * dx - dy * dy)))
                    ref[r, c] = (1 - w_prior) * v + w_prior * e > thr
            # values within float32 rounding of the threshold may differ
            assert (got[i] != ref).sum() <= max(1, ref.size // 500), (w_prior, i)
            if w_prior == 1.0:  # the prior alone: the inscribed ellipse (rim at 0.5)
                assert np.array_equal(got[i], ref)
    with pytest.raises(ValueError, match="gt_xyxy"):
        masks_from_probs(probs, crops, boxes, InferSettings(size, threshold=0.5, prior_weight=0.3), stride=4)


def test_merge_off_keeps_masks_and_scores_each_alone():
    rng = np.random.default_rng(1)
    for _ in range(30):
        h, w = rng.integers(5, 30, 2)
        n = int(rng.integers(1, 6))
        windows, masks, gt = [], [], []
        for _k in range(n):
            x0, y0 = rng.integers(0, w), rng.integers(0, h)
            x1, y1 = rng.integers(x0 + 1, w + 1), rng.integers(y0 + 1, h + 1)
            windows.append([x0, y0, x1, y1])
            masks.append((rng.random((y1 - y0, x1 - x0)) < 0.5).astype(np.uint8) if rng.random() > 0.1 else None)
            gt.append([x0 + rng.uniform(0, 0.9), y0 + rng.uniform(0, 0.9), x1 - rng.uniform(0, 0.9), y1 - rng.uniform(0, 0.9)])
        windows, gt = np.array(windows), np.array(gt)
        areas = rng.uniform(1, 50, n)
        merged, agreement = merge_masks(windows, masks, gt, areas, merge=False)
        for k in range(n):
            if masks[k] is None:
                assert merged[k] is None and agreement[k] == 0.0
                continue
            np.testing.assert_array_equal(merged[k], masks[k])
            tb = tight_box_xyxy(paste(h, w, windows[k], masks[k]))
            ref = agreement_reference(masks[k].tolist(), windows[k][0], windows[k][1], gt[k])
            assert agreement[k] == pytest.approx(ref, abs=1e-12)
            # the numpy form (bench reports) is bit-identical to the kernel
            assert agreement[k] == (float(box_agreement(np.array(tb, float), gt[k])) if tb else 0.0)


# --- drop rule: the mask's box in the GT's continuous frame (no pixel-grid bias) -------------

SIZES = [3.0, 4.6, 7.3, 12.9, 20.4, 33.7, 60.2]


def raster(gt, window, convention):
    """The mask of a box in its window: pixels the box touches, or pixels whose centre is inside."""
    x0, y0, x1, y1 = window
    cx = np.arange(x0, x1) + 0.5
    cy = np.arange(y0, y1) + 0.5
    if convention == "touch":
        inx = (np.arange(x0, x1) + 1 > gt[0]) & (np.arange(x0, x1) < gt[2])
        iny = (np.arange(y0, y1) + 1 > gt[1]) & (np.arange(y0, y1) < gt[3])
    else:
        inx, iny = (cx >= gt[0]) & (cx < gt[2]), (cy >= gt[1]) & (cy < gt[3])
    return (iny[:, None] & inx[None, :]).astype(np.uint8)


@pytest.mark.parametrize("bw", SIZES)
def test_perfect_masks_of_fractional_boxes_have_agreement_one(bw):
    """Either raster of a box with fractional edges scores 1.0 at every size and offset (the former
    pixel-edge tight box capped a 20.4 px box at x = 10.3 to (20.4/21)^2 = 0.94)."""
    rng = np.random.default_rng(int(bw * 10))
    W, H = 200, 150
    for bh in SIZES:
        for _ in range(4):
            bbox = [5 + rng.integers(0, 60) + rng.uniform(0.01, 0.99), 5 + rng.integers(0, 40) + rng.uniform(0.01, 0.99),
                    bw, bh]
            window = box_window(bbox, W, H)
            gt = clipped_box_xyxy(bbox, W, H)
            masks = [raster(gt, window, "touch"), raster(gt, window, "centre")]
            _, agreement = merge_masks(np.array([window, window]), masks, np.array([gt, gt]),
                                          np.array([bw * bh] * 2), merge=False)
            assert agreement[0] == pytest.approx(1.0, abs=1e-12), (bbox, "touch")
            assert agreement[1] == pytest.approx(1.0, abs=1e-12), (bbox, "centre")
    # clipped at the image border: the clipped GT box is what the mask can reach
    for bbox in ([-bw / 2 - 0.3, 10.6, bw, 7.3], [W - bw / 2 + 0.3, H - 2.2, bw, 9.1]):
        window, gt = box_window(bbox, W, H), clipped_box_xyxy(bbox, W, H)
        for conv in ("touch", "centre"):
            _, agreement = merge_masks(np.array([window]), [raster(gt, window, conv)], np.array([gt]),
                                          np.array([1.0]), merge=False)
            assert agreement[0] == pytest.approx(1.0, abs=1e-12), (bbox, conv)


def test_mask_a_pixel_short_or_past_the_box_loses():
    # a 20 x 20 box on whole pixels: its first column [10, 11) is fully inside the box
    window, gt = np.array([[10, 5, 30, 25]]), np.array([[10.0, 5.0, 30.0, 25.0]])
    full = np.ones((20, 20), np.uint8)
    no_first_col = full.copy()
    no_first_col[:, 0] = 0
    no_last_row = full.copy()
    no_last_row[-1] = 0
    for m in (no_first_col, no_last_row):
        _, agreement = merge_masks(window, [m], gt, np.array([400.0]), merge=False)
        ref = agreement_reference(m.tolist(), 10, 5, gt[0])
        assert agreement[0] < 1.0 and agreement[0] == pytest.approx(ref, abs=1e-12)
        assert ref == pytest.approx(19.5 * 20 / 400)  # a fully covered column missing: half a pixel lost
    _, agreement = merge_masks(window, [full], gt, np.array([400.0]), merge=False)
    assert agreement[0] == 1.0
    # a mask reaching column 9, which the box [10.2, 30) does not touch: the 0.2 px past it lose
    window2, gt2 = np.array([[9, 5, 30, 25]]), np.array([[10.2, 5.0, 30.0, 25.0]])
    _, agreement = merge_masks(window2, [np.ones((20, 21), np.uint8)], gt2, np.array([400.0]), merge=False)
    ref = agreement_reference(np.ones((20, 21)).tolist(), 9, 5, gt2[0])
    assert agreement[0] < 1.0 and agreement[0] == pytest.approx(ref, abs=1e-12)
    assert ref == pytest.approx(19.8 * 20 / (20.0 * 20))


def test_drop_rule_matches_plain_python_reference_on_random_masks():
    rng = np.random.default_rng(7)
    W, H = 80, 60
    checked = 0
    for t in range(300):
        n = int(rng.integers(1, 4))
        windows, masks, gt, areas = [], [], [], []
        for _ in range(n):
            kind = t % 4  # fractional edges, whole pixels, .5 edges (ties of the centre rule), partly outside
            x, y = rng.uniform(-5 if kind == 3 else 0, W - 3), rng.uniform(-5 if kind == 3 else 0, H - 3)
            bw, bh = rng.uniform(0.6, 30), rng.uniform(0.6, 30)
            if kind == 1:
                x, y, bw, bh = float(int(x)), float(int(y)), float(max(1, int(bw))), float(max(1, int(bh)))
            elif kind == 2:
                x, y, bw, bh = int(x) + 0.5, int(y) + 0.5, float(max(1, int(bw))), float(max(1, int(bh)))
            bbox = [x, y, bw, bh]
            win = box_window(bbox, W, H)
            g = clipped_box_xyxy(bbox, W, H)
            wh, ww = win[3] - win[1], win[2] - win[0]
            style = rng.integers(0, 4)
            if style == 0:  # random pixels
                m = (rng.random((wh, ww)) < rng.uniform(0.05, 1.0)).astype(np.uint8)
            elif style == 1:  # a sub-rectangle (masks a few pixels short on some sides)
                m = np.zeros((wh, ww), np.uint8)
                r0, c0 = rng.integers(0, min(3, wh)), rng.integers(0, min(3, ww))
                r1, c1 = wh - rng.integers(0, min(3, wh - r0)), ww - rng.integers(0, min(3, ww - c0))
                m[r0:r1, c0:c1] = 1
            elif style == 2:  # one of the perfect rasters
                m = raster(g, win, ["touch", "centre"][int(rng.integers(0, 2))])
            else:  # a single pixel or empty
                m = np.zeros((wh, ww), np.uint8)
                if rng.random() < 0.8:
                    m[rng.integers(0, wh), rng.integers(0, ww)] = 1
            windows.append(win)
            masks.append(m)
            gt.append(g)
            areas.append(bw * bh)
        _, agreement = merge_masks(np.array(windows), masks, np.array(gt), np.array(areas), merge=False)
        for k in range(n):
            ref = agreement_reference(masks[k].tolist(), windows[k][0], windows[k][1], gt[k])
            assert agreement[k] == pytest.approx(ref, abs=1e-12), (windows[k], gt[k])
            assert 0.0 <= agreement[k] <= 1.0
            checked += 1
    assert checked > 500


# --- bench/drop_by_size.py: flagged share by object size, former vs current rule ------------

def _load_bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "drop_by_size.py"
    spec = importlib.util.spec_from_file_location("bench_drop_by_size", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_drop_by_size_on_a_tiny_json():
    bench = _load_bench()
    H, W = 150, 160
    # GT: a small fractional box, a medium one on whole pixels, a large fractional one; a crowd; an
    # annotation with a degenerate box (flagged either way)
    boxes = {1: [10.3, 20.6, 20.4, 12.9], 2: [40.0, 10.0, 50.0, 40.0], 3: [20.5, 45.25, 130.2, 80.3]}
    gt_anns = []
    for aid, b in boxes.items():
        x, y, w, h = b
        poly = [x, y, x + w, y, x + w, y + h, x, y + h]
        gt_anns.append({"id": aid, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": b,
                        "segmentation": [poly], "area": w * h})
    gt_anns.append({"id": 4, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [5.0, 5.0, 0.0, 3.0],
                    "segmentation": [[5, 5, 5, 8, 5, 8]], "area": 0.0})
    gt_anns.append({"id": 5, "image_id": 1, "category_id": 1, "iscrowd": 1, "bbox": [0, 0, 5, 5], "area": 25.0,
                    "segmentation": {"size": [H, W], "counts": [0, 5, H * W - 5]}})
    gt = {"images": [{"id": 1, "width": W, "height": H, "file_name": "a.jpg"}], "annotations": gt_anns,
          "categories": [{"id": 1, "name": "thing"}]}
    # proxy (per-instance, --no-merge): each box's touched pixels; box 2 loses its first column
    proxy_anns = []
    for a in gt_anns:
        if a["iscrowd"]:
            proxy_anns.append(a)
            continue
        m = np.zeros((H, W), np.uint8)
        if a["id"] in boxes:
            x0, y0, x1, y1 = box_window(a["bbox"], W, H)
            m[y0:y1, x0:x1] = 1
            if a["id"] == 2:
                m[:, x0] = 0
        proxy_anns.append(dict(a, segmentation=encode(m), proxy_agreement=0.0, ignore_mask=True))
    proxy = dict(gt, annotations=proxy_anns, info={"boxcaseg_proxy": {"merge": False}})
    res = bench.flag_shares(proxy, gt, drop=0.95)
    rows = {r["size"]: r for r in res["variants"]["per-instance"]}
    assert res["size_basis"] == {"mask": 4}
    # former rule: the small fractional box (20.4 x 12.9 at 10.3, 20.6) is flagged although perfect;
    # current rule: only the degenerate box and the medium one ... which misses one column of 50 (0.99)
    assert rows["small"]["n"] == 2 and rows["small"]["flagged_old"] == 2 and rows["small"]["flagged_new"] == 1
    assert rows["medium"]["n"] == 1 and rows["medium"]["flagged_old"] == 0 and rows["medium"]["flagged_new"] == 0
    assert rows["large"]["n"] == 1 and rows["large"]["flagged_old"] == 0 and rows["large"]["flagged_new"] == 0
    assert rows["all"]["n"] == 4 and rows["all"]["flagged_old"] == 2 and rows["all"]["flagged_new"] == 1
    # merged (recomputed from the per-instance masks): box 3, the largest, gives rows 45-49 of box 2's
    # columns up to box 2 but keeps its extent
    assert "merged" in res["variants"]
    mrows = {r["size"]: r for r in res["variants"]["merged"]}
    assert mrows["all"]["n"] == 4 and mrows["all"]["flagged_new"] == 1
    table = bench.markdown(res)
    assert "| small | 2 | 100.0 | 50.0 |" in table
    assert res["stored_matches"] == {"old": 1, "new": 1, "n": 4}  # stored 0.0: only the degenerate box's
    # a json written with the default merge: its masks are the merged ones, reported as they are
    res_m = bench.flag_shares(dict(proxy, info={"boxcaseg_proxy": {"merge": True}}), gt, drop=0.95)
    assert list(res_m["variants"]) == ["merged"] and res_m["variants"]["merged"] == res["variants"]["per-instance"]
    # the GT masks themselves as the proxy (no proxy json)
    res_gt = bench.flag_shares(None, gt, drop=0.95)
    assert {r["size"]: r["n"] for r in res_gt["variants"]["per-instance"]}["all"] == 4


def drop_threshold_reference(gt, drop, slack):
    """A box's drop threshold in plain Python: min(drop, (w - slack)(h - slack) / (w h))."""
    w, h = float(gt[2]) - float(gt[0]), float(gt[3]) - float(gt[1])
    if w <= 0 or h <= 0:
        return drop
    return min(drop, max(w - slack, 0.0) * max(h - slack, 0.0) / (w * h))


def test_drop_thresholds_match_plain_python_on_random_boxes():
    from boxcaseg.proxy.merge_drop import drop_thresholds, ignore_flags

    rng = np.random.default_rng()
    for _ in range(20):
        n = int(rng.integers(1, 40))
        x0, y0 = rng.uniform(0, 100, n), rng.uniform(0, 100, n)
        gt = np.stack([x0, y0, x0 + rng.uniform(0.2, 300, n), y0 + rng.uniform(0.2, 300, n)], 1)
        drop, slack = float(rng.uniform(0.5, 1.0)), float(rng.choice([0.0, 0.5, rng.uniform(0, 3)]))
        thr = drop_thresholds(gt, drop, slack)
        ref = np.array([drop_threshold_reference(g, drop, slack) for g in gt])
        assert np.allclose(thr, ref, rtol=0, atol=1e-12)
        agreement = rng.uniform(0.8, 1.0, n)
        assert (ignore_flags(agreement, gt, drop, slack) == np.array([a < t for a, t in zip(agreement, ref)])).all()
    # slack 0: the bare threshold for every box
    assert (drop_thresholds(gt, 0.95, 0.0) == 0.95).all()


@pytest.mark.parametrize("side", [6, 9, 13, 19, 27, 40, 64, 120, 250])
def test_drop_rule_by_size_a_missing_column_passes_a_wrong_mask_does_not(side):
    """The drop rule by box size (issue 36). Box: whole-pixel columns (w = side), fractional
    rows. A mask one fully covered column short loses half a pixel (agreement (w - 0.5)/w):
    the bare 0.95 rule flags it below 10 px, the 0.5 px slack at no size. Two columns short
    (agreement (w - 1.5)/w) stay flagged with the slack below 30 px, as with the bare rule;
    a mask missing a quarter of the box is flagged at every size by both."""
    from boxcaseg.proxy.merge_drop import ignore_flags

    rng = np.random.default_rng()
    w, h = float(side), side * float(rng.uniform(0.8, 1.25))
    bbox = [float(rng.integers(3, 9)), float(rng.uniform(3, 9)), w, h]
    H, W = int(bbox[1] + h) + 12, int(bbox[0] + w) + 12
    window = box_window(bbox, W, H)
    gt = np.array([clipped_box_xyxy(bbox, W, H)])
    x0, y0, x1, y1 = window
    assert x1 - x0 == side
    full = np.ones((y1 - y0, x1 - x0), np.uint8)  # every pixel the box touches: agreement 1
    cut = {"full": 0, "short1": 1, "short2": 2, "quarter": side // 4 + 1}
    flags = {}
    for name, k in cut.items():
        m = full.copy()
        if k:
            m[:, side - k:] = 0
        _, agr = merge_masks(np.array([window]), [m], gt, np.array([w * h]), merge=False)
        ref = agreement_reference(m.tolist(), x0, y0, gt[0])
        assert abs(agr[0] - ref) < 1e-12
        assert abs(ref - (w - max(k - 0.5, 0.0)) / w) < 1e-12  # k whole columns short: k - 0.5 px lost
        flags[name] = (bool(ignore_flags(agr, gt, 0.95, 0.0)[0]), bool(ignore_flags(agr, gt, 0.95, 0.5)[0]))
    assert flags["full"] == (False, False)
    assert flags["short1"] == (side < 10, False)
    assert flags["short2"] == (side < 30, side < 30)
    assert flags["quarter"] == (True, True)


def test_bench_drop_by_size_flags_against_true_iou_with_and_without_slack():
    """bench/drop_by_size.py's by-true-IoU table: a 9 x 9 box whose mask misses one column (true
    IoU 8/9, agreement 8.5/9 < 0.95) is flagged by the bare rule only; a 9 x 9 box missing five of
    its nine columns (true IoU 4/9: a bad mask) by both; a 40 x 30 box's perfect mask by neither."""
    bench = _load_bench()
    H, W = 60, 80
    boxes = {1: [5.0, 5.0, 9.0, 9.0], 2: [20.0, 5.0, 9.0, 9.0], 3: [30.0, 20.0, 40.0, 30.0]}
    cut = {1: 1, 2: 5, 3: 0}  # columns missing at the right
    gt_anns, proxy_anns = [], []
    for aid, (x, y, w, h) in boxes.items():
        gt_anns.append({"id": aid, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [x, y, w, h],
                        "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]], "area": w * h})
        m = np.zeros((H, W), np.uint8)
        m[int(y):int(y + h), int(x):int(x + w) - cut[aid]] = 1
        proxy_anns.append(dict(gt_anns[-1], segmentation=encode(m)))
    gt = {"images": [{"id": 1, "width": W, "height": H, "file_name": "a.jpg"}], "annotations": gt_anns,
          "categories": [{"id": 1, "name": "thing"}]}
    proxy = dict(gt, annotations=proxy_anns, info={"boxcaseg_proxy": {"merge": False}})
    res = bench.flag_shares(proxy, gt, drop=0.95, remerge=False, slack=0.5)
    rows = {r["side"]: r for r in res["by_true_iou"]["rows"]}
    small, mid = rows["< 12 px"], rows["32-96 px"]
    assert small["n"] == 2 and small["good"] == 1 and small["bad"] == 1
    assert small["mean_iou"] == pytest.approx((8 / 9 + 4 / 9) / 2, abs=1e-6)
    assert (small["good_flagged_bare"], small["good_flagged_slack"]) == (1, 0)
    assert (small["bad_flagged_bare"], small["bad_flagged_slack"]) == (1, 1)
    assert mid["n"] == 1 and mid["good"] == 1 and mid["flagged_bare"] == mid["flagged_slack"] == 0
    assert rows["all"]["n"] == 3 and rows["all"]["flagged_bare"] == 2 and rows["all"]["flagged_slack"] == 1
    assert "good flagged with slack %" in bench.markdown(res)


# --------------------------------------------------------------------------- the one merge order


def test_kernel_wins_is_merge_order():
    """The kernel's pairwise question (:func:`_wins`) and :func:`boxcaseg.boxes.merge_order`
    agree on every pair, on random areas with many ties."""
    from boxcaseg.boxes import merge_order
    from boxcaseg.proxy.merge_drop import _wins

    rng = np.random.default_rng(11)
    tied = 0
    for t in range(200):
        n = int(rng.integers(1, 14))
        areas = rng.integers(1, 5, n).astype(np.float64) * (0.5 if t % 2 else 37.25)  # few values: ties
        order = merge_order(areas)
        assert sorted(order.tolist()) == list(range(n))
        rank = np.empty(n, np.int64)
        rank[order] = np.arange(n)
        for i in range(n):
            for j in range(n):
                if i != j:
                    assert _wins(areas, j, i) == (rank[j] < rank[i]), (areas.tolist(), j, i)
                    tied += int(areas[i] == areas[j])
    assert tied > 100
    assert merge_order([4.0, 1.0, 4.0, 1.0, 9.0]).tolist() == [1, 3, 0, 2, 4]


def test_png_writer_paints_the_proxy_merge(tmp_path):
    """Overlapping masks with equal and unequal boxes: each pixel of the instance PNG belongs
    to the instance that :func:`merge_masks` keeps it for (one merge order, two users)."""
    from PIL import Image

    from boxcaseg.formats import write_instance_pngs

    rng = np.random.default_rng(12)
    h, w = 40, 50
    for t in range(6):
        n = int(rng.integers(2, 9))
        boxes, masks = [], []
        for k in range(n):
            if k and rng.random() < 0.4:  # the same box as an earlier one: a tie
                boxes.append(list(boxes[int(rng.integers(0, k))]))
            else:
                x0, y0 = int(rng.integers(0, w - 5)), int(rng.integers(0, h - 5))
                boxes.append([x0, y0, int(rng.integers(4, w - x0 + 1)), int(rng.integers(4, h - y0 + 1))])
            x, y, bw, bh = boxes[k]
            m = np.zeros((h, w), np.uint8)
            m[y:y + bh, x:x + bw] = rng.random((bh, bw)) < 0.7
            m[y, x] = 1  # never empty
            masks.append(m)
        windows = np.array([[0, 0, w, h]] * n)
        gt = np.array([[x, y, x + bw, y + bh] for x, y, bw, bh in boxes], np.float64)
        areas = np.array([bw * bh for _, _, bw, bh in boxes], np.float64)
        merged, _ = merge_masks(windows, masks, gt, areas, merge=True)
        coco = {"images": [{"id": 1, "file_name": f"i{t}.jpg", "width": w, "height": h}],
                "annotations": [{"id": k + 1, "image_id": 1, "category_id": 1, "bbox": [float(v) for v in b],
                                 "iscrowd": 0, "segmentation": encode(masks[k])} for k, b in enumerate(boxes)],
                "categories": [{"id": 1, "name": "x"}]}
        write_instance_pngs(coco, tmp_path / str(t))
        png = np.asarray(Image.open(tmp_path / str(t) / f"i{t}.png")).astype(np.int64)
        for k in range(n):
            np.testing.assert_array_equal(png == k + 1, merged[k].astype(bool), err_msg=f"{t} {k}")
        assert (png > 0).sum() == np.logical_or.reduce(masks).sum()
