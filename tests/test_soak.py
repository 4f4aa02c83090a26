"""Long sessions: 300 turns in one real kernel with the tiny model; 50 on a GPU with the 7B-shaped one.

What must hold over a long session: memory and the recorded-output store stay within their
bounds, a turn does not get slower than the window explains (the window caps the prompt, so
it must not), and the autosave file is valid after every turn. Each test prints its figures
(``pytest -s``); the README quotes them.
"""

import json
import statistics
import sys
import time
from pathlib import Path

import pytest

from qwen_magic.notebook import KEEP_CELLS, KEEP_CHARS
from qwen_magic.persistence import loads

TURNS = 300
FILLER = "The quick brown fox jumps over the lazy dog. 广州的早茶很有名。 "  # varied words: the tokenizer's fast case


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def kernel_pid(manager):
    provisioner = getattr(manager, "provisioner", None)  # jupyter_client 7 and newer
    process = getattr(provisioner, "process", None) or getattr(manager, "kernel", None)  # 6.1 (Colab)
    return process.pid


def turn_code(i):
    """Every cell prints (so the recorder fills past its bound); every tenth attaches the cell before it,
    which printed far more than one cell's bound."""
    if i % 10 == 9:
        return f"print('turn {i}: ' + {FILLER!r} * 3000)\n%qwen Turn {i}: 介绍广州这座城市"
    if i % 10 == 0:
        return f"print('turn {i}')\n%qwen Turn {i}: what did the cell before print? {{Stdout[-1]}} It was {{In[-1]}}"
    return f"print('turn {i}')\n%qwen Turn {i}: 它有什么好吃的美食吗?"  # IPython would take a final ? for help


@pytest.mark.kernel
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the kernel's memory from /proc")
def test_three_hundred_turns_in_one_kernel(tiny_model_dir, tmp_path):
    pytest.importorskip("jupyter_client")
    from jupyter_client.manager import start_new_kernel
    from test_kernel import execute, stdout

    autosave = tmp_path / "chats.json"
    manager, client = start_new_kernel(kernel_name="python3")
    try:
        pid = kernel_pid(manager)
        for code in ["%load_ext qwen_magic", f"%qwen_load {tiny_model_dir}", "%config QwenMagics.do_sample = False",
                     "%config QwenMagics.max_new_tokens = 8", "%config QwenMagics.max_turns = 6",
                     f"%config QwenMagics.autosave = {str(autosave)!r}"]:
            messages, reply = execute(client, code)
            assert reply["content"]["status"] == "ok", messages
        seconds, rss = [], {}
        for i in range(1, TURNS + 1):
            started = time.perf_counter()
            messages, reply = execute(client, turn_code(i))
            seconds.append(time.perf_counter() - started)
            assert reply["content"]["status"] == "ok", [m["content"] for m in messages if m["msg_type"] == "error"]
            saved = loads(autosave.read_text(encoding="utf-8"))[""]  # a valid file after every turn
            assert len(saved.exchanges) == i and saved.messages[-2]["content"].startswith(f"Turn {i}: ")
            if i % 10 == 0:
                assert "…" in saved.messages[-2]["content"] and "tokens omitted" in saved.messages[-2]["content"]
            if i in (30, 60, TURNS):
                rss[i] = rss_bytes(pid)

        messages, _ = execute(client, "m = get_ipython().magics_manager.registry['QwenMagics']\n"
                                      "print(len(m.recorder.printed), max(map(len, m.recorder.printed.values())))")
        cells, longest = map(int, stdout(messages).split())
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)

    # Lower quartiles: a machine shared with other work only ever adds time, in bursts.
    early, late = statistics.quantiles(seconds[30:60], n=4)[0], statistics.quantiles(seconds[-30:], n=4)[0]
    figures = {
        "turns": TURNS, "seconds_total": round(sum(seconds), 1),
        "median_turn_s_31_60": round(statistics.median(seconds[30:60]), 3), "median_turn_s_last_30": round(statistics.median(seconds[-30:]), 3),
        "quartile_turn_s_31_60": round(early, 3), "quartile_turn_s_last_30": round(late, 3), "rss_mib_turn_30": round(rss[30] / 2**20, 1),
        "rss_mib_turn_60": round(rss[60] / 2**20, 1), "rss_mib_end": round(rss[TURNS] / 2**20, 1),
        "recorded_cells": cells, "longest_recorded_chars": longest, "autosave_kib": round(autosave.stat().st_size / 1024, 1),
    }
    print("\nsoak:", json.dumps(figures))
    assert cells == KEEP_CELLS and longest <= KEEP_CHARS + 100  # the recorder's bound (head, marker, tail)
    # What grows is bounded or tiny: the recorder (200 cells), the conversation, and IPython 9's own
    # history of what cells printed (about 330 KB for each big print here).
    assert rss[TURNS] - rss[30] < 64 * 2**20
    assert late < 2 * early + 0.05  # the window caps the prompt: no growth beyond noise (autosave grows a little)


# --- the GPU: 50 turns on the 7B-shaped model with the fast engine


@pytest.mark.gpu
def test_fifty_turns_on_the_7b_shaped_model_keep_gpu_memory_flat(tmp_path_factory):
    import importlib.util

    import torch

    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("needs a CUDA GPU and bitsandbytes")
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_decode import build_model  # Qwen2.5-7B-Instruct's exact shape, random weights, saved once

    from qwen_magic.tiny import _CORPUS

    path = tmp_path_factory.mktemp("qwen7b-shape")
    build_model(str(path))
    ip = InteractiveShell.instance()
    ip.extension_manager.load_extension("qwen_magic")
    magics = ip.magics_manager.registry["QwenMagics"]
    try:
        with capture_output() as shown:
            ip.run_line_magic("qwen_load", f"{path} --engine fast")
            ip.run_line_magic("config", "QwenMagics.max_turns = 12")
        assert "engine: static KV cache + CUDA graph" in shown.stdout
        engine, rows = magics.loaded.engine, []
        torch.cuda.reset_peak_memory_stats()
        for i in range(50):
            # About 400 tokens a question: twelve exchanges outgrow the first cache (4,096), then the window caps them.
            question = f"Turn {i}. " + " ".join(_CORPUS[(i + k) % len(_CORPUS)] for k in range(8))
            with capture_output():
                ip.run_cell_magic("qwen", "--max-new-tokens 32 --seed 0", question)
            torch.cuda.synchronize()
            rows.append((getattr(engine, "capacity", 0), torch.cuda.memory_allocated(), torch.cuda.max_memory_reserved()))
        last_growth = max(i for i in range(len(rows)) if i == 0 or rows[i][0] != rows[i - 1][0])
        steady = rows[last_growth + 1:]
        mib = lambda n: round(n / 2**20, 1)  # noqa: E731
        print("\ngpu soak:", json.dumps({
            "device": torch.cuda.get_device_name(), "capacity": rows[-1][0], "last_growth_turn": last_growth + 1,
            "allocated_mib_steady": [mib(min(r[1] for r in steady)), mib(max(r[1] for r in steady))] if steady else None,
            "max_reserved_mib_at_last_growth": mib(rows[last_growth][2]), "max_reserved_mib_end": mib(rows[-1][2]),
            "per_turn": [(c, mib(a), mib(r)) for c, a, r in rows]}))
        assert len(steady) >= 20, "the cache kept growing: the window should cap the prompt"
        assert max(r[1] for r in steady) - min(r[1] for r in steady) <= 8 * 2**20  # allocated: flat
        # The allocator's reserved pool may take one step while the window fills (seen: +130 MiB at turn 14 on an
        # H100, allocated memory unchanged); over the last 30 turns it must not move at all.
        assert rows[-1][2] == rows[-30][2] and rows[-1][2] - steady[0][2] <= 256 * 2**20
        assert len(magics.conversation.messages) == 100
    finally:
        ip.extension_manager.unload_extension("qwen_magic")
        import shutil

        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-s"] + sys.argv[1:]))
