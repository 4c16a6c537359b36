"""Hugging Face model folders: finding weight shards and the base model's lm_head.

Only the shards that hold the wanted tensors are opened, so extracting a few
heads from a 7B checkpoint does not read the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import ConversionError
from .tensorio import KeyFilter, load_many, read_json, safetensors_keys

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def weight_map(folder: Path) -> dict[str, Path] | None:
    """Tensor name -> shard file from the folder's index, or None without an index."""
    for name in INDEX_FILES:
        index_path = folder / name
        if not index_path.is_file():
            continue
        raw = read_json(index_path).get("weight_map")
        if not isinstance(raw, dict) or not raw:
            raise ConversionError(f"{index_path} has no weight_map; fix or re-download it")
        mapping = {str(key): folder / str(shard) for key, shard in raw.items()}
        for shard in sorted(set(mapping.values())):
            if not shard.is_file():
                raise ConversionError(
                    f"{index_path} lists shard {shard.name}, which is missing; download it"
                )
        return mapping
    return None


def weight_files(folder: Path) -> list[Path]:
    """The folder's weight files: index shards, else the single file, else any found."""
    mapping = weight_map(folder)
    if mapping is not None:
        return sorted(set(mapping.values()))
    for name in SINGLE_FILES:
        if (folder / name).is_file():
            return [folder / name]
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        found = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not found:
        raise ConversionError(
            f"no weights in {folder} (looked for *.safetensors, *.bin, *.pt and their "
            "index files); download the weights next to config.json"
        )
    return found


def tensor_names(folder: Path) -> list[str] | None:
    """All tensor names, when knowable without unpickling (index or safetensors headers)."""
    mapping = weight_map(folder)
    if mapping is not None:
        return list(mapping)
    files = weight_files(folder)
    if any(f.suffix != ".safetensors" for f in files):
        return None
    return [key for f in files for key in safetensors_keys(f)]


def load_selected(folder: Path, keep: KeyFilter) -> dict[str, torch.Tensor]:
    """The tensors ``keep`` accepts, opening only the shards that hold them."""
    mapping = weight_map(folder)
    if mapping is None:
        return load_many(weight_files(folder), keep)
    shards = sorted({shard for key, shard in mapping.items() if keep(key)})
    return load_many(shards, keep)


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language-model part of a config (multimodal configs nest it)."""
    nested = config.get("text_config")
    if isinstance(nested, dict) and "hidden_size" not in config:
        return nested
    return config


@dataclass
class BaseModel:
    """The target model given with --base-model: its sizes and, on demand, its lm_head."""

    path: Path
    hidden_size: int
    vocab_size: int
    tie_word_embeddings: bool

    @classmethod
    def open(cls, path: str | Path) -> BaseModel:
        folder = Path(path)
        if not folder.is_dir():
            raise ConversionError(
                f"base model {folder} is not a folder; pass a Hugging Face model folder"
            )
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise ConversionError(
                f"base model {folder} has no config.json; pass a Hugging Face model folder"
            )
        config = text_config(read_json(config_path))
        hidden, vocab = config.get("hidden_size"), config.get("vocab_size")
        if not isinstance(hidden, int) or not isinstance(vocab, int):
            raise ConversionError(
                f"{config_path} lacks integer hidden_size/vocab_size; is this a causal LM folder?"
            )
        tied = bool(config.get("tie_word_embeddings", False))
        return cls(folder, hidden, vocab, tied)

    def lm_head(self) -> torch.Tensor:
        """The output projection [vocab, hidden]: lm_head.weight, or the tied embeddings."""
        names = ["lm_head.weight", "model.embed_tokens.weight"]
        if self.tie_word_embeddings:
            names.reverse()
        found = load_selected(self.path, lambda key: key in names)
        for name in names:
            if name in found:
                weight = found[name]
                if tuple(weight.shape) != (self.vocab_size, self.hidden_size):
                    raise ConversionError(
                        f"base model {name} has shape {tuple(weight.shape)}, config says "
                        f"({self.vocab_size}, {self.hidden_size}); the base model folder is "
                        "inconsistent"
                    )
                return weight
        raise ConversionError(
            f"base model {self.path} holds neither lm_head.weight nor model.embed_tokens.weight; "
            "pass the folder of a Llama-style causal LM"
        )
