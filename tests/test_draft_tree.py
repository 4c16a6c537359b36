"""Per-request trees: how a request's Medusa nodes, pruning and copy branch make one tree."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from vllm_medusa.draft_tree import chain_tree, request_tree
from vllm_medusa.drafting import Drafting, DraftingError, configured_drafting
from vllm_medusa.tree import build_tree

# Nodes: 1 (0), 2 (1), 3 (0,0), 4 (1,0), 5 (0,0,0)
STATIC = build_tree([[0], [1], [0, 0], [1, 0], [0, 0, 0]]).draft_tree
TOKENS = [5, 6, 7, 8, 9]  # one request's token of each static node
ALL = [True] * 5


def test_static_tree_as_draft_tree_matches_the_medusa_tree():
    tree = build_tree([[0], [1], [0, 0], [1, 0], [0, 0, 0]])
    assert list(STATIC.parents) == tree.parents.tolist()
    assert STATIC.depths.tolist() == tree.depths.tolist()
    assert torch.equal(STATIC.attention_mask, tree.attention_mask)
    assert STATIC.children == tree.children
    prefix = STATIC.prefix(3)
    assert prefix.num_nodes == 3 and torch.equal(prefix.attention_mask, tree.attention_mask[:4, :4])


def test_copy_branch_shares_the_nodes_it_agrees_with_then_grows_its_own():
    tree, drafts = request_tree(STATIC, TOKENS, ALL, [5, 7, 9, 11, 12])
    # 5 is node 1, 7 its child node 3, 9 node 5 under it: all shared; 11 and 12 are new.
    assert drafts == TOKENS + [11, 12]
    assert list(tree.parents) == [-1, 0, 0, 1, 2, 3, 5, 6]
    assert tree.copied == (True, False, True, False, True, True, True)
    assert [tree.label(j) for j in (1, 2, 6)] == ["0+copy", "1", "copy"]
    assert tree.depths.tolist() == [0, 1, 1, 2, 2, 3, 4, 5]
    mask = tree.attention_mask
    assert mask[7].nonzero().flatten().tolist() == [0, 1, 3, 5, 6, 7]


def test_copy_branch_that_leaves_the_medusa_tree_hangs_under_the_last_shared_node():
    tree, drafts = request_tree(STATIC, TOKENS, ALL, [6, 2, 3])
    assert drafts == TOKENS + [2, 3]
    assert list(tree.parents)[6:] == [2, 6]  # 2 under node 2 (token 6), beside node 4 (8)
    siblings = [drafts[c - 1] for c in tree.children[2]]
    assert len(siblings) == len(set(siblings))
    tree, drafts = request_tree(STATIC, TOKENS, ALL, [4])
    assert list(tree.parents)[6:] == [0] and drafts[-1] == 4


def test_pruned_nodes_and_their_subtrees_are_not_drafted():
    keep = [True, False, True, False, False]  # node 2 (1) and its child 4 (1,0) pruned; 5 too
    tree, drafts = request_tree(STATIC, TOKENS, keep, [])
    assert drafts == [5, 7]
    assert list(tree.parents) == [-1, 0, 1]
    assert tree.ranks == ((0,), (0, 0))
    # A copy branch can still propose a pruned node's token: it is then a copy node.
    tree, drafts = request_tree(STATIC, TOKENS, keep, [6])
    assert drafts == [5, 7, 6] and tree.label(3) == "copy" and list(tree.parents) == [-1, 0, 1, 0]


def test_prefix_of_a_request_tree_is_a_tree():
    tree, _ = request_tree(STATIC, TOKENS, ALL, [5, 7, 9, 11, 12])
    for n in range(tree.num_nodes + 1):
        prefix = tree.prefix(n)
        assert all(0 <= p < j for j, p in enumerate(prefix.parents) if j)
        assert torch.equal(prefix.attention_mask, tree.attention_mask[: n + 1, : n + 1])


def test_chain_tree():
    chain = chain_tree(3)
    assert list(chain.parents) == [-1, 0, 1, 2]
    assert torch.equal(chain.attention_mask, torch.ones(4, 4, dtype=torch.bool).tril())


def test_drafting_settings_from_heads_config_and_environment():
    assert not configured_drafting(None, {}).per_request
    from_heads = configured_drafting({"copy": True, "copy_length": 4}, {})
    assert from_heads == Drafting(copy=True, copy_length=4)
    assert from_heads.per_request and from_heads.extra_nodes == 4
    env = {"VLLM_MEDUSA_DRAFTING": '{"copy": false, "prune_below": 0.05}'}
    merged = configured_drafting({"copy": True, "copy_length": 4}, env)
    assert merged == Drafting(copy=False, copy_length=4, prune_below=0.05)
    assert merged.per_request and merged.extra_nodes == 0


@pytest.mark.parametrize(
    "config, env, message",
    [
        ({"copy": "yes"}, "", "copy='yes'"),
        ({"copy_length": 0}, "", "copy_length=0"),
        ({"min_match": 4, "max_match": 2}, "", "min_match=4 > max_match=2"),
        ({"prune_below": 1.5}, "", "prune_below=1.5"),
        ({"draft_vocab": -1}, "", "draft_vocab=-1"),
        ({"draft_vocab": "8k"}, "", "draft_vocab='8k'"),
        ({"copy_len": 3}, "", "unknown setting(s) copy_len"),
        (None, "{copy: true}", "VLLM_MEDUSA_DRAFTING is not JSON"),
        (None, "[1]", "must be a JSON object"),
    ],
)
def test_bad_drafting_settings_are_refused_with_one_line(config, env, message):
    with pytest.raises(DraftingError, match=None) as error:
        configured_drafting(config, {"VLLM_MEDUSA_DRAFTING": env})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_copy_branches_propose_what_followed_the_longest_repeat():
    # In its own process: vLLM's numba matcher must not be loaded where engines start later.
    script = """
import json, numpy as np
from vllm_medusa.drafting import Drafting, copy_branches
rows = np.zeros((3, 16), dtype=np.int32)
rows[0, :9] = [1, 2, 3, 4, 5, 9, 1, 2, 3]   # "1 2 3" seen before: then 4 5 9
rows[1, :6] = [7, 8, 9, 10, 11, 12]          # nothing repeats
rows[2, :7] = [4, 6, 1, 4, 6, 2, 4]          # only "4" repeats, first at 0: then 6 1 4
drafting = Drafting(copy=True, min_match=1, max_match=3, copy_length=3)
out = copy_branches(drafting, rows, np.array([9, 6, 7]), 3, 2048)
print(json.dumps([o.tolist() for o in out]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [[4, 5, 9], [], [6, 1, 4]]


def test_chain_shaped_request_trees_are_known_as_chains():
    assert chain_tree(3).is_chain and chain_tree(0).is_chain
    assert STATIC.prefix(1).is_chain and not STATIC.prefix(2).is_chain
    # Pruned to one path and a copy branch that agrees with it: a chain.
    keep = [True, False, True, False, True]
    tree, _ = request_tree(STATIC, TOKENS, keep, [5, 7, 9, 3])
    assert tree.is_chain and tree.num_nodes == 4


def test_depth_first_numbering_puts_the_deepest_branch_first():
    tree, drafts = request_tree(STATIC, TOKENS, ALL, [6, 8, 20, 21])  # the copy branch under (1)
    # Before: 1 (0), 2 (1), 3 (0,0), 4 (1,0), 5 (0,0,0), 6 copy under 4, 7 copy under 6.
    assert list(tree.parents) == [-1, 0, 0, 1, 2, 3, 4, 6]
    ordered, old = tree.depth_first()
    # The (1) branch is 4 deep with its copy tokens, the (0) branch 3: it comes first.
    assert old == [2, 4, 6, 7, 1, 3, 5]
    assert list(ordered.parents) == [-1, 0, 1, 2, 3, 0, 5, 6]
    assert [drafts[j - 1] for j in old] == [6, 8, 20, 21, 5, 7, 9]
    assert [ordered.label(j) for j in (1, 3, 5)] == ["1+copy", "copy", "0"]
    # Same tree: each node keeps its depth and ancestors.
    assert ordered.depths.tolist() == [0] + [tree.depths[j] for j in old]
    for new, before in enumerate(old, start=1):
        ancestors = [old[a - 1] for a in ordered.ancestry(new)]
        assert ancestors == tree.ancestry(before)
    # The first branch reads causally: its rows are what vLLM's causal pass computes.
    mask = ordered.attention_mask
    assert all(mask[j, : j + 1].all() for j in range(5))
    assert not mask[5, 1:5].any()
    # Ties keep the earlier node first; a chain stays as it is.
    assert STATIC.prefix(2).depth_first()[1] == [1, 2]
    assert chain_tree(3).depth_first()[1] == [1, 2, 3]
