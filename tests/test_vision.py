"""Pictures in the chat with tiny random Qwen2.5-VL and Qwen3-VL models (processor built here, no download).

For a message with an image, greedy replies must equal the classic recipe's:
``processor.apply_chat_template`` + ``processor(text=..., images=...)`` + ``model.generate``.
"""

import io
import json

import pytest
import torch
from IPython.utils.capture import capture_output

pytest.importorskip("torchvision")  # the Qwen2-VL image processor of transformers 5 needs it
Image = pytest.importorskip("PIL.Image")

from qwen_magic.images import digest, fit, normalize  # noqa: E402
from qwen_magic.tiny import available_vl_families, write_tiny_vl_model  # noqa: E402
from helpers import ask, usage_error  # noqa: E402

FAMILIES = available_vl_families()
if not FAMILIES:
    pytest.skip("this transformers has no Qwen vision-language classes", allow_module_level=True)


@pytest.fixture(scope="session", params=FAMILIES)
def vl_model_dir(request, tmp_path_factory):
    return str(write_tiny_vl_model(tmp_path_factory.mktemp(request.param), family=request.param))


class VisionRecipe:
    """The classic recipe of the model cards: processor chat template, processor(text, images), generate, decode."""

    def __init__(self, path):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(path)
        self.model = AutoModelForImageTextToText.from_pretrained(path)

    def inputs(self, messages, images):
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.processor(text=[text], images=images or None, return_tensors="pt")

    def reply(self, messages, images, max_new_tokens):
        inputs = self.inputs(messages, images)
        output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return self.processor.batch_decode(output[:, inputs.input_ids.shape[1]:], skip_special_tokens=True)[0]


@pytest.fixture(scope="session")
def vl_recipe(vl_model_dir):
    return VisionRecipe(vl_model_dir)


@pytest.fixture
def vl_chat(ip, qwen, vl_model_dir):
    with capture_output() as shown:
        ip.run_line_magic("qwen_load", vl_model_dir)
    qwen.load_line = shown.stdout
    ip.run_line_magic("config", "QwenMagics.do_sample = False")
    ip.run_line_magic("config", "QwenMagics.max_new_tokens = 10")
    return qwen


def picture(width, height, seed=0):
    """A PNG with some structure (a plain colour would give the same patches everywhere)."""
    import random

    rng = random.Random(seed)
    image = Image.new("RGB", (width, height), (240, 240, 240))
    for _ in range(40):
        x, y = rng.randrange(width), rng.randrange(height)
        image.paste((rng.randrange(256), rng.randrange(256), rng.randrange(256)), (x, y, min(width, x + 40), min(height, y + 30)))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def as_pil(png):
    return Image.open(io.BytesIO(png)).convert("RGB")


def user(text, images=0):
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}] if images else text}


def test_the_load_line_says_it_sees_images(vl_chat):
    assert "sees images · engine: transformers generate" in vl_chat.load_line


def recipe_history(conversation):
    """The conversation's messages as the recipe gives them, and its pictures in order."""
    messages = [user(m["content"], len(m.get("images", ()))) if m["role"] == "user" else {"role": "assistant", "content": m["content"]}
                for m in conversation.messages]
    return messages, [as_pil(conversation.images[n]) for m in conversation.messages for n in m.get("images", ())]


@pytest.fixture
def fast_chat(ip, qwen, vl_model_dir):
    with capture_output() as shown:
        ip.run_line_magic("qwen_load", f"{vl_model_dir} --engine fast")
    qwen.load_line = shown.stdout
    ip.run_line_magic("config", "QwenMagics.do_sample = False")
    return qwen


@pytest.mark.parametrize("chunk", [2048, 16])  # 16: the prefill in chunks, which never split a picture
def test_the_fast_engine_takes_pictures_exactly_over_turns(ip, fast_chat, vl_recipe, tmp_path, monkeypatch, chunk):
    import qwen_magic.fast

    monkeypatch.setattr(qwen_magic.fast, "PREFILL_CHUNK", chunk)
    ip.run_line_magic("config", "QwenMagics.max_new_tokens = 8")
    assert "sees images · engine: static KV cache" in fast_chat.load_line and "generate" not in fast_chat.load_line
    engine = fast_chat.loaded.engine
    fast = engine.text_engine
    one, two = tmp_path / "one.png", tmp_path / "two.png"
    one.write_bytes(picture(120, 96, 1))
    two.write_bytes(picture(120, 96, 2))  # the same size: the same tokens, other pixels
    turns = [("介绍广州这座城市", ""), ("What does this plot show?", f"--image {one}"), ("And the colours?", ""),
             ("And the axes?", ""), ("regenerate", ""), ("Compare with this one.", f"--image {two}"), ("Which is brighter?", "")]
    cached = []
    for question, line in turns:
        if question == "regenerate":
            with capture_output() as shown:
                ip.run_line_magic("qwen_regenerate", "")
        else:
            shown = ask(ip, question, line)
        messages, pictures = recipe_history(fast_chat.conversation)
        expected = vl_recipe.reply(messages[:-1], pictures, 8)
        assert messages[-1]["content"] == expected, question
        assert ip.user_ns["_qwen"] == expected
        cached.append(shown.outputs[-1].data["text/markdown"])
        tokens = vl_recipe.inputs(messages[:-1], pictures).input_ids.shape[1]
        assert engine.layout.ids == vl_recipe.inputs(messages[:-1], pictures).input_ids[0].tolist()[:tokens]
    # every turn after the first reuses the cache, the picture's keys and values included
    assert all("cached)" in footer for footer in cached[1:])
    assert engine.layout.delta < 0 and len(fast.cached_ids) > engine.layout.spans[-1][1]
    assert fast.rope_delta.item() == engine.layout.delta


def test_another_picture_of_the_same_size_is_not_taken_from_the_cache(fast_chat, vl_recipe):
    from qwen_magic.engine import generate_reply
    from qwen_magic.settings import GenerationSettings

    engine = fast_chat.loaded.engine
    settings = GenerationSettings(do_sample=False, max_new_tokens=8)
    one, two = normalize(picture(150, 100, 3)), normalize(picture(150, 100, 4))
    for png in (one, two, one, one):
        messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."},
                    {"role": "user", "content": "What is it?", "images": [png]}]
        reply = generate_reply(engine, messages, settings)
        recipe = [user("Hello"), {"role": "assistant", "content": "Hi."}, user("What is it?", 1)]
        assert reply.text == vl_recipe.reply(recipe, [as_pil(png)], 8)
        first = engine.layout.spans[0][0]
        if png == two or reply.cached_tokens < len(engine.layout.ids) - 1:
            # the tokens match up to the end; the pixels do not past the picture's start (a hybrid model starts over)
            assert reply.cached_tokens <= first
    assert reply.cached_tokens >= len(engine.layout.ids) - 1  # the same picture again: all of it from the cache


@pytest.mark.parametrize("chunk", [2048, 64])
def test_a_picture_turn_on_the_fast_engine_equals_a_plain_forward_by_teacher_forcing(vl_model_dir, monkeypatch, chunk):
    """Logits, not only greedy replies: the prefill with a picture of a few hundred patches (the vision tower's
    attention is not the text model's causal attention over the cache) and forced decode steps, against a plain
    forward of the same model at the 3-D positions generate uses, in float32."""
    import qwen_magic.fast
    from qwen_magic import loader
    from test_fast import relative_error
    from vision_helpers import picture_forced_logits, picture_reference_logits

    monkeypatch.setattr(qwen_magic.fast, "PREFILL_CHUNK", chunk)
    loaded = loader.load(vl_model_dir, bits=16, dtype="float32", engine="fast", notify=lambda _: None)
    try:
        png = normalize(picture(320, 240, 6))
        reply = loaded.processor.tokenizer("The plot shows a wave.<|im_end|>", add_special_tokens=False)["input_ids"]
        messages = [{"role": "user", "content": "What does this plot show?", "images": [png]}]
        fast, inputs, positions = picture_forced_logits(loaded.engine, messages, [png], reply)
        assert int(inputs["image_grid_thw"].prod()) > 64  # more patches than a decode-sized query
        reference = picture_reference_logits(loaded.model, inputs, positions, reply)
        assert relative_error(fast, reference) < 1e-4  # the recipe's own incremental path: about 1e-5
    finally:
        loader.free(loaded)


def test_where_pictures_are_kept_off_the_fast_engine_they_take_generate(fast_chat, vl_recipe):
    """With pictures turned off the fast engine (vision.py's switch): a window with a picture goes to generate,
    untouched by the fast engine's cache; a text window after it still takes the fast engine."""
    from qwen_magic.engine import generate_reply
    from qwen_magic.settings import GenerationSettings

    engine = fast_chat.loaded.engine
    engine.pictures_on_fast = False
    settings = GenerationSettings(do_sample=False, max_new_tokens=8)
    png = normalize(picture(150, 100, 5))
    text_turn = [{"role": "user", "content": "Hello"}]
    generate_reply(engine, text_turn, settings)
    cached = list(engine.text_engine.cached_ids)
    messages = [{"role": "user", "content": "What is it?", "images": [png]}]
    reply = generate_reply(engine, messages, settings)
    assert reply.text == vl_recipe.reply([user("What is it?", 1)], [as_pil(png)], 8)
    assert reply.cached_tokens == 0 and engine.text_engine.cached_ids == cached  # generate: the cache untouched
    again = generate_reply(engine, text_turn, settings)
    assert again.cached_tokens > 0  # the text window: the fast engine, its cache kept


def test_continue_on_the_fast_engine_keeps_the_picture(ip, fast_chat, vl_recipe, tmp_path):
    path = tmp_path / "plot.png"
    path.write_bytes(picture(100, 80))
    ask(ip, "Describe it at length.", f"--image {path} --max-new-tokens 4")
    asked, first = fast_chat.conversation.messages
    with capture_output():
        ip.run_line_magic("qwen_continue", "--max-new-tokens 4")
    messages = [user(asked["content"], 1), {"role": "assistant", "content": first["content"]}]
    text = vl_recipe.processor.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    inputs = vl_recipe.processor(text=[text], images=[as_pil(path.read_bytes())], return_tensors="pt")
    output = vl_recipe.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    continued = vl_recipe.processor.batch_decode(output[:, inputs.input_ids.shape[1]:], skip_special_tokens=True)[0]
    assert fast_chat.conversation.messages[-1]["content"] == first["content"] + continued


def test_reuse_needs_equal_tokens_pictures_and_positions():
    from qwen_magic.vision import Layout, reusable

    positions = torch.tensor([[0, 1, 2, 2, 2, 2, 4, 5], [0, 1, 2, 2, 3, 3, 4, 5], [0, 1, 2, 3, 2, 3, 4, 5]])
    ids = [1, 2, 9, 9, 9, 9, 3, 4]
    cached = Layout(ids, positions, -2, [(2, 6, "a")])
    reply = ids + [7, 8]  # the reply sits at text position + delta
    assert reusable(None, reply, cached) == 0
    assert reusable(cached, reply, Layout(reply + [5], torch.cat([positions, torch.tensor([[6, 7, 8]] * 3)], 1), -2, [(2, 6, "a")])) == 10
    assert reusable(cached, reply, Layout(ids, positions, -2, [(2, 6, "b")])) == 2  # another picture
    moved = positions.clone()
    moved[1, 4] = 9
    assert reusable(cached, reply, Layout(ids, moved, -2, [(2, 6, "a")])) == 2  # never part of a picture
    assert reusable(cached, reply[:4], Layout(ids, positions, -2, [(2, 6, "a")])) == 2


def test_an_image_file_reply_equals_the_recipe_over_turns(ip, vl_chat, vl_recipe, tmp_path):
    png = picture(300, 200)
    path = tmp_path / "plot.png"
    path.write_bytes(png)
    ask(ip, "What does this plot show?", f"--image {path}")
    first = "[image 1]\n\nWhat does this plot show?"
    stored = vl_chat.conversation.messages[-2]
    assert stored["content"] == first and stored["images"] == [digest(normalize(png))]
    history = [user(first, 1)]
    expected = vl_recipe.reply(history, [as_pil(png)], 10)
    assert ip.user_ns["_qwen"] == expected
    history.append({"role": "assistant", "content": expected})

    shown = ask(ip, "And the colours?")  # the picture stays in the history the model is given
    history.append(user("And the colours?"))
    expected = vl_recipe.reply(history, [as_pil(png)], 10)
    assert ip.user_ns["_qwen"] == expected
    tokens = vl_recipe.inputs(history, [as_pil(png)]).input_ids.shape[1]
    assert f"context {tokens:,} / " in shown.outputs[-1].data["text/markdown"]  # the processor's own count


def test_pictures_are_processed_once_and_the_inputs_stay_the_recipes(vl_model_dir, vl_recipe, monkeypatch):
    """A later turn takes the pictures' processed pixels from the cache; the inputs equal a direct processor
    call, tensor for tensor, with one picture, two of different sizes, and again after the cache evicted one."""
    from transformers import AutoProcessor

    from qwen_magic import picture_cache
    from qwen_magic.vision import VisionPrompt

    prompt = VisionPrompt(AutoProcessor.from_pretrained(vl_model_dir))
    real = prompt.processor.image_processor
    one, two, three = normalize(picture(200, 150, 7)), normalize(picture(120, 260, 8)), normalize(picture(90, 90, 9))
    conversation = [{"role": "user", "content": "What is it?", "images": [one]}]
    turns = [
        conversation,
        conversation + [{"role": "assistant", "content": "A chart."}, {"role": "user", "content": "And this?", "images": [two]}],
        conversation + [{"role": "assistant", "content": "A chart."}, {"role": "user", "content": "And this?", "images": [two]},
                        {"role": "assistant", "content": "Another."}, {"role": "user", "content": "Colours?"}],
    ]
    prompt._pictures = picture_cache.PictureCache(kept=2)
    processed = []
    original_call = picture_cache._StandIn.__call__

    def counting(self, images=None, *args, **kwargs):
        before = sum(len(p.features) for p in self._pictures)
        out = original_call(self, images, *args, **kwargs)
        processed.append(sum(len(p.features) for p in self._pictures) - before)
        return out

    monkeypatch.setattr(picture_cache._StandIn, "__call__", counting)
    for messages in turns + [[{"role": "user", "content": "New picture.", "images": [three]}], turns[1]]:
        got, text = prompt.inputs(messages)
        pictures = [as_pil(png) for m in messages for png in m.get("images", ())]
        expected = prompt.processor(text=[text], images=pictures, return_tensors="pt")
        assert got.keys() == expected.keys()
        for name in expected:
            assert torch.equal(got[name], expected[name]), name
        assert prompt.processor.image_processor is real  # the stand-in is gone after each call
    # processed: turn 1 one new picture; turn 2 only the new one; turn 3 none; then a third picture (evicting
    # the first, kept=2); then turn 2 again: the first picture again (evicted), the second from the cache
    assert processed == [1, 1, 0, 1, 1]


def test_the_window_counts_image_tokens_as_the_processor_does(vl_chat, vl_recipe):
    from qwen_magic.vision import VisionPrompt

    prompt = VisionPrompt(vl_recipe.processor)
    one, two = picture(640, 480, 1), picture(200, 500, 2)
    messages = [{"role": "user", "content": "two pictures", "images": [one, two]}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "and again", "images": [one]}]
    recipe = [user("two pictures", 2), {"role": "assistant", "content": "ok"}, user("and again", 1)]
    expected = vl_recipe.inputs(recipe, [as_pil(one), as_pil(two), as_pil(one)]).input_ids.shape[1]
    assert prompt.count(messages) == expected > 300


def test_images_are_shrunk_to_the_pixel_budget(ip, vl_chat, vl_recipe, tmp_path):
    ip.run_line_magic("config", "QwenMagics.image_max_pixels = 100000")
    path = tmp_path / "big.png"
    path.write_bytes(picture(1024, 768))
    ask(ip, "big", f"--image {path}")
    stored = vl_chat.conversation.images[vl_chat.conversation.messages[-2]["images"][0]]
    width, height = as_pil(stored).size
    assert (width, height) == fit(1024, 768, 100000) and width * height <= 100000
    assert abs(width / height - 1024 / 768) < 0.01
    expected = vl_recipe.reply([user("[image 1]\n\nbig", 1)], [as_pil(stored)], 10)
    assert ip.user_ns["_qwen"] == expected


def cell(ip, code):
    return ip.run_cell(code, store_history=True).execution_count


def test_out_and_with_attach_the_image_a_cell_made(ip, vl_chat, vl_recipe):
    pytest.importorskip("matplotlib")
    number = cell(ip, "from PIL import Image as _I\n_I.new('RGB', (120, 90), (200, 30, 30))")
    ask(ip, f"what is {{Out[{number}]}}?")
    message = vl_chat.conversation.messages[-2]
    assert message["content"] == "what is [image 1]?" and len(message["images"]) == 1
    assert as_pil(vl_chat.conversation.images[message["images"][0]]).size == (120, 90)

    import matplotlib
    from IPython.core.pylabtools import select_figure_formats

    matplotlib.use("agg")
    select_figure_formats(ip, {"png"})  # what %matplotlib inline (a kernel's default) sets up
    try:
        figure = cell(ip, "import matplotlib.pyplot as plt\nfrom IPython.display import display\n"
                          "fig = plt.figure(figsize=(4, 3), dpi=50)\nplt.plot([1, 3, 2])\ndisplay(fig)\nplt.close(fig)")
    finally:
        select_figure_formats(ip, set())
    ask(ip, "what does this plot show?", f"--with {figure}")
    message = vl_chat.conversation.messages[-2]
    assert f"Cell {figure}, displayed: [image 1]" in message["content"]
    png = vl_chat.conversation.images[message["images"][0]]
    shown = vl_chat.recorder.images[figure]
    assert len(shown) == 1 and as_pil(png).size == as_pil(shown[0]).size  # the figure as displayed (tight bounding box)
    history = vl_chat.conversation.messages
    recipe = []
    for m in history[:-1]:
        recipe.append(user(m["content"], len(m.get("images", ()))) if m["role"] == "user" else {"role": "assistant", "content": m["content"]})
    pictures = [as_pil(vl_chat.conversation.images[n]) for m in history for n in m.get("images", ())]
    assert ip.user_ns["_qwen"] == vl_recipe.reply(recipe, pictures, 10)


def test_qwen_explain_attaches_the_failing_cells_figure(ip, vl_chat):
    cell(ip, "from IPython.display import Image as _Img, display\nfrom PIL import Image as _I\nimport io\n_b = io.BytesIO()\n"
             "_I.new('RGB', (64, 48), (9, 9, 9)).save(_b, format='PNG')\ndisplay(_Img(_b.getvalue()))\n1 / 0")
    with capture_output():
        ip.run_line_magic("qwen_explain", "")
    message = vl_chat.conversation.messages[-2]
    assert "ZeroDivisionError" in message["content"] and message["content"].endswith("The cell displayed: [image 1]")
    assert as_pil(vl_chat.conversation.images[message["images"][0]]).size == (64, 48)


def test_saved_and_autosaved_histories_with_images_load_back_equal(ip, vl_chat, tmp_path):
    path = tmp_path / "plot.png"
    path.write_bytes(picture(200, 100))
    autosave = tmp_path / "auto.json"
    ip.run_line_magic("config", f"QwenMagics.autosave = {str(autosave)!r}")
    ask(ip, "look", f"--image {path}")
    ask(ip, "and this", f"--image {path}")  # the same picture twice: stored once
    ip.run_line_magic("config", "QwenMagics.autosave = None")  # --clear below would autosave the empty conversation
    before = vl_chat.conversation.copy()
    with capture_output():
        ip.run_line_magic("qwen_history", f"--save {tmp_path / 'one.json'}")
    saved = json.loads((tmp_path / "one.json").read_text())
    assert list(saved["images"]) == [before.messages[0]["images"][0]]
    for source in ("one.json", "auto.json"):
        with capture_output():
            ip.run_line_magic("qwen_history", "--clear")
            ip.run_line_magic("qwen_history", f"--load {tmp_path / source}")
        assert vl_chat.conversation.to_json() == before.to_json()
        assert vl_chat.conversation.images == before.images
    with capture_output() as shown:
        ip.run_line_magic("qwen_history", "--json")
    assert "base64" not in shown.stdout and len(shown.stdout) < 2000
    with capture_output() as shown:
        ip.run_line_magic("qwen_history", "")
    table = shown.outputs[-1].data["text/markdown"]
    assert "[1 image: 200×100]" in table and "(+" in table and "iVBOR" not in table
    with capture_output() as shown:
        ip.run_line_magic("qwen_history", f"--export {tmp_path / 'chat.md'}")
    name = before.messages[0]["images"][0]
    assert (tmp_path / f"chat-{name[:12]}.png").read_bytes() == before.images[name]
    assert f"![image 1](chat-{name[:12]}.png)" in (tmp_path / "chat.md").read_text()


def test_a_file_whose_image_does_not_match_its_hash_is_refused(ip, vl_chat, tmp_path):
    from qwen_magic.images import to_base64

    png = normalize(picture(50, 40))
    good = {"format": "qwen_magic.conversation", "version": 1,
            "messages": [{"role": "user", "content": "x", "images": [digest(png)]}, {"role": "assistant", "content": "y"}],
            "images": {digest(png): to_base64(png)}}
    bad = dict(good, images={digest(png): to_base64(png + b"tampered")})
    missing = dict(good, images={})
    ask(ip, "keep me")
    before = vl_chat.conversation.to_json()
    for data, complaint in ((bad, "SHA-256"), (missing, "which the file does not hold")):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(data))
        assert complaint in usage_error(ip.run_line_magic, "qwen_history", f"--load {path}")
        assert vl_chat.conversation.to_json() == before


def test_a_bad_image_file_is_one_line_and_nothing_is_sent(ip, vl_chat, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a picture")
    assert usage_error(ip.run_cell_magic, "qwen", f"--image {path}", "hi").endswith("is not an image PIL can read (UnidentifiedImageError); nothing was sent.")
    assert "Cannot read --image" in usage_error(ip.run_cell_magic, "qwen", f"--image {tmp_path / 'none.png'}", "hi")
    assert vl_chat.conversation.messages == []


def test_a_text_model_refuses_image_files_and_describes_images(ip, chat, tmp_path):
    path = tmp_path / "plot.png"
    path.write_bytes(picture(30, 20))
    assert "does not see images" in usage_error(ip.run_cell_magic, "qwen", f"--image {path}", "hi")
    number = cell(ip, "from PIL import Image as _I\n_I.new('RGB', (12, 9))")
    ask(ip, f"{{Out[{number}]}}")
    message = chat.conversation.messages[-2]
    assert "image, size (12, 9); the image itself is not sent" in message["content"] and "images" not in message


def test_through_a_server_images_go_as_image_url_data_parts(ip, qwen, vl_model_dir, vl_recipe, tmp_path):
    pytest.importorskip("openai")
    import base64

    from faultserver import FaultServer

    server = FaultServer(models=[vl_model_dir])  # named by the model's path: its config and processor are at hand
    try:
        with capture_output() as shown:
            ip.run_line_magic("qwen_load", f"--server {server.url} {vl_model_dir}")
        assert "sees images · engine: OpenAI-compatible server" in shown.stdout
        png = picture(160, 120)
        path = tmp_path / "plot.png"
        path.write_bytes(png)
        ip.run_line_magic("config", "QwenMagics.show_stats = False")
        ask(ip, "What does this plot show?", f"--image {path}")
        content = server.requests[-1]["messages"][-1]["content"]
        assert [part["type"] for part in content] == ["image_url", "text"]
        url = content[0]["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        assert base64.b64decode(url.split(",", 1)[1]) == normalize(png)
        assert content[1] == {"type": "text", "text": "[image 1]\n\nWhat does this plot show?"}
        # Without the server's usage figures, the prompt is counted as the processor counts it.
        server.reset("no-usage")
        ask(ip, "And now?")
        history = [user("[image 1]\n\nWhat does this plot show?", 1), {"role": "assistant", "content": "Hello, world!"}, user("And now?")]
        expected = vl_recipe.inputs(history, [as_pil(png)]).input_ids.shape[1]
        from qwen_magic.chat import counter

        messages = [{k: m[k] for k in ("role", "content", "images") if k in m} for m in qwen.conversation.messages[:-1]]
        assert counter(qwen.loaded, qwen.conversation.images, None)(messages) == expected
    finally:
        server.close()


def test_continue_and_regenerate_keep_the_picture(ip, vl_chat, vl_recipe, tmp_path):
    path = tmp_path / "plot.png"
    path.write_bytes(picture(100, 80))
    ask(ip, "Describe it at length.", f"--image {path} --max-new-tokens 4")
    asked, first = vl_chat.conversation.messages
    assert first["unfinished"] == "length"
    with capture_output():
        ip.run_line_magic("qwen_continue", "--max-new-tokens 4")
    answer = vl_chat.conversation.messages[-1]["content"]
    messages = [user(asked["content"], 1), {"role": "assistant", "content": first["content"]}]
    text = vl_recipe.processor.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    inputs = vl_recipe.processor(text=[text], images=[as_pil(path.read_bytes())], return_tensors="pt")
    output = vl_recipe.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    continued = vl_recipe.processor.batch_decode(output[:, inputs.input_ids.shape[1]:], skip_special_tokens=True)[0]
    assert answer == first["content"] + continued
    with capture_output():
        ip.run_line_magic("qwen_regenerate", "")
    again = vl_chat.conversation.messages
    assert len(again) == 2 and again[0]["images"] == asked["images"] and again[0]["content"] == asked["content"]
    assert again[1]["content"] == vl_recipe.reply([user(asked["content"], 1)], [as_pil(path.read_bytes())], 10)


def test_a_vision_model_without_its_image_processor_is_one_line_and_keeps_the_model(ip, vl_chat, vl_model_dir, tmp_path):
    import shutil

    broken = tmp_path / "no-processor"
    shutil.copytree(vl_model_dir, broken)
    for name in ("processor_config.json", "preprocessor_config.json"):
        (broken / name).unlink(missing_ok=True)
    message = usage_error(ip.run_line_magic, "qwen_load", str(broken))
    assert message.startswith(f"Could not load the image processor of {broken} (")
    assert message.endswith(f"{vl_model_dir} is still loaded.")
    assert vl_chat.loaded.sees_images


def test_a_variable_holding_a_picture_and_with_minus_one(ip, vl_chat):
    cell(ip, "from PIL import Image as _I\nsnapshot = _I.new('RGB', (48, 32), (5, 100, 5))")
    ask(ip, "compare {snapshot} with the one before", "--with snapshot")
    message = vl_chat.conversation.messages[-2]
    # the same picture twice is attached once, and both places name it
    assert message["content"] == "Variable `snapshot`: [image 1]\n\ncompare [image 1] with the one before"
    assert len(message["images"]) == 1
    cell(ip, "from IPython.display import display\ndisplay(_I.new('RGB', (40, 30), (1, 1, 200)))\nprint('shown')")
    ask(ip, "what did it show?", "--with -1")
    message = vl_chat.conversation.messages[-2]
    assert message["content"].endswith("displayed: [image 1]\n\nwhat did it show?")
    assert as_pil(vl_chat.conversation.images[message["images"][0]]).size == (40, 30)
