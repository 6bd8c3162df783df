"""Decoding workers of a proxy run: each image is read and decoded once, in worker
processes, and all its usable boxes are cropped (with context) and resized to S x S
(:func:`~boxcaseg.data.transforms.crop_resize`); :func:`decoded_stream` yields them in
work-list order. A bad image becomes an error record instead of an exception.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from boxcaseg.errors import BoxcasegError
from boxcaseg.proxy.tasks import ImageTask


def cut_crops(img, crops, size: int) -> np.ndarray:
    """The crop windows ``crops`` [k, 4] (x0, y0, x1, y1) of a PIL RGB image, each resized to
    ``size`` x ``size`` (:func:`~boxcaseg.data.transforms.crop_resize`) -> uint8 [k, 3, S, S]:
    the network's input, cut the one way (a proxy run, :class:`~boxcaseg.Segmenter`, int8 calibration)."""
    from boxcaseg.data.transforms import crop_resize

    arr = np.empty((len(crops), 3, size, size), np.uint8)
    for k, c in enumerate(crops):
        arr[k] = np.asarray(crop_resize(img, tuple(int(v) for v in c), size)).transpose(2, 0, 1)
    return arr


class DecodeDataset:
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

        t0 = time.perf_counter()
        image_id, path, w, h, crops = self.items[i]
        try:
            img = open_rgb(path, "image", (w, h))  # in the frame of the json's size (EXIF orientation)
            arr = cut_crops(img, crops, self.size)
        except BoxcasegError as e:
            return {"i": i, "error": f"image id {image_id!r}: {e.one_line()}", "t": time.perf_counter() - t0}
        except Exception as e:  # noqa: BLE001 - anything else a crafted image makes Pillow raise
            msg = " ".join(str(e).split())[:200]
            return {"i": i, "error": f"image id {image_id!r}: {path}: unreadable image ({type(e).__name__}: {msg})",
                    "t": time.perf_counter() - t0}
        return {"i": i, "crops": torch.from_numpy(arr), "t": time.perf_counter() - t0}


#: what the decode and post-processing workers import (preloaded by a fork server)
WORKER_MODULES = ("numpy", "PIL.Image", "torch", "boxcaseg.data.transforms", "boxcaseg.proxy.decode",
                  "boxcaseg.proxy.chunk_writer")


def decoded_stream(tasks: list[ImageTask], paths: dict, size: int, workers: int, uses_cuda: bool = False):
    """Decoded images in ``tasks`` order (a torch DataLoader over worker processes; forked,
    or from a fork server when this process uses CUDA: :func:`boxcaseg.dist.worker_context`)."""
    from torch.utils.data import DataLoader

    from boxcaseg.dist import worker_context

    ds = DecodeDataset(tasks, paths, size)
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs["prefetch_factor"] = 4
        kwargs["multiprocessing_context"] = worker_context(uses_cuda, WORKER_MODULES)
    loader = DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers, **kwargs)
    return iter(loader)
