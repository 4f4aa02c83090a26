"""A 4-bit layer's prefill call: bitsandbytes' forward against qwen_magic's dequantizing path (kernels/nf4_prefill.py).

    python benchmarks/bench_nf4_prefill.py [--out DIR]

Qwen2.5-7B's four layer shapes, NF4 double-quantized, float16 compute, a range of row counts. Per call: GPU
time (microseconds, median of 20 by CUDA events, each call alone) and host time (a loop of 200 calls queued
without waiting, per call; the GPU may hold it back where its time is longer). First, the dequantized weight
against bitsandbytes' ``dequantize_4bit``, bit for bit, in each compute dtype.
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from qwen_magic import kernels  # noqa: E402
from bench_prefill_attention import timed  # noqa: E402
from qwen_magic.kernels import nf4_prefill  # noqa: E402

SHAPES = [(3584, 3584), (512, 3584), (18944, 3584), (3584, 18944)]  # (N, K): q/o, k/v, gate/up, down
ROWS = [4, 8, 16, 32, 64, 100, 256, 700, 1536, 2503, 4095]


def layer(n, k, dtype=torch.float16):
    import bitsandbytes as bnb

    module = bnb.nn.Linear4bit(k, n, bias=n == 512, compute_dtype=dtype, quant_type="nf4", compress_statistics=True).cuda()
    with torch.no_grad():
        module(torch.randn(2, k, dtype=dtype, device="cuda"))  # settles the compute dtype
    return module


def gpu_us(fn, repeats=20):
    return 1000 * timed(fn, repeats)  # bench_prefill_attention's CUDA-event median, in microseconds


def host_us(fn, calls=200):
    torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - begin
    torch.cuda.synchronize()
    return 1e6 * elapsed / calls


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from bitsandbytes import functional as F

    results = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "equal": {}, "rows": ROWS, "shapes": {}}
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for n, k in SHAPES:
            module = layer(n, k, dtype)
            ours = nf4_prefill.dequantize(module.weight, module.weight.quant_state, dtype)
            theirs = F.dequantize_4bit(module.weight, module.weight.quant_state).to(dtype)
            results["equal"][f"{str(dtype)[6:]} {n}x{k}"] = bool(torch.equal(ours, theirs))
    print("dequantized weight equal to bitsandbytes':", results["equal"])

    with torch.inference_mode():
        for n, k in SHAPES:
            module = layer(n, k)
            original = module.forward
            cache = {}
            rows_out = {}
            for m in ROWS:
                x = torch.randn(1, m, k, dtype=torch.float16, device="cuda")
                theirs = lambda: original(x)  # noqa: E731
                ours = lambda: nf4_prefill.forward(module, x, cache)  # noqa: E731
                with kernels.prefilling():
                    error = (ours().float() - theirs().float()).abs().max().item()
                    rows_out[m] = dict(bnb_gpu=gpu_us(theirs), ours_gpu=gpu_us(ours), bnb_host=host_us(theirs), ours_host=host_us(ours),
                                       max_abs_diff=error)
                r = rows_out[m]
                print(f"{n:>6}x{k:<6} rows {m:>5}: GPU {r['bnb_gpu']:8.1f} -> {r['ours_gpu']:8.1f} us   host {r['bnb_host']:6.1f} -> {r['ours_host']:6.1f} us"
                      f"   max |diff| {error:.3g}", flush=True)
            results["shapes"][f"{n}x{k}"] = rows_out
    if args.out:
        with open(os.path.join(args.out, "bench_nf4_prefill.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
