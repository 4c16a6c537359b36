"""What a calibration predicts for a workload (`vllm_medusa.prediction`), against step counts
worked out by hand, and how the benchmark reports it."""

from __future__ import annotations

import pytest

from vllm_medusa.benchmark import _summarise, format_table
from vllm_medusa.calibrate import Calibration
from vllm_medusa.prediction import StepTable, fit_line, predicted_tok_s


def table() -> StepTable:
    """Measured at batch 1 and 4; 2 draft nodes at batch 1 (2 tokens a step), none above."""
    return StepTable(
        batch_sizes=[1, 4],
        step_ms={(1, 0): 10.0, (1, 2): 12.0, (4, 0): 16.0, (4, 2): 30.0},
        prefill_fixed_ms=2.0,
        prefill_ms_per_token=1.0,
        tokens_per_step={0: 1.0, 2: 2.0},
        schedule=[[1, 1, 2], [2, 1024, 0]],
    )


def test_a_group_thins_as_its_answers_end_and_drafts_as_the_schedule_says():
    # Two requests, answers of 3 and 6 tokens (the first of each from the prefill), prompts of
    # 5 tokens: prefill 2 + 10 ms; two steps of both requests without drafts (batch 2: 12 ms,
    # between batch 1's 10 and batch 4's 16); the first answer is done, and the second,
    # alone, drafts 2 nodes: 3 tokens left, two steps of 12 ms.
    assert table().group_seconds([5, 5], [3, 6], speculate=True) == pytest.approx(0.060)
    # Without speculation the lone request takes three steps of 10 ms.
    assert table().group_seconds([5, 5], [3, 6], speculate=False) == pytest.approx(0.066)


def test_groups_of_the_batch_size_run_one_after_another():
    # Batch 1: the 3-token answer 7 + 12 ms, the 6-token one 7 + 3 x 12 ms.
    tok_s = predicted_tok_s(table(), [5, 5], [3, 6], batch=1, speculate=True)
    assert tok_s == pytest.approx(9 / 0.062)
    # Beyond the measured batch sizes, the largest one's step times: eight 2-token answers
    # (empty prompts) are a 2 ms prefill and one step, without drafts at batch 8 (the
    # schedule), of batch 4's 16 ms (30 with drafts).
    tok_s = predicted_tok_s(table(), [0] * 8, [2] * 8, batch=8, speculate=True)
    assert tok_s == pytest.approx(16 / 0.018)


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
    rows = [
        row | {"prefill_ms": 30.0, "prompt_tokens": 15.0},
        row | {"batch_size": 2, "prefill_ms": 40.0, "prompt_tokens": 30.0},
    ]
    steps = StepTable.from_calibration(calibration(rows))
    # A fixed 20 ms a group and 2/3 ms a prompt token.
    assert steps.prefill_fixed_ms == pytest.approx(20.0)
    assert steps.prefill_ms_per_token == pytest.approx(2 / 3)
    assert steps.tokens_per_step == {0: 1.0} and steps.nodes(3) == 2


def test_the_prefill_line_never_goes_below_zero():
    assert fit_line([(1, 5), (2, 3)]) == (4.0, 0.0)  # flat, not cheaper with more tokens
    fixed, per_token = fit_line([(10, 1), (20, 10)])  # through the origin, not below it
    assert fixed == 0.0 and per_token == pytest.approx(210 / 500)


def test_the_benchmark_reports_the_prediction_beside_what_it_measured():
    def run(config: str, seconds: float) -> dict:
        tokens = [[7] * 3, [7] * 6]
        return {"temperature": 0.0, "batch": 2, "run": 0, "seconds": seconds,
                "tokens": 9, "token_ids": tokens, "prompt_tokens": [5, 5]}  # fmt: skip

    raw = {"none": [run("none", 0.09)], "plugin": [run("plugin", 0.0625)]}
    rows = _summarise(raw, [0.0], [2], table())
    by_config = {r["config"]: r for r in rows}
    assert by_config["none"]["predicted_tok_s"] == pytest.approx(9 / 0.066, abs=0.01)
    assert by_config["plugin"]["predicted_tok_s"] == pytest.approx(9 / 0.060, abs=0.01)
    # 150.0 predicted against 144.0 measured.
    assert "150.0 (+4%)" in format_table(rows)
    assert all("predicted_tok_s" not in r for r in _summarise(raw, [0.0], [2]))


def test_prompt_tokens_found_in_the_prefix_cache_cost_no_prefill():
    # The same group as above with 3 of each prompt's 5 tokens cached: 6 ms less prefill.
    seconds = table().group_seconds([5, 5], [3, 6], speculate=False, cached_tokens=[3, 3])
    assert seconds == pytest.approx(0.060)
    tok_s = predicted_tok_s(table(), [5, 5], [3, 6], batch=2, speculate=False, cached_tokens=[3, 3])
    assert tok_s == pytest.approx(9 / 0.060)


def test_a_step_costs_more_for_each_request_whose_context_is_longer_than_calibrated():
    # 0.5 ms a step per context token beyond the calibration's 6, per request, without drafts.
    steps = table()
    steps.context_ms_per_token = {0: 0.5}
    steps.reference_context = 6.0
    # One request, a 5-token prompt and a 3-token answer: two steps at contexts 6 and 7 (the
    # prompt and the tokens so far): 10 + 0 and 10 + 0.5 ms, after a 7 ms prefill.
    assert steps.group_seconds([5], [3], speculate=False) == pytest.approx(0.0275)
    # Two such requests: each batch-2 step (12 ms) adds both requests' excess: 0, then 1 ms.
    assert steps.group_seconds([5, 5], [3, 3], speculate=False) == pytest.approx(0.037)
    # Shorter contexts than the calibration's step faster, by the same measure: an empty
    # prompt's steps at contexts 1 and 2 take 2.5 and 2 ms less.
    assert steps.group_seconds([0], [3], speculate=False) == pytest.approx(0.0175)
    # Draft counts the calibration did not measure it for add nothing.
    assert steps.group_seconds([5], [5], speculate=True) == pytest.approx(0.031)
