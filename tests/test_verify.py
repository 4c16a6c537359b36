"""Tree verification without an engine: the walk's paths, its output layout, KV moves, and the
exact law of sampled verification on a synthetic target, against enumeration.

The law test runs vLLM's own `Sampler` (as the engine does) on a small vocabulary with
temperature, top-p and all three penalties on, over a tree of depth 2 with two children per
node, and compares the distribution of the first two tokens of 100,000 draws with the one
computed from the target alone. The same test must reject two broken verifiers.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from vllm.v1.sample.logits_processor import LogitsProcessors
from vllm.v1.sample.metadata import SamplingMetadata
from vllm.v1.sample.sampler import Sampler

from vllm_medusa.tree import build_tree
from vllm_medusa.typical import (
    TYPICAL_ENV,
    Typical,
    TypicalSettingError,
    engine_typical,
    request_typical,
    typical_nodes,
)
from vllm_medusa.verify import (
    PLACEHOLDER_TOKEN_ID,
    kv_moves,
    level_sampler,
    processed_logprobs,
    stack_logprobs,
    walk_trees,
)

# Given out of order on purpose: nodes are numbered breadth-first, then by path.
SMALL = [[1], [0, 1], [0], [1, 0], [0, 0]]
#          root
#        /      \
#   1:(0)        2:(1)
#   /    \          \
# 3:(0,0) 4:(0,1)  5:(1,0)


def metadata(
    num_reqs: int,
    vocab: int,
    temperature: float = 0.0,
    top_p: float | None = None,
    penalties: tuple[float, float, float] = (1.0, 0.0, 0.0),  # repetition, presence, frequency
    prompt: list[int] | None = None,
    outputs: list[list[int]] | None = None,
    generators: dict[int, torch.Generator] | None = None,
    max_num_logprobs: int | None = None,
) -> SamplingMetadata:
    """vLLM's sampling metadata for `num_reqs` requests with the same settings."""
    repetition, presence, frequency = penalties
    prompt = prompt or []
    return SamplingMetadata(
        temperature=None if temperature == 0 else torch.full((num_reqs,), temperature),
        all_greedy=temperature == 0,
        all_random=temperature > 0,
        top_p=None if top_p is None else torch.full((num_reqs,), top_p),
        top_k=None,
        generators=generators or {},
        max_num_logprobs=max_num_logprobs,
        no_penalties=penalties == (1.0, 0.0, 0.0),
        prompt_token_ids=torch.tensor([prompt] * num_reqs, dtype=torch.long).view(num_reqs, -1),
        frequency_penalties=torch.full((num_reqs,), frequency),
        presence_penalties=torch.full((num_reqs,), presence),
        repetition_penalties=torch.full((num_reqs,), repetition),
        output_token_ids=outputs if outputs is not None else [[] for _ in range(num_reqs)],
        allowed_token_ids_mask=None,
        bad_words_token_ids={},
        logitsprocs=LogitsProcessors(),
    )


def test_greedy_walk_follows_the_targets_best_child_and_stops_at_leaves():
    tree = build_tree(SMALL)
    vocab = 8
    draft = torch.tensor([3, 4, 5, 6, 7])  # tokens of nodes 1..5
    logits = torch.zeros(2 * (tree.num_nodes + 1), vocab)
    # Request 0: at the root token 4 (node 2); at node 2 token 7 (node 5); at node 5 token 1.
    logits[0, 4], logits[0, 3] = 5.0, 1.0
    logits[2, 7] = 3.0
    logits[5, 1] = 2.0
    # Request 1: only 3 drafts scheduled (nodes 1-3). The root prefers node 1; at node 1 the
    # target's best is 6, node 4's token, but node 4 was not scheduled: 6 is emitted.
    logits[6, 3] = 2.0
    logits[7, 6] = 9.0
    rows = torch.cat([logits[:6], logits[6:10]])
    sample = level_sampler(Sampler(), metadata(2, vocab))
    walk = walk_trees(sample, tree, rows, [5, 3], torch.cat([draft, draft[:3]]))
    assert walk.nodes == [[2, 5], [1]]
    assert walk.tokens == [[4, 7, 1], [3, 6]]
    assert walk.last_nodes == [5, 1]
    assert walk.sampled_token_ids(6).tolist() == [[4, 7, 1, -1, -1, -1], [3, 6, -1, -1, -1, -1]]
    # A cap stops the walk early; the token drawn where it stops is still emitted.
    capped = walk_trees(sample, tree, rows, [5, 3], torch.cat([draft, draft[:3]]), [1, 0])
    assert capped.tokens == [[4, 7], [3]] and capped.nodes == [[2], []]
    # No drafts: one draw from the root row.
    alone = walk_trees(sample, tree, logits[:1], [0], draft[:0])
    assert alone.tokens == [[4]] and alone.nodes == [[]]
    # A skipped request emits nothing here (it is walked elsewhere).
    skipped = walk_trees(sample, tree, rows, [5, 3], torch.cat([draft, draft[:3]]), skip={0})
    assert skipped.tokens == [[], [3, 6]] and skipped.nodes == [[], [1]]


def test_logprobs_are_laid_out_per_emitted_token():
    tree = build_tree(SMALL)
    draft = torch.tensor([3, 4, 5, 6, 7])
    logits = torch.randn(6, 8)
    logits[0, 4] = logits[2, 7] = 20.0  # accept nodes 2 and 5
    sample = level_sampler(Sampler(), metadata(1, 8, max_num_logprobs=2))
    walk = walk_trees(sample, tree, logits, [5], draft)
    assert walk.nodes == [[2, 5]]
    stacked = stack_logprobs(walk.level_logprobs, 6)
    assert stacked.logprob_token_ids.shape == (6, 3)
    # Row t: the emitted token, then the top 2 of the row it was drawn from.
    expected_rows = [0, 2, 5]
    for t, row in enumerate(expected_rows):
        logprobs = logits[row].log_softmax(-1)
        assert stacked.logprob_token_ids[t, 0] == walk.tokens[0][t]
        assert stacked.logprobs[t, 0] == pytest.approx(logprobs[walk.tokens[0][t]].item())
        assert stacked.logprob_token_ids[t, 1] == logprobs.argmax()
    assert stacked.logprob_token_ids[3:].eq(0).all()


def test_kv_moves():
    slot_mapping = torch.arange(100, 120)
    # Request 0's root is token 0: node 2 moves to position 1, node 5 to position 2.
    # Request 1's root is token 6: nodes 1 and 3 -> positions 1 and 2 (node 1 stays).
    src, dst = kv_moves([[2, 5], [1, 3]], [0, 6], slot_mapping)
    assert src.tolist() == [102, 105, 109]
    assert dst.tolist() == [101, 102, 108]


# --- The exact law of sampled verification ---------------------------------------------------

VOCAB = 6
PROMPT = [0, 5]
TEMPERATURE, TOP_P = 0.8, 0.9
PENALTIES = (1.3, 0.4, 0.3)  # repetition, presence, frequency
# Depth 2, two children at every inner node.
WIDE = [[0], [1], [0, 0], [0, 1], [1, 0], [1, 1]]
DRAWS = 100_000


@dataclass(frozen=True)
class Toy:
    """A target and a drafter on a 6-token vocabulary; both depend on the last token."""

    target: torch.Tensor  # [VOCAB + 1, VOCAB] logits after each last token (row VOCAB: none)
    drafter: torch.Tensor  # [VOCAB + 1, VOCAB] the drafter's scores, ranked for the nodes

    def logits(self, prefix: tuple[int, ...]) -> torch.Tensor:
        return self.target[prefix[-1] if prefix else VOCAB]

    def drafts(self, tree, prefix: tuple[int, ...]) -> list[int]:
        """Each node's token: rank r of the drafter's scores after the node's parent path."""
        tokens: list[int] = []
        for node, path in enumerate(tree.paths, start=1):
            parent = prefix + path_tokens(tree, tokens, int(tree.parents[node]))
            ranked = self.drafter[parent[-1] if parent else VOCAB].argsort(descending=True)
            tokens.append(int(ranked[path[-1]]))
        return tokens

    def rows(self, tree, prefix: tuple[int, ...], tokens: list[int]) -> list[torch.Tensor]:
        """The target's logits at the root and after each node."""
        nodes = range(tree.num_nodes + 1)
        return [self.logits(prefix + path_tokens(tree, tokens, node)) for node in nodes]


def path_tokens(tree, tokens: list[int], node: int) -> tuple[int, ...]:
    """The tokens from the root's child down to `node` (nothing for the root)."""
    return tuple(tokens[a - 1] for a in tree.ancestry(node))


def toy() -> Toy:
    g = torch.Generator().manual_seed(7)
    return Toy(
        target=torch.randn(VOCAB + 1, VOCAB, generator=g) * 1.5,
        drafter=torch.randn(VOCAB + 1, VOCAB, generator=g),
    )


def reference_probs(logits: torch.Tensor, output: list[int]) -> torch.Tensor:
    """The target's distribution after `output`, written out from vLLM's documented rules:
    repetition penalty over prompt and output, frequency and presence over the output, then
    temperature, then top-p (the smallest set of top tokens whose mass reaches p)."""
    repetition, presence, frequency = PENALTIES
    x = logits.clone().double()
    for t in set(PROMPT) | set(output):
        x[t] = x[t] / repetition if x[t] > 0 else x[t] * repetition
    for t, count in Counter(output).items():
        x[t] -= frequency * count + presence
    p = (x / TEMPERATURE).softmax(-1)
    ascending = p.argsort()
    below = p[ascending].cumsum(0) <= 1 - TOP_P  # tokens left out by top-p
    below[-1] = False
    p[ascending[below]] = 0
    return p / p.sum()


def expected_pairs(model: Toy) -> dict[tuple[int, int], float]:
    first = reference_probs(model.logits(()), [])
    pairs = {}
    for a in range(VOCAB):
        second = reference_probs(model.logits((a,)), [a])
        for b in range(VOCAB):
            pairs[(a, b)] = float(first[a] * second[b])
    return pairs


def verify_step(model: Toy, tree, prefixes: list[tuple[int, ...]], sample_factory) -> list:
    """One verification step for each request (its output so far in `prefixes`)."""
    drafts_of = {p: model.drafts(tree, p) for p in set(prefixes)}
    rows_of = {p: torch.stack(model.rows(tree, p, d)) for p, d in drafts_of.items()}
    drafts = [t for p in prefixes for t in drafts_of[p]]
    meta = metadata(
        len(prefixes),
        VOCAB,
        TEMPERATURE,
        TOP_P,
        PENALTIES,
        PROMPT,
        outputs=[list(p) for p in prefixes],
    )
    walk = walk_trees(
        sample_factory(meta, tree, drafts),
        tree,
        torch.cat([rows_of[p] for p in prefixes]),
        [tree.num_nodes] * len(prefixes),
        torch.tensor(drafts),
    )
    return walk.tokens


def first_two_tokens(model: Toy, step) -> Counter:
    """Run DRAWS requests through `step(model, tree, prefixes)` until each has emitted two
    tokens; count the pairs."""
    tree = build_tree(WIDE)
    prefixes = [()] * DRAWS
    out = step(model, tree, prefixes)
    short = [i for i, tokens in enumerate(out) if len(tokens) < 2]
    if not short:
        return Counter(tuple(tokens[:2]) for tokens in out)
    more = step(model, tree, [tuple(out[i]) for i in short])
    for i, tokens in zip(short, more, strict=True):
        out[i] = out[i] + tokens
    return Counter(tuple(tokens[:2]) for tokens in out)


def chi_square(observed: Counter, expected: dict[tuple[int, int], float]) -> tuple[float, float]:
    """(statistic, critical value at significance 1e-3), cells with fewer than 5 expected
    draws pooled; the critical value by the Wilson-Hilferty approximation. A pair the target
    cannot produce makes the statistic infinite."""
    if any(observed[k] for k, p in expected.items() if p == 0):
        return math.inf, 0.0
    cells = sorted((p * DRAWS, observed[k]) for k, p in expected.items() if p > 0)
    pooled_e = pooled_o = 0.0
    stat, df = 0.0, -1
    for e, o in cells:
        if e < 5:
            pooled_e, pooled_o = pooled_e + e, pooled_o + o
            continue
        stat, df = stat + (o - e) ** 2 / e, df + 1
    if pooled_e:
        stat, df = stat + (pooled_o - pooled_e) ** 2 / pooled_e, df + 1
    z = 3.0902  # the standard normal's 1 - 1e-3 quantile
    critical = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat, critical


def exact_sampler(meta, tree, drafts):
    return level_sampler(Sampler(), meta)


def first_child_sampler(meta, tree, drafts):
    """Broken on purpose: accepts the first child of every inner node without a draw."""
    exact = level_sampler(Sampler(), meta)
    per_req = tree.num_nodes

    def sample(logits, paths, active):
        drawn, logprobs = exact(logits, paths, active)
        for r, path in enumerate(paths):
            if len(path) < tree.depth:
                node = tree.children[0][0] if not path else tree.children[1][0]
                drawn[r] = drafts[r * per_req + node - 1]
        return drawn, logprobs

    return sample


def test_processed_logprobs_are_the_samplers_law():
    """The distribution typical acceptance reads is the one the exact test checks against."""
    model = toy()
    prefixes = [(), (3,), (3, 1)]
    meta = metadata(3, VOCAB, TEMPERATURE, TOP_P, PENALTIES, PROMPT, outputs=[[], [3], [3]])
    logits = torch.stack([model.logits(p) for p in prefixes])
    # Request 2 has emitted 3 and is walking a path that has accepted 1.
    got = processed_logprobs(Sampler(), meta)(logits, [[], [], [1]]).exp()
    for row, prefix in enumerate(prefixes):
        torch.testing.assert_close(got[row].double(), reference_probs(logits[row], list(prefix)))


def typical_step(model: Toy, tree, prefixes: list[tuple[int, ...]]) -> list[list[int]]:
    """Typical acceptance at its defaults, on the target's law (not exact, on purpose)."""
    accepted, last = {}, {}  # per prefix: the accepted tokens, the distribution after them
    for prefix in set(prefixes):
        tokens = model.drafts(tree, prefix)
        logprobs = torch.stack(
            [
                reference_probs(row, list(prefix + path_tokens(tree, tokens, node))).log()
                for node, row in enumerate(model.rows(tree, prefix, tokens))
            ]
        ).float()
        nodes = typical_nodes(tree, logprobs.__getitem__, tokens, Typical())
        accepted[prefix] = [tokens[n - 1] for n in nodes]
        last[prefix] = logprobs[nodes[-1] if nodes else 0].exp()
    return [accepted[p] + [int(torch.multinomial(last[p], 1))] for p in prefixes]


STEPS = {
    "exact": lambda model, tree, prefixes: verify_step(model, tree, prefixes, exact_sampler),
    "first_child": lambda model, tree, prefixes: verify_step(
        model, tree, prefixes, first_child_sampler
    ),
    "typical": typical_step,
}


@pytest.mark.parametrize(
    ("step", "exact"), [("exact", True), ("first_child", False), ("typical", False)]
)
def test_law_of_sampled_verification(step: str, exact: bool):
    """Exact verification passes the chi-square test at significance 1e-3; the two broken
    verifiers (always accept the first child; typical acceptance) must fail it."""
    torch.manual_seed(0)
    model = toy()
    stat, critical = chi_square(first_two_tokens(model, STEPS[step]), expected_pairs(model))
    print(f"{step}: chi-square {stat:.1f}, critical value {critical:.1f}")
    assert (stat < critical) == exact, (stat, critical)


def test_typical_acceptance_takes_the_longest_typical_path():
    tree = build_tree(SMALL)
    tokens = [3, 4, 5, 6, 7]  # nodes 1..5
    probs = torch.full((6, 8), 0.01)
    probs[0, 3], probs[0, 4] = 0.5, 0.3  # root: nodes 1 and 2 both typical
    probs[2, 7] = 0.6  # under node 2: node 5 typical; under node 1 nothing is
    logprobs = (probs / probs.sum(-1, keepdim=True)).log()
    asked: list[int] = []

    def logprobs_at(node: int) -> torch.Tensor:
        asked.append(node)
        return logprobs[node]

    # Node 1 is likelier, but node 2's branch goes deeper; the distribution is read only at
    # the root and the accepted nodes 1 and 2 (node 5 is a leaf).
    assert typical_nodes(tree, logprobs_at, tokens, Typical()) == [2, 5]
    assert sorted(set(asked)) == [0, 1, 2]
    # A strict threshold accepts nothing.
    assert typical_nodes(tree, logprobs.__getitem__, tokens, Typical(0.9, 3.0)) == []
    # Two paths as deep: the likelier wins.
    probs[1, 5] = 0.7
    logprobs = (probs / probs.sum(-1, keepdim=True)).log()
    assert typical_nodes(tree, logprobs.__getitem__, tokens, Typical()) == [1, 3]


def test_typical_settings():
    assert engine_typical({}) is None and engine_typical({TYPICAL_ENV: "0"}) is None
    assert engine_typical({TYPICAL_ENV: "1"}) == Typical(0.09, 0.3)
    assert engine_typical({TYPICAL_ENV: "0.2,0.5"}) == Typical(0.2, 0.5)
    with pytest.raises(TypicalSettingError, match="write 1"):
        engine_typical({TYPICAL_ENV: "yes"})
    with pytest.raises(TypicalSettingError, match="epsilon <= 1"):
        engine_typical({TYPICAL_ENV: "2,0.3"})
    engine = Typical()
    assert request_typical(None, engine) == engine
    assert request_typical({"medusa_typical": 0}, engine) is None
    custom = request_typical({"medusa_typical": 1, "medusa_typical_epsilon": 0.2}, None)
    assert custom == Typical(0.2, 0.3)


def test_seeded_requests_draw_the_same_whatever_the_batch():
    """A seeded request's walk consumes its own generator only while it walks."""
    tree = build_tree(WIDE)
    model = toy()
    tokens = model.drafts(tree, ())

    def run(num_reqs: int) -> list[int]:
        generators = {0: torch.Generator().manual_seed(42)}
        rows = model.rows(tree, (), tokens) * num_reqs
        meta = metadata(num_reqs, VOCAB, 1.0, generators=generators)
        emitted = []
        for _ in range(30):
            walk = walk_trees(
                level_sampler(Sampler(), meta),
                tree,
                torch.stack(rows),
                [tree.num_nodes] * num_reqs,
                torch.tensor(tokens * num_reqs),
            )
            emitted += walk.tokens[0]
        return emitted

    alone = run(1)
    assert run(1) == alone
    assert run(16) == alone
    assert PLACEHOLDER_TOKEN_ID not in alone
