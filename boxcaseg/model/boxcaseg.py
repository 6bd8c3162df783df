"""The BoxCaseg network and its builder."""

from __future__ import annotations

import torch
from torch import nn

from boxcaseg.config import Config, ModelConfig, config_from_checkpoint
from boxcaseg.model.backbone import TimmBackbone
from boxcaseg.errors import BoxcasegError
from boxcaseg.model.heads import TRANSFER_VARIANTS, SegHead, TransferredHead, WeightTransfer


class BoxCaseg(nn.Module):
    """Backbone + weak, salient and transferred heads.

    forward(x: [N, 3, H, W]) -> dict of logits, each [N, 1, ceil(H/4), ceil(W/4)]:
    ``weak`` (MIL-trained), ``salient``, ``transferred`` and ``fused``:
    ``alpha * salient + (1 - alpha) * transferred`` (``cfg.fusion = "logit"``) or
    ``logit(alpha * sigmoid(salient) + (1 - alpha) * sigmoid(transferred))`` (``"prob"``,
    the paper's Eq. 3).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = TimmBackbone(
            cfg.backbone, cfg.pretrained, cfg.backbone_weights, cfg.out_indices, cfg.backbone_kwargs,
            neck_channels=cfg.neck_channels, neck_convs=cfg.neck_convs,
        )
        c = self.backbone.out_channels
        m = cfg.head_channels or c
        self.weak_head = SegHead(c, m)
        self.salient_head = SegHead(c, m)
        if cfg.transfer_mlp not in TRANSFER_VARIANTS:
            raise BoxcasegError(f"model.transfer_mlp {cfg.transfer_mlp!r}: expected one of {', '.join(TRANSFER_VARIANTS)}")
        if cfg.fusion not in FUSIONS:
            raise BoxcasegError(f"model.fusion {cfg.fusion!r}: expected one of {', '.join(FUSIONS)}")
        published = cfg.transfer_mlp == "published"
        self.transfer = WeightTransfer(c, m, cfg.transfer_hidden, cfg.transfer_mlp)
        self.transferred_head = TransferredHead(m, bias_from_weak=published)
        self.alpha = float(cfg.alpha)
        self.fusion = cfg.fusion

    def transferred_params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Conv weights and biases (w1, b1, w2, b2) of the transferred head, from the *detached*
        weak-head parameters: gradients reach the transfer MLPs, never the weak head."""
        weak = self.weak_head
        w1, w2 = self.transfer(weak.conv1.weight.detach(), weak.conv2.weight.detach())
        b1, b2 = self.transferred_head.biases(weak.conv1.bias.detach(), weak.conv2.bias.detach())
        return w1, b1, w2, b2

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)
        weak = self.weak_head(feats)
        salient = self.salient_head(feats)
        transferred = self.transferred_head(feats, *self.transferred_params())
        return {"weak": weak, "salient": salient, "transferred": transferred,
                "fused": fuse(salient, transferred, self.alpha, self.fusion)}


FUSIONS = ("logit", "prob")
PROB_EPS = 1e-6


def fuse(salient: torch.Tensor, transferred: torch.Tensor, alpha: float, fusion: str) -> torch.Tensor:
    """The fused logits of the salient and transferred logits (see :class:`BoxCaseg`)."""
    if fusion == "logit":
        return alpha * salient + (1.0 - alpha) * transferred
    p = alpha * torch.sigmoid(salient) + (1.0 - alpha) * torch.sigmoid(transferred)
    p = p.clamp(PROB_EPS, 1.0 - PROB_EPS)
    return torch.log(p / (1.0 - p))


def build_model(cfg: ModelConfig | Config) -> BoxCaseg:
    if isinstance(cfg, Config):
        cfg = cfg.model
    return BoxCaseg(cfg)


def build_checkpoint_model(cfg: ModelConfig, source: str) -> BoxCaseg:
    """The network a checkpoint's (or model file's) [model] config describes; a config
    that cannot be built (a backbone kwarg timm refuses, an unknown variant) is one
    BoxcasegError line naming ``source``."""
    try:
        return BoxCaseg(cfg)
    except BoxcasegError as e:
        raise BoxcasegError(f"{source}: {e.one_line()}") from e


def load_checkpoint_model(path: str, map_location: str = "cpu") -> tuple[BoxCaseg, Config]:
    """Rebuild a trained BoxCaseg from a ``boxcaseg train`` checkpoint (weights_only load).

    The backbone is built without pretrained weights: the checkpoint holds them all. The
    stored config is untrusted (:func:`boxcaseg.config.config_from_checkpoint`).
    """
    from boxcaseg.io import safe_torch_load

    ckpt = safe_torch_load(path, map_location)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise BoxcasegError(f"{path}: not a boxcaseg checkpoint (no 'model'/'config' entries)")
    cfg = config_from_checkpoint(ckpt["config"], str(path))  # pretrained off, no weight file
    model = build_checkpoint_model(cfg.model, str(path))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise BoxcasegError(f"{path}: checkpoint weights do not fit its config ({str(e).splitlines()[0]})") from e
    model.eval()
    return model, cfg
