"""`vllm-medusa calibrate` and the calibration file the plugin reads beside the heads."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vllm_medusa.calibrate import (
    CALIBRATION_FILE,
    Calibration,
    CalibrationError,
    acceptance_from_records,
    acceptance_scale,
    calibration_file,
    choose_schedule,
    copy_gain,
    heads_fingerprint,
    load_calibration,
    mismatch,
    model_identity,
    probe_paths,
    pruning_survival,
)
from vllm_medusa.heads import default_heads_path
from vllm_medusa.prediction import StepTable
from vllm_medusa.tree import best_tree, build_tree, expected_acceptance_length

ACCEPTANCE = [[0.3, 0.1, 0.05], [0.25, 0.1, 0.05], [0.2, 0.1, 0.0]]


@pytest.fixture()
def heads_copy(tmp_path) -> Path:
    folder = tmp_path / "heads"
    shutil.copytree(default_heads_path(), folder)
    for shipped in folder.glob("medusa_calibration*.json"):  # one per dtype
        shipped.unlink()
    return folder


def smollm2_identity(smollm2_dir: Path) -> dict:
    from transformers import AutoConfig

    return model_identity(AutoConfig.from_pretrained(smollm2_dir))


def calibration_for(heads: Path, model: dict, schedule, nodes: int = 3, **changes) -> Calibration:
    tree = best_tree(ACCEPTANCE, nodes)
    fields = dict(
        heads_fingerprint=heads_fingerprint(heads),
        model=model,
        dtype="float32",
        device="cpu",
        machine={"measured": "2026-12-02"},
        acceptance=ACCEPTANCE,
        tree=[list(p) for p in tree.paths],
        schedule=schedule,
    )
    fields.update(changes)
    return Calibration(**fields)


def write(calibration: Calibration, heads: Path) -> Path:
    path = heads / CALIBRATION_FILE
    path.write_text(json.dumps(asdict(calibration)))
    return path


def test_probe_and_records_give_the_conditional_acceptance_table():
    probe = probe_paths(depth=2, ranks=2)
    assert probe == [[0], [1], [0, 0], [0, 1]]
    drafted = [{"path": p, "copy": False} for p in probe]
    records = [
        {"drafted": drafted, "accepted_nodes": [1, 4]},  # (0) then (0, 1)
        {"drafted": drafted, "accepted_nodes": [2]},  # (1): nothing below it was drafted
        {"drafted": drafted, "accepted_nodes": []},
        {"drafted": drafted, "accepted_nodes": [1]},  # (0), then neither child
    ]
    table = acceptance_from_records(records, depth=2, ranks=2)
    assert table == [[2 / 4, 1 / 4], [0 / 2, 1 / 2]]


def test_copy_branches_count_in_the_expected_length_not_in_the_heads_table():
    # The probe [(0), (1)] with a copy branch sharing node 1 and going on below it.
    drafted = [
        {"path": [0], "copy": True},
        {"path": [1], "copy": False},
        {"path": None, "copy": True},  # 3: child of 1
        {"path": None, "copy": True},  # 4: child of 3
    ]
    records = [
        {"drafted": drafted, "accepted_nodes": [1, 3, 4]},  # the copy branch, 3 deep
        {"drafted": drafted, "accepted_nodes": [2]},  # the heads' rank 1
        {"drafted": drafted[:2], "accepted_nodes": []},  # no copy branch this step
    ]
    # The heads' nodes only: (0) accepted once and (1) once in three tries.
    assert acceptance_from_records(records, depth=1, ranks=2) == [[1 / 3, 1 / 3]]
    # Beyond a tree of (0): the branch's 3 against 1 in the first step, 0 in the others.
    assert copy_gain(records, [(0,)]) == pytest.approx(2 / 3)
    assert copy_gain(records, [(0,), (1,)]) == pytest.approx(2 / 3)
    assert copy_gain(records, [(1,)]) == pytest.approx(3 / 3)  # (0) is outside: all 3 count
    # Node 1 is both (0) and the copy branch's first token: a gain only for a tree without (0).
    shared = [{"drafted": drafted[:2], "accepted_nodes": [1]}]
    assert copy_gain(shared, [(0,)]) == 0 and copy_gain(shared, [(1,)]) == 1


def test_expected_length_counts_only_nodes_pruning_keeps():
    # The probe [(0), (1), (0, 0)], drafted unpruned; the heads' probabilities recorded.
    drafted = [
        {"path": [0], "copy": False, "prob": 0.5},
        {"path": [1], "copy": False, "prob": 0.05},
        {"path": [0, 0], "copy": False, "prob": 0.3},  # path probability 0.15
        {"path": None, "copy": True, "prob": None},  # a copy branch below (0, 0)
    ]
    records = [
        {"drafted": drafted, "accepted_nodes": [1, 3, 4]},
        {"drafted": drafted, "accepted_nodes": [2]},
        {"drafted": drafted, "accepted_nodes": [1]},
    ]
    acceptance = acceptance_from_records(records, depth=2, ranks=2)
    assert acceptance == [[2 / 3, 1 / 3], [1 / 2, 0.0]]
    # At 0.1: (0) always kept, (1) (0.05) never, (0, 0) (0.15) kept; at 0.2 (0, 0) goes too.
    assert pruning_survival(records, 2, 2, 0.1) == [[1.0, 0.0], [1.0, 1.0]]
    assert pruning_survival(records, 2, 2, 0.2) == [[1.0, 0.0], [0.0, 1.0]]
    assert pruning_survival(records, 2, 2, 0.0) == [[1.0, 1.0], [1.0, 1.0]]
    tree = build_tree([[0], [1], [0, 0]])
    unpruned = expected_acceptance_length(acceptance, tree)
    assert unpruned == pytest.approx(1 + 2 / 3 + 1 / 3 + 1 / 3)
    survival = pruning_survival(records, 2, 2, 0.2)
    assert expected_acceptance_length(acceptance, tree, survival) == pytest.approx(1 + 2 / 3)
    # No copy branch run from the root in these records: nothing to add.
    assert copy_gain(records, list(tree.paths), 0.0) == 0
    # Where (0) and (0, 0) are also the copy branch's tokens, the branch's accepted run of 3
    # counts beyond the heads' stretch that pruning keeps.
    merged = [dict(d, copy=True) if d["path"] in ([0], [0, 0]) else d for d in drafted]
    with_copy = [{"drafted": merged, "accepted_nodes": [1, 3, 4]}]
    assert copy_gain(with_copy, list(tree.paths), 0.0) == 1  # 3 copied against 2 inside
    assert copy_gain(with_copy, list(tree.paths), 0.2) == 2  # 3 copied against 1 kept


def test_acceptance_scale_pools_the_timed_engines_against_the_probe():
    expected = {(1, 0): 1.0, (1, 2): 1.5, (1, 4): 2.0, (8, 2): 1.5}
    measured = {
        (1, 0): {"measured_acceptance": 1.0},
        (1, 2): {"measured_acceptance": 1.4},
        (1, 4): {"measured_acceptance": 1.6},
        (8, 2): {"measured_acceptance": 1.5},
    }
    # Drafts accepted: 0.4 + 0.6 + 0.5 measured against 0.5 + 1.0 + 0.5 expected.
    assert acceptance_scale(expected, measured) == pytest.approx(1.5 / 2.0)
    assert acceptance_scale({(1, 0): 1.0}, {(1, 0): {"measured_acceptance": 1.0}}) == 1.0


def test_schedule_keeps_no_speculation_unless_clearly_ahead():
    predicted = {
        (1, 0): 20.0, (1, 2): 25.0, (1, 4): 24.0,
        (4, 0): 60.0, (4, 2): 61.0, (4, 4): 50.0,
        (8, 0): 100.0, (8, 2): 80.0, (8, 4): 70.0,
    }  # fmt: skip
    schedule = choose_schedule(predicted, [1, 4, 8], margin=1.05)
    assert schedule == [[1, 3, 2], [4, 7, 0], [8, 1024, 0]]
    assert choose_schedule(predicted, [1, 4, 8], margin=1.3)[0] == [1, 3, 0]


def test_calibration_file_round_trip_and_refusals(tmp_path, heads_copy, smollm2_dir):
    model = smollm2_identity(smollm2_dir)
    good = calibration_for(heads_copy, model, [[1, 1, 3], [2, 1024, 0]])
    path = write(good, heads_copy)
    assert load_calibration(path) == good
    assert mismatch(good, str(heads_copy), model, "float32", "cpu") is None

    for text, message in (
        ("{not json", "cannot be read as JSON"),
        (json.dumps({"version": 99}), "not a version-1 calibration"),
        (json.dumps({**asdict(good), "tree": [[0, 1]]}), "malformed.*no parent"),
        (json.dumps({**asdict(good), "schedule": [[1, 4, 9]]}), "malformed.*schedule entry"),
        (json.dumps({**asdict(good), "extra": 1}), "malformed"),
    ):
        path.write_text(text)
        with pytest.raises(CalibrationError, match=message) as error:
            load_calibration(path)
        assert "run vllm-medusa calibrate again" in str(error.value)

    assert "measured in float32, this engine runs bfloat16" in mismatch(
        good, str(heads_copy), model, "bfloat16", "cpu"
    )
    assert "another model" in mismatch(
        good, str(heads_copy), {**model, "hidden_size": 1}, "float32", "cpu"
    )
    assert "on cpu, this engine runs on cuda" in mismatch(
        good, str(heads_copy), model, "float32", "cuda"
    )
    (heads_copy / "config.json").write_text((heads_copy / "config.json").read_text() + " ")
    assert "heads changed" in mismatch(good, str(heads_copy), model, "float32", "cpu")


def _spec_config(heads: Path, smollm2_dir: Path, dtype=torch.float32):
    from transformers import AutoConfig

    return SimpleNamespace(
        draft_model_config=SimpleNamespace(model=str(heads)),
        target_model_config=SimpleNamespace(
            dtype=dtype, hf_config=AutoConfig.from_pretrained(smollm2_dir)
        ),
    )


def test_plugin_uses_a_fitting_calibration_and_sets_others_aside(heads_copy, smollm2_dir, caplog):
    from vllm_medusa.patches.speculative_config import calibrated_settings

    schedule = [[1, 1, 3], [2, 1024, 0]]
    write(calibration_for(heads_copy, smollm2_identity(smollm2_dir), schedule), heads_copy)
    tree, used = calibrated_settings(_spec_config(heads_copy, smollm2_dir))
    assert used == schedule and tree.num_nodes == 3 and tree.name == "calibrated"
    # Another dtype: a warning, and the engine's own settings.
    with caplog.at_level("WARNING", logger="vllm"):
        assert calibrated_settings(_spec_config(heads_copy, smollm2_dir, torch.bfloat16)) is None
    assert "measured in float32, this engine runs bfloat16" in caplog.text
    # A bfloat16 calibration beside it serves bfloat16 engines; float32 keeps its own.
    bf16_schedule = [[1, 1, 2], [2, 1024, 0]]
    bf16 = calibration_for(
        heads_copy, smollm2_identity(smollm2_dir), bf16_schedule, nodes=2, dtype="bfloat16"
    )
    (heads_copy / "medusa_calibration.bfloat16.json").write_text(json.dumps(asdict(bf16)))
    tree, used = calibrated_settings(_spec_config(heads_copy, smollm2_dir, torch.bfloat16))
    assert used == bf16_schedule and tree.num_nodes == 2
    assert calibrated_settings(_spec_config(heads_copy, smollm2_dir))[1] == schedule
    (heads_copy / "medusa_calibration.bfloat16.json").unlink()
    # No file: nothing to use.
    (heads_copy / CALIBRATION_FILE).unlink()
    assert calibrated_settings(_spec_config(heads_copy, smollm2_dir)) is None


def test_a_calibration_from_another_kind_of_cpu_is_used_with_a_warning(
    heads_copy, smollm2_dir, caplog
):
    """Same-named CPUs differ in instruction sets, and with them in what a step costs: the
    engine says so and still uses the calibration (better than drafting at every batch size),
    unless the heads carry one measured on this kind of CPU."""
    from vllm_medusa.calibrate import CPU_FEATURES, cpu_features, cpu_kind, other_cpu
    from vllm_medusa.patches.speculative_config import calibrated_settings

    here = cpu_features()
    assert here is not None and set(here) <= set(CPU_FEATURES)
    other = [f for f in CPU_FEATURES if f not in here][:1]
    schedule = [[1, 1, 3], [2, 1024, 0]]
    model = smollm2_identity(smollm2_dir)
    foreign = calibration_for(heads_copy, model, schedule, machine={"cpu_features": other})
    reason = other_cpu(foreign)
    assert reason == (
        f"it was measured on a CPU with {' '.join(other) or 'none of ' + ' '.join(CPU_FEATURES)}"
        f", this one has {' '.join(here)}"
    )
    write(foreign, heads_copy)
    with caplog.at_level("WARNING", logger="vllm"):
        assert calibrated_settings(_spec_config(heads_copy, smollm2_dir))[1] == schedule
    assert reason in caplog.text and "vllm-medusa calibrate --heads" in caplog.text
    # Heads can carry one measured on this kind of CPU: it takes the foreign one's place...
    kind_schedule = [[1, 2, 2], [3, 1024, 0]]
    kind = calibration_for(heads_copy, model, kind_schedule, machine={"cpu_features": here})
    kind_file = heads_copy / calibration_file("float32", cpu_kind(here))
    kind_file.write_text(json.dumps(asdict(kind)))
    caplog.clear()
    with caplog.at_level("WARNING", logger="vllm"):
        assert calibrated_settings(_spec_config(heads_copy, smollm2_dir))[1] == kind_schedule
    assert "measured on a CPU" not in caplog.text
    # ...but not the main file's place once that one is measured here (a user's own run).
    write(calibration_for(heads_copy, model, schedule, machine={"cpu_features": here}), heads_copy)
    assert calibrated_settings(_spec_config(heads_copy, smollm2_dir))[1] == schedule
    kind_file.unlink()
    # The same kind of CPU, or a calibration that does not say (older files): no warning.
    caplog.clear()
    for machine in ({"cpu_features": here}, {"measured": "2026-12-02"}):
        calibration = calibration_for(heads_copy, model, schedule, machine=machine)
        assert other_cpu(calibration) is None
        write(calibration, heads_copy)
        with caplog.at_level("WARNING", logger="vllm"):
            assert calibrated_settings(_spec_config(heads_copy, smollm2_dir))[1] == schedule
    assert "measured on a CPU" not in caplog.text


def test_calibrate_command_writes_a_calibration_the_plugin_accepts(
    heads_copy, smollm2_dir, tmp_path
):
    """The whole command at its smallest: a probe engine, no speculation and one tree size."""
    from vllm_medusa.calibrate import main

    out = tmp_path / "calibration.json"
    code = main(
        [
            "--heads", str(heads_copy), "--model", str(smollm2_dir), "--out", str(out),
            "--sizes", "2", "--batch-sizes", "1", "2", "--num-prompts", "4",
            "--max-tokens", "8", "--rounds", "1", "--probe-ranks", "3", "--max-depth", "2",
            "--dtype", "float32",
        ]
    )  # fmt: skip
    assert code == 0
    calibration = load_calibration(out)
    assert (
        mismatch(calibration, str(heads_copy), smollm2_identity(smollm2_dir), "float32", "cpu")
        is None
    )
    assert len(calibration.acceptance) == 2 and len(calibration.acceptance[0]) == 3
    assert 0 < calibration.acceptance[0][0] <= 1
    assert [m["draft_nodes"] for m in calibration.measurements] == [0, 2, 0, 2]
    assert all(m["step_ms"] > 0 and m["measured_tok_s"] > 0 for m in calibration.measurements)
    # What bench's predictions need: each batch size's prefill, for the prompts' tokens.
    assert all(m["prefill_ms"] > 0 and m["prompt_tokens"] > 0 for m in calibration.measurements)
    # And what a step costs more per context token, measured with a long prompt: the same for
    # every batch size of an engine, never negative; the context the steps were timed at is
    # the prompts' and half the answer's.
    for m in calibration.measurements:
        assert m["context_tokens"] == pytest.approx(m["prompt_tokens"] / m["batch_size"] + 4)
    per_engine = {m["draft_nodes"]: m["context_ms_per_token"] for m in calibration.measurements}
    assert all(
        m["context_ms_per_token"] == per_engine[m["draft_nodes"]] for m in calibration.measurements
    )
    assert all(v >= 0 for v in per_engine.values())
    steps = StepTable.from_calibration(calibration)
    assert steps.context_ms_per_token == per_engine
    assert steps.nodes(2) == calibration.schedule[1][2]
    assert [e[:2] for e in calibration.schedule] == [[1, 1], [2, 1024]]
    # Measured with the heads' drafting settings, as engines with these heads run them.
    assert calibration.drafting["copy"] is True and calibration.drafting["prune_below"] == 0.1
    assert not list(tmp_path.glob("*.partial"))


def test_calibrate_refuses_a_missing_heads_folder(tmp_path, capsys):
    from vllm_medusa.calibrate import main

    assert main(["--heads", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().out


def test_shipped_calibration_fits_the_shipped_heads(smollm2_dir):
    """The calibration shipped beside the heads is the one engines with those heads use (a
    changed heads config would set it aside with a warning)."""
    from transformers import AutoConfig

    from vllm_medusa.calibrate import calibration_file, cpu_kind, load_calibration, mismatch

    identity = model_identity(AutoConfig.from_pretrained(smollm2_dir))
    for dtype in ("float32", "bfloat16"):
        calibration = load_calibration(default_heads_path() / calibration_file(dtype))
        assert mismatch(calibration, default_heads_path(), identity, dtype, "cpu") is None
        assert calibration.machine["cpu_features"]  # for the warning on another kind of CPU
    # And one for CPUs with AVX2 only, where extra tokens in a step cost more.
    avx2 = load_calibration(default_heads_path() / calibration_file("float32", "avx2"))
    assert mismatch(avx2, default_heads_path(), identity, "float32", "cpu") is None
    assert avx2.machine["cpu_features"] == ["avx2"] and cpu_kind(["avx2"]) == "avx2"
