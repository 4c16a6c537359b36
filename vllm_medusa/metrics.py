"""Speculative decoding counters as vLLM reports them (`LLM.get_metrics()`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecDecodeStats:
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verification step: the accepted drafts plus the bonus token."""
        if self.num_drafts == 0:
            return 0.0
        return 1.0 + self.num_accepted_tokens / self.num_drafts

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    def minus(self, earlier: SpecDecodeStats) -> SpecDecodeStats:
        """The counts since `earlier`, so one engine can measure several runs apart."""
        now, before = _padded(self.accepted_per_position, earlier.accepted_per_position)
        return SpecDecodeStats(
            self.num_drafts - earlier.num_drafts,
            self.num_draft_tokens - earlier.num_draft_tokens,
            self.num_accepted_tokens - earlier.num_accepted_tokens,
            [a - b for a, b in zip(now, before, strict=True)],
        )

    def as_dict(self) -> dict:
        return {
            "num_drafts": self.num_drafts,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "accepted_per_position": self.accepted_per_position,
            "mean_acceptance_length": round(self.mean_acceptance_length, 4),
            "acceptance_rate": round(self.acceptance_rate, 4),
        }


def _padded(a: list[int], b: list[int]) -> tuple[list[int], list[int]]:
    """Per-position counts of two lengths, zero-padded to the longer."""
    width = max(len(a), len(b))
    return a + [0] * (width - len(a)), list(b) + [0] * (width - len(b))


def spec_decode_stats(llm) -> SpecDecodeStats:
    """Read the engine's cumulative speculative decoding counters."""
    stats = SpecDecodeStats()
    for metric in llm.get_metrics():
        if metric.name == "vllm:spec_decode_num_drafts":
            stats.num_drafts += metric.value
        elif metric.name == "vllm:spec_decode_num_draft_tokens":
            stats.num_draft_tokens += metric.value
        elif metric.name == "vllm:spec_decode_num_accepted_tokens":
            stats.num_accepted_tokens += metric.value
        elif metric.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            stats.accepted_per_position = list(metric.values)
    return stats


def count_spec_decoding(llm) -> SpecDecodeStats:
    """Counters of this `LLM`'s engine alone, kept up to date as it steps.

    vLLM's Prometheus metrics are process-wide: with several `LLM`s in one process,
    `get_metrics()` reads whichever engine registered last. This taps the engine's own stat
    recording (each step's scheduler statistics) instead, so each engine counts its own.
    """
    stats = SpecDecodeStats()
    manager = llm.llm_engine.logger_manager
    if manager is None:
        raise ValueError("the engine records no statistics: create it with disable_log_stats=False")
    record = manager.record

    def record_and_count(*args, **kwargs):
        scheduler_stats = kwargs.get("scheduler_stats", args[0] if args else None)
        spec = getattr(scheduler_stats, "spec_decoding_stats", None)
        if spec is not None:
            stats.num_drafts += spec.num_drafts
            stats.num_draft_tokens += spec.num_draft_tokens
            stats.num_accepted_tokens += spec.num_accepted_tokens
            counts, step = _padded(stats.accepted_per_position, spec.num_accepted_tokens_per_pos)
            stats.accepted_per_position = [a + b for a, b in zip(counts, step, strict=True)]
        return record(*args, **kwargs)

    manager.record = record_and_count
    return stats
