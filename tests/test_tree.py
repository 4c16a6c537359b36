"""Medusa trees and their verification pieces, without an engine: tree buffers against
hand-worked trees, every named tree's structure, settings errors, KV copies and
tree attention against a brute-force reference over a cache written by vLLM's own kernel."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from vllm import _custom_ops as ops

from vllm_medusa.tree import (
    MAX_TREE_NODES,
    TREE_ENV,
    TreeError,
    build_tree,
    configured_tree,
    named_trees,
    parse_tree,
    tree_setting,
)
from vllm_medusa.tree_attention import (
    RESERVED_BLOCKS,
    KVLayout,
    TreeSequence,
    TreeStep,
    attend_trees,
    kv_layout,
    spare_blocks,
)
from vllm_medusa.verify import copy_kv_slots

# Given out of order on purpose: nodes are numbered breadth-first, then by path.
SMALL = [[1], [0, 1], [0], [1, 0], [0, 0]]
#          root
#        /      \
#   1:(0)        2:(1)
#   /    \          \
# 3:(0,0) 4:(0,1)  5:(1,0)


def test_small_tree_buffers_by_hand():
    tree = build_tree(SMALL)
    assert tree.paths == ((0,), (1,), (0, 0), (0, 1), (1, 0))
    assert tree.num_nodes == 5 and tree.depth == 2 and tree.top_k == 2
    assert tree.parents.tolist() == [-1, 0, 0, 1, 1, 2]
    assert tree.depths.tolist() == [0, 1, 1, 2, 2, 2]
    assert tree.heads.tolist() == [0, 0, 1, 1, 1]
    assert tree.ranks.tolist() == [0, 1, 0, 1, 0]
    assert tree.children == ((1, 2), (3, 4), (5,), (), (), ())
    assert tree.attention_mask.int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 0, 1, 0, 0, 1],
    ]
    assert tree.leaf_paths.tolist() == [[0, 1, 3], [0, 1, 4], [0, 2, 5]]
    assert not tree.is_chain


def test_step_tree_keeps_the_trees_nodes_and_numbers_them_depth_first():
    """A step drafts the tree's first n nodes (breadth-first here), numbered depth-first."""
    tree = build_tree(SMALL)
    step, order = tree.step_tree(5)
    assert [tree.paths[i] for i in order] == [(0,), (0, 0), (0, 1), (1,), (1, 0)]
    assert list(step.parents) == [-1, 0, 1, 1, 0, 4]
    assert step.ranks == ((0,), (0, 0), (0, 1), (1,), (1, 0))
    # Three nodes: (0), (1), (0, 0), the deeper branch first.
    step, order = tree.step_tree(3)
    assert [tree.paths[i] for i in order] == [(0,), (0, 0), (1,)]
    assert list(step.parents) == [-1, 0, 1, 0]
    # The proposer picks each step node's head and rank through `order`.
    assert tree.heads[order].tolist() == [0, 1, 0] and tree.ranks[order].tolist() == [0, 0, 1]
    assert tree.step_tree(2)[0].is_chain is False and tree.step_tree(1)[0].is_chain


def test_chain_is_a_degenerate_tree():
    tree = parse_tree("chain:3")
    assert tree.is_chain
    assert tree.paths == ((0,), (0, 0), (0, 0, 0))
    assert tree.attention_mask.tolist() == torch.tril(torch.ones(4, 4, dtype=torch.bool)).tolist()
    assert tree.leaf_paths.tolist() == [[0, 1, 2, 3]]


def test_mc_sim_7b_63_by_hand():
    tree = parse_tree("mc_sim_7b_63")
    assert tree.num_nodes == 63 and tree.depth == 4 and tree.top_k == 10
    # Depth 1 holds head 0's top 10 (nodes 1-10); (0, 0) is the first depth-2 node.
    assert tree.paths[:10] == tuple((r,) for r in range(10))
    assert tree.paths[10] == (0, 0) and tree.parents[11] == 1
    deepest = tree.paths.index((0, 0, 0, 0)) + 1
    ancestors = torch.nonzero(tree.attention_mask[deepest]).flatten().tolist()
    assert [tree.paths[a - 1] for a in ancestors[1:]] == [(0,), (0, 0), (0, 0, 0), (0, 0, 0, 0)]


@pytest.mark.parametrize("name", sorted(named_trees()))
def test_named_tree_structure(name):
    tree = parse_tree(name)
    assert tree.num_nodes == 63
    depths = tree.depths.tolist()
    assert depths == sorted(depths)  # breadth-first: a prefix of the order is a tree
    mask = tree.attention_mask
    for node in range(1, tree.num_nodes + 1):
        parent = int(tree.parents[node])
        assert parent < node and depths[node] == depths[parent] + 1
        assert tree.paths[node - 1][:-1] == (tree.paths[parent - 1] if parent else ())
        # A node sees exactly its parent's view plus itself.
        expected = mask[parent].clone()
        expected[node] = True
        assert mask[node].tolist() == expected.tolist()
    leaves = {j for j in range(1, tree.num_nodes + 1) if not tree.children[j]}
    assert {int(row[row >= 0][-1]) for row in tree.leaf_paths} == leaves
    for row in tree.leaf_paths.tolist():
        nodes = [n for n in row if n >= 0]
        assert all(int(tree.parents[b]) == a for a, b in zip(nodes, nodes[1:], strict=False))


@pytest.mark.parametrize(
    ("paths", "words"),
    [
        ([[0, 1]], "has no parent [0]"),
        ([[0], [0, 0], [0, 1, 0]], "has no parent [0, 1]"),
        ([[0], [10]], "ranks must be 0..9"),
        ([[0], [-1]], "ranks must be 0..9"),
        ([[0], [0]], "appears twice"),
        ([], "non-empty list"),
        ([[0], []], "not a non-empty list"),
        ([[0], ["a"]], "not a non-empty list"),
        (
            [[i] for i in range(10)]
            + [[i, j] for i in range(10) for j in range(10)]
            + [[0, 0, k] for k in range(10)]
            + [[0, 0, 0, k] for k in range(10)],
            f"vLLM verifies at most {MAX_TREE_NODES}",
        ),
    ],
)
def test_malformed_trees_refused(paths, words):
    with pytest.raises(TreeError) as info:
        build_tree(paths)
    assert words in str(info.value)
    assert "\n" not in str(info.value)


def test_tree_settings_forms(tmp_path):
    assert parse_tree(json.dumps(SMALL)).paths == build_tree(SMALL).paths
    listed = tmp_path / "tree.json"
    listed.write_text(json.dumps(SMALL))
    assert parse_tree(str(listed)).num_nodes == 5
    in_config = tmp_path / "config.json"
    in_config.write_text(json.dumps({"medusa_choices": [[0], [0, 0]]}))
    assert parse_tree(str(in_config)).is_chain
    for bad, words in [
        ("nope", "unknown Medusa tree 'nope'"),
        ("chain:x", "chain:K"),
        ("[[0],", "not valid JSON"),
        (str(tmp_path / "missing.json"), "does not exist"),
    ]:
        with pytest.raises(TreeError, match=words):
            parse_tree(bad)


def test_process_setting_overrides_heads_config(monkeypatch):
    monkeypatch.delenv(TREE_ENV, raising=False)
    assert configured_tree(None) is None
    assert configured_tree([[0], [1]]).num_nodes == 2
    monkeypatch.setenv(TREE_ENV, "zephyr_stage2")
    assert configured_tree([[0], [1]]).name == "zephyr_stage2"


def test_tree_setting_is_scoped(monkeypatch):
    monkeypatch.setenv(TREE_ENV, "chain:2")
    with tree_setting("zephyr_stage2"):
        assert configured_tree(None).name == "zephyr_stage2"
    with tree_setting(None):
        assert configured_tree([[0], [1]]).num_nodes == 2  # the heads' own setting
    assert configured_tree(None).name == "chain:2"


def _write_kv(kv_cache, key, value, slots, isa="vec"):
    """Cache key/value [T, kv_heads, head] at slots with vLLM's own CPU cache write."""
    nb, kvh, bs, two_head = kv_cache.shape
    key_cache, value_cache = kv_cache.view(nb, kvh, 2 * bs, two_head // 2).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)


def test_kv_layout_reads_back_what_the_kernel_wrote():
    block_size, head = 32, 64
    kv_cache = torch.zeros(3, 2, block_size, 2 * head)
    key, value = torch.randn(70, 2, head), torch.randn(70, 2, head)
    slots = torch.randperm(3 * block_size)[:70]
    _write_kv(kv_cache, key, value, slots)
    layout = kv_layout("vec", block_size, head, torch.float32)
    stretch = kv_cache.view(3, 2, -1)
    index = layout.slot_index(slots % block_size)  # [70, 2 * head]
    cached = stretch[(slots // block_size)[:, None], :, index]  # [70, 2 * head, kv_heads]
    assert torch.equal(cached[:, :head].transpose(1, 2), key)
    assert torch.equal(cached[:, head:].transpose(1, 2), value)

    # Read as views where the kernel's layout allows it; the general gather agrees.
    gathered = KVLayout(layout.key_index, layout.value_index, "scattered", "scattered")
    for keys in (True, False):
        assert torch.equal(layout.read(stretch, keys), gathered.read(stretch, keys))

    # Moving slots: destinations get the sources' keys and values, nothing else changes.
    src, dst = slots[40:50], slots[50:60]
    before = kv_cache.clone()
    copy_kv_slots([(kv_cache, layout)], src, dst)
    moved = stretch[(dst // block_size)[:, None], :, layout.slot_index(dst % block_size)]
    assert torch.equal(moved[:, :head].transpose(1, 2), key[40:50])
    untouched = torch.ones(3 * block_size, dtype=torch.bool)
    untouched[dst] = False
    keep = torch.nonzero(untouched).flatten()
    keep_index = layout.slot_index(keep % block_size)
    assert torch.equal(
        stretch[(keep // block_size)[:, None], :, keep_index],
        before.view(3, 2, -1)[(keep // block_size)[:, None], :, keep_index],
    )


def _tree_attention_against_brute_force(dtype, requests, block_table) -> tuple[TreeStep, Any, int]:
    """Run a step's attention over a cache written by vLLM's own kernel and check every row
    against attention computed by hand, and that no block but the spare ones was written.
    `requests`: (tree mask, or None for a plain request of `n` causal tokens such as a
    prefill chunk or a decode; context length; n). Returns the step, its metadata and the
    cache's block count."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    block_size, head, num_heads, kv_heads = 32, 64, 4, 2
    num_blocks = int(block_table.max()) + 1 + RESERVED_BLOCKS  # requests' blocks, then spares
    kv_cache = torch.zeros(num_blocks, kv_heads, block_size, 2 * head, dtype=dtype)
    # A token a row reads from a spare block that was not laid out for it reads garbage.
    kv_cache[spare_blocks(num_blocks)] = 1e4
    num_tokens = sum(n for _, _, n in requests)
    query = torch.randn(num_tokens, num_heads, head, dtype=dtype)
    output = torch.full_like(query, float("nan"))
    sequences, keys, values, starts = [], [], [], [0]
    for req, (mask, context, n) in enumerate(requests):
        key = torch.randn(context + n, kv_heads, head, dtype=dtype)
        value = torch.randn(context + n, kv_heads, head, dtype=dtype)
        positions = torch.arange(context + n)
        slots = block_table[req].long()[positions // block_size] * block_size + (
            positions % block_size
        )
        _write_kv(kv_cache, key, value, slots)
        keys.append(key)
        values.append(value)
        if mask is not None:
            sequences.append(TreeSequence(req, starts[-1], context, mask))
        starts.append(starts[-1] + n)
    before = kv_cache.clone()
    layout = kv_layout("vec", block_size, head, dtype)
    step = TreeStep(sequences, query_starts=starts)
    impl = SimpleNamespace(scale=0.125, logits_soft_cap=0, kv_cache_dtype="auto")
    layer = SimpleNamespace(isa="vec", _k_scale_float=1.0, _v_scale_float=1.0)
    metadata = SimpleNamespace(
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor([c + n for _, c, n in requests], dtype=torch.int32),
        block_table=block_table,
        num_actual_tokens=num_tokens,
    )
    attend_trees(step, impl, layer, query, kv_cache, layout, metadata, output)
    for req, (mask, context, n) in enumerate(requests):
        if mask is None:
            mask = torch.ones(n, n, dtype=torch.bool).tril()
        for node in range(n):
            visible = list(range(context)) + [context + j for j in range(n) if mask[node, j]]
            q = query[starts[req] + node].double()  # [num_heads, head]
            k = keys[req][visible].double().repeat_interleave(num_heads // kv_heads, dim=1)
            v = values[req][visible].double().repeat_interleave(num_heads // kv_heads, dim=1)
            weights = torch.softmax(torch.einsum("hd,thd->ht", q, k) * 0.125, dim=-1)
            expected = torch.einsum("ht,thd->hd", weights, v)
            tolerance = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(
                output[starts[req] + node].double(), expected, atol=tolerance, rtol=0
            )
    owned = [b for b in range(num_blocks) if b not in spare_blocks(num_blocks)]
    assert torch.equal(kv_cache[owned], before[owned])
    return step, metadata, num_blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tree_attention_matches_brute_force(dtype):
    tree = build_tree(SMALL)
    # Three tree requests with interleaved blocks, among a plain decode and a prefill chunk:
    # the first tree crosses a block boundary (its paths' nodes land in two blocks), the
    # second is a cut tree (root + 3 nodes), the third has two full context blocks before its
    # tree, the fourth's paths cross a block boundary too. Their paths need more tails than
    # there are spare blocks: a second kernel call.
    requests = [
        (tree.attention_mask[:6, :6], 30, 6),
        (None, 40, 1),
        (tree.attention_mask[:4, :4], 7, 4),
        (tree.attention_mask, 70, 6),
        (None, 5, 9),
        (tree.attention_mask, 62, 6),
    ]
    block_table = torch.tensor(
        [[4, 1, 0], [7, 8, 0], [2, 0, 0], [5, 3, 6], [9, 0, 0], [10, 11, 12]], dtype=torch.int32
    )
    step, metadata, num_blocks = _tree_attention_against_brute_force(dtype, requests, block_table)
    layout = kv_layout("vec", 32, 64, dtype)
    calls = step.cpu_calls(metadata, 32, 2, layout, num_blocks)
    assert [call.rows is None for call in calls] == [True, False]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tree_attention_with_one_extra_path(dtype):
    # A chain of 3, then a second child of the root: one path to compute again, whose tail
    # goes to one spare block; the context (two full blocks) is read in place.
    mask = build_tree([[0], [0, 0], [0, 0, 0], [1]], ordered=True).attention_mask
    block_table = torch.tensor([[2, 3, 1]], dtype=torch.int32)
    step, metadata, num_blocks = _tree_attention_against_brute_force(
        dtype, [(mask, 70, 5)], block_table
    )
    layout = kv_layout("vec", 32, 64, dtype)
    [call] = step.cpu_calls(metadata, 32, 2, layout, num_blocks)
    # Only what the row reads is copied: the context's last 6 tokens, the root and the node,
    # to the first spare block.
    spare = num_blocks - RESERVED_BLOCKS
    assert call.tail_copies == [(spare, 1, 1, 8)]
    # The chain of 3 as one sequence, then the root's second child over its own path.
    assert call.query_start_loc.tolist() == [0, 4, 5]
    assert call.seq_lens.tolist() == [74, 72]
    assert call.block_table.tolist() == [[2, 3, 1], [2, 3, spare]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tree_attention_reads_a_paths_rows_as_one_sequence(dtype):
    # Numbered depth-first (as per-request trees are): the first branch, a chain of 2, then
    # the root's second child with a chain of 2 below it: those three rows are one sequence,
    # so the kernel reads the context once for them, over one tail.
    mask = build_tree([[0], [0, 0], [1], [1, 0], [1, 0, 0]], ordered=True).attention_mask
    block_table = torch.tensor([[2, 3, 1]], dtype=torch.int32)
    step, metadata, num_blocks = _tree_attention_against_brute_force(
        dtype, [(mask, 70, 6)], block_table
    )
    [call] = step.cpu_calls(metadata, 32, 2, kv_layout("vec", 32, 64, dtype), num_blocks)
    assert call.query_start_loc.tolist() == [0, 3, 6]
    assert call.seq_lens.tolist() == [73, 74]
    # The context's last 6 tokens, the root and the path's three nodes.
    assert call.tail_copies == [(num_blocks - RESERVED_BLOCKS, 1, 1, 10)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tree_attention_fills_a_requests_tails_with_one_copy(dtype):
    # The 5-node tree as a step numbers it: (0), (0, 0), then the paths (1) -> (1, 0) and (2),
    # whose tails both start from the context's last block: one copy fills both, as many
    # tokens as the longer path reads (the shorter path's rows never read past their own).
    tree = build_tree([[0], [1], [2], [0, 0], [1, 0]])
    mask = tree.step_tree(5)[0].attention_mask
    block_table = torch.tensor([[2, 3, 1]], dtype=torch.int32)
    step, metadata, num_blocks = _tree_attention_against_brute_force(
        dtype, [(mask, 70, 6)], block_table
    )
    [call] = step.cpu_calls(metadata, 32, 2, kv_layout("vec", 32, 64, dtype), num_blocks)
    spare = num_blocks - RESERVED_BLOCKS
    # The context's last 6 tokens, the root and (1)'s path: 9 tokens, to two spare blocks.
    assert call.tail_copies == [(spare, 2, 1, 9)]
    assert call.block_table.tolist() == [[2, 3, 1], [2, 3, spare], [2, 3, spare + 1]]
    assert call.seq_lens.tolist() == [73, 73, 72]


def test_tree_attention_refuses_requests_in_the_reserved_blocks():
    from types import SimpleNamespace

    mask = build_tree([[0], [1]]).attention_mask
    step = TreeStep([TreeSequence(0, 0, 40, mask)], query_starts=[0, 3])
    metadata = SimpleNamespace(
        query_start_loc=torch.tensor([0, 3], dtype=torch.int32),
        seq_lens=torch.tensor([43], dtype=torch.int32),
        block_table=torch.tensor([[1, 20]], dtype=torch.int32),  # 20: reserved in 21 blocks
    )
    layout = kv_layout("vec", 32, 64, torch.float32)
    with pytest.raises(RuntimeError, match="keeps for itself"):
        step.cpu_calls(metadata, 32, 2, layout, 21)


def test_acceptance_table_counts_tried_and_accepted_per_depth_and_rank():
    from vllm_medusa.debug import AcceptanceTable

    tree = build_tree([[0], [1], [0, 0], [0, 1], [1, 0]])  # nodes 1..5 in this order
    table = AcceptanceTable()
    table.add(tree, 5, [1, 4])  # root -> (0) -> (0, 1)
    table.add(tree, 5, [])  # nothing accepted: only the root's children were tried
    table.add(tree, 3, [2])  # a cut tree: (1, 0) was not scheduled, so not tried
    assert table.tried == {(1, 0): 3, (1, 1): 3, (2, 0): 1, (2, 1): 1}
    assert table.accepted == {(1, 0): 1, (1, 1): 1, (2, 1): 1}
    assert table.rate(1, 0) == 1 / 3 and table.rate(2, 1) == 1.0 and table.rate(3, 0) is None
    assert "1/3" in table.format().replace(" ", "")


def _closed_trees(size: int, depth: int, ranks: int) -> set[frozenset]:
    """Every tree of `size` nodes within `depth` heads and `ranks` ranks (brute force)."""
    trees = {frozenset()}
    for _ in range(size):
        grown = set()
        for tree in trees:
            candidates = [(r,) for r in range(ranks)] + [
                (*p, r) for p in tree if len(p) < depth for r in range(ranks)
            ]
            grown.update(tree | {c} for c in candidates if c not in tree)
        trees = grown
    return trees


@pytest.mark.parametrize("seed", range(4))
def test_best_tree_matches_brute_force(seed):
    from vllm_medusa.tree import best_tree, expected_acceptance_length, path_probability

    generator = torch.Generator().manual_seed(seed)
    depth, ranks = 3, 3
    # Rates as heads have them (falling with rank and depth), but not always monotonic.
    acceptance = (torch.rand(depth, ranks, generator=generator) * 0.8).tolist()
    for size in range(1, 6):
        best = max(
            sum(path_probability(acceptance, p) for p in tree)
            for tree in _closed_trees(size, depth, ranks)
        )
        tree = best_tree(acceptance, size)
        assert tree.num_nodes == size
        assert expected_acceptance_length(acceptance, tree) == pytest.approx(1 + best)
