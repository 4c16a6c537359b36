"""The few-rows float32 kernel: bitwise vLLM's CPU product for every row count, refused where it
is not, and swapped in by the patch through vLLM's own weight processing."""

from __future__ import annotations

import pytest
import torch
from vllm import _custom_ops as ops

from vllm_medusa import cpu_gemm
from vllm_medusa.patches import cpu_gemm as cpu_gemm_patch

pytestmark = pytest.mark.skipif(not ops._supports_onednn, reason="vLLM build without oneDNN")
# Where the kernel is not used (AVX-512 CPUs: oneDNN is as cheap there for a few rows, and its
# reduction order differs for some shapes), whether it reproduces oneDNN is not a promise.
on_kernel_hosts = pytest.mark.skipif(
    not cpu_gemm.suits_host(), reason="the few-rows kernel runs only on CPUs without AVX-512"
)


def _onednn(weight: torch.Tensor):
    """vLLM's CPU product for a float32 layer, as `dispatch_cpu_unquantized_gemm` builds it."""
    handle = ops.create_onednn_mm(weight.t(), 32)
    return lambda x, w, bias: ops.onednn_mm(handle, x, bias)


# SmolLM2's shapes (qkv, o, gate_up, down), a reduction longer than two of oneDNN's blocks,
# and a narrow layer.
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (64, 2500), (16, 40)]


@on_kernel_hosts
@pytest.mark.parametrize("shape", SHAPES)
def test_products_are_bitwise_vllms_for_every_row_count(shape):
    torch.manual_seed(0)
    weight = torch.randn(*shape)
    bias = torch.randn(shape[0])
    for layer_bias in (None, bias):
        reference = _onednn(weight)
        packed = cpu_gemm.replicate(weight, layer_bias, reference)
        assert packed is not None
        for rows in (1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 17, 100):
            x = torch.randn(rows, shape[1])
            assert torch.equal(packed(x, layer_bias), reference(x, weight, layer_bias)), rows


@on_kernel_hosts
def test_inputs_of_any_layout_give_the_same_bits():
    torch.manual_seed(1)
    weight = torch.randn(96, 200)
    reference = _onednn(weight)
    packed = cpu_gemm.replicate(weight, None, reference)
    x = torch.randn(2, 5, 400)[:, :, ::2]  # [2, 5, 200], not contiguous
    out = packed(x)
    assert out.shape == (2, 5, 96)
    flat = x.reshape(10, 200).contiguous()
    assert torch.equal(out.reshape(10, 96), reference(flat, weight, None))
    assert packed(torch.empty(0, 200)).shape == (0, 96)


def test_products_it_cannot_reproduce_are_left_alone():
    torch.manual_seed(2)
    weight = torch.randn(64, 300)

    def in_float64(x, w, bias):  # another rounding than a float32 run of fused multiply-adds
        return (x.double() @ w.double().t()).float()

    assert cpu_gemm.replicate(weight, None, in_float64) is None
    # Dtypes and widths the kernel does not take.
    assert cpu_gemm.replicate(weight.bfloat16(), None, _onednn(weight)) is None
    narrow = torch.randn(40, 300)
    assert cpu_gemm.replicate(narrow, None, _onednn(narrow)) is None


def _processed_layer(weight: torch.Tensor) -> torch.nn.Module:
    """A layer through vLLM's own unquantized weight processing (as the target's layers)."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
    layer.method = UnquantizedLinearMethod()
    layer.method.process_weights_after_loading(layer)
    return layer


@on_kernel_hosts
def test_the_patch_swaps_the_product_in_medusa_engines_unless_told(monkeypatch):
    cpu_gemm_patch.apply()
    torch.manual_seed(3)
    weight = torch.randn(128, 576)
    x = torch.randn(5, 576)
    expected = _onednn(weight)(x, weight, None)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # a one-thread CPU worker

    monkeypatch.setattr(cpu_gemm_patch, "_medusa_engine", lambda: False)
    plain = _processed_layer(weight)
    monkeypatch.setattr(cpu_gemm_patch, "_medusa_engine", lambda: True)
    swapped = _processed_layer(weight)
    monkeypatch.setenv(cpu_gemm_patch.ENV, "0")
    switched_off = _processed_layer(weight)
    monkeypatch.setattr(cpu_gemm_patch, "_medusa_engine", lambda: False)
    monkeypatch.setenv(cpu_gemm_patch.ENV, "all")
    everywhere = _processed_layer(weight)
    assert isinstance(everywhere.cpu_linear, cpu_gemm_patch.KernelProduct)

    for layer in (plain, swapped, switched_off):
        assert torch.equal(layer.method.apply(layer, x), expected)
    assert not isinstance(plain.cpu_linear, cpu_gemm_patch.KernelProduct)
    assert not isinstance(switched_off.cpu_linear, cpu_gemm_patch.KernelProduct)
    # vLLM dropped its unpacked weight; the swapped layer holds only the kernel's copy.
    assert swapped.weight.numel() == 0
    assert swapped.cpu_linear.packed.packed.shape == (8, 576, 16)


def test_cpus_the_kernel_does_not_suit_keep_vllms_products(monkeypatch):
    cpu_gemm_patch.apply()
    weight = torch.randn(128, 576)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    monkeypatch.setattr(cpu_gemm_patch, "_medusa_engine", lambda: True)
    monkeypatch.setattr(cpu_gemm_patch, "suits_host", lambda: False)
    for setting in ("1", "all"):
        monkeypatch.setenv(cpu_gemm_patch.ENV, setting)
        layer = _processed_layer(weight)
        assert not isinstance(layer.cpu_linear, cpu_gemm_patch.KernelProduct)
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert not cpu_gemm.suits_host()


def test_engines_still_start_in_a_process_that_compiled_the_kernel():
    """vLLM scans every loaded module for Triton kernels at each engine start; llvmlite's
    library object, loaded with the kernel, answers any attribute and used to stop it."""
    from vllm.triton_utils import dispatcher

    from vllm_medusa.patches import triton_dispatcher

    triton_dispatcher.apply()
    cpu_gemm._kernel()
    dispatcher._rebind_kernels([])  # the scan `register_kernels` runs
    import llvmlite.binding.ffi as ffi

    assert ffi.lib is not None  # set aside for the scan only
