"""Step 2 of BoxCaseg: proxy masks for every box of a COCO json, merged and scored.

- :func:`generate_proxy` (:class:`ProxyConfig` -> summary): the batched, sharded,
  resumable run (:mod:`~boxcaseg.proxy.pipeline`; its options
  :mod:`~boxcaseg.proxy.options`, decoding workers :mod:`~boxcaseg.proxy.decode`,
  post-processing thread :mod:`~boxcaseg.proxy.chunk_writer`);
- :func:`merge_shards` joins shard files (:mod:`~boxcaseg.proxy.shards`: shards,
  progress chunks, shard files);
- :func:`generate_proxy_torchrun` runs one shard per torchrun rank and rank 0 joins them
  (:mod:`~boxcaseg.proxy.distributed`);
- :func:`merge_masks`: smaller-object-better merge and proxy box agreement (Numba,
  box-local windows);
- :func:`masks_from_probs`: probability maps -> box-local binary masks (Numba);
- :func:`~boxcaseg.proxy.image_masks.image_masks`: one image's boxes -> masks, the same parts
  (``Segmenter``, ``segment``);
- :mod:`~boxcaseg.proxy.calibration`: int8 calibration on proxy crops.

The names above are loaded on first use: importing a submodule loads only what it imports.
"""

import importlib

# name -> the submodule it lives in; loaded on first use, so that importing one submodule
# (proxy.tasks, proxy.postprocess) does not load the pipeline, the shards or torchrun's glue
_EXPORTS = {
    "ProxyConfig": "options",
    "generate_proxy": "pipeline",
    "generate_proxy_torchrun": "distributed",
    "encode_window": "merge_drop",
    "merge_masks": "merge_drop",
    "masks_from_probs": "postprocess",
    "merge_shards": "shards",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
