"""Batch-1 4-bit matrix-vector products on one CUDA GPU: bitsandbytes vs qwen_magic's Triton kernel.

For Qwen2.5-7B's and Qwen3-8B's projection shapes (N, K), in NF4 with blocksize 64 (what
``%qwen_load`` loads), times one product with a one-row input by:

* ``bnb matmul_4bit``: ``bnb.matmul_4bit`` with a 1-row input, what ``Linear4bit`` runs in decode
  (its batch-1 kernel, ``gemv_4bit``);
* ``bnb gemv_4bit``: ``bitsandbytes.functional.gemv_4bit`` called directly;
* ``dequantize + matmul``: ``dequantize_4bit`` then ``torch.nn.functional.linear``;
* ``qwen_magic nf4``: ``qwen_magic.kernels.nf4.matvec`` with its shape heuristic (or TUNED entry);
* ``qwen_magic nf4 plain loads``: the same tiles with ``tl.load`` table lookups and strided x loads
  (``x_pairs=False, gather_asm=False``), the variant that uses no inline PTX;
* ``--sweep``: the kernel over a small grid of tile configurations, the best one per shape reported
  (and printed as ``TUNED`` entries to paste into nf4.py);
* other formats, for reference only, when installed (gemlite, hqq, torchao): they repack the weight.

Each time is the median over several replays of a CUDA graph that runs the product once on each of
enough weight copies to exceed the L2 cache (as in decode, where each weight is read once a token).
GB/s counts the packed weight and its absmax (and nested statistics) read once. The card's copy
bandwidth (read + write of 1 GiB) is the reference ceiling.

    python benchmarks/bench_nf4.py --out DIR [--dtype bfloat16] [--sweep] [--nested]

Writes DIR/bench_nf4.json and DIR/bench_nf4.md and prints the table. One failing method is
reported as such and does not stop the others.
"""

import argparse
import importlib
import itertools
import json
import os
import platform
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {
    "qwen2.5-7b": [("q/o", 3584, 3584), ("k/v", 512, 3584), ("gate/up", 18944, 3584), ("down", 3584, 18944)],
    "qwen3-8b": [("q/o", 4096, 4096), ("k/v", 1024, 4096), ("gate/up", 12288, 4096), ("down", 4096, 12288)],
}
L2_BYTES = 256 * 2**20  # rotate through at least this many bytes of weights (H100's L2 is 50 MiB)


def copy_bandwidth():
    """Device-to-device copy, bytes read plus bytes written, median of 10 (bytes/s)."""
    source = torch.randn(2**28, device="cuda", dtype=torch.float32)  # 1 GiB
    target = torch.empty_like(source)
    times = []
    for _ in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del source, target
    torch.cuda.empty_cache()
    return 2 * 2**30 / statistics.median(times[3:])


def weight_bytes(packed, state):
    total = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
    if getattr(state, "nested", False):
        total += state.state2.absmax.numel() * state.state2.absmax.element_size() + state.state2.code.numel() * 4
    return total


def time_calls(fn, count, trials=7):
    """Seconds per call: ``fn(i)`` for i in range(count) captured in one CUDA graph, replayed; falls
    back to eager launches when the capture fails. Returns (seconds, how)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(min(count, 3)):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    how = "graph"
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(count):
                fn(i)
        run = graph.replay
        run()
    except Exception as error:  # not capturable: eager launches (includes launch overhead)
        how = f"eager ({error.__class__.__name__})"
        torch.cuda.synchronize()

        def run():
            for i in range(count):
                fn(i)

    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / count)
    return statistics.median(times), how


def make_weights(n, k, dtype, nested, copies):
    from bitsandbytes import functional as F

    weights = []
    generator = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(copies):
        weight = torch.randn(n, k, device="cuda", dtype=dtype, generator=generator) * 0.02
        packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=nested)
        weights.append((packed, state))
        del weight
    return weights


def methods(weights, x, dtype):
    import bitsandbytes as bnb
    from bitsandbytes import functional as F

    from qwen_magic.kernels import nf4

    yield "bnb matmul_4bit", lambda i: bnb.matmul_4bit(x, weights[i][0].t(), quant_state=weights[i][1])
    yield "bnb gemv_4bit", lambda i: F.gemv_4bit(x, weights[i][0].t(), state=weights[i][1])
    yield "dequantize + matmul", lambda i: torch.nn.functional.linear(x, F.dequantize_4bit(weights[i][0], weights[i][1]).to(dtype))
    yield "qwen_magic nf4", lambda i: nf4.matvec(x, weights[i][0], weights[i][1])
    n, k = (int(v) for v in weights[0][1].shape)
    triton_cfg = nf4.config(n, k, torch.cuda.get_device_properties(0).multi_processor_count)
    if dtype == torch.float16:  # the default is the float16 kernel (nf4_half): the Triton one for comparison
        yield "qwen_magic nf4 triton", lambda i: nf4.matvec(x, weights[i][0], weights[i][1], cfg=triton_cfg)
    plain = triton_cfg._replace(x_pairs=False, gather_asm=False)
    yield "qwen_magic nf4 plain loads", lambda i: nf4.matvec(x, weights[i][0], weights[i][1], cfg=plain)


def half_sweep_configs(n, k):
    from qwen_magic.kernels.nf4_half import HalfConfig

    configs = []
    words = k // 8
    for rows, warps, per_thread, splits in itertools.product((2, 4, 8), (1, 2, 4), (4, 8), (1, 2, 4)):
        step = per_thread * 32 * warps
        if step > words or (splits > 1 and -(-words // step) < splits) or rows * per_thread > 32:
            continue
        if -(-n // rows) * splits < 132 // 2 or -(-n // rows) * splits > 40 * 132:
            continue
        configs.append(HalfConfig(rows=rows, per_thread=per_thread, num_warps=warps, splits=splits))
    return configs


def sweep_configs(n, k):
    from qwen_magic.kernels import nf4

    configs = []
    for block_n, block_k, splits, warps in itertools.product((2, 4, 8), (512, 1024, 2048), (1, 2, 4), (4, 8)):
        if block_k > 2 * k or (splits > 1 and k // splits < block_k) or (warps == 8 and block_n * block_k < 4096):
            continue
        configs.append(nf4.Config(block_n=block_n, block_k=block_k, splits=splits, num_warps=warps))
    return configs


def other_formats(n, k, dtype, x):
    """Reference figures from libraries with their own formats, when installed: (name, fn(i), bytes, note)."""
    found = []
    for name in ("gemlite", "hqq", "torchao"):
        try:
            module = importlib.import_module(name)
            found.append((name, getattr(module, "__version__", "?")))
        except Exception:
            print(f"  {name}: not installed")
    results = []
    for name, version in found:
        try:
            if name == "torchao":
                import torchao.quantization as tq

                linear = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
                if hasattr(tq, "Int4WeightOnlyConfig"):  # torchao >= 0.10; tinygemm's tile-packed layout (in torch itself)
                    tq.quantize_(linear, tq.Int4WeightOnlyConfig(group_size=64, int4_packing_format="tile_packed_to_4d"))
                else:
                    tq.quantize_(linear, tq.int4_weight_only(group_size=64))
                xb = x.to(torch.bfloat16)
                results.append((f"torchao {version} int4 weight-only g64, tinygemm (other format, bfloat16)", lambda i, linear=linear, xb=xb: linear(xb), n * k // 2 + n * k // 64 * 4, ""))
            elif name == "hqq":
                from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear

                linear = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.float16)
                hqq = HQQLinear(linear, BaseQuantizeConfig(nbits=4, group_size=64), compute_dtype=torch.float16, device="cuda")
                HQQLinear.set_backend(HQQBackend.PYTORCH)
                xh = x.to(torch.float16)
                results.append((f"hqq {version} 4-bit g64, pytorch backend (other format)", lambda i, hqq=hqq, xh=xh: hqq(xh), n * k // 2 + n * k // 64 * 4, ""))
            elif name == "gemlite":
                from gemlite.helper import A16W4_HQQ_INT

                # gemlite takes asymmetric 4-bit weights with a scale and a zero per group of 64 (W ~ (W_q - zero) * scale)
                groups = torch.randn(n, k // 64, 64, device="cuda")
                low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
                scale = ((high - low) / 15).clamp_min(1e-6)
                zero = -low / scale
                w_q = (groups / scale + zero).round().clamp(0, 15).to(torch.uint8).reshape(n, k)
                layer = A16W4_HQQ_INT(device="cuda", dtype=torch.float16).from_weights(
                    w_q, scale.reshape(n, -1).half(), zero.reshape(n, -1).half())
                xh = x.to(torch.float16).reshape(1, k)
                results.append((f"gemlite {version} A16W4 g64 (other format)", lambda i, layer=layer, xh=xh: layer(xh), n * k // 2 + n * k // 64 * 4, ""))
        except Exception as error:
            print(f"  {name} {version}: could not set up ({error.__class__.__name__}: {str(error)[:120]})")
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".")
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--nested", action="store_true", help="double quantization (compress_statistics=True)")
    parser.add_argument("--sweep", action="store_true", help="also time a grid of kernel tile configurations")
    parser.add_argument("--sweep-seconds", type=float, default=240, help="the sweep's time, shared equally by the shapes")
    parser.add_argument("--models", nargs="*", default=list(SHAPES))
    parser.add_argument("--no-others", action="store_true", help="skip gemlite / hqq / torchao")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dtype = getattr(torch, args.dtype)

    import bitsandbytes
    import triton

    from qwen_magic.kernels import nf4

    reason = nf4.available()
    device = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    info = dict(device=device, capability=".".join(map(str, torch.cuda.get_device_capability())), torch=torch.__version__,
                triton=triton.__version__, bitsandbytes=bitsandbytes.__version__, python=platform.python_version(),
                dtype=args.dtype, nested=args.nested, copy_bandwidth_GBps=bandwidth / 1e9, kernel_unavailable=reason)
    print(f"{device} (sm {info['capability']}), torch {torch.__version__}, triton {triton.__version__}, bitsandbytes {bitsandbytes.__version__}; "
          f"{args.dtype}{', nested' if args.nested else ''}; copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    rows, tuned = [], {}
    per_shape = args.sweep_seconds / max(1, sum(len(SHAPES[m]) for m in args.models))
    for model in args.models:
        for label, n, k in SHAPES[model]:
            print(f"{model} {label} ({n}, {k})")
            try:
                probe = make_weights(n, k, dtype, args.nested, 1)
                nbytes = weight_bytes(*probe[0])
                copies = max(1, min(300, -(-L2_BYTES // nbytes)))
                weights = probe + make_weights(n, k, dtype, args.nested, copies - 1)
            except Exception as error:
                print(f"  could not make the weights: {error}")
                continue
            x = torch.randn(1, k, device="cuda", dtype=dtype)
            from bitsandbytes import functional as F

            reference = torch.nn.functional.linear(x.float(), F.dequantize_4bit(*weights[0]).to(dtype).float())
            entry = dict(model=model, layer=label, N=n, K=k, bytes=nbytes, copies=copies, config=nf4.config(n, k, sms)._asdict(), results={})
            candidates = list(methods(weights, x, dtype))
            if not args.no_others:
                candidates += [(name, fn, None) for name, fn, _, _ in other_formats(n, k, dtype, x)]
            for item in candidates:
                name, fn = item[0], item[1]
                try:
                    y = fn(0)
                    torch.cuda.synchronize()
                    error = None
                    if "other format" not in name:
                        error = ((y.float().reshape(-1) - reference.reshape(-1)).abs().max() / reference.abs().max()).item()
                    seconds, how = time_calls(lambda i, fn=fn: fn(i % copies), max(copies, 20))
                    result = dict(us=seconds * 1e6, GBps=nbytes / seconds / 1e9, how=how, max_rel_error=error)
                    print(f"  {name:<28} {seconds * 1e6:8.1f} us  {nbytes / seconds / 1e9:7.0f} GB/s  ({how}{'' if error is None else f', max rel err {error:.2e}'})")
                except Exception as error:
                    result = dict(error=f"{error.__class__.__name__}: {str(error)[:200]}")
                    print(f"  {name:<28} failed: {result['error']}")
                    traceback.print_exc(limit=2)
                entry["results"][name] = result
            if args.sweep and reason is None and dtype == torch.float16:  # the float16 kernel's tiles
                from qwen_magic.kernels.nf4_half import half_config

                best, sweep_deadline = None, time.time() + per_shape
                candidates, streamed = [half_config(n, k, sms)] + half_sweep_configs(n, k), False
                while candidates:
                    cfg = candidates.pop(0)
                    if time.time() > sweep_deadline and not cfg.stream:
                        if best and not streamed:  # out of time: still the winner with its weight loads evicted first
                            candidates, streamed = [best[1]._replace(stream=True)], True
                            continue
                        print("  sweep: out of time")
                        break
                    try:
                        seconds, how = time_calls(lambda i, cfg=cfg: nf4.matvec(x, weights[i % copies][0], weights[i % copies][1], cfg=cfg), max(copies, 20), trials=5)
                    except Exception as error:
                        print(f"  sweep {cfg}: {error.__class__.__name__}: {str(error)[:120]}")
                        continue
                    print(f"  sweep {seconds * 1e6:7.1f} us {nbytes / seconds / 1e9:6.0f} GB/s {how} {cfg}")
                    if how == "graph" and (best is None or seconds < best[0]):
                        best = (seconds, cfg)
                    if not candidates and best and not streamed:
                        candidates, streamed = [best[1]._replace(stream=True)], True  # the winner, its weight loads evicted first
                if best:
                    seconds, cfg = best
                    entry["results"]["qwen_magic nf4 (best of sweep)"] = dict(us=seconds * 1e6, GBps=nbytes / seconds / 1e9, how="graph", config=cfg._asdict())
                    tuned[(n, k)] = cfg
                    print(f"  {'best of sweep':<28} {seconds * 1e6:8.1f} us  {nbytes / seconds / 1e9:7.0f} GB/s  {cfg}")
            elif args.sweep and reason is None:
                best, sweep_deadline = None, time.time() + per_shape
                for cfg in [nf4.config(n, k, sms)] + sweep_configs(n, k):  # the heuristic's pick first
                    if time.time() > sweep_deadline:
                        print("  sweep: out of time")
                        break
                    try:
                        seconds, _ = time_calls(lambda i, cfg=cfg: nf4.matvec(x, weights[i % copies][0], weights[i % copies][1], cfg=cfg), max(copies, 20), trials=5)
                    except Exception as error:
                        print(f"  sweep {cfg}: {error.__class__.__name__}: {str(error)[:120]}")
                        continue
                    if best is None or seconds < best[0]:
                        best = (seconds, cfg)
                if best:  # the winning tile with the other ways of reading x / looking up the table
                    for x_pairs, gather_asm in [(True, False), (False, True), (False, False)]:
                        cfg = best[1]._replace(x_pairs=x_pairs, gather_asm=gather_asm)
                        try:
                            seconds, _ = time_calls(lambda i, cfg=cfg: nf4.matvec(x, weights[i % copies][0], weights[i % copies][1], cfg=cfg), max(copies, 20), trials=5)
                        except Exception as error:
                            print(f"  sweep {cfg}: {error.__class__.__name__}: {str(error)[:120]}")
                            continue
                        print(f"  {'variant':<28} {seconds * 1e6:8.1f} us  x_pairs={x_pairs} gather_asm={gather_asm}")
                        entry.setdefault("variants", []).append(dict(us=seconds * 1e6, GBps=nbytes / seconds / 1e9, config=cfg._asdict()))
                        if seconds < best[0]:
                            best = (seconds, cfg)
                    seconds, cfg = best
                    entry["results"]["qwen_magic nf4 (best of sweep)"] = dict(us=seconds * 1e6, GBps=nbytes / seconds / 1e9, how="graph", config=cfg._asdict())
                    tuned[(n, k)] = cfg
                    print(f"  {'best of sweep':<28} {seconds * 1e6:8.1f} us  {nbytes / seconds / 1e9:7.0f} GB/s  {cfg}")
            rows.append(entry)
            del weights, probe
            torch.cuda.empty_cache()

    names = []
    for entry in rows:
        for name in entry["results"]:
            if name not in names:
                names.append(name)
    lines = [f"# Batch-1 4-bit matvec, {device} (sm {info['capability']}), {args.dtype}{', nested' if args.nested else ''}", "",
             f"torch {torch.__version__}, triton {triton.__version__}, bitsandbytes {bitsandbytes.__version__}; copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write). "
             "Times: median µs per product in a CUDA graph over weight copies larger than L2; GB/s: packed weight + absmax read once.", "",
             "| model | layer | N × K | MB | " + " | ".join(names) + " |", "|---|---|---|---|" + "---|" * len(names)]
    for entry in rows:
        cells = []
        for name in names:
            result = entry["results"].get(name)
            if result is None:
                cells.append("")
            elif "error" in result:
                cells.append("failed")
            else:
                cells.append(f"{result['us']:.1f} µs · {result['GBps']:.0f} GB/s")
        lines.append(f"| {entry['model']} | {entry['layer']} | {entry['N']} × {entry['K']} | {entry['bytes'] / 1e6:.1f} | " + " | ".join(cells) + " |")
    if tuned:
        lines += ["", "Sweep winners (paste into TUNED of qwen_magic/kernels/nf4_half.py for float16, else nf4.py, for this card):", "", "```python"]
        lines += [f"    ({n}, {k}): {c!r}," for (n, k), c in tuned.items()]
        lines += ["```"]
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    suffix = f"-{args.dtype}{'-nested' if args.nested else ''}"
    with open(os.path.join(args.out, f"bench_nf4{suffix}.md"), "w") as handle:
        handle.write(markdown)
    with open(os.path.join(args.out, f"bench_nf4{suffix}.json"), "w") as handle:
        json.dump(dict(info=info, rows=rows), handle, indent=1)
    half = {f"{n}x{k}": c._asdict() for (n, k), c in tuned.items() if hasattr(c, "per_thread")}
    if half:  # for QWEN_MAGIC_NF4_TUNED (qwen_magic/kernels/nf4_half.py)
        with open(os.path.join(args.out, "bench_nf4-tuned.json"), "w") as handle:
            json.dump(half, handle, indent=1)


if __name__ == "__main__":
    main()
