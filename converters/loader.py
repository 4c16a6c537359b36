"""Format detection and the one loader for every Medusa folder (used by the plugin too)."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import ConversionError, MedusaCheckpoint
from .fasterdecoding import FULL_PREFIX, heads_file, read_fasterdecoding
from .hffolder import tensor_names, weight_files
from .layout import CONFIG_NAME, is_vllm_config, read_vllm
from .tensorio import read_json

FORMATS = ("fasterdecoding-heads", "fasterdecoding-full", "vllm")


def checkpoint_folder(path: str | Path) -> Path:
    """The source folder, or a ConversionError saying why it cannot be one."""
    folder = Path(path)
    if not folder.exists():
        raise ConversionError(f"{folder} does not exist; pass the folder of a Medusa checkpoint")
    if not folder.is_dir():
        raise ConversionError(
            f"{folder} is not a folder; pass the folder that holds config.json and the weights"
        )
    if not (folder / CONFIG_NAME).is_file():
        raise ConversionError(
            f"no config.json in {folder}; download it next to the weights (Medusa folders "
            "need it for the head count and base model)"
        )
    return folder


def detect_format(path: str | Path) -> str:
    """One of FORMATS; ConversionError for anything that is not a Medusa checkpoint."""
    folder = checkpoint_folder(path)
    if heads_file(folder) is not None:
        return "fasterdecoding-heads"
    config = read_json(folder / CONFIG_NAME)
    if is_vllm_config(config):
        weight_files(folder)  # raises when there are none
        return "vllm"
    if (
        "medusa_num_heads" in config
        and not any(folder.glob("*.safetensors"))
        and not any(folder.glob("*.bin"))
    ):
        raise ConversionError(
            f"no weights in {folder}: expected medusa_lm_head.safetensors or "
            "medusa_lm_head.pt next to config.json; download the heads file"
        )
    names = tensor_names(folder)  # raises when there are no weights at all
    if names is None or any(name.startswith(FULL_PREFIX) for name in names):
        return "fasterdecoding-full"  # unindexed pickles: confirmed while loading
    raise ConversionError(
        f"{folder} holds no Medusa heads (no medusa_lm_head.* file, no {FULL_PREFIX}* tensors, "
        "config.json is not model_type medusa); pass a Medusa checkpoint folder"
    )


def load_checkpoint(path: str | Path) -> MedusaCheckpoint:
    """Any supported Medusa folder as a checkpoint in vLLM naming."""
    fmt = detect_format(path)
    folder = Path(path)
    if fmt == "vllm":
        return read_vllm(folder)
    return read_fasterdecoding(folder, fmt, read_json(folder / CONFIG_NAME))
