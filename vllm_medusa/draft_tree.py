"""One request's tree in one step: which draft node hangs under which, and who proposed it.

A static Medusa tree (`vllm_medusa.tree.MedusaTree`) gives every request the same shape. With
copy branches and confidence pruning each request gets its own: the static tree's nodes the
heads are sure enough of, then the tokens that followed the latest earlier occurrence of the
request's recent text, as a branch from the root that shares the Medusa nodes it agrees with.

Nodes are numbered 1..n in an order where every node comes after its parent, so any prefix
of a request's drafts (the scheduler may cut them near `max_model_len`) is a tree too, and the
node at index j is scheduled at KV slot context + j and position context + depth(j).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

# The label of a node that only the copy branch proposed (no Medusa head's rank).
COPY = "copy"


@dataclass(frozen=True, eq=False)
class DraftTree:
    """Parents and proposers of one request's draft nodes (node 0 is the root: the last token
    the target sampled)."""

    parents: tuple[int, ...]  # [n + 1] parent of each node, -1 for the root
    ranks: tuple[tuple[int, ...] | None, ...]  # [n] a Medusa node's path of ranks, else None
    copied: tuple[bool, ...]  # [n] whether the copy branch proposed the node
    _prefixes: dict[int, DraftTree] = field(default_factory=dict, repr=False)

    @property
    def num_nodes(self) -> int:
        return len(self.parents) - 1

    @cached_property
    def is_chain(self) -> bool:
        """Each node the child of the one before: causal attention is already its mask."""
        return all(p == j - 1 for j, p in enumerate(self.parents))

    @cached_property
    def depths(self) -> np.ndarray:
        """[n + 1] each node's depth, root 0: its position offset past the context."""
        depths = np.zeros(len(self.parents), dtype=np.int64)
        for node in range(1, len(self.parents)):
            depths[node] = depths[self.parents[node]] + 1
        return depths

    @cached_property
    def children(self) -> tuple[tuple[int, ...], ...]:
        kids: list[list[int]] = [[] for _ in self.parents]
        for node in range(1, len(self.parents)):
            kids[self.parents[node]].append(node)
        return tuple(tuple(k) for k in kids)

    @cached_property
    def attention_mask(self) -> torch.Tensor:
        """[n + 1, n + 1] bool: row i may attend to column j (j is i or an ancestor of i)."""
        size = len(self.parents)
        mask = np.zeros((size, size), dtype=bool)
        for node in range(size):
            parent = self.parents[node]
            if parent >= 0:
                mask[node] = mask[parent]
            mask[node, node] = True
        return torch.from_numpy(mask)

    def ancestry(self, node: int) -> list[int]:
        """The draft nodes from the root's child down to `node` (root excluded)."""
        chain = []
        while node > 0:
            chain.append(node)
            node = self.parents[node]
        return chain[::-1]

    def prefix(self, num_nodes: int) -> DraftTree:
        """The first `num_nodes` draft nodes, a tree since parents come first."""
        if num_nodes >= self.num_nodes:
            return self
        if num_nodes not in self._prefixes:
            self._prefixes[num_nodes] = DraftTree(
                self.parents[: num_nodes + 1], self.ranks[:num_nodes], self.copied[:num_nodes]
            )
        return self._prefixes[num_nodes]

    def depth_first(self) -> tuple[DraftTree, list[int]]:
        """The same tree numbered depth-first, each node's deepest branch first, and the old
        number of each new node 1..n. vLLM's causal attention pass already gets the first
        branch's rows right, so only the other branches' rows are computed again
        (`vllm_medusa.tree_attention`), and accepting it moves no keys and values."""
        height = [0] * len(self.parents)  # longest way down from each node
        for node in range(len(self.parents) - 1, 0, -1):
            parent = self.parents[node]
            height[parent] = max(height[parent], height[node] + 1)
        order, stack = [], [0]
        while stack:
            node = stack.pop()
            order.append(node)
            # Pushed shallowest last-first, so the deepest (earliest on ties) is popped next.
            kids = sorted(self.children[node], key=lambda k: (-height[k], k))
            stack.extend(reversed(kids))
        new = {old: j for j, old in enumerate(order)}
        old_nodes = order[1:]
        tree = DraftTree(
            tuple([-1] + [new[self.parents[old]] for old in old_nodes]),
            tuple(self.ranks[old - 1] for old in old_nodes),
            tuple(self.copied[old - 1] for old in old_nodes),
        )
        return tree, old_nodes

    def label(self, node: int) -> str:
        """What proposed a draft node: its ranks ("0.1"), "copy", or both ("0.1+copy")."""
        ranks = self.ranks[node - 1]
        medusa = None if ranks is None else ".".join(map(str, ranks))
        if not self.copied[node - 1]:
            return medusa or "?"
        return COPY if medusa is None else f"{medusa}+{COPY}"


def static_draft_tree(paths: Sequence[Sequence[int]], parents: Sequence[int]) -> DraftTree:
    """A Medusa tree's nodes as a `DraftTree` (no copy branch)."""
    return DraftTree(
        tuple(int(p) for p in parents),
        tuple(tuple(p) for p in paths),
        (False,) * len(paths),
    )


def chain_tree(num_nodes: int) -> DraftTree:
    """Drafts read as a chain: each node the child of the one before."""
    return DraftTree(tuple(range(-1, num_nodes)), (None,) * num_nodes, (False,) * num_nodes)


def request_tree(
    candidates: DraftTree,  # the static tree's first nodes
    tokens: Sequence[int],  # [candidates.num_nodes] this request's token of each
    keep: Sequence[bool],  # [candidates.num_nodes] confident enough (closed under parents)
    copy: Sequence[int],  # the copy branch's tokens, from the root down (may be empty)
) -> tuple[DraftTree, list[int]]:
    """This request's tree and its draft tokens: the kept Medusa nodes in their order, then
    the copy branch, sharing every node whose token it agrees with (siblings stay distinct)."""
    parents, ranks, copied, drafts = [-1], [], [], []
    index = {0: 0}  # candidate node -> node in the request's tree
    child_of: dict[tuple[int, int], int] = {}  # (parent, token) -> node
    for j in range(1, candidates.num_nodes + 1):
        if not keep[j - 1] or candidates.parents[j] not in index:
            continue
        parent = index[candidates.parents[j]]
        index[j] = len(parents)
        child_of[(parent, tokens[j - 1])] = len(parents)
        parents.append(parent)
        ranks.append(candidates.ranks[j - 1])
        copied.append(False)
        drafts.append(tokens[j - 1])
    node = 0
    for token in copy:
        shared = child_of.get((node, token))
        if shared is not None:
            copied[shared - 1] = True
            node = shared
            continue
        parents.append(node)
        ranks.append(None)
        copied.append(True)
        drafts.append(int(token))
        node = len(parents) - 1
        child_of[(parents[node], token)] = node
    return DraftTree(tuple(parents), tuple(ranks), tuple(copied)), drafts
