"""One figure into a model of Qwen2.5-VL-7B-Instruct's exact shape, in NF4, on one CUDA GPU.

Needs no network: builds the model with random weights (float16), saves it with a tiny
processor (Qwen2-VL's image processor, patch 14, merge 2), and loads it through
``%qwen_load``'s own loader. Measures, for one 1024x768 figure and a question: the image's
tokens, the prefill (time to first token, nothing cached), decode tokens/s of that turn (the
fast engine with the picture's 3-D positions, or generate where the fast engine cannot run),
the time to first token of a follow-up question with the figure still in the window (its keys
and values come from the cache), decode tokens/s of a text turn once the figure has left the
window, peak GPU memory of the image turn, and what the loaded model takes (will it fit a T4's 15 GB?).

    python benchmarks/bench_vision.py --out DIR [--dtype float16] [--tokens 128] [--model-dir DIR]

Writes DIR/bench_vision.json and prints a Markdown table.
"""

import argparse
import io
import json
import os
import platform
import statistics
import tempfile
import time

import torch

from qwen_magic import loader
from qwen_magic.engine import generate_reply
from qwen_magic.images import normalize
from qwen_magic.settings import GenerationSettings

TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
            num_key_value_heads=4, max_position_embeddings=128000, rope_theta=1000000.0, rms_norm_eps=1e-6,
            rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, tie_word_embeddings=False)
VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
              tokens_per_second=2, hidden_act="silu")


def build(path, device="cuda"):
    """Random float16 weights of Qwen2.5-VL-7B's shape, and the tiny VL tokenizer and processor."""
    import transformers
    from transformers import GenerationConfig, Qwen2VLImageProcessor

    from qwen_magic.tiny import VISION_TOKENS, build_tokenizer, vl_chat_template

    tokenizer = build_tokenizer(style="vl")
    tokenizer.chat_template = vl_chat_template("You are a helpful assistant.")
    ids = dict(zip(VISION_TOKENS, tokenizer.convert_tokens_to_ids(VISION_TOKENS)))
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(TEXT, eos_token_id=end, bos_token_id=None), vision_config=VISION,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"])
    torch.set_default_dtype(torch.float16)
    with torch.device(device):
        model = transformers.Qwen2_5_VLForConditionalGeneration(config)
    torch.set_default_dtype(torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=[end], pad_token_id=end, do_sample=True, temperature=0.7, top_p=0.8,
                                               top_k=20, repetition_penalty=1.05)
    model.save_pretrained(path)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    processor = transformers.Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2),
        tokenizer=tokenizer, video_processor=transformers.Qwen2VLVideoProcessor(), chat_template=tokenizer.chat_template)
    processor.save_pretrained(path)


def figure(width=1024, height=768):
    """A 1024x768 line plot drawn with matplotlib, as a notebook shows it (PIL lines where matplotlib is missing)."""
    try:
        import matplotlib
    except ImportError:
        from PIL import Image, ImageDraw

        image = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(image)
        draw.line([(40 + i * 4, height - 40 - int(30 * (i / 10) ** 0.5 * 10)) for i in range(230)], fill=(31, 119, 180), width=2)
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue()

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(width / 100, height / 100), dpi=100)
    xs = [i / 10 for i in range(200)]
    plt.plot(xs, [x ** 0.5 for x in xs], label="sales")
    plt.plot(xs, [(x % 7) / 2 for x in xs], label="returns")
    plt.legend()
    plt.title("Sales and returns")
    out = io.BytesIO()
    fig.savefig(out, format="png")
    plt.close(fig)
    return out.getvalue()


def recipe(loaded, png, tokens, results):
    """The model card's recipe on the same loaded model: processor chat template, processor(text, images),
    generate (its own SDPA attention), greedy; first token, then decode at a forced length."""
    from PIL import Image

    model, processor = loaded.model, loaded.processor
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What does this plot show?"}]}]
    attention = model.config._attn_implementation
    model.set_attn_implementation("sdpa")

    def run(n):  # from the PNG, as a notebook has it: the processor's work counts, as it does for qwen_magic
        torch.cuda.synchronize()
        started = time.perf_counter()
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[text], images=[Image.open(io.BytesIO(png)).convert("RGB")], return_tensors="pt").to(model.device)
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - started

    try:
        run(4)  # warm-up
        torch.cuda.reset_peak_memory_stats()
        firsts = [run(1) for _ in range(3)]
        wholes = [run(tokens) for _ in range(2)]
        results["peak_gib_recipe_image_turn"] = torch.cuda.max_memory_allocated() / 2**30
    finally:
        model.set_attn_implementation(attention)
    results["prefill_s_recipe_image_turn"] = statistics.median(firsts)
    results["decode_tps_recipe_image_turn"] = (tokens - 1) / (statistics.median(wholes) - statistics.median(firsts))


def profile(loaded, question, png):
    """Where the image turn's first token goes: qwen_magic's cold prefill against the recipe's (torch profiler)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fast = getattr(loaded.engine, "text_engine", None)
    one = GenerationSettings(max_new_tokens=1, do_sample=False)
    for name, run in (("qwen_magic", lambda: generate_reply(loaded.engine, question, one)),
                      ("recipe", lambda: recipe(loaded, png, 2, {}))):
        if fast is not None:
            fast.cached_ids = []
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()
        print(f"\n--- {name}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--dtype", default="float16", help="compute dtype (float16 is what a T4 uses)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--model-dir", help="reuse a model built earlier")
    parser.add_argument("--profile", action="store_true", help="print where the image turn's first token goes, ours and the recipe's")
    args = parser.parse_args()
    import bitsandbytes
    import transformers

    results = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
               "bitsandbytes": bitsandbytes.__version__, "python": platform.python_version(), "compute_dtype": args.dtype,
               "new_tokens": args.tokens, "shape": "qwen2.5-vl-7b"}
    path = args.model_dir or tempfile.mkdtemp(prefix="qwen-vl-7b-shape-")
    if not os.path.exists(os.path.join(path, "config.json")):
        started = time.perf_counter()
        build(path)
        print(f"built and saved the Qwen2.5-VL-7B-shaped model in {time.perf_counter() - started:.0f} s")
    loaded = loader.load(path, bits=4, dtype=args.dtype, engine="auto", notify=lambda _: None)
    results.update(load_s=loaded.seconds, loaded_gib=torch.cuda.memory_allocated() / 2**30, engine=loaded.engine.name + loaded.engine_note)
    loaded.engine.end_ids = set()  # a forced length (random weights would end replies anywhere)
    if getattr(loaded.engine, "text_engine", None) is not None:
        loaded.engine.text_engine.end_ids = set()
    png = normalize(figure())  # the default pixel budget keeps 1024x768 whole
    question = [{"role": "user", "content": "[image 1]\n\nWhat does this plot show?", "images": [png]}]
    results["image_tokens"] = loaded.engine.prompt.image_tokens(png)
    settings = GenerationSettings(max_new_tokens=args.tokens, do_sample=False)
    generate_reply(loaded.engine, question, GenerationSettings(max_new_tokens=4, do_sample=False))  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    def cold():  # nothing cached: each run measures the whole prefill, picture included
        fast = getattr(loaded.engine, "text_engine", None)
        if fast is not None:
            fast.cached_ids = []
            if fast.states is not None:
                fast.states.clear()
                fast.states.reset()

    runs = []
    for _ in range(3):
        cold()
        runs.append(generate_reply(loaded.engine, question, settings))
    results["peak_gib_image_turn"] = torch.cuda.max_memory_allocated() / 2**30
    results["prompt_tokens_image_turn"] = runs[0].prompt_tokens
    results["prefill_s_image_turn"] = statistics.median(r.first_token_seconds for r in runs)
    results["new_tokens_image_turn"] = [r.new_tokens for r in runs]
    results["decode_tps_image_turn"] = statistics.median(r.tokens_per_second for r in runs if r.tokens_per_second)
    follow = question + [{"role": "assistant", "content": runs[-1].text}, {"role": "user", "content": "Is anything unusual?"}]
    followed = [generate_reply(loaded.engine, follow, settings) for _ in range(3)]  # the picture's keys and values cached
    results["first_token_s_follow_up"] = statistics.median(r.first_token_seconds for r in followed)
    results["cached_tokens_follow_up"] = followed[0].cached_tokens
    recipe(loaded, png, args.tokens, results)
    if args.profile:
        profile(loaded, question, png)
    text = [{"role": "user", "content": "它有什么好吃的美食吗?"}]  # the figure has left the window
    generate_reply(loaded.engine, text, GenerationSettings(max_new_tokens=4, do_sample=False))
    rates = [generate_reply(loaded.engine, text, settings).tokens_per_second for _ in range(3)]
    results["decode_tps_text_turn"] = statistics.median(r for r in rates if r)
    loader.free(loaded)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_vision.json"), "w") as file:
        json.dump(results, file, indent=1)
    print(f"\n{results['card']} · torch {results['torch']} · transformers {results['transformers']} · {args.dtype} compute")
    print(f"engine: {results['engine']}\n")
    print("| measure | value |\n|---|---:|")
    for label, key, fmt in [
        ("recipe (processor + generate): prefill of the image turn, s", "prefill_s_recipe_image_turn", "{:.3f}"),
        ("recipe: decode tokens/s, image turn", "decode_tps_recipe_image_turn", "{:.1f}"),
        ("recipe: peak GPU memory of the image turn, GiB", "peak_gib_recipe_image_turn", "{:.2f}"),
        ("image tokens of one 1024×768 figure", "image_tokens", "{:,}"),
        ("prompt tokens of the image turn", "prompt_tokens_image_turn", "{:,}"),
        ("qwen_magic: prefill (time to first token) of the image turn, s", "prefill_s_image_turn", "{:.3f}"),
        ("qwen_magic: decode tokens/s, image turn", "decode_tps_image_turn", "{:.1f}"),
        ("time to first token of a follow-up question, the figure cached, s", "first_token_s_follow_up", "{:.3f}"),
        ("tokens of the follow-up taken from the cache", "cached_tokens_follow_up", "{:,}"),
        ("decode tokens/s, text turn (the figure out of the window)", "decode_tps_text_turn", "{:.1f}"),
        ("GPU memory after loading, GiB", "loaded_gib", "{:.2f}"),
        ("qwen_magic: peak GPU memory of the image turn, GiB", "peak_gib_image_turn", "{:.2f}"),
        ("load time, s", "load_s", "{:.1f}"),
    ]:
        print(f"| {label} | {fmt.format(results[key])} |")


if __name__ == "__main__":
    main()
