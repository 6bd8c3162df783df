"""bench/domain.py: the "domain" table's scoring by image type, the settings sweep, the report.

- ``figures`` against a plain float64 loop over decoded masks (per type, mIoU* as the mean of the
  categories' means, flagged share and mean IoU of flagged / unflagged masks);
- ``eval --sweep`` (the network once per context, maps re-thresholded) gives, at every setting of
  its grid, the very masks and ``ignore_mask`` flags a ``boxcaseg proxy`` run gives at that setting;
- ``report``'s verdicts (wins, loses, the goal) follow from the records' figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}_under_test", REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


domain = _load("domain")


@pytest.fixture(scope="module")
def typed_set(tmp_path_factory):
    """A synthetic COCO set under <root>/dsb2018-nuclei/dev, each image given a type."""
    from boxcaseg.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("data")
    synth = make_synthetic_dataset(root / "synth", n_images=6, n_salient=0, image_size=(96, 72), max_objects=4, seed=11)
    dev = root / "dsb2018-nuclei" / "dev"
    dev.mkdir(parents=True)
    synth.image_dir.rename(dev / "images")
    data = json.loads(synth.ann_file.read_text())
    for k, im in enumerate(data["images"]):
        im["type"] = ("fluo", "he", "fluo", "brightfield", "he", "fluo")[k]
    (dev / "instances.json").write_text(json.dumps(data))
    train = root / "dsb2018-nuclei" / "train"  # the same images, boxes only (no segmentation to read)
    shutil.copytree(dev / "images", train / "images")
    boxes = dict(data, annotations=[{k: v for k, v in a.items() if k != "segmentation"} for a in data["annotations"]])
    (train / "instances.json").write_text(json.dumps(boxes))
    return root, dev / "instances.json", dev / "images", data


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny checkpoint, run on the torch engine (no ONNX export: the engines have their own tests)."""
    from test_export import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "last.pt", infer_size=64)


def _reference(gt: dict, preds: list[dict]) -> dict:
    """Per type and overall: n, mIoU* (mean over categories of their mean IoU), IoU@75, flagged share,
    mean IoU of flagged and unflagged masks; by decoding every mask and counting pixels in float64."""
    from boxcaseg.masks import decode

    ims = {im["id"]: im for im in gt["images"]}
    by_id = {p["id"]: p for p in preds}
    rows = []
    for a in gt["annotations"]:
        im = ims[a["image_id"]]
        g = decode(a["segmentation"], im["height"], im["width"]).astype(np.float64)
        p = by_id.get(a["id"])
        iou = 0.0
        if p is not None:
            q = decode(p["segmentation"], im["height"], im["width"]).astype(np.float64)
            union = np.maximum(g, q).sum()
            iou = float((g * q).sum() / union) if union else 0.0
        rows.append((im["type"], a["category_id"], iou, bool(p and p.get("ignore_mask"))))
    out = {}
    for group in ("all", "fluo", "he", "brightfield"):
        rs = [r for r in rows if group == "all" or r[0] == group]
        cats = sorted({r[1] for r in rs})
        flagged = [r[2] for r in rs if r[3]]
        kept = [r[2] for r in rs if not r[3]]
        out[group] = {"n": len(rs), "miou_star": float(np.mean([np.mean([r[2] for r in rs if r[1] == c]) for c in cats])),
                      "iou75": float(np.mean([r[2] >= 0.75 for r in rs])),
                      "flagged_share": len(flagged) / len(rs),
                      "iou_flagged": float(np.mean(flagged)) if flagged else None,
                      "iou_unflagged": float(np.mean(kept)) if kept else None}
    return out


def test_figures_by_type_against_a_plain_loop(typed_set):
    from boxcaseg.cocojson import load_coco
    from boxcaseg.masks import encode

    _, ann, _, data = typed_set
    rng = np.random.default_rng(7)
    ims = {im["id"]: im for im in data["images"]}
    preds = []
    for a in data["annotations"][:-1]:  # the last one has no prediction: IoU 0
        im = ims[a["image_id"]]
        m = rng.random((im["height"], im["width"])) < 0.02
        x, y, w, h = (int(round(v)) for v in a["bbox"])
        m[y:y + h, x:x + w] |= rng.random((h, w)) < rng.uniform(0.3, 1.0)
        preds.append({"id": a["id"], "image_id": a["image_id"], "category_id": 1, "segmentation": encode(m),
                      "ignore_mask": bool(rng.random() < 0.4)})
    figs = domain.figures(load_coco(ann, "gt"), preds, flags=True)
    ref = _reference(data, preds)
    assert list(figs) == ["all", "fluo", "he", "brightfield"]
    for group, r in ref.items():
        f = figs[group]
        assert f["n"] == r["n"] and f["flagged_share"] == pytest.approx(r["flagged_share"])
        for key in ("miou_star", "iou75", "iou_flagged", "iou_unflagged"):
            assert (f[key] is None) == (r[key] is None)
            if r[key] is not None:
                assert f[key] == pytest.approx(r[key], abs=1e-9), (group, key)
    assert figs["all"]["missing"] == 1 and sum(figs[t]["n"] for t in ("fluo", "he", "brightfield")) == figs["all"]["n"]
    # without flags: no flag figures
    assert "flagged_share" not in domain.figures(load_coco(ann, "gt"), preds, flags=False)["all"]


def test_sweep_gives_the_proxy_runs_masks_at_every_setting(typed_set, tiny_ckpt, tmp_path):
    _, ann, images, data = typed_set
    grid = ([1.0, 1.2], [0.4, 0.5], [0.0, 0.3])
    preds, timing = domain.sweep_predictions(ann, images, str(tiny_ckpt), *grid, engine="torch", progress=False)
    assert sorted(preds) == sorted((c, t, w) for c in grid[0] for t in grid[1] for w in grid[2])
    # the network ran once per context and image (one batch each here); the other settings reused its maps
    n_images = len({a["image_id"] for a in data["annotations"]})
    assert timing["network_batches"] == 2 * n_images and timing["reused_batches"] == 2 * n_images * 3
    for c, t, w in [(1.0, 0.4, 0.0), (1.2, 0.5, 0.3)]:
        figs, summary = domain.proxy_eval(ann, images, str(tiny_ckpt), tmp_path / f"p{c}{t}{w}.json", context=c,
                                          threshold=t, prior_weight=w, engine="torch",
                                          progress=False)
        proxy = {a["id"]: a for a in json.loads((tmp_path / f"p{c}{t}{w}.json").read_text())["annotations"]}
        got = preds[(c, t, w)]
        assert [p["id"] for p in got] == [a["id"] for a in data["annotations"]]
        for p in got:
            a = proxy[p["id"]]
            assert p["segmentation"] == a["segmentation"] and p["ignore_mask"] == a["ignore_mask"], (c, t, w, p["id"])
            assert p["proxy_agreement"] == pytest.approx(a["proxy_agreement"], abs=1e-12)
        # and so the same figures
        from boxcaseg.cocojson import load_coco

        assert domain.figures(load_coco(ann, "gt"), got, flags=True) == figs


def test_eval_sweep_and_baselines_write_records(typed_set, tiny_ckpt, tmp_path, monkeypatch):
    root, _, _, _ = typed_set
    monkeypatch.setenv("BOXCASEG_DATA", str(root))
    monkeypatch.setattr(domain, "RECORDS", tmp_path / "records")
    monkeypatch.setattr(domain, "RUNS", tmp_path / "runs")
    assert domain.main(["baselines"]) == 0
    torch_engine = ["--engine", "torch", "--no-progress"]
    assert domain.main(["eval", "--name", "tiny", "--model", str(tiny_ckpt), *torch_engine]) == 0
    assert domain.main(["eval", "--name", "tiny-grid", "--model", str(tiny_ckpt), "--sweep", "--threshold", "0.4,0.5",
                        *torch_engine]) == 0
    recs = domain.load_records()
    assert sorted(recs) == ["box-fill", "ellipse", "tiny", "tiny-grid"]
    one, grid = recs["tiny"], recs["tiny-grid"]
    from boxcaseg.io import file_sha256

    assert one["model_sha256"] == file_sha256(tiny_ckpt) and one["split"] == "dsb2018-nuclei/dev"
    assert one["instances_per_s"] > 0 and one["train_s"] is None and one["settings"]["threshold"] == 0.5
    # the grid's row at the model's own settings is the plain eval's figures
    own = next(r for r in grid["rows"] if r["threshold"] == one["settings"]["threshold"])
    assert own["figures"] == one["figures"] and len(grid["rows"]) == 2
    # its mean agreement and flagged share are the proxy output's (drop rule with the slack)
    out = json.loads((tmp_path / "runs" / "tiny-dev.json").read_text())
    agr = [a["proxy_agreement"] for a in out["annotations"] if not a.get("iscrowd")]
    assert own["mean_agreement"] == pytest.approx(float(np.mean(agr)), abs=1e-9)
    assert own["flagged_share"] == pytest.approx(float(np.mean([a["ignore_mask"] for a in out["annotations"]
                                                                if not a.get("iscrowd")])), abs=1e-12)
    # the mask-free rule: a boxes-only grid on the train split (no segmentation there) ...
    assert domain.main(["eval", "--name", "tiny-train", "--model", str(tiny_ckpt), "--sweep", "--boxes-only",
                        "--split", "train", "--threshold", "0.4,0.5", *torch_engine]) == 0
    boxes_only = domain.load_records()["tiny-train"]
    assert boxes_only["boxes_only"] and all("figures" not in r for r in boxes_only["rows"])
    # ... whose rows equal the dev grid's agreement (same images here), and the report scores its pick on dev
    for r, d in zip(boxes_only["rows"], grid["rows"]):
        assert r["mean_agreement"] == pytest.approx(d["mean_agreement"], abs=1e-12)
    pick = max(boxes_only["rows"], key=lambda r: r["mean_agreement"])
    table = domain.settings_rule_table(domain.load_records(), "dev")
    line = next(ln for ln in table.splitlines() if "train's boxes (tiny-train)" in ln)
    dev_row = next(r for r in grid["rows"] if r["threshold"] == pick["threshold"])
    assert f"t{pick['threshold']:g}" in line and domain._cell(dev_row["figures"]["all"]) in line
    best = max(grid["rows"], key=lambda r: (r["figures"]["all"]["miou_star"], r["figures"]["all"]["iou75"]))
    assert domain._cell(best["figures"]["all"]) in next(ln for ln in table.splitlines() if "upper bound" in ln)
    for name in ("tiny-train",):
        (tmp_path / "records" / f"{name}.json").unlink()
    # a bad name or model file: one line, nothing written
    with pytest.raises(SystemExit, match="--name"):
        domain.main(["eval", "--name", "../x", "--model", str(tiny_ckpt)])
    with pytest.raises(SystemExit, match="no such file"):
        domain.main(["eval", "--name", "y", "--model", str(tmp_path / "absent.pt")])
    assert sorted(domain.load_records()) == sorted(recs)


def _fig(miou, iou75, n=10):
    return {"n": n, "miou_star": miou, "miou": miou, "iou50": 0.9, "iou75": iou75, "missing": 0}


def test_report_verdicts_follow_the_figures(tmp_path, monkeypatch):
    monkeypatch.setattr(domain, "RECORDS", tmp_path)
    split = "dsb2018-nuclei/dev"

    def rec(name, kind, f):
        domain.write_record(name, {"name": name, "kind": kind, "split": split, "figures": f,
                                   "instances_per_s": 10.0, "threads": 1})

    rec("ellipse", "baseline", {"all": _fig(0.70, 0.50), "fluo": _fig(0.72, 0.55), "he": _fig(0.60, 0.30)})
    rec("mobilesam", "predictions", {"all": _fig(0.80, 0.70), "fluo": _fig(0.82, 0.75), "he": _fig(0.70, 0.50)})
    rec("shipped", "proxy", {"all": _fig(0.78, 0.69), "fluo": _fig(0.77, 0.66), "he": _fig(0.76, 0.62)})
    rec("ft", "proxy", {"all": _fig(0.90, 0.92), "fluo": _fig(0.90, 0.95), "he": _fig(0.80, 0.58)})
    body = domain.cmd_report(argparse.Namespace(split="dev", write=False))
    lines = body.splitlines()
    shipped = next(l for l in lines if l.startswith("- shipped model, zero-shot against MobileSAM"))
    assert "fluorescence -5.0 / -9.0" in shipped and "H&E tissue +6.0 / +12.0" in shipped
    assert "wins on H&E tissue" in shipped and "loses on all, fluorescence" in shipped
    ft = next(l for l in lines if l.startswith("- ft against MobileSAM"))
    assert "wins on all, fluorescence, H&E tissue" in ft
    goal = lines[lines.index(ft) + 1]
    assert "not met" in goal and "H&E tissue short by 0.0 / 2.0" in goal and "fluorescence" not in goal
    # table rows in the fixed order: box-fill (absent), ellipse, MobileSAM, shipped, then the others
    table = [l for l in lines if l.startswith("| ")][1:]
    assert [l.split("|")[1].strip() for l in table] == ["inscribed ellipse", "MobileSAM, same boxes",
                                                          "shipped model, zero-shot", "ft"]


def test_fine_tuning_time_read_beside_the_checkpoint(tiny_ckpt, tmp_path):
    """The metrics.jsonl beside a checkpoint gives the fine-tuning time over its resumes and the iterations."""
    import shutil

    ck = tmp_path / "ft" / "last.pt"
    ck.parent.mkdir()
    shutil.copy(tiny_ckpt, ck)
    times = [10.0, 20.0, 30.0, 5.0, 12.5]  # resumed after 30 s: the clock starts again
    (ck.parent / "metrics.jsonl").write_text("".join(json.dumps({"iter": i + 1, "time": t}) + "\n"
                                                     for i, t in enumerate(times)))
    prov = domain.model_provenance(str(ck))
    assert prov["train_s"] == pytest.approx(42.5) and prov["iters"] == 5
    assert domain.model_provenance("pretrained")["train_s"] is None
