"""Step 2 of BoxCaseg: proxy masks for every box of a COCO json, merged and scored.

- :func:`generate_proxy` (:class:`ProxyConfig` -> summary): the batched, sharded,
  resumable run (:mod:`~boxcaseg.proxy.pipeline`; its options
  :mod:`~boxcaseg.proxy.config`, decoding workers :mod:`~boxcaseg.proxy.decode`,
  post-processing thread :mod:`~boxcaseg.proxy.chunk_writer`);
- :func:`merge_shards` joins shard files (:mod:`~boxcaseg.proxy.shards`: shards,
  progress chunks, shard files);
- :func:`generate_proxy_torchrun` runs one shard per torchrun rank and rank 0 joins them
  (:mod:`~boxcaseg.proxy.distributed`);
- :func:`merge_and_drop`: smaller-object-better merge and proxy box agreement (Numba,
  box-local windows);
- :func:`masks_from_probs`: probability maps -> box-local binary masks (Numba).
"""

from boxcaseg.proxy.config import ProxyConfig
from boxcaseg.proxy.distributed import generate_proxy_torchrun
from boxcaseg.proxy.merge_drop import encode_window_fast, merge_and_drop
from boxcaseg.proxy.pipeline import generate_proxy
from boxcaseg.proxy.postprocess import masks_from_probs
from boxcaseg.proxy.shards import merge_shards

__all__ = ["ProxyConfig", "encode_window_fast", "generate_proxy", "generate_proxy_torchrun", "masks_from_probs", "merge_and_drop", "merge_shards"]
