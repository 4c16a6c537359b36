"""Attention for tree verification over vLLM's paged KV cache.

vLLM's CPU attention kernel knows only causal masks. In a step that verifies trees, the kernel
runs for the whole batch (prefill chunks, plain decodes and trees alike), which leaves right
every tree row whose ancestors are all the rows before it (the root, and the tree's first
branch as far as it is a chain). The other rows are computed again by the same kernel: each
root-to-leaf path is a causal sequence of its own (context, then the path's nodes), laid out
in vLLM's null block or a scratch copy of the request's blocks (`PathBatch`), so a node sees
the request's context, its ancestors and itself. The tree tokens' keys and values are
already in the cache at their slots (context + node index) when this runs.

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
class PathBatch:
    """The tree rows the causal pass got wrong, regrouped as causal sequences that vLLM's
    kernel can compute: one per root-to-leaf path, holding the path's rows not already right
    or taken by an earlier path (always the path's last ones, since what is right or taken is
    closed under ancestry). Each path's keys and values are laid out contiguously after its
    request's context: its full context blocks as they are, then "tail" blocks that start as
    copies of the blocks from the context's end, with the path's nodes moved into place, so
    the kernel sees context + ancestors + node with a plain causal mask.

    Where the step needs a single tail (one request, one extra path: the common case at batch
    1), it is vLLM's null block in the cache itself, which no request owns and no attention
    reads, so the context is read where it lies. Otherwise the kernel reads a scratch copy of
    every block the paths use."""

    rows: torch.Tensor  # [Q] long: the step's token index of each recomputed row, path by path
    query_start_loc: torch.Tensor  # [P + 1] int32
    seq_lens: torch.Tensor  # [P] int32: context + path length
    block_table: torch.Tensor  # [P, max_blocks] int32: blocks of the cache the kernel reads
    in_place: bool  # that cache is vLLM's own (else a scratch copy)
    src_blocks: torch.Tensor  # [S] long: the blocks copied to the null block or the scratch
    move_src: torch.Tensor  # [E] long: elements of the cache (flat) that are moved ...
    move_dst: torch.Tensor  # [E] long: ... to these of the cache the kernel reads (flat)
    scheduler_metadata: torch.Tensor | None = None  # the kernel's, built by the first layer


# vLLM's placeholder block (`BlockPool.null_block`): allocated to no request, read by no
# attention, so a layer may use it as scratch while it runs.
NULL_BLOCK = 0


class TreeStep:
    """Every tree request of the current step, for the attention layers to read."""

    def __init__(self, sequences: list[TreeSequence], query_starts: list[int]) -> None:
        self.sequences = sequences
        self.query_starts = query_starts  # [num_reqs + 1]: each request's first token, then the end
        self.backend_data: dict[str, object] = {}  # what a backend builds once per step
        self._paths: dict[tuple[int, int], PathBatch] = {}

    def paths(
        self, block_table: torch.Tensor, block_size: int, num_kv_heads: int, layout: KVLayout
    ) -> PathBatch:
        """Built by the first layer that asks, shared by the others."""
        key = (block_size, num_kv_heads)
        if key not in self._paths:
            self._paths[key] = _paths(
                self.sequences, block_table.tolist(), block_size, num_kv_heads, layout
            )
        return self._paths[key]


def _paths(
    sequences: list[TreeSequence],
    block_table: list[list[int]],
    block_size: int,
    num_kv_heads: int,
    layout: KVLayout,
) -> PathBatch:
    stretch = 2 * layout.key_index.numel()  # values per (block, KV head)
    heads = torch.arange(num_kv_heads)
    rows, query_starts, seq_lens, tables = [], [0], [], []
    src_blocks: list[int] = []  # the scratch copy's blocks
    tail_blocks: list[int] = []  # which of them are tails
    moves: list[tuple[int, int, int, int]] = []  # (cache block, offset, scratch block, offset)
    for seq in sequences:
        mask = seq.node_mask
        n, context = seq.num_tokens, seq.context_len
        table = block_table[seq.req_index]
        full = context // block_size  # context blocks every path shares
        used = -(-(context + n) // block_size)  # blocks holding the context and the tree
        shared = list(range(len(src_blocks), len(src_blocks) + full))
        src_blocks += table[:full]
        # Right after the causal pass: a row whose ancestors are all the rows before it.
        done = [bool(mask[j, : j + 1].all()) for j in range(n)]
        leaves = [j for j in range(n) if not mask[j + 1 :, j].any()]
        for leaf in leaves:
            path = torch.nonzero(mask[leaf]).flatten().tolist()  # root .. leaf
            todo = [node for node in path if not done[node]]
            if not todo:
                continue
            for node in todo:
                done[node] = True
            seq_len = context + len(path)
            tails = []
            for t in range(-(-seq_len // block_size) - full):
                tails.append(len(src_blocks))
                tail_blocks.append(len(src_blocks))
                src_blocks.append(table[min(full + t, used - 1)])
            tables.append(shared + tails)
            for depth, node in enumerate(path):
                if node == depth:  # already where the path needs it
                    continue
                source, target = context + node, context + depth
                moves.append(
                    (
                        table[source // block_size],
                        source % block_size,
                        tails[target // block_size - full],
                        target % block_size,
                    )
                )
            rows += [seq.token_start + node for node in todo]
            query_starts.append(len(rows))
            seq_lens.append(seq_len)
    in_place = len(tail_blocks) == 1
    if in_place:
        where = {i: block for i, block in enumerate(src_blocks)}
        where[tail_blocks[0]] = NULL_BLOCK
        tables = [[where[i] for i in table] for table in tables]
        moves = [(block, offset, where[i], target) for block, offset, i, target in moves]
        src_blocks = [src_blocks[tail_blocks[0]]]
    width = max(len(t) for t in tables)
    move = torch.tensor(moves, dtype=torch.long).view(-1, 4)

    def elements(blocks: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """[M] blocks and in-block offsets -> [M * kv_heads * 2 * head] flat indices."""
        starts = (blocks[:, None] * num_kv_heads + heads[None, :]) * stretch  # [M, kv_heads]
        return (starts[:, :, None] + layout.slot_index(offsets)[:, None, :]).flatten()

    return PathBatch(
        rows=torch.tensor(rows, dtype=torch.long),
        query_start_loc=torch.tensor(query_starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_table=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        in_place=in_place,
        src_blocks=torch.tensor(src_blocks, dtype=torch.long),
        move_src=elements(move[:, 0], move[:, 1]),
        move_dst=elements(move[:, 2], move[:, 3]),
    )


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
    impl: CPUAttentionBackendImpl,
    layer: Any,
    query: torch.Tensor,  # [num_tokens, num_heads, head]
    kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, 2 * head]
    layout: KVLayout,
    block_table: torch.Tensor,  # [num_reqs, max_blocks] int32
    output: torch.Tensor,  # [num_tokens, num_heads, head]: wrong rows overwritten
) -> None:
    """The wrong rows again, through vLLM's own kernel over the paths' blocks (`PathBatch`):
    a handful of tensor calls per layer whatever the trees' shapes."""
    from vllm import _custom_ops as ops
    from vllm import envs

    _, num_kv_heads, block_size, two_head = kv_cache.shape
    paths = step.paths(block_table, block_size, num_kv_heads, layout)
    if paths.scheduler_metadata is None:
        paths.scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(paths.seq_lens),
            num_heads=query.shape[1],
            num_kv_heads=num_kv_heads,
            head_dim=two_head // 2,
            seq_lens=paths.seq_lens,
            dtype=query.dtype,
            query_start_loc=paths.query_start_loc,
            causal=True,
            sliding_window_size=-1,
            isa=layer.isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            kv_cache_dtype=impl.kv_cache_dtype,
        )
    if paths.in_place:
        cache = kv_cache
        cache[NULL_BLOCK] = kv_cache[paths.src_blocks[0]]
    else:
        cache = kv_cache.index_select(0, paths.src_blocks)  # [S, kv_heads, block_size, 2 * head]
    cache.view(-1).index_copy_(0, paths.move_dst, kv_cache.view(-1)[paths.move_src])
    key_cache, value_cache = cache.view(
        cache.shape[0], num_kv_heads, 2 * block_size, two_head // 2
    ).chunk(2, dim=2)
    rows = query.index_select(0, paths.rows)  # [Q, num_heads, head]
    attended = torch.empty_like(rows)
    ops.cpu_attention_with_kv_cache(
        query=rows,
        key_cache=key_cache,
        value_cache=value_cache,
        output=attended,
        query_start_loc=paths.query_start_loc,
        seq_lens=paths.seq_lens,
        scale=impl.scale,
        causal=True,
        alibi_slopes=None,
        sliding_window=-1,
        block_table=paths.block_table,
        softcap=impl.logits_soft_cap,
        scheduler_metadata=paths.scheduler_metadata,
        s_aux=None,
        k_scale=layer._k_scale_float,
        v_scale=layer._v_scale_float,
        kv_cache_dtype=impl.kv_cache_dtype,
    )
    output.index_copy_(0, paths.rows, attended.to(output.dtype))


class TreeCPUAttentionBackendImpl(CPUAttentionBackendImpl):
    """vLLM's CPU attention, then the tree requests' rows it got wrong again, as paths."""

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
        attend_trees(step, self, layer, query, kv_cache, layout, attn_metadata.block_table, output)
        return output


class TreeCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[TreeCPUAttentionBackendImpl]:
        return TreeCPUAttentionBackendImpl
