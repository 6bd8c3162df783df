"""Train the Proxy Mask R-CNN: ``train_maskrcnn(cfg, out_dir)``, behind ``boxcaseg maskrcnn train``.

One process or torchrun (DDP: gloo on CPU, NCCL on GPU; each process takes its own
slots of every global batch). Rank 0 shows progress and writes ``out_dir/metrics.jsonl``
(``iter`` from 1) and ``out_dir/last.pt`` (atomically: model, optimizer, scheduler,
iteration, per-rank RNG states, config, category ids). ``resume=True`` continues
exactly: the data stream is a function of the iteration (see ``maskrcnn.data``) and the
RNG states that torchvision's samplers draw from are restored.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from boxcaseg import dist
from boxcaseg.config import config_from_checkpoint
from boxcaseg.errors import BoxcasegError
from boxcaseg.io import JsonlWriter, atomic_torch_save, safe_torch_load
from boxcaseg.loop import checkpoint_rng_and_buffers, progress_bar, set_rng_state, worker_init
from boxcaseg.maskrcnn.config import MaskRCNNConfig
from boxcaseg.maskrcnn.data import CocoMaskDataset, IterationSampler, collate
from boxcaseg.maskrcnn.model import build_maskrcnn

log = logging.getLogger(__name__)
CKPT_NAME = "last.pt"
LOSS_KEYS = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


@dataclass
class MaskRCNNTrainResult:
    out_dir: Path
    iters: int
    first_loss: float
    last_loss: float
    seconds: float
    images_per_s: float


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if dist.is_distributed() else 0)
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BoxcasegError(f"train.device={name!r} but no CUDA device is available")
    return torch.device(name)


def lr_factor(step: int, warmup_iters: int, warmup_factor: float, steps: list[int], gamma: float) -> float:
    """lr multiplier at 0-based ``step``: linear warm-up from ``warmup_factor``, then x ``gamma``
    at every milestone in ``steps`` already reached (Detectron's 1x schedule)."""
    f = gamma ** bisect.bisect_right(sorted(steps), step)
    if step < warmup_iters:
        alpha = step / warmup_iters
        f *= warmup_factor * (1 - alpha) + alpha
    return f


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A Mask R-CNN checkpoint (``last.pt``), loaded without running code; checked for its keys."""
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict) or not {"model", "config", "category_ids"} <= set(ckpt):
        raise BoxcasegError(f"{path}: not a boxcaseg Mask R-CNN checkpoint (model/config/category_ids missing)")
    return ckpt


def model_from_checkpoint(ckpt: dict, source: str = "checkpoint"):
    """(model in eval mode, its config, category ids) from a loaded checkpoint (its stored
    config read as untrusted input: :func:`boxcaseg.config.config_from_checkpoint`)."""
    cfg = config_from_checkpoint(ckpt["config"], source, MaskRCNNConfig)
    cats = [int(c) for c in ckpt["category_ids"]]
    model = build_maskrcnn(cfg.model, len(cats), load_weights=False)  # the checkpoint holds the weights
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg, cats


def train_maskrcnn(cfg: MaskRCNNConfig, out_dir: str | os.PathLike, resume: bool = False,
                   stop_at: int | None = None, show_progress: bool = True) -> MaskRCNNTrainResult:
    """Train Mask R-CNN per ``cfg`` on ``cfg.data.ann`` (+ ``cfg.data.images``).

    resume: continue exactly from ``out_dir/last.pt``. stop_at: stop (with a checkpoint)
    after this iteration while the schedule still runs to ``cfg.train.max_iters``.
    """
    threads_before = torch.get_num_threads()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        return _train(cfg, Path(out_dir), resume, stop_at, show_progress)
    finally:
        torch.set_num_threads(threads_before)


def _train(cfg: MaskRCNNConfig, out_dir: Path, resume: bool, stop_at: int | None,
           show_progress: bool) -> MaskRCNNTrainResult:
    distributed = dist.init_from_env()
    rank, world = dist.rank(), dist.world_size()
    is_main = rank == 0
    t = cfg.train
    device = resolve_device(t.device)
    ckpt_path = out_dir / CKPT_NAME
    if not cfg.data.ann or not cfg.data.images:
        raise BoxcasegError("no training data: set data.ann (COCO json) and data.images (its image folder)")

    ckpt = None
    if resume:
        if not ckpt_path.is_file():
            raise BoxcasegError(f"{ckpt_path}: no checkpoint to resume from")
        ckpt = load_checkpoint(ckpt_path)
        saved = config_from_checkpoint(ckpt["config"], str(ckpt_path), MaskRCNNConfig)
        if saved.model != cfg.model:
            raise BoxcasegError(f"{ckpt_path}: the checkpoint's [model] config differs from this run's")

    dataset = CocoMaskDataset(cfg.data.ann, cfg.data.images,
                              category_ids=ckpt["category_ids"] if ckpt is not None else None,
                              use_ignore=cfg.data.use_ignore, skip_empty=cfg.data.skip_empty,
                              image_ids=cfg.data.image_ids or None)
    n_classes = cfg.model.num_classes or len(dataset.category_ids)
    if n_classes < len(dataset.category_ids):
        raise BoxcasegError(f"model.num_classes={n_classes} but {cfg.data.ann} has "
                            f"{len(dataset.category_ids)} categories")

    torch.manual_seed(t.seed)  # the same initial weights on every rank
    # on --resume the checkpoint holds every weight: no download, no weight file, no random-init warning
    model = build_maskrcnn(cfg.model, n_classes, load_weights=ckpt is None).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, t.warmup_iters, t.warmup_factor, t.steps, t.gamma))
    torch.manual_seed(t.seed * 1000 + rank + 1)  # proposal sampling differs between ranks
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step = int(ckpt["iter"])
        if int(ckpt.get("world_size", 1)) == world and ckpt.get("rng"):
            set_rng_state(ckpt["rng"][rank])
        else:
            log.warning("%s: saved with %s process(es), resumed with %d: RNG streams restart",
                        ckpt_path, ckpt.get("world_size"), world)
        if is_main:
            log.info("resumed from %s at iteration %d", ckpt_path, step)
    net = model
    if distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)

    end = min(t.max_iters, stop_at) if stop_at else t.max_iters
    sampler = IterationSampler(len(dataset), cfg.data.batch_size, t.seed, rank, world, step, end, cfg.data.hflip)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.data.workers,
        generator=torch.Generator().manual_seed(t.seed),  # leaves the global RNG alone
        worker_init_fn=worker_init if cfg.data.workers else None,
    )
    metrics = JsonlWriter(out_dir / "metrics.jsonl", truncate_after_iter=step) if is_main else None
    if is_main:
        log.info("Mask R-CNN (%s) on %d images of %s, %d classes, %d iterations, %d process(es) on %s",
                 cfg.model.backbone, len(dataset), cfg.data.ann, n_classes, t.max_iters, world, device)

    def save(it: int) -> None:
        # BN running statistics differ between ranks: the checkpoint holds their mean
        rng = checkpoint_rng_and_buffers(model, distributed, world)
        if is_main:
            atomic_torch_save({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "iter": it, "config": cfg.to_dict(),
                "category_ids": list(dataset.category_ids), "world_size": world, "rng": rng,
            }, ckpt_path)

    first_loss = last_loss = float("nan")
    t0 = time.perf_counter()
    n_images = 0
    net.train()
    it = step
    with progress_bar("maskrcnn", is_main and show_progress) as progress:
        task = progress.add_task("maskrcnn", total=t.max_iters, completed=step, stats="")
        t_last = time.perf_counter()
        for images, targets in loader:
            it += 1
            images = [im.to(device, non_blocking=True) for im in images]
            targets = [{k: v.to(device, non_blocking=True) for k, v in tg.items()} for tg in targets]
            losses = net(images, targets)
            loss = sum(losses[k] for k in LOSS_KEYS if k in losses)
            if not torch.isfinite(loss):
                raise BoxcasegError(f"Mask R-CNN loss became non-finite at iteration {it} "
                                    f"(learning rate {scheduler.get_last_lr()[0]:.3g} too high?)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if t.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(params, t.clip_grad)
            optimizer.step()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            logged = torch.stack([loss.detach()] + [losses[k].detach() for k in LOSS_KEYS]).float()
            if distributed:
                torch.distributed.all_reduce(logged)
                logged /= world
            now = time.perf_counter()
            batch_imgs = len(images) * world
            n_images += batch_imgs
            rec = {"iter": it, "loss": float(logged[0]), **{k: float(v) for k, v in zip(LOSS_KEYS, logged[1:])},
                   "lr": lr, "img_s": batch_imgs / max(now - t_last, 1e-9), "time": now - t0}
            t_last = now
            if math.isnan(first_loss):
                first_loss = rec["loss"]
            last_loss = rec["loss"]
            if metrics:
                metrics.write(rec)
            progress.update(task, completed=it, stats=(
                f"loss {rec['loss']:.3f} (cls {rec['loss_classifier']:.3f} box {rec['loss_box_reg']:.3f} "
                f"mask {rec['loss_mask']:.3f}) lr {lr:.2e} {rec['img_s']:.1f} img/s"))
            if t.ckpt_every and it % t.ckpt_every == 0 and it != end:
                save(it)
    save(it)
    if metrics:
        metrics.close()
    seconds = time.perf_counter() - t0
    dist.barrier()
    return MaskRCNNTrainResult(out_dir, it, first_loss, last_loss, seconds, n_images / max(seconds, 1e-9))
