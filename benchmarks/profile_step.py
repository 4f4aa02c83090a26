"""Where one decode step's time goes (fast engine, 7B-shaped NF4 model, float16 compute).

    python benchmarks/profile_step.py [--model-dir DIR] [--history 700] [--out DIR]

Prints the graphed step's time, then one eager step under the torch profiler: every GPU kernel by
name (count, total µs), grouped into the 4-bit products, the float16 lm_head, attention, the fused
kernels and the rest, and the sum of kernel time against the graphed step (the difference is the gaps
between kernels a graph replays).
"""

import argparse
import collections
import json
import os
import statistics

import torch

from bench_decode import history_of, model_path
from qwen_magic import loader
from qwen_magic.prompt import prompt_ids

GROUPS = [  # (group, substrings of kernel names), first match wins
    ("4-bit products (qwen_magic)", ("matvec_half", "matvec_kernel", "reduce_kernel")),
    ("4-bit products (bitsandbytes)", ("gemv_4bit", "gemm_4bit", "kgemm", "kDequantize", "dequantize")),
    ("fused norm / rope / silu (qwen_magic)", ("rms", "rope", "silu_mul", "_norm", "_fused")),
    ("matmul (lm_head, attention)", ("gemm", "gemv", "cutlass", "sm90_xmma", "ampere_", "Kernel2", "splitK", "cublas")),
    ("softmax", ("softmax",)),
    ("copies / index", ("copy", "index", "cat", "Cat", "scatter", "gather")),
    ("elementwise / reduce (torch)", ("elementwise", "reduce_kernel", "vectorized", "Reduce", "unrolled")),
]


def group_of(name: str) -> str:
    for group, keys in GROUPS:
        if any(key in name for key in keys):
            return group
    return "other"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir")
    parser.add_argument("--history", type=int, default=700)
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    loaded = loader.load(model_path(args.model_dir), bits=4, dtype="float16", engine="fast", notify=lambda _: None)
    engine, tokenizer = loaded.engine, loaded.tokenizer
    print(f"engine: {engine.name}{engine.note}")
    ids = prompt_ids(tokenizer, history_of(tokenizer, args.history) + [{"role": "user", "content": "它有什么好吃的美食吗?"}])
    token = torch.zeros((1, 1), dtype=torch.long, device="cuda")
    with torch.inference_mode():
        engine.prefill(ids, reserve=64)
        for _ in range(5):
            engine.step(token, len(ids))
        torch.cuda.synchronize()
        times = []
        for _ in range(50):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            engine.step(token, len(ids))
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        graphed = statistics.median(times)
        print(f"graphed step: {graphed:.0f} µs ({1e6 / graphed:.0f} tokens/s), capacity {engine.capacity}")

        from torch.profiler import ProfilerActivity, profile

        position = torch.tensor([len(ids)], device="cuda")
        with engine._kernels_on():
            engine._write_at(len(ids))
            engine._step_eager(token, position)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                engine._write_at(len(ids))
                engine._step_eager(token, position)
                torch.cuda.synchronize()
    kernels = collections.defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = kernels[event.name]
            entry[0] += 1
            entry[1] += event.device_time if hasattr(event, "device_time") else event.cuda_time
    total = sum(t for _, t in kernels.values())
    count = sum(c for c, _ in kernels.values())
    groups = collections.defaultdict(lambda: [0, 0.0])
    for name, (c, t) in kernels.items():
        groups[group_of(name)][0] += c
        groups[group_of(name)][1] += t
    print(f"eager step: {count} kernels, {total:.0f} µs of kernel time (graphed step {graphed:.0f} µs: {graphed - total:.0f} µs between kernels)")
    for group, (c, t) in sorted(groups.items(), key=lambda item: -item[1][1]):
        print(f"  {group:<40} {c:5d} kernels {t:8.0f} µs")
    print("kernels by time:")
    for name, (c, t) in sorted(kernels.items(), key=lambda item: -item[1][1])[:30]:
        print(f"  {t:8.0f} µs {c:5d}×  {name[:120]}")
    with open(os.path.join(args.out, "profile_step.json"), "w") as handle:
        json.dump(dict(graphed_us=graphed, kernel_us=total, kernels=count, device=torch.cuda.get_device_name(),
                       groups={g: dict(count=c, us=t) for g, (c, t) in groups.items()},
                       top={n: dict(count=c, us=t) for n, (c, t) in sorted(kernels.items(), key=lambda item: -item[1][1])[:60]}), handle, indent=1)


if __name__ == "__main__":
    main()
