"""Tree decoding through the real vLLM engine: the default model, the shipped heads.

One engine verifies trees, one runs without speculation, one verifies the chain of the same
heads; each runs every scenario once and the tests compare. The engines share settings that
put the hard cases in play: chunked prefill (a small token budget, long prompts), prefix
caching (every scenario's prompts come back once more), and a KV cache small enough that
batch 16 preempts requests.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from transformers import AutoTokenizer
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from vllm.sampling_params import StructuredOutputsParams

from vllm_medusa.distill import load_prompts
from vllm_medusa.engine import engine_kwargs, medusa_config, shutdown
from vllm_medusa.heads import default_heads_path
from vllm_medusa.metrics import SpecDecodeStats, spec_decode_stats
from vllm_medusa.tree import tree_setting

TREE = "[[0],[1],[2],[3],[0,0],[0,1],[1,0],[0,0,0],[0,0,1],[0,0,0,0]]"
MAX_MODEL_LEN = 1024
ENGINE = engine_kwargs(
    max_model_len=MAX_MODEL_LEN,
    max_num_seqs=16,
    max_num_batched_tokens=384,  # prompts longer than this are prefilled in chunks
    # About 1,200 tokens of SmolLM2 in blocks of 32: batch 16 is admitted whole, then
    # outgrows the cache and preempts.
    kv_cache_memory_bytes=56 << 20,
    block_size=32,
    enable_prefix_caching=True,
)
HELDOUT = [p.turns[0] for p in load_prompts(split="heldout")]
GREEDY = SamplingParams(temperature=0.0, max_tokens=40)
NUM_SAMPLES = 300
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string"}, "steps": {"type": "integer"}},
    "required": ["answer", "steps"],
}
YES_NO = r"(Yes|No), because [a-z ,]{5,80}\."


@dataclass
class Scenario:
    prompts: list  # chat conversations, or TokensPrompt
    params: SamplingParams | list[SamplingParams]  # one for all prompts, or one each
    one_at_a_time: bool = False


def scenarios(model: Path) -> dict[str, Scenario]:
    tokenizer = AutoTokenizer.from_pretrained(model)
    chat = [[{"role": "user", "content": p}] for p in HELDOUT[:16]]
    long_text = " ".join(HELDOUT[16:40])
    filler = tokenizer(" ".join(HELDOUT) * 2)["input_ids"]
    return {
        "batch16": Scenario(chat, GREEDY),
        "batch4": Scenario(chat[:4], GREEDY),
        "batch1": Scenario(chat[4:6], GREEDY, one_at_a_time=True),
        "short_and_long": Scenario(
            [chat[6], [{"role": "user", "content": "Summarise: " + long_text}], chat[7]], GREEDY
        ),
        "stop_strings": Scenario(
            chat[8:12], SamplingParams(temperature=0.0, max_tokens=60, stop=[".", "\n\n"])
        ),
        **{
            f"max_tokens_{n}": Scenario(chat[12:16], SamplingParams(temperature=0.0, max_tokens=n))
            for n in (1, 2, 3)
        },
        # Grammar-constrained requests next to a plain one, in one batch.
        "structured": Scenario(
            chat[:4], [STRUCTURED, structured(regex=YES_NO), GREEDY, STRUCTURED]
        ),
        # Many draws of one prompt: tokens after the first come from tree steps.
        "sampled": Scenario([chat[0]] * NUM_SAMPLES, SamplingParams(temperature=1.0, max_tokens=4)),
        # Ends at max_model_len: the tree must be cut to the room that is left.
        "near_max_model_len": Scenario(
            [TokensPrompt(prompt_token_ids=filler[: MAX_MODEL_LEN - k]) for k in (3, 9, 17)],
            SamplingParams(temperature=0.0, max_tokens=32),
        ),
    }


def structured(**grammar) -> SamplingParams:
    return SamplingParams(
        temperature=0.0, max_tokens=60, structured_outputs=StructuredOutputsParams(**grammar)
    )


STRUCTURED = structured(json=ANSWER_SCHEMA)


@dataclass
class Run:
    outputs: dict[str, list[tuple[list[int], str, str | None]]]
    stats: SpecDecodeStats
    preemptions: float
    prefix_cache_hits: float
    structured_drafts: float  # drafts verified for grammar-constrained requests


def run(llm: LLM, cases: dict[str, Scenario]) -> dict[str, list]:
    outputs = {}
    for name, case in cases.items():
        generate = llm.generate if isinstance(case.prompts[0], dict) else llm.chat
        batches = [[p] for p in case.prompts] if case.one_at_a_time else [case.prompts]
        results = [o for batch in batches for o in generate(batch, case.params, use_tqdm=False)]
        outputs[name] = [
            (list(o.outputs[0].token_ids), o.outputs[0].text, o.outputs[0].finish_reason)
            for o in results
        ]
    return outputs


def counter(llm: LLM, name: str) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == name)


def run_engine(model: Path, tree: str | None, speculate: bool = True) -> Run:
    spec = medusa_config(default_heads_path(), num_speculative_tokens=4) if speculate else None
    with tree_setting(tree):
        llm = LLM(model=str(model), speculative_config=spec, **ENGINE)
    try:
        cases = scenarios(model)
        outputs = run(llm, cases)
        # The same prompts again: now served from the prefix cache.
        repeated = run(llm, {"batch4": cases["batch4"], "short_and_long": cases["short_and_long"]})
        outputs.update({f"{k}_cached": v for k, v in repeated.items()})
        stats = spec_decode_stats(llm)
        # Grammar-constrained requests alone: how many drafts did they get?
        run(llm, {"structured_only": Scenario(cases["structured"].prompts[:2], STRUCTURED)})
        return Run(
            outputs,
            stats,
            counter(llm, "vllm:num_preemptions"),
            counter(llm, "vllm:prefix_cache_hits"),
            spec_decode_stats(llm).num_drafts - stats.num_drafts,
        )
    finally:
        shutdown(llm)


@pytest.fixture(scope="module")
def reference(smollm2_dir: Path) -> Run:
    return run_engine(smollm2_dir, None, speculate=False)


@pytest.fixture(scope="module")
def tree_run(smollm2_dir: Path) -> Run:
    return run_engine(smollm2_dir, TREE)


@pytest.fixture(scope="module")
def chain_run(smollm2_dir: Path) -> Run:
    return run_engine(smollm2_dir, "chain:4")


def bucketed_distance(a: list[int], b: list[int], buckets: int = 5) -> float:
    """Total variation between two samples over b's most common tokens plus one bucket for
    the rest: coarse enough that two samples of 300 from one distribution stay within
    about 0.06 of each other."""
    common = sorted(set(b), key=b.count, reverse=True)[:buckets]

    def shares(sample: list[int]) -> list[float]:
        counts = [sample.count(t) for t in common]
        return [c / len(sample) for c in counts] + [1 - sum(counts) / len(sample)]

    return 0.5 * sum(abs(x - y) for x, y in zip(shares(a), shares(b), strict=True))


@pytest.mark.parametrize("speculative", ["tree_run", "chain_run"])
def test_sampled_requests_keep_the_models_distribution(reference, speculative, request):
    """Draws with Medusa follow the same distribution as draws without speculation."""
    drawn = [tokens for tokens, _, _ in request.getfixturevalue(speculative).outputs["sampled"]]
    expected = [tokens for tokens, _, _ in reference.outputs["sampled"]]
    for position in (1, 2, 3):
        at_tree = [t[position] for t in drawn if len(t) > position]
        at_reference = [t[position] for t in expected if len(t) > position]
        # The model is unsure here (its top token is under 60 %), so a verifier that
        # favoured its drafts would move the counts well past sampling noise.
        top = max(at_reference.count(t) for t in set(at_reference)) / len(at_reference)
        assert top < 0.6, position
        assert bucketed_distance(at_tree, at_reference) < 0.15, position


SCENARIOS = [
    "batch16",
    "batch4",
    "batch1",
    "short_and_long",
    "stop_strings",
    "max_tokens_1",
    "max_tokens_2",
    "max_tokens_3",
    "near_max_model_len",
    "structured",
    "batch4_cached",
    "short_and_long_cached",
]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_tree_greedy_output_identical_to_no_speculation(reference, tree_run, scenario):
    assert tree_run.outputs[scenario] == reference.outputs[scenario]


def test_hard_cases_were_exercised(reference, tree_run):
    assert tree_run.preemptions > 0
    assert tree_run.prefix_cache_hits > 0
    finish = {reason for _, _, reason in tree_run.outputs["stop_strings"]}
    assert "stop" in finish
    assert [len(t) for t, _, _ in tree_run.outputs["max_tokens_2"]] == [2] * 4
    # Each near-limit prompt stops exactly at max_model_len.
    lengths = [len(t) for t, _, _ in tree_run.outputs["near_max_model_len"]]
    assert lengths == [3, 9, 17]


def test_structured_outputs_keep_their_grammar(tree_run, chain_run):
    """Requests with a grammar get no drafts from a tree (its masks would be a chain's),
    so they follow their grammar exactly as without speculation; chains still draft."""
    assert tree_run.structured_drafts == 0
    assert chain_run.structured_drafts > 0
    outputs = tree_run.outputs["structured"]
    _, yes_no, _ = outputs[1]
    assert re.fullmatch(YES_NO, yes_no), yes_no
    for _, text, reason in (outputs[0], outputs[3]):
        if reason == "stop":
            assert set(json.loads(text)) >= {"answer", "steps"}, text
        else:  # cut by max_tokens: a start the grammar allows
            assert text.lstrip().startswith("{"), text


def test_tree_accepts_more_than_the_chain_of_the_same_heads(tree_run, chain_run):
    tree, chain = tree_run.stats, chain_run.stats
    assert tree.num_drafts > 0 and chain.num_drafts > 0
    assert tree.mean_acceptance_length > chain.mean_acceptance_length, (
        tree.as_dict(),
        chain.as_dict(),
    )


def test_chain_output_identical_too(reference, chain_run):
    for scenario in SCENARIOS:
        assert chain_run.outputs[scenario] == reference.outputs[scenario], scenario
