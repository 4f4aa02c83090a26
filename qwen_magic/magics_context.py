"""The notebook around a question: cell outputs and variables, pictures, the running cell's id.

A mixin of QwenMagics (magics.py), which holds the magics themselves."""

import os

from IPython.core.error import UsageError

from .notebook import NotebookReferenceError


class ContextMixin:
    def notebook(self, attach=None):
        from .notebook import Notebook

        return Notebook(self.shell, self.recorder, attach)

    def _attachments(self):
        """A collector of the message's pictures where the model sees images, else None (images are described)."""
        if not getattr(self.loaded, "sees_images", False):
            return None
        from .images import Attached

        return Attached(self.image_max_pixels)

    def _image_file(self, path, attach):
        from .images import ImageError, read_file

        if attach is None:
            raise UsageError(f"{self.loaded.name} does not see images: load a vision-language model "
                             "(e.g. %qwen_load Qwen/Qwen2.5-VL-7B-Instruct) to attach --image.")
        try:
            return attach.add(read_file(os.path.expanduser(path)))
        except OSError as error:
            raise UsageError(f"Cannot read --image {path}: {error.strerror or error}; nothing was sent.") from None
        except ImageError as error:
            raise UsageError(f"--image {path} is {error}; nothing was sent.") from None

    def _trimmer(self):
        from .notebook import trimmer

        tokenizer = self.loaded.tokenizer
        budget = self.context_budget or max(self.turn_options().max_context_tokens // 8, 64)
        return trimmer(lambda text: tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.decode, budget)

    def _with_notebook(self, question, attach, pictures=None):
        """The message as sent: --with blocks first, then the text with its references filled in (pictures into ``pictures``)."""
        notebook, trim = self.notebook(pictures), self._trimmer()
        try:
            blocks = [
                notebook.cell_block(int(item), trim) if item.lstrip("-").isdigit() else notebook.variable_block(item, trim)
                for item in attach
            ]
            question, undefined = notebook.interpolate(question, trim)
        except NotebookReferenceError as problem:
            raise UsageError(f"{problem}; nothing was sent.") from None
        if undefined:
            names = ", ".join("{" + name + "}" for name in undefined)
            print(f"Note: {names} {'is' if len(undefined) == 1 else 'are'} not defined here, so sent as written.")
        return "\n\n".join(blocks + ([question] if question else []))

    def _cell_id(self):
        """The id a front end gave the running cell (JupyterLab, Notebook 7, VS Code), if any."""
        return self.recorder.cell_id if self.recorder.running else None

    def _code_to_next_cell(self, text):
        import re

        block = re.search(r"```[^\n`]*\n(.*?)```", text, re.DOTALL)
        if block is None:
            print("The reply has no code block to put in a cell.")
            return
        self.shell.set_next_input(block.group(1).rstrip("\n"), replace=False)
        print("The reply's first code block is in a new cell below (if none appeared, copy it from the reply).")
