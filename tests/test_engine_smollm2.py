"""The real default model with the heads shipped for it, through the real vLLM engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from vllm import LLM, SamplingParams
from vllm_medusa.converters import load_checkpoint

from vllm_medusa.distill import (
    compute_hidden_states,
    generate_answers,
    load_prompts,
    recorded_head_data,
    recording_llm,
)
from vllm_medusa.engine import engine_kwargs, medusa_config, shutdown
from vllm_medusa.heads import default_heads_path
from vllm_medusa.metrics import SpecDecodeStats, count_spec_decoding, spec_decode_stats

MAX_TOKENS = 64
# Held-out prompts: never seen by the shipped heads in training.
PROMPTS = [p.turns[0] for p in load_prompts(split="heldout")][:8]


def generate(llm: LLM, batch: int) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    if batch == 1:
        outputs = [llm.chat([c], params, use_tqdm=False)[0] for c in conversations[:3]]
    else:
        outputs = llm.chat(conversations[:batch], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def run_engine(
    model: Path, heads: Path | None
) -> tuple[dict[int, list], SpecDecodeStats, SpecDecodeStats]:
    """Outputs at batch 1 and 8, vLLM's counters, and the engine's own count of the same."""
    spec = None if heads is None else medusa_config(heads, num_speculative_tokens=4)
    llm = LLM(model=str(model), speculative_config=spec, **engine_kwargs(max_num_seqs=8))
    try:
        before = spec_decode_stats(llm)
        counted = count_spec_decoding(llm)
        outputs = {batch: generate(llm, batch) for batch in (1, 8)}
        return outputs, spec_decode_stats(llm).minus(before), counted
    finally:
        shutdown(llm)


@pytest.fixture(scope="module")
def reference(smollm2_dir: Path) -> dict[int, list]:
    return run_engine(smollm2_dir, None)[0]


@pytest.fixture(scope="module")
def medusa_run(smollm2_dir: Path) -> tuple[dict[int, list], SpecDecodeStats, SpecDecodeStats]:
    return run_engine(smollm2_dir, default_heads_path())


def test_shipped_heads_are_in_fasterdecoding_format_and_reuse_the_lm_head():
    heads = load_checkpoint(default_heads_path())
    assert heads.num_heads >= 4
    assert heads.hidden_size == 576
    assert heads.original_lm_head  # a few MB: no copy of the 28M-parameter lm_head


@pytest.mark.parametrize("batch", [1, 8])
def test_greedy_output_identical_to_no_speculation(reference, medusa_run, batch):
    outputs, _, _ = medusa_run
    assert outputs[batch] == reference[batch]


def test_shipped_heads_accepted_on_heldout_prompts(medusa_run):
    _, stats, _ = medusa_run
    assert stats.num_drafts > 0
    # The shipped heads at their defaults (their float32 calibration: 1 node when 1-3
    # requests run, or alone on a CPU with AVX2 only, no drafts in larger batches, plus the
    # copy branch) on prompts they never saw in training. A mis-loaded or mis-sized
    # checkpoint gives ~1.0 and an untrained head ~0 accepted first drafts.
    assert stats.mean_acceptance_length >= 1.2, stats.as_dict()
    assert stats.accepted_per_position[0] >= 0.15 * stats.num_drafts, stats.as_dict()


def test_engine_counts_its_own_speculation_as_vllm_reports_it(medusa_run):
    """`count_spec_decoding` (what calibration reads, one engine among several in a process)
    counts exactly what vLLM's metrics report for a process with one engine."""
    _, stats, counted = medusa_run
    assert counted.num_drafts == stats.num_drafts > 0
    assert counted.num_draft_tokens == stats.num_draft_tokens
    assert counted.num_accepted_tokens == stats.num_accepted_tokens > 0
    width = len(counted.accepted_per_position)
    assert counted.accepted_per_position == stats.accepted_per_position[:width]
    assert not any(stats.accepted_per_position[width:])


def test_recorded_hidden_states_are_what_the_lm_head_sees(smollm2_dir: Path):
    """Training rows recorded inside vLLM during generation: the base lm_head's argmax of
    row i is answer token i, and the rows match a separate Hugging Face pass."""
    from vllm_medusa.converters.hffolder import BaseModel

    prompts = [p for p in load_prompts(split="train") if len(p.turns) > 1][:2]
    prompts += load_prompts(split="train")[:3]
    with recording_llm(str(smollm2_dir), **engine_kwargs(max_num_seqs=8)) as (llm, recorder):
        answers = generate_answers(llm, prompts, max_tokens=24, recorder=recorder)
    assert len(answers) == 7 and not recorder.rows
    lm_head = BaseModel.open(smollm2_dir).lm_head()  # [vocab, hidden]
    for answer in answers:
        tokens = answer.token_ids[answer.answer_start :]
        assert answer.hidden.shape == (len(tokens), 576)
        assert (answer.hidden @ lm_head.T).argmax(-1).tolist() == tokens
    recorded = recorded_head_data(answers)
    reference = compute_hidden_states(smollm2_dir, answers)
    assert torch.equal(recorded.targets, reference.targets)
    # vLLM's float32 products (oneDNN, batched rows) and Hugging Face's (one sequence) add in
    # different orders, so rows agree to rounding, not bitwise: measured up to 2.5e-6 of a
    # row's norm on one CPU and elementwise differences of 3e-3 (rows of norm ~45) on another.
    # A row off by one position differs by a third of its norm or more.
    row_error = (recorded.hidden - reference.hidden).norm(dim=-1)  # [rows]
    assert (row_error <= 1e-3 * reference.hidden.norm(dim=-1)).all(), row_error.max()
