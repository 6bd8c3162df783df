"""Every Triton kernel configuration the launcher can choose compiles for sm_80 and sm_90,
on this CPU (``triton.compile`` with ``GPUTarget`` and the wheel's ptxas): the interpreter
the other kernel tests use runs plain Python and hides compile errors."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def _ptxas_present() -> bool:
    import triton

    return os.path.isfile(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


@pytest.mark.skipif(not _ptxas_present(), reason="this Triton wheel ships no ptxas")
def test_every_launch_configuration_compiles_for_sm80_and_sm90(tmp_path):
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")   # compile, not a cache hit
    r = subprocess.run([sys.executable, "-m", "boxcaseg.kernels.triton_aot", "--arch", "80", "90", "--json", str(out)],
                       env=env, capture_output=True, text=True, timeout=1500)
    results = json.loads(out.read_text())["results"] if out.is_file() else []
    failed = [f"sm_{x['arch']} {x['label']}: {x['error']}" for x in results if not x["ok"]]
    assert r.returncode == 0 and not failed, (r.stdout[-3000:] + r.stderr[-3000:], failed[:5])
    # the matrix: 3 kernels x tiles x dtypes x flag combinations, for both archs
    from boxcaseg.kernels.mil_smooth_triton import GPU_TILES
    from boxcaseg.kernels.triton_aot import MAP_DTYPES, TERMS

    per_arch = len(MAP_DTYPES) * (len(GPU_TILES) * len(TERMS) * 2 + len(GPU_TILES) * len(TERMS) + len(TERMS) * 2)
    assert len(results) == 2 * per_arch
    kernels = {x["label"].split()[0] for x in results}
    assert kernels == {"tile", "bags", "backward"}
    for x in results:  # what the compiler reported is there, and sane
        assert 0 < x["registers"] <= 255 and x["spill_stores"] is not None and x["shared"] >= 0, x


def test_the_gpu_launcher_only_picks_compiled_tiles():
    """Whatever the map size, the launcher's GPU tile is one of GPU_TILES (the compiled set)
    and the bags kernel's blocks are the fixed ones."""
    from boxcaseg.kernels import mil_smooth_triton as T

    sizes = [1, 2, 3, 7, 16, 31, 32, 33, 48, 63, 64, 65, 127, 128, 129, 192, 288, 320, 1000, 4097]
    for h, w in itertools.product(sizes, sizes):
        bh, bw = T.tile_shape(h, w, True)
        assert (bh, bw) in T.GPU_TILES and T.tile_warps(bh, bw) == 8, (h, w)
        assert bw >= min(128, w) or bw == 128  # a row of the map fits the tile, or the widest tile
    assert T.tile_shape(192, 192, True) == (16, 128) and T.tile_shape(50, 40, True) == (32, 64)
    assert T.tile_shape(9, 7, True) == (64, 32)


def test_gpu_check_script_budget_fits_one_call():
    """bench/gpu_checks.sh: the steps' limits add up to at most its DEADLINE, which leaves room in
    one 600-second device call; a bigger step list is refused before anything runs."""
    import re
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_checks.sh"
    r = subprocess.run(["bash", str(script), "--budget"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"= (\d+) s of DEADLINE (\d+) s", r.stdout)
    total, deadline = int(m.group(1)), int(m.group(2))
    assert total <= deadline <= 560
    steps = dict(s.split(":") for s in re.search(r"budget: (.*) =", r.stdout).group(1).split())
    assert sum(map(int, steps.values())) == total and list(steps)[:3] == ["imports", "tests", "mil"]
    over = subprocess.run(["bash", str(script), "--budget"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DEADLINE": str(total - 1)})
    assert over.returncode == 1 and "exceed" in over.stdout
