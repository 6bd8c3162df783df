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
    w1, b1, w2, b2 = model.transferred_params()
    assert w1.shape == model.weak_head.conv1.weight.shape and w2.shape == model.weak_head.conv2.weight.shape
    assert b1 is model.transferred_head.bias1 and b2 is model.transferred_head.bias2  # its own biases
    with torch.no_grad():
        model.weak_head.conv1.weight.add_(0.5)
    v1 = model.transferred_params()[0]
    assert not torch.allclose(w1, v1)
    with torch.no_grad():
        model.weak_head.conv1.weight.sub_(0.5)


def test_published_transfer_mlp():
    """The authors' transfer: hidden 4x the input, N(0, 0.01) init, biases k * b_weak + b, and
    gradients of the transferred branch reach k, b and the MLPs but never the weak head."""
    torch.manual_seed(1)
    m = build_model(ModelConfig(backbone="test_efficientnet", head_channels=16, transfer_mlp="published"))
    c = m.weak_head.conv1.in_channels
    assert m.transfer.mlp1[0].out_features == 4 * c and m.transfer.mlp2[0].out_features == 4 * 16
    w = torch.cat([p.detach().flatten() for p in m.transfer.parameters()])
    assert 0.007 < float(w.std()) < 0.013 and abs(float(w.mean())) < 0.002
    with torch.no_grad():
        m.transferred_head.bias_k.copy_(torch.tensor([0.5, 2.0]))
        m.transferred_head.bias_b.copy_(torch.tensor([0.25, -1.0]))
    _, b1, _, b2 = m.transferred_params()
    wb1, wb2 = m.weak_head.conv1.bias.detach().double(), m.weak_head.conv2.bias.detach().double()
    torch.testing.assert_close(b1.double(), 0.5 * wb1 + 0.25)
    torch.testing.assert_close(b2.double(), 2.0 * wb2 - 1.0)
    m.zero_grad()
    m(torch.randn(2, 3, 64, 64))["transferred"].square().sum().backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in m.weak_head.parameters())
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in m.transferred_head.parameters())
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in m.transfer.parameters())


def test_probability_fusion_is_eq3():
    """fusion="prob": sigmoid(fused) = alpha * sigmoid(salient) + (1 - alpha) * sigmoid(transferred)
    (float64 reference), and BCE on the fused logits is the paper's Eq. 3 on those probabilities."""
    torch.manual_seed(2)
    m = build_model(ModelConfig(backbone="test_efficientnet", head_channels=16, alpha=0.6, fusion="prob")).eval()
    with torch.no_grad():
        out = m(torch.randn(2, 3, 64, 64))
    s, t = out["salient"].double(), out["transferred"].double()
    p_ref = 0.6 * torch.sigmoid(s) + 0.4 * torch.sigmoid(t)
    torch.testing.assert_close(torch.sigmoid(out["fused"].double()), p_ref, rtol=0, atol=2e-6)
    target = (torch.rand_like(p_ref) > 0.5).double()
    eq3 = -(target * torch.log(p_ref) + (1 - target) * torch.log(1 - p_ref)).mean()
    torch.testing.assert_close(pixel_loss(out["fused"], target.float()).double(), eq3, rtol=1e-4, atol=1e-5)


def test_unknown_variant_is_one_line_error():
    from boxcaseg.errors import BoxcasegError

    with pytest.raises(BoxcasegError, match="model.fusion"):
        build_model(ModelConfig(backbone="test_efficientnet", head_channels=16, fusion="average"))
    with pytest.raises(BoxcasegError, match="model.transfer_mlp"):
        build_model(ModelConfig(backbone="test_efficientnet", head_channels=16, transfer_mlp="big"))


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
