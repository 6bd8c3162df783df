"""The one training loop of both trainers (BoxCaseg and the Proxy Mask R-CNN).

A trainer builds its data, model, optimizer and schedule, then hands them to a
:class:`Run`, which owns what the two have in common: the process (torchrun rank,
world, device), exact resume from ``out_dir/last.pt``, the DDP wrap, the step
(zero-grad, backward, optional clipping, optimizer, moving average, schedule),
``metrics.jsonl``, the progress bar and the atomic checkpoints. A trainer gives the
loop one function, ``step(batch, it) -> (named losses, images in the batch)``; the
losses' ``"loss"`` entry is what is minimised, every entry is logged.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from boxcaseg import dist
from boxcaseg.errors import BoxcasegError
from boxcaseg.io import JsonlWriter, atomic_torch_save, check_output_dir, check_outputs, safe_torch_load
from boxcaseg.training.state import WeightEMA, checkpoint_rng_and_buffers, set_rng_state

log = logging.getLogger(__name__)
CKPT_NAME = "last.pt"
METRICS_NAME = "metrics.jsonl"
StepFn = Callable[[Any, int], "tuple[dict[str, torch.Tensor], int]"]


@dataclass
class TrainResult:
    out_dir: Path
    iters: int
    first_loss: float
    last_loss: float
    seconds: float
    images_per_s: float
    model: torch.nn.Module | None = None


def worker_init(_) -> None:
    """DataLoader workers: one torch thread each (the main process owns the cores)."""
    torch.set_num_threads(1)


def progress_bar(label: str, enabled: bool):
    """A rich progress bar with a ``stats`` text field (loss terms, lr, img/s) and ETA."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), disable=not enabled)


class Run:
    """One training run of one process: rank, world, device and ``out_dir/last.pt``.

    Creating it joins the torchrun process group when there is one and picks the device
    (``train.device``; "auto" is this rank's GPU, else the CPU).
    """

    def __init__(self, out_dir: str | Path, device: str, label: str, inputs: Iterable = ()):
        self.out_dir = check_output_dir(out_dir, "--out")  # before any work: a folder last.pt can be written in
        check_outputs({f"--out ({name})": self.out_dir / name for name in (CKPT_NAME, METRICS_NAME)}, list(inputs),
                      folders={"--out": self.out_dir})  # never over (nor among) the data, the weights it reads
        self.ckpt_path = self.out_dir / CKPT_NAME
        self.label = label
        self.distributed = dist.init_from_env()
        self.rank, self.world = dist.rank(), dist.world_size()
        self.is_main = self.rank == 0
        self.device = dist.resolve_device(device, "train.device")

    def load_resume(self, load: Callable[[Path], dict] = safe_torch_load) -> dict:
        """The checkpoint to resume from (a one-line error when there is none)."""
        if not self.ckpt_path.is_file():
            raise BoxcasegError(f"{self.ckpt_path}: no checkpoint to resume from")
        return load(self.ckpt_path)

    def restore(self, ckpt: dict, model: torch.nn.Module, optimizer, scheduler) -> int:
        """Model (the live weights when a moving average was saved), optimizer, schedule and
        this rank's RNG streams from ``ckpt``; returns the iteration reached."""
        model.load_state_dict(ckpt.get("model_live", ckpt["model"]))
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step = int(ckpt["iter"])
        if int(ckpt.get("world_size", 1)) == self.world and ckpt.get("rng"):
            set_rng_state(ckpt["rng"][self.rank])
        else:
            log.warning("%s: saved with %s process(es), resumed with %d: RNG streams restart",
                        self.ckpt_path, ckpt.get("world_size"), self.world)
        if self.is_main:
            log.info("resumed from %s at iteration %d", self.ckpt_path, step)
        return step

    def wrap(self, model: torch.nn.Module, **ddp_options) -> torch.nn.Module:
        """``model`` in DistributedDataParallel under torchrun, else itself."""
        if not self.distributed:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, **ddp_options)

    def fit(self, *, net: torch.nn.Module, model: torch.nn.Module, optimizer, scheduler,
            loader: Iterable, step: StepFn, start: int, end: int, max_iters: int, ckpt_every: int,
            config: dict, stats: Callable[[dict], str], extra_state: dict | None = None,
            ema: WeightEMA | None = None, clip_grad: float = 0.0, average_logged: bool = False,
            what: str = "loss", show_progress: bool = True) -> TrainResult:
        """Run iterations ``start + 1 .. end`` of a ``max_iters`` schedule over ``loader``.

        ``step(batch, it)`` computes the named losses of one batch (``"loss"`` is minimised);
        ``average_logged``: log their mean over ranks rather than rank 0's. ``clip_grad`` > 0
        clips the gradient norm of the trainable parameters. ``stats(record)`` is the
        progress bar's text. A checkpoint every ``ckpt_every`` iterations and at the end holds
        the model (``ema``'s average as ``model`` and the live weights as ``model_live``),
        optimizer, schedule, iteration, ``config``, ``extra_state``, world size and every
        rank's RNG state; ``what`` names the loss in the non-finite error.
        """
        metrics = JsonlWriter(self.out_dir / METRICS_NAME, truncate_after_iter=start) if self.is_main else None
        params = [p for p in model.parameters() if p.requires_grad]
        first_loss = last_loss = float("nan")
        t0 = time.perf_counter()
        n_images = 0
        it = start
        with progress_bar(self.label, self.is_main and show_progress) as progress:
            task = progress.add_task(self.label, total=max_iters, completed=start, stats="")
            t_last = time.perf_counter()
            for batch in loader:
                it += 1
                losses, batch_images = step(batch, it)
                loss = losses["loss"]
                if not torch.isfinite(loss):
                    raise BoxcasegError(f"{what} became non-finite at iteration {it} "
                                        f"(learning rate {scheduler.get_last_lr()[0]:.3g} too high?)")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if clip_grad > 0:
                    torch.nn.utils.clip_grad_norm_(params, clip_grad)
                optimizer.step()
                if ema is not None:
                    ema.update(model)
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                now = time.perf_counter()
                batch_images *= self.world
                n_images += batch_images
                rec = {"iter": it, **self._logged(losses, average_logged), "lr": lr,
                       "img_s": batch_images / max(now - t_last, 1e-9), "time": now - t0}
                t_last = now
                if math.isnan(first_loss):
                    first_loss = rec["loss"]
                last_loss = rec["loss"]
                if metrics:
                    metrics.write(rec)
                progress.update(task, completed=it, stats=stats(rec))
                if ckpt_every and it % ckpt_every == 0 and it != end:
                    self.save(it, model, optimizer, scheduler, config, extra_state, ema)
        self.save(it, model, optimizer, scheduler, config, extra_state, ema)
        if metrics:
            metrics.close()
        seconds = time.perf_counter() - t0
        dist.barrier()
        return TrainResult(self.out_dir, it, first_loss, last_loss, seconds, n_images / max(seconds, 1e-9), model)

    def _logged(self, losses: dict[str, torch.Tensor], average: bool) -> dict[str, float]:
        if not (average and self.distributed):
            return {k: float(v.detach()) for k, v in losses.items()}
        stacked = torch.stack([v.detach().float() for v in losses.values()])
        torch.distributed.all_reduce(stacked)
        stacked /= self.world
        return {k: float(v) for k, v in zip(losses, stacked)}

    def save(self, it: int, model: torch.nn.Module, optimizer, scheduler, config: dict,
             extra_state: dict | None = None, ema: WeightEMA | None = None) -> None:
        """The checkpoint (atomic, rank 0) after BN statistics are averaged over ranks."""
        rng = checkpoint_rng_and_buffers(model, self.distributed, self.world)
        if not self.is_main:
            return
        state = {"model": model.state_dict()}
        if ema is not None:  # the average is the deliverable; the live weights resume training
            state = {"model": ema.state, "model_live": state["model"], "ema_updates": ema.updates}
        atomic_torch_save({**state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                           "iter": it, "config": config, **(extra_state or {}), "world_size": self.world,
                           "rng": rng}, self.ckpt_path)
