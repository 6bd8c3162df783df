"""bench/gpu_train.sh: the prepared lent-GPU training call, run here as its dry run.

``bash bench/gpu_train.sh --dry-run OUT`` runs the call's steps on this CPU at toy size (a toy
bundle from ``bench/gpu_data.py --train --toy``, 3 + 4 iterations of batch 4, pack, coco-val
score on 2 images, the step timing by loss backend): what lands in OUT is what a lent GPU
would bring back, so a typo or a missing file shows here, not in a lent minute. The checks
below read OUT themselves (the script's own ``check`` is asserted too, not relied on).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_train.sh"
OUT_FILES = {"boxcaseg-gpu.pt", "metrics.jsonl", "probe.json", "score.json", "losscmp.json", "gpu_train.log",
             "summary.txt"}


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return {**env, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **extra}


def test_the_call_fits_its_budget_and_its_header_writes_it_out():
    """The steps' limits add up to the deadline, inside the 540 s timeout the header names; a longer
    training is refused before anything runs; the carried folders are ignored by git (so they travel
    once, as carried paths) and the header gives the exact call."""
    r = subprocess.run(["bash", str(SCRIPT), "--budget"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"budget: (.*) = (\d+) s of DEADLINE (\d+) s", r.stdout)
    steps = dict(s.split(":") for s in m.group(1).split())
    assert list(steps) == ["probe", "train", "score", "losscmp"]
    assert sum(map(int, steps.values())) == int(m.group(2)) <= int(m.group(3)) <= 540
    over = subprocess.run(["bash", str(SCRIPT), "--budget"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "TRAIN_S": "400"})
    assert over.returncode == 1 and "exceed" in over.stdout
    header = SCRIPT.read_text()
    for line in ("command:   bash bench/gpu_train.sh $OUT", 'carry:     [".gpu-train", ".whl"]', "timeout_s: 540",
                 "pycocotools==2.0.11", "python bench/gpu_data.py --train"):
        assert line in header, line
    ignored = subprocess.run(["git", "-C", str(REPO), "check-ignore", ".gpu-train/x", ".whl/x"],
                             capture_output=True, text=True)
    assert ignored.stdout.split() == [".gpu-train/x", ".whl/x"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp("gpu_train")
    out, work = tmp / "out", tmp / "work"
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], cwd=REPO, capture_output=True, text=True,
                       timeout=1800, env=_env(WORK=str(work), BOXCASEG_DATA=str(data_root)))
    return r, out, work


@pytest.mark.slow
def test_the_dry_run_brings_back_a_loadable_model_its_log_and_its_score(dry_run, data_root):
    import torch

    from boxcaseg.config import config_from_checkpoint
    from boxcaseg.io import safe_torch_load
    from boxcaseg.model import build_checkpoint_model

    r, out, work = dry_run
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # what comes back through $OUT: at most 8 plain files of at most 16 MiB, no folders
    assert {p.name for p in out.iterdir()} == OUT_FILES
    assert all(p.is_file() and p.stat().st_size <= 16 * 2**20 for p in out.iterdir())
    assert "check: complete" in (out / "summary.txt").read_text()

    model = safe_torch_load(out / "boxcaseg-gpu.pt")
    assert model["iter"] == 4 and model["name"] == "boxcaseg-gpu"
    assert all(v.dtype == torch.float16 for v in model["model"].values() if v.is_floating_point())
    cfg = config_from_checkpoint(model["config"], "boxcaseg-gpu.pt")
    assert (cfg.model.infer_size, cfg.model.infer_context, cfg.model.infer_threshold,
            cfg.model.infer_prior_weight) == (256, 1.2, 0.4, 0.3)
    net = build_checkpoint_model(cfg.model, "boxcaseg-gpu.pt")
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in model["model"].items()})
    from boxcaseg import Segmenter

    masks = Segmenter(model=str(out / "boxcaseg-gpu.pt"), engine="torch").predict(
        np.full((64, 80, 3), 127, np.uint8), [[10, 10, 40, 30]])
    assert masks.shape == (1, 64, 80) and masks.dtype == bool

    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in recs] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in recs)

    score = json.loads((out / "score.json").read_text())
    gt = json.loads((data_root / "coco-val" / "instances.json").read_text())
    first_two = {im["id"] for im in sorted(gt["images"], key=lambda im: im["id"])[:2]}
    n_gt = sum(1 for a in gt["annotations"] if a["image_id"] in first_two and not a.get("iscrowd"))
    assert score["n"] == n_gt and score["iter"] == 4 and len(score["rows"]) == 1
    assert all(0.0 <= score[k] <= 1.0 for k in ("miou_star", "iou75", "miou", "iou50"))
    assert score["settings"] == {"context": 1.2, "threshold": 0.4, "prior_weight": 0.3}

    probe = json.loads((out / "probe.json").read_text())
    assert probe["it_s"] > 0 and probe["max_iters"] == 4 and probe["batch"] == 4
    loss = json.loads((out / "losscmp.json").read_text())
    assert loss["auto_picks"] == "numba" and "no GPU" in loss["skipped"]
    assert loss["rows"][0]["numba_ms"] > 0 and loss["rows"][0]["torch_ms"] > 0


@pytest.mark.slow
def test_the_toy_bundle_stores_what_the_loader_would_read_from_the_originals(dry_run, data_root):
    """Salient masks: exactly the original mask resized (bilinear) to 224 and binarised at 128; images
    224 x 224; box images decode in the frame their json gives; coco-val byte-identical."""
    from PIL import Image

    _, _, work = dry_run
    bundle = work / "bundle"
    manifest = json.loads((bundle / "bundle.json").read_text())
    sal = bundle / manifest["salient_dir"]
    names = (sal / "names.txt").read_text().split()
    assert len(names) == 8 and manifest["salient_size"] == 224
    for name in names:
        stored = np.asarray(Image.open(sal / "masks" / f"{name}.png").convert("L"))
        ref = Image.open(data_root / "duts-tr" / "masks" / f"{name}.png").convert("L").resize((224, 224),
                                                                                             Image.BILINEAR)
        assert np.array_equal(stored >= 128, np.asarray(ref) >= 128)
        assert Image.open(sal / "images" / f"{name}.jpg").size == (224, 224)
    for name in ("coco-train", "coco-train-extra"):
        data = json.loads((bundle / name / "instances.json").read_text())
        for im in data["images"]:
            with Image.open(bundle / name / "images" / im["file_name"]) as pic:
                assert pic.size == (im["width"], im["height"]) and pic.format == "JPEG"
    val = json.loads((bundle / "coco-val" / "instances.json").read_text())
    for im in val["images"]:
        assert (bundle / "coco-val" / "images" / im["file_name"]).read_bytes() == \
            (data_root / "coco-val" / "images" / im["file_name"]).read_bytes()
    sizes = manifest["travel_bytes"]
    assert sizes["total"] == sizes["repository"] + sizes["whl"] + sizes["bundle"] <= sizes["allowed_with_margin"]


@pytest.mark.slow
def test_a_bundle_over_the_travel_limit_is_refused_and_nothing_is_written(tmp_path, data_root):
    out = tmp_path / "bundle"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_data.py"), "--train", "--toy", "--out", str(out),
                        "--margin-mib", "63.9"], capture_output=True, text=True, timeout=300,
                       env=_env(BOXCASEG_DATA=str(data_root)))
    assert r.returncode == 1 and "over the" in r.stderr and "nothing written" in r.stderr
    assert not out.exists() and not list(tmp_path.iterdir())
