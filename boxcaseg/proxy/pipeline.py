"""Proxy masks for a whole COCO json: `generate_proxy(ProxyConfig) -> summary`.

Flow (one shard):

1. the json is validated and turned into per-image work (:mod:`boxcaseg.proxy.coco`);
2. worker processes decode each image once and crop + resize all its usable boxes to
   S x S (:func:`~boxcaseg.data.transforms.crop_resize`);
3. the main process packs crops of consecutive images into batches of exactly
   ``batch_size`` (the last batch of a chunk is padded, so every sample is always
   computed in a batch of the same size) and runs the engine;
4. a post-processing thread (Numba, GIL released) overlaps with inference: maps ->
   box-local masks; at the end of each chunk, merge + drop per image, RLE, and the
   chunk's results written atomically (:mod:`boxcaseg.proxy.shards`);
5. the finished run writes the output json (or the shard file) atomically.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from boxcaseg.errors import BoxcasegError
from boxcaseg.io import atomic_write_json, load_json
from boxcaseg.masks import empty_rle
from boxcaseg.paths import check_image_paths
from boxcaseg.proxy.coco import ImageTask, ann_key, apply_results, build_tasks, validate_coco
from boxcaseg.proxy.shards import (
    FORMAT, ProgressStore, Shard, common_fingerprint, find_shard_files, progress_dir, shard_file,
)

log = logging.getLogger(__name__)

# seconds to sleep after each saved chunk; set by the kill-and-resume test only
_TEST_CHUNK_DELAY = float(os.environ.get("BOXCASEG_PROXY_TEST_CHUNK_DELAY", "0") or 0)


@dataclass
class ProxyConfig:
    """Options of :func:`generate_proxy` (the `boxcaseg proxy` flags)."""

    ann: Path                        # COCO instances json (boxes)
    images: Path                     # its image folder
    out: Path                        # output json (shard files / progress next to it)
    model: Any = None                # None/"pretrained" (the shipped model), a checkpoint, .onnx or .engine
    engine: str = "auto"             # auto | torch | onnx | trt (auto: by file, see export.engines.resolve_model)
    context: float | None = None     # crop R x the box around its centre (>= 1); None: the model's
    threshold: float | None = None   # on the probability (or min-max normalised with relative); None: the model's
    relative: bool = False           # the published per-instance min-max normalisation
    prior_weight: float | None = None  # blend of a soft inscribed-ellipse prior before the threshold; None: the model's
    drop_thresh: float = 0.95        # agreement below -> ignore_mask
    merge: bool = False              # True: smaller object better across the masks of an image; False (default):
                                     # each box's own mask (trains an equal or better Mask R-CNN: RESULTS "merge_maskrcnn")
    batch_size: int = 32             # instances per inference batch (fixed; part of the fingerprint)
    workers: int = 2                 # decode/crop worker processes (0: in the main process)
    threads: int = 0                 # engine CPU threads (0: its default)
    shard: Any = None                # "K/N" or (K, N); None: torchrun RANK/WORLD_SIZE, else 0/1
    checkpoint_every: int = 256      # images per progress chunk
    skip_bad: bool = False           # a missing/corrupt image flags its annotations instead of stopping
    strict: bool = False             # a degenerate box stops the run instead of being flagged
    progress: bool = True            # rich progress bar
    device: str | None = None        # torch engine device (default: cuda when available)

    def check(self) -> None:
        from boxcaseg.export.engines import ENGINE_KINDS

        if self.engine not in ENGINE_KINDS:
            raise BoxcasegError(f"--engine {self.engine!r}: choose from {', '.join(ENGINE_KINDS)}")
        if self.context is None or self.threshold is None or self.prior_weight is None:
            raise RuntimeError("ProxyConfig.check() before resolve_proxy_config()")
        if not (math.isfinite(self.context) and self.context >= 1.0):
            raise BoxcasegError(f"--context {self.context}: must be >= 1 (1 crops exactly the box)")
        if not 0.0 <= self.threshold <= 1.0:
            raise BoxcasegError(f"--threshold {self.threshold}: must be in [0, 1]")
        if not (math.isfinite(self.prior_weight) and 0.0 <= self.prior_weight <= 1.0):
            raise BoxcasegError(f"--prior-weight {self.prior_weight}: must be in [0, 1]")
        if not 0.0 <= self.drop_thresh <= 1.0:
            raise BoxcasegError(f"--drop-thresh {self.drop_thresh}: must be in [0, 1]")
        if self.batch_size < 1 or self.checkpoint_every < 1 or self.workers < 0:
            raise BoxcasegError("--batch-size and --checkpoint-every must be >= 1, --workers >= 0")
        if not Path(self.images).is_dir():
            raise BoxcasegError(f"{self.images}: image folder not found")


@dataclass
class _Timers:
    decode: float = 0.0      # worker time: read + decode + crop + resize (summed over workers)
    wait: float = 0.0        # main process waiting for decoded images
    inference: float = 0.0   # engine.predict
    post: float = 0.0        # resize/threshold, merge/drop, RLE, chunk writes (post thread)


# --------------------------------------------------------------------------- decoding workers


class _DecodeDataset:
    """Item i: image i decoded once, all its usable crops -> uint8 [k, 3, S, S] (torch)."""

    def __init__(self, tasks: list[ImageTask], paths: dict, size: int):
        # paths: image id -> file, checked to lie inside --images by generate_proxy
        self.items = [(t.image_id, str(paths[t.image_id]), t.width, t.height, t.crops) for t in tasks]
        self.size = size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        import torch

        from boxcaseg.data.transforms import open_rgb
        from boxcaseg.data.transforms import crop_resize

        t0 = time.perf_counter()
        image_id, path, w, h, crops = self.items[i]
        try:
            img = open_rgb(path)
            if img.size != (w, h):
                raise BoxcasegError(f"{path} is {img.size[0]}x{img.size[1]} pixels, the json says {w}x{h}")
            arr = np.empty((len(crops), 3, self.size, self.size), np.uint8)
            for k, c in enumerate(crops):
                arr[k] = np.asarray(crop_resize(img, tuple(int(v) for v in c), self.size)).transpose(2, 0, 1)
        except BoxcasegError as e:
            return {"i": i, "error": f"image id {image_id!r}: {e.one_line()}", "t": time.perf_counter() - t0}
        except Exception as e:  # noqa: BLE001 - decompression bombs, truncated data ...
            msg = " ".join(str(e).split())[:200]
            return {"i": i, "error": f"image id {image_id!r}: {path}: unreadable image ({type(e).__name__}: {msg})",
                    "t": time.perf_counter() - t0}
        return {"i": i, "crops": torch.from_numpy(arr), "t": time.perf_counter() - t0}


def _decoded_stream(tasks: list[ImageTask], paths: dict, size: int, workers: int):
    """Decoded images in ``tasks`` order (a torch DataLoader over worker processes)."""
    import multiprocessing as mp

    from torch.utils.data import DataLoader

    ds = _DecodeDataset(tasks, paths, size)
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs["prefetch_factor"] = 4
        if "fork" in mp.get_all_start_methods():
            kwargs["multiprocessing_context"] = "fork"
    loader = DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers, **kwargs)
    return iter(loader)


# --------------------------------------------------------------------------- post-processing thread


class _PostThread(threading.Thread):
    """Maps -> masks per batch; merge/drop/RLE and the chunk file at each chunk end."""

    def __init__(self, cfg: ProxyConfig, chunks: list[list[ImageTask]], store: ProgressStore,
                 size: int, stride: int, timers: _Timers, on_done):
        super().__init__(daemon=True, name="proxy-post")
        self.cfg, self.chunks, self.store = cfg, chunks, store
        self.size, self.stride = size, stride
        self.timers, self.on_done = timers, on_done
        self.q: queue.Queue = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        self.stop_now = False                  # set by the main thread when it gives up
        self.masks: dict[int, list] = {}       # task index -> masks per usable slot
        self.bad: dict[int, str] = {}          # task index -> why the image is unusable

    def put(self, item) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def run(self) -> None:
        try:
            while True:
                item = self.q.get()
                if item is None or self.stop_now:
                    return
                t0 = time.perf_counter()
                self._handle(item)
                self.timers.post += time.perf_counter() - t0
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self.error = e
            while True:  # keep draining so the main thread never blocks
                try:
                    if self.q.get(timeout=0.2) is None:
                        return
                except queue.Empty:
                    continue

    def _handle(self, item) -> None:
        from boxcaseg.proxy.postprocess import masks_from_probs

        kind = item[0]
        if kind == "batch":
            _, probs, refs = item
            crops = np.stack([t.crops[s] for t, s in refs])
            boxes = np.stack([t.boxes[s] for t, s in refs])
            gt = np.stack([t.gt_xyxy[s] for t, s in refs])
            masks = masks_from_probs(probs, crops, boxes, self.cfg.threshold, self.cfg.relative, self.size, self.stride,
                                     gt, self.cfg.prior_weight)
            for (t, s), m in zip(refs, masks):
                self.masks.setdefault(t.index, [None] * len(t.crops))[s] = m
            self.on_done(len(refs))
        elif kind == "bad":
            _, t, why = item
            self.bad[t.index] = why
        elif kind == "end":
            self._finish_chunk(item[1])

    def _finish_chunk(self, c: int) -> None:
        from boxcaseg.proxy.merge_drop import encode_window_fast, merge_and_drop

        results = []
        st = _empty_stats()
        drop = self.cfg.drop_thresh
        not_inferred = 0
        for t in self.chunks[c]:
            n = len(t.ann_ids)
            st["instances"] += n
            bad = self.bad.pop(t.index, None)
            masks = self.masks.pop(t.index, None)
            agreement = np.zeros(len(t.crops))
            merged: list = [None] * len(t.crops)
            if bad is not None:
                st["bad_images"] += 1
                st["bad_image_annotations"] += len(t.crops)
                not_inferred += len(t.crops)
            elif len(t.crops):
                if masks is None or any(m is None for m in masks):
                    raise RuntimeError(f"image id {t.image_id!r}: masks missing at chunk end")
                merged, agreement = merge_and_drop(t.boxes, masks, t.gt_xyxy, t.areas, merge=self.cfg.merge)
            slot = 0
            for a in range(n):
                reason = t.reasons[a]
                if reason is not None:
                    st["degenerate"] += 1
                    not_inferred += 1
                    results.append([t.ann_ids[a], empty_rle(t.height, t.width), 0.0, True])
                    st["flagged"] += 1
                    continue
                m = merged[slot]
                if m is None:
                    rle, agr, ignore = empty_rle(t.height, t.width), 0.0, True
                    st["flagged"] += 1
                else:
                    x0, y0 = int(t.boxes[slot, 0]), int(t.boxes[slot, 1])
                    rle = encode_window_fast(m, x0, y0, t.height, t.width)
                    agr = float(agreement[slot])
                    ignore = bool(agr < drop)
                    st["masks"] += 1
                    st["agreement_sum"] += agr
                    if not m.any():
                        st["empty_masks"] += 1
                    if ignore:
                        st["flagged"] += 1
                        st["low_agreement"] += 1
                results.append([t.ann_ids[a], rle, agr, ignore])
                slot += 1
        payload = {"chunk": c, "image_ids": [t.image_id for t in self.chunks[c]], "results": results, "stats": st}
        self.store.save(c, payload)
        self.on_done(not_inferred)
        if _TEST_CHUNK_DELAY:
            time.sleep(_TEST_CHUNK_DELAY)  # tests only: widens the window for kill-and-resume


def _empty_stats() -> dict:
    return {"instances": 0, "masks": 0, "flagged": 0, "low_agreement": 0, "empty_masks": 0, "degenerate": 0,
            "bad_images": 0, "bad_image_annotations": 0, "agreement_sum": 0.0}


def _add_stats(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0) + b.get(k, 0) for k in _empty_stats()}


# --------------------------------------------------------------------------- the run


def _fingerprint(cfg: ProxyConfig, shard: Shard, size: int) -> dict:
    from boxcaseg.export.engines import engine_device
    from boxcaseg.export.onnx_export import file_sha256

    return {
        "format": FORMAT,
        "ann_sha256": file_sha256(cfg.ann),
        "model_sha256": file_sha256(cfg.model),
        "engine": cfg.engine,
        "device": engine_device(cfg.engine, cfg.device),
        "infer_size": size,
        "context": float(cfg.context),
        "threshold": float(cfg.threshold),
        "prior_weight": float(cfg.prior_weight),
        "relative": bool(cfg.relative),
        "drop_thresh": float(cfg.drop_thresh),
        "merge": bool(cfg.merge),
        "batch_size": int(cfg.batch_size),
        "checkpoint_every": int(cfg.checkpoint_every),
        "skip_bad": bool(cfg.skip_bad),
        "strict": bool(cfg.strict),
        "shard": [shard.index, shard.count],
    }


def _make_progress(enabled: bool, total: int, done: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class Speed(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:,.1f} inst/s" if speed else "-- inst/s", style="cyan")

    prog = Progress(TextColumn("proxy masks"), BarColumn(), MofNCompleteColumn(), Speed(), TimeRemainingColumn(),
                    disable=not enabled, transient=False)
    task = prog.add_task("proxy", total=total, completed=done)
    return prog, task


def resolve_proxy_config(cfg: ProxyConfig):
    """``cfg`` with its model resolved (engine kind and file) and every setting left
    None taken from the model; returns (resolved config, :class:`ResolvedModel`)."""
    from boxcaseg.export.engines import resolve_model

    if not Path(cfg.images).is_dir():
        raise BoxcasegError(f"{cfg.images}: image folder not found")
    rm = resolve_model(cfg.model, cfg.engine, cfg.device)
    st = rm.settings
    out = ProxyConfig(**{
        **asdict(cfg), "ann": Path(cfg.ann), "images": Path(cfg.images), "out": Path(cfg.out),
        "model": rm.path, "engine": rm.kind,
        "context": st.context if cfg.context is None else float(cfg.context),
        "threshold": st.threshold if cfg.threshold is None else float(cfg.threshold),
        "prior_weight": st.prior_weight if cfg.prior_weight is None else float(cfg.prior_weight),
    })
    return out, rm


def run_info(cfg: ProxyConfig, rm, fingerprint: dict) -> dict:
    """What the output json records in ``info.boxcaseg_proxy``: the model and the settings in force."""
    from boxcaseg import __version__

    return {"version": __version__, "model": rm.label, "model_sha256": fingerprint["model_sha256"],
            "engine": cfg.engine, "infer_size": rm.settings.infer_size, "alpha": rm.settings.alpha,
            "context": cfg.context, "threshold": cfg.threshold, "prior_weight": cfg.prior_weight,
            "relative": cfg.relative, "merge": cfg.merge, "drop_thresh": cfg.drop_thresh}


def generate_proxy(cfg: ProxyConfig, resolved=None) -> dict:
    """Turn every non-crowd box of ``cfg.ann`` into a proxy mask; returns a summary dict.

    ``resolved``: what :func:`resolve_proxy_config` returned for ``cfg``, when the caller
    has resolved it already (the model is then not looked up, hashed or exported again).

    Writes ``cfg.out`` (the input json with RLE ``segmentation``, ``proxy_agreement`` and
    ``ignore_mask`` on every non-crowd annotation), or, for shard K/N with N > 1, the
    shard file ``<out stem>.shard-K-of-N<suffix>`` (join them with :func:`merge_shards`).
    Progress is saved every ``checkpoint_every`` images; rerunning the same command
    after a kill continues and gives the same output as an uninterrupted run.

    Summary keys: images, instances, masks, flagged, low_agreement, empty_masks,
    degenerate, bad_images, bad_image_annotations, crowd, mean_agreement, seconds,
    instances_per_s, chunks, resumed_chunks, timings {decode, wait, inference, post},
    shard, output, engine.
    """
    from boxcaseg.export.engines import load_engine

    t_start = time.perf_counter()
    cfg, rm = resolved if resolved is not None else resolve_proxy_config(cfg)
    cfg.check()
    shard = Shard.parse(cfg.shard)
    size = rm.settings.infer_size
    data = load_json(cfg.ann, "COCO annotation json")
    validate_coco(data, cfg.ann)
    tasks = build_tasks(data, cfg.context, cfg.strict, cfg.ann)
    paths = check_image_paths(cfg.images, ((t.image_id, t.file_name) for t in tasks))  # before any work: inside --images
    mine = [t for t in tasks[shard.index::shard.count] if t.ann_ids]
    per = cfg.checkpoint_every
    chunks = [mine[i:i + per] for i in range(0, len(mine), per)]
    store = ProgressStore(progress_dir(cfg.out, shard), _fingerprint(cfg, shard, size))
    pending = [c for c in range(len(chunks)) if not store.done(c)]
    total = sum(len(t.ann_ids) for t in mine)
    done_before = sum(len(t.ann_ids) for c in range(len(chunks)) if c not in set(pending) for t in chunks[c])
    timers = _Timers()
    engine_desc = cfg.engine
    if pending:
        engine_desc = _run_chunks(cfg, chunks, pending, store, size, timers, total, done_before, load_engine, paths)

    stats = _empty_stats()
    results: dict[str, tuple] = {}
    for c in range(len(chunks)):
        payload = store.load(c, [t.image_id for t in chunks[c]])
        stats = _add_stats(stats, payload["stats"])
        for ann_id, rle, agr, ignore in payload["results"]:
            results[ann_key(ann_id)] = (rle, agr, ignore)
    seconds = time.perf_counter() - t_start
    summary = _summary(stats, len(mine), shard, chunks, pending, timers, seconds, data, engine_desc)
    info = run_info(cfg, rm, store.fingerprint)
    summary["settings"] = info
    if shard.count == 1:
        atomic_write_json(cfg.out, apply_results(data, results, info))
        summary["output"] = str(cfg.out)
    else:
        path = shard_file(cfg.out, shard)
        atomic_write_json(path, {"format": FORMAT, "fingerprint": store.fingerprint, "stats": stats, "info": info,
                                 "results": [[k, *v] for k, v in results.items()], "summary": summary})
        summary["output"] = str(path)
    store.remove()
    return summary


def _stats_summary(stats: dict) -> dict:
    s = {k: v for k, v in stats.items() if k != "agreement_sum"}
    s["mean_agreement"] = round(stats["agreement_sum"] / stats["masks"], 6) if stats["masks"] else 0.0
    return s


def _summary(stats, n_images, shard, chunks, pending, timers, seconds, data, engine_desc) -> dict:
    s = _stats_summary(stats)
    s.update({
        "images": n_images,
        "crowd": sum(1 for a in data["annotations"] if a.get("iscrowd", 0)),
        "seconds": round(seconds, 3),
        "instances_per_s": round(stats["masks"] / seconds, 2) if seconds > 0 and pending else None,
        "chunks": len(chunks),
        "resumed_chunks": len(chunks) - len(pending),
        "timings": {k: round(v, 3) for k, v in asdict(timers).items()},
        "shard": f"{shard.index}/{shard.count}",
        "engine": engine_desc,
    })
    return s


def _run_chunks(cfg, chunks, pending, store, size, timers, total, done_before, load_engine, paths) -> str:
    """Decode -> batch -> infer -> post for the pending chunks; returns the engine description."""
    work = [t for c in pending for t in chunks[c] if len(t.crops)]
    stream = _decoded_stream(work, paths, size, cfg.workers)  # forks before the engine's threads exist
    engine = load_engine(cfg.engine, cfg.model, threads=cfg.threads, device=cfg.device)
    if engine.infer_size != size:
        raise BoxcasegError(f"{cfg.model}: engine input size {engine.infer_size} != metadata {size}")
    prog, task = _make_progress(cfg.progress, total, done_before)
    post = _PostThread(cfg, chunks, store, size, engine.output_stride, timers, lambda n: prog.advance(task, n))
    B = cfg.batch_size
    buf = np.zeros((B, 3, size, size), np.uint8)
    refs: list = []

    def flush() -> None:
        if not refs:
            return
        buf[len(refs):] = 0
        t0 = time.perf_counter()
        probs = engine.predict(buf)
        timers.inference += time.perf_counter() - t0
        post.put(("batch", np.array(probs[:len(refs)], copy=True), list(refs)))
        refs.clear()

    post.start()
    try:
        with prog:
            for c in pending:
                for t in chunks[c]:
                    if not len(t.crops):
                        continue
                    t0 = time.perf_counter()
                    item = next(stream)
                    timers.wait += time.perf_counter() - t0
                    timers.decode += item["t"]
                    if item.get("error"):
                        if not cfg.skip_bad:
                            raise BoxcasegError(item["error"])
                        log.warning("skipped (flagged): %s", item["error"])
                        post.put(("bad", t, item["error"]))
                        continue
                    crops = item["crops"].numpy()
                    k = 0
                    while k < len(crops):
                        take = min(B - len(refs), len(crops) - k)
                        buf[len(refs):len(refs) + take] = crops[k:k + take]
                        refs.extend((t, s) for s in range(k, k + take))
                        k += take
                        if len(refs) == B:
                            flush()
                flush()
                post.put(("end", c))
            post.put(None)
            post.join()
    finally:
        if post.is_alive():
            post.stop_now = True
            try:
                post.q.put_nowait(None)
            except queue.Full:
                pass
        del stream
    if post.error is not None:
        raise post.error
    return engine.description


def merge_shards(ann: str | Path, out: str | Path) -> dict:
    """Join the shard files of ``out`` (``<stem>.shard-K-of-N<suffix>``) into ``out``.

    Checks that all N shards are there and come from the same run (same input json,
    model and options) and that the given ``ann`` is that input. Returns a summary.
    """
    from boxcaseg.export.onnx_export import file_sha256

    ann, out = Path(ann), Path(out)
    n, files = find_shard_files(out)
    data = load_json(ann, "COCO annotation json")
    validate_coco(data, ann)
    sha = file_sha256(ann)
    results: dict[str, tuple] = {}
    common = None
    stats = _empty_stats()
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
        stats = _add_stats(stats, shard.get("stats", {}))
    atomic_write_json(out, apply_results(data, results, info))
    s = _stats_summary(stats)
    s.update({"shards": n, "output": str(out)})
    return s


def generate_proxy_torchrun(cfg: ProxyConfig, resolved=None) -> dict:
    """:func:`generate_proxy`, and under torchrun (WORLD_SIZE > 1, no explicit shard) a
    barrier after which rank 0 joins the shard files into ``cfg.out``.

    Each rank processes shard RANK/WORLD_SIZE; the joined file equals a one-process run.
    """
    from boxcaseg import dist

    summary = generate_proxy(cfg, resolved)
    rank, world = dist.env_rank_world()
    if cfg.shard is None and world > 1:
        dist.init_from_env()
        dist.barrier()
        if rank == 0:
            summary["merged"] = merge_shards(cfg.ann, cfg.out)
        dist.barrier()
        dist.cleanup()
    return summary
