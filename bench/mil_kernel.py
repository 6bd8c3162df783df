"""Forward + backward of the weak-map loss ``MIL + 0.05 * smoothness`` at N x 1 x 288 x 288.

    python bench/mil_kernel.py [--n 16 64] [--json] [--threads T] [--no-compile]

Backends, all in one run so their ratios are comparable:

- original   the published BoxCaseg formulation, re-written here from DESIGN.md:
             MIL by ``max_pool2d`` with (1, W) and (H, 1) windows + ``BCEWithLogitsLoss``;
             smoothness by eight separate fixed 3x3 convolutions whose weights are built
             on every call, zero padding (so border pixels are compared with 0, as theirs);
- reference  boxcaseg.kernels.mil_smooth_reference (the definition);
- torch      boxcaseg.kernels.mil_smooth_torch (max over one axis, shifted slices);
- compile    torch.compile of the torch path, the whole loss in one graph;
- numba      the fused CPU kernel (what ``backend="auto"`` runs on CPU);
- triton     the fused Triton kernels (CUDA only), fed the compact bag labels uint8
             [N, H + W] as the training loader makes them (the other rows read the mask).

CPU: warm-up, then interleaved rounds, median (bench/common.py). GPU: do_bench median;
also the bytes the loss must move (read the logits once, write the gradient once), the
achieved GB/s and its ratio to a device-to-device copy of the same bytes (row ``copy``).
``--graphs`` adds every GPU contender captured in a CUDA graph (rows ``X+graph``:
``torch``, ``compile``, ``triton`` and the ``copy`` itself, each timed the same way), so
that graph is compared with graph and eager with eager; the summary lines at the end
state the issue's goals as ratios measured in this run (Triton graph time over copy
graph time, torch.compile graph over Triton graph, original eager over Triton graph).
``--json`` prints, as its last line,
``{"device": ..., "rows": [{"backend", "n", "ms", "speedup_vs_original", "gbps"}], ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench.common import add_write_flag, time_cpu_interleaved, time_cuda, write_section  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads (torch and Numba chunks)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--startup", action="store_true",
                    help="also time the first call in fresh processes (Numba cache load; torch.compile "
                         "with an empty and with the default inductor cache)")
    ap.add_argument("--triton-blocks", default="",
                    help="GPU only: also time the Triton kernels with these tile shapes, e.g. "
                         "'8x128,16x128,32x64' (rows 'triton[BHxBW]'; the default shape is row 'triton')")
    ap.add_argument("--graphs", action="store_true",
                    help="GPU only: also time torch, torch.compile, Triton and the copy captured in a CUDA "
                         "graph (rows 'X+graph': device time without Python / autograd / launch overhead)")
    ap.add_argument("--json", action="store_true")
    add_write_flag(ap, "mil_kernel_cpu (mil_kernel_gpu on CUDA)")
    return ap


if __name__ == "__main__":
    ARGS = build_parser().parse_args()  # --help and argument errors before torch loads (seconds)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from boxcaseg.kernels.maps import NEIGHBOUR_OFFSETS  # noqa: E402
from boxcaseg.kernels.mil_smooth_common import bag_labels  # noqa: E402
from boxcaseg.kernels.mil_smooth_reference import (  # noqa: E402
    SMOOTH_WEIGHT,
    mil_loss_reference,
    smoothness_loss_reference,
)
from boxcaseg.kernels.mil_smooth_torch import mil_smooth_loss_torch  # noqa: E402

H = W = 288


# ------------------------------------------------------------------ (a) the original

def original_mil(logits: torch.Tensor, box_mask: torch.Tensor) -> torch.Tensor:
    h, w = logits.shape[-2:]
    row_score = F.max_pool2d(logits, (1, w))          # [N, 1, H, 1]
    col_score = F.max_pool2d(logits, (h, 1))          # [N, 1, 1, W]
    row_label = F.max_pool2d(box_mask, (1, w))
    col_label = F.max_pool2d(box_mask, (h, 1))
    scores = torch.cat([row_score.flatten(1), col_score.flatten(1)], dim=1)
    labels = torch.cat([row_label.flatten(1), col_label.flatten(1)], dim=1)
    return torch.nn.BCEWithLogitsLoss()(scores, labels)


def original_smoothness(logits: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits)
    terms = []
    for dy, dx in NEIGHBOUR_OFFSETS:
        weight = torch.zeros(1, 1, 3, 3, dtype=p.dtype, device=p.device)   # built on every call
        weight[0, 0, 1, 1] = 1.0
        weight[0, 0, 1 + dy, 1 + dx] = -1.0
        diff = F.conv2d(p, weight, padding=1)                             # zero padding
        terms.append((diff ** 2).mean())
    return torch.stack(terms).mean()


def original_loss(logits, box_mask):
    return original_mil(logits, box_mask) + SMOOTH_WEIGHT * original_smoothness(logits)


# ------------------------------------------------------------------ ours

def reference_loss(logits, box_mask):
    return mil_loss_reference(logits, box_mask) + SMOOTH_WEIGHT * smoothness_loss_reference(logits)


def torch_loss(logits, box_mask):
    mil, smooth = mil_smooth_loss_torch(logits, box_mask)
    return mil + SMOOTH_WEIGHT * smooth


def fused_loss(backend: str, blocks: tuple[int, int] | None = None):
    """The library's fused loss; ``blocks`` (Triton only) overrides the tile shape."""
    from boxcaseg.kernels import dispatch

    def loss(logits, box_mask):
        mil, smooth = dispatch.mil_smooth_loss(logits, box_mask, SMOOTH_WEIGHT, backend)
        return mil + SMOOTH_WEIGHT * smooth

    if blocks is None:
        return loss

    from boxcaseg.kernels.mil_smooth_triton import mil_smooth_loss_triton

    def tiled(logits, box_mask):
        mil, smooth = mil_smooth_loss_triton(logits, box_mask, True, True, (1.0, SMOOTH_WEIGHT), blocks)
        return mil + SMOOTH_WEIGHT * smooth

    return tiled


def default_blocks(h: int, w: int) -> tuple[int, int]:
    from boxcaseg.kernels import mil_smooth_triton

    return mil_smooth_triton.tile_shape(h, w, True)


def triton_extra_bytes(n: int, h: int, w: int) -> int:
    """Bytes the Triton launch moves beyond the floor (logits in, gradient out), at its
    default tile shape: bag labels read, per-tile row/column maxima and argmaxes written and
    read back, the argmax pixels' read-modify-write, the sparse MIL values kept and the
    per-tile / per-image partial sums. Halo re-reads (served by caches) are not counted."""
    bh, bw = default_blocks(h, w)
    n_rb, n_wb = -(-h // bh), -(-w // bw)
    partial = 8 * n * (n_wb * h + n_rb * w)          # float32 max + int32 argmax, written then read
    return (n * (h + w)                              # uint8 labels
            + 2 * partial
            + 2 * 4 * n * (h + w)                    # read-modify-write at each bag's argmax
            + 12 * n * (h + w)                       # kept argmax, d, old value
            + 2 * 4 * (n * n_rb * n_wb + n))         # partial sums written then read


def goal_ratios(t: dict) -> dict:
    """The issue's goals as ratios of this run's medians (present rows only)."""
    out = {}
    if "triton+graph" in t and "copy+graph" in t:
        out["triton_graph_over_copy_graph"] = round(t["triton+graph"].median_ms / t["copy+graph"].median_ms, 2)
    if "triton+graph" in t and "compile+graph" in t:
        out["compile_graph_over_triton_graph"] = round(t["compile+graph"].median_ms / t["triton+graph"].median_ms, 2)
    if "triton" in t and "compile" in t:
        out["compile_eager_over_triton_eager"] = round(t["compile"].median_ms / t["triton"].median_ms, 2)
    if "triton+graph" in t:
        out["original_eager_over_triton_graph"] = round(t["original"].median_ms / t["triton+graph"].median_ms, 1)
    if "triton" in t:
        out["original_eager_over_triton_eager"] = round(t["original"].median_ms / t["triton"].median_ms, 1)
    return out


def make_inputs(n: int, device: str):
    gen = torch.Generator().manual_seed(n)
    x = (torch.randn(n, 1, H, W, generator=gen) * 2).to(device).requires_grad_(True)
    m = torch.zeros(n, 1, H, W)
    for i in range(n):
        y0, x0 = torch.randint(0, H // 2, (2,), generator=gen).tolist()
        m[i, 0, y0:y0 + H // 3, x0:x0 + W // 3] = 1
    return x, m.to(device)


def step_fn(loss_fn, x, m):
    def run():
        x.grad = None
        loss_fn(x, m).backward()

    return run


def graph_of(fn):
    """``fn`` captured once in a CUDA graph (after warm-up calls on a side stream); returns
    its replay: the device time without Python, autograd and launch overhead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                 # warm-up (compilation, caches) off the graph
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def graphed_step(loss_fn, x, m):
    """The forward + backward of ``loss_fn`` as a CUDA graph replay."""
    xs = x.detach().clone().requires_grad_(True)
    return graph_of(lambda: torch.autograd.grad(loss_fn(xs, m), xs))


def first_call_in_fresh_process(backend: str, n: int, threads: int, env: dict | None = None) -> float:
    """Seconds of the first forward+backward in a new process (compile / cache load)."""
    code = f"""
import sys, time, torch
sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(REPO / 'bench')!r})
torch.set_num_threads({threads})
import mil_kernel as b
x, m = b.make_inputs({n}, "cpu")
f = torch.compile(b.torch_loss) if {backend!r} == "compile" else b.fused_loss({backend!r})
t = time.perf_counter(); f(x, m).backward(); print(time.perf_counter() - t)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900,
                         env={**os.environ, **(env or {})})
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return float(out.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def main(args: argparse.Namespace | None = None) -> None:
    args = args or build_parser().parse_args()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    torch.set_num_threads(args.threads)
    on_gpu = args.device.startswith("cuda")
    device = (f"{torch.cuda.get_device_name()} (CUDA)" if on_gpu
              else f"CPU: {args.threads} threads of {cpu_name()} ({os.cpu_count()} cores visible)")
    print(f"device: {device}; torch {torch.__version__}; N x 1 x {H} x {W}, forward + backward of MIL + {SMOOTH_WEIGHT} * smoothness")

    rows, extra = [], {}
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for n in args.n:
        x, m = make_inputs(n, args.device)
        cands = {"original": original_loss, "reference": reference_loss, "torch": torch_loss}
        if not args.no_compile:
            compiled = torch.compile(torch_loss)
            t0 = time.perf_counter()
            step_fn(compiled, x, m)()
            extra[f"compile_first_call_s_n{n}"] = round(time.perf_counter() - t0, 2)
            cands["compile"] = compiled
        if on_gpu:
            cands["triton"] = fused_loss("triton")
            for spec in filter(None, args.triton_blocks.split(",")):
                bh, bw = (int(v) for v in spec.lower().split("x"))
                cands[f"triton[{bh}x{bw}]"] = fused_loss("triton", (bh, bw))
        else:
            cands["numba"] = fused_loss("numba")
        labels = {k: m for k in cands}
        for k in cands:
            if k.startswith("triton"):
                labels[k] = bag_labels(m)                  # what the training loader hands the kernels
        fns = {k: step_fn(f, x, labels[k]) for k, f in cands.items()}
        bytes_moved = 2 * x.numel() * x.element_size()       # read logits once, write the gradient once
        copy_gbps = None
        if on_gpu:
            src = torch.empty_like(x, requires_grad=False)
            dst = torch.empty_like(src)
            fns["copy"] = lambda: dst.copy_(src)
        if on_gpu and args.graphs:
            for k in [k for k in ("torch", "compile", "triton") if k in cands]:
                try:
                    fns[f"{k}+graph"] = graphed_step(cands[k], x, labels[k])
                except Exception as e:  # noqa: BLE001 - report, keep the other rows
                    extra[f"{k}+graph_n{n}"] = f"capture failed: {type(e).__name__}: {str(e)[:200]}"
            fns["copy+graph"] = graph_of(lambda: dst.copy_(src))
        if on_gpu:
            timings = {k: time_cuda(fn) for k, fn in fns.items()}
            copy_gbps = bytes_moved / timings["copy"].median_ms / 1e6
            # the copy as measured: its time, and the bytes it moves (the tensor read + written)
            extra[f"copy_us_n{n}"] = round(timings["copy"].median_ms * 1000, 2)
            if "copy+graph" in timings:
                extra[f"copy_graph_us_n{n}"] = round(timings["copy+graph"].median_ms * 1000, 2)
            extra[f"copy_mb_read_plus_written_n{n}"] = round(bytes_moved / 1e6, 2)
            extra[f"copy_gbps_n{n}"] = round(copy_gbps, 1)
            extra[f"triton_extra_bytes_n{n}"] = triton_extra_bytes(n, H, W)
            goals = goal_ratios(timings)
            if goals:
                extra[f"goals_n{n}"] = goals
        else:
            timings = time_cpu_interleaved(fns, rounds=args.rounds)
        base = timings["original"].median_ms
        for k, t in timings.items():
            gbps = bytes_moved / t.median_ms / 1e6
            row = {"backend": k, "n": n, "ms": round(t.median_ms, 3),
                   "speedup_vs_original": round(base / t.median_ms, 1), "gbps": round(gbps, 2)}
            if copy_gbps:
                row["frac_of_copy"] = round(gbps / copy_gbps, 3)
            row["samples"] = len(t.samples_ms)
            row["min_ms"] = round(t.min_ms, 3)
            rows.append(row)
        if on_gpu:
            extra[f"triton_default_blocks_n{n}"] = "x".join(map(str, default_blocks(H, W)))

    if args.startup and not on_gpu:
        n0 = args.n[0]
        with tempfile.TemporaryDirectory() as cache:          # empty Numba cache: compile
            extra[f"numba_first_call_fresh_process_cold_cache_s_n{n0}"] = round(
                first_call_in_fresh_process("numba", n0, args.threads, {"NUMBA_CACHE_DIR": cache}), 2)
        extra[f"numba_first_call_fresh_process_warm_cache_s_n{n0}"] = round(
            first_call_in_fresh_process("numba", n0, args.threads), 2)
        if not args.no_compile:
            with tempfile.TemporaryDirectory() as cache:      # empty inductor cache: a cold compile
                extra[f"compile_first_call_fresh_process_cold_cache_s_n{n0}"] = round(
                    first_call_in_fresh_process("compile", n0, args.threads, {"TORCHINDUCTOR_CACHE_DIR": cache}), 2)
            extra[f"compile_first_call_fresh_process_warm_cache_s_n{n0}"] = round(
                first_call_in_fresh_process("compile", n0, args.threads), 2)

    if load_before is not None:
        # others' jobs on a shared machine slow every backend down, torch's OpenMP loops most
        extra["load_average_1min_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]

    table = table_text(rows, on_gpu)
    print(table)
    for k, v in extra.items():
        print(f"{k}: {v}")
    if args.write:
        write_section(f"mil_kernel_{'gpu' if on_gpu else 'cpu'}", f"```\n{table}\n```")
    if args.json:
        print(json.dumps({"device": device, "rows": [
            {k: r[k] for k in ("backend", "n", "ms", "speedup_vs_original", "gbps")} for r in rows], **extra}))


def table_text(rows: list[dict], on_gpu: bool) -> str:
    """The printed table (and RESULTS.md's, between ``` fences): one line per backend and N."""
    head = f"{'backend':<14} {'N':>4} {'ms (median)':>12} {'min ms':>9} {'samples':>8} {'x original':>11} {'GB/s*':>8}"
    if on_gpu:
        head += f" {'of copy':>8}"
    lines = [head]
    for r in rows:
        line = (f"{r['backend']:<14} {r['n']:>4} {r['ms']:>12.3f} {r['min_ms']:>9.3f} {r['samples']:>8} "
                f"{r['speedup_vs_original']:>11.1f} {r['gbps']:>8.2f}")
        if on_gpu:
            line += f" {r['frac_of_copy']:>8.1%}"
        lines.append(line)
    lines.append("* GB/s = (logits read once + gradient written once) / median time")
    return "\n".join(lines)


if __name__ == "__main__":
    main(ARGS)
