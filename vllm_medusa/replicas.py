"""Data-parallel Medusa replicas as Ray actors: one vLLM engine per actor, prompts spread
over them.

vLLM 0.32's own Ray executor refuses the CPU platform, so on CPU machines replicas are plain
actors that each build an `LLM`. Ray is imported only here (`pip install ray`); the actor
class lives in the package so that Ray workers can import it.
"""

from __future__ import annotations

import os
from typing import Any

from vllm_medusa.engine import engine_kwargs

# Nothing may leave this machine: no hub look-ups, no usage reports from vLLM or Ray.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}


class MedusaReplica:
    """One engine. `cpu_bind` pins its threads (vLLM's VLLM_CPU_OMP_THREADS_BIND), so that
    replicas on one machine do not fight over the same cores."""

    def __init__(
        self,
        model: str,
        speculative_config: dict[str, Any] | None,
        engine_overrides: dict[str, Any] | None = None,
        cpu_bind: str | None = None,
    ) -> None:
        if cpu_bind is not None:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind
        from vllm import LLM

        self.llm = LLM(
            model=model,
            speculative_config=speculative_config,
            **engine_kwargs(**(engine_overrides or {})),
        )

    def chat_greedy(self, prompts: list[str], max_tokens: int) -> list[list[int]]:
        """Greedy token ids of each prompt's answer, one chat turn each."""
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        conversations = [[{"role": "user", "content": p}] for p in prompts]
        outputs = self.llm.chat(conversations, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    def spec_decode(self) -> dict[str, Any]:
        from vllm_medusa.metrics import spec_decode_stats

        return spec_decode_stats(self.llm).as_dict()

    def shutdown(self) -> None:
        from vllm_medusa.engine import shutdown

        shutdown(self.llm)


def init_local_ray(num_cpus: int) -> None:
    """A single-node Ray on loopback, without dashboard or usage reporting."""
    import ray

    os.environ.update(OFFLINE_ENV)
    # On a loaded machine Ray's agents can take over a minute to come up; the defaults make
    # the raylet give up first.
    os.environ.setdefault("RAY_agent_register_timeout_ms", "300000")
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "300")
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": OFFLINE_ENV},
        log_to_driver=False,
    )


def start_replicas(
    num_replicas: int,
    model: str,
    speculative_config: dict[str, Any] | None,
    engine_overrides: dict[str, Any] | None = None,
    bind_cores: bool = True,
) -> list[Any]:
    """Ray actor handles, one CPU each; with bind_cores, replica i runs on core i."""
    import ray

    actor = ray.remote(num_cpus=1)(MedusaReplica)
    return [
        actor.remote(model, speculative_config, engine_overrides, str(i) if bind_cores else None)
        for i in range(num_replicas)
    ]


def chat_greedy_spread(replicas: list[Any], prompts: list[str], max_tokens: int) -> list[list[int]]:
    """Data parallelism: prompt i goes to replica i % N; answers come back in prompt order."""
    import ray

    n = len(replicas)
    shares = [prompts[r::n] for r in range(n)]
    answers = ray.get(
        [
            rep.chat_greedy.remote(share, max_tokens)
            for rep, share in zip(replicas, shares, strict=True)
        ]
    )
    out: list[list[int]] = [[] for _ in prompts]
    for r, share_answers in enumerate(answers):
        for j, ids in enumerate(share_answers):
            out[r + j * n] = ids
    return out
