"""The Medusa proposer the V1 model runner drives (replaces vLLM's, see patches/model_runner).

Per step the runner hands over each request's hidden state at its last accepted token; the
proposer turns them into draft tokens: the argmax of each of the first
`num_speculative_tokens` heads, one chain per request.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from vllm.config import VllmConfig
from vllm.v1.sample.metadata import SamplingMetadata
from vllm.v1.spec_decode.medusa import MedusaProposer as VllmMedusaProposer

from vllm_medusa.model import MedusaHeads


class MedusaProposer(VllmMedusaProposer):
    def __init__(self, vllm_config: VllmConfig, device: torch.device) -> None:
        super().__init__(vllm_config=vllm_config, device=device)
        heads_config = self.spec_config.draft_model_config.hf_config
        check_heads_fit_target(
            heads_dir=self.spec_config.draft_model_config.model,
            num_heads=heads_config.num_heads,
            num_speculative_tokens=self.num_speculative_tokens,
            heads_hidden=heads_config.hidden_size,
            heads_vocab=getattr(heads_config, "heads_vocab_size", None),
            target_hidden=vllm_config.model_config.get_hidden_size(),
            target_vocab=vllm_config.model_config.get_vocab_size(),
        )

    def load_model(self, target_model: nn.Module) -> None:
        super().load_model(target_model)
        if not isinstance(self.model, MedusaHeads):
            raise RuntimeError(
                "vllm-medusa: the speculative model did not load as MedusaHeads; "
                "is another plugin registering 'MedusaModel'?"
            )
        if self.model.original_lm_head:
            self.model.bind_target_lm_head(_target_lm_head(target_model))

    @torch.inference_mode()
    def propose(
        self,
        num_speculative_tokens: int,
        target_hidden_states: torch.Tensor,
        sampling_metadata: SamplingMetadata,
        slot_mappings: object = None,
    ) -> torch.Tensor:
        """target_hidden_states: [num_reqs, hidden] -> draft token ids [num_reqs, k]."""
        k = num_speculative_tokens
        head_states = torch.stack(
            [block(target_hidden_states) for block in self.model.blocks[:k]]
        )  # [k, num_reqs, hidden]
        logits = self.model.stacked_logits(head_states)  # [k, num_reqs, vocab]
        return logits.argmax(dim=-1).transpose(0, 1)


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


def check_heads_fit_target(
    *,
    heads_dir: str,
    num_heads: int,
    num_speculative_tokens: int,
    heads_hidden: int,
    heads_vocab: int | None,
    target_hidden: int,
    target_vocab: int,
) -> None:
    """Heads made for another model fail at start-up, not with wrong drafts."""
    if heads_hidden != target_hidden:
        raise ValueError(
            f"Medusa heads {heads_dir!r} have hidden size {heads_hidden} but the target "
            f"model has {target_hidden}: use heads trained for this model"
        )
    if heads_vocab is not None and heads_vocab != target_vocab:
        raise ValueError(
            f"Medusa heads {heads_dir!r} predict a vocabulary of {heads_vocab} tokens but the "
            f"target model has {target_vocab}: use heads trained for this model"
        )
    if num_speculative_tokens > num_heads:
        raise ValueError(
            f"num_speculative_tokens={num_speculative_tokens} but {heads_dir!r} has only "
            f"{num_heads} Medusa heads: set num_speculative_tokens to at most {num_heads}"
        )
