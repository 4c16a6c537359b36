"""Head training, its output format, prompts, metrics and the train CLI, on synthetic data.

No base model and no engine: hidden states and the lm_head are random, and the targets come
from fixed random "teacher" heads, so a correct training loop must learn them.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from vllm_medusa.converters import load_checkpoint

import vllm_medusa.train as train_module
from vllm_medusa.cli import main as cli_main
from vllm_medusa.distill import (
    AnswerSequence,
    HeadData,
    answer_targets,
    load_prompts,
    recorded_head_data,
)
from vllm_medusa.metrics import SpecDecodeStats
from vllm_medusa.train import (
    HEADS_FILE,
    MedusaHeadStack,
    TrainConfig,
    _lr_factor,
    topk_accuracy,
    train_heads,
    write_fasterdecoding,
)

H, V, ROWS, NUM_HEADS = 32, 200, 256, 2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls on a busy machine: more threads only wait for each other (~50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _teacher(x: torch.Tensor, h: int) -> torch.Tensor:
    """A fixed random residual block: what head h should learn to be."""
    g = torch.Generator().manual_seed(100 + h)
    weight = torch.randn(H, H, generator=g) / H**0.5
    bias = torch.randn(H, generator=g) * 0.5
    return x + F.silu(x @ weight.T + bias)


@pytest.fixture(scope="module")
def lm_head() -> torch.Tensor:
    return torch.randn(V, H, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def data(lm_head) -> HeadData:
    """Column 0: the "base model's" next token; column h+1: head h's teacher's token."""
    x = torch.randn(ROWS, H, generator=torch.Generator().manual_seed(1))
    columns = [(x @ lm_head.T).argmax(-1)]
    columns += [(_teacher(x, h) @ lm_head.T).argmax(-1) for h in range(NUM_HEADS)]
    targets = torch.stack(columns, 1)
    targets[-5:, NUM_HEADS] = -1  # sequence ends: the last head has no target there
    return HeadData(hidden=x, targets=targets)


def _cfg(**overrides) -> TrainConfig:
    kwargs = dict(num_heads=NUM_HEADS, batch_size=64, lr=1e-2, schedule="constant", epochs=25)
    kwargs.update(overrides)
    return TrainConfig(**kwargs)


# --- learning -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "train_vocab, own_lm_head, num_layers",
    list(itertools.product(["batch", "data", "full"], [False, True], [1, 2])),
)
def test_heads_learn_synthetic_task(data, lm_head, train_vocab, own_lm_head, num_layers):
    cfg = _cfg(train_vocab=train_vocab, own_lm_head=own_lm_head, num_layers=num_layers)
    untrained = topk_accuracy(MedusaHeadStack(cfg, lm_head), data)
    model = train_heads(data, lm_head, cfg)
    acc = topk_accuracy(model, data)
    assert set(acc) == {"top1", "top5", "base_top1"}
    assert len(acc["top1"]) == len(acc["top5"]) == NUM_HEADS
    assert acc["base_top1"] == [1.0]  # column 0 is the lm_head's own argmax
    for h in range(NUM_HEADS):
        assert acc["top5"][h] >= acc["top1"][h]
        assert untrained["top1"][h] < 0.6  # the task is not solved by the identity start
        assert acc["top1"][h] >= 0.95, acc


def test_topk_accuracy_ignores_missing_targets(data, lm_head):
    """Rows whose target is -1 (sequence ended) count neither as hits nor as misses."""
    model = MedusaHeadStack(_cfg(), lm_head)
    acc = topk_accuracy(model, data, ks=(1, 5, 10), batch=50)
    assert len(acc["top10"]) == NUM_HEADS
    last = NUM_HEADS  # column of the last head
    valid = data.targets[:, last] >= 0
    logits = data.hidden[valid] @ lm_head.T  # zero-initialised heads are the identity
    expected = (logits.argmax(-1) == data.targets[valid, last]).float().mean().item()
    assert acc["top1"][-1] == pytest.approx(expected)


def test_too_few_target_columns_refused(data, lm_head):
    with pytest.raises(ValueError, match="targets for 2 heads, not 3"):
        train_heads(data, lm_head, _cfg(num_heads=3))


# --- output -------------------------------------------------------------------------------


def _vllm_layout_logits(tensors, h, num_layers, x, lm_head):
    """vLLM's Medusa head forward from the converted tensors (independent of train.py)."""
    y = x
    for i in range(num_layers):
        bias = tensors.get(f"blocks.{h}.layers.{i}.bias")
        y = y + F.silu(F.linear(y, tensors[f"blocks.{h}.layers.{i}.weight"], bias))
    weight = tensors.get(f"lm_heads.{h}.weight", lm_head)
    return y @ weight.T


@pytest.mark.parametrize("own_lm_head, num_layers", [(False, 1), (True, 2)])
def test_write_fasterdecoding_loads(tmp_path, data, lm_head, own_lm_head, num_layers):
    cfg = _cfg(own_lm_head=own_lm_head, num_layers=num_layers, max_steps=20)
    model = train_heads(data, lm_head, cfg)
    out = tmp_path / "heads"
    out.mkdir()
    (out / "stale.txt").write_text("replaced whole")
    write_fasterdecoding(model, out, "some/base", H, V, extra={"note": "test"})

    assert sorted(p.name for p in out.iterdir()) == ["config.json", HEADS_FILE]
    assert not list(tmp_path.glob(".heads.*"))  # no temporary folder left behind
    config = json.loads((out / "config.json").read_text())
    assert config["medusa_num_heads"] == NUM_HEADS and config["note"] == "test"
    assert (config.get("version") == "2") is (not own_lm_head)

    ckpt = load_checkpoint(out)
    assert ckpt.num_heads == NUM_HEADS
    assert ckpt.num_layers == num_layers
    assert ckpt.hidden_size == H
    assert ckpt.has_bias is True
    assert ckpt.original_lm_head is (not own_lm_head)
    assert ckpt.vocab_size == V
    x = data.hidden[:40]
    with torch.no_grad():
        states = model.head_states(x)
        for h in range(NUM_HEADS):
            expected = states[h] @ model.lm_head_weight(h).T
            got = _vllm_layout_logits(ckpt.tensors, h, num_layers, x, lm_head)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            assert (f"lm_heads.{h}.weight" in ckpt.tensors) is own_lm_head


# --- resume -------------------------------------------------------------------------------


class _Interrupted(Exception):
    pass


def test_resume_matches_uninterrupted_run(tmp_path, monkeypatch, data, lm_head):
    """A run stopped after its first epoch and resumed ends with the weights of a run that
    was never stopped (same batches, same optimiser state, same learning rates)."""
    cfg = _cfg(epochs=2, schedule="cosine", warmup_ratio=0.25)
    steps_per_epoch = ROWS // cfg.batch_size
    uninterrupted = train_heads(data, lm_head, cfg)

    state = tmp_path / "train_state.pt"
    save_state = train_module._save_state

    def save_then_stop(path, model, optimizer, step, cfg_):
        save_state(path, model, optimizer, step, cfg_)
        assert step == steps_per_epoch
        raise _Interrupted  # killed right after the first epoch's save

    monkeypatch.setattr(train_module, "_save_state", save_then_stop)
    with pytest.raises(_Interrupted):
        train_heads(data, lm_head, cfg, state_path=state)
    assert torch.load(state, weights_only=True)["step"] == steps_per_epoch

    saved_at = []

    def record(path, model, optimizer, step, cfg_):
        saved_at.append(step)
        save_state(path, model, optimizer, step, cfg_)

    monkeypatch.setattr(train_module, "_save_state", record)
    resumed = train_heads(data, lm_head, cfg, state_path=state, resume=True)
    assert saved_at == [2 * steps_per_epoch] * 2  # only the second epoch ran (then final save)
    expected = uninterrupted.state_dict()
    got = resumed.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.allclose(got[key], expected[key]), key
    assert torch.load(state, weights_only=True)["step"] == 2 * steps_per_epoch

    # A finished state resumes to the same weights without further steps.
    again = train_heads(data, lm_head, cfg, state_path=state, resume=True)
    for key, value in again.state_dict().items():
        assert torch.equal(value, got[key]), key


@pytest.mark.parametrize("changed", [{"lr": 5e-3}, {"num_layers": 2}, {"seed": 1}])
def test_resume_with_other_settings_refused(tmp_path, data, lm_head, changed):
    state = tmp_path / "train_state.pt"
    train_heads(data, lm_head, _cfg(max_steps=4), state_path=state)
    with pytest.raises(ValueError, match="other settings"):
        train_heads(data, lm_head, _cfg(max_steps=4, **changed), state_path=state, resume=True)


# --- configuration ------------------------------------------------------------------------


def test_loss_weights():
    assert TrainConfig().loss_weights() == pytest.approx([1.0, 0.8, 0.64, 0.512])
    cfg = TrainConfig(num_heads=3, head_weight_decay=0.5)
    assert cfg.loss_weights() == pytest.approx([1.0, 0.5, 0.25])
    assert TrainConfig(num_heads=2, head_weights=[2.0, 1.0]).loss_weights() == [2.0, 1.0]
    with pytest.raises(ValueError, match="head_weights has 2 values for 4 heads"):
        TrainConfig(head_weights=[1.0, 2.0]).loss_weights()


def test_lr_schedules():
    total, warmup = 110, 10
    for schedule in ("cosine", "linear", "constant"):
        # Linear warm-up, the same for every schedule.
        assert _lr_factor(0, total, warmup, schedule) == pytest.approx(0.1)
        assert _lr_factor(4, total, warmup, schedule) == pytest.approx(0.5)
        assert _lr_factor(9, total, warmup, schedule) == pytest.approx(1.0)
        assert _lr_factor(10, total, warmup, schedule) == pytest.approx(1.0)
    assert _lr_factor(35, total, warmup, "cosine") == pytest.approx(
        0.5 * (1 + math.cos(math.pi / 4))
    )
    assert _lr_factor(60, total, warmup, "cosine") == pytest.approx(0.5)
    assert _lr_factor(110, total, warmup, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert _lr_factor(35, total, warmup, "linear") == pytest.approx(0.75)
    assert _lr_factor(60, total, warmup, "linear") == pytest.approx(0.5)
    assert _lr_factor(60, total, warmup, "constant") == 1.0
    assert _lr_factor(109, total, warmup, "constant") == 1.0
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        _lr_factor(50, total, warmup, "step")


def test_unknown_train_vocab_refused(data, lm_head):
    with pytest.raises(ValueError, match="unknown train_vocab"):
        train_heads(data, lm_head, _cfg(train_vocab="some", max_steps=1))


# --- prompts ------------------------------------------------------------------------------


def test_builtin_prompts():
    prompts = load_prompts()
    assert len(prompts) >= 700
    assert {p.split for p in prompts} == {"train", "heldout"}
    assert all(p.turns and all(isinstance(t, str) and t for t in p.turns) for p in prompts)
    assert len({p.id for p in prompts}) == len(prompts)
    assert len(load_prompts("builtin")) == len(prompts)
    held = load_prompts(split="heldout")
    assert held and all(p.split == "heldout" for p in held)
    assert len(held) + len(load_prompts(split="train")) == len(prompts)


def _write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_user_prompt_files(tmp_path):
    turns = _write_lines(
        tmp_path / "turns.jsonl",
        [
            {"question_id": 81, "category": "writing", "turns": ["First?", "And then?"]},
            "",  # blank lines are skipped
            {"id": "x", "split": "heldout", "turns": ["Held out."]},
        ],
    )
    prompts = load_prompts(turns)
    assert [(p.id, p.category, p.split, p.turns) for p in prompts] == [
        ("81", "writing", "train", ["First?", "And then?"]),
        ("x", "", "heldout", ["Held out."]),
    ]
    assert [p.id for p in load_prompts(str(turns), split="heldout")] == ["x"]

    plain = _write_lines(tmp_path / "plain.jsonl", [{"prompt": "Hello?"}, {"prompt": "Bye."}])
    prompts = load_prompts(plain)
    assert [p.turns for p in prompts] == [["Hello?"], ["Bye."]]
    assert [p.id for p in prompts] == ["1", "2"]  # line numbers when there is no id
    assert {p.split for p in prompts} == {"train"}
    with pytest.raises(ValueError, match="no prompts in split 'heldout'"):
        load_prompts(plain, split="heldout")


@pytest.mark.parametrize(
    "bad",
    ["{not json", json.dumps({"text": "no prompt key"}), json.dumps({"turns": []}),
     json.dumps({"turns": ["ok", 3]}), json.dumps({"prompt": ""}), json.dumps(["a list"])],
)  # fmt: skip
def test_malformed_prompt_line(tmp_path, bad):
    path = _write_lines(tmp_path / "bad.jsonl", [{"prompt": "fine"}, {"turns": ["fine"]}, bad])
    with pytest.raises(ValueError) as info:
        load_prompts(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: ")
    assert "\n" not in message


# --- rows from recorded answers ---------------------------------------------------------------


def test_answer_targets():
    ids = torch.tensor([10, 11, 12, 13, 14])  # prompt 10 11, answer 12 13 14
    targets = answer_targets(ids, start=1, max_heads=2)
    assert targets.tolist() == [[12, 13, 14], [13, 14, -1], [14, -1, -1]]


def _answer(prompt_len: int, answer_len: int, hidden_rows: int) -> AnswerSequence:
    return AnswerSequence(
        prompt_id="p",
        split="train",
        token_ids=list(range(prompt_len + answer_len)),
        answer_start=prompt_len,
        hidden=torch.arange(float(hidden_rows))[:, None].expand(hidden_rows, H),
    )


def test_recorded_head_data():
    """Row i of an answer is the hidden state that produced answer token i: its column 0
    target is that token."""
    data = recorded_head_data([_answer(3, 4, 4), _answer(2, 1, 1)], max_heads=2)
    assert data.hidden.shape == (5, H)
    assert data.hidden[:, 0].tolist() == [0, 1, 2, 3, 0]
    assert data.targets.tolist() == [
        [3, 4, 5],
        [4, 5, 6],
        [5, 6, -1],
        [6, -1, -1],
        [2, -1, -1],
    ]


def test_recorded_head_data_refuses_misaligned_rows():
    with pytest.raises(RuntimeError, match="3 hidden states for 4 answer tokens"):
        recorded_head_data([_answer(3, 4, 3)])
    missing = _answer(3, 4, 4)
    missing.hidden = None
    with pytest.raises(ValueError, match="no recorded hidden states"):
        recorded_head_data([missing])


# --- metrics ------------------------------------------------------------------------------


def test_spec_decode_stats():
    stats = SpecDecodeStats(10, 40, 25, [9, 7, 5, 4])
    assert stats.mean_acceptance_length == pytest.approx(3.5)  # 25 accepted + 10 bonus / 10
    assert stats.acceptance_rate == pytest.approx(0.625)
    empty = SpecDecodeStats()
    assert empty.mean_acceptance_length == 0.0 and empty.acceptance_rate == 0.0

    delta = stats.minus(SpecDecodeStats(4, 16, 8, [3, 2]))
    assert delta == SpecDecodeStats(6, 24, 17, [6, 5, 5, 4])
    assert delta.mean_acceptance_length == pytest.approx(1 + 17 / 6)
    assert stats.minus(empty) == stats
    assert SpecDecodeStats(1, 4, 1, [1]).minus(SpecDecodeStats(0, 0, 0, [0, 0, 0])) == (
        SpecDecodeStats(1, 4, 1, [1, 0, 0])
    )
    d = stats.as_dict()
    assert d["mean_acceptance_length"] == 3.5 and d["acceptance_rate"] == 0.625
    assert d["accepted_per_position"] == [9, 7, 5, 4]


# --- CLI ----------------------------------------------------------------------------------


def test_cli_rejects_wrong_head_weights_before_work(tmp_path, monkeypatch, capsys):
    def no_work(*args, **kwargs):
        raise AssertionError("training started despite invalid --head-weights")

    monkeypatch.setattr(train_module, "train_from_prompts", no_work)
    monkeypatch.setattr(train_module, "build_head_data", no_work)
    out = tmp_path / "heads"
    code = cli_main(["train", "--out", str(out), "--head-weights", "1", "2"])
    assert code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("vllm-medusa train: error: ")
    assert "head_weights has 2 values for 4 heads" in lines[0]
    assert not out.exists() and not out.with_name("heads.data").exists()
