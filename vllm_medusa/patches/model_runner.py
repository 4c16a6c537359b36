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
  context + depth(j). Each request's tree is the one its drafts were proposed with (its own
  under per-request drafting, else the static tree's first nodes), numbered depth-first.
- `_build_attention_metadata`: the step's tree requests ride on the attention metadata vLLM
  builds once per step for every layer (`tree_attention.attach_tree_step`).
- `_sample`: each request walks its tree, drawing the target's token level by level with
  vLLM's own `Sampler` (`vllm_medusa.verify`), greedy and sampled requests alike; the
  accepted nodes' keys and values are then moved to the slots the next step reads. On the CPU
  a chain goes through the same walk as a one-path tree, and never through vLLM's CPU
  rejection kernels.
- `propose_draft_token_ids`: the heads read the hidden state of each request's last accepted
  node, not the chain's last position.

Drafts near `max_model_len`: vLLM skips the drafter for the whole batch once its longest
sequence is within `num_speculative_tokens` of the drafter's `max_model_len`, and hands every
request that many placeholder drafts (token 0) to verify instead. Medusa heads read the
target's hidden states and keep no KV cache of their own, so they have no such limit; the
scheduler already cuts each request's drafts to the room it has left. `_input_fits_in_drafter`
says so for the Medusa drafter: every request keeps drafting real candidates.

Seeded requests on the CPU (with or without speculation): vLLM samples every request of a
step and throws away the token of a prefill chunk that does not end its prompt, then rewinds
that request's generator with `set_offset`, which CPU generators refuse, stopping the engine.
`_sample` restores those generators' states itself and `_bookkeeping_sync` keeps them out of
vLLM's rewind.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from vllm_medusa.debug import DraftDebug, debug_enabled
from vllm_medusa.draft_tree import DraftTree, chain_tree
from vllm_medusa.drafting import copy_branches
from vllm_medusa.tree import MedusaTree
from vllm_medusa.tree_attention import (
    KVLayout,
    TreeSequence,
    TreeStep,
    attach_tree_step,
    kv_layout,
)
from vllm_medusa.typical import Typical, engine_typical, request_typical, typical_nodes
from vllm_medusa.verify import (
    copy_kv_slots,
    kv_moves,
    level_sampler,
    processed_logprobs,
    request_layout,
    request_trees,
    stack_logprobs,
    walk_trees,
)

_PATCHED_ATTR = "_vllm_medusa_patched"


def _tree(runner: Any) -> MedusaTree | None:
    """The tree the Medusa drafter proposes; None for a chain or another drafter."""
    return getattr(getattr(runner, "drafter", None), "tree", None)


def _verified_tree(runner: Any) -> MedusaTree | None:
    """The tree `_sample` verifies: the drafter's tree, or its chain as a one-path tree."""
    return getattr(getattr(runner, "drafter", None), "verified_tree", None)


def _step_trees(runner: Any, num_draft_tokens: list[int]) -> list[DraftTree]:
    """Each request's tree as scheduled this step: the first n_i nodes of the tree its drafts
    were proposed with (kept per request when drafted, static trees' as well; a chain's is
    the drafter's). Worked out once per step, in `_prepare_inputs`, and read again by
    `_sample`."""
    cached = getattr(runner, "_medusa_step_trees", None)
    if cached is not None and cached[0] == num_draft_tokens:
        return cached[1]
    trees = _scheduled_trees(runner, num_draft_tokens)
    runner._medusa_step_trees = (list(num_draft_tokens), trees)
    return trees


def _scheduled_trees(runner: Any, num_draft_tokens: list[int]) -> list[DraftTree]:
    if _tree(runner) is None:  # a chain, verified as a one-path tree
        return request_trees(_verified_tree(runner), num_draft_tokens)
    own = _request_trees(runner)
    trees = []
    for req_id, n in zip(runner.input_batch.req_ids, num_draft_tokens, strict=False):
        tree = own.get(req_id)
        # Drafts not proposed with a tree of their own are verified as the chain they are
        # written as: exact whatever they are, since the mask follows the same reading.
        trees.append(tree.prefix(n) if tree is not None and tree.num_nodes >= n else chain_tree(n))
    return trees


def _request_trees(runner: Any) -> dict[str, DraftTree]:
    """Request id -> the tree its pending drafts were proposed with."""
    if not hasattr(runner, "_medusa_request_trees"):
        runner._medusa_request_trees = {}
    return runner._medusa_request_trees


def _remember_trees(runner: Any, trees: list[DraftTree]) -> None:
    """Keep the tree each request of the batch was just drafted with, for the step that
    verifies it (a request left out of that step keeps its drafts and their tree)."""
    own = _request_trees(runner)
    for req_id in [r for r in own if r not in runner.requests]:
        del own[req_id]  # finished
    own.update(zip(runner.input_batch.req_ids[: len(trees)], trees, strict=True))


def _publish_tree_step(runner: Any, trees: list[DraftTree]) -> None:
    """Depth positions for the tree tokens, and the tree requests for the attention layers."""
    query_start = runner.query_start_loc.np
    computed = runner.input_batch.num_computed_tokens_cpu
    sequences = []
    for req_index, tree in enumerate(trees):
        # A chain's positions and causal mask are what vLLM already computes for it.
        if tree.is_chain:
            continue
        start, context = int(query_start[req_index]), int(computed[req_index])
        num_tokens = tree.num_nodes + 1
        runner.positions[start : start + num_tokens] = torch.from_numpy(context + tree.depths)
        sequences.append(
            TreeSequence(
                req_index=req_index,
                token_start=start,
                context_len=context,
                node_mask=tree.attention_mask,
            )
        )
    num_reqs = len(trees)
    query_starts = query_start[: num_reqs + 1].tolist()
    runner._medusa_tree_step = TreeStep(sequences, query_starts) if sequences else None


def _drafted(spec_metadata: Any) -> bool:
    """Some request of the step verifies drafts (vLLM builds the metadata for a speculating
    engine's decode steps even when every request's draft count is 0)."""
    return spec_metadata is not None and any(spec_metadata.num_draft_tokens)


def _draft_limits(sampling_metadata: Any, num_drafts: list[int]) -> list[int]:
    """Per request: how many drafts it may accept while every draw stays exactly what vLLM's
    sampler would draw at that position (see `vllm_medusa.verify`)."""
    from vllm.v1.sample.logits_processor.builtin import (
        LogitBiasLogitsProcessor,
        MinPLogitsProcessor,
        MinTokensLogitsProcessor,
    )

    processors = sampling_metadata.logitsprocs
    known = (LogitBiasLogitsProcessor, MinPLogitsProcessor, MinTokensLogitsProcessor)
    budget = sampling_metadata.thinking_budget_state_holder
    # Other processors and thinking budgets may depend on the position in ways the sampler's
    # speculative tokens do not show: those batches verify no drafts.
    if any(not isinstance(p, known) for p in processors.all) or (
        budget is not None and budget.has_tracked_requests()
    ):
        return [0] * len(num_drafts)
    limits = list(num_drafts)
    for processor in processors.non_argmax_invariant:
        if not isinstance(processor, MinTokensLogitsProcessor):
            continue
        # Stop tokens are masked at every level of this step: only draws before the
        # min_tokens-th output token are exact, so the walk may accept one fewer.
        for index, (min_tokens, output, _, _) in processor.min_toks.items():
            if index < len(limits):
                limits[index] = min(limits[index], max(min_tokens - len(output) - 1, 0))
    return limits


def _sample_tree(runner: Any, logits: torch.Tensor, spec_metadata: Any):
    from vllm.v1.outputs import SamplerOutput

    num_drafts = spec_metadata.num_draft_tokens
    trees = _step_trees(runner, num_drafts)
    sampling_metadata = runner.input_batch.sampling_metadata
    limits = _draft_limits(sampling_metadata, num_drafts)
    typical = _typical_requests(runner, len(num_drafts))
    walk = walk_trees(
        level_sampler(runner.sampler, sampling_metadata),
        trees,
        logits,
        num_drafts,
        spec_metadata.draft_token_ids,
        max_accepted=limits,
        skip=typical,  # walked below instead
    )
    if typical:
        _walk_typical(runner, walk, trees, logits, num_drafts, spec_metadata, typical, limits)
    width = max(num_drafts) + 1
    runner._medusa_last_nodes = walk.last_nodes
    debug = _debug(runner)
    if debug is not None:
        debug.record_step(
            trees,
            runner.input_batch.req_ids[: len(num_drafts)],
            num_drafts,
            request_layout(num_drafts, spec_metadata.draft_token_ids)[1],
            walk.nodes,
        )
    token_starts = runner.query_start_loc.np[: len(num_drafts)].tolist()
    # The device copy is the one vLLM computes (on the CPU runner both are one tensor).
    slot_mapping = runner.input_batch.block_table[0].slot_mapping.gpu
    src, dst = kv_moves(walk.nodes, token_starts, slot_mapping)
    if src.numel():  # chains, and paths that are their tree's first branch, move nothing
        copy_kv_slots(_kv_caches(runner), src, dst)
    return SamplerOutput(
        sampled_token_ids=walk.sampled_token_ids(width),
        logprobs_tensors=stack_logprobs(walk.level_logprobs, width),
    )


def _debug(runner: Any) -> DraftDebug | None:
    """The process's debug output (VLLM_MEDUSA_DEBUG), None when off."""
    if not hasattr(runner, "_medusa_debug"):
        runner._medusa_debug = DraftDebug() if debug_enabled() else None
    return runner._medusa_debug


def _typical_requests(runner: Any, num_reqs: int) -> dict[int, Typical]:
    """Batch index -> setting, for the sampled requests verified by typical acceptance.
    Requests asking for logprobs stay exact: typical acceptance returns none."""
    if not hasattr(runner, "_medusa_typical"):
        runner._medusa_typical = engine_typical()
    typical = {}
    for index, req_id in enumerate(runner.input_batch.req_ids[:num_reqs]):
        params = runner.requests[req_id].sampling_params
        if params is None or params.temperature < 1e-5 or params.logprobs is not None:
            continue
        setting = request_typical(params.extra_args, runner._medusa_typical)
        if setting is not None:
            typical[index] = setting
    return typical


def _walk_typical(
    runner: Any,
    walk: Any,
    trees: list[DraftTree],
    logits: torch.Tensor,  # [sum(n_i + 1), vocab]
    num_drafts: list[int],
    spec_metadata: Any,
    typical: dict[int, Typical],
    limits: list[int],
) -> None:
    """Give `typical`'s requests their typical-acceptance paths (at most `limits[r]` nodes),
    each followed by a draw from the target at the path's end."""
    sampling_metadata = runner.input_batch.sampling_metadata
    compute = processed_logprobs(runner.sampler, sampling_metadata)
    starts, tokens = request_layout(num_drafts, spec_metadata.draft_token_ids)
    per_node: dict[int, torch.Tensor] = {}  # node j -> [R, vocab], each request's after node j

    def logprobs_at(node: int) -> torch.Tensor:
        if node not in per_node:
            rows = [s + (node if node <= n else 0) for s, n in zip(starts, num_drafts, strict=True)]
            paths = [
                [t[a - 1] for a in tree.ancestry(node)] if node <= n else []
                for t, n, tree in zip(tokens, num_drafts, trees, strict=True)
            ]
            per_node[node] = compute(logits[torch.tensor(rows)], paths)
        return per_node[node]

    for r, setting in typical.items():
        nodes = typical_nodes(trees[r], lambda j, r=r: logprobs_at(j)[r], tokens[r], setting)
        nodes = nodes[: limits[r]]
        end = nodes[-1] if nodes else 0
        generator = sampling_metadata.generators.get(r)
        drawn = int(torch.multinomial(logprobs_at(end)[r].exp(), 1, generator=generator))
        walk.nodes[r] = nodes
        walk.tokens[r] = [tokens[r][n - 1] for n in nodes] + [drawn]


def _kv_caches(runner: Any) -> list[tuple[torch.Tensor, KVLayout | None]]:
    """Every attention layer's KV cache with its block layout: measured once per kind for
    the CPU kernel, None (vLLM's logical layout, see `copy_kv_slots`) for Triton's."""
    from vllm_medusa.tree_attention import TreeCPUAttentionBackendImpl

    caches, seen = [], set()
    for context in runner.compilation_config.static_forward_context.values():
        kv = getattr(context, "kv_cache", None)
        if not isinstance(kv, torch.Tensor) or kv.numel() == 0 or kv.data_ptr() in seen:
            continue
        seen.add(kv.data_ptr())
        layout = None
        if isinstance(getattr(context, "impl", None), TreeCPUAttentionBackendImpl):
            _, _, block_size, two_head = kv.shape
            layout = kv_layout(context.isa, block_size, two_head // 2, kv.dtype)
        caches.append((kv, layout))
    return caches


def _discarded_cpu_generators(runner: Any) -> list[int]:
    """Batch indices of seeded requests on CPU generators whose sampled token this step is
    thrown away (a prefill chunk that does not end the prompt)."""
    num_reqs = runner.input_batch.num_reqs
    discarded = np.nonzero(runner.discard_request_mask.np[:num_reqs])[0].tolist()
    generators = runner.input_batch.generators
    return [i for i in discarded if i in generators and generators[i].device.type == "cpu"]


@contextlib.contextmanager
def _discarded_draws_undone(runner: Any) -> Iterator[None]:
    """Put the generators of discarded requests back as they were before sampling, so a seeded
    request draws the same numbers whether or not its prefill was chunked."""
    generators = runner.input_batch.generators
    saved = {i: generators[i].get_state() for i in _discarded_cpu_generators(runner)}
    try:
        yield
    finally:
        for i, state in saved.items():
            generators[i].set_state(state)


def _last_accepted_states(runner: Any, arguments: dict[str, Any]) -> torch.Tensor:
    """[num_reqs, hidden] each request's hidden state at its last accepted node (vLLM's
    Medusa reads the chain's last accepted position instead)."""
    hidden_states = arguments["sample_hidden_states"]
    if (
        arguments["spec_decode_metadata"] is None
        # No request had drafts: one hidden state per request.
        or hidden_states.shape[0] == len(arguments["sampled_token_ids"])
    ):
        return hidden_states
    num_drafts = arguments["spec_decode_metadata"].num_draft_tokens
    starts = np.cumsum([0] + [n + 1 for n in num_drafts])[:-1]
    indices = torch.from_numpy(starts + np.asarray(runner._medusa_last_nodes))
    return hidden_states[indices.to(hidden_states.device)]


def _propose_tree(runner: Any, arguments: dict[str, Any]) -> torch.Tensor:
    """vLLM's Medusa branch of `propose_draft_token_ids`, reading each request's hidden
    state at its last accepted node; every request's drafts are the static tree's first
    nodes, numbered depth-first (`MedusaTree.step_tree`)."""
    budget = arguments["scheduler_output"].num_spec_tokens_to_schedule
    drafts = runner.drafter.propose(
        num_speculative_tokens=budget,
        target_hidden_states=_last_accepted_states(runner, arguments),
        sampling_metadata=arguments["sampling_metadata"],
        slot_mappings=arguments["slot_mappings"],
    )
    tree = _tree(runner).step_tree(budget)[0]
    _remember_trees(runner, [tree] * drafts.shape[0])
    return drafts


def _propose_request_trees(runner: Any, arguments: dict[str, Any]) -> list[list[int]]:
    """Per-request drafting: each request's own tree (static nodes it is sure of, its copy
    branch), kept by request id for the step that verifies it."""
    drafter = runner.drafter
    budget = arguments["scheduler_output"].num_spec_tokens_to_schedule
    batch = runner.input_batch
    num_reqs = batch.num_reqs
    copies = [np.empty(0, dtype=np.int64)] * num_reqs
    if drafter.drafting.copy and budget > 0:
        # After bookkeeping: each row holds the request's prompt and output so far.
        copies = copy_branches(
            drafter.drafting,
            batch.token_ids_cpu,
            batch.num_tokens_no_spec,
            num_reqs,
            runner.max_model_len,
        )
    trees, drafts = drafter.propose_trees(budget, _last_accepted_states(runner, arguments), copies)
    _remember_trees(runner, trees)
    return drafts


def _patch_runner(runner_cls: type) -> None:
    import inspect

    prepare_inputs = runner_cls._prepare_inputs
    sample = runner_cls._sample
    bookkeeping_sync = runner_cls._bookkeeping_sync
    propose = runner_cls.propose_draft_token_ids
    build_attention_metadata = runner_cls._build_attention_metadata
    propose_signature = inspect.signature(propose)
    input_fits_in_drafter = runner_cls._input_fits_in_drafter

    @functools.wraps(prepare_inputs)
    def _prepare_inputs_with_tree(self, scheduler_output, num_scheduled_tokens):
        result = prepare_inputs(self, scheduler_output, num_scheduled_tokens)
        spec_metadata = result[1]
        self._medusa_step_trees = None  # an earlier step's never stands in for this one's
        if _tree(self) is not None and _drafted(spec_metadata):
            _publish_tree_step(self, _step_trees(self, spec_metadata.num_draft_tokens))
        return result

    @functools.wraps(sample)
    def _sample_with_tree(self, logits, spec_decode_metadata):
        with _discarded_draws_undone(self):
            tree = _verified_tree(self)
            if tree is None or spec_decode_metadata is None:
                return sample(self, logits, spec_decode_metadata)
            if not _drafted(spec_decode_metadata):
                # No request has drafts (the schedule's 0 at this batch size): one token per
                # request, sampled as without speculation, without the walk's cost per step.
                return sample(self, logits, None)
            self.input_batch.update_async_output_token_ids()
            return _sample_tree(self, logits, spec_decode_metadata)

    @functools.wraps(bookkeeping_sync)
    def _bookkeeping_sync_on_cpu(self, *args, **kwargs):
        # vLLM rewinds a discarded request's generator by its Philox offset, which a CPU
        # generator does not have ("CPU Generator does not use offset"); `_sample` has already
        # restored those generators, so they sit out vLLM's rewind.
        generators = self.input_batch.generators
        held = {i: generators.pop(i) for i in _discarded_cpu_generators(self)}
        try:
            return bookkeeping_sync(self, *args, **kwargs)
        finally:
            generators.update(held)

    @functools.wraps(propose)
    def propose_with_tree(self, *args, **kwargs):
        arguments = propose_signature.bind(self, *args, **kwargs).arguments
        if _tree(self) is None:
            drafts = propose(self, *args, **kwargs)
        elif self.drafter.drafting.per_request:
            drafts = _propose_request_trees(self, arguments)
        else:
            drafts = _propose_tree(self, arguments)
        debug = _debug(self)
        probs = getattr(self.drafter, "last_draft_probs", None)
        if debug is not None and probs is not None:
            debug.record_drafts(self.input_batch.req_ids, probs, self.drafter.last_pruned)
        return drafts

    @functools.wraps(build_attention_metadata)
    def build_attention_metadata_with_tree(self, *args, **kwargs):
        result = build_attention_metadata(self, *args, **kwargs)
        # The step `_prepare_inputs` just published, consumed here: later builds (dummy runs)
        # carry no trees.
        step = getattr(self, "_medusa_tree_step", None)
        self._medusa_tree_step = None
        attach_tree_step(result[0], step)
        return result

    @functools.wraps(input_fits_in_drafter)
    def input_fits_in_medusa(self, common_attn_metadata):
        from vllm_medusa.proposer import MedusaProposer

        if isinstance(getattr(self, "drafter", None), MedusaProposer):
            return common_attn_metadata is not None
        return input_fits_in_drafter(self, common_attn_metadata)

    runner_cls._prepare_inputs = _prepare_inputs_with_tree
    runner_cls._input_fits_in_drafter = input_fits_in_medusa
    runner_cls._sample = _sample_with_tree
    runner_cls._bookkeeping_sync = _bookkeeping_sync_on_cpu
    runner_cls.propose_draft_token_ids = propose_with_tree
    runner_cls._build_attention_metadata = build_attention_metadata_with_tree
    setattr(runner_cls, _PATCHED_ATTR, True)


def apply() -> None:
    from vllm.v1.spec_decode import medusa
    from vllm.v1.worker import gpu_model_runner

    from vllm_medusa.proposer import MedusaProposer

    medusa.MedusaProposer = MedusaProposer
    gpu_model_runner.MedusaProposer = MedusaProposer
    if not getattr(gpu_model_runner.GPUModelRunner, _PATCHED_ATTR, False):
        _patch_runner(gpu_model_runner.GPUModelRunner)
