"""What the notebook showed, as text for the chat: cell sources, results, printed output, errors.

``OutputRecorder`` keeps, per execution count, what each cell printed, the
traceback of the error it raised and the images it displayed (IPython keeps none
of them), within a memory bound. For a model that sees images, references attach
the pictures themselves (an ``images.Attached`` collects them, and the text says
``[image 1]`` where each belongs); otherwise an image is a one-line description.
``interpolate`` replaces ``{In[7]}``, ``{Out[7]}``, ``{Err[-1]}``, ``{Stdout[7]}`` and
``{name}`` in a message; it only looks names and cell numbers up and never
evaluates anything. No model code here: token trimming is passed in.
"""

import re
import sys
from collections import OrderedDict
from typing import Callable, List, Optional, Tuple

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# {In[7]}, {Out[-1]}, {Err[3]}, {Stdout[7]}, or {name}; doubled braces ({{x}}) are not references.
REFERENCE = re.compile(r"(?<!\{)\{(?:(In|Out|Err|Stdout)\[(-?\d+)\]|([A-Za-z_][A-Za-z0-9_]*))\}(?!\})")
KEEP_CELLS = 200  # recorded cells kept, newest first out last
KEEP_CHARS = 100_000  # characters kept of one cell's printed output (head and tail)
KEEP_IMAGE_CELLS = 50  # cells whose displayed images are kept
KEEP_IMAGES = 4  # images kept of one cell (its last ones)
KEEP_IMAGE_BYTES = 8 * 2**20  # a larger image is not kept
KEEP_IMAGE_TOTAL = 64 * 2**20  # all kept images together: the oldest cells' go first


class NotebookReferenceError(LookupError):
    """A reference to a cell, or a part of a cell, that does not exist."""


def strip_ansi(text: str) -> str:
    return ANSI.sub("", text)


def _bounded(text: str, limit: int = KEEP_CHARS) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n… {len(text) - 2 * half:,} characters not recorded …\n{text[-half:]}"


class _Tee:
    """Writes through to the real stream and keeps a copy."""

    def __init__(self, stream, sink: List[str]):
        self._stream = stream
        self._sink = sink

    def write(self, text):
        self._sink.append(text)
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


class OutputRecorder:
    """Records printed output and errors of every cell from the moment it is registered."""

    def __init__(self, keep_cells: int = KEEP_CELLS):
        self.keep_cells = keep_cells
        self.printed: "OrderedDict[int, str]" = OrderedDict()
        self.errors: "OrderedDict[int, str]" = OrderedDict()
        self.images: "OrderedDict[int, List[bytes]]" = OrderedDict()  # PNG or JPEG bytes each cell displayed
        self._shown: List[bytes] = []
        self._publisher = None  # the display publisher whose publish we watch while a cell runs
        self._sink: List[str] = []
        self._tees: Tuple = ()
        self._shell = None
        self.running = False  # between a cell's pre_run_cell and post_run_cell
        self.cell_id = None  # the running cell's id, where the front end sends one (ipykernel 6 and newer)

    def register(self, shell) -> None:
        self._shell = shell
        shell.events.register("pre_run_cell", self.pre_run_cell)
        shell.events.register("post_run_cell", self.post_run_cell)

    def unregister(self) -> None:
        if self._shell is None:
            return
        self._restore()
        for event, callback in (("pre_run_cell", self.pre_run_cell), ("post_run_cell", self.post_run_cell)):
            try:
                self._shell.events.unregister(event, callback)
            except ValueError:
                pass
        self._shell = None

    def pre_run_cell(self, info=None) -> None:
        self.running = True
        self.cell_id = getattr(info, "cell_id", None)
        self._restore()
        self._sink = []
        self._tees = (_Tee(sys.stdout, self._sink), _Tee(sys.stderr, self._sink))
        sys.stdout, sys.stderr = self._tees
        self._shown = []
        self._watch_displays()

    def _watch_displays(self) -> None:
        """Keep the images the cell displays (matplotlib's inline figures arrive this way, at post_execute)."""
        publisher = getattr(self._shell, "display_pub", None)
        if publisher is None:
            return
        original, shown = publisher.publish, self._shown

        def publish(data, *args, **kwargs):
            try:
                if isinstance(data, dict):
                    from .images import from_bundle

                    image = from_bundle(data)
                    if image and len(image) <= KEEP_IMAGE_BYTES:
                        shown.append(image)
                        del shown[:-KEEP_IMAGES]
            except Exception:  # recording must never break a display
                pass
            return original(data, *args, **kwargs)

        publish.qwen_recorder = True
        try:
            publisher.publish = publish
        except Exception:
            return
        self._publisher = publisher

    def post_run_cell(self, result=None) -> None:
        self.running = False
        self._restore()
        count = getattr(result, "execution_count", None)
        if count is None:
            return
        if self._shown:
            self._keep(self.images, count, list(self._shown), KEEP_IMAGE_CELLS)
            self._shown = []
            while len(self.images) > 1 and sum(len(i) for shown in self.images.values() for i in shown) > KEEP_IMAGE_TOTAL:
                self.images.popitem(last=False)
        printed = strip_ansi("".join(self._sink))
        self._sink = []
        error = getattr(result, "error_in_exec", None) or getattr(result, "error_before_exec", None)
        if error is not None:
            traceback = self._format(error)
            self._keep(self.errors, count, _bounded(traceback))
            # A terminal shell prints the traceback itself; that is the error, not the cell's output.
            end = printed.rstrip().rfind(traceback.rstrip())
            if end >= 0 and not printed.rstrip()[end + len(traceback.rstrip()):]:
                printed = printed[:end]
        printed = self._without_result_prompt(printed, count, getattr(result, "result", None))
        if printed:
            self._keep(self.printed, count, _bounded(printed))

    def _without_result_prompt(self, printed: str, count: int, value) -> str:
        """A terminal shell prints the result as ``Out[N]: …``; that is the result, not printed output."""
        prompt = printed.rfind(f"Out[{count}]:")
        if value is None or prompt < 0:
            return printed
        try:
            shown = self._shell.display_formatter.format(value)[0].get("text/plain", "")
        except Exception:
            return printed
        if " ".join(printed[prompt + len(f"Out[{count}]:"):].split()) == " ".join(shown.split()):
            return printed[:prompt]
        return printed

    def _restore(self) -> None:
        publisher, self._publisher = self._publisher, None
        if publisher is not None and getattr(publisher.__dict__.get("publish"), "qwen_recorder", False):
            del publisher.publish
        if self._tees:
            if sys.stdout is self._tees[0]:
                sys.stdout = self._tees[0]._stream
            if sys.stderr is self._tees[1]:
                sys.stderr = self._tees[1]._stream
            self._tees = ()

    def _keep(self, store, count, text, keep=None) -> None:
        store[count] = text
        while len(store) > (keep or self.keep_cells):
            store.popitem(last=False)

    def _format(self, error: BaseException) -> str:
        try:
            lines = self._shell.InteractiveTB.structured_traceback(type(error), error, error.__traceback__)
            return strip_ansi("\n".join(lines))
        except Exception:  # a traceback we cannot format still has its message
            return f"{type(error).__name__}: {error}"


def describe(value, shell=None) -> str:
    """A value as the text a person would see: text/plain, a table as Markdown, never bytes."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{type(value).__name__} of {len(value):,} bytes>"
    to_markdown = getattr(value, "to_markdown", None)
    if callable(to_markdown) and hasattr(value, "shape"):  # a pandas DataFrame or Series
        try:
            return to_markdown()
        except ImportError:  # pandas needs tabulate for Markdown
            return value.to_string()
    data = {}
    if shell is not None:
        try:
            data, _ = shell.display_formatter.format(value)
        except Exception:
            data = {}
    plain = data.get("text/plain") or repr(value)
    if any(kind.startswith("image/") for kind in data) or type(value).__name__ in ("Figure", "Image"):
        size = getattr(value, "size", None) or getattr(value, "shape", None)
        detail = f", size {size}" if size is not None and not callable(size) else ""
        return f"<{type(value).__module__}.{type(value).__name__} image{detail}; the image itself is not sent: {plain}>"
    return plain


class Notebook:
    """Looks up cells and names in a shell, with the recorder's printed output, errors and images.

    ``attach``: an ``images.Attached`` when the model sees images; pictures go into it.
    """

    def __init__(self, shell, recorder: OutputRecorder, attach=None):
        self.shell = shell
        self.recorder = recorder
        self.attach = attach

    def _picture(self, value) -> Optional[str]:
        """``[image N]`` for a value that is an image, attached; None for anything else (or a text-only model)."""
        if self.attach is None:
            return None
        from .images import image_of

        data = image_of(value, self.shell)
        return self.attach.add(data) if data else None

    def displayed(self, number: int) -> str:
        """The images cell ``number`` displayed, attached (a model that sees images), as ``[image 1] [image 2]``; else ""."""
        if self.attach is None:
            return ""
        return " ".join(self.attach.add(data) for data in self.recorder.images.get(self._cell("In", number), ()))

    def _value(self, value) -> str:
        return self._picture(value) or describe(value, self.shell)

    @property
    def current(self) -> int:
        """The number of the cell being run (IPython versions differ on when execution_count moves on)."""
        sources = self.shell.user_ns.get("In")
        if not isinstance(sources, list):
            return self.shell.execution_count
        # While a cell runs, In already holds its source; outside one (a magic called directly) it does not.
        return len(sources) - 1 if self.recorder.running else len(sources)

    def _cell(self, kind: str, number: int) -> int:
        if number >= 0:
            return number
        if kind == "Err":  # Err[-1] is the most recent error, Err[-2] the one before
            counts = [c for c in self.recorder.errors if c < self.current]
            if len(counts) < -number:
                raise NotebookReferenceError(f"{{Err[{number}]}}: there are only {len(counts)} cells with an error")
            return counts[number]
        return self.current + number

    def part(self, kind: str, number: int) -> str:
        cell = self._cell(kind, number)
        sources = self.shell.user_ns.get("In", [])
        if not 0 < cell < max(len(sources), 1) or cell >= self.current:
            raise NotebookReferenceError(f"{{{kind}[{number}]}}: there is no cell {cell} before this one")
        if kind == "In":
            return sources[cell]
        if kind == "Out":
            outputs = self.shell.user_ns.get("Out", {})
            shown = self.displayed(cell)
            if cell not in outputs:
                if shown:  # a figure shown by plt.show() or the inline backend: the cell's output is the picture
                    return shown
                raise NotebookReferenceError(f"{{Out[{number}]}}: cell {cell} has no result")
            value = self._value(outputs[cell])
            return f"{value} {shown}" if shown and value != shown else value
        store, what = (self.recorder.errors, "raised no error") if kind == "Err" else (self.recorder.printed, "printed nothing")
        if cell not in store:
            raise NotebookReferenceError(f"{{{kind}[{number}]}}: cell {cell} {what} (or ran before qwen_magic was loaded)")
        return store[cell]

    def cell_block(self, number: int, trim: Callable[[str], str]) -> str:
        """Everything about one cell, each part labelled: source, printed output, result, error."""
        cell = self._cell("In", number)
        parts = [f"Cell {cell}, source:\n```python\n{trim(self.part('In', cell))}\n```"]
        outputs = self.shell.user_ns.get("Out", {})
        for kind, label in (("Stdout", "printed output"), ("Out", "result"), ("Err", "error")):
            if kind == "Out" and cell not in outputs:
                continue  # displayed images alone come below
            try:
                parts.append(f"Cell {cell}, {label}:\n```\n{trim(self.part(kind, cell) if kind != 'Out' else self._value(outputs[cell]))}\n```")
            except NotebookReferenceError:
                pass
        shown = self.displayed(cell)
        if shown:
            parts.append(f"Cell {cell}, displayed: {shown}")
        return "\n\n".join(parts)

    def variable_block(self, name: str, trim: Callable[[str], str]) -> str:
        if name not in self.shell.user_ns:
            raise NotebookReferenceError(f"--with {name}: no variable of that name")
        picture = self._picture(self.shell.user_ns[name])
        if picture:
            return f"Variable `{name}`: {picture}"
        return f"Variable `{name}`:\n```\n{trim(describe(self.shell.user_ns[name], self.shell))}\n```"

    def interpolate(self, text: str, trim: Callable[[str], str]) -> Tuple[str, List[str]]:
        """``text`` with its references replaced, and the names left as written because they are undefined.

        One pass over the text: what a reference brings in (a cell's source, a value) is sent as it
        is, never scanned for references again.
        """
        undefined: List[str] = []

        def fill(match):
            kind, number, key = match.group(1), match.group(2), match.group(3)
            if kind is not None:
                found = self.part(kind, int(number))
                return found if kind == "Out" and found.startswith("[image ") else trim(found)
            if key in self.shell.user_ns:
                return self._picture(self.shell.user_ns[key]) or trim(describe(self.shell.user_ns[key], self.shell))
            if key not in undefined:
                undefined.append(key)
            return match.group(0)

        return REFERENCE.sub(fill, text), undefined

    def latest_error(self) -> Optional[int]:
        counts = [c for c in self.recorder.errors if c < self.current]
        return counts[-1] if counts else None


def trimmer(count_tokens: Callable[[str], List[int]], decode: Callable[[List[int]], str], budget: int) -> Callable[[str], str]:
    """Cut text over ``budget`` tokens to its head and tail, with a visible marker between."""

    def trim(text: str) -> str:
        ids = count_tokens(text)
        if len(ids) <= budget:
            return text
        half = max(budget // 2, 1)
        head, tail = decode(ids[:half]).rstrip("\ufffd"), decode(ids[-half:]).lstrip("\ufffd")
        return f"{head}\n… {len(ids) - 2 * half:,} tokens omitted …\n{tail}"

    return trim
