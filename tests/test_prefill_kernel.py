"""The prefill attention kernel (qwen_magic.kernels.prefill) against attention computed in float64, on the
CPU through Triton's interpreter (a child pytest with TRITON_INTERPRET=1, as tests/test_fused.py explains);
the routing (only marked modules, only the engine's prefill, not a sliding window); a fast engine whose
prefill takes it; and the ahead-of-time compiles for a T4 and an H100.

What is asserted: the kernel's output equals float64 causal attention of each query token over the cache
positions up to its own (a whole prompt, and chunks after a prefix, at positions that are not multiples of
the tiles), within the dtype's rounding of the output and of the weights (rounded for the product with the
values, as flash attention does); cache positions past the chunk have no effect, even holding inf/NaN (not
read); group sizes 1, 2 and 7. The GPU run at Qwen2.5-7B's sizes against SDPA's kernels:
tests/test_gpu_decode.py; inside whole models: the GPU engine tests.
"""

import importlib.util
import os

import pytest
import torch
from interpreter import assert_passes_in_interpreter

CHILD = os.environ.get("QWEN_MAGIC_PREFILL_CHILD") == "1"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
child_only = pytest.mark.skipif(not CHILD, reason="runs in the interpreter child")


@pytest.mark.skipif(CHILD, reason="the parent's launcher")
def test_kernel_in_the_interpreter():
    assert_passes_in_interpreter(__file__, "QWEN_MAGIC_PREFILL_CHILD", "-x")


def reference(query, key, value, start):
    """float64 causal attention of query token i (cache position start + i) over positions 0 .. start + i; the
    weights, and the output's size (weights @ |values|) for the bound."""
    heads, length, dim = query.shape[1], query.shape[2], query.shape[3]
    end = start + length
    keys = key[:, :, :end].double().repeat_interleave(heads // key.shape[1], dim=1)
    values = value[:, :, :end].double().repeat_interleave(heads // key.shape[1], dim=1)
    scores = (query.double() @ keys.transpose(-1, -2)) * dim ** -0.5
    visible = torch.arange(end, device=query.device)[None, :] <= (start + torch.arange(length, device=query.device))[:, None]
    weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return (weights @ values).transpose(1, 2), (weights @ values.abs()).transpose(1, 2)


CASES = [  # start, query tokens, heads, key/value heads, head size, tiles (BLOCK_M, BLOCK_N)
    (0, 100, 4, 2, 32, (32, 16)),  # a whole prompt: the last block partly filled
    (37, 70, 6, 2, 16, (32, 16)),  # after a prefix that ends inside a key tile
    (64, 33, 2, 2, 32, (32, 16)),  # no grouping; the prefix a whole number of tiles
    (13, 150, 14, 2, 128, (128, 64)),  # Qwen2.5-7B's grouping (7) and head size, the tiles the GPU runs
    (5, 1, 2, 1, 16, (32, 16)),  # one token
]


@child_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("case", CASES, ids=[f"start{c[0]}-m{c[1]}-h{c[2]}-kv{c[3]}-d{c[4]}" for c in CASES])
def test_matches_attention(case, dtype, monkeypatch):
    from qwen_magic.kernels import prefill

    start, length, heads, kv_heads, dim, (block_m, block_n) = case
    monkeypatch.setattr(prefill, "BLOCK_M", block_m)
    monkeypatch.setattr(prefill, "BLOCK_N", block_n)
    generator = torch.Generator().manual_seed(start + length)
    capacity = start + length + 40
    query = torch.randn(1, length, heads, dim, generator=generator).to(dtype).transpose(1, 2)  # a projection's layout
    key = torch.randn(1, kv_heads, capacity, dim, generator=generator).to(dtype)
    value = torch.randn(1, kv_heads, capacity, dim, generator=generator).to(dtype)
    key[:, :, start + length:] = float("nan")  # not written yet: never read
    value[:, :, start + length:] = float("inf")
    out = prefill.attention(query, key, value, start, dim ** -0.5)
    assert out.shape == (1, length, heads, dim) and out.dtype == dtype
    expected, size = reference(query, key, value, start)
    eps = {torch.float32: 2.0 ** -21, torch.float16: 2.0 ** -10}[dtype]
    error = (out.double() - expected).abs()
    assert bool((error <= eps * expected.abs() + 2 * eps * size + 1e-6).all()), f"max error {error.max().item():.3g}"


def test_usable_and_marks():
    """Only marked modules, batch 1, a power-of-two head size up to MAX_DIM, heads a multiple of the key/value heads;
    CUDA half precision (CPU tensors only in tests); patch() marks nothing where prefills do not take the kernel."""
    from qwen_magic.kernels import prefill

    class Attention(torch.nn.Module):
        is_causal = True
        layer_idx = 0

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

    module = Attention()
    restore = prefill.patch(module)
    assert not getattr(module, prefill._MARK, False)  # a CPU model outside tests: SDPA
    restore()
    query, key = torch.randn(1, 4, 80, 16), torch.randn(1, 2, 100, 16)
    setattr(module, prefill._MARK, True)
    assert not prefill.usable(module, query, key, key)  # CPU tensors
    prefill.FORCE_CPU = True
    try:
        assert prefill.usable(module, query, key, key)
        assert not prefill.usable(Attention(), query, key, key)  # not marked
        assert not prefill.usable(module, torch.randn(1, 3, 80, 16), key, key)  # 3 heads over 2
        assert not prefill.usable(module, torch.randn(1, 4, 80, 24), torch.randn(1, 2, 100, 24), torch.randn(1, 2, 100, 24))
        big = torch.randn(1, 2, 100, 256)
        assert not prefill.usable(module, torch.randn(1, 4, 80, 256), big, big)  # Qwen3.5's heads: SDPA
        assert not prefill.usable(module, torch.randn(2, 4, 80, 16), torch.randn(2, 2, 100, 16), torch.randn(2, 2, 100, 16))
    finally:
        prefill.FORCE_CPU = False


@child_only
def test_routing(monkeypatch):
    """grouped_attention sends a marked module's prefill to the kernel, with the chunk's first position; not a
    decode-sized query, not a sliding window, not a call outside the engine's prefill, not an unmarked module."""
    from qwen_magic import attention as routing
    from qwen_magic.kernels import prefill

    calls = []
    monkeypatch.setattr(prefill, "attention", lambda query, key, value, start, scale: calls.append((start, scale)) or
                        torch.zeros(1, query.shape[2], query.shape[1], query.shape[3]))
    monkeypatch.setattr(prefill, "FORCE_CPU", True)

    class Attention(torch.nn.Module):
        is_causal = True
        layer_idx = 0
        sliding_window = None
        num_key_value_groups = 2  # transformers' SDPA call repeats the key/value heads by it

    module = Attention()
    setattr(module, prefill._MARK, True)
    query, key = torch.randn(1, 4, 80, 16), torch.randn(1, 2, 200, 16)
    routing._filled.end = 150  # the engine's prefill of positions 70 .. 149
    try:
        routing.grouped_attention(module, query, key, key, None, scaling=0.25)
        assert calls == [(70, 0.25)]
        module.sliding_window = 64
        routing.grouped_attention(module, query, key, key, None, scaling=0.25)
        assert len(calls) == 1
        module.sliding_window = None
        routing.grouped_attention(Attention(), query, key, key, None, scaling=0.25)
        assert len(calls) == 1
    finally:
        routing._filled.end = None
    routing.grouped_attention(module, query, key[:, :, :80], key[:, :, :80], None, scaling=0.25, is_causal=True)
    assert len(calls) == 1  # not the engine's prefill (no filled length): SDPA as transformers calls it


def prefill_kernel_model(tmp_path, monkeypatch):
    """A tiny float32 Qwen2 and its tokenizer, for an engine whose only kernel is the prefill kernel, run on CPU
    tensors through the interpreter with small tiles (the other kernels have their own tests)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwen_magic.kernels import prefill
    from qwen_magic.tiny import write_tiny_model

    path = write_tiny_model(tmp_path / "tiny", hidden_size=128, intermediate_size=256, num_attention_heads=4,
                            num_key_value_heads=2, num_hidden_layers=2)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    monkeypatch.setattr(prefill, "FORCE_CPU", True)
    monkeypatch.setattr(prefill, "BLOCK_M", 32)
    monkeypatch.setattr(prefill, "BLOCK_N", 16)
    for name in ("nf4", "fused", "decode", "sample"):
        module = __import__(f"qwen_magic.kernels.{name}", fromlist=["available"])
        monkeypatch.setattr(module, "available", lambda device=None: "not in this test")
    monkeypatch.setattr(prefill, "available", lambda device=None: None)
    monkeypatch.setattr(prefill, "check", lambda device=None, dtype=None: None)
    return model, tokenizer


@child_only
def test_engine_prefill_takes_the_kernel(tmp_path, monkeypatch):
    """A fast engine's prefill (whole prompts, chunks after a cached prefix, chunks of a long prompt) runs its
    attention through the kernel, and its teacher-forced logits equal a plain forward's as closely as the
    engine's own stock path does (float32, the CPU through the interpreter)."""
    from qwen_magic import fast
    from qwen_magic.fast import FastEngine
    from qwen_magic.kernels import prefill
    from test_fast import forced_logits, reference_logits, relative_error

    model, tokenizer = prefill_kernel_model(tmp_path, monkeypatch)
    monkeypatch.setattr(fast, "PREFILL_CHUNK", 80)  # prompts over 160 tokens go in chunks (of more than SMALL_QUERY)
    calls = []
    attention = prefill.attention
    monkeypatch.setattr(prefill, "attention", lambda *args: calls.append(int(args[3])) or attention(*args))
    engine = FastEngine(model, tokenizer, context_length=1024, use_graph=False, kernels=True)
    try:
        assert [module.__name__.rsplit(".", 1)[-1] for module in engine.kernels] == ["prefill"]
        first, reply = list(range(3, 90)), list(range(100, 106))
        got = forced_logits(engine, first, reply)
        assert calls and set(calls) == {0}  # one whole prompt: 2 layers
        assert relative_error(got, reference_logits(model, first, reply)) < 1e-5
        calls.clear()
        second = first + reply + list(range(120, 320))  # 200 new tokens after a cached prefix: three chunks
        got = forced_logits(engine, second, reply)
        assert engine.reused == len(first) + len(reply) and len(set(calls)) == 3 and min(calls) == len(first) + len(reply)
        assert relative_error(got, reference_logits(model, second, reply)) < 1e-5
    finally:
        engine.close()


@child_only
def test_padded_prefill_equals_the_plain_one(tmp_path, monkeypatch):
    """Short prompts padded to a bucket (prefill_graph.py: the forward a CUDA graph replays on a GPU, run eagerly
    here): teacher-forced logits equal a plain forward's, for a first prompt (through the staging cache, copied into
    the engine's) and for a new message after a cached prefix (in the engine's cache; the padding's keys and values
    never reach a real token: the steps after it read the cache); a first prompt into a new cache (its layers not made
    yet) takes the staging graphs too; a new part longer than the buckets is prefilled eagerly, padded to a multiple
    of PAD, and one that padding would carry past the cache's end as before."""
    from qwen_magic import prefill_graph
    from qwen_magic.fast import FastEngine
    from test_fast import forced_logits, reference_logits, relative_error

    model, tokenizer = prefill_kernel_model(tmp_path, monkeypatch)
    monkeypatch.setattr(prefill_graph, "BUCKETS", (96, 160))
    engine = FastEngine(model, tokenizer, context_length=1024, use_graph=False, kernels=True, padded=True)
    graphs = engine.prefill_graphs
    padded, eager = [], []  # (bucket, whether it wrote the engine's cache in place)
    forward = graphs._forward
    graphs._forward = lambda entry: padded.append((entry.ids.shape[1], entry.cache is engine.cache)) or forward(entry)
    eager_forward = engine._forward
    engine._forward = lambda ids, start, extra=None, size=None: eager.append((ids.shape[1], size)) or eager_forward(ids, start, extra, size)
    try:
        with torch.inference_mode():
            engine._reserve(600)
        graphs.capture()
        assert sorted(graphs.entries) == sorted(graphs.fresh) == [96, 160], graphs.failed
        first, reply = list(range(3, 90)), list(range(100, 106))
        assert relative_error(forced_logits(engine, first, reply), reference_logits(model, first, reply)) < 1e-5
        assert padded == [(96, False)] and engine.reused == 0
        second = first + reply + list(range(120, 220))  # 100 new tokens after the cached prefix: the second bucket
        assert relative_error(forced_logits(engine, second, reply), reference_logits(model, second, reply)) < 1e-5
        assert padded[1:] == [(160, True)] and engine.reused == len(first) + len(reply)
        third = second + reply + list(range(230, 400))  # 170 new tokens (the reply is cached): more than the largest bucket
        assert relative_error(forced_logits(engine, third, reply), reference_logits(model, third, reply)) < 1e-5
        assert len(padded) == 2 and eager == [(170, 256)]  # eager, padded to a multiple of PAD (few product shapes)
        fourth = [3 + i % 300 for i in range(engine.capacity - 50)]  # a new part that a bucket would carry past the cache's end
        engine.cached_ids = fourth[:-20]
        with torch.inference_mode():
            engine.prefill(fourth)
        assert len(padded) == 2 and engine.reused == len(fourth) - 20 and eager[-1] == (20, None)  # no room to pad
        engine._drop_cache()  # a new cache, as after running out of memory: the in-place graphs are gone, not the staging ones
        assert not graphs.entries and sorted(graphs.fresh) == [96, 160] and graphs.stale
        other = list(range(40, 180))  # a first prompt into a cache whose layers are not made yet
        assert relative_error(forced_logits(engine, other, reply), reference_logits(model, other, reply)) < 1e-5
        assert padded[2:] == [(160, False)] and engine.reused == 0 and len(eager) == 2
    finally:
        engine.close()
    assert not graphs.fresh and graphs.staging is None  # closing lets the staging cache go


def test_a_graphed_prefill_takes_only_the_kernel(monkeypatch):
    """In a graphed prefill any attention path but the prefill kernel raises (they would bake host values into it)."""
    from qwen_magic import attention as routing

    class Attention(torch.nn.Module):
        is_causal, layer_idx = True, 0

    query = torch.randn(1, 4, 80, 16)
    key = torch.randn(1, 2, 128, 16)
    monkeypatch.setattr(routing._filled, "end", 80, raising=False)
    monkeypatch.setattr(routing._filled, "graphed", True, raising=False)
    with pytest.raises(RuntimeError, match="graphed prefill"):
        routing.grouped_attention(Attention(), query, key, key, None, scaling=0.25)
    monkeypatch.setattr(routing._filled, "end", None)
    with pytest.raises(RuntimeError, match="graphed prefill"):
        routing.grouped_attention(Attention(), query, key, key, None, scaling=0.25)


@pytest.mark.skipif(CHILD, reason="compiles the real kernel (not the interpreter's)")
@pytest.mark.parametrize("capability", [75, 90], ids=["sm75-T4", "sm90-H100"])
def test_compiles_for_t4_and_h100(capability):
    """The kernel builds for sm_75 and sm_90 with Qwen2.5-7B's grouping and head size (the tiles a GPU runs; a T4
    does not take it, see kernels/prefill.py, but a change that breaks its lowering shows here)."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        from qwen_magic.kernels import _prefill_triton, prefill

        signature = dict(q_ptr="*fp16", k_ptr="*fp16", v_ptr="*fp16", o_ptr="*fp16", M="i32", start_ptr="*i32", qk_scale="fp32",
                         q_head_stride="i32", q_pos_stride="i32", k_head_stride="i32", k_pos_stride="i32", v_head_stride="i32",
                         v_pos_stride="i32", o_pos_stride="i32", o_head_stride="i32")
        constants = dict(GROUP=7, D=128, BLOCK_M=prefill.BLOCK_M, BLOCK_N=prefill.BLOCK_N, INTERPRETED=False)
        signature.update({name: "constexpr" for name in constants})
        compiled = triton.compile(ASTSource(fn=_prefill_triton.prefill_attention_kernel, signature=signature, constexprs=constants),
                                  target=GPUTarget("cuda", capability, 32), options=dict(num_warps=prefill.WARPS, num_stages=prefill.STAGES))
    except (ImportError, TypeError, AttributeError) as error:  # another triton's compile API
        pytest.skip(f"ahead-of-time compile API differs: {error}")
    ptx = compiled.asm["ptx"]
    assert ptx and ("wgmma" in ptx or capability < 90)  # Hopper's tensor-core products where it runs
