"""A real IPython kernel, driven over the Jupyter protocol as a notebook front end drives it."""

import json
import queue
from importlib.metadata import version

import pytest

jupyter_client = pytest.importorskip("jupyter_client")
from jupyter_client.manager import start_new_kernel  # noqa: E402

pytestmark = pytest.mark.kernel
TIMEOUT = 120


@pytest.fixture(scope="module")
def kernel():
    manager, client = start_new_kernel(kernel_name="python3")
    yield manager, client
    client.stop_channels()
    manager.shutdown_kernel(now=True)


def execute(client, code, on_message=None):
    """Run ``code``; return its iopub messages (until idle) and the execute reply."""
    msg_id = client.execute(code)
    messages = []
    while True:
        message = client.get_iopub_msg(timeout=TIMEOUT)
        if message["parent_header"].get("msg_id") != msg_id:
            continue
        messages.append(message)
        if on_message:
            on_message(message)
        if message["msg_type"] == "status" and message["content"]["execution_state"] == "idle":
            break
    while True:
        reply = client.get_shell_msg(timeout=TIMEOUT)
        if reply["parent_header"].get("msg_id") == msg_id:
            return messages, reply


def displays(messages):
    return [m for m in messages if m["msg_type"] in ("display_data", "update_display_data")]


def stdout(messages):
    return "".join(m["content"]["text"] for m in messages if m["msg_type"] == "stream")


def final_markdown(messages):
    return displays(messages)[-1]["content"]["data"]["text/markdown"]


def test_the_kernel_runs_this_python(kernel):
    import sys

    import IPython

    messages, _ = execute(kernel[1], "import sys, IPython; print(sys.executable, IPython.__version__)")
    assert stdout(messages).split() == [sys.executable, IPython.__version__]


def test_chat_in_a_real_kernel(kernel, tiny_model_dir, classic):
    _, client = kernel
    for code in ["%load_ext qwen_magic", "%config QwenMagics.do_sample = False", "%config QwenMagics.max_new_tokens = 16"]:
        messages, reply = execute(client, code)
        assert reply["content"]["status"] == "ok", messages
    messages, reply = execute(client, f"%qwen_load {tiny_model_dir}")
    assert f"Loaded {tiny_model_dir} · float32 · cpu" in stdout(messages)

    history = []
    for question in ["介绍广州这座城市", "它有什么好吃的美食吗?"]:
        messages, reply = execute(client, f"%%qwen\n{question}")
        assert reply["content"]["status"] == "ok"
        shown = displays(messages)
        assert shown[0]["msg_type"] == "display_data"
        assert all(m["msg_type"] == "update_display_data" for m in shown[1:])
        assert len({m["content"]["transient"]["display_id"] for m in shown}) == 1
        history.append({"role": "user", "content": question})
        expected = classic.reply(history, 16)
        history.append({"role": "assistant", "content": expected})
        assert final_markdown(messages).startswith(expected)

    messages, _ = execute(client, "%qwen_history --json")
    assert json.loads(stdout(messages)) == history


def test_interrupt_stops_generation_and_keeps_the_partial_reply(kernel, endless_model_dir):
    manager, client = kernel
    execute(client, "%load_ext qwen_magic")
    execute(client, f"%qwen_load {endless_model_dir}")
    execute(client, "%qwen_history --clear")
    updates = queue.Queue()
    interrupted = []

    def interrupt_after_a_few_updates(message):
        if message["msg_type"] == "update_display_data":
            updates.put(message)
            if updates.qsize() == 3 and not interrupted:
                interrupted.append(True)
                manager.interrupt_kernel()

    messages, reply = execute(client, "%%qwen --max-new-tokens 4000\nWrite forever.", interrupt_after_a_few_updates)
    assert interrupted
    assert reply["content"]["status"] == "ok"  # no traceback, no error
    assert not [m for m in messages if m["msg_type"] == "error"]
    markdown = final_markdown(messages)
    assert "interrupted" in markdown

    messages, _ = execute(client, "%qwen_history --json")
    saved = json.loads(stdout(messages))
    assert [m["role"] for m in saved] == ["user", "assistant"]
    partial = saved[1]["content"]
    assert partial and markdown.startswith(partial)

    messages, reply = execute(client, "%%qwen --max-new-tokens 5\nAnd now?")
    assert reply["content"]["status"] == "ok"
    assert "5 tokens" in final_markdown(messages)


def test_streamed_and_unstreamed_replies_are_the_same(kernel, endless_model_dir):
    _, client = kernel
    for code in ["%load_ext qwen_magic", f"%qwen_load {endless_model_dir}", "%config QwenMagics.do_sample = False"]:
        execute(client, code)
    question = "%%qwen --no-history --max-new-tokens 800\n介绍广州这座城市"  # long enough for several updates
    streamed, _ = execute(client, question)
    texts = [m["content"]["data"]["text/plain"] for m in displays(streamed)]
    pieces = [t.removesuffix(" ▌") for t in texts[1:-1]]
    assert len(pieces) >= 2 and all(b.startswith(a) for a, b in zip(pieces, pieces[1:]))  # it grew in place
    execute(client, "%config QwenMagics.stream = False")
    whole, _ = execute(client, question)
    execute(client, "%config QwenMagics.stream = True")
    assert len(displays(whole)) == 1 and displays(whole)[0]["msg_type"] == "display_data"
    reply = lambda messages: final_markdown(messages).rsplit("\n\n<sub>", 1)[0]  # the stats line differs in timings
    assert reply(whole) == reply(streamed) and len(reply(whole)) > 500


def test_notebook_context_in_a_real_kernel(kernel, tiny_model_dir):
    _, client = kernel
    for code in ["%load_ext qwen_magic", f"%qwen_load {tiny_model_dir}", "%qwen_history --clear"]:
        execute(client, code)
    messages, reply = execute(client, "print('marker-5678')\n{'a': 1}['b']")
    assert reply["content"]["status"] == "error"
    failing = reply["content"]["execution_count"]
    execute(client, "%%qwen --max-new-tokens 4\nWhy? {Err[-1]} It printed {Stdout[-1]}")
    execute(client, "%qwen_explain")
    messages, _ = execute(client, "%qwen_history --json")
    history = json.loads(stdout(messages))
    why, explain = history[0]["content"], history[2]["content"]
    assert why.startswith("Why? ") and "KeyError: 'b'" in why and why.endswith("It printed marker-5678\n")
    assert "\x1b[" not in why
    assert "{'a': 1}['b']" in explain and "KeyError" in explain
    messages, _ = execute(client, f"%%qwen\n{{Out[{failing}]}}")
    assert f"cell {failing} has no result; nothing was sent." in stdout(messages) + "".join(
        m["content"].get("evalue", "") for m in messages if m["msg_type"] == "error")


def execute_in_cell(client, code, cell_id):
    """An execute request as JupyterLab sends it, with the cell's id in the metadata."""
    message = client.session.msg("execute_request", {
        "code": code, "silent": False, "store_history": True, "user_expressions": {}, "allow_stdin": False,
        "stop_on_error": True}, metadata={"cellId": cell_id})
    client.shell_channel.send(message)
    msg_id = message["header"]["msg_id"]
    messages = []
    while True:
        reply = client.get_iopub_msg(timeout=TIMEOUT)
        if reply["parent_header"].get("msg_id") == msg_id:
            messages.append(reply)
            if reply["msg_type"] == "status" and reply["content"]["execution_state"] == "idle":
                break
    while client.get_shell_msg(timeout=TIMEOUT)["parent_header"].get("msg_id") != msg_id:
        pass
    return messages


@pytest.mark.skipif(int(version("ipykernel").split(".")[0]) < 6, reason="ipykernel 5 (Colab) passes no cell ids to IPython")
def test_rerunning_a_cell_in_jupyterlab_replaces_its_exchange(kernel, tiny_model_dir):
    _, client = kernel
    for code in ["%load_ext qwen_magic", f"%qwen_load {tiny_model_dir}", "%qwen_history --clear"]:
        execute(client, code)
    execute_in_cell(client, "%%qwen --max-new-tokens 3\nfirst", "cell-1")
    execute_in_cell(client, "%%qwen --max-new-tokens 3\nsecond", "cell-2")
    messages = execute_in_cell(client, "%%qwen --max-new-tokens 3\nsecond, again", "cell-2")
    assert "Re-ran this cell: replaced its earlier exchange (turn 2)." in stdout(messages)
    messages, _ = execute(client, "%qwen_history --json")
    assert [m["content"] for m in json.loads(stdout(messages))][::2] == ["first", "second, again"]


def test_a_figure_a_cell_displayed_reaches_the_model_through_with(kernel, tmp_path_factory):
    """matplotlib's inline backend shows the figure after the cell; --with N sends that picture itself."""
    pytest.importorskip("torchvision")
    pytest.importorskip("matplotlib")
    from qwen_magic.tiny import available_vl_families, write_tiny_vl_model

    if not available_vl_families():
        pytest.skip("this transformers has no Qwen vision-language classes")
    model = write_tiny_vl_model(tmp_path_factory.mktemp("kernel-vl"), family=available_vl_families()[0])
    _, client = kernel
    for code in ["%load_ext qwen_magic", f"%qwen_load {model}", "%qwen_history --clear",
                 # what the processor receives, recorded in the kernel
                 "import qwen_magic.picture_cache as _v\n_sizes = []\n_open = _v.open_image\n"
                 "_v.open_image = lambda data: _sizes.append(_open(data).size) or _open(data)"]:
        messages, reply = execute(client, code)
        assert reply["content"]["status"] == "ok", messages
    messages, reply = execute(client, "%matplotlib inline\nimport matplotlib.pyplot as plt\nplt.plot([1, 4, 2, 3])\nplt.title('sales')")
    figure = reply["content"]["execution_count"]
    shown = [m for m in displays(messages) if "image/png" in m["content"]["data"]]
    assert len(shown) == 1
    import base64
    import io

    from PIL import Image

    size = Image.open(io.BytesIO(base64.b64decode(shown[0]["content"]["data"]["image/png"]))).size
    messages, reply = execute(client, f"%%qwen --with {figure} --max-new-tokens 3\nWhat does this plot show?")
    assert reply["content"]["status"] == "ok", messages
    messages, _ = execute(client, "print(_sizes)")  # the picture the processor was given, decoded once (counted and sent)
    assert stdout(messages).strip() == str([size])
    messages, _ = execute(client, "%qwen_history --json")
    sent = json.loads(stdout(messages))[0]
    assert f"Cell {figure}, displayed: [image 1]" in sent["content"] and len(sent["images"]) == 1
