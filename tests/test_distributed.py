"""Several processes: DDP training with gloo on CPU, spawned from the test, and torchrun."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from boxcaseg.config import Config
from boxcaseg.data.synthetic import make_synthetic_dataset
from boxcaseg.io import read_jsonl


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(synth, iters) -> Config:
    cfg = Config()
    cfg.model.backbone, cfg.model.head_channels = "test_efficientnet", 16
    cfg.data.box_ann, cfg.data.box_images, cfg.data.salient_dir = str(synth.ann_file), str(synth.image_dir), str(synth.salient_dir)
    cfg.data.patch_size, cfg.data.salient_resize = 48, 56
    cfg.data.box_per_batch, cfg.data.salient_per_batch, cfg.data.workers = 3, 2, 0
    cfg.train.max_iters, cfg.train.lr, cfg.train.ckpt_every, cfg.train.threads = iters, 0.05, 0, 1
    return cfg


def _worker(rank, world, port, synth, out, iters):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from boxcaseg import dist
    from boxcaseg.joint_training import train

    res = train(_cfg(synth, iters), out, show_progress=False)
    torch.save({k: v.detach().clone() for k, v in res.model.state_dict().items()}, os.path.join(out, f"rank{rank}.pt"))
    dist.cleanup()


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("synth"), n_images=16, n_salient=16, image_size=(96, 72))


def test_two_process_gloo_training(synth, tmp_path):
    iters = 24
    mp.spawn(_worker, args=(2, _free_port(), synth, str(tmp_path), iters), nprocs=2, join=True)
    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert w0.keys() == w1.keys()
    for k in w0:
        torch.testing.assert_close(w0[k], w1[k], rtol=0, atol=0, msg=k)
    rows = read_jsonl(tmp_path / "metrics.jsonl")  # rank 0 only writes
    assert [r["iter"] for r in rows] == list(range(1, iters + 1))
    loss = np.array([r["loss"] for r in rows])
    assert loss[-6:].mean() < loss[:6].mean()
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2


def test_torchrun_cli(synth, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "boxcaseg", "train", "--out", str(tmp_path), "--box-ann", str(synth.ann_file),
           "--box-images", str(synth.image_dir), "--salient-dir", str(synth.salient_dir), "--max-iters", "3",
           "--batch-size", "4", "--set", "model.backbone='test_efficientnet'", "--set", "model.head_channels=8",
           "--set", "data.patch_size=32", "--set", "data.salient_resize=40", "--set", "data.workers=0",
           "--set", "train.threads=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [r["iter"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert out.stdout.count("done:") == 1  # only rank 0 reports
    # resume with the world size it was saved with, and in one process
    cmd_resume = [c if c != "3" else "5" for c in cmd] + ["--resume"]
    out = subprocess.run(cmd_resume, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [r["iter"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    single = [sys.executable, "-m", "boxcaseg"] + cmd[cmd.index("train"):]
    single = [c if c != "3" else "6" for c in single] + ["--resume"]
    out = subprocess.run(single, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [r["iter"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
