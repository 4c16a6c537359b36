"""Medusa scaled out on one machine, both ways vLLM offers on CPU: tensor parallelism over
vLLM's multiprocessing executor, and data-parallel replicas as Ray actors. Greedy output must
equal a single engine's without speculation.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fasterdecoding_fixtures import heads_config, make_heads, save_heads_folder
from vllm import LLM, SamplingParams

from vllm_medusa.distill import load_prompts
from vllm_medusa.engine import engine_kwargs, medusa_config, shutdown
from vllm_medusa.heads import default_heads_path
from vllm_medusa.metrics import spec_decode_stats
from vllm_medusa.tree import TREE_ENV

MAX_TOKENS = 48
SMALL_ENGINE = {"max_num_seqs": 8, "kv_cache_memory_bytes": 256 << 20}


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return [p.turns[0] for p in load_prompts(split="heldout")[:6]]


def chat_token_ids(llm: LLM, prompts: list[str]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def reference_token_ids(model: Path, prompts: list[str]) -> list[list[int]]:
    """One engine, tensor parallel 1, no speculation."""
    llm = LLM(model=str(model), **engine_kwargs(**SMALL_ENGINE))
    try:
        return chat_token_ids(llm, prompts)
    finally:
        shutdown(llm)


def identity_heads(folder: Path, hidden: int, vocab: int) -> Path:
    """Version-2 heads whose blocks are the identity (zero weights): each guesses that the
    model's next token repeats, which a small random model often does, so drafts are
    accepted some of the time without training."""
    heads = make_heads(hidden=hidden, vocab=vocab, num_heads=4, num_layers=1, own_lm_head=False)
    with torch.no_grad():
        for p in heads.parameters():
            p.zero_()
    return save_heads_folder(folder, heads, heads_config(4, 1, version="2"), fmt="safetensors")


@pytest.fixture
def one_core_per_rank() -> Iterator[None]:
    """vLLM's CPU workers each need their own cores: rank 0 on core 0, rank 1 on core 1."""
    before = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    yield
    if before is None:
        del os.environ["VLLM_CPU_OMP_THREADS_BIND"]
    else:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = before


@pytest.fixture(scope="module")
def tiny_expected(tiny_model_dir: Path, prompts: list[str]) -> tuple[list[str], list[list[int]]]:
    return prompts, reference_token_ids(tiny_model_dir, prompts)


@pytest.mark.parametrize(
    "tree",
    # The chain of 4 heads, and a tree whose attention masks, positions and KV moves run on
    # each rank's share of the attention heads.
    ["chain:4", "[[0],[1],[2],[0,0],[0,1],[1,0],[0,0,0]]"],
    ids=["chain", "tree"],
)
def test_tensor_parallel_2_matches_single_engine_without_speculation(
    tiny_model_dir: Path, tiny_expected, tmp_path: Path, one_core_per_rank, tree, monkeypatch
):
    # SmolLM2's 9 attention heads do not split over 2 ranks; the tiny model's 2 do. The heads
    # share the target's lm_head, which is split by vocabulary across the ranks.
    prompts, expected = tiny_expected
    heads = identity_heads(tmp_path / "heads", hidden=128, vocab=49152)
    monkeypatch.setenv(TREE_ENV, tree)
    llm = LLM(
        model=str(tiny_model_dir),
        speculative_config=medusa_config(heads, num_speculative_tokens=4),
        tensor_parallel_size=2,
        distributed_executor_backend="mp",
        **engine_kwargs(**SMALL_ENGINE),
    )
    try:
        got = chat_token_ids(llm, prompts)
        stats = spec_decode_stats(llm)
    finally:
        shutdown(llm)
    assert got == expected
    assert stats.num_drafts > 0
    # Drafts built from logits gathered across both ranks are accepted; a rank-local vocabulary
    # shard would give wrong token ids and ~0 acceptance.
    assert stats.num_accepted_tokens > 0, stats.as_dict()


def test_ray_replicas_each_match_single_engine_without_speculation(
    smollm2_dir: Path, prompts: list[str]
):
    import ray

    from vllm_medusa.replicas import chat_greedy_spread, init_local_ray, start_replicas

    expected = reference_token_ids(smollm2_dir, prompts)
    init_local_ray(num_cpus=2)
    try:
        # A chain of 4 at every batch size (the shipped heads' calibration drafts only alone):
        # each replica answers its prompts as one batch.
        spec = {
            **medusa_config(default_heads_path(), num_speculative_tokens=4),
            "num_speculative_tokens_per_batch_size": [[1, 1024, 4]],
        }
        replicas = start_replicas(2, str(smollm2_dir), spec, SMALL_ENGINE)
        each = ray.get([rep.chat_greedy.remote(prompts, MAX_TOKENS) for rep in replicas])
        spread = chat_greedy_spread(replicas, prompts, MAX_TOKENS)
        stats = ray.get([rep.spec_decode.remote() for rep in replicas])
        ray.get([rep.shutdown.remote() for rep in replicas])
    finally:
        ray.shutdown()
    assert each == [expected, expected]
    assert spread == expected
    assert all(s["num_drafts"] > 0 and s["num_accepted_tokens"] > 0 for s in stats), stats
