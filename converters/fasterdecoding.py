"""Reading FasterDecoding/Medusa checkpoints (heads-only folders and full Medusa-2 models).

FasterDecoding names (heads-only file; full models prefix them with ``medusa_head.``)::

    {h}.{l}.linear.weight  [H, H]    {h}.{l}.linear.bias  [H]
    {h}.{L}.weight         [V, H]    the head's own lm_head (v1); absent in version 2

The reference builds a head as ``nn.Sequential(*([ResBlock(H)] * L), nn.Linear(H, V))``:
ONE block object applied L times. torch.save keeps a key per layer (same tensor), while
safetensors drops the duplicates and may keep only ``{h}.0.linear.*``; a missing layer
l < L therefore means "layer 0's block". L comes from the lm_head key's index, else
config ``medusa_num_layers``, else the largest layer index + 1. The head count comes
from the tensors (published configs undercount it), with a warning on mismatch.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch

from .checkpoint import ConversionError, MedusaCheckpoint
from .hffolder import load_selected
from .layout import Block, assemble, head_count
from .tensorio import load_weights

HEAD_FILES = ("medusa_lm_head.safetensors", "medusa_lm_head.pt", "medusa_lm_head.bin")
FULL_PREFIX = "medusa_head."

_RES_RE = re.compile(r"(\d+)\.(\d+)\.linear\.(weight|bias)")
_PROJ_RE = re.compile(r"(\d+)\.(\d+)\.weight")


class MedusaConfigWarning(UserWarning):
    """The source config.json disagrees with its tensors (the tensors win)."""


def heads_file(folder: Path) -> Path | None:
    """The heads-only weight file, preferring safetensors (no unpickling)."""
    return next((folder / n for n in HEAD_FILES if (folder / n).is_file()), None)


def read_raw(folder: Path, fmt: str) -> dict[str, torch.Tensor]:
    """Head tensors in FasterDecoding naming ({h}.{l}.linear.weight ...), prefix stripped."""
    if fmt == "fasterdecoding-heads":
        path = heads_file(folder)
        assert path is not None
        return load_weights(path)
    raw = load_selected(folder, lambda key: key.startswith("medusa"))
    stray = sorted(key for key in raw if not key.startswith(FULL_PREFIX))
    if stray:
        raise ConversionError(
            f"{folder}: unexpected tensors {', '.join(stray[:3])}; Medusa heads in a full "
            f"model are named {FULL_PREFIX}{{h}}.{{l}}.linear.weight/bias and "
            f"{FULL_PREFIX}{{h}}.{{L}}.weight"
        )
    if not raw:
        raise ConversionError(
            f"{folder} holds no {FULL_PREFIX}* tensors; pass a Medusa checkpoint, not a plain model"
        )
    return {key[len(FULL_PREFIX) :]: value for key, value in raw.items()}


def _config_int(config: dict[str, Any], key: str) -> int | None:
    value = config.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _warn(message: str) -> None:
    warnings.warn(message, MedusaConfigWarning, stacklevel=3)


def parse_heads(
    raw: dict[str, torch.Tensor], config: dict[str, Any], origin: str, prefix: str = ""
) -> MedusaCheckpoint:
    """Turn FasterDecoding-named tensors into a checkpoint, resolving shared blocks."""
    res: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    proj: dict[int, tuple[int, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, tensor in raw.items():
        if match := _RES_RE.fullmatch(key):
            res.setdefault(int(match[1]), {}).setdefault(int(match[2]), {})[match[3]] = tensor
        elif (match := _PROJ_RE.fullmatch(key)) and int(match[1]) not in proj:
            proj[int(match[1])] = (int(match[2]), tensor)
        else:
            unknown.append(prefix + key)
    if unknown:
        unknown.sort()
        raise ConversionError(
            f"{origin}: unexpected tensors {', '.join(unknown[:3])}"
            f"{f' (+{len(unknown) - 3} more)' if len(unknown) > 3 else ''}; expected only "
            f"{prefix}{{h}}.{{l}}.linear.weight/bias and {prefix}{{h}}.{{L}}.weight"
        )
    num_heads = head_count(set(res) | set(proj), origin)
    without_blocks = sorted(set(proj) - set(res))
    if without_blocks:
        raise ConversionError(
            f"{origin}: head {without_blocks[0]} has an lm_head but no residual block "
            f"({prefix}{without_blocks[0]}.0.linear.weight); the checkpoint is incomplete"
        )
    if proj and len(proj) != num_heads:
        lacking = sorted(set(range(num_heads)) - set(proj))
        raise ConversionError(
            f"{origin}: head {lacking[0]} has no lm_head ({prefix}{lacking[0]}.{{L}}.weight) "
            "while other heads have one; the checkpoint is incomplete"
        )
    num_layers = _layer_count(res, proj, config, origin, prefix)
    blocks: list[list[Block]] = []
    for h in range(num_heads):
        layers = res[h]
        if 0 not in layers:
            raise ConversionError(
                f"{origin}: head {h} has no layer 0 ({prefix}{h}.0.linear.weight); "
                "the checkpoint is incomplete"
            )
        head: list[Block] = []
        for layer in range(num_layers):
            parts = layers.get(layer, layers[0])  # shared ResBlock: missing layer = layer 0
            if "weight" not in parts:
                raise ConversionError(
                    f"{origin}: {prefix}{h}.{layer}.linear.bias has no matching weight; "
                    "the checkpoint is incomplete"
                )
            head.append((parts["weight"], parts.get("bias")))
        blocks.append(head)
    configured = _config_int(config, "medusa_num_heads")
    if configured is not None and configured != num_heads:
        _warn(
            f"{origin}: config.json says medusa_num_heads={configured} but the weights hold "
            f"{num_heads} heads; using {num_heads}"
        )
    vocab = None if proj else _config_int(config, "vocab_size")
    checkpoint = assemble(
        blocks, [proj[h][1] for h in sorted(proj)], not proj, vocab, config, origin
    )
    _check_against_config(checkpoint, config, origin)
    return checkpoint


def _layer_count(
    res: dict[int, dict[int, dict[str, torch.Tensor]]],
    proj: dict[int, tuple[int, torch.Tensor]],
    config: dict[str, Any],
    origin: str,
    prefix: str,
) -> int:
    """Layers per head: lm_head key index, else config medusa_num_layers, else max index + 1."""
    deepest = max(max(layers) for layers in res.values()) + 1
    configured = _config_int(config, "medusa_num_layers")
    if proj:
        depths = {h: index for h, (index, _) in proj.items()}
        count = depths[0]
        for h, depth in depths.items():
            if depth != count:
                raise ConversionError(
                    f"{origin}: head 0 has {count} layers but head {h} has {depth} (lm_head at "
                    f"{prefix}{h}.{depth}.weight); heads with different depths are not supported"
                )
        if count < 1 or deepest > count:
            raise ConversionError(
                f"{origin}: a residual block sits at layer index {deepest - 1} but the lm_head "
                f"is at index {count}; the checkpoint is inconsistent"
            )
        if configured is not None and configured != count:
            _warn(
                f"{origin}: config.json says medusa_num_layers={configured} but the weights hold "
                f"{count} layers; using {count}"
            )
        return count
    if configured is None:
        return deepest
    if deepest > configured:
        _warn(
            f"{origin}: config.json says medusa_num_layers={configured} but the weights hold "
            f"layer index {deepest - 1}; using {deepest} layers"
        )
        return deepest
    return configured


def _check_against_config(
    checkpoint: MedusaCheckpoint, config: dict[str, Any], origin: str
) -> None:
    """A full model's config describes the base model: the heads must fit it."""
    hidden = _config_int(config, "hidden_size")
    if hidden is not None and hidden != checkpoint.hidden_size:
        raise ConversionError(
            f"{origin}: heads have hidden size {checkpoint.hidden_size} but config.json says "
            f"hidden_size={hidden}; the heads belong to another model"
        )
    vocab = _config_int(config, "vocab_size")
    if vocab is not None and checkpoint.vocab_size is not None and vocab != checkpoint.vocab_size:
        raise ConversionError(
            f"{origin}: head lm_heads have {checkpoint.vocab_size} rows but config.json says "
            f"vocab_size={vocab}; the heads belong to another model"
        )


def read_fasterdecoding(folder: Path, fmt: str, config: dict[str, Any]) -> MedusaCheckpoint:
    """A FasterDecoding heads-only folder or full Medusa-2 model, as a checkpoint."""
    raw = read_raw(folder, fmt)
    prefix = FULL_PREFIX if fmt == "fasterdecoding-full" else ""
    return parse_heads(raw, config, str(folder), prefix)
