"""Which device a process takes: ``dist.resolve_device`` under torchrun and alone (CUDA mocked)."""

from __future__ import annotations

import pytest
import torch

from boxcaseg import dist
from boxcaseg.errors import BoxcasegError


@pytest.fixture
def cuda_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)


@pytest.mark.parametrize("local_rank", [0, 1, 5])
def test_auto_is_local_ranks_gpu_under_torchrun(cuda_present, monkeypatch, local_rank):
    monkeypatch.setattr(dist, "is_distributed", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    assert dist.resolve_device("auto") == torch.device("cuda", local_rank)


def test_auto_alone_is_gpu_0_and_a_named_gpu_is_kept(cuda_present, monkeypatch):
    monkeypatch.setattr(dist, "is_distributed", lambda: False)
    monkeypatch.setenv("LOCAL_RANK", "3")  # ignored without a process group
    assert dist.resolve_device("auto") == torch.device("cuda", 0)
    assert dist.resolve_device("cuda:2") == torch.device("cuda", 2)


def test_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dist.resolve_device("auto") == torch.device("cpu")
    assert dist.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(BoxcasegError, match=r"train.device='cuda:1' but no CUDA device is available"):
        dist.resolve_device("cuda:1", "train.device")


def test_a_bad_name_is_one_line_error():
    with pytest.raises(BoxcasegError, match="--device='gpu0'"):
        dist.resolve_device("gpu0", "--device")
