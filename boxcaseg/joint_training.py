"""Joint BoxCaseg training: box patches + salient patches, three heads, weight transfer.

``train(cfg, out_dir)`` is the library entry point behind ``boxcaseg train``; it works
in one process or under torchrun (DDP: gloo on CPU, NCCL on GPU). Rank 0 logs, shows
progress and writes ``out_dir/metrics.jsonl`` and ``out_dir/last.pt``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path

import torch

from boxcaseg.config import Config, _as_list, check_model_values, config_from_checkpoint
from boxcaseg.data.box_patches import BoxPatchDataset
from boxcaseg.data.salient import SalientDataset
from boxcaseg.data.sampler import ConcatSets, MixedBatchSampler, MixedDataset, SetMix, collate
from boxcaseg.dist import worker_context
from boxcaseg.errors import BoxcasegError
from boxcaseg.io import safe_torch_load
from boxcaseg.losses import boxcaseg_loss
from boxcaseg.model import build_checkpoint_model, build_model
from boxcaseg.model.backbone import warn_random_init
from boxcaseg.training import CKPT_NAME, Run, TrainResult, WeightEMA, worker_init

log = logging.getLogger(__name__)
__all__ = ["CKPT_NAME", "TrainResult", "train"]


def build_datasets(cfg: Config):
    """(box dataset, salient dataset, data sets record): each kind one dataset over all its sets
    (:class:`ConcatSets`), None when the config has none of that kind. Every set is read (its
    json, its folders, every image's file) before any training; a bad one stops the run with
    one line naming it."""
    d = cfg.data
    box_sets, sal_dirs = d.box_sets(), d.salient_sets()
    if d.pseudo_ann and not box_sets:
        raise BoxcasegError("data.pseudo_ann is set but data.box_ann (the boxes it belongs to) is not")
    if d.pseudo_ann and len(box_sets) > 1:
        raise BoxcasegError(f"data.pseudo_ann belongs to one box set; the config has {len(box_sets)} (data.box_ann)")
    box_parts = [_read_set("box", k, len(box_sets), lambda ann=ann, images=images: BoxPatchDataset(
        ann, images, d.patch_size, d.jitter_shift, (d.jitter_scale_min, d.jitter_scale_max), d.hflip_box,
        d.skip_bad, d.strict, pseudo_ann=d.pseudo_ann or None)) for k, (ann, images) in enumerate(box_sets)]
    sal_parts = [_read_set("salient", k, len(sal_dirs), lambda folder=folder: SalientDataset(
        folder, d.salient_resize, d.patch_size, d.skip_bad, d.salient_box_crop, d.jitter_shift,
        (d.jitter_scale_min, d.jitter_scale_max))) for k, folder in enumerate(sal_dirs)]
    if not box_parts and not sal_parts:
        raise BoxcasegError("no training data: set data.box_ann/data.box_images and/or data.salient_dir")
    box_ds = _one_dataset(box_parts)
    sal_ds = _one_dataset(sal_parts)
    return box_ds, sal_ds


def _read_set(kind: str, k: int, n: int, build):
    """One set's dataset; with several sets an error says which one (its message names the file)."""
    try:
        return build()
    except BoxcasegError as e:
        if n == 1:
            raise
        raise BoxcasegError(f"{kind} set {k + 1} of {n}: {e}") from e


def _one_dataset(parts: list):
    return None if not parts else parts[0] if len(parts) == 1 else ConcatSets(parts)


def set_mixes(cfg: Config, box_ds, sal_ds) -> tuple[SetMix, SetMix]:
    """How the box and the salient sets are drawn (in proportion to their sizes, or to the weights)."""
    def mix(ds, weights):
        sizes = [len(p) for p in ds.datasets] if isinstance(ds, ConcatSets) else [len(ds)] if ds else []
        return SetMix(sizes, weights or None)

    return mix(box_ds, cfg.data.box_weights), mix(sal_ds, cfg.data.salient_weights)


def data_sets_record(cfg: Config, box_ds, sal_ds) -> list[dict]:
    """What a checkpoint records of its training data: each set's kind, source, item count (usable
    boxes or pairs), configured weight (None: by size) and share of its kind's draws."""
    box_mix, sal_mix = set_mixes(cfg, box_ds, sal_ds)
    out = []
    for kind, sources, mix, weights in (
            ("box", [a for a, _ in cfg.data.box_sets()], box_mix, cfg.data.box_weights),
            ("salient", cfg.data.salient_sets(), sal_mix, cfg.data.salient_weights)):
        for k, src in enumerate(sources):
            out.append({"kind": kind, "source": str(src), "items": mix.sizes[k],
                        "weight": float(weights[k]) if weights else None, "share": mix.shares()[k]})
    return out


#: what the loader's workers import (preloaded by a fork server)
LOADER_MODULES = ("numpy", "PIL.Image", "torch", "boxcaseg.data.box_patches", "boxcaseg.data.salient", "boxcaseg.data.sampler")

ARCHITECTURE_FIELDS = ("backbone", "out_indices", "backbone_kwargs", "neck_channels", "neck_convs",
                      "head_channels", "transfer_hidden")


def architecture(m) -> dict:
    """The [model] fields that shape the network's weights (what a warm start must match)."""
    return {k: getattr(m, k) for k in ARCHITECTURE_FIELDS}


def train_inputs(cfg: Config, resume: bool) -> list[tuple[str, str]]:
    """Every file and folder a training run reads, as (setting, path): what ``--out`` must not write over."""
    from boxcaseg.weights import user_model_file

    d = cfg.data
    pairs = [("data.box_ann", a) for a in _as_list(d.box_ann)] + [("data.box_images", a) for a in _as_list(d.box_images)]
    pairs += [("data.salient_dir", a) for a in _as_list(d.salient_dir)] + [("data.pseudo_ann", d.pseudo_ann),
                                                                          ("model.backbone_weights", cfg.model.backbone_weights)]
    if not resume and cfg.train.init_from:
        pairs.append(("train.init_from", user_model_file(cfg.train.init_from)))
    return pairs


def resolve_init(spec: str) -> Path:
    """``train.init_from``: "pretrained" (the shipped model) or a checkpoint path."""
    from boxcaseg import weights

    if str(spec) in weights.ALIASES:
        return weights.pretrained_path()
    path = Path(spec)
    if not path.is_file():
        raise BoxcasegError(f"{path}: checkpoint not found (train.init_from)")
    return path


def boxes_only_note(t) -> str:
    """What training without a salient set means, for this config's losses."""
    if t.fused_mil_weight > 0 or t.pairwise_weight > 0:
        return ("no pixel loss: no salient mask teaches object shapes. The weak head and the backbone learn "
                "from MIL + smoothness; the salient head and the transfer MLP only from the box terms on the "
                "fused map (fused MIL, pairwise).")
    return ("no pixel loss: the salient head and the transfer MLP learn nothing new; MIL + smoothness "
            "train the weak head and the backbone.")


def adopt_init_model(cfg: Config, init_from: str) -> None:
    """``--init-from``: the run's network is the one of those weights ([model] from the checkpoint)."""
    path = resolve_init(init_from)
    init = safe_torch_load(path)
    if not isinstance(init, dict) or not isinstance(init.get("config"), dict):
        raise BoxcasegError(f"{path}: not a boxcaseg checkpoint (--init-from)")
    cfg.model = config_from_checkpoint(init["config"], str(path)).model  # pretrained off, no weight file
    build_checkpoint_model(cfg.model, str(path))  # a network timm cannot build is named here, before any work
    cfg.train.init_from = str(path)


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
    t = cfg.train
    run = Run(out_dir, t.device, "train", train_inputs(cfg, resume))
    if t.threads:
        torch.set_num_threads(t.threads)
    ckpt = load_resume(run, cfg) if resume else None
    check_train_settings(cfg)
    torch.manual_seed(t.seed)  # same initial weights on every rank
    box_ds, sal_ds = build_datasets(cfg)
    n_box, n_sal = batch_composition(cfg, box_ds is not None, sal_ds is not None)
    model = build_model_on(cfg, run)
    optimizer, scheduler = build_optimizer(model, t)
    step = run.restore(ckpt, model, optimizer, scheduler) if ckpt else warm_start(cfg, model, run.is_main)
    ema = WeightEMA.resume(model, t.ema_decay, ckpt)
    net = run.wrap(model)
    end = min(t.max_iters, stop_at) if stop_at else t.max_iters
    loader = build_loader(cfg, box_ds, sal_ds, n_box, n_sal, run, step, end)
    data_sets = data_sets_record(cfg, box_ds, sal_ds)
    if run.is_main:
        log.info("training %s for %d iterations (%d box + %d salient per batch, %d process(es), %s)",
                 cfg.model.backbone, t.max_iters, n_box, n_sal, run.world, run.device)
        for rec in data_sets:
            log.info("%s set %s: %d %s, %.1f%% of the %s draws", rec["kind"], rec["source"], rec["items"],
                     "boxes" if rec["kind"] == "box" else "pairs", 100 * rec["share"], rec["kind"])
    net.train()
    if t.freeze_backbone_bn:  # eval-mode BN: the pretrained statistics, no updates (affine weights still learn)
        for m in model.backbone.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    return run.fit(net=net, model=model, optimizer=optimizer, scheduler=scheduler, loader=loader,
                   step=loss_step(cfg, net, run.device), start=step, end=end, max_iters=t.max_iters,
                   ckpt_every=t.ckpt_every, config=cfg.to_dict(), stats=_stats, ema=ema,
                   extra_state={"data_sets": data_sets},
                   show_progress=show_progress)


def load_resume(run: Run, cfg: Config) -> dict:
    """``out_dir/last.pt``, checked to hold this run's network."""
    ckpt = run.load_resume()
    saved = config_from_checkpoint(ckpt.get("config") if isinstance(ckpt, dict) else None, str(run.ckpt_path))
    # the stored config comes back with pretrained off and no weight file (the checkpoint holds the weights)
    if saved.model != replace(cfg.model, pretrained=False, backbone_weights=""):
        raise BoxcasegError(f"{run.ckpt_path}: the checkpoint's [model] config differs from this run's")
    return ckpt


def check_train_settings(cfg: Config) -> None:
    """One-line errors for [train] (and [model]: :func:`boxcaseg.config.check_model_values`) values no run can use."""
    check_model_values(cfg.model, "config")
    t = cfg.train
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


def batch_composition(cfg: Config, has_box: bool, has_salient: bool) -> tuple[int, int]:
    """(box, salient) patches per batch; with one source only, it fills the whole batch."""
    d = cfg.data
    if not has_box:
        return 0, d.box_per_batch + d.salient_per_batch
    if not has_salient:
        return d.box_per_batch + d.salient_per_batch, 0
    return d.box_per_batch, d.salient_per_batch


def build_model_on(cfg: Config, run: Run) -> torch.nn.Module:
    """The network on the run's device, in the configured memory format (SyncBN under DDP on GPUs)."""
    model = build_model(cfg.model).to(run.device)
    model = model.to(memory_format=torch.channels_last if cfg.train.channels_last else torch.contiguous_format)
    if run.distributed and run.device.type == "cuda" and cfg.train.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def build_optimizer(model: torch.nn.Module, t):
    """SGD (backbone at ``backbone_lr_mult`` x the heads' rate) and the warm-up + poly schedule."""
    if t.backbone_lr_mult == 1.0:
        groups = [{"params": list(model.parameters())}]
    else:  # heads first: the lr logged is the heads' (the config's)
        body = {id(p) for p in model.backbone.parameters()}
        groups = [{"params": [p for p in model.parameters() if id(p) not in body]},
                  {"params": list(model.backbone.parameters()), "lr": t.lr * t.backbone_lr_mult}]
    optimizer = torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: poly_factor(s, t.max_iters, t.poly_power, t.warmup_iters))
    return optimizer, scheduler


def warm_start(cfg: Config, model: torch.nn.Module, is_main: bool) -> int:
    """``train.init_from``'s weights (the same network required), or a warning when nothing but
    random weights starts the run. Returns the first iteration, 0."""
    if cfg.train.init_from:
        init_path = resolve_init(cfg.train.init_from)
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
    return 0


def build_loader(cfg: Config, box_ds, sal_ds, n_box: int, n_sal: int, run: Run, step: int, end: int):
    """Mixed batches of iterations ``step + 1 .. end``, this rank's share of every global batch."""
    box_mix, sal_mix = set_mixes(cfg, box_ds, sal_ds)
    sampler = MixedBatchSampler(box_mix, sal_mix, n_box, n_sal,
                                seed=cfg.train.seed, rank=run.rank, world_size=run.world, start_step=step, end_step=end)
    workers = cfg.data.workers
    cuda = run.device.type == "cuda"
    return torch.utils.data.DataLoader(
        MixedDataset(box_ds, sal_ds), batch_sampler=sampler, collate_fn=collate,
        num_workers=workers, pin_memory=cuda,
        worker_init_fn=worker_init if workers else None, prefetch_factor=4 if workers else None,
        # workers of a CUDA process come from a fork server, never a fork of the CUDA process
        multiprocessing_context=worker_context(cuda, LOADER_MODULES) if workers else None,
    )


def loss_step(cfg: Config, net: torch.nn.Module, device: torch.device):
    """The loop's ``step``: one mixed batch through the network and the BoxCaseg objective."""
    t = cfg.train
    memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
    use_amp = t.amp and device.type == "cuda"

    def step(batch, it: int):
        images, targets, is_sal, bags = batch
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        bags = bags.to(device, non_blocking=True)
        is_sal = is_sal.to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = net(images.contiguous(memory_format=memory_format))
        pw = t.pairwise_weight * (min(1.0, it / t.pairwise_ramp) if t.pairwise_ramp > 0 else 1.0)
        # the loss kernels take plain NCHW (row-major) maps, whatever the network's memory format
        losses = boxcaseg_loss(out["weak"].float().contiguous(), out["fused"].float().contiguous(),
                               targets, is_sal, backend=t.backend, bags=bags,
                               images=images, fused_mil_weight=t.fused_mil_weight, pairwise_weight=pw,
                               pairwise_tau=t.pairwise_tau, pairwise_dilation=t.pairwise_dilation,
                               pseudo_weight=t.pseudo_weight)
        return losses, images.shape[0]

    return step


def _stats(rec: dict) -> str:
    return (f"loss {rec['loss']:.3f} (mil {rec['loss_mil']:.3f} sm {rec['loss_smooth']:.4f} "
            f"pix {rec['loss_pixel']:.3f}) lr {rec['lr']:.2e} {rec['img_s']:.1f} img/s")
