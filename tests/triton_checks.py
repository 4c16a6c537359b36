"""Tree attention on vLLM's Triton attention backend, run by Triton's interpreter on CPU
tensors. Run by `test_triton_attention.py` in a process of its own (`TRITON_INTERPRET=1`,
no conftest): the interpreter and Triton's "cpu" entry must be in place before vLLM is first
imported.

Caches are written by the backend's own cache write and read by its own kernel, in two
physical layouts behind vLLM's logical [blocks, kv_heads, block_size, 2 * head] view; every
result is checked against attention computed by hand from the keys and values written.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

triton = pytest.importorskip("triton", reason="Triton is not installed")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 before Triton is imported", allow_module_level=True)

from triton.backends import Backend, backends  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402


class _InterpreterOnly(DriverBase):
    """vLLM's CPU build enables Triton only if Triton has a "cpu" backend; the interpreter
    needs no driver, so this entry is never active."""

    @classmethod
    def is_active(cls) -> bool:
        return False

    def get_current_target(self):
        raise RuntimeError("interpreter only")

    def get_active_torch_device(self):
        raise RuntimeError("interpreter only")

    def get_benchmarker(self):
        raise RuntimeError("interpreter only")


backends.setdefault("cpu", Backend(compiler=None, driver=_InterpreterOnly))

import torch  # noqa: E402
from vllm.triton_utils import HAS_TRITON  # noqa: E402

if not HAS_TRITON:
    pytest.skip("vLLM could not enable Triton", allow_module_level=True)
# vLLM's Triton cache write sizes its tiles by the CUDA device's capability, which the
# interpreter does not have: answer as a Hopper GPU would (tile sizes only).
torch.cuda.get_device_capability = lambda device=None: (9, 0)

from vllm.v1.attention.backends.triton_attn import TritonAttentionMetadata  # noqa: E402

from vllm_medusa.tree import build_tree  # noqa: E402
from vllm_medusa.tree_attention import (  # noqa: E402
    TreeSequence,
    TreeStep,
    attach_tree_step,
)
from vllm_medusa.triton_tree_attention import TreeTritonAttentionBackendImpl  # noqa: E402
from vllm_medusa.verify import copy_kv_slots, kv_moves  # noqa: E402

NUM_HEADS, KV_HEADS, HEAD, BLOCK_SIZE, NUM_BLOCKS = 4, 2, 32, 16, 24
SCALE = HEAD**-0.5
TREE = build_tree([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])  # 7 nodes with the root
OTHER = build_tree([[0], [0, 0], [0, 1]])  # a mask that is no block of TREE's
LAYER = SimpleNamespace(
    _k_scale=torch.tensor(1.0), _v_scale=torch.tensor(1.0), _q_scale=torch.tensor(1.0)
)


def _cache(layout: str) -> torch.Tensor:
    """vLLM's logical per-layer view [blocks, kv_heads, block_size, 2 * head] over memory in
    `layout` order (vLLM's `KVCacheLayout` names, without the layer axis)."""
    if layout == "BHNC":
        return torch.zeros(NUM_BLOCKS, KV_HEADS, BLOCK_SIZE, 2 * HEAD)
    assert layout == "BNHC"
    return torch.zeros(NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, 2 * HEAD).transpose(1, 2)


def _impl(**kw) -> TreeTritonAttentionBackendImpl:
    return TreeTritonAttentionBackendImpl(
        num_heads=NUM_HEADS,
        head_size=HEAD,
        scale=SCALE,
        num_kv_heads=KV_HEADS,
        alibi_slopes=None,
        sliding_window=kw.pop("sliding_window", None),
        kv_cache_dtype="auto",
        **kw,
    )


class Batch:
    """One step's requests: (context length, query length, tree mask or None) each, with
    keys and values for every token written to the cache by the backend's cache write."""

    def __init__(self, requests, kv_cache, impl, padding: int = 3) -> None:
        torch.manual_seed(len(requests))
        self.requests = requests
        self.kv_cache = kv_cache
        self.starts = [0]
        for _, query_len, _ in requests:
            self.starts.append(self.starts[-1] + query_len)
        blocks = torch.randperm(NUM_BLOCKS)
        self.max_blocks = max(-(-(c + q) // BLOCK_SIZE) for c, q, _ in requests)
        self.block_table = torch.zeros(len(requests), self.max_blocks, dtype=torch.int32)
        self.keys, self.values = [], []
        step_slots = []
        used = 0
        for r, (context, query_len, _) in enumerate(requests):
            n_blocks = -(-(context + query_len) // BLOCK_SIZE)
            self.block_table[r, :n_blocks] = blocks[used : used + n_blocks]
            used += n_blocks
            key = torch.randn(context + query_len, KV_HEADS, HEAD)
            value = torch.randn(context + query_len, KV_HEADS, HEAD)
            slots = self.slots(r, torch.arange(context + query_len))
            impl.do_kv_cache_update(LAYER, key, value, kv_cache, slots)
            self.keys.append(key)
            self.values.append(value)
            step_slots.append(slots[context:])
        self.num_tokens = self.starts[-1]
        # Rows past the step's tokens stand for CUDA graph padding: they stay untouched.
        self.query = torch.randn(self.num_tokens + padding, NUM_HEADS, HEAD)
        self.slot_mapping = torch.cat(step_slots)

    def slots(self, r: int, positions: torch.Tensor) -> torch.Tensor:
        blocks = self.block_table[r].long()[positions // BLOCK_SIZE]
        return blocks * BLOCK_SIZE + positions % BLOCK_SIZE

    def metadata(self) -> TritonAttentionMetadata:
        seq_lens = [c + q for c, q, _ in self.requests]
        segments = 16
        return TritonAttentionMetadata(
            num_actual_tokens=self.num_tokens,
            max_query_len=max(q for _, q, _ in self.requests),
            query_start_loc=torch.tensor(self.starts, dtype=torch.int32),
            max_seq_len=max(seq_lens),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_table=self.block_table,
            slot_mapping=self.slot_mapping,
            seq_threshold_3D=8,
            num_par_softmax_segments=segments,
            softmax_segm_output=torch.empty(8, NUM_HEADS, segments, HEAD),
            softmax_segm_max=torch.empty(8, NUM_HEADS, segments),
            softmax_segm_expsum=torch.empty(8, NUM_HEADS, segments),
            causal=True,
        )

    def tree_step(self) -> TreeStep:
        sequences = [
            TreeSequence(r, self.starts[r], context, mask)
            for r, (context, _, mask) in enumerate(self.requests)
            if mask is not None
        ]
        return TreeStep(sequences, self.starts)

    def expected(self, r: int) -> torch.Tensor:
        """[query_len, heads, head] attention of request r by hand: a tree request's node sees
        the context, its ancestors and itself; any other row is causal."""
        context, query_len, mask = self.requests[r]
        rows = []
        for i in range(query_len):
            if mask is None:
                visible = list(range(context + i + 1))
            else:
                visible = list(range(context)) + [
                    context + j for j in range(query_len) if mask[i, j]
                ]
            q = self.query[self.starts[r] + i].double()  # [heads, head]
            group = NUM_HEADS // KV_HEADS
            k = self.keys[r][visible].double().repeat_interleave(group, dim=1)
            v = self.values[r][visible].double().repeat_interleave(group, dim=1)
            weights = torch.softmax(torch.einsum("hd,thd->ht", q, k) * SCALE, dim=-1)
            rows.append(torch.einsum("ht,thd->hd", weights, v))
        return torch.stack(rows).float()

    def attend(self, impl, step: TreeStep | None) -> torch.Tensor:
        output = torch.full_like(self.query, float("nan"))
        metadata = self.metadata()
        attach_tree_step({"layer": metadata}, step)
        impl.forward(LAYER, self.query, None, None, self.kv_cache, metadata, output)
        return output


def _mask(tree, n: int) -> torch.Tensor:
    return tree.attention_mask[:n, :n]


MIXED = [
    (21, 7, _mask(TREE, 7)),  # the whole tree
    (8, 13, None),  # a prefill chunk: must never share the biased call
    (35, 1, None),  # a plain decode
    (40, 4, _mask(TREE, 4)),  # a breadth-first prefix of the same tree: the same call
    (9, 4, _mask(OTHER, 4)),  # another tree shape: a call of its own
    (3, 2, None),  # a chain step (causal among its drafts)
]


@pytest.mark.parametrize("layout", ["BHNC", "BNHC"])
def test_mixed_batch_matches_brute_force(layout):
    impl = _impl()
    batch = Batch(MIXED, _cache(layout), impl)
    output = batch.attend(impl, batch.tree_step())
    for r in range(len(MIXED)):
        rows = output[batch.starts[r] : batch.starts[r + 1]]
        torch.testing.assert_close(rows, batch.expected(r), atol=2e-5, rtol=0, msg=f"request {r}")
    assert output[batch.num_tokens :].isnan().all()  # padding rows untouched


def test_tree_rows_need_the_bias():
    """vLLM's call alone (no tree step) is causal among the nodes: the tree rows differ, so
    the check above would catch a tree mask that never reaches the kernel."""
    impl = _impl()
    batch = Batch(MIXED, _cache("BHNC"), impl)
    output = batch.attend(impl, None)
    torch.testing.assert_close(output[batch.starts[1] : batch.starts[2]], batch.expected(1))
    wrong = (output[: batch.starts[1]] - batch.expected(0)).abs().amax()
    assert wrong > 1e-2


def test_all_tree_requests_use_one_call_without_gathering():
    from vllm_medusa.triton_tree_attention import triton_calls

    requests = [(30, 7, _mask(TREE, 7)), (5, 3, _mask(TREE, 3)), (17, 5, _mask(TREE, 5))]
    impl = _impl()
    batch = Batch(requests, _cache("BNHC"), impl)
    step = batch.tree_step()
    calls = triton_calls(step, batch.metadata())
    assert len(calls) == 1 and calls[0].rows is None and calls[0].bias is not None
    output = batch.attend(impl, step)
    for r in range(len(requests)):
        rows = output[batch.starts[r] : batch.starts[r + 1]]
        torch.testing.assert_close(rows, batch.expected(r), atol=2e-5, rtol=0)


@pytest.mark.parametrize("layout", ["BHNC", "BNHC"])
def test_kv_moves_in_triton_layout(layout):
    """After a tree step the accepted nodes' keys and values move to the slots right after the
    context; the next step's decode, read by the kernel, sees the accepted path in order."""
    context, n = 26, 7
    impl = _impl()
    kv_cache = _cache(layout)
    batch = Batch([(context, n, _mask(TREE, n)), (11, 1, None)], kv_cache, impl)
    accepted = [[2, 5], []]  # root -> node 2 -> node 5 (its child), then a bonus token
    assert TREE.parents[5] == 2 and TREE.parents[2] == 0
    untouched = kv_cache.clone()
    src, dst = kv_moves(accepted, batch.starts[:2], batch.slot_mapping)
    copy_kv_slots([(kv_cache, None)], src, dst)
    slots = batch.slots(0, torch.arange(context + n))
    for position, token in ((context + 1, context + 2), (context + 2, context + 5)):
        slot = int(slots[position])
        stored = kv_cache[slot // BLOCK_SIZE, :, slot % BLOCK_SIZE]  # [kv_heads, 2 * head]
        torch.testing.assert_close(stored[:, :HEAD], batch.keys[0][token], atol=0, rtol=0)
        torch.testing.assert_close(stored[:, HEAD:], batch.values[0][token], atol=0, rtol=0)
    changed = (kv_cache != untouched).any(dim=(1, 3)).nonzero()  # [(block, offset)]
    moved_slots = {int(b) * BLOCK_SIZE + int(o) for b, o in changed}
    assert moved_slots <= {int(s) for s in dst}

    # The next step: the bonus token at context + 3 decodes over context, root, 2, 5, itself.
    path = list(range(context + 1)) + [context + 2, context + 5]
    key = torch.cat([batch.keys[0][path], torch.randn(1, KV_HEADS, HEAD)])
    value = torch.cat([batch.values[0][path], torch.randn(1, KV_HEADS, HEAD)])
    new_slot = slots[context + 3 : context + 4]
    impl.do_kv_cache_update(LAYER, key[-1:], value[-1:], kv_cache, new_slot)
    follow = Batch.__new__(Batch)
    follow.requests = [(context + 3, 1, None)]
    follow.kv_cache, follow.starts, follow.num_tokens = kv_cache, [0, 1], 1
    follow.block_table, follow.slot_mapping = batch.block_table[:1], new_slot
    follow.keys, follow.values = [key], [value]
    follow.query = torch.randn(1, NUM_HEADS, HEAD)
    output = follow.attend(impl, None)
    torch.testing.assert_close(output, follow.expected(0), atol=2e-5, rtol=0)


def test_unsupported_attention_is_refused_for_trees():
    impl = _impl(sliding_window=8)
    batch = Batch([(10, 3, _mask(TREE, 3))], _cache("BHNC"), impl)
    with pytest.raises(NotImplementedError, match="sliding window.*VLLM_MEDUSA_TREE=chain"):
        batch.attend(impl, batch.tree_step())


def test_plugin_registers_the_tree_backend():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm_medusa.plugin import register
    from vllm_medusa.triton_tree_attention import TreeTritonAttentionBackend

    register()
    backend = AttentionBackendEnum.TRITON_ATTN.get_class()
    assert backend is TreeTritonAttentionBackend
    assert backend.get_impl_cls() is TreeTritonAttentionBackendImpl
    assert backend.get_name() == "TRITON_ATTN"


def test_tree_bias_serves_prefixes_and_grows():
    from vllm_medusa.triton_tree_attention import tree_bias

    device = torch.device("cpu")
    full = tree_bias(_mask(TREE, 7), 40, device)
    prefix = tree_bias(_mask(TREE, 4), 40, device)
    assert prefix.data_ptr() == full.data_ptr() and prefix.shape[0] == 4
    assert full.stride(0) >= 7 + 40
    expected = torch.zeros(7, 7).masked_fill_(~_mask(TREE, 7), float("-inf"))
    assert torch.equal(full[:, :7], expected)
    assert (full[:, 7:] == 0).all()
    longer = tree_bias(_mask(TREE, 5), 500, device)  # a longer context: a wider buffer
    assert longer.stride(0) >= 7 + 500 and torch.equal(longer[:, :5], expected[:5, :5])
    # The interpreter reads up to the context length before each row: zeros there.
    width = longer.stride(0)
    before = longer.storage_offset() - width  # the buffer's start: the padding row
    flat = torch.as_strided(longer, ((7 + 1) * width,), (1,), before)
    for row in range(5):
        start = width * (row + 1)
        assert (flat[start - 500 : start] == 0).all()
