"""`vllm-medusa bench` end to end: real engines in their own processes, taking turns.

The benchmark is how every speed figure of the project is measured, so what it reports must
hold: identical greedy outputs where they are identical, acceptance counted from the
engine's own metrics, one row per configuration, temperature and batch size.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_medusa.benchmark import _worker_command, build_parser
from vllm_medusa.benchmark import main as bench_main


def test_bench_reports_every_cell_against_no_speculation(smollm2_dir: Path, tmp_path: Path):
    out = tmp_path / "bench.json"
    argv = ["--model", str(smollm2_dir), "--num-prompts", "2", "--max-tokens", "12"]
    argv += ["--runs", "1", "--batch-sizes", "1", "2", "--dtype", "float32"]
    argv += ["--configs", "none", "plugin-chain", "--out", str(out)]
    assert bench_main(argv) == 0
    rows = json.loads(out.read_text())["results"]
    cells = {(r["config"], r["batch"]): r for r in rows}
    assert set(cells) == {(c, b) for c in ("none", "plugin-chain") for b in (1, 2)}
    for batch in (1, 2):
        none, chain = cells[("none", batch)], cells[("plugin-chain", batch)]
        assert none["speedup"] == 1.0 and none["tok_s_median"] > 0
        # The speedup comes from the unrounded medians; tok/s is reported to 0.01.
        ratio = chain["tok_s_median"] / none["tok_s_median"]
        assert chain["speedup"] == pytest.approx(ratio, abs=0.005)
        # float32 greedy: the chain's outputs are no speculation's, token for token.
        assert chain["identical_to_none"] is True
        assert chain["mean_acceptance_length"] >= 1.0
    assert cells[("plugin-chain", 1)]["acceptance_by_category"]
    # Each cell starts from an empty prefix cache, as a user's new prompts would: its first
    # prompt finds nothing cached, though every cell asks the same prompts (and the warm-up
    # the first of them).
    runs = json.loads(out.read_text())["runs"]
    for records in runs.values():
        assert len(records) == 2
        assert all(r["cached_tokens"][0] == 0 for r in records)
        assert all(len(r["cached_tokens"]) == len(r["prompt_tokens"]) == 2 for r in records)


def test_bench_compiled_reaches_every_engine(tmp_path: Path):
    args = build_parser().parse_args(["--compiled", "--configs", "none"])
    assert "--compiled" in _worker_command(args, "none", "HEADS", tmp_path / "w.json")
    args = build_parser().parse_args(["--configs", "none"])
    assert "--compiled" not in _worker_command(args, "none", "HEADS", tmp_path / "w.json")
