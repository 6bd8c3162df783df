"""The reference losses against straightforward float64 loops (values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch

from boxcaseg.kernels.mil_smooth_reference import mil_loss_reference, smoothness_loss_reference
from boxcaseg.losses import boxcaseg_loss, pixel_loss


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


# --------------------------------------------------------------------------- pairwise colour loss


def test_rgb_to_lab_matches_skimage():
    from skimage.color import rgb2lab

    from boxcaseg.imageops import rgb_to_lab

    gen = torch.Generator().manual_seed(5)
    rgb = torch.rand(2, 3, 7, 9, dtype=torch.float64, generator=gen)
    rgb[0, :, 0, 0] = 0.0  # black: the linear branch of f
    rgb[0, :, 0, 1] = 0.002
    lab = rgb_to_lab(rgb)
    ref = torch.from_numpy(rgb2lab(rgb.permute(0, 2, 3, 1).numpy(), channel_axis=-1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(lab, ref, rtol=0, atol=2e-3)


def pairwise_loop(logits, lab, box, tau, dilation) -> float:
    n, _, h, w = logits.shape
    total, count = 0.0, 0
    for i in range(n):
        for y in range(h):
            for x in range(w):
                if box[i, 0, y, x] < 0.5:
                    continue
                for dy, dx in NEIGHBOURS:
                    yy, xx = y + dy * dilation, x + dx * dilation
                    if not (0 <= yy < h and 0 <= xx < w):
                        continue
                    d = math.sqrt(sum((float(lab[i, c, y, x]) - float(lab[i, c, yy, xx])) ** 2 for c in range(3)))
                    if math.exp(-0.5 * d) < tau:
                        continue
                    p = 1.0 / (1.0 + math.exp(-float(logits[i, 0, y, x])))
                    q = 1.0 / (1.0 + math.exp(-float(logits[i, 0, yy, xx])))
                    total -= math.log(p * q + (1 - p) * (1 - q))
                    count += 1
    return total / max(count, 1)


NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


@pytest.mark.parametrize("dilation", [1, 2])
def test_pairwise_color_loss_matches_loop(dilation):
    from boxcaseg.losses import pairwise_color_loss

    gen = torch.Generator().manual_seed(6 + dilation)
    logits = (3 * torch.randn(2, 1, 6, 7, dtype=torch.float64, generator=gen)).requires_grad_(True)
    # two flat colour regions plus noise: some pairs pass the colour gate, some do not
    lab = torch.zeros(2, 3, 6, 7, dtype=torch.float64)
    lab[:, 0, :, 4:] = 60.0
    lab = lab + 2 * torch.rand(2, 3, 6, 7, dtype=torch.float64, generator=gen)
    box = random_box_mask(2, 6, 7, gen)
    val = pairwise_color_loss(logits, lab, box, tau=0.3, dilation=dilation)
    assert val.item() == pytest.approx(pairwise_loop(logits.detach(), lab, box, 0.3, dilation), rel=1e-10)
    # gradient: central differences of the loop
    (g,) = torch.autograd.grad(val, logits)
    eps = 1e-6
    for idx in [(0, 0, 2, 3), (1, 0, 4, 5), (0, 0, 0, 0)]:
        plus, minus = logits.detach().clone(), logits.detach().clone()
        plus[idx] += eps
        minus[idx] -= eps
        num = (pairwise_loop(plus, lab, box, 0.3, dilation) - pairwise_loop(minus, lab, box, 0.3, dilation)) / (2 * eps)
        assert g[idx].item() == pytest.approx(num, rel=1e-5, abs=1e-9)


def test_pairwise_color_loss_no_pair_is_zero():
    from boxcaseg.losses import pairwise_color_loss

    logits = torch.randn(1, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    lab = torch.zeros(1, 3, 5, 5, dtype=torch.float64)
    val = pairwise_color_loss(logits, lab, torch.zeros(1, 1, 5, 5), tau=0.3)
    assert val.item() == 0.0
    val.backward()
    assert torch.all(logits.grad == 0)


def test_boxcaseg_loss_fused_box_terms():
    from boxcaseg.imageops import MEAN, STD, rgb_to_lab
    from boxcaseg.losses import pairwise_color_loss

    gen = torch.Generator().manual_seed(8)
    weak = torch.randn(4, 1, 6, 6, dtype=torch.float64, generator=gen)
    fused = torch.randn(4, 1, 6, 6, dtype=torch.float64, generator=gen)
    target = random_box_mask(4, 12, 12, gen)
    is_sal = torch.tensor([False, True, False, True])
    rgb = torch.rand(4, 3, 12, 12, dtype=torch.float64, generator=gen)
    images = (rgb - torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)
    base = boxcaseg_loss(weak, fused, target, is_sal, backend="reference")
    out = boxcaseg_loss(weak, fused, target, is_sal, backend="reference", images=images,
                        fused_mil_weight=0.5, pairwise_weight=2.0, pairwise_tau=0.05, pairwise_dilation=1)
    box = ~is_sal
    upf = torch.nn.functional.interpolate(fused[box], size=(12, 12), mode="bilinear", align_corners=False)
    assert out["loss_fused_mil"].item() == pytest.approx(mil_loop(upf, target[box]), rel=1e-9)
    # colours and box at map size by hand: 2x2 means of the RGB, box centre pixel rule
    rgb_map = rgb[box].reshape(2, 3, 6, 2, 6, 2).mean(dim=(3, 5))
    box_map = (target[box].reshape(2, 1, 6, 2, 6, 2).mean(dim=(3, 5)) >= 0.5).double()
    expected_pair = pairwise_loop(fused[box], rgb_to_lab(rgb_map), box_map, 0.05, 1)
    assert out["loss_pairwise"].item() == pytest.approx(expected_pair, rel=1e-6)
    assert expected_pair > 0
    assert out["loss"].item() == pytest.approx(
        base["loss"].item() + 0.5 * out["loss_fused_mil"].item() + 2.0 * out["loss_pairwise"].item(), rel=1e-10)
    torch.testing.assert_close(pairwise_color_loss(fused[box], rgb_to_lab(rgb_map), box_map, 0.05, 1),
                               out["loss_pairwise"])
    with pytest.raises(ValueError, match="images"):
        boxcaseg_loss(weak, fused, target, is_sal, backend="reference", pairwise_weight=1.0)
    # only salient patches: the extra terms are exactly zero
    all_sal = boxcaseg_loss(weak, fused, target, torch.ones(4, dtype=torch.bool), backend="reference",
                            images=images, fused_mil_weight=1.0, pairwise_weight=1.0)
    assert all_sal["loss_fused_mil"].item() == 0.0 and all_sal["loss_pairwise"].item() == 0.0


def test_soft_pixel_loss_matches_loop_with_ignore():
    from boxcaseg.losses import soft_pixel_loss

    g = torch.Generator().manual_seed(11)
    logits = torch.randn(3, 1, 7, 9, generator=g, dtype=torch.float64)
    target = torch.rand(3, 1, 7, 9, generator=g, dtype=torch.float64)
    target[torch.rand(target.shape, generator=g) < 0.3] = -1.0
    total, n = 0.0, 0
    for v, t in zip(logits.flatten().tolist(), target.flatten().tolist()):
        if t < 0:
            continue
        p = 1.0 / (1.0 + math.exp(-v))
        total += -(t * math.log(p) + (1 - t) * math.log(1 - p))
        n += 1
    assert float(soft_pixel_loss(logits, target)) == pytest.approx(total / n, rel=1e-10)
    assert float(soft_pixel_loss(logits, torch.full_like(target, -1.0))) == 0.0


def test_joint_loss_adds_pseudo_term_on_box_patches_only():
    from boxcaseg.losses import boxcaseg_loss, soft_pixel_loss

    g = torch.Generator().manual_seed(5)
    n, s = 4, 16
    weak = torch.randn(n, 1, s // 4, s // 4, generator=g)
    fused = torch.randn(n, 1, s // 4, s // 4, generator=g)
    box = torch.zeros(n, 1, s, s)
    box[:, :, 4:12, 3:13] = 1
    pseudo = torch.rand(n, 1, s, s, generator=g)
    is_sal = torch.tensor([False, True, False, True])
    pseudo[is_sal] = -1.0
    target = torch.cat([box, pseudo], 1)
    base = boxcaseg_loss(weak, fused, box, is_sal, backend="torch")
    both = boxcaseg_loss(weak, fused, target, is_sal, backend="torch", pseudo_weight=0.5)
    up = torch.nn.functional.interpolate(fused[~is_sal], size=(s, s), mode="bilinear", align_corners=False)
    ref = soft_pixel_loss(up, pseudo[~is_sal])
    assert float(both["loss_pseudo"]) == pytest.approx(float(ref), rel=1e-6)
    assert float(both["loss"]) == pytest.approx(float(base["loss"]) + 0.5 * float(ref), rel=1e-6)
    for k in ("loss_mil", "loss_pixel"):
        assert float(both[k]) == pytest.approx(float(base[k]), rel=1e-6)
    with pytest.raises(ValueError, match="pseudo"):
        boxcaseg_loss(weak, fused, box, is_sal, backend="torch", pseudo_weight=1.0)
