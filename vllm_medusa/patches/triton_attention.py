"""Surface: the attention backend registry and `vllm.v1.attention.backends.triton_attn`
(vLLM 0.32).

`TritonAttentionImpl.forward` never passes its kernel's `qq_bias`. The plugin registers, in
place of `TRITON_ATTN`, `vllm_medusa.triton_tree_attention.TreeTritonAttentionBackend`: vLLM's
backend, whose attention gives tree requests their tree mask through that bias in a step that
verifies Medusa trees, and is otherwise vLLM's call. Named by path: processes that never run
attention, and machines without Triton, never import it.
"""

from __future__ import annotations

BACKEND_CLASS = "vllm_medusa.triton_tree_attention.TreeTritonAttentionBackend"


def apply() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.TRITON_ATTN, BACKEND_CLASS)
