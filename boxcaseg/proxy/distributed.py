"""Proxy masks under torchrun: each rank runs shard RANK/WORLD_SIZE
(:func:`~boxcaseg.proxy.pipeline.generate_proxy`, the shard taken from torchrun's
environment), a barrier waits for all of them, and rank 0 joins the shard files into
the output (:func:`~boxcaseg.proxy.shards.merge_shards`); the joined file equals a
one-process run.
"""

from __future__ import annotations

from boxcaseg.proxy.options import ProxyConfig
from boxcaseg.proxy.pipeline import generate_proxy
from boxcaseg.proxy.shards import merge_shards


def generate_proxy_torchrun(cfg: ProxyConfig, resolved=None, check_data=None) -> dict:
    """:func:`generate_proxy`, and under torchrun (WORLD_SIZE > 1, no explicit shard) a
    barrier after which rank 0 joins the shard files into ``cfg.out``.

    Each rank processes shard RANK/WORLD_SIZE; the joined file equals a one-process run.
    """
    from boxcaseg import dist

    summary = generate_proxy(cfg, resolved, check_data)
    rank, world = dist.env_rank_world()
    if cfg.shard is None and world > 1:
        dist.init_from_env()
        dist.barrier()
        if rank == 0:
            summary["merged"] = merge_shards(cfg.ann, cfg.out)
        dist.barrier()
        dist.cleanup()
    return summary
