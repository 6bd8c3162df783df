"""``boxcaseg demo`` end to end, shrunk (tiny backbone, few iterations) to stay fast."""

from __future__ import annotations

import json

from PIL import Image

from boxcaseg.cli import main


def test_demo_writes_report(tmp_path, capsys):
    out = tmp_path / "demo"
    try:
        main(["demo", "--out", str(out), "--iters", "4", "--images", "6", "--salient", "6",
              "--backbone", "test_efficientnet", "--backbone-weights", "", "--size", "64"])
    except SystemExit as e:  # typer exits 0 on success
        assert e.code in (0, None)
    report = out / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["train"]["iters"] == 4
    assert metrics["boxcaseg"]["n"] == metrics["box_fill"]["n"] > 0
    assert 0.0 <= metrics["boxcaseg"]["miou_star"] <= 1.0
    assert metrics["onnx_max_abs_diff"] <= 1e-4
    with Image.open(report / "loss_curve.png") as im:
        assert im.size[0] > 100
    assert list((report / "overlays").glob("*.png"))
    assert "box-fill" in (report / "README.md").read_text()
    printed = capsys.readouterr().out
    assert "report:" in printed and "box-fill" in printed
