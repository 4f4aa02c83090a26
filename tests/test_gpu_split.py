"""On two CUDA GPUs with bitsandbytes (issue 16): a model split over both cards on the fast engine.
One decode graph per device segment, replayed in order, checked by teacher forcing against eager
steps and a plain forward; greedy turns (cache reuse, regenerate) equal the classic recipe's with the
same device map; the load summary says how the model is split. Skipped cleanly on fewer cards."""

import importlib.util

import pytest
import torch

from qwen_magic import loader, split, static_cache
from qwen_magic.engine import GenerateEngine
from qwen_magic.fast import FastEngine
from qwen_magic.prompt import prompt_ids
from qwen_magic.settings import GenerationSettings
from test_fast import forced_logits, reference_logits, relative_error
from test_gpu import graph_matches_eager_and_a_plain_forward, incremental_logits, reply_to

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"),
    pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes"),
]

# test_gpu.py's shape (bitsandbytes' batch-1 4-bit kernels want widths in 64-value blocks), four layers.
SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4)
# Half the layers on each card; the rotary embedding after the last layer, where accelerate's maps put it
# (a step would cross four times: embeddings | rotary | layers 0-1 | layers 2-3, norm, head); the fast
# engine moves it to the first layer's card, so a step crosses twice.
MAP = {
    "model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0, "model.layers.2": 1, "model.layers.3": 1,
    "model.norm": 1, "model.rotary_emb": 1, "lm_head": 1,
}


@pytest.fixture(scope="module")
def split_model_dir(tmp_path_factory):
    from qwen_magic.tiny import write_tiny_model

    return str(write_tiny_model(tmp_path_factory.mktemp("gpu-split-qwen"), **SHAPE))


@pytest.fixture(scope="module", params=["float32", "float16"])  # float16 is what a T4 computes in
def nf4(request, split_model_dir):
    loaded = loader.load(split_model_dir, bits=4, dtype=request.param, device_map=dict(MAP), engine="fast", notify=lambda _: None)
    yield loaded
    loader.free(loaded)


def test_the_split_model_runs_on_graphs_per_device_and_says_so(nf4):
    model, engine = nf4.model, nf4.engine
    assert {str(p.device) for p in model.model.layers[1].parameters()} == {"cuda:0"}
    assert {str(p.device) for p in model.model.layers[2].parameters()} == {"cuda:1"}
    assert engine.name.startswith("static KV cache + CUDA graph") and engine.split is not None
    summary = nf4.summary()
    assert "split over 2 GPUs: cuda:0 layers 0–1 (" in summary and "cuda:1 layers 2–3 + head (" in summary, summary
    assert "engine: static KV cache + CUDA graph" in summary and "could not run" not in summary, summary
    # The warm-up captured the graphs: one per segment, on the devices of the map, in execution order; the
    # rotary embedding, which accelerate put on the last card, runs on the first layer's (split.colocate_rotary).
    assert [s.device.index for s in engine.graph.segments] == [0, 1]
    assert next(model.model.rotary_emb.buffers()).device.index == 0 and model.hf_device_map["model.rotary_emb"] == 0
    # The cache's layers live on their layer's card.
    layers = [layer for layer in engine.cache.layers if getattr(layer, "keys", None) is not None]
    assert [layer.keys.device.index for layer in layers] == [0, 0, 1, 1]
    assert engine.static_logits.device == engine.device  # sampling happens where the inputs are


def test_graph_replay_equals_eager_steps_and_a_plain_forward(nf4):
    model, tokenizer = nf4.model, nf4.tokenizer
    eager = FastEngine(model, tokenizer, context_length=4096, use_graph=False, kernels=True)  # accelerate moves tensors itself; the same kernels
    assert eager.split is None
    try:
        graph_matches_eager_and_a_plain_forward(nf4.engine, eager, model, tokenizer)
    finally:
        eager._drop_cache()  # not close(): that gives the model sdpa back, which the graphed engine does not want


def test_greedy_turns_and_regenerate_equal_the_recipe_with_the_same_map(nf4):
    """Greedy tokens equal generate's in float32; in half precision, teacher-forced logits on generate's
    reply stay within test_gpu_families' half-precision bound (two correct paths may round apart): 2e-2 of a
    plain forward, or 1.5 times the recipe's own incremental path's distance from it where that is larger."""
    model, tokenizer = nf4.model, nf4.tokenizer
    graphed, classic = nf4.engine, GenerateEngine(model, tokenizer)
    settings = GenerationSettings(do_sample=False, max_new_tokens=24)
    exact = model.dtype == torch.float32
    history, cached = [], []
    for question in ["介绍广州这座城市", "它有什么好吃的美食吗?", "Hello! How are you today?", "再见"]:
        history.append({"role": "user", "content": question})
        expected = reply_to(classic, history, settings)
        got = reply_to(graphed, history, settings)
        cached.append(got.cached_tokens)
        if exact:
            assert got.token_ids == expected.token_ids, history[-1]
        else:
            prompt = prompt_ids(tokenizer, history)
            forced = forced_logits(graphed, prompt, expected.token_ids[:-1]).float()
            reference = reference_logits(model, prompt, expected.token_ids[:-1]).float()
            bound = max(2e-2, 1.5 * relative_error(incremental_logits(model, prompt, expected.token_ids[:-1]).float(), reference))
            error = relative_error(forced, reference)
            print(f"split float16 turn {len(history)}: {error:.3g} from a plain forward (bound {bound:.3g})")
            assert error < bound
        again = reply_to(graphed, history, settings)  # regenerate: the same prompt once more
        assert again.cached_tokens > 0
        if exact:
            assert again.token_ids == expected.token_ids
        history.append({"role": "assistant", "content": expected.text})
    assert all(c > 0 for c in cached[1:]), cached  # the history came from the cache


def test_a_growing_cache_is_captured_again_across_both_cards(nf4, monkeypatch):
    model, tokenizer = nf4.model, nf4.tokenizer
    monkeypatch.setattr(static_cache, "CAPACITY_STEP", 64)
    graphed = FastEngine(model, tokenizer, context_length=4096)
    eager = FastEngine(model, tokenizer, context_length=4096, use_graph=False, kernels=True)
    try:
        assert graphed.split is not None and graphed.use_graph
        short = tokenizer("Hello! How are you today?", add_special_tokens=False)["input_ids"]
        forced_logits(graphed, short, short)
        forced_logits(eager, short, short)
        small, first_graph = graphed.capacity, graphed.graph
        longer = list(graphed.cached_ids) + short * 8
        got = forced_logits(graphed, longer, short).float()
        assert graphed.capacity > small and graphed.graph is not first_graph
        assert relative_error(got, forced_logits(eager, longer, short).float()) < 1e-3
    finally:
        graphed.split.close()
        graphed.split = None
        graphed._drop_cache()
        eager._drop_cache()


def test_balanced_device_map_through_the_loader(split_model_dir):
    """--device-map balanced as a user gives it: where accelerate splits the model, the fast engine runs it."""
    loaded = loader.load(split_model_dir, bits=4, dtype="float32", device_map="balanced", engine="auto", notify=lambda _: None)
    try:
        if not split.is_split(split.placement(loaded.model)):
            pytest.skip(f"accelerate kept this small model on one card: {loaded.model.hf_device_map}")
        assert "split over 2 GPUs" in loaded.summary() and loaded.engine.name.startswith("static KV cache + CUDA graph"), loaded.summary()
        settings = GenerationSettings(do_sample=False, max_new_tokens=16)
        messages = [{"role": "user", "content": "介绍广州这座城市"}]
        assert reply_to(loaded.engine, messages, settings).token_ids == reply_to(GenerateEngine(loaded.model, loaded.tokenizer), messages, settings).token_ids
    finally:
        loader.free(loaded)
