"""The Medusa proposer the V1 model runner drives (replaces vLLM's, see patches/model_runner).

Per step the runner hands over each request's hidden state at its last accepted token; the
proposer turns them into draft tokens: the argmax of each of the first
`num_speculative_tokens` heads, one chain per request.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from vllm.logger import init_logger
from vllm.v1.sample.metadata import SamplingMetadata
from vllm.v1.spec_decode.medusa import MedusaProposer as VllmMedusaProposer

from vllm_medusa.model import MedusaHeads

# Under "vllm." so that vLLM's logging configuration shows it.
logger = init_logger(f"vllm.{__name__}")


class MedusaProposer(VllmMedusaProposer):
    def load_model(self, target_model: nn.Module) -> None:
        super().load_model(target_model)
        if not isinstance(self.model, MedusaHeads):
            raise RuntimeError(
                "vllm-medusa: the speculative model did not load as MedusaHeads; "
                "is another plugin registering 'MedusaModel'?"
            )
        if self.model.original_lm_head:
            self.model.bind_target_lm_head(_target_lm_head(target_model))
        logger.info(
            "vllm-medusa: %d heads x %d layers from %s, %s lm_head, %d speculative tokens",
            self.model.num_heads,
            len(self.model.blocks[0].layers),
            self.model.checkpoint_dir,
            "shared target" if self.model.original_lm_head else "own",
            self.num_speculative_tokens,
        )

    @torch.inference_mode()
    def propose(
        self,
        num_speculative_tokens: int,
        target_hidden_states: torch.Tensor,
        sampling_metadata: SamplingMetadata,
        slot_mappings: object = None,
    ) -> torch.Tensor:
        """target_hidden_states: [num_reqs, hidden] -> draft token ids [num_reqs, k]."""
        # vLLM builds exactly num_speculative_tokens heads (it sets the config's num_heads).
        head_states = torch.stack(self.model(target_hidden_states))  # [k, num_reqs, hidden]
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
