"""The fused Triton kernels (qwen_magic.kernels.fused) against transformers' eager code, on the CPU
through Triton's interpreter.

The interpreter must be switched on (``TRITON_INTERPRET=1``) before triton is imported, and a
kernel compiled under it stays interpreted for the whole process. So that no other test in the
session (the GPU ones above all) inherits that, this module re-runs itself in a child pytest
with the variable set: in the parent only ``test_kernels_in_the_interpreter`` runs, and it
fails with the child's output when any child test fails.

Tolerances (what is asserted, per dtype):
- rotary embedding: bitwise equal in float32, bfloat16 and float16;
- SiLU times up: bitwise equal in bfloat16 and float16; in float32 within 1e-6 relative (the
  interpreter's numpy exp and PyTorch's vectorized CPU exp differ in the last bits; on a GPU both
  sides use CUDA's expf, see test_gpu_fused.py);
- RMSNorm: within 1 ulp in bfloat16 and float16; in float32 within 2e-6 relative, a few ulp
  (the sum of squares is added in another order than PyTorch's, so the float32 variance may
  differ by an ulp, which the rsqrt and the products carry into the last bits).
End to end, a tiny Qwen2 / Qwen3 / Qwen3-MoE / Qwen3.5 model patched gives float32 logits
within 1e-5 relative error (norm of the difference over the norm) of the unpatched model, and
the same greedy tokens.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from interpreter import assert_passes_in_interpreter

CHILD = os.environ.get("QWEN_MAGIC_FUSED_CHILD") == "1"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

child_only = pytest.mark.skipif(not CHILD, reason="runs in the interpreter child (see the module docstring)")


@pytest.mark.skipif(CHILD, reason="the parent's launcher")
def test_kernels_in_the_interpreter():
    assert_passes_in_interpreter(__file__, "QWEN_MAGIC_FUSED_CHILD", "-x")


@pytest.fixture(scope="module")
def fused():
    from qwen_magic.kernels import fused

    fused.force_kernels(True)
    yield fused
    fused.force_kernels(False)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place of ``a``'s dtype (finite values of one sign region)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.dtype == torch.float32:
        ia, ib = a.view(torch.int32).long(), b.view(torch.int32).long()
    else:
        ia, ib = a.view(torch.int16).long(), b.view(torch.int16).long()
    # map sign-magnitude to a monotonic integer line
    bits = 32 if a.dtype == torch.float32 else 16
    ia = torch.where(ia < 0, -(ia & ((1 << (bits - 1)) - 1)), ia)
    ib = torch.where(ib < 0, -(ib & ((1 << (bits - 1)) - 1)), ib)
    return int((ia - ib).abs().max()) if a.numel() else 0


def assert_norm_close(got, expected):
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=2e-6, atol=1e-30)
    else:
        assert ulps(got, expected) <= 1


@child_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 37), (2, 5, 4, 24), (1, 1, 200)])
def test_rms_norm_matches_qwen2_rmsnorm(fused, dtype, shape):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    torch.manual_seed(0)
    norm = Qwen2RMSNorm(shape[-1], eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
    x = (torch.randn(shape) * 3).to(dtype)
    expected = norm(x)
    got = fused.rms_norm(x, norm.weight, norm.variance_epsilon)
    assert_norm_close(got, expected)


@child_only
def test_rms_norm_of_a_float32_weight_on_half_input_promotes_like_eager(fused):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    norm = Qwen2RMSNorm(40)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 40, dtype=torch.float16)
    expected = norm(x)
    got = fused.rms_norm(x, norm.weight, norm.variance_epsilon)
    assert expected.dtype == torch.float32
    assert_norm_close(got, expected)


@child_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_offset_rms_norm_matches_qwen3_5(fused, dtype):
    transformers = pytest.importorskip("transformers")
    module = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    torch.manual_seed(1)
    norm = module.Qwen3NextRMSNorm(45).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
    x = (torch.randn(2, 3, 45) * 2).to(dtype)
    expected = norm(x)
    got = fused.rms_norm(x, norm.weight, norm.eps, offset=True)
    assert_norm_close(got, expected)
    assert transformers


@child_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "broadcast_cos"])
def test_rope_is_bitwise_eager(fused, dtype, layout):
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    torch.manual_seed(2)
    batch, hq, hk, seq, dim = 2, 5, 3, 7, 18
    if layout == "contiguous":
        q, k = torch.randn(batch, hq, seq, dim), torch.randn(batch, hk, seq, dim)
    else:  # what Qwen2Attention passes: (batch, seq, heads, dim) views transposed
        q, k = torch.randn(batch, seq, hq, dim).transpose(1, 2), torch.randn(batch, seq, hk, dim).transpose(1, 2)
    q, k = (q * 4).to(dtype), (k * 4).to(dtype)
    cos, sin = torch.randn(batch, seq, dim).to(dtype), torch.randn(batch, seq, dim).to(dtype)
    if layout == "broadcast_cos":
        cos, sin = cos[:1], sin[:1]
    assert fused._rope_supported(q, k, cos, sin)
    expected_q, expected_k = apply_rotary_pos_emb(q, k, cos, sin)
    got_q, got_k = fused.rope(q, k, cos, sin)
    assert torch.equal(got_q, expected_q) and torch.equal(got_k, expected_k)
    assert got_q.stride() == expected_q.stride() and got_k.stride() == expected_k.stride()


@child_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(fused, dtype):
    torch.manual_seed(3)
    gate = (torch.randn(3, 1001) * 6).to(dtype)
    up = (torch.randn(3, 1001) * 2).to(dtype)
    expected = torch.nn.functional.silu(gate) * up
    got = fused.silu_mul(gate, up)
    if dtype == torch.float32:  # PyTorch's vectorized CPU exp is not the interpreter's numpy exp
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-12)
    else:
        assert torch.equal(got, expected)
    # in place (the patched MLP's way): the same values, written over gate; a strided gate gets a new tensor
    written = fused.silu_mul(gate.clone(), up, in_place=True)
    assert torch.equal(written, got)
    target = gate.clone()
    assert fused.silu_mul(target, up, in_place=True) is target
    strided = gate.clone().t().contiguous().t()
    out = fused.silu_mul(strided, up, in_place=True)
    assert out is not strided and torch.equal(out, got) and torch.equal(strided, gate)


def tiny_model(tmp_path, family, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    from qwen_magic.tiny import write_tiny_model

    path = write_tiny_model(tmp_path / family, family=family)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def logits_and_greedy(model, ids):
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return logits, out[0, len(ids):].tolist()


def families():
    from qwen_magic.tiny import available_families

    return [f for f in ["qwen2", "qwen3", "qwen3_moe", "qwen3_5_text"] if f in available_families()]


EXPECTED_KINDS = {  # module kinds each tiny family must have patched
    "qwen2": {"norm", "mlp", "rope"},
    "qwen3": {"norm", "mlp", "rope"},
    # its experts are one grouped module in transformers 5 (left eager), a list of MLPs in 4.x
    "qwen3_moe": {"norm", "rope"} | ({"mlp"} if int(__import__("transformers").__version__.split(".")[0]) < 5 else set()),
    "qwen3_5_text": {"offset_norm", "mlp"},
}


@child_only
@pytest.mark.parametrize("family", ["qwen2", "qwen3", "qwen3_moe", "qwen3_5_text"])
def test_patched_tiny_model_equals_eager(fused, tmp_path, family):
    if family not in families():
        pytest.skip(f"this transformers has no {family}")
    model = tiny_model(tmp_path, family)
    ids = list(range(3, 40, 2))
    expected_logits, expected_tokens = logits_and_greedy(model, ids)

    calls = {"rms_norm": 0, "rope": 0, "silu_mul": 0}
    originals = {name: getattr(fused, name) for name in calls}

    def counting(name):
        def call(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)
        return call

    restore = fused.patch(model)
    try:
        for name in calls:
            setattr(fused, name, counting(name))
        assert {kind for kind, n in restore.counts.items() if n} == EXPECTED_KINDS[family]
        assert fused.patch(model) is restore  # idempotent
        logits, tokens = logits_and_greedy(model, ids)
    finally:
        for name, function in originals.items():
            setattr(fused, name, function)
        restore()
    assert calls["rms_norm"] > 0
    assert (calls["rope"] > 0) == ("rope" in EXPECTED_KINDS[family])
    assert (calls["silu_mul"] > 0) == ("mlp" in EXPECTED_KINDS[family])
    # float32 logits: relative error (norm of the difference over the norm) within 1e-5, as test_fast
    # asks of the fast engine; elementwise they differ by a few ulp where a norm's variance did
    assert ((logits - expected_logits).norm() / expected_logits.norm()).item() < 1e-5
    assert tokens == expected_tokens

    # restored: nothing of ours is left on the model or in transformers' modules
    restore()  # twice is harmless
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert not fused._rope_installs
    assert torch.equal(logits_and_greedy(model, ids)[0], expected_logits)


@child_only
def test_rope_of_an_unpatched_model_stays_eager(fused, tmp_path):
    """The module-level apply_rotary_pos_emb is shared: only a patched model's attention takes the kernel."""
    from transformers.models.qwen2 import modeling_qwen2

    patched, other = tiny_model(tmp_path, "qwen2"), tiny_model(tmp_path / "b", "qwen2")
    original = modeling_qwen2.apply_rotary_pos_emb
    restore = fused.patch(patched)
    try:
        assert modeling_qwen2.apply_rotary_pos_emb is not original
        calls = []
        real = fused.rope
        fused.rope = lambda *a: calls.append(1) or real(*a)
        try:
            with torch.inference_mode():
                other(torch.tensor([[5, 6, 7]]))
            assert calls == []
            with torch.inference_mode():
                patched(torch.tensor([[5, 6, 7]]))
            assert calls
        finally:
            fused.rope = real
        # a second patched model shares the dispatcher; restoring one keeps it for the other
        restore_other = fused.patch(other)
        restore_other()
        assert modeling_qwen2.apply_rotary_pos_emb is not original
    finally:
        restore()
    assert modeling_qwen2.apply_rotary_pos_emb is original


@child_only
def test_without_force_cpu_tensors_take_the_original_code(fused, tmp_path):
    from qwen_magic.kernels import fused as module

    model = tiny_model(tmp_path, "qwen3")
    restore = module.patch(model)
    module.force_kernels(False)
    try:
        called = []
        real = module.rms_norm
        module.rms_norm = lambda *a, **k: called.append(1) or real(*a, **k)
        try:
            with torch.inference_mode():
                model(torch.tensor([[5, 6, 7]]))
        finally:
            module.rms_norm = real
        assert called == []
    finally:
        module.force_kernels(True)
        restore()


@pytest.mark.skipif(CHILD or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), reason="compiles for real GPUs")
@pytest.mark.parametrize("capability", [75, 90])  # a T4, an H100
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_kernels_compile_to_ptx_without_fused_multiply_adds(capability, dtype):
    """No GPU needed: Triton compiles the kernels for sm_75 and sm_90 as the launches do
    (``enable_fp_fusion=False``); norm and rope hold no fma (each product is rounded before it
    is added, as in eager PyTorch), silu divides with IEEE ``div.rn`` (libdevice's expf has fmas
    of its own, as CUDA's expf does)."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qwen_magic.kernels import _fused_triton as k

    def ptx(fn, signature, constexprs):
        signature = dict(signature, **{name: "constexpr" for name in constexprs})
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=dict(enable_fp_fusion=False, num_warps=4))
        return compiled.asm["ptx"]

    pointer = "*" + dtype
    norm_signature = dict(X=pointer, W=pointer, Y=pointer, stride_x="i32", N="i32", n_float="fp32", inv_n="fp32", eps="fp32")
    for offset in (False, True):
        code = ptx(k.rms_norm_kernel, norm_signature, dict(BLOCK=4096, OFFSET=offset, DIVIDE=False, INTERPRETED=False))
        assert "rsqrt" in code and not re.search(r"\bfma\.", code)
    rope_signature = {name: pointer for name in ["Q", "K", "C", "S", "QO", "KO"]}
    rope_signature.update({name: "i32" for name in "HQ HK SEQ sqb sqh sqs skb skh sks sqob sqoh sqos skob skoh skos scb scs ssb sss".split()})
    code = ptx(k.rope_kernel, rope_signature, dict(HALF=64, BLOCK=64, INTERPRETED=False))
    assert not re.search(r"\bfma\.", code)
    code = ptx(k.silu_mul_kernel, dict(G=pointer, U=pointer, Y=pointer, N="i32"), dict(BLOCK=1024, INTERPRETED=False))
    assert "div.rn.f32" in code and "div.full" not in code and "div.approx" not in code


def test_available_explains_itself():
    from qwen_magic.kernels import fused

    reason = fused.available("cpu")
    assert isinstance(reason, str) and reason and "\n" not in reason


def test_import_qwen_magic_imports_no_triton():
    code = "import sys, qwen_magic, qwen_magic.kernels; assert 'triton' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@child_only
def test_an_instance_forward_already_there_is_wrapped_and_put_back(fused, tmp_path):
    """accelerate's hooks set ``module.forward`` on the instance: patch wraps it, restore puts it back."""
    model = tiny_model(tmp_path, "qwen2")
    norm = model.model.norm
    calls = []
    original = norm.forward

    def hooked(hidden_states):
        calls.append(1)
        return original(hidden_states)

    norm.forward = hooked
    restore = fused.patch(model)
    assert norm.forward is not hooked
    with torch.inference_mode():
        model(torch.tensor([[5, 6, 7]]))
    assert calls == []  # the kernel took the call (on CPU tensors, forced)
    restore()
    assert norm.__dict__["forward"] is hooked


def test_which_classes_are_patched():
    """By source: the plain and (1 + weight) norms and the SiLU MLPs; never the gated norms, vision MLPs
    written otherwise, or the attention of families whose rotary embedding is partial or multimodal."""
    import importlib

    from qwen_magic.kernels import fused

    def kind(family, name):
        try:
            module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        except ImportError:
            return "absent"
        return fused._kind(getattr(module, name)) if hasattr(module, name) else "absent"

    expected = {
        ("qwen2", "Qwen2RMSNorm"): "norm", ("qwen2", "Qwen2MLP"): "mlp", ("qwen2", "Qwen2Attention"): "rope",
        ("qwen3", "Qwen3RMSNorm"): "norm", ("qwen3", "Qwen3Attention"): "rope",
        ("qwen3_moe", "Qwen3MoeRMSNorm"): "norm", ("qwen3_moe", "Qwen3MoeAttention"): "rope",
        ("qwen3_next", "Qwen3NextRMSNorm"): "offset_norm", ("qwen3_next", "Qwen3NextRMSNormGated"): None,
        ("qwen3_next", "Qwen3NextAttention"): None,
        ("qwen3_5", "Qwen3_5RMSNorm"): "offset_norm", ("qwen3_5", "Qwen3_5MLP"): "mlp", ("qwen3_5", "Qwen3_5Attention"): None,
        ("qwen2_5_vl", "Qwen2_5_VLRMSNorm"): "norm", ("qwen2_5_vl", "Qwen2_5_VLMLP"): None,
        ("qwen3_vl", "Qwen3VLTextRMSNorm"): "norm", ("qwen3_vl", "Qwen3VLTextMLP"): "mlp", ("qwen3_vl", "Qwen3VLVisionMLP"): None,
    }
    for (family, name), want in expected.items():
        got = kind(family, name)
        assert got in (want, "absent"), (family, name, got)
    assert kind("qwen2", "Qwen2RMSNorm") == "norm"  # present in every supported transformers


@child_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_check_runs_each_kernel(fused, dtype):
    assert fused.check("cpu", dtype) is None


@child_only
def test_check_reports_a_failure_in_one_line(fused, monkeypatch):
    def broken(*args):
        raise RuntimeError("Failed to compile the launcher\nmore lines")

    monkeypatch.setattr(fused, "rope", broken)
    assert fused.check("cpu") == "the fused kernels failed to run: RuntimeError: Failed to compile the launcher"
