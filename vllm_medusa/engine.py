"""Engine settings the project's commands share, sized for a small CPU machine."""

from __future__ import annotations

from typing import Any


def default_dtype() -> str:
    """The dtype the project's commands run in unless told: bfloat16 where the CPU computes it
    natively (AVX512-BF16 or AMX), where it decodes about 1.6x faster than float32 here; float32
    elsewhere, where bfloat16 is emulated and slower."""
    import torch

    if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        return "bfloat16"
    return "float32"


def engine_kwargs(**overrides: Any) -> dict[str, Any]:
    """`LLM(...)` keyword arguments: float32, eager (start in seconds, not minutes), a KV
    cache of a fixed size rather than a share of memory, stats on for `get_metrics()`."""
    kwargs: dict[str, Any] = {
        "dtype": "float32",
        "enforce_eager": True,
        "max_model_len": 2048,
        "kv_cache_memory_bytes": 2 << 30,
        "seed": 0,
        "disable_log_stats": False,
    }
    kwargs.update(overrides)
    return kwargs


def medusa_config(heads: str, num_speculative_tokens: int | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {"method": "medusa", "model": str(heads)}
    if num_speculative_tokens is not None:
        config["num_speculative_tokens"] = num_speculative_tokens
    return config


def shutdown(llm: Any) -> None:
    """Stop an `LLM`'s engine processes now, not whenever garbage collection runs."""
    llm.llm_engine.engine_core.shutdown()
