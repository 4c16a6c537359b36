"""Data-parallel Medusa on Ray: N replicas, each a Ray actor holding one vLLM engine with the
shipped Medusa heads; held-out prompts are spread over them and every greedy answer is
checked against one engine without speculation.

    pip install ray==2.60.0
    python examples/ray_replicas.py [--replicas 2] [--num-prompts 8]

Runs on a local, loopback-only Ray (`ray.init(num_cpus=N)`), replica i pinned to core i. On a
Ray cluster, connect with `ray.init(address="auto")` instead and give each actor the devices
its engine needs (`ray.remote(num_gpus=1)` for one GPU per replica).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import ray
from vllm import LLM, SamplingParams

from vllm_medusa.default_model import default_model_path
from vllm_medusa.distill import load_prompts
from vllm_medusa.engine import engine_kwargs, medusa_config, shutdown
from vllm_medusa.heads import default_heads_path
from vllm_medusa.replicas import chat_greedy_spread, init_local_ray, start_replicas

ENGINE = {"max_num_seqs": 8, "kv_cache_memory_bytes": 256 << 20}


def reference(model: Path, prompts: list[str], max_tokens: int) -> list[list[int]]:
    llm = LLM(model=str(model), **engine_kwargs(**ENGINE))
    try:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
        return [list(o.outputs[0].token_ids) for o in outputs]
    finally:
        shutdown(llm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument("--heads", type=Path, default=default_heads_path())
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    prompts = [p.turns[0] for p in load_prompts(split="heldout")[: args.num_prompts]]

    expected = reference(args.model, prompts, args.max_tokens)
    init_local_ray(num_cpus=args.replicas)
    try:
        spec = medusa_config(args.heads, num_speculative_tokens=4)
        replicas = start_replicas(args.replicas, str(args.model), spec, ENGINE)
        ray.get([rep.spec_decode.remote() for rep in replicas])  # engines built: time answers only
        start = time.perf_counter()
        answers = chat_greedy_spread(replicas, prompts, args.max_tokens)
        seconds = time.perf_counter() - start
        stats = ray.get([rep.spec_decode.remote() for rep in replicas])
        ray.get([rep.shutdown.remote() for rep in replicas])
    finally:
        ray.shutdown()
    tokens = sum(len(a) for a in answers)
    same = sum(a == e for a, e in zip(answers, expected, strict=True))
    rate = tokens / seconds
    print(f"{args.replicas} replicas: {tokens} tokens in {seconds:.1f} s ({rate:.1f} tok/s)")
    for i, s in enumerate(stats):
        print(f"replica {i}: mean acceptance length {s['mean_acceptance_length']:.2f}")
    print(f"identical to one engine without speculation: {same}/{len(prompts)}")
    if same != len(prompts):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
