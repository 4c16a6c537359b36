"""Medusa trees on a CUDA machine: Triton attention, piecewise CUDA graphs, acceptance.

Install on the GPU machine (vLLM's CUDA build, then this plugin), from this repository:

    pip install "vllm==0.32.*"
    pip install -e ".[cuda]"
    python examples/gpu_trees.py [--model MODEL] [--heads HEADS] [--tree TREE]

The defaults are the SmolLM2 model this project prepares (`make model` on any machine, then
copy `models/SmolLM2-135M-Instruct` over) and the heads shipped with the package. The script
runs the same greedy prompts three times, each in a fresh engine with vLLM's defaults: with
the tree, with the chain of 4 heads, and without speculation. What to expect:

- the log of the tree engine shows, at start-up:
  `vllm-medusa: Medusa trees select the Triton attention backend (TRITON_ATTN)`,
  `vllm-medusa: Medusa trees run attention outside CUDA graphs: cudagraph_mode
  FULL_AND_PIECEWISE -> PIECEWISE` and
  `vllm-medusa: trees are verified by the TRITON_ATTN attention backend`;
- the chain engine keeps vLLM's choices (its default backend and full CUDA graphs);
- greedy output identical to no speculation for the tree and the chain (in float32; in
  bfloat16 or float16, batch shape alone can change a rounding and with it a later token);
- a mean acceptance length above the chain's (on this project's CPU with these heads the
  5-node tree below accepted 1.39 tokens per step against the chain's 1.28), and the
  accepted tokens per tree depth from vLLM's own counters.

The script exits 1 if an output differs or the tree accepted nothing.
"""

import argparse
import gc
import os
import sys
import time

import torch
from vllm import LLM, SamplingParams

from vllm_medusa.default_model import default_model_path
from vllm_medusa.heads import default_heads_path
from vllm_medusa.metrics import spec_decode_stats

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in three sentences how a refrigerator works.",
    "Give me three tips for learning a new language.",
    "List the planets of the solar system in order.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
]


def run(model: str, speculative_config: dict | None, tree: str | None):
    """Greedy answers, tokens/s and the acceptance counters of one fresh engine."""
    if tree:
        os.environ["VLLM_MEDUSA_TREE"] = tree
    else:
        os.environ.pop("VLLM_MEDUSA_TREE", None)
    llm = LLM(
        model=model,
        speculative_config=speculative_config,
        dtype="float32",
        max_model_len=2048,
        gpu_memory_utilization=0.3,
        disable_log_stats=False,
    )
    params = SamplingParams(temperature=0.0, max_tokens=128)
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    start = time.perf_counter()
    outputs = llm.chat(conversations, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    stats = spec_decode_stats(llm) if speculative_config else None
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return [o.outputs[0].token_ids for o in outputs], tokens / seconds, stats


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(default_model_path()))
    parser.add_argument("--heads", default=str(default_heads_path()))
    parser.add_argument("--tree", default="[[0],[1],[2],[0,0],[1,0]]")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_trees.py needs a CUDA GPU and vLLM's CUDA build", file=sys.stderr)
        return 1

    medusa = {"method": "medusa", "model": args.heads, "num_speculative_tokens": 4}
    tree_ids, tree_rate, tree_stats = run(args.model, medusa, args.tree)
    chain_ids, chain_rate, chain_stats = run(args.model, medusa, None)
    plain_ids, plain_rate, _ = run(args.model, None, None)

    print(f"\n--- {len(PROMPTS)} prompts in one batch, greedy, up to 128 tokens each ---")
    print(f"no speculation: {plain_rate:.1f} tok/s")
    for name, rate, stats, ids in (
        (f"tree {args.tree}", tree_rate, tree_stats, tree_ids),
        ("chain of 4", chain_rate, chain_stats, chain_ids),
    ):
        print(
            f"{name}: {rate:.1f} tok/s ({rate / plain_rate:.2f}x), mean acceptance length "
            f"{stats.mean_acceptance_length:.2f}, accepted per depth "
            f"{stats.accepted_per_position}, identical to no speculation: {ids == plain_ids}"
        )
    ok = tree_ids == plain_ids and chain_ids == plain_ids and tree_stats.num_accepted_tokens > 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
