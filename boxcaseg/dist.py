"""torch.distributed helpers driven by torchrun's environment variables."""

from __future__ import annotations

import os
import re

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


def local_rank() -> int:
    """This process's index on its machine: ``LOCAL_RANK`` under torchrun (set before any
    process group exists), else 0."""
    if is_distributed() or env_rank_world()[1] > 1:
        return int(os.environ.get("LOCAL_RANK", 0))
    return 0


DEVICE_NAMES = "auto, cpu, cuda or cuda:K"


def check_device_name(name: str | None, setting: str = "--device") -> None:
    """BoxcasegError unless ``name`` is None or a device boxcaseg runs on: auto, cpu, cuda, cuda:K
    (torch knows many more names -- tpu is not one, mps or xla are -- that no engine here runs on)."""
    from boxcaseg.errors import BoxcasegError

    if name is None or name in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", str(name)):
        return
    raise BoxcasegError(f"{setting}={name!r}: not a device boxcaseg runs on (choose {DEVICE_NAMES})")


def device_type(name: str | None, setting: str = "device") -> str:
    """"cuda" or "cpu": the kind of device a setting names (None or "auto": CUDA when it is
    available), without checking that the GPU exists (:func:`resolve_device` does)."""
    check_device_name(name or "auto", setting)
    if not name or name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if name.startswith("cuda") else "cpu"


def resolve_device(name: str, setting: str = "device") -> torch.device:
    """A device setting ("auto", "cpu", "cuda", "cuda:K") as a torch device.

    "auto": this process's GPU when CUDA is available, otherwise the CPU; "cuda": this
    process's GPU. This process's GPU is ``LOCAL_RANK``'s under torchrun (one GPU per
    rank), else GPU 0; "cuda:K" picks one by hand. A CUDA name without CUDA, or a K the
    machine does not have, is a one-line error naming ``setting``.
    """
    from boxcaseg.errors import BoxcasegError

    if name == "auto":
        name = device_type(name, setting)
    check_device_name(name, setting)
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BoxcasegError(f"{setting}={name!r} but no CUDA device is available")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise BoxcasegError(f"{setting}={name!r}: {str(e).splitlines()[0]}") from e
    if device.type == "cuda":
        index = local_rank() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise BoxcasegError(f"{setting}={name!r}: GPU {index} asked for, this machine has "
                                f"{torch.cuda.device_count()}")
        device = torch.device("cuda", index)
    return device


def barrier() -> None:
    if is_distributed():
        torch_dist.barrier()


def cleanup() -> None:
    if is_distributed():
        torch_dist.destroy_process_group()


def worker_context(uses_cuda: bool, preload: tuple[str, ...] = ()):
    """The multiprocessing context for this process's workers (data loaders, pools).

    ``fork`` (fast; children inherit imported modules and compiled kernels) unless this
    process uses CUDA: then ``forkserver``, whose children are forked from a clean server
    process started before any of this process's threads could hold a lock (a fork while
    another thread initialises CUDA or captures a graph can deadlock the child), and never
    from a CUDA process. ``preload``: modules the server imports once for its children.
    Where neither exists (not Linux): the platform's default.
    """
    import multiprocessing as mp

    methods = mp.get_all_start_methods()
    if uses_cuda and "forkserver" in methods:
        ctx = mp.get_context("forkserver")
        if preload:
            ctx.set_forkserver_preload(list(preload))
        return ctx
    if "fork" in methods:
        return mp.get_context("fork")
    return mp.get_context()
