"""Drafting settings: copy branches, the draft vocabulary and confidence pruning.

- Copy branch: the longest suffix of the request's tokens (prompt and output so far), between
  `min_match` and `max_match` tokens long, is looked up at earlier positions; the
  `copy_length` tokens that followed it become a branch from the root of the request's tree.
  Medusa heads read one hidden state and cannot see that the text is repeating; the branch
  can. The matcher is vLLM's own prompt-lookup kernel (numba, one pass over the request's
  tokens); where the longest suffix occurs more than once it takes the earliest occurrence.
- Draft vocabulary: the heads propose only the `draft_vocab` tokens the target says most often
  (`vllm_medusa.draft_vocab`), so their projection reads that many rows, not the vocabulary.
- Pruning: a Medusa node whose path probability under the heads (the product of the heads'
  softmax probabilities along its path) is below `prune_below` is not drafted for that
  request and step, so unsure steps verify fewer nodes.

Set in the heads' config.json under "medusa_drafting" (e.g. {"copy": true, "prune_below":
0.01}), overridden per process by `VLLM_MEDUSA_DRAFTING` holding the same JSON object (keys
given there win). Resolved once where the settings are parsed and carried to the engine's
processes on the heads' config.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

DRAFTING_ENV = "VLLM_MEDUSA_DRAFTING"
CONFIG_KEY = "medusa_drafting"
# Where the resolved settings travel, on the heads' config, to the engine's processes.
RESOLVED_ATTR = "vllm_medusa_drafting"


class DraftingError(ValueError):
    """Drafting settings that cannot be used as given."""


@dataclass(frozen=True)
class Drafting:
    copy: bool = False
    min_match: int = 2  # shortest suffix that counts as a repeat
    max_match: int = 8  # longest suffix looked up
    copy_length: int = 6  # tokens the branch proposes
    prune_below: float = 0.0  # Medusa nodes below this path probability are not drafted
    draft_vocab: int = 0  # heads draft from this many most frequent tokens (0: all)

    def __post_init__(self) -> None:
        if not isinstance(self.copy, bool):
            raise DraftingError(f"medusa_drafting copy={self.copy!r}: write true or false")
        for name in ("min_match", "max_match", "copy_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise DraftingError(
                    f"medusa_drafting {name}={value!r}: must be a whole number >= 1"
                )
        if (
            not isinstance(self.draft_vocab, int)
            or isinstance(self.draft_vocab, bool)
            or self.draft_vocab < 0
        ):
            raise DraftingError(
                f"medusa_drafting draft_vocab={self.draft_vocab!r}: must be a whole number "
                ">= 0 (0: the whole vocabulary)"
            )
        if self.min_match > self.max_match:
            raise DraftingError(
                f"medusa_drafting min_match={self.min_match} > max_match={self.max_match}: "
                "make min_match at most max_match"
            )
        if not isinstance(self.prune_below, (int, float)) or not 0 <= self.prune_below < 1:
            raise DraftingError(
                f"medusa_drafting prune_below={self.prune_below!r}: must be a number in [0, 1)"
            )

    @property
    def per_request(self) -> bool:
        """Whether requests get trees of their own (otherwise the static tree or chain)."""
        return self.copy or self.prune_below > 0

    @property
    def extra_nodes(self) -> int:
        """Drafts a request may have beyond the static tree's nodes."""
        return self.copy_length if self.copy else 0


def _parse(value: Any, source: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DraftingError(
                f"{source} is not JSON ({e}): write e.g. '{{\"copy\": true}}'"
            ) from None
    if not isinstance(value, Mapping):
        raise DraftingError(f'{source} must be a JSON object, e.g. {{"copy": true}}')
    known = {f.name for f in fields(Drafting)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise DraftingError(
            f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    return dict(value)


def configured_drafting(config_value: Any, environ: Mapping[str, str] = os.environ) -> Drafting:
    """The heads' config.json "medusa_drafting", with `VLLM_MEDUSA_DRAFTING`'s keys on top."""
    settings = {} if config_value is None else _parse(config_value, f"heads' {CONFIG_KEY}")
    env = environ.get(DRAFTING_ENV, "").strip()
    if env:
        settings.update(_parse(env, DRAFTING_ENV))
    try:
        return Drafting(**settings)
    except TypeError as e:  # a value of the wrong kind in a comparison
        raise DraftingError(f"{CONFIG_KEY}: {e}") from None


def resolved_form(drafting: Drafting) -> dict[str, Any]:
    return asdict(drafting)


def drafting_of_heads(heads_config: Any) -> Drafting:
    """The settings resolved where the engine's settings were parsed (see module docstring)."""
    resolved = getattr(heads_config, RESOLVED_ATTR, None)
    return Drafting() if resolved is None else Drafting(**resolved)


def copy_branches(
    drafting: Drafting,
    token_ids: np.ndarray,  # [max_reqs, max_model_len] each request's tokens so far
    num_tokens: np.ndarray,  # [max_reqs] how many of each row are real
    num_reqs: int,
    max_model_len: int,
) -> list[np.ndarray]:
    """Per request: the tokens after an earlier occurrence of its longest repeated suffix (at
    most `copy_length`; empty when nothing repeats)."""
    # Imported here: loading numba's compiled functions before vLLM's worker start-up breaks
    # its scan of loaded modules for Triton kernels (vLLM 0.32, CPU platform).
    from vllm.v1.spec_decode.ngram_proposer import (
        _find_longest_matched_ngram_and_propose_tokens as match,
    )

    return [
        match(
            token_ids[r, : num_tokens[r]],
            drafting.min_match,
            drafting.max_match,
            max_model_len,
            drafting.copy_length,
        )
        for r in range(num_reqs)
    ]
