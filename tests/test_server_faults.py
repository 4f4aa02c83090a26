"""Every way a server can fail, provoked by a fault-injecting server (tests/faultserver.py) on 127.0.0.1.

Each fault is one line; the partial reply stays visible in the cell, the conversation gets no
half exchange, the model stays connected, and the next question works.
"""

import time

import pytest
from IPython.utils.capture import capture_output
from faultserver import FaultServer
from helpers import ask, usage_error

pytest.importorskip("openai")


@pytest.fixture(scope="module")
def fault(tiny_model_dir):
    server = FaultServer(models=[tiny_model_dir])
    yield server
    server.close()


@pytest.fixture
def connected(ip, qwen, fault, tiny_model_dir):
    """The magics talking to the fault server; its model name is the tiny model's path, so the window is token-exact."""
    fault.reset("ok")
    with capture_output():
        ip.run_line_magic("qwen_load", f"--server {fault.url} {tiny_model_dir}")
    yield qwen
    fault.release.set()


def fails(ip, text, line=""):
    """Ask in a cell that must fail; return the one-line message and what the cell showed."""
    with capture_output() as shown:
        message = usage_error(ip.run_cell_magic, "qwen", line, text)
    return message, shown


def questions(conversation):
    return [m["content"] for m in conversation.messages[::2]]


def test_a_whole_reply_with_the_servers_usage(ip, connected, fault):
    shown = ask(ip, "one")
    assert ip.user_ns["_qwen"] == "Hello, world!"
    assert connected.conversation.to_json() == [{"role": "user", "content": "one"}, {"role": "assistant", "content": "Hello, world!"}]
    assert fault.requests[-1]["messages"] == [{"role": "user", "content": "one"}]
    footer = shown.outputs[-1].data["text/markdown"]
    assert "4 tokens" in footer and "context 31 / 4,096" in footer  # the server's own counts


@pytest.mark.parametrize("mode", ["no-usage", "null-usage"])
def test_without_usage_the_prompt_is_counted_with_the_chat_template(ip, connected, fault, classic, mode):
    fault.reset(mode)
    ask(ip, "one")
    shown = ask(ip, "介绍广州这座城市")
    sent = fault.requests[-1]["messages"]
    assert sent == connected.conversation.to_json()[:-1]
    assert f"context {classic.count(sent)} / 4,096" in shown.outputs[-1].data["text/markdown"]


@pytest.mark.parametrize("mode, expected", [
    ("status", "failed (500); see its log. The conversation is unchanged."),
    ("error-event", "reported an error in the middle of the reply: the engine died. The conversation is unchanged."),
    ("cut", "closed the stream before the reply was finished (did it crash, or was the connection cut?); the conversation is unchanged."),
    ("eof", "closed the stream before the reply was finished (did it crash, or was the connection cut?); the conversation is unchanged."),
    ("garbage", "sent an event that is not JSON ("),
])
def test_a_server_fault_is_one_line_and_leaves_no_half_exchange(ip, connected, fault, mode, expected):
    ask(ip, "one")
    before, engine = connected.conversation.to_json(), connected.loaded.engine
    fault.reset(mode)
    message, shown = fails(ip, "two")
    assert message.startswith(f"The server at {fault.url} ") and expected in message
    assert connected.conversation.to_json() == before
    if mode != "status":  # the part that came stays in the cell, marked as failed
        shown_text = shown.outputs[-1].data["text/markdown"]
        assert shown_text.startswith("Hello, ") and "generation failed; the conversation is unchanged" in shown_text
    fault.reset("ok")
    ask(ip, "three")
    assert questions(connected.conversation) == ["one", "three"]
    assert connected.loaded.engine is engine


def test_a_stalled_stream_ends_at_server_timeout_and_says_how_long_it_waited(ip, connected, fault):
    ask(ip, "one")
    before = connected.conversation.to_json()
    ip.run_line_magic("config", "QwenMagics.server_timeout = 1.5")  # applies to the engine already connected
    fault.reset("stall")
    started = time.monotonic()
    message, shown = fails(ip, "two")
    assert time.monotonic() - started < 10
    assert message == (f"The server at {fault.url} sent nothing for 1.5 s: is it stalled or overloaded? "
                       "The conversation is unchanged; %config QwenMagics.server_timeout = SECONDS waits longer.")
    assert shown.outputs[-1].data["text/markdown"].startswith("Hello, ")
    assert connected.conversation.to_json() == before


def test_the_stop_button_ends_a_stalled_stream_at_once_and_keeps_what_came(ip, connected, fault, interrupt_after, monkeypatch):
    fault.reset("stall")
    assert connected.server_timeout == 60
    pieces = interrupt_after(2)  # the stop button, pressed once the server has gone silent
    started = time.monotonic()
    shown = ask(ip, "Write forever.")
    assert time.monotonic() - started < 10  # not the 60 s of server_timeout
    assert pieces == ["Hello", ", "]
    answer = connected.conversation.messages[-1]
    assert answer["content"] == "Hello, " and answer["unfinished"] == "interrupted"
    assert "interrupted" in shown.outputs[-1].data["text/markdown"]
    assert fault.disconnected.wait(10)  # the stream was closed: the server knows to stop
    monkeypatch.undo()
    fault.reset("ok")
    ask(ip, "And now?")
    assert questions(connected.conversation) == ["Write forever.", "And now?"]


def test_server_timeout_is_checked(ip, qwen):
    for bad in ("0", "-1", "float('nan')"):
        with capture_output():
            ip.run_line_magic("config", f"QwenMagics.server_timeout = {bad}")
        assert qwen.server_timeout == 60


def test_a_refused_key_keeps_the_model_that_works(ip, qwen, fault, tiny_model_dir, monkeypatch):
    ip.run_line_magic("qwen_load", tiny_model_dir)
    loaded = qwen.loaded
    fault.reset()
    fault.key = "right-key"
    monkeypatch.setenv("QWEN_TEST_KEY", "wrong-key")
    message = usage_error(ip.run_line_magic, "qwen_load", f"--server {fault.url} {tiny_model_dir} --api-key-env QWEN_TEST_KEY")
    assert message == ("The server refused the API key (401): put the right key in the environment variable QWEN_TEST_KEY "
                       f"(or name another with --api-key-env). {tiny_model_dir} is still loaded.")
    assert qwen.loaded is loaded
    ask(ip, "still here?", "--max-new-tokens 3")
    assert len(qwen.conversation.messages) == 2


def test_a_key_refused_in_the_middle_of_a_session(ip, connected, fault, monkeypatch):
    ask(ip, "one")
    before = connected.conversation.to_json()
    fault.key = "rotated"
    message, _ = fails(ip, "two")
    assert message.startswith("The server refused the API key (401): put the right key in the environment variable OPENAI_API_KEY")
    assert connected.conversation.to_json() == before


def test_a_server_that_never_starts_its_answer(ip, connected, fault):
    ip.run_line_magic("config", "QwenMagics.server_timeout = 1")
    fault.reset("queue")
    started = time.monotonic()
    message, _ = fails(ip, "one")
    assert time.monotonic() - started < 10
    assert message.startswith(f"The server at {fault.url} sent nothing for 1 s: is it stalled or overloaded?")
    assert connected.conversation.messages == []


def test_the_stop_button_before_the_server_starts_its_answer(ip, connected, fault):
    import os
    import signal
    import threading

    fault.reset("queue")
    stop = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))  # the stop button, a second in
    started = time.monotonic()
    stop.start()
    try:
        shown = ask(ip, "one")
    finally:
        stop.cancel()
    assert time.monotonic() - started < 10
    assert "interrupted before the first token; the conversation is unchanged" in shown.outputs[-1].data["text/markdown"]
    assert connected.conversation.messages == []


@pytest.mark.kernel
def test_the_kernels_stop_button_ends_a_stalled_stream(fault, tiny_model_dir):
    """The same, in a real kernel: the interrupt a front end's stop button sends."""
    import json

    pytest.importorskip("jupyter_client")
    from jupyter_client.manager import start_new_kernel
    from test_kernel import execute, final_markdown, stdout

    fault.reset("stall")
    manager, client = start_new_kernel(kernel_name="python3")
    try:
        for code in ["%load_ext qwen_magic", "%config QwenMagics.server_timeout = 30",
                     f"%qwen_load --server {fault.url} {tiny_model_dir}"]:
            messages, reply = execute(client, code)
            assert reply["content"]["status"] == "ok", messages
        pressed = []

        def press_stop_once_text_shows(message):
            if message["msg_type"] == "update_display_data" and not pressed and "Hello" in message["content"]["data"]["text/plain"]:
                pressed.append(time.monotonic())
                manager.interrupt_kernel()

        messages, reply = execute(client, "%%qwen\nWrite forever.", press_stop_once_text_shows)
        assert pressed and time.monotonic() - pressed[0] < 10  # not server_timeout's 30 s
        assert reply["content"]["status"] == "ok" and not [m for m in messages if m["msg_type"] == "error"]
        markdown = final_markdown(messages)
        assert markdown.startswith("Hello") and "interrupted" in markdown
        messages, _ = execute(client, "%qwen_history --json")
        saved = json.loads(stdout(messages))
        assert [m["role"] for m in saved] == ["user", "assistant"] and saved[1]["content"] in ("Hello", "Hello, ")
    finally:
        fault.release.set()
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def test_a_fault_without_streaming_still_shows_what_came(ip, connected, fault):
    ip.run_line_magic("config", "QwenMagics.stream = False")
    fault.reset("cut")
    message, shown = fails(ip, "two")
    assert "closed the stream before the reply was finished" in message
    shown_text = shown.outputs[-1].data["text/markdown"]
    assert shown_text.startswith("Hello, ") and "generation failed; the conversation is unchanged" in shown_text
    assert connected.conversation.to_json() == []
