"""Surface: `vllm.ModelRegistry` (public API, vLLM 0.32)."""

from __future__ import annotations

ARCHITECTURE = "MedusaModel"


def apply() -> None:
    from vllm import ModelRegistry

    # A lazy "module:Class" reference keeps processes that never load heads from importing
    # torch modules they do not need.
    ModelRegistry.register_model(ARCHITECTURE, "vllm_medusa.model:MedusaHeads")
