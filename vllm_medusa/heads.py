"""Heads shipped with the package, trained by `vllm-medusa train` (see their MODEL_CARD.md)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEFAULT_HEADS = "SmolLM2-135M-Instruct"


def default_heads_path() -> Path:
    """Heads for the default model, inside the installed package."""
    return Path(str(resources.files("vllm_medusa").joinpath("shipped_heads", DEFAULT_HEADS)))
