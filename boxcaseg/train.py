"""Joint BoxCaseg training: box patches + salient patches, three heads, weight transfer.

``train(cfg, out_dir)`` is the library entry point behind ``boxcaseg train``; it works
in one process or under torchrun (DDP: gloo on CPU, NCCL on GPU). Rank 0 logs, shows
progress and writes ``out_dir/metrics.jsonl`` and ``out_dir/last.pt``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from boxcaseg import dist
from boxcaseg.config import Config, config_from_checkpoint
from boxcaseg.data.coco import BoxPatchDataset
from boxcaseg.data.salient import SalientDataset
from boxcaseg.data.sampler import MixedBatchSampler, MixedDataset, collate
from boxcaseg.errors import BoxcasegError
from boxcaseg.io import JsonlWriter, atomic_torch_save, safe_torch_load
from boxcaseg.losses import boxcaseg_loss
from boxcaseg.loop import WeightEMA, checkpoint_rng_and_buffers, progress_bar, set_rng_state, worker_init
from boxcaseg.model import build_model
from boxcaseg.model.backbone import warn_random_init

log = logging.getLogger(__name__)
CKPT_NAME = "last.pt"


@dataclass
class TrainResult:
    out_dir: Path
    iters: int
    first_loss: float
    last_loss: float
    seconds: float
    images_per_s: float
    model: torch.nn.Module | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if dist.is_distributed() and torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BoxcasegError(f"train.device={name!r} but no CUDA device is available")
    return torch.device(name)


def build_datasets(cfg: Config):
    d = cfg.data
    box_ds = sal_ds = None
    if d.box_ann:
        if not d.box_images:
            raise BoxcasegError("data.box_ann is set but data.box_images (the image folder) is not")
        box_ds = BoxPatchDataset(d.box_ann, d.box_images, d.patch_size, d.jitter_shift,
                                 (d.jitter_scale_min, d.jitter_scale_max), d.hflip_box, d.skip_bad, d.strict,
                                 pseudo_ann=d.pseudo_ann or None)
    elif d.pseudo_ann:
        raise BoxcasegError("data.pseudo_ann is set but data.box_ann (the boxes it belongs to) is not")
    if d.salient_dir:
        sal_ds = SalientDataset(d.salient_dir, d.salient_resize, d.patch_size, d.skip_bad, d.salient_box_crop,
                                d.jitter_shift, (d.jitter_scale_min, d.jitter_scale_max))
    if box_ds is None and sal_ds is None:
        raise BoxcasegError("no training data: set data.box_ann/data.box_images and/or data.salient_dir")
    return box_ds, sal_ds


ARCHITECTURE_FIELDS = ("backbone", "out_indices", "backbone_kwargs", "neck_channels", "neck_convs",
                      "head_channels", "transfer_hidden")


def architecture(m) -> dict:
    """The [model] fields that shape the network's weights (what a warm start must match)."""
    return {k: getattr(m, k) for k in ARCHITECTURE_FIELDS}


def resolve_init(spec: str) -> Path:
    """``train.init_from``: "pretrained" (the shipped model) or a checkpoint path."""
    from boxcaseg import weights

    if str(spec) in weights.ALIASES:
        return weights.pretrained_path()
    path = Path(spec)
    if not path.is_file():
        raise BoxcasegError(f"{path}: checkpoint not found (train.init_from)")
    return path


def poly_factor(step: int, max_iters: int, power: float, warmup: int = 0) -> float:
    """lr multiplier at 0-based ``step``: linear warm-up, then (1 - step/max)^power."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    return max(0.0, 1.0 - step / max(1, max_iters)) ** power


def train(
    cfg: Config,
    out_dir: str | Path,
    resume: bool = False,
    stop_at: int | None = None,
    show_progress: bool = True,
) -> TrainResult:
    """Train BoxCaseg per ``cfg``; checkpoints and metrics go to ``out_dir``.

    resume: continue from ``out_dir/last.pt`` (model, optimizer, schedule, step, RNG).
    stop_at: stop (with a checkpoint) after this iteration although the schedule runs
    to ``cfg.train.max_iters`` (used to test exact resumption).
    """
    out_dir = Path(out_dir)
    distributed = dist.init_from_env()
    rank, world = dist.rank(), dist.world_size()
    is_main = rank == 0
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    device = resolve_device(t.device)
    ckpt_path = out_dir / CKPT_NAME

    ckpt = None
    if resume:
        if not ckpt_path.is_file():
            raise BoxcasegError(f"{ckpt_path}: no checkpoint to resume from")
        ckpt = safe_torch_load(ckpt_path)
        saved = config_from_checkpoint(ckpt.get("config") if isinstance(ckpt, dict) else None, str(ckpt_path))
        # the stored config comes back with pretrained off and no weight file (the checkpoint holds the weights)
        if saved.model != replace(cfg.model, pretrained=False, backbone_weights=""):
            raise BoxcasegError(f"{ckpt_path}: the checkpoint's [model] config differs from this run's")

    for name in ("fused_mil_weight", "pairwise_weight", "pairwise_tau", "pairwise_ramp", "pseudo_weight"):
        v = getattr(t, name)
        if not (math.isfinite(v) and v >= 0):
            raise BoxcasegError(f"train.{name}={v!r}: must be a finite number >= 0")
    if t.pseudo_weight > 0 and not cfg.data.pseudo_ann:
        raise BoxcasegError("train.pseudo_weight > 0 needs data.pseudo_ann (a `boxcaseg proxy` json of the box annotations)")
    if not (math.isfinite(t.ema_decay) and 0.0 <= t.ema_decay < 1.0):
        raise BoxcasegError(f"train.ema_decay={t.ema_decay!r}: must be in [0, 1) (0 = no moving average)")
    if not (math.isfinite(t.backbone_lr_mult) and t.backbone_lr_mult >= 0):
        raise BoxcasegError(f"train.backbone_lr_mult={t.backbone_lr_mult!r}: must be a finite number >= 0")
    if t.pairwise_dilation < 1:
        raise BoxcasegError(f"train.pairwise_dilation={t.pairwise_dilation}: must be >= 1")
    torch.manual_seed(t.seed)  # same initial weights on every rank
    box_ds, sal_ds = build_datasets(cfg)
    n_box = cfg.data.box_per_batch if box_ds is not None else 0
    n_sal = cfg.data.salient_per_batch if sal_ds is not None else 0
    if box_ds is None:
        n_sal = cfg.data.box_per_batch + cfg.data.salient_per_batch
    if sal_ds is None:
        n_box = cfg.data.box_per_batch + cfg.data.salient_per_batch
    model = build_model(cfg.model).to(device)
    memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    if distributed and device.type == "cuda" and t.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if t.backbone_lr_mult == 1.0:
        groups = [{"params": list(model.parameters())}]
    else:  # heads first: the lr logged is the heads' (the config's)
        body = {id(p) for p in model.backbone.parameters()}
        groups = [{"params": [p for p in model.parameters() if id(p) not in body]},
                  {"params": list(model.backbone.parameters()), "lr": t.lr * t.backbone_lr_mult}]
    optimizer = torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: poly_factor(s, t.max_iters, t.poly_power, t.warmup_iters))
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt.get("model_live", ckpt["model"]))
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step = int(ckpt["iter"])
        if ckpt.get("world_size", 1) == world and "rng" in ckpt:
            set_rng_state(ckpt["rng"][rank])
        log.info("resumed from %s at iteration %d", ckpt_path, step)
    elif t.init_from:
        init_path = resolve_init(t.init_from)
        init = safe_torch_load(init_path)
        if not isinstance(init, dict) or "model" not in init or "config" not in init:
            raise BoxcasegError(f"{init_path}: not a boxcaseg checkpoint (train.init_from)")
        theirs = config_from_checkpoint(init["config"], str(init_path)).model
        if architecture(theirs) != architecture(cfg.model):
            raise BoxcasegError(f"{init_path}: its network ([model] {architecture(theirs)}) differs from this run's "
                                f"({architecture(cfg.model)}) (train.init_from)")
        model.load_state_dict(init["model"])
        log.info("weights from %s (iteration %s); a new schedule starts", init_path, init.get("iter"))
    elif is_main and not (cfg.model.pretrained or cfg.model.backbone_weights):
        warn_random_init(cfg.model.backbone)
    ema = WeightEMA(model, t.ema_decay) if t.ema_decay > 0 else None
    if ema is not None and ckpt is not None and "model_live" in ckpt:
        ema.load(ckpt["model"], ckpt.get("ema_updates", 0))
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if distributed else model

    end = min(t.max_iters, stop_at) if stop_at else t.max_iters
    sampler = MixedBatchSampler(len(box_ds) if box_ds else 0, len(sal_ds) if sal_ds else 0, n_box, n_sal,
                                seed=t.seed, rank=rank, world_size=world, start_step=step, end_step=end)
    loader = torch.utils.data.DataLoader(
        MixedDataset(box_ds, sal_ds), batch_sampler=sampler, collate_fn=collate,
        num_workers=cfg.data.workers, pin_memory=device.type == "cuda",
        worker_init_fn=worker_init if cfg.data.workers else None,
        prefetch_factor=4 if cfg.data.workers else None,
    )
    use_amp = t.amp and device.type == "cuda"
    metrics = JsonlWriter(out_dir / "metrics.jsonl", truncate_after_iter=step) if is_main else None
    if is_main:
        log.info("training %s for %d iterations (%d box + %d salient per batch, %d process(es), %s)",
                 cfg.model.backbone, t.max_iters, n_box, n_sal, world, device)

    def save(it: int) -> None:
        rng = checkpoint_rng_and_buffers(model, distributed, world)
        if is_main:
            state = {"model": model.state_dict()}
            if ema is not None:  # the average is the deliverable; the live weights resume training
                state = {"model": ema.state, "model_live": state["model"], "ema_updates": ema.updates}
            atomic_torch_save({
                **state, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "iter": it, "config": cfg.to_dict(),
                "world_size": world, "rng": rng,
            }, ckpt_path)

    first_loss = last_loss = float("nan")
    t0 = time.perf_counter()
    n_images = 0
    net.train()
    if t.freeze_backbone_bn:  # eval-mode BN: the pretrained statistics, no updates (affine weights still learn)
        for m in model.backbone.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    it = step
    with progress_bar("train", is_main and show_progress) as progress:
        task = progress.add_task("train", total=t.max_iters, completed=step, stats="")
        t_last = time.perf_counter()
        for images, targets, is_sal in loader:
            it += 1
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            is_sal = is_sal.to(device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                out = net(images.contiguous(memory_format=memory_format))
            pw = t.pairwise_weight * (min(1.0, it / t.pairwise_ramp) if t.pairwise_ramp > 0 else 1.0)
            # the loss kernels take plain NCHW (row-major) maps, whatever the network's memory format
            losses = boxcaseg_loss(out["weak"].float().contiguous(), out["fused"].float().contiguous(),
                                   targets, is_sal, backend=t.backend,
                                   images=images, fused_mil_weight=t.fused_mil_weight, pairwise_weight=pw,
                                   pairwise_tau=t.pairwise_tau, pairwise_dilation=t.pairwise_dilation,
                                   pseudo_weight=t.pseudo_weight)
            loss = losses["loss"]
            if not torch.isfinite(loss):
                raise BoxcasegError(f"loss became non-finite at iteration {it} (learning rate {scheduler.get_last_lr()[0]:.3g} too high?)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if ema is not None:
                ema.update(model)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            now = time.perf_counter()
            batch_imgs = images.shape[0] * world
            n_images += batch_imgs
            rec = {"iter": it, **{k: float(v.detach()) for k, v in losses.items()}, "lr": lr,
                   "img_s": batch_imgs / max(now - t_last, 1e-9), "time": now - t0}
            t_last = now
            if math.isnan(first_loss):
                first_loss = rec["loss"]
            last_loss = rec["loss"]
            if metrics:
                metrics.write(rec)
            progress.update(task, completed=it, stats=(
                f"loss {rec['loss']:.3f} (mil {rec['loss_mil']:.3f} sm {rec['loss_smooth']:.4f} "
                f"pix {rec['loss_pixel']:.3f}) lr {lr:.2e} {rec['img_s']:.1f} img/s"))
            if t.ckpt_every and it % t.ckpt_every == 0 and it != end:
                save(it)
    save(it)
    if metrics:
        metrics.close()
    seconds = time.perf_counter() - t0
    dist.barrier()
    return TrainResult(out_dir, it, first_loss, last_loss, seconds, n_images / max(seconds, 1e-9), model)
