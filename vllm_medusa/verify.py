"""Tree verification: pick each request's path through its tree, then verify it as a chain.

The target has scored every node of every request's tree in one forward pass: row j of a
request's logits is the target's distribution after its context, node j's ancestors and
node j. Walking from the root, the path follows at each node the child whose token the target
scores highest. That path is then handed to vLLM's own rejection sampler as an ordinary chain
of drafts, with the logits rows of the path's nodes: row t of that chain is the target's
distribution after the path's first t tokens, exactly what a chain verification needs.

Why this is lossless: the path is a function of the target's logits alone, and a chain of
drafts that are fixed before the sampler draws its random numbers is verified exactly by
rejection sampling (a draft is accepted with probability p(draft), otherwise a token is drawn
from p without the draft). Greedy requests accept the longest path on which every token is
the target's argmax at its parent and emit the target's token after it; sampled requests keep
the target's distribution. Penalties, bad words, min-tokens and logprobs work as for chains,
since the sampler sees a chain.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vllm_medusa.tree import MedusaTree
from vllm_medusa.tree_attention import KVLayout


@dataclass
class ChainView:
    """The chosen paths, laid out as the chain verification vLLM's sampler expects."""

    paths: list[list[int]]  # per request: the path's draft nodes (1-based), root excluded
    rows: torch.Tensor  # [sum(len(path) + 1)] logits rows: the root, then each path node
    draft_token_ids: torch.Tensor  # [sum(len(path))] the path's tokens, int32
    num_draft_tokens: list[int]  # per request: len(path)


def choose_paths(
    tree: MedusaTree,
    logits: torch.Tensor,  # [sum(n_i + 1), vocab]: each request's root row, then its nodes
    num_drafts: list[int],  # n_i: draft nodes scheduled per request (a breadth-first prefix)
    draft_token_ids: torch.Tensor,  # [sum(n_i)]
) -> list[list[int]]:
    """Per request, the path that follows the target's highest-scored child at every node."""
    starts = np.concatenate(([0], np.cumsum(np.asarray(num_drafts) + 1)[:-1]))
    parent_rows = np.concatenate(
        [start + tree.parents[1 : n + 1] for start, n in zip(starts, num_drafts, strict=True)]
    )
    if parent_rows.size == 0:
        return [[] for _ in num_drafts]
    # The target's score of each node's token, read at the node's parent: [sum(n_i)]
    scores = logits[torch.from_numpy(parent_rows), draft_token_ids.long()].float().numpy()
    paths: list[list[int]] = []
    offset = 0
    for n in num_drafts:
        paths.append(_walk(tree, scores[offset : offset + n], n))
        offset += n
    return paths


def _walk(tree: MedusaTree, scores: np.ndarray, num_nodes: int) -> list[int]:
    """scores[j - 1]: the target's score of node j's token at node j's parent."""
    path: list[int] = []
    node = 0
    while True:
        children = [c for c in tree.children[node] if c <= num_nodes]
        if not children:
            return path
        node = max(children, key=lambda c: scores[c - 1])
        path.append(node)


def chain_view(
    paths: list[list[int]],
    draft_token_ids: torch.Tensor,  # [sum(n_i)]
    num_drafts: list[int],
) -> ChainView:
    rows: list[int] = []
    draft_index: list[int] = []
    row_start = draft_start = 0
    for path, n in zip(paths, num_drafts, strict=True):
        rows.append(row_start)
        rows.extend(row_start + node for node in path)
        draft_index.extend(draft_start + node - 1 for node in path)
        row_start += n + 1
        draft_start += n
    index = torch.tensor(draft_index, dtype=torch.long)
    return ChainView(
        paths=paths,
        rows=torch.tensor(rows, dtype=torch.long),
        draft_token_ids=draft_token_ids[index].to(torch.int32),
        num_draft_tokens=[len(p) for p in paths],
    )


def accepted_nodes(paths: list[list[int]], num_emitted: list[int]) -> list[list[int]]:
    """The path nodes the sampler accepted: all tokens emitted but the last one."""
    return [path[: max(emitted - 1, 0)] for path, emitted in zip(paths, num_emitted, strict=True)]


def kv_moves(
    accepted: list[list[int]],
    token_starts: list[int],  # per request: its root's index among the step's tokens
    slot_mapping: torch.Tensor,  # [num_tokens] the step's KV slot of each token
) -> tuple[torch.Tensor, torch.Tensor]:
    """(source slots, destination slots): the i-th accepted node's keys and values go where
    the token at position context + i lives, so the next step reads them in order.

    Breadth-first order puts the i-th accepted node at index >= i, growing with i, so no
    destination is the source of a later move; the caller copies all sources first anyway.
    """
    src: list[int] = []
    dst: list[int] = []
    for nodes, start in zip(accepted, token_starts, strict=True):
        for i, node in enumerate(nodes, start=1):
            if node != i:
                src.append(start + node)
                dst.append(start + i)
    if not src:
        empty = torch.empty(0, dtype=torch.long)
        return empty, empty
    return slot_mapping[torch.tensor(src)].long(), slot_mapping[torch.tensor(dst)].long()


def copy_kv_slots(
    caches: list[tuple[torch.Tensor, KVLayout]],  # per layer: [blocks, kv_heads, bs, 2 * head]
    src: torch.Tensor,  # [M] slots
    dst: torch.Tensor,  # [M] slots
) -> None:
    """Move keys and values between slots in every layer's paged cache."""
    for kv, layout in caches:
        num_blocks, num_kv_heads, block_size, two_head = kv.shape
        stretches = kv.view(num_blocks, num_kv_heads, block_size * two_head)
        src_index = layout.slot_index(src % block_size)  # [M, 2 * head]
        dst_index = layout.slot_index(dst % block_size)
        moved = stretches[(src // block_size)[:, None], :, src_index]  # a copy
        stretches[(dst // block_size)[:, None], :, dst_index] = moved
