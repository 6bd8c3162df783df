"""Timing helpers shared by the benchmarks.

CPU: warm-up calls, then several *rounds* in which every candidate runs a few times in
turn (so that load from other processes on a shared machine hits all candidates alike);
the figure is the median of all samples. GPU: ``triton.testing.do_bench`` (CUDA events,
cache flush between calls, median).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Timing:
    name: str
    samples_ms: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def min_ms(self) -> float:
        return min(self.samples_ms)


def _once_ms(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_cpu_interleaved(
    fns: dict[str, Callable[[], object]],
    warmup: int = 3,
    rounds: int = 7,
    round_budget_s: float = 0.4,
    max_calls_per_round: int = 50,
) -> dict[str, Timing]:
    """Median wall time of each ``fn`` in milliseconds, candidates interleaved.

    Each round runs every candidate ``k`` times, ``k`` chosen from the warm-up so that
    one candidate spends about ``round_budget_s`` per round (at least once).
    """
    calls: dict[str, int] = {}
    for name, fn in fns.items():
        t = _once_ms(fn)
        for _ in range(warmup - 1 if t < 1000 else 0):      # one warm-up call is enough for a slow fn
            t = min(t, _once_ms(fn))
        calls[name] = int(max(1, min(max_calls_per_round, round_budget_s * 1e3 // max(t, 1e-3))))
    out = {name: Timing(name) for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(calls[name]):
                out[name].samples_ms.append(_once_ms(fn))
    return out


def time_cuda(fn: Callable[[], object]) -> Timing:
    """Median time of ``fn`` on the current CUDA device (``triton.testing.do_bench``)."""
    import triton.testing

    ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    return Timing("cuda", [float(ms)])
