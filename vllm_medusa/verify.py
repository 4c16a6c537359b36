"""Tree verification: walk each request's tree by sampling the target, one level at a time.

The target has scored every node of every request's tree in one forward pass: row j of a
request's logits is the target's prediction after its context, node j's ancestors and node j.
Each request walks its tree from the root. At the current node the target's next token `y` is
drawn exactly as vLLM's sampler draws a token for that request at that position (the same
`Sampler`, with the path walked so far as its speculative tokens: penalties, bad words, allowed
tokens, logit bias, min-p, temperature, top-k and top-p, the request's own generator). If `y` is
the token of one of the node's children, the child is accepted and the walk goes on from it;
otherwise `y` is emitted and the walk stops. At a leaf, the draw is the bonus token. Greedy
requests draw the argmax, so they accept the longest path on which every token is the target's
best and emit the target's token after it.

Why the output is distributed exactly as the target's: every emitted token is a draw from the
target's distribution given everything emitted before it in the request, because the walk
stands at the node whose path is exactly those tokens (the children of a node are distinct
tokens, so at most one child matches `y`) and row j holds the target's prediction after that
path. Whether the walk continues depends only on that draw, never on the drafts' own
probabilities, so each token is drawn from `p(. | prefix)` and nothing else; by induction over
the emitted tokens, the sequence has the law of sampling the target one token at a time. This
is the "sampling without replacement over a node's children" rule in its equivalent form: try
the children in order, accept child c with probability p(c), else renormalise p without c and
try the next, and if all are rejected draw from what is left; the token that comes out is again
a single draw from p.

Where a token's distribution depends on its position in a way the sampler cannot see from the
speculative tokens (min_tokens near its threshold, logits processors the plugin does not know,
thinking budgets), the walk is capped so that it never draws there: those requests verify
fewer drafts, or none.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from vllm_medusa.draft_tree import DraftTree
from vllm_medusa.tree import MedusaTree
from vllm_medusa.tree_attention import KVLayout

# Draws one token per request from its current node's logits row:
# (logits [R, vocab], path tokens walked so far per request, which requests still walk)
# -> (tokens [R], logprobs of the draw per request or None)
LevelSampler = Callable[[torch.Tensor, list[list[int]], list[bool]], tuple[torch.Tensor, Any]]

# What the sampler's output holds where a request emitted nothing (vLLM's placeholder).
PLACEHOLDER_TOKEN_ID = -1


@dataclass
class TreeWalk:
    """The result of one verification step, per request."""

    tokens: list[list[int]]  # emitted tokens: the accepted drafts' tokens, then the drawn one
    nodes: list[list[int]]  # accepted draft nodes (1-based, the step tree's numbering)
    level_logprobs: list[Any]  # per level: the sampler's logprobs of that level's draws

    def sampled_token_ids(self, width: int) -> torch.Tensor:
        """[R, width] int32, padded with vLLM's placeholder, as its rejection sampler returns."""
        out = torch.full((len(self.tokens), width), PLACEHOLDER_TOKEN_ID, dtype=torch.int32)
        for r, tokens in enumerate(self.tokens):
            out[r, : len(tokens)] = torch.tensor(tokens, dtype=torch.int32)
        return out

    @property
    def last_nodes(self) -> list[int]:
        """Per request: the node whose hidden state drafts the next step (0: the root)."""
        return [nodes[-1] if nodes else 0 for nodes in self.nodes]


def request_layout(
    num_drafts: Sequence[int],
    draft_token_ids: torch.Tensor,  # [sum(n_i)]
) -> tuple[np.ndarray, list[list[int]]]:
    """Where each request's rows start in a step's logits ([R]: its root row, then its n_i
    nodes), and each request's draft tokens."""
    row_starts = np.concatenate(([0], np.cumsum(np.asarray(num_drafts, dtype=np.int64) + 1)))
    flat = draft_token_ids.tolist()
    draft_ends = np.cumsum(num_drafts, dtype=np.int64).tolist()
    drafts = [flat[end - n : end] for n, end in zip(num_drafts, draft_ends, strict=True)]
    return row_starts[:-1], drafts


def request_trees(
    tree: MedusaTree | Sequence[DraftTree], num_drafts: Sequence[int]
) -> list[DraftTree]:
    """Each request's tree as scheduled: its first n_i nodes (a static tree: its prefix)."""
    if isinstance(tree, MedusaTree):
        return [tree.draft_tree.prefix(n) for n in num_drafts]
    return [t.prefix(n) for t, n in zip(tree, num_drafts, strict=True)]


def walk_trees(
    sample_level: LevelSampler,
    tree: MedusaTree | Sequence[DraftTree],  # one static tree, or each request's own
    logits: torch.Tensor,  # [sum(n_i + 1), vocab]: each request's root row, then its nodes
    num_drafts: Sequence[int],  # n_i: draft nodes scheduled per request (a prefix of its tree)
    draft_token_ids: torch.Tensor,  # [sum(n_i)] the nodes' tokens
    max_accepted: Sequence[int] | None = None,  # per request: most drafts it may accept
    skip: Container[int] = (),  # requests left out: they draw nothing and emit nothing here
) -> TreeWalk:
    num_reqs = len(num_drafts)
    trees = request_trees(tree, num_drafts)
    row_starts, drafts = request_layout(num_drafts, draft_token_ids)
    caps = list(num_drafts) if max_accepted is None else list(max_accepted)

    node = [0] * num_reqs
    active = [r not in skip for r in range(num_reqs)]
    tokens: list[list[int]] = [[] for _ in range(num_reqs)]
    nodes: list[list[int]] = [[] for _ in range(num_reqs)]
    level_logprobs: list[Any] = []
    while any(active):
        rows = torch.from_numpy(row_starts + np.asarray(node))
        paths = [tokens[r][: len(nodes[r])] for r in range(num_reqs)]  # accepted so far
        drawn, logprobs = sample_level(logits[rows], paths, active)
        level_logprobs.append(logprobs)
        for r, y in enumerate(drawn.tolist()):
            if not active[r]:
                continue
            tokens[r].append(y)
            child = _child_with_token(trees[r], node[r], y, drafts[r])
            if child is None or len(nodes[r]) >= caps[r]:
                active[r] = False
            else:
                node[r] = child
                nodes[r].append(child)
    return TreeWalk(tokens=tokens, nodes=nodes, level_logprobs=level_logprobs)


def _child_with_token(tree: DraftTree, node: int, token: int, drafts: list[int]) -> int | None:
    """The child of `node` whose token is `token` (the request's scheduled drafts are
    `drafts`); a node's children are distinct tokens (ranks of one head, a copy branch merged
    into the node it agrees with)."""
    for child in tree.children[node]:
        if drafts[child - 1] == token:
            return child
    return None


def level_sampler(sampler: Any, sampling_metadata: Any) -> LevelSampler:
    """vLLM's `Sampler` as a `LevelSampler`: each level is sampled as vLLM samples the token
    after a request's speculative tokens (`predict_bonus_token`), with the path walked so far
    as those tokens. A request whose walk has ended is still in the batch (its row is ignored);
    its own generator is put back as it was, so a seeded request draws the same numbers whatever
    else is in the batch."""

    def sample(
        logits: torch.Tensor, paths: list[list[int]], active: list[bool]
    ) -> tuple[torch.Tensor, Any]:
        generators = sampling_metadata.generators
        saved = {i: g.get_state() for i, g in generators.items() if not active[i]}
        output = sampler(
            logits=logits,
            sampling_metadata=replace(sampling_metadata, spec_token_ids=paths),
            predict_bonus_token=True,
        )
        for i, state in saved.items():
            generators[i].set_state(state)
        return output.sampled_token_ids[:, 0], output.logprobs_tensors

    return sample


def processed_logprobs(sampler: Any, sampling_metadata: Any):
    """(logits [R, vocab], path tokens per request) -> [R, vocab] log-probabilities of the
    distribution vLLM's `Sampler` draws from after those paths: its own steps in its own order
    (allowed tokens, bad words, min-tokens, logit bias, penalties; then temperature, min-p,
    top-k and top-p), without the draw."""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

    def compute(logits: torch.Tensor, paths: list[list[int]]) -> torch.Tensor:
        metadata = replace(sampling_metadata, spec_token_ids=paths)
        logits = sampler.apply_logits_processors(
            logits.to(torch.float32, copy=True), metadata, predict_bonus_token=True
        )
        if metadata.temperature is not None:
            logits = sampler.apply_temperature(logits, metadata.temperature, metadata.all_random)
        for processor in metadata.logitsprocs.argmax_invariant:
            logits = processor.apply(logits)
        logits = apply_top_k_top_p(logits, metadata.top_k, metadata.top_p)
        return logits.log_softmax(dim=-1)

    return compute


def stack_logprobs(level_logprobs: list[Any], width: int) -> Any:
    """Per-level logprobs ([R, k] each) as one LogprobsTensors of [R * width, k] rows, row
    r * width + t holding request r's t-th emitted token: the layout vLLM's
    `RejectionSampler.parse_output` filters."""
    from vllm.v1.outputs import LogprobsTensors

    if not level_logprobs or level_logprobs[0] is None:
        return None

    def stacked(name: str) -> torch.Tensor:
        levels = torch.stack([getattr(lp, name) for lp in level_logprobs], dim=1)  # [R, L, ...]
        pad = torch.zeros(
            (levels.shape[0], width - levels.shape[1], *levels.shape[2:]), dtype=levels.dtype
        )
        return torch.cat([levels, pad], dim=1).flatten(0, 1)

    return LogprobsTensors(
        stacked("logprob_token_ids"), stacked("logprobs"), stacked("selected_token_ranks")
    )


def kv_moves(
    accepted: list[list[int]],
    token_starts: list[int],  # per request: its root's index among the step's tokens
    slot_mapping: torch.Tensor,  # [num_tokens] the step's KV slot of each token
) -> tuple[torch.Tensor, torch.Tensor]:
    """(source slots, destination slots): the i-th accepted node's keys and values go where
    the token at position context + i lives, so the next step reads them in order.

    Every node comes after its parent, so the i-th accepted node is at index >= i, growing
    with i: no destination is the source of a later move; the caller copies all sources
    first anyway.
    """
    src: list[int] = []
    dst: list[int] = []
    for nodes, start in zip(accepted, token_starts, strict=True):
        for i, node in enumerate(nodes, start=1):
            if node != i:
                src.append(start + node)
                dst.append(start + i)
    if not src:
        empty = torch.empty(0, dtype=torch.long, device=slot_mapping.device)
        return empty, empty
    index = torch.tensor(src + dst, device=slot_mapping.device)
    slots = slot_mapping[index].long()
    return slots[: len(src)], slots[len(src) :]


def copy_kv_slots(
    caches: list[tuple[torch.Tensor, KVLayout | None]],  # per layer: [blocks, kv_heads, bs, 2h]
    src: torch.Tensor,  # [M] slots
    dst: torch.Tensor,  # [M] slots
) -> None:
    """Move keys and values between slots in every layer's paged cache.

    A layout says where the CPU kernel keeps a token's keys and values inside a block; None
    is vLLM's logical layout, which Triton attention reads as it stands (token t's keys at
    [block, :, t, :head], values at [block, :, t, head:]), whatever the physical strides
    behind the view."""
    for kv, layout in caches:
        num_blocks, num_kv_heads, block_size, two_head = kv.shape
        if layout is None:
            moved = kv[src // block_size, :, src % block_size]  # [M, kv_heads, 2 * head], a copy
            kv[dst // block_size, :, dst % block_size] = moved
            continue
        stretches = kv.view(num_blocks, num_kv_heads, block_size * two_head)
        src_index = layout.slot_index(src % block_size)  # [M, 2 * head]
        dst_index = layout.slot_index(dst % block_size)
        moved = stretches[(src // block_size)[:, None], :, src_index]  # a copy
        stretches[(dst // block_size)[:, None], :, dst_index] = moved
