"""Safe reading of JSON configs and weight files, with library errors rephrased.

Pickled checkpoints (.pt/.bin) are always loaded with ``weights_only=True``: a
downloaded checkpoint must never be able to run code on the converting machine.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .checkpoint import ConversionError

KeyFilter = Callable[[str], bool]


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path`` (config or shard index)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversionError(f"{path} is missing; the folder is incomplete") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"cannot read {path}: {exc}; fix or re-download the file") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} does not hold a JSON object; fix or re-download it")
    return data


def _corrupt(path: Path, exc: BaseException) -> ConversionError:
    return ConversionError(
        f"cannot read {path}: {type(exc).__name__}: {str(exc).split('. ')[0]}; "
        "the file is truncated or corrupt, re-download it"
    )


def safetensors_keys(path: Path) -> list[str]:
    """Tensor names in a .safetensors file, reading only its header."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except Exception as exc:  # SafetensorError, OSError, ...: all mean unreadable
        raise _corrupt(path, exc) from None


def load_safetensors(path: Path, keep: KeyFilter | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, only those ``keep`` accepts (read lazily)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {
                key: handle.get_tensor(key) for key in handle.keys() if keep is None or keep(key)
            }
    except Exception as exc:
        raise _corrupt(path, exc) from None


def load_pickle(path: Path, keep: KeyFilter | None = None) -> dict[str, torch.Tensor]:
    """A torch.save'd state dict of plain tensors; anything else is refused."""
    try:
        data = torch.load(str(path), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = found[1] if found else str(exc).strip().splitlines()[0]
        raise ConversionError(
            f"refusing {path}: it holds objects other than tensors ({what}; weights_only load "
            "failed); checkpoints may never run code, re-save it as a plain state dict of "
            "tensors or as .safetensors"
        ) from None
    except Exception as exc:  # RuntimeError from the zip reader, EOFError, OSError
        raise _corrupt(path, exc) from None
    if not isinstance(data, dict):
        raise ConversionError(
            f"{path} holds a {type(data).__name__}, not a state dict; re-save it with "
            "torch.save(module.state_dict(), ...)"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in data.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ConversionError(
                f"{path} is not a plain state dict: entry {key!r} holds a "
                f"{type(value).__name__}; re-save it with torch.save(module.state_dict(), ...)"
            )
        if keep is None or keep(key):
            out[key] = value
    return out


def load_weights(path: Path, keep: KeyFilter | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or pickled (.pt/.bin/.pth) weight file."""
    if path.suffix == ".safetensors":
        return load_safetensors(path, keep)
    return load_pickle(path, keep)


def load_many(paths: Iterable[Path], keep: KeyFilter | None = None) -> dict[str, torch.Tensor]:
    """Tensors of several shards merged; a name in two shards is an error."""
    out: dict[str, torch.Tensor] = {}
    for path in paths:
        for key, value in load_weights(path, keep).items():
            if key in out:
                raise ConversionError(
                    f"tensor {key} appears in more than one shard (again in {path}); "
                    "the checkpoint is inconsistent, re-download it"
                )
            out[key] = value
    return out
