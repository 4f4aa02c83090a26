"""Notebook context in the chat: {In[7]}, {Out[7]}, {Err[-1]}, {Stdout[7]}, {name}, --with, %qwen_explain."""

import pytest
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output

from qwen_magic.notebook import KEEP_CELLS, KEEP_CHARS
from helpers import ask


def cell(ip, code):
    """Run ``code`` as a notebook cell (it gets an execution count); return that count."""
    result = ip.run_cell(code, store_history=True)
    return result.execution_count


def sent(magics):
    return magics.conversation.messages[-2]["content"]


def test_err_and_stdout_of_a_failing_cell(ip, chat):
    failing = cell(ip, "print('marker-1234')\n1 / 0")
    ask(ip, "explain {Err[-1]} given {Stdout[-1]}")
    message = sent(chat)
    assert message.startswith("explain Traceback") or message.startswith("explain -")
    assert "ZeroDivisionError" in message and "\x1b[" not in message
    assert message.endswith("given marker-1234\n")
    ask(ip, f"again {{Err[{failing}]}}")
    assert "ZeroDivisionError" in sent(chat)


def test_qwen_explain_sends_source_and_traceback(ip, chat):
    cell(ip, "values = [1, 2]\nvalues[5]")
    with capture_output():
        ip.run_line_magic("qwen_explain", "")
    message = sent(chat)
    assert message.startswith("This notebook cell raised an error.")
    assert "values = [1, 2]\nvalues[5]" in message and "IndexError" in message


def test_qwen_explain_without_any_error(ip, chat):
    chat.recorder.errors.clear()
    with pytest.raises(UsageError, match="No cell has raised an error"):
        ip.run_line_magic("qwen_explain", "")


def test_in_out_and_names(ip, chat):
    source = cell(ip, "answer = 6 * 7\nanswer")
    ask(ip, f"source {{In[{source}]}} result {{Out[{source}]}} name {{answer}}")
    assert sent(chat) == "source answer = 6 * 7\nanswer result 42 name 42"


def test_braces_that_are_not_references_stay_as_written(ip, chat):
    pasted = (
        'def f(d):\n    return {"key": [1, 2, {"nested": d}]}\n'
        "print(f\"{undefined_name} and {{escaped}} and {In[x]}\")\n"
        "data = {i: i * 2 for i in range(3)}\n{}\n{ spaced }"
    )
    with capture_output() as shown:
        ip.run_cell_magic("qwen", "", pasted)
    assert sent(chat) == pasted.strip()
    assert "Note: {undefined_name} is not defined here, so sent as written." in shown.stdout


def test_nothing_is_evaluated(ip, chat, tmp_path):
    marker = tmp_path / "ran"
    text = f"{{__import__('os').system('touch {marker}')}} {{Out[1+1]}} {{answer.real}}"
    with capture_output():
        ip.run_cell_magic("qwen", "", text)
    assert not marker.exists()
    assert sent(chat) == text


@pytest.mark.parametrize("reference, complaint", [
    ("{In[99999]}", "there is no cell 99999 before this one"),
    ("{Out[NOOUT]}", "has no result"),
    ("{Err[NOERR]}", "raised no error"),
    ("{Stdout[NOOUT]}", "printed nothing"),
])
def test_missing_references_are_refused_and_nothing_is_sent(ip, chat, reference, complaint):
    quiet = cell(ip, "quiet = 1")
    ask(ip, "one")
    before = list(chat.conversation.messages)
    reference = reference.replace("NOOUT", str(quiet)).replace("NOERR", str(quiet))
    with pytest.raises(UsageError) as error:
        ip.run_cell_magic("qwen", "", f"look at {reference}")
    assert type(error.value) is UsageError and complaint in str(error.value)
    assert str(error.value).endswith("nothing was sent.")
    assert chat.conversation.messages == before


def test_a_huge_output_is_trimmed_to_the_budget_with_a_marker(ip, chat):
    ip.run_line_magic("config", "QwenMagics.context_budget = 300")
    cell(ip, "print('x' * 200_000)")
    ask(ip, "summarise {Stdout[-1]}")
    message = sent(chat)
    assert "tokens omitted …" in message
    tokens = chat.loaded.tokenizer(message, add_special_tokens=False)["input_ids"]
    assert len(tokens) < 300 + 40  # the budget, the marker and the question
    assert len(chat.recorder.printed[max(chat.recorder.printed)]) <= KEEP_CHARS + 100


def test_with_attaches_a_cell_and_a_variable(ip, chat):
    number = cell(ip, "print('hello from the cell')\nlimit = 3\nlimit + 1")
    ask(ip, "what does this do?", f"--with {number} --with limit")
    message = sent(chat)
    assert message.startswith(f"Cell {number}, source:\n```python\nprint('hello from the cell')")
    assert f"Cell {number}, printed output:\n```\nhello from the cell\n\n```" in message
    assert f"Cell {number}, result:\n```\n4\n```" in message
    assert "Variable `limit`:\n```\n3\n```" in message
    assert message.endswith("what does this do?")
    with pytest.raises(UsageError, match="--with nothing_here: no variable of that name"):
        ip.run_cell_magic("qwen", "--with nothing_here", "hi")


def test_a_dataframe_is_sent_as_a_markdown_table(ip, chat):
    pytest.importorskip("pandas")
    cell(ip, "import pandas as pd\ntable = pd.DataFrame({'city': ['广州', 'Paris'], 'people': [18.7, 2.1]})")
    ask(ip, "{table}")
    assert sent(chat).splitlines()[0].startswith("|    | city")
    assert "广州" in sent(chat)


def test_an_image_result_is_described_not_sent(ip, chat):
    cell(ip, "class Picture:\n    size = (64, 32)\n    def _repr_png_(self):\n        return b'\\x89PNG' + bytes(1000)\n"
             "    def __repr__(self):\n        return '<Picture 64x32>'\npicture = Picture()")
    number = cell(ip, "picture")
    ask(ip, f"{{Out[{number}]}} and {{picture}}")
    message = sent(chat)
    assert "image, size (64, 32)" in message and "<Picture 64x32>" in message and "PNG" not in message


def test_code_goes_to_the_next_cell(ip, chat):
    """A kernel turns set_next_input into a new cell below; a terminal pre-fills the next prompt."""
    with capture_output() as shown:
        chat._code_to_next_cell("Here:\n```python\nprint('hi')\n```\nand more\n```\nsecond\n```")
    assert ip.rl_next_input == "print('hi')"
    assert "new cell below" in shown.stdout
    with capture_output() as shown:
        chat._code_to_next_cell("no code here")
    assert shown.stdout.strip() == "The reply has no code block to put in a cell."


def test_the_recorder_stays_bounded(ip, qwen):
    for i in range(KEEP_CELLS + 30):
        cell(ip, f"print({i})")
    assert len(qwen.recorder.printed) == KEEP_CELLS


def test_unloading_stops_recording_and_restores_the_streams(ip, tiny_model_dir):
    import sys

    ip.extension_manager.load_extension("qwen_magic")
    recorder = ip.magics_manager.registry["QwenMagics"].recorder
    stdout = sys.stdout
    ip.extension_manager.unload_extension("qwen_magic")
    ip.config.pop("QwenMagics", None)
    cell(ip, "print('after unload')")
    assert sys.stdout is stdout
    assert "after unload\n" not in recorder.printed.values()


def test_displayed_images_are_recorded_within_a_bound(ip, qwen, monkeypatch):
    from qwen_magic import notebook

    monkeypatch.setattr(notebook, "KEEP_IMAGE_TOTAL", 10_000)
    code = ("from IPython.display import display\n"
            "display({'image/png': b'\\x89PNG' + bytes(3000), 'text/plain': 'a picture'}, raw=True)")
    counts = [cell(ip, code) for _ in range(5)]
    assert list(qwen.recorder.images) == counts[-3:]  # 3 cells of 3,004 bytes fit in 10,000
    assert all(len(shown) == 1 and shown[0].startswith(b"\x89PNG") for shown in qwen.recorder.images.values())
    for count in range(KEEP_CELLS):
        cell(ip, code.replace("3000", "10"))
    assert len(qwen.recorder.images) == notebook.KEEP_IMAGE_CELLS
