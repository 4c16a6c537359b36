"""Surface: `vllm.config.speculative.SpeculativeConfig` (vLLM 0.32).

Its pydantic validator `_verify_args` ends by calling
`verify_equal_vocab_size_if_draft_model()`, in the process that parses the user's settings
(the `LLM(...)` caller or the API server), after the heads' config is read. Extending that
call makes heads made for another model fail there, with one message, instead of failing
later inside a worker or drafting garbage.
"""

from __future__ import annotations

_ORIGINAL_ATTR = "_vllm_medusa_original_verify_vocab"


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


def apply() -> None:
    from vllm.config.speculative import SpeculativeConfig

    if hasattr(SpeculativeConfig, _ORIGINAL_ATTR):
        return
    original = SpeculativeConfig.verify_equal_vocab_size_if_draft_model
    setattr(SpeculativeConfig, _ORIGINAL_ATTR, original)

    def verify_equal_vocab_size_if_draft_model(self) -> None:
        original(self)
        if self.method != "medusa" or self.draft_model_config is None:
            return
        heads = self.draft_model_config.hf_config
        target = self.target_model_config
        check_heads_fit_target(
            heads_dir=self.draft_model_config.model,
            num_heads=getattr(heads, "checkpoint_num_heads", heads.num_heads),
            num_speculative_tokens=self.num_speculative_tokens,
            heads_hidden=heads.hidden_size,
            heads_vocab=getattr(heads, "heads_vocab_size", None),
            target_hidden=target.get_hidden_size(),
            target_vocab=target.get_vocab_size(),
        )

    SpeculativeConfig.verify_equal_vocab_size_if_draft_model = (
        verify_equal_vocab_size_if_draft_model
    )
