"""The proxy pipeline that keeps a GPU busy, checked on the CPU (and on CUDA when there).

CPU: ``submit``/``result`` semantics and double-buffer order of every engine, the torch
engine's bf16 / channels_last against fp32, the process-pool post-processing giving the
thread's bytes (shards, bad images, kill-and-resume), the options' checks and the
per-stage timers. CUDA only (skipped here): page-locked double buffers, the copy
stream, CUDA graphs and fp16 / bf16 against fp32.

Stated tolerances against fp32 (max |p - p_fp32| over the maps, mean |p - p_fp32|, share of
map cells whose side of the threshold 0.4 flips), for the shipped Lite0 model at S=256 on
64 real coco-val crops, where the CPU measured (bf16: 0.97 / 0.0062 / 0.0063; fp16 computed
on the CPU: 0.21 / 0.0008 / 0.0007; fp32 channels_last: 1.1e-5 / 1e-7 / 0):

- bf16 (CPU or CUDA): mean 0.015, flips 0.02; no bound on the max (bf16's 8-bit mantissa
  moves the features ~5 %, and a few crops near the decision turn over whole regions);
- fp16 (CUDA): max 0.35, mean 0.002, flips 0.003;
- fp32 with channels_last or a CUDA graph: max 0.01, mean 1e-4, flips 0.001.

The masks' quality is what counts: mIoU* on coco-val within 0.005 of fp32's
(bench/proxy_throughput.py --quality; RESULTS "proxy_gpu").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from boxcaseg.errors import BoxcasegError
from boxcaseg.proxy import generate_proxy, merge_shards
from test_proxy import cfg_for, kill_after_first_chunk, setup, single_run, slow_chunks_cli, write_set, rgb  # noqa: F401 - fixtures

REPO = Path(__file__).resolve().parents[1]
TOL = {"bf16": (1.0, 0.015, 0.02), "fp16": (0.35, 0.002, 0.003), "fp32": (0.01, 1e-4, 0.001)}

cuda = pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")


def real_crops(n: int = 16, size: int = 256) -> np.ndarray:
    """Crops of coco-val boxes (the first images) as the pipeline makes them; synthetic when absent."""
    from conftest import shared_data_root

    from boxcaseg.data.transforms import crop_resize, open_rgb
    from boxcaseg.proxy.tasks import build_tasks

    root = shared_data_root() / "coco-val"
    out = np.zeros((n, 3, size, size), np.uint8)
    if not (root / "instances.json").is_file():
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[:size, :size] / size
        for k in range(n):  # smooth blobs on a plain background
            cx, cy, r = rng.uniform(0.3, 0.7, 3) * [1, 1, 0.6]
            blob = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r)
            out[k] = (blob * rng.integers(0, 256, 3)[:, None, None] + ~blob * 128).astype(np.uint8)
        return out
    data = json.loads((root / "instances.json").read_text())
    k = 0
    for t in build_tasks(data, 1.2, False, "coco-val"):
        if k == n:
            break
        img = open_rgb(root / "images" / t.file_name)
        for c in t.crops[:n - k]:
            out[k] = np.asarray(crop_resize(img, tuple(int(v) for v in c), size)).transpose(2, 0, 1)
            k += 1
    return out


def assert_close(p: np.ndarray, ref: np.ndarray, tol: tuple, thr: float = 0.4) -> None:
    d = np.abs(p - ref)
    flips = ((p > thr) != (ref > thr)).mean()
    assert p.shape == ref.shape and p.dtype == np.float32
    assert d.max() <= tol[0] and d.mean() <= tol[1] and flips <= tol[2], (d.max(), d.mean(), flips)


# --------------------------------------------------------------------------- engines: submit / result


def run_in_flight(eng, bufs, batches):
    """The pipeline's pattern: batch k+1 packed into the other buffer and submitted before
    batch k is collected. Returns the results in order and the last Pending."""
    got, inflight = [], None
    for k, b in enumerate(batches):
        bufs[k % 2][:] = b
        pend = eng.submit(bufs[k % 2])
        if inflight is not None:
            got.append(inflight.result())
        inflight = pend
    got.append(inflight.result())
    return got, inflight


@pytest.fixture(scope="module")
def engines(setup):  # noqa: F811
    from boxcaseg.export import load_engine

    return {"onnx": load_engine("onnx", setup["onnx"]), "torch": load_engine("torch", setup["ckpt"], device="cpu")}


@pytest.mark.parametrize("kind", ["onnx", "torch"])
def test_submit_then_result_equals_predict_in_order(engines, kind):
    """Double-buffered as the pipeline does it: batch k+1 packed and submitted before batch k
    is collected; every result is batch k's own and equals a synchronous predict."""
    eng = engines[kind]
    S = eng.infer_size
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, 256, (4, 3, S, S), dtype=np.uint8) for _ in range(5)]
    expected = [eng.predict(b) for b in batches]
    bufs = eng.input_buffers(4, 2)
    assert len(bufs) == 2 and all(b.shape == (4, 3, S, S) and b.dtype == np.uint8 for b in bufs)
    got, inflight = run_in_flight(eng, bufs, batches)
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)
    assert inflight.timings() is None  # CUDA events only


def test_torch_bf16_and_channels_last_close_to_fp32_on_cpu():
    """The shipped Lite0 at S=256 on real crops: bf16 within the stated tolerance of fp32,
    channels_last fp32 within float rounding; the default (fp32, NCHW) is the plain path."""
    from boxcaseg import weights
    from boxcaseg.export import load_engine

    x = real_crops(16)
    plain = load_engine("torch", weights.pretrained_path(), device="cpu", channels_last=False)
    assert not plain.channels_last and "channels_last" not in plain.description
    ref = plain.predict(x)
    for precision, cl in (("bf16", False), ("bf16", True), ("fp32", True), ("fp32", None)):
        eng = load_engine("torch", weights.pretrained_path(), device="cpu", precision=precision, channels_last=cl)
        assert precision in eng.description or precision == "fp32"
        assert eng.channels_last == (cl is not False)  # None: NHWC on the CPU
        assert ("channels_last" in eng.description) == eng.channels_last
        assert_close(eng.predict(x), ref, TOL[precision])
        assert_close(eng.submit(x).result(), ref, TOL[precision])


def test_channels_last_default_follows_the_device(setup):  # noqa: F811
    """None picks NHWC on the CPU and NCHW on CUDA; an explicit choice wins. A CPU torch run
    records it in the fingerprint and the output's settings; NCHW and the ONNX engine record
    nothing (their earlier progress files stay valid)."""
    from boxcaseg.export.engines import torch_channels_last
    from boxcaseg.proxy.options import _torch_options

    assert torch_channels_last(None, "cpu") and not torch_channels_last(None, "cuda")
    assert not torch_channels_last(False, "cpu") and torch_channels_last(True, "cuda")
    out = setup["dir"] / "cl" / "p.json"
    assert _torch_options(cfg_for(setup, out, engine="torch", model=setup["ckpt"], device="cpu")) == {"channels_last": True}
    assert _torch_options(cfg_for(setup, out, engine="torch", model=setup["ckpt"], device="cpu", channels_last=False)) == {}
    assert _torch_options(cfg_for(setup, out)) == {}


def test_engine_options_are_checked(setup):  # noqa: F811
    from boxcaseg.export import load_engine

    with pytest.raises(BoxcasegError, match="needs a CUDA device"):
        load_engine("torch", setup["ckpt"], device="cpu", precision="fp16")
    with pytest.raises(BoxcasegError, match="choose from fp32, fp16, bf16"):
        load_engine("torch", setup["ckpt"], device="cpu", precision="fp8")
    with pytest.raises(BoxcasegError, match="options of the torch engine"):
        load_engine("onnx", setup["onnx"], precision="bf16")
    with pytest.raises(BoxcasegError, match="options of the torch engine"):
        generate_proxy(cfg_for(setup, setup["dir"] / "opt" / "p.json", cuda_graph=True))
    with pytest.raises(BoxcasegError, match="needs a CUDA device"):
        generate_proxy(cfg_for(setup, setup["dir"] / "opt" / "p.json", engine="torch", model=setup["ckpt"],
                               device="cpu", precision="fp16"))
    with pytest.raises(BoxcasegError, match="--post-workers"):
        generate_proxy(cfg_for(setup, setup["dir"] / "opt" / "p.json", post_workers=-1))
    eng = load_engine("torch", setup["ckpt"], device="cpu", cuda_graph=True)  # ignored on the CPU
    assert not eng.cuda_graph and "graph" not in eng.description


# --------------------------------------------------------------------------- post-processing in a pool


def test_pool_post_processing_gives_the_thread_bytes(setup, single_run):  # noqa: F811
    """--post-workers 2 (one chunk per process) writes the bytes of the thread (0), merged or
    not, sharded or not; the stage timers are the workers' sums."""
    single, s0 = single_run
    assert s0["post_workers"] == 0 or os.cpu_count() > 4
    out = setup["dir"] / "pool" / "proxy.json"
    s = generate_proxy(cfg_for(setup, out, post_workers=2))
    assert out.read_bytes() == single.read_bytes()
    assert s["post_workers"] == 2 and s["masks"] == s0["masks"]
    t = s["timings"]
    assert t["post"] > 0 and t["masks"] > 0 and t["write"] > 0 and t["masks"] + t["write"] <= t["post"] + 1e-3
    for merge in (False,):
        a, b = setup["dir"] / "pool" / "nm-thread.json", setup["dir"] / "pool" / "nm-pool.json"
        generate_proxy(cfg_for(setup, a, merge=merge, post_workers=0, checkpoint_every=2))
        generate_proxy(cfg_for(setup, b, merge=merge, post_workers=3, checkpoint_every=2))
        assert a.read_bytes() == b.read_bytes()
    sharded = setup["dir"] / "pool-shards" / "proxy.json"
    for k in range(2):
        generate_proxy(cfg_for(setup, sharded, shard=f"{k}/2", post_workers=1 + k))
    merge_shards(setup["ann"], sharded)
    assert sharded.read_bytes() == single.read_bytes()


def test_workers_of_a_cuda_run_come_from_a_fork_server(setup, single_run, monkeypatch):  # noqa: F811
    """A run whose engine uses CUDA (faked here) starts its decode workers and its post pool
    from a fork server (never a fork of the process whose engine thread initialises CUDA),
    and writes the same bytes."""
    import multiprocessing as mp

    from boxcaseg import dist
    from boxcaseg.proxy import chunk_writer, decode, pipeline

    assert dist.worker_context(True).get_start_method() == "forkserver"
    assert dist.worker_context(False).get_start_method() == "fork"
    seen = []
    real_ctx = dist.worker_context

    def spy(uses_cuda, preload=()):
        ctx = real_ctx(uses_cuda, preload)
        seen.append(ctx.get_start_method())
        return ctx

    monkeypatch.setattr(dist, "worker_context", spy)
    monkeypatch.setattr(pipeline, "uses_cuda", lambda cfg: True)
    single, _ = single_run
    out = setup["dir"] / "forkserver" / "proxy.json"
    generate_proxy(cfg_for(setup, out, workers=1, post_workers=1))
    assert seen == ["forkserver", "forkserver"]          # the decode loader, then the post pool
    assert out.read_bytes() == single.read_bytes()
    assert mp.get_start_method(allow_none=True) in (None, "fork")  # the process default is untouched
    assert chunk_writer.PostPool and decode.WORKER_MODULES


def test_training_loader_of_a_cuda_run_uses_a_fork_server(monkeypatch):
    """The training loaders' workers: forked on a CPU run, from a fork server on a CUDA one."""
    import torch

    from boxcaseg import joint_training as train_mod
    from boxcaseg.config import Config

    class FakeRun:
        rank, world = 0, 1

        def __init__(self, kind):
            self.device = torch.device(kind)

    cfg = Config()
    cfg.data.workers = 2
    box = [0] * 10
    for kind, method in (("cpu", "fork"), ("cuda", "forkserver")):
        loader = train_mod.build_loader(cfg, box, None, 2, 0, FakeRun(kind), 0, 3)
        assert loader.multiprocessing_context.get_start_method() == method


def test_pool_with_bad_images_and_errors(setup, tmp_path):  # noqa: F811
    """Bad images flagged by the pool as by the thread; without --skip-bad the run stops."""
    boxes = [{"id": i, "image_id": i, "bbox": b, "category_id": 1, "iscrowd": 0}
             for i, b in ((1, [5, 5, 30, 20]), (2, [1, 1, 20, 20]), (3, [2, 3, 40, 30]))]
    ann, images = write_set(tmp_path, [("a.png", rgb()), ("b.png", b"not an image"), ("c.png", rgb(seed=2))], boxes)
    outs = []
    for w in (0, 2):
        out = tmp_path / f"out{w}.json"
        s = generate_proxy(cfg_for(setup, out, ann=ann, images=images, skip_bad=True, post_workers=w,
                                   checkpoint_every=1))
        assert s["bad_images"] == 1 and s["bad_image_annotations"] == 1
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    with pytest.raises(BoxcasegError, match="unreadable image"):
        generate_proxy(cfg_for(setup, tmp_path / "stop.json", ann=ann, images=images, post_workers=2))


def test_pool_resume_after_kill_gives_identical_output(setup, single_run, slow_chunks_cli):  # noqa: F811
    """Kill -9 the CLI while pool workers write chunks: no worker outlives it, and the rerun
    (with the pool again) continues from the saved chunks to the same bytes."""
    single, _ = single_run
    out = setup["dir"] / "pool-resume" / "proxy.json"
    args = ["proxy", "--engine", "onnx", "--model", str(setup["onnx"]), "--ann", str(setup["ann"]),
            "--images", str(setup["images"]), "-o", str(out), "--batch-size", "4", "--checkpoint-every", "3",
            "--workers", "1", "--no-progress", "--merge", "--post-workers", "2"]
    progress = out.parent / "proxy.json.progress" / "shard-0-of-1"
    done = kill_after_first_chunk(slow_chunks_cli(1.5) + args, progress)
    time.sleep(2.5)  # a pool worker outliving the run would finish its 1.5 s hook and write the next chunk
    assert sorted(p.name for p in progress.glob("chunk-*.json")) == done
    assert 1 <= len(done) < 4 and not out.exists()
    rerun = subprocess.run([sys.executable, "-m", "boxcaseg", *args], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["resumed_chunks"] == len(done) and summary["chunks"] == 4
    assert out.read_bytes() == single.read_bytes()


def test_default_post_workers_by_cores():
    from boxcaseg.proxy.pipeline import default_post_workers

    assert [default_post_workers(c) for c in (1, 2, 4, 8, 16, 64)] == [0, 0, 0, 2, 4, 4]


# --------------------------------------------------------------------------- the run with the torch engine options


def test_torch_bf16_run_flags_its_precision(setup, single_run, tmp_path):  # noqa: F811
    """A bf16 run: masks close to fp32's, the precision in the output's settings and in the
    fingerprint (its progress is not mixed with an fp32 run's); fp32 records nothing new."""
    from boxcaseg.masks import decode

    a, b = tmp_path / "fp32.json", tmp_path / "bf16.json"
    generate_proxy(cfg_for(setup, a, engine="torch", model=setup["ckpt"]))
    s = generate_proxy(cfg_for(setup, b, engine="torch", model=setup["ckpt"], precision="bf16", channels_last=True))
    assert "bf16" in s["engine"] and s["timings"]["h2d"] is None and s["timings"]["gpu"] is None
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert "precision" not in ra["info"]["boxcaseg_proxy"]
    assert rb["info"]["boxcaseg_proxy"]["precision"] == "bf16" and rb["info"]["boxcaseg_proxy"]["channels_last"]
    imgs = {im["id"]: im for im in ra["images"]}
    inter = union = 0
    for x, y in zip(ra["annotations"], rb["annotations"]):
        if x.get("iscrowd"):
            continue
        im = imgs[x["image_id"]]
        mx, my = decode(x["segmentation"], im["height"], im["width"]), decode(y["segmentation"], im["height"], im["width"])
        inter += int((mx & my).sum())
        union += int((mx | my).sum())
    assert inter / max(union, 1) > 0.95
    prog = tmp_path / "mix.json.progress" / "shard-0-of-1"
    from boxcaseg.proxy.options import fingerprint, resolve_proxy_config
    from boxcaseg.proxy.shards import Shard

    cfg, rm = resolve_proxy_config(cfg_for(setup, tmp_path / "mix.json", engine="torch", model=setup["ckpt"]))
    prog.mkdir(parents=True)
    (prog / "meta.json").write_text(json.dumps(fingerprint(cfg, Shard(0, 1), rm.settings.infer_size)))
    with pytest.raises(BoxcasegError, match="precision"):
        generate_proxy(cfg_for(setup, tmp_path / "mix.json", engine="torch", model=setup["ckpt"], precision="bf16"))


def test_json_read_overlaps_the_warm_up(single_run):  # noqa: F811
    """prepare (json read + tasks) and warm-up run side by side: both timed, the steady clock after both."""
    _, s = single_run
    t = s["timings"]
    assert t["prepare"] > 0 and t["warmup"] > 0
    assert t["steady"] + max(t["warmup"], t["prepare"]) <= s["seconds"] + 1e-3


# --------------------------------------------------------------------------- CUDA only


@pytest.fixture(scope="module")
def lite0():
    from boxcaseg import weights

    return weights.pretrained_path()


@cuda
@pytest.mark.parametrize("precision,graph,cl", [("fp32", True, False), ("fp16", False, True), ("fp16", True, True),
                                                 ("bf16", True, True)])
def test_cuda_precision_graph_against_fp32(lite0, precision, graph, cl):
    """fp16 / bf16, channels_last and the CUDA graph on the GPU against eager fp32 there, within TOL;
    the async double-buffered submit equals a synchronous predict of the same engine."""
    from boxcaseg.export import load_engine

    x = real_crops(32)
    ref = load_engine("torch", lite0, device="cuda").predict(x)
    eng = load_engine("torch", lite0, device="cuda", precision=precision, cuda_graph=graph, channels_last=cl)
    assert eng.cuda_graph == graph
    sync = eng.predict(x)
    assert_close(sync, ref, TOL[precision])
    bufs = eng.input_buffers(32, 2)
    assert all(b.shape == x.shape for b in bufs)
    order = [x, x[::-1].copy(), x, x[::-1].copy()]
    got, inflight = run_in_flight(eng, bufs, order)
    for g, b in zip(got, order):
        np.testing.assert_allclose(g, eng.predict(b), atol=1e-6)
    tm = inflight.timings()
    assert tm["h2d"] > 0 and tm["gpu"] > 0
    if graph:
        assert all(lane.graph is not None for lane in eng._lanes.values())


@cuda
def test_cuda_pinned_buffers_and_pageable_input(lite0):
    """input_buffers are page-locked; a pageable array or a torch tensor is accepted too;
    a result not read before its slot is reused is read out first, not overwritten."""
    import torch

    from boxcaseg.export import load_engine

    eng = load_engine("torch", lite0, device="cuda", cuda_graph=True)
    bufs = eng.input_buffers(8, 2)
    assert all(eng._host_tensor(b).is_pinned() for b in bufs)
    x = real_crops(8)
    ref = eng.predict(x)
    pend = [eng.submit(x), eng.submit(torch.from_numpy(x)), eng.submit(x[::-1].copy())]  # slot 0 reused by the third
    np.testing.assert_allclose(pend[0].result(), ref, atol=1e-6)
    np.testing.assert_allclose(pend[1].result(), ref, atol=1e-6)
    np.testing.assert_allclose(pend[2].result(), ref[::-1], atol=1e-6)


@cuda
def test_cuda_run_matches_fp32_masks(setup, tmp_path):  # noqa: F811
    """A whole proxy run on CUDA with fp16 + graph + channels_last + a post pool: masks close to eager fp32,
    h2d and gpu timed by CUDA events."""
    from boxcaseg.masks import decode

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    generate_proxy(cfg_for(setup, a, engine="torch", model=setup["ckpt"], device="cuda"))
    s = generate_proxy(cfg_for(setup, b, engine="torch", model=setup["ckpt"], device="cuda", precision="fp16",
                               cuda_graph=True, channels_last=True, post_workers=2))
    assert s["timings"]["h2d"] > 0 and s["timings"]["gpu"] > 0
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    imgs = {im["id"]: im for im in ra["images"]}
    inter = union = 0
    for x, y in zip(ra["annotations"], rb["annotations"]):
        if not x.get("iscrowd"):
            im = imgs[x["image_id"]]
            mx = decode(x["segmentation"], im["height"], im["width"])
            my = decode(y["segmentation"], im["height"], im["width"])
            inter += int((mx & my).sum())
            union += int((mx | my).sum())
    assert inter / max(union, 1) > 0.97
