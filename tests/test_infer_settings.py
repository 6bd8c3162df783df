"""The one inference-settings type (boxcaseg.infer_settings): every field round-trips through
the metadata text, a training config, the merge with user overrides and an output's info with
no per-field code elsewhere; a field added to the type alone reaches an exported file's
metadata, a proxy run's info and Segmenter; the metadata of files written before is unchanged."""

from __future__ import annotations

import dataclasses
import json

import pytest

from boxcaseg.errors import BoxcasegError
from boxcaseg.infer_settings import FIELDS, Field, InferSettings, _unit_problem


def _other_values() -> dict:
    """A valid value other than the default for every field."""
    return {"infer_size": 96, "context": 1.25, "threshold": 0.375, "prior_weight": 0.125, "alpha": 0.625}


def test_every_field_round_trips_through_metadata_config_merge_and_info():
    values = _other_values()
    assert set(values) == set(FIELDS) == {f.name for f in dataclasses.fields(InferSettings)}
    st = InferSettings(**values).check()
    meta = st.to_metadata()
    assert list(meta) == [f"boxcaseg.{n}" for n in FIELDS]
    assert InferSettings.from_metadata({**meta, "boxcaseg.output_stride": "4"}, "m.onnx") == st
    model = type("ModelConfig", (), {f.config_key: values[n] for n, f in FIELDS.items()})()
    assert InferSettings.from_model_config(model) == st
    assert st.as_info() == values
    assert InferSettings(values["infer_size"]).merged(**{n: values[n] for n in FIELDS}) == st
    assert st.merged(**{n: None for n in FIELDS}) == st  # None keeps the model's value
    with pytest.raises(KeyError):
        st.merged(gamma=0.5)


def test_defaults_and_ranges_in_one_place():
    from boxcaseg.config import ModelConfig

    m = ModelConfig()
    assert InferSettings.from_model_config(m) == InferSettings()  # the config's defaults are the type's
    missing = InferSettings.from_metadata({"boxcaseg.infer_size": "64"}, "old.onnx")
    assert missing == InferSettings(64)  # files from before the settings travelled
    for name, bad in (("infer_size", 30), ("context", 0.5), ("threshold", 1.5), ("prior_weight", -0.1),
                      ("alpha", float("nan"))):
        with pytest.raises(BoxcasegError, match=f"--{name.replace('_', '-')}"):
            InferSettings(64).merged(**{name: bad}).check(lambda n: "--" + n.replace("_", "-"))


def test_onnx_metadata_text_is_as_before():
    """The exported metadata, key order and texts, as files written before the type carry them."""
    from boxcaseg.config import Config
    from boxcaseg.export.onnx_export import _metadata

    cfg = Config()
    cfg.model.infer_context, cfg.model.infer_threshold, cfg.model.infer_prior_weight = 1.2, 0.45, 0.1
    wrapper = type("W", (), {"flip_tta": False, "stride": 4})()
    meta = _metadata(cfg, wrapper, "dynamo", "ab" * 32, 160)
    assert list(meta.items())[:7] == [
        ("boxcaseg.format", "1"), ("boxcaseg.infer_size", "160"), ("boxcaseg.tta", "none"),
        ("boxcaseg.alpha", repr(float(cfg.model.alpha))), ("boxcaseg.context", "1.2"),
        ("boxcaseg.threshold", "0.45"), ("boxcaseg.prior_weight", "0.1")]
    assert list(meta)[7:] == ["boxcaseg.backbone", "boxcaseg.input", "boxcaseg.normalization", "boxcaseg.output",
                              "boxcaseg.output_stride", "boxcaseg.exporter", "boxcaseg.checkpoint_sha256"]


@pytest.fixture()
def gamma(monkeypatch):
    """A new setting ``gamma`` added the way the type says: a field with its default and its
    FIELDS entry (no config key, no flag). The modules that name the class get the new one."""
    import boxcaseg.export.onnx_export
    import boxcaseg.infer_settings
    import boxcaseg.model_files

    new = dataclasses.make_dataclass("InferSettings", [("gamma", float, dataclasses.field(default=0.25))],
                                     bases=(InferSettings,), frozen=True)
    for mod in (boxcaseg.infer_settings, boxcaseg.model_files, boxcaseg.export.onnx_export):
        monkeypatch.setattr(mod, "InferSettings", new)
    monkeypatch.setitem(FIELDS, "gamma", Field(None, float, _unit_problem, "gamma {:g}"))
    return new


def test_a_new_field_reaches_the_metadata_the_proxy_info_and_segmenter(gamma, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    import onnx
    from test_predictor import tiny_checkpoint
    from test_proxy import small_coco

    from boxcaseg import Segmenter
    from boxcaseg.export import export_onnx, read_onnx_metadata
    from boxcaseg.proxy import ProxyConfig, generate_proxy

    monkeypatch.setenv("BOXCASEG_CACHE", str(tmp_path / "cache"))
    rep = export_onnx(tiny_checkpoint(tmp_path / "m.pt"), tmp_path / "m.onnx")
    assert read_onnx_metadata(rep.onnx_path)["boxcaseg.gamma"] == "0.25"  # the default, written like the others
    proto = onnx.load(str(rep.onnx_path))
    next(p for p in proto.metadata_props if p.key == "boxcaseg.gamma").value = "0.125"
    onnx.save(proto, str(tmp_path / "g.onnx"))

    ann, images = small_coco(tmp_path / "data", n_images=2)
    summary = generate_proxy(ProxyConfig(ann=ann, images=images, out=tmp_path / "p.json", model=tmp_path / "g.onnx",
                                         batch_size=4, workers=0, progress=False))
    info = json.loads((tmp_path / "p.json").read_text())["info"]["boxcaseg_proxy"]
    assert info["gamma"] == 0.125 and summary["settings"]["gamma"] == 0.125
    seg = Segmenter(tmp_path / "g.onnx")
    assert seg.settings.gamma == 0.125 and "gamma 0.125" in seg.describe()
