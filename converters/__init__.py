"""Medusa checkpoint conversion: FasterDecoding/Medusa folders -> vLLM's Medusa layout.

Reads three formats (see ``detect_format``): FasterDecoding heads-only folders
(config.json + medusa_lm_head.{pt,safetensors}), full Medusa-2 model folders
(base weights + ``medusa_head.*`` tensors) and the vLLM layout itself, so the plugin
loads every folder through ``load_checkpoint``.

Writes ``config.json`` (model_type "medusa") and ``model.safetensors`` with
``blocks.{h}.layers.{l}.weight/bias`` and ``lm_heads.{h}.weight``. Heads that reuse
the base model's lm_head (FasterDecoding version 2, ``original_lm_head: true``)
have no vocabulary of their own: ``vocab_size`` then comes from --base-model or the
source config, and when neither knows it, ``vocab_size``/``truncated_vocab_size`` are
omitted and the plugin aligns them with the target model at load time.
"""

from .checkpoint import ConversionError, MedusaCheckpoint
from .convert import convert_checkpoint, verify_conversion
from .loader import detect_format, load_checkpoint

__all__ = [
    "ConversionError",
    "MedusaCheckpoint",
    "convert_checkpoint",
    "detect_format",
    "load_checkpoint",
    "verify_conversion",
]
