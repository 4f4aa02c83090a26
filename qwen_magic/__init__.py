"""qwen_magic: chat with a local Qwen model from Jupyter and Colab cells.

    %load_ext qwen_magic
    %qwen_load
    %%qwen
    Introduce Guangzhou.
"""

import re

__version__ = "0.1.0"

_MAGIC_NAMES = {"line": ("qwen_load", "qwen_unload", "qwen", "qwen_history", "qwen_explain", "qwen_regenerate", "qwen_continue"), "cell": ("qwen",)}


def load_ipython_extension(ipython):
    from .magics import QwenMagics

    magics = QwenMagics(shell=ipython)
    ipython.register_magics(magics)
    magics.recorder.register(ipython)
    _register_question_marks(ipython)
    if magics not in ipython.configurables:
        ipython.configurables.append(magics)


def unload_ipython_extension(ipython):
    """Remove the magics and free the model (and its GPU memory)."""
    manager = ipython.magics_manager
    magics = manager.registry.pop("QwenMagics", None)
    if magics is None:
        return
    magics.recorder.unregister()
    _unregister_question_marks(ipython)
    magics._free_model()
    for kind, names in _MAGIC_NAMES.items():
        for name in names:
            manager.magics[kind].pop(name, None)
    if magics in ipython.configurables:
        ipython.configurables.remove(magics)


# IPython reads a line that ends in ? as a request for help (``name?``): ``%qwen What is NF4?`` would
# look up an object instead of asking. On a %qwen line the ? is the question's own, so such a line
# becomes the magic call it stands for before IPython looks for help requests.
_QUESTION = re.compile(r"^([ \t]*)%qwen[ \t]+(.*[^?\s].*\?)[ \t]*$")


def keep_question_marks(lines):
    if lines and lines[0].lstrip().startswith("%%"):
        return lines  # a cell magic's body is its own business
    kept = []
    for line in lines:
        body, end = (line[:-1], "\n") if line.endswith("\n") else (line, "")
        match = _QUESTION.match(body)
        kept.append(f"{match.group(1)}get_ipython().run_line_magic('qwen', {match.group(2)!r}){end}" if match else line)
    return kept


def _register_question_marks(ipython):
    cleanup = getattr(ipython, "input_transformers_cleanup", None)
    if cleanup is not None and keep_question_marks not in cleanup:
        cleanup.append(keep_question_marks)


def _unregister_question_marks(ipython):
    cleanup = getattr(ipython, "input_transformers_cleanup", None)
    if cleanup is not None and keep_question_marks in cleanup:
        cleanup.remove(keep_question_marks)
