"""Attention for tree verification over vLLM's paged KV cache.

vLLM's CPU attention kernel knows only causal masks. In a step that verifies trees, the kernel
still runs for the whole batch (prefill chunks, plain decodes and trees alike), then the rows
of each tree request are recomputed here with the tree's mask: each node sees the request's
context, its ancestors and itself. The tree tokens' keys and values are already in the cache
at their slots (context + node index) when this runs, so one gather reads the context and
the tree together, for all tree requests of the step at once.

How a block stores its keys and values is the kernel's business and differs between its
instruction sets (keys are stored transposed for some), so the layout is not assumed: it is
measured once per instruction set by caching known values with the kernel's own cache write.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl


@dataclass
class TreeSequence:
    """One request verifying a tree in this step."""

    req_index: int  # its row in the batch (and in the attention block table)
    token_start: int  # its root's index among the step's tokens
    context_len: int  # tokens before its root
    node_mask: torch.Tensor  # [n, n] bool, n = root + draft nodes: the tree mask

    @property
    def num_tokens(self) -> int:
        return self.node_mask.shape[0]


@dataclass
class TreeBatch:
    """All tree requests of a step padded to one shape, so each layer runs one gather and
    one attention call whatever the number of requests."""

    token_index: torch.Tensor  # [R, n_max] long: each query row's token (padding repeats)
    valid: torch.Tensor  # [R, n_max] bool: real rows
    block_ids: torch.Tensor  # [R, B] long: KV blocks to read (padding: block 0, masked)
    bias: torch.Tensor  # [R, 1, 1, n_max, B * block_size] float: 0 where a row may look, -inf
    flat_index: torch.Tensor  # [valid rows] long: token_index[valid]


class TreeStep:
    """Every tree request of the current step, for the attention layers to read."""

    def __init__(self, sequences: list[TreeSequence], query_starts: list[int]) -> None:
        self.sequences = sequences
        self.query_starts = query_starts  # [num_reqs + 1]: each request's first token, then the end
        self.backend_data: dict[str, object] = {}  # what a backend builds once per step
        self._batches: dict[int, TreeBatch] = {}

    def batch(self, block_table: torch.Tensor, block_size: int, dtype: torch.dtype) -> TreeBatch:
        """Built by the first layer that asks, shared by the others."""
        if block_size not in self._batches:
            self._batches[block_size] = _pad(self.sequences, block_table, block_size, dtype)
        return self._batches[block_size]


def _pad(
    sequences: list[TreeSequence], block_table: torch.Tensor, block_size: int, dtype: torch.dtype
) -> TreeBatch:
    n_max = max(seq.num_tokens for seq in sequences)
    kv_lens = [seq.context_len + seq.num_tokens for seq in sequences]
    num_blocks = -(-max(kv_lens) // block_size)
    rows = len(sequences)
    token_index = torch.zeros(rows, n_max, dtype=torch.long)
    valid = torch.zeros(rows, n_max, dtype=torch.bool)
    block_ids = torch.zeros(rows, num_blocks, dtype=torch.long)
    mask = torch.zeros(rows, n_max, num_blocks * block_size, dtype=torch.bool)
    mask[:, :, 0] = True  # padding rows attend somewhere (an all-masked row would be NaN)
    for r, (seq, kv_len) in enumerate(zip(sequences, kv_lens, strict=True)):
        n = seq.num_tokens
        token_index[r] = seq.token_start
        token_index[r, :n] = torch.arange(seq.token_start, seq.token_start + n)
        valid[r, :n] = True
        used = -(-kv_len // block_size)
        block_ids[r, :used] = block_table[seq.req_index, :used].long()
        mask[r, :n, : seq.context_len] = True
        mask[r, :n, seq.context_len : kv_len] = seq.node_mask
    # An additive mask once per step: a boolean one is converted again in every layer.
    bias = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf"))
    return TreeBatch(token_index, valid, block_ids, bias[:, None, None], token_index[valid])


# On each attention metadata object of a step: that step's trees (None: no trees).
TREE_STEP_ATTR = "vllm_medusa_tree_step"


def attach_tree_step(attn_metadata: Any, step: TreeStep | None) -> None:
    """Carry the step's trees to the attention layers on the metadata vLLM builds once per
    step and hands to every layer (a dict per layer, or a list of them per micro-batch).
    Set on every build, so metadata a builder reuses never keeps an earlier step's trees."""
    if isinstance(attn_metadata, list):
        for per_layer in attn_metadata:
            attach_tree_step(per_layer, step)
        return
    for metadata in attn_metadata.values():
        setattr(metadata, TREE_STEP_ATTR, step)


def tree_step_of(attn_metadata: Any) -> TreeStep | None:
    return getattr(attn_metadata, TREE_STEP_ATTR, None)


@dataclass(frozen=True)
class KVLayout:
    """Where token t's channel c lives in one (block, KV head) stretch of a CPU KV cache
    ([num_blocks, num_kv_heads, block_size, 2 * head] viewed as 2 * block_size * head values:
    the keys' half, then the values' half)."""

    key_index: torch.Tensor  # [block_size, head] long
    value_index: torch.Tensor  # [block_size, head] long
    key_form: str
    value_form: str

    def slot_index(self, offsets: torch.Tensor) -> torch.Tensor:
        """[M] in-block offsets -> [M, 2 * head]: a token's keys, then its values."""
        return torch.cat([self.key_index[offsets], self.value_index[offsets]], dim=1)

    def read(self, stretches: torch.Tensor, keys: bool) -> torch.Tensor:
        """[..., 2 * block_size * head] -> [..., block_size, head], as a view where the
        kernel stores the half row-major or transposed, else by gathering."""
        index, form = (
            (self.key_index, self.key_form) if keys else (self.value_index, self.value_form)
        )
        block_size, head = index.shape
        start = int(index[0, 0])
        half = stretches[..., start : start + block_size * head]
        if form == "rows":
            return half.unflatten(-1, (block_size, head))
        if form == "columns":
            return half.unflatten(-1, (head, block_size)).transpose(-1, -2)
        return stretches[..., index]


def _form(index: torch.Tensor) -> str:
    """How a [block_size, head] half is laid out: "rows" (token-major), "columns"
    (channel-major, i.e. transposed) or "scattered"."""
    block_size, head = index.shape
    relative = index - index[0, 0]
    if torch.equal(relative, torch.arange(block_size * head).view(block_size, head)):
        return "rows"
    if torch.equal(relative, torch.arange(block_size * head).view(head, block_size).T):
        return "columns"
    return "scattered"


@functools.cache
def kv_layout(isa: str, block_size: int, head: int, dtype: torch.dtype) -> KVLayout:
    from vllm import _custom_ops as ops

    cache = torch.zeros(1, 1, block_size, 2 * head, dtype=dtype)
    key_cache, value_cache = cache.view(1, 1, 2 * block_size, head).chunk(2, dim=2)
    slots = torch.arange(block_size)

    def written(fill: torch.Tensor) -> torch.Tensor:
        """Cache `fill` ([block_size, head], small integers, exact in any float type) as the
        keys and values of tokens 0..block_size-1; return the block's values, flat."""
        cache.zero_()
        kv = fill.to(dtype).unsqueeze(1)  # [block_size, 1, head]
        ops.cpu_attn_reshape_and_cache(
            kv, kv, key_cache, value_cache, slots, isa, k_scale=1.0, v_scale=1.0
        )
        return cache.flatten().long()

    token = written((slots[:, None] + 1).expand(block_size, head)) - 1
    channel = written((torch.arange(head)[None, :] + 1).expand(block_size, head)) - 1
    if (token < 0).any() or (channel < 0).any():
        raise RuntimeError(f"CPU KV cache layout of ISA {isa!r} could not be measured")
    half = block_size * head
    position = torch.arange(2 * half)
    indices = []
    for part in (slice(0, half), slice(half, 2 * half)):
        index = torch.full((block_size, head), -1, dtype=torch.long)
        index[token[part], channel[part]] = position[part]
        if (index < 0).any():  # two places held one value: not a layout this code reads
            raise RuntimeError(f"CPU KV cache layout of ISA {isa!r} could not be measured")
        indices.append(index)
    return KVLayout(indices[0], indices[1], _form(indices[0]), _form(indices[1]))


def attend_trees(
    step: TreeStep,
    query: torch.Tensor,  # [num_tokens, num_heads, head]
    kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, 2 * head]
    layout: KVLayout,
    block_table: torch.Tensor,  # [num_reqs, max_blocks] int32
    scale: float,
    output: torch.Tensor,  # [num_tokens, num_heads, head]: tree rows are overwritten
) -> None:
    """Plain matmuls over the cache blocks as they lie: one copy of the requests' blocks
    (index_select), no re-layout of keys or values, and no SDPA, whose mask and GQA handling
    cost more than the arithmetic at a few query rows per request. Runs in every layer."""
    num_blocks, num_kv_heads, block_size, two_head = kv_cache.shape
    head = two_head // 2
    batch = step.batch(block_table, block_size, query.dtype)
    rows, blocks = batch.block_ids.shape
    n_max = batch.token_index.shape[1]
    group = query.shape[1] // num_kv_heads  # query heads per KV head
    stretches = kv_cache.view(num_blocks, num_kv_heads, block_size * two_head)
    chunk = stretches.index_select(0, batch.block_ids.flatten())
    chunk = chunk.view(rows, blocks, num_kv_heads, block_size * two_head)
    keys = layout.read(chunk, keys=True).transpose(-1, -2)  # [R, B, kv_heads, head, bs]
    values = layout.read(chunk, keys=False)  # [R, B, kv_heads, bs, head]
    q = query.index_select(0, batch.token_index.flatten()) * scale
    q = q.view(rows, n_max, num_kv_heads, group, head).permute(0, 2, 3, 1, 4)
    q = q.reshape(rows, 1, num_kv_heads, group * n_max, head)
    scores = torch.matmul(q, keys)  # [R, B, kv_heads, group * n_max, bs]
    scores = scores.view(rows, blocks, num_kv_heads, group, n_max, block_size)
    scores = scores.permute(0, 2, 3, 4, 1, 5).reshape(rows, num_kv_heads, group, n_max, -1)
    probs = torch.softmax(scores.add_(batch.bias), dim=-1)  # [R, kv_heads, g, n_max, B * bs]
    probs = probs.view(rows, num_kv_heads, group * n_max, blocks, block_size)
    # [R, B, kv_heads, g * n_max, head], summed over the blocks
    attended = torch.matmul(probs.permute(0, 3, 1, 2, 4), values).sum(1)
    attended = attended.view(rows, num_kv_heads, group, n_max, head).permute(0, 3, 1, 2, 4)
    output[batch.flat_index] = attended[batch.valid].flatten(1, 2).to(output.dtype)


class TreeCPUAttentionBackendImpl(CPUAttentionBackendImpl):
    """vLLM's CPU attention, then the tree requests' rows again with their tree mask."""

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kw):
        output = super().forward(
            layer, query, key, value, kv_cache, attn_metadata, output, *args, **kw
        )
        step = tree_step_of(attn_metadata)
        if step is None:
            return output
        if (
            self.sliding_window != -1
            or self.alibi_slopes is not None
            or self.sinks is not None
            or self.is_fp8_kv_cache
        ):
            raise NotImplementedError(
                "vllm-medusa tree verification supports plain causal attention with an "
                "unquantized KV cache only: use a chain (VLLM_MEDUSA_TREE=chain:K)"
            )
        _, _, block_size, two_head = kv_cache.shape
        layout = kv_layout(layer.isa, block_size, two_head // 2, kv_cache.dtype)
        attend_trees(step, query, kv_cache, layout, attn_metadata.block_table, self.scale, output)
        return output


class TreeCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[TreeCPUAttentionBackendImpl]:
        return TreeCPUAttentionBackendImpl
