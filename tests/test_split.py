"""A model split over several devices (issue 16), on the CPU: planning from a device map, the load
summary's wording, the engine choice, and the segment hooks cutting eager decode steps (two
segments on one CPU stand in for two GPUs)."""

import contextlib

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from qwen_magic import loader, split
from qwen_magic.engine import GenerateEngine, generate_reply
from qwen_magic.fast import FastEngine
from qwen_magic.settings import GenerationSettings
from test_fast import forced_logits, greedy_turns_equal_the_recipe, reference_logits, relative_error

SEVEN_B = {  # what accelerate's "balanced" map looks like for a 28-layer model on two cards
    "model.embed_tokens": 0, **{f"model.layers.{i}": 0 if i < 14 else 1 for i in range(28)},
    "model.norm": 1, "model.rotary_emb": 1, "lm_head": 1,
}


def test_device_map_labels_and_what_counts_as_split():
    assert split.label(0) == "cuda:0" and split.label("1") == "cuda:1" and split.label("cuda:1") == "cuda:1"
    assert split.label(torch.device("cuda", 1)) == "cuda:1" and split.label("cpu") == "cpu"
    assert split.is_split({k: split.label(v) for k, v in SEVEN_B.items()})
    assert not split.is_split({"": "cuda:0"})
    assert not split.is_split({"model.layers.0": "cuda:0", "model.layers.1": "cuda:0"})
    assert not split.is_split({"model.layers.0": "cuda:0", "model.layers.1": "cpu"})  # offload: not a split
    assert not split.is_split({"model.layers.0": "cuda:0", "model.layers.1": "cuda:1", "lm_head": "disk"})


def test_the_summary_says_how_the_model_is_split():
    mapping = {k: split.label(v) for k, v in SEVEN_B.items()}
    sizes = {"cuda:0": int(2.1 * 2**30), "cuda:1": int(2.3 * 2**30)}
    assert split.describe(mapping, sizes) == "split over 2 GPUs: cuda:0 layers 0–13 (2.1 GiB), cuda:1 layers 14–27 + head (2.3 GiB)"
    assert split.describe(mapping) == "split over 2 GPUs: cuda:0 layers 0–13, cuda:1 layers 14–27 + head"
    three = {"model.embed_tokens": "cuda:0", "model.layers.0": "cuda:0", "model.layers.1": "cuda:1",
             "model.layers.2": "cuda:1", "model.layers.3": "cuda:2", "lm_head": "cuda:2"}
    assert split.describe(three) == "split over 3 GPUs: cuda:0 layer 0, cuda:1 layers 1–2, cuda:2 layer 3 + head"
    odd = {"model.layers.0": "cuda:0", "model.layers.1": "cuda:0", "model.layers.2": "cuda:1", "model.layers.3": "cuda:0",
           "lm_head": "cuda:1"}
    assert split.describe(odd) == "split over 2 GPUs: cuda:0 layers 0–1, 3, cuda:1 layer 2 + head"
    vision = {"model.visual": "cuda:0", "model.language_model.layers.0": "cuda:0", "model.language_model.layers.1": "cuda:1",
              "lm_head": "cuda:1"}
    assert split.describe(vision) == "split over 2 GPUs: cuda:0 layer 0, cuda:1 layer 1 + head"


def test_device_bytes_counts_weights_per_device(model_and_tokenizer):
    model, _ = model_and_tokenizer
    sizes = split.device_bytes(model)
    assert list(sizes) == ["cpu"]
    assert sizes["cpu"] >= sum(p.numel() * p.element_size() for p in model.parameters()) - model.lm_head.weight.numel() * 4


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


def two_segments(model):
    """Embeddings and the first layer on "cpu:0"; rotary embedding, the rest and the head on "cpu:1" (as
    accelerate places the rotary embedding after the last layer, the step crosses over four times)."""
    layers = model.config.num_hidden_layers
    mapping = {"model.embed_tokens": "cpu:0", "model.layers.0": "cpu:0"}
    mapping.update({f"model.layers.{i}": "cpu:1" for i in range(1, layers)})
    mapping.update({"model.norm": "cpu:1", "model.rotary_emb": "cpu:1", "lm_head": "cpu:1"})
    return mapping


@pytest.fixture
def segmented(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = FastEngine(model, tokenizer, context_length=4096, use_graph=False, placement=two_segments(model))
    yield engine
    engine.close()


def forced_with_segments(engine, tokenizer, n):
    """Teacher-forced logits over ``n`` tokens of a prompt, and each decode step's segments as
    (label, device type, transfers, module calls)."""
    seen = []
    original = split.SplitDecoder.eager

    @contextlib.contextmanager
    def spy(self, device):
        with original(self, device):
            yield
            seen.append([(s.label, s.device.type, len(s.transfers), s.calls) for s in self.segments])

    split.SplitDecoder.eager = spy
    try:
        prompt = tokenizer("Hello! How are you today?", add_special_tokens=False)["input_ids"]
        return prompt, forced_logits(engine, prompt, prompt[:n]), seen
    finally:
        split.SplitDecoder.eager = original


def test_segment_hooks_cut_each_step_and_copy_what_crosses(segmented, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt, got, seen = forced_with_segments(segmented, tokenizer, 4)
    assert relative_error(got, reference_logits(model, prompt, prompt[:4])) < 1e-5
    assert len(seen) == 4  # one per single step; the prefill runs whole
    labels = [s[0] for s in seen[0]]
    assert labels == ["cpu:0", "cpu:1", "cpu:0", "cpu:1"]  # embed | rotary | layer 0 | layers 1.. + norm + head
    assert seen[0][0][2] == 0  # the first segment starts from the step's own inputs
    assert all(transfers > 0 and calls > 0 for _, _, transfers, calls in seen[0][1:])
    assert segmented.split.mode is None and not segmented.split.segments  # hooks idle between steps


def test_the_rotary_embedding_moves_to_the_first_layers_device(model_and_tokenizer, classic):
    """accelerate leaves the rotary embedding on the last card; on the first layer's, a step crosses twice."""
    from accelerate.hooks import attach_align_device_hook_on_blocks, remove_hook_from_module

    model, tokenizer = model_and_tokenizer
    mapping = two_segments(model)
    attach_align_device_hook_on_blocks(model, execution_device={k: torch.device("cpu") for k in mapping},
                                       offload={k: False for k in mapping}, skip_keys=model._skip_keys_device_placement)
    try:
        moved = split.colocate_rotary(model, mapping)
        assert moved["model.rotary_emb"] == "cpu:0" and {k: v for k, v in moved.items() if k != "model.rotary_emb"} == {
            k: v for k, v in mapping.items() if k != "model.rotary_emb"}
        assert mapping["model.rotary_emb"] == "cpu:1"  # the map given is left as it was
        engine = FastEngine(model, tokenizer, context_length=4096, use_graph=False, placement=moved)
        try:
            prompt, got, seen = forced_with_segments(engine, tokenizer, 2)
            assert relative_error(got, reference_logits(model, prompt, prompt[:2])) < 1e-5
            assert seen and all([s[0] for s in step] == ["cpu:0", "cpu:1"] for step in seen)  # embed, rotary, layer 0 | the rest
            history = [{"role": "user", "content": "介绍广州这座城市"}]
            assert generate_reply(engine, history, GenerationSettings(do_sample=False, max_new_tokens=12)).text == classic.reply(history, 12)
        finally:
            engine.close()
    finally:
        remove_hook_from_module(model, recurse=True)


def test_segmented_greedy_replies_equal_the_classic_recipe_over_turns(segmented, classic):
    settings = GenerationSettings(do_sample=False, max_new_tokens=16)
    reply, history = greedy_turns_equal_the_recipe(segmented, classic, settings)
    assert reply.cached_tokens > 0  # the cache was reused across turns
    # regenerate: the same prompt again gives the same reply, from the cache
    again = generate_reply(segmented, history[:-1], settings)
    assert again.text == history[-1]["content"] and again.cached_tokens > 0


def test_capture_mode_records_copies_instead_of_doing_them(model_and_tokenizer, monkeypatch):
    """Without a GPU the graphs cannot be captured, but the bookkeeping can: buffers on the segment's
    device, one per source (the mask and rotary tables reach every layer, and are copied once)."""
    model, tokenizer = model_and_tokenizer
    decoder = split.SplitDecoder(model, two_segments(model))
    monkeypatch.setattr(split.SplitDecoder, "_begin", lambda self, segment: None)
    monkeypatch.setattr(split.SplitDecoder, "_end", lambda self, segment: None)
    try:
        decoder.mode, decoder.segments = "capture", [split.Segment(None, torch.device("cpu"))]
        with torch.inference_mode():
            model(input_ids=torch.tensor([[5]]), position_ids=torch.tensor([[0]]), use_cache=False)
        segments = decoder.segments
    finally:
        decoder.mode, decoder.segments = None, []
        decoder.close()
    assert [s.label for s in segments] == ["cpu:0", "cpu:1", "cpu:0", "cpu:1"]
    for segment in segments[1:]:
        sources = [id(source) for source, _ in segment.transfers]
        assert len(sources) == len(set(sources))
        assert all(buffer.shape == source.shape and buffer.dtype == source.dtype for source, buffer in segment.transfers)
    assert not decoder.handles and not model._forward_pre_hooks  # closed: no hook left on the model
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_a_split_model_takes_the_fast_engine(model_and_tokenizer, tmp_path, monkeypatch):
    model, tokenizer = model_and_tokenizer
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the choice, not the run: the model stays on the CPU
    monkeypatch.setattr(model, "hf_device_map", {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "lm_head": 1},
                        raising=False)
    chosen, note = loader.pick_engine(model, tokenizer, "auto", 4096)
    try:
        assert isinstance(chosen, FastEngine) and note == ""
    finally:
        chosen.close()


@pytest.mark.skipif(not hasattr(transformers, "Qwen3_5TextConfig"), reason="transformers 4.x has no Qwen3.5")
def test_a_split_hybrid_model_stays_on_generate(tmp_path, monkeypatch):
    from qwen_magic.tiny import write_tiny_model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the choice, not the run: the model stays on the CPU
    hybrid_dir = write_tiny_model(tmp_path / "hybrid", family="qwen3_5_text")
    hybrid = AutoModelForCausalLM.from_pretrained(hybrid_dir)
    hybrid.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "lm_head": 1}
    chosen, note = loader.pick_engine(hybrid, AutoTokenizer.from_pretrained(hybrid_dir), "auto", 4096)
    assert isinstance(chosen, GenerateEngine) and "hybrid model split over several GPUs" in note


def test_segment_hooks_compose_with_accelerates_own(model_and_tokenizer, classic):
    """accelerate's dispatch hooks (as a device map puts them, here all on the CPU) wrap each module's
    forward; the segment hooks run before them, and the root's output move is held off while capturing."""
    from accelerate.hooks import attach_align_device_hook_on_blocks, remove_hook_from_module

    model, tokenizer = model_and_tokenizer
    mapping = two_segments(model)
    attach_align_device_hook_on_blocks(model, execution_device={k: torch.device("cpu") for k in mapping},
                                       offload={k: False for k in mapping}, skip_keys=model._skip_keys_device_placement)
    engine = FastEngine(model, tokenizer, context_length=4096, use_graph=False, placement=mapping)
    try:
        assert model._hf_hook.io_same_device
        with engine.split._outputs_stay():
            assert not model._hf_hook.io_same_device
        assert model._hf_hook.io_same_device
        history = [{"role": "user", "content": "介绍广州这座城市"}]
        reply = generate_reply(engine, history, GenerationSettings(do_sample=False, max_new_tokens=12))
        assert reply.text == classic.reply(history, 12)
    finally:
        engine.close()
        remove_hook_from_module(model, recurse=True)
