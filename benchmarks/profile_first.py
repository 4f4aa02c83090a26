"""Where a first question's time goes (a new conversation, nothing cached), fast engine vs a plain forward.

    python benchmarks/profile_first.py --model-dir DIR [--tokens 100 2500]

For each prompt length: the stages of a first turn (prompt ids, sampler, prefill, first
draw) each timed with the GPU synchronised, the same prompt through the model's own
forward with a dynamic cache (the recipe's prefill), and the profiler's top operations
of the engine's prefill by host time and by GPU time.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_decode import build_model, question_of  # noqa: E402

from qwen_magic import loader  # noqa: E402
from qwen_magic.prompt import prepare  # noqa: E402
from qwen_magic.sampler import Sampler  # noqa: E402
from qwen_magic.settings import GenerationSettings  # noqa: E402


def timed(fn):
    torch.cuda.synchronize()
    started = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - started), result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", default="/tmp/qwen7b-shape")
    parser.add_argument("--tokens", type=int, nargs="+", default=[100, 2500])
    args = parser.parse_args()
    if not os.path.exists(os.path.join(args.model_dir, "config.json")):
        build_model(args.model_dir)
    loaded = loader.load(args.model_dir, bits=4, dtype="float16", engine="fast", notify=lambda _: None)
    engine, tokenizer, model = loaded.engine, loaded.tokenizer, loaded.model
    settings = GenerationSettings(max_new_tokens=1, temperature=0.7, top_p=0.9)
    print("engine:", engine.name + loaded.engine_note, "· capacity", engine.capacity)
    for n in args.tokens:
        messages = question_of(tokenizer, n)
        with torch.inference_mode():
            for attempt in range(3):
                engine.cached_ids = []
                t_ids, (ids, _) = timed(lambda: prepare(tokenizer, messages, False, None))
                t_sampler, sampler = timed(lambda: Sampler(model, settings, ids, engine.device))
                engine.cached_ids = []
                t_prefill, logits = timed(lambda: engine.prefill(ids, reserve=1))
                t_draw, _ = timed(lambda: sampler(logits))
                tensor = torch.tensor([ids], device="cuda")
                t_plain, _ = timed(lambda: model(input_ids=tensor, use_cache=True, logits_to_keep=1))
                print(f"{len(ids)} tokens, try {attempt}: ids {t_ids:.1f} ms · sampler {t_sampler:.1f} · prefill {t_prefill:.1f} "
                      f"· draw {t_draw:.1f} · plain forward (dynamic cache) {t_plain:.1f} ms")
            engine.cached_ids = []
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
                engine.prefill(ids, reserve=1)
                torch.cuda.synchronize()
        table = prof.key_averages()
        print(table.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
        print(table.table(sort_by="self_cuda_time_total", row_limit=10, max_name_column_width=60))
    loader.free(loaded)


if __name__ == "__main__":
    main()
