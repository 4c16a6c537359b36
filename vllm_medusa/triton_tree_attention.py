"""Tree attention on vLLM's Triton attention backend (CUDA, ROCm; this CPU through Triton's
interpreter).

vLLM's Triton kernel (`unified_attention`) takes `qq_bias`, an additive [rows, cols] bias
between a request's query tokens: query row i, key at context + j gets `bias[i, j]` added to
its score, on top of the causal mask. A step's tree puts every ancestor before
its node, so causal + (0 where node i may see node j, -inf elsewhere) is the tree mask. The
kernel indexes bias rows by the query's position in its request with no bound, so only tree
decodes share the biased call; the step's other requests (prefill chunks, plain decodes)
run vLLM's causal call, each group on its own rows, gathered where the group does not cover
the whole batch.

A step tree's prefixes (cut near `max_model_len`) are top-left blocks of its mask, so one
bias serves every request verifying a prefix of it; requests whose masks are not blocks of
one another go in one call per mask.

The bias lives in a zero-filled buffer: [pad zeros][row 0][row 1]..., each row `width` wide,
the mask in its first columns, `pad` and `width - n` at least the longest context. Compiled
Triton guards the bias read with `0 <= key - context < width`; Triton's interpreter evaluates
that `a and b` as plain Python, keeps only `key - context < width`, and reads each row at
negative offsets, down to minus the context length. With the padding those reads hit zeros,
so the interpreter computes what the GPU does; on a GPU the extra zeros are never read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadata,
)
from vllm.v1.attention.ops.triton_unified_attention import unified_attention
from vllm.v1.kv_cache_interface import KVQuantMode

from vllm_medusa.tree_attention import TreeSequence, TreeStep, tree_step_of

# device -> [(mask [n, n] bool, zero-padded buffer of its bias)], see `tree_bias`
_bias_buffers: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}


def tree_bias(mask: torch.Tensor, max_context: int, device: torch.device) -> torch.Tensor:
    """[n, width] float32 additive bias of an [n, n] bool tree mask, as a view into a buffer
    whose reads at offsets down to -max_context of any row hit zeros (see module docstring).

    Cached per device and tree: a mask that is a top-left block of a cached one (a prefix of
    the same tree) is served by that buffer's first rows (their columns past n are -inf, but
    those keys lie past the request's end, already masked). Grown for longer contexts."""
    n = mask.shape[0]
    mask = mask.cpu()
    entries = _bias_buffers.setdefault(str(device), [])
    for i, (cached, buffer) in enumerate(entries):
        size = cached.shape[0]
        if size >= n and torch.equal(cached[:n, :n], mask):
            width = buffer.numel() // (size + 1)
            if width >= size + max_context:
                return buffer[width:].view(size, width)[:n]
            mask = cached  # grow the bigger tree's buffer
            del entries[i]
            break
    size = mask.shape[0]
    width = 1 << (size + max_context).bit_length()  # > size + max_context: room to grow
    block = torch.zeros(size, width, dtype=torch.float32)
    block[:, :size].masked_fill_(~mask, float("-inf"))
    buffer = torch.cat([torch.zeros(width), block.flatten()]).to(device)
    entries.append((mask, buffer))
    return buffer[width:].view(size, width)[:n]


@dataclass
class TritonCall:
    """One kernel call of a tree step: a group of the step's requests."""

    rows: torch.Tensor | None  # [tokens] long: the group's query rows; None: the whole batch
    metadata: TritonAttentionMetadata  # the group's requests only
    bias: torch.Tensor | None  # [n, width] tree bias; None: vLLM's causal call


def _group_by_mask(sequences: list[TreeSequence]) -> list[tuple[torch.Tensor, list[TreeSequence]]]:
    """Sequences whose masks are top-left blocks of one mask share a call."""
    groups: list[tuple[torch.Tensor, list[TreeSequence]]] = []
    for seq in sorted(sequences, key=lambda s: -s.num_tokens):
        n = seq.num_tokens
        for mask, members in groups:
            if torch.equal(mask[:n, :n], seq.node_mask):
                members.append(seq)
                break
        else:
            groups.append((seq.node_mask, [seq]))
    return groups


def _sub_metadata(
    metadata: TritonAttentionMetadata,
    query_starts: list[int],
    requests: list[int],
    max_seq_len: int,
) -> tuple[torch.Tensor | None, TritonAttentionMetadata]:
    """The group of `requests` (batch indices, ascending): its query rows and its metadata."""
    num_reqs = len(query_starts) - 1
    device = metadata.query_start_loc.device
    lengths = [query_starts[r + 1] - query_starts[r] for r in requests]
    if requests == list(range(num_reqs)):
        return None, metadata
    rows = torch.cat([torch.arange(query_starts[r], query_starts[r + 1]) for r in requests])
    starts = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    index = torch.tensor(requests, device=device)
    return rows.to(device), dataclasses.replace(
        metadata,
        num_actual_tokens=int(rows.numel()),
        max_query_len=max(lengths),
        query_start_loc=starts.to(device),
        max_seq_len=max_seq_len,
        seq_lens=metadata.seq_lens.index_select(0, index),
        block_table=metadata.block_table.index_select(0, index),
    )


def triton_calls(step: TreeStep, metadata: TritonAttentionMetadata) -> list[TritonCall]:
    """The step's kernel calls: requests without a tree first (vLLM's call), then one biased
    call per tree mask. Built by the first layer that asks, shared by the others."""
    cached = step.backend_data.get("triton")
    if cached is not None and cached[0] is metadata:
        return cached[1]
    starts = step.query_starts
    device = metadata.query_start_loc.device
    in_trees = {seq.req_index for seq in step.sequences}
    calls = []
    plain = [r for r in range(len(starts) - 1) if r not in in_trees]
    if plain:
        rows, sub = _sub_metadata(metadata, starts, plain, metadata.max_seq_len)
        calls.append(TritonCall(rows, sub, None))
    for mask, members in _group_by_mask(step.sequences):
        members.sort(key=lambda s: s.req_index)
        max_context = max(s.context_len for s in members)
        max_seq_len = max(s.context_len + s.num_tokens for s in members)
        rows, sub = _sub_metadata(metadata, starts, [s.req_index for s in members], max_seq_len)
        calls.append(TritonCall(rows, sub, tree_bias(mask, max_context, device)))
    step.backend_data["triton"] = (metadata, calls)
    return calls


class TreeTritonAttentionBackendImpl(TritonAttentionImpl):
    """vLLM's Triton attention; in a step with trees, the tree requests' rows go through the
    same kernel with their tree mask as `qq_bias`."""

    def forward(
        self,
        layer,
        query: torch.Tensor,  # [num_tokens, num_heads, head]
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, 2 * head] (logical)
        attn_metadata: TritonAttentionMetadata,
        output: torch.Tensor,  # [num_tokens, num_heads, head]
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        step = tree_step_of(attn_metadata)
        if step is None:
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale, output_block_scale,
            )  # fmt: skip
        self._check_tree_support(attn_metadata, output_scale, output_block_scale)
        for call in triton_calls(step, attn_metadata):
            q = query if call.rows is None else query.index_select(0, call.rows)
            out = output if call.rows is None else output.new_empty(q.shape)
            if call.bias is None:
                super().forward(layer, q, key, value, kv_cache, call.metadata, out)
            else:
                self._attend_tree(layer, q, kv_cache, call.metadata, call.bias, out)
            if call.rows is not None:
                output.index_copy_(0, call.rows, out)
        return output

    def _attend_tree(
        self,
        layer,
        query: torch.Tensor,  # [tokens, num_heads, head]
        kv_cache: torch.Tensor,
        metadata: TritonAttentionMetadata,
        bias: torch.Tensor,  # [n, width]
        output: torch.Tensor,
    ) -> None:
        """vLLM's kernel call for an unquantized cache, plus the tree bias."""
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        descale_shape = (metadata.query_start_loc.shape[0] - 1, key_cache.shape[2])
        tokens = metadata.num_actual_tokens
        unified_attention(
            q=query[:tokens],
            k=key_cache,
            v=value_cache,
            out=output[:tokens],
            cu_seqlens_q=metadata.query_start_loc,
            max_seqlen_q=metadata.max_query_len,
            seqused_k=metadata.seq_lens,
            max_seqlen_k=metadata.max_seq_len,
            softmax_scale=self.scale,
            causal=True,
            window_size=self.sliding_window,
            block_table=metadata.block_table,
            softcap=self.logits_soft_cap,
            q_descale=None,
            k_descale=layer._k_scale.expand(descale_shape),
            v_descale=layer._v_scale.expand(descale_shape),
            seq_threshold_3D=metadata.seq_threshold_3D,
            num_par_softmax_segments=metadata.num_par_softmax_segments,
            softmax_segm_output=metadata.softmax_segm_output,
            softmax_segm_max=metadata.softmax_segm_max,
            softmax_segm_expsum=metadata.softmax_segm_expsum,
            qq_bias=bias,
            use_td=self.use_td,
        )

    def _check_tree_support(self, metadata, output_scale, output_block_scale) -> None:
        """Tree nodes sit at their step indices, not at their depths: anything that reads a
        query's index as its position (windows, ALiBi, chunks) would be wrong for them."""
        unsupported = [
            name
            for name, present in (
                ("sliding window", self.sliding_window != (-1, -1)),
                ("ALiBi", self.alibi_slopes is not None),
                ("attention sinks", self.sinks is not None),
                ("chunked attention", self.chunk_lookback != -1),
                (f"KV cache dtype {self.kv_cache_dtype}", self._kv_quant_mode != KVQuantMode.NONE),
                ("fused output quantization", output_scale is not None),
                ("block-scaled output", output_block_scale is not None),
                ("multimodal prefix ranges", metadata.mm_prefix_range_tensor is not None),
                ("reference sliding window", metadata.rswa_prefix_lens is not None),
                ("non-causal attention", not isinstance(metadata.causal, bool)),
            )
            if present
        ]
        if unsupported:
            raise NotImplementedError(
                "vllm-medusa tree verification supports plain causal attention with an "
                f"unquantized KV cache only, not {', '.join(unsupported)}: "
                "use a chain (VLLM_MEDUSA_TREE=chain:K)"
            )


class TreeTritonAttentionBackend(TritonAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[TreeTritonAttentionBackendImpl]:
        return TreeTritonAttentionBackendImpl
