"""The Triton kernels compiled for a real GPU, against the float64 reference.

tests/test_kernels.py runs the same kernels through Triton's interpreter on CPU; this file
runs them compiled, on CUDA tensors. It needs a GPU and Triton's compiler, so it skips
unless CUDA is available and ``TRITON_INTERPRET=0`` was set before pytest started (the
conftest turns the interpreter on otherwise):

    TRITON_INTERPRET=0 pytest -q tests/test_kernels_cuda.py

(bench/gpu_checks.sh runs it on a GPU machine.) Same inputs, tolerances and tie rule as
tests/test_kernels.py, whose helpers it uses.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1":
    pytest.skip("needs a CUDA GPU and TRITON_INTERPRET=0 (compiled Triton kernels)", allow_module_level=True)

from test_kernels import (  # noqa: E402
    RTOL,
    SHAPES,
    W_SMOOTH,
    assert_rel,
    check_against_reference,
    first_argmax_mil_grad,
    has_ties,
    random_box_mask,
    reference,
    run_backend,
)

from boxcaseg.kernels import dispatch, mil_smooth_triton  # noqa: E402

CUDA = torch.device("cuda")
BIG = [(16, 288, 288), (4, 513, 257), (64, 64, 64), (3, 1, 2000), (3, 2000, 1)]


@pytest.mark.parametrize("shape", SHAPES + BIG, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_compiled_kernels_match_float64_reference(shape, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, str(dtype))).encode()))  # reproducible across runs
    n, h, w = shape
    x = (torch.randn(n, 1, h, w, generator=gen) * 3).to(dtype)
    m = random_box_mask(n, h, w, gen, "border" if n % 2 else "random")
    if dtype in (torch.float32, torch.float64) and has_ties(x):
        pytest.skip("random map with a tie (the reference splits ties)")
    if dtype == torch.float16:
        check_float16(x.to(CUDA), m.to(CUDA))
    else:
        check_against_reference("triton", x.to(CUDA), m.to(CUDA))


def check_float16(x: torch.Tensor, m: torch.Tensor) -> None:
    """float16 gradients are float16 tensors: on large maps the smoothness gradient
    (weights ~1 / (N * H * W)) falls below float16's normal range (6.1e-5), where its
    step is 2**-24. Judge each gradient against the reference with that step as an
    absolute allowance, the losses as usual."""
    x64, m64 = x.double(), m.double()
    ref = reference(x64, m64)
    if has_ties(x):
        ref["g_mil"] = first_argmax_mil_grad(x64, m64)
        ref["g_total"] = ref["g_mil"] + W_SMOOTH * ref["g_smooth"]
    out = run_backend("triton", x, m)
    for key in ("mil", "mil_only", "smooth", "smooth_only"):
        assert_rel(out[key], ref[key.split("_")[0]], 1e-2, key)
    for key in ("g_total", "g_mil", "g_smooth"):
        a, e = out[key].double(), ref[key]
        err = ((a - e).abs() - 2.0 ** -24).clamp_min(0).max() / e.abs().max().clamp_min(1e-30)
        assert err <= 1e-2, f"{key}: {float(err):.3g}"


@pytest.mark.parametrize("kind", ["empty", "full"])
def test_empty_and_full_boxes(kind):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(4, 1, 97, 131, generator=gen) * 3
    check_against_reference("triton", x.to(CUDA), random_box_mask(4, 97, 131, gen, kind).to(CUDA))


@pytest.mark.parametrize("block", [(1, 128), (4, 64), (8, 128), (16, 128), (32, 64), (32, 128), (64, 32), (2, 256)],
                         ids=lambda b: f"{b[0]}x{b[1]}")
def test_every_tile_shape(block):
    """Many tiles per map (bags reduced across tiles), at the shapes bench/mil_kernel.py sweeps."""
    gen = torch.Generator().manual_seed(12)
    for n, h, w in [(3, 288, 288), (2, 37, 300)]:
        for dtype in (torch.float32, torch.bfloat16):
            x = (torch.randn(n, 1, h, w, generator=gen) * 3).to(dtype)
            m = random_box_mask(n, h, w, gen, "border")
            x64, m64 = x.double(), m.double()
            ref = reference(x64, m64)
            if has_ties(x):
                ref["g_total"] = first_argmax_mil_grad(x64, m64) + W_SMOOTH * ref["g_smooth"]
            mil, smooth, g = mil_smooth_triton.mil_smooth_forward(
                x.to(CUDA), m.to(CUDA), True, True, (1.0, W_SMOOTH), block_h=block[0], block_w=block[1])
            assert_rel(mil.cpu(), ref["mil"], RTOL[dtype], f"mil {block}")
            assert_rel(smooth.cpu(), ref["smooth"], RTOL[dtype], f"smooth {block}")
            assert_rel(g.cpu(), ref["g_total"], RTOL[dtype], f"gradient {block} {dtype}")


def test_auto_backend_is_triton_on_cuda_and_matches_torch():
    x = torch.randn(8, 1, 96, 80, device=CUDA, requires_grad=True)
    m = random_box_mask(8, 96, 80, torch.Generator().manual_seed(3)).to(CUDA)
    assert dispatch.resolve_backend(x, "auto") == "triton"
    grads = {}
    for backend in ("auto", "torch"):
        x.grad = None
        mil, smooth = dispatch.mil_smooth_loss(x, m, W_SMOOTH, backend)
        (mil + W_SMOOTH * smooth).backward()
        grads[backend] = x.grad.clone()
    assert_rel(grads["auto"], grads["torch"], 1e-5, "auto vs torch on CUDA")


def test_any_upstream_weighting():
    """The sync-free backward is exact for any (gm, gs), not only the forward's (1, w) * c."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 1, 40, 50, generator=gen) * 2
    m = random_box_mask(3, 40, 50, gen)
    ref = reference(x.double(), m.double())
    for a, b in [(1.0, W_SMOOTH), (2.0, 2 * W_SMOOTH), (2.0, 3.0), (0.0, 1.0), (1.0, 0.0), (-0.5, 0.0)]:
        xa = x.to(CUDA).requires_grad_(True)
        mil, smooth = dispatch.mil_smooth_loss(xa, m.to(CUDA), W_SMOOTH, "triton")
        (a * mil + b * smooth).backward()
        assert_rel(xa.grad.cpu(), a * ref["g_mil"] + b * ref["g_smooth"], 1e-5, f"({a}, {b})")


def test_forward_and_backward_do_not_sync():
    """No device-to-host synchronisation in a training step's loss (after the first call,
    which copies the kernels' coefficients to the device once)."""
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(8, 1, 64, 72, generator=gen) * 2).to(CUDA).requires_grad_(True)
    m = random_box_mask(8, 64, 72, gen).to(CUDA)
    mil, smooth = dispatch.mil_smooth_loss(x, m, W_SMOOTH, "triton")
    (mil + W_SMOOTH * smooth).backward()
    first = x.grad.clone()
    x.grad = None
    torch.cuda.set_sync_debug_mode("error")
    try:
        mil, smooth = dispatch.mil_smooth_loss(x, m, W_SMOOTH, "triton")
        (mil + W_SMOOTH * smooth).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert_rel(x.grad, first, 1e-6, "second call")


def test_compact_bags_reproducible_and_graph_captured():
    """The training launch (compact bag labels, default tiles): bitwise the same run after
    run and when replayed from a CUDA graph (no float atomics, no host sync), and exact
    against the reference."""
    from boxcaseg.kernels.mil_smooth_common import bag_labels

    gen = torch.Generator().manual_seed(31)
    x = (torch.randn(64, 1, 288, 288, generator=gen) * 3).to(CUDA)
    m = random_box_mask(64, 288, 288, gen)
    bags = bag_labels(m).to(CUDA)

    def step(xs):
        mil, smooth = mil_smooth_triton.mil_smooth_loss_triton(xs, bags, True, True, (1.0, W_SMOOTH))
        g, = torch.autograd.grad(mil + W_SMOOTH * smooth, xs)
        return mil, smooth, g

    xs = x.clone().requires_grad_(True)
    eager = [tuple(t.clone() for t in step(xs)) for _ in range(3)]
    for run in eager[1:]:
        assert all(torch.equal(a, b) for a, b in zip(eager[0], run))
    # The captured step's leaf is first used on the side stream: a leaf's gradient accumulator
    # keeps the stream of its first use, and one on the legacy default stream cannot wait on a
    # capture (torch.cuda.make_graphed_callables gives its inputs fresh leaves for the same reason).
    xg = x.clone().requires_grad_(True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(xg)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step(xg)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(eager[0], outs))
    ref = reference(x.double().cpu(), m.double())
    assert_rel(eager[0][0].cpu(), ref["mil"], 1e-5, "mil")
    assert_rel(eager[0][1].cpu(), ref["smooth"], 1e-5, "smooth")
    assert_rel(eager[0][2].cpu(), ref["g_total"], 1e-5, "gradient")


def test_ties_across_tiles_and_the_last_image_ticket():
    """Small-integer logits (ties inside and across tiles) at several GPU tile shapes: the
    first argmax wins as in first_argmax_mil_grad; many images (many programs racing for
    the last ticket) give the reference's mean every time."""
    from boxcaseg.kernels.mil_smooth_common import bag_labels

    gen = torch.Generator().manual_seed(32)
    for n, h, w in [(3, 288, 288), (512, 9, 7)]:
        x = torch.randint(-2, 3, (n, 1, h, w), generator=gen).double() * 0.75
        m = random_box_mask(n, h, w, gen)
        ref = reference(x, m.double())
        g_ref = first_argmax_mil_grad(x, m.double()) + W_SMOOTH * ref["g_smooth"]
        for block in [None, (4, 64), (32, 32)]:
            for _ in range(5 if n > 100 else 1):
                xa = x.float().to(CUDA).requires_grad_(True)
                mil, smooth = mil_smooth_triton.mil_smooth_loss_triton(
                    xa, bag_labels(m).to(CUDA), True, True, (1.0, W_SMOOTH), block)
                (mil + W_SMOOTH * smooth).backward()
                assert_rel(mil.cpu(), ref["mil"], 1e-5, f"mil {(n, h, w)} {block}")
                assert_rel(smooth.cpu(), ref["smooth"], 1e-5, f"smooth {(n, h, w)} {block}")
                assert_rel(xa.grad.cpu(), g_ref, 1e-5, f"gradient {(n, h, w)} {block}")
