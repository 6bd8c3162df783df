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


@pytest.mark.parametrize("local_rank", [0, 3])
def test_torchrun_env_alone_decides_before_any_process_group(cuda_present, monkeypatch, local_rank):
    """The proxy opens its engine before the process group exists: the environment decides."""
    monkeypatch.setattr(dist, "is_distributed", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    assert dist.resolve_device("auto") == torch.device("cuda", local_rank)
    assert dist.resolve_device("cuda") == torch.device("cuda", local_rank)
    assert dist.resolve_device("cuda:6") == torch.device("cuda", 6)  # by hand


def test_auto_alone_is_gpu_0_and_a_named_gpu_is_kept(cuda_present, monkeypatch):
    monkeypatch.setattr(dist, "is_distributed", lambda: False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "3")  # ignored outside torchrun
    assert dist.resolve_device("auto") == torch.device("cuda", 0)
    assert dist.resolve_device("cuda") == torch.device("cuda", 0)
    assert dist.resolve_device("cuda:2") == torch.device("cuda", 2)
    with pytest.raises(BoxcasegError, match="GPU 9 asked for, this machine has 8"):
        dist.resolve_device("cuda:9", "--device")


def test_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dist.resolve_device("auto") == torch.device("cpu")
    assert dist.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(BoxcasegError, match=r"train.device='cuda:1' but no CUDA device is available"):
        dist.resolve_device("cuda:1", "train.device")


def test_a_bad_name_is_one_line_error():
    with pytest.raises(BoxcasegError, match="--device='gpu0'"):
        dist.resolve_device("gpu0", "--device")


GPU_PROVIDERS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.mark.parametrize("local_rank", [0, 2])
def test_every_engine_runs_on_its_ranks_gpu(cuda_present, monkeypatch, local_rank):
    """Under torchrun the torch engine's device, ONNX Runtime's CUDA/TensorRT providers
    (device_id) and the TensorRT engine's device are LOCAL_RANK's GPU; --device cuda:K wins."""
    from boxcaseg.export.engines import engine_device, onnx_providers

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    providers = onnx_providers(available=GPU_PROVIDERS)
    assert [p if isinstance(p, str) else p[0] for p in providers] == GPU_PROVIDERS
    assert providers[0][1]["device_id"] == local_rank and providers[1][1] == {"device_id": local_rank}
    assert onnx_providers(device="cuda:5", available=GPU_PROVIDERS)[1] == ("CUDAExecutionProvider", {"device_id": 5})
    assert onnx_providers(device="cpu", available=GPU_PROVIDERS) == ["CPUExecutionProvider"]
    assert onnx_providers(available=["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    # the fingerprint names no GPU index: shards of ranks on different GPUs join
    assert engine_device("torch") == "cuda" and engine_device("torch", "cuda:3") == "cuda"


def test_torch_engine_opens_on_the_resolved_device(monkeypatch, tmp_path):
    """TorchEngine asks dist.resolve_device (CPU here: the call and its argument are what is checked)."""
    from test_export import tiny_checkpoint

    from boxcaseg.export import engines

    seen = []
    real = engines.resolve_device
    monkeypatch.setattr(engines, "resolve_device", lambda name, setting="device": seen.append(name) or real("cpu"))
    eng = engines.load_engine("torch", tiny_checkpoint(tmp_path / "c.pt"), device="cuda:1")
    assert seen == ["cuda:1"] and eng.device == torch.device("cpu")
