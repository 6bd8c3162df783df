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
