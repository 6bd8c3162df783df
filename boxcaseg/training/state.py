"""Training state that a checkpoint must carry for an exact resume.

Every RNG state in types ``torch.load(weights_only=True)`` accepts, their per-rank
gathering with BN-statistics averaging before a checkpoint, and the weights' moving
average (:class:`WeightEMA`).
"""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    """Every RNG state, in types ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": list(py_state), "python_version": version, "python_gauss": py_gauss,
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    ns = state["numpy"]
    np.random.set_state((ns["name"], ns["keys"].numpy().astype(np.uint32), ns["pos"], ns["has_gauss"], ns["gauss"]))
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_rng_and_buffers(model: torch.nn.Module, distributed: bool, world: int) -> list[dict]:
    """Before a checkpoint: average floating buffers (BN running statistics, which DDP
    does not synchronise) over ranks, and gather every rank's RNG state (rank order)."""
    state = rng_state()
    if not distributed:
        return [state]
    with torch.no_grad():
        for buf in model.buffers():
            if buf.is_floating_point():
                torch.distributed.all_reduce(buf)
                buf /= world
    gathered: list = [None] * world
    torch.distributed.all_gather_object(gathered, state)
    return gathered


class WeightEMA:
    """An exponential moving average of a model's weights (parameters and buffers).

    Update n (1-based) sets ``e = d_n * e + (1 - d_n) * w`` for every floating-point entry
    of the state dict, with ``d_n = min(decay, (1 + n) / (10 + n))``: the warm-up keeps
    the early average from clinging to the initial weights. Integer buffers (BatchNorm's
    ``num_batches_tracked``) are copied. (torch's ``swa_utils.AveragedModel`` with an EMA
    function has no such warm-up and keeps a second module; this keeps a state dict, which
    is what the checkpoint stores.)
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay {decay!r} is not in (0, 1)")
        self.decay = float(decay)
        self.updates = 0
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def factor(self) -> float:
        """The decay the next update uses."""
        n = self.updates + 1
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = self.factor()
        self.updates += 1
        for k, v in model.state_dict().items():
            e = self.state[k]
            if e.is_floating_point():
                e.mul_(d).add_(v.detach().to(e.dtype), alpha=1.0 - d)
            else:
                e.copy_(v)

    @classmethod
    def resume(cls, model: torch.nn.Module, decay: float, ckpt: dict | None) -> "WeightEMA | None":
        """The average a run keeps (None when ``decay`` is 0): started from ``model``'s weights,
        or continued from ``ckpt`` when that checkpoint holds one."""
        if decay <= 0:
            return None
        ema = cls(model, decay)
        if ckpt is not None and "model_live" in ckpt:
            ema.load(ckpt["model"], ckpt.get("ema_updates", 0))
        return ema

    def load(self, state: dict[str, torch.Tensor], updates: int) -> None:
        for k, v in state.items():
            self.state[k].copy_(v)
        self.updates = int(updates)
