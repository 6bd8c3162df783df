"""The reference losses against straightforward float64 loops (values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch

from boxcaseg.losses import boxcaseg_loss, mil_loss_reference, pixel_loss, smoothness_loss_reference


def _bce(x: float, y: float) -> float:
    # numerically plain BCE-with-logits: -y log s(x) - (1-y) log (1 - s(x))
    s = 1.0 / (1.0 + math.exp(-x))
    return -(y * math.log(s) + (1 - y) * math.log(1 - s))


def mil_loop(logits: torch.Tensor, mask: torch.Tensor) -> float:
    n, _, h, w = logits.shape
    total, bags = 0.0, 0
    for i in range(n):
        for r in range(h):
            score = max(float(logits[i, 0, r, c]) for c in range(w))
            label = max(float(mask[i, 0, r, c]) for c in range(w))
            total += _bce(score, label)
            bags += 1
        for c in range(w):
            score = max(float(logits[i, 0, r, c]) for r in range(h))
            label = max(float(mask[i, 0, r, c]) for r in range(h))
            total += _bce(score, label)
            bags += 1
    return total / bags


def smooth_loop(logits: torch.Tensor) -> float:
    n, _, h, w = logits.shape
    p = [[[1 / (1 + math.exp(-float(logits[i, 0, r, c]))) for c in range(w)] for r in range(h)] for i in range(n)]
    means = []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == 0 and dx == 0:
                continue
            s, cnt = 0.0, 0
            for i in range(n):
                for r in range(h):
                    for c in range(w):
                        rr, cc = r + dy, c + dx
                        if 0 <= rr < h and 0 <= cc < w:
                            s += (p[i][r][c] - p[i][rr][cc]) ** 2
                            cnt += 1
            means.append(s / cnt if cnt else 0.0)
    return sum(means) / 8


def numgrad(fn, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    g = torch.zeros_like(x)
    flat, gflat = x.view(-1), g.view(-1)
    for k in range(flat.numel()):
        old = float(flat[k])
        flat[k] = old + eps
        up = fn(x)
        flat[k] = old - eps
        down = fn(x)
        flat[k] = old
        gflat[k] = (up - down) / (2 * eps)
    return g


def random_box_mask(n, h, w, gen, empty=False):
    m = torch.zeros(n, 1, h, w, dtype=torch.float64)
    if empty:
        return m
    for i in range(n):
        y0 = int(torch.randint(0, h, (1,), generator=gen))
        x0 = int(torch.randint(0, w, (1,), generator=gen))
        y1 = int(torch.randint(y0 + 1, h + 1, (1,), generator=gen))
        x1 = int(torch.randint(x0 + 1, w + 1, (1,), generator=gen))
        m[i, 0, y0:y1, x0:x1] = 1
    return m


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 1, 5, 7), (3, 1, 6, 4), (1, 1, 1, 9)])
@pytest.mark.parametrize("empty", [False, True])
def test_mil_matches_loop(shape, empty):
    gen = torch.Generator().manual_seed(hash((shape, empty)) % 2**31)
    x = torch.randn(*shape, dtype=torch.float64, generator=gen) * 3
    m = random_box_mask(shape[0], shape[2], shape[3], gen, empty)
    x.requires_grad_(True)
    val = mil_loss_reference(x, m)
    assert val.item() == pytest.approx(mil_loop(x.detach(), m), rel=1e-10)
    (g,) = torch.autograd.grad(val, x)
    ng = numgrad(lambda t: mil_loop(t, m), x.detach().clone())
    torch.testing.assert_close(g, ng, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 1, 5, 7), (1, 1, 2, 1), (1, 1, 4, 4)])
def test_smoothness_matches_loop(shape):
    gen = torch.Generator().manual_seed(hash(shape) % 2**31)
    x = (torch.randn(*shape, dtype=torch.float64, generator=gen) * 2).requires_grad_(True)
    val = smoothness_loss_reference(x)
    assert val.item() == pytest.approx(smooth_loop(x.detach()), rel=1e-10, abs=1e-15)
    (g,) = torch.autograd.grad(val, x)
    ng = numgrad(smooth_loop, x.detach().clone())
    torch.testing.assert_close(g, ng, rtol=1e-5, atol=1e-9)


def test_pixel_loss_matches_loop():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1, 5, 3, dtype=torch.float64, generator=gen).requires_grad_(True)
    y = (torch.rand(2, 1, 5, 3, generator=gen) > 0.5).double()
    val = pixel_loss(x, y)
    loop = sum(_bce(float(a), float(b)) for a, b in zip(x.detach().flatten(), y.flatten())) / x.numel()
    assert val.item() == pytest.approx(loop, rel=1e-10)
    (g,) = torch.autograd.grad(val, x)
    torch.testing.assert_close(g, (torch.sigmoid(x.detach()) - y) / x.numel())


def test_boxcaseg_loss_combines_terms():
    gen = torch.Generator().manual_seed(4)
    weak = torch.randn(4, 1, 6, 6, dtype=torch.float64, generator=gen)
    fused = torch.randn(4, 1, 6, 6, dtype=torch.float64, generator=gen)
    target = random_box_mask(4, 12, 12, gen)
    is_sal = torch.tensor([False, True, False, True])
    out = boxcaseg_loss(weak, fused, target, is_sal, backend="reference")
    up = torch.nn.functional.interpolate(weak, size=(12, 12), mode="bilinear", align_corners=False)
    upf = torch.nn.functional.interpolate(fused[is_sal], size=(12, 12), mode="bilinear", align_corners=False)
    assert out["loss_mil"].item() == pytest.approx(mil_loop(up, target), rel=1e-9)
    assert out["loss_smooth"].item() == pytest.approx(smooth_loop(up), rel=1e-9)
    assert out["loss_pixel"].item() == pytest.approx(pixel_loss(upf, target[is_sal]).item(), rel=1e-12)
    expected = out["loss_mil"] + 0.05 * out["loss_smooth"] + out["loss_pixel"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-12)
    # no salient patch: the pixel term is exactly zero
    none = boxcaseg_loss(weak, fused, target, torch.zeros(4, dtype=torch.bool), backend="reference")
    assert none["loss_pixel"].item() == 0.0
