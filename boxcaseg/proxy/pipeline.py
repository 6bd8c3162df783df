"""The proxy run: `generate_proxy(ProxyConfig) -> summary` for one shard of a COCO json.

Flow (one shard):

1. the json is validated and turned into per-image work (:mod:`boxcaseg.proxy.tasks`),
   cut into fixed chunks; chunks finished by an earlier, killed run are skipped
   (:class:`~boxcaseg.proxy.shards.ProgressStore`);
2. worker processes decode each image once and crop + resize all its usable boxes to
   S x S (:mod:`boxcaseg.proxy.decode`);
3. the main process packs crops of consecutive images into batches of exactly B crops
   (the last batch of a chunk is padded, so every sample is always computed in a batch of
   the same size) and submits them to the engine, one batch in
   flight: batch k+1 is submitted before batch k's maps are collected, and packed into
   the other of two host buffers while batch k runs (on a GPU; on the CPU ``submit``
   computes at once, the same code);
4. post-processing (:mod:`boxcaseg.proxy.chunk_writer`) overlaps with inference: maps ->
   box-local masks; at the end of each chunk, merge + drop per image, RLE, and the
   chunk's results written atomically; in a thread (``post_workers`` 0) or a process
   pool, one chunk per worker;
5. the finished run writes the output json (or the shard file,
   :mod:`boxcaseg.proxy.shards`) atomically.

B (:func:`run_batch_size`) is ``batch_size``, capped by memory
(:func:`~boxcaseg.export.engines.capped_batch_size`) and by the crops of the shard's
largest chunk: 4 boxes with ``--batch-size 512`` run in batches of 4, not 512 (15 GB).
It depends only on what the fingerprint holds, so a resumed run batches alike.

The engine is loaded in a thread while step 1 reads the json, then warmed up (its first
batch of B, a CUDA graph's capture, the Numba kernels' compilation) once B is known; the
steady clock starts when both are done.

Options and their resolution from the model: :mod:`boxcaseg.proxy.options`; one shard
per torchrun rank and the rank-0 join: :mod:`boxcaseg.proxy.distributed`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import ExitStack
from dataclasses import asdict, replace

import numpy as np

from boxcaseg.errors import BoxcasegError
from boxcaseg.infer_settings import InferSettings
from boxcaseg.io import atomic_write_json, load_json, output_lock
from boxcaseg.paths import check_image_paths
from boxcaseg.proxy.tasks import apply_results, build_tasks, validate_coco
from boxcaseg.proxy.options import ProxyConfig, fingerprint, resolve_proxy_config, run_info
from boxcaseg.proxy.decode import decoded_stream
from boxcaseg.proxy.chunk_writer import PostPool, PostThread, Timers
from boxcaseg.proxy.shards import ProgressStore, Shard, progress_dir, shard_file, stats_summary, write_shard_file

log = logging.getLogger(__name__)

__all__ = ["ProxyConfig", "generate_proxy", "resolve_proxy_config", "run_info"]


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


def generate_proxy(cfg: ProxyConfig, resolved=None, check_data=None) -> dict:
    """Turn every non-crowd box of ``cfg.ann`` into a proxy mask; returns a summary dict.

    ``resolved``: what :func:`resolve_proxy_config` returned for ``cfg``, when the caller
    has resolved it already (the model is then not looked up, hashed or exported again).
    ``check_data``: called with the loaded, validated json before any work (what the caller
    will write from the output must be writable: ``--format yolo-seg|png``'s names).

    Writes ``cfg.out`` (the input json with RLE ``segmentation``, ``proxy_agreement`` and
    ``ignore_mask`` on every non-crowd annotation), or, for shard K/N with N > 1, the
    shard file ``<out stem>.shard-K-of-N<suffix>`` (join them with
    :func:`~boxcaseg.proxy.shards.merge_shards`).
    Progress is saved every ``checkpoint_every`` images; rerunning the same command
    after a kill continues and gives the same output as an uninterrupted run
    (``cfg.restart``: starts over instead). One run at a time writes an output
    (:func:`~boxcaseg.io.output_lock`): a second one stops before any work.

    Summary keys: images, instances, masks, flagged, low_agreement, empty_masks,
    degenerate, bad_images, bad_image_annotations, crowd, mean_agreement, seconds,
    instances_per_s, steady_instances_per_s (after the warm-up, the run's own decoding to writing),
    chunks, resumed_chunks, timings {prepare, warmup, decode, wait, pack, inference, h2d, gpu, post,
    masks, write, steady} (seconds; h2d and gpu by CUDA events, None without a CUDA engine),
    post_workers, shard, output, engine.
    """
    t_start = time.perf_counter()
    cfg, rm = resolved if resolved is not None else resolve_proxy_config(cfg)
    cfg.check()
    if cfg.post_workers is None:
        cfg = replace(cfg, post_workers=default_post_workers())
    shard = Shard.parse(cfg.shard)
    settings = rm.settings  # the settings in force (the model's merged with cfg's), carried whole to the masks
    size = settings.infer_size
    timers = Timers()
    warm = EngineWarmUp(cfg, settings)  # beside the json read below
    with ExitStack() as held:
        try:
            data = load_json(cfg.ann, "COCO annotation json")
            validate_coco(data, cfg.ann)
            if check_data is not None:
                check_data(data)
            tasks = build_tasks(data, settings.context, cfg.strict, cfg.ann)
            # before any work: every name inside --images
            paths = check_image_paths(cfg.images, ((t.image_id, t.file_name) for t in tasks))
            mine = [t for t in tasks[shard.index::shard.count] if t.ann_ids]
            per = cfg.checkpoint_every
            chunks = [mine[i:i + per] for i in range(0, len(mine), per)]
            # one run per output: a second one stops here, before touching its progress
            held.enter_context(output_lock(cfg.out if shard.count == 1 else shard_file(cfg.out, shard)))
            store = ProgressStore(progress_dir(cfg.out, shard), fingerprint(cfg, shard, size), restart=cfg.restart)
            batch = run_batch_size(cfg, chunks, size)
            warm.release(batch)
            pending = [c for c in range(len(chunks)) if not store.done(c)]
            if not cfg.skip_bad:  # before any work: a size the json does not give stops the run now, not midway
                check_image_headers([t for c in pending for t in chunks[c] if len(t.crops)], paths)
            total = sum(len(t.ann_ids) for t in mine)
            done_before = sum(len(t.ann_ids) for c in range(len(chunks)) if c not in set(pending)
                              for t in chunks[c])
            timers.prepare = time.perf_counter() - t_start
            engine_desc = cfg.engine
            if pending:
                try:
                    engine_desc = _run_chunks(cfg, chunks, pending, store, settings, timers, total, done_before, warm,
                                              paths, batch)
                except KeyboardInterrupt:
                    saved = sum(len(chunks[c]) for c in range(len(chunks)) if store.done(c))
                    raise KeyboardInterrupt(f"{saved} of {len(mine)} images of {cfg.out} are saved in {store.root}; "
                                            "rerun the same command to resume") from None
        finally:
            warm.release(None)  # no-op once released; after an error: load, no warm-up
            warm.join()  # never leave the engine loading behind an error (nor a CUDA init at exit)

        stats, results = store.collect([[t.image_id for t in chunk] for chunk in chunks])
        seconds = time.perf_counter() - t_start
        summary = _summary(stats, len(mine), shard, chunks, pending, timers, seconds, data, engine_desc)
        summary["post_workers"] = cfg.post_workers
        summary["batch_size"] = batch
        info = run_info(cfg, rm, store.fingerprint)
        summary["settings"] = info
        if shard.count == 1:
            atomic_write_json(cfg.out, apply_results(data, results, info))
            summary["output"] = str(cfg.out)
        else:
            path = write_shard_file(cfg.out, shard, store.fingerprint, stats, info, results, summary)
            summary["output"] = str(path)
        store.remove()
    return summary


def check_image_headers(tasks: list, paths: dict, threads: int = 8) -> None:
    """Every image of ``tasks`` read up to its header (no decoding; :func:`boxcaseg.images.check_image`):
    there, a regular file, readable, its size (either frame, EXIF orientation) the json's.
    BoxcasegError naming the first bad one in work order, the same line its decoding would give."""
    from concurrent.futures import ThreadPoolExecutor

    from boxcaseg.images import check_image

    if not tasks:
        return
    ex = ThreadPoolExecutor(max_workers=max(1, min(threads, len(tasks))), thread_name_prefix="proxy-headers")
    try:
        problems = ex.map(lambda t: check_image(paths[t.image_id], "image", "", size=(t.width, t.height)), tasks,
                          chunksize=64)
        for t, problem in zip(tasks, problems):
            if problem is not None:
                raise BoxcasegError(f"image id {t.image_id!r}: {problem}")
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def _summary(stats, n_images, shard, chunks, pending, timers, seconds, data, engine_desc) -> dict:
    s = stats_summary(stats)
    s.update({
        "images": n_images,
        "crowd": sum(1 for a in data["annotations"] if a.get("iscrowd", 0)),
        "seconds": round(seconds, 3),
        "instances_per_s": round(stats["masks"] / seconds, 2) if seconds > 0 and pending else None,
        "steady_instances_per_s": (round(stats["masks"] / timers.steady, 2)
                                   if timers.steady > 0 and pending else None),
        "chunks": len(chunks),
        "resumed_chunks": len(chunks) - len(pending),
        # to the microsecond: a small run's copies to the GPU take well under a millisecond
        "timings": {k: None if v is None else round(v, 6) for k, v in asdict(timers).items()},
        "shard": f"{shard.index}/{shard.count}",
        "engine": engine_desc,
    })
    return s


def default_post_workers(cpus: int | None = None) -> int:
    """``--post-workers`` when not given: a thread (0) up to 4 cores, else a process per 4 cores, at most 4."""
    cpus = cpus or os.cpu_count() or 1
    return 0 if cpus <= 4 else min(4, cpus // 4)


class EngineWarmUp(threading.Thread):
    """Loads the engine in a thread, beside the json read, and warms it up (:func:`_warm_up`)
    with the batch size :meth:`release` gives (None: no warm-up, the run stops)."""

    def __init__(self, cfg: ProxyConfig, settings: InferSettings):
        super().__init__(daemon=True, name="proxy-engine")
        self.cfg, self.settings, self.size = cfg, settings, settings.infer_size
        self.engine = None
        self.error: BaseException | None = None
        self.seconds = 0.0
        self._batch: int | None = None
        self._released = threading.Event()
        self.start()

    def release(self, batch: int | None) -> None:
        """The run's batch size is known (the first call counts)."""
        if not self._released.is_set():
            self._batch = batch
            self._released.set()

    def run(self) -> None:
        from boxcaseg.export.engines import load_engine

        t0 = time.perf_counter()
        try:
            cfg = self.cfg
            engine = load_engine(cfg.engine, cfg.model, threads=cfg.threads, device=cfg.device, precision=cfg.precision,
                                 channels_last=cfg.channels_last, cuda_graph=cfg.cuda_graph)
            if engine.infer_size != self.size:
                raise BoxcasegError(f"{cfg.model}: engine input size {engine.infer_size} != metadata {self.size}")
            t_wait = time.perf_counter()
            self._released.wait()
            t0 += time.perf_counter() - t_wait  # the json read is not the engine's time
            if self._batch is not None:
                _warm_up(engine, self._batch, cfg, self.settings)
            self.engine = engine
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self.error = e
        self.seconds = time.perf_counter() - t0

    def wait(self):
        """The warmed-up engine (the thread's error, if it failed)."""
        self.join()
        if self.error is not None:
            raise self.error
        return self.engine


def run_batch_size(cfg: ProxyConfig, chunks: list, size: int) -> int:
    """The run's batch B: ``cfg.batch_size`` capped by memory (:func:`~boxcaseg.export.engines.capped_batch_size`)
    and by the crops of the largest chunk (a batch never spans two chunks), at least 1."""
    from boxcaseg.export.engines import capped_batch_size

    most = max((sum(len(t.crops) for t in chunk) for chunk in chunks), default=1)
    return max(1, min(capped_batch_size(cfg.batch_size, size), most))


def _warm_up(engine, batch: int, cfg, settings: InferSettings) -> None:
    """One batch through the engine (a CUDA graph is captured then) and the post-processing
    kernels (their compilation), so that the run's per-stage times describe the steady state."""
    from boxcaseg.proxy.image_masks import crop_masks, finish_image
    from boxcaseg.proxy.merge_drop import encode_window
    from boxcaseg.proxy.tasks import image_task

    size = settings.infer_size
    probs = engine.predict(np.zeros((batch, 3, size, size), np.uint8))
    task = image_task(8, 8, [[0, 0, 8, 8]], settings.context)
    masks = crop_masks(np.asarray(probs)[:1], [(task, 0)], settings, stride=engine.output_stride,
                       relative=cfg.relative)
    merged, _, _ = finish_image(task, masks, merge=cfg.merge)
    encode_window(merged[0], 0, 0, 8, 8)


def uses_cuda(cfg: ProxyConfig) -> bool:
    """Whether this run's engine runs on CUDA in this process (torch on a GPU, ONNX Runtime's
    CUDA or TensorRT provider, a TensorRT engine)."""
    from boxcaseg.export.engines import engine_device

    where = engine_device(cfg.engine, cfg.device, cfg.precision)
    return where == "cuda" or where.startswith(("CUDA", "Tensorrt"))


def _run_chunks(cfg, chunks, pending, store, settings, timers, total, done_before, warm, paths, B: int) -> str:
    """Decode -> batch -> infer -> post for the pending chunks; returns the engine description."""
    size = settings.infer_size
    work = [t for c in pending for t in chunks[c] if len(t.crops)]
    cuda = uses_cuda(cfg)  # its workers then come from a fork server: the engine thread may be initialising CUDA
    stream = decoded_stream(work, paths, size, cfg.workers, cuda)  # decoding starts while the engine warms up
    engine = warm.wait()
    timers.warmup = warm.seconds
    device = getattr(engine, "device", None)
    if device is not None and device.type == "cuda":  # the engine thread's current device, in this thread too (TensorRT)
        import torch

        torch.cuda.set_device(device)
    t_steady = time.perf_counter()
    prog, task = _make_progress(cfg.progress, total, done_before)
    advance = lambda n: prog.advance(task, n)  # noqa: E731
    if cfg.post_workers:
        post = PostPool(cfg, chunks, store, settings, engine.output_stride, timers, advance, cfg.post_workers, cuda)
    else:
        post = PostThread(cfg, chunks, store, settings, engine.output_stride, timers, advance)
    bufs = engine.input_buffers(B, 2)  # page-locked on CUDA: batch k+1 is packed in one while batch k runs
    cur = 0
    refs: list = []
    inflight: list = []  # [(pending, refs, chunk)]: at most one batch

    def collect() -> None:
        pend, rr, c = inflight.pop()
        t0 = time.perf_counter()
        probs = pend.result()
        timers.inference += time.perf_counter() - t0
        tm = pend.timings()
        if tm is not None:
            timers.h2d = (timers.h2d or 0.0) + tm["h2d"]
            timers.gpu = (timers.gpu or 0.0) + tm["gpu"]
        post.batch(c, np.array(probs[:len(rr)], copy=True), rr)

    def submit(c: int) -> None:
        nonlocal cur
        if not refs:
            return
        bufs[cur][len(refs):] = 0
        t0 = time.perf_counter()
        pend = engine.submit(bufs[cur])
        timers.inference += time.perf_counter() - t0
        if inflight:
            collect()  # batch k's maps while batch k+1 runs
        inflight.append((pend, list(refs), c))
        refs.clear()
        cur ^= 1

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
                        post.bad_image(c, t, item["error"])
                        continue
                    crops = item["crops"].numpy()
                    k = 0
                    while k < len(crops):
                        t0 = time.perf_counter()
                        buf = bufs[cur]
                        take = min(B - len(refs), len(crops) - k)
                        buf[len(refs):len(refs) + take] = crops[k:k + take]
                        refs.extend((t, s) for s in range(k, k + take))
                        k += take
                        timers.pack += time.perf_counter() - t0
                        if len(refs) == B:
                            submit(c)
                submit(c)
                if inflight:
                    collect()  # the chunk's last batch before its end
                post.end(c)
            post.close()
    except BaseException:
        post.abort()
        raise
    finally:
        del stream
    timers.steady = time.perf_counter() - t_steady
    return engine.description
