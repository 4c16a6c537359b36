"""Checkpoint converter: FasterDecoding formats -> vLLM layout, numerically checked."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import vllm_medusa.converters.convert as convert_module
from fasterdecoding_fixtures import (
    heads_config,
    make_heads,
    reference_outputs,
    save_base_model,
    save_full_model,
    save_heads_folder,
    write_json,
)
from safetensors.torch import load_file, save_file
from vllm_medusa.converters import (
    ConversionError,
    MedusaCheckpoint,
    convert_checkpoint,
    detect_format,
    load_checkpoint,
    verify_conversion,
)
from vllm_medusa.converters.cli import main
from vllm_medusa.converters.fasterdecoding import MedusaConfigWarning

H, V = 32, 120


def converted_outputs(
    dst: Path, x: torch.Tensor, lm_head: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """vLLM's Medusa forward, written independently from the converter's code."""
    config = json.loads((dst / "config.json").read_text())
    tensors = {k: v.float() for k, v in load_file(str(dst / "model.safetensors")).items()}
    outs = []
    for h in range(config["num_heads"]):
        y = x
        for i in range(config["num_hidden_layers"]):
            bias = tensors.get(f"blocks.{h}.layers.{i}.bias")
            y = y + F.silu(F.linear(y, tensors[f"blocks.{h}.layers.{i}.weight"], bias))
        if not config["original_lm_head"]:
            y = y @ tensors[f"lm_heads.{h}.weight"].T
        elif lm_head is not None:
            y = y @ lm_head.T
        outs.append(y)
    return outs


def assert_same(ref: list[torch.Tensor], out: list[torch.Tensor], atol: float = 1e-5) -> None:
    assert len(ref) == len(out)
    for a, b in zip(ref, out, strict=True):
        torch.testing.assert_close(b, a, atol=atol, rtol=atol)


def hidden_states(rows: int = 8, hidden: int = H) -> torch.Tensor:
    return torch.randn(rows, hidden, generator=torch.Generator().manual_seed(123))


def assert_clean_failure(capsys, dst: Path, argv: list[str], needle: str, code: int = 2) -> str:
    """main() failed with one stderr line mentioning needle, leaving no DST or temp folder."""
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("vllm-medusa convert: error: "), err
    assert needle in err[0], err[0]
    assert not dst.exists()
    if dst.parent.exists():
        assert [p.name for p in dst.parent.iterdir() if p.name.startswith(".")] == []
    return err[0]


# --- heads-only folders -------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
@pytest.mark.parametrize(("num_heads", "num_layers"), [(1, 1), (3, 1), (5, 2), (2, 3)])
def test_heads_only_v1(tmp_path, fmt, num_heads, num_layers):
    heads = make_heads(H, V, num_heads, num_layers)
    src = save_heads_folder(tmp_path / "src", heads, heads_config(num_heads, num_layers), fmt)
    assert detect_format(src) == "fasterdecoding-heads"
    dst = tmp_path / "dst"
    ckpt = convert_checkpoint(src, dst)
    assert isinstance(ckpt, MedusaCheckpoint)
    config = json.loads((dst / "config.json").read_text())
    assert config == {
        "model_type": "medusa",
        "architectures": ["MedusaModel"],
        "hidden_size": H,
        "vocab_size": V,
        "num_heads": num_heads,
        "num_hidden_layers": num_layers,
        "medusa_fc_bias": True,
        "original_lm_head": False,
        "truncated_vocab_size": V,
        "torch_dtype": "float32",
        "base_model_name_or_path": "lmsys/vicuna-7b-v1.3",
    }
    keys = set(load_file(str(dst / "model.safetensors")))
    assert len(keys) == num_heads * (2 * num_layers + 1)
    x = hidden_states()
    assert_same(reference_outputs(heads, x), converted_outputs(dst, x))
    assert verify_conversion(src, dst) == 0.0


def test_medusa_tree_travels_with_converted_heads(tmp_path):
    tree = [[0], [1], [0, 0]]
    heads = make_heads(H, V, 2, 1, own_lm_head=False)
    config = heads_config(2, 1, version="2", medusa_choices=tree)
    src = save_heads_folder(tmp_path / "src", heads, config, "safetensors")
    convert_checkpoint(src, tmp_path / "vllm")
    assert json.loads((tmp_path / "vllm" / "config.json").read_text())["medusa_choices"] == tree
    # And again from the vLLM layout.
    convert_checkpoint(tmp_path / "vllm", tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["medusa_choices"] == tree


def test_safetensors_source_really_dedups_shared_blocks(tmp_path):
    heads = make_heads(H, V, 2, 3)
    src = save_heads_folder(tmp_path / "src", heads, heads_config(2, 3), "safetensors")
    stored = set(load_file(str(src / "medusa_lm_head.safetensors")))
    assert "0.1.linear.weight" not in stored and "0.3.weight" in stored
    ckpt = load_checkpoint(src)
    assert ckpt.num_layers == 3
    torch.testing.assert_close(
        ckpt.tensors["blocks.1.layers.2.weight"], ckpt.tensors["blocks.1.layers.0.weight"]
    )


def test_layer_count_from_config_or_max_index_for_v2(tmp_path):
    heads = make_heads(H, V, 2, 3, own_lm_head=False)
    src = save_heads_folder(tmp_path / "a", heads, heads_config(2, 3), "safetensors")
    assert load_checkpoint(src).num_layers == 3  # only layer 0 stored: config says 3
    src = save_heads_folder(tmp_path / "b", heads, heads_config(2, None), "pt")
    assert load_checkpoint(src).num_layers == 3  # no config value: largest index + 1


def test_config_undercounting_heads_warns(tmp_path, capsys):
    heads = make_heads(H, V, 5, 1)
    src = save_heads_folder(tmp_path / "src", heads, heads_config(2, 1))
    with pytest.warns(MedusaConfigWarning, match="medusa_num_heads=2"):
        assert load_checkpoint(src).num_heads == 5
    assert main([str(src), str(tmp_path / "dst")]) == 0
    out = capsys.readouterr()
    assert "warning: " in out.err and "5 heads" in out.err
    assert "converted 5 heads x 1 layers" in out.out
    assert json.loads((tmp_path / "dst" / "config.json").read_text())["num_heads"] == 5


def test_version2_without_base_model_omits_vocab(tmp_path, capsys):
    heads = make_heads(H, V, 3, 2, own_lm_head=False)
    src = save_heads_folder(tmp_path / "src", heads, heads_config(3, 2, version="2"))
    dst = tmp_path / "dst"
    assert main([str(src), str(dst), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "hidden states before the lm_head" in out and "vocab from target model" in out
    config = json.loads((dst / "config.json").read_text())
    assert config["original_lm_head"] is True
    assert "vocab_size" not in config and "truncated_vocab_size" not in config
    assert not any(k.startswith("lm_heads") for k in load_file(str(dst / "model.safetensors")))
    x = hidden_states()
    assert_same(reference_outputs(heads, x), converted_outputs(dst, x))


@pytest.mark.parametrize("tied", [False, True])
def test_version2_with_base_model_and_embedded_lm_head(tmp_path, capsys, tied):
    heads = make_heads(H, V, 2, 1, own_lm_head=False)
    src = save_heads_folder(tmp_path / "src", heads, heads_config(2, 1), "safetensors")
    lm_head = save_base_model(tmp_path / "base", H, V, tied=tied)
    dst = tmp_path / "dst"
    argv = [str(src), str(dst), "--base-model", str(tmp_path / "base"), "--embed-lm-head"]
    assert main([*argv, "--verify"]) == 0
    assert "logits through the base model's lm_head" in capsys.readouterr().out
    config = json.loads((dst / "config.json").read_text())
    assert config["vocab_size"] == V and config["original_lm_head"] is True
    stored = load_file(str(dst / "model.safetensors"))
    torch.testing.assert_close(stored["lm_heads.0.weight"], lm_head)
    assert "lm_heads.1.weight" not in stored
    x = hidden_states()
    assert_same(reference_outputs(heads, x, lm_head), converted_outputs(dst, x, lm_head))
    # The written folder reads back (the plugin's loader), embedded lm_head included.
    again = load_checkpoint(dst)
    assert again.original_lm_head and again.vocab_size == V


def test_dtype_cast_and_verify(tmp_path, capsys):
    heads = make_heads(H, V, 3, 2)
    src = save_heads_folder(tmp_path / "src", heads, heads_config(3, 2))
    dst = tmp_path / "dst"
    assert main([str(src), str(dst), "--dtype", "bfloat16", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "verify: max |difference|" in out and "own lm_heads" in out
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == "bfloat16"
    stored = load_file(str(dst / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in stored.values())
    x = hidden_states()
    assert_same(reference_outputs(heads, x), converted_outputs(dst, x), atol=0.1)
    assert 0 < verify_conversion(src, dst) < 0.1


def test_vllm_layout_reads_back_and_reconverts(tmp_path):
    heads = make_heads(H, V, 2, 2)
    src = save_heads_folder(tmp_path / "src", heads, heads_config(2, 2))
    first, second = tmp_path / "first", tmp_path / "second"
    convert_checkpoint(src, first)
    assert detect_format(first) == "vllm"
    ckpt = load_checkpoint(first)
    assert (ckpt.num_heads, ckpt.num_layers, ckpt.hidden_size, ckpt.vocab_size) == (2, 2, H, V)
    assert ckpt.has_bias and not ckpt.original_lm_head
    assert ckpt.to_config("float32") == json.loads((first / "config.json").read_text())
    convert_checkpoint(first, second, dtype="float16")
    x = hidden_states()
    assert_same(reference_outputs(heads, x), converted_outputs(second, x), atol=2e-2)
    assert verify_conversion(first, second) < 2e-2


# --- full Medusa-2 model folders ----------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("own_lm_head", [True, False])
def test_full_model_sharded(tmp_path, fmt, own_lm_head):
    heads = make_heads(H, V, 4, 2, own_lm_head=own_lm_head)
    src = tmp_path / "src"
    lm_head = save_full_model(
        src, heads, H, V, fmt=fmt, config_extra={"medusa_num_heads": 4, "medusa_num_layers": 2}
    )
    assert detect_format(src) == "fasterdecoding-full"
    dst = tmp_path / "dst"
    ckpt = convert_checkpoint(src, dst)
    assert (ckpt.num_heads, ckpt.num_layers, ckpt.vocab_size) == (4, 2, V)
    assert ckpt.original_lm_head is (not own_lm_head)
    keys = set(load_file(str(dst / "model.safetensors")))
    assert not any(k.startswith(("model.", "lm_head.")) for k in keys)
    x = hidden_states()
    head = None if own_lm_head else lm_head
    assert_same(reference_outputs(heads, x, head), converted_outputs(dst, x, head))


def test_full_model_reads_only_medusa_shards(tmp_path):
    heads = make_heads(H, V, 2, 1)
    src = tmp_path / "src"
    save_full_model(src, heads, H, V, fmt="safetensors")
    (src / "model-00001-of-00002.safetensors").write_bytes(b"garbage")  # base-only shard
    convert_checkpoint(src, tmp_path / "dst")


def test_full_model_unsharded_bin(tmp_path):
    heads = make_heads(H, V, 2, 1)
    src = tmp_path / "src"
    save_full_model(src, heads, H, V, fmt="bin", sharded=False)
    dst = tmp_path / "dst"
    convert_checkpoint(src, dst)
    x = hidden_states()
    assert_same(reference_outputs(heads, x), converted_outputs(dst, x))


# --- errors -------------------------------------------------------------------------------


def _heads_src(tmp_path: Path, **kw) -> Path:
    heads = make_heads(H, V, 2, 1, **kw)
    return save_heads_folder(tmp_path / "src", heads, heads_config(2, 1))


def _tamper(src: Path, edit) -> Path:
    path = src / "medusa_lm_head.pt"
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)
    return src


def _missing_src(tmp_path):
    return tmp_path / "nope"


def _file_src(tmp_path):
    (tmp_path / "file").write_text("x")
    return tmp_path / "file"


def _no_config(tmp_path):
    src = _heads_src(tmp_path)
    (src / "config.json").unlink()
    return src


def _no_weights(tmp_path):
    src = _heads_src(tmp_path)
    (src / "medusa_lm_head.pt").unlink()
    return src


def _unknown_keys(tmp_path):
    return _tamper(_heads_src(tmp_path), lambda s: s.update(extra=torch.zeros(1)))


def _hidden_mismatch(tmp_path):
    return _tamper(
        _heads_src(tmp_path), lambda s: s.update({"1.0.linear.weight": torch.zeros(8, 8)})
    )


def _vocab_mismatch(tmp_path):
    return _tamper(_heads_src(tmp_path), lambda s: s.update({"1.1.weight": torch.zeros(V + 1, H)}))


def _bad_bias(tmp_path):
    return _tamper(
        _heads_src(tmp_path), lambda s: s.update({"0.0.linear.bias": torch.zeros(H + 2)})
    )


def _depth_mismatch(tmp_path):
    def edit(state):
        state["1.2.weight"] = state.pop("1.1.weight")

    return _tamper(_heads_src(tmp_path), edit)


def _missing_head(tmp_path):
    heads = make_heads(H, V, 3, 1)
    src = save_heads_folder(tmp_path / "src", heads, heads_config(3, 1))
    return _tamper(src, lambda s: [s.pop(k) for k in list(s) if k.startswith("1.")])


def _truncated_safetensors(tmp_path):
    heads = make_heads(H, V, 2, 1)
    src = save_heads_folder(tmp_path / "src", heads, heads_config(2, 1), "safetensors")
    path = src / "medusa_lm_head.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    return src


def _truncated_pt(tmp_path):
    src = _heads_src(tmp_path)
    path = src / "medusa_lm_head.pt"
    path.write_bytes(path.read_bytes()[:200])
    return src


def _pickled_object(tmp_path):
    src = _heads_src(tmp_path)
    torch.save(
        OrderedDict(weight=torch.zeros(2), saved=datetime.datetime(2024, 1, 1)),
        src / "medusa_lm_head.pt",
    )
    return src


def _plain_model(tmp_path):
    src = tmp_path / "src"
    save_base_model(src, H, V)
    return src


def _missing_shard(tmp_path):
    src = tmp_path / "src"
    save_full_model(src, make_heads(H, V, 2, 1), H, V)
    (src / "model-00002-of-00002.safetensors").unlink()
    return src


def _full_config_mismatch(tmp_path):
    src = tmp_path / "src"
    save_full_model(src, make_heads(H, V, 2, 1), H, V, config_extra={"hidden_size": H * 2})
    return src


ERROR_CASES = {
    "missing src": (_missing_src, "does not exist"),
    "src is a file": (_file_src, "is not a folder"),
    "no config": (_no_config, "no config.json"),
    "no weights": (_no_weights, "no weights"),
    "unknown keys": (_unknown_keys, "unexpected tensors extra"),
    "hidden size": (_hidden_mismatch, "head 1 layer 0 weight has shape (8, 8)"),
    "vocab": (_vocab_mismatch, "lm_head of head 1 has shape (121, 32)"),
    "bias length": (_bad_bias, "bias has shape (34,)"),
    "depths": (_depth_mismatch, "different depths"),
    "missing head": (_missing_head, "head 1 is missing"),
    "truncated safetensors": (_truncated_safetensors, "truncated or corrupt"),
    "truncated pt": (_truncated_pt, "truncated or corrupt"),
    "pickled object": (_pickled_object, "weights_only"),
    "plain model": (_plain_model, "holds no Medusa heads"),
    "missing shard": (_missing_shard, "which is missing"),
    "full config": (_full_config_mismatch, "hidden_size=64"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_source_fails_cleanly(tmp_path, capsys, case):
    make, needle = ERROR_CASES[case]
    src = make(tmp_path)
    dst = tmp_path / "out" / "dst"
    assert_clean_failure(capsys, dst, [str(src), str(dst)], needle)
    with pytest.raises(ConversionError):
        convert_checkpoint(src, dst)


def test_pickle_refused_names_the_object(tmp_path, capsys):
    src = _pickled_object(tmp_path)
    line = assert_clean_failure(capsys, tmp_path / "dst", [str(src), str(tmp_path / "dst")], "")
    assert "datetime" in line and "never run code" in line


@pytest.mark.parametrize(
    ("hidden", "vocab", "own", "needle"),
    [(H * 2, V, True, "hidden_size=64"), (H, V + 5, True, "vocab_size=125")],
)
def test_base_model_mismatch(tmp_path, capsys, hidden, vocab, own, needle):
    src = _heads_src(tmp_path, own_lm_head=own)
    save_base_model(tmp_path / "base", hidden, vocab)
    dst = tmp_path / "out" / "dst"
    assert_clean_failure(
        capsys, dst, [str(src), str(dst), "--base-model", str(tmp_path / "base")], needle
    )


def test_embed_lm_head_misuse(tmp_path, capsys):
    src = _heads_src(tmp_path)
    dst = tmp_path / "out" / "dst"
    assert_clean_failure(capsys, dst, [str(src), str(dst), "--embed-lm-head"], "--base-model")
    save_base_model(tmp_path / "base", H, V)
    argv = [str(src), str(dst), "--embed-lm-head", "--base-model", str(tmp_path / "base")]
    assert_clean_failure(capsys, dst, argv, "drop the flag")


def test_existing_dst_and_force(tmp_path, capsys):
    src = _heads_src(tmp_path)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "old.txt").write_text("keep me")
    assert main([str(src), str(dst)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (dst / "old.txt").exists()
    # --force with a failing conversion keeps the old folder untouched.
    assert main([str(tmp_path / "nope"), str(dst), "--force"]) == 2
    assert (dst / "old.txt").exists()
    assert main([str(src), str(dst), "--force"]) == 0
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_dst_may_not_overwrite_src(tmp_path, capsys):
    src = _heads_src(tmp_path)
    assert main([str(src), str(src), "--force"]) == 2
    assert "would overwrite SRC" in capsys.readouterr().err
    assert (src / "medusa_lm_head.pt").exists()


def test_failed_verification_writes_nothing(tmp_path, capsys, monkeypatch):
    real_write = convert_module.write_folder

    def corrupting_write(checkpoint, folder, dtype):
        checkpoint.tensors["blocks.0.layers.0.weight"] = torch.ones(H, H)
        real_write(checkpoint, folder, dtype)

    monkeypatch.setattr(convert_module, "write_folder", corrupting_write)
    src = _heads_src(tmp_path)
    dst = tmp_path / "out" / "dst"
    assert_clean_failure(capsys, dst, [str(src), str(dst), "--verify"], "verification failed", 1)


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["only-src"])
    assert exc.value.code == 2
    assert "vllm-medusa convert: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["a", "b", "--dtype", "float64"])


def test_module_entry_point(tmp_path):
    src = _heads_src(tmp_path)
    dst = tmp_path / "dst"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "vllm_medusa.converters", str(src), str(dst), "--verify"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "converted 2 heads x 1 layers, hidden 32, vocab 120, bias yes" in done.stdout
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("vllm-medusa convert: error:")


def test_vllm_layout_with_unknown_key_is_refused(tmp_path):
    src = _heads_src(tmp_path)
    dst = tmp_path / "dst"
    convert_checkpoint(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    tensors["blocks.0.extra"] = torch.zeros(1)
    save_file(tensors, str(dst / "model.safetensors"))
    with pytest.raises(ConversionError, match="unexpected tensors blocks.0.extra"):
        load_checkpoint(dst)
    write_json(dst / "config.json", {"model_type": "medusa"})
    with pytest.raises(ConversionError):
        load_checkpoint(dst)
