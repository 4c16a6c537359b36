"""Surface: `vllm.v1.worker.gpu_model_runner` (vLLM 0.32; the CPU runner subclasses its
`GPUModelRunner`).

Proposer: the runner builds its drafter with `MedusaProposer(vllm_config=..., device=...)`
when `speculative_config.method == "medusa"`, and later asserts
`isinstance(drafter, MedusaProposer)` against the same name. Rebinding the name to our
subclass swaps the proposer and keeps both checks true.

Trees: when the proposer drafts a tree (`drafter.tree`), four runner methods are wrapped;
with a chain on the CPU only `_sample` is (`drafter.verified_tree`), and otherwise each
calls straight through to vLLM's.
- `_prepare_inputs`: a tree's drafts are scheduled as a flat list, so vLLM gives node j the
  position context + j. That stays the KV slot; the model's position (RoPE) becomes
  context + depth(j), and the step's tree requests are published for the attention backend.
- `_sample`: the path through each tree is chosen and verified as a chain by vLLM's rejection
  sampler (`vllm_medusa.verify`); the accepted nodes' keys and values are then moved to the
  slots the next step reads. On the CPU a chain goes through the same code as a one-path
  tree, so that sampled requests are handled alike: they verify no drafts.
- `propose_draft_token_ids`: the heads read the hidden state of each request's last accepted
  node, not the chain's last position.
- `execute_model`: the published tree step never outlives the forward that uses it.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from vllm_medusa.tree import MedusaTree
from vllm_medusa.tree_attention import (
    KVLayout,
    TreeSequence,
    TreeStep,
    kv_layout,
    set_tree_step,
)
from vllm_medusa.verify import (
    accepted_nodes,
    chain_view,
    choose_paths,
    copy_kv_slots,
    kv_moves,
)

_PATCHED_ATTR = "_vllm_medusa_patched"


def _tree(runner: Any) -> MedusaTree | None:
    """The tree the Medusa drafter proposes; None for a chain or another drafter."""
    return getattr(getattr(runner, "drafter", None), "tree", None)


def _verified_tree(runner: Any) -> MedusaTree | None:
    """The tree `_sample` verifies: the drafter's tree, or its chain as a one-path tree."""
    return getattr(getattr(runner, "drafter", None), "verified_tree", None)


def _greedy_requests(sampling_metadata: Any, num_reqs: int) -> list[bool]:
    if sampling_metadata.all_greedy:
        return [True] * num_reqs
    if sampling_metadata.all_random:
        return [False] * num_reqs
    return (sampling_metadata.temperature[:num_reqs] == 0).tolist()


def _publish_tree_step(runner: Any, tree: MedusaTree, num_draft_tokens: list[int]) -> None:
    """Depth positions for the tree tokens, and the tree requests for the attention layers."""
    query_start = runner.query_start_loc.np
    computed = runner.input_batch.num_computed_tokens_cpu
    sequences = []
    for req_index, num_drafts in enumerate(num_draft_tokens):
        if num_drafts == 0:
            continue
        start, context = int(query_start[req_index]), int(computed[req_index])
        num_tokens = num_drafts + 1
        runner.positions[start : start + num_tokens] = torch.from_numpy(
            context + tree.depths[:num_tokens]
        )
        sequences.append(
            TreeSequence(
                req_index=req_index,
                token_start=start,
                context_len=context,
                node_mask=tree.attention_mask[:num_tokens, :num_tokens],
            )
        )
    set_tree_step(TreeStep(sequences) if sequences else None)


def _chain_metadata(num_draft_tokens: list[int], draft_token_ids: torch.Tensor, rows: torch.Tensor):
    """vLLM's SpecDecodeMetadata for chains of these lengths over logits rows laid out as
    [root, draft 1, ..., draft k] per request."""
    from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

    num_drafts = np.asarray(num_draft_tokens, dtype=np.int32)
    cu_sampled = np.cumsum(num_drafts + 1, dtype=np.int32)
    sampled_starts = cu_sampled - (num_drafts + 1)
    pairs = zip(sampled_starts, num_drafts, strict=True)
    target = np.concatenate([start + np.arange(n) for start, n in pairs])
    return SpecDecodeMetadata(
        draft_token_ids=draft_token_ids,
        num_draft_tokens=num_drafts.tolist(),
        cu_num_draft_tokens=torch.from_numpy(np.cumsum(num_drafts, dtype=np.int32)),
        cu_num_sampled_tokens=torch.from_numpy(cu_sampled),
        target_logits_indices=torch.from_numpy(target.astype(np.int32)),
        bonus_logits_indices=torch.from_numpy(cu_sampled - 1),
        logits_indices=rows.to(torch.int32),
    )


def _sample_tree(runner: Any, tree: MedusaTree, logits: torch.Tensor, spec_metadata: Any):
    from dataclasses import replace

    from vllm.v1.sample.rejection_sampler import PLACEHOLDER_TOKEN_ID

    num_drafts = spec_metadata.num_draft_tokens
    sampling_metadata = runner.input_batch.sampling_metadata
    paths = choose_paths(tree, logits, num_drafts, spec_metadata.draft_token_ids)
    # Sampled requests verify no drafts: each step samples one token from the target alone.
    # vLLM 0.32's rejection sampler, on the CPU, accepted their drafts far more often than
    # the target's probability of them (chain and tree alike).
    greedy = _greedy_requests(sampling_metadata, len(num_drafts))
    paths = [path if is_greedy else [] for path, is_greedy in zip(paths, greedy, strict=True)]
    view = chain_view(paths, spec_metadata.draft_token_ids, num_drafts)
    if sampling_metadata.spec_token_ids is not None:
        # Penalties and bad words read the drafts: they must see the chain being verified.
        tokens = view.draft_token_ids.tolist()
        ends = np.cumsum(view.num_draft_tokens)
        chains = [tokens[end - n : end] for n, end in zip(view.num_draft_tokens, ends, strict=True)]
        sampling_metadata = replace(sampling_metadata, spec_token_ids=chains)
    output = runner.rejection_sampler(
        _chain_metadata(view.num_draft_tokens, view.draft_token_ids, view.rows),
        None,  # Medusa drafts are argmax/top-k picks: verified as one-hot proposals
        logits[view.rows],
        sampling_metadata,
    )
    emitted = (output.sampled_token_ids != PLACEHOLDER_TOKEN_ID).sum(dim=1).tolist()
    accepted = accepted_nodes(paths, emitted)
    runner._medusa_last_nodes = [nodes[-1] if nodes else 0 for nodes in accepted]
    token_starts = runner.query_start_loc.np[: len(num_drafts)].tolist()
    slot_mapping = runner.input_batch.block_table[0].slot_mapping.cpu
    src, dst = kv_moves(accepted, token_starts, slot_mapping)
    if src.numel():  # chains, and paths that are their tree's first branch, move nothing
        copy_kv_slots(_kv_caches(runner), src, dst)
    return output


def _kv_caches(runner: Any) -> list[tuple[torch.Tensor, KVLayout]]:
    """Every attention layer's KV cache with its block layout (measured once per kind)."""
    caches, seen = [], set()
    for context in runner.compilation_config.static_forward_context.values():
        kv = getattr(context, "kv_cache", None)
        if not isinstance(kv, torch.Tensor) or kv.numel() == 0 or kv.data_ptr() in seen:
            continue
        seen.add(kv.data_ptr())
        _, _, block_size, two_head = kv.shape
        caches.append((kv, kv_layout(context.isa, block_size, two_head // 2, kv.dtype)))
    return caches


def _propose_tree(runner: Any, arguments: dict[str, Any]) -> torch.Tensor:
    """vLLM's Medusa branch of `propose_draft_token_ids`, reading each request's hidden
    state at its last accepted node instead of the chain's last position."""
    num_drafts = arguments["spec_decode_metadata"].num_draft_tokens
    starts = np.cumsum([0] + [n + 1 for n in num_drafts])[:-1]
    indices = torch.from_numpy(starts + np.asarray(runner._medusa_last_nodes))
    return runner.drafter.propose(
        num_speculative_tokens=arguments["scheduler_output"].num_spec_tokens_to_schedule,
        target_hidden_states=arguments["sample_hidden_states"][indices],
        sampling_metadata=arguments["sampling_metadata"],
        slot_mappings=arguments["slot_mappings"],
    )


def _patch_runner(runner_cls: type) -> None:
    import inspect

    prepare_inputs = runner_cls._prepare_inputs
    sample = runner_cls._sample
    propose = runner_cls.propose_draft_token_ids
    execute_model = runner_cls.execute_model
    propose_signature = inspect.signature(propose)

    @functools.wraps(prepare_inputs)
    def _prepare_inputs_with_tree(self, scheduler_output, num_scheduled_tokens):
        result = prepare_inputs(self, scheduler_output, num_scheduled_tokens)
        tree, spec_metadata = _tree(self), result[1]
        if tree is not None and spec_metadata is not None:
            _publish_tree_step(self, tree, spec_metadata.num_draft_tokens)
        return result

    @functools.wraps(sample)
    def _sample_with_tree(self, logits, spec_decode_metadata):
        tree = _verified_tree(self)
        if tree is None or spec_decode_metadata is None:
            return sample(self, logits, spec_decode_metadata)
        self.input_batch.update_async_output_token_ids()
        return _sample_tree(self, tree, logits, spec_decode_metadata)

    @functools.wraps(propose)
    def propose_with_tree(self, *args, **kwargs):
        arguments = propose_signature.bind(self, *args, **kwargs).arguments
        if (
            _tree(self) is None
            or arguments["spec_decode_metadata"] is None
            # No request had drafts: one hidden state per request, as for a chain.
            or arguments["sample_hidden_states"].shape[0] == len(arguments["sampled_token_ids"])
        ):
            return propose(self, *args, **kwargs)
        return _propose_tree(self, arguments)

    @functools.wraps(execute_model)
    def execute_model_with_tree(self, *args, **kwargs):
        try:
            return execute_model(self, *args, **kwargs)
        finally:
            set_tree_step(None)

    runner_cls._prepare_inputs = _prepare_inputs_with_tree
    runner_cls._sample = _sample_with_tree
    runner_cls.propose_draft_token_ids = propose_with_tree
    runner_cls.execute_model = execute_model_with_tree
    setattr(runner_cls, _PATCHED_ATTR, True)


def apply() -> None:
    from vllm.v1.spec_decode import medusa
    from vllm.v1.worker import gpu_model_runner

    from vllm_medusa.proposer import MedusaProposer

    medusa.MedusaProposer = MedusaProposer
    gpu_model_runner.MedusaProposer = MedusaProposer
    if not getattr(gpu_model_runner.GPUModelRunner, _PATCHED_ATTR, False):
        _patch_runner(gpu_model_runner.GPUModelRunner)
