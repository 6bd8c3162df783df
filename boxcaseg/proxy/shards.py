"""Shard files: shards, per-shard progress (resume after a kill), joining shard files.

A run processes the images ``sorted_by_id[K::N]`` of shard K/N (0 <= K < N; torchrun's
RANK/WORLD_SIZE when no shard is given). Its images are cut into chunks of a fixed
number of images; each finished chunk is written atomically to
``<out>.progress/shard-K-of-N/chunk-NNNNNN.json`` next to a ``meta.json`` holding the
run's fingerprint (input/model hashes and every option that changes the answer). A
restarted run with the same fingerprint skips the finished chunks; because chunks
and the batches inside them are fixed, the output is identical to an uninterrupted
run. A finished single run writes ``<out>``; a finished shard of N > 1 writes
``<out stem>.shard-K-of-N<suffix>`` (:func:`write_shard_file`), joined by
:func:`merge_shards` after checking that all N are there and come from one run.
The stats every chunk and shard file carries are summed with :func:`add_stats`.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from boxcaseg.errors import BoxcasegError
from boxcaseg.io import atomic_write_json, load_json, short_name
from boxcaseg.proxy.tasks import ann_key, apply_results, validate_coco

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
    """``<out name>.progress/shard-K-of-N`` (the name cut to fit 255 bytes with its suffix)."""
    return out.with_name(f"{short_name(out.name, len('.progress'))}.progress") / shard.tag


class ProgressStore:
    """Finished chunks of one shard, on disk (atomic writes)."""

    def __init__(self, root: Path, fingerprint: dict, restart: bool = False):
        self.root = Path(root)
        self.fingerprint = fingerprint
        if restart:  # --restart: whatever an earlier run left here (chunks, a meta.json, temporary files) goes
            self.remove()
            return
        meta = self.root / "meta.json"
        if meta.is_file():
            try:
                old = load_json(meta, "progress metadata")
            except BoxcasegError:
                old = None  # a damaged meta.json: progress that cannot be trusted
            if old != fingerprint:
                diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k)) \
                    if isinstance(old, dict) else ["all"]
                raise BoxcasegError(
                    f"{self.root}: unfinished progress of a run with other inputs or options ({', '.join(diff)} "
                    "differ): add --restart to start over (it deletes that progress), or rerun the earlier command "
                    "to finish it")
        # else: written with the first finished chunk (a run that fails before one leaves nothing)

    def path(self, chunk: int) -> Path:
        return self.root / f"chunk-{chunk:06d}.json"

    def done(self, chunk: int) -> bool:
        return self.path(chunk).is_file()

    def save(self, chunk: int, payload: dict) -> None:
        if not (self.root / "meta.json").is_file():
            atomic_write_json(self.root / "meta.json", self.fingerprint)
        atomic_write_json(self.path(chunk), payload)

    def load(self, chunk: int, image_ids: list) -> dict:
        payload = load_json(self.path(chunk), "progress chunk")
        if not isinstance(payload, dict) or payload.get("image_ids") != image_ids:
            raise BoxcasegError(f"{self.path(chunk)}: holds other images than this run's chunk {chunk}; "
                                "add --restart to start over")
        return payload

    def collect(self, chunk_image_ids: list[list]) -> tuple[dict, dict[str, tuple]]:
        """Every chunk of the shard (given by its image ids) -> (summed stats, {ann key: (rle, agreement, ignore)})."""
        stats = empty_stats()
        results: dict[str, tuple] = {}
        for c, image_ids in enumerate(chunk_image_ids):
            payload = self.load(c, image_ids)
            stats = add_stats(stats, payload["stats"])
            for ann_id, rle, agr, ignore in payload["results"]:
                results[ann_key(ann_id)] = (rle, agr, ignore)
        return stats, results

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        parent = self.root.parent
        try:
            if parent.name.endswith(".progress") and not any(parent.iterdir()):
                parent.rmdir()
        except OSError:
            pass


def write_shard_file(out: Path, shard: Shard, fingerprint: dict, stats: dict, info: dict, results: dict,
                     summary: dict) -> Path:
    """The finished shard K/N (N > 1) of ``out``, written atomically; returns its path."""
    path = shard_file(out, shard)
    atomic_write_json(path, {"format": FORMAT, "fingerprint": fingerprint, "stats": stats, "info": info,
                             "results": [[k, *v] for k, v in results.items()], "summary": summary})
    return path


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


# --------------------------------------------------------------------------- stats in chunks and shard files


def empty_stats() -> dict:
    return {"instances": 0, "masks": 0, "flagged": 0, "low_agreement": 0, "empty_masks": 0, "degenerate": 0,
            "bad_images": 0, "bad_image_annotations": 0, "agreement_sum": 0.0}


def add_stats(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0) + b.get(k, 0) for k in empty_stats()}


def stats_summary(stats: dict) -> dict:
    s = {k: v for k, v in stats.items() if k != "agreement_sum"}
    s["mean_agreement"] = round(stats["agreement_sum"] / stats["masks"], 6) if stats["masks"] else 0.0
    return s


# --------------------------------------------------------------------------- joining shard files


def merge_shards(ann: str | Path, out: str | Path) -> dict:
    """Join the shard files of ``out`` (``<stem>.shard-K-of-N<suffix>``) into ``out``.

    Checks that all N shards are there and come from the same run (same input json,
    model and options) and that the given ``ann`` is that input. Returns a summary.
    """
    from boxcaseg.io import file_sha256

    ann, out = Path(ann), Path(out)
    n, files = find_shard_files(out)
    data = load_json(ann, "COCO annotation json")
    validate_coco(data, ann)
    sha = file_sha256(ann)
    results: dict[str, tuple] = {}
    common = None
    stats = empty_stats()
    for k in range(n):
        shard = load_json(files[k], "shard file")
        fp = shard.get("fingerprint") if isinstance(shard, dict) else None
        if not isinstance(fp, dict) or shard.get("format") != FORMAT:
            raise BoxcasegError(f"{files[k]}: not a boxcaseg proxy shard file")
        if fp.get("shard") != [k, n]:
            raise BoxcasegError(f"{files[k]}: holds shard {fp.get('shard')}, expected [{k}, {n}]")
        if common is None:
            common = common_fingerprint(fp)
        elif common_fingerprint(fp) != common:
            raise BoxcasegError(f"{files[k]}: made with other inputs or options than {files[0].name}")
        if fp.get("ann_sha256") != sha:
            raise BoxcasegError(f"{files[k]}: made from another annotation file than {ann}")
        info = shard.get("info")
        for ann_id, rle, agr, ignore in shard["results"]:
            results[ann_id] = (rle, agr, ignore)
        stats = add_stats(stats, shard.get("stats", {}))
    atomic_write_json(out, apply_results(data, results, info))
    s = stats_summary(stats)
    s.update({"shards": n, "output": str(out)})
    return s

