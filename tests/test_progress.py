"""What %qwen_load shows in a notebook: a progress bar as text updated in place, then the summary line;
no TqdmWarning about IProgress and nothing on stderr, with or without ipywidgets."""

import pytest
from IPython.utils.capture import capture_output

from test_kernel import displays, execute, stdout

jupyter_client = pytest.importorskip("jupyter_client")
from jupyter_client.manager import start_new_kernel  # noqa: E402


def test_qwen_load_in_a_kernel_writes_nothing_to_stderr(tiny_model_dir):
    manager, client = start_new_kernel(kernel_name="python3")
    try:
        execute(client, "%load_ext qwen_magic")
        messages, reply = execute(client, f"%qwen_load {tiny_model_dir}")
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    assert reply["content"]["status"] == "ok"
    streams = [m for m in messages if m["msg_type"] == "stream"]
    assert [m["content"]["text"] for m in streams if m["content"]["name"] == "stderr"] == []
    assert "IProgress" not in str(messages)
    assert stdout(messages).splitlines()[-1].startswith(f"Loaded {tiny_model_dir} · float32 · cpu")
    for message in displays(messages):  # transformers 5 shows a bar of its weights; 4.57 none for one file
        assert set(message["content"]["data"]) == {"text/plain"}
        assert message["content"]["data"]["text/plain"].startswith("Loading")


def test_transformers_bars_become_one_output_updated_in_place(ip):
    from transformers.utils import logging as hf_logging

    from qwen_magic.progress import loading_progress

    with capture_output() as shown, loading_progress(ip):
        for _ in hf_logging.tqdm(range(3), desc="Loading weights", mininterval=0):
            pass
    assert shown.stderr == "" and shown.stdout == ""
    texts = [output.data["text/plain"] for output in shown.outputs]
    assert texts[0].startswith("Loading weights:   0%|") and texts[-1].startswith("Loading weights: 100%|██████████| 3/3")
    assert all(set(output.data) == {"text/plain"} for output in shown.outputs)
    assert [output.update for output in shown.outputs] == [False] + [True] * (len(texts) - 1)
    assert hf_logging.tqdm_lib.__name__ == "tqdm.auto"  # put back afterwards
