"""Surface: `vllm.v1.structured_output.StructuredOutputManager` (vLLM 0.32), in the
scheduler's process.

vLLM checks a request's drafts against its grammar and computes grammar masks for them as a
chain: draft j follows draft j-1. A tree's drafts are its nodes, each after its parent, where
node j's parent is often not node j-1, so those masks would constrain the wrong rows. While the
engine verifies trees, requests with structured outputs therefore get no drafts: each of
their steps samples one token under its grammar, exactly as without speculation, and the
other requests of the batch keep their trees. Chains are vLLM's own case and stay unchanged.
"""

from __future__ import annotations

from typing import Any

_ORIGINAL_ATTR = "_vllm_medusa_original_validate_tokens"


def _verifies_trees(vllm_config: Any) -> bool:
    from vllm_medusa.tree import serves_tree

    spec = getattr(vllm_config, "speculative_config", None)
    if spec is None or spec.method != "medusa" or spec.draft_model_config is None:
        return False
    return serves_tree(spec.draft_model_config.hf_config)


def apply() -> None:
    from vllm.v1.structured_output import StructuredOutputManager

    if hasattr(StructuredOutputManager, _ORIGINAL_ATTR):
        return
    original = StructuredOutputManager.validate_tokens
    setattr(StructuredOutputManager, _ORIGINAL_ATTR, original)

    def validate_tokens(self, request: Any, spec_tokens: list[int]) -> list[int]:
        if request.use_structured_output and _verifies_trees(self.vllm_config):
            return []
        return original(self, request, spec_tokens)

    StructuredOutputManager.validate_tokens = validate_tokens
