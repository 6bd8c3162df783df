"""Files written before a change still give the same masks: the shipped model's masks on a fixed
image (tests/golden_image.py), recorded by the code of commit 673614e (before issue 27's
refactor) in tests/golden/shipped_masks.json, against today's Segmenter (ONNX Runtime, torch
and the shipped int8 graph, with and without merge) and a whole proxy run.

On the machine that recorded them the masks are equal to the pixel; elsewhere a CPU's
arithmetic may flip a border pixel, so up to 0.5% of a mask's pixels may differ."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mu

from golden_image import golden_image_and_boxes

GOLDEN = json.loads((Path(__file__).parent / "golden" / "shipped_masks.json").read_text())
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One ONNX cache for the module: the shipped model is exported once."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BOXCASEG_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def golden_masks(run: str, h: int, w: int) -> np.ndarray:
    rles = [{"size": [h, w], "counts": c.encode()} for c in GOLDEN["runs"][run]["rles"]]
    return mu.decode(rles).transpose(2, 0, 1).astype(bool)


def assert_same_masks(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.shape == want.shape, what
    for k, (a, b) in enumerate(zip(got, want)):
        differ = int((a != b).sum())
        assert b.sum() > 100, f"{what}: golden mask {k} is near empty"  # a real mask, not an empty one
        assert differ <= 0.005 * max(int(b.sum()), 1), f"{what}: mask {k}: {differ} of {int(b.sum())} pixels differ"


def test_golden_image_is_the_recorded_one():
    _, boxes = golden_image_and_boxes()
    assert boxes.tolist() == GOLDEN["boxes_xywh"]


@pytest.mark.parametrize("run", ["onnx", "torch", "int8"])
def test_shipped_model_gives_the_recorded_masks(run, cache):
    from boxcaseg.predictor import Segmenter

    if run != "torch" and not HAS_ORT:
        pytest.skip("ONNX Runtime not installed (the cpu extra)")
    img, boxes = golden_image_and_boxes()
    seg = Segmenter(None, **({"precision": "int8"} if run == "int8" else {"engine": run}))
    for merge in (False, True):
        name = f"{run}{'-merge' if merge else ''}"
        masks, agreement = seg.predict_with_agreement(img, boxes, merge=merge)
        assert_same_masks(masks, golden_masks(name, *img.shape[:2]), name)
        np.testing.assert_allclose(agreement, GOLDEN["runs"][name]["agreement"], atol=0.01, err_msg=name)


@pytest.mark.skipif(not HAS_ORT, reason="ONNX Runtime not installed (the cpu extra)")
def test_proxy_run_gives_the_recorded_masks(tmp_path, cache):
    """The proxy's chunk writer (batches across images) writes the same masks as recorded."""
    from PIL import Image

    from boxcaseg.proxy import ProxyConfig, generate_proxy

    img, boxes = golden_image_and_boxes()
    h, w = img.shape[:2]
    (tmp_path / "images").mkdir()
    Image.fromarray(img).save(tmp_path / "images" / "a.png")
    Image.fromarray(img[:, ::-1].copy()).save(tmp_path / "images" / "b.png")  # a second image in the batch
    flipped = boxes.copy()
    flipped[:, 0] = w - boxes[:, 0] - boxes[:, 2]
    anns = [{"id": 10 * i + k + 1, "image_id": i, "category_id": 1, "iscrowd": 0, "area": float(b[2] * b[3]),
             "bbox": [float(v) for v in b]} for i, bb in ((1, boxes), (2, flipped)) for k, b in enumerate(bb)]
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": w, "height": h},
                       {"id": 2, "file_name": "b.png", "width": w, "height": h}],
            "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "a.json").write_text(json.dumps(coco))
    for merge in (False, True):
        out = tmp_path / f"p{merge}.json"
        generate_proxy(ProxyConfig(ann=tmp_path / "a.json", images=tmp_path / "images", out=out, engine="onnx",
                                   merge=merge, workers=0, progress=False))
        got = json.loads(out.read_text())["annotations"]
        masks = np.stack([mu.decode(a["segmentation"]) for a in got if a["image_id"] == 1]).astype(bool)
        name = f"onnx{'-merge' if merge else ''}"
        assert_same_masks(masks, golden_masks(name, h, w), f"proxy {name}")
