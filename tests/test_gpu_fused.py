"""The fused Triton kernels on a CUDA GPU: each kernel against transformers' eager code in float16,
bfloat16 and float32 at Qwen2.5-7B's sizes, tiny patched Qwen2 / Qwen3 models against unpatched
ones, and a patched model's decode step captured in a CUDA graph (the fast engine's) against
eager (also for a tiny NF4 model loaded as %qwen_load does). Skipped without a GPU or triton.

Exactness asserted (and printed with ``-s``): rotary embedding bitwise in every dtype; SiLU
times up bitwise in float16/bfloat16 and within 1 ulp in float32 (both sides use CUDA's accurate
expf and an IEEE division); RMSNorm within 1 ulp in float16/bfloat16, 2e-6 relative in float32
(the sum of squares is added in another order).
"""

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
]

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3)


@pytest.fixture(scope="module")
def fused():
    from qwen_magic.kernels import fused

    reason = fused.available("cuda")
    if reason:
        pytest.skip(reason)
    return fused


def ulps(a, b) -> int:
    from test_fused import ulps as cpu_ulps

    return cpu_ulps(a.cpu(), b.cpu())


def report(name, dtype, got, expected):
    differing = (got != expected).sum().item()
    print(f"{name} {dtype}: {differing}/{got.numel()} differ, max {ulps(got, expected)} ulp")


@pytest.mark.parametrize("dtype", DTYPES)
def test_check(fused, dtype):
    assert fused.check("cuda", dtype) is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 3584), (1, 7, 3584), (1, 1, 28, 128), (3, 5, 8, 128), (2, 37)])
def test_rms_norm(fused, dtype, shape):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    torch.manual_seed(0)
    norm = Qwen2RMSNorm(shape[-1], eps=1e-6).to("cuda", dtype)
    with torch.no_grad():
        norm.weight.normal_()
    x = (torch.randn(shape, device="cuda") * 3).to(dtype)
    expected, got = norm(x), fused.rms_norm(x, norm.weight, norm.variance_epsilon)
    report("rms_norm", dtype, got, expected)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=2e-6, atol=1e-30)
    else:
        assert ulps(got, expected) <= 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_offset_rms_norm(fused, dtype):
    module = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    norm = module.Qwen3NextRMSNorm(4096).to("cuda", dtype)
    with torch.no_grad():
        norm.weight.normal_()
    x = (torch.randn(3, 4096, device="cuda") * 3).to(dtype)
    expected, got = norm(x), fused.rms_norm(x, norm.weight, norm.eps, offset=True)
    report("offset_rms_norm", dtype, got, expected)
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=2e-6, atol=1e-30)
    else:
        assert ulps(got, expected) <= 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq", [1, 19])
def test_rope_bitwise(fused, dtype, seq):
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    torch.manual_seed(1)
    q = (torch.randn(1, seq, 28, 128, device="cuda") * 4).to(dtype).transpose(1, 2)
    k = (torch.randn(1, seq, 4, 128, device="cuda") * 4).to(dtype).transpose(1, 2)
    angles = torch.rand(1, seq, 128, device="cuda") * 1000
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    (eq, ek), (gq, gk) = apply_rotary_pos_emb(q, k, cos, sin), fused.rope(q, k, cos, sin)
    report("rope q", dtype, gq, eq)
    assert torch.equal(gq, eq) and torch.equal(gk, ek)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(fused, dtype):
    torch.manual_seed(2)
    gate = (torch.randn(3, 18944, device="cuda") * 6).to(dtype)
    up = (torch.randn(3, 18944, device="cuda") * 2).to(dtype)
    expected, got = torch.nn.functional.silu(gate) * up, fused.silu_mul(gate, up)
    report("silu_mul", dtype, got, expected)
    if dtype == torch.float32:
        assert ulps(got, expected) <= 1
    else:
        assert torch.equal(got, expected)


def load_tiny(tmp_path, family, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwen_magic.tiny import write_tiny_model

    path = str(write_tiny_model(tmp_path / family, family=family, **SHAPE))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to("cuda").eval()
    return model, AutoTokenizer.from_pretrained(path)


TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}  # relative error of the logits


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_patched_tiny_model_equals_eager(fused, tmp_path, family, dtype):
    from test_fast import relative_error

    model, _ = load_tiny(tmp_path, family, dtype)
    ids = torch.tensor([list(range(3, 60, 3))], device="cuda")
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        expected = model(ids).logits.float()
        expected_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    restore = fused.patch(model)
    try:
        assert restore.counts["norm"] and restore.counts["mlp"] and restore.counts["rope"]
        with torch.inference_mode():
            got = model(ids).logits.float()
            tokens = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    finally:
        restore()
    error = relative_error(got, expected)
    print(f"{family} {dtype}: logits relative error {error:.2e}, bitwise equal: {torch.equal(got, expected)}")
    assert error < TOLERANCE[dtype]
    assert tokens.tolist() == expected_tokens.tolist()


def forced(model, tokenizer, prompt, continuation, **options):
    """A fresh fast engine's teacher-forced logits (float32), and whether it ran a CUDA graph; the engine closed."""
    from qwen_magic.fast import FastEngine
    from test_fast import forced_logits

    engine = FastEngine(model, tokenizer, context_length=256, **options)
    try:
        return forced_logits(engine, prompt, continuation).float(), engine.graph is not None
    finally:
        engine.close()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_patched_decode_step_in_a_cuda_graph_equals_eager(fused, tmp_path, family, dtype):
    """The fast engine's captured decode step, patched, against its eager step unpatched (teacher forcing).

    The graph also takes the decode-attention kernel (kernels/decode.py), whose scores stay in float32 as
    SDPA's (the recipe's attention) do, where the unpatched eager step rounds them to the model's dtype as
    transformers' eager attention does: in bfloat16 that rounding alone moves the logits by several percent.
    So in half precision the graph must be no further from a plain forward (the recipe's arithmetic) than
    the unpatched eager step is (or within the dtype's tolerance)."""
    from test_fast import reference_logits, relative_error

    model, tokenizer = load_tiny(tmp_path, family, dtype)
    prompt, continuation = list(range(3, 40, 2)), [7, 11, 13, 17, 19, 23, 29, 31]

    expected, _ = forced(model, tokenizer, prompt, continuation, use_graph=False)
    restore = fused.patch(model)
    try:
        got, graphed = forced(model, tokenizer, prompt, continuation, use_graph=True)
        assert graphed
        patched_eager, _ = forced(model, tokenizer, prompt, continuation, use_graph=False, kernels=True)  # the graph's kernels, eager
    finally:
        restore()
    reference = reference_logits(model, prompt, continuation).float()
    error = relative_error(got, expected)
    print(f"{family} {dtype}: graph patched vs eager unpatched {error:.2e}; "
          f"graph patched vs eager patched {relative_error(got, patched_eager):.2e}; vs a plain forward: graph "
          f"{relative_error(got, reference):.2e}, eager unpatched {relative_error(expected, reference):.2e}")
    if dtype == torch.float32:
        assert error < TOLERANCE[dtype]
        assert got.argmax(-1).tolist() == expected.argmax(-1).tolist()
    else:
        assert relative_error(got, reference) <= max(1.5 * relative_error(expected, reference), TOLERANCE[dtype])
    assert relative_error(got, patched_eager) < TOLERANCE[dtype]  # graph = eager, with the same kernels


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_patched_nf4_model_in_a_cuda_graph(fused, tmp_path, dtype):
    """As %qwen_load loads it (4-bit NF4): the patched graph step against the unpatched eager one."""
    from qwen_magic import loader
    from qwen_magic.tiny import write_tiny_model
    from test_fast import relative_error

    path = str(write_tiny_model(tmp_path / "nf4", **SHAPE))
    loaded = loader.load(path, bits=4, dtype=dtype, engine="generate", notify=lambda _: None)
    try:
        model, tokenizer = loaded.model, loaded.tokenizer
        prompt, continuation = list(range(3, 40, 2)), [7, 11, 13, 17, 19, 23]
        expected, _ = forced(model, tokenizer, prompt, continuation, use_graph=False)
        restore = fused.patch(model)
        try:
            assert restore.counts["norm"] and restore.counts["mlp"] and restore.counts["rope"]
            got, _ = forced(model, tokenizer, prompt, continuation, use_graph=True, kernels=False)  # the fused patch alone
        finally:
            restore()
    finally:
        loader.free(loaded)
    error = relative_error(got, expected)
    print(f"NF4 {dtype}: graph patched vs eager unpatched {error:.2e}")
    assert error < TOLERANCE[getattr(torch, dtype)]
    assert got.argmax(-1).tolist() == expected.argmax(-1).tolist()
