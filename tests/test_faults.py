"""Faults: each ends in one clear line, with the conversation and the loaded model as they were."""

import importlib.util
import json

import torch
from IPython.utils.capture import capture_output
from helpers import ask, usage_error


def test_an_encoder_only_checkpoint_is_not_a_chat_model(ip, qwen, tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).save_pretrained(tmp_path)
    message = usage_error(ip.run_line_magic, "qwen_load", str(tmp_path))
    assert message == f"{tmp_path} is a bert model, not a causal language model (chat models are)."
    assert qwen.loaded is None


def test_four_bits_without_bitsandbytes_names_the_install(ip, qwen, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    message = usage_error(ip.run_line_magic, "qwen_load", f"{tiny_model_dir} --bits 4")
    assert message == "--bits 4 needs bitsandbytes: run %pip install bitsandbytes, or load with --bits 16."


def test_a_base_model_without_chat_template_gets_a_plain_prompt(ip, qwen, tmp_path):
    from qwen_magic.tiny import write_tiny_model

    path = write_tiny_model(tmp_path / "base")
    (path / "chat_template.jinja").unlink()
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    with capture_output() as shown:
        ip.run_line_magic("qwen_load", str(path))
    assert "This tokenizer has no chat template (a base model?): using a plain 'User: … Assistant:' prompt." in shown.stdout
    ask(ip, "Hello", "--max-new-tokens 3 --greedy")
    from qwen_magic.prompt import render

    assert render(qwen.loaded.tokenizer, qwen.conversation.to_json()[:1]) == "User: Hello\n\nAssistant:"


def test_out_of_memory_while_loading(ip, qwen, tiny_model_dir, monkeypatch):
    ip.run_line_magic("qwen_load", tiny_model_dir)
    from transformers import AutoModelForCausalLM

    def too_big(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", too_big)
    message = usage_error(ip.run_line_magic, "qwen_load", tiny_model_dir)
    assert message.startswith(f"Out of GPU memory loading {tiny_model_dir}: load it in 4 bits (--bits 4)")
    assert qwen.loaded is None  # the old model went first, cleanly; nothing half loaded


def test_interrupt_while_loading(ip, qwen, tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", interrupted)
    with capture_output() as shown:
        ip.run_line_magic("qwen_load", tiny_model_dir)
    assert shown.stdout.strip().endswith("Loading interrupted: no model is loaded.")
    assert qwen.loaded is None


def test_out_of_memory_while_generating(ip, chat, monkeypatch):
    ask(ip, "one")
    before = chat.conversation.to_json()

    def too_long(**kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(chat.loaded.model, "generate", too_long)
    message = usage_error(ip.run_cell_magic, "qwen", "", "two")
    assert message.startswith("Out of GPU memory while generating: lower --max-new-tokens")
    assert message.endswith("The conversation is unchanged.")
    assert chat.conversation.to_json() == before
    monkeypatch.undo()
    ask(ip, "two")
    assert len(chat.conversation.messages) == 4


def test_an_empty_reply_is_said(ip, chat):
    chat.loaded.model.lm_head.weight.data.zero_()  # every logit 0: the first token is <|endoftext|>
    shown = ask(ip, "Say nothing.")
    assert ip.user_ns["_qwen"] == ""
    assert "the model returned an empty reply" in shown.outputs[-1].data["text/markdown"]


def test_loading_the_extension_twice_records_outputs_once(ip, qwen):
    ip.extension_manager.load_extension("qwen_magic")  # already loaded: IPython does nothing
    result = ip.run_cell("print('once')", store_history=True)
    assert qwen.recorder.printed[result.execution_count] == "once\n"
    assert len([c for c in ip.events.callbacks["post_run_cell"] if getattr(c, "__self__", None) is qwen.recorder]) == 1


def test_nothing_from_a_model_repository_runs_without_trust_remote_code(ip, qwen, tiny_model_dir, monkeypatch):
    from qwen_magic import loader

    seen = {}
    real = loader.AutoModelForCausalLM.from_pretrained

    def spy(source, **kwargs):
        seen.update(kwargs)
        return real(source, **kwargs)

    monkeypatch.setattr(loader.AutoModelForCausalLM, "from_pretrained", spy)
    ip.run_line_magic("qwen_load", tiny_model_dir)
    assert seen["trust_remote_code"] is False
    ip.run_line_magic("qwen_load", f"{tiny_model_dir} --trust-remote-code")
    assert seen["trust_remote_code"] is True
