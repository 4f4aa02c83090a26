"""The magics in an in-process IPython shell, driven the way a user types them."""

import json
import subprocess
import sys

import pytest
from IPython.utils.capture import capture_output
from helpers import ask, replies_match_the_recipe, usage_error


# --- the extension itself


def test_import_and_load_ext_do_not_import_torch():
    code = (
        "import sys, qwen_magic\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "ip = InteractiveShell.instance(); ip.extension_manager.load_extension('qwen_magic')\n"
        "assert 'qwen' in ip.magics_manager.magics['cell']\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unload_ext_removes_magics_and_frees_the_model(ip, tiny_model_dir):
    ip.extension_manager.load_extension("qwen_magic")
    magics = ip.magics_manager.registry["QwenMagics"]
    ip.run_line_magic("qwen_load", tiny_model_dir)
    loaded = magics.loaded
    ip.extension_manager.unload_extension("qwen_magic")
    assert loaded.model is None and magics.loaded is None
    assert "qwen" not in ip.magics_manager.magics["cell"]
    assert "qwen_load" not in ip.magics_manager.magics["line"]
    assert magics not in ip.configurables
    ip.extension_manager.load_extension("qwen_magic")  # and back again, once
    assert sum(type(c).__name__ == "QwenMagics" for c in ip.configurables) == 1
    ip.extension_manager.unload_extension("qwen_magic")


# --- loading


def test_load_prints_one_summary_line(ip, qwen, tiny_model_dir):
    with capture_output() as captured:
        ip.run_line_magic("qwen_load", tiny_model_dir)
    lines = captured.stdout.strip().splitlines()
    assert lines[0].startswith("No CUDA GPU here: loading") and "on the CPU" in lines[0]
    summary = lines[-1]
    assert summary.startswith(f"Loaded {tiny_model_dir} · float32 · cpu · ")
    assert "context 4,096 tokens" in summary and " s · engine: " in summary


def test_loading_again_replaces_the_model(ip, qwen, tiny_model_dir, endless_model_dir):
    ip.run_line_magic("qwen_load", tiny_model_dir)
    first = qwen.loaded
    ip.run_line_magic("qwen_load", endless_model_dir)
    assert first.model is None  # freed before the new one was loaded
    assert qwen.loaded.name == endless_model_dir


def test_default_model_comes_from_the_setting(ip, qwen, tiny_model_dir):
    ip.run_line_magic("config", f"QwenMagics.model = {tiny_model_dir!r}")
    ip.run_line_magic("qwen_load", "")
    assert qwen.loaded.name == tiny_model_dir


def test_unload(ip, qwen, tiny_model_dir):
    ip.run_line_magic("qwen_load", tiny_model_dir)
    with capture_output() as captured:
        ip.run_line_magic("qwen_unload", "")
    assert qwen.loaded is None and captured.stdout.strip() == f"Unloaded {tiny_model_dir}."
    assert usage_error(ip.run_cell_magic, "qwen", "", "hi").startswith("No model is loaded")


@pytest.mark.parametrize(
    "line, expected",
    [
        ("/no/such/model/dir", "No such directory: /no/such/model/dir"),
        ("--bits 3", "invalid choice"),
        ("--frobnicate", "unrecognized arguments"),
    ],
)
def test_load_mistakes_are_one_line(ip, qwen, line, expected):
    assert expected in usage_error(ip.run_line_magic, "qwen_load", line)


def test_directory_without_a_model(ip, qwen, tmp_path):
    message = usage_error(ip.run_line_magic, "qwen_load", str(tmp_path))
    assert message == f"{tmp_path} has no config.json: it is not a model directory."


def test_unreachable_hub_id(ip, qwen, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = usage_error(ip.run_line_magic, "qwen_load", "Qwen/No-Such-Model-Anywhere")
    assert message.startswith("Could not load Qwen/No-Such-Model-Anywhere")


# --- chatting: the greedy oracle


def test_replies_equal_the_classic_recipe_over_several_turns(ip, chat, classic):
    questions = ["介绍广州这座城市", "它有什么好吃的美食吗?", "Hello! How are you today?"]
    history, _ = replies_match_the_recipe(ip, classic, questions, "", 12)
    assert chat.conversation.to_json() == history


def test_reply_is_one_markdown_output_updated_in_place(ip, chat):
    captured = ask(ip, "Hello!")
    first, *updates = captured.outputs
    assert not first.update and all(o.update for o in updates) and updates
    ids = {o.transient["display_id"] for o in captured.outputs}
    assert len(ids) == 1
    final = updates[-1].data
    assert final["text/markdown"].startswith(ip.user_ns["_qwen"])
    assert "12 tokens" in final["text/markdown"] and "context " in final["text/markdown"]
    assert final["text/plain"].startswith(ip.user_ns["_qwen"])


def test_line_form_uses_the_same_conversation(ip, chat, classic):
    ask(ip, "介绍广州这座城市")
    with capture_output():
        ip.run_line_magic("qwen", "它有什么好吃的美食吗?")
    assert [m["content"] for m in chat.conversation.messages[::2]] == ["介绍广州这座城市", "它有什么好吃的美食吗?"]
    assert chat.conversation.messages[-1]["content"] == classic.reply(chat.conversation.to_json()[:-1], 12)


def test_window_by_turns(ip, chat, classic):
    for question in ["one", "two", "three"]:
        ask(ip, question)
    ip.run_line_magic("config", "QwenMagics.max_turns = 1")
    captured = ask(ip, "four")
    sent = chat.conversation.to_json()[4:7]  # exchange three, then the question
    assert ip.user_ns["_qwen"] == classic.reply(sent, 12)
    assert "2 earlier exchanges left out of the window." in captured.outputs[-1].data["text/markdown"]


def test_max_turns_zero_sends_only_the_question(ip, chat, classic):
    ask(ip, "one")
    ip.run_line_magic("config", "QwenMagics.max_turns = 0")
    ask(ip, "two")
    assert ip.user_ns["_qwen"] == classic.reply([{"role": "user", "content": "two"}], 12)


def test_window_by_tokens(ip, chat, classic):
    for question in ["one", "two", "three"]:
        ask(ip, question)
    history = chat.conversation.to_json()
    last = history[4:] + [{"role": "user", "content": "four"}]
    # Exactly room for the last exchange and the question, plus the reply.
    ip.run_line_magic("config", f"QwenMagics.max_context_tokens = {classic.count(last) + 12}")
    captured = ask(ip, "four")
    assert ip.user_ns["_qwen"] == classic.reply(last, 12)
    markdown = captured.outputs[-1].data["text/markdown"]
    assert "2 earlier exchanges left out of the window to fit the context." in markdown
    assert f"context {classic.count(last)} / {classic.count(last) + 12}" in markdown


def test_a_message_too_long_for_the_context_changes_nothing(ip, chat):
    ask(ip, "one")
    before = json.dumps(chat.conversation.to_json())
    ip.run_line_magic("config", "QwenMagics.max_context_tokens = 64")
    message = usage_error(ip.run_cell_magic, "qwen", "", "word " * 200)
    assert "exceeds max_context_tokens=64" in message
    assert json.dumps(chat.conversation.to_json()) == before


def test_no_history_neither_reads_nor_changes_the_conversation(ip, chat, classic):
    ask(ip, "one")
    before = list(chat.conversation.messages)
    ask(ip, "standalone", "--no-history")
    assert ip.user_ns["_qwen"] == classic.reply([{"role": "user", "content": "standalone"}], 12)
    assert chat.conversation.messages == before


def test_new_starts_a_fresh_conversation(ip, chat, classic):
    ask(ip, "one")
    ask(ip, "two", "--new")
    assert [m["content"] for m in chat.conversation.messages[::2]] == ["two"]
    assert ip.user_ns["_qwen"] == classic.reply([{"role": "user", "content": "two"}], 12)


def test_system_prompt_flag_and_setting(ip, chat, classic):
    ask(ip, "one", '--system "你是一个简洁的助手"')
    assert chat.conversation.system == "你是一个简洁的助手"
    expected = classic.reply([{"role": "system", "content": "你是一个简洁的助手"}, {"role": "user", "content": "one"}], 12)
    assert ip.user_ns["_qwen"] == expected
    ask(ip, "two", "--new")
    ip.run_line_magic("config", "QwenMagics.system_prompt = 'Be brief.'")
    ask(ip, "three", "--new")
    assert ip.user_ns["_qwen"] == classic.reply([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "three"}], 12)


def test_cell_flags_override_settings_for_that_cell_only(ip, chat):
    ask(ip, "one", "--max-new-tokens 3")
    assert len(chat.loaded.tokenizer(ip.user_ns["_qwen"], add_special_tokens=False)["input_ids"]) <= 3
    assert chat.max_new_tokens == 12


def test_seed_makes_samples_reproducible(ip, chat):
    ip.run_line_magic("config", "QwenMagics.do_sample = True")
    ask(ip, "hello", "--no-history --seed 7 --temperature 1.0")
    first = ip.user_ns["_qwen"]
    ask(ip, "hello", "--no-history --seed 7 --temperature 1.0")
    assert ip.user_ns["_qwen"] == first


# --- mistakes: one line, nothing changed


def test_no_model_loaded(ip, qwen):
    assert usage_error(ip.run_cell_magic, "qwen", "", "hi") == (
        "No model is loaded: run %qwen_load first (e.g. %qwen_load Qwen/Qwen2.5-7B-Instruct)."
    )


@pytest.mark.parametrize(
    "line, cell, expected",
    [
        ("", "   \n ", "The message is empty"),
        ("--temperature -1", "hi", "temperature must be 0 or more"),
        ("--top-p 2", "hi", "top_p must be in (0, 1]"),
        ("--max-new-tokens 0", "hi", "max_new_tokens must be at least 1"),
        ("--temperature warm", "hi", "invalid float value"),
        ("--max-new-tokens", "hi", "expected one argument"),
        ("--bogus", "hi", "unrecognized arguments"),
    ],
)
def test_cell_mistakes(ip, chat, line, cell, expected):
    ask(ip, "one")
    before = list(chat.conversation.messages)
    assert expected in usage_error(ip.run_cell_magic, "qwen", line, cell)
    assert chat.conversation.messages == before


def test_invalid_settings_are_refused_and_the_old_value_stays(ip, qwen, caplog):
    for line in ["temperature = -1", "top_p = 0", "top_p = 1.5", "max_turns = -1", "max_new_tokens = 0", "bits = 5"]:
        ip.run_line_magic("config", f"QwenMagics.{line}")
    assert (qwen.temperature, qwen.top_p, qwen.max_turns, qwen.max_new_tokens, qwen.bits) == (None, None, 20, 512, 4)
    assert "top_p must be in (0, 1], not 1.5" in caplog.text
    ip.run_line_magic("config", "QwenMagics.temperature = 0.2")
    assert qwen.temperature == 0.2


def test_config_lists_every_setting_with_help(ip, qwen):
    with capture_output() as captured:
        ip.run_line_magic("config", "QwenMagics")
    for name in ["model", "bits", "temperature", "top_p", "top_k", "max_new_tokens", "do_sample",
                 "repetition_penalty", "seed", "system_prompt", "max_turns", "max_context_tokens", "stream"]:
        assert f"QwenMagics.{name}=" in captured.stdout
    assert "Sampling temperature; 0 means greedy decoding." in captured.stdout


def test_a_failure_while_generating_leaves_the_conversation_unchanged(ip, chat, monkeypatch):
    ask(ip, "one")
    before = list(chat.conversation.messages)

    def broken(**kwargs):
        raise RuntimeError("simulated fault")

    monkeypatch.setattr(chat.loaded.model, "generate", broken)
    with pytest.raises(RuntimeError, match="simulated fault"):
        ask(ip, "two")
    assert chat.conversation.messages == before
    monkeypatch.undo()
    ask(ip, "two")
    assert len(chat.conversation.messages) == 4


# --- history


def test_history_table(ip, chat):
    ask(ip, "介绍广州这座城市", "--system 'Be brief.'")
    ask(ip, "它有什么好吃的美食吗?")
    ip.run_line_magic("config", "QwenMagics.max_turns = 1")
    with capture_output() as captured:
        ip.run_line_magic("qwen_history", "")
    markdown = captured.outputs[0].data["text/markdown"]
    rows = [r for r in markdown.splitlines() if r.startswith("| ")][1:]
    assert len(rows) == 5  # system and two exchanges
    assert rows[0].startswith("|  | system | ") and "✓" in rows[0]
    tokenizer = chat.loaded.tokenizer
    count = len(tokenizer("介绍广州这座城市", add_special_tokens=False)["input_ids"])
    assert rows[1].startswith(f"| 1 | user | {count} |  |")  # outside the window
    assert rows[3].startswith("| 2 | user | ") and "| ✓ |" in rows[3]
    assert "2 exchanges; the next question sends the last 1." in markdown
    assert "turn  role" in captured.outputs[0].data["text/plain"]


def test_history_json_save_load_and_clear(ip, chat, tmp_path):
    ask(ip, "介绍广州这座城市")
    with capture_output() as captured:
        ip.run_line_magic("qwen_history", "--json")
    assert json.loads(captured.stdout) == chat.conversation.to_json()
    path = tmp_path / "chat one.json"
    ip.run_line_magic("qwen_history", f'--save "{path}"')
    saved = chat.conversation.to_json()
    ip.run_line_magic("qwen_history", "--clear")
    assert chat.conversation.messages == []
    ip.run_line_magic("qwen_history", f'--load "{path}"')
    assert chat.conversation.to_json() == saved


@pytest.mark.parametrize("content", ["{oops", '[{"role": "user", "content": "hi"}]', '{"role": "user"}', b"\xff\xfe"])
def test_loading_a_bad_history_file_keeps_the_conversation(ip, chat, tmp_path, content):
    ask(ip, "one")
    before = list(chat.conversation.messages)
    path = tmp_path / "bad.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    message = usage_error(ip.run_line_magic, "qwen_history", f"--load {path}")
    assert message.startswith(str(path)) and message.endswith("the conversation is unchanged.")
    assert chat.conversation.messages == before


def test_loading_a_missing_history_file(ip, qwen, tmp_path):
    assert usage_error(ip.run_line_magic, "qwen_history", f"--load {tmp_path}/none.json").startswith("Cannot read")


def test_continuing_from_a_loaded_history(ip, chat, classic, tmp_path):
    history = [{"role": "user", "content": "介绍广州这座城市"}, {"role": "assistant", "content": "广州是广东省的省会。"}]
    path = tmp_path / "h.json"
    path.write_text(json.dumps(history, ensure_ascii=False), encoding="utf-8")
    ip.run_line_magic("qwen_history", f"--load {path}")
    ask(ip, "它有什么好吃的美食吗?")
    assert ip.user_ns["_qwen"] == classic.reply(history + [{"role": "user", "content": "它有什么好吃的美食吗?"}], 12)


def test_interrupt_keeps_the_partial_reply_marked(ip, qwen, endless_model_dir, interrupt_after, monkeypatch):
    """SIGINT is what the kernel's stop button sends; here the process sends it to itself mid-reply."""
    import signal

    ip.run_line_magic("qwen_load", endless_model_dir)
    ip.run_line_magic("config", "QwenMagics.do_sample = False")
    pieces = interrupt_after(5)
    handler_before = signal.getsignal(signal.SIGINT)
    captured = ask(ip, "Write forever.", "--max-new-tokens 4000")
    assert signal.getsignal(signal.SIGINT) is handler_before
    answer = qwen.conversation.messages[-1]
    assert answer["unfinished"] == "interrupted"
    assert answer["content"].startswith("".join(pieces)) and len(pieces) < 100
    final = captured.outputs[-1].data["text/markdown"]
    assert final.startswith(answer["content"]) and "interrupted" in final
    monkeypatch.undo()
    ask(ip, "And now?", "--max-new-tokens 3")
    assert len(qwen.conversation.messages) == 4
    with capture_output() as shown:
        ip.run_line_magic("qwen_history", "")
    assert "| 1 | assistant (interrupted) |" in shown.outputs[0].data["text/markdown"]


def test_fast_engine_through_the_magics(ip, qwen, tiny_model_dir, classic):
    """The engine a GPU gets by default, forced on the CPU: same replies, cached history."""
    with capture_output() as captured:
        ip.run_line_magic("qwen_load", f"{tiny_model_dir} --engine fast")
    assert "engine: static KV cache · sampling: temperature 0.7, top-p 0.8, top-k 20, repetition penalty 1.05 (the model's generation_config)" in captured.stdout
    ip.run_line_magic("config", "QwenMagics.do_sample = False")
    history, shown = replies_match_the_recipe(ip, classic, ["介绍广州这座城市", "它有什么好吃的美食吗?"], "--max-new-tokens 10", 10)
    assert " cached)" in shown.outputs[-1].data["text/markdown"]
    assert qwen.conversation.to_json() == history


def test_unknown_engine_setting_is_refused(ip, qwen, caplog):
    ip.run_line_magic("config", "QwenMagics.engine = 'turbo'")
    assert qwen.engine == "auto" and "engine must be one of auto, fast, generate" in caplog.text
