"""Classic recipe vs qwen_magic on one CUDA GPU, with a model of Qwen2.5-7B-Instruct's exact shape.

Needs no network: it builds the model with random weights, saves it, and loads it in
NF4 through ``%qwen_load``'s own loader. It measures, side by side in one run:
decode tokens/s at a forced length, time to first token for a new message after
several lengths of history, peak GPU memory at the longest history, and load time;
plus the card's copy bandwidth and the decode limit it implies.

    python benchmarks/bench_decode.py --out DIR [--dtype float16] [--tokens 256] [--history 512 2000 8000]

Writes DIR/bench.json and DIR/bench.md and prints the table.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from qwen_magic import loader
from qwen_magic.engine import generate_reply
from qwen_magic.fast import FIRST_CAPACITY, NEXT_MESSAGE
from qwen_magic.prompt import prompt_ids
from qwen_magic.settings import GenerationSettings
from qwen_magic.tiny import _CORPUS, build_tokenizer

QWEN25_7B = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=False, use_sliding_window=False, bos_token_id=151643, eos_token_id=151645,
)
QWEN3_8B = dict(
    vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645,
)
# Qwen3.5-9B: transformers' Qwen3_5TextConfig defaults are its shape (32 layers, 3 Gated DeltaNet : 1 attention).
SHAPES = {
    "qwen2.5-7b": ("Qwen2Config", "Qwen2ForCausalLM", QWEN25_7B, "chatml"),
    "qwen3-8b": ("Qwen3Config", "Qwen3ForCausalLM", QWEN3_8B, "qwen3"),
    "qwen3.5-9b": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", dict(bos_token_id=None, eos_token_id=248046), "qwen3.5"),
}
QUESTION = '请将以下文本分类为 [体育, 科技, 政治, 娱乐] 中的一个类别。文本:"苹果公司发布了新一代iPhone,搭载了更强大的A系列芯片。"请只输出类别名称。'
TUTORIAL = dict(do_sample=True, temperature=0.7, top_p=0.9)


def build_model(path, shape="qwen2.5-7b"):
    import transformers
    from transformers import GenerationConfig

    config_name, model_name, fields, style = SHAPES[shape]
    torch.set_default_dtype(torch.float16)
    with torch.device("cuda"):
        model = getattr(transformers, model_name)(getattr(transformers, config_name)(**fields))
    torch.set_default_dtype(torch.float32)
    if style == "chatml":
        model.generation_config = GenerationConfig(  # Qwen2.5-7B-Instruct's
            eos_token_id=[151645, 151643], pad_token_id=151643, do_sample=True, temperature=0.7, top_p=0.8, top_k=20,
            repetition_penalty=1.05,
        )
    else:  # Qwen3's and Qwen3.5's (thinking mode)
        model.generation_config = GenerationConfig(eos_token_id=fields["eos_token_id"], do_sample=True, temperature=0.6, top_p=0.95, top_k=20)
    model.save_pretrained(path)
    build_tokenizer(style=style).save_pretrained(path)
    del model
    torch.cuda.empty_cache()


def sync_time(fn):
    torch.cuda.synchronize()
    started = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - started, result


def copy_bandwidth():
    """Device-to-device copy, bytes read plus bytes written, median of 10 (bytes/s)."""
    source = torch.randn(2**28, device="cuda", dtype=torch.float32)  # 1 GiB
    target = torch.empty_like(source)
    times = [sync_time(lambda: target.copy_(source))[0] for _ in range(13)]
    return 2 * 2**30 / statistics.median(times[3:])


def bytes_per_token(model):
    """The weights one decode step must read: packed 4-bit weights with their scales, and 16-bit layers."""
    import bitsandbytes as bnb

    total = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            total += module.weight.numel() * module.weight.element_size() + state.absmax.numel() * state.absmax.element_size()
            if getattr(state, "state2", None) is not None:
                total += state.state2.absmax.numel() * state.state2.absmax.element_size()
        elif isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
        elif isinstance(module, torch.nn.Embedding):
            total += module.weight.shape[1] * module.weight.element_size()  # one row
    return total


def model_path(path=None, shape="qwen2.5-7b"):
    """``path`` (default: a new temporary folder) with the shape's model in it, built and saved there when missing."""
    path = path or tempfile.mkdtemp(prefix="qwen7b-shape-")
    if not os.path.exists(os.path.join(path, "config.json")):
        build_model(path, shape)
    return path


def history_of(tokenizer, tokens):
    """Exchanges of filler text until the rendered history is about ``tokens`` long."""
    messages, i = [], 0
    while True:
        text = " ".join(_CORPUS[(i + k) % len(_CORPUS)] for k in range(6))
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": text[::-1]}]
        i += 1
        if len(prompt_ids(tokenizer, messages)) >= tokens:
            return messages


def classic_generate(model, ids, new_tokens, **sampling):
    inputs = torch.tensor([ids], device="cuda")
    return model.generate(
        input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=new_tokens, min_new_tokens=new_tokens, **sampling
    )


SWEEP = (100, 700, 2500, 8000, 16000)  # prompt lengths for first-token times, each seen first in the sweep


def question_of(tokenizer, tokens):
    """One user message of filler text whose prompt is about ``tokens`` long (a long first question)."""
    text = " ".join(_CORPUS[i % len(_CORPUS)] for i in range(tokens // 4 + 50))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(ids) < tokens:
        ids = ids + ids
    overhead = len(prompt_ids(tokenizer, [{"role": "user", "content": ""}]))
    return [{"role": "user", "content": tokenizer.decode(ids[:max(1, tokens - overhead)])}]


REPEATS = 5  # repeats of a first question per length, each side (the median is reported)


def classic_turn(model, tokenizer, messages):
    """The tutorial's turn from its messages: the chat template, the tokenizer, generate (one new token). qwen_magic's
    first-token time counts the same steps (its reply's clock starts when the question is prepared)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer([text], return_tensors="pt").to("cuda")
    return model.generate(**inputs, max_new_tokens=1, min_new_tokens=1, **TUTORIAL)


def recipe_sweep(model, tokenizer, lengths, results):
    """The recipe's first-token time per prompt length, from the messages as the tutorial runs it (template, tokenizer,
    generate): the first time that length is seen, and repeated; the repeat from token ids alone (generate only) too."""
    for n in lengths:
        messages = question_of(tokenizer, n)
        ids = prompt_ids(tokenizer, messages)
        first, _ = sync_time(lambda: classic_turn(model, tokenizer, messages))
        again = statistics.median(sync_time(lambda: classic_turn(model, tokenizer, messages))[0] for _ in range(REPEATS))
        from_ids = statistics.median(sync_time(lambda: classic_generate(model, ids, 1, **TUTORIAL))[0] for _ in range(REPEATS))
        results[f"sweep_tokens_{n}"] = len(ids)
        results[f"sweep_classic_first_{n}"], results[f"sweep_classic_repeat_{n}"] = first, again
        results[f"sweep_classic_repeat_ids_{n}"] = from_ids


def fast_sweep(engine, tokenizer, lengths, results):
    """qwen_magic's first-token time for a first question (a new conversation, nothing of it cached), the first
    time a prompt length is seen and repeated; then with the cache rebuilt (dropped first); and a graph capture."""
    one = GenerationSettings(max_new_tokens=1, temperature=0.7, top_p=0.9)
    for n in lengths:
        messages = question_of(tokenizer, n)
        times = []
        for _ in range(1 + REPEATS):
            engine.cached_ids = []  # a new conversation: nothing to reuse
            if engine.states is not None:
                engine.states.clear()
            torch.cuda.synchronize()
            times.append(generate_reply(engine, messages, one).first_token_seconds)
        results[f"sweep_ours_first_{n}"], results[f"sweep_ours_repeat_{n}"] = times[0], statistics.median(times[1:])
        rebuilt = []
        for _ in range(3):
            engine._drop_cache()
            torch.cuda.synchronize()
            rebuilt.append(generate_reply(engine, messages, one).first_token_seconds)
        results[f"sweep_ours_rebuilt_{n}"] = statistics.median(rebuilt)
    with torch.inference_mode():  # what a capture for a grown cache costs, where the graph does not outlive the cache
        engine._drop_cache()
        engine.prefill([0] * 8, reserve=2 * FIRST_CAPACITY)
        results["graph_outlives_cache"] = bool(engine.graph_outlives_cache and engine.graph is not None)
        seconds, _ = sync_time(lambda: engine._capture())
        results["capture_s_grown"] = seconds


def growth_pauses(engine, tokenizer, results, turns=4, new_tokens=128):
    """A chat whose cache must grow (a first cache of FIRST_CAPACITY tokens, a history whose first prompt and reply
    fit it while the next turn would not, replies of ``new_tokens``): the longest pause between two tokens of a reply,
    and the longest wait after a reply's last token (where the engine grows a cache the next turn would outgrow, and
    captures its graphs), each over the turns; the cache's size at each reply's first token and after it."""
    import threading

    settings = GenerationSettings(do_sample=False, max_new_tokens=new_tokens)

    def first_cache():  # the first cache and its graphs, as the load leaves them
        engine._drop_cache()
        with torch.inference_mode():
            engine._reserve(FIRST_CAPACITY)
            engine._capture()
        if engine.prefill_graphs is not None:
            engine.prefill_graphs.capture()

    first_cache()
    # The first prompt and its reply fit the first cache; the next turn (+ NEXT_MESSAGE + new_tokens) would not.
    aim = FIRST_CAPACITY - new_tokens - NEXT_MESSAGE // 2
    history, filler = history_of(tokenizer, 3700), ""
    first = lambda: history + [{"role": "user", "content": filler + "第1个问题:它有什么好吃的美食吗?"}]
    while len(prompt_ids(tokenizer, first())) > aim:
        history = history[2:]
    while len(prompt_ids(tokenizer, first())) < aim - 32:
        filler += _CORPUS[len(filler) % len(_CORPUS)] + " "
    gaps, waits, capacities, at_first = [], [], [engine.capacity], []
    for turn in range(turns):
        messages = first() if turn == 0 else history + [{"role": "user", "content": f"第{turn + 1}个问题:它有什么好吃的美食吗?"}]
        ids = prompt_ids(tokenizer, messages)
        stamps, tokens = [], []
        emit = lambda new: (stamps.append(time.perf_counter()), tokens.extend(new), len(stamps) > 1 or at_first.append(engine.capacity))
        torch.cuda.synchronize()
        with engine.lock, torch.inference_mode():
            engine._generate(ids, settings, emit, threading.Event(), {})
        done = time.perf_counter()
        gaps.append(max(b - a for a, b in zip(stamps, stamps[1:])))
        waits.append(done - stamps[-1])
        capacities.append(engine.capacity)
        history = messages + [{"role": "assistant", "content": tokenizer.decode(tokens, skip_special_tokens=True)}]
    # A long question into a cache it outgrows (the cache is made in its prefill): the pause after the first token.
    first_cache()
    stamps = []
    ids = prompt_ids(tokenizer, question_of(tokenizer, FIRST_CAPACITY + 1000))
    torch.cuda.synchronize()
    with engine.lock, torch.inference_mode():
        engine._generate(ids, GenerationSettings(do_sample=False, max_new_tokens=8), lambda new: stamps.append(time.perf_counter()),
                         threading.Event(), {})
    results["long_prompt_growth"] = {"tokens": len(ids), "capacity": engine.capacity,
                                     "pauses_ms": [round(1000 * (b - a), 1) for a, b in zip(stamps, stamps[1:])]}
    results["growth_gap_ms"] = [round(1000 * gap, 1) for gap in gaps]
    results["growth_wait_ms"] = [round(1000 * wait, 1) for wait in waits]
    results["growth_capacities"] = capacities
    results["growth_capacities_at_first_token"] = at_first


def peak_memory(args):
    """Load, then one turn with HISTORY tokens of history and TOKENS new ones; print the peaks as JSON."""
    engine = "generate" if args.peak == "classic" else "auto"
    loaded = loader.load(args.model_dir, bits=4, dtype=args.dtype, engine=engine, notify=lambda _: None)
    messages = history_of(loaded.tokenizer, args.history[0]) + [{"role": "user", "content": "它有什么好吃的美食吗?"}]
    out = {f"loaded_gib_{args.peak}": torch.cuda.memory_allocated() / 2**30}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    if args.peak == "classic":
        classic_generate(loaded.model, prompt_ids(loaded.tokenizer, messages), args.tokens, **TUTORIAL)
    else:
        loaded.engine.end_ids = set()
        generate_reply(loaded.engine, messages, GenerationSettings(max_new_tokens=args.tokens, temperature=0.7, top_p=0.9))
        out["capacity_ours"] = loaded.engine.capacity
    out[f"peak_gib_{args.peak}"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(out))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--dtype", default="float16", help="compute dtype (float16 is what a T4 uses)")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--history", type=int, nargs="+", default=[512, 2000, 8000])
    parser.add_argument("--no-peak", action="store_true", help="skip the peak-memory runs (measured apart with --peak)")
    parser.add_argument("--sweep", type=int, nargs="*", default=list(SWEEP), help="prompt lengths for first-token times")
    parser.add_argument("--model-dir", help="reuse a model built earlier")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-7b", help="the model shape to build")
    parser.add_argument("--peak", choices=("classic", "ours"), help="only measure that side's peak memory (one JSON line)")
    args = parser.parse_args()
    if args.peak:
        return peak_memory(args)
    import bitsandbytes
    import transformers

    results = {
        "card": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
        "bitsandbytes": bitsandbytes.__version__, "python": platform.python_version(), "compute_dtype": args.dtype,
        "new_tokens": args.tokens, "shape": args.shape,
    }
    path = args.model_dir or tempfile.mkdtemp(prefix="qwen7b-shape-")
    if not os.path.exists(os.path.join(path, "config.json")):
        seconds, _ = sync_time(lambda: build_model(path, args.shape))
        print(f"built and saved the {args.shape}-shaped model in {seconds:.0f} s")

    results["bandwidth_bytes_per_s"] = copy_bandwidth()
    quiet = lambda _: None

    # --- the classic recipe: from_pretrained with BitsAndBytesConfig, then generate
    torch.cuda.reset_peak_memory_stats()
    classic = loader.load(path, bits=4, dtype=args.dtype, engine="generate", notify=quiet)
    results["load_s_classic"] = classic.seconds
    model, tokenizer = classic.model, classic.tokenizer
    results["bytes_per_token"] = bytes_per_token(model)
    question = prompt_ids(tokenizer, [{"role": "user", "content": QUESTION}])
    classic_generate(model, question, 8, **TUTORIAL)  # warm-up
    for name, sampling in [("sampled", TUTORIAL), ("greedy", dict(do_sample=False))]:
        first, _ = sync_time(lambda: classic_generate(model, question, 1, **sampling))
        whole, _ = sync_time(lambda: classic_generate(model, question, args.tokens, **sampling))
        results[f"decode_tps_classic_{name}"] = (args.tokens - 1) / (whole - first)
    recipe_sweep(model, tokenizer, args.sweep, results)
    histories = {n: history_of(tokenizer, n) for n in args.history}
    new_message = {"role": "user", "content": "它有什么好吃的美食吗?"}
    for n, history in histories.items():
        ids = prompt_ids(tokenizer, history + [new_message])
        times = [sync_time(lambda: classic_generate(model, ids, 1, **TUTORIAL))[0] for _ in range(3)]
        results[f"ttft_s_classic_{n}"] = statistics.median(times)
        results[f"history_tokens_{n}"] = len(ids)
    longest = max(args.history)
    model = None  # the lambdas above hold this name: drop it, or the classic model stays on the GPU
    loader.free(classic)

    # --- qwen_magic: the same loader, the fast engine
    torch.cuda.reset_peak_memory_stats()
    ours = loader.load(path, bits=4, dtype=args.dtype, engine="auto", notify=quiet)
    results["engine"] = ours.engine.name + ours.engine_note
    results["load_s_ours"] = ours.seconds
    engine = ours.engine
    engine.end_ids = set()  # forced length, as min_new_tokens forces the classic recipe
    settings = {name: GenerationSettings(max_new_tokens=args.tokens, do_sample=name == "sampled", temperature=0.7, top_p=0.9)
                for name in ("sampled", "greedy")}
    question_messages = [{"role": "user", "content": QUESTION}]
    fast_sweep(engine, tokenizer, args.sweep, results)  # first, as a user's first questions come after the load
    growth_pauses(engine, tokenizer, results)
    generate_reply(engine, question_messages, settings["sampled"])  # warm-up (and the cache sized)
    for name in ("sampled", "greedy"):
        rates = [generate_reply(engine, question_messages, settings[name]).tokens_per_second for _ in range(3)]
        results[f"decode_tps_ours_{name}"] = statistics.median(rates)
    one = GenerationSettings(max_new_tokens=1, temperature=0.7, top_p=0.9)
    for n, history in histories.items():
        full = prompt_ids(tokenizer, history + [new_message])
        times, cold = [], None
        for attempt in range(4):
            if attempt == 0:
                engine._drop_cache()  # a first turn: nothing cached yet
            else:
                # The previous turn left the history (replies included) in the cache; the new message is not.
                with torch.inference_mode():
                    engine._reserve(len(full) + args.tokens)
                    shared = len(full) - len(tokenizer(f"<|im_start|>user\n{new_message['content']}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])
                    engine.prefill(full[:shared])
                    kept = engine.states.take(full[:shared]) if engine.states is not None else None
                    engine.step(torch.zeros((1, 1), dtype=torch.long, device="cuda"), shared)  # captures the graph
                    if kept is not None:
                        engine.states.put_back(kept)  # the step folded a token into the recurrent state
            torch.cuda.synchronize()
            reply = generate_reply(engine, history + [new_message], one)
            if attempt == 0:
                cold = reply.first_token_seconds
            else:
                times.append(reply.first_token_seconds)
                results[f"cached_tokens_{n}"] = reply.cached_tokens
        results[f"ttft_s_ours_{n}"] = statistics.median(times)
        results[f"ttft_s_ours_uncached_{n}"] = cold
    # The same engine without the Triton kernels (what they add), on the same loaded model.
    engine.close()
    from qwen_magic.fast import FastEngine

    plain = FastEngine(ours.model, tokenizer, context_length=ours.context_length, kernels=False)
    plain.end_ids = set()
    generate_reply(plain, question_messages, settings["greedy"])
    for name in ("sampled", "greedy"):
        rates = [generate_reply(plain, question_messages, settings[name]).tokens_per_second for _ in range(3)]
        results[f"decode_tps_ours_nokernels_{name}"] = statistics.median(rates)
    plain.close()
    loader.free(ours)
    # Peak memory, each in a process of its own, so nothing of the other's run is counted.
    for side in () if args.no_peak else ("classic", "ours"):
        command = [sys.executable, __file__, "--peak", side, "--model-dir", path, "--dtype", args.dtype,
                   "--tokens", str(args.tokens), "--history", str(longest)]
        results.update(json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))

    report(results, args)


def report(r, args):
    limit = r["bandwidth_bytes_per_s"] / r["bytes_per_token"]
    rows = [
        ("decode tokens/s, sampled (T 0.7, top-p 0.9)", r["decode_tps_classic_sampled"], r["decode_tps_ours_sampled"], "x"),
        ("decode tokens/s, greedy", r["decode_tps_classic_greedy"], r["decode_tps_ours_greedy"], "x"),
    ]
    if "decode_tps_ours_nokernels_greedy" in r:
        rows += [
            ("decode tokens/s, sampled, qwen_magic without Triton kernels", r["decode_tps_classic_sampled"], r["decode_tps_ours_nokernels_sampled"], "x"),
            ("decode tokens/s, greedy, qwen_magic without Triton kernels", r["decode_tps_classic_greedy"], r["decode_tps_ours_nokernels_greedy"], "x"),
        ]
    for n in args.history:
        rows.append((f"time to first token, {r[f'history_tokens_{n}']:,}-token prompt (s)", r[f"ttft_s_classic_{n}"], r[f"ttft_s_ours_{n}"], "/"))
    rows += [
        ("load time (s)", r["load_s_classic"], r["load_s_ours"], "/"),
    ]
    if "peak_gib_ours" in r:
        rows.insert(-1, (f"peak GPU memory at {max(args.history):,} tokens + {args.tokens} new (GiB)", r["peak_gib_classic"], r["peak_gib_ours"], "/"))
    lines = [
        f"shape: {r.get('shape', 'qwen2.5-7b')} · card: {r['card']} · torch {r['torch']} · transformers {r['transformers']} · bitsandbytes {r['bitsandbytes']} · "
        f"NF4, {r['compute_dtype']} compute · engine: {r['engine']}",
        "",
        "| measure | classic recipe | qwen_magic | ratio |",
        "|---|---:|---:|---:|",
    ]
    for name, classic, ours, kind in rows:
        ratio = ours / classic if kind == "x" else classic / ours
        lines.append(f"| {name} | {classic:.3g} | {ours:.3g} | {ratio:.2f}{'×' if kind == 'x' else ' (classic/ours)'} |")
    lines += [
        "",
        f"copy bandwidth {r['bandwidth_bytes_per_s'] / 1e12:.2f} TB/s; weights read per token {r['bytes_per_token'] / 1e9:.2f} GB; "
        f"decode limit {limit:.0f} tokens/s; qwen_magic greedy reaches {100 * r['decode_tps_ours_greedy'] / limit:.0f} % of it.",
        (f"GPU memory after loading: classic {r['loaded_gib_classic']:.2f} GiB, qwen_magic {r['loaded_gib_ours']:.2f} GiB "
         f"(its first cache, {FIRST_CAPACITY:,} tokens, and graph); its cache at the peak holds {r['capacity_ours']:,} tokens.")
        if "peak_gib_ours" in r else "peak memory: not measured in this run (--no-peak)",
        "uncached first turn, qwen_magic: " + ", ".join(f"{r[f'ttft_s_ours_uncached_{n}']:.3f} s at {n}" for n in args.history),
        "cached tokens reused: " + ", ".join(f"{r[f'cached_tokens_{n}']:,} of {r[f'history_tokens_{n}']:,}" for n in args.history),
    ]
    if args.sweep:
        lines += [
            "",
            "First question (a new conversation): time to first token (s), from the messages on both sides (chat template,"
            f" tokenizer, prefill, first token); first time a prompt length is seen, and the median of {REPEATS} repeats;"
            " the recipe's repeat from token ids alone (generate only) too.",
            "",
            "| prompt tokens | recipe, first | recipe, repeat | recipe, repeat from ids | qwen_magic, first | qwen_magic, repeat | qwen_magic, cache rebuilt | ours/recipe (first) | ours/recipe (repeat) | first/repeat (ours) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for n in args.sweep:
            c1, c2, c3 = r[f"sweep_classic_first_{n}"], r[f"sweep_classic_repeat_{n}"], r.get(f"sweep_classic_repeat_ids_{n}", float("nan"))
            o1, o2, o3 = r[f"sweep_ours_first_{n}"], r[f"sweep_ours_repeat_{n}"], r[f"sweep_ours_rebuilt_{n}"]
            lines.append(f"| {r[f'sweep_tokens_{n}']:,} | {c1:.3f} | {c2:.3f} | {c3:.3f} | {o1:.3f} | {o2:.3f} | {o3:.3f} | {o1 / c1:.2f} | "
                         f"{o2 / c2:.2f} | {o1 / o2:.2f} |")
        kept = ("the decode graph outlives the cache (no capture when it grows); a capture, forced, takes"
                if r.get("graph_outlives_cache") else "graph capture for a grown cache")
        lines.append(f"\n{kept} ({2 * FIRST_CAPACITY:,}+ tokens): {1000 * r['capture_s_grown']:.0f} ms")
    if "growth_gap_ms" in r:
        lines.append(f"a chat whose cache grows (cache sizes {r['growth_capacities']}, at each reply's first token "
                     f"{r.get('growth_capacities_at_first_token')}): longest pause between two tokens per reply "
                     f"{r['growth_gap_ms']} ms; wait after each reply's last token {r['growth_wait_ms']} ms")
    if "long_prompt_growth" in r:
        g = r["long_prompt_growth"]
        lines.append(f"a {g['tokens']:,}-token question that outgrows a {FIRST_CAPACITY:,}-token cache (new cache {g['capacity']:,}): "
                     f"pauses between its first tokens {g['pauses_ms']} ms")
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    name = "bench" if args.shape == "qwen2.5-7b" else f"bench-{args.shape}"
    with open(os.path.join(args.out, f"{name}.json"), "w") as file:
        json.dump(r, file, indent=1)
    with open(os.path.join(args.out, f"{name}.md"), "w") as file:
        file.write(text + "\n")


if __name__ == "__main__":
    main()
