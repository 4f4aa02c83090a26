"""The prefill's dequantizing path for 4-bit layers (qwen_magic/kernels/nf4_prefill.py), on the CPU through
Triton's interpreter (a child pytest with TRITON_INTERPRET=1, as in test_fused); on the GPU: test_gpu_nf4.py.

What is asserted: the kernel's dequantized weight equals bitsandbytes' (its layout written out where its CPU
dequantizer differs, see test_nf4.dequantize) bit for bit in float32, float16 and bfloat16, double-quantized or
not, for tiles that end inside the weight and blocks that run across rows; a patched ``Linear4bit`` sends a
prefill's calls of MIN_ROWS rows or more there (and returns exactly ``F.linear`` of that weight), and keeps
bitsandbytes' forward for fewer rows, outside the engine's prefill, and where the card does not take it.
"""

import importlib.util
import os

import pytest
from interpreter import assert_passes_in_interpreter

CHILD = os.environ.get("QWEN_MAGIC_NF4_PREFILL_CHILD") == "1"
HAVE = all(importlib.util.find_spec(name) is not None for name in ("torch", "triton", "bitsandbytes"))

pytestmark = pytest.mark.skipif(not HAVE, reason="needs torch, triton and bitsandbytes")
child_only = pytest.mark.skipif(not CHILD, reason="runs in the interpreter child (see the module docstring)")


@pytest.mark.skipif(CHILD, reason="the parent's launcher")
def test_in_the_interpreter():
    assert_passes_in_interpreter(__file__, "QWEN_MAGIC_NF4_PREFILL_CHILD")


@child_only
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("n,k,blocksize", [(8, 128, 64), (5, 200, 64), (7, 320, 128), (3, 96, 64), (40, 256, 64)])
def test_dequantize_is_bitsandbytes_bit_for_bit(monkeypatch, n, k, blocksize, nested, dtype):
    import torch
    from test_nf4 import dequantize, quantized

    from qwen_magic.kernels import nf4_prefill

    monkeypatch.setattr(nf4_prefill, "BLOCK", 64)  # several programs, the last one partly outside the weight
    dtype = getattr(torch, dtype)
    packed, state = quantized(n, k, blocksize, nested, seed=n)
    ours = nf4_prefill.dequantize(packed, state, dtype)
    expected = dequantize(packed, state).to(dtype)  # float32 products, rounded once
    assert ours.shape == (n, k) and ours.dtype == dtype
    assert torch.equal(ours, expected), (ours.float() - expected.float()).abs().max()


def patched_layer(compute, bias=True):
    import bitsandbytes as bnb
    import torch

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 64, bias=bias, compute_dtype=compute, quant_type="nf4", compress_statistics=True).to("cpu")
    layer.support_avx512bf16_for_cpu = False  # keep bitsandbytes' own layout on the CPU
    return layer


@child_only
@pytest.mark.parametrize("compute", ["float32", "bfloat16", "float16"])
def test_prefill_rows_take_the_dequantized_weight(monkeypatch, compute):
    import torch
    from bitsandbytes import functional as F

    from qwen_magic import kernels
    from qwen_magic.kernels import nf4, nf4_prefill

    compute = getattr(torch, compute)
    layer = patched_layer(compute)
    with torch.no_grad():
        layer(torch.randn(2, 128))  # bitsandbytes' first call settles the compute dtype
    calls = []
    original = nf4_prefill.forward
    monkeypatch.setattr(nf4_prefill, "forward", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setattr(nf4_prefill, "FORCE_CPU", True)
    restore = nf4.patch(layer)
    weight = F.dequantize_4bit(layer.weight, layer.weight.quant_state).to(compute)
    x = torch.randn(1, nf4_prefill.MIN_ROWS, 128)
    try:
        monkeypatch.setattr(kernels, "_engines", 1)  # an engine is open: only its prefill forwards take it
        with torch.no_grad():
            layer(x)
            assert calls == []
            with kernels.prefilling():
                y = layer(x)
                assert calls == [1]
                layer(x[:, :nf4_prefill.MIN_ROWS - 1])  # fewer rows: bitsandbytes' kernel
                assert calls == [1]
            monkeypatch.setattr(nf4_prefill, "FORCE_CPU", False)  # a card that does not take it
            with kernels.prefilling():
                layer(x)
            assert calls == [1]
        expected = torch.nn.functional.linear(x.to(compute), weight, layer.bias.to(compute)).to(x.dtype)
        assert y.dtype == x.dtype and torch.equal(y, expected)
        with torch.no_grad():
            theirs = layer.__class__.forward(layer, x)  # bitsandbytes' own forward: the same up to summation order
        tolerance = 1e-5 if compute == torch.float32 else 2e-2
        assert torch.allclose(y, theirs, rtol=tolerance, atol=tolerance * theirs.abs().max().item())
    finally:
        restore()


def test_switched_off_by_the_environment_and_on_older_cards(monkeypatch):
    import torch

    from qwen_magic.kernels import nf4_prefill

    assert not nf4_prefill.used_on(torch.device("cpu"))
    monkeypatch.setattr(nf4_prefill, "_USED", {0: True})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert nf4_prefill.used_on(torch.device("cuda"))
    monkeypatch.setenv("QWEN_MAGIC_NF4_PREFILL", "0")
    assert not nf4_prefill.used_on(torch.device("cuda"))
    monkeypatch.delenv("QWEN_MAGIC_NF4_PREFILL")
    monkeypatch.setattr(nf4_prefill, "OFF", "its dequantization differs from bitsandbytes' here")
    assert not nf4_prefill.used_on(torch.device("cuda:0"))
    monkeypatch.setattr(nf4_prefill, "OFF", "")
    monkeypatch.setattr(nf4_prefill, "_USED", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (7, 5))  # a T4
    assert not nf4_prefill.used_on(torch.device("cuda:0"))


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_the_load_check_reference_is_bitsandbytes(nested):
    """The load-time check's PyTorch reference (nf4_prefill.reference) is bitsandbytes' dequantization bit for bit."""
    import torch
    from bitsandbytes import functional as F

    from qwen_magic.kernels import nf4_prefill

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        source = torch.randn(48, 256, generator=torch.Generator().manual_seed(3)) * 0.05
        packed, state = F.quantize_4bit(source, blocksize=64, quant_type="nf4", compress_statistics=nested)
        assert torch.equal(nf4_prefill.reference(packed, state, dtype), F.dequantize_4bit(packed, state).to(dtype))
