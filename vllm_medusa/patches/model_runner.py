"""Surface: `vllm.v1.spec_decode.medusa.MedusaProposer` as bound in
`vllm.v1.worker.gpu_model_runner` (vLLM 0.32; the CPU runner subclasses that runner).

The runner builds its drafter with `MedusaProposer(vllm_config=..., device=...)` when
`speculative_config.method == "medusa"`, and later asserts `isinstance(drafter, MedusaProposer)`
against the same name. Rebinding the name to our subclass swaps the proposer and keeps both
checks true. The runner imports the name at its own import time, so the name is rebound in
the defining module (for runners imported later) and in the runner (if already imported).
"""

from __future__ import annotations

import sys

RUNNER_MODULE = "vllm.v1.worker.gpu_model_runner"


def apply() -> None:
    from vllm.v1.spec_decode import medusa

    from vllm_medusa.proposer import MedusaProposer

    medusa.MedusaProposer = MedusaProposer
    runner = sys.modules.get(RUNNER_MODULE)
    if runner is not None:
        runner.MedusaProposer = MedusaProposer
