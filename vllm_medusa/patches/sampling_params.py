"""Surface: `vllm.sampling_params.SamplingParams._validate_spec_decode` (vLLM 0.32), where a
request is checked against the engine's settings.

vLLM refuses `min_p` and `logit_bias` whenever speculative decoding is on, because its
rejection sampler does not apply them to the draft rows. Where this plugin verifies the drafts
itself (trees everywhere, chains on the CPU), each draw goes through vLLM's own `Sampler`, which
applies both, so those requests are accepted there; elsewhere vLLM's check stands.
"""

from __future__ import annotations

from typing import Any

_ORIGINAL_ATTR = "_vllm_medusa_original_validate_spec_decode"


def _verified_by_plugin(speculative_config: Any) -> bool:
    from vllm.platforms import current_platform

    from vllm_medusa.tree import verified_by_plugin

    if speculative_config.method != "medusa" or speculative_config.draft_model_config is None:
        return False
    heads = speculative_config.draft_model_config.hf_config
    return verified_by_plugin(heads, current_platform.device_type)


def apply() -> None:
    from vllm.sampling_params import SamplingParams

    if hasattr(SamplingParams, _ORIGINAL_ATTR):
        return
    original = SamplingParams._validate_spec_decode
    setattr(SamplingParams, _ORIGINAL_ATTR, original)

    def _validate_spec_decode(self, speculative_config: Any) -> None:
        if speculative_config is not None and _verified_by_plugin(speculative_config):
            return
        original(self, speculative_config)

    SamplingParams._validate_spec_decode = _validate_spec_decode
