"""`generate_proxy` / `boxcaseg proxy`: output format, shards, kill-and-resume, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from boxcaseg.errors import BoxcasegError
from boxcaseg.export import export_onnx
from boxcaseg.masks import decode
from boxcaseg.proxy import ProxyConfig, generate_proxy, merge_shards
from boxcaseg.proxy.geometry import box_window

REPO = Path(__file__).resolve().parents[1]


def tiny_checkpoint(path, infer_size: int = 64):
    from test_export import tiny_checkpoint as make  # same checkpoint recipe as the export tests

    return make(path, infer_size)


def small_coco(root: Path, n_images: int = 10) -> tuple[Path, Path]:
    """A synthetic COCO set (boxcaseg.data.synthetic) plus a crowd annotation and extra fields."""
    from boxcaseg.data.synthetic import make_synthetic_dataset

    paths = make_synthetic_dataset(root, n_images=n_images, n_salient=0, image_size=(96, 72), max_objects=3, seed=3)
    data = json.loads(paths.ann_file.read_text())
    data["info"] = {"description": "test set", "version": "1"}
    first = data["annotations"][0]
    data["annotations"].append({"id": 9999, "image_id": first["image_id"], "category_id": 1, "iscrowd": 1,
                                "bbox": first["bbox"], "area": 10.0,
                                "segmentation": {"size": [72, 96], "counts": [0, 10, 6902]}})
    data["annotations"][1]["extra_field"] = "kept"
    paths.ann_file.write_text(json.dumps(data))
    return paths.ann_file, paths.image_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("proxy")
    ckpt = tiny_checkpoint(d / "last.pt")
    onnx_path = export_onnx(ckpt, d / "model.onnx").onnx_path
    ann, images = small_coco(d / "data")
    return {"dir": d, "ckpt": ckpt, "onnx": onnx_path, "ann": ann, "images": images}


def cfg_for(setup, out, **kw) -> ProxyConfig:
    base = dict(ann=setup["ann"], images=setup["images"], out=out, model=setup["onnx"], engine="onnx",
                batch_size=4, workers=0, checkpoint_every=3, progress=False, merge=True)
    base.update(kw)
    return ProxyConfig(**base)


@pytest.fixture(scope="module")
def single_run(setup):
    out = setup["dir"] / "single" / "proxy.json"
    summary = generate_proxy(cfg_for(setup, out))
    return out, summary


def test_output_is_input_with_rle_agreement_and_flags(setup, single_run):
    from pycocotools.coco import COCO

    out, summary = single_run
    src = json.loads(setup["ann"].read_text())
    res = json.loads(out.read_text())
    assert res["images"] == src["images"] and res["categories"] == src["categories"]
    # the input's info is kept; the run's model and settings are recorded beside it
    rec = res["info"].pop("boxcaseg_proxy")
    assert res["info"] == src["info"]
    assert rec["context"] == 1.0 and rec["threshold"] == 0.5 and rec["prior_weight"] == 0.0 and rec["merge"] is True
    assert rec["infer_size"] == summary["settings"]["infer_size"] and rec["model_sha256"]
    assert len(res["annotations"]) == len(src["annotations"])
    imgs = {im["id"]: im for im in src["images"]}
    by_image: dict = {}
    for a, b in zip(src["annotations"], res["annotations"]):
        if a.get("iscrowd"):
            assert b == a  # crowd annotations untouched
            continue
        assert {k: v for k, v in b.items() if k not in ("segmentation", "proxy_agreement", "ignore_mask")} == \
            {k: v for k, v in a.items() if k != "segmentation"}
        im = imgs[a["image_id"]]
        seg = b["segmentation"]
        assert isinstance(seg["counts"], str) and seg["size"] == [im["height"], im["width"]]
        assert isinstance(b["proxy_agreement"], float) and isinstance(b["ignore_mask"], bool)
        assert b["ignore_mask"] == (b["proxy_agreement"] < 0.95)
        m = decode(seg, im["height"], im["width"])
        x0, y0, x1, y1 = box_window(a["bbox"], im["width"], im["height"])
        assert m.sum() == m[y0:y1, x0:x1].sum()  # confined to the box
        by_image.setdefault(a["image_id"], []).append(m)
    for masks in by_image.values():
        assert (np.sum(masks, axis=0) <= 1).all()  # merged: no pixel has two owners
    n_noncrowd = sum(1 for a in src["annotations"] if not a.get("iscrowd"))
    assert summary["instances"] == summary["masks"] == n_noncrowd and summary["crowd"] == 1
    assert summary["flagged"] == sum(b.get("ignore_mask", False) for b in res["annotations"])
    COCO(str(out))  # pycocotools loads it
    assert not (out.parent / "proxy.json.progress").exists()


def test_sharded_run_plus_merge_equals_single_run(setup, single_run, monkeypatch):
    single, _ = single_run
    out = setup["dir"] / "sharded" / "proxy.json"
    monkeypatch.setenv("RANK", "1")  # torchrun's environment picks the shard when --shard is absent
    monkeypatch.setenv("WORLD_SIZE", "2")
    s1 = generate_proxy(cfg_for(setup, out))
    assert s1["shard"] == "1/2" and Path(s1["output"]).name == "proxy.shard-1-of-2.json"
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(BoxcasegError, match="shard.*0/2.*not finished"):
        merge_shards(setup["ann"], out)
    s0 = generate_proxy(cfg_for(setup, out, shard="0/2"))
    assert s0["images"] + s1["images"] == 10
    merged = merge_shards(setup["ann"], out)
    assert merged["shards"] == 2
    assert out.read_bytes() == single.read_bytes()


def test_cli_merge_shards_joins_shard_files(setup, single_run, capsys):
    """`boxcaseg proxy --merge-shards` (no --images): the shard files of --shard K/N runs -> OUT."""
    from conftest import run_cli

    single, _ = single_run
    out = setup["dir"] / "cli_shards" / "proxy.json"
    for k in range(2):
        generate_proxy(cfg_for(setup, out, shard=f"{k}/2"))
    assert not out.exists()
    assert run_cli(["proxy", "--merge-shards", "--ann", str(setup["ann"]), "-o", str(out)]) == 0
    assert "merged 2 shards" in capsys.readouterr().out
    assert out.read_bytes() == single.read_bytes()


@pytest.fixture
def slow_chunks_cli():
    """``slow_chunks_cli(seconds)``: the argv prefix of a ``boxcaseg`` CLI subprocess whose
    proxy run sleeps ``seconds`` after each saved chunk (the library hook
    ``boxcaseg.proxy.chunk_writer.on_chunk_written``, installed by a tiny launcher before the CLI
    runs: monkeypatching cannot reach a subprocess that the test kills)."""

    def prefix(seconds: float) -> list[str]:
        code = ("import time; import boxcaseg.proxy.chunk_writer as chunk_writer; "
                f"chunk_writer.on_chunk_written = lambda chunk: time.sleep({float(seconds)!r}); "
                "from boxcaseg.cli import main; main()")
        return [sys.executable, "-c", code]

    return prefix


def kill_after_first_chunk(argv: list[str], progress: Path) -> list[str]:
    """Start the CLI ``argv``, SIGKILL it once its first chunk file is in ``progress``;
    returns the chunk files saved by then."""
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list(progress.glob("chunk-*.json")):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no progress file appeared"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return sorted(p.name for p in progress.glob("chunk-*.json"))


def test_resume_after_kill_gives_identical_output(setup, single_run, slow_chunks_cli):
    single, _ = single_run
    out = setup["dir"] / "resume" / "proxy.json"
    args = ["proxy", "--engine", "onnx", "--model", str(setup["onnx"]),
            "--ann", str(setup["ann"]), "--images", str(setup["images"]), "-o", str(out),
            "--batch-size", "4", "--checkpoint-every", "3", "--workers", "1", "--no-progress", "--merge"]
    cmd = [sys.executable, "-m", "boxcaseg", *args]
    progress = out.parent / "proxy.json.progress" / "shard-0-of-1"
    done = kill_after_first_chunk(slow_chunks_cli(1.5) + args, progress)
    assert 1 <= len(done) < 4 and not out.exists()
    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["resumed_chunks"] == len(done) and summary["chunks"] == 4
    assert out.read_bytes() == single.read_bytes()


def test_progress_of_another_run_is_not_mixed_in(setup):
    out = setup["dir"] / "mixed" / "proxy.json"
    prog = out.parent / "proxy.json.progress" / "shard-0-of-1"
    prog.mkdir(parents=True)
    (prog / "meta.json").write_text(json.dumps({"format": 1, "threshold": 0.3}))
    with pytest.raises(BoxcasegError, match="other inputs or options"):
        generate_proxy(cfg_for(setup, out))


def test_context_relative_and_torch_engine(setup):
    out = setup["dir"] / "ctx" / "proxy.json"
    s = generate_proxy(cfg_for(setup, out, context=1.5, relative=True, engine="torch", model=setup["ckpt"], workers=1))
    assert s["masks"] == s["instances"] and s["empty_masks"] == 0  # the relative rule always gives a foreground
    res = json.loads(out.read_text())
    imgs = {im["id"]: im for im in res["images"]}
    for a in res["annotations"]:
        if not a.get("iscrowd"):
            im = imgs[a["image_id"]]
            m = decode(a["segmentation"], im["height"], im["width"])
            x0, y0, x1, y1 = box_window(a["bbox"], im["width"], im["height"])
            assert m.sum() == m[y0:y1, x0:x1].sum()


# --------------------------------------------------------------------------- bad input


def write_set(root: Path, images: list[tuple[str, Image.Image | bytes | None]], anns: list[dict], sizes=None) -> tuple[Path, Path]:
    (root / "images").mkdir(parents=True, exist_ok=True)
    recs = []
    for i, (name, content) in enumerate(images, start=1):
        if isinstance(content, Image.Image):
            content.save(root / "images" / name)
            w, h = content.size
        else:
            if content is not None:
                (root / "images" / name).write_bytes(content)
            w, h = (sizes or {}).get(name, (64, 48))
        recs.append({"id": i, "file_name": name, "width": w, "height": h})
    ann = root / "instances.json"
    ann.write_text(json.dumps({"images": recs, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}))
    return ann, root / "images"


def rgb(w=64, h=48, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def run(setup, ann, images, out, **kw):
    return generate_proxy(ProxyConfig(ann=ann, images=images, out=out, model=setup["onnx"], engine="onnx",
                                      batch_size=4, workers=0, progress=False, **kw))


def test_missing_and_corrupt_images_stop_or_are_flagged(setup, tmp_path):
    anns = [{"id": 11, "image_id": 1, "bbox": [2, 2, 20, 20], "category_id": 1, "iscrowd": 0},
            {"id": 12, "image_id": 2, "bbox": [2, 2, 20, 20], "category_id": 1, "iscrowd": 0},
            {"id": 13, "image_id": 3, "bbox": [5, 5, 30, 30], "category_id": 1, "iscrowd": 0}]
    ann, images = write_set(tmp_path / "a", [("ok.png", rgb()), ("missing.png", None), ("corrupt.jpg", b"\xff\xd8 not a jpeg")], anns)
    with pytest.raises(BoxcasegError, match=r"image id 2.*missing\.png"):
        run(setup, ann, images, tmp_path / "a.json")
    ann2, images2 = write_set(tmp_path / "b", [("ok.png", rgb()), ("ok2.png", rgb()), ("corrupt.jpg", b"\xff\xd8 not a jpeg")], anns)
    with pytest.raises(BoxcasegError, match=r"image id 3.*corrupt\.jpg"):
        run(setup, ann2, images2, tmp_path / "b.json")
    s = run(setup, ann, images, tmp_path / "c.json", skip_bad=True)
    assert s["bad_images"] == 2 and s["bad_image_annotations"] == 2 and s["masks"] == 1
    res = {a["id"]: a for a in json.loads((tmp_path / "c.json").read_text())["annotations"]}
    assert res[12]["ignore_mask"] and res[13]["ignore_mask"] and res[12]["proxy_agreement"] == 0.0
    assert res[12]["segmentation"]["size"] == [48, 64]


def test_image_size_disagreeing_with_json_is_bad(setup, tmp_path):
    anns = [{"id": 1, "image_id": 1, "bbox": [2, 2, 20, 20], "category_id": 1, "iscrowd": 0}]
    ann, images = write_set(tmp_path, [("a.png", None)], anns)
    rgb(50, 40).save(images / "a.png")
    with pytest.raises(BoxcasegError, match=r"image id 1.*50x40.*64x48"):
        run(setup, ann, images, tmp_path / "o.json")


def test_malformed_json_and_unknown_image(setup, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    (tmp_path / "images").mkdir()
    with pytest.raises(BoxcasegError, match="bad.json.*malformed"):
        run(setup, bad, tmp_path / "images", tmp_path / "o.json")
    anns = [{"id": 77, "image_id": 5, "bbox": [2, 2, 20, 20], "category_id": 1, "iscrowd": 0}]
    ann, images = write_set(tmp_path / "u", [("a.png", rgb())], anns)
    with pytest.raises(BoxcasegError, match="annotation 77 .*unknown image id 5"):
        run(setup, ann, images, tmp_path / "o.json")
    no_list = tmp_path / "nolist.json"
    no_list.write_text('{"images": []}')
    with pytest.raises(BoxcasegError, match="no 'annotations' list"):
        run(setup, no_list, tmp_path / "images", tmp_path / "o.json")


def test_degenerate_boxes_are_flagged_or_strict_errors(setup, tmp_path):
    anns = [{"id": 1, "image_id": 1, "bbox": [2, 2, 20, 20], "category_id": 1, "iscrowd": 0},
            {"id": 2, "image_id": 1, "bbox": [2, 2, float("nan"), 20], "category_id": 1, "iscrowd": 0},
            {"id": 3, "image_id": 1, "bbox": [2, 2, 0, 20], "category_id": 1, "iscrowd": 0},
            {"id": 4, "image_id": 1, "bbox": [100, 100, 5, 5], "category_id": 1, "iscrowd": 0},
            {"id": 5, "image_id": 1, "bbox": [10, 10, -3, 4], "category_id": 1, "iscrowd": 0},
            {"id": 6, "image_id": 1, "bbox": [60.5, 40.2, 30, 30], "category_id": 1, "iscrowd": 0},  # partly outside
            {"id": 7, "image_id": 1, "bbox": [3.2, 4.7, 0.3, 0.2], "category_id": 1, "iscrowd": 0}]  # sub-pixel
    ann, images = write_set(tmp_path, [("a.png", rgb())], anns)
    s = run(setup, ann, images, tmp_path / "o.json")
    assert s["degenerate"] == 4 and s["masks"] == 3 and s["instances"] == 7
    res = {a["id"]: a for a in json.loads((tmp_path / "o.json").read_text(), parse_constant=float)["annotations"]}
    for i in (2, 3, 4, 5):
        assert res[i]["ignore_mask"] is True and res[i]["proxy_agreement"] == 0.0
    m6 = decode(res[6]["segmentation"], 48, 64)
    assert m6[:40, :].sum() == 0 and m6[:, :60].sum() == 0  # clipped box window
    m7 = decode(res[7]["segmentation"], 48, 64)
    assert m7.sum() <= 1 and m7[4:5, 3:4].sum() == m7.sum()  # at least (and at most) one pixel
    with pytest.raises(BoxcasegError, match="annotation id 2 .*non-finite"):
        run(setup, ann, images, tmp_path / "p.json", strict=True)


def test_grayscale_cmyk_rgba_and_16bit_images_work(setup, tmp_path):
    base = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    ims = [("gray.png", Image.fromarray(base[..., 0], "L")),
           ("cmyk.jpg", Image.fromarray(base).convert("CMYK")),
           ("rgba.png", Image.fromarray(np.dstack([base, base[..., :1]]), "RGBA")),
           ("deep.png", Image.fromarray(base[..., 0].astype(np.uint16) * 257)),
           ("pal.png", Image.fromarray(base).convert("P"))]
    anns = [{"id": i, "image_id": i, "bbox": [4, 4, 30, 30], "category_id": 1, "iscrowd": 0} for i in range(1, 6)]
    ann, images = write_set(tmp_path, ims, anns)
    s = run(setup, ann, images, tmp_path / "o.json")
    assert s["masks"] == 5 and s["bad_images"] == 0


def test_cli_bad_inputs_one_line_exit_2(setup, tmp_path, capsys):
    from test_export import run_cli

    anns = [{"id": 1, "image_id": 1, "bbox": [2, 2, 20, 20], "category_id": 1, "iscrowd": 0}]
    ann, images = write_set(tmp_path, [("nothere.png", None)], anns)
    base = ["proxy", "--ann", str(ann), "--images", str(images), "-o", str(tmp_path / "o.json"), "--no-progress", "--workers", "0"]
    garbage = tmp_path / "junk.onnx"
    garbage.write_bytes(b"not a model")
    cases = [
        (["--model", str(setup["onnx"])], "nothere.png"),
        (["--model", str(garbage)], "not a valid ONNX"),              # junk named .onnx
        (["--model", str(setup["onnx"]), "--engine", "torch"], "model.onnx"),
        (["--model", str(setup["onnx"]), "--engine", "trt"], "TensorRT"),
        (["--model", str(setup["onnx"]), "--shard", "3/2"], "--shard"),
    ]
    for extra, needle in cases:
        shutil.rmtree(tmp_path / "o.json.progress", ignore_errors=True)
        assert run_cli(base + extra) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], (extra, err)


def test_torchrun_two_ranks_equal_one_process(setup, single_run):
    """`torchrun --nproc-per-node 2 -m boxcaseg proxy ...`: rank 0 merges; same bytes as one process."""
    import socket

    single, _ = single_run
    out = setup["dir"] / "torchrun" / "proxy.json"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           "-m", "boxcaseg", "proxy", "--engine", "onnx", "--model", str(setup["onnx"]),
           "--ann", str(setup["ann"]), "--images", str(setup["images"]), "-o", str(out),
           "--batch-size", "4", "--checkpoint-every", "3", "--workers", "0", "--threads", "1", "--no-progress", "--merge"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "rank 0 merged 2 shards" in res.stdout
    assert out.read_bytes() == single.read_bytes()


def test_prior_weight_one_gives_the_inscribed_ellipse(setup, tmp_path):
    from boxcaseg.baselines import ellipse_mask
    from boxcaseg.errors import BoxcasegError

    boxes = [[5.3, 4.7, 40.2, 30.9], [0.0, 0.0, 64.0, 48.0], [20.5, 10.25, 7.5, 21.0]]
    imgs = [(f"{i}.png", rgb(seed=i)) for i in range(len(boxes))]
    anns = [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for i, b in enumerate(boxes)]
    ann, images = write_set(tmp_path, imgs, anns)
    out = tmp_path / "proxy.json"
    run(setup, ann, images, out, prior_weight=1.0, threshold=0.5)
    res = json.loads(out.read_text())
    for a in res["annotations"]:
        m = decode(a["segmentation"], 48, 64)
        ref = ellipse_mask(a["bbox"], 48, 64)
        assert m.sum() > 0 and (m != ref).sum() <= 2, a["id"]  # rim pixels exactly at 0.5 may go either way
    with pytest.raises(BoxcasegError, match="--prior-weight"):
        run(setup, ann, images, tmp_path / "bad.json", prior_weight=1.5)


def test_no_merge_keeps_each_box_own_mask(setup, tmp_path):
    """The default (--no-merge): overlapping boxes keep their own (here: ellipse) masks; --merge
    gives the overlap to the smaller box. Agreement and ignore_mask are computed either way."""
    from test_export import run_cli

    from boxcaseg.baselines import ellipse_mask

    big, small = [4.0, 4.0, 50.0, 38.0], [20.0, 12.0, 16.0, 14.0]  # small lies inside big's ellipse
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": big, "area": 1.0, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": small, "area": 1.0, "iscrowd": 0}]
    ann, images = write_set(tmp_path, [("a.png", rgb(seed=5))], anns)
    res = {}
    for merge in (True, False):  # the CLI flag --merge, or the default
        out = tmp_path / f"proxy_{merge}.json"
        args = ["proxy", "--ann", str(ann), "--images", str(images), "-o", str(out), "--model", str(setup["onnx"]),
                "--prior-weight", "1", "--threshold", "0.5", "--workers", "0", "--batch-size", "4", "--no-progress"]
        assert run_cli(args + (["--merge"] if merge else [])) == 0
        data = json.loads(out.read_text())
        res[merge] = {a["id"]: (decode(a["segmentation"], 48, 64), a["proxy_agreement"], a["ignore_mask"])
                      for a in data["annotations"]}
    e_big, e_small = ellipse_mask(big, 48, 64), ellipse_mask(small, 48, 64)
    assert (e_big & e_small).sum() > 50
    for aid, ref in ((1, e_big), (2, e_small)):
        assert (res[False][aid][0] != ref).sum() <= 2, aid  # its own ellipse, overlap included
    assert (res[True][2][0] != e_small).sum() <= 2  # the smaller box wins the overlap ...
    assert not (res[True][1][0] & res[True][2][0]).any()  # ... and the bigger one loses it
    assert (res[True][1][0] != (e_big & ~e_small.astype(bool))).sum() <= 4
    assert res[False][1][1] == pytest.approx(res[True][1][1], abs=0.05)  # tight boxes barely move here
    assert 0.8 < res[False][1][1] <= 1.0
    for merge in (True, False):  # ignore_mask follows the agreement, --drop-thresh (0.95) and --drop-slack
        for aid, (_mask, agreement, ignore) in res[merge].items():  # (0.5 px) in both modes
            w, h = (big, small)[aid - 1][2:]
            assert ignore == (agreement < min(0.95, (w - 0.5) * (h - 0.5) / (w * h)))


def test_summary_times_every_stage_after_a_warm_up(single_run):
    """Per-stage times (warm-up kept out of the steady-state clock) that add up: the post
    thread's parts within its total, the steady rate at least the whole run's."""
    _, s = single_run
    t = s["timings"]
    stages = ("warmup", "decode", "wait", "pack", "inference", "post", "masks", "write", "steady")
    assert set(stages) <= set(t) and all(t[k] >= 0 for k in stages)
    assert t["warmup"] > 0 and t["inference"] > 0 and t["steady"] > 0
    assert t["masks"] + t["write"] <= t["post"] + 1e-3
    assert t["steady"] + t["warmup"] <= s["seconds"] + 1e-3
    assert s["steady_instances_per_s"] >= s["instances_per_s"] > 0
