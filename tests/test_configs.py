"""Shipped configs: names resolve, `boxcaseg config list | show`, package data, weight warnings."""

from __future__ import annotations

import importlib.resources
import logging
import shutil
import subprocess
import sys
import urllib.error
import zipfile

import pytest
import torch

from boxcaseg.config import Config, load_config, resolve_config, shipped_configs
from boxcaseg.errors import BoxcasegError
from boxcaseg.maskrcnn.recipe import MaskRCNNConfig, MaskRCNNModelConfig
from conftest import REPO, run_cli

EXPECTED = {"cpu", "paper-coco", "paper-voc", "maskrcnn-cpu", "maskrcnn-coco", "pretrained", "finetune"}
RANDOM_INIT = "trains from random weights"


@pytest.fixture
def env(monkeypatch, tmp_path):
    for var in ("BOXCASEG_DATA", "COCO_ROOT", "VOC_ROOT", "VOC_COCO_JSON", "DUTS_SINGLE"):
        monkeypatch.setenv(var, str(tmp_path))
    return tmp_path


def config_class(name: str) -> type:
    return MaskRCNNConfig if name.startswith("maskrcnn") else Config


def test_the_shipped_configs_are_package_data():
    folder = importlib.resources.files("boxcaseg") / "configs"
    names = {e.name for e in folder.iterdir()}
    assert {f"{n}.toml" for n in EXPECTED} <= names
    assert EXPECTED <= set(shipped_configs())
    assert not (REPO / "configs").exists()  # one home for them: the package


@pytest.mark.parametrize("name", sorted(shipped_configs()))
def test_every_shipped_config_loads_by_name(name, env):
    cfg = load_config(name, ["train.max_iters=3"], cls=config_class(name))
    assert cfg.train.max_iters == 3 and cfg.model.backbone
    assert load_config(f"{name}.toml", cls=config_class(name)) == load_config(name, cls=config_class(name))


def test_the_pretrained_recipe_says_what_the_shipped_model_carries():
    """configs/pretrained.toml's [model] (the network and the inference settings) is what the
    shipped checkpoint's own config holds: read raw from both files (tomllib, torch.load)."""
    import tomllib

    from boxcaseg import weights

    recipe = tomllib.loads((importlib.resources.files("boxcaseg") / "configs" / "pretrained.toml").read_text())
    shipped = torch.load(weights.pretrained_path(), map_location="cpu", weights_only=True)["config"]["model"]
    compared = {k: v for k, v in recipe["model"].items() if k != "backbone_weights"}  # packed without it
    assert {"infer_size", "infer_context", "infer_threshold", "infer_prior_weight", "alpha", "backbone"} <= set(compared)
    assert compared == {k: shipped[k] for k in compared}


def test_the_maskrcnn_coco_config_uses_imagenet_weights(env):
    cfg = load_config("maskrcnn-coco", cls=MaskRCNNConfig)
    assert cfg.model.backbone == "resnet101" and cfg.model.pretrained and not cfg.model.backbone_weights


def test_a_path_still_works_and_an_existing_file_wins(tmp_path, monkeypatch):
    own = tmp_path / "mine.toml"
    own.write_text('[model]\nbackbone = "resnet18"\n')
    assert resolve_config(own) == own and resolve_config(str(own)) == own
    assert load_config(own).model.backbone == "resnet18"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cpu").write_text('[train]\nmax_iters = 5\n')  # a file named like a shipped config
    assert load_config("cpu").train.max_iters == 5
    assert resolve_config("cpu.toml") == shipped_configs()["cpu"]


@pytest.mark.parametrize("bad", ["nope", "configs/cpu.toml", "cpu.yaml"])
def test_an_unknown_name_lists_the_shipped_ones(bad):
    with pytest.raises(BoxcasegError) as e:
        resolve_config(bad)
    msg = e.value.one_line()
    assert bad in msg and all(n in msg for n in EXPECTED)


@pytest.mark.parametrize("argv", [["train", "--config", "nope"], ["maskrcnn", "train", "-c", "nope"]])
def test_cli_unknown_config_exits_2_with_one_line(argv, tmp_path, capsys):
    assert run_cli([*argv, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: config 'nope'")
    assert all(n in err for n in EXPECTED)
    assert not (tmp_path / "out").exists()


def test_cli_config_list_and_show(capsys):
    assert run_cli(["config", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split(None, 1)[1] for line in lines}
    assert EXPECTED <= set(rows) and len(rows) == len(lines)
    assert rows["cpu"].startswith("CPU recipe") and "R-101-FPN" in rows["maskrcnn-coco"]
    assert run_cli(["config", "show", "cpu"]) == 0
    assert capsys.readouterr().out == shipped_configs()["cpu"].read_text()
    assert run_cli(["config", "show", "nope"]) == 2
    assert "shipped: " in capsys.readouterr().err


def test_the_wheel_holds_the_configs_and_the_shipped_model(tmp_path):
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    src = tmp_path / "src"
    src.mkdir()
    shutil.copytree(REPO / "boxcaseg", src / "boxcaseg", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / f, src / f)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "whl")], cwd=src, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (whl,) = (tmp_path / "whl").glob("boxcaseg-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    assert {f"boxcaseg/configs/{n}.toml" for n in EXPECTED} <= names
    assert {"boxcaseg/weights/boxcaseg-lite0.pt", "boxcaseg/weights/MODEL.md"} <= names
    with zipfile.ZipFile(whl) as z:
        assert z.read("boxcaseg/weights/boxcaseg-lite0.pt") == (REPO / "boxcaseg/weights/boxcaseg-lite0.pt").read_bytes()


# --------------------------------------------------------------------------- random-init warning


def random_init_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and RANDOM_INIT in r.getMessage()]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from boxcaseg.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synth"), n_images=6, n_salient=6, image_size=(64, 48))


def tiny_config(synth) -> Config:
    cfg = Config()
    cfg.model.backbone = "test_efficientnet"
    cfg.model.head_channels = 8
    cfg.data.box_ann, cfg.data.box_images, cfg.data.salient_dir = str(synth.ann_file), str(synth.image_dir), str(synth.salient_dir)
    cfg.data.patch_size, cfg.data.salient_resize = 32, 40
    cfg.data.box_per_batch, cfg.data.salient_per_batch = 2, 2
    cfg.data.workers = 0
    cfg.train.max_iters, cfg.train.ckpt_every, cfg.train.device, cfg.train.threads = 1, 1, "cpu", 1
    return cfg


def test_boxcaseg_training_warns_once_for_random_init_only(synth, tmp_path, caplog):
    from boxcaseg.joint_training import train

    caplog.set_level(logging.INFO)
    train(tiny_config(synth), tmp_path / "scratch", show_progress=False)
    (line,) = random_init_lines(caplog)
    assert "'test_efficientnet'" in line and "model.pretrained = true" in line
    assert "model.backbone_weights = FILE" in line and "pkg:PACKAGE/path" in line

    state = torch.load(tmp_path / "scratch" / "last.pt", weights_only=True)["model"]
    body = {k[len("backbone.body."):]: v for k, v in state.items() if k.startswith("backbone.body.")}
    torch.save(body, tmp_path / "backbone.pt")
    caplog.clear()
    with_weights = tiny_config(synth)
    with_weights.model.backbone_weights = str(tmp_path / "backbone.pt")
    train(with_weights, tmp_path / "weights", show_progress=False)
    assert random_init_lines(caplog) == []

    caplog.clear()
    from_ckpt = tiny_config(synth)
    from_ckpt.train.init_from = str(tmp_path / "scratch" / "last.pt")
    train(from_ckpt, tmp_path / "init", show_progress=False)
    assert random_init_lines(caplog) == []


def test_maskrcnn_backbone_warns_for_random_init_only(tmp_path, caplog):
    from boxcaseg.maskrcnn.network import build_backbone

    caplog.set_level(logging.INFO)
    scratch = MaskRCNNModelConfig(backbone="resnet18", fpn_channels=8)
    build_backbone(scratch)
    (line,) = random_init_lines(caplog)
    assert "'resnet18'" in line and "model.pretrained = true" in line and "model.backbone_weights = FILE" in line

    caplog.clear()
    build_backbone(scratch, load_weights=False)  # rebuilt for a checkpoint: it holds the weights
    from torchvision.models import resnet18

    torch.save(resnet18().state_dict(), tmp_path / "r18.pth")
    build_backbone(MaskRCNNModelConfig(backbone="resnet18", fpn_channels=8, backbone_weights=str(tmp_path / "r18.pth")))
    assert random_init_lines(caplog) == []


# --------------------------------------------------------------------------- torchvision ImageNet weights


def test_pretrained_resnet_loads_torchvision_imagenet_weights(monkeypatch, tmp_path, caplog):
    """pretrained = true for a torchvision ResNet: its IMAGENET1K_V1 state dict (the download
    replaced by a fake one here), frozen BatchNorm, no random-init warning."""
    import torchvision.models._api as tv_api
    from torchvision.models import resnet18
    from torchvision.ops.misc import FrozenBatchNorm2d

    from boxcaseg.maskrcnn.network import build_backbone

    fake = resnet18().state_dict()
    fake["conv1.weight"] = torch.full_like(fake["conv1.weight"], 0.25)
    urls = []

    def fake_download(url, *args, **kwargs):
        urls.append(url)
        return fake

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", fake_download)
    caplog.set_level(logging.INFO)
    backbone = build_backbone(MaskRCNNModelConfig(backbone="resnet18", fpn_channels=8, pretrained=True))
    assert urls == ["https://download.pytorch.org/models/resnet18-f37072fd.pth"]
    assert torch.all(backbone.body.conv1.weight == 0.25)
    assert isinstance(backbone.body.bn1, FrozenBatchNorm2d) and not backbone.body.conv1.weight.requires_grad
    assert random_init_lines(caplog) == []
    urls.clear()
    build_backbone(MaskRCNNModelConfig(backbone="resnet18", fpn_channels=8, pretrained=True), load_weights=False)
    assert urls == []  # a checkpoint rebuild downloads nothing


def test_pretrained_resnet_without_network_stops_with_one_line(monkeypatch, tmp_path):
    import torchvision.models._api as tv_api

    from boxcaseg.maskrcnn.network import build_maskrcnn

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    cfg = load_config("maskrcnn-coco", cls=MaskRCNNConfig).model
    cfg.backbone = "resnet18"  # the coco config's setting on a smaller net: same code path
    with pytest.raises(BoxcasegError) as e:
        build_maskrcnn(cfg, 2)
    msg = e.value.one_line()
    assert msg == str(e.value)  # one line already
    assert "could not fetch" in msg and "resnet18-f37072fd.pth" in msg and "model.backbone_weights = FILE" in msg


def test_boxes_only_note_says_what_learns():
    """The boxes-only line tells which heads still learn, by the config's loss weights."""
    from boxcaseg.joint_training import boxes_only_note

    cpu = load_config("cpu").train
    assert cpu.fused_mil_weight > 0
    assert "only from the box terms on the fused map" in boxes_only_note(cpu)
    cpu.fused_mil_weight = cpu.pairwise_weight = 0.0
    assert "learn nothing new" in boxes_only_note(cpu)
