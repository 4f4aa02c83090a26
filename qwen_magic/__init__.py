"""qwen_magic: chat with a local Qwen model from Jupyter and Colab cells.

    %load_ext qwen_magic
    %qwen_load
    %%qwen
    Introduce Guangzhou.
"""

__version__ = "0.1.0"

_MAGIC_NAMES = {"line": ("qwen_load", "qwen_unload", "qwen", "qwen_history", "qwen_explain", "qwen_regenerate", "qwen_continue"), "cell": ("qwen",)}


def load_ipython_extension(ipython):
    from .magics import QwenMagics

    magics = QwenMagics(shell=ipython)
    ipython.register_magics(magics)
    magics.recorder.register(ipython)
    if magics not in ipython.configurables:
        ipython.configurables.append(magics)


def unload_ipython_extension(ipython):
    """Remove the magics and free the model (and its GPU memory)."""
    manager = ipython.magics_manager
    magics = manager.registry.pop("QwenMagics", None)
    if magics is None:
        return
    magics.recorder.unregister()
    magics._free_model()
    for kind, names in _MAGIC_NAMES.items():
        for name in names:
            manager.magics[kind].pop(name, None)
    if magics in ipython.configurables:
        ipython.configurables.remove(magics)
