"""The BoxCaseg network and its builder."""

from __future__ import annotations

import torch
from torch import nn

from boxcaseg.config import Config, ModelConfig, config_from_checkpoint
from boxcaseg.model.backbone import TimmBackbone
from boxcaseg.model.heads import SegHead, TransferredHead, WeightTransfer


class BoxCaseg(nn.Module):
    """Backbone + weak, salient and transferred heads.

    forward(x: [N, 3, H, W]) -> dict of logits, each [N, 1, ceil(H/4), ceil(W/4)]:
    ``weak`` (MIL-trained), ``salient``, ``transferred`` and
    ``fused = alpha * salient + (1 - alpha) * transferred``.
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
        self.transfer = WeightTransfer(c, m, cfg.transfer_hidden)
        self.transferred_head = TransferredHead(m)
        self.alpha = float(cfg.alpha)

    def transferred_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Conv weights of the transferred head, from the *detached* weak-head weights."""
        return self.transfer(self.weak_head.conv1.weight.detach(), self.weak_head.conv2.weight.detach())

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)
        weak = self.weak_head(feats)
        salient = self.salient_head(feats)
        w1, w2 = self.transferred_weights()
        transferred = self.transferred_head(feats, w1, w2)
        fused = self.alpha * salient + (1.0 - self.alpha) * transferred
        return {"weak": weak, "salient": salient, "transferred": transferred, "fused": fused}


def build_model(cfg: ModelConfig | Config) -> BoxCaseg:
    if isinstance(cfg, Config):
        cfg = cfg.model
    return BoxCaseg(cfg)


def load_checkpoint_model(path: str, map_location: str = "cpu") -> tuple[BoxCaseg, Config]:
    """Rebuild a trained BoxCaseg from a ``boxcaseg train`` checkpoint (weights_only load).

    The backbone is built without pretrained weights: the checkpoint holds them all. The
    stored config is untrusted (:func:`boxcaseg.config.config_from_checkpoint`).
    """
    from boxcaseg.errors import BoxcasegError
    from boxcaseg.io import safe_torch_load

    ckpt = safe_torch_load(path, map_location)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise BoxcasegError(f"{path}: not a boxcaseg checkpoint (no 'model'/'config' entries)")
    cfg = config_from_checkpoint(ckpt["config"], str(path))  # pretrained off, no weight file
    model = BoxCaseg(cfg.model)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise BoxcasegError(f"{path}: checkpoint weights do not fit its config ({str(e).splitlines()[0]})") from e
    model.eval()
    return model, cfg
