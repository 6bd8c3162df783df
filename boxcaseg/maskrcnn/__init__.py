"""The Proxy Mask R-CNN (step 3): torchvision Mask R-CNN trained on boxes + proxy masks,
with flagged (``ignore_mask``) masks left out of the mask loss only.

- ``config``: the TOML-mapped ``MaskRCNNConfig``;
- ``loss``: ``ignore_aware_maskrcnn_loss``; ``roi_heads``: the RoIHeads that use it;
- ``model``: ``build_maskrcnn`` (ResNet-FPN or timm-FPN backbones);
- ``data``: the COCO dataset and the iteration-indexed sampler;
- ``train``: ``train_maskrcnn`` (checkpoints, exact resume, torchrun);
- ``predict``: ``predict_maskrcnn`` (a COCO results json).

Heavy modules are imported on use: ``from boxcaseg.maskrcnn.trainer import train_maskrcnn``.
"""

from boxcaseg.maskrcnn.recipe import MaskRCNNConfig

__all__ = ["MaskRCNNConfig"]
