"""Loading progress that looks the same in every front end: one line of text, updated in place.

transformers draws its loading bar with ``tqdm.auto``. In a kernel without ipywidgets
(JupyterLab or Notebook 7 as installed by pip) importing ``tqdm.auto`` prints a red
``TqdmWarning: IProgress not found`` block, and the bar then goes to stderr; with ipywidgets
it is a widget that some front ends show and others do not. While ``%qwen_load`` runs in a
kernel, transformers' bars are instead plain text in an output area updated in place
(``update_display_data``), which JupyterLab, Notebook 7, VS Code and Colab all render.
A terminal keeps tqdm's own bar.
"""

import contextlib
import warnings
from types import SimpleNamespace

from .display import can_update_in_place


class _Discard:
    def write(self, text):
        pass

    def flush(self):
        pass


class _Text:
    """An output that is only text/plain (no Markdown: a bar's ``|`` must stay as it is)."""

    def __init__(self, text):
        self.text = text

    def __repr__(self):
        return self.text


def display_bar_class():
    """A tqdm class that shows its bar in an IPython output area instead of writing to a stream."""
    from IPython.display import display
    from tqdm.std import tqdm as std_tqdm

    class DisplayBar(std_tqdm):
        def __init__(self, *args, **kwargs):
            self._handle = None
            kwargs["file"] = _Discard()
            kwargs.setdefault("ascii", False)  # the discarded stream says nothing of Unicode: draw blocks
            kwargs.pop("position", None)
            super().__init__(*args, **kwargs)

        def display(self, msg=None, pos=None):
            text = _Text(self.__str__() if msg is None else msg)
            if self._handle is None:
                self._handle = display(text, display_id=True)
            else:
                self._handle.update(text)
            return True

    return DisplayBar


def _import_tqdm_quietly():
    """Import ``tqdm.auto`` once without its IProgress warning (it falls back to text bars)."""
    from tqdm import TqdmWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TqdmWarning)
        import tqdm.auto  # noqa: F401


_import_tqdm_quietly()  # before transformers is imported: it imports tqdm.auto at once


@contextlib.contextmanager
def loading_progress(shell):
    """While loading: transformers' progress bars as text updated in place."""
    if not can_update_in_place(shell):
        yield
        return
    import transformers.utils.logging as hf_logging

    saved = hf_logging.tqdm_lib
    hf_logging.tqdm_lib = SimpleNamespace(tqdm=display_bar_class())
    try:
        yield
    finally:
        hf_logging.tqdm_lib = saved
