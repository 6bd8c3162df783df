"""Fast paths of the MIL + smoothness loss against the float64 reference.

Every backend (plain torch, the fused Numba CPU kernel, the fused Triton kernels run by
Triton's interpreter on CPU; conftest.py sets TRITON_INTERPRET=1 before Triton is
imported) is compared with ``boxcaseg.kernels.mil_smooth_reference`` evaluated in float64 on fresh
random inputs, values and gradients.

Tolerances, relative to the largest magnitude of the reference (so an element whose
gradient cancels to ~0 is judged against the map's scale): float32 1e-5, float64 1e-9,
bfloat16 / float16 1e-2.

Tie rule: on an exact tie of a bag's maximum the fast paths send the bag's gradient to
the first position (lowest x of a row, lowest y of a column), as torch.argmax picks it;
``torch.amax`` in the reference splits it evenly. Random float32/float64 maps have no
ties (checked); for bfloat16 maps (ties happen) and the all-equal map the expected MIL
gradient is built by hand with the first-position rule.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import zlib

import pytest
import torch

from boxcaseg import losses
from boxcaseg.kernels import dispatch
from boxcaseg.kernels.mil_smooth_reference import SMOOTH_WEIGHT, mil_loss_reference, smoothness_loss_reference

FAST = ["torch", "numba", "triton"]
RTOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
W_SMOOTH = SMOOTH_WEIGHT


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "") -> None:
    actual = actual.detach().to(torch.float64)
    expected = expected.detach().to(torch.float64)
    assert actual.shape == expected.shape, what
    scale = expected.abs().max().clamp_min(1e-30)
    err = (actual - expected).abs().max() / scale
    assert err <= rtol, f"{what}: max |diff| / max |ref| = {float(err):.3g} > {rtol:g}"


def random_box_mask(n: int, h: int, w: int, gen: torch.Generator, kind: str = "random") -> torch.Tensor:
    """[N, 1, H, W] float {0, 1}: a random box per image, or a border-touching / empty / full one."""
    m = torch.zeros(n, 1, h, w)
    for i in range(n):
        if kind == "empty":
            continue
        if kind == "full":
            m[i] = 1
            continue
        y0, y1 = sorted(torch.randint(0, h + 1, (2,), generator=gen).tolist())
        x0, x1 = sorted(torch.randint(0, w + 1, (2,), generator=gen).tolist())
        if kind == "border":      # touches two borders, alternating corners
            y0, x0 = (0, 0) if i % 2 == 0 else (y0, x0)
            y1, x1 = (y1, x1) if i % 2 == 0 else (h, w)
        y1, x1 = max(y1, y0 + 1), max(x1, x0 + 1)
        m[i, 0, y0:y1, x0:x1] = 1
    return m


def reference(x64: torch.Tensor, m64: torch.Tensor) -> dict[str, torch.Tensor]:
    """float64 reference values and the gradients of mil, smooth and mil + w*smooth."""
    x = x64.detach().clone().requires_grad_(True)
    mil = mil_loss_reference(x, m64)
    smooth = smoothness_loss_reference(x)
    g_mil, = torch.autograd.grad(mil, x, retain_graph=True)
    g_smooth, = torch.autograd.grad(smooth, x)
    return {"mil": mil.detach(), "smooth": smooth.detach(), "g_mil": g_mil, "g_smooth": g_smooth,
            "g_total": g_mil + W_SMOOTH * g_smooth}


def first_argmax_mil_grad(x64: torch.Tensor, m64: torch.Tensor) -> torch.Tensor:
    """d mil / d logits with each bag's gradient at the first position of its maximum."""
    n, _, h, w = x64.shape
    x, m = x64[:, 0], m64[:, 0]
    g = torch.zeros_like(x)
    n_bags = n * (h + w)
    r_max = x.amax(dim=2, keepdim=True)
    r_arg = (x == r_max).to(torch.int8).argmax(dim=2)              # first True
    r_coef = (torch.sigmoid(r_max[..., 0]) - m.amax(dim=2)) / n_bags
    g.scatter_add_(2, r_arg[..., None], r_coef[..., None])
    c_max = x.amax(dim=1, keepdim=True)
    c_arg = (x == c_max).to(torch.int8).argmax(dim=1)
    c_coef = (torch.sigmoid(c_max[:, 0]) - m.amax(dim=1)) / n_bags
    g.scatter_add_(1, c_arg[:, None], c_coef[:, None])
    return g[:, None]


def has_ties(x: torch.Tensor) -> bool:
    x = x[:, 0].to(torch.float64)
    rows = (x == x.amax(dim=2, keepdim=True)).sum(dim=2)
    cols = (x == x.amax(dim=1, keepdim=True)).sum(dim=1)
    return bool((rows > 1).any() or (cols > 1).any())


def run_backend(backend: str, x: torch.Tensor, m: torch.Tensor) -> dict[str, torch.Tensor]:
    """Values through the public functions and the three gradients, for one backend."""
    xa = x.detach().clone().requires_grad_(True)
    mil, smooth = dispatch.mil_smooth_loss(xa, m, W_SMOOTH, backend)
    (mil + W_SMOOTH * smooth).backward()
    g_total = xa.grad
    xa.grad = None
    mil_only = dispatch.mil_loss(xa, m, backend=backend)
    g_mil, = torch.autograd.grad(mil_only, xa)
    smooth_only = dispatch.smoothness_loss(xa, backend=backend)
    g_smooth, = torch.autograd.grad(smooth_only, xa)
    for t in (g_total, g_mil, g_smooth):
        assert t.dtype == x.dtype and t.shape == x.shape
    return {"mil": mil, "smooth": smooth, "mil_only": mil_only, "smooth_only": smooth_only,
            "g_total": g_total, "g_mil": g_mil, "g_smooth": g_smooth}


def check_against_reference(backend: str, x: torch.Tensor, m: torch.Tensor) -> None:
    rtol = RTOL[x.dtype]
    x64, m64 = x.detach().to(torch.float64), m.to(torch.float64)
    ref = reference(x64, m64)
    if has_ties(x):
        assert x.dtype in (torch.bfloat16, torch.float16), "random float32/64 maps must not tie"
        ref["g_mil"] = first_argmax_mil_grad(x64, m64)
        ref["g_total"] = ref["g_mil"] + W_SMOOTH * ref["g_smooth"]
    out = run_backend(backend, x, m)
    for key, ref_key in [("mil", "mil"), ("mil_only", "mil"), ("smooth", "smooth"), ("smooth_only", "smooth"),
                         ("g_total", "g_total"), ("g_mil", "g_mil"), ("g_smooth", "g_smooth")]:
        expected = ref[ref_key]
        if ref_key == "smooth" and float(expected) == 0.0:
            assert float(out[key].detach()) == 0.0, f"{backend} {key}"
            continue
        assert_rel(out[key], expected, rtol, f"{backend} {key} {tuple(x.shape)} {x.dtype}")


SHAPES = [(3, 1, 1), (3, 7, 13), (2, 288, 288), (2, 257, 320), (2, 1, 9), (2, 9, 1)]


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_float32_matches_float64_reference(backend, shape):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((backend, shape)).encode()))  # reproducible across runs
    n, h, w = shape
    x = torch.randn(n, 1, h, w, generator=gen) * 3
    m = random_box_mask(n, h, w, gen)
    check_against_reference(backend, x, m)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
def test_other_dtypes(backend, dtype):
    gen = torch.Generator().manual_seed(7)
    for n, h, w in [(2, 288, 288), (3, 7, 13)]:
        x = (torch.randn(n, 1, h, w, generator=gen) * 3).to(dtype)
        m = random_box_mask(n, h, w, gen).to(dtype)
        check_against_reference(backend, x, m)


@pytest.mark.parametrize("backend", ["numba", "triton"])
def test_float16_runs(backend):
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 1, 17, 23, generator=gen) * 3).half()
    check_against_reference(backend, x, random_box_mask(2, 17, 23, gen))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("kind", ["border", "empty", "full"])
def test_border_empty_and_full_boxes(backend, kind):
    gen = torch.Generator().manual_seed(11)
    for n, h, w in [(4, 19, 31), (2, 288, 288)]:
        x = torch.randn(n, 1, h, w, generator=gen) * 3
        m = random_box_mask(n, h, w, gen, kind)
        check_against_reference(backend, x, m)


@pytest.mark.parametrize("backend", FAST)
def test_bool_and_uint8_masks(backend):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 1, 33, 21, generator=gen)
    m = random_box_mask(3, 33, 21, gen)
    ref = run_backend(backend, x, m)
    for mm in (m.bool(), m.to(torch.uint8)):
        out = run_backend(backend, x, mm)
        for key in ("mil", "g_total", "g_mil"):
            assert_rel(out[key], ref[key], 1e-6, f"{backend} {mm.dtype} {key}")


@pytest.mark.parametrize("backend", FAST)
def test_all_equal_map_ties_go_to_first_position(backend):
    """Constant logits: every row bag's gradient lands on x = 0, every column's on y = 0."""
    n, h, w, c = 2, 6, 9, 0.3
    x = torch.full((n, 1, h, w), c, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    m = random_box_mask(n, h, w, gen)
    n_bags = n * (h + w)
    expected = torch.zeros(n, 1, h, w, dtype=torch.float64)
    sig = torch.sigmoid(torch.tensor(c, dtype=torch.float64))
    for i in range(n):
        for y in range(h):
            expected[i, 0, y, 0] += (sig - m[i, 0, y].max()) / n_bags
        for xx in range(w):
            expected[i, 0, 0, xx] += (sig - m[i, 0, :, xx].max()) / n_bags
    ref = reference(x, m.double())
    for dt in (torch.float64, torch.float32):
        out = run_backend(backend, x.to(dt), m.to(dt))
        assert_rel(out["mil"], ref["mil"], RTOL[dt], f"{backend} mil")
        assert_rel(out["g_mil"], expected, RTOL[dt], f"{backend} tie gradient")
        assert float(out["smooth"].detach()) == 0.0
        assert float(out["g_smooth"].abs().max()) == 0.0
    # the reference (torch.amax) spreads the same per-image total evenly over the ties
    assert torch.allclose(ref["g_mil"].sum(dim=(2, 3)), expected.sum(dim=(2, 3)))
    assert not torch.allclose(ref["g_mil"], expected)


@pytest.mark.parametrize("backend", FAST)
def test_non_contiguous_views(backend):
    gen = torch.Generator().manual_seed(9)
    base = torch.randn(3, 2, 80, 70, generator=gen) * 3
    mbase = random_box_mask(3, 70, 80, gen).transpose(2, 3)           # [3, 1, 80, 70], strided
    views = [
        (base[:, 1:2, ::2, 3::2], mbase[:, :, ::2, 3::2]),            # channel slice + steps
        (base[:, :1].transpose(2, 3), random_box_mask(3, 70, 80, gen)),  # transposed
    ]
    for x, m in views:
        assert not x.is_contiguous()
        check_against_reference(backend, x, m)


@pytest.mark.parametrize("backend", FAST)
def test_many_images(backend):
    gen = torch.Generator().manual_seed(2)
    n = 2000 if backend != "triton" else 100      # the interpreter runs 2N programs, ~10 ms each
    x = torch.randn(n, 1, 5, 7, generator=gen) * 3
    check_against_reference(backend, x, random_box_mask(n, 5, 7, gen))


@pytest.mark.parametrize("shape,block", [((3, 37, 45), (8, 16)), ((2, 288, 288), (32, 128)), ((2, 5, 300), (1, 128))],
                         ids=["37x45-8x16", "288x288-32x128", "5x300-1x128"])
def test_triton_many_tiles(shape, block):
    """The GPU launch shape (many tiles per map, bags reduced across tiles), run by the
    interpreter: values and the forward-made gradient against the reference."""
    from boxcaseg.kernels import mil_smooth_triton

    gen = torch.Generator().manual_seed(12)
    n, h, w = shape
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(n, 1, h, w, generator=gen) * 3).to(dtype)
        m = random_box_mask(n, h, w, gen, "border")
        x64 = x.double()
        ref = reference(x64, m.double())
        if has_ties(x):
            ref["g_total"] = first_argmax_mil_grad(x64, m.double()) + W_SMOOTH * ref["g_smooth"]
        mil, smooth, g = mil_smooth_triton.mil_smooth_forward(x, m, True, True, (1.0, W_SMOOTH),
                                                               block_h=block[0], block_w=block[1])
        assert_rel(mil, ref["mil"], RTOL[dtype], "mil")
        assert_rel(smooth, ref["smooth"], RTOL[dtype], "smooth")
        assert g.dtype == dtype
        assert_rel(g, ref["g_total"], RTOL[dtype], f"gradient {dtype}")


def test_triton_tile_shape_through_autograd():
    """``blocks`` of the autograd entry point (the benchmark's tile sweep) changes the
    launch, not the result: loss and gradient against the reference, several tiles a map."""
    from boxcaseg.kernels.mil_smooth_triton import mil_smooth_loss_triton

    gen = torch.Generator().manual_seed(13)
    x = torch.randn(2, 1, 37, 45, generator=gen) * 3
    m = random_box_mask(2, 37, 45, gen, "border")
    ref = reference(x.double(), m.double())
    xa = x.clone().requires_grad_(True)
    mil, smooth = mil_smooth_loss_triton(xa, m, True, True, (1.0, W_SMOOTH), blocks=(8, 16))
    (mil + W_SMOOTH * smooth).backward()
    assert_rel(mil, ref["mil"], 1e-5, "mil")
    assert_rel(smooth, ref["smooth"], 1e-5, "smooth")
    assert_rel(xa.grad, ref["g_total"], 1e-5, "gradient")
    with pytest.raises(Exception, match="power of 2"):     # the shape does reach the launch
        mil_smooth_loss_triton(xa, m, True, True, (1.0, W_SMOOTH), blocks=(3, 16))


@pytest.mark.parametrize("backend", ["numba", "triton"])
def test_upstream_gradients_of_any_weighting(backend):
    """The fused backward reuses the forward's gradient only for (1, w) * c; other
    weightings recompute it. Both, and retain_graph reuse, match the reference."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 1, 40, 50, generator=gen) * 2
    m = random_box_mask(3, 40, 50, gen)
    ref = reference(x.double(), m.double())
    for a, b in [(1.0, W_SMOOTH), (2.0, 2 * W_SMOOTH), (2.0, 3.0), (0.0, 1.0), (1.0, 0.0)]:
        xa = x.clone().requires_grad_(True)
        mil, smooth = dispatch.mil_smooth_loss(xa, m, W_SMOOTH, backend)
        loss = a * mil + b * smooth
        loss.backward(retain_graph=True)
        first = xa.grad.clone()
        xa.grad = None
        loss.backward()
        assert torch.equal(first, xa.grad)
        assert_rel(xa.grad, a * ref["g_mil"] + b * ref["g_smooth"], 1e-5, f"{backend} ({a}, {b})")


@pytest.mark.parametrize("backend", FAST)
def test_no_grad_forward(backend):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 1, 30, 20, generator=gen)
    m = random_box_mask(2, 30, 20, gen)
    with torch.no_grad():
        mil, smooth = dispatch.mil_smooth_loss(x, m, W_SMOOTH, backend)
    assert_rel(mil, mil_loss_reference(x.double(), m.double()), 1e-5)
    assert_rel(smooth, smoothness_loss_reference(x.double()), 1e-5)


def test_reference_backend_is_the_reference():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 1, 12, 10, generator=gen)
    m = random_box_mask(2, 12, 10, gen)
    assert torch.equal(dispatch.mil_loss(x, m, backend="reference"), mil_loss_reference(x, m))
    assert torch.equal(dispatch.smoothness_loss(x, backend="reference"), smoothness_loss_reference(x))


# ---------------------------------------------------------------- dispatcher

def test_resolve_backend_and_log(caplog):
    x = torch.zeros(1, 1, 2, 2)
    dispatch._announced.clear()
    with caplog.at_level(logging.INFO, logger="boxcaseg.kernels"):
        assert dispatch.resolve_backend(x, "auto") == "numba"
        assert dispatch.resolve_backend(x, "auto") == "numba"
        assert dispatch.resolve_backend(x, "torch") == "torch"
    msgs = [r.getMessage() for r in caplog.records if r.name == "boxcaseg.kernels"]
    assert len(msgs) == 2 and "numba" in msgs[0] and "torch" in msgs[1]
    assert dispatch.resolve_backend(x, "triton") == "triton"          # interpreter is on here
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.resolve_backend(x, "cuda")
    meta = torch.zeros(1, 1, 2, 2, device="meta")
    with pytest.raises(dispatch.BackendUnavailableError, match="numba"):
        dispatch.resolve_backend(meta, "numba")
    assert dispatch.resolve_backend(meta, "auto") == "torch"


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    code = (
        "import torch\n"
        "from boxcaseg.kernels.dispatch import BackendUnavailableError, mil_loss\n"
        "x = torch.zeros(1, 1, 2, 2)\n"
        "try:\n"
        "    mil_loss(x, x, backend='triton')\n"
        "except BackendUnavailableError as e:\n"
        "    print('ERR', e)\n"
        "print('auto', float(mil_loss(x, x, backend='auto')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR" in out.stdout and "TRITON_INTERPRET=1" in out.stdout
    assert "auto 0.69" in out.stdout


# ---------------------------------------------------------------- training step

class _TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, img):
        out = self.conv(img)
        return out[:, :1], out[:, 1:]


def _one_step(backend: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    net = _TinyNet().double()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(1)
    img = torch.randn(4, 3, 12, 12, generator=gen, dtype=torch.float64)
    target = random_box_mask(4, 48, 48, gen).double()
    is_sal = torch.tensor([True, False, False, True])
    weak, fused = net(img)
    out = losses.boxcaseg_loss(weak, fused, target, is_sal, backend=backend)
    assert set(out) == {"loss", "loss_mil", "loss_smooth", "loss_pixel"}
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    return [p.detach().clone() for p in net.parameters()]


def test_training_step_is_the_same_with_every_backend():
    ref = _one_step("reference")
    for backend in ["auto", *FAST]:
        for p, q in zip(_one_step(backend), ref):
            assert_rel(p, q, 1e-9, backend)


# ---------------------------------------------------------------- compact bag labels, the Triton launch

def test_bag_labels_and_their_expansion():
    """bag_labels = the reference's row/column maxima of a {0,1} mask; expanding them gives
    a mask with the same maxima."""
    from boxcaseg.kernels.mil_smooth_common import bag_labels, expand_bag_labels

    gen = torch.Generator().manual_seed(21)
    for kind in ("random", "border", "empty", "full"):
        m = random_box_mask(5, 13, 8, gen, kind)
        m[1] = (torch.rand(1, 13, 8, generator=gen) < 0.1).float()          # scattered, not a box
        bags = bag_labels(m)
        assert bags.dtype == torch.uint8 and bags.shape == (5, 13 + 8)
        want = torch.cat([m[:, 0].amax(dim=2), m[:, 0].amax(dim=1)], dim=1)
        assert torch.equal(bags.float(), want)
        assert torch.equal(bag_labels(expand_bag_labels(bags, 13, 8)), bags)


@pytest.mark.parametrize("backend", FAST + ["reference"])
def test_compact_bags_give_what_the_mask_gives(backend):
    """Every backend takes the bags in compact form (uint8 [N, H + W]) instead of the mask."""
    from boxcaseg.kernels.mil_smooth_common import bag_labels

    gen = torch.Generator().manual_seed(22)
    x = torch.randn(3, 1, 21, 17, generator=gen, dtype=torch.float64) * 3
    m = random_box_mask(3, 21, 17, gen)
    m[2] = (torch.rand(1, 21, 17, generator=gen) < 0.05).double()
    outs = []
    for kw in ({"box_mask": m}, {"box_mask": None, "bags": bag_labels(m)}):
        xa = x.clone().requires_grad_(True)
        mil, smooth = dispatch.mil_smooth_loss(xa, smooth_weight=W_SMOOTH, backend=backend, **kw)
        (mil + W_SMOOTH * smooth).backward()
        outs.append((mil.detach(), smooth.detach(), xa.grad))
    for a, b in zip(*outs):
        assert_rel(a, b, 1e-12, backend)
    fm = dispatch.mil_loss(x, None, backend=backend, bags=bag_labels(m))
    assert_rel(fm, mil_loss_reference(x, m), 1e-12, backend)
    with pytest.raises(ValueError, match="H \\+ W"):
        dispatch.mil_smooth_loss(x, None, W_SMOOTH, backend, bags=bag_labels(m)[:, 1:])


def _tie_map(n, h, w, gen):
    """Logits with many exact ties inside and across tiles (small integers)."""
    return torch.randint(-2, 3, (n, 1, h, w), generator=gen).to(torch.float64) * 0.75


@pytest.mark.parametrize("blocks", [(4, 8), (8, 4), (1, 16), (16, 1)], ids=lambda b: f"{b[0]}x{b[1]}")
def test_triton_many_tiles_ties_odd_sizes_empty_and_full(blocks):
    """Several tiles per map at odd sizes: the bag maxima are reduced across tiles with the
    first argmax kept (ties across tile borders go to the lowest x / y, as in
    first_argmax_mil_grad), empty and full label rows, values and gradients against the
    float64 reference."""
    from boxcaseg.kernels.mil_smooth_common import bag_labels
    from boxcaseg.kernels.mil_smooth_triton import mil_smooth_loss_triton

    gen = torch.Generator().manual_seed(23)
    for n, h, w in [(4, 13, 19), (3, 1, 11), (3, 9, 1), (2, 17, 33)]:
        for dt in (torch.float64, torch.float32):
            x = _tie_map(n, h, w, gen)
            m = torch.cat([random_box_mask(n - 2, h, w, gen), random_box_mask(1, h, w, gen, "empty"),
                           random_box_mask(1, h, w, gen, "full")])
            ref = reference(x, m.double())
            g_ref = first_argmax_mil_grad(x, m.double()) + W_SMOOTH * ref["g_smooth"]
            xa = x.to(dt).requires_grad_(True)
            mil, smooth = mil_smooth_loss_triton(xa, bag_labels(m), True, True, (1.0, W_SMOOTH), blocks)
            (mil + W_SMOOTH * smooth).backward()
            what = f"{(n, h, w)} {dt} {blocks}"
            assert_rel(mil, ref["mil"], RTOL[dt], what)
            if float(ref["smooth"]) == 0.0:
                assert float(smooth) == 0.0
            else:
                assert_rel(smooth, ref["smooth"], RTOL[dt], what)
            assert_rel(xa.grad, g_ref, RTOL[dt], what)


def test_triton_is_bitwise_reproducible():
    """No float atomics, partials reduced in a fixed order: the same inputs give the same
    bits, losses and gradient, run after run."""
    from boxcaseg.kernels.mil_smooth_common import bag_labels
    from boxcaseg.kernels.mil_smooth_triton import mil_smooth_loss_triton

    gen = torch.Generator().manual_seed(24)
    x = torch.randn(3, 1, 37, 45, generator=gen) * 3
    bags = bag_labels(random_box_mask(3, 37, 45, gen))
    runs = []
    for _ in range(2):
        xa = x.clone().requires_grad_(True)
        mil, smooth = mil_smooth_loss_triton(xa, bags, True, True, (1.0, W_SMOOTH), (8, 16))
        (mil + W_SMOOTH * smooth).backward()
        runs.append((mil.detach(), smooth.detach(), xa.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


_IN_LAUNCH = [False]


class _CountLaunches:
    """Stands in for a Triton kernel: counts ``kernel[grid](...)`` launches (and marks the
    time inside one: the interpreter's own tensor copies are not the launcher's ops)."""

    def __init__(self, kernel, log: list, name: str):
        self.kernel, self.log, self.name = kernel, log, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(self.name)
            _IN_LAUNCH[0] = True
            try:
                return self.kernel[grid](*args, **kwargs)
            finally:
                _IN_LAUNCH[0] = False
        return launch


def _record_aten_ops(fn):
    """The aten ops ``fn`` runs outside kernel launches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ops = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not _IN_LAUNCH[0]:
                ops.append(str(func.overloadpacket.__name__))
            return func(*args, **(kwargs or {}))

    with Record():
        out = fn()
    return out, ops


@pytest.mark.parametrize("terms", ["both", "mil", "smooth"])
def test_triton_three_launches_no_torch_compute_no_sync(monkeypatch, terms):
    """Forward + backward is at most 3 kernel launches (tile, bags, backward) and, besides
    them, only allocations and views: no fill, no reduction, no copy, no device-to-host
    read (``.item()`` would show as _local_scalar_dense)."""
    from boxcaseg.kernels import mil_smooth_triton as T
    from boxcaseg.kernels.mil_smooth_common import bag_labels

    log: list = []
    for name in ("_tile_kernel", "_bags_kernel", "_backward_kernel"):
        monkeypatch.setattr(T, name, _CountLaunches(getattr(T, name), log, name))
    gen = torch.Generator().manual_seed(25)
    x = (torch.randn(2, 1, 20, 24, generator=gen) * 2).requires_grad_(True)
    bags = bag_labels(random_box_mask(2, 20, 24, gen))
    has_mil, has_smooth = terms in ("both", "mil"), terms in ("both", "smooth")
    T._coefs.clear()
    T.mil_smooth_loss_triton(x, bags, has_mil, has_smooth, (1.0, W_SMOOTH), (8, 8))   # coefficients cached
    log.clear()
    ups = (torch.tensor(1.0), torch.tensor(W_SMOOTH))

    def fwd_bwd():
        mil, smooth = T.mil_smooth_loss_triton(x, bags, has_mil, has_smooth, (1.0, W_SMOOTH), (8, 8))
        return torch.autograd.grad((mil, smooth), x, ups)

    _, ops = _record_aten_ops(fwd_bwd)
    assert log == ["_tile_kernel", "_bags_kernel", "_backward_kernel"]
    allowed = {"empty", "select", "unsqueeze", "view", "alias", "detach", "slice", "as_strided", "lift_fresh"}
    assert set(ops) <= allowed, sorted(set(ops) - allowed)


def test_triton_backward_moves_nothing_when_upstream_is_the_forward_weighting():
    """Upstream (1, w) = the weights the forward made G for: the backward kernel leaves the
    buffer alone (a marked pixel keeps its mark). Any other upstream rewrites it exactly."""
    from boxcaseg.kernels import mil_smooth_triton as T
    from boxcaseg.kernels.mil_smooth_common import bag_labels

    gen = torch.Generator().manual_seed(26)
    x = torch.randn(2, 1, 15, 18, generator=gen) * 2
    m = random_box_mask(2, 15, 18, gen)
    ref = reference(x.double(), m.double())
    for up, poisoned_stays in [((1.0, W_SMOOTH), True), ((2.0, 3.0), False)]:
        xa = x.clone().requires_grad_(True)
        mil, smooth = T.mil_smooth_loss_triton(xa, bag_labels(m), True, True, (1.0, W_SMOOTH), (4, 8))
        g = mil.grad_fn.launch.g
        g[1, 7, 9] = 123.0
        grad, = torch.autograd.grad((mil, smooth), xa, (torch.tensor(up[0]), torch.tensor(up[1])))
        assert (float(grad[1, 0, 7, 9]) == 123.0) == poisoned_stays
        grad[1, 0, 7, 9] = 0.0
        want = up[0] * ref["g_mil"] + up[1] * ref["g_smooth"]
        want[1, 0, 7, 9] = 0.0
        assert_rel(grad, want, 1e-5, str(up))


def test_triton_backward_after_a_zero_smoothness_upstream():
    """A retained graph's second backward: exact after (a, 0) for another (a', 0) (only the
    MIL part is rewritten), NaN for a non-zero smoothness weight (the term was not kept;
    documented in TritonMilSmoothFunction)."""
    from boxcaseg.kernels.mil_smooth_common import bag_labels
    from boxcaseg.kernels.mil_smooth_triton import mil_smooth_loss_triton

    gen = torch.Generator().manual_seed(27)
    x = torch.randn(2, 1, 12, 10, generator=gen) * 2
    m = random_box_mask(2, 12, 10, gen)
    ref = reference(x.double(), m.double())
    xa = x.clone().requires_grad_(True)
    mil, smooth = mil_smooth_loss_triton(xa, bag_labels(m), True, True, (1.0, W_SMOOTH))
    g1, = torch.autograd.grad((mil, smooth), xa, (torch.tensor(1.0), torch.tensor(0.0)), retain_graph=True)
    assert_rel(g1, ref["g_mil"], 1e-5, "(1, 0)")
    g2, = torch.autograd.grad((mil, smooth), xa, (torch.tensor(3.0), torch.tensor(0.0)), retain_graph=True)
    assert_rel(g2, 3 * ref["g_mil"], 1e-5, "(3, 0)")
    g3, = torch.autograd.grad((mil, smooth), xa, (torch.tensor(1.0), torch.tensor(1.0)))
    assert bool(torch.isnan(g3).any())


# --------------------------------------------------------------------------- GPU faults, checked here


def test_coef_tensors_never_evicted_and_never_copied_inside_a_capture(monkeypatch):
    """A captured CUDA graph points to its coefficient tensor: none is ever evicted (a
    training's worth and many more stay the same objects), and a set not seen before
    during a capture is an error instead of a host-to-device copy the graph cannot hold."""
    from boxcaseg.kernels import mil_smooth_triton as T

    dev = torch.device("cpu")
    first = T._coef_tensor((1.0, 2.0, 0.5), torch.float32, dev)
    for i in range(600):
        T._coef_tensor((float(i), 3.0), torch.float64, dev)
    assert T._coef_tensor((1.0, 2.0, 0.5), torch.float32, dev) is first
    assert first.tolist() == [1.0, 2.0, 0.5]
    monkeypatch.setattr(T, "_capturing", lambda device: True)
    assert T._coef_tensor((1.0, 2.0, 0.5), torch.float32, dev) is first   # seen before: no copy
    with pytest.raises(RuntimeError, match="eagerly first"):
        T._coef_tensor((9.0, 9.0), torch.float32, dev)


def test_one_ticket_per_stream(monkeypatch):
    """Launches on two streams never share the last-image ticket; one stream keeps its own."""
    from boxcaseg.kernels import mil_smooth_triton as T

    dev = torch.device("cpu")
    stream = {"id": 11}
    monkeypatch.setattr(T, "_stream_key", lambda device: (device, stream["id"]))
    a = T._ticket(dev)
    assert T._ticket(dev) is a
    stream["id"] = 12
    b = T._ticket(dev)
    assert b is not a and int(b) == 0
    stream["id"] = 11
    assert T._ticket(dev) is a
    monkeypatch.setattr(T, "_capturing", lambda device: True)   # a graph's own counter, zeroed
    c1, c2 = T._ticket(dev), T._ticket(dev)
    assert c1 is not a and c2 is not c1 and int(c1) == 0
    assert T._tickets[(dev, 11)] is a and T._tickets[(dev, 12)] is b and len([k for k in T._tickets if k[1] in (11, 12)]) == 2


def test_fused_mil_weight_takes_the_fast_backward():
    """The recipes' fused MIL weight (2) is the weight the forward makes the gradient for:
    the backward kernel leaves the buffer alone (a poisoned pixel stays), and the gradient
    is the reference's times the weight."""
    from boxcaseg.kernels.mil_smooth_common import bag_labels

    gen = torch.Generator().manual_seed(41)
    x = torch.randn(3, 1, 14, 17, generator=gen) * 2
    m = random_box_mask(3, 14, 17, gen)
    ref = reference(x.double(), m.double())
    xa = x.clone().requires_grad_(True)
    loss = dispatch.mil_loss(xa, None, backend="triton", bags=bag_labels(m), weight=2.0)
    g = loss.grad_fn.launch.g
    g[2, 5, 6] = 77.0
    (2.0 * loss).backward()
    assert float(xa.grad[2, 0, 5, 6]) == 77.0          # the backward moved nothing
    xa.grad[2, 0, 5, 6] = 0.0
    want = 2.0 * ref["g_mil"]
    want[2, 0, 5, 6] = 0.0
    assert_rel(xa.grad, want, 1e-5, "fused MIL weight 2")
    assert_rel(loss.detach(), ref["mil"], 1e-5, "mil")


def test_boxcaseg_loss_hands_the_fused_mil_weight_to_the_kernels(monkeypatch):
    """boxcaseg_loss asks the fused backend for the gradient of ``fused_mil_weight * mil``."""
    calls = []
    real = dispatch._fused

    def spy(chosen):
        fn = real(chosen)

        def wrapped(logits, labels, has_mil, has_smooth, grad_weights, *a):
            calls.append((has_mil, has_smooth, grad_weights))
            return fn(logits, labels, has_mil, has_smooth, grad_weights, *a)
        return wrapped

    monkeypatch.setattr(dispatch, "_fused", spy)
    gen = torch.Generator().manual_seed(42)
    n, s = 4, 16
    target = random_box_mask(n, s, s, gen)
    weak = torch.randn(n, 1, s, s, generator=gen, requires_grad=True)
    fused = torch.randn(n, 1, s, s, generator=gen, requires_grad=True)
    is_sal = torch.tensor([False, False, True, False])
    out = losses.boxcaseg_loss(weak, fused, target, is_sal, backend="numba", fused_mil_weight=2.0)
    out["loss"].backward()
    assert (True, False, (2.0, 0.0)) in calls, calls
