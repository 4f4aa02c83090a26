"""A model split over two GPUs of one machine (issue 16): classic recipe vs qwen_magic's fast engine.

Needs at least two CUDA GPUs and no network. Side by side in one run, NF4 weights:

- the Qwen2.5-7B shape on one card (qwen_magic's fast engine and the recipe), for comparison;
- the same model split over both cards with ``device_map="balanced"`` (recipe, then the fast engine
  on the very same loaded model);
- a Qwen2.5-32B-shaped model split half and half (skip with --no-32b). It is built already quantized,
  layer by layer on its card (random float16 weights quantized to NF4 there), so no 65 GB float16
  copy is ever saved, loaded or held on one card.

For each: decode tokens/s (greedy, forced length), time to first token for a new message after
about --history tokens of history (the recipe prefills it all; qwen_magic has the history cached
from the turn before, and its uncached first turn is reported too), and GPU memory per card
(after loading, and the peak over the runs).

    python benchmarks/bench_split.py --out DIR [--dtype float16] [--tokens 128] [--history 8000] [--no-32b] [--model-dir DIR]

Writes DIR/bench-split.json and DIR/bench-split.md and prints the table. About 5 minutes on 2× H100.
"""

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import QUESTION, SHAPES, build_model, classic_generate, history_of, sync_time  # noqa: E402

from qwen_magic import loader, split  # noqa: E402
from qwen_magic.engine import generate_reply  # noqa: E402
from qwen_magic.prompt import prompt_ids  # noqa: E402
from qwen_magic.settings import GenerationSettings  # noqa: E402

QWEN25_32B = dict(SHAPES["qwen2.5-7b"][2], hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                  num_attention_heads=40, num_key_value_heads=8)
NEW_MESSAGE = {"role": "user", "content": "它有什么好吃的美食吗?"}
quiet = lambda _: None


def build_quantized_32b(dtype, fields=QWEN25_32B, devices=("cuda:0", "cuda:1"), rotary=1):
    """A Qwen2.5-32B-shaped model with random weights in NF4, layers 0-31 on cuda:0, 32-63 and the head on cuda:1."""
    import bitsandbytes as bnb
    import transformers
    from accelerate import dispatch_model, init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import GenerationConfig

    from qwen_magic.tiny import build_tokenizer

    config = transformers.Qwen2Config(**fields)
    with init_empty_weights():
        model = transformers.Qwen2ForCausalLM(config)
    half = config.num_hidden_layers // 2  # the embedding (cuda:0) and the head (cuda:1) weigh the same
    first, second = map(torch.device, devices)
    device_map = {"model.embed_tokens": first, **{f"model.layers.{i}": first if i < half else second for i in range(config.num_hidden_layers)},
                  "model.norm": second, "model.rotary_emb": (first, second)[rotary], "lm_head": second}
    for index, layer in enumerate(model.model.layers):
        device = device_map[f"model.layers.{index}"]
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                # as transformers' bitsandbytes integration builds it (no double quantization by default)
                quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                              compute_dtype=dtype, compress_statistics=False, quant_type="nf4", device="meta")
                weight = torch.empty(child.out_features, child.in_features, dtype=torch.float16, device=device)
                weight.normal_(0, config.initializer_range, generator=torch.Generator(device=device).manual_seed(index))
                quantized.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=False, quant_type="nf4",
                                                     module=quantized).to(device)
                if child.bias is not None:
                    quantized.bias = torch.nn.Parameter(torch.zeros(child.out_features, dtype=dtype, device=device), requires_grad=False)
                setattr(parent, name, quantized)
                del weight
    for name, tensor in list(model.named_parameters()):
        if tensor.device.type != "meta":
            continue
        target = next(device for prefix, device in device_map.items() if name.startswith(prefix + "."))
        if name.endswith("norm.weight"):
            value = torch.ones(tensor.shape, dtype=dtype, device=target)
        else:  # the embedding and the head: float16, as the loader keeps them
            value = torch.empty(tensor.shape, dtype=dtype, device=target).normal_(0, config.initializer_range)
        set_module_tensor_to_device(model, name, target, value=value)
        del value
    model = dispatch_model(model, device_map={k: (v.index if v.type == "cuda" else str(v)) for k, v in device_map.items()})
    model.set_attn_implementation("sdpa")
    model.eval()
    model.generation_config = GenerationConfig(eos_token_id=[151645, 151643], pad_token_id=151643, do_sample=True, temperature=0.7,
                                               top_p=0.8, top_k=20, repetition_penalty=1.05)
    return model, build_tokenizer(style="chatml")


def per_card(measure) -> list:
    return [round(measure(i) / 2**30, 2) for i in range(torch.cuda.device_count())]


def recipe_side(model, tokenizer, args, r, key):
    """The classic recipe on the model as loaded: generate, greedy, forced length; a full prefill of the history."""
    question = prompt_ids(tokenizer, [{"role": "user", "content": QUESTION}])
    n = args.recipe_tokens
    classic_generate(model, question, n, do_sample=False)  # warm-up (the GPU's clocks too)
    rates = []
    for _ in range(3):
        first, _ = sync_time(lambda: classic_generate(model, question, 1, do_sample=False))
        whole, _ = sync_time(lambda: classic_generate(model, question, n, do_sample=False))
        rates.append((n - 1) / (whole - first))
    r[f"decode_tps_recipe_{key}"] = statistics.median(rates)
    r[f"decode_tps_recipe_runs_{key}"] = rates
    history = history_of(tokenizer, args.history)
    ids = prompt_ids(tokenizer, history + [NEW_MESSAGE])
    r[f"history_tokens_{key}"] = len(ids)
    r[f"ttft_s_recipe_{key}"] = statistics.median(sync_time(lambda: classic_generate(model, ids, 1, do_sample=False))[0] for _ in range(2))


def ours_side(model, tokenizer, args, r, key, engine=None):
    """qwen_magic's fast engine: decode at a forced length; first token after a cached history."""
    if engine is None:
        engine, note = loader.pick_engine(model, tokenizer, "fast", 32768)
        r[f"engine_{key}"] = engine.name + note + (f" · {len(engine.graph.segments)} graph segments" if engine.split is not None else "")
    else:
        r[f"engine_{key}"] = engine.name
    engine.end_ids = set()
    question = [{"role": "user", "content": QUESTION}]
    greedy = GenerationSettings(max_new_tokens=args.tokens, do_sample=False)
    generate_reply(engine, question, greedy)  # warm-up
    r[f"decode_tps_ours_{key}"] = statistics.median(generate_reply(engine, question, greedy).tokens_per_second for _ in range(3))
    one = GenerationSettings(max_new_tokens=1, do_sample=False)
    history = history_of(tokenizer, args.history)
    engine._drop_cache()
    r[f"ttft_s_ours_uncached_{key}"] = generate_reply(engine, history + [NEW_MESSAGE], one).first_token_seconds
    times = []
    for _ in range(3):
        generate_reply(engine, history, one)  # the turn before: the history is in the cache, the new message is not
        reply = generate_reply(engine, history + [NEW_MESSAGE], one)
        times.append(reply.first_token_seconds)
        r[f"cached_tokens_{key}"] = reply.cached_tokens
    r[f"ttft_s_ours_{key}"] = statistics.median(times)
    engine.close()


def measure_loaded(model, tokenizer, args, r, key, recipe=True, engine=None):
    r[f"loaded_gib_{key}"] = per_card(torch.cuda.memory_allocated)
    r[f"split_{key}"] = split.describe(split.placement(model), split.device_bytes(model)) if split.is_split(split.placement(model)) else "one card"
    for i in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(i)
    started = time.perf_counter()
    if recipe:
        recipe_side(model, tokenizer, args, r, key)
        r[f"peak_gib_recipe_{key}"] = per_card(torch.cuda.max_memory_allocated)
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)
    try:
        ours_side(model, tokenizer, args, r, key, engine)
    except Exception as error:  # report the recipe's side anyway
        r[f"error_{key}"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        print(f"{key}: the fast engine failed: {r[f'error_{key}']}", flush=True)
    r[f"peak_gib_{key}"] = per_card(torch.cuda.max_memory_allocated)  # qwen_magic's runs (the recipe's apart, above)
    print(f"{key}: measured in {time.perf_counter() - started:.0f} s", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--dtype", default="float16", help="compute dtype (float16 is what a T4 uses)")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per decode measurement (qwen_magic)")
    parser.add_argument("--recipe-tokens", type=int, default=48, help="new tokens per decode measurement (the slower recipe)")
    parser.add_argument("--history", type=int, default=8000, help="tokens of history before the new message")
    parser.add_argument("--model-dir", help="reuse a 7B-shaped model built earlier (bench_decode.py's)")
    parser.add_argument("--no-32b", action="store_true", help="skip the 32B-shaped model")
    args = parser.parse_args()
    if torch.cuda.device_count() < 2:
        sys.exit("bench_split.py needs two CUDA GPUs")
    import bitsandbytes
    import transformers

    dtype = loader.DTYPES[args.dtype]
    began = time.perf_counter()
    r = {"cards": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())], "torch": torch.__version__,
         "transformers": transformers.__version__, "bitsandbytes": bitsandbytes.__version__, "python": platform.python_version(),
         "compute_dtype": args.dtype, "new_tokens": args.tokens, "recipe_tokens": args.recipe_tokens}
    path = args.model_dir or tempfile.mkdtemp(prefix="qwen7b-shape-")
    if not os.path.exists(os.path.join(path, "config.json")):
        seconds, _ = sync_time(lambda: build_model(path, "qwen2.5-7b"))
        print(f"built and saved the 7B-shaped model in {seconds:.0f} s", flush=True)

    # --- 7B on one card: the fast engine's own speed, and the recipe's
    # (loaded as for the recipe; the fast engine is made on the same model after the recipe's runs, as for the split)
    loaded = loader.load(path, bits=4, dtype=args.dtype, device_map="cuda:0", engine="generate", notify=quiet)
    r["load_s_7b_one_card"] = loaded.seconds
    measure_loaded(loaded.model, loaded.tokenizer, args, r, "7b_one_card")
    loader.free(loaded)
    loaded = None

    # --- 7B split by "balanced": the recipe, then the fast engine on the same loaded model
    loaded = loader.load(path, bits=4, dtype=args.dtype, device_map="balanced", engine="generate", notify=quiet)
    r["load_s_7b_split"] = loaded.seconds
    measure_loaded(loaded.model, loaded.tokenizer, args, r, "7b_split")
    loader.free(loaded)
    loaded = None
    keys = ["7b_one_card", "7b_split"]
    r["wall_s"] = time.perf_counter() - began
    report(r, args, keys)  # written now too, in case the 32B part does not finish

    # --- 32B shape split half and half
    if not args.no_32b:
        seconds, (model, tokenizer) = sync_time(lambda: build_quantized_32b(dtype))
        r["build_s_32b_split"] = seconds
        print(f"built the 32B-shaped NF4 model over both cards in {seconds:.0f} s", flush=True)
        measure_loaded(model, tokenizer, args, r, "32b_split")
        model = None
        gc.collect()
        torch.cuda.empty_cache()
        keys.append("32b_split")
    r["wall_s"] = time.perf_counter() - began
    report(r, args, keys)


def report(r, args, keys):
    names = {"7b_one_card": "7B shape, one card", "7b_split": "7B shape, split (balanced)", "32b_split": "32B shape, split"}
    f = lambda value, digits=3: "–" if value is None else f"{value:.{digits}g}"
    lines = [
        f"cards: {', '.join(r['cards'])} · torch {r['torch']} · transformers {r['transformers']} · bitsandbytes {r['bitsandbytes']} · "
        f"NF4, {r['compute_dtype']} compute · greedy, {r['new_tokens']} new tokens (recipe {r['recipe_tokens']})",
        "",
        "| model | decode tok/s recipe | decode tok/s qwen_magic | ratio | first token after history, recipe (s) | qwen_magic cached (s) | qwen_magic uncached (s) | GiB per card after load | peak GiB per card, recipe | peak GiB per card, qwen_magic |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for key in keys:
        classic, ours = r.get(f"decode_tps_recipe_{key}"), r.get(f"decode_tps_ours_{key}")
        ratio = f"{ours / classic:.2f}×" if classic and ours else "–"
        lines.append(
            f"| {names[key]} ({r.get(f'history_tokens_{key}', 0):,}-token history) | {f(classic)} | {f(ours)} | {ratio} | "
            f"{f(r.get(f'ttft_s_recipe_{key}'))} | {f(r.get(f'ttft_s_ours_{key}'))} | {f(r.get(f'ttft_s_ours_uncached_{key}'))} | "
            f"{' / '.join(map(str, r[f'loaded_gib_{key}']))} | {' / '.join(map(str, r.get(f'peak_gib_recipe_{key}', ['–'])))} | "
            f"{' / '.join(map(str, r[f'peak_gib_{key}']))} |")
    lines.append("")
    one, both = r.get("decode_tps_ours_7b_one_card"), r.get("decode_tps_ours_7b_split")
    if one and both:
        lines.append(f"7B split over both cards decodes at {100 * both / one:.0f} % of the single-card fast engine.")
    for key in keys:
        lines.append(f"{names[key]}: {r[f'split_{key}']}; engine: {r.get(f'engine_{key}', '–')}"
                     + (f"; error: {r[f'error_{key}']}" if f"error_{key}" in r else ""))
    if "build_s_32b_split" in r:
        lines.append(f"32B model built (random NF4 weights, layer by layer on its card) in {r['build_s_32b_split']:.0f} s; whole run {r['wall_s']:.0f} s.")
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench-split.json"), "w") as file:
        json.dump(r, file, indent=1)
    with open(os.path.join(args.out, "bench-split.md"), "w") as file:
        file.write(text + "\n")


if __name__ == "__main__":
    main()
