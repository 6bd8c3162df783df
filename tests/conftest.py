"""Test set-up: Triton runs through its interpreter on CPU, real data is optional."""

from __future__ import annotations

import os

# Must happen before the first `import triton` / `@triton.jit` anywhere in the process.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def shared_data_root() -> Path:
    return Path(os.environ.get("BOXCASEG_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_root() -> Path:
    """``$BOXCASEG_DATA`` (default ``../shared/data``); skips the test when absent."""
    root = shared_data_root()
    if not (root / "coco-train" / "instances.json").is_file():
        pytest.skip(f"real data not found at {root} (set BOXCASEG_DATA)")
    return root


def run_cli(argv: list[str]) -> int:
    """Run the ``boxcaseg`` CLI in-process; its exit status (typer exits 0 through SystemExit)."""
    from boxcaseg.cli import main

    try:
        main(argv)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: no OpenMP spinning against other jobs on a shared 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
