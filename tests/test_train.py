"""Training: exact resume, a falling loss on real data, bad-input messages, CLI help."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from boxcaseg.cli import main
from boxcaseg.config import Config
from boxcaseg.data.synthetic import make_synthetic_dataset
from boxcaseg.errors import BoxcasegError
from boxcaseg.io import read_jsonl
from boxcaseg.joint_training import train


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("synth"), n_images=12, n_salient=12, image_size=(96, 72))


def tiny_config(synth, max_iters=10) -> Config:
    cfg = Config()
    cfg.model.backbone = "test_efficientnet"
    cfg.model.head_channels = 16
    cfg.data.box_ann, cfg.data.box_images, cfg.data.salient_dir = str(synth.ann_file), str(synth.image_dir), str(synth.salient_dir)
    cfg.data.patch_size, cfg.data.salient_resize = 48, 56
    cfg.data.box_per_batch, cfg.data.salient_per_batch = 3, 2
    cfg.data.workers = 0
    cfg.train.max_iters, cfg.train.lr, cfg.train.ckpt_every = max_iters, 0.05, 3
    return cfg


def test_exact_resume(synth, tmp_path):
    train(tiny_config(synth), tmp_path / "a", show_progress=False)
    train(tiny_config(synth), tmp_path / "b", stop_at=5, show_progress=False)
    assert [r["iter"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    cfg = tiny_config(synth)
    cfg.data.workers = 1  # worker count does not change what is drawn
    train(cfg, tmp_path / "b", resume=True, show_progress=False)
    a = read_jsonl(tmp_path / "a" / "metrics.jsonl")
    b = read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert [r["iter"] for r in b] == list(range(1, 11))
    for ra, rb in zip(a, b):
        for k in ("loss", "loss_mil", "loss_smooth", "loss_pixel", "lr"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-7), (ra["iter"], k)
    wa = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_loss_falls_on_real_data(data_root, tmp_path):
    cfg = Config()
    cfg.model.backbone = "test_efficientnet"
    cfg.model.head_channels = 32
    cfg.data.box_ann = str(data_root / "coco-train" / "instances.json")
    cfg.data.box_images = str(data_root / "coco-train" / "images")
    cfg.data.salient_dir = str(data_root / "duts-tr")
    cfg.data.patch_size, cfg.data.salient_resize = 96, 112
    cfg.data.box_per_batch, cfg.data.salient_per_batch = 5, 3
    cfg.data.workers = 2
    cfg.train.max_iters, cfg.train.lr, cfg.train.ckpt_every = 40, 0.05, 0
    res = train(cfg, tmp_path, show_progress=False)
    losses = np.array([r["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl")])
    assert len(losses) == 40 and res.iters == 40
    assert losses[-10:].mean() < losses[:10].mean() - 0.05, losses


def _run_cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip()
    return e.value.code, err


def _bad_coco(tmp_path, synth, mutate):
    d = json.loads(synth.ann_file.read_text())
    mutate(d)
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(d))
    return p


def test_bad_input_messages(synth, tmp_path, capsys):
    base = ["train", "--out", str(tmp_path / "o"), "--box-images", str(synth.image_dir), "--max-iters", "1",
            "--set", "model.backbone='test_efficientnet'", "--set", "data.workers=0"]
    # malformed json
    p = tmp_path / "broken.json"
    p.write_text('{"images": [')
    code, err = _run_cli(base + ["--box-ann", str(p)], capsys)
    assert code == 2 and str(p) in err and "malformed" in err and len(err.splitlines()) == 1
    # annotation pointing at an unknown image
    ann_id = json.loads(synth.ann_file.read_text())["annotations"][0]["id"]
    p = _bad_coco(tmp_path, synth, lambda d: d["annotations"][0].update(image_id=999999))
    code, err = _run_cli(base + ["--box-ann", str(p)], capsys)
    assert code == 2 and f"annotation {ann_id}" in err and "999999" in err and len(err.splitlines()) == 1
    # missing image file
    p = _bad_coco(tmp_path, synth, lambda d: d["images"][0].update(file_name="nope.png"))
    code, err = _run_cli(base + ["--box-ann", str(p)], capsys)
    assert code == 2 and "nope.png" in err and "image id 1" in err and len(err.splitlines()) == 1
    # corrupt image file
    bad_dir = tmp_path / "imgs"
    bad_dir.mkdir()
    for f in synth.image_dir.iterdir():
        (bad_dir / f.name).write_bytes(f.read_bytes())
    (bad_dir / "000000.png").write_bytes(b"not a png at all")
    args = [a if a != str(synth.image_dir) else str(bad_dir) for a in base]
    code, err = _run_cli(args + ["--box-ann", str(synth.ann_file)], capsys)
    assert code == 2 and "000000.png" in err and len(err.splitlines()) == 1
    # --skip-bad skips it and trains
    code, err = _run_cli(args + ["--box-ann", str(synth.ann_file), "--salient-dir", str(synth.salient_dir),
                                 "--skip-bad", "--set", "data.patch_size=32", "--set", "data.salient_resize=40"], capsys)
    assert code in (0, None), err


def test_degenerate_boxes_skipped_and_counted(synth, tmp_path, caplog):
    def mutate(d):
        d["annotations"][0]["bbox"] = [1, 1, 0, 5]
        d["annotations"][1]["bbox"] = [float("nan"), 1, 3, 3]
        d["annotations"][2]["bbox"] = [5000, 5000, 10, 10]
    p = _bad_coco(tmp_path, synth, mutate)
    from boxcaseg.data.box_patches import BoxPatchDataset
    from boxcaseg.errors import BoxcasegError

    n_all = len(json.loads(synth.ann_file.read_text())["annotations"])
    with caplog.at_level("WARNING"):
        ds = BoxPatchDataset(p, synth.image_dir)
    assert len(ds) == n_all - 3 and ds.index.n_degenerate == 3
    warnings = [r for r in caplog.records if "degenerate" in r.getMessage()]
    assert len(warnings) == 1 and "3 annotation" in warnings[0].getMessage()
    with pytest.raises(BoxcasegError, match="non-positive size"):
        BoxPatchDataset(p, synth.image_dir, strict=True)


def test_help_explains_options():
    out = subprocess.run([sys.executable, "-m", "boxcaseg", "train", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for opt in ("--config", "--out", "--box-ann", "--box-images", "--salient-dir", "--max-iters", "--batch-size", "--resume"):
        assert opt in out.stdout


def test_fused_box_losses_train_and_validate(synth, tmp_path):
    cfg = tiny_config(synth, max_iters=4)
    cfg.train.fused_mil_weight, cfg.train.pairwise_weight, cfg.train.pairwise_ramp = 0.5, 1.0, 2
    res = train(cfg, tmp_path / "p", show_progress=False)
    recs = read_jsonl(tmp_path / "p" / "metrics.jsonl")
    assert [r["iter"] for r in recs] == [1, 2, 3, 4]
    for r in recs:
        assert r["loss_pairwise"] > 0 and r["loss_fused_mil"] > 0
        # the ramp: half the weight at iteration 1, all of it from iteration 2 on
        w = 0.5 if r["iter"] == 1 else 1.0
        expected = r["loss_mil"] + 0.05 * r["loss_smooth"] + r["loss_pixel"] + 0.5 * r["loss_fused_mil"] + w * r["loss_pairwise"]
        assert r["loss"] == pytest.approx(expected, rel=1e-5)
    assert np.isfinite(res.last_loss)
    bad = tiny_config(synth, max_iters=1)
    bad.train.pairwise_weight = -1.0
    with pytest.raises(BoxcasegError, match="train.pairwise_weight"):
        train(bad, tmp_path / "bad", show_progress=False)


@pytest.mark.parametrize("name", ["cpu", "paper-coco", "paper-voc"])
def test_shipped_configs_load(name, monkeypatch, tmp_path):
    from boxcaseg.config import load_config

    for var in ("BOXCASEG_DATA", "COCO_ROOT", "VOC_ROOT", "VOC_COCO_JSON", "DUTS_SINGLE"):
        monkeypatch.setenv(var, str(tmp_path))
    cfg = load_config(name, ["train.max_iters=3"])  # a shipped config by name
    assert cfg.train.max_iters == 3 and cfg.model.backbone
    if name == "cpu":
        assert cfg.train.pairwise_weight > 0 and cfg.data.box_ann.startswith(str(tmp_path))


def test_self_training_stage_starts_from_weights_and_uses_pseudo_masks(synth, tmp_path):
    """Stage 2 of self-training: weights from a checkpoint (a new schedule), pseudo masks
    from a proxy json (here the synthetic GT masks) as a soft target of the box patches."""
    first = tiny_config(synth, max_iters=2)
    train(first, tmp_path / "s1", show_progress=False)
    init = torch.load(tmp_path / "s1" / "last.pt", weights_only=True)

    # lr 0: the weights after stage 2 are exactly stage 1's (BN statistics aside)
    cfg = tiny_config(synth, max_iters=3)
    cfg.data.pseudo_ann = str(synth.ann_file)  # the synthetic json carries GT masks
    cfg.train.pseudo_weight, cfg.train.init_from, cfg.train.lr = 2.0, str(tmp_path / "s1" / "last.pt"), 0.0
    train(cfg, tmp_path / "s2", show_progress=False)
    after = torch.load(tmp_path / "s2" / "last.pt", weights_only=True)
    assert after["iter"] == 3
    for k, v in init["model"].items():
        if "running_" in k or "num_batches" in k:
            continue
        torch.testing.assert_close(after["model"][k], v, rtol=0, atol=0, msg=k)
    recs = read_jsonl(tmp_path / "s2" / "metrics.jsonl")
    for r in recs:
        assert r["loss_pseudo"] > 0
        expected = r["loss_mil"] + 0.05 * r["loss_smooth"] + r["loss_pixel"] + 2.0 * r["loss_pseudo"]
        assert r["loss"] == pytest.approx(expected, rel=1e-5)

    bad = tiny_config(synth, max_iters=1)
    bad.train.pseudo_weight = 1.0
    with pytest.raises(BoxcasegError, match="data.pseudo_ann"):
        train(bad, tmp_path / "b1", show_progress=False)
    other = tiny_config(synth, max_iters=1)
    other.model.head_channels = 8
    other.train.init_from = str(tmp_path / "s1" / "last.pt")
    with pytest.raises(BoxcasegError, match="init_from"):
        train(other, tmp_path / "b2", show_progress=False)


def test_weight_ema_matches_a_float64_loop():
    from boxcaseg.training import WeightEMA

    g = torch.Generator().manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ref = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
    ema = WeightEMA(model, decay=0.95)
    for n in range(1, 41):
        with torch.no_grad():
            for v in model.state_dict().values():
                if v.is_floating_point():
                    v.add_(torch.randn(v.shape, generator=g))
                else:
                    v.add_(1)
        ema.update(model)
        d = min(0.95, (1 + n) / (10 + n))
        for k, v in model.state_dict().items():
            ref[k] = d * ref[k] + (1 - d) * v.double() if v.is_floating_point() else v.double()
    assert ema.updates == 40
    for k, v in ema.state.items():
        torch.testing.assert_close(v.double(), ref[k], rtol=1e-5, atol=1e-5, msg=k)
    assert ema.state["1.num_batches_tracked"].item() == 40
    with pytest.raises(ValueError, match="decay"):
        WeightEMA(model, 1.0)


def test_ema_checkpoint_holds_the_average_and_resumes_exactly(synth, tmp_path):
    cfg = tiny_config(synth)
    cfg.train.ema_decay = 0.9
    train(cfg, tmp_path / "a", show_progress=False)
    train(cfg, tmp_path / "b", stop_at=5, show_progress=False)
    train(cfg, tmp_path / "b", resume=True, show_progress=False)
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert a["ema_updates"] == b["ema_updates"] == 10
    for key in ("model", "model_live"):
        for k in a[key]:
            torch.testing.assert_close(a[key][k], b[key][k], rtol=1e-5, atol=1e-6, msg=f"{key} {k}")
    moved = [k for k, v in a["model"].items() if v.is_floating_point() and not torch.equal(v, a["model_live"][k])]
    assert moved, "the average equals the live weights"
    # export and proxy read "model": the average
    from boxcaseg.model import load_checkpoint_model

    m, _ = load_checkpoint_model(str(tmp_path / "a" / "last.pt"))
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, a["model"][k], rtol=0, atol=0)
    bad = tiny_config(synth, max_iters=1)
    bad.train.ema_decay = 1.5
    with pytest.raises(BoxcasegError, match="train.ema_decay"):
        train(bad, tmp_path / "bad", show_progress=False)


def test_backbone_lr_mult_and_frozen_backbone_bn(synth, tmp_path):
    train(tiny_config(synth, max_iters=2), tmp_path / "s1", show_progress=False)
    init = torch.load(tmp_path / "s1" / "last.pt", weights_only=True)["model"]
    cfg = tiny_config(synth, max_iters=3)
    cfg.train.init_from = str(tmp_path / "s1" / "last.pt")
    cfg.train.backbone_lr_mult, cfg.train.freeze_backbone_bn = 0.0, True
    train(cfg, tmp_path / "s2", show_progress=False)
    after = torch.load(tmp_path / "s2" / "last.pt", weights_only=True)["model"]
    body = [k for k in init if k.startswith("backbone.")]
    heads = [k for k in init if not k.startswith("backbone.") and init[k].is_floating_point()]
    assert body and heads
    for k in body:  # backbone weights (lr 0) and BN statistics (eval mode) are untouched
        torch.testing.assert_close(after[k], init[k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(after[k], init[k]) for k in heads), "the heads did not learn"
    bad = tiny_config(synth, max_iters=1)
    bad.train.backbone_lr_mult = -1.0
    with pytest.raises(BoxcasegError, match="backbone_lr_mult"):
        train(bad, tmp_path / "bad", show_progress=False)


def test_channels_last_trains_the_same_as_nchw(synth, tmp_path):
    """train.channels_last is a speed setting only: the same losses and weights as plain NCHW."""
    runs = {}
    for cl in (False, True):
        cfg = tiny_config(synth, max_iters=4)
        cfg.train.channels_last = cl
        cfg.train.pairwise_weight, cfg.train.fused_mil_weight = 1.0, 1.0
        train(cfg, tmp_path / str(cl), show_progress=False)
        ckpt = torch.load(tmp_path / str(cl) / "last.pt", weights_only=True)
        runs[cl] = (read_jsonl(tmp_path / str(cl) / "metrics.jsonl"), ckpt["model"])
    (m0, w0), (m1, w1) = runs[False], runs[True]
    assert any(v.is_floating_point() and v.dim() == 4 and v.is_contiguous(memory_format=torch.channels_last)
               and not v.is_contiguous() for v in w1.values()), "channels_last did not take effect"
    for r0, r1 in zip(m0, m1, strict=True):
        for k in ("loss", "loss_mil", "loss_smooth", "loss_pixel"):
            assert r1[k] == pytest.approx(r0[k], rel=1e-3, abs=1e-5), (r0["iter"], k)
    for k in w0:
        torch.testing.assert_close(w1[k].contiguous(), w0[k], rtol=1e-3, atol=1e-4, msg=k)


# --- data sets on the command line replace the config's sets of both kinds (issue 36) ----------------------


def _sets_of(out) -> list[tuple[str, str]]:
    return [(r["kind"], r["source"]) for r in torch.load(out / "last.pt", weights_only=True)["data_sets"]]


def test_boxes_only_fine_tune_without_the_data_root(synth, tmp_path, monkeypatch, capsys):
    """The README's boxes-only fine-tune (`--config cpu --init-from pretrained --box-ann --box-images`,
    no --salient-dir) for a user without the data root: the cpu config's salient folder under
    ${BOXCASEG_DATA} is not used (it stopped the run: 'salient folder needs images/ and masks/')."""
    empty = tmp_path / "no-data"
    empty.mkdir()
    monkeypatch.setenv("BOXCASEG_DATA", str(empty))
    out = tmp_path / "ft"
    code, err = _run_cli(["train", "--config", "cpu", "--init-from", "pretrained", "--box-ann", str(synth.ann_file),
                          "--box-images", str(synth.image_dir), "--out", str(out), "--max-iters", "1",
                          "--batch-size", "2", "--set", "data.workers=0", "--set", "data.patch_size=64",
                          "--set", "train.threads=1"], capsys)
    assert code in (0, None), err
    assert _sets_of(out) == [("box", str(synth.ann_file))]
    saved = torch.load(out / "last.pt", weights_only=True)["config"]["data"]
    assert saved["salient_dir"] == "" and saved["salient_weights"] == [] and saved["box_weights"] == []


def test_data_set_flags_replace_both_kinds(synth, tmp_path, capsys):
    """--salient-dir alone: the config's box sets go too; no data-set flag: the config's sets stay;
    --set after the flags still adds a set back."""
    from boxcaseg.commands.train_cmd import data_set_overrides
    from boxcaseg.config import apply_overrides

    toml = tmp_path / "c.toml"
    toml.write_text(f'[model]\nbackbone = "test_efficientnet"\nhead_channels = 16\n'
                    f'[data]\nbox_ann = "{synth.ann_file}"\nbox_images = "{synth.image_dir}"\n'
                    f'salient_dir = "{tmp_path / "nowhere"}"\nbox_weights = [2.0]\nsalient_weights = [1.0]\n'
                    'patch_size = 48\nsalient_resize = 56\nworkers = 0\n[train]\nmax_iters = 1\n')
    out = tmp_path / "sal-only"
    code, err = _run_cli(["train", "--config", str(toml), "--salient-dir", str(synth.salient_dir), "--out", str(out)],
                         capsys)
    assert code in (0, None), err
    assert _sets_of(out) == [("salient", str(synth.salient_dir))]
    # no data-set flag: the config's sets and weights stay (the missing salient folder then stops the run)
    code, err = _run_cli(["train", "--config", str(toml), "--out", str(tmp_path / "cfg-sets")], capsys)
    assert code == 2 and "nowhere" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "cfg-sets" / "last.pt").exists()
    # the overrides themselves, against the config values they replace
    cfg = load_config_for_test(toml)
    apply_overrides(cfg, data_set_overrides(None, None, None, [3.0], None))
    assert cfg.data.box_weights == [3.0] and cfg.data.salient_dir == str(tmp_path / "nowhere")
    cfg = load_config_for_test(toml)
    apply_overrides(cfg, data_set_overrides(["x.json"], ["x/"], None, None, None))
    assert (cfg.data.box_ann, cfg.data.box_images, cfg.data.salient_dir) == ("x.json", "x/", "")
    assert cfg.data.box_weights == [] and cfg.data.salient_weights == []
    # --set is applied after the flags: a salient folder given that way is used with the boxes
    out = tmp_path / "set-back"
    code, err = _run_cli(["train", "--config", str(toml), "--box-ann", str(synth.ann_file), "--box-images",
                          str(synth.image_dir), "--set", f"data.salient_dir='{synth.salient_dir}'", "--out", str(out)],
                         capsys)
    assert code in (0, None), err
    assert _sets_of(out) == [("box", str(synth.ann_file)), ("salient", str(synth.salient_dir))]


def load_config_for_test(path):
    from boxcaseg.config import load_config

    return load_config(str(path))
