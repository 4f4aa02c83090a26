"""Conversation controls: undo, regenerate, continue, re-run a cell, named chats, autosave, export."""

import json
import os

import IPython
import pytest
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output
from helpers import ask, replies_match_the_recipe

CELL_IDS = int(IPython.__version__.split(".")[0]) >= 8  # IPython 7.34 (Colab) sends no cell ids


def questions(conversation):
    return [m["content"] for m in conversation.messages[::2]]


def test_undo(ip, chat):
    ask(ip, "one")
    ask(ip, "two")
    with capture_output() as shown:
        ip.run_line_magic("qwen_history", "--undo")
    assert questions(chat.conversation) == ["one"] and "1 left" in shown.stdout
    ip.run_line_magic("qwen_history", "--undo")
    with pytest.raises(UsageError, match="Nothing to undo"):
        ip.run_line_magic("qwen_history", "--undo")


def test_regenerate_asks_the_same_question_again(ip, chat, classic):
    ask(ip, "one")
    ask(ip, "two")
    with capture_output():
        ip.run_line_magic("qwen_regenerate", "")
    assert questions(chat.conversation) == ["one", "two"]
    history = chat.conversation.to_json()
    assert history[-1]["content"] == classic.reply(history[:-1], 12)  # greedy: the same reply again
    ip.run_line_magic("config", "QwenMagics.do_sample = True")
    samples = set()
    for seed in range(4):
        ip.run_line_magic("config", f"QwenMagics.seed = {seed}")
        with capture_output():
            ip.run_line_magic("qwen_regenerate", "")
        samples.add(chat.conversation.messages[-1]["content"])
    assert len(samples) > 1 and len(chat.conversation.messages) == 4


def test_continue_extends_the_same_reply(ip, qwen, endless_model_dir, classic):
    ip.run_line_magic("qwen_load", endless_model_dir)
    ip.run_line_magic("config", "QwenMagics.do_sample = False")
    ask(ip, "Write a long story.", "--max-new-tokens 6")
    first = qwen.conversation.messages[-1]
    assert first["unfinished"] == "length"
    partial = first["content"]
    with capture_output() as shown:
        ip.run_line_magic("qwen_continue", "--max-new-tokens 6")
    answer = qwen.conversation.messages[-1]
    assert len(qwen.conversation.messages) == 2 and answer["content"].startswith(partial)
    assert answer["unfinished"] == "length" and ip.user_ns["_qwen"] == answer["content"]
    assert shown.outputs[-1].data["text/markdown"].startswith(answer["content"])

    # The oracle: the classic recipe continuing the same open assistant message.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(endless_model_dir), AutoModelForCausalLM.from_pretrained(endless_model_dir)
    messages = [{"role": "user", "content": "Write a long story."}, {"role": "assistant", "content": partial}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    inputs = tokenizer([text], return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert answer["content"] == partial + tokenizer.decode(output[0][inputs.input_ids.shape[1]:], skip_special_tokens=True)


def test_continue_and_regenerate_need_a_conversation(ip, chat):
    with pytest.raises(UsageError, match="Nothing to continue"):
        ip.run_line_magic("qwen_continue", "")
    with pytest.raises(UsageError, match="Nothing to regenerate"):
        ip.run_line_magic("qwen_regenerate", "")


@pytest.mark.skipif(not CELL_IDS, reason="IPython 7 passes no cell id to its hooks")
def test_rerunning_a_cell_replaces_its_exchange(ip, chat):
    with capture_output() as shown:
        ip.run_cell("%%qwen\nfirst question", cell_id="cell-a")
        ip.run_cell("%%qwen\nsecond question", cell_id="cell-b")
        ip.run_cell("%%qwen\nsecond question, edited", cell_id="cell-b")  # the usual retry: the last cell again
    assert questions(chat.conversation) == ["first question", "second question, edited"]
    assert "Re-ran this cell: replaced its earlier exchange (turn 2)." in shown.stdout
    with capture_output() as shown:
        ip.run_cell("%%qwen\nfirst question, edited", cell_id="cell-a")
    assert questions(chat.conversation) == ["first question, edited"]
    assert "replaced its earlier exchange (turn 1), and dropped the 1 later exchange." in shown.stdout


def test_without_a_cell_id_a_rerun_appends(ip, chat):
    with capture_output() as shown:
        ip.run_cell("%%qwen\nsame question")
        ip.run_cell("%%qwen\nsame question")
    assert questions(chat.conversation) == ["same question", "same question"]
    assert "Re-ran" not in shown.stdout


def test_named_conversations(ip, chat, classic):
    ask(ip, "default one")
    history, _ = replies_match_the_recipe(ip, classic, ["介绍广州这座城市", "它有什么好吃的美食吗?"], "--chat travel", 12)
    assert questions(chat.conversation) == ["default one"]
    assert chat.conversations["travel"].to_json() == history
    with capture_output() as shown:
        ip.run_line_magic("qwen_history", "--chat travel")
    assert "介绍广州这座城市" in shown.outputs[0].data["text/markdown"]
    with pytest.raises(UsageError, match="no conversation named 'nowhere'"):
        ip.run_line_magic("qwen_history", "--chat nowhere")


def test_autosave_writes_every_conversation_and_restores_them(ip, chat, tmp_path, tiny_model_dir):
    path = tmp_path / "drive" / "chats.json"
    path.parent.mkdir()
    ip.run_line_magic("config", f"QwenMagics.autosave = {str(path)!r}")
    ask(ip, "one")
    ask(ip, "two", "--chat side")
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved["format"] == "qwen_magic.conversations"
    assert [m["content"] for m in saved["conversations"][""]][::2] == ["one"]
    assert [m["content"] for m in saved["conversations"]["side"]][::2] == ["two"]
    before = {name: c.to_json() for name, c in chat.conversations.items()}
    # The runtime is lost: a fresh extension (as after a kernel restart) restores both.
    ip.extension_manager.unload_extension("qwen_magic")
    ip.extension_manager.load_extension("qwen_magic")
    fresh = ip.magics_manager.registry["QwenMagics"]
    with capture_output() as shown:
        ip.run_line_magic("qwen_history", f"--load {path}")
    assert {name: c.to_json() for name, c in fresh.conversations.items()} == before
    assert "Restored 2 conversations" in shown.stdout
    assert os.listdir(path.parent) == ["chats.json"]  # no temporary files left behind


def test_a_crash_between_write_and_rename_keeps_the_old_file(ip, chat, tmp_path, monkeypatch):
    path = tmp_path / "chats.json"
    ip.run_line_magic("config", f"QwenMagics.autosave = {str(path)!r}")
    ask(ip, "one")
    old = path.read_text(encoding="utf-8")

    def crash(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with capture_output() as shown:
        ip.run_cell_magic("qwen", "", "two")
        ip.run_cell_magic("qwen", "", "three")
    assert path.read_text(encoding="utf-8") == old
    assert shown.stdout.count("Warning: cannot autosave") == 1 and "the chat goes on" in shown.stdout
    assert questions(chat.conversation) == ["one", "two", "three"]
    assert os.listdir(tmp_path) == ["chats.json"]


def test_export_markdown(ip, chat, tmp_path):
    ask(ip, "介绍广州这座城市", "--system 'Be brief.'")
    path = tmp_path / "chat.md"
    ip.run_line_magic("qwen_history", f"--export {path}")
    text = path.read_text(encoding="utf-8")
    reply = chat.conversation.messages[-1]["content"]
    assert text.startswith("# Conversation\n\n**System:** Be brief.\n\n## 1. You\n\n介绍广州这座城市\n\n## 1. Qwen")
    assert reply in text


def test_a_bad_autosave_file_is_refused_whole(ip, chat, tmp_path):
    ask(ip, "one")
    before = {name: c.to_json() for name, c in chat.conversations.items()}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"format": "qwen_magic.conversations", "version": 1,
                                "conversations": {"a": [], "b": [{"role": "user", "content": "x"}]}}))
    with pytest.raises(UsageError, match="conversation 'b'"):
        ip.run_line_magic("qwen_history", f"--load {path}")
    assert {name: c.to_json() for name, c in chat.conversations.items()} == before
