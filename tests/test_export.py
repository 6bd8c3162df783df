"""Export: BN folding, the ONNX graph against PyTorch, engines, and clear errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from boxcaseg.config import Config
from boxcaseg.errors import BoxcasegError
from boxcaseg.export import OnnxEngine, ProxyExportModel, TorchEngine, export_onnx, load_engine, read_onnx_metadata
from boxcaseg.export.fold import fold_batchnorms
from boxcaseg.export.wrapper import reference_probs
from boxcaseg.model import build_model, load_checkpoint_model
from conftest import run_cli  # noqa: E402

S = 64
TOL_F32 = 1e-4  # ONNX Runtime vs PyTorch, float32


def tiny_checkpoint(path, infer_size: int = S, seed: int = 0, neck_channels: int = 0,
                    transfer_mlp: str = "ours", fusion: str = "logit"):
    """test_efficientnet (145k params) with non-trivial BN statistics, saved as `boxcaseg train` does."""
    torch.manual_seed(seed)
    cfg = Config()
    cfg.model.backbone = "test_efficientnet"
    cfg.model.head_channels = 16
    cfg.model.neck_channels = neck_channels
    cfg.model.infer_size = infer_size
    cfg.model.transfer_mlp = transfer_mlp
    cfg.model.fusion = fusion
    model = build_model(cfg)
    if transfer_mlp == "published":  # move k and b off their start values so that both matter
        with torch.no_grad():
            model.transferred_head.bias_k.copy_(torch.tensor([0.8, 1.3]))
            model.transferred_head.bias_b.copy_(torch.tensor([0.1, -0.2]))
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_((torch.rand(m.running_mean.shape, generator=g) - 0.5) * 0.4)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 0.8 + 0.6)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_((torch.rand(m.bias.shape, generator=g) - 0.5) * 0.4)
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "iter": 0}, path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    ckpt = tiny_checkpoint(d / "last.pt")
    report = export_onnx(ckpt, d / "model.onnx")
    return ckpt, report


def test_fold_batchnorms_removes_every_bn_and_keeps_outputs():
    import timm

    body = timm.create_model("test_efficientnet", features_only=True).eval()
    for m in body.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        ref = body(x)
        folded, left = fold_batchnorms(body, x)
        out = body(x)
    assert folded > 0 and left == 0
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)


def test_wrapper_matches_training_model(tmp_path):
    model, _ = load_checkpoint_model(str(tiny_checkpoint(tmp_path / "c.pt")))
    wrapper = ProxyExportModel(model, S).eval()
    x = torch.rand(3, 3, S, S) * 255
    with torch.no_grad():
        got = wrapper(x)
    ref = reference_probs(model, x)
    assert got.shape == (3, 1, S // 4, S // 4)
    assert float((got - ref).abs().max()) <= TOL_F32
    assert not hasattr(wrapper, "weak_head")


def test_onnx_export_checks_parity_and_metadata(exported):
    ckpt, rep = exported
    assert rep.max_abs_diff <= TOL_F32
    assert rep.bn_folded > 0 and rep.bn_left == 0
    proto = onnx.load(str(rep.onnx_path))
    onnx.checker.check_model(proto)
    ops = {n.op_type for n in proto.graph.node}
    assert "BatchNormalization" not in ops and "Sigmoid" in ops
    meta = read_onnx_metadata(rep.onnx_path)
    assert meta["boxcaseg.infer_size"] == str(S)
    assert meta["boxcaseg.output_stride"] == "4"
    assert float(meta["boxcaseg.alpha"]) == pytest.approx(0.7)
    assert meta["boxcaseg.normalization"].startswith("in graph")


@pytest.mark.parametrize("transfer_mlp,fusion", [("published", "logit"), ("ours", "prob"), ("published", "prob")])
def test_onnx_export_of_transfer_and_fusion_variants(tmp_path, transfer_mlp, fusion):
    """The authors' transfer MLP and the paper's probability fusion export to graphs whose
    answers are the training model's (torch wrapper and ONNX Runtime)."""
    ckpt = tiny_checkpoint(tmp_path / "v.pt", seed=5, transfer_mlp=transfer_mlp, fusion=fusion)
    model, cfg = load_checkpoint_model(str(ckpt))
    assert (cfg.model.transfer_mlp, cfg.model.fusion) == (transfer_mlp, fusion)
    x = torch.rand(2, 3, S, S) * 255
    ref = reference_probs(model, x)
    with torch.no_grad():
        for full in (False, True):
            got = ProxyExportModel(model, S, full_resolution=full).eval()(x)
            assert float((got - reference_probs(model, x, full_resolution=full)).abs().max()) <= TOL_F32
    rep = export_onnx(ckpt, tmp_path / "v.onnx")
    assert rep.max_abs_diff <= TOL_F32
    got = load_engine("onnx", rep.onnx_path).predict(x.numpy().astype(np.uint8))
    ref = reference_probs(model, torch.from_numpy(x.numpy().astype(np.uint8)).float()).numpy()
    assert float(np.abs(got - ref).max()) <= TOL_F32


def test_onnx_export_with_fpn_neck(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "neck.pt", neck_channels=24, seed=3)
    rep = export_onnx(ckpt, tmp_path / "neck.onnx")
    assert rep.max_abs_diff <= TOL_F32
    assert rep.bn_left == 0
    model, _ = load_checkpoint_model(str(ckpt))
    assert model.backbone.fpn is not None
    x = np.random.default_rng(7).integers(0, 256, (2, 3, S, S), dtype=np.uint8)
    got = load_engine("onnx", rep.onnx_path).predict(x)
    ref = reference_probs(model, torch.from_numpy(x).float()).numpy()
    assert float(np.abs(got - ref).max()) <= TOL_F32


@pytest.mark.parametrize("batch", [1, 5])
def test_ort_torch_parity_dynamic_batch(exported, batch):
    ckpt, rep = exported
    ort_engine = load_engine("onnx", rep.onnx_path)
    torch_engine = load_engine("torch", ckpt, device="cpu")
    assert isinstance(ort_engine, OnnxEngine) and isinstance(torch_engine, TorchEngine)
    assert ort_engine.infer_size == torch_engine.infer_size == S
    x = np.random.default_rng(batch).integers(0, 256, (batch, 3, S, S), dtype=np.uint8)
    a, b = ort_engine.predict(x), torch_engine.predict(x)
    assert a.shape == b.shape == (batch, 1, S // 4, S // 4)
    assert float(np.abs(a - b).max()) <= TOL_F32
    model, _ = load_checkpoint_model(str(ckpt))
    ref = reference_probs(model, torch.from_numpy(x).float()).numpy()
    assert float(np.abs(a - ref).max()) <= TOL_F32
    # uint8 and float input give the same answer
    assert np.array_equal(ort_engine.predict(x.astype(np.float32)), a)


def test_flip_tta_and_infer_size_override(exported, tmp_path, capsys):
    """--tta flip --infer-size 48: the graph averages each crop with its mirror, at 48 px."""
    ckpt, _ = exported
    out = tmp_path / "flip.onnx"
    assert run_cli(["export", str(ckpt), "-o", str(out), "--infer-size", "48", "--tta", "flip"]) == 0
    assert "flip TTA" in capsys.readouterr().out
    meta = read_onnx_metadata(out)
    assert meta["boxcaseg.infer_size"] == "48" and meta["boxcaseg.tta"] == "hflip"
    assert read_onnx_metadata(exported[1].onnx_path)["boxcaseg.tta"] == "none"
    engine = load_engine("onnx", out)
    assert engine.infer_size == 48
    x = np.random.default_rng(7).integers(0, 256, (3, 3, 48, 48), dtype=np.uint8)
    got = engine.predict(x)
    assert got.shape == (3, 1, 12, 12)
    model, _ = load_checkpoint_model(str(ckpt))
    xt = torch.from_numpy(x).float()
    plain = reference_probs(model, xt)
    mirror = reference_probs(model, xt.flip(-1)).flip(-1)  # two separate passes, averaged here
    assert float((mirror - plain).abs().max()) > 1e-3  # the model is not mirror-symmetric already
    assert float(np.abs(got - (0.5 * (plain + mirror)).numpy()).max()) <= TOL_F32
    # mirror-equivariant: the mirrored input gives the mirrored map
    assert float(np.abs(engine.predict(x[..., ::-1].copy()) - got[..., ::-1]).max()) <= TOL_F32
    # --alpha 1: the salient head alone (the transferred head gets weight 0)
    a1 = tmp_path / "a1.onnx"
    assert run_cli(["export", str(ckpt), "-o", str(a1), "--alpha", "1"]) == 0
    assert float(read_onnx_metadata(a1)["boxcaseg.alpha"]) == 1.0
    x64 = np.random.default_rng(8).integers(0, 256, (2, 3, S, S), dtype=np.uint8)
    from boxcaseg.imageops import normalize_batch_uint8
    with torch.no_grad():
        sal = torch.sigmoid(model.eval()(normalize_batch_uint8(torch.from_numpy(x64)))["salient"]).numpy()
    assert float(np.abs(load_engine("onnx", a1).predict(x64) - sal).max()) <= TOL_F32
    assert run_cli(["export", str(ckpt), "-o", str(tmp_path / "a2.onnx"), "--alpha", "1.5"]) == 2
    with pytest.raises(BoxcasegError, match="--infer-size 50: must be a multiple of 4"):
        export_onnx(ckpt, tmp_path / "bad.onnx", infer_size=50)
    assert run_cli(["export", str(ckpt), "-o", str(tmp_path / "b.onnx"), "--tta", "rotate"]) == 2
    assert "--tta" in capsys.readouterr().err



def test_export_cli_prints_difference_and_trt_needs_gpu(exported, tmp_path, capsys):
    ckpt, _ = exported
    assert run_cli(["export", str(ckpt), "-o", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert "max abs diff" in out and (tmp_path / "m.onnx").is_file()
    assert run_cli(["export", str(ckpt), "-o", str(tmp_path / "t.onnx"), "--trt", "--fp16"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "TensorRT" in err and "Traceback" not in err


def test_bad_model_files_give_one_clear_line(exported, tmp_path):
    ckpt, rep = exported
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01 definitely not a protobuf \xff" * 10)
    with pytest.raises(BoxcasegError, match="garbage.onnx"):
        load_engine("onnx", garbage)
    with pytest.raises(BoxcasegError, match="not a valid ONNX|not one written"):
        load_engine("onnx", ckpt)  # a checkpoint is not an ONNX file
    with pytest.raises(BoxcasegError, match="model.onnx"):
        load_engine("torch", rep.onnx_path)  # an ONNX file is not a checkpoint
    plain = tmp_path / "plain.onnx"
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])), str(plain))
    with pytest.raises(BoxcasegError, match="not one written by `boxcaseg export`"):
        load_engine("onnx", plain)
    with pytest.raises(BoxcasegError, match="TensorRT|boxcaseg export --trt"):
        load_engine("trt", garbage)
    with pytest.raises(BoxcasegError, match="not found"):
        load_engine("onnx", tmp_path / "missing.onnx")


def test_int8_graph_keeps_metadata_and_answers(tmp_path):
    """--int8: a QDQ graph, smaller, with the float32 graph's metadata (+ how it was made),
    calibrated on crops cut as the proxy cuts them, answering within a few percent."""
    from boxcaseg.data.synthetic import make_synthetic_dataset
    from boxcaseg.export.quantize import quantize_onnx
    from boxcaseg.proxy.calibration import calibration_crops

    syn = make_synthetic_dataset(tmp_path / "syn", n_images=16, n_salient=0, seed=3)
    ckpt = tiny_checkpoint(tmp_path / "c.pt", seed=4)
    rep = export_onnx(ckpt, tmp_path / "m.onnx")
    crops = calibration_crops(syn.ann_file, syn.image_dir, S, 1.2, 20, seed=1)
    assert crops.shape == (20, 3, S, S) and crops.dtype == np.uint8
    again = calibration_crops(syn.ann_file, syn.image_dir, S, 1.2, 20, seed=1)
    assert np.array_equal(crops, again)  # seeded
    q = quantize_onnx(rep.onnx_path, tmp_path / "m.int8.onnx", crops)
    proto = onnx.load(str(q))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert q.stat().st_size < rep.onnx_path.stat().st_size
    meta, meta32 = read_onnx_metadata(q), read_onnx_metadata(rep.onnx_path)
    ours = {k: v for k, v in meta.items() if k.startswith("boxcaseg.") and k != "boxcaseg.quantization"}
    assert ours == {k: v for k, v in meta32.items() if k.startswith("boxcaseg.")}
    assert "int8" in meta["boxcaseg.quantization"] and "20 crops" in meta["boxcaseg.quantization"]
    assert len(calibration_crops(syn.ann_file, syn.image_dir, S, 1.2, 10_000)) < 10_000  # all there are
    x = crops[:8]
    p32 = load_engine("onnx", rep.onnx_path).predict(x)
    p8 = load_engine("onnx", q).predict(x)
    assert p8.shape == p32.shape
    assert float(np.abs(p8 - p32).mean()) < 0.03


def test_int8_needs_calibration_boxes(tmp_path, capsys):
    from conftest import run_cli

    ckpt = tiny_checkpoint(tmp_path / "c.pt")
    assert run_cli(["export", str(ckpt), "-o", str(tmp_path / "m.onnx"), "--int8"]) == 2
    assert "--int8 needs --calib-ann and --calib-images" in capsys.readouterr().err
    out = tmp_path / "n.onnx"
    assert run_cli(["export", str(ckpt), "-o", str(out), "--int8", "--calib-ann", str(tmp_path / "missing.json"),
                    "--calib-images", str(tmp_path)]) == 2
    assert "missing.json: calibration file not found" in capsys.readouterr().err
    assert not out.exists()  # checked before anything is exported


def test_exported_graph_holds_no_source_paths(exported):
    """The exporter's per-node stack traces name this checkout's files and lines: stripped, so a
    graph's bytes (and the shipped int8 graph's sha256) do not depend on where the code lies."""
    from pathlib import Path

    import boxcaseg

    _, report = exported
    proto = onnx.load(str(report.onnx_path))
    assert [n.name for n in proto.graph.node if len(n.metadata_props)] == []
    data = Path(report.onnx_path).read_bytes()
    assert str(Path(boxcaseg.__file__).parent).encode() not in data and b"stack_trace" not in data
    assert read_onnx_metadata(report.onnx_path)["boxcaseg.infer_size"]  # the model-level keys stay
