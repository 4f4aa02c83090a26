"""Faults: each ends in one clear line, with the conversation and the loaded model as they were."""

import contextlib
import importlib.util
import json
import os
from pathlib import Path

import pytest
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


def test_out_of_memory_setting_the_fast_engine_up(ip, qwen, tiny_model_dir, monkeypatch):
    """The weights fit but the fast engine's first cache and graphs do not: the same one line as a load that ran out,
    not a fall back to generate that would run out at the first question."""
    from qwen_magic.fast import FastEngine

    def too_big(self):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(FastEngine, "warm_up", too_big)
    message = usage_error(ip.run_line_magic, "qwen_load", f"{tiny_model_dir} --engine fast")
    assert message.startswith(f"Out of GPU memory loading {tiny_model_dir}: load it in 4 bits (--bits 4)")
    assert qwen.loaded is None


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


# --- a mistyped %qwen_load keeps the model that works


def _encoder_only(path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).save_pretrained(path)
    return path


def _no_weights(path, tiny):
    import shutil

    shutil.copytree(tiny, path)
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            os.unlink(os.path.join(path, name))
    return path


def _no_tokenizer(path, tiny):
    import shutil

    shutil.copytree(tiny, path)
    for name in os.listdir(path):
        if name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
            os.unlink(os.path.join(path, name))
    return path


def _offline(monkeypatch):
    """No network, as offline: any host but this machine fails to resolve (the Hub included)."""
    import socket

    real = socket.getaddrinfo

    def local_only(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", local_only)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("case", ["missing", "misspelt-hub-id", "no-config", "encoder-only", "no-weights", "no-tokenizer", "bits-4-no-bitsandbytes", "no-such-gpu"])
def test_a_bad_load_keeps_the_model_that_works(ip, chat, tiny_model_dir, tmp_path, monkeypatch, case):
    ask(ip, "one")
    loaded, before = chat.loaded, chat.conversation.to_json()
    target, expected = {
        "missing": ("/nonexistent/model/dir", "No such directory: /nonexistent/model/dir"),
        "misspelt-hub-id": ("Qwen/Qwen2.5-7B-Instruc", "Could not load Qwen/Qwen2.5-7B-Instruc: "),
        "no-config": (str(tmp_path), f"{tmp_path} has no config.json: it is not a model directory."),
        "encoder-only": (str(tmp_path / "bert"), f"{tmp_path / 'bert'} is a bert model, not a causal language model"),
        "no-weights": (str(tmp_path / "empty"), f"{tmp_path / 'empty'} has a config.json but no weights"),
        "no-tokenizer": (str(tmp_path / "notok"), f"Could not load the tokenizer of {tmp_path / 'notok'}: "),
        "bits-4-no-bitsandbytes": (f"{tiny_model_dir} --bits 4", "--bits 4 needs bitsandbytes: run %pip install bitsandbytes"),
        "no-such-gpu": (f"{tiny_model_dir} --device-map cuda:7", "--device-map cuda:7: this machine has "),
    }[case]
    if case == "misspelt-hub-id":
        _offline(monkeypatch)
    elif case == "encoder-only":
        _encoder_only(tmp_path / "bert")
    elif case == "no-weights":
        _no_weights(tmp_path / "empty", tiny_model_dir)
    elif case == "no-tokenizer":
        _no_tokenizer(tmp_path / "notok", tiny_model_dir)
    elif case == "bits-4-no-bitsandbytes":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    message = usage_error(ip.run_line_magic, "qwen_load", target)
    assert message.startswith(expected) and message.endswith(f" {tiny_model_dir} is still loaded.")
    monkeypatch.undo()
    assert chat.loaded is loaded and chat.loaded.model is not None  # the same model, not a reload
    ask(ip, "two")
    assert [m["content"] for m in chat.conversation.messages[::2]] == ["one", "two"]
    assert chat.conversation.to_json()[:2] == before


def test_a_bad_server_keeps_the_model_that_works(ip, chat, tiny_model_dir):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    loaded = chat.loaded
    message = usage_error(ip.run_line_magic, "qwen_load", f"--server http://127.0.0.1:{port}/v1 some-model")
    assert message.startswith(f"Cannot reach a server at http://127.0.0.1:{port}/v1") and message.endswith("is still loaded.")
    assert chat.loaded is loaded
    ask(ip, "still here?")


def test_out_of_memory_after_the_checks_says_no_model_is_loaded(ip, chat, tiny_model_dir, monkeypatch):
    ask(ip, "one")
    from transformers import AutoModelForCausalLM

    def too_big(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", too_big)
    message = usage_error(ip.run_line_magic, "qwen_load", tiny_model_dir)
    assert message.startswith(f"Out of GPU memory loading {tiny_model_dir}: ") and message.endswith(" No model is loaded now.")
    assert chat.loaded is None
    assert usage_error(ip.run_cell_magic, "qwen", "", "two").startswith("No model is loaded")
    assert len(chat.conversation.messages) == 2  # the conversation stays for the next model


# --- autosave under faults: one warning, the chat goes on, the last good file stays intact


def _autosaving(ip, chat, path):
    ip.run_line_magic("config", f"QwenMagics.autosave = {str(path)!r}")
    ask(ip, "one")
    return path.read_text(encoding="utf-8")


def _questions(chat):
    return [m["content"] for m in chat.conversation.messages[::2]]


@pytest.mark.skipif(os.name != "posix", reason="file size limits and permissions as on Linux (Colab)")
def test_autosave_on_a_full_disk(ip, chat, tmp_path):
    import resource
    import signal

    path = tmp_path / "chats.json"
    good = _autosaving(ip, chat, path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(good.encode()) + 64, hard))  # no room for two more exchanges
    try:
        with capture_output() as shown:
            ip.run_cell_magic("qwen", "", "two")
            ip.run_cell_magic("qwen", "", "three")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert shown.stdout.count("Warning: cannot autosave") == 1
    assert f"Warning: cannot autosave to {path} (File too large); the chat goes on unsaved" in shown.stdout
    assert path.read_text(encoding="utf-8") == good
    assert os.listdir(tmp_path) == ["chats.json"]  # no temporary file left behind
    assert _questions(chat) == ["one", "two", "three"]
    with capture_output() as shown:  # room again: it saves again, and says so
        ip.run_cell_magic("qwen", "", "four")
    assert f"Autosaving to {path} works again." in shown.stdout
    assert [m["content"] for m in json.loads(path.read_text(encoding="utf-8"))["conversations"][""]][::2] == ["one", "two", "three", "four"]


@pytest.mark.skipif(os.name != "posix", reason="file size limits and permissions as on Linux (Colab)")
def test_autosave_to_a_read_only_directory(ip, chat):
    import contextlib
    import shutil
    import tempfile

    folder = tempfile.mkdtemp()  # under /tmp, which anyone may cross, for the unprivileged case below
    try:
        os.chmod(folder, 0o755)
        path = Path(folder) / "chats.json"
        good = _autosaving(ip, chat, path)
        os.chmod(folder, 0o555)
        # Root writes anywhere: as root, drop to an unprivileged user for the turns (seteuid can be undone).
        unprivileged = _as_user(65534) if os.geteuid() == 0 else contextlib.nullcontext()
        with capture_output() as shown, unprivileged:
            ip.run_cell_magic("qwen", "", "two")
            ip.run_cell_magic("qwen", "", "three")
        assert shown.stdout.count("Warning: cannot autosave") == 1 and "(Permission denied)" in shown.stdout
        assert path.read_text(encoding="utf-8") == good and os.listdir(folder) == ["chats.json"]
        assert _questions(chat) == ["one", "two", "three"]
    finally:
        os.chmod(folder, 0o755)
        shutil.rmtree(folder)


@contextlib.contextmanager
def _as_user(uid):
    try:
        os.seteuid(uid)
    except PermissionError:  # root without the right to change its ids (some containers)
        pytest.skip("running as root, and cannot drop privileges to meet a read-only directory")
    try:
        yield
    finally:
        os.seteuid(0)


def test_autosave_path_replaced_by_a_directory(ip, chat, tmp_path):
    path = tmp_path / "chats.json"
    _autosaving(ip, chat, path)
    path.unlink()
    path.mkdir()
    with capture_output() as shown:
        ip.run_cell_magic("qwen", "", "two")
        ip.run_cell_magic("qwen", "", "three")
    assert shown.stdout.count("Warning: cannot autosave") == 1 and "(Is a directory)" in shown.stdout
    assert os.listdir(tmp_path) == ["chats.json"] and os.listdir(path) == []
    assert _questions(chat) == ["one", "two", "three"]



def test_a_one_line_question_may_end_in_a_question_mark(ip, chat):
    """IPython reads a line that ends in ? as a help request (``name?``); on a %qwen line it is the question's."""
    with capture_output():
        result = ip.run_cell("%qwen 它有什么好吃的美食吗?")
    assert result.success
    assert chat.conversation.messages[0]["content"] == "它有什么好吃的美食吗?"
    with capture_output() as shown:
        ip.run_cell("%qwen?")  # help on the magic itself still works
    assert "Talk to the loaded model" in shown.stdout
    with capture_output():
        ip.run_cell("%%qwen --max-new-tokens 3\n%qwen stays as written?")
    assert chat.conversation.messages[2]["content"] == "%qwen stays as written?"
    ip.extension_manager.unload_extension("qwen_magic")
    assert ip.input_transformers_cleanup.count(__import__("qwen_magic").keep_question_marks) == 0
    ip.extension_manager.load_extension("qwen_magic")
    ip.extension_manager.load_extension("qwen_magic")
    assert ip.input_transformers_cleanup.count(__import__("qwen_magic").keep_question_marks) == 1


def test_interrupt_during_the_checks_keeps_the_model_that_works(ip, chat, tiny_model_dir, monkeypatch):
    from qwen_magic import loader

    loaded = chat.loaded

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loader.AutoTokenizer, "from_pretrained", interrupted)
    with capture_output() as shown:
        ip.run_line_magic("qwen_load", tiny_model_dir)
    assert shown.stdout.strip().endswith(f"Loading interrupted before anything changed. {tiny_model_dir} is still loaded.")
    monkeypatch.undo()
    assert chat.loaded is loaded
    ask(ip, "still here?")
