"""Medusa heads as a vLLM model: what `speculative_config={"method": "medusa"}` loads.

Head h maps the target's last hidden state to a guess of the token h+2 positions ahead:
`num_hidden_layers` residual blocks `x + SiLU(W x + b)`, then a projection to the vocabulary.
That projection is either the head's own lm_head, or, for heads trained to reuse the target's
(`original_lm_head`, FasterDecoding "version 2"), the target model's lm_head itself, bound in
memory by the proposer: no second copy of a vocabulary-sized matrix. With a draft vocabulary
(`vllm_medusa.draft_vocab`) it is the rows of those tokens only.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.linear import UnquantizedLinearMethod
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.model_loader.weight_utils import default_weight_loader


class ResidualBlock(nn.Module):
    def __init__(self, hidden_size: int, num_layers: int, bias: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [nn.Linear(hidden_size, hidden_size, bias=bias) for _ in range(num_layers)]
        )
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + self.act(layer(x))
        return x


class DraftVocabProjection(nn.Module):
    """Rows `token_ids` of a [vocab, hidden] projection, run by vLLM's own unquantized GEMM
    (on the CPU a prepacked oneDNN matmul, as for the target's layers)."""

    def __init__(self, weight: torch.Tensor, token_ids: torch.Tensor) -> None:
        super().__init__()
        # [draft vocab, hidden]
        self.weight = nn.Parameter(weight.detach()[token_ids].clone(), requires_grad=False)
        self.method = UnquantizedLinearMethod()
        self.method.process_weights_after_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, hidden] -> logits [num_tokens, draft vocab]."""
        return self.method.apply(self, x)


class MedusaHeads(nn.Module):
    """All Medusa heads of one checkpoint, in any format `vllm_medusa.converters` reads."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        spec_config = vllm_config.speculative_config
        assert spec_config is not None
        config = spec_config.draft_model_config.hf_config
        self.config = config
        # Weights are read from this folder by the converter's loader, whatever its format.
        self.checkpoint_dir: str = spec_config.draft_model_config.model
        self.num_heads: int = config.num_heads
        self.hidden_size: int = config.hidden_size
        self.vocab_size: int = config.vocab_size
        self.original_lm_head: bool = bool(getattr(config, "original_lm_head", False))
        self.blocks = nn.ModuleList(
            [
                ResidualBlock(
                    config.hidden_size,
                    config.num_hidden_layers,
                    bias=bool(getattr(config, "medusa_fc_bias", False)),
                )
                for _ in range(self.num_heads)
            ]
        )
        self.lm_heads: nn.ModuleList | None = None
        self.shared_lm_head: nn.Module | None = None
        if not self.original_lm_head:
            self.lm_heads = nn.ModuleList(
                [
                    ParallelLMHead(
                        config.vocab_size, config.hidden_size, prefix=f"{prefix}lm_heads.{h}"
                    )
                    for h in range(self.num_heads)
                ]
            )
        self.logits_processor = LogitsProcessor(config.vocab_size)
        # With a draft vocabulary: its token ids [draft vocab] and one projection (shared
        # lm_head) or one per head.
        self.draft_token_ids: torch.Tensor | None = None
        self.draft_projections: nn.ModuleList | None = None

    def bind_target_lm_head(self, lm_head: nn.Module) -> None:
        """Share the target model's lm_head (heads trained to reuse it)."""
        self.shared_lm_head = lm_head

    def restrict_vocab(self, token_ids: torch.Tensor) -> None:
        """Draft from `token_ids` ([K] sorted) only. The heads' own logits processor has no
        scale or soft cap, so a plain projection of the kept rows gives the same logits."""
        heads = [self.shared_lm_head] if self.lm_heads is None else list(self.lm_heads)
        if None in heads:
            raise RuntimeError("Medusa heads use the target lm_head, but none was bound")
        device = heads[0].weight.device
        self.draft_token_ids = token_ids.to(device)
        self.draft_projections = nn.ModuleList(
            [DraftVocabProjection(head.weight, self.draft_token_ids) for head in heads]
        )

    def token_ids(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices into `stacked_logits`' last dimension -> token ids."""
        return indices if self.draft_token_ids is None else self.draft_token_ids[indices]

    def forward(self, hidden_states: torch.Tensor) -> list[torch.Tensor]:
        """hidden_states: [num_tokens, hidden] -> one [num_tokens, hidden] per head."""
        return [block(hidden_states) for block in self.blocks]

    def stacked_logits(self, head_states: torch.Tensor) -> torch.Tensor:
        """head_states: [k, num_tokens, hidden] -> logits [k, num_tokens, vocab], or over the
        draft vocabulary where one is set (`token_ids` maps their indices to tokens).

        With a shared lm_head all heads go through one matmul, which reads the
        vocabulary-sized matrix once instead of once per head: on a memory-bound decode step
        that is most of the drafter's cost.
        """
        k, num_tokens, hidden = head_states.shape
        if self.draft_projections is not None:
            if len(self.draft_projections) == 1:
                flat = head_states.reshape(k * num_tokens, hidden)
                return self.draft_projections[0](flat).view(k, num_tokens, -1)
            return torch.stack([self.draft_projections[h](head_states[h]) for h in range(k)])
        if self.lm_heads is None:
            if self.shared_lm_head is None:
                raise RuntimeError("Medusa heads use the target lm_head, but none was bound")
            flat = head_states.reshape(k * num_tokens, hidden)
            logits = self.logits_processor(self.shared_lm_head, flat)
            return logits.view(k, num_tokens, -1)
        return torch.stack(
            [self.logits_processor(self.lm_heads[h], head_states[h]) for h in range(k)]
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # vLLM's file iterator is not used: it would unpickle .pt files on its own terms and
        # cannot expand FasterDecoding's shared layers. The converter's loader reads every
        # supported format safely (weights_only) into vLLM-layout names.
        from vllm_medusa.converters import load_checkpoint

        del weights
        params = dict(self.named_parameters())
        ckpt = load_checkpoint(self.checkpoint_dir)
        loaded: set[str] = set()
        for name, tensor in ckpt.tensors.items():
            if name.startswith("lm_heads.") and self.lm_heads is None:
                continue  # an embedded copy of the target lm_head, for stock vLLM
            if int(name.split(".")[1]) >= self.num_heads:
                continue  # vLLM builds only num_speculative_tokens heads
            if name not in params:
                raise ValueError(
                    f"speculative model {self.checkpoint_dir!r}: unexpected tensor {name!r}"
                )
            param = params[name]
            getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(name)
        return loaded
