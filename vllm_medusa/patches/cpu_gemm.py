"""Surface: `vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm` (vLLM 0.32), which
picks each unquantized linear layer's (and the lm_head's) product on the CPU when its weights
are loaded and stores it as `layer.cpu_linear`; its callers import it from that module at call
time, so rebinding the module attribute reaches every layer.

In an engine that speculates with Medusa, on a CPU worker running one thread whose CPU the
kernel suits (AVX2 without AVX-512: `vllm_medusa.cpu_gemm.suits_host`), each float32
layer whose product `vllm_medusa.cpu_gemm` reproduces bit for bit (checked per layer, against
the product vLLM picked) runs on that kernel instead, for every row count: the drafts a step
verifies cost less (see `vllm_medusa.cpu_gemm`), and every logit is what vLLM's product
gives. vLLM's own copy of the weight (oneDNN's packed one) is dropped with its
product, so the weights take the memory they took before. `VLLM_MEDUSA_CPU_GEMM=0` keeps
vLLM's products; `VLLM_MEDUSA_CPU_GEMM=all` uses the kernel in engines without speculation as
well (so that a benchmark can tell the kernel's share of a speed-up from speculation's).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import torch
from vllm.logger import init_logger

from vllm_medusa.cpu_gemm import PackedLinear, replicate, suits_host

logger = init_logger(f"vllm.{__name__}")

ENV = "VLLM_MEDUSA_CPU_GEMM"
_PATCHED_ATTR = "_vllm_medusa_patched"


@dataclass(frozen=True)
class KernelProduct:
    """`layer.cpu_linear` of a layer on the kernel (vLLM still passes the dropped weight)."""

    packed: PackedLinear

    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        return self.packed(x, bias)


def _medusa_engine() -> bool:
    from vllm.config import get_current_vllm_config_or_none

    config = get_current_vllm_config_or_none()
    spec = getattr(config, "speculative_config", None)
    return spec is not None and spec.method == "medusa"


def _wanted(weight: torch.Tensor) -> bool:
    setting = os.environ.get(ENV, "1")
    return (
        setting != "0"
        and weight.dtype == torch.float32
        and weight.dim() == 2
        and not weight.is_meta
        # One thread per worker (vLLM's choice on small machines): the kernel is serial.
        and torch.get_num_threads() == 1
        and (setting == "all" or _medusa_engine())
        and suits_host()
    )


def _replace_product(layer: Any, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    packed = replicate(weight, bias, layer.cpu_linear)
    if packed is None:
        return  # vLLM's product stays
    layer.cpu_linear = KernelProduct(packed)
    logger.info_once(
        "vllm-medusa: float32 products run on the few-rows kernel (bitwise vLLM's, "
        "checked per layer; %s=0 turns it off)",
        ENV,
    )


def apply() -> None:
    from vllm.model_executor.layers import utils

    dispatch = utils.dispatch_cpu_unquantized_gemm
    if getattr(dispatch, _PATCHED_ATTR, False):
        return

    @functools.wraps(dispatch)
    def dispatch_with_kernel(layer: torch.nn.Module, remove_weight: bool) -> None:
        weight, bias = layer.weight, getattr(layer, "bias", None)
        dispatch(layer, remove_weight)
        if hasattr(layer, "cpu_linear") and _wanted(weight):
            _replace_product(layer, weight, bias)

    setattr(dispatch_with_kernel, _PATCHED_ATTR, True)
    utils.dispatch_cpu_unquantized_gemm = dispatch_with_kernel
