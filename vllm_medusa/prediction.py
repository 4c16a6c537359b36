"""What a calibration predicts for a workload: tokens/s of prompts answered in groups of B
requests, each group prefilled together and decoded until its last answer ends, the way
`vllm-medusa bench` runs them.

Why not the calibration's table alone: it times B requests decoding one fixed length
together, and its acceptance is scaled to those engines, whose requests run past EOS. Real
answers stop at EOS one by one, so a group spends its last steps with fewer requests (where
the schedule may draft more, and steps cost less), and each group starts with a prefill. Here
a group is stepped through: per step, the requests still answering set the batch size, the
schedule the draft nodes, the calibration's step times (interpolated between the batch sizes
it measured) the time, and the tokens per step its probe measured on answers that end at EOS
the progress of each request.

A prefill costs a fixed part (one `LLM.chat` call: rendering, scheduling, output; about 0.15 s
on a 2-core CPU, a few decode steps) and a part per prompt token it computes (tokens found in
the prefix cache cost nothing), fitted as a line through the calibration's prefills of 1 to 16
prompts: scaling the whole time by prompt tokens would charge the fixed part again for every
token of a longer prompt.

A step's time grows with each request's context (its attention reads every earlier token's
keys and values): the calibration's step times are for its prompts' context, and a step adds
what the calibration measured per context token with a long prompt, for each request, times
how far that request's context is from the calibration's (Spec-Bench's longest prompts, of
about 700 tokens, step about 8 % slower at batch 1 than 50-token ones).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StepTable:
    """A calibration's measurements, by (batch size, draft nodes)."""

    batch_sizes: list[int]  # measured, ascending
    step_ms: dict[tuple[int, int], float]
    prefill_fixed_ms: float  # per group of requests
    prefill_ms_per_token: float  # per prompt token
    tokens_per_step: dict[int, float]  # per draft nodes, answers until EOS (0 nodes: 1.0)
    schedule: list[list[int]]  # [[first batch size, last batch size, draft nodes], ...]
    # Per draft nodes: a step's extra milliseconds per request per context token beyond
    # `reference_context` (empty: a calibration that did not measure it, no correction).
    context_ms_per_token: dict[int, float] = field(default_factory=dict)
    reference_context: float = 0.0  # context tokens per request where `step_ms` was measured

    @classmethod
    def from_calibration(cls, calibration: Any) -> StepTable | None:
        """None for a calibration measured before prefill times were recorded."""
        rows = calibration.measurements
        if not rows or any("prefill_ms" not in m for m in rows):
            return None
        fixed, per_token = fit_line([(m["prompt_tokens"], m["prefill_ms"]) for m in rows])
        with_context = [m for m in rows if "context_ms_per_token" in m]
        return cls(
            batch_sizes=sorted({m["batch_size"] for m in rows}),
            step_ms={(m["batch_size"], m["draft_nodes"]): m["step_ms"] for m in rows},
            prefill_fixed_ms=fixed,
            prefill_ms_per_token=per_token,
            tokens_per_step={m["draft_nodes"]: m["expected_acceptance"] for m in rows},
            schedule=calibration.schedule,
            context_ms_per_token={
                m["draft_nodes"]: m["context_ms_per_token"] for m in with_context
            },
            reference_context=(
                sum(m["context_tokens"] for m in with_context) / len(with_context)
                if with_context
                else 0.0
            ),
        )

    def nodes(self, batch: int) -> int:
        """Draft nodes per request the schedule gives a step of `batch` requests."""
        for first, last, nodes in self.schedule:
            if first <= batch <= last:
                return nodes
        return 0

    def _at(self, table: dict[tuple[int, int], float], batch: int, nodes: int) -> float:
        """`table` at `batch` requests: linear between the measured batch sizes around it,
        the nearest one outside them."""
        sizes = self.batch_sizes
        if batch <= sizes[0]:
            return table[(sizes[0], nodes)]
        if batch >= sizes[-1]:
            return table[(sizes[-1], nodes)]
        hi = bisect.bisect_left(sizes, batch)
        b0, b1 = sizes[hi - 1], sizes[hi]
        w = (batch - b0) / (b1 - b0)
        return (1 - w) * table[(b0, nodes)] + w * table[(b1, nodes)]

    def group_seconds(
        self,
        prompt_tokens: list[int],
        answer_tokens: list[int],
        speculate: bool,
        cached_tokens: list[int] | None = None,
    ) -> float:
        """Seconds to prefill one group of requests (their prompts' tokens less those found
        in the prefix cache) and decode their answers (tokens each, the first of them from
        the prefill)."""
        computed = sum(prompt_tokens) - sum(cached_tokens or [])
        ms = self.prefill_fixed_ms + self.prefill_ms_per_token * computed
        remaining = [t - 1 for t in answer_tokens]  # decode tokens still to come, per request
        while True:
            active = [i for i, r in enumerate(remaining) if r > 0]
            if not active:
                return ms / 1000
            nodes = self.nodes(len(active)) if speculate else 0
            ms += self._at(self.step_ms, len(active), nodes)
            # Each request's context: its prompt and the tokens it has so far.
            context = sum(prompt_tokens[i] + answer_tokens[i] - remaining[i] for i in active)
            extra = context - self.reference_context * len(active)
            ms += self.context_ms_per_token.get(nodes, 0.0) * extra
            for i in active:
                remaining[i] -= self.tokens_per_step[nodes]


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares intercept and slope of `points` (x, y), neither below 0: a prefill
    neither takes negative time nor gets cheaper with more tokens, whatever the noise."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var_x = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / var_x if var_x else 0.0
    if slope <= 0:
        return mean_y, 0.0
    intercept = mean_y - slope * mean_x
    if intercept < 0:  # through the origin instead
        return 0.0, sum(x * y for x, y in points) / sum(x * x for x, _ in points)
    return intercept, slope


def predicted_tok_s(
    table: StepTable,
    prompt_tokens: list[int],
    answer_tokens: list[int],
    batch: int,
    speculate: bool,
    cached_tokens: list[int] | None = None,
) -> float:
    """Tokens/s the calibration predicts for these prompts and answers (per request, in
    order; `cached_tokens`: each prompt's tokens found in the prefix cache) run in groups of
    `batch`, with its schedule (`speculate`) or without speculation."""
    cached = cached_tokens or [0] * len(prompt_tokens)
    seconds = sum(
        table.group_seconds(
            prompt_tokens[start : start + batch],
            answer_tokens[start : start + batch],
            speculate,
            cached[start : start + batch],
        )
        for start in range(0, len(answer_tokens), batch)
    )
    return sum(answer_tokens) / seconds
