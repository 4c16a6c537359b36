"""Medusa speculative decoding with vLLM's offline `LLM` API.

With vllm-medusa installed, the only change to a vLLM program is `speculative_config`. This
runs the default model with the heads shipped for it (at their calibrated settings, or the
tree given with --tree), then the same prompts without speculation, and compares speed and
greedy output: identical in float32; in bfloat16, the default where the CPU computes it
natively, answers may part where rounding differs with the number of tokens per step (see
the README on what "identical" means per dtype).

    python examples/offline_inference.py [--model DIR] [--heads DIR] [--tree TREE] [--dtype D]

`--tree` takes any tree setting (a name such as mc_sim_7b_63, chain:4, a JSON list of paths)
and is passed the way any vLLM program passes it: the VLLM_MEDUSA_TREE environment variable.
"""

import argparse
import os
import time

from vllm import LLM, SamplingParams

from vllm_medusa.default_model import default_model_path
from vllm_medusa.engine import default_dtype
from vllm_medusa.heads import default_heads_path
from vllm_medusa.metrics import spec_decode_stats

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in three sentences how a refrigerator works.",
    "Give me three tips for learning a new language.",
]


def run(model: str, speculative_config: dict | None, dtype: str) -> tuple[list[str], float, LLM]:
    llm = LLM(
        model=model,
        speculative_config=speculative_config,
        dtype=dtype,
        enforce_eager=True,
        max_model_len=2048,
        kv_cache_memory_bytes=1 << 30,
        disable_log_stats=False,
    )
    params = SamplingParams(temperature=0.0, max_tokens=128)
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    start = time.perf_counter()
    outputs = [llm.chat([c], params, use_tqdm=False)[0] for c in conversations]
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return [o.outputs[0].text for o in outputs], tokens / seconds, llm


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(default_model_path()))
    parser.add_argument("--heads", default=str(default_heads_path()))
    parser.add_argument("--tree", help="Medusa tree (default: the heads' config.json)")
    parser.add_argument("--dtype", default=default_dtype(), help="default: %(default)s here")
    args = parser.parse_args()
    if args.tree:
        os.environ["VLLM_MEDUSA_TREE"] = args.tree

    medusa = {"method": "medusa", "model": args.heads, "num_speculative_tokens": 4}
    texts, medusa_rate, llm = run(args.model, medusa, args.dtype)
    stats = spec_decode_stats(llm)
    del llm
    plain_texts, plain_rate, _ = run(args.model, None, args.dtype)

    for prompt, text in zip(PROMPTS, texts, strict=True):
        print(f"\n>>> {prompt}\n{text}")
    print(f"\n--- batch 1, greedy, 128 tokens per prompt, {args.dtype} ---")
    print(f"no speculation: {plain_rate:.1f} tok/s")
    print(f"Medusa:         {medusa_rate:.1f} tok/s ({medusa_rate / plain_rate:.2f}x)")
    print(f"mean acceptance length: {stats.mean_acceptance_length:.2f} tokens per step")
    same = sum(a == b for a, b in zip(texts, plain_texts, strict=True))
    print(f"greedy answers identical to no speculation: {same} of {len(texts)}")


if __name__ == "__main__":
    main()
