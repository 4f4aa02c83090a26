"""Where a cached turn's time and a prefill's memory go (fast engine, 7B-shaped NF4 model).

    python benchmarks/profile_turn.py --out DIR [--history 8000] [--model-dir DIR]

Prints the time of each stage of one turn after HISTORY tokens of cached history,
the torch profiler's top operations for it, one decode step's parts, and the peak
memory of a cold prefill at several chunk sizes.
"""

import argparse
import os
import time

import torch

from bench_decode import history_of, model_path, sync_time
from qwen_magic import fast, loader
from qwen_magic.fast import Sampler
from qwen_magic.prompt import prompt_ids
from qwen_magic.settings import GenerationSettings


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--history", type=int, default=8000)
    parser.add_argument("--model-dir")
    args = parser.parse_args()
    loaded = loader.load(model_path(args.model_dir), bits=4, dtype="float16", engine="fast", notify=lambda _: None)
    engine, tokenizer = loaded.engine, loaded.tokenizer
    new = {"role": "user", "content": "它有什么好吃的美食吗?"}
    history = history_of(tokenizer, args.history)
    full = prompt_ids(tokenizer, history + [new])
    tail = len(tokenizer(f"<|im_start|>user\n{new['content']}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])
    settings = GenerationSettings(max_new_tokens=1, temperature=0.7, top_p=0.9)

    def prime():
        with torch.inference_mode():
            engine._reserve(len(full) + 256)
            engine.prefill(full[:-tail])
            engine.step(torch.zeros((1, 1), dtype=torch.long, device="cuda"), len(full) - tail)
        torch.cuda.synchronize()

    lines = []
    say = lambda text: (print(text), lines.append(text))
    prime()
    started = time.perf_counter()
    messages = history + [new]
    ids = prompt_ids(tokenizer, messages)
    say(f"prompt_ids ({len(ids)} tokens): {1000 * (time.perf_counter() - started):.1f} ms")
    with torch.inference_mode():
        seconds, sampler = sync_time(lambda: Sampler(loaded.model, settings, ids, engine.device))
        say(f"Sampler(): {1000 * seconds:.1f} ms")
        seconds, logits = sync_time(lambda: engine.prefill(ids, reserve=1))
        say(f"prefill of {len(ids) - engine.reused} new tokens (capacity {engine.capacity}): {1000 * seconds:.1f} ms")
        seconds, _ = sync_time(lambda: sampler(logits))
        say(f"sample: {1000 * seconds:.1f} ms")
        token = sampler(logits)
        for _ in range(3):
            engine.step(token, len(ids))
        steps = [sync_time(lambda: engine.step(token, len(ids)))[0] for _ in range(20)]
        say(f"one graph step: {1000 * sorted(steps)[10]:.2f} ms")
        samples = [sync_time(lambda: sampler(logits))[0] for _ in range(20)]
        say(f"one sample: {1000 * sorted(samples)[10]:.2f} ms")
    for _ in range(3):
        prime()
        started = time.perf_counter()
        stream = engine.start(messages, settings)
        list(stream)
        reply, marks = stream.result, stream.info["timings"]
        steps = ", ".join(f"{name} {1000 * (at - started):.1f}" for name, at in marks.items())
        say(f"whole turn: first token at {1000 * reply.first_token_seconds:.1f} ms (ms from start(): {steps}), cached {reply.cached_tokens}")

    prime()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with torch.inference_mode():
            engine.prefill(ids, reserve=1)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=25)
    say("profile of the cached prefill, by CPU time:\n" + table)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
    say("by CUDA time:\n" + table)

    with torch.inference_mode():
        engine.graph = None
        seconds, _ = sync_time(lambda: engine.step(token, len(ids)))
    say(f"graph capture at capacity {engine.capacity}: {seconds:.3f} s")
    for chunk in (2048, 1024, 512):
        fast.PREFILL_CHUNK = chunk
        engine.cache = engine.graph = None
        engine.capacity, engine.cached_ids = 0, []
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            seconds, _ = sync_time(lambda: engine.prefill(ids, reserve=256))
        say(f"cold prefill, chunk {chunk}: {seconds:.3f} s, peak above weights {(torch.cuda.max_memory_allocated() - base) / 2**30:.2f} GiB")
    with open(os.path.join(args.out, "profile.txt"), "w") as file:
        file.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
