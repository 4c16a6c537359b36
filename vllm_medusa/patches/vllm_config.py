"""Surface: `vllm.config.vllm.VllmConfig` (vLLM 0.32).

`VllmConfig.__post_init__` settles the CUDA graph mode, then calls
`_maybe_override_dynamic_sd_cudagraph_mode` (vLLM's own override for speculation whose
verification length varies) before normalising that mode against the compilation mode.
Extending that call, when Medusa trees are served on a GPU:
- attention: only Triton attention (`TRITON_ATTN`) applies tree masks there, so it is
  selected when the user chose no backend, and any other choice is refused;
- CUDA graphs: a full graph replays attention with the metadata it was captured with, and the
  tree mask is per step, so attention must run outside captured graphs: full modes become
  `PIECEWISE` (vLLM then falls back to `NONE` where it does not compile piecewise).
On the CPU, trees are verified by the plugin's CPU attention and nothing changes.
"""

from __future__ import annotations

import logging
from typing import Any

from vllm_medusa.tree import serves_tree

logger = logging.getLogger(f"vllm.{__name__}")

_ORIGINAL_ATTR = "_vllm_medusa_original_dynamic_sd_override"


def tree_attention_settings(device_type: str, backend: Any, cudagraph_mode: Any) -> tuple[Any, Any]:
    """(attention backend, CUDA graph mode) to serve Medusa trees with on `device_type`, from
    the user's (backend None: automatic). Raises ValueError for a backend without trees."""
    from vllm.config.compilation import CUDAGraphMode
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if device_type == "cpu":
        return backend, cudagraph_mode
    triton = AttentionBackendEnum.TRITON_ATTN
    if backend is None:
        logger.info("vllm-medusa: Medusa trees select the Triton attention backend (TRITON_ATTN)")
        backend = triton
    elif backend != triton:
        raise ValueError(
            f"Medusa trees are verified by Triton attention only, but the attention backend is "
            f"{backend.name}: set --attention-backend TRITON_ATTN (Python: "
            "attention_config={'backend': 'TRITON_ATTN'}), or verify a chain "
            "(VLLM_MEDUSA_TREE=chain:K)"
        )
    if cudagraph_mode is not None and cudagraph_mode.has_full_cudagraphs():
        logger.info(
            "vllm-medusa: Medusa trees run attention outside CUDA graphs: cudagraph_mode %s -> "
            "PIECEWISE",
            cudagraph_mode.name,
        )
        cudagraph_mode = CUDAGraphMode.PIECEWISE
    return backend, cudagraph_mode


def serves_medusa_tree(config: Any) -> bool:
    """Whether the engine verifies Medusa trees (static or per request), not only chains."""
    spec = config.speculative_config
    return (
        spec is not None
        and spec.method == "medusa"
        and spec.draft_model_config is not None
        and serves_tree(spec.draft_model_config.hf_config)
    )


def apply() -> None:
    from vllm.config.vllm import VllmConfig

    if hasattr(VllmConfig, _ORIGINAL_ATTR):
        return
    original = VllmConfig._maybe_override_dynamic_sd_cudagraph_mode
    setattr(VllmConfig, _ORIGINAL_ATTR, original)

    def _maybe_override_dynamic_sd_cudagraph_mode(self) -> None:
        original(self)
        if not serves_medusa_tree(self):
            return
        backend, mode = tree_attention_settings(
            self.device_config.device_type,
            self.attention_config.backend,
            self.compilation_config.cudagraph_mode,
        )
        self.attention_config.backend = backend
        self.compilation_config.cudagraph_mode = mode

    VllmConfig._maybe_override_dynamic_sd_cudagraph_mode = _maybe_override_dynamic_sd_cudagraph_mode
