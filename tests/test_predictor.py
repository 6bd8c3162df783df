"""Settings that travel with a model, model resolution (shipped / cache), `Segmenter`,
`boxcaseg segment`, `boxcaseg model pack|info`, `train --init-from`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from boxcaseg.errors import BoxcasegError
from boxcaseg.masks import decode
from conftest import run_cli

S = 64


def tiny_checkpoint(path, **settings):
    from test_export import tiny_checkpoint as make

    make(path, S)
    if settings:
        ck = torch.load(path, weights_only=True)
        for k, v in settings.items():
            ck["config"]["model"][k] = v
        torch.save(ck, path)
    return Path(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    plain = tiny_checkpoint(d / "plain.pt")
    tuned = tiny_checkpoint(d / "tuned.pt", infer_context=1.3, infer_threshold=0.35, infer_prior_weight=0.25)
    return {"dir": d, "plain": plain, "tuned": tuned}


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BOXCASEG_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _image(tmp_path, seed=0, w=90, h=70):
    rng = np.random.default_rng(seed)
    arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    arr[20:50, 30:70] = (230, 40, 40)
    p = tmp_path / f"img{seed}.png"
    Image.fromarray(arr).save(p)
    return p, arr


# --------------------------------------------------------------------------- settings travel


def test_settings_travel_from_checkpoint_to_onnx_and_engine_metadata(models, tmp_path):
    from boxcaseg.export import export_onnx, read_onnx_metadata
    from boxcaseg.model_files import read_model_settings

    st = read_model_settings("torch", models["tuned"])
    assert (st.infer_size, st.context, st.threshold, st.prior_weight, st.alpha) == (S, 1.3, 0.35, 0.25, 0.7)
    rep = export_onnx(models["tuned"], tmp_path / "m.onnx")
    meta = read_onnx_metadata(rep.onnx_path)
    assert float(meta["boxcaseg.context"]) == 1.3 and float(meta["boxcaseg.threshold"]) == 0.35
    assert float(meta["boxcaseg.prior_weight"]) == 0.25
    assert read_model_settings("onnx", rep.onnx_path) == st
    # a checkpoint from before the settings travelled gives the paper's
    old = torch.load(models["plain"], weights_only=True)
    for k in ("infer_context", "infer_threshold", "infer_prior_weight"):
        old["config"]["model"].pop(k, None)
    torch.save(old, tmp_path / "old.pt")
    st_old = read_model_settings("torch", tmp_path / "old.pt")
    assert (st_old.context, st_old.threshold, st_old.prior_weight) == (1.0, 0.5, 0.0)


def test_proxy_uses_the_models_settings_unless_a_flag_overrides(models, tmp_path, cache):
    from test_proxy import small_coco

    from boxcaseg.proxy import ProxyConfig, generate_proxy

    ann, images = small_coco(tmp_path / "data", n_images=4)
    base = dict(ann=ann, images=images, model=models["tuned"], batch_size=4, workers=0, progress=False)
    s1 = generate_proxy(ProxyConfig(out=tmp_path / "a.json", **base))
    info = json.loads((tmp_path / "a.json").read_text())["info"]["boxcaseg_proxy"]
    assert (info["context"], info["threshold"], info["prior_weight"]) == (1.3, 0.35, 0.25)
    assert info["engine"] == "onnx" and info["infer_size"] == S and s1["settings"] == info  # auto: the ONNX graph
    generate_proxy(ProxyConfig(out=tmp_path / "b.json", threshold=0.6, **base))
    info_b = json.loads((tmp_path / "b.json").read_text())["info"]["boxcaseg_proxy"]
    assert (info_b["context"], info_b["threshold"], info_b["prior_weight"]) == (1.3, 0.6, 0.25)
    # explicit settings equal to the model's give the same bytes
    generate_proxy(ProxyConfig(out=tmp_path / "c.json", context=1.3, threshold=0.35, prior_weight=0.25, **base))
    assert (tmp_path / "c.json").read_bytes() == (tmp_path / "a.json").read_bytes()


def test_proxy_cli_first_line_names_model_and_settings(models, tmp_path, cache, capsys):
    from test_proxy import small_coco

    ann, images = small_coco(tmp_path / "data", n_images=3)
    code = run_cli(["proxy", "--ann", str(ann), "--images", str(images), "-o", str(tmp_path / "p.json"),
                    "--model", str(models["tuned"]), "--workers", "0", "--no-progress", "--context", "1.1"])
    assert code == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"model {models['tuned']} on onnx: S={S}, context 1.1, threshold 0.35, prior weight 0.25")
    info = json.loads((tmp_path / "p.json").read_text())["info"]["boxcaseg_proxy"]
    assert info["model"] == str(models["tuned"]) and info["context"] == 1.1  # the model as given, not its cached graph


# --------------------------------------------------------------------------- model resolution


def test_checkpoint_on_onnx_is_exported_once_into_the_cache(models, cache, tmp_path):
    from boxcaseg.model_files import resolve_model
    from boxcaseg.model.pack import pack_checkpoint

    r1 = resolve_model(models["plain"], "onnx")
    assert r1.kind == "onnx" and r1.path.parent == cache / "onnx" and r1.path.is_file()
    stamp = r1.path.stat().st_mtime_ns
    r2 = resolve_model(models["plain"], "auto")  # no CUDA here, onnxruntime installed -> the same cached graph
    assert r2.path == r1.path and r2.path.stat().st_mtime_ns == stamp
    # new settings -> a new file -> a new graph carrying them
    pack_checkpoint(models["plain"], tmp_path / "p.pt", threshold=0.45)
    r3 = resolve_model(tmp_path / "p.pt", "onnx")
    assert r3.path != r1.path and r3.settings.threshold == 0.45
    # the torch engine opens the checkpoint itself; a file of another kind is refused
    assert resolve_model(models["plain"], "torch").path == models["plain"]
    with pytest.raises(BoxcasegError, match="cannot run on --engine torch"):
        resolve_model(r1.path, "torch")
    with pytest.raises(BoxcasegError, match="not found"):
        resolve_model(tmp_path / "missing.pt")


def test_shipped_model_sha_is_checked(tmp_path, monkeypatch):
    from boxcaseg import weights

    assert weights.SHA256 and len(weights.SHA256) == 64, "the shipped model's sha256 is recorded"
    path = weights.pretrained_path()
    assert path.stat().st_size <= 8_000_000
    fake = tmp_path / "weights"
    fake.mkdir()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    (fake / weights.FILE).write_bytes(bytes(data))
    monkeypatch.setattr(weights, "weights_dir", lambda: fake)
    monkeypatch.setattr(weights, "_checked", set())
    with pytest.raises(BoxcasegError, match="not the shipped model"):
        weights.pretrained_path()


def test_shipped_model_loads_with_its_settings():
    from boxcaseg import weights
    from boxcaseg.model_files import read_model_settings
    from boxcaseg.model import load_checkpoint_model

    ck = torch.load(weights.pretrained_path(), weights_only=True)
    assert all(v.dtype in (torch.float16, torch.int64) for v in ck["model"].values())
    model, cfg = load_checkpoint_model(str(weights.pretrained_path()))
    assert cfg.model.backbone == "efficientnet_lite0"
    st = read_model_settings("torch", weights.pretrained_path())
    assert st.infer_size == cfg.model.infer_size and st.context >= 1.0 and 0 < st.threshold < 1
    assert "coco-val" in weights.model_card()


# --------------------------------------------------------------------------- Segmenter


def _folder(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def _one_image_coco(tmp_path, p, boxes):
    coco = {"images": [{"id": 7, "file_name": p.name, "width": 90, "height": 70}],
            "annotations": [{"id": k + 1, "image_id": 7, "category_id": 1, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
                            for k, b in enumerate(boxes)],
            "categories": [{"id": 1, "name": "x"}]}
    (tmp_path / "a.json").write_text(json.dumps(coco))
    return tmp_path / "a.json"


@pytest.fixture(scope="module")
def segmenter(models):
    from boxcaseg.predictor import Segmenter

    return Segmenter(models["tuned"], engine="torch", device="cpu")


def test_segmenter_matches_the_proxy_pipeline(models, segmenter, tmp_path, cache):
    """Same boxes, same model and settings: the masks of `Segmenter` are the proxy's."""
    from boxcaseg.proxy import ProxyConfig, generate_proxy

    p, arr = _image(_folder(tmp_path / "img"), 1)
    boxes = [[10.3, 5.7, 40.2, 30.9], [30.0, 20.0, 45.5, 40.0], [0.0, 0.0, 90.0, 70.0], [60.2, 50.1, 3.4, 2.2]]
    ann = _one_image_coco(tmp_path, p, boxes)
    for merge in (False, True):
        out = tmp_path / f"p{merge}.json"
        generate_proxy(ProxyConfig(ann=ann, images=p.parent, out=out, model=models["tuned"],
                                   engine="torch", device="cpu", merge=merge, batch_size=len(boxes), workers=0,
                                   progress=False))
        res = json.loads(out.read_text())["annotations"]
        masks = segmenter.predict(p, boxes, merge=merge)
        assert masks.shape == (len(boxes), 70, 90) and masks.dtype == bool
        for k, a in enumerate(res):
            np.testing.assert_array_equal(masks[k], decode(a["segmentation"], 70, 90).astype(bool))


# settings under which the tiny model's masks fall short of some boxes, not of others
# (an ellipse-shaped map thresholded high), so the drop rule flags some and not others
SHORT = {"threshold": 0.7, "prior_weight": 0.8}
FLAG_BOXES = [[10.3, 5.7, 40.2, 30.9], [30.0, 20.0, 45.5, 40.0], [0.0, 0.0, 90.0, 70.0], [60.2, 50.1, 3.4, 2.2],
              [40.0, 40.0, 8.0, 6.0]]


def test_segmenter_flags_are_the_proxy_runs_ignore_mask(models, tmp_path, cache):
    """Same boxes, model, settings and drop rule: `Segmenter.predict_with_flags` gives the
    masks, agreements and ``ignore_mask`` flags of the proxy run, with and without merge,
    with the default drop rule and another one; the flags are not all alike."""
    from boxcaseg.predictor import Segmenter
    from boxcaseg.proxy import ProxyConfig, generate_proxy

    p, _ = _image(_folder(tmp_path / "img"), 1)
    ann = _one_image_coco(tmp_path, p, FLAG_BOXES)
    seen = set()
    for drop in ({}, {"drop_thresh": 0.9, "drop_slack": 0.0}):
        seg = Segmenter(models["tuned"], engine="torch", device="cpu", **SHORT, **drop)
        for merge in (False, True):
            out = tmp_path / f"p{merge}{len(drop)}.json"
            generate_proxy(ProxyConfig(ann=ann, images=p.parent, out=out, model=models["tuned"], engine="torch",
                                       device="cpu", merge=merge, batch_size=len(FLAG_BOXES), workers=0,
                                       progress=False, **SHORT, **drop))
            res = json.loads(out.read_text())["annotations"]
            masks, agreement, flags = seg.predict_with_flags(p, FLAG_BOXES, merge=merge)
            assert flags.dtype == bool and flags.shape == (len(FLAG_BOXES),)
            assert flags.tolist() == [a["ignore_mask"] for a in res], (drop, merge)
            assert agreement.tolist() == [a["proxy_agreement"] for a in res]
            for k, a in enumerate(res):
                np.testing.assert_array_equal(masks[k], decode(a["segmentation"], 70, 90).astype(bool))
            m2, a2 = seg.predict_with_agreement(p, FLAG_BOXES, merge=merge)  # the former call: the same two
            np.testing.assert_array_equal(m2, masks)
            np.testing.assert_array_equal(a2, agreement)
            seen.add(tuple(flags.tolist()))
    assert any(True in f and False in f for f in seen), seen  # the flags can tell boxes apart ...
    assert len(seen) > 1, seen  # ... and the drop rule's settings reach them


def test_segmenter_drop_rule_and_relative_are_settings(models, tmp_path):
    """drop_thresh / drop_slack / relative: keywords and attributes, checked; relative reaches the masks."""
    from boxcaseg.predictor import Segmenter
    from boxcaseg.proxy.options import DROP_SLACK, DROP_THRESH

    seg = Segmenter(models["tuned"], engine="torch", device="cpu", **SHORT)
    assert (seg.drop_thresh, seg.drop_slack, seg.relative) == (DROP_THRESH, DROP_SLACK, False)
    p, _ = _image(tmp_path, 1)
    _, agreement, flags = seg.predict_with_flags(p, FLAG_BOXES)
    seg.drop_thresh = 0.0  # nothing is below 0
    assert not seg.predict_with_flags(p, FLAG_BOXES)[2].any()
    seg.drop_thresh, seg.drop_slack = 1.0, 0.0  # everything short of a perfect agreement
    np.testing.assert_array_equal(seg.predict_with_flags(p, FLAG_BOXES)[2], agreement < 1.0)
    for bad, match in (({"drop_thresh": 1.5}, r"drop_thresh 1.5: must be in \[0, 1\]"),
                       ({"drop_slack": -1}, r"drop_slack -1: must be in \[0, 8\] px"),
                       ({"drop_thresh": "high"}, r"drop_thresh 'high': not a number")):
        with pytest.raises(BoxcasegError, match=match):
            Segmenter(models["tuned"], engine="torch", device="cpu", **bad)
    with pytest.raises(BoxcasegError, match="drop_slack"):
        seg.drop_slack = float("nan")
    assert seg.drop_slack == 0.0  # a refused value leaves the setting as it was
    plain = seg.predict(p, FLAG_BOXES)
    seg.relative = True
    assert (seg.predict(p, FLAG_BOXES) != plain).any()  # the min-max normalised map thresholds elsewhere


def test_segmenter_inputs_and_box_formats_agree(segmenter, tmp_path):
    p, arr = _image(tmp_path, 2)
    xywh = [[12.5, 8.0, 40.0, 33.3], [50.0, 30.0, 30.0, 35.0]]
    xyxy = [[b[0], b[1], b[0] + b[2], b[1] + b[3]] for b in xywh]
    ref = segmenter.predict(p, xywh)
    assert ref.any()
    for image in (Image.open(p), arr, Image.fromarray(arr).convert("RGBA")):
        np.testing.assert_array_equal(segmenter.predict(image, xywh), ref)
    np.testing.assert_array_equal(segmenter.predict(p, xyxy, box_format="xyxy"), ref)
    one = segmenter.predict(p, xywh[1])  # a single box as 4 numbers
    np.testing.assert_array_equal(one[0], ref[1])
    # each mask stays inside its box window
    for k, (x, y, w, h) in enumerate(xywh):
        ys, xs = np.nonzero(ref[k])
        assert xs.min() >= int(x) and xs.max() < x + w + 1 and ys.min() >= int(y) and ys.max() < y + h + 1


@pytest.mark.parametrize("boxes, match", [
    ([[10, 10, 0, 20]], r"box 0 \[10.0, 10.0, 0.0, 20.0\] \(xywh\) on a 90x70 image: has non-positive size"),
    ([[5, 5, 10, 10], [200, 10, 20, 20]], r"box 1 .* lies entirely outside its image"),
    ([[1, 2, 3]], r"expected K x 4 numbers"),
    ([[1, 2, float("nan"), 4]], r"non-finite"),
])
def test_segmenter_bad_boxes_name_the_box(segmenter, tmp_path, boxes, match):
    p, _ = _image(tmp_path, 3)
    with pytest.raises(BoxcasegError, match=match):
        segmenter.predict(p, boxes)


def test_segmenter_bad_images(segmenter, tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(BoxcasegError, match="bad.jpg: unreadable image"):
        segmenter.predict(tmp_path / "bad.jpg", [[0, 0, 5, 5]])
    with pytest.raises(BoxcasegError, match="5 channels"):
        segmenter.predict(np.zeros((10, 10, 5), np.uint8), [[0, 0, 5, 5]])
    with pytest.raises(BoxcasegError, match="pixels of type complex"):
        segmenter.predict(np.zeros((10, 10, 3), np.complex64), [[0, 0, 5, 5]])


# --------------------------------------------------------------------------- boxcaseg segment


def test_segment_cli_writes_overlay_and_rle_json(models, segmenter, tmp_path, capsys):
    p, arr = _image(tmp_path, 4)
    code = run_cli(["segment", str(p), "--box", "12,8,40,33", "--box", "50 30 30 35", "-o", str(tmp_path / "o.png"),
                    "--json", str(tmp_path / "m.json"), "--model", str(models["tuned"]), "--engine", "torch",
                    "--device", "cpu"])
    assert code == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"model {models['tuned']} on torch (cpu") and "context 1.3, threshold 0.35" in first
    ov = Image.open(tmp_path / "o.png")
    assert ov.size == (90, 70)
    js = json.loads((tmp_path / "m.json").read_text())
    ref = segmenter.predict(p, [[12, 8, 40, 33], [50, 30, 30, 35]])
    assert all(m["ignore_mask"] is False for m in js["masks"])  # these masks reach their boxes
    assert (js["settings"]["drop_thresh"], js["settings"]["drop_slack"]) == (0.95, 0.5)
    assert [m["box"] for m in js["masks"]] == [[12, 8, 40, 33], [50, 30, 30, 35]]
    for k, m in enumerate(js["masks"]):
        assert set(m["segmentation"]) == {"size", "counts"} and m["segmentation"]["size"] == [70, 90]
        np.testing.assert_array_equal(decode(m["segmentation"], 70, 90).astype(bool), ref[k])
    # the overlay differs from the image where a mask is (fill), not far away from every box
    diff = np.abs(np.asarray(ov.convert("RGB"), int) - arr.astype(int)).sum(2) > 0
    assert diff[ref[0]].mean() > 0.9 and not diff[:, 85:].any()


def test_segment_cli_json_carries_the_flags_of_the_drop_rule(models, tmp_path):
    """segment --json: each mask's ignore_mask, the proxy's verdict (Segmenter's flags) under
    --drop-thresh / --drop-slack, next to its agreement; the settings record the rule."""
    from boxcaseg.predictor import Segmenter

    p, _ = _image(tmp_path, 1)
    ref = Segmenter(models["tuned"], engine="torch", device="cpu", **SHORT)
    default_flags = ref.predict_with_flags(p, FLAG_BOXES)[2]
    ref.drop_thresh, ref.drop_slack = 0.8, 0.0
    masks, agreement, flags = ref.predict_with_flags(p, FLAG_BOXES)
    assert flags.any() and not flags.all() and (flags != default_flags).any()
    boxes = sum((["--box", ",".join(map(str, b))] for b in FLAG_BOXES), [])
    code = run_cli(["segment", str(p), *boxes, "--json", str(tmp_path / "m.json"), "--model", str(models["tuned"]),
                    "--engine", "torch", "--device", "cpu", "--threshold", "0.7", "--prior-weight", "0.8",
                    "--drop-thresh", "0.8", "--drop-slack", "0"])
    assert code == 0
    js = json.loads((tmp_path / "m.json").read_text())
    assert [m["ignore_mask"] for m in js["masks"]] == flags.tolist()
    assert [m["box_agreement"] for m in js["masks"]] == [round(float(a), 6) for a in agreement]
    assert (js["settings"]["drop_thresh"], js["settings"]["drop_slack"]) == (0.8, 0.0)


@pytest.mark.parametrize("args, match", [
    (["--box", "1,2,3"], "--box '1,2,3': expected 4 numbers"),
    (["--box", "a,b,c,d"], "expected 4 numbers"),
    (["--box", "10,10,0,5"], "box 0 .* non-positive size"),
    (["--box", "500,10,5,5"], "box 0 .* outside its image"),
    (["--box", "1,1,4,4", "--drop-thresh", "2"], r"--drop-thresh 2.0: must be in \[0, 1\]"),
    (["--box", "1,1,4,4", "--drop-slack", "-1"], r"--drop-slack -1.0: must be in \[0, 8\] px"),
])
def test_segment_cli_bad_input_is_one_line_exit_2(models, tmp_path, capsys, args, match):
    import re

    p, _ = _image(tmp_path, 5)
    code = run_cli(["segment", str(p), *args, "--model", str(models["tuned"]), "--engine", "torch"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and re.search(match, err), err


def test_segment_cli_unreadable_image(models, tmp_path, capsys):
    (tmp_path / "x.png").write_bytes(b"garbage")
    code = run_cli(["segment", str(tmp_path / "x.png"), "--box", "1,1,4,4", "--model", str(models["tuned"])])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "x.png: unreadable image" in err


# --------------------------------------------------------------------------- pack, info, init-from


def test_pack_halves_the_weights_and_stores_settings(models, tmp_path, capsys):
    from boxcaseg.model import load_checkpoint_model

    out = tmp_path / "slim.pt"
    assert run_cli(["model", "pack", str(models["plain"]), "-o", str(out), "--context", "1.2", "--threshold", "0.4",
                    "--prior-weight", "0.3"]) == 0
    ck = torch.load(out, weights_only=True)
    src = torch.load(models["plain"], weights_only=True)
    for k, v in src["model"].items():
        if v.is_floating_point():
            assert ck["model"][k].dtype == torch.float16
            torch.testing.assert_close(ck["model"][k].float(), v, rtol=1e-3, atol=1e-4)
        else:
            assert torch.equal(ck["model"][k], v)
    m = ck["config"]["model"]
    assert (m["infer_context"], m["infer_threshold"], m["infer_prior_weight"]) == (1.2, 0.4, 0.3)
    load_checkpoint_model(str(out))
    capsys.readouterr()
    assert run_cli(["model", "info", str(out)]) == 0
    assert "context 1.2, threshold 0.4, prior weight 0.3" in capsys.readouterr().out
    assert run_cli(["model", "pack", str(models["plain"]), "-o", str(out), "--threshold", "1.5"]) == 2


def test_init_from_a_packed_model_takes_its_network(models, tmp_path):
    """`--init-from FILE`: the network ([model]) comes from the file, the weights too (lr 0 keeps them)."""
    from boxcaseg.joint_training import adopt_init_model
    from boxcaseg.config import Config
    from boxcaseg.data.synthetic import make_synthetic_dataset
    from boxcaseg.model.pack import pack_checkpoint
    from boxcaseg.joint_training import train

    pack_checkpoint(models["tuned"], tmp_path / "init.pt")
    synth = make_synthetic_dataset(tmp_path / "s", n_images=6, n_salient=0, image_size=(96, 72))
    cfg = Config()  # hrnet_w48 by default: replaced by the init model's network
    cfg.data.box_ann, cfg.data.box_images = str(synth.ann_file), str(synth.image_dir)
    cfg.data.patch_size, cfg.data.box_per_batch, cfg.data.salient_per_batch, cfg.data.workers = 48, 3, 2, 0
    cfg.train.max_iters, cfg.train.lr = 2, 0.0
    adopt_init_model(cfg, str(tmp_path / "init.pt"))
    assert cfg.model.backbone == "test_efficientnet" and cfg.model.infer_threshold == 0.35
    train(cfg, tmp_path / "ft", show_progress=False)  # boxes only: works without a salient set
    after = torch.load(tmp_path / "ft" / "last.pt", weights_only=True)
    init = torch.load(tmp_path / "init.pt", weights_only=True)
    for k, v in init["model"].items():
        if "running_" in k or "num_batches" in k:
            continue
        torch.testing.assert_close(after["model"][k], v.float(), rtol=0, atol=0, msg=k)
    other = Config()
    other.train.init_from = str(tmp_path / "init.pt")
    other.data = cfg.data
    with pytest.raises(BoxcasegError, match="its network"):
        train(other, tmp_path / "bad", show_progress=False)
