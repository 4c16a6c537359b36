"""Debug output: what the heads drafted, how sure they were, and what the target accepted.

`VLLM_MEDUSA_DEBUG=1` logs, per step and request, each drafted node (its path of ranks, its
token and the head's probability of that token) and the accepted path; every
`VLLM_MEDUSA_DEBUG_EVERY` steps (default 100) it logs the acceptance table: per head depth d
and rank r, how often the rank-r token of head d was the target's token when the path above
it had been accepted (accepted / tried). That is the table a tree is chosen from: a node's
expected contribution to the acceptance length is the product of these rates along its path.
`VLLM_MEDUSA_DEBUG_FILE=PATH` appends each step's records to PATH as JSON lines (with or
without the log lines).

Only drafts the plugin verifies itself are counted (trees everywhere, chains on the CPU).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence

import torch
from vllm.logger import init_logger

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

    def add(self, tree: MedusaTree, num_drafts: int, accepted: Sequence[int]) -> None:
        """One request's step: it verified the first `num_drafts` nodes of `tree` and
        accepted the nodes `accepted` (a path from the root's child down)."""
        on_path = [0, *accepted]
        for node in on_path:
            for child in tree.children[node]:
                if child <= num_drafts:
                    self.tried[_key(tree, child)] += 1
        for node in accepted:
            self.accepted[_key(tree, node)] += 1

    def rate(self, depth: int, rank: int) -> float | None:
        tried = self.tried.get((depth, rank), 0)
        return self.accepted.get((depth, rank), 0) / tried if tried else None

    def format(self) -> str:
        """Rows: depth (head); columns: rank; cells: accepted/tried = rate."""
        if not self.tried:
            return "no drafts verified yet"
        depths = sorted({d for d, _ in self.tried})
        ranks = sorted({r for _, r in self.tried})
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
    return f"{draft['path']}:{draft['token']}{prob}"


def _key(tree: MedusaTree, node: int) -> tuple[int, int]:
    """(depth, rank) of a draft node: depth 1 is head 0."""
    return int(tree.depths[node]), int(tree.ranks[node - 1])


class DraftDebug:
    """Per engine process: the heads' probabilities of the last drafts of each request, the
    acceptance table, and the log lines."""

    def __init__(self, every: int | None = None) -> None:
        self.table = AcceptanceTable()
        self.every = every or int(os.environ.get(EVERY_ENV, "100"))
        self.steps = 0
        self.path = os.environ.get(FILE_ENV) or None
        self.log = _log_enabled()
        self._probs: dict[str, list[float]] = {}  # request id -> its drafts' probabilities

    def record_drafts(self, req_ids: Sequence[str], probs: torch.Tensor) -> None:
        """probs: [num_reqs, drafts], the heads' probability of each drafted token."""
        for req_id, row in zip(req_ids, probs.tolist(), strict=False):
            self._probs[req_id] = row

    def record_step(
        self,
        tree: MedusaTree,
        req_ids: Sequence[str],
        num_drafts: Sequence[int],
        draft_tokens: Sequence[Sequence[int]],
        accepted: Sequence[Sequence[int]],
    ) -> None:
        """One verification step: per request, its drafted tokens and accepted nodes."""
        self.steps += 1
        records = []
        steps = zip(req_ids, num_drafts, draft_tokens, accepted, strict=True)
        for req_id, n, tokens, nodes in steps:
            if n == 0:
                continue
            self.table.add(tree, n, nodes)
            probs = self._probs.get(req_id, [])
            drafted = [
                {
                    "path": list(tree.paths[j]),
                    "token": tokens[j],
                    "prob": probs[j] if j < len(probs) else None,
                }
                for j in range(n)
            ]
            path = [tokens[node - 1] for node in nodes]
            records.append(
                {"step": self.steps, "request": req_id, "drafted": drafted,
                 "accepted_nodes": list(nodes), "accepted_tokens": path}
            )  # fmt: skip
            if not self.log:
                continue
            logger.info(
                "vllm-medusa debug step %d request %s: drafted %s; accepted nodes %s tokens %s",
                self.steps,
                req_id,
                " ".join(_describe(d) for d in drafted),
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
