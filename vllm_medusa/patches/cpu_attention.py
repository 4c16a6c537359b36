"""Surface: the attention backend registry and `vllm.v1.attention.backends.cpu_attn`
(vLLM 0.32).

The CPU attention kernel has no per-token mask. The plugin registers, in place of `CPU_ATTN`,
`vllm_medusa.tree_attention.TreeCPUAttentionBackend`: vLLM's backend, whose attention also
recomputes the tree requests' rows with the tree mask in a step that verifies Medusa trees,
and is otherwise unchanged. The class is named by path, so processes that never run attention
(the API server) do not import it.
"""

from __future__ import annotations

BACKEND_CLASS = "vllm_medusa.tree_attention.TreeCPUAttentionBackend"


def apply() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_CLASS)
