"""Small report helpers: the training-loss curve as a PNG, a markdown table."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from boxcaseg.io import read_jsonl


def plot_loss_curve(metrics_file: str | Path, png: str | Path, smooth: int = 10) -> Path:
    """Plot loss terms per iteration from ``metrics.jsonl`` (moving average over ``smooth``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = read_jsonl(metrics_file)
    it = np.array([r["iter"] for r in rows])
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key in ("loss", "loss_mil", "loss_pixel"):
        v = np.array([r[key] for r in rows], dtype=float)
        k = max(1, min(smooth, len(v)))
        sm = np.convolve(v, np.ones(k) / k, mode="valid")
        ax.plot(it[k - 1:], sm, label=key)
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"loss (moving average of {smooth})")
    ax.set_title("BoxCaseg joint training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    return png


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
