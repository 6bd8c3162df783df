"""Shards, per-shard progress (resume after a kill) and joining shard files.

A run processes the images ``sorted_by_id[K::N]`` of shard K/N (0 <= K < N; torchrun's
RANK/WORLD_SIZE when no shard is given). Its images are cut into chunks of a fixed
number of images; each finished chunk is written atomically to
``<out>.progress/shard-K-of-N/chunk-NNNNNN.json`` next to a ``meta.json`` holding the
run's fingerprint (input/model hashes and every option that changes the answer). A
restarted run with the same fingerprint skips the finished chunks; because chunks
and the batches inside them are fixed, the output is identical to an uninterrupted
run. A finished single run writes ``<out>``; a finished shard of N > 1 writes
``<out stem>.shard-K-of-N<suffix>``, joined by :func:`merge_shards`.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from boxcaseg.errors import BoxcasegError
from boxcaseg.io import atomic_write_json, load_json

FORMAT = 1


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @property
    def tag(self) -> str:
        return f"shard-{self.index}-of-{self.count}"

    @staticmethod
    def parse(text: str | tuple[int, int] | None) -> "Shard":
        """"K/N" (0 <= K < N) or (K, N); None: torchrun's RANK/WORLD_SIZE, else 0/1."""
        from boxcaseg.dist import env_rank_world

        if text is None:
            k, n = env_rank_world()
        elif isinstance(text, tuple):
            k, n = text
        else:
            m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
            if not m:
                raise BoxcasegError(f"--shard {text!r}: expected K/N with 0 <= K < N, e.g. 0/4")
            k, n = int(m.group(1)), int(m.group(2))
        if n < 1 or not 0 <= k < n:
            raise BoxcasegError(f"--shard {k}/{n}: expected K/N with 0 <= K < N")
        return Shard(int(k), int(n))


def shard_file(out: Path, shard: Shard) -> Path:
    return out.with_name(f"{out.stem}.{shard.tag}{out.suffix}")


def progress_dir(out: Path, shard: Shard) -> Path:
    return out.with_name(f"{out.name}.progress") / shard.tag


class ProgressStore:
    """Finished chunks of one shard, on disk (atomic writes)."""

    def __init__(self, root: Path, fingerprint: dict):
        self.root = Path(root)
        self.fingerprint = fingerprint
        meta = self.root / "meta.json"
        if meta.is_file():
            old = load_json(meta, "progress metadata")
            if old != fingerprint:
                diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k)) if isinstance(old, dict) else ["all"]
                raise BoxcasegError(
                    f"{self.root}: unfinished progress of a run with other inputs or options ({', '.join(diff)} differ); "
                    "rerun that command, or delete this folder to start over")
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_json(meta, fingerprint)

    def path(self, chunk: int) -> Path:
        return self.root / f"chunk-{chunk:06d}.json"

    def done(self, chunk: int) -> bool:
        return self.path(chunk).is_file()

    def save(self, chunk: int, payload: dict) -> None:
        atomic_write_json(self.path(chunk), payload)

    def load(self, chunk: int, image_ids: list) -> dict:
        payload = load_json(self.path(chunk), "progress chunk")
        if payload.get("image_ids") != image_ids:
            raise BoxcasegError(f"{self.path(chunk)}: holds other images than this run's chunk {chunk}; delete {self.root}")
        return payload

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        parent = self.root.parent
        try:
            if parent.name.endswith(".progress") and not any(parent.iterdir()):
                parent.rmdir()
        except OSError:
            pass


def find_shard_files(out: Path) -> tuple[int, dict[int, Path]]:
    """The shard files of ``out`` -> (N, {K: path}); BoxcasegError unless exactly one complete set."""
    pat = re.compile(re.escape(out.stem) + r"\.shard-(\d+)-of-(\d+)" + re.escape(out.suffix) + r"$")
    found: dict[int, dict[int, Path]] = {}
    folder = out.parent if str(out.parent) else Path(".")
    for name in os.listdir(folder) if folder.is_dir() else []:
        m = pat.match(name)
        if m:
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = folder / name
    if not found:
        raise BoxcasegError(f"{folder}: no shard files {out.stem}.shard-K-of-N{out.suffix} to merge")
    if len(found) > 1:
        raise BoxcasegError(f"{folder}: shard files of different shard counts ({sorted(found)}) for {out.name}; keep one set")
    (n, files), = found.items()
    missing = [k for k in range(n) if k not in files]
    if missing:
        raise BoxcasegError(f"{folder}: shard(s) {', '.join(f'{k}/{n}' for k in missing)} of {out.name} not finished (no file)")
    return n, files


def common_fingerprint(fp: dict) -> dict[str, Any]:
    """The part of a fingerprint every shard of one run shares (shards may run on
    different devices: a CPU shard and a GPU shard of the same run can be joined)."""
    return {k: v for k, v in fp.items() if k not in ("shard", "device")}
