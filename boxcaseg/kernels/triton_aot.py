"""Compile every Triton kernel configuration the launcher can choose, for real GPUs, on any machine.

    python -m boxcaseg.kernels.triton_aot [--arch 80 90] [--json FILE] [--jobs N]

Triton's interpreter (``TRITON_INTERPRET=1``, the CPU tests) runs the kernels as plain
Python, where code that cannot compile for a GPU still runs. This module compiles each
configuration of :mod:`boxcaseg.kernels.mil_smooth_triton` that its launcher can choose on
a GPU -- the three kernels x the tile shapes (:data:`~boxcaseg.kernels.mil_smooth_triton.GPU_TILES`)
x the map dtypes x the flag combinations the dispatcher uses -- with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and the ``ptxas``
that ships in the Triton wheel: no GPU and no CUDA driver needed. For each one it reports
what the compiler says: registers per thread, spilled bytes, shared memory.

Must run in a process where ``TRITON_INTERPRET`` is unset (or 0) before Triton is imported:
the interpreter replaces the kernels by Python functions that cannot be compiled.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

#: The dtypes a map may have (the launcher's compute dtype: float64 for float64, else float32).
MAP_DTYPES = ("fp32", "fp64", "bf16", "fp16")
#: (has_mil, has_smooth) as the dispatcher calls them: mil_smooth_loss, mil_loss, smoothness_loss.
TERMS = ((True, True), (True, False), (False, True))
ARCHS = (80, 90)


@dataclass
class KernelConfig:
    kernel: str                         # _tile_kernel | _bags_kernel | _backward_kernel
    signature: dict[str, str]
    constexprs: dict[str, object]       # name -> value ("fp32"/"fp64" for CT)
    num_warps: int
    label: str = ""


@dataclass
class CompileResult:
    label: str
    arch: int
    ok: bool
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared: int | None = None
    seconds: float = 0.0
    error: str = ""
    extra: dict = field(default_factory=dict)


def _ct(dtype: str) -> str:
    return "fp64" if dtype == "fp64" else "fp32"


def launch_configs() -> list[KernelConfig]:
    """Every configuration the launcher of :mod:`~boxcaseg.kernels.mil_smooth_triton` can
    compile on a GPU (the tile shapes it picks, :func:`~...mil_smooth_triton.tile_warps`,
    the bags kernel's fixed blocks)."""
    from boxcaseg.kernels import mil_smooth_triton as T

    out = []
    for dt in MAP_DTYPES:
        ct = _ct(dt)
        for (bh, bw) in T.GPU_TILES:
            for has_mil, has_smooth in TERMS:
                for grad in (True, False):
                    sig = {"x_ptr": f"*{dt}", "sxn": "i32", "sxh": "i32", "sxw": "i32", "g_ptr": f"*{dt}",
                           "part_ptr": f"*{ct}", "rmax_ptr": f"*{ct}", "rarg_ptr": "*i32", "cmax_ptr": f"*{ct}",
                           "carg_ptr": "*i32", "H": "i32", "W": "i32", "n_rb": "i32", "n_wb": "i32",
                           "coef_ptr": f"*{ct}"}
                    const = {"HAS_MIL": has_mil, "HAS_SMOOTH": has_smooth, "WRITE_GRAD": grad, "CT": ct,
                             "BLOCK_H": bh, "BLOCK_W": bw}
                    out.append(KernelConfig("_tile_kernel", sig, const, T.tile_warps(bh, bw),
                                            f"tile {bh}x{bw} {dt} mil={int(has_mil)} smooth={int(has_smooth)} "
                                            f"grad={int(grad)}"))
            for has_mil, has_smooth in TERMS:
                sig = {"g_ptr": f"*{dt}", "gm_ptr": f"*{ct}", "gs_ptr": f"*{ct}", "state_ptr": f"*{ct}",
                       "new_state_ptr": f"*{ct}", "coef_ptr": f"*{ct}", "sp_arg_ptr": "*i32", "sp_d_ptr": f"*{ct}",
                       "sp_old_ptr": f"*{ct}", "H": "i32", "W": "i32"}
                const = {"HAS_MIL": has_mil, "HAS_SMOOTH": has_smooth, "CT": ct, "BLOCK_H": bh, "BLOCK_W": bw}
                out.append(KernelConfig("_backward_kernel", sig, const, T.tile_warps(bh, bw),
                                        f"backward {bh}x{bw} {dt} mil={int(has_mil)} smooth={int(has_smooth)}"))
        for has_mil, has_smooth in TERMS:
            for grad in (True, False):
                sig = {"g_ptr": f"*{dt}", "lab_ptr": "*u8", "slab_n": "i32", "slab_l": "i32",
                       "rmax_ptr": f"*{ct}", "rarg_ptr": "*i32", "cmax_ptr": f"*{ct}", "carg_ptr": "*i32",
                       "sp_arg_ptr": "*i32", "sp_d_ptr": f"*{ct}", "sp_old_ptr": f"*{ct}", "img_ptr": f"*{ct}",
                       "part_ptr": f"*{ct}", "n_parts": "i32", "ticket_ptr": "*i32", "mil_ptr": f"*{ct}",
                       "smooth_ptr": f"*{ct}", "N": "i32", "H": "i32", "W": "i32", "n_rb": "i32", "n_wb": "i32",
                       "coef_ptr": f"*{ct}"}
                const = {"HAS_MIL": has_mil, "HAS_SMOOTH": has_smooth, "WRITE_GRAD": grad, "CT": ct,
                         "P_PART": T.P_PART, "BLOCK": T.BAGS_BLOCK, "RBLOCK": T.REDUCE_BLOCK}
                out.append(KernelConfig("_bags_kernel", sig, const, 4,
                                        f"bags {dt} mil={int(has_mil)} smooth={int(has_smooth)} grad={int(grad)}"))
    return out


def _ptxas(arch: int) -> str:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        tool = get_ptxas(arch) if get_ptxas.__code__.co_argcount else get_ptxas()
        return tool.path
    except Exception:
        import triton

        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _resources(ptx: str, arch: int) -> dict:
    """``ptxas -v`` on the PTX: registers, spill stores / loads (bytes)."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([_ptxas(arch), "-v", "--gpu-name", gpu, src, "-o", os.path.join(tmp, "k.cubin")],
                           capture_output=True, text=True)
    text = r.stdout + r.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_stores": int(spill.group(1)) if spill else None,
            "spill_loads": int(spill.group(2)) if spill else None}


def compile_one(cfg: KernelConfig, arch: int) -> CompileResult:
    """Compile ``cfg`` for ``sm_<arch>``; the result says whether it compiled and what it uses."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from boxcaseg.kernels import mil_smooth_triton as T

    fn = getattr(T, cfg.kernel)
    if not hasattr(fn, "arg_names"):
        raise RuntimeError("the kernels were built for Triton's interpreter: run with TRITON_INTERPRET unset")
    const = {k: (getattr(tl, {"fp32": "float32", "fp64": "float64"}[v]) if k == "CT" else v)
             for k, v in cfg.constexprs.items()}
    sig = dict(cfg.signature)
    for name in const:
        sig[name] = "constexpr"
    t0 = time.perf_counter()
    try:
        k = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": cfg.num_warps})
    except Exception as e:  # the compiler's message, shortened to its last lines
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        return CompileResult(cfg.label, arch, False, seconds=time.perf_counter() - t0,
                             error=" | ".join(lines[-3:])[:600])
    res = _resources(k.asm["ptx"], arch)
    return CompileResult(cfg.label, arch, True, shared=int(k.metadata.shared), seconds=time.perf_counter() - t0,
                         **res)


def _compile_task(args) -> dict:
    cfg, arch = args
    return asdict(compile_one(cfg, arch))


def compile_all(archs=ARCHS, jobs: int = 0, configs: list[KernelConfig] | None = None) -> list[dict]:
    """Every launch configuration for every arch, ``jobs`` processes (0: the cores)."""
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
        raise RuntimeError("TRITON_INTERPRET is set: the kernels cannot be compiled in this process")
    configs = configs if configs is not None else launch_configs()
    tasks = [(c, a) for a in archs for c in configs]
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1:
        return [_compile_task(t) for t in tasks]
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(jobs) as pool:
        return pool.map(_compile_task, tasks, chunksize=4)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities (80 = A100, 90 = H100/H200)")
    ap.add_argument("--json", help="write every result here")
    ap.add_argument("--jobs", type=int, default=0, help="compiler processes (0: the cores)")
    args = ap.parse_args(argv)
    import triton

    t0 = time.perf_counter()
    results = compile_all(args.arch, args.jobs)
    failed = [r for r in results if not r["ok"]]
    for r in failed:
        print(f"FAILED sm_{r['arch']} {r['label']}: {r['error']}")
    print(f"triton {triton.__version__}: {len(results) - len(failed)} of {len(results)} configurations compiled "
          f"({len(results) // len(args.arch)} per arch, archs {args.arch}) in {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "results": results}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
