"""Classical floors: pixel-centre rasterisation of box-fill and the inscribed ellipse."""

from __future__ import annotations

import json

import numpy as np

from boxcaseg.baselines import box_fill_mask, box_fill_predictions, ellipse_mask, ellipse_predictions
from boxcaseg.evaluate import mask_quality
from boxcaseg.masks import encode


def test_box_fill_pixel_centres():
    m = box_fill_mask([1.2, 2.0, 3.0, 2.6], 8, 8)
    # columns whose centre j+0.5 lies in [1.2, 4.2]: j = 1, 2, 3; rows in [2.0, 4.6]: i = 2, 3, 4
    expect = np.zeros((8, 8), np.uint8)
    expect[2:5, 1:4] = 1
    np.testing.assert_array_equal(m, expect)


def test_ellipse_area_and_inscription():
    m = ellipse_mask([10, 20, 200, 100], 200, 300)
    assert abs(m.sum() - np.pi * 100 * 50) / (np.pi * 100 * 50) < 0.01
    assert (m & ~box_fill_mask([10, 20, 200, 100], 200, 300).astype(bool)).sum() == 0


def test_floors_against_gt(tmp_path):
    """A GT that *is* an ellipse: the ellipse floor is perfect, box-fill gets pi/4."""
    h, w = 120, 160
    gt_mask = ellipse_mask([20, 10, 100, 80], h, w)
    d = {"images": [{"id": 1, "width": w, "height": h, "file_name": "a.png"}],
         "categories": [{"id": 1, "name": "x"}],
         "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [20, 10, 100, 80],
                          "area": float(gt_mask.sum()), "segmentation": encode(gt_mask)}]}
    p = tmp_path / "gt.json"
    p.write_text(json.dumps(d))
    assert mask_quality(p, ellipse_predictions(p))["miou_star"] == 1.0
    q = mask_quality(p, box_fill_predictions(p))
    assert abs(q["miou"] - gt_mask.sum() / box_fill_mask([20, 10, 100, 80], h, w).sum()) < 1e-12
    assert abs(q["miou"] - np.pi / 4) < 0.01
