"""The Medusa proposer the V1 model runner drives (replaces vLLM's, see patches/model_runner).

Per step the runner hands over each request's hidden state at its last accepted token; the
proposer turns them into draft tokens. Without a tree: the argmax of each of the first
`num_speculative_tokens` heads, one chain per request. With a tree: each node's token is its
head's candidate of the node's rank, in the tree's order. With per-request drafting
(`vllm_medusa.drafting`: copy branches, confidence pruning) each request gets a tree of its
own instead (`propose_trees`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
from vllm.logger import init_logger
from vllm.v1.sample.metadata import SamplingMetadata
from vllm.v1.spec_decode.medusa import MedusaProposer as VllmMedusaProposer

from vllm_medusa.debug import debug_enabled
from vllm_medusa.draft_tree import DraftTree, request_tree
from vllm_medusa.draft_vocab import load_draft_vocab
from vllm_medusa.drafting import drafting_of_heads
from vllm_medusa.model import MedusaHeads
from vllm_medusa.tree import (
    MedusaTree,
    build_tree,
    chain_paths,
    tree_of_heads,
    verified_by_plugin,
)

# Under "vllm." so that vLLM's logging configuration shows it.
logger = init_logger(f"vllm.{__name__}")


class MedusaProposer(VllmMedusaProposer):
    def __init__(self, vllm_config, device: torch.device) -> None:
        super().__init__(vllm_config=vllm_config, device=device)
        heads = self.spec_config.draft_model_config.hf_config
        self.tree: MedusaTree | None = tree_of_heads(heads)
        # What the runner verifies itself (patches/model_runner): the tree, or a chain as a
        # tree with one path.
        self.verified_tree: MedusaTree | None = self.tree
        if self.tree is None and verified_by_plugin(heads, torch.device(device).type):
            self.verified_tree = build_tree(
                chain_paths(self.num_speculative_tokens),
                name=f"chain:{self.num_speculative_tokens}",
            )
        self.drafting = drafting_of_heads(heads)
        # With VLLM_MEDUSA_DEBUG: per request, the heads' probability of each draft (None for
        # a node only the copy branch proposed), and how many nodes pruning dropped.
        self.debug = debug_enabled()
        self.last_draft_probs: torch.Tensor | list[list[float | None]] | None = None
        self.last_pruned: list[int] | None = None

    def load_model(self, target_model: nn.Module) -> None:
        super().load_model(target_model)
        if not isinstance(self.model, MedusaHeads):
            raise RuntimeError(
                "vllm-medusa: the speculative model did not load as MedusaHeads; "
                "is another plugin registering 'MedusaModel'?"
            )
        if self.model.original_lm_head:
            self.model.bind_target_lm_head(_target_lm_head(target_model))
        if self.drafting.draft_vocab:
            self.model.restrict_vocab(
                load_draft_vocab(
                    self.model.checkpoint_dir, self.drafting.draft_vocab, self.model.vocab_size
                )
            )
        if self.tree is not None:
            logger.info(
                "vllm-medusa: trees are verified by the %s attention backend",
                _check_tree_attention(self.vllm_config),
            )
        logger.info(
            "vllm-medusa: %d heads x %d layers from %s, %s lm_head, %s",
            self.model.num_heads,
            len(self.model.blocks[0].layers),
            self.model.checkpoint_dir,
            "shared target" if self.model.original_lm_head else "own",
            self.tree.describe() if self.tree else f"chain of {self.num_speculative_tokens}",
        )
        if self.drafting.per_request:
            logger.info("vllm-medusa: per-request trees, %s", self.drafting)

    @torch.inference_mode()
    def propose(
        self,
        num_speculative_tokens: int,
        target_hidden_states: torch.Tensor,
        sampling_metadata: SamplingMetadata,
        slot_mappings: object = None,
    ) -> torch.Tensor:
        """target_hidden_states: [num_reqs, hidden] -> draft token ids [num_reqs, drafts].

        `num_speculative_tokens` is what vLLM's scheduler asks for this step: the configured
        number, or less under `num_speculative_tokens_per_batch_size` (0: no drafts). A
        shorter chain is its first heads; a smaller tree is its first nodes in the tree's
        order, a tree itself since every node comes after its parent, drafted in the order
        the step verifies them (`MedusaTree.step_tree`).
        """
        num_reqs = target_hidden_states.shape[0]
        if num_speculative_tokens == 0:
            return torch.empty(num_reqs, 0, dtype=torch.long, device=target_hidden_states.device)
        # The model holds exactly the heads in use (chain length or tree depth).
        head_states = torch.stack(self.model(target_hidden_states))  # [heads, num_reqs, hidden]
        logits = self.model.stacked_logits(head_states)  # [heads, num_reqs, vocab]
        # Indices into the logits' last dimension (the draft vocabulary's, if any).
        if self.tree is None:
            heads = torch.arange(num_speculative_tokens, device=logits.device)
            picks = logits[:num_speculative_tokens].argmax(dim=-1).transpose(0, 1)
        else:
            candidates = logits.topk(self.tree.top_k, dim=-1).indices  # [heads, num_reqs, top_k]
            order = self.tree.step_tree(num_speculative_tokens)[1]  # [drafts]
            heads, ranks = self.tree.heads[order], self.tree.ranks[order]
            # [drafts, num_reqs] -> [num_reqs, drafts]
            picks = candidates[heads, :, ranks].transpose(0, 1)
        if self.debug:
            logprobs = logits[heads].float().log_softmax(dim=-1)  # [drafts, num_reqs, vocab]
            drafted = logprobs.gather(-1, picks.transpose(0, 1).unsqueeze(-1)).squeeze(-1)
            self.last_draft_probs = drafted.exp().transpose(0, 1)  # [num_reqs, drafts]
        return self.model.token_ids(picks)

    @torch.inference_mode()
    def propose_trees(
        self,
        num_speculative_tokens: int,
        target_hidden_states: torch.Tensor,  # [num_reqs, hidden]
        copies: list[np.ndarray],  # per request: its copy branch's tokens (may be empty)
    ) -> tuple[list[DraftTree], list[list[int]]]:
        """Each request's own tree and draft tokens: the first `num_speculative_tokens`
        nodes of the static tree whose path probability under the heads passes the pruning
        threshold, then the request's copy branch (`vllm_medusa.draft_tree.request_tree`),
        numbered depth-first, deepest branch first (`DraftTree.depth_first`)."""
        assert self.tree is not None
        num_reqs = target_hidden_states.shape[0]
        if num_speculative_tokens == 0:
            return [self.tree.draft_tree.prefix(0)] * num_reqs, [[] for _ in range(num_reqs)]
        candidates = self.tree.draft_tree.prefix(num_speculative_tokens)
        n = candidates.num_nodes
        head_states = torch.stack(self.model(target_hidden_states))  # [heads, num_reqs, hidden]
        logits = self.model.stacked_logits(head_states)  # [heads, num_reqs, vocab]
        top = logits.topk(self.tree.top_k, dim=-1)  # [heads, num_reqs, top_k]
        heads, ranks = self.tree.heads[:n], self.tree.ranks[:n]
        tokens = self.model.token_ids(top.indices[heads, :, ranks])  # [n, num_reqs]
        tokens_per_request = tokens.T.tolist()  # [num_reqs][n]
        keep_per_request = [[True] * n] * num_reqs
        probs_per_request = None
        threshold = self.drafting.prune_below
        if threshold > 0 or self.debug:
            # The heads' log-probability of each node's token: [n, num_reqs]
            top_logprobs = top.values.float() - logits.float().logsumexp(dim=-1, keepdim=True)
            node_logprobs = top_logprobs[heads, :, ranks]
            if threshold > 0:
                # Node i on node j's path (itself included): path log-probabilities in one
                # matmul, [n, n] @ [n, num_reqs].
                path_logprobs = self._on_path(n) @ node_logprobs
                keep_per_request = (path_logprobs >= math.log(threshold)).T.tolist()
            if self.debug:
                probs_per_request = node_logprobs.exp().T.tolist()
        trees, drafts, orders = [], [], []
        for r in range(num_reqs):
            tree, request_drafts = request_tree(
                candidates, tokens_per_request[r], keep_per_request[r], copies[r].tolist()
            )
            tree, order = tree.depth_first()
            trees.append(tree)
            drafts.append([request_drafts[old - 1] for old in order])
            orders.append(order)
        if probs_per_request is not None:
            kept = [
                [p for p, k in zip(probs, keeps, strict=True) if k]
                for probs, keeps in zip(probs_per_request, keep_per_request, strict=True)
            ]
            # request_tree numbers the kept Medusa nodes first, then the copy branch's own.
            self.last_draft_probs = [
                [row[old - 1] if old <= len(row) else None for old in order]
                for row, order in zip(kept, orders, strict=True)
            ]
            self.last_pruned = [n - len(row) for row in kept]
        return trees, drafts

    def _on_path(self, num_nodes: int) -> torch.Tensor:
        """[n, n] float: 1 where column i is row j's node or one of its ancestors."""
        cache = self.__dict__.setdefault("_on_path_cache", {})
        if num_nodes not in cache:
            mask = self.tree.draft_tree.prefix(num_nodes).attention_mask[1:, 1:]
            cache[num_nodes] = mask.float().to(self.device)
        return cache[num_nodes]


def _check_tree_attention(vllm_config) -> str:
    """Trees need every attention layer to apply the tree mask; any other backend would
    silently verify with a causal mask and emit wrong tokens. Returns the backend's name."""
    from vllm.model_executor.layers.attention import Attention

    from vllm_medusa.tree_attention import TreeCPUAttentionBackendImpl

    tree_impls = {TreeCPUAttentionBackendImpl: "CPU_ATTN"}
    if vllm_config.device_config.device_type != "cpu":
        from vllm_medusa.triton_tree_attention import TreeTritonAttentionBackendImpl

        tree_impls[TreeTritonAttentionBackendImpl] = "TRITON_ATTN"
    names = set()
    for name, layer in vllm_config.compilation_config.static_forward_context.items():
        if not isinstance(layer, Attention):
            continue
        backend = next((b for cls, b in tree_impls.items() if isinstance(layer.impl, cls)), None)
        if backend is None:
            raise ValueError(
                f"Medusa trees are verified by CPU or Triton attention only, but layer {name!r} "
                f"uses {type(layer.impl).__name__}: select Triton attention "
                "(--attention-backend TRITON_ATTN) or verify a chain (VLLM_MEDUSA_TREE=chain:K)"
            )
        names.add(backend)
    return ", ".join(sorted(names))


def _target_lm_head(target_model: nn.Module) -> nn.Module:
    lm_head = getattr(target_model, "lm_head", None)
    if lm_head is None and hasattr(target_model, "get_language_model"):
        lm_head = getattr(target_model.get_language_model(), "lm_head", None)
    if lm_head is None:
        raise ValueError(
            f"{type(target_model).__name__} has no lm_head for Medusa heads to share; "
            "use heads with their own lm_heads (FasterDecoding version 1)"
        )
    return lm_head
