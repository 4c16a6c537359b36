"""Medusa trees: which top-k candidates of which heads are verified together in one step.

A tree is FasterDecoding's `medusa_choices`: a list of paths, each a tuple of top-k ranks,
one rank per head. `(0, 2)` is the node "head 0's best token, then head 1's third best". The
nodes are put in breadth-first order (by depth, then by path), so every node comes after its
parent and any prefix of the order is a tree too: the scheduler may cut a request's drafts
short near `max_model_len` and what is left is still verifiable. A calibrated tree keeps its
own order instead (most probable paths first, each after its parent), so that each prefix
is the best tree of its size. A step drafts a prefix and numbers its nodes depth-first
(`MedusaTree.step_tree`), which is cheaper to verify.

Node 0 is the root: the last token the target sampled, already known. Draft node j (1-based)
is fed at position `context + depth(j)` and may see the context, its ancestors and itself.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vllm_medusa.draft_tree import DraftTree, static_draft_tree

# FasterDecoding chooses each node among a head's 10 best tokens.
TOP_K_LIMIT = 10
# vLLM 0.32's rejection sampler verifies at most this many drafts per request.
MAX_TREE_NODES = 128
# Set per process to override the tree in the heads' config.json.
TREE_ENV = "VLLM_MEDUSA_TREE"
CONFIG_KEY = "medusa_choices"
# Where the resolved tree travels, on the heads' config, to the engine's processes.
RESOLVED_ATTR = "vllm_medusa_tree"


class TreeError(ValueError):
    """A tree that cannot be verified as given."""


def named_trees() -> dict[str, list[list[int]]]:
    """FasterDecoding's published trees (63 nodes each), by name."""
    text = resources.files("vllm_medusa.data").joinpath("medusa_trees.json").read_text()
    return json.loads(text)


def chain_paths(length: int) -> list[list[int]]:
    """The degenerate tree: each head's best token, one after another."""
    return [[0] * depth for depth in range(1, length + 1)]


@dataclass(frozen=True)
class MedusaTree:
    """A validated tree, every node after its parent, with the buffers verification needs."""

    name: str
    paths: tuple[tuple[int, ...], ...]  # the draft nodes 1..N (breadth-first unless calibrated)
    _index: dict[tuple[int, ...], int] = field(init=False, repr=False, compare=False)
    _step_trees: dict[int, tuple[DraftTree, torch.Tensor]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {p: j + 1 for j, p in enumerate(self.paths)})

    @property
    def num_nodes(self) -> int:
        """Draft tokens per request and step (the root excluded)."""
        return len(self.paths)

    def node(self, path: tuple[int, ...]) -> int:
        """The number (1..N) of the node at `path`."""
        return self._index[path]

    @property
    def depth(self) -> int:
        """Heads the tree uses: the longest path."""
        return max(len(p) for p in self.paths)

    @property
    def top_k(self) -> int:
        """Candidates per head the proposer must rank."""
        return max(max(p) for p in self.paths) + 1

    @property
    def is_chain(self) -> bool:
        return all(p == (0,) * len(p) for p in self.paths) and self.num_nodes == self.depth

    @cached_property
    def depths(self) -> np.ndarray:
        """[N + 1] depth of each node, root 0: its position offset past the context."""
        return np.array([0] + [len(p) for p in self.paths], dtype=np.int64)

    @cached_property
    def parents(self) -> np.ndarray:
        """[N + 1] parent node of each node, -1 for the root."""
        return np.array([-1] + [self._index.get(p[:-1], 0) for p in self.paths], dtype=np.int64)

    @cached_property
    def heads(self) -> torch.Tensor:
        """[N] head that proposes each draft node."""
        return torch.tensor([len(p) - 1 for p in self.paths], dtype=torch.long)

    @cached_property
    def ranks(self) -> torch.Tensor:
        """[N] rank of each draft node's token among its head's top-k."""
        return torch.tensor([p[-1] for p in self.paths], dtype=torch.long)

    @cached_property
    def children(self) -> tuple[tuple[int, ...], ...]:
        """Children of each node (root included), in breadth-first order."""
        kids: list[list[int]] = [[] for _ in range(self.num_nodes + 1)]
        for node in range(1, self.num_nodes + 1):
            kids[self.parents[node]].append(node)
        return tuple(tuple(k) for k in kids)

    def ancestry(self, node: int) -> list[int]:
        """The draft nodes from the root's first child down to `node` (root excluded)."""
        chain = []
        while node > 0:
            chain.append(node)
            node = int(self.parents[node])
        return chain[::-1]

    @cached_property
    def attention_mask(self) -> torch.Tensor:
        """[N + 1, N + 1] bool: row i may attend to column j (j is i or an ancestor of i)."""
        n = self.num_nodes + 1
        mask = torch.zeros(n, n, dtype=torch.bool)
        for node in range(n):
            ancestor = node
            while ancestor >= 0:
                mask[node, ancestor] = True
                ancestor = int(self.parents[ancestor])
        return mask

    @cached_property
    def leaf_paths(self) -> torch.Tensor:
        """[num_leaves, depth + 1] node indices from the root to each leaf, -1 padded."""
        leaves = [j for j in range(1, self.num_nodes + 1) if not self.children[j]]
        rows = []
        for leaf in leaves:
            row, node = [], leaf
            while node >= 0:
                row.append(node)
                node = int(self.parents[node])
            rows.append(row[::-1] + [-1] * (self.depth + 1 - len(row)))
        return torch.tensor(rows, dtype=torch.long)

    @cached_property
    def draft_tree(self) -> DraftTree:
        """The tree as every request drafts it when requests have no trees of their own."""
        return static_draft_tree(self.paths, self.parents)

    def step_tree(self, num_nodes: int) -> tuple[DraftTree, torch.Tensor]:
        """The first `num_nodes` nodes as a step drafts and verifies them: numbered
        depth-first (`DraftTree.depth_first`: fewer rows for the tree attention to redo), and
        [n] long, each step node's index into `paths`. Which nodes take part stays this
        tree's order; only their numbering in the step changes."""
        if num_nodes not in self._step_trees:
            tree, old_nodes = self.draft_tree.prefix(num_nodes).depth_first()
            order = torch.tensor(old_nodes, dtype=torch.long) - 1
            self._step_trees[num_nodes] = (tree, order)
        return self._step_trees[num_nodes]

    def describe(self) -> str:
        kind = "chain" if self.is_chain else "tree"
        nodes = f"{self.num_nodes} node{'s' if self.num_nodes != 1 else ''}"
        return f"{kind} {self.name!r}: {nodes}, depth {self.depth}, top-{self.top_k}"


def build_tree(paths: Any, name: str = "custom", ordered: bool = False) -> MedusaTree:
    """Validate FasterDecoding-style paths and order them breadth-first (`ordered`: keep the
    given order, in which every path must come after its parent)."""
    if not isinstance(paths, (list, tuple)) or not paths:
        raise TreeError(
            f"Medusa tree {name!r} must be a non-empty list of paths, e.g. [[0], [0, 1]]"
        )
    seen: set[tuple[int, ...]] = set()
    for raw in paths:
        if (
            not isinstance(raw, (list, tuple))
            or not raw
            or not all(isinstance(r, int) and not isinstance(r, bool) for r in raw)
        ):
            raise TreeError(
                f"Medusa tree {name!r}: path {raw!r} is not a non-empty list of top-k ranks"
            )
        path = tuple(raw)
        if min(path) < 0 or max(path) >= TOP_K_LIMIT:
            raise TreeError(
                f"Medusa tree {name!r}: path {list(path)} uses rank {max(path)}; ranks must be "
                f"0..{TOP_K_LIMIT - 1} (a head's top {TOP_K_LIMIT} tokens)"
            )
        if path in seen:
            raise TreeError(f"Medusa tree {name!r}: path {list(path)} appears twice")
        seen.add(path)
    for path in seen:
        if len(path) > 1 and path[:-1] not in seen:
            raise TreeError(
                f"Medusa tree {name!r}: path {list(path)} has no parent {list(path[:-1])}: "
                "add the parent path or remove this one"
            )
    if len(seen) > MAX_TREE_NODES:
        raise TreeError(
            f"Medusa tree {name!r} has {len(seen)} nodes; vLLM verifies at most "
            f"{MAX_TREE_NODES} draft tokens per request: use a smaller tree"
        )
    if ordered:
        order = [tuple(p) for p in paths]
        position = {p: i for i, p in enumerate(order)}
        for i, path in enumerate(order):
            if len(path) > 1 and position[path[:-1]] > i:
                raise TreeError(
                    f"Medusa tree {name!r}: path {list(path)} comes before its parent "
                    f"{list(path[:-1])}: list every parent first"
                )
        return MedusaTree(name=name, paths=tuple(order))
    return MedusaTree(name=name, paths=tuple(sorted(seen, key=lambda p: (len(p), p))))


def path_probability(acceptance: Sequence[Sequence[float]], path: Sequence[int]) -> float:
    """The chance that every node on `path` is accepted, for heads whose rank-r token at
    depth d + 1 is the target's with probability acceptance[d][r] once the path above it is."""
    probability = 1.0
    for depth, rank in enumerate(path):
        probability *= acceptance[depth][rank]
    return probability


def expected_acceptance_length(
    acceptance: Sequence[Sequence[float]],
    tree: MedusaTree,
    survival: Sequence[Sequence[float]] | None = None,
) -> float:
    """Tokens a step emits on average: the bonus token plus, per node, the chance it is
    accepted (siblings are distinct tokens, so at most one child of a node is), times the
    share of accepted nodes of its [depth][rank] that confidence pruning keeps (`survival`;
    none: every node is drafted)."""
    return 1.0 + sum(
        path_probability(acceptance, p) * (survival[len(p) - 1][p[-1]] if survival else 1.0)
        for p in tree.paths
    )


def best_tree(
    acceptance: Sequence[Sequence[float]], num_nodes: int, name: str = "calibrated"
) -> MedusaTree:
    """The tree of `num_nodes` nodes with the highest expected acceptance length.

    A path's probability never grows going down (each factor is at most 1), so the
    `num_nodes` most probable paths include each one's parent: they form a tree, and no other
    tree of that size scores more. Best-first search from the root finds them; on ties the
    shallower path wins, so a parent always comes before its children. The tree keeps that
    order: its first n nodes are the best tree of n nodes."""
    depth = len(acceptance)
    ranks = min(TOP_K_LIMIT, min(len(row) for row in acceptance))
    frontier = [(-acceptance[0][r], (r,)) for r in range(ranks)]
    heapq.heapify(frontier)
    chosen: list[tuple[int, ...]] = []
    while frontier and len(chosen) < num_nodes:
        score, path = heapq.heappop(frontier)
        chosen.append(path)
        if len(path) < depth:
            for r in range(ranks):
                child = (*path, r)
                heapq.heappush(frontier, (score * acceptance[len(path)][r], child))
    return build_tree([list(p) for p in chosen], name=name, ordered=True)


def parse_tree(spec: Any) -> MedusaTree:
    """A tree from a setting: a name, "chain:K", a JSON list, a JSON file, or a list."""
    if isinstance(spec, (list, tuple)):
        return build_tree(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise TreeError(f"Medusa tree setting {spec!r} is not a name, a list or a file")
    text = spec.strip()
    trees = named_trees()
    if text in trees:
        return build_tree(trees[text], name=text)
    if text.startswith("chain:"):
        length = text.split(":", 1)[1]
        if not length.isdigit() or int(length) < 1:
            raise TreeError(f"Medusa tree {text!r}: write chain:K with K >= 1, e.g. chain:4")
        return build_tree(chain_paths(int(length)), name=text)
    if text.startswith("["):
        try:
            return build_tree(json.loads(text))
        except json.JSONDecodeError as e:
            raise TreeError(f"Medusa tree {text[:40]!r} is not valid JSON: {e}") from None
    if text.endswith(".json") or os.path.sep in text:
        return _tree_from_file(Path(text))
    raise TreeError(
        f"unknown Medusa tree {text!r}: use one of {', '.join(sorted(trees))}, chain:K, "
        "a JSON list of paths or a .json file"
    )


def _tree_from_file(path: Path) -> MedusaTree:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise TreeError(f"Medusa tree file {str(path)!r} does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise TreeError(f"Medusa tree file {str(path)!r} cannot be read as JSON: {e}") from None
    if isinstance(data, dict):
        data = data.get(CONFIG_KEY)
    return build_tree(data, name=path.name)


def configured_tree(config_value: Any) -> MedusaTree | None:
    """The tree this process asks for: `VLLM_MEDUSA_TREE` if set, else the heads' config.json
    `medusa_choices` (passed in), else none (a chain of `num_speculative_tokens` heads)."""
    spec = os.environ.get(TREE_ENV) or config_value
    return None if spec is None else parse_tree(spec)


@contextlib.contextmanager
def tree_setting(spec: str | None) -> Iterator[None]:
    """Within this block, engines built in this process verify `spec` (None: the heads'
    own setting). The setting is read where `LLM(...)` parses its settings."""
    previous = os.environ.pop(TREE_ENV, None)
    if spec is not None:
        os.environ[TREE_ENV] = spec
    try:
        yield
    finally:
        os.environ.pop(TREE_ENV, None)
        if previous is not None:
            os.environ[TREE_ENV] = previous


def serves_tree(heads_config: Any) -> bool:
    """Whether the engine verifies a tree rather than a chain, read without building it."""
    return getattr(heads_config, RESOLVED_ATTR, None) is not None


def verified_by_plugin(heads_config: Any, device_type: str) -> bool:
    """Whether the plugin verifies the drafts itself: trees on every device, chains on the CPU
    (where vLLM's rejection kernels are replaced by C++ ops); elsewhere chains are vLLM's."""
    return serves_tree(heads_config) or device_type == "cpu"


def tree_of_heads(heads_config: Any) -> MedusaTree | None:
    """The tree the engine verifies, as resolved once where the settings were parsed and
    carried to every process on the heads' config; None for a chain."""
    resolved = getattr(heads_config, RESOLVED_ATTR, None)
    if resolved is None:
        return None
    return build_tree(resolved["paths"], name=resolved["name"], ordered=True)


def resolved_form(tree: MedusaTree) -> dict[str, Any]:
    """The tree as it travels to the engine's processes, its node order kept."""
    return {"name": tree.name, "paths": [list(p) for p in tree.paths]}
