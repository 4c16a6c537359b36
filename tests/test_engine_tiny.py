"""Medusa through the real vLLM engine on a tiny model: greedy output must not change, and
heads that are right part of the time must be accepted part of the time.

The heads are trained here, on the tiny model's own greedy answers (self-distillation), in
both layouts FasterDecoding publishes; one is handed to vLLM unconverted, the other after
conversion.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from vllm import LLM, SamplingParams
from vllm_medusa.converters import convert_checkpoint
from vllm_medusa.converters.hffolder import BaseModel

from vllm_medusa.distill import compute_hidden_states, generate_answers, load_prompts
from vllm_medusa.engine import engine_kwargs, medusa_config, shutdown
from vllm_medusa.metrics import spec_decode_stats
from vllm_medusa.train import TrainConfig, train_heads, write_fasterdecoding
from vllm_medusa.tree import TREE_ENV

MAX_TOKENS = 48
TINY_ENGINE = {"max_num_seqs": 16, "kv_cache_memory_bytes": 256 << 20}


def chat_token_ids(llm: LLM, prompts: list[str]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


@dataclass
class TinyRun:
    model: Path
    prompts: list[str]
    reference_batch: list[list[int]]  # all prompts in one batch
    reference_single: list[list[int]]  # the first prompts one at a time
    heads_v2: Path  # FasterDecoding "version 2": shared lm_head, unconverted
    heads_v1_converted: Path  # own lm_heads, 2 layers, converted to the vLLM layout


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir: Path, tmp_path_factory) -> TinyRun:
    out = tmp_path_factory.mktemp("tiny-heads")
    held = load_prompts(split="heldout")[:8]
    eval_prompts = [p.turns[0] for p in held]

    llm = LLM(model=str(tiny_model_dir), **engine_kwargs(**TINY_ENGINE))
    # A random model's text does not generalise across prompts, so the heads learn the very
    # answers they are tested on (plus others): right part of the time, by construction.
    train_prompts = load_prompts(split="train")[:24] + held
    sequences = generate_answers(llm, train_prompts, max_tokens=MAX_TOKENS)
    reference_batch = chat_token_ids(llm, eval_prompts)
    reference_single = [chat_token_ids(llm, [p])[0] for p in eval_prompts[:2]]
    shutdown(llm)

    data = compute_hidden_states(tiny_model_dir, sequences, max_heads=4)
    base = BaseModel.open(tiny_model_dir)
    lm_head = base.lm_head()
    # Two layers: a random model's next-but-one token is a harder function of its hidden
    # state than a trained model's.
    common = dict(num_heads=4, num_layers=2, max_steps=300, batch_size=128, lr=1e-2)
    shared = train_heads(data, lm_head, TrainConfig(**common))
    heads_v2 = out / "fd-v2"
    write_fasterdecoding(shared, heads_v2, str(tiny_model_dir), base.hidden_size, base.vocab_size)
    own = train_heads(data, lm_head, TrainConfig(own_lm_head=True, **common))
    heads_v1 = out / "fd-v1"
    write_fasterdecoding(own, heads_v1, str(tiny_model_dir), base.hidden_size, base.vocab_size)
    converted = out / "vllm-v1"
    convert_checkpoint(heads_v1, converted, base_model=tiny_model_dir)
    return TinyRun(
        tiny_model_dir, eval_prompts, reference_batch, reference_single, heads_v2, converted
    )


@pytest.mark.parametrize(
    ("heads_attr", "k"),
    # k=2 uses only the first 2 of the 4 heads.
    [("heads_v2", 4), ("heads_v1_converted", 4), ("heads_v2", 2)],
)
def test_medusa_greedy_output_matches_no_speculation(tiny_run: TinyRun, heads_attr: str, k: int):
    heads = getattr(tiny_run, heads_attr)
    llm = LLM(
        model=str(tiny_run.model),
        speculative_config=medusa_config(heads, num_speculative_tokens=k),
        **engine_kwargs(**TINY_ENGINE),
    )
    try:
        batch = chat_token_ids(llm, tiny_run.prompts)
        single = [chat_token_ids(llm, [p])[0] for p in tiny_run.prompts[:2]]
        stats = spec_decode_stats(llm)
    finally:
        shutdown(llm)
    assert batch == tiny_run.reference_batch
    assert single == tiny_run.reference_single
    # Heads trained on this model's own answers must be accepted well above chance; an
    # unmapped or mis-sized checkpoint gives ~0 accepted tokens.
    assert stats.num_drafts > 0
    assert stats.mean_acceptance_length > 1.5, stats.as_dict()
    assert stats.accepted_per_position[0] > 0


def test_heads_for_another_model_fail_at_startup(tiny_run: TinyRun, smollm2_dir: Path):
    with pytest.raises(ValueError, match="hidden size 128 but the target model has 576"):
        LLM(
            model=str(smollm2_dir),
            speculative_config=medusa_config(tiny_run.heads_v2, num_speculative_tokens=4),
            **engine_kwargs(),
        )


def test_more_speculative_tokens_than_heads_fail_at_startup(tiny_run: TinyRun):
    with pytest.raises(ValueError, match="has only 4 Medusa heads"):
        LLM(
            model=str(tiny_run.model),
            speculative_config=medusa_config(tiny_run.heads_v2, num_speculative_tokens=5),
            **engine_kwargs(**TINY_ENGINE),
        )


@pytest.fixture
def tree_setting(monkeypatch):
    """Set the process's Medusa tree (read where LLM(...) parses its settings)."""

    def use(tree: str) -> None:
        monkeypatch.setenv(TREE_ENV, tree)

    return use


def test_named_tree_greedy_output_matches_no_speculation(tiny_run: TinyRun, tree_setting):
    tree_setting("mc_sim_7b_63")
    llm = LLM(
        model=str(tiny_run.model),
        speculative_config=medusa_config(tiny_run.heads_v2, num_speculative_tokens=4),
        **engine_kwargs(**TINY_ENGINE),
    )
    try:
        batch = chat_token_ids(llm, tiny_run.prompts)
        single = [chat_token_ids(llm, [p])[0] for p in tiny_run.prompts[:2]]
        stats = spec_decode_stats(llm)
        spec_config = llm.llm_engine.vllm_config.speculative_config
    finally:
        shutdown(llm)
    assert batch == tiny_run.reference_batch
    assert single == tiny_run.reference_single
    assert spec_config.num_speculative_tokens == 63  # one draft per tree node
    assert stats.mean_acceptance_length > 1.5, stats.as_dict()
    # Accepted per depth: only the tree's 4 depths can ever accept.
    assert stats.accepted_per_position[0] > 0
    assert sum(stats.accepted_per_position[4:]) == 0


@pytest.mark.parametrize("tree", ["mc_sim_7b_63", "chain:4"])
def test_batch_size_schedule_sets_drafts_per_step(tiny_run: TinyRun, tree_setting, tree):
    """vLLM's `num_speculative_tokens_per_batch_size`: no drafts while one request runs, the
    first 2 nodes (a tree's breadth-first prefix, a chain's first heads) for more; output
    unchanged either way."""
    tree_setting(tree)
    spec = medusa_config(tiny_run.heads_v2, num_speculative_tokens=4)
    spec["num_speculative_tokens_per_batch_size"] = [[1, 1, 0], [2, 16, 2]]
    llm = LLM(model=str(tiny_run.model), speculative_config=spec, **engine_kwargs(**TINY_ENGINE))
    try:
        single = [chat_token_ids(llm, [p])[0] for p in tiny_run.prompts[:2]]
        alone = spec_decode_stats(llm)
        batch = chat_token_ids(llm, tiny_run.prompts)
        together = spec_decode_stats(llm).minus(alone)
    finally:
        shutdown(llm)
    assert single == tiny_run.reference_single
    assert batch == tiny_run.reference_batch
    assert alone.num_drafts == 0
    assert together.num_drafts > 0
    assert together.num_draft_tokens == 2 * together.num_drafts, together.as_dict()
    assert together.num_accepted_tokens > 0


@pytest.mark.parametrize(
    ("tree", "words"),
    [
        ("chain:5", "needs 5 heads but"),
        ("[[0], [0, 0, 1]]", "has no parent [0, 0]"),
        ("[[0], [12]]", "ranks must be 0..9"),
        ("no_such_tree", "unknown Medusa tree 'no_such_tree'"),
    ],
)
def test_bad_tree_fails_at_startup(tiny_run: TinyRun, tree_setting, tree, words):
    tree_setting(tree)
    with pytest.raises(ValueError, match=words.replace("[", r"\[")):
        LLM(
            model=str(tiny_run.model),
            speculative_config=medusa_config(tiny_run.heads_v2, num_speculative_tokens=4),
            **engine_kwargs(**TINY_ENGINE),
        )
