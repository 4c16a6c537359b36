"""Typical acceptance (Medusa's own criterion for sampled requests): faster, NOT exact.

A draft token is accepted where the target finds it typical enough: `p(token) > min(epsilon,
delta * exp(-H(p)))`, with p the target's distribution (after the request's penalties,
temperature, top-k, top-p, min-p) at the token's parent and H its entropy. Along each path of
the tree every token must pass; the longest accepted path wins, ties going to the higher total
log-probability; the token after it is drawn from the target. The output no longer follows the
target's distribution: confident, low-entropy continuations are accepted more often than the
target would sample them. Off unless asked for:

- per engine: `VLLM_MEDUSA_TYPICAL=1` in the environment of the process that starts the engine
  (`LLM(...)`, `vllm serve`), or `VLLM_MEDUSA_TYPICAL=epsilon,delta`;
- per request: `SamplingParams(extra_args={"medusa_typical": 1})` (0 switches an engine's
  setting off for the request), optionally with `"medusa_typical_epsilon"` and
  `"medusa_typical_delta"`; through the OpenAI server the same keys go in `vllm_xargs`.

Defaults follow the Medusa paper: epsilon 0.09, delta 0.3 (= sqrt(epsilon)); the reference
implementation's function signature swaps the two names.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from vllm_medusa.tree import MedusaTree

TYPICAL_ENV = "VLLM_MEDUSA_TYPICAL"
REQUEST_KEY = "medusa_typical"
EPSILON_KEY = "medusa_typical_epsilon"
DELTA_KEY = "medusa_typical_delta"


class TypicalSettingError(ValueError):
    pass


@dataclass(frozen=True)
class Typical:
    epsilon: float = 0.09
    delta: float = 0.3

    def __post_init__(self) -> None:
        if not (0 < self.epsilon <= 1 and 0 < self.delta):
            raise TypicalSettingError(
                f"typical acceptance needs 0 < epsilon <= 1 and delta > 0, got "
                f"epsilon={self.epsilon}, delta={self.delta}"
            )


def engine_typical(environ: Mapping[str, str] = os.environ) -> Typical | None:
    """The engine-wide setting from `VLLM_MEDUSA_TYPICAL`: unset, "0", "1" or "epsilon,delta"."""
    value = environ.get(TYPICAL_ENV, "").strip()
    if value in ("", "0"):
        return None
    if value == "1":
        return Typical()
    try:
        epsilon, delta = (float(x) for x in value.split(","))
    except ValueError:
        raise TypicalSettingError(
            f"{TYPICAL_ENV}={value!r}: write 1 (defaults), 0 (off) or EPSILON,DELTA, e.g. 0.09,0.3"
        ) from None
    return Typical(epsilon, delta)


def request_typical(
    extra_args: Mapping[str, Any] | None, default: Typical | None
) -> Typical | None:
    """A request's setting: its `extra_args` override the engine's."""
    extra = extra_args or {}
    if REQUEST_KEY not in extra:
        return default
    if not extra[REQUEST_KEY]:
        return None
    base = default or Typical()
    return Typical(
        float(extra.get(EPSILON_KEY, base.epsilon)), float(extra.get(DELTA_KEY, base.delta))
    )


def typical_nodes(
    tree: MedusaTree,
    logprobs_at: Callable[[int], torch.Tensor],  # node -> [vocab] the target's log-probs there
    tokens: list[int],  # [n] the draft nodes' tokens
    setting: Typical,
) -> list[int]:
    """The accepted path (draft nodes, root excluded) under typical acceptance. The target's
    distribution is asked for only where it decides something: at the root and at accepted
    nodes (it is the costly part on a large vocabulary)."""
    thresholds: dict[int, float] = {}

    def passes(parent: int, token: int) -> tuple[bool, float]:
        logprobs = logprobs_at(parent)
        if parent not in thresholds:
            entropy = float(-(logprobs.exp() * logprobs.nan_to_num(neginf=0.0)).sum())
            thresholds[parent] = min(setting.epsilon, setting.delta * math.exp(-entropy))
        token_logprob = float(logprobs[token])
        return math.exp(token_logprob) > thresholds[parent], token_logprob

    best: tuple[int, float, int] = (0, 0.0, 0)  # (depth, total log-probability, node)
    accepted = {0: 0.0}  # node -> total log-probability of its path
    for node in range(1, len(tokens) + 1):
        parent = int(tree.parents[node])
        if parent not in accepted:
            continue
        typical, token_logprob = passes(parent, tokens[node - 1])
        if typical:
            accepted[node] = accepted[parent] + token_logprob
            candidate = (int(tree.depths[node]), accepted[node], node)
            if candidate[:2] > best[:2]:
                best = candidate
    return tree.ancestry(best[2])
