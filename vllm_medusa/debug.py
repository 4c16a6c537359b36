"""Debug output: what the heads drafted, how sure they were, and what the target accepted.

`VLLM_MEDUSA_DEBUG=1` logs, per step and request, each drafted node (its path of ranks, its
token and the head's probability of that token) and the accepted path; every
`VLLM_MEDUSA_DEBUG_EVERY` steps (default 100) it logs the acceptance table: per head depth d
and rank r, how often the rank-r token of head d was the target's token when the path above
it had been accepted (accepted / tried). That is the table a tree is chosen from: a node's
expected contribution to the acceptance length is the product of these rates along its path.
Nodes of a copy branch (`vllm_medusa.drafting`) are counted per depth in a column of their
own ("copy"); with pruning, the log shows each request's drafted nodes after pruning and how
many the pruning dropped. `VLLM_MEDUSA_DEBUG_FILE=PATH` appends each step's records to PATH
as JSON lines (with or without the log lines).

Only drafts the plugin verifies itself are counted (trees everywhere, chains on the CPU).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence

import torch
from vllm.logger import init_logger

from vllm_medusa.draft_tree import COPY, DraftTree
from vllm_medusa.tree import MedusaTree

# Under "vllm." so that vLLM's logging configuration shows it.
logger = init_logger(f"vllm.{__name__}")

DEBUG_ENV = "VLLM_MEDUSA_DEBUG"
EVERY_ENV = "VLLM_MEDUSA_DEBUG_EVERY"
FILE_ENV = "VLLM_MEDUSA_DEBUG_FILE"


def _log_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "0") not in ("", "0", "false", "False")


def debug_enabled() -> bool:
    """Whether drafts are recorded at all: for the log, a file, or both."""
    return _log_enabled() or bool(os.environ.get(FILE_ENV))


class AcceptanceTable:
    """Counts per (depth, rank): tried (the parent was accepted, so this node could be) and
    accepted (the target's token was this node's)."""

    def __init__(self) -> None:
        self.tried: dict[tuple[int, int], int] = defaultdict(int)
        self.accepted: dict[tuple[int, int], int] = defaultdict(int)

    def add(self, tree: MedusaTree | DraftTree, num_drafts: int, accepted: Sequence[int]) -> None:
        """One request's step: it verified the first `num_drafts` nodes of `tree` and
        accepted the nodes `accepted` (a path from the root's child down)."""
        if isinstance(tree, MedusaTree):
            tree = tree.draft_tree
        tree = tree.prefix(num_drafts)
        for node in [0, *accepted]:
            for child in tree.children[node]:
                for key in _keys(tree, child):
                    self.tried[key] += 1
        for node in accepted:
            for key in _keys(tree, node):
                self.accepted[key] += 1

    def rate(self, depth: int, rank: int) -> float | None:
        tried = self.tried.get((depth, rank), 0)
        return self.accepted.get((depth, rank), 0) / tried if tried else None

    def format(self) -> str:
        """Rows: depth (head); columns: rank; cells: accepted/tried = rate."""
        if not self.tried:
            return "no drafts verified yet"
        depths = sorted({d for d, _ in self.tried})
        ranks = sorted({r for _, r in self.tried}, key=lambda r: (isinstance(r, str), r))
        lines = ["depth \\ rank " + " ".join(f"{r:>16}" for r in ranks)]
        for d in depths:
            cells = []
            for r in ranks:
                tried = self.tried.get((d, r), 0)
                if tried == 0:
                    cells.append(f"{'-':>16}")
                    continue
                accepted = self.accepted.get((d, r), 0)
                cells.append(f"{accepted:>6}/{tried:<6} {accepted / tried:.2f}".rjust(16))
            lines.append(f"{d:>13} " + " ".join(cells))
        return "\n".join(lines)


def _describe(draft: dict) -> str:
    prob = "" if draft["prob"] is None else f"({draft['prob']:.2f})"
    source = COPY if draft["path"] is None else str(draft["path"])
    if draft["path"] is not None and draft["copy"]:
        source += "+" + COPY
    return f"{source}:{draft['token']}{prob}"


def _keys(tree: DraftTree, node: int) -> list[tuple[int, int | str]]:
    """The table cells a draft node counts in: (depth, rank) for a Medusa node (depth 1 is
    head 0), (depth, "copy") for a node of the copy branch, both for a node both proposed."""
    depth = int(tree.depths[node])
    ranks = tree.ranks[node - 1]
    keys: list[tuple[int, int | str]] = [] if ranks is None else [(depth, ranks[-1])]
    if tree.copied[node - 1]:
        keys.append((depth, COPY))
    return keys


class DraftDebug:
    """Per engine process: the heads' probabilities of the last drafts of each request, the
    acceptance table, and the log lines."""

    def __init__(self, every: int | None = None) -> None:
        self.table = AcceptanceTable()
        self.every = every or int(os.environ.get(EVERY_ENV, "100"))
        self.steps = 0
        self.path = os.environ.get(FILE_ENV) or None
        self.log = _log_enabled()
        self._probs: dict[str, list[float | None]] = {}  # request id -> its drafts' probabilities
        self._pruned: dict[str, int] = {}  # request id -> Medusa nodes pruned from its drafts

    def record_drafts(
        self,
        req_ids: Sequence[str],
        probs: torch.Tensor | Sequence[Sequence[float | None]],
        pruned: Sequence[int] | None = None,
    ) -> None:
        """probs: per request, the heads' probability of each drafted token ([num_reqs,
        drafts], or one list per request, None for a node only the copy branch proposed);
        pruned: per request, the Medusa nodes confidence pruning dropped."""
        rows = probs.tolist() if isinstance(probs, torch.Tensor) else probs
        for index, (req_id, row) in enumerate(zip(req_ids, rows, strict=False)):
            self._probs[req_id] = list(row)
            self._pruned[req_id] = 0 if pruned is None else pruned[index]

    def record_step(
        self,
        tree: MedusaTree | Sequence[DraftTree],  # one static tree, or each request's own
        req_ids: Sequence[str],
        num_drafts: Sequence[int],
        draft_tokens: Sequence[Sequence[int]],
        accepted: Sequence[Sequence[int]],
    ) -> None:
        """One verification step: per request, its drafted tokens and accepted nodes."""
        from vllm_medusa.verify import request_trees

        self.steps += 1
        records = []
        trees = request_trees(tree, num_drafts)
        steps = zip(req_ids, trees, draft_tokens, accepted, strict=True)
        for req_id, request_tree, tokens, nodes in steps:
            n = request_tree.num_nodes
            if n == 0:
                continue
            self.table.add(request_tree, n, nodes)
            probs = self._probs.get(req_id, [])
            drafted = [
                {
                    "path": None if ranks is None else list(ranks),
                    "copy": request_tree.copied[j],
                    "parent": request_tree.parents[j + 1],
                    "token": tokens[j],
                    "prob": probs[j] if j < len(probs) else None,
                }
                for j, ranks in enumerate(request_tree.ranks)
            ]
            path = [tokens[node - 1] for node in nodes]
            records.append(
                {"step": self.steps, "request": req_id, "drafted": drafted,
                 "pruned": self._pruned.get(req_id, 0), "accepted_nodes": list(nodes),
                 "accepted_tokens": path}
            )  # fmt: skip
            if not self.log:
                continue
            logger.info(
                "vllm-medusa debug step %d request %s: drafted %s; pruned %d; accepted nodes "
                "%s tokens %s",
                self.steps,
                req_id,
                " ".join(_describe(d) for d in drafted),
                records[-1]["pruned"],
                list(nodes),
                path,
            )
        if self.path and records:
            with open(self.path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
        if self.log and self.steps % self.every == 0:
            logger.info(
                "vllm-medusa debug: acceptance per head depth and rank after %d steps "
                "(accepted/tried rate, tried = the path above was accepted):\n%s",
                self.steps,
                self.table.format(),
            )
