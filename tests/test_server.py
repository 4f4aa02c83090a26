"""The same magics against a real OpenAI-compatible server: `transformers serve` on 127.0.0.1 with the tiny models."""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from IPython.utils.capture import capture_output
from helpers import ask, replies_match_the_recipe, usage_error

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port):
    command = [str(Path(sys.executable).parent / "transformers"), "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=5)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            client.models.list()
            return process
        except openai.APIConnectionError:
            if process.poll() is not None:
                raise RuntimeError("transformers serve exited at start")
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("transformers serve did not answer within 120 s")


@pytest.fixture(scope="module")
def server():
    port = free_port()
    process = start_server(port)
    yield f"http://127.0.0.1:{port}/v1"
    process.terminate()
    process.wait(timeout=30)


def test_listing_models(ip, qwen, server):
    with capture_output() as shown:
        ip.run_line_magic("qwen_load", f"--server {server}")
    assert shown.stdout.startswith(f"Models at {server}:")


def test_greedy_replies_through_the_server_equal_the_in_kernel_ones(ip, qwen, server, tiny_model_dir, classic):
    with capture_output() as shown:
        ip.run_line_magic("qwen_load", f"--server {server} {tiny_model_dir}")
    summary = shown.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"Connected to {server} · model {tiny_model_dir}") and "token-exact window" in summary
    history, shown = replies_match_the_recipe(ip, classic, ["介绍广州这座城市", "它有什么好吃的美食吗?"], "--greedy --max-new-tokens 8", 8)
    assert qwen.conversation.to_json() == history
    footer = shown.outputs[-1].data["text/markdown"]
    assert f"context {classic.count(history[:-1])} / 4,096" in footer and "8 tokens" in footer  # the server's usage


def test_streaming_arrives_in_pieces_and_the_interrupt_closes_the_stream(ip, qwen, server, endless_model_dir, interrupt_after, monkeypatch):
    ip.run_line_magic("qwen_load", f"--server {server} {endless_model_dir}")
    pieces = interrupt_after(20)
    shown = ask(ip, "Write forever.", "--greedy --max-new-tokens 3000")
    answer = qwen.conversation.messages[-1]
    assert answer["unfinished"] == "interrupted" and len(pieces) >= 20
    assert answer["content"] == "".join(pieces) or answer["content"].startswith("".join(pieces))
    assert "interrupted" in shown.outputs[-1].data["text/markdown"]
    monkeypatch.undo()
    ask(ip, "And now?", "--max-new-tokens 3")
    assert len(qwen.conversation.messages) == 4


def test_a_closed_port(ip, qwen):
    url = f"http://127.0.0.1:{free_port()}/v1"
    message = usage_error(ip.run_line_magic, "qwen_load", f"--server {url} some-model")
    assert message == f"Cannot reach a server at {url}: is it running, and is the URL right (it usually ends in /v1)?"
    assert qwen.loaded is None


def test_an_unknown_model(ip, qwen, server, tmp_path):
    with capture_output():
        ip.run_line_magic("qwen_load", f"--server {server} {tmp_path}/no-such-model")
    ask_before = qwen.conversation.to_json()
    message = usage_error(ip.run_cell_magic, "qwen", "", "hi")
    assert message.startswith(f"The server at {server} has no model") or message.startswith(f"The server at {server} failed")
    assert qwen.conversation.to_json() == ask_before


def test_a_server_that_goes_away(ip, qwen, tiny_model_dir):
    port = free_port()
    process = start_server(port)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        with capture_output():
            ip.run_line_magic("qwen_load", f"--server {url} {tiny_model_dir}")
        ask(ip, "one", "--max-new-tokens 3")
    finally:
        process.terminate()
        process.wait(timeout=30)
    before = qwen.conversation.to_json()
    message = usage_error(ip.run_cell_magic, "qwen", "", "two")
    assert message.startswith(f"Cannot reach a server at {url}")
    assert qwen.conversation.to_json() == before  # no half exchange


def test_the_api_key_is_never_shown_or_saved(ip, qwen, server, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MY_SERVER_KEY", "sk-secret-123")
    with capture_output() as shown:
        ip.run_line_magic("qwen_load", f"--server {server} {tiny_model_dir} --api-key-env MY_SERVER_KEY")
    assert qwen.loaded.engine.client.api_key == "sk-secret-123"
    path = tmp_path / "chat.json"
    ip.run_line_magic("config", f"QwenMagics.autosave = {str(path)!r}")
    shown_reply = ask(ip, "hello", "--max-new-tokens 3")
    ip.run_line_magic("qwen_history", f"--save {tmp_path}/saved.json")
    for text in [shown.stdout, shown_reply.stdout, path.read_text(), (tmp_path / "saved.json").read_text(),
                 json.dumps(shown_reply.outputs[-1].data)]:
        assert "sk-secret-123" not in text


def test_a_server_that_dies_mid_reply(ip, qwen, endless_model_dir, monkeypatch):
    """The real server's process killed while it streams: one line, the partial reply shown, no half exchange."""
    from qwen_magic.display import ReplyView

    port = free_port()
    process = start_server(port)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        with capture_output():
            ip.run_line_magic("qwen_load", f"--server {url} {endless_model_dir}")
        original, pieces = ReplyView.append, []

        def append_then_kill(view, piece, tokens=None):
            original(view, piece, tokens)
            pieces.append(piece)
            if len(pieces) == 5:
                process.kill()  # as a crash would

        monkeypatch.setattr(ReplyView, "append", append_then_kill)
        with capture_output() as shown:
            message = usage_error(ip.run_cell_magic, "qwen", "--greedy --max-new-tokens 3000", "Write forever.")
    finally:
        process.kill()
        process.wait(timeout=30)
    assert message.startswith(f"The server at {url} closed the stream before the reply was finished")
    assert qwen.conversation.messages == []
    shown_text = shown.outputs[-1].data["text/markdown"]
    assert shown_text.startswith("".join(pieces[:5])) and "generation failed; the conversation is unchanged" in shown_text
