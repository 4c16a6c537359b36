"""Tree attention on vLLM's Triton backend, and the settings that serve trees on a GPU.

The backend's checks (`triton_checks.py`) run vLLM's Triton kernels through Triton's
interpreter, which must be switched on before vLLM is first imported: they run in one pytest
process of their own, and each is reported here under its own name.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest

CHECKS = Path(__file__).with_name("triton_checks.py")
CHECK_NAMES = [
    node.name
    for node in ast.parse(CHECKS.read_text()).body
    if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
]


@pytest.fixture(scope="module")
def check_results(tmp_path_factory) -> tuple[dict[str, list[tuple[str, str]]], str]:
    """Check name -> [(outcome, text)] per parameter set, and the run's output."""
    report = tmp_path_factory.mktemp("triton") / "report.xml"
    run = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest",
            f"--junitxml={report}", str(CHECKS),
        ],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=1200,
    )  # fmt: skip
    output = run.stdout[-4000:] + run.stderr[-4000:]
    results: dict[str, list[tuple[str, str]]] = {}
    if report.is_file():
        for case in ET.parse(report).iter("testcase"):
            outcome, text = "passed", ""
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = child.tag
                    text = (child.get("message") or "") + "\n" + (child.text or "")
            results.setdefault(case.get("name", "").split("[")[0], []).append((outcome, text))
    return results, output


@pytest.mark.parametrize("name", CHECK_NAMES)
def test_triton_backend(name, check_results):
    results, output = check_results
    outcomes = results.get(name)
    if not outcomes:  # a module-level skip reports no test cases by name
        skipped = results.get("triton_checks") or results.get("")
        if skipped and skipped[0][0] == "skipped":
            pytest.skip(skipped[0][1].strip())
        pytest.fail(f"{name} did not run:\n{output}")
    for outcome, text in outcomes:
        if outcome == "skipped":
            pytest.skip(text.strip())
        assert outcome == "passed", f"{name}: {outcome}\n{text}"


def _choose(device: str, backend, mode):
    from vllm_medusa.patches.vllm_config import tree_attention_settings

    return tree_attention_settings(device, backend, mode)


def test_gpu_trees_select_triton_and_leave_full_cuda_graphs():
    from vllm.config.compilation import CUDAGraphMode
    from vllm.v1.attention.backends.registry import AttentionBackendEnum as Backend

    triton = Backend.TRITON_ATTN
    assert _choose("cuda", None, CUDAGraphMode.FULL_AND_PIECEWISE) == (
        triton,
        CUDAGraphMode.PIECEWISE,
    )
    assert _choose("cuda", triton, CUDAGraphMode.FULL_DECODE_ONLY) == (
        triton,
        CUDAGraphMode.PIECEWISE,
    )
    assert _choose("cuda", triton, CUDAGraphMode.PIECEWISE) == (triton, CUDAGraphMode.PIECEWISE)
    assert _choose("cuda", None, CUDAGraphMode.NONE) == (triton, CUDAGraphMode.NONE)
    # The CPU engine verifies trees with its own attention: nothing changes there.
    assert _choose("cpu", Backend.CPU_ATTN, CUDAGraphMode.NONE) == (
        Backend.CPU_ATTN,
        CUDAGraphMode.NONE,
    )


def test_gpu_trees_refuse_other_attention_backends():
    from vllm.config.compilation import CUDAGraphMode
    from vllm.v1.attention.backends.registry import AttentionBackendEnum as Backend

    with pytest.raises(ValueError, match="FLASH_ATTN: set --attention-backend TRITON_ATTN"):
        _choose("cuda", Backend.FLASH_ATTN, CUDAGraphMode.FULL_AND_PIECEWISE)


def test_vllm_config_applies_the_tree_settings_only_for_trees():
    """The patched `VllmConfig` step, on a config as vLLM holds it for a GPU engine."""
    from vllm.config.compilation import CUDAGraphMode
    from vllm.config.vllm import VllmConfig
    from vllm.v1.attention.backends.registry import AttentionBackendEnum as Backend

    from vllm_medusa.plugin import register
    from vllm_medusa.tree import RESOLVED_ATTR

    register()

    def config(tree: bool):
        heads = SimpleNamespace(
            **{RESOLVED_ATTR: {"name": "t", "paths": [[0], [1]]} if tree else None}
        )
        spec = SimpleNamespace(
            method="medusa",
            draft_model_config=SimpleNamespace(hf_config=heads),
            uses_dynamic_speculative_decoding=lambda: False,
        )
        return SimpleNamespace(
            speculative_config=spec,
            device_config=SimpleNamespace(device_type="cuda"),
            attention_config=SimpleNamespace(backend=None),
            compilation_config=SimpleNamespace(cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE),
            use_v2_model_runner=False,
        )

    served = config(tree=True)
    VllmConfig._maybe_override_dynamic_sd_cudagraph_mode(served)
    assert served.attention_config.backend == Backend.TRITON_ATTN
    assert served.compilation_config.cudagraph_mode == CUDAGraphMode.PIECEWISE
    chain = config(tree=False)
    VllmConfig._maybe_override_dynamic_sd_cudagraph_mode(chain)
    assert chain.attention_config.backend is None
    assert chain.compilation_config.cudagraph_mode == CUDAGraphMode.FULL_AND_PIECEWISE
