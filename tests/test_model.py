"""Model shapes and the weight-transfer gradient rule."""

from __future__ import annotations

import pytest
import torch

from boxcaseg.config import ModelConfig
from boxcaseg.losses import pixel_loss
from boxcaseg.model import build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone="test_efficientnet", head_channels=16, alpha=0.7))


@pytest.mark.parametrize("size", [(64, 64), (96, 80), (70, 50)])
def test_output_shapes(model, size):
    out = model(torch.randn(2, 3, *size))
    expect = (2, 1, -(-size[0] // 4), -(-size[1] // 4))
    for k in ("weak", "salient", "transferred", "fused"):
        assert tuple(out[k].shape) == expect, k
    torch.testing.assert_close(out["fused"], 0.7 * out["salient"] + 0.3 * out["transferred"])


def test_pixel_loss_sends_no_gradient_to_weak_head(model):
    model.zero_grad()
    out = model(torch.randn(2, 3, 64, 64))
    pixel_loss(out["fused"], (torch.rand_like(out["fused"]) > 0.5).float()).backward()
    for name, p in model.weak_head.named_parameters():
        assert p.grad is None or p.grad.abs().max() == 0, name
    # ... but it trains the transfer MLPs, the transferred and salient heads and the backbone
    for mod in (model.transfer, model.transferred_head, model.salient_head, model.backbone):
        assert any(p.grad is not None and p.grad.abs().max() > 0 for p in mod.parameters())


def test_weak_loss_trains_weak_head_not_transfer(model):
    model.zero_grad()
    out = model(torch.randn(2, 3, 64, 64))
    out["weak"].sum().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in model.weak_head.conv1.parameters())
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in model.transfer.parameters())


def test_transferred_weights_follow_weak_head(model):
    w1, w2 = model.transferred_weights()
    assert w1.shape == model.weak_head.conv1.weight.shape and w2.shape == model.weak_head.conv2.weight.shape
    with torch.no_grad():
        model.weak_head.conv1.weight.add_(0.5)
    v1, _ = model.transferred_weights()
    assert not torch.allclose(w1, v1)
    with torch.no_grad():
        model.weak_head.conv1.weight.sub_(0.5)


def _neck_reference(backbone, x):
    """The FPN neck written out step by step in float64 (lateral 1x1, nearest top-down sum,
    3x3 output convs, bilinear upsampling to the finest level, sum, 3x3 refinement)."""
    import torch.nn.functional as F

    def conv_bn(seq, t, relu=False):
        conv, bn = seq[0], seq[1]
        t = F.conv2d(t, conv.weight.double(), None if conv.bias is None else conv.bias.double(), padding=conv.padding)
        t = (t - bn.running_mean.double()[:, None, None]) / torch.sqrt(bn.running_var.double()[:, None, None] + bn.eps)
        t = t * bn.weight.double()[:, None, None] + bn.bias.double()[:, None, None]
        return t.clamp_min(0) if relu else t

    levels = backbone.body(x.float())
    levels = [levels[i].double() for i in backbone.keep]
    fpn = backbone.fpn
    inner = conv_bn(fpn.inner_blocks[-1], levels[-1])
    outs = [conv_bn(fpn.layer_blocks[-1], inner)]
    for i in range(len(levels) - 2, -1, -1):
        lat = conv_bn(fpn.inner_blocks[i], levels[i])
        inner = lat + F.interpolate(inner, size=lat.shape[-2:], mode="nearest")
        outs.insert(0, conv_bn(fpn.layer_blocks[i], inner))
    size = outs[0].shape[-2:]
    total = sum(F.interpolate(o, size=size, mode="bilinear", align_corners=False) if o.shape[-2:] != size else o for o in outs)
    for block in backbone.refine:
        total = conv_bn(block, total, relu=True)
    return total


@pytest.mark.parametrize("convs", [0, 2])
def test_fpn_neck_shapes_and_reference(convs):
    torch.manual_seed(1)
    m = build_model(ModelConfig(backbone="test_efficientnet", head_channels=16, neck_channels=24, neck_convs=convs))
    g = torch.Generator().manual_seed(2)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.copy_((torch.rand(mod.running_mean.shape, generator=g) - 0.5) * 0.4)
            mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)
            mod.weight.data.uniform_(0.5, 1.5, generator=g)
    m.eval()
    assert m.backbone.out_channels == 24 and m.weak_head.conv1.in_channels == 24
    assert len(m.backbone.refine) == convs
    x = torch.randn(2, 3, 70, 54, generator=g)
    with torch.no_grad():
        feats = m.backbone(x)
        out = m(x)
    assert tuple(feats.shape) == (2, 24, 18, 14)
    assert tuple(out["fused"].shape) == (2, 1, 18, 14)
    ref = _neck_reference(m.backbone, x)
    torch.testing.assert_close(feats.double(), ref, rtol=1e-4, atol=1e-4)


def test_neck_rejects_negative_width():
    from boxcaseg.errors import BoxcasegError

    with pytest.raises(BoxcasegError, match="neck_channels"):
        build_model(ModelConfig(backbone="test_efficientnet", neck_channels=-1))
