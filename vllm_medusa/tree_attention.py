"""Attention for tree verification over vLLM's paged KV cache.

vLLM's CPU attention kernel knows only causal masks, but takes any number of sequences, each
with its own length and block table. In a step that verifies trees, the step's attention is
one call of that kernel (`KernelCall`) in which a tree request is split: its rows the causal
mask gets right (the root and the tree's first branch as far as it is a chain) stay one
sequence over the request's blocks, and each other row becomes a sequence of its own (with the
rows after it on its path, where the tree is numbered depth-first), over its context read in
place and then its path (root to the row) laid out in spare blocks of the cache that no request
owns, so the row sees the request's context, its ancestors and itself. The tree tokens' keys
and values are already in the cache at their slots (context + node index) when this runs.

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
class KernelCall:
    """One call of vLLM's causal kernel in a step that verifies trees, and the tail blocks it
    reads (`spare_blocks`), laid out by the layer just before the call.

    The step's first call computes every row of the step in place, in vLLM's own tensors:
    requests without a tree as one sequence each, as vLLM would; a tree request as the rows
    the causal mask gets right (the root and the first branch as far as it is a chain), then
    each other row as a sequence of its own over its path's layout (with the rows that follow
    it on the same path: one read of the context for them all, where the tree is numbered
    depth-first, as per-request trees are): context blocks read where they are, then tails
    that start as copies of the request's blocks from the context's end with the path's nodes
    moved into place, so the row sees context, ancestors and itself with a plain causal mask.
    The rows of one root-to-leaf path share its tails.
    Where the step's paths need more tails than there are spare blocks, the rows of the paths
    left over get one key in the first call and are computed again by later calls, gathered
    (`rows`), one path per sequence."""

    query_start_loc: torch.Tensor  # [S + 1] int32
    seq_lens: torch.Tensor  # [S] int32
    block_table: torch.Tensor  # [S, max_blocks] int32
    # (first spare block, how many in a row, request block they start as copies of, tokens
    # copied: the most any of their rows read), as Python ints: a `copy_` per half each,
    # several times faster here than `index_select` and `index_copy_` over blocks. A
    # request's paths mostly start their tails from the same block (the context's last):
    # one copy fills them all.
    tail_copies: list[tuple[int, int, int, int]]
    move_src: torch.Tensor  # [E] long: elements of the cache (flat) that are moved ...
    move_dst: torch.Tensor  # [E] long: ... to these, in spare blocks (flat)
    rows: torch.Tensor | None  # [Q] long: the step's rows it computes; None: all, in place
    scheduler_metadata: torch.Tensor | None = None  # the kernel's, built by the first layer


# vLLM's placeholder block (`BlockPool.null_block`): allocated to no request, read by no
# attention, so a layer may use it as scratch while it runs.
NULL_BLOCK = 0
# Blocks at the end of every layer's cache that the scheduler never hands out where the CPU
# attention verifies trees (`vllm_medusa.patches.scheduler`).
RESERVED_BLOCKS = 15


def spare_blocks(num_blocks: int) -> list[int]:
    """Blocks of a CPU KV cache of `num_blocks` that a layer may write while it runs: the
    reserved ones, consecutive, so that tails copied from one block take one copy, then the
    null block."""
    return [*range(num_blocks - RESERVED_BLOCKS, num_blocks), NULL_BLOCK]


class TreeStep:
    """Every tree request of the current step, for the attention layers to read."""

    def __init__(self, sequences: list[TreeSequence], query_starts: list[int]) -> None:
        self.sequences = sequences
        self.query_starts = query_starts  # [num_reqs + 1]: each request's first token, then the end
        self.backend_data: dict[str, object] = {}  # what a backend builds once per step
        # Per attention metadata object (one per KV cache group): it, and its calls.
        self._cpu_calls: dict[int, tuple[Any, list[KernelCall]]] = {}

    def cpu_calls(
        self,
        attn_metadata: Any,
        block_size: int,
        num_kv_heads: int,
        layout: KVLayout,
        num_blocks: int,
    ) -> list[KernelCall]:
        """Built by the first layer that asks, shared by the others of its group (`num_blocks`:
        the blocks of its cache, whose spare ones hold the paths' tails)."""
        key = id(attn_metadata)
        if key not in self._cpu_calls:
            num_reqs = attn_metadata.seq_lens.shape[0]
            calls = _kernel_calls(
                self.sequences,
                attn_metadata.query_start_loc.tolist(),
                attn_metadata.seq_lens.tolist(),
                attn_metadata.block_table[:num_reqs].tolist(),
                block_size,
                _Elements(num_kv_heads, layout),
                spare_blocks(num_blocks),
            )
            self._cpu_calls[key] = (attn_metadata, calls)
        return self._cpu_calls[key][1]


@dataclass
class _Path:
    """A root-to-leaf path of a tree request with rows the causal mask gets wrong: those not
    right and not taken by an earlier path (always the path's last ones, since what is right
    or taken is closed under ancestry)."""

    rows: list[int]  # the step's token index of each
    first_depth: int  # the depth of the first (the others follow, one level each)
    context_len: int
    context_blocks: list[int]
    tail_src: list[int]  # the request blocks its tails start as copies of
    tail_tokens: list[int]  # how many of each tail's first tokens its rows read
    moves: list[tuple[int, int, int, int]]  # (cache block, offset, tail number, offset)

    @property
    def seq_len(self) -> int:
        return self.context_len + self.first_depth + len(self.rows)


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
        end = context + len(path)  # the positions the path's rows read: 0 .. end - 1
        tails = -(-end // block_size) - full
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
                first_depth=len(path) - len(todo),
                context_len=context,
                context_blocks=table[:full],
                tail_src=[table[min(full + t, used - 1)] for t in range(tails)],
                tail_tokens=[min(block_size, end - (full + t) * block_size) for t in range(tails)],
                moves=moves,
            )
        )
    return paths


class _Elements:
    """Flat indices of tokens' keys and values in a layer's cache."""

    def __init__(self, num_kv_heads: int, layout: KVLayout) -> None:
        self.stretch = 2 * layout.key_index.numel()  # values per (block, KV head)
        self.heads = torch.arange(num_kv_heads)
        self.layout = layout

    def __call__(self, blocks: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """[M] blocks and in-block offsets -> [M * kv_heads * 2 * head] flat indices."""
        starts = (blocks[:, None] * self.heads.numel() + self.heads[None, :]) * self.stretch
        return (starts[:, :, None] + self.layout.slot_index(offsets)[:, None, :]).flatten()


class _CallBuilder:
    """Sequences of one kernel call, and the layout of the paths' tails it reads."""

    def __init__(self, spares: list[int], gathered: bool) -> None:
        self.spares = spares
        self.starts, self.lens, self.tables = [0], [], []
        self.tail_copies: list[tuple[int, int, int]] = []
        self.moves: list[tuple[int, int, int, int]] = []  # (block, offset, block, offset)
        # The step's rows of its sequences, gathered; None: every row of the step, in place.
        self.rows: list[int] | None = [] if gathered else None

    def fits(self, path: _Path) -> bool:
        return len(self.tail_copies) + len(path.tail_src) <= len(self.spares)

    def lay_out(self, path: _Path) -> list[int]:
        """Give `path` tails in spare blocks: the blocks its rows read."""
        tails = self.spares[len(self.tail_copies) : len(self.tail_copies) + len(path.tail_src)]
        self.tail_copies += list(zip(tails, path.tail_src, path.tail_tokens, strict=True))
        self.moves += [(block, offset, tails[t], target) for block, offset, t, target in path.moves]
        return path.context_blocks + tails

    def sequence(self, num_rows: int, seq_len: int, table: list[int]) -> None:
        self.starts.append(self.starts[-1] + num_rows)
        self.lens.append(seq_len)
        self.tables.append(table)

    def extend(self) -> None:
        """One more row in the last sequence, seeing one more key."""
        self.starts[-1] += 1
        self.lens[-1] += 1

    def copy_runs(self) -> list[tuple[int, int, int, int]]:
        """The tails as runs of consecutive spare blocks that start from the same request
        block (`KernelCall.tail_copies`). Copying a tail more tokens than its rows read is
        harmless: its path's nodes are moved in afterwards, and no row reads past them."""
        runs: list[tuple[int, int, int, int]] = []
        for spare, source, num_tokens in self.tail_copies:
            if runs:
                first, count, run_source, most = runs[-1]
                if run_source == source and first + count == spare:
                    runs[-1] = (first, count + 1, source, max(most, num_tokens))
                    continue
            runs.append((spare, 1, source, num_tokens))
        return runs

    def build(self, elements: _Elements) -> KernelCall:
        width = max(len(t) for t in self.tables)
        move = torch.tensor(self.moves, dtype=torch.long).view(-1, 4)
        return KernelCall(
            query_start_loc=torch.tensor(self.starts, dtype=torch.int32),
            seq_lens=torch.tensor(self.lens, dtype=torch.int32),
            block_table=torch.tensor(
                [t + [0] * (width - len(t)) for t in self.tables], dtype=torch.int32
            ),
            tail_copies=self.copy_runs(),
            move_src=elements(move[:, 0], move[:, 1]),
            move_dst=elements(move[:, 2], move[:, 3]),
            rows=None if self.rows is None else torch.tensor(self.rows, dtype=torch.long),
        )


def _kernel_calls(
    sequences: list[TreeSequence],
    query_start_loc: list[int],
    seq_lens: list[int],
    block_table: list[list[int]],
    block_size: int,
    elements: _Elements,
    spares: list[int],
) -> list[KernelCall]:
    """The step's kernel calls: the first over every row in place, then one per batch of the
    paths whose tails did not fit in the spare blocks (see `KernelCall`)."""
    reserved = set(spares) - {NULL_BLOCK}
    if any(block in reserved for table in block_table for block in table):
        # Writing the tails there would overwrite a request's keys and values.
        raise RuntimeError(
            "a request holds KV blocks that Medusa tree verification keeps for itself (the "
            f"last {RESERVED_BLOCKS} of the cache): this engine's scheduler is not vLLM's "
            "Scheduler, which vllm-medusa patches to leave them out; verify a chain instead "
            "(VLLM_MEDUSA_TREE=chain:K)"
        )
    trees = {seq.req_index: seq for seq in sequences}
    first = _CallBuilder(spares, gathered=False)
    later: list[_CallBuilder] = []
    for req, seq_len in enumerate(seq_lens):
        table = block_table[req]
        tree = trees.get(req)
        if tree is None:
            first.sequence(query_start_loc[req + 1] - query_start_loc[req], seq_len, table)
            continue
        first.sequence(tree.num_right, tree.context_len + tree.num_right, table)
        # Wrong row -> its path, its depth, the path's blocks in the first call (None: later).
        row_paths: dict[int, tuple[_Path, int, list[int] | None]] = {}
        for path in _request_paths(tree, table, block_size):
            if len(path.tail_src) > len(spares):
                raise RuntimeError(
                    f"a tree path needs {len(path.tail_src)} KV blocks after its context, "
                    f"more than the {len(spares)} spare ones: use a larger block size or a "
                    "shallower tree"
                )
            path_table = None
            if first.fits(path):
                path_table = first.lay_out(path)
            else:
                if not later or not later[-1].fits(path):
                    later.append(_CallBuilder(spares, gathered=True))
                later[-1].sequence(len(path.rows), path.seq_len, later[-1].lay_out(path))
                later[-1].rows += path.rows
            for i, row in enumerate(path.rows):
                row_paths[row] = (path, path.first_depth + i, path_table)
        previous: tuple[_Path, int] | None = None  # the row before: its path and depth
        for row in range(tree.token_start + tree.num_right, tree.token_start + tree.num_tokens):
            path, depth, path_table = row_paths[row]
            if path_table is None:  # computed by a later call: one key here
                first.sequence(1, 1, table)
            elif previous is not None and previous[0] is path and previous[1] == depth - 1:
                # The path's next row (trees numbered depth-first): the same sequence, so the
                # kernel reads the context once for both.
                first.extend()
            else:
                first.sequence(1, path.context_len + depth + 1, path_table)
            previous = (path, depth)
    return [builder.build(elements) for builder in (first, *later)]


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

    @functools.cached_property
    def starts(self) -> tuple[int, int]:
        """Where the keys' and the values' halves start in a stretch (read per layer and tail
        copy: Python ints, not tensor reads)."""
        return int(self.key_index[0, 0]), int(self.value_index[0, 0])

    def read(self, stretches: torch.Tensor, keys: bool) -> torch.Tensor:
        """[..., 2 * block_size * head] -> [..., block_size, head], as a view where the
        kernel stores the half row-major or transposed, else by gathering."""
        index, form = (
            (self.key_index, self.key_form) if keys else (self.value_index, self.value_form)
        )
        block_size, head = index.shape
        start = self.starts[0 if keys else 1]
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
    call: KernelCall,
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


def _copy_tokens(
    kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, 2 * head]
    layout: KVLayout,
    target: int,
    count: int,
    source: int,
    num_tokens: int,
) -> None:
    """Copy the keys and values of block `source`'s first `num_tokens` tokens to each of the
    `count` blocks from `target` on: a path's tail needs the context's last tokens and its
    nodes, which seldom fill a block, and the copies are most of what a tree costs the
    attention over the kernel."""
    _, num_kv_heads, block_size, two_head = kv_cache.shape
    if num_tokens == block_size or "scattered" in (layout.key_form, layout.value_form):
        kv_cache[target : target + count].copy_(kv_cache[source].expand(count, -1, -1, -1))
        return
    head = two_head // 2
    per_block = num_kv_heads * block_size * two_head
    # One strided view per half, the source's repeated (stride 0) over the targets, without
    # the chain of tensor calls slicing takes.
    for form, half_start in zip((layout.key_form, layout.value_form), layout.starts, strict=True):
        if form == "rows":  # token-major: the first tokens are one run per KV head
            size, stride = (count, num_kv_heads, num_tokens * head), (block_size * two_head, 1)
        else:  # channel-major: a run per channel
            size = (count, num_kv_heads, head, num_tokens)
            stride = (block_size * two_head, block_size, 1)
        offset = kv_cache.storage_offset() + half_start
        kv_cache.as_strided(size, (per_block, *stride), offset + target * per_block).copy_(
            kv_cache.as_strided(size, (0, *stride), offset + source * per_block)
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
    """The step's attention, through vLLM's kernel in as few calls as the spare blocks allow
    (`KernelCall`): per call, the paths' tails laid out, then the kernel; a handful of tensor
    calls per layer whatever the trees' shapes."""
    num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
    calls = step.cpu_calls(attn_metadata, block_size, num_kv_heads, layout, num_blocks)
    tokens = attn_metadata.num_actual_tokens
    flat = kv_cache.view(-1)
    for call in calls:
        for spare, count, block, num_tokens in call.tail_copies:
            _copy_tokens(kv_cache, layout, spare, count, block, num_tokens)
        flat.index_copy_(0, call.move_dst, flat.index_select(0, call.move_src))
        if call.rows is None:
            _causal_kernel(impl, layer, query[:tokens], kv_cache, output[:tokens], call)
            continue
        rows = query.index_select(0, call.rows)  # [Q, num_heads, head]
        attended = torch.empty_like(rows)
        _causal_kernel(impl, layer, rows, kv_cache, attended, call)
        output.index_copy_(0, call.rows, attended)


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
