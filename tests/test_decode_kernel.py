"""The decode-step attention kernels (qwen_magic.kernels.decode) against PyTorch's attention, on the CPU
through Triton's interpreter (a child pytest with TRITON_INTERPRET=1, as tests/test_fused.py explains);
and the routing: only marked modules, one query token, inside decode steps.

What is asserted: the kernels' output equals float64 attention over the positions the mask allows
(scores and softmax exact, the weights rounded to the model's dtype for the product with the values, as
the kernel and eager attention both do) within the dtype's rounding of the output; positions the mask
forbids have no effect, even when they hold inf/NaN (they are not read); every chunk count and a group
size that is not a power of two (Qwen2.5-7B: 7 query heads a key/value head), head sizes 64, 128, 256.
The GPU run of the same kernels inside a model: tests/test_gpu_fused.py.
"""

import importlib.util
import os

import pytest
import torch
from interpreter import assert_passes_in_interpreter

CHILD = os.environ.get("QWEN_MAGIC_DECODE_CHILD") == "1"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
child_only = pytest.mark.skipif(not CHILD, reason="runs in the interpreter child")


@pytest.mark.skipif(CHILD, reason="the parent's launcher")
def test_kernels_in_the_interpreter():
    assert_passes_in_interpreter(__file__, "QWEN_MAGIC_DECODE_CHILD", "-x")


def reference(query, key, value, mask, scale):
    """float64 attention; the softmax weights rounded to the inputs' dtype before the product with the values."""
    heads, kv_heads = query.shape[1], key.shape[1]
    keys = key.double().repeat_interleave(heads // kv_heads, dim=1)
    values = value.double().repeat_interleave(heads // kv_heads, dim=1)
    scores = (query.double() @ keys.transpose(-1, -2)) * scale
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return (weights.to(query.dtype).double() @ values).transpose(1, 2), weights


CASES = [  # heads, kv heads, head size, cache length, filled
    (28, 4, 128, 300, 257),  # Qwen2.5-7B's grouping, several chunks, the last one partly filled
    (8, 2, 64, 64, 1),  # one position
    (4, 4, 256, 130, 130),  # no grouping, a full cache, head size 256 (Qwen3.5)
    (32, 8, 128, 1000, 700),
]


@child_only
@pytest.mark.parametrize("dtype", [torch.float16], ids=["float16"])  # the interpreter's tl.dot mistakes bfloat16 (GPU: test_gpu_fused)
@pytest.mark.parametrize("case", CASES, ids=[f"h{c[0]}-kv{c[1]}-d{c[2]}-s{c[3]}-f{c[4]}" for c in CASES])
def test_matches_attention(case, dtype):
    from qwen_magic.kernels import decode

    heads, kv_heads, dim, length, filled = case
    generator = torch.Generator().manual_seed(length)
    query = torch.randn(1, heads, 1, dim, generator=generator).to(dtype)
    key = torch.randn(1, kv_heads, length, dim, generator=generator).to(dtype)
    value = torch.randn(1, kv_heads, length, dim, generator=generator).to(dtype)
    key[:, :, filled:] = float("nan")  # never written: the mask keeps them out, and they are not read
    value[:, :, filled:] = float("inf")
    mask = torch.zeros(1, 1, 1, length, dtype=torch.bool)
    mask[..., :filled] = True
    scale = dim ** -0.5
    out = decode.attention(query, key, value, mask, scale)
    assert out.shape == (1, 1, heads, dim) and out.dtype == dtype
    expected, weights = reference(query, key.nan_to_num(0, 0, 0), value.nan_to_num(0, 0, 0), mask, scale)
    eps = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[dtype]
    # the output's rounding, plus the weights' rounding taken at another scale (the kernel rounds un-normalized
    # chunk weights, p <= 1, the reference the normalized ones): at most one rounding of each weight apart
    size = (weights.double() @ value.nan_to_num(0, 0, 0).double().abs().repeat_interleave(heads // kv_heads, dim=1)).transpose(1, 2)
    error = (out.double() - expected).abs()
    assert bool((error <= eps * expected.abs() + 2 * eps * size + 1e-6).all()), f"max error {error.max().item():.3g}"


@child_only
def test_routing(monkeypatch):
    """grouped_attention sends a query to the kernels only for a marked module, one token, inside decoding()."""
    from qwen_magic import attention as routing
    from qwen_magic.kernels import decode, decoding

    calls = []
    monkeypatch.setattr(decode, "attention", lambda *args: calls.append(args) or torch.zeros(1, 1, 4, 16))

    class Attention(torch.nn.Module):
        is_causal = True
        layer_idx = 0

    module = Attention()
    restore = decode.patch(module)
    query, key = torch.randn(1, 4, 1, 16).half(), torch.randn(1, 2, 32, 16).half()
    mask = torch.ones(1, 1, 1, 32, dtype=torch.bool)
    # CPU tensors: usable() refuses them (CUDA only), so force the check the engine's decode steps pass on a GPU
    monkeypatch.setattr(decode, "usable", lambda *args: True)
    with decoding():
        routing.grouped_attention(module, query, key, key, mask)
    assert len(calls) == 1
    routing.grouped_attention(module, torch.randn(1, 4, 2, 16).half(), key, key, torch.ones(1, 1, 2, 32, dtype=torch.bool))
    assert len(calls) == 1  # two query tokens: the grouped PyTorch path
    restore()
    assert not getattr(module, decode._MARK, False)
    with decoding():
        routing.grouped_attention(module, query, key, key, mask)
    assert len(calls) == 1  # unmarked: the PyTorch path


def test_usable_refuses_what_it_cannot_take():
    from qwen_magic.kernels import decode

    class Attention(torch.nn.Module):
        is_causal = True
        layer_idx = 0

    module = Attention()
    decode.patch(module)
    query, key = torch.randn(1, 4, 1, 16).half(), torch.randn(1, 2, 32, 16).half()
    mask = torch.ones(1, 1, 1, 32, dtype=torch.bool)
    assert not decode.usable(module, query, key, key, mask)  # CPU tensors
    assert not decode.usable(Attention(), query, key, key, mask)  # not marked


@child_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["float16", "float32"])
def test_cache_write_equals_transformers_update(monkeypatch, dtype):
    """A decode step's keys and values written by the kernel land where StaticLayer.update puts them, the
    counter moves the same way; a prefill chunk (several tokens) and calls outside decode steps keep the stock update."""
    from transformers.cache_utils import StaticLayer

    from qwen_magic.kernels import decode, decoding

    if not decode._update_verified(StaticLayer):
        pytest.skip("this transformers' StaticLayer.update is not the one the kernel reproduces (patch_cache leaves it alone)")
    monkeypatch.setattr(decode, "FORCE_CPU", True)
    generator = torch.Generator().manual_seed(1)
    random = lambda *shape: torch.randn(*shape, generator=generator).to(dtype)
    ours, stock = StaticLayer(max_cache_len=16), StaticLayer(max_cache_len=16)
    patched = decode._cache_update(ours, StaticLayer.update)
    prefill_k, prefill_v = random(1, 2, 5, 8), random(1, 2, 5, 8)
    patched(prefill_k, prefill_v)  # several tokens: the stock update (it initializes the layer)
    stock.update(prefill_k, prefill_v)
    calls = []
    kernel = decode._build().cache_write_kernel
    monkeypatch.setattr(decode._build(), "cache_write_kernel", type("Spy", (), {"__getitem__": lambda self, grid: (calls.append(grid), kernel[grid])[1]})())
    for step in range(3):
        k, v = random(1, 2, 1, 8).transpose(1, 2).contiguous().transpose(1, 2), random(1, 2, 1, 8)  # a transposed view, as q/k/v are
        with decoding():
            keys, values = patched(k, v)
        expected_keys, expected_values = stock.update(k, v)
        assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)
        assert int(ours.cumulative_length) == int(stock.cumulative_length) == 6 + step
    assert len(calls) == 3
    patched(random(1, 2, 1, 8), random(1, 2, 1, 8))  # outside decoding() while no engine holds kernels: allowed, kernel
    assert len(calls) == 4


@child_only
@pytest.mark.parametrize("case", CASES, ids=[f"h{c[0]}-kv{c[1]}-d{c[2]}-s{c[3]}-f{c[4]}" for c in CASES])
def test_rows_kernels_equal_the_direct_ones(case, monkeypatch):
    """Through the rows (fill_rows: the cache's addresses in device memory, the filled length from the write counter),
    a decode step writes the same keys and values and attends to the same output, bit for bit, as with the cache's own
    addresses and the mask; and partial_rows_kernel's fixed grid gives the same parts whether each program takes one
    chunk or loops over several (a graph captured at a smaller cache, replayed at a larger one)."""
    from types import SimpleNamespace

    from transformers.cache_utils import StaticLayer

    from qwen_magic.kernels import decode, decoding

    if not decode._update_verified(StaticLayer):
        pytest.skip("this transformers' StaticLayer.update is not the one the kernels reproduce")
    monkeypatch.setattr(decode, "FORCE_CPU", True)
    heads, kv_heads, dim, length, filled = case
    generator = torch.Generator().manual_seed(length)
    random = lambda *shape: torch.randn(*shape, generator=generator).to(torch.float16)
    history_k, history_v = random(1, kv_heads, filled - 1, dim), random(1, kv_heads, filled - 1, dim)
    k, v, query = random(1, kv_heads, 1, dim), random(1, kv_heads, 1, dim), random(1, heads, 1, dim)
    layers = []
    for _ in range(2):
        layer = StaticLayer(max_cache_len=length)
        layer.update = decode._cache_update(layer, StaticLayer.update)
        if filled > 1:
            layer.update(history_k, history_v)  # a prefill: the stock update writes the history
        else:
            layer.lazy_initialization(k, v)
        layers.append(layer)
    direct, through = layers
    table = torch.zeros((2, 4), dtype=torch.int64)
    parts = decode.fill_rows(SimpleNamespace(layers=[through]), table, heads)
    assert parts is not None and table[0, 2] == length and table[1, 3] == -(-length // decode.BLOCK)
    mask = torch.zeros(1, 1, 1, length, dtype=torch.bool)
    mask[..., :filled] = True
    scale = dim ** -0.5
    with decoding():
        keys, values = direct.update(k, v)
        expected = decode.attention(query, keys, values, mask, scale)
        with decode.rows() as taken:
            keys_rows, values_rows = through.update(k, v)
            got = decode.attention(query, keys_rows, values_rows, mask, scale, True)
    assert taken == {"write": 1, "attention": 1}
    assert torch.equal(keys_rows, keys) and torch.equal(values_rows, values)
    assert int(through.cumulative_length) == int(direct.cumulative_length) == filled
    assert torch.equal(got, expected)
    # the same parts from fewer programs, each looping over chunks
    kernels, group = decode._build(), heads // kv_heads
    row, counter, chunks = table[0], through.cumulative_length, -(-filled // decode.BLOCK)
    padded = dict(G=group, GP=max(16, decode._pow2(group)), D=dim, DP=max(16, decode._pow2(dim)), BLOCK=decode.BLOCK)
    seen = []
    for programs in sorted({1, 2, chunks}):
        for buffer in parts:
            buffer.fill_(float("nan"))
        kernels.partial_rows_kernel[(kv_heads, programs)](query, row, table[1], counter, query.stride(1), scale, **padded)
        live = torch.cat([buffer.view(kv_heads, -1, group * (dim if buffer is parts[2] else 1))[:, :chunks].reshape(-1) for buffer in parts])
        seen.append(live)
    assert all(torch.equal(part, seen[0]) for part in seen[1:])


def test_patched_cache_is_freed_without_the_collector():
    """patch_cache leaves no reference cycle: a dropped cache's memory goes at once (as the engine relies on when it
    replaces a cache), not at the next garbage collection."""
    import gc
    import weakref

    from transformers.cache_utils import StaticLayer

    from qwen_magic.kernels import decode

    layer = StaticLayer(max_cache_len=8)
    layer.update = decode._cache_update(layer, StaticLayer.update)
    layer.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    gone = weakref.ref(layer.keys)
    gc.disable()
    try:
        del layer
        assert gone() is None
    finally:
        gc.enable()


def test_a_new_cache_reads_transformers_source_once(monkeypatch):
    """patch_cache reads StaticLayer.update's source once per function, not for each layer of each new cache (reading
    a source took ~0.3 ms, 28 layers of the 7B: ~10 ms inside a first question that made a new cache); a different
    update (another transformers) is checked again, and left alone when it is not the verified one."""
    from transformers import Qwen2Config, StaticCache
    from transformers.cache_utils import StaticLayer

    from qwen_magic.kernels import decode, fused  # noqa: F401 (fused_patch is imported through fused)
    from qwen_magic.kernels import fused_patch

    reads, source = [], fused_patch.inspect.getsource
    monkeypatch.setattr(fused_patch.inspect, "getsource", lambda function: reads.append(function) or source(function))
    fused_patch._body.cache_clear()
    config = {"num_hidden_layers": 4, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2}
    made = [StaticCache(config=Qwen2Config(**config), max_cache_len=16) for _ in range(3)]
    counts = [decode.patch_cache(cache) for cache in made]
    verified = decode._update_verified(StaticLayer)
    assert reads == [StaticLayer.update] and counts == [4 if verified else 0] * 3
    original = StaticLayer.update
    monkeypatch.setattr(StaticLayer, "update", lambda self, *args, **kwargs: original(self, *args, **kwargs))
    assert decode.patch_cache(StaticCache(config=Qwen2Config(**config), max_cache_len=16)) == 0
    assert len(reads) == 2
    fused_patch._body.cache_clear()  # the patched update goes with this test


@pytest.mark.skipif(CHILD, reason="compiles the real kernels (not the interpreter's)")
@pytest.mark.parametrize("capability", [75, 90], ids=["sm75-T4", "sm90-H100"])
def test_kernels_compile_for_t4_and_h100(capability):
    """The kernels build for sm_75 as for sm_90, with the cache's length and chunk count as runtime values (or, for
    the rows' kernels, read from device memory): a cache that grows reuses the compiled kernels (a compile would be a
    pause of a few hundred milliseconds)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qwen_magic.kernels import _decode_triton as k

    def build(kernel, signature, constants):
        pointers = sum(kind.startswith("*") for kind in signature.values())  # the pointers come first: 16-byte aligned
        signature = dict(signature, **{name: "constexpr" for name in constants})
        source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs={(i,): [["tt.divisibility", 16]] for i in range(pointers)})
        return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=dict(num_warps=4))

    try:
        partial = build(k.partial_kernel, dict(q_ptr="*fp16", k_ptr="*fp16", v_ptr="*fp16", mask_ptr="*i1", m_ptr="*fp32", l_ptr="*fp32",
                                               acc_ptr="*fp32", q_head_stride="i32", k_head_stride="i32", k_pos_stride="i32",
                                               v_head_stride="i32", v_pos_stride="i32", mask_stride="i32", length="i32", scale="fp32",
                                               chunks="i32"), dict(G=7, GP=16, D=128, DP=128, BLOCK=64))
        combine = build(k.combine_kernel, dict(m_ptr="*fp32", l_ptr="*fp32", acc_ptr="*fp32", out_ptr="*fp16", chunks_total="i32"),
                        dict(G=7, D=128, DP=128, CB=128, PB=16))
        rows = build(k.partial_rows_kernel, dict(q_ptr="*fp16", row_ptr="*i64", parts_ptr="*i64", counter_ptr="*i64", q_head_stride="i32",
                                                 scale="fp32"), dict(G=7, GP=16, D=128, DP=128, BLOCK=64))
        combine_rows = build(k.combine_rows_kernel, dict(parts_ptr="*i64", row_ptr="*i64", counter_ptr="*i64", out_ptr="*fp16"),
                             dict(G=7, D=128, DP=128, CB=128, PB=16, BLOCK=64))
        write_rows = build(k.cache_write_rows_kernel, dict(k_ptr="*fp16", v_ptr="*fp16", row_ptr="*i64", counter_ptr="*i64",
                                                           k_head_stride="i32", v_head_stride="i32"),
                           dict(HEADS=4, HP=4, DK=128, DKP=128, DV=128, DVP=128))
        write = build(k.cache_write_kernel, dict(k_ptr="*fp16", v_ptr="*fp16", keys_ptr="*fp16", values_ptr="*fp16", counter_ptr="*i64",
                                                 capacity="i32", k_head_stride="i32", v_head_stride="i32", keys_head_stride="i32",
                                                 keys_pos_stride="i32", values_head_stride="i32", values_pos_stride="i32"),
                      dict(HEADS=4, HP=4, DK=128, DKP=128, DV=128, DVP=128))
    except (ImportError, TypeError, AttributeError) as error:
        pytest.skip(f"ahead-of-time compile API differs: {error}")
    for kernel in (partial, combine, write, rows, combine_rows, write_rows):
        assert kernel.asm["ptx"]
    assert ("mma" in partial.asm["ptx"] and "mma" in rows.asm["ptx"]) or capability < 80  # tensor-core products where the card has them


@child_only
def test_engine_decode_steps_take_both_kernels(tmp_path, monkeypatch):
    """A fast engine (eager steps, float16, on the CPU through the interpreter) sends every decode step's attention
    and cache write to the kernels, through the rows (fill_rows: the kernels a graph that outlives the cache captures),
    across a cache that grows (the new cache's layers are patched and described too); its
    teacher-forced logits stay as close to a plain forward as float16 allows; prefill keeps the stock path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwen_magic import static_cache
    from qwen_magic.fast import FastEngine
    from qwen_magic.kernels import decode
    from qwen_magic.tiny import write_tiny_model
    from test_fast import forced_logits, reference_logits, relative_error

    path = write_tiny_model(tmp_path / "tiny", hidden_size=128, intermediate_size=256, num_attention_heads=4,
                            num_key_value_heads=2, num_hidden_layers=2)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16, attn_implementation="sdpa")
    monkeypatch.setattr(decode, "FORCE_CPU", True)
    monkeypatch.setattr(decode, "available", lambda device=None: None)
    monkeypatch.setattr(decode, "check", lambda device=None, dtype=None: None)
    monkeypatch.setattr(static_cache, "CAPACITY_STEP", 32)
    calls = {"attention": 0, "write": 0}
    through_rows = {"write": 0, "attention": 0}
    attention, kernels = decode.attention, decode._build()

    def counted_attention(*args):
        calls["attention"] += 1
        return attention(*args)

    class Counted:
        def __init__(self, kernel, *counts):
            self.kernel, self.counts = kernel, counts

        def __getitem__(self, grid):
            for counts, key in self.counts:
                counts[key] += 1
            return self.kernel[grid]

    monkeypatch.setattr(decode, "attention", counted_attention)
    monkeypatch.setattr(kernels, "cache_write_kernel", Counted(kernels.cache_write_kernel, (calls, "write")))
    monkeypatch.setattr(kernels, "cache_write_rows_kernel", Counted(kernels.cache_write_rows_kernel, (calls, "write"), (through_rows, "write")))
    monkeypatch.setattr(kernels, "partial_rows_kernel", Counted(kernels.partial_rows_kernel, (through_rows, "attention")))
    engine = FastEngine(model, tokenizer, context_length=1024, use_graph=False, kernels=True)
    try:
        assert [module.__name__.rsplit(".", 1)[-1] for module in engine.kernels] == ["decode"]
        from transformers.cache_utils import StaticLayer

        layers, steps = 2, 0
        writes = layers if decode._update_verified(StaticLayer) else 0  # transformers 4.x: its own update, left alone
        prompt, continuation = list(range(3, 40)), list(range(50, 60))
        stock = FastEngine(model, tokenizer, context_length=1024, use_graph=False, kernels=False)  # PyTorch's attention
        for turn in range(2):  # the second turn's prompt outgrows the first cache: a larger one, the history copied
            got = forced_logits(engine, prompt, continuation).float()
            steps += len(continuation)
            assert calls == {"attention": layers * steps, "write": writes * steps}
            expected = reference_logits(model, prompt, continuation).float()
            baseline = relative_error(forced_logits(stock, prompt, continuation).float(), expected)
            # float16: no further from a plain forward than the engine's own PyTorch path is (or 2e-3)
            assert relative_error(got, expected) <= max(1.5 * baseline, 2e-3), (relative_error(got, expected), baseline)
            assert calls == {"attention": layers * steps, "write": writes * steps}  # the stock engine took no kernel
            # every step wrote and attended through the rows (fill_rows), the grown cache's too
            assert through_rows == {"write": writes * steps, "attention": writes * steps}
            assert engine.rows_for is engine.cache if writes else engine.rows_for is None
            capacity = engine.capacity
            prompt = prompt + continuation + list(range(100, 120))
        assert engine.capacity == capacity > 64 and engine.reused == 47  # grown, and the first turn came from the cache
        stock.close()
    finally:
        engine.close()


@pytest.mark.skipif(CHILD, reason="launches no kernel: the parent runs it")
def test_a_graph_through_the_rows_outlives_the_cache(tmp_path, monkeypatch):
    """The engine's bookkeeping around a decode graph that reads the cache through the rows (the capture itself needs a
    GPU: tests/test_gpu.py): a cache that grows keeps the graph, and before the next replay the rows describe the new
    cache (each layer's keys and values addresses, its capacity, the parts' buffers); a rebuilt cache likewise; giving
    memory back drops the graph; a cache the rows cannot describe gets a capture of its own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.cache_utils import StaticLayer

    from qwen_magic import static_cache
    from qwen_magic.fast import FastEngine
    from qwen_magic.kernels import decode
    from qwen_magic.tiny import write_tiny_model

    if not decode._update_verified(StaticLayer):
        pytest.skip("this transformers' StaticLayer.update is not the one the kernels reproduce: graphs are captured per cache")
    path = write_tiny_model(tmp_path / "tiny", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                            num_key_value_heads=2, num_hidden_layers=2)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16, attn_implementation="sdpa")
    monkeypatch.setattr(decode, "available", lambda device=None: None)
    monkeypatch.setattr(decode, "check", lambda device=None, dtype=None: None)
    monkeypatch.setattr(static_cache, "CAPACITY_STEP", 32)
    engine = FastEngine(model, tokenizer, context_length=1024, use_graph=False, kernels=True)
    engine.use_graph = True  # the replay path, with a stand-in for the captured graph
    captures = []

    class Graph:
        replays = 0

        def replay(self):
            Graph.replays += 1

    def capture():  # what _capture_single leaves behind, without CUDA
        captures.append(engine.capacity)
        engine.static_token = torch.zeros((1, 1), dtype=torch.long)
        engine.static_position = torch.zeros(1, dtype=torch.long)
        engine.static_logits = torch.zeros(1, model.config.vocab_size)
        engine.graph = Graph()
        engine.graph_outlives_cache = engine._fill_rows()

    def described():
        layers = engine.cache.layers
        assert engine.rows_for is engine.cache
        assert engine.rows[:len(layers), 0].tolist() == [layer.keys.data_ptr() for layer in layers]
        assert engine.rows[:len(layers), 1].tolist() == [layer.values.data_ptr() for layer in layers]
        assert engine.rows[:len(layers), 2].tolist() == [engine.capacity] * len(layers)
        assert engine.rows[-1, :3].tolist() == [part.data_ptr() for part in engine.parts]
        assert engine.rows[-1, 3] == -(-engine.capacity // decode.BLOCK)

    monkeypatch.setattr(engine, "_capture", capture)
    token = torch.zeros((1, 1), dtype=torch.long)
    try:
        with torch.inference_mode():
            prompt = list(range(3, 40))
            engine.prefill(prompt, reserve=4)
            engine.step(token, len(prompt))
            graph, first = engine.graph, engine.capacity
            assert captures == [first] and engine.graph_outlives_cache
            described()
            counters = [layer.cumulative_length for layer in engine.cache.layers]
            prompt = prompt + list(range(50, 130))  # outgrows the cache: a larger one, made in the prefill
            engine.prefill(prompt, reserve=4)
            assert engine.capacity > first and engine.graph is graph and engine.rows_for is None
            engine.step(token, len(prompt))
            assert captures == [first] and Graph.replays == 2
            described()
            assert all(a is b for a, b in zip(counters, (layer.cumulative_length for layer in engine.cache.layers)))
            engine._drop_cache()  # a rebuilt cache (a window that moved): the graph stays
            engine.prefill(prompt[:20], reserve=4)
            engine.step(token, 20)
            assert captures == [first] and engine.graph is graph
            described()
            engine._drop_cache(release=True)  # memory given back: the graph goes too
            assert engine.graph is None and not engine.graph_outlives_cache
            engine.prefill(prompt, reserve=4)
            engine.step(token, len(prompt))
            assert len(captures) == 2 and engine.graph_outlives_cache
            monkeypatch.setattr(decode, "fill_rows", lambda *args: None)  # a cache the rows cannot describe
            engine.prefill(prompt + list(range(200, 300)), reserve=4)
            engine.step(token, len(prompt) + 100)
            assert len(captures) == 3 and not engine.graph_outlives_cache
    finally:
        engine.use_graph = False
        engine.close()
