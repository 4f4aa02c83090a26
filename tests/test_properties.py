"""Property-based tests (hypothesis): the {In[N]}-style reference parser and the history loader.

Any text either works or raises the documented one-line error; nothing is ever evaluated;
a saved history loads back equal.
"""

import json
import sys

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from qwen_magic.conversation import Conversation, HistoryError
from qwen_magic.notebook import Notebook, NotebookReferenceError, OutputRecorder
from qwen_magic.persistence import dumps_all, loads

# --- a notebook of four cells, and a name that holds something that looks like a reference

SOURCES = ["", "x = 1", "print(f'{x} {In[1]}')", "1/0", "x"]  # In[0] is IPython's empty placeholder
NAMESPACE = {"x": 1, "template": "{In[1]} and {x}", "greeting": "hello"}


class FakeShell:
    def __init__(self):
        self.user_ns = {"In": SOURCES, "Out": {4: 1}, **NAMESPACE}
        self.execution_count = len(SOURCES)
        self.display_formatter = None  # describe() falls back to repr


def notebook():
    recorder = OutputRecorder()
    recorder.printed[2] = "1 x = 1\n"
    recorder.errors[3] = "ZeroDivisionError: division by zero"
    return Notebook(FakeShell(), recorder)


_evaluating = []


def _audit(event, args):
    if _evaluating and event in ("exec", "compile"):
        _evaluating[-1].append(event)


sys.addaudithook(_audit)  # audit hooks cannot be removed; this one only records while a test asks it to


def interpolate_watched(text):
    """interpolate(), with every exec and compile the interpreter does meanwhile recorded."""
    seen = []
    _evaluating.append(seen)
    try:
        return notebook().interpolate(text, lambda piece: piece)
    finally:
        _evaluating.pop()
        assert seen == [], f"something was evaluated: {seen}"


FRAGMENTS = ["{", "}", "{{", "}}", "[", "]", "-", "0", "1", "2", "3", "4", "9", "99", "In", "Out", "Err", "Stdout",
             "x", "template", "undefined_name", "__import__('os').system('echo pwned')", "exec('1')", " ", "\n",
             ".", "(", ")", "'", "\"", "\\", "广州", "f", "$", "%", "eval", "lambda: 0", "__class__"]
texts = st.one_of(st.text(), st.lists(st.sampled_from(FRAGMENTS), max_size=30).map("".join))


@settings(max_examples=400, deadline=None)
@given(texts)
@example("{__import__('os').system('echo pwned')}")
@example("{In[-1]}{Err[-1]}{Stdout[2]}{Out[4]}{x}{template}")
@example("{In[99999999999999999999]}")
def test_any_text_is_filled_in_or_refused_in_one_line_and_nothing_is_evaluated(text):
    try:
        result, undefined = interpolate_watched(text)
    except NotebookReferenceError as error:
        assert "\n" not in str(error) and str(error).startswith("{")
        return
    assert isinstance(result, str) and all(isinstance(name, str) for name in undefined)
    if "{" not in text:
        assert result == text and undefined == []


# Pieces of a message with the text each becomes: references are filled in exactly once; everything
# else, including what a filled-in part contains, is sent as written.
PIECES = [
    ("{In[1]}", "x = 1"), ("{In[2]}", "print(f'{x} {In[1]}')"), ("{In[-1]}", "x"), ("{Out[4]}", "1"),
    ("{Out[-1]}", "1"), ("{Err[-1]}", "ZeroDivisionError: division by zero"), ("{Err[3]}", "ZeroDivisionError: division by zero"),
    ("{Stdout[2]}", "1 x = 1\n"), ("{x}", "1"), ("{template}", "'{In[1]} and {x}'"), ("{greeting}", "'hello'"),
    ("{undefined_name}", "{undefined_name}"), ("{{x}}", "{{x}}"), ("{x + 1}", "{x + 1}"), ("{In[1]", "{In[1]"),
    ("{}", "{}"), ("{1x}", "{1x}"), ("{x.y}", "{x.y}"), ("{__import__('os').system('echo pwned')}", "{__import__('os').system('echo pwned')}"),
    ("{In[-1]}}", "{In[-1]}}"),
]
plain = st.text(alphabet=st.characters(blacklist_characters="{}", blacklist_categories=("Cs",)), max_size=12)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(PIECES), plain), max_size=12))
@example([(PIECES[1], " "), (PIECES[9], "")])  # a source and a value that hold braces of their own
def test_references_are_filled_in_once_and_the_rest_is_sent_as_written(parts):
    text = "".join(piece + between for (piece, _), between in parts)
    expected = "".join(filled + between for (_, filled), between in parts)
    # Adjacent pieces may merge into other braces ("}" then "{{x}}"): keep the cases where they do not.
    assume(all(not (a[0].endswith("}") and b[0].startswith("}")) for (a, s), (b, _) in zip(parts, parts[1:]) if not s))
    result, undefined = interpolate_watched(text)
    assert result == expected
    assert undefined == (["undefined_name"] if "{undefined_name}" in text else [])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts)
def test_the_magic_sends_a_message_or_refuses_it_in_one_line(ip, chat, text):
    from IPython.core.error import UsageError
    from IPython.utils.capture import capture_output

    try:
        with capture_output():
            chat._with_notebook(text, [])
    except UsageError as error:
        assert type(error) is UsageError and "\n" not in str(error) and str(error).endswith("; nothing was sent.")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts)
@example("{__import__('os').system('echo pwned')}")
@example("$HOME {x}")
def test_the_magics_line_is_never_evaluated_by_ipython(ip, qwen, text):
    """IPython expands {expression} and $name in a magic's line, by evaluating it; not in ours."""
    from IPython.core.error import UsageError

    seen = []
    _evaluating.append(seen)
    try:
        for call in (lambda: ip.run_line_magic("qwen", text), lambda: ip.run_cell_magic("qwen", text, "hi")):
            with pytest.raises(UsageError):  # no model is loaded (or the line is not flags): refused, not run
                call()
    finally:
        _evaluating.pop()
    assert seen == []


# --- history files

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", 1]),
                                           "content": st.one_of(st.text(), st.integers())}), max_size=6)
history_like = st.one_of(json_values, messages, st.fixed_dictionaries(
    {"format": st.just("qwen_magic.conversations"), "version": st.just(1),
     "conversations": st.one_of(json_values, st.dictionaries(st.text(max_size=5), messages, max_size=3))}))


def load_or_refuse(text):
    try:
        loaded = loads(text)
    except HistoryError as error:
        assert "\n" not in str(error)
        return None
    assert isinstance(loaded, (Conversation, dict))
    return loaded


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), history_like.map(json.dumps)))
@example("[" * 100_000)
@example('{"format": "qwen_magic.conversations", "conversations": {"": [{"role": "user", "content": "hi"}]}}')
def test_any_text_loads_as_a_history_or_is_refused_in_one_line(text):
    seen = []
    _evaluating.append(seen)
    try:
        load_or_refuse(text)
    finally:
        _evaluating.pop()
    assert seen == []


exchanges = st.lists(st.tuples(st.text(), st.text()), max_size=5)
conversations = st.builds(
    lambda system, pairs: Conversation(system=system, messages=[
        m for q, a in pairs for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]),
    st.one_of(st.none(), st.text(min_size=1)), exchanges)


@settings(max_examples=200, deadline=None)
@given(conversations)
def test_a_saved_conversation_loads_back_equal(conversation):
    assert loads(conversation.dumps()).to_json() == conversation.to_json()


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=10), conversations, max_size=4))
def test_an_autosave_file_loads_back_equal(chats):
    loaded = loads(dumps_all(chats))
    assert {name: c.to_json() for name, c in loaded.items()} == {name: c.to_json() for name, c in chats.items()}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conversation=conversations, garbage=st.one_of(st.text(), history_like.map(json.dumps)))
def test_history_save_and_load_through_the_magic(ip, qwen, tmp_path, conversation, garbage):
    from IPython.core.error import UsageError
    from IPython.utils.capture import capture_output

    path, bad = tmp_path / "chat.json", tmp_path / "other.json"
    qwen.conversations[""] = conversation
    with capture_output():
        ip.run_line_magic("qwen_history", f'--save "{path}"')
        qwen.conversations[""] = Conversation()
        ip.run_line_magic("qwen_history", f'--load "{path}"')
    assert qwen.conversation.to_json() == conversation.to_json()
    bad.write_text(garbage, encoding="utf-8")
    before = {name: c.to_json() for name, c in qwen.conversations.items()}
    try:
        with capture_output():
            ip.run_line_magic("qwen_history", f'--load "{bad}"')
    except UsageError as error:
        assert type(error) is UsageError and "\n" not in str(error) and str(error).endswith("the conversation is unchanged.")
        assert {name: c.to_json() for name, c in qwen.conversations.items()} == before


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
