"""Surface: `vllm.v1.core.sched.scheduler.Scheduler.__init__` (vLLM 0.32; the async scheduler
subclasses it).

Where the CPU attention verifies Medusa trees, it lays out the paths its causal kernel gets
wrong in a few blocks of the KV cache that no request owns: the null block, and the last
`tree_attention.RESERVED_BLOCKS` of the cache. The scheduler is built with a KV cache config
of that many fewer blocks, so it never hands those out (nor caches prefixes in them); the
workers keep the full cache. Elsewhere nothing changes.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from typing import Any

logger = logging.getLogger(f"vllm.{__name__}")

_ORIGINAL_ATTR = "_vllm_medusa_original_init"


def reserves_blocks(vllm_config: Any) -> bool:
    """Whether this engine's CPU attention lays out tree paths in reserved blocks."""
    from vllm_medusa.patches.vllm_config import serves_medusa_tree

    return vllm_config.device_config.device_type == "cpu" and serves_medusa_tree(vllm_config)


def scheduler_kv_cache_config(vllm_config: Any, kv_cache_config: Any) -> Any:
    """The KV cache config the scheduler allocates from: the engine's, less the reserved
    blocks where the engine needs them."""
    if not reserves_blocks(vllm_config):
        return kv_cache_config
    from vllm_medusa.tree_attention import RESERVED_BLOCKS

    num_blocks = kv_cache_config.num_blocks - RESERVED_BLOCKS
    block_size = vllm_config.cache_config.block_size
    needed = -(-vllm_config.model_config.max_model_len // block_size) + 1  # and the null block
    if num_blocks < needed:
        raise ValueError(
            f"the KV cache holds {kv_cache_config.num_blocks} blocks of {block_size} tokens and "
            f"Medusa trees on the CPU keep {RESERVED_BLOCKS} of them, which leaves too few for "
            f"one request of max_model_len={vllm_config.model_config.max_model_len}: give the "
            "KV cache more memory (--kv-cache-memory-bytes) or lower --max-model-len"
        )
    logger.info(
        "vllm-medusa: %d of %d KV cache blocks kept for tree verification",
        RESERVED_BLOCKS,
        kv_cache_config.num_blocks,
    )
    return dataclasses.replace(kv_cache_config, num_blocks=num_blocks)


def apply() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    if hasattr(Scheduler, _ORIGINAL_ATTR):
        return
    original = Scheduler.__init__
    setattr(Scheduler, _ORIGINAL_ATTR, original)
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        arguments = bound.arguments
        arguments["kv_cache_config"] = scheduler_kv_cache_config(
            arguments["vllm_config"], arguments["kv_cache_config"]
        )
        original(*bound.args, **bound.kwargs)

    Scheduler.__init__ = __init__
