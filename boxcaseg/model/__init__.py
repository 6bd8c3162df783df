"""The BoxCaseg network: a timm backbone, three heads, the weight-transfer MLPs."""

from boxcaseg.model.boxcaseg import BoxCaseg, build_checkpoint_model, build_model, load_checkpoint_model
from boxcaseg.model.heads import SegHead, TransferredHead, WeightTransfer

__all__ = ["BoxCaseg", "build_checkpoint_model", "SegHead", "TransferredHead", "WeightTransfer", "build_model", "load_checkpoint_model"]
