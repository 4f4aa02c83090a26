"""On a CUDA GPU with bitsandbytes: vision-language models in NF4. On ``generate`` a turn with a picture
equals the classic recipe's greedy reply on the same quantized model; on the fast engine turns with and
without pictures take its CUDA graph, checked by teacher forcing against a plain forward (3-D positions,
rope_deltas, the picture's keys and values reused by the next turn). Skipped cleanly elsewhere."""

import importlib.util
import io

import pytest
import torch

pytest.importorskip("torchvision")
Image = pytest.importorskip("PIL.Image")

from qwen_magic import loader  # noqa: E402
from qwen_magic.engine import generate_reply  # noqa: E402
from qwen_magic.images import normalize  # noqa: E402
from qwen_magic.settings import GenerationSettings  # noqa: E402
from qwen_magic.tiny import available_vl_families, write_tiny_vl_model  # noqa: E402
from test_fast import forced_logits, reference_logits, relative_error  # noqa: E402
from test_gpu import incremental_logits  # noqa: E402
from vision_helpers import picture_forced_logits, picture_reference_logits  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes"),
]

SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3)


@pytest.fixture(scope="module", params=available_vl_families())
def vl_dir(request, tmp_path_factory):
    shape = dict(SHAPE, num_hidden_layers=4) if request.param == "qwen3_5" else SHAPE  # a hybrid model's 3 : 1 layers
    if request.param == "qwen2_5_vl":  # head_dim 64: the 3-D rotary sections add up to 32, as Qwen2.5-VL's [16, 24, 24] do to 64
        shape = dict(shape, rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]})
    return str(write_tiny_vl_model(tmp_path_factory.mktemp(request.param), family=request.param, **shape))


@pytest.fixture(scope="module", params=["bfloat16", "float16", "float32"])
def nf4(request, vl_dir):
    loaded = loader.load(vl_dir, bits=4, dtype=request.param, engine="auto", notify=lambda _: None)
    yield loaded
    loader.free(loaded)


def figure_png(width=1024, height=768):
    image = Image.new("RGB", (width, height), (255, 255, 255))
    for x in range(0, width, 3):
        image.paste((30, 90, 200), (x, height // 2 + (x * 7) % 200 - 100, x + 3, height // 2 + (x * 7) % 200 - 90))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return normalize(out.getvalue())


def test_an_nf4_vision_model_sees_images_with_the_fast_engine_for_text(nf4):
    assert nf4.sees_images and nf4.precision.startswith("4-bit NF4")
    assert nf4.engine.text_engine is not None and nf4.engine.text_engine.use_graph
    assert nf4.engine.pictures_on_fast and "generate" not in nf4.summary()  # pictures take the fast engine too


def test_a_turn_with_a_figure_equals_the_recipe_on_the_same_model(nf4):
    png = figure_png()
    processor, model = nf4.processor, nf4.model
    recipe_messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What does this plot show?"}]}]
    text = processor.apply_chat_template(recipe_messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.open(io.BytesIO(png)).convert("RGB")], return_tensors="pt").to(model.device)
    model.set_attn_implementation("sdpa")  # the recipe's own attention (the fast engine gave the model its own)
    try:
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    finally:
        model.set_attn_implementation("qwen_magic_gqa")
    expected = processor.batch_decode(output[:, inputs.input_ids.shape[1]:], skip_special_tokens=True)[0]
    from qwen_magic.vision import VisionEngine

    recipe_engine = VisionEngine(model, processor)  # the generate path (no fast engine), on the recipe's attention
    model.set_attn_implementation("sdpa")
    try:
        reply = generate_reply(recipe_engine, [{"role": "user", "content": "What does this plot show?", "images": [png]}],
                               GenerationSettings(do_sample=False, max_new_tokens=16))
    finally:
        model.set_attn_implementation("qwen_magic_gqa")
    assert reply.text == expected and reply.prompt_tokens == inputs.input_ids.shape[1]
    assert reply.prompt_tokens == nf4.engine.prompt.count([{"role": "user", "content": "What does this plot show?", "images": [png]}])


def test_a_turn_with_a_figure_on_the_fast_engine_matches_a_plain_forward(nf4):
    png = figure_png()
    tokenizer = nf4.processor.tokenizer
    reply = tokenizer("The plot shows a wave.<|im_end|>", add_special_tokens=False)["input_ids"]
    messages = [{"role": "user", "content": "What does this plot show?", "images": [png]}]
    graph, inputs, positions = picture_forced_logits(nf4.engine, messages, [png], reply)
    assert nf4.engine.text_engine.graph is not None
    reference = picture_reference_logits(nf4.model, inputs, positions, reply).float()
    classic = relative_error(picture_reference_logits(nf4.model, inputs, positions, reply, incremental=True).float(), reference)
    assert relative_error(graph.float(), reference) <= 1.5 * max(classic, 1e-3)


def test_a_turn_with_a_figure_on_the_fast_engine_gives_the_recipes_greedy_reply(nf4):
    """Greedy tokens equal generate's in float32. In half precision two correct paths may round apart, so
    there the fast engine's logits, teacher-forced on generate's reply, differ from a plain forward no more
    than the recipe's own incremental path does."""
    png = figure_png()
    processor, model = nf4.processor, nf4.model
    recipe_messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What does this plot show?"}]}]
    text = processor.apply_chat_template(recipe_messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.open(io.BytesIO(png)).convert("RGB")], return_tensors="pt").to(model.device)
    model.set_attn_implementation("sdpa")  # the recipe's own attention
    try:
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    finally:
        model.set_attn_implementation("qwen_magic_gqa")
    expected = output[0, inputs.input_ids.shape[1]:].tolist()
    messages = [{"role": "user", "content": "What does this plot show?", "images": [png]}]
    if model.dtype == torch.float32:
        reply = generate_reply(nf4.engine, messages, GenerationSettings(do_sample=False, max_new_tokens=16))
        assert reply.text == processor.decode(expected, skip_special_tokens=True)
        assert nf4.engine.layout.ids == inputs.input_ids[0].tolist()  # it ran on the fast engine
    else:
        forced, inputs, positions = picture_forced_logits(nf4.engine, messages, [png], expected[:-1])
        reference = picture_reference_logits(model, inputs, positions, expected[:-1]).float()
        classic = relative_error(picture_reference_logits(model, inputs, positions, expected[:-1], incremental=True).float(), reference)
        assert relative_error(forced.float(), reference) <= 1.5 * max(classic, 1e-3)  # as far as the recipe's own paths differ


def test_turns_without_pictures_take_the_graph_and_match_a_plain_forward(nf4):
    engine = nf4.engine.text_engine
    tokenizer = nf4.processor.tokenizer
    from qwen_magic.prompt import prompt_ids

    prompt = prompt_ids(tokenizer, [{"role": "user", "content": "介绍广州这座城市"}])
    reply = tokenizer("广州是广东省的省会。<|im_end|>", add_special_tokens=False)["input_ids"]
    graph = forced_logits(engine, prompt, reply).float()
    reference = reference_logits(nf4.model, prompt, reply).float()
    # A plain forward runs other kernels than one token at a time: the fast path may differ from it no more
    # than the classic recipe's own incremental path does (as in test_gpu.py).
    classic = relative_error(incremental_logits(nf4.model, prompt, reply).float(), reference)
    assert relative_error(graph, reference) <= 1.5 * max(classic, 1e-3)


def test_a_picture_then_text_turns_reuse_the_pictures_cache(nf4):
    png = figure_png(640, 480)
    settings = GenerationSettings(do_sample=False, max_new_tokens=8)
    engine = nf4.engine
    history = [{"role": "user", "content": "plot?", "images": [png]}]
    first = generate_reply(engine, history, settings)
    picture_end = engine.layout.spans[0][1]
    assert engine.layout.delta < 0 and engine.text_engine.rope_delta.item() == engine.layout.delta
    history += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "再见"}]
    again = generate_reply(engine, history, settings)
    assert again.cached_tokens > picture_end  # the picture's keys and values came from the cache
    other = generate_reply(engine, [dict(history[0], images=[figure_png(640, 481)])] + history[1:], settings)
    assert other.cached_tokens <= picture_end  # another picture: not taken from the cache
