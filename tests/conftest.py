"""Shared fixtures: tiny local models, an in-process IPython shell, and the classic recipe as an oracle."""

import os
import signal

import pytest
from traitlets.config import Config


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from qwen_magic.tiny import write_tiny_model

    return str(write_tiny_model(tmp_path_factory.mktemp("tiny-qwen")))


@pytest.fixture(scope="session")
def endless_model_dir(tmp_path_factory):
    """Greedy replies never end before max_new_tokens (for interrupt and length tests)."""
    from qwen_magic.tiny import write_tiny_model

    return str(write_tiny_model(tmp_path_factory.mktemp("endless-qwen"), endless=True))


@pytest.fixture(scope="session")
def ip():
    from IPython.core.interactiveshell import InteractiveShell

    config = Config()
    config.HistoryAccessor.enabled = False  # avoids "too many open files" across many tests
    return InteractiveShell.instance(config=config)


@pytest.fixture
def qwen(ip):
    """The extension loaded fresh for one test; yields the QwenMagics instance."""
    ip.extension_manager.load_extension("qwen_magic")
    magics = ip.magics_manager.registry["QwenMagics"]
    yield magics
    ip.extension_manager.unload_extension("qwen_magic")
    # %config also writes into the shell's own config, which a later QwenMagics would inherit.
    ip.config.pop("QwenMagics", None)


@pytest.fixture
def chat(ip, qwen, tiny_model_dir):
    """The tiny model loaded, greedy decoding, short replies."""
    ip.run_line_magic("qwen_load", tiny_model_dir)
    ip.run_line_magic("config", "QwenMagics.do_sample = False")
    ip.run_line_magic("config", "QwenMagics.max_new_tokens = 12")
    return qwen


class ClassicRecipe:
    """The tutorial's own code: chat template, generate, slice off the prompt, decode."""

    def __init__(self, path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path)

    def reply(self, messages, max_new_tokens):
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = self.tokenizer([text], return_tensors="pt")
        output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return self.tokenizer.decode(output[0][inputs.input_ids.shape[1]:], skip_special_tokens=True)

    def count(self, messages):
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(self.tokenizer([text]).input_ids[0])


@pytest.fixture(scope="session")
def classic(tiny_model_dir):
    return ClassicRecipe(tiny_model_dir)


@pytest.fixture
def interrupt_after(monkeypatch):
    """Arm with N: once the reply view has shown N pieces, this process gets SIGINT, as from the
    kernel's stop button. Returns the list of pieces shown; ``monkeypatch.undo()`` disarms."""

    def arm(count):
        from qwen_magic.display import ReplyView

        original, pieces = ReplyView.append, []

        def append_then_interrupt(view, piece, tokens=None):
            original(view, piece, tokens)
            pieces.append(piece)
            if len(pieces) == count:
                os.kill(os.getpid(), signal.SIGINT)

        monkeypatch.setattr(ReplyView, "append", append_then_interrupt)
        return pieces

    return arm
