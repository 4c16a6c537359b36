"""The in-memory Medusa checkpoint that every reader fills and every writer consumes.

Tensors are always held under vLLM's names (see ``layout``), so conversion is
"read any format into this, write this out" and the plugin needs one loader only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# The dtypes vLLM loads Medusa heads in; anything else must be cast with --dtype.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class ConversionError(ValueError):
    """A bad input, told in one line: what is wrong and what to do about it."""

    def __init__(self, message: str) -> None:
        # Library messages (torch, safetensors) span lines; the CLI promises one line.
        super().__init__(" ".join(part.strip() for part in message.splitlines() if part.strip()))


def dtype_name(dtype: torch.dtype | str) -> str:
    """Name of a supported dtype ("float32", "bfloat16", "float16")."""
    if isinstance(dtype, str):
        if dtype in DTYPES:
            return dtype
    else:
        for name, value in DTYPES.items():
            if value == dtype:
                return name
    raise ConversionError(
        f"dtype {dtype} is not supported for Medusa heads; "
        "pass --dtype float32, bfloat16 or float16"
    )


@dataclass
class MedusaCheckpoint:
    """Medusa heads in vLLM naming, plus the facts the target config needs.

    vocab_size is None for heads that reuse the target's lm_head (original_lm_head)
    when no base model told us the vocabulary: the plugin aligns it at load time.
    With original_lm_head, tensors may hold lm_heads.0.weight [V, H]: the base lm_head
    embedded with --embed-lm-head so that stock vLLM can load the folder.
    """

    num_heads: int
    num_layers: int
    hidden_size: int
    vocab_size: int | None
    has_bias: bool
    original_lm_head: bool
    tensors: dict[str, torch.Tensor]
    source_config: dict[str, Any] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the residual blocks (the tensors every format has)."""
        return self.tensors["blocks.0.layers.0.weight"].dtype

    def to_config(self, dtype: torch.dtype | str) -> dict[str, Any]:
        """The vLLM ``config.json`` for these heads stored in ``dtype``."""
        config: dict[str, Any] = {
            "model_type": "medusa",
            "architectures": ["MedusaModel"],
            "hidden_size": self.hidden_size,
        }
        if self.vocab_size is not None:
            config["vocab_size"] = self.vocab_size
        config.update(
            num_heads=self.num_heads,
            num_hidden_layers=self.num_layers,
            medusa_fc_bias=self.has_bias,
            original_lm_head=self.original_lm_head,
        )
        if self.vocab_size is not None:
            config["truncated_vocab_size"] = self.vocab_size
        config["torch_dtype"] = dtype_name(dtype)
        base = self.source_config.get("base_model_name_or_path")
        if base:
            config["base_model_name_or_path"] = base
        # The Medusa tree these heads are meant to verify travels with them.
        tree = self.source_config.get("medusa_choices")
        if tree is not None:
            config["medusa_choices"] = tree
        return config
