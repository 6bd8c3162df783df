"""`boxcaseg visualize` writes valid PNG overlays and a worst-IoU contact sheet."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from boxcaseg.errors import BoxcasegError
from boxcaseg.masks import decode, encode
from boxcaseg.visualize import FLAGGED, visualize


@pytest.fixture(scope="module")
def proxy_case(tmp_path_factory):
    """A synthetic GT set and a 'proxy' json: masks eroded (IoU < 1), the first one flagged."""
    from boxcaseg.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("vis")
    paths = make_synthetic_dataset(root, n_images=4, n_salient=0, image_size=(96, 64), seed=5)
    gt = json.loads(paths.ann_file.read_text())
    proxy = json.loads(json.dumps(gt))
    for i, a in enumerate(proxy["annotations"]):
        img = next(im for im in gt["images"] if im["id"] == a["image_id"])
        m = decode(a["segmentation"], img["height"], img["width"]).astype(bool)
        m[::3] = False  # a visibly worse mask
        a["segmentation"] = encode(m)
        a["ignore_mask"] = i == 0
        a["proxy_agreement"] = 0.5 if i == 0 else 1.0
    path = root / "proxy.json"
    path.write_text(json.dumps(proxy))
    return paths, path, proxy


def test_visualize_writes_pngs_with_gt_panel_and_sheet(proxy_case, tmp_path):
    paths, proxy_path, proxy = proxy_case
    res = visualize(proxy_path, paths.image_dir, tmp_path / "vis", gt=paths.ann_file)
    n_images = len({a["image_id"] for a in proxy["annotations"]})
    assert len(res.overlays) == n_images
    for p in res.overlays:
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size == (2 * 96 + 4, 64)  # proxy | GT
    assert res.sheet is not None and res.sheet.name == "worst_iou.png"
    with Image.open(res.sheet) as im:
        assert im.format == "PNG" and im.width > 0
    # the flagged mask of the first annotation is drawn in the flagged colour
    first = proxy["annotations"][0]
    img = next(im for im in proxy["images"] if im["id"] == first["image_id"])
    with Image.open(tmp_path / "vis" / f"{img['file_name'].rsplit('.', 1)[0]}.png") as im:
        left = np.asarray(im.convert("RGB"))[:, :96]
    assert (left == np.array(FLAGGED, np.uint8)).all(axis=-1).any()


def test_visualize_limit_without_gt_and_cli(proxy_case, tmp_path, capsys):
    from boxcaseg.cli import main

    paths, proxy_path, _ = proxy_case
    res = visualize(proxy_path, paths.image_dir, tmp_path / "one", limit=1)
    assert len(res.overlays) == 1 and res.sheet is None
    with Image.open(res.overlays[0]) as im:
        assert im.size == (96, 64)
    try:
        main(["visualize", "--ann", str(proxy_path), "--images", str(paths.image_dir), "-o", str(tmp_path / "cli"),
              "--gt", str(paths.ann_file), "--limit", "2", "--worst", "4"])
    except SystemExit as e:
        assert e.code in (0, None)
    assert "2 overlay(s)" in capsys.readouterr().out
    assert (tmp_path / "cli" / "worst_iou.png").is_file()


def test_visualize_missing_image_names_it(proxy_case, tmp_path):
    paths, proxy_path, _ = proxy_case
    (tmp_path / "no-images").mkdir()  # (overlays are never written inside the image folder: -o beside it)
    with pytest.raises(BoxcasegError, match="image file not found"):
        visualize(proxy_path, tmp_path / "no-images", tmp_path / "x")
