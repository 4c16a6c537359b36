"""Surface: `vllm.transformers_utils.configs.medusa.MedusaConfig` (vLLM 0.32).

vLLM sizes Medusa heads from config.json alone. FasterDecoding configs omit the hidden size
and often undercount heads, and the same folder may hold per-head lm_heads or none. The
checkpoint's tensors are the truth: after vLLM parses the config, the fields that size the
model are overwritten with what the tensors say.
"""

from __future__ import annotations

import os
from typing import Any

_ORIGINAL_ATTR = "_vllm_medusa_original_from_pretrained"


def describe_heads(path: str | os.PathLike) -> dict[str, Any]:
    """The config fields a heads folder's tensors imply, in vLLM MedusaConfig names."""
    from vllm_medusa.converters import ConversionError, load_checkpoint

    try:
        ckpt = load_checkpoint(path)
    except ConversionError as e:
        raise ValueError(f"speculative model {os.fspath(path)!r}: {e}") from None
    fields: dict[str, Any] = {
        "num_heads": ckpt.num_heads,
        "num_hidden_layers": ckpt.num_layers,
        "hidden_size": ckpt.hidden_size,
        "medusa_fc_bias": ckpt.has_bias,
        "original_lm_head": ckpt.original_lm_head,
        # Kept apart from num_heads, which vLLM later sets to num_speculative_tokens, and
        # from vocab_size, which it aligns with the target model's.
        "checkpoint_num_heads": ckpt.num_heads,
        "heads_vocab_size": ckpt.vocab_size,
    }
    if ckpt.vocab_size is not None:
        fields["vocab_size"] = ckpt.vocab_size
        fields["truncated_vocab_size"] = ckpt.vocab_size
    return fields


def apply() -> None:
    from vllm.transformers_utils.configs.medusa import MedusaConfig

    if hasattr(MedusaConfig, _ORIGINAL_ATTR):
        return
    original = MedusaConfig.from_pretrained.__func__
    setattr(MedusaConfig, _ORIGINAL_ATTR, original)

    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        config = original(cls, pretrained_model_name_or_path, **kwargs)
        if os.path.isdir(pretrained_model_name_or_path):
            for key, value in describe_heads(pretrained_model_name_or_path).items():
                setattr(config, key, value)
        return config

    MedusaConfig.from_pretrained = classmethod(from_pretrained)
