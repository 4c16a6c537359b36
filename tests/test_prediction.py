"""What a calibration predicts for a workload (`vllm_medusa.prediction`), against step counts
worked out by hand, and how the benchmark reports it."""

from __future__ import annotations

import pytest

from vllm_medusa.benchmark import _summarise, format_table
from vllm_medusa.calibrate import Calibration
from vllm_medusa.prediction import StepTable, predicted_tok_s


def table() -> StepTable:
    """Measured at batch 1 and 4; 2 draft nodes at batch 1 (2 tokens a step), none above."""
    return StepTable(
        batch_sizes=[1, 4],
        step_ms={(1, 0): 10.0, (1, 2): 12.0, (4, 0): 16.0, (4, 2): 30.0},
        prefill_ms_per_token={(1, 0): 1.0, (1, 2): 1.0, (4, 0): 1.0, (4, 2): 2.0},
        tokens_per_step={0: 1.0, 2: 2.0},
        schedule=[[1, 1, 2], [2, 1024, 0]],
    )


def test_a_group_thins_as_its_answers_end_and_drafts_as_the_schedule_says():
    # Two requests, answers of 3 and 6 tokens (the first of each from the prefill), prompts of
    # 5 tokens: prefill 10 ms (batch 2, 1 ms a token); two steps of both requests without
    # drafts (batch 2: 12 ms, between batch 1's 10 and batch 4's 16); the first answer is
    # done, and the second, alone, drafts 2 nodes: 3 tokens left, two steps of 12 ms.
    assert table().group_seconds([5, 5], [3, 6], speculate=True) == pytest.approx(0.058)
    # Without speculation the lone request takes three steps of 10 ms.
    assert table().group_seconds([5, 5], [3, 6], speculate=False) == pytest.approx(0.064)


def test_groups_of_the_batch_size_run_one_after_another():
    # Batch 1: the 3-token answer 5 + 12 ms, the 6-token one 5 + 3 x 12 ms.
    tok_s = predicted_tok_s(table(), [5, 5], [3, 6], batch=1, speculate=True)
    assert tok_s == pytest.approx(9 / 0.058)
    # Beyond the measured batch sizes, the largest one's times: eight 1-token answers are
    # their prefill alone, which at batch 8 drafts nothing (the schedule) and costs batch
    # 4's 1 ms a token without drafts (2 ms with them).
    tok_s = predicted_tok_s(table(), [1] * 8, [1] * 8, batch=8, speculate=True)
    assert tok_s == pytest.approx(8 / 0.008)


def calibration(measurements: list[dict]) -> Calibration:
    return Calibration(
        heads_fingerprint="x",
        model={},
        dtype="float32",
        device="cpu",
        machine={},
        acceptance=[[0.5]],
        tree=[[0], [1]],
        schedule=[[1, 1024, 2]],
        measurements=measurements,
    )


def test_a_calibration_without_prefill_times_predicts_nothing():
    row = {"batch_size": 1, "draft_nodes": 0, "step_ms": 10.0, "expected_acceptance": 1.0}
    assert StepTable.from_calibration(calibration([row])) is None
    row |= {"prefill_ms": 30.0, "prompt_tokens": 15.0}
    steps = StepTable.from_calibration(calibration([row]))
    assert steps.prefill_ms_per_token == {(1, 0): 2.0}
    assert steps.tokens_per_step == {0: 1.0} and steps.nodes(3) == 2


def test_the_benchmark_reports_the_prediction_beside_what_it_measured():
    def run(config: str, seconds: float) -> dict:
        tokens = [[7] * 3, [7] * 6]
        return {"temperature": 0.0, "batch": 2, "run": 0, "seconds": seconds,
                "tokens": 9, "token_ids": tokens, "prompt_tokens": [5, 5]}  # fmt: skip

    raw = {"none": [run("none", 0.09)], "plugin": [run("plugin", 0.06)]}
    rows = _summarise(raw, [0.0], [2], table())
    by_config = {r["config"]: r for r in rows}
    assert by_config["none"]["predicted_tok_s"] == pytest.approx(9 / 0.064, abs=0.01)
    assert by_config["plugin"]["predicted_tok_s"] == pytest.approx(9 / 0.058, abs=0.01)
    # 155.17 predicted against 150.0 measured.
    assert "155.2 (+3%)" in format_table(rows)
    assert all("predicted_tok_s" not in r for r in _summarise(raw, [0.0], [2]))
