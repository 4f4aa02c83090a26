"""On a CUDA GPU with bitsandbytes: NF4 loading, the CUDA-graph engine checked by teacher forcing,
cache reuse over turns, interrupts. Skipped cleanly elsewhere (CI has no GPU)."""

import importlib.util
import weakref

import pytest
import torch
from IPython.utils.capture import capture_output

from qwen_magic import fast, loader
from qwen_magic.engine import generate_reply
from qwen_magic.fast import FastEngine, cache_keyword
from qwen_magic.prompt import prompt_ids
from qwen_magic.settings import GenerationSettings
from test_fast import forced_logits, reference_logits, relative_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes"),
]

# Wide enough (a multiple of bitsandbytes' 64-value blocks) for its batch-1 4-bit kernels.
SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3)


@pytest.fixture(scope="module")
def gpu_model_dir(tmp_path_factory):
    from qwen_magic.tiny import write_tiny_model

    return str(write_tiny_model(tmp_path_factory.mktemp("gpu-qwen"), **SHAPE))


@pytest.fixture(scope="module", params=["float32", "bfloat16", "float16"])  # float16 is what a T4 computes in
def nf4(request, gpu_model_dir):
    loaded = loader.load(gpu_model_dir, bits=4, dtype=request.param, engine="fast", notify=lambda _: None)
    yield loaded
    loader.free(loaded)


def turns(tokenizer, *texts):
    return prompt_ids(tokenizer, [{"role": r, "content": t} for r, t in zip(["user", "assistant"] * 3, texts)])


def test_nf4_load_takes_the_fast_engine(nf4):
    import bitsandbytes as bnb

    layers = [m for m in nf4.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.quant_state.quant_type == "nf4" for m in layers)
    assert nf4.precision.startswith("4-bit NF4")
    assert nf4.devices == "cuda:0" and nf4.gpu_bytes > 0
    assert nf4.engine.name == "static KV cache + CUDA graph + Triton kernels", nf4.engine.name + nf4.engine_note


def incremental_logits(model, prompt, continuation):
    """The classic recipe's own path: a dynamic cache fed one token at a time."""
    with torch.inference_mode():
        out = model(torch.tensor([prompt], device=model.device), use_cache=True)
        rows = [out.logits[:, -1]]
        for token in continuation:
            cache = out.past_key_values if getattr(out, "past_key_values", None) is not None else out.cache
            out = model(torch.tensor([[token]], device=model.device), use_cache=True, **{cache_keyword(model): cache})
            rows.append(out.logits[:, -1])
    return torch.cat(rows)


def reply_to(engine, messages, settings, continue_final=False):
    stream = engine.start(messages, settings, continue_final=continue_final)
    for _ in stream:
        pass
    return stream.result


def graph_matches_eager_and_a_plain_forward(graphed, eager, model, tokenizer):
    """Teacher forcing over three turns (the second reuses the cache, the third is a moved window): the
    graphed engine equals the eager one, and is as close to a plain forward as the recipe's own paths."""
    reply_one = tokenizer("广州是广东省的省会。<|im_end|>", add_special_tokens=False)["input_ids"]
    reply_two = tokenizer("早茶和虾饺。<|im_end|>", add_special_tokens=False)["input_ids"]
    for prompt, reply in [
        (turns(tokenizer, "介绍广州这座城市"), reply_one),
        (turns(tokenizer, "介绍广州这座城市", "广州是广东省的省会。", "它有什么好吃的美食吗?"), reply_two),  # reuses the cache
        (turns(tokenizer, "它有什么好吃的美食吗?", "早茶和虾饺。", "还有呢?"), reply_two),  # window moved: rebuilt
    ]:
        graph_logits = forced_logits(graphed, prompt, reply).float()
        assert relative_error(graph_logits, forced_logits(eager, prompt, reply).float()) < 1e-3
        reference = reference_logits(model, prompt, reply).float()
        if model.dtype == torch.float32:
            assert relative_error(graph_logits, reference) < 1e-3
        else:
            # A plain forward runs other kernels (batched dequantize + matmul), so half-precision rounding
            # shows. The fast path may differ from it no more than the classic recipe's own path does,
            # with transformers' SDPA or its eager attention (whose arithmetic the fast path's is).
            classic = relative_error(incremental_logits(model, prompt, reply).float(), reference)
            model.set_attn_implementation("eager")
            try:
                eager_error = relative_error(incremental_logits(model, prompt, reply).float(), reference)
            finally:
                model.set_attn_implementation(fast.ATTENTION)
            assert relative_error(graph_logits, reference) <= 1.5 * max(classic, eager_error, 1e-3)


def eager_twin(engine, model, tokenizer):
    """An engine of the same kernels without CUDA graphs; where ``engine`` pads short prefills to replay them as
    graphs, this one pads them too and runs the padded forward eagerly (the graph's arithmetic). Left open: closing
    it would give the shared model SDPA back."""
    padded = engine.prefill_graphs is not None
    eager = FastEngine(model, tokenizer, context_length=4096, use_graph=False, kernels=True, padded=padded)
    if padded:
        with torch.inference_mode():
            eager._reserve(4096)
        eager.prefill_graphs.capture()
    return eager


def test_graph_replay_equals_eager_steps_and_a_plain_forward(nf4):
    model, tokenizer = nf4.model, nf4.tokenizer
    eager = eager_twin(nf4.engine, model, tokenizer)  # the same kernels, eager: graph = eager
    graph_matches_eager_and_a_plain_forward(nf4.engine, eager, model, tokenizer)
    eager._drop_cache()


def test_cache_reuse_over_several_turns(nf4):
    engine = nf4.engine
    settings = GenerationSettings(do_sample=False, max_new_tokens=24)
    history = []
    cached = []
    for question in ["介绍广州这座城市", "它有什么好吃的美食吗?", "Hello! How are you today?", "再见"]:
        history.append({"role": "user", "content": question})
        reply = generate_reply(engine, history, settings)
        cached.append(reply.cached_tokens)
        assert reply.new_tokens > 0
        history.append({"role": "assistant", "content": reply.text})
    assert all(c > 60 for c in cached[1:])  # everything up to the new message came from the cache


def test_seeded_sampling_repeats_on_the_gpu(nf4):
    question = [{"role": "user", "content": "Hello!"}]
    settings = GenerationSettings(max_new_tokens=32, seed=11)
    first = generate_reply(nf4.engine, question, settings).token_ids
    assert generate_reply(nf4.engine, question, settings).token_ids == first


def test_interrupt_during_graph_decode_keeps_memory_steady(nf4):
    engine = nf4.engine
    settings = GenerationSettings(do_sample=False, max_new_tokens=2000)
    generate_reply(engine, [{"role": "user", "content": "warm"}], GenerationSettings(max_new_tokens=2000, do_sample=False))
    before = torch.cuda.memory_allocated()
    stream = engine.start([{"role": "user", "content": "Write forever."}], settings)
    for count, _ in enumerate(stream):
        if count == 5:
            stream.stop()
            break
    assert stream.result.finish_reason == "interrupted" and stream.result.new_tokens < 2000
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before


def test_magics_on_the_gpu(gpu_model_dir):
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.extension_manager.load_extension("qwen_magic")
    try:
        with capture_output() as shown:
            ip.run_line_magic("qwen_load", gpu_model_dir)
        summary = shown.stdout.strip().splitlines()[-1]
        assert "4-bit NF4 (bfloat16 compute) · cuda:0 · " in summary and "engine: static KV cache + CUDA graph" in summary
        for question in ["介绍广州这座城市", "它有什么好吃的美食吗?"]:
            with capture_output() as shown:
                ip.run_cell_magic("qwen", "--max-new-tokens 16", question)
        assert " cached)" in shown.outputs[-1].data["text/markdown"]
        magics = ip.magics_manager.registry["QwenMagics"]
        assert len(magics.conversation.messages) == 4
        model = weakref.ref(magics.loaded.model)
        weights = magics.loaded.model.get_memory_footprint()
        allocated = torch.cuda.memory_allocated()
        ip.run_line_magic("qwen_unload", "")
        assert model() is None  # nothing holds the model any more
        assert allocated - torch.cuda.memory_allocated() >= weights  # its weights, cache and graph pool are gone
    finally:
        ip.extension_manager.unload_extension("qwen_magic")


def test_real_out_of_memory_while_loading_and_generating(gpu_model_dir):
    """Fill the card, then load and ask: one clear line each, nothing half done, and it works again after."""
    from IPython.core.error import UsageError
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.extension_manager.load_extension("qwen_magic")
    magics = ip.magics_manager.registry["QwenMagics"]

    def fill():
        """Take every free byte the allocator will give, in ever smaller blocks."""
        torch.cuda.empty_cache()
        blocks = []
        for size in (2**30, 2**24, 2**20, 2**16):
            while True:
                try:
                    blocks.append(torch.empty(size, dtype=torch.uint8, device="cuda"))
                except torch.cuda.OutOfMemoryError:
                    break
        return blocks

    try:
        with capture_output():
            ip.run_line_magic("qwen_load", gpu_model_dir)
            ip.run_cell_magic("qwen", "--max-new-tokens 8", "hello")
        before = magics.conversation.to_json()
        magics.loaded.engine._drop_cache()  # the next turn must allocate a cache
        filler = fill()
        with pytest.raises(UsageError, match="^Out of GPU memory while generating"):
            with capture_output():
                ip.run_cell_magic("qwen", "--max-new-tokens 8", "again")
        assert magics.conversation.to_json() == before
        filler += fill()  # running out gave the engine's graphs and staging cache back: the card must be full again
        with pytest.raises(UsageError, match="^Out of GPU memory loading"):
            with capture_output():
                ip.run_line_magic("qwen_load", gpu_model_dir)
        assert magics.loaded is None
        del filler
        torch.cuda.empty_cache()
        with capture_output():
            ip.run_line_magic("qwen_load", gpu_model_dir)
            ip.run_cell_magic("qwen", "--max-new-tokens 8", "and now?")
        assert len(magics.conversation.messages) == 4
    finally:
        ip.extension_manager.unload_extension("qwen_magic")


def test_a_cache_grows_after_the_reply_that_nearly_fills_it(nf4, monkeypatch):
    """With CUDA graphs: a reply that leaves less room than a next turn needs grows the cache after its last token (and
    captures its decode graph then, unless the graph outlives the cache); the next turn captures nothing between its
    tokens, and both greedy replies equal the eager engine's."""
    from qwen_magic import static_cache

    engine, model, tokenizer = nf4.engine, nf4.model, nf4.tokenizer
    monkeypatch.setattr(static_cache, "CAPACITY_STEP", 64)
    monkeypatch.setattr(static_cache, "NEXT_MESSAGE", 64)
    eager = eager_twin(engine, model, tokenizer)
    captures, ahead, capture = [], engine._grow_ahead, engine._capture
    state = {"ahead": False}

    def grow_ahead(max_new_tokens):
        state["ahead"] = True
        try:
            ahead(max_new_tokens)
        finally:
            state["ahead"] = False

    monkeypatch.setattr(engine, "_grow_ahead", grow_ahead)
    monkeypatch.setattr(engine, "_capture", lambda: captures.append(state["ahead"]) or capture())
    settings = GenerationSettings(do_sample=False, max_new_tokens=16)
    history = [{"role": "user", "content": "介绍广州这座城市"}]
    engine._drop_cache()
    eager._drop_cache()
    with torch.inference_mode():
        engine._reserve(len(prompt_ids(tokenizer, history)) + 16)  # a cache this turn fills
        engine._capture()
    small, captures[:] = engine.capacity, []
    first = generate_reply(engine, history, settings)
    # In half precision the decode kernels find the cache through device memory: the graph outlives it, no capture
    assert engine.graph_outlives_cache == (model.dtype != torch.float32 and engine._rows_kernel() is not None)
    assert engine.capacity > small and captures == ([] if engine.graph_outlives_cache else [True]) and engine.graph is not None
    assert first.token_ids == generate_reply(eager, history, settings).token_ids
    history += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "它有什么好吃的美食吗?"}]
    second = generate_reply(engine, history, settings)
    assert second.cached_tokens > 0 and all(captures)  # any capture came after a reply
    assert second.token_ids == generate_reply(eager, history, settings).token_ids
    eager._drop_cache()


def test_a_question_that_outgrows_the_cache_replays_the_graph_it_had(nf4, monkeypatch):
    """In half precision the decode graph reads the cache's addresses from device memory (kernels/decode.fill_rows): a
    question too long for the cache makes a larger one in its prefill, and its steps replay the graph captured for
    the smaller cache, with no capture (the pause between a reply's first two tokens, issue 13). Its programs, fewer
    than the larger cache's chunks, loop over them. Teacher-forced logits equal the eager engine's and stay as close to
    a plain forward as the recipe's own paths; the greedy reply equals the eager engine's."""
    from qwen_magic import static_cache
    from qwen_magic.kernels import decode

    engine, model, tokenizer = nf4.engine, nf4.model, nf4.tokenizer
    if model.dtype == torch.float32 or engine._rows_kernel() is None:
        pytest.skip("the decode kernels take half-precision steps only: a float32 graph is captured per cache")
    monkeypatch.setattr(static_cache, "CAPACITY_STEP", 64)
    monkeypatch.setattr(decode, "ROW_PROGRAMS", 1)  # a program per chunk of the first cache: the larger one loops
    eager = eager_twin(engine, model, tokenizer)
    reply = tokenizer("广州是广东省的省会。<|im_end|>", add_special_tokens=False)["input_ids"]
    question = "介绍广州这座城市。" * 30
    long_question = turns(tokenizer, question)
    captures, capture = [], engine._capture
    monkeypatch.setattr(engine, "_capture", lambda: captures.append(1) or capture())
    for check in ("logits", "reply"):
        engine._drop_cache(release=True)  # a new graph for a small cache
        eager._drop_cache()
        with torch.inference_mode():
            engine._reserve(64)
            engine._capture()
        graph, small, captures[:] = engine.graph, engine.capacity, []
        assert engine.graph_outlives_cache and len(long_question) > 3 * small
        if check == "logits":
            got = forced_logits(engine, long_question, reply).float()
            assert relative_error(got, forced_logits(eager, long_question, reply).float()) < 1e-3
            reference = reference_logits(model, long_question, reply).float()
            classic = relative_error(incremental_logits(model, long_question, reply).float(), reference)
            assert relative_error(got, reference) <= 1.5 * max(classic, 1e-3)
        else:
            settings = GenerationSettings(do_sample=False, max_new_tokens=24)
            history = [{"role": "user", "content": question}]
            assert generate_reply(engine, history, settings).token_ids == generate_reply(eager, history, settings).token_ids
        assert engine.capacity > small and engine.graph is graph and captures == []
    eager._drop_cache()
    engine._drop_cache(release=True)


def test_a_new_cache_has_its_write_counters_on_the_card(nf4):
    """A new cache's write counters (transformers' static layers keep one each) are on the GPU before its first
    prefill: moved there by the first write, they cost a blocking copy per layer, the host waiting for the GPU."""
    engine = nf4.engine
    engine._drop_cache()
    with torch.inference_mode():
        engine._reserve(64)
    counters = [getattr(layer, "cumulative_length", None) for layer in getattr(engine.cache, "layers", ())]
    counters = [counter for counter in counters if isinstance(counter, torch.Tensor)]
    assert all(counter.device.type == "cuda" for counter in counters)
    reply = generate_reply(engine, [{"role": "user", "content": "介绍广州这座城市"}], GenerationSettings(do_sample=False, max_new_tokens=8))
    assert reply.new_tokens > 0


def test_short_prefills_replay_graphs(nf4, monkeypatch):
    """In half precision on a card where the prefill kernel runs, a first question (through the staging cache) and a
    new message after a cached history (in the engine's cache) are each one graph replay (prefill_graph.py), and the
    greedy reply equals the eager engine's that runs the same padded forwards step by step; a first question into a
    rebuilt cache replays too, and the in-place graphs come back after that reply."""
    from qwen_magic import prefill_graph
    from qwen_magic.kernels import prefill

    engine, model = nf4.engine, nf4.model
    graphs = engine.prefill_graphs
    if model.dtype == torch.float32 or not prefill.used_on(torch.device("cuda")):
        assert graphs is None
        pytest.skip("short prefills are graphed only in half precision where the prefill kernel runs")
    assert graphs is not None and not graphs.failed, engine.note
    engine._drop_cache()  # a first cache as the load leaves it (earlier tests left a small one)
    with torch.inference_mode():
        engine._reserve(fast.FIRST_CAPACITY)
    assert sorted(graphs.fresh) == list(prefill_graph.BUCKETS) and not graphs.entries and graphs.stale
    replayed, run = [], graphs.run  # (from position 0, replayed)
    monkeypatch.setattr(graphs, "run", lambda tokens, start, n: (lambda out: replayed.append((start == 0, out is not None)) or out)(run(tokens, start, n)))
    eager = eager_twin(engine, model, nf4.tokenizer)
    settings = GenerationSettings(do_sample=False, max_new_tokens=16)
    history = [{"role": "user", "content": "介绍广州这座城市"}]
    engine.cached_ids = eager.cached_ids = []  # a new conversation, nothing of it cached (an earlier test's system prompt is)
    first = generate_reply(engine, history, settings)
    assert first.token_ids == generate_reply(eager, history, settings).token_ids
    assert sorted(graphs.entries) == list(prefill_graph.BUCKETS) and not graphs.stale  # captured after the reply
    history += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "它有什么好吃的美食吗?"}]
    second = generate_reply(engine, history, settings)
    assert second.cached_tokens > 0 and second.token_ids == generate_reply(eager, history, settings).token_ids
    assert replayed == [(True, True), (False, True)]
    engine._drop_cache()  # as after running out of memory: a new cache, whose in-place graphs come after this turn
    eager._drop_cache()
    third = generate_reply(engine, history, settings)
    assert third.cached_tokens == 0 and third.token_ids == generate_reply(eager, history, settings).token_ids
    fitting = [size for size in prefill_graph.BUCKETS if engine.capacity - size >= len(engine.cached_ids)]
    assert not graphs.failed and fitting and sorted(graphs.entries) == fitting and not graphs.stale, graphs.failed
    fourth = generate_reply(engine, history, settings)
    assert replayed[2:] == [(True, True), (False, True)] and fourth.new_tokens > 0, replayed
    eager._drop_cache()
