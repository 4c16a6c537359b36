"""Tree decoding through the real vLLM engine: the default model, the shipped heads.

One engine verifies trees, one runs without speculation, one verifies the chain of the same
heads, one gives each request a tree of its own (copy branch, confidence pruning); each runs
every scenario once and the tests compare. The engines share settings that
put the hard cases in play: chunked prefill (a small token budget, long prompts), prefix
caching (every scenario's prompts come back once more), and a KV cache small enough that
batch 16 preempts requests. Sampled requests speculate too: their draws must follow the
model's distribution, seeded ones must repeat whatever the batch and the prefill chunking
(without speculation as well), and greedy requests beside them must stay exact.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from transformers import AutoTokenizer
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from vllm.sampling_params import StructuredOutputsParams

from vllm_medusa.distill import load_prompts
from vllm_medusa.draft_vocab import load_draft_vocab
from vllm_medusa.engine import engine_kwargs, medusa_config, shutdown
from vllm_medusa.heads import default_heads_path
from vllm_medusa.metrics import SpecDecodeStats, spec_decode_stats
from vllm_medusa.tree import tree_setting

TREE = "[[0],[1],[2],[3],[0,0],[0,1],[1,0],[0,0,0],[0,0,1],[0,0,0,0]]"
# Its nodes in the order a step numbers them: depth-first, the deepest branch first.
TREE_DEPTH_FIRST = [[0], [0, 0], [0, 0, 0], [0, 0, 0, 0], [0, 0, 1], [0, 1], [1], [1, 0], [2], [3]]
MAX_MODEL_LEN = 1024
ENGINE = engine_kwargs(
    max_model_len=MAX_MODEL_LEN,
    max_num_seqs=16,
    max_num_batched_tokens=384,  # prompts longer than this are prefilled in chunks
    # About 1,250 tokens of SmolLM2 in blocks of 32 for requests (and the 15 blocks that tree
    # verification keeps): batch 16 is admitted whole, then outgrows the cache and preempts.
    kv_cache_memory_bytes=77 << 20,
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
    long_chat = [{"role": "user", "content": "Summarise: " + long_text}]
    filler = tokenizer(" ".join(HELDOUT) * 2)["input_ids"]
    return {
        "batch16": Scenario(chat, GREEDY),
        "batch4": Scenario(chat[:4], GREEDY),
        "batch1": Scenario(chat[4:6], GREEDY, one_at_a_time=True),
        "short_and_long": Scenario([chat[6], long_chat, chat[7]], GREEDY),
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
        "sampled_top_p": Scenario(
            [chat[1]] * NUM_SAMPLES, SamplingParams(temperature=0.7, top_p=0.9, max_tokens=4)
        ),
        # Greedy, sampled (penalties, logit bias, min_tokens, min_p) and grammar-constrained
        # requests in one batch, with logprobs and prompt logprobs on the greedy one.
        "mixed": Scenario(
            chat[:4],
            [
                SamplingParams(temperature=0.0, max_tokens=40, logprobs=3, prompt_logprobs=2),
                SamplingParams(
                    temperature=0.8,
                    max_tokens=40,
                    repetition_penalty=1.2,
                    presence_penalty=0.3,
                    frequency_penalty=0.2,
                    logit_bias={13: -2.0},
                    min_tokens=10,
                    min_p=0.05,
                ),
                STRUCTURED,
                GREEDY,
            ],
        ),
        # A seeded request whose long prompt is prefilled in chunks, beside other requests;
        # then the same request alone, and n > 1 with a seed.
        "seeded": Scenario(
            [long_chat, chat[2], chat[3]],
            [SEEDED, SamplingParams(temperature=1.0, max_tokens=24, seed=5), GREEDY],
        ),
        "seeded_alone": Scenario([long_chat], SEEDED),
        "seeded_n3": Scenario(
            [chat[5]], SamplingParams(n=3, temperature=0.8, max_tokens=24, seed=9)
        ),
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
SEEDED = SamplingParams(temperature=1.0, max_tokens=32, seed=1234)
SAMPLED_ONLY = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=32)
# Per-request trees: the static tree's confident nodes and a copy branch.
PRUNE_BELOW = 0.05
VOCAB_SIZE = 49152  # SmolLM2's
PER_REQUEST = json.dumps({"copy": True, "min_match": 1, "prune_below": PRUNE_BELOW})
# The heads alone, whatever their config turns on.
HEADS_ALONE = {"VLLM_MEDUSA_DRAFTING": json.dumps({"copy": False, "prune_below": 0})}


@dataclass
class Run:
    outputs: dict[str, list[tuple[list[int], str, str | None]]]
    stats: SpecDecodeStats
    preemptions: float
    prefix_cache_hits: float
    structured_drafts: float  # drafts verified for grammar-constrained requests
    sampled_stats: SpecDecodeStats  # counters moved by sampled requests alone
    choices: dict[str, list[list[list[int]]]]  # every choice's tokens, per request (n > 1)
    logprobs: dict[str, list]  # per request: (sample logprobs, prompt logprobs)
    repeat_stats: SpecDecodeStats  # counters moved by prompts that ask for a repeat
    final_stats: SpecDecodeStats  # the counters when the engine stopped


def run(llm: LLM, cases: dict[str, Scenario], results: dict[str, list] | None = None):
    """First choice (tokens, text, finish reason) per request and scenario; every request's
    whole output in `results` if given."""
    outputs = {}
    for name, case in cases.items():
        generate = llm.generate if isinstance(case.prompts[0], dict) else llm.chat
        batches = [[p] for p in case.prompts] if case.one_at_a_time else [case.prompts]
        done = [o for batch in batches for o in generate(batch, case.params, use_tqdm=False)]
        outputs[name] = [
            (list(o.outputs[0].token_ids), o.outputs[0].text, o.outputs[0].finish_reason)
            for o in done
        ]
        if results is not None:
            results[name] = done
    return outputs


def logprob_values(logprobs) -> list[dict[int, float]] | None:
    if logprobs is None:
        return None
    return [
        {token: lp.logprob for token, lp in position.items()} if position else None
        for position in logprobs
    ]


def counter(llm: LLM, name: str) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == name)


def run_engine(
    model: Path, tree: str | None, speculate: bool = True, env: dict[str, str] | None = None
) -> Run:
    spec = medusa_config(default_heads_path(), num_speculative_tokens=4) if speculate else None
    with tree_setting(tree), pytest.MonkeyPatch.context() as patch:
        for name, value in {**HEADS_ALONE, **(env or {})}.items():
            patch.setenv(name, value)
        llm = LLM(model=str(model), speculative_config=spec, **ENGINE)
    try:
        cases = scenarios(model)
        results: dict[str, list] = {}
        outputs = run(llm, cases, results)
        # The same prompts again: now served from the prefix cache.
        again = {k: cases[k] for k in ("batch4", "short_and_long", "seeded", "seeded_n3")}
        repeated_results: dict[str, list] = {}
        repeated = run(llm, again, repeated_results)
        outputs.update({f"{k}_cached": v for k, v in repeated.items()})
        results.update({f"{k}_cached": v for k, v in repeated_results.items()})
        stats = spec_decode_stats(llm)
        # Grammar-constrained requests alone: how many drafts did they get?
        run(llm, {"structured_only": Scenario(cases["structured"].prompts[:2], STRUCTURED)})
        before = spec_decode_stats(llm)
        run(llm, {"sampled_only": Scenario(cases["batch4"].prompts, SAMPLED_ONLY)})
        sampled_stats = spec_decode_stats(llm).minus(before)
        before_repeat = spec_decode_stats(llm)
        outputs.update(run(llm, {"repeat": Scenario(repeat_prompts(), GREEDY, one_at_a_time=True)}))
        return Run(
            outputs,
            stats,
            counter(llm, "vllm:num_preemptions"),
            counter(llm, "vllm:prefix_cache_hits"),
            before.num_drafts - stats.num_drafts,
            sampled_stats,
            {k: [[list(c.token_ids) for c in o.outputs] for o in v] for k, v in results.items()},
            {
                k: [
                    (logprob_values(o.outputs[0].logprobs), logprob_values(o.prompt_logprobs))
                    for o in v
                ]
                for k, v in results.items()
            },
            spec_decode_stats(llm).minus(before_repeat),
            spec_decode_stats(llm),
        )
    finally:
        shutdown(llm)


def repeat_prompts() -> list:
    """Requests whose answers copy their prompts: where the copy branch is accepted."""
    return [
        [{"role": "user", "content": f"Repeat this text exactly, word for word:\n\n{text}"}]
        for text in HELDOUT[40:43]
    ]


@pytest.fixture(scope="module")
def reference(smollm2_dir: Path) -> Run:
    return run_engine(smollm2_dir, None, speculate=False)


@pytest.fixture(scope="module")
def debug_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("debug") / "steps.jsonl"


@pytest.fixture(scope="module")
def tree_run(smollm2_dir: Path, debug_file: Path) -> Run:
    """With the debug output on: it must leave every output as it is."""
    env = {"VLLM_MEDUSA_DEBUG": "1", "VLLM_MEDUSA_DEBUG_FILE": str(debug_file)}
    return run_engine(smollm2_dir, TREE, env=env)


@pytest.fixture(scope="module")
def chain_run(smollm2_dir: Path) -> Run:
    return run_engine(smollm2_dir, "chain:4")


@pytest.fixture(scope="module")
def per_request_debug_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("debug") / "per_request.jsonl"


@pytest.fixture(scope="module")
def per_request_run(smollm2_dir: Path, per_request_debug_file: Path) -> Run:
    """The same tree, each request's own: confident nodes only, plus its copy branch."""
    env = {
        "VLLM_MEDUSA_DRAFTING": PER_REQUEST,
        "VLLM_MEDUSA_DEBUG_FILE": str(per_request_debug_file),
    }
    return run_engine(smollm2_dir, TREE, env=env)


def homogeneity_chi_square(a: list[int], b: list[int], buckets: int = 5) -> float:
    """Two-sample chi-square statistic over b's most common tokens plus one bucket for the
    rest (buckets degrees of freedom)."""
    common = sorted(set(b), key=b.count, reverse=True)[:buckets]

    def counts(sample: list[int]) -> list[int]:
        kept = [sample.count(t) for t in common]
        return [*kept, len(sample) - sum(kept)]

    stat = 0.0
    rows = (counts(a), counts(b))
    total = len(a) + len(b)
    for column in zip(*rows, strict=True):
        for row, sample in zip(column, (a, b), strict=True):
            expected = sum(column) * len(sample) / total
            if expected:
                stat += (row - expected) ** 2 / expected
    return stat


# The chi-square distribution's 1 - 1e-4 quantile at 5 degrees of freedom.
CRITICAL_5_DF = 25.74


@pytest.mark.parametrize("scenario", ["sampled", "sampled_top_p"])
@pytest.mark.parametrize("speculative", ["tree_run", "chain_run", "per_request_run"])
def test_sampled_requests_keep_the_models_distribution(reference, speculative, scenario, request):
    """Draws with Medusa follow the same distribution as draws without speculation: a
    two-sample chi-square test at significance 1e-4 at each of tokens 2-4."""
    drawn = [tokens for tokens, _, _ in request.getfixturevalue(speculative).outputs[scenario]]
    expected = [tokens for tokens, _, _ in reference.outputs[scenario]]
    for position in (1, 2, 3):
        at_tree = [t[position] for t in drawn if len(t) > position]
        at_reference = [t[position] for t in expected if len(t) > position]
        # The model is unsure here (its top token is under 60 %), so a verifier that
        # favoured its drafts would move the counts well past sampling noise.
        top = max(at_reference.count(t) for t in set(at_reference)) / len(at_reference)
        assert top < 0.6, position
        assert homogeneity_chi_square(at_tree, at_reference) < CRITICAL_5_DF, position


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
@pytest.mark.parametrize("speculative", ["tree_run", "per_request_run"])
def test_tree_greedy_output_identical_to_no_speculation(reference, speculative, scenario, request):
    result = request.getfixturevalue(speculative)
    assert result.outputs[scenario] == reference.outputs[scenario]


@pytest.mark.parametrize("engine", ["reference", "tree_run", "chain_run", "per_request_run"])
def test_seeded_requests_repeat_whatever_the_batch_and_chunking(engine, request):
    """The same seed gives the same text on every run, alone or beside other requests, with a
    prompt prefilled in chunks; with and without speculation (the engine must not stop)."""
    result = request.getfixturevalue(engine)
    seeded, again = result.outputs["seeded"], result.outputs["seeded_cached"]
    assert seeded[0] == again[0] == result.outputs["seeded_alone"][0]
    assert seeded[1] == again[1]
    choices = result.choices["seeded_n3"][0]
    assert choices == result.choices["seeded_n3_cached"][0]
    assert len(choices) == 3 and len({tuple(c) for c in choices}) > 1


@pytest.mark.parametrize("speculative", ["tree_run", "chain_run", "per_request_run"])
def test_mixed_batch_keeps_greedy_exact_and_sampled_settings(reference, speculative, request):
    """Greedy (with logprobs), sampled (penalties, logit bias, min_tokens) and grammar requests
    in one batch: the greedy and grammar ones equal no speculation, logprobs included."""
    result = request.getfixturevalue(speculative)
    mixed, expected = result.outputs["mixed"], reference.outputs["mixed"]
    for i in (0, 2, 3):
        assert mixed[i] == expected[i], i
    (sample_lps, prompt_lps), (ref_sample_lps, ref_prompt_lps) = (
        result.logprobs["mixed"][0],
        reference.logprobs["mixed"][0],
    )
    assert len(sample_lps) == len(mixed[0][0]) and len(prompt_lps) == len(ref_prompt_lps)
    for got, want in zip(
        sample_lps + prompt_lps[1:], ref_sample_lps + ref_prompt_lps[1:], strict=True
    ):
        assert got.keys() == want.keys()
        assert [got[t] for t in want] == pytest.approx([want[t] for t in want], abs=1e-3)
    assert len(mixed[1][0]) >= 10  # min_tokens


@pytest.mark.parametrize("speculative", ["tree_run", "chain_run", "per_request_run"])
def test_sampled_requests_accept_drafts(speculative, request):
    stats = request.getfixturevalue(speculative).sampled_stats
    assert stats.num_drafts > 0
    assert stats.num_accepted_tokens > 0.05 * stats.num_drafts, stats.as_dict()


@pytest.mark.parametrize("speculative", ["tree_run", "per_request_run"])
def test_hard_cases_were_exercised(reference, speculative, request):
    tree_run = request.getfixturevalue(speculative)
    assert tree_run.preemptions > 0
    assert tree_run.prefix_cache_hits > 0
    finish = {reason for _, _, reason in tree_run.outputs["stop_strings"]}
    assert "stop" in finish
    assert [len(t) for t, _, _ in tree_run.outputs["max_tokens_2"]] == [2] * 4
    # Each near-limit prompt stops exactly at max_model_len.
    lengths = [len(t) for t, _, _ in tree_run.outputs["near_max_model_len"]]
    assert lengths == [3, 9, 17]


def test_structured_outputs_keep_their_grammar(tree_run, chain_run, per_request_run):
    """Requests with a grammar get no drafts from a tree (its masks would be a chain's),
    so they follow their grammar exactly as without speculation; chains still draft."""
    assert tree_run.structured_drafts == 0
    assert per_request_run.structured_drafts == 0
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


def test_debug_output_accounts_for_every_verified_step(tree_run, debug_file):
    """VLLM_MEDUSA_DEBUG_FILE records each request's drafts and accepted path per step: the
    same steps and accepted tokens vLLM's counters report, drafts with the heads' confidence."""
    records = [json.loads(line) for line in debug_file.read_text().splitlines()]
    stats = tree_run.final_stats
    # Every step vLLM counts is recorded; vLLM also drops the output of a step whose request
    # was preempted or finished meanwhile (rare: batch 16 preempts here), which is recorded.
    for recorded, counted in (
        (len(records), stats.num_drafts),
        (sum(len(r["accepted_nodes"]) for r in records), stats.num_accepted_tokens),
        (sum(len(r["drafted"]) for r in records), stats.num_draft_tokens),
    ):
        assert counted <= recorded <= 1.01 * counted, (recorded, counted)
    with_probs = 0
    for r in records:
        drafted = r["drafted"]
        # The tree's nodes numbered depth-first, as steps draft and verify them.
        assert [d["path"] for d in drafted] == TREE_DEPTH_FIRST[: len(drafted)]
        for j, d in enumerate(drafted, start=1):
            parent = d["parent"]
            assert (drafted[parent - 1]["path"] if parent else []) == d["path"][:-1], j
        for node, token in zip(r["accepted_nodes"], r["accepted_tokens"], strict=True):
            assert r["drafted"][node - 1]["token"] == token
        probs = [d["prob"] for d in r["drafted"] if d["prob"] is not None]
        assert all(0.0 < p <= 1.0 for p in probs)
        with_probs += bool(probs)
    assert with_probs > 0.9 * len(records)


@pytest.fixture(scope="module")
def calibrated_run(smollm2_dir: Path, tmp_path_factory) -> dict:
    """Heads with a calibration beside them, and nothing but the three keys in the config:
    the calibration's tree and its drafts per batch size (none alone, 2 nodes from 2 up)."""
    from dataclasses import asdict

    from transformers import AutoConfig

    from vllm_medusa.calibrate import (
        CALIBRATION_FILE,
        Calibration,
        heads_fingerprint,
        model_identity,
    )
    from vllm_medusa.tree import best_tree

    heads = tmp_path_factory.mktemp("calibrated") / "heads"
    shutil.copytree(default_heads_path(), heads)
    acceptance = [[0.3, 0.1, 0.05], [0.25, 0.1, 0.05]]
    calibration = Calibration(
        heads_fingerprint=heads_fingerprint(heads),
        model=model_identity(AutoConfig.from_pretrained(smollm2_dir)),
        dtype="float32",
        device="cpu",
        machine={},
        acceptance=acceptance,
        tree=[list(p) for p in best_tree(acceptance, 3).paths],
        schedule=[[1, 1, 0], [2, 1024, 2]],
    )
    (heads / CALIBRATION_FILE).write_text(json.dumps(asdict(calibration)))
    spec = {"method": "medusa", "model": str(heads), "num_speculative_tokens": 4}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in HEADS_ALONE.items():
            patch.setenv(name, value)
        llm = LLM(model=str(smollm2_dir), speculative_config=spec, **ENGINE)
    try:
        cases = scenarios(smollm2_dir)
        results = {}
        for name in ("batch1", "batch4", "batch16"):
            before = spec_decode_stats(llm)
            outputs = run(llm, {name: cases[name]})
            results[name] = (outputs[name], spec_decode_stats(llm).minus(before))
        return results
    finally:
        shutdown(llm)


def test_calibration_alone_sets_tree_and_drafts_per_batch_size(reference, calibrated_run):
    alone = calibrated_run["batch1"][1]
    assert alone.num_drafts == 0  # batch size 1: the calibration says no speculation
    for name in ("batch4", "batch16"):
        stats = calibrated_run[name][1]
        assert stats.num_drafts > 0 and stats.num_draft_tokens == 2 * stats.num_drafts, name
    for name, (outputs, _) in calibrated_run.items():
        assert outputs == reference.outputs[name], name


def test_per_request_output_identical_on_repeats(reference, per_request_run):
    assert per_request_run.outputs["repeat"] == reference.outputs["repeat"]


def test_copy_branch_is_accepted_where_the_answer_repeats_the_prompt(tree_run, per_request_run):
    """On answers that copy their prompt, the copy branch lifts acceptance well above what
    the heads alone reach with the same tree."""
    medusa, copying = tree_run.repeat_stats, per_request_run.repeat_stats
    assert medusa.num_drafts > 0 and copying.num_drafts > 0
    assert copying.mean_acceptance_length > 1.3 * medusa.mean_acceptance_length, (
        copying.as_dict(),
        medusa.as_dict(),
    )


def per_request_records(debug_file: Path) -> list[dict]:
    return [json.loads(line) for line in debug_file.read_text().splitlines()]


def test_requests_verify_trees_of_their_own_in_one_step(per_request_run, per_request_debug_file):
    """Steps where requests verified different tree shapes side by side, copy nodes among
    them, and accepted paths through copy nodes."""
    records = per_request_records(per_request_debug_file)
    shapes: dict[int, set] = {}
    for r in records:
        shapes.setdefault(r["step"], set()).add(tuple(d["parent"] for d in r["drafted"]))
    assert sum(len(s) > 1 for s in shapes.values()) > 10
    accepted_copies = 0
    for r in records:
        drafted = r["drafted"]
        # Every node was proposed, by a head or the copy branch, near max_model_len as well
        # (vLLM would verify placeholder drafts there, which no tree of the request's holds).
        assert all(d["path"] is not None or d["copy"] for d in drafted), r
        tokens = {(d["parent"], d["token"]) for d in drafted}
        assert len(tokens) == len(drafted)  # siblings are distinct tokens
        accepted_copies += any(drafted[n - 1]["copy"] for n in r["accepted_nodes"])
    assert accepted_copies > 0.05 * len(records)


def test_heads_draft_only_from_their_draft_vocabulary(per_request_run, per_request_debug_file):
    """The shipped heads' config sets a draft vocabulary: every token a head proposed is
    among its most frequent tokens (the copy branch's own nodes may hold any token)."""
    heads = default_heads_path()
    size = json.loads((heads / "config.json").read_text())["medusa_drafting"]["draft_vocab"]
    vocab = set(load_draft_vocab(heads, size, VOCAB_SIZE).tolist())
    records = per_request_records(per_request_debug_file)
    proposed = [d["token"] for r in records for d in r["drafted"] if d["path"] is not None]
    assert proposed and set(proposed) <= vocab


def test_pruning_drops_the_nodes_below_the_threshold(per_request_run, per_request_debug_file):
    """Every drafted Medusa node's path probability under the heads is at least the threshold;
    pruning dropped nodes, more at some steps than at others, so draft counts vary."""
    records = per_request_records(per_request_debug_file)
    for r in records:
        drafted = r["drafted"]
        path_probability = [1.0] * (len(drafted) + 1)
        for j, d in enumerate(drafted, start=1):
            if d["path"] is None:
                continue
            path_probability[j] = path_probability[d["parent"]] * d["prob"]
            assert path_probability[j] >= PRUNE_BELOW * (1 - 1e-4), r
    pruned = [r["pruned"] for r in records]
    assert sum(p > 0 for p in pruned) > 0.1 * len(records)
    medusa_nodes = [sum(d["path"] is not None for d in r["drafted"]) for r in records]
    assert len(set(medusa_nodes)) >= 3, set(medusa_nodes)
