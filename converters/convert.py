"""Conversion to the vLLM layout (atomic: temp folder + rename) and numerical verification.

Verification runs the source heads through a small reference of FasterDecoding's
head (Sequential of shared ResBlocks, built from the source tensors as keyed in the
source) and the written heads through a plain forward from vLLM names, on the same
seeded hidden states, and reports the largest absolute difference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import DTYPES, ConversionError, MedusaCheckpoint, dtype_name
from .fasterdecoding import read_raw
from .hffolder import BaseModel
from .layout import block_key, lm_head_key, read_vllm, write_folder
from .loader import checkpoint_folder, detect_format, load_checkpoint
from .staging import staged_folder

# Largest |difference| allowed, relative to max(1, largest |reference output|).
RELATIVE_TOLERANCE: dict[torch.dtype, float] = {
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}
VERIFY_ROWS = 32
VERIFY_SEED = 0


class VerificationError(ConversionError):
    """The converted heads compute something else than the source heads."""


@dataclass
class VerifyResult:
    max_abs_diff: float
    tolerance: float
    compared: str  # what was compared, for the report

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _prepare_dst(dst: Path, src: Path, base: Path | None, force: bool) -> Path:
    """Refuse an existing DST (unless --force) and any DST that would destroy an input."""
    target = dst.resolve()
    for name, path in (("SRC", src), ("--base-model", base)):
        if path is not None and _is_within(path.resolve(), target):
            raise ConversionError(f"DST {dst} would overwrite {name} {path}; choose another folder")
    if dst.exists() or dst.is_symlink():
        if not force:
            raise ConversionError(f"{dst} already exists; pass --force to replace it")
        if not dst.is_dir() or dst.is_symlink():
            raise ConversionError(f"{dst} exists and is not a folder; remove it or choose another")
    return target


def _apply_base_model(checkpoint: MedusaCheckpoint, base: BaseModel, embed: bool) -> None:
    """Check the heads against the target model, before anything is written."""
    if checkpoint.hidden_size != base.hidden_size:
        raise ConversionError(
            f"heads have hidden size {checkpoint.hidden_size} but base model {base.path} has "
            f"hidden_size={base.hidden_size}; these heads were trained for another model"
        )
    if checkpoint.vocab_size is not None and checkpoint.vocab_size != base.vocab_size:
        raise ConversionError(
            f"heads have a vocabulary of {checkpoint.vocab_size} but base model {base.path} has "
            f"vocab_size={base.vocab_size}; these heads were trained for another model"
        )
    checkpoint.vocab_size = base.vocab_size
    if embed:
        checkpoint.tensors[lm_head_key(0)] = base.lm_head()  # [V, H]


def run_conversion(
    src: str | Path,
    dst: str | Path,
    base_model: str | Path | None = None,
    dtype: str | None = None,
    embed_lm_head: bool = False,
    force: bool = False,
    verify: bool = False,
) -> tuple[MedusaCheckpoint, VerifyResult | None]:
    """convert_checkpoint plus optional verification of the temp folder before publishing."""
    src_path, dst_path = checkpoint_folder(src), Path(dst)
    base_path = Path(base_model) if base_model is not None else None
    out_dtype = DTYPES[dtype_name(dtype)] if dtype is not None else None
    if embed_lm_head and base_path is None:
        raise ConversionError("--embed-lm-head needs --base-model DIR to take the lm_head from")
    target = _prepare_dst(dst_path, src_path, base_path, force)
    checkpoint = load_checkpoint(src_path)
    if embed_lm_head and not checkpoint.original_lm_head:
        raise ConversionError(
            "--embed-lm-head only applies to heads that reuse the base lm_head (version 2); "
            "these heads have their own lm_heads, drop the flag"
        )
    base = BaseModel.open(base_path) if base_path is not None else None
    if base is not None:
        _apply_base_model(checkpoint, base, embed_lm_head)
    if out_dtype is None:
        out_dtype = DTYPES[dtype_name(checkpoint.dtype)]
    result = None
    with staged_folder(target) as tmp:
        write_folder(checkpoint, tmp, out_dtype)
        if verify:
            result = _verify(src_path, tmp, base)
            if not result.ok:
                raise VerificationError(
                    f"verification failed: max |difference| {result.max_abs_diff:.3g} over "
                    f"{result.compared} exceeds the tolerance {result.tolerance:.3g}; nothing "
                    "was written"
                )
    return checkpoint, result


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    base_model: str | Path | None = None,
    dtype: str | None = None,
    embed_lm_head: bool = False,
    *,
    force: bool = False,
) -> MedusaCheckpoint:
    """Convert any Medusa folder at ``src`` to the vLLM layout at ``dst`` (all or nothing)."""
    return run_conversion(src, dst, base_model, dtype, embed_lm_head, force)[0]


class _ResBlock(nn.Module):
    """FasterDecoding's ResBlock: x + SiLU(Linear(x))."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            if bias is not None:
                self.linear.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


def _reference(
    src: Path, checkpoint: MedusaCheckpoint
) -> tuple[list[nn.Module], list[torch.Tensor] | None]:
    """Reference head bodies and own lm_heads [V, H], from the source tensors as keyed there."""
    fmt = detect_format(src)
    if fmt == "vllm":
        raw = checkpoint.tensors
        weight, bias = "blocks.{h}.layers.{i}.weight", "blocks.{h}.layers.{i}.bias"
        lm_head = "lm_heads.{h}.weight"
    else:
        raw = read_raw(src, fmt)
        weight, bias = "{h}.{i}.linear.weight", "{h}.{i}.linear.bias"
        lm_head = f"{{h}}.{checkpoint.num_layers}.weight"
    bodies: list[nn.Module] = []
    for h in range(checkpoint.num_heads):
        blocks: list[nn.Module] = []
        for i in range(checkpoint.num_layers):
            key = weight.format(h=h, i=i)
            if key in raw:
                blocks.append(_ResBlock(raw[key].float(), _maybe(raw, bias.format(h=h, i=i))))
            else:
                blocks.append(blocks[0])  # [ResBlock(H)] * L: the same object again
        bodies.append(nn.Sequential(*blocks))
    if checkpoint.original_lm_head:
        return bodies, None
    return bodies, [raw[lm_head.format(h=h)].float() for h in range(checkpoint.num_heads)]


def _maybe(raw: dict[str, torch.Tensor], key: str) -> torch.Tensor | None:
    return raw[key].float() if key in raw else None


def _converted_head(tensors: dict[str, torch.Tensor], h: int, layers: int, x: torch.Tensor):
    """Head h's body from vLLM names (x: [rows, H] -> [rows, H])."""
    for i in range(layers):
        bias = tensors.get(block_key(h, i, "bias"))
        x = x + F.silu(F.linear(x, tensors[block_key(h, i)].float(), _float(bias)))
    return x


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def _verify(src: Path, dst: Path, base: BaseModel | None) -> VerifyResult:
    source = load_checkpoint(src)
    converted = read_vllm(dst)
    hidden = torch.randn(
        VERIFY_ROWS,
        converted.hidden_size,
        generator=torch.Generator().manual_seed(VERIFY_SEED),
    )
    bodies, ref_heads = _reference(src, source)
    base_head = base.lm_head().float() if base is not None and ref_heads is None else None
    embedded = converted.tensors.get(lm_head_key(0)) if converted.original_lm_head else None
    diff, scale = 0.0, 1.0
    with torch.no_grad():
        for h in range(converted.num_heads):
            ref = bodies[h](hidden)
            out = _converted_head(converted.tensors, h, converted.num_layers, hidden)
            if ref_heads is not None:
                ref = ref @ ref_heads[h].T  # [rows, V]
                out = out @ converted.tensors[lm_head_key(h)].float().T
            elif base_head is not None:
                ref = ref @ base_head.T
                out = out @ (embedded.float() if embedded is not None else base_head).T
            diff = max(diff, (ref - out).abs().max().item())
            scale = max(scale, ref.abs().max().item())
    if ref_heads is not None:
        compared = "logits of the heads' own lm_heads"
    elif base_head is not None:
        compared = "logits through the base model's lm_head"
    else:
        compared = "hidden states before the lm_head (no --base-model given)"
    rel = max(RELATIVE_TOLERANCE.get(d, 1e-5) for d in (source.dtype, converted.dtype))
    return VerifyResult(diff, rel * scale, compared)


def verify_conversion(
    src: str | Path, dst: str | Path, base_model: str | Path | None = None
) -> float:
    """Largest absolute output difference between the heads at ``src`` and at ``dst``."""
    base = BaseModel.open(base_model) if base_model is not None else None
    return _verify(checkpoint_folder(src), checkpoint_folder(dst), base).max_abs_diff
