"""Post-processing of a proxy run, in a thread that overlaps with inference (the Numba
kernels release the GIL): per batch, probability maps -> box-local masks
(:func:`~boxcaseg.proxy.postprocess.masks_from_probs`); at each chunk's end, merge +
drop per image, RLE, and the chunk's results saved atomically to the
:class:`~boxcaseg.proxy.shards.ProgressStore`.

:data:`on_chunk_written` is a hook called with the chunk index after each saved chunk
(None: nothing; the kill-and-resume test sets it to widen its window).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from boxcaseg.masks import empty_rle
from boxcaseg.proxy.coco import ImageTask
from boxcaseg.proxy.config import ProxyConfig
from boxcaseg.proxy.shards import ProgressStore, empty_stats

# called with the chunk index after each chunk file is saved (in the post thread)
on_chunk_written: Callable[[int], None] | None = None


@dataclass
class Timers:
    warmup: float = 0.0      # engine load, its first batch and the Numba kernels' compilation (before the clock)
    decode: float = 0.0      # worker time: read + decode + crop + resize (summed over workers)
    wait: float = 0.0        # main process waiting for decoded images
    pack: float = 0.0        # crops copied into the fixed-size input batch
    inference: float = 0.0   # engine.predict (host-to-device, the network, device-to-host)
    post: float = 0.0        # post thread, all of it: masks, merge/drop, RLE, chunk files
    masks: float = 0.0       # ... of which maps -> box-local masks (resize, prior, threshold)
    write: float = 0.0       # ... of which chunk files (merge/drop, RLE, atomic save)
    steady: float = 0.0      # wall time of the run after the warm-up (steady_instances_per_s's clock)



class PostThread(threading.Thread):
    """Maps -> masks per batch; merge/drop/RLE and the chunk file at each chunk end."""

    def __init__(self, cfg: ProxyConfig, chunks: list[list[ImageTask]], store: ProgressStore,
                 size: int, stride: int, timers: Timers, on_done):
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
            t0 = time.perf_counter()
            masks = masks_from_probs(probs, crops, boxes, self.cfg.threshold, self.cfg.relative, self.size, self.stride,
                                     gt, self.cfg.prior_weight)
            self.timers.masks += time.perf_counter() - t0
            for (t, s), m in zip(refs, masks):
                self.masks.setdefault(t.index, [None] * len(t.crops))[s] = m
            self.on_done(len(refs))
        elif kind == "bad":
            _, t, why = item
            self.bad[t.index] = why
        elif kind == "end":
            t0 = time.perf_counter()
            self._finish_chunk(item[1])
            self.timers.write += time.perf_counter() - t0

    def _finish_chunk(self, c: int) -> None:
        from boxcaseg.proxy.merge_drop import encode_window_fast, merge_and_drop

        results = []
        st = empty_stats()
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
        if on_chunk_written is not None:
            on_chunk_written(c)
