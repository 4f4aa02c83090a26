"""The decode-step attention kernels (qwen_magic.kernels.decode) on a CUDA GPU, float16 and bfloat16,
against float64 attention (the CPU interpreter run, float16 only: tests/test_decode_kernel.py); and a
CUDA-graph replay equal to an eager call."""

import importlib.util
import os

import pytest
import torch

from test_decode_kernel import CASES, reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled kernels only"),
]


def inputs(case, dtype, seed=0):
    heads, kv_heads, dim, length, filled = case
    generator = torch.Generator(device="cuda").manual_seed(seed)
    query = torch.randn(1, heads, 1, dim, device="cuda", generator=generator).to(dtype)
    key = torch.randn(1, kv_heads, length, dim, device="cuda", generator=generator).to(dtype)
    value = torch.randn(1, kv_heads, length, dim, device="cuda", generator=generator).to(dtype)
    key[:, :, filled:] = float("nan")
    value[:, :, filled:] = float("inf")
    mask = torch.zeros(1, 1, 1, length, dtype=torch.bool, device="cuda")
    mask[..., :filled] = True
    return query, key, value, mask


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", CASES + [(28, 4, 128, 16384, 12000)], ids=lambda c: f"h{c[0]}-kv{c[1]}-d{c[2]}-s{c[3]}-f{c[4]}")
def test_matches_attention(case, dtype):
    from qwen_magic.kernels import decode

    assert decode.check(torch.device("cuda"), dtype) is None
    heads, kv_heads, dim, length, filled = case
    query, key, value, mask = inputs(case, dtype)
    out = decode.attention(query, key, value, mask, dim ** -0.5)
    clean = lambda t: t.nan_to_num(0, 0, 0)
    expected, weights = reference(query, clean(key), clean(value), mask, dim ** -0.5)
    eps = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[dtype]
    size = (weights @ clean(value).double().abs().repeat_interleave(heads // kv_heads, dim=1)).transpose(1, 2)
    error = (out.double() - expected).abs()
    assert bool((error <= eps * expected.abs() + 2 * eps * size + 1e-6).all()), f"max error {error.max().item():.3g}"


def test_graph_replay_equals_eager():
    from qwen_magic.kernels import decode

    case = (28, 4, 128, 2048, 1500)
    query, key, value, mask = inputs(case, torch.float16)
    key.nan_to_num_(0, 0, 0)  # every position is attended to in one of the replays
    value.nan_to_num_(0, 0, 0)
    decode.attention(query, key, value, mask, 0.088)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        decode.attention(query, key, value, mask, 0.088)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode.attention(query, key, value, mask, 0.088)
    for filled in (1, 700, 2048):
        mask.zero_()
        mask[..., :filled] = True
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, decode.attention(query, key, value, mask, 0.088))


PREFILL_CASES = [  # start, query tokens, heads, key/value heads, head size
    (0, 2500, 28, 4, 128),  # Qwen2.5-7B, a whole prompt
    (6000, 2000, 28, 4, 128),  # a chunk after a prefix
    (37, 301, 32, 8, 128),  # Qwen3-8B's grouping, positions off the tiles
    (0, 77, 16, 16, 64),  # no grouping, head size 64
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: f"start{c[0]}-m{c[1]}-h{c[2]}-kv{c[3]}-d{c[4]}")
def test_prefill_kernel_matches_attention(case, dtype):
    """The prefill attention kernel (kernels/prefill.py) against float64 attention: its error is within the dtype's
    rounding bound (as in tests/test_prefill_kernel.py) and no larger than 1.5x that of SDPA's flash kernel on the same
    inputs (plus a float32 ulp's worth), cache positions past the chunk holding NaN/inf (not read)."""
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right

    from qwen_magic.kernels import prefill
    from test_prefill_kernel import reference as float64_reference

    assert prefill.check(torch.device("cuda"), dtype) is None
    start, length, heads, kv_heads, dim = case
    generator = torch.Generator(device="cuda").manual_seed(start + length)
    capacity = start + length + 64
    query = torch.randn(1, length, heads, dim, device="cuda", generator=generator).to(dtype).transpose(1, 2)
    key = torch.randn(1, kv_heads, capacity, dim, device="cuda", generator=generator).to(dtype)
    value = torch.randn(1, kv_heads, capacity, dim, device="cuda", generator=generator).to(dtype)
    end = start + length
    flash = F.scaled_dot_product_attention(query, key[:, :, :end], value[:, :, :end], attn_mask=causal_lower_right(length, end),
                                           enable_gqa=True).transpose(1, 2)
    key[:, :, end:] = float("nan")
    value[:, :, end:] = float("inf")
    out = prefill.attention(query, key, value, start, dim ** -0.5)
    assert out.shape == (1, length, heads, dim) and out.dtype == dtype and out.is_contiguous()
    expected, size = float64_reference(query, key, value, start)
    eps = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[dtype]
    error = (out.double() - expected).abs()
    assert bool((error <= eps * expected.abs() + 2 * eps * size + 1e-6).all()), f"max error {error.max().item():.3g}"
    ours, theirs = error.norm().item(), (flash.double() - expected).norm().item()
    print(f"prefill kernel {dtype}: error {ours:.3g}, SDPA flash {theirs:.3g}")
    assert ours <= 1.5 * theirs + 1e-6 * expected.norm().item()
