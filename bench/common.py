"""What every benchmark shares: the data root, timing, the command line and RESULTS.md sections.

    from bench.common import REPO, data_root, require_data, time_fn, write_section

- ``data_root()``: ``$BOXCASEG_DATA``, default ``../shared/data`` beside the repository (not the
  working directory, so a benchmark gives the same answer from any folder); ``require_data(...)``
  exits with one clear line naming the missing path and the variable to set.
- Timing: ``time_fn`` (warm-up calls, then repeated calls, median), ``time_cpu_interleaved``
  (several candidates in turn, so that load from other processes on a shared machine hits them
  alike; median) and ``time_cuda`` (``triton.testing.do_bench``: CUDA events, cache flush, median).
- ``write_section(name, text, command)``: replaces the text between ``<!-- name:start -->`` and
  ``<!-- name:end -->`` in bench/RESULTS.md (appending the section when it is missing) and writes
  the exact command line that produced it as the section's ``command:`` line, so that a figure in
  RESULTS.md is always the output of the command written above it. ``command_line()`` gives the
  running script's own command line.
- ``add_write_flag(parser, section, default=...)``: the one argument style: ``--write`` where a
  benchmark prints by default, ``--no-write`` where it writes by default.

Standard library only: importing it costs nothing, so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
RESULTS = BENCH / "RESULTS.md"
DATA_ENV = "BOXCASEG_DATA"


# --------------------------------------------------------------------------- data


def data_root(environ: dict | None = None) -> Path:
    """``$BOXCASEG_DATA``, default ``../shared/data`` relative to the repository."""
    env = (os.environ if environ is None else environ).get(DATA_ENV)
    return Path(env) if env else REPO.parent / "shared" / "data"


def require_data(*parts: str, root: Path | None = None, script: str | None = None) -> Path:
    """``data_root() / parts`` (or ``root / parts``); exits (status 1) with one line naming it when absent."""
    base = data_root() if root is None else Path(root)
    path = base.joinpath(*parts)
    if not path.exists():
        who = script or Path(sys.argv[0]).name or "bench"
        sys.exit(f"{who}: no {path} (the benchmark data is not here: set {DATA_ENV}, "
                 f"default ../shared/data beside the repository)")
    return path


# --------------------------------------------------------------------------- timing


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


def _once_ms(fn: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> float:
    t0 = clock()
    fn()
    return (clock() - t0) * 1e3


def time_fn(fn: Callable[[], object], warmup: int = 1, repeat: int = 5, name: str = "",
            clock: Callable[[], float] = time.perf_counter) -> Timing:
    """``warmup`` untimed calls, then ``repeat`` timed ones; ``.median_ms`` is the figure."""
    if repeat < 1:
        raise ValueError("repeat must be at least 1")
    for _ in range(warmup):
        fn()
    return Timing(name, [_once_ms(fn, clock) for _ in range(repeat)])


def time_cpu_interleaved(
    fns: dict[str, Callable[[], object]],
    warmup: int = 3,
    rounds: int = 7,
    round_budget_s: float = 0.4,
    max_calls_per_round: int = 50,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Timing]:
    """Median wall time of each ``fn`` in milliseconds, candidates interleaved.

    Each round runs every candidate ``k`` times, ``k`` chosen from the warm-up so that
    one candidate spends about ``round_budget_s`` per round (at least once).
    """
    calls: dict[str, int] = {}
    for name, fn in fns.items():
        t = _once_ms(fn, clock)
        for _ in range(warmup - 1 if t < 1000 else 0):      # one warm-up call is enough for a slow fn
            t = min(t, _once_ms(fn, clock))
        calls[name] = int(max(1, min(max_calls_per_round, round_budget_s * 1e3 // max(t, 1e-3))))
    out = {name: Timing(name) for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(calls[name]):
                out[name].samples_ms.append(_once_ms(fn, clock))
    return out


def time_cuda(fn: Callable[[], object]) -> Timing:
    """Median time of ``fn`` on the current CUDA device (``triton.testing.do_bench``)."""
    import triton.testing

    ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    return Timing("cuda", [float(ms)])


# --------------------------------------------------------------------------- command line and flags


def command_line(argv: list[str] | None = None, script: str | Path | None = None) -> str:
    """``python bench/NAME.py ARGS`` of the running script (or of ``script`` with ``argv``), quoted."""
    argv = list(sys.argv if argv is None else argv)
    path = Path(script if script is not None else argv[0]).resolve()
    try:
        shown = path.relative_to(REPO).as_posix()
    except ValueError:
        shown = path.as_posix()
    return shlex.join(["python", shown, *argv[1:]])


def add_write_flag(parser: argparse.ArgumentParser, section: str, default: bool = False,
                   aliases: tuple[str, ...] = ()) -> None:
    """``--write`` (default off) or ``--no-write`` (default on); either way ``args.write``.

    ``aliases``: older spellings of the same flag that scripts or notes still use.
    """
    where = f"section {section!r} of bench/RESULTS.md"
    if default:
        parser.add_argument("--no-write", *aliases, dest="write", action="store_false",
                            help=f"print only; do not touch the {where}")
        parser.set_defaults(write=True)
    else:
        parser.add_argument("--write", *aliases, dest="write", action="store_true",
                            help=f"write the result into the {where}")


# --------------------------------------------------------------------------- RESULTS.md sections


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def replace_between(text: str, name: str, body: str, append: bool = True) -> str:
    """``text`` with what lies between ``name``'s markers replaced by ``body``.

    A missing section is appended (``append``) or is an error (``ValueError``). The text outside
    the markers is left byte for byte.
    """
    start, end = markers(name)
    block = f"{start}\n{body.strip(chr(10))}\n{end}"
    i = text.find(start)
    j = text.find(end, i + len(start)) if i >= 0 else -1
    if i >= 0 and j >= 0:
        return text[:i] + block + text[j + len(end):]
    if not append:
        raise ValueError(f"no {start} ... {end} markers")
    return text.rstrip("\n") + "\n\n" + block + "\n"


def section_body(text: str, command: str | None) -> str:
    """``text`` with a ``command:`` line under its heading (the first line when it is one)."""
    text = text.strip("\n")
    if command is None:
        return text
    line = f"command: `{command}`"
    lines = text.split("\n")
    if lines and lines[0].startswith("#"):
        rest = "\n".join(lines[1:]).strip("\n")
        return f"{lines[0]}\n\n{line}\n" + (f"\n{rest}" if rest else "")
    return f"{line}\n\n{text}" if text else line


def read_section(name: str, path: Path = RESULTS) -> str | None:
    """What lies between ``name``'s markers in ``path`` (``None`` when the section is missing)."""
    text = Path(path).read_text() if Path(path).is_file() else ""
    start, end = markers(name)
    i = text.find(start)
    j = text.find(end, i + len(start)) if i >= 0 else -1
    return text[i + len(start):j].strip("\n") if i >= 0 and j >= 0 else None


def write_section(name: str, text: str, command: str | None = "", path: Path = RESULTS,
                  append: bool = True) -> Path:
    """Write ``text`` as section ``name`` of ``path`` (bench/RESULTS.md), with its command line.

    ``command``: the command that produced ``text``; ``""`` (the default) means the running
    script's own (``command_line()``), ``None`` writes no command line (for files other than
    RESULTS.md, such as the model card). Writing the same text twice gives the same file.
    """
    if command == "":
        command = command_line()
    path = Path(path)
    doc = path.read_text() if path.is_file() else "# Benchmark results\n"
    new = replace_between(doc, name, section_body(text, command), append=append)
    if new != doc:
        path.write_text(new)
    return path
