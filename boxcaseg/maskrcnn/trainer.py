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
import os
from pathlib import Path

import torch

from boxcaseg.config import config_from_checkpoint
from boxcaseg.dist import worker_context
from boxcaseg.errors import BoxcasegError
from boxcaseg.io import safe_torch_load
from boxcaseg.training import Run, TrainResult, worker_init
from boxcaseg.maskrcnn.recipe import MaskRCNNConfig
from boxcaseg.maskrcnn.data import CocoMaskDataset, IterationSampler, collate
from boxcaseg.maskrcnn.network import build_maskrcnn

log = logging.getLogger(__name__)
LOSS_KEYS = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


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
                   stop_at: int | None = None, show_progress: bool = True) -> TrainResult:
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
           show_progress: bool) -> TrainResult:
    t = cfg.train
    run = Run(out_dir, t.device, "maskrcnn", [("--ann", cfg.data.ann), ("--images", cfg.data.images),
                                              ("model.backbone_weights", cfg.model.backbone_weights)])
    if not cfg.data.ann or not cfg.data.images:
        raise BoxcasegError("no training data: set data.ann (COCO json) and data.images (its image folder)")
    ckpt = load_resume(run, cfg) if resume else None
    dataset = build_dataset(cfg, ckpt)
    n_classes = number_of_classes(cfg, dataset)
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    # on --resume the checkpoint holds every weight: no download, no weight file, no random-init warning
    model = build_maskrcnn(cfg.model, n_classes, load_weights=ckpt is None).to(run.device)
    optimizer, scheduler = build_optimizer(model, t)
    torch.manual_seed(t.seed * 1000 + run.rank + 1)  # proposal sampling differs between ranks
    step = run.restore(ckpt, model, optimizer, scheduler) if ckpt else 0
    net = run.wrap(model, find_unused_parameters=True)
    end = min(t.max_iters, stop_at) if stop_at else t.max_iters
    sampler = IterationSampler(len(dataset), cfg.data.batch_size, t.seed, run.rank, run.world, step, end, cfg.data.hflip)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.data.workers,
        generator=torch.Generator().manual_seed(t.seed),  # leaves the global RNG alone
        worker_init_fn=worker_init if cfg.data.workers else None,
        # workers of a CUDA process come from a fork server, never a fork of the CUDA process
        multiprocessing_context=worker_context(run.device.type == "cuda") if cfg.data.workers else None,
    )
    if run.is_main:
        log.info("Mask R-CNN (%s) on %d images of %s, %d classes, %d iterations, %d process(es) on %s",
                 cfg.model.backbone, len(dataset), cfg.data.ann, n_classes, t.max_iters, run.world, run.device)
    net.train()
    return run.fit(net=net, model=model, optimizer=optimizer, scheduler=scheduler, loader=loader,
                   step=loss_step(net, run.device), start=step, end=end, max_iters=t.max_iters,
                   ckpt_every=t.ckpt_every, config=cfg.to_dict(),
                   extra_state={"category_ids": list(dataset.category_ids)}, stats=_stats,
                   clip_grad=t.clip_grad, average_logged=True, what="Mask R-CNN loss",
                   show_progress=show_progress)


def load_resume(run: Run, cfg: MaskRCNNConfig) -> dict:
    """``out_dir/last.pt``, checked to hold this run's network."""
    ckpt = run.load_resume(load_checkpoint)
    saved = config_from_checkpoint(ckpt["config"], str(run.ckpt_path), MaskRCNNConfig)
    if saved.model != cfg.model:
        raise BoxcasegError(f"{run.ckpt_path}: the checkpoint's [model] config differs from this run's")
    return ckpt


def build_dataset(cfg: MaskRCNNConfig, ckpt: dict | None) -> CocoMaskDataset:
    """The training images; a resumed run keeps its checkpoint's category order."""
    return CocoMaskDataset(cfg.data.ann, cfg.data.images,
                           category_ids=ckpt["category_ids"] if ckpt is not None else None,
                           use_ignore=cfg.data.use_ignore, skip_empty=cfg.data.skip_empty,
                           image_ids=cfg.data.image_ids or None)


def number_of_classes(cfg: MaskRCNNConfig, dataset: CocoMaskDataset) -> int:
    n_classes = cfg.model.num_classes or len(dataset.category_ids)
    if n_classes < len(dataset.category_ids):
        raise BoxcasegError(f"model.num_classes={n_classes} but {cfg.data.ann} has "
                            f"{len(dataset.category_ids)} categories")
    return n_classes


def build_optimizer(model: torch.nn.Module, t):
    """SGD over the trainable parameters and the warm-up + step schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, t.warmup_iters, t.warmup_factor, t.steps, t.gamma))
    return optimizer, scheduler


def loss_step(net: torch.nn.Module, device: torch.device):
    """The loop's ``step``: a batch of images through Mask R-CNN's losses (their sum is minimised)."""

    def step(batch, it: int):
        images, targets = batch
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: v.to(device, non_blocking=True) for k, v in tg.items()} for tg in targets]
        losses = net(images, targets)
        loss = sum(losses[k] for k in LOSS_KEYS if k in losses)
        return {"loss": loss, **{k: losses[k] for k in LOSS_KEYS}}, len(images)

    return step


def _stats(rec: dict) -> str:
    return (f"loss {rec['loss']:.3f} (cls {rec['loss_classifier']:.3f} box {rec['loss_box_reg']:.3f} "
            f"mask {rec['loss_mask']:.3f}) lr {rec['lr']:.2e} {rec['img_s']:.1f} img/s")
