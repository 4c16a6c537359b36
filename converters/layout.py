"""The vLLM Medusa layout: tensor names, shape checks, reading and writing a folder.

Names (what vLLM's ``MedusaModel.load_weights`` expects)::

    blocks.{h}.layers.{l}.weight   [H, H]   residual block Linear
    blocks.{h}.layers.{l}.bias     [H]      only when medusa_fc_bias
    lm_heads.{h}.weight            [V, H]   own lm_head per head; with original_lm_head
                                            only lm_heads.0 may exist (the embedded base lm_head)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .checkpoint import ConversionError, MedusaCheckpoint
from .hffolder import weight_files
from .tensorio import load_many, read_json

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

_BLOCK_RE = re.compile(r"blocks\.(\d+)\.layers\.(\d+)\.(weight|bias)")
_LM_HEAD_RE = re.compile(r"lm_heads\.(\d+)\.weight")

# One residual block: (weight [H, H], bias [H] or None).
Block = tuple[torch.Tensor, torch.Tensor | None]


def block_key(head: int, layer: int, kind: str = "weight") -> str:
    return f"blocks.{head}.layers.{layer}.{kind}"


def lm_head_key(head: int) -> str:
    return f"lm_heads.{head}.weight"


def head_count(indices: set[int], origin: str) -> int:
    """Number of heads; indices must be exactly 0..N-1."""
    if not indices:
        raise ConversionError(
            f"{origin} holds no Medusa head tensors; is this a Medusa checkpoint?"
        )
    count = max(indices) + 1
    missing = sorted(set(range(count)) - indices)
    if missing:
        raise ConversionError(
            f"{origin} has heads up to index {count - 1} but head {missing[0]} is missing; "
            "the checkpoint is incomplete, re-download or re-export it"
        )
    return count


def assemble(
    blocks: list[list[Block]],
    lm_heads: list[torch.Tensor],
    original_lm_head: bool,
    vocab_size: int | None,
    source_config: dict[str, Any],
    origin: str,
) -> MedusaCheckpoint:
    """Check shapes and build the checkpoint; blocks[h][l] is head h's layer l.

    lm_heads: one [V, H] per head for own lm_heads; for original_lm_head either empty
    or [base lm_head] (embedded so that stock vLLM can load the folder).
    """
    hidden = blocks[0][0][0].shape[-1]
    has_bias = blocks[0][0][1] is not None
    num_layers = len(blocks[0])
    tensors: dict[str, torch.Tensor] = {}
    for h, layers in enumerate(blocks):
        if len(layers) != num_layers:
            raise ConversionError(
                f"{origin}: head {h} has {len(layers)} layers but head 0 has {num_layers}; "
                "heads with different depths are not supported"
            )
        for layer, (weight, bias) in enumerate(layers):
            if tuple(weight.shape) != (hidden, hidden):
                raise ConversionError(
                    f"{origin}: head {h} layer {layer} weight has shape {tuple(weight.shape)}, "
                    f"expected ({hidden}, {hidden}) like head 0 layer 0; the checkpoint mixes "
                    "hidden sizes or is corrupt"
                )
            if (bias is not None) != has_bias:
                raise ConversionError(
                    f"{origin}: head {h} layer {layer} {'has' if bias is not None else 'lacks'} a "
                    "bias unlike head 0 layer 0; the checkpoint is inconsistent"
                )
            tensors[block_key(h, layer)] = weight
            if bias is not None:
                if tuple(bias.shape) != (hidden,):
                    raise ConversionError(
                        f"{origin}: head {h} layer {layer} bias has shape {tuple(bias.shape)}, "
                        f"expected ({hidden},); the checkpoint is corrupt"
                    )
                tensors[block_key(h, layer, "bias")] = bias
    for h, weight in enumerate(lm_heads):
        expected_vocab = vocab_size if vocab_size is not None else weight.shape[0]
        if weight.dim() != 2 or tuple(weight.shape) != (expected_vocab, hidden):
            raise ConversionError(
                f"{origin}: lm_head of head {h} has shape {tuple(weight.shape)}, expected "
                f"({expected_vocab}, {hidden}) [vocab, hidden]; heads disagree on the "
                "vocabulary or hidden size"
            )
        vocab_size = expected_vocab
        tensors[lm_head_key(h)] = weight
    return MedusaCheckpoint(
        num_heads=len(blocks),
        num_layers=num_layers,
        hidden_size=hidden,
        vocab_size=vocab_size,
        has_bias=has_bias,
        original_lm_head=original_lm_head,
        tensors=tensors,
        source_config=source_config,
    )


def is_vllm_config(config: dict[str, Any]) -> bool:
    archs = config.get("architectures") or []
    return config.get("model_type") == "medusa" or "MedusaModel" in archs


def read_vllm(folder: Path) -> MedusaCheckpoint:
    """A folder in vLLM's layout (written by us or by anyone following vLLM's names)."""
    config = read_json(folder / CONFIG_NAME)
    origin = str(folder)
    raw = load_many(weight_files(folder))
    blocks: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    lm_heads: dict[int, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in raw.items():
        if match := _BLOCK_RE.fullmatch(key):
            h, layer, kind = int(match[1]), int(match[2]), match[3]
            blocks.setdefault(h, {}).setdefault(layer, {})[kind] = tensor
        elif match := _LM_HEAD_RE.fullmatch(key):
            lm_heads[int(match[1])] = tensor
        else:
            unknown.append(key)
    if "token_map" in unknown:
        raise ConversionError(
            f"{origin} uses a truncated vocabulary (token_map); such checkpoints are not supported"
        )
    if unknown:
        raise ConversionError(
            f"{origin}: unexpected tensors {', '.join(sorted(unknown)[:3])}"
            f"{' ...' if len(unknown) > 3 else ''}; vLLM Medusa folders hold only "
            "blocks.{h}.layers.{l}.weight/bias and lm_heads.{h}.weight"
        )
    num_heads = head_count(set(blocks), origin)
    if config.get("num_heads", num_heads) != num_heads:
        raise ConversionError(
            f"{origin}: config.json says num_heads={config['num_heads']} but the weights hold "
            f"{num_heads} heads; fix config.json"
        )
    num_layers = config.get("num_hidden_layers")
    if not isinstance(num_layers, int) or num_layers < 1:
        num_layers = max(max(layers) for layers in blocks.values()) + 1
    ordered: list[list[Block]] = []
    for h in range(num_heads):
        layers = blocks[h]
        if sorted(layers) != list(range(num_layers)):
            raise ConversionError(
                f"{origin}: head {h} has layers {sorted(layers)}, expected 0..{num_layers - 1} "
                "(num_hidden_layers); the checkpoint is incomplete or config.json is wrong"
            )
        for layer, parts in layers.items():
            if "weight" not in parts:
                raise ConversionError(f"{origin}: {block_key(h, layer)} is missing")
        ordered.append([(layers[i]["weight"], layers[i].get("bias")) for i in range(num_layers)])
    original = bool(config.get("original_lm_head", False))
    expected = [0] if original and lm_heads else list(range(num_heads))
    if not (original and not lm_heads) and sorted(lm_heads) != expected:
        raise ConversionError(
            f"{origin}: found lm_heads {sorted(lm_heads)}, expected {expected} with "
            f"original_lm_head={str(original).lower()}; fix config.json or the weights"
        )
    vocab = config.get("vocab_size")
    checkpoint = assemble(
        ordered,
        [lm_heads[i] for i in sorted(lm_heads)],
        original,
        vocab if isinstance(vocab, int) else None,
        config,
        origin,
    )
    if "medusa_fc_bias" in config and bool(config["medusa_fc_bias"]) != checkpoint.has_bias:
        raise ConversionError(
            f"{origin}: config.json medusa_fc_bias={config['medusa_fc_bias']} disagrees with the "
            "weights; fix config.json"
        )
    return checkpoint


def write_folder(checkpoint: MedusaCheckpoint, folder: Path, dtype: torch.dtype) -> None:
    """Write config.json and model.safetensors into an existing (temporary) folder."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in checkpoint.tensors.items():
        tensor = tensor.to(dtype).contiguous()
        # Shared ResBlocks appear under several names; safetensors refuses shared storage.
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    save_file(out, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    config = checkpoint.to_config(dtype)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
