"""The fused kernels' effect on one CUDA-graph decode step (issue 13, part 2).

Builds a model of Qwen2.5-7B-Instruct's shape (or ``--shape qwen3-8b``) with random float16
weights directly on the GPU (unquantized: nothing is saved or downloaded; or, with ``--nf4``,
saved once and loaded in NF4 through the loader, as bench_decode.py does), captures the fast
engine's single-token decode step as a CUDA graph without and with
``qwen_magic.kernels.fused.patch``, and reports for each: the median milliseconds of a graph
replay (over ``--rounds`` rounds of ``--replays`` replays, the two graphs alternating, so drift
hits both), the CUDA kernels one step launches (torch.profiler, on the eager step the graph
holds), and how far the patched step's logits are from the unpatched one's.

    python benchmarks/bench_fused.py [--shape qwen2.5-7b] [--layers 28] [--history 512] [--out DIR]
    python benchmarks/bench_fused.py --nf4 --model-dir /tmp/qwen7b-shape   # NF4, as %qwen_load loads it

Prints a table; with ``--out`` also writes DIR/bench_fused.json. About a minute on an H100.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import SHAPES  # noqa: E402  (the same model shapes as the decode benchmark)

from qwen_magic.fast import FastEngine  # noqa: E402
from qwen_magic.kernels import fused  # noqa: E402
from qwen_magic.tiny import build_tokenizer  # noqa: E402


def build(shape: str, layers: int):
    import transformers

    config_name, model_name, fields, style = SHAPES[shape]
    fields = dict(fields)
    if layers:
        fields["num_hidden_layers"] = layers
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device("cuda"):
            model = getattr(transformers, model_name)(getattr(transformers, config_name)(**fields))
    finally:
        torch.set_default_dtype(torch.float32)
    return model.eval(), build_tokenizer(style=style)


def load_nf4(path: str, shape: str):
    """The shaped model in NF4 through ``%qwen_load``'s loader (built and saved under ``path`` first if absent)."""
    from bench_decode import build_model

    from qwen_magic import loader

    if not os.path.exists(os.path.join(path, "config.json")):
        build_model(path, shape)
    loaded = loader.load(path, bits=4, dtype="float16", engine="generate", notify=lambda _: None)
    return loaded.model.eval(), loaded.tokenizer


def kernels_per_step(engine, token, position) -> int:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine._step_eager(token, torch.tensor([position], device="cuda"))
        torch.cuda.synchronize()
    names = [event.name for event in prof.events() if event.device_type == DeviceType.CUDA]
    return sum(1 for name in names if not name.startswith(("Memcpy", "Memset")))  # kernels, not copies


def prepare(model, tokenizer, prompt):
    """An engine with the prompt prefilled and its decode graph captured; (engine, first token, its position)."""
    engine = FastEngine(model, tokenizer, context_length=len(prompt) + 256, use_graph=True)
    with torch.inference_mode():
        logits = engine.prefill(prompt, reserve=8)
        token = logits.argmax(-1).view(1, 1)
        engine.step(token, len(prompt))  # captures the graph
    torch.cuda.synchronize()
    return engine, token, len(prompt)


def rewind(engine, position) -> None:
    """Point the cache's writes back at ``position`` (newer static caches advance a counter inside the graph)."""
    engine.write_position = None
    with torch.inference_mode():  # the cache's tensors are inference tensors
        engine._write_at(position)


def replay_ms(engine, position, replays: int) -> float:
    rewind(engine, position)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        engine.graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen2.5-7b", choices=[s for s in SHAPES if not s.startswith("qwen3.5")])
    parser.add_argument("--layers", type=int, default=0, help="fewer layers than the real model (0: all)")
    parser.add_argument("--history", type=int, default=512, help="tokens in the cache before the timed step")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--nf4", action="store_true", help="the model in 4-bit NF4 (bitsandbytes), as %%qwen_load loads it")
    parser.add_argument("--model-dir", help="with --nf4: where the shaped model is (built and saved there if absent)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)

    reason = fused.available("cuda")
    if reason:
        sys.exit(f"bench_fused: {reason}")
    started = time.perf_counter()
    if args.nf4:
        model, tokenizer = load_nf4(args.model_dir or tempfile.mkdtemp(prefix=f"{args.shape}-shape-"), args.shape)
    else:
        model, tokenizer = build(args.shape, args.layers)
    weights = "NF4, float16 compute" if args.nf4 else "float16"
    prompt = [(i * 7919) % 150000 + 10 for i in range(args.history)]

    plain, token, position = prepare(model, tokenizer, prompt)
    plain_kernels = kernels_per_step(plain, token, position)
    rewind(plain, position)
    restore = fused.patch(model)
    try:
        patched, _, _ = prepare(model, tokenizer, prompt)
        patched_kernels = kernels_per_step(patched, token, position)
        rewind(patched, position)
    finally:
        restore()  # the captured graph keeps the patched kernels

    # Same input, same cache contents: the two graphs' logits
    with torch.inference_mode():
        for engine in (plain, patched):
            rewind(engine, position)
            engine.static_token.copy_(token)
            engine.static_position.fill_(position)
        plain.graph.replay()
        expected = plain.static_logits.float().clone()
        patched.graph.replay()
        got = patched.static_logits.float().clone()
    error = ((got - expected).norm() / expected.norm()).item()
    same_argmax = bool(torch.equal(got.argmax(-1), expected.argmax(-1)))

    for engine in (plain, patched):  # warm the clocks
        replay_ms(engine, position, args.replays)
    times = {"unpatched": [], "patched": []}
    for _ in range(args.rounds):
        times["unpatched"].append(replay_ms(plain, position, args.replays))
        times["patched"].append(replay_ms(patched, position, args.replays))
    plain.close()
    patched.close()

    result = dict(
        device=torch.cuda.get_device_name(), shape=args.shape, layers=model.config.num_hidden_layers, weights=weights,
        history=args.history, rounds=args.rounds, replays=args.replays,
        torch=torch.__version__, transformers=__import__("transformers").__version__, triton=__import__("triton").__version__,
        patched_modules=restore.counts,
        ms_per_step={k: statistics.median(v) for k, v in times.items()},
        ms_per_step_min={k: min(v) for k, v in times.items()},
        kernels_per_step=dict(unpatched=plain_kernels, patched=patched_kernels),
        logits_relative_error=error, same_argmax=same_argmax, seconds=round(time.perf_counter() - started, 1),
    )
    print(f"{result['device']}, {args.shape} shape, {result['layers']} layers, {weights}, {args.history} tokens cached")
    print(f"{'':10} {'ms/step (median)':>17} {'min':>8} {'CUDA kernels/step':>18}")
    for key in ("unpatched", "patched"):
        print(f"{key:10} {result['ms_per_step'][key]:17.3f} {result['ms_per_step_min'][key]:8.3f} {result['kernels_per_step'][key]:18d}")
    print(f"patched modules: {restore.counts}; logits relative error {error:.2e}, same argmax: {same_argmax}; {result['seconds']} s")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_fused.json"), "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
