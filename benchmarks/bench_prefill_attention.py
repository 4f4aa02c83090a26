"""The prefill attention kernel (qwen_magic/kernels/prefill.py) against SDPA's kernels, Qwen2.5-7B's heads.

    python benchmarks/bench_prefill_attention.py [--out DIR] [--sweep]

Shapes: a whole prompt (causal from position 0) and a chunk after a cached prefix (causal aligned to
the last key), 28 query heads over 4 key/value heads of 128, float16. SDPA: flash (what the engine's
prefill took before), cuDNN (the recipe's whole-prompt forward on an H100; it takes no chunk after a
prefix without a mask). Milliseconds, median of 10 by CUDA events; the error of each against float32
attention (relative, max over outputs).
"""

import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from qwen_magic.kernels import prefill  # noqa: E402

SHAPES = [(0, 2500), (0, 8000), (6000, 2000), (0, 16000), (14000, 2000)]  # (start, query tokens)
CONFIGS = [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4), (64, 128, 4, 2)]


def timed(fn, repeats=10):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return statistics.median(times)


def sdpa(query, key, value, start, backend):
    from torch.nn.attention import sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    length, end = query.shape[2], start + query.shape[2]
    k, v = key[:, :, :end], value[:, :, :end]
    with sdpa_kernel([backend]):
        if start == 0:
            return F.scaled_dot_product_attention(query, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
        return F.scaled_dot_product_attention(query, k, v, attn_mask=causal_lower_right(length, end), enable_gqa=True).transpose(1, 2)


def error(got, expected):
    return ((got.float() - expected).abs().max() / expected.abs().max()).item()


def main():
    from torch.nn.attention import SDPBackend

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--sweep", action="store_true", help="try CONFIGS (block sizes, warps, stages)")
    args = parser.parse_args()
    device = torch.device("cuda")
    results = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    configs = CONFIGS if args.sweep else [(prefill.BLOCK_M, prefill.BLOCK_N, prefill.WARPS, prefill.STAGES)]
    generator = torch.Generator(device=device).manual_seed(0)
    for start, length in SHAPES:
        end = start + length
        query = torch.randn(1, length, 28, 128, device=device, generator=generator).half().transpose(1, 2)  # a projection's layout
        key = torch.randn(1, 4, end + 256, 128, device=device, generator=generator).half()
        value = torch.randn(1, 4, end + 256, 128, device=device, generator=generator).half()
        scale = 128 ** -0.5
        expected = prefill.reference(query, key, value, start, scale) if length * end <= 8000 * 8000 else None
        flops = 4 * 28 * 128 * (length * start + length * (length + 1) / 2)
        row = {"start": start, "tokens": length}
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            try:
                row[f"{name}_ms"] = timed(lambda: sdpa(query, key, value, start, backend))
                if expected is not None:
                    row[f"{name}_error"] = error(sdpa(query, key, value, start, backend), expected)
            except RuntimeError as failure:
                row[f"{name}_ms"] = None
                row[f"{name}_why"] = str(failure).splitlines()[0][:120]
        for bm, bn, warps, stages in configs:
            prefill.BLOCK_M, prefill.BLOCK_N, prefill.WARPS, prefill.STAGES = bm, bn, warps, stages
            key_name = f"kernel_{bm}x{bn}_w{warps}_s{stages}"
            try:
                row[f"{key_name}_ms"] = timed(lambda: prefill.attention(query, key, value, start, scale))
                if expected is not None:
                    row[f"{key_name}_error"] = error(prefill.attention(query, key, value, start, scale), expected)
            except Exception as failure:  # out of shared memory for a config
                row[f"{key_name}_ms"] = None
                row[f"{key_name}_why"] = f"{type(failure).__name__}: {failure}".splitlines()[0][:120]
        row["tflops"] = {k[:-3]: round(flops / v / 1e9, 1) for k, v in row.items() if k.endswith("_ms") and v}
        results["rows"].append(row)
        print(json.dumps(row))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_prefill_attention.json"), "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
