"""Post-processing of a proxy run: probability maps -> box-local masks per batch
(:func:`~boxcaseg.proxy.image_masks.crop_masks`), and at each chunk's end merge + drop per
image (:func:`~boxcaseg.proxy.image_masks.finish_image`: the stages that ``Segmenter`` and
``segment`` take too), RLE, and the chunk's results saved atomically to the
:class:`~boxcaseg.proxy.shards.ProgressStore` (:func:`write_chunk`).

Two ways to run it, the same bytes: :class:`PostThread` (``--post-workers 0``), one thread
that overlaps with inference (the Numba kernels release the GIL), masks per batch; and
:class:`PostPool` (``--post-workers N``), N forked processes, one whole chunk per task
(masks, merge/drop, RLE, the chunk file), for machines whose cores outrun one thread.

:data:`on_chunk_written` is a hook called with the chunk index after each saved chunk
(None: nothing; the kill-and-resume tests set it to widen their window); pool workers
call the hook as it was when the pool forked.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

from boxcaseg.infer_settings import InferSettings
from boxcaseg.masks import empty_rle
from boxcaseg.proxy.image_masks import crop_masks, finish_image
from boxcaseg.proxy.tasks import ImageTask
from boxcaseg.proxy.options import ProxyConfig
from boxcaseg.proxy.shards import ProgressStore, empty_stats

# called with the chunk index after each chunk file is saved (in the post thread or a pool worker)
on_chunk_written: Callable[[int], None] | None = None


@dataclass
class Timers:
    prepare: float = 0.0     # json read + validation + task building (overlapping the warm-up)
    warmup: float = 0.0      # engine load, its first batch (CUDA graph capture) and the Numba kernels' compilation,
                             # in a thread beside `prepare`; the steady clock starts once both are done
    decode: float = 0.0      # worker time: read + decode + crop + resize (summed over workers)
    wait: float = 0.0        # main process waiting for decoded images
    pack: float = 0.0        # crops copied into the fixed-size input batch
    inference: float = 0.0   # main process in engine submit + result (the whole engine call on the CPU;
                             # on a GPU only what packing did not hide)
    h2d: float | None = None  # host-to-device copies by CUDA events (None: no CUDA engine)
    gpu: float | None = None  # network + copy back on the GPU by CUDA events (None: no CUDA engine)
    post: float = 0.0        # post-processing, all of it: masks, merge/drop, RLE, chunk files (summed over pool workers)
    masks: float = 0.0       # ... of which maps -> box-local masks (resize, prior, threshold)
    write: float = 0.0       # ... of which chunk files (merge/drop, RLE, atomic save)
    steady: float = 0.0      # wall time of the run after the warm-up (steady_instances_per_s's clock)


def write_chunk(cfg: ProxyConfig, c: int, tasks: list[ImageTask], masks: dict[int, list], bad: dict[int, str],
                store: ProgressStore) -> int:
    """Chunk ``c``: merge + drop per image, RLE, stats, saved atomically; returns the number of
    annotations not inferred (degenerate boxes, bad images). ``masks``/``bad``: task index ->
    masks per usable slot / why the image is unusable (the chunk's entries are popped)."""
    from boxcaseg.proxy.merge_drop import encode_window

    results = []
    st = empty_stats()
    not_inferred = 0
    for t in tasks:
        n = len(t.ann_ids)
        st["instances"] += n
        why = bad.pop(t.index, None)
        ms = masks.pop(t.index, None)
        agreement = np.zeros(len(t.crops))
        flags = np.ones(len(t.crops), bool)
        merged: list = [None] * len(t.crops)
        if why is not None:
            st["bad_images"] += 1
            st["bad_image_annotations"] += len(t.crops)
            not_inferred += len(t.crops)
        elif len(t.crops):
            if ms is None or any(m is None for m in ms):
                raise RuntimeError(f"image id {t.image_id!r}: masks missing at chunk end")
            merged, agreement, flags = finish_image(t, ms, merge=cfg.merge, drop_thresh=cfg.drop_thresh,
                                                    drop_slack=cfg.drop_slack)
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
                rle = encode_window(m, x0, y0, t.height, t.width)
                agr = float(agreement[slot])
                ignore = bool(flags[slot])
                st["masks"] += 1
                st["agreement_sum"] += agr
                if not m.any():
                    st["empty_masks"] += 1
                if ignore:
                    st["flagged"] += 1
                    st["low_agreement"] += 1
            results.append([t.ann_ids[a], rle, agr, ignore])
            slot += 1
    payload = {"chunk": c, "image_ids": [t.image_id for t in tasks], "results": results, "stats": st}
    store.save(c, payload)
    if on_chunk_written is not None:
        on_chunk_written(c)
    return not_inferred


class PostThread(threading.Thread):
    """Maps -> masks per batch; merge/drop/RLE and the chunk file at each chunk end."""

    def __init__(self, cfg: ProxyConfig, chunks: list[list[ImageTask]], store: ProgressStore,
                 settings: InferSettings, stride: int, timers: Timers, on_done):
        super().__init__(daemon=True, name="proxy-post")
        self.cfg, self.chunks, self.store = cfg, chunks, store
        self.settings, self.stride = settings, stride
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

    # the sink interface of the main loop (PostPool has the same)
    def batch(self, c: int, probs: np.ndarray, refs: list) -> None:
        self.put(("batch", probs, refs))

    def bad_image(self, c: int, t: ImageTask, why: str) -> None:
        self.put(("bad", t, why))

    def end(self, c: int) -> None:
        self.put(("end", c))

    def close(self) -> None:
        self.put(None)
        self.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        if self.is_alive():
            self.stop_now = True
            try:
                self.q.put_nowait(None)
            except queue.Full:
                pass

    def _handle(self, item) -> None:
        kind = item[0]
        if kind == "batch":
            _, probs, refs = item
            t0 = time.perf_counter()
            masks = crop_masks(probs, refs, self.settings, stride=self.stride, relative=self.cfg.relative)
            self.timers.masks += time.perf_counter() - t0
            for (t, s), m in zip(refs, masks):
                self.masks.setdefault(t.index, [None] * len(t.crops))[s] = m
            self.on_done(len(refs))
        elif kind == "bad":
            _, t, why = item
            self.bad[t.index] = why
        elif kind == "end":
            t0 = time.perf_counter()
            c = item[1]
            self.on_done(write_chunk(self.cfg, c, self.chunks[c], self.masks, self.bad, self.store))
            self.timers.write += time.perf_counter() - t0


# --------------------------------------------------------------------------- the process pool

_POOL_STATE: dict = {}


def _pool_init(state: dict) -> None:
    """In each worker: the run's state, and death with the parent -- the run (forked) or the
    fork server, which exits with the run -- so a killed run leaves no writer behind."""
    import signal

    parent = os.getppid()
    _POOL_STATE.update(state, parent=parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the run's to handle (it ends the pool), not a traceback here
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(1)


def _pool_chunk(c: int, probs: np.ndarray, refs_pos: np.ndarray, bad_pos: list) -> dict:
    """One whole chunk in a pool worker: masks, merge/drop, RLE, the chunk file."""
    st = _POOL_STATE
    cfg, tasks = st["cfg"], st["chunks"][c]
    t0 = time.perf_counter()
    refs = [(tasks[int(p)], int(s)) for p, s in refs_pos]
    masks: dict[int, list] = {}
    if refs:
        local = crop_masks(probs, refs, st["settings"], stride=st["stride"], relative=cfg.relative)
        for (t, s), m in zip(refs, local):
            masks.setdefault(t.index, [None] * len(t.crops))[s] = m
    t1 = time.perf_counter()
    bad = {tasks[p].index: why for p, why in bad_pos}
    if os.getppid() != st["parent"]:  # the run was killed: write nothing more
        os._exit(1)
    not_inferred = write_chunk(cfg, c, tasks, masks, bad, st["store"])
    t2 = time.perf_counter()
    return {"masks": t1 - t0, "write": t2 - t1, "post": t2 - t0, "not_inferred": not_inferred}


class PostPool:
    """Post-processing in ``workers`` processes, one whole chunk per task.

    The main process keeps each chunk's maps until its end, then hands the chunk over;
    at most ``2 * workers`` chunks wait or run at once. Worker times are summed into the
    timers (like decode). Forked after the warm-up (the workers inherit compiled kernels),
    or, when the run uses CUDA, from a fork server (:func:`boxcaseg.dist.worker_context`:
    never a fork of a process whose other threads may hold CUDA's locks).
    """

    def __init__(self, cfg: ProxyConfig, chunks: list[list[ImageTask]], store: ProgressStore,
                 settings: InferSettings, stride: int, timers: Timers, on_done, workers: int,
                 uses_cuda: bool = False):
        from concurrent.futures import ProcessPoolExecutor

        from boxcaseg.dist import worker_context
        from boxcaseg.proxy.decode import WORKER_MODULES

        self.chunks, self.timers, self.on_done = chunks, timers, on_done
        self.limit = 2 * workers
        state = {"cfg": cfg, "chunks": chunks, "store": store, "settings": settings, "stride": stride}
        self.context = worker_context(uses_cuda, WORKER_MODULES)
        self.ex = ProcessPoolExecutor(workers, mp_context=self.context, initializer=_pool_init, initargs=(state,))
        self.ex.submit(os.getpid).result()  # forks every worker now, before the main loop's threads grow
        self.acc: dict[int, list] = {}       # chunk -> [(probs, refs)]
        self.bad: dict[int, list] = {}       # chunk -> [(task position, why)]
        self.futures: deque = deque()
        self._pos: dict[int, dict[int, int]] = {}

    def start(self) -> None:
        pass

    def batch(self, c: int, probs: np.ndarray, refs: list) -> None:
        self.acc.setdefault(c, []).append((probs, refs))
        self.on_done(len(refs))

    def _position(self, c: int, t: ImageTask) -> int:
        pos = self._pos.get(c)
        if pos is None:
            pos = self._pos[c] = {u.index: k for k, u in enumerate(self.chunks[c])}
        return pos[t.index]

    def bad_image(self, c: int, t: ImageTask, why: str) -> None:
        self.bad.setdefault(c, []).append((self._position(c, t), why))

    def end(self, c: int) -> None:
        parts = self.acc.pop(c, [])
        refs = [(self._position(c, t), s) for _, rr in parts for t, s in rr]
        probs = np.concatenate([p for p, _ in parts]) if parts else np.zeros((0, 1, 1, 1), np.float32)
        refs_pos = np.array(refs, np.int64).reshape(-1, 2)
        self._pos.pop(c, None)
        while len(self.futures) >= self.limit:
            self._reap(self.futures.popleft())
        self.futures.append(self.ex.submit(_pool_chunk, c, probs, refs_pos, self.bad.pop(c, [])))

    def _reap(self, fut) -> None:
        r = fut.result()
        for k in ("post", "masks", "write"):
            setattr(self.timers, k, getattr(self.timers, k) + r[k])
        self.on_done(r["not_inferred"])

    def close(self) -> None:
        try:
            while self.futures:
                self._reap(self.futures.popleft())
        finally:
            self.ex.shutdown(wait=True)

    def abort(self) -> None:
        self.ex.shutdown(wait=False, cancel_futures=True)
