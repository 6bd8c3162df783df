"""torch.distributed helpers driven by torchrun's environment variables."""

from __future__ import annotations

import os

import torch
import torch.distributed as torch_dist


def env_rank_world() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) from torchrun's environment, (0, 1) without it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env() -> bool:
    """Initialise the default process group when launched by torchrun (WORLD_SIZE > 1).

    NCCL on CUDA, gloo on CPU. Returns True when distributed.
    """
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch_dist.init_process_group(backend=backend)
    return True


def resolve_device(name: str, setting: str = "device") -> torch.device:
    """A device setting ("auto", "cpu", "cuda", "cuda:K") as a torch device.

    "auto": this process's GPU when CUDA is available (``LOCAL_RANK``'s under torchrun,
    else GPU 0), otherwise the CPU. A CUDA name without CUDA is a one-line error.
    """
    from boxcaseg.errors import BoxcasegError

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if is_distributed() else 0)
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BoxcasegError(f"{setting}={name!r} but no CUDA device is available")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise BoxcasegError(f"{setting}={name!r}: {str(e).splitlines()[0]}") from e


def barrier() -> None:
    if is_distributed():
        torch_dist.barrier()


def cleanup() -> None:
    if is_distributed():
        torch_dist.destroy_process_group()
