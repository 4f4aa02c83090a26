"""Loading a 7B model on a restarted runtime: from the float16 checkpoint (quantized while it loads)
against the 4-bit copy that ``%qwen_load MODEL --save-quantized DIR`` saved; and the host memory
each takes, against Colab's free tier (12.7 GB of RAM in all).

Needs no network: the model has Qwen2.5-7B-Instruct's exact shape with random weights (built as
``bench_decode.py`` builds it, or reused from --model-dir). Each load runs in a process of its own,
which samples its own anonymous memory (RssAnon: what must fit in RAM; the checkpoint's pages that
are only mapped from disk are file-backed and can be dropped) every 5 ms, and reports its peak, with
VmHWM (the peak of all resident memory, file-backed included) beside it.

    python benchmarks/bench_load.py --out DIR [--model-dir /tmp/qwen7b-shape] [--copy-dir /tmp/qwen7b-shape-nf4]

Writes DIR/load.json and prints the table.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time

COLAB_FREE_RAM = 12.7e9  # bytes, as Colab's free tier reports it
LIMIT = 12 * 2**30  # the bound this benchmark holds the loads to


def status(field):
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class PeakSampler(threading.Thread):
    """The highest RssAnon of this process while it runs."""

    def __init__(self, every=0.005):
        super().__init__(daemon=True)
        self.every, self.peak, self.running = every, status("RssAnon"), True

    def run(self):
        while self.running:
            self.peak = max(self.peak, status("RssAnon"))
            time.sleep(self.every)

    def stop(self):
        self.running = False
        self.join()
        self.peak = max(self.peak, status("RssAnon"))
        return self.peak


def drop_page_cache():
    """Ask the kernel to forget cached file pages, so a load reads the disk as after a restart; False if not allowed."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as file:
            file.write("3\n")
        return True
    except OSError:
        return False


def child(args):
    """One load (and, for --step save, the save) in this process; print one JSON line."""
    import torch

    from qwen_magic import loader, quantized

    before = status("RssAnon")
    sampler = PeakSampler()
    sampler.start()
    started = time.perf_counter()
    if args.step == "copy":
        loaded = loader.load(args.copy_dir, bits=16, dtype=args.dtype, engine="generate", notify=lambda _: None)
    else:
        loaded = loader.load(args.model_dir, bits=4, dtype=args.dtype, engine="generate", notify=lambda _: None)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    result = {"seconds": seconds, "precision": loaded.precision, "gpu_gib": torch.cuda.memory_allocated() / 2**30,
              "rss_anon_before_gib": before / 2**30}
    if args.step == "save":
        shutil.rmtree(args.copy_dir, ignore_errors=True)
        started = time.perf_counter()
        result["save_line"] = quantized.save(loaded, args.copy_dir, args.model_dir)
        result["save_seconds"] = time.perf_counter() - started
    result["peak_rss_anon_gib"] = sampler.stop() / 2**30
    result["vm_hwm_gib"] = status("VmHWM") / 2**30
    import bitsandbytes as bnb

    result["nf4_layers"] = sum(isinstance(m, bnb.nn.Linear4bit) for m in loaded.model.modules())
    print(json.dumps(result))


def run_step(args, step):
    cold = drop_page_cache()
    command = [sys.executable, __file__, "--step", step, "--model-dir", args.model_dir, "--copy-dir", args.copy_dir, "--dtype", args.dtype]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"step {step} failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["cold_page_cache"] = cold
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--model-dir", default="/tmp/qwen7b-shape", help="float16 checkpoint of the 7B shape (built if missing)")
    parser.add_argument("--copy-dir", default="/tmp/qwen7b-shape-nf4", help="where the 4-bit copy is saved")
    parser.add_argument("--dtype", default="float16", help="compute dtype (float16 is what a T4 uses)")
    parser.add_argument("--step", choices=("quantize", "save", "copy"), help="run one step in this process (internal)")
    args = parser.parse_args()
    if args.step:
        return child(args)

    import torch
    import transformers

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_decode import build_model

    if not os.path.exists(os.path.join(args.model_dir, "config.json")):
        build_model(args.model_dir)
    size = lambda path: sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)  # noqa: E731
    results = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
               "python": platform.python_version(), "compute_dtype": args.dtype, "fp16_checkpoint_gb": size(args.model_dir) / 1e9}
    results["save"] = run_step(args, "save")  # quantize while loading, then save the copy
    results["copy_gb"] = size(args.copy_dir) / 1e9
    results["quantize"] = [run_step(args, "quantize") for _ in range(2)]
    results["copy"] = [run_step(args, "copy") for _ in range(2)]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "load.json"), "w") as file:
        json.dump(results, file, indent=1)

    q, c = results["quantize"], results["copy"]
    peak = max(r["peak_rss_anon_gib"] for r in q + c + [results["save"]])
    print(f"{results['card']} · torch {results['torch']} · transformers {results['transformers']} · compute {args.dtype}")
    print(f"float16 checkpoint {results['fp16_checkpoint_gb']:.1f} GB · saved 4-bit copy {results['copy_gb']:.1f} GB "
          f"(saved in {results['save']['save_seconds']:.1f} s) · page cache dropped before each load: {q[0]['cold_page_cache']}")
    print("| load | seconds | peak RssAnon (GiB) | VmHWM (GiB) | GPU (GiB) | precision |")
    print("|---|---:|---:|---:|---:|---|")
    for name, rows in (("float16 + quantize", q), ("saved 4-bit copy", c)):
        for r in rows:
            print(f"| {name} | {r['seconds']:.1f} | {r['peak_rss_anon_gib']:.2f} | {r['vm_hwm_gib']:.2f} | {r['gpu_gib']:.2f} | {r['precision']} |")
    print(f"peak anonymous memory of any load: {peak:.2f} GiB; "
          f"{'fits' if peak * 2**30 < LIMIT else 'does NOT fit'} under {LIMIT / 2**30:.0f} GiB "
          f"(Colab's free tier: {COLAB_FREE_RAM / 1e9:.1f} GB in all)")


if __name__ == "__main__":
    main()
