"""Attention for tree verification over vLLM's paged KV cache.

vLLM's CPU attention kernel knows only causal masks. In a step that verifies trees, the kernel
runs once for the whole batch (prefill chunks, plain decodes and trees alike, `MainCall`), in
which a tree request's rows are right where their ancestors are all the rows before them (the
root, and the tree's first branch as far as it is a chain). Its other rows are computed by the
same kernel in a second call: each root-to-leaf path is a causal sequence of its own (context,
then the path's nodes), its context read in place and its nodes laid out in spare blocks of the
cache that no request owns (`PathBatch`), so a node sees the request's context, its ancestors
and itself. The first call gives those rows a few keys only (the kernel's cost grows with rows
times keys, and they are overwritten). The tree tokens' keys and values are already in the
cache at their slots (context + node index) when this runs.

How a block stores its keys and values is the kernel's business and differs between its
instruction sets (keys are stored transposed for some), so the layout is not assumed: it is
measured once per instruction set by caching known values with the kernel's own cache write.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from vllm.v1.attention.backend import AttentionType
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

    @functools.cached_property
    def num_right(self) -> int:
        """Rows a causal pass gets right: a prefix, those whose ancestors are all the rows
        before them."""
        mask = self.node_mask
        return next(
            (j for j in range(self.num_tokens) if not mask[j, : j + 1].all()), self.num_tokens
        )


@dataclass
class MainCall:
    """vLLM's causal call for every row of the step, with each tree request split in two
    sequences: the rows the causal mask gets right, over the context and themselves, and the
    rest as a sequence of as many keys as rows (the request's first slots), whose rows the
    paths overwrite. Built once per step from the metadata vLLM built for its own call."""

    query_start_loc: torch.Tensor  # [S + 1] int32
    seq_lens: torch.Tensor  # [S] int32
    block_table: torch.Tensor  # [S, max_blocks] int32
    scheduler_metadata: torch.Tensor | None = None  # the kernel's, built by the first layer


def _main_call(
    sequences: list[TreeSequence],
    query_start_loc: list[int],
    seq_lens: list[int],
    block_table: torch.Tensor,  # [num_reqs, max_blocks] int32
) -> MainCall:
    trees = {seq.req_index: seq for seq in sequences}
    starts, lens, table_rows = [0], [], []
    for req, seq_len in enumerate(seq_lens):
        end = query_start_loc[req + 1]
        tree = trees.get(req)
        if tree is not None:
            wrong = tree.num_tokens - tree.num_right
            starts.append(end - wrong)
            lens.append(seq_len - wrong)
            table_rows.append(req)
            seq_len = wrong
        starts.append(end)
        lens.append(seq_len)
        table_rows.append(req)
    return MainCall(
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        block_table=block_table.index_select(0, torch.tensor(table_rows)),
    )


@dataclass
class PathBatch:
    """Tree rows the causal pass got wrong, regrouped as causal sequences that vLLM's kernel
    can compute: one per root-to-leaf path, holding the path's rows not already right or taken
    by an earlier path (always the path's last ones, since what is right or taken is closed
    under ancestry). Each path's keys and values are laid out contiguously after its request's
    context: its full context blocks read where they are, then "tail" blocks that start as
    copies of the request's blocks from the context's end, with the path's nodes moved into
    place, so the kernel sees context + ancestors + node with a plain causal mask. Tails are
    spare blocks of the cache that no request owns (`spare_blocks`); a step whose paths need
    more tails than there are spares runs several batches, one after the other."""

    rows: torch.Tensor  # [Q] long: the step's token index of each recomputed row, path by path
    query_start_loc: torch.Tensor  # [P + 1] int32
    seq_lens: torch.Tensor  # [P] int32: context + path length
    block_table: torch.Tensor  # [P, max_blocks] int32: context blocks, then spare blocks
    # (spare block, request block it starts as a copy of), as Python ints: one `copy_` each,
    # several times faster here than `index_select` and `index_copy_` over blocks.
    tail_copies: list[tuple[int, int]]
    move_src: torch.Tensor  # [E] long: elements of the cache (flat) that are moved ...
    move_dst: torch.Tensor  # [E] long: ... to these, in spare blocks (flat)
    scheduler_metadata: torch.Tensor | None = None  # the kernel's, built by the first layer


# vLLM's placeholder block (`BlockPool.null_block`): allocated to no request, read by no
# attention, so a layer may use it as scratch while it runs.
NULL_BLOCK = 0
# Blocks at the end of every layer's cache that the scheduler never hands out where the CPU
# attention verifies trees (`vllm_medusa.patches.scheduler`).
RESERVED_BLOCKS = 7


def spare_blocks(num_blocks: int) -> list[int]:
    """Blocks of a CPU KV cache of `num_blocks` that a layer may write while it runs: the
    null block and the reserved ones."""
    return [NULL_BLOCK, *range(num_blocks - RESERVED_BLOCKS, num_blocks)]


class TreeStep:
    """Every tree request of the current step, for the attention layers to read."""

    def __init__(self, sequences: list[TreeSequence], query_starts: list[int]) -> None:
        self.sequences = sequences
        self.query_starts = query_starts  # [num_reqs + 1]: each request's first token, then the end
        self.backend_data: dict[str, object] = {}  # what a backend builds once per step
        # Per attention metadata object (one per KV cache group): it, and its calls.
        self._cpu_calls: dict[int, tuple[Any, MainCall, list[PathBatch]]] = {}

    def cpu_calls(
        self,
        attn_metadata: Any,
        block_size: int,
        num_kv_heads: int,
        layout: KVLayout,
        spares: list[int],
    ) -> tuple[MainCall, list[PathBatch]]:
        """Built by the first layer that asks, shared by the others of its group."""
        key = id(attn_metadata)
        if key not in self._cpu_calls:
            num_reqs = attn_metadata.seq_lens.shape[0]
            block_table = attn_metadata.block_table[:num_reqs]
            main = _main_call(
                self.sequences,
                attn_metadata.query_start_loc.tolist(),
                attn_metadata.seq_lens.tolist(),
                block_table,
            )
            paths = _paths(
                self.sequences, block_table.tolist(), block_size, num_kv_heads, layout, spares
            )
            self._cpu_calls[key] = (attn_metadata, main, paths)
        return self._cpu_calls[key][1:]


@dataclass
class _Path:
    """One path of `PathBatch`, before batching."""

    rows: list[int]
    seq_len: int
    context_blocks: list[int]
    tail_src: list[int]
    moves: list[tuple[int, int, int, int]]  # (cache block, offset, tail number, offset)


def _request_paths(seq: TreeSequence, table: list[int], block_size: int) -> list[_Path]:
    mask = seq.node_mask
    n, context = seq.num_tokens, seq.context_len
    full = context // block_size  # context blocks every path reads in place
    used = -(-(context + n) // block_size)  # blocks holding the context and the tree
    done = [j < seq.num_right for j in range(n)]  # right after the causal pass
    paths = []
    for leaf in (j for j in range(n) if not mask[j + 1 :, j].any()):
        path = torch.nonzero(mask[leaf]).flatten().tolist()  # root .. leaf
        todo = [node for node in path if not done[node]]
        if not todo:
            continue
        for node in todo:
            done[node] = True
        seq_len = context + len(path)
        tails = -(-seq_len // block_size) - full
        moves = []
        for depth, node in enumerate(path):
            if node == depth:  # already where the path needs it
                continue
            source, target = context + node, context + depth
            moves.append(
                (
                    table[source // block_size],
                    source % block_size,
                    target // block_size - full,
                    target % block_size,
                )
            )
        paths.append(
            _Path(
                rows=[seq.token_start + node for node in todo],
                seq_len=seq_len,
                context_blocks=table[:full],
                tail_src=[table[min(full + t, used - 1)] for t in range(tails)],
                moves=moves,
            )
        )
    return paths


def _paths(
    sequences: list[TreeSequence],
    block_table: list[list[int]],
    block_size: int,
    num_kv_heads: int,
    layout: KVLayout,
    spares: list[int],
) -> list[PathBatch]:
    """The step's paths, in batches whose tails fit in the spare blocks."""
    paths = [
        path
        for seq in sequences
        for path in _request_paths(seq, block_table[seq.req_index], block_size)
    ]
    batches: list[list[_Path]] = [[]]
    for path in paths:
        if len(path.tail_src) > len(spares):
            raise RuntimeError(
                f"a tree path needs {len(path.tail_src)} KV blocks after its context, more "
                f"than the {len(spares)} spare ones: use a larger block size or a shallower tree"
            )
        if sum(len(p.tail_src) for p in batches[-1]) + len(path.tail_src) > len(spares):
            batches.append([])
        batches[-1].append(path)
    return [_path_batch(batch, num_kv_heads, layout, spares) for batch in batches]


def _path_batch(
    paths: list[_Path], num_kv_heads: int, layout: KVLayout, spares: list[int]
) -> PathBatch:
    stretch = 2 * layout.key_index.numel()  # values per (block, KV head)
    heads = torch.arange(num_kv_heads)
    rows, query_starts, tables, tail_src, moves = [], [0], [], [], []
    for path in paths:
        tails = spares[len(tail_src) : len(tail_src) + len(path.tail_src)]
        tail_src += path.tail_src
        tables.append(path.context_blocks + tails)
        moves += [(block, offset, tails[t], target) for block, offset, t, target in path.moves]
        rows += path.rows
        query_starts.append(len(rows))
    width = max(len(t) for t in tables)
    move = torch.tensor(moves, dtype=torch.long).view(-1, 4)

    def elements(blocks: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """[M] blocks and in-block offsets -> [M * kv_heads * 2 * head] flat indices."""
        starts = (blocks[:, None] * num_kv_heads + heads[None, :]) * stretch  # [M, kv_heads]
        return (starts[:, :, None] + layout.slot_index(offsets)[:, None, :]).flatten()

    return PathBatch(
        rows=torch.tensor(rows, dtype=torch.long),
        query_start_loc=torch.tensor(query_starts, dtype=torch.int32),
        seq_lens=torch.tensor([p.seq_len for p in paths], dtype=torch.int32),
        block_table=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        tail_copies=list(zip(spares, tail_src, strict=False)),
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


def _scheduler_metadata(
    impl: CPUAttentionBackendImpl,
    layer: Any,
    query: torch.Tensor,  # [num_tokens, num_heads, head]
    num_kv_heads: int,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
) -> torch.Tensor:
    from vllm import _custom_ops as ops
    from vllm import envs

    return ops.cpu_attn_get_scheduler_metadata(
        num_reqs=len(seq_lens),
        num_heads=query.shape[1],
        num_kv_heads=num_kv_heads,
        head_dim=query.shape[2],
        seq_lens=seq_lens,
        dtype=query.dtype,
        query_start_loc=query_start_loc,
        causal=True,
        sliding_window_size=-1,
        isa=layer.isa,
        enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
        kv_cache_dtype=impl.kv_cache_dtype,
    )


def _causal_kernel(
    impl: CPUAttentionBackendImpl,
    layer: Any,
    query: torch.Tensor,  # [Q, num_heads, head]
    cache: torch.Tensor,  # [blocks, num_kv_heads, block_size, 2 * head]
    output: torch.Tensor,  # [Q, num_heads, head]
    call: MainCall | PathBatch,
) -> None:
    """vLLM's kernel, causal, over the sequences `call` describes."""
    from vllm import _custom_ops as ops

    blocks, num_kv_heads, block_size, two_head = cache.shape
    if call.scheduler_metadata is None:
        call.scheduler_metadata = _scheduler_metadata(
            impl, layer, query, num_kv_heads, call.query_start_loc, call.seq_lens
        )
    key_cache, value_cache = cache.view(blocks, num_kv_heads, 2 * block_size, two_head // 2).chunk(
        2, dim=2
    )
    ops.cpu_attention_with_kv_cache(
        query=query,
        key_cache=key_cache,
        value_cache=value_cache,
        output=output,
        query_start_loc=call.query_start_loc,
        seq_lens=call.seq_lens,
        scale=impl.scale,
        causal=True,
        alibi_slopes=None,
        sliding_window=-1,
        block_table=call.block_table,
        softcap=impl.logits_soft_cap,
        scheduler_metadata=call.scheduler_metadata,
        s_aux=None,
        k_scale=layer._k_scale_float,
        v_scale=layer._v_scale_float,
        kv_cache_dtype=impl.kv_cache_dtype,
    )


def attend_trees(
    step: TreeStep,
    impl: CPUAttentionBackendImpl,
    layer: Any,
    query: torch.Tensor,  # [num_tokens, num_heads, head]
    kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, 2 * head]
    layout: KVLayout,
    attn_metadata: Any,  # vLLM's for this layer: query_start_loc, seq_lens, block_table
    output: torch.Tensor,  # [num_tokens, num_heads, head]
) -> None:
    """The step's attention: every row through vLLM's kernel with causal masks (`MainCall`),
    then the tree rows that mask gets wrong again, over the paths' blocks (`PathBatch`): a
    handful of tensor calls per layer whatever the trees' shapes (per batch of paths, where
    they need more tails than there are spare blocks)."""
    num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
    main, batches = step.cpu_calls(
        attn_metadata, block_size, num_kv_heads, layout, spare_blocks(num_blocks)
    )
    tokens = attn_metadata.num_actual_tokens
    _causal_kernel(impl, layer, query[:tokens], kv_cache, output[:tokens], main)
    flat = kv_cache.view(-1)
    for paths in batches:
        for spare, block in paths.tail_copies:
            kv_cache[spare].copy_(kv_cache[block])
        flat.index_copy_(0, paths.move_dst, flat.index_select(0, paths.move_src))
        rows = query.index_select(0, paths.rows)  # [Q, num_heads, head]
        attended = torch.empty_like(rows)
        _causal_kernel(impl, layer, rows, kv_cache, attended, paths)
        output.index_copy_(0, paths.rows, attended)


class TreeCPUAttentionBackendImpl(CPUAttentionBackendImpl):
    """vLLM's CPU attention; in a step that verifies trees, the same kernel called with the
    tree requests' rows split so that each row sees its context, its ancestors and itself."""

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kw):
        step = tree_step_of(attn_metadata)
        if step is None:
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output, *args, **kw
            )
        if (
            self.sliding_window != -1
            or self.alibi_slopes is not None
            or self.sinks is not None
            or self.is_fp8_kv_cache
            or self.attn_type != AttentionType.DECODER
            or not attn_metadata.causal
            or attn_metadata.dynamic_causal is not None
            or args
            or any(v is not None for v in kw.values())
        ):
            raise NotImplementedError(
                "vllm-medusa tree verification supports plain causal attention with an "
                "unquantized KV cache only: use a chain (VLLM_MEDUSA_TREE=chain:K)"
            )
        _, _, block_size, two_head = kv_cache.shape
        layout = kv_layout(layer.isa, block_size, two_head // 2, kv_cache.dtype)
        attend_trees(step, self, layer, query, kv_cache, layout, attn_metadata, output)
        return output


class TreeCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[TreeCPUAttentionBackendImpl]:
        return TreeCPUAttentionBackendImpl
