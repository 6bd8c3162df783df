"""What the compiler reports for the Triton kernels, compiled for real GPUs on this CPU.

    python bench/triton_static.py [--write]       # needs TRITON_INTERPRET unset

Compiles every launch configuration (boxcaseg.kernels.triton_aot) for sm_80 and sm_90 and
prints, for the training's default configuration (float32 maps, MIL + smoothness, with the
gradient, the 16x128 tile of maps wider than 64 pixels), each kernel's registers per thread,
spilled bytes and shared memory, plus the extremes over the whole matrix. ``--write`` puts
the table into bench/RESULTS.md (section "triton_static_<version>": one per Triton version; run
it with the lent GPU machine's Triton on the path, e.g. ``PYTHONPATH=/tmp/t36``, for theirs). No GPU is involved: these are the
only GPU figures a machine without one can produce.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import add_write_flag, write_section  # noqa: E402

DEFAULT = {"tile": "tile 16x128 fp32 mil=1 smooth=1 grad=1", "bags": "bags fp32 mil=1 smooth=1 grad=1",
           "backward": "backward 16x128 fp32 mil=1 smooth=1"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_write_flag(ap, "triton_static_<version>")
    ap.add_argument("--jobs", type=int, default=0)
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    import triton

    from boxcaseg.kernels.triton_aot import compile_all
    from boxcaseg.report import markdown_table

    results = compile_all((80, 90), args.jobs)
    failed = [r for r in results if not r["ok"]]
    rows = []
    for kernel, label in DEFAULT.items():
        for arch in (80, 90):
            r = next(x for x in results if x["label"] == label and x["arch"] == arch)
            rows.append([f"`{label}`", f"sm_{arch}", r["registers"], r["spill_stores"], r["spill_loads"], r["shared"]])
    table = markdown_table(["kernel (default configuration)", "target", "registers / thread", "spill stores (B)",
                            "spill loads (B)", "shared memory (B)"], rows)
    worst_regs = max(results, key=lambda r: r["registers"] or 0)
    spilling = [r for r in results if r["spill_stores"]]
    n_arch = len(results) // 2
    tile90 = next(x for x in results if x["label"] == DEFAULT["tile"] and x["arch"] == 90)["registers"]
    body = (
        f"## triton_static ({triton.__version__}): the Triton kernels compiled for real GPUs, on the CPU "
        "(`python bench/triton_static.py --write`)\n\n"
        f"Triton {triton.__version__} (`triton.compile(ASTSource(...), target=GPUTarget(\"cuda\", arch, 32))` and the "
        "wheel's ptxas, `ptxas -v` for registers and spills; no GPU involved). Every launch configuration the "
        f"launcher can choose compiles: {len(results) - len(failed)} of {len(results)} ({n_arch} per target: 3 "
        "kernels x the GPU tiles 16x128 / 32x64 / 64x32 x float32, float64, bfloat16, float16 maps x the "
        "dispatcher's flag combinations); tests/test_triton_compile.py checks the same matrix in CI.\n\n"
        f"{table}\n\n"
        f"Over the whole matrix: most registers {worst_regs['registers']} (`{worst_regs['label']}`, "
        f"sm_{worst_regs['arch']}); {len(spilling)} configuration(s) spill"
        + (": " + "; ".join(f"`{r['label']}` sm_{r['arch']} {r['spill_stores']} B" for r in spilling[:6]) if spilling else "")
        + f". 8 warps per tile program (2,048 elements): {tile90} registers x 256 threads = {tile90 * 256:,} of an "
        "SM's 65,536, so one tile program per SM at a time (sm_90); whether that costs anything is a question "
        "for a GPU.\n"
    )
    print(body)
    if failed:
        sys.exit(f"{len(failed)} configuration(s) failed to compile")
    if args.write:
        write_section(f"triton_static_{triton.__version__.replace('.', '_')}", body)


if __name__ == "__main__":
    main()
