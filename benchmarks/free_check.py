"""Does loading, chatting and freeing give all GPU memory back? (7B-shaped NF4 model)

    python benchmarks/free_check.py --model-dir DIR
"""

import argparse
import gc

import torch

from qwen_magic import loader
from qwen_magic.engine import generate_reply
from qwen_magic.settings import GenerationSettings


def gib():
    return torch.cuda.memory_allocated() / 2**30


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    args = parser.parse_args()
    print(f"start: {gib():.2f} GiB")
    for engine in ("generate", "fast", "generate", "fast"):
        loaded = loader.load(args.model_dir, bits=4, dtype="float16", engine=engine, notify=lambda _: None)
        print(f"{engine}: loaded {gib():.2f} GiB")
        generate_reply(loaded.engine, [{"role": "user", "content": "Hello"}], GenerationSettings(max_new_tokens=8))
        print(f"{engine}: after a reply {gib():.2f} GiB")
        weight = next(m for m in loaded.model.modules() if type(m).__name__ == "Linear4bit").weight
        loader.free(loaded)
        del loaded
        gc.collect()
        print(f"{engine}: freed {gib():.2f} GiB")
        holders = [type(r).__name__ for r in gc.get_referrers(weight) if r is not globals()]
        print(f"  a 4-bit weight is still referred to by: {holders[:8]}")
        del weight
        gc.collect()
        torch.cuda.empty_cache()
        print(f"  after dropping our own reference: {gib():.2f} GiB")


if __name__ == "__main__":
    main()
