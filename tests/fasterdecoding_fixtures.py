"""FasterDecoding/Medusa-shaped checkpoints for the converter tests.

Mimics FasterDecoding's code (``medusa/model/medusa_model.py``): a ResBlock is
``x + SiLU(Linear(x))`` with bias, and a head is
``nn.Sequential(*([ResBlock(H)] * L), nn.Linear(H, V, bias=False))`` -- one block
object applied L times -- saved the ways published checkpoints are saved.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file, save_model
from torch import nn


class ResBlock(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.linear(x))


def make_heads(
    hidden: int,
    vocab: int,
    num_heads: int,
    num_layers: int,
    own_lm_head: bool = True,
    seed: int = 0,
) -> nn.ModuleList:
    """FasterDecoding heads with random (not zero) weights so outputs mean something."""
    torch.manual_seed(seed)
    return nn.ModuleList(
        nn.Sequential(
            *([ResBlock(hidden)] * num_layers),
            *([nn.Linear(hidden, vocab, bias=False)] if own_lm_head else []),
        )
        for _ in range(num_heads)
    )


def reference_outputs(
    heads: nn.ModuleList, x: torch.Tensor, lm_head: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Per-head outputs: logits, or hidden states when version-2 heads get no lm_head."""
    with torch.no_grad():
        outs = [head(x) for head in heads]
    return [out @ lm_head.T for out in outs] if lm_head is not None else outs


def heads_config(num_heads: int, num_layers: int | None, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "medusa_num_heads": num_heads,
        "base_model_name_or_path": "lmsys/vicuna-7b-v1.3",
        "transformers_version": "4.33.0",
    }
    if num_layers is not None:
        config["medusa_num_layers"] = num_layers
    config.update(extra)
    return config


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


def save_heads_folder(
    folder: Path, heads: nn.ModuleList, config: dict[str, Any], fmt: str = "pt"
) -> Path:
    """Heads-only folder: torch.save keeps shared keys, save_model drops them."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "config.json", config)
    if fmt == "pt":
        torch.save(heads.state_dict(), folder / "medusa_lm_head.pt")
    else:
        save_model(heads, str(folder / "medusa_lm_head.safetensors"))
    return folder


def base_tensors(hidden: int, vocab: int, tied: bool, seed: int = 1) -> dict[str, torch.Tensor]:
    """A few fake base-model tensors (enough to hold an lm_head)."""
    g = torch.Generator().manual_seed(seed)
    out = {
        "model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g),
        "model.norm.weight": torch.ones(hidden),
        "model.layers.0.mlp.down_proj.weight": torch.randn(hidden, hidden, generator=g),
    }
    if not tied:
        out["lm_head.weight"] = torch.randn(vocab, hidden, generator=g)
    return out


def base_config(hidden: int, vocab: int, tied: bool = False, **extra: Any) -> dict[str, Any]:
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
    }
    config.update(extra)
    return config


def save_base_model(folder: Path, hidden: int, vocab: int, tied: bool = False) -> torch.Tensor:
    """A base model folder; returns its lm_head [V, H] (the embeddings when tied)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "config.json", base_config(hidden, vocab, tied))
    tensors = base_tensors(hidden, vocab, tied)
    save_file(tensors, str(folder / "model.safetensors"))
    return tensors["model.embed_tokens.weight" if tied else "lm_head.weight"]


def _dedup(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What save_pretrained does for safetensors: drop names sharing storage."""
    seen: set[int] = set()
    out = {}
    for key, value in state.items():
        ptr = value.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            out[key] = value.contiguous()
    return out


def save_full_model(
    folder: Path,
    heads: nn.ModuleList,
    hidden: int,
    vocab: int,
    fmt: str = "safetensors",
    sharded: bool = True,
    config_extra: dict[str, Any] | None = None,
) -> torch.Tensor:
    """A Medusa-2 full model: base tensors plus medusa_head.*; returns the base lm_head."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "config.json", base_config(hidden, vocab, **(config_extra or {})))
    base = base_tensors(hidden, vocab, tied=False)
    medusa = {f"medusa_head.{k}": v for k, v in heads.state_dict().items()}
    if fmt == "safetensors":
        medusa = _dedup(medusa)
    shards = [base, medusa] if sharded else [{**base, **medusa}]
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"{stem}-{i:05d}-of-{len(shards):05d}.{ext}" if sharded else f"{stem}.{ext}"
        if fmt == "safetensors":
            save_file(shard, str(folder / name), metadata={"format": "pt"})
        else:
            torch.save(shard, folder / name)
        weight_map.update({key: name for key in shard})
    if sharded:
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        write_json(folder / f"{stem}.{ext}.index.json", index)
    return base["lm_head.weight"]
