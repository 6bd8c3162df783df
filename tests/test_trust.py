"""Inputs from strangers: a checkpoint's stored config and a COCO json's file names.

A. A checkpoint's config is read without ``${ENV}`` expansion and with plain model fields
   only (:func:`boxcaseg.config.config_from_checkpoint`): no timm kwargs that load files,
   no hub / URL / path backbone names, no weight file or download.
B. A json's ``file_name`` must stay inside ``--images`` (:mod:`boxcaseg.paths`): ``..``
   and absolute names stop every command with one line; symbolic links the folder itself
   holds are followed (datasets made by linking images into split folders).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from boxcaseg.cli import main
from boxcaseg.config import Config, config_from_checkpoint, load_config
from boxcaseg.errors import BoxcasegError
from boxcaseg.model import build_model, load_checkpoint_model

S = 64


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per module


def run(argv: list[str], capsys) -> tuple[int, str]:
    """The CLI in-process: (exit status, stderr stripped)."""
    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err.strip()


def one_error_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: "), err
    for n in needles:
        assert n in err, (n, err)


# --------------------------------------------------------------------------- A. checkpoints


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny `boxcaseg train`-style checkpoint (test_efficientnet)."""
    torch.manual_seed(0)
    cfg = Config()
    cfg.model.backbone = "test_efficientnet"
    cfg.model.head_channels = 16
    cfg.model.infer_size = S
    path = tmp_path_factory.mktemp("trust-ckpt") / "last.pt"
    torch.save({"model": build_model(cfg).state_dict(), "config": cfg.to_dict(), "iter": 0}, path)
    return path


def craft(src: Path, dst: Path, mutate) -> Path:
    """``src`` with its stored config changed by ``mutate(config_dict)``."""
    obj = torch.load(src, weights_only=True)
    mutate(obj["config"])
    torch.save(obj, dst)
    return dst


@pytest.fixture
def no_timm(monkeypatch):
    """timm.create_model must not be reached by a refused checkpoint."""
    import timm

    def boom(*a, **k):
        raise AssertionError(f"timm.create_model called with {a} {k}")

    monkeypatch.setattr(timm, "create_model", boom)


def test_stored_config_is_not_env_expanded(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BOXCASEG_TRUST_SECRET", "s3cr3t")
    monkeypatch.delenv("BOXCASEG_TRUST_UNSET", raising=False)

    def mutate(c):
        c["data"]["box_ann"] = "${BOXCASEG_TRUST_SECRET}/a.json"
        c["data"]["salient_dir"] = "${BOXCASEG_TRUST_UNSET}"  # unset: once an error, now plain text
        c["model"]["backbone_weights"] = "${BOXCASEG_TRUST_SECRET}"
        c["train"]["init_from"] = "${HOME}/x.pt"

    bad = craft(ckpt, tmp_path / "env.pt", mutate)
    _, cfg = load_checkpoint_model(str(bad))
    assert cfg.data.box_ann == "${BOXCASEG_TRUST_SECRET}/a.json"
    assert cfg.data.salient_dir == "${BOXCASEG_TRUST_UNSET}"
    # what would make us read a file is cleared, not expanded
    assert cfg.model.backbone_weights == "" and cfg.train.init_from == "" and cfg.model.pretrained is False
    assert "s3cr3t" not in json.dumps(cfg.to_dict())
    code, err = run(["model", "info", str(bad)], capsys)
    assert code == 0, err
    # a packed model keeps the literal text too
    code, err = run(["model", "pack", str(bad), "-o", str(tmp_path / "packed.pt")], capsys)
    assert code == 0, err
    packed = torch.load(tmp_path / "packed.pt", weights_only=True)["config"]
    assert packed["data"]["box_ann"] == "${BOXCASEG_TRUST_SECRET}/a.json" and "s3cr3t" not in json.dumps(packed)


def test_user_config_files_still_expand_env(tmp_path, monkeypatch):
    monkeypatch.setenv("BOXCASEG_TRUST_SECRET", "s3cr3t")
    toml = tmp_path / "c.toml"
    toml.write_text('[data]\nbox_ann = "${BOXCASEG_TRUST_SECRET}/a.json"\n')
    assert load_config(toml).data.box_ann == "s3cr3t/a.json"
    assert load_config(None, ["data.box_images=${BOXCASEG_TRUST_SECRET}/i"]).data.box_images == "s3cr3t/i"


@pytest.mark.parametrize("key", ["checkpoint_path", "pretrained_cfg_overlay", "pretrained_cfg", "cache_dir",
                                 "pretrained", "features_only", "in_chans"])
def test_backbone_kwargs_outside_the_whitelist_fail(ckpt, tmp_path, key, no_timm):
    bad = craft(ckpt, tmp_path / "kw.pt", lambda c: c["model"].update(backbone_kwargs={key: "/etc/passwd"}))
    with pytest.raises(BoxcasegError) as e:
        load_checkpoint_model(str(bad))
    msg = e.value.one_line()
    assert repr(key) in msg and str(bad) in msg and "\n" not in str(e.value)


def test_backbone_kwargs_values_must_be_plain(ckpt, tmp_path, no_timm):
    bad = craft(ckpt, tmp_path / "v.pt", lambda c: c["model"].update(backbone_kwargs={"feature_location": "/etc/x"}))
    with pytest.raises(BoxcasegError, match="feature_location"):
        load_checkpoint_model(str(bad))


def test_whitelisted_backbone_kwargs_load(ckpt, tmp_path):
    ok = craft(ckpt, tmp_path / "ok.pt", lambda c: c["model"].update(backbone_kwargs={"drop_path_rate": 0.05}))
    _, cfg = load_checkpoint_model(str(ok))
    assert cfg.model.backbone_kwargs == {"drop_path_rate": 0.05}


@pytest.mark.parametrize("argv", [["export", "{ckpt}", "-o", "{out}"], ["model", "info", "{ckpt}"],
                                  ["model", "pack", "{ckpt}", "-o", "{out}"],
                                  ["train", "--out", "{run}", "--init-from", "{ckpt}"]])
def test_checkpoint_path_kwarg_through_the_cli(ckpt, tmp_path, argv, capsys, no_timm):
    bad = craft(ckpt, tmp_path / "kw.pt", lambda c: c["model"].update(backbone_kwargs={"checkpoint_path": "/etc/passwd"}))
    out = tmp_path / "x.onnx"
    args = [a.format(ckpt=bad, out=out, run=tmp_path / "run") for a in argv]
    code, err = run(args, capsys)
    one_error_line(code, err, "'checkpoint_path'", str(bad))
    assert not out.exists()


@pytest.mark.parametrize("name", ["hf-hub:someone/x", "https://x/y", "timm/resnet18", "../x", "/abs/x",
                                  "${HOME}", "hf_hub:someone/x"])
@pytest.mark.parametrize("cmd", ["export", "info"])
def test_hub_url_and_path_backbones_fail(ckpt, tmp_path, name, cmd, capsys, no_timm):
    bad = craft(ckpt, tmp_path / "hub.pt", lambda c: c["model"].update(backbone=name))
    argv = ["export", str(bad), "-o", str(tmp_path / "x.onnx")] if cmd == "export" else ["model", "info", str(bad)]
    code, err = run(argv, capsys)
    one_error_line(code, err, str(bad), "model.backbone", "not a plain timm model name")


def test_resume_from_a_crafted_checkpoint_fails(ckpt, tmp_path, capsys, no_timm):
    (tmp_path / "run").mkdir()
    craft(ckpt, tmp_path / "run" / "last.pt", lambda c: c["model"].update(backbone="hf-hub:someone/x"))
    code, err = run(["train", "--out", str(tmp_path / "run"), "--resume"], capsys)
    one_error_line(code, err, "hf-hub:someone/x", "last.pt")


def test_maskrcnn_checkpoint_backbone(tmp_path, capsys, no_timm):
    from boxcaseg.maskrcnn.recipe import MaskRCNNConfig
    from boxcaseg.maskrcnn.trainer import model_from_checkpoint

    cfg = MaskRCNNConfig()
    ok = config_from_checkpoint({**cfg.to_dict(), "model": {**cfg.to_dict()["model"], "backbone": "timm:resnet18"}},
                                "x.pt", MaskRCNNConfig)
    assert ok.model.backbone == "timm:resnet18"
    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("RGB", (32, 24)).save(images / "a.png")
    for name in ("timm:hf-hub:someone/x", "timm:https://x/y", "hf-hub:someone/x"):
        c = cfg.to_dict()
        c["model"]["backbone"] = name
        path = tmp_path / "mr.pt"
        torch.save({"model": {}, "config": c, "category_ids": [1]}, path)
        with pytest.raises(BoxcasegError, match="not a plain timm model name"):
            model_from_checkpoint(torch.load(path, weights_only=True), str(path))
        code, err = run(["maskrcnn", "predict", "--ckpt", str(path), "--images", str(images),
                         "-o", str(tmp_path / "r.json")], capsys)
        one_error_line(code, err, str(path), name)


# --------------------------------------------------------------------------- B. file names


W, H = 64, 48


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> dict:
    """imgs/a.png, imgs/sub/a.png, outside.png (beside imgs/), imgs/link.png -> ../outside.png and
    imgs/deep -> elsewhere/deeper (a linked folder whose parent holds another a.png)."""
    root = tmp_path_factory.mktemp("trust-files")
    images = root / "imgs"
    _image(images / "a.png", 0)
    _image(images / "sub" / "a.png", 1)
    _image(root / "outside.png", 2)
    os.symlink(root / "outside.png", images / "link.png")
    _image(root / "elsewhere" / "a.png", 3)
    (root / "elsewhere" / "deeper").mkdir()
    os.symlink(root / "elsewhere" / "deeper", images / "deep")
    return {"root": root, "images": images, "outside": root / "outside.png"}


def coco_json(path: Path, file_name: str) -> Path:
    """One 64x48 image with two boxes (and polygon masks) named ``file_name``."""
    anns = []
    for k, (x, y, w, h) in enumerate(((6, 6, 30, 24), (30, 16, 28, 26)), start=1):
        anns.append({"id": k, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [x, y, w, h], "area": w * h,
                     "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": file_name, "width": W, "height": H}],
                                "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
    return path


TINY_TRAIN = ["--max-iters", "1", "--workers", "0", "--set", "model.backbone='test_efficientnet'",
              "--set", "model.head_channels=16", "--set", "data.patch_size=32", "--set", "data.box_per_batch=2",
              "--set", "data.salient_per_batch=0", "--set", "train.device='cpu'", "--set", "train.threads=1"]
TINY_MASKRCNN = ["--max-iters", "1", "--workers", "0", "--batch-size", "1", "--set", "model.backbone=resnet18",
                 "--set", 'model.backbone_weights=""', "--set", "model.pretrained=false", "--set", "model.min_size=64",
                 "--set", "model.max_size=96", "--set", "model.fpn_channels=16", "--set", "model.box_head_dim=32",
                 "--set", "model.mask_head_channels=16", "--set", "train.device=cpu", "--set", "train.steps=[]",
                 "--set", "train.warmup_iters=0", "--set", "train.threads=1"]


def _argv(command: str, ann: Path, images: Path, out: Path, ckpt: Path, mr_ckpt: Path | None) -> list[str]:
    if command == "train":
        return ["train", "--out", str(out), "--box-ann", str(ann), "--box-images", str(images), *TINY_TRAIN]
    if command == "proxy":
        return ["proxy", "--ann", str(ann), "--images", str(images), "-o", str(out / "proxy.json"), "--model", str(ckpt),
                "--engine", "torch", "--device", "cpu", "--workers", "0", "--no-progress", "--batch-size", "2"]
    if command == "maskrcnn-train":
        return ["maskrcnn", "train", "-o", str(out), "--ann", str(ann), "--images", str(images), *TINY_MASKRCNN]
    if command == "maskrcnn-predict":
        return ["maskrcnn", "predict", "--ckpt", str(mr_ckpt or out / "none.pt"), "--images", str(images),
                "--ann", str(ann), "-o", str(out / "results.json"), "--device", "cpu"]
    if command == "visualize":
        return ["visualize", "--ann", str(ann), "--images", str(images), "-o", str(out)]
    raise AssertionError(command)


COMMANDS = ["train", "proxy", "maskrcnn-train", "maskrcnn-predict", "visualize"]
BAD = {"dotdot": "../outside.png", "absolute": None, "dotdot-through-link": "deep/../../outside.png"}


@pytest.mark.parametrize("kind", list(BAD))
@pytest.mark.parametrize("command", COMMANDS)
def test_file_name_outside_the_folder_fails(folder, ckpt, tmp_path, command, kind, capsys):
    name = BAD[kind] or str(folder["outside"])
    ann = coco_json(tmp_path / "bad.json", name)
    out = tmp_path / "out"
    code, err = run(_argv(command, ann, folder["images"], out, ckpt, None), capsys)
    one_error_line(code, err, "image id 1", repr(name))
    assert ("absolute path" if kind == "absolute" else "leads outside the image folder") in err
    # nothing was produced from it
    assert not out.exists() or not any(p.suffix in (".png", ".pt", ".json") for p in out.rglob("*"))


@pytest.fixture(scope="module")
def maskrcnn_run(folder, tmp_path_factory):
    """`maskrcnn train` for one iteration on a json naming sub/a.png: (exit status, stderr, checkpoint)."""
    d = tmp_path_factory.mktemp("trust-mr")
    ann = coco_json(d / "good.json", "sub/a.png")
    out = d / "run"
    try:
        main(_argv("maskrcnn-train", ann, folder["images"], out, Path("unused"), None))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    return code, out / "last.pt"


@pytest.mark.parametrize("command", COMMANDS)
def test_subfolder_file_name_still_works(folder, ckpt, maskrcnn_run, tmp_path, command, capsys):
    ann = coco_json(tmp_path / "good.json", "sub/a.png")
    out = tmp_path / "out"
    if command == "maskrcnn-train":
        code, last = maskrcnn_run
        assert code == 0 and last.is_file()
        return
    code, err = run(_argv(command, ann, folder["images"], out, ckpt, maskrcnn_run[1]), capsys)
    assert code == 0, err
    made = {"train": out / "last.pt", "proxy": out / "proxy.json", "maskrcnn-predict": out / "results.json",
            "visualize": out / "a.png"}[command]
    assert made.is_file()


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "maskrcnn-train"])
def test_a_linked_image_is_followed(folder, ckpt, maskrcnn_run, tmp_path, command, capsys):
    """imgs/link.png -> ../outside.png (the folder's own link) is read: the command succeeds
    on the linked file's pixels."""
    ann = coco_json(tmp_path / "linked.json", "link.png")
    out = tmp_path / "out"
    code, err = run(_argv(command, ann, folder["images"], out, ckpt, maskrcnn_run[1]), capsys)
    assert code == 0, err
    made = {"train": out / "last.pt", "proxy": out / "proxy.json", "maskrcnn-predict": out / "results.json",
            "visualize": out / "link.png"}[command]
    assert made.is_file()
    if command == "visualize":  # a pixel far from both boxes is the linked file's own
        overlay = np.asarray(Image.open(made).convert("RGB"))
        assert (overlay[H - 2, W - 2] == np.asarray(Image.open(folder["outside"]).convert("RGB"))[H - 2, W - 2]).all()


def test_dotdot_through_a_linked_folder_stays_by_name(folder):
    """``deep/../a.png`` is ``a.png`` of the image folder (the name, normalised), not the a.png
    beside the linked folder's target (where the operating system's ``..`` would lead)."""
    from boxcaseg.paths import resolve_image_path

    images = folder["images"]
    p = resolve_image_path(images, "deep/../a.png", 1)
    assert p == images / "a.png"
    assert p.read_bytes() == (images / "a.png").read_bytes() != (folder["root"] / "elsewhere" / "a.png").read_bytes()


@pytest.mark.parametrize("kind", list(BAD))
def test_baselines_grabcut(folder, tmp_path, kind):
    pytest.importorskip("cv2")
    from boxcaseg.baselines import grabcut_predictions

    name = BAD[kind] or str(folder["outside"])
    with pytest.raises(BoxcasegError) as e:
        grabcut_predictions(coco_json(tmp_path / "bad.json", name), folder["images"], iters=1)
    assert "image id 1" in e.value.one_line() and repr(name) in e.value.one_line()
    preds = grabcut_predictions(coco_json(tmp_path / "good.json", "sub/a.png"), folder["images"], iters=1)
    assert len(preds) == 2


def test_resolver_edge_cases(folder):
    from boxcaseg.paths import resolve_image_path

    images = folder["images"]
    assert resolve_image_path(images, "sub/a.png", 1) == images / "sub" / "a.png"
    assert resolve_image_path(images, "sub/../a.png", 1) == images / "a.png"  # stays inside (normalised)
    assert resolve_image_path(images, "link.png", 1) == images / "link.png"  # the folder's own link
    for bad in ("", None, 7, ".", "sub/../../outside.png", "/etc/passwd", "a\x00.png"):
        with pytest.raises(BoxcasegError, match="image id 3"):
            resolve_image_path(images, bad, 3)
