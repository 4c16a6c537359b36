"""Acceptance of Medusa heads inside vLLM, on prompts the heads were not trained on."""

from __future__ import annotations

from vllm_medusa.distill import load_prompts
from vllm_medusa.engine import engine_kwargs, medusa_config, shutdown
from vllm_medusa.metrics import spec_decode_stats
from vllm_medusa.tree import tree_setting


def evaluate_heads(
    base_model: str,
    heads: str,
    prompts_path: str | None = None,
    split: str | None = "heldout",
    num_speculative_tokens: int = 4,
    max_tokens: int = 128,
    max_prompts: int | None = None,
    tree: str | None = None,
) -> dict:
    """Greedy generation with the heads as a chain of `num_speculative_tokens` (or as `tree`,
    a tree setting); returns vLLM's acceptance counters."""
    from vllm import LLM, SamplingParams

    prompts = load_prompts(prompts_path, split=split)[:max_prompts]
    with tree_setting(tree or f"chain:{num_speculative_tokens}"):
        llm = LLM(
            model=base_model,
            speculative_config=medusa_config(heads, num_speculative_tokens),
            **engine_kwargs(max_num_seqs=16),
        )
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    llm.chat([[{"role": "user", "content": p.turns[0]}] for p in prompts], params)
    result = spec_decode_stats(llm).as_dict()
    shutdown(llm)
    result.update({"prompts": len(prompts), "split": split, "heads": heads, "tree": tree})
    return result
