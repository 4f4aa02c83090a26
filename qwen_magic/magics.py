"""The IPython magics: arguments, settings and dispatch. No model code here.

Modules that import torch (loader, engine, chat) are imported inside the magics,
so ``%load_ext qwen_magic`` stays instant.
"""

import json
import os

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments
from IPython.utils.process import arg_split
from traitlets import Bool, Float, Int, TraitError, Unicode, observe, validate

from .conversation import Conversation, PromptTooLong
from .display import MarkdownText, ReplyView
from .errors import QwenError
from .history_view import history_table
from .notebook import NotebookReferenceError, OutputRecorder
from .magics_context import ContextMixin
from .magics_files import FilesMixin
from .magics_settings import SettingsMixin
from .settings import CHECKS, first_problem

DEFAULT_MODEL = "Qwen/Qwen2.5-7B-Instruct"
ENGINES = ("auto", "fast", "generate")


def parse_argstring(magic, line):
    """Like IPython's ``parse_argstring``, but quotes group words and are then removed (``--system "Be brief"``)."""
    return magic.parser.parse_args(arg_split(line, posix=os.name == "posix", strict=False))


@magics_class
class QwenMagics(SettingsMixin, ContextMixin, FilesMixin, Magics):
    """Chat with a local Qwen model from notebook cells."""

    model = Unicode(DEFAULT_MODEL, help="Model that %qwen_load loads when given none: a Hub id or a local directory.").tag(config=True)
    bits = Int(4, help="Weight precision for %qwen_load: 4 (bitsandbytes NF4), 8 (LLM.int8) or 16 (no quantization).").tag(config=True)
    temperature = Float(None, allow_none=True, help="Sampling temperature; 0 means greedy decoding. None: the model's own (its generation_config; the tutorial's 0.7 if it has none).").tag(config=True)
    top_p = Float(None, allow_none=True, help="Nucleus sampling: keep the smallest set of tokens whose probability adds up to top_p, in (0, 1]. None: the model's own (else 0.9).").tag(config=True)
    top_k = Int(None, allow_none=True, help="Sample only from the k likeliest tokens; 0 turns it off; None uses the model's default.").tag(config=True)
    max_new_tokens = Int(512, help="Longest reply, in tokens.").tag(config=True)
    do_sample = Bool(True, help="Sample the reply (True) or pick the likeliest token every step (False, greedy).").tag(config=True)
    repetition_penalty = Float(None, allow_none=True, help="Penalty on tokens already present (1.0 is off); None uses the model's default.").tag(config=True)
    seed = Int(None, allow_none=True, help="Random seed set before every reply, for reproducible samples; None for fresh ones.").tag(config=True)
    system_prompt = Unicode(None, allow_none=True, help="System prompt of conversations that set none with --system; None uses the chat template's own.").tag(config=True)
    max_turns = Int(20, allow_none=True, help="Sliding window: earlier exchanges sent with each question (0 sends none; None, no limit).").tag(config=True)
    max_context_tokens = Int(None, allow_none=True, help="Token budget of prompt plus reply; older exchanges are dropped to fit. None: the model's context length.").tag(config=True)
    engine = Unicode("auto", help="Generation engine for %qwen_load: 'auto' (the fast engine on a GPU, generate elsewhere), 'fast' (static KV cache reused across turns; CUDA graphs on a GPU) or 'generate' (transformers' generate).").tag(config=True)
    context_budget = Int(None, allow_none=True, help="Most tokens one piece of notebook context ({Out[7]}, --with ...) may take; longer ones keep head and tail. None: an eighth of max_context_tokens.").tag(config=True)
    server = Unicode(None, allow_none=True, help="URL of an OpenAI-compatible server (e.g. http://gpu-box:8000/v1) that %qwen_load connects to instead of loading a model into the kernel.").tag(config=True)
    server_timeout = Float(60.0, help="Seconds to wait for a server's answer, or for the next piece of a streamed reply, before giving up (the stop button ends the wait at once).").tag(config=True)
    autosave = Unicode(None, allow_none=True, help="File to write every conversation to after each reply (atomically), e.g. on a mounted Google Drive; restore with %qwen_history --load PATH. None: off.").tag(config=True)
    quantized_dir = Unicode(None, allow_none=True, help="Directory where %qwen_load keeps a 4-bit (or 8-bit) copy of each model it quantizes, e.g. on a mounted Google Drive: the first load saves it, later loads read it with no download and no quantization. None: off.").tag(config=True)
    stream = Bool(True, help="Show the reply while it is written (False: show it when it is done).").tag(config=True)
    show_stats = Bool(True, help="Show tokens, speed and context use under each reply.").tag(config=True)
    image_max_pixels = Int(1024 * 28 * 28, help="Pixel budget of an attached image (vision-language models): larger ones are shrunk, keeping their aspect ratio, when attached. The default, 802,816 (1,024 image tokens of Qwen2.5-VL), keeps a 1024x768 figure whole, and a 7B model in 4 bits with it fits a T4.").tag(config=True)
    thinking = Bool(None, allow_none=True, help="Thinking models (Qwen3, Qwen3.5): True thinks before answering, False answers directly; None: the model's default. Passed to the chat template as enable_thinking.").tag(config=True)

    def __init__(self, shell=None, **kwargs):
        super().__init__(shell=shell, **kwargs)
        self.conversations = {"": Conversation()}  # by name; "" is the default one
        self.loaded = None  # a loader.LoadedModel
        self._autosave_failed = None  # the path whose failure was already reported
        self.recorder = OutputRecorder()  # registered by load_ipython_extension

    @property
    def conversation(self) -> Conversation:
        """The default conversation (the one without a name)."""
        return self.conversations[""]

    @conversation.setter
    def conversation(self, value: Conversation) -> None:
        self.conversations[""] = value

    @validate("engine")
    def _check_engine(self, proposal):
        if proposal["value"] not in ENGINES:
            raise TraitError(f"engine must be one of {', '.join(ENGINES)}, not {proposal['value']!r}")
        return proposal["value"]

    @validate("image_max_pixels")
    def _check_image_max_pixels(self, proposal):
        if proposal["value"] < 28 * 28:
            raise TraitError(f"image_max_pixels must be at least 784 (one 28x28 patch group), not {proposal['value']}")
        return proposal["value"]

    @validate("server_timeout")
    def _check_server_timeout(self, proposal):
        if not proposal["value"] > 0:
            raise TraitError(f"server_timeout must be more than 0 seconds, not {proposal['value']}")
        return proposal["value"]

    @observe("server_timeout")
    def _server_timeout_changed(self, change):
        if getattr(self.loaded, "url", None):  # a model behind a server: from its next request on
            self.loaded.engine.timeout = change["new"]

    @validate(*CHECKS)
    def _check_setting(self, proposal):
        message = CHECKS[proposal["trait"].name](proposal["value"])
        if message:
            raise TraitError(message)
        return proposal["value"]

    # --- loading

    @magic_arguments()
    @argument("model_name", nargs="?", metavar="MODEL", help="Hub id or local directory (default: QwenMagics.model)")
    @argument("--bits", type=int, choices=(4, 8, 16), help="weight precision (default: QwenMagics.bits)")
    @argument("--dtype", choices=("auto", "float16", "bfloat16", "float32"), default="auto", help="compute dtype")
    @argument("--device-map", help='accelerate device map, e.g. "auto" or "cuda:0"')
    @argument("--revision", help="branch, tag or commit of a Hub model")
    @argument("--trust-remote-code", action="store_true", help="run code shipped in the model repository")
    @argument("--engine", choices=ENGINES, help="generation engine (default: QwenMagics.engine)")
    @argument("--server", metavar="URL", help="use a model behind an OpenAI-compatible server (vLLM, SGLang, TGI, Ollama)")
    @argument("--api-key-env", metavar="NAME", default="OPENAI_API_KEY", help="environment variable holding the server's API key")
    @argument("--save-quantized", metavar="DIR", help="after loading, save the quantized model to DIR; %%qwen_load DIR loads it next time")
    @line_magic
    def qwen_load(self, line):
        """Load a model onto the GPU (4-bit NF4 by default), replacing any model already loaded.

        With --server URL, talk to a model behind an OpenAI-compatible server instead;
        without a MODEL it lists the server's models.
        """
        args = parse_argstring(self.qwen_load, line)
        if args.server or self.server:
            return self._connect(args.server or self.server, args.model_name, args.api_key_env)
        from . import progress, loader, quantized  # progress first: it imports tqdm without its IProgress warning

        name, bits = args.model_name or self.model, args.bits or self.bits
        try:  # everything that can be checked is checked while the old model still works
            stored = quantized.plan(name, bits=bits, save_to=args.save_quantized, keep_in=self.quantized_dir, revision=args.revision)
        except quantized.QuantizedError as error:
            raise UsageError(str(error) + self._still_loaded()) from None
        if stored.note:
            print(stored.note)
        try:
            plan = loader.prepare(
                stored.source,
                bits=16 if stored.stored else bits,
                dtype=args.dtype,
                device_map=args.device_map,
                revision=args.revision,
                trust_remote_code=args.trust_remote_code,
                engine=args.engine or self.engine,
            )
        except loader.LoadError as error:
            raise UsageError(str(error) + self._still_loaded()) from None
        except KeyboardInterrupt:
            print("Loading interrupted before anything changed." + self._still_loaded())
            return
        self._free_model()  # the old model goes now: two rarely fit on one GPU
        try:
            with progress.loading_progress(self.shell):
                self.loaded = loader.load_prepared(plan)
        except loader.LoadError as error:
            raise UsageError(f"{str(error).rstrip('.')}. No model is loaded now.") from None
        except KeyboardInterrupt:
            loader.free(None)
            print("Loading interrupted: no model is loaded.")
            return
        print(self.loaded.summary() + self._sampling_note())
        if stored.save_to:
            with progress.loading_progress(self.shell):
                print(quantized.save(self.loaded, stored.save_to, name))
        if not self.loaded.chat_template:
            print("This tokenizer has no chat template (a base model?): using a plain 'User: … Assistant:' prompt.")

    def _connect(self, url, model, api_key_env):
        from . import remote

        try:
            if not model:
                names = remote.list_models(url, api_key_env, timeout=self.server_timeout)
                print(f"Models at {url}: {', '.join(names) or '(none)'}. Load one with %qwen_load --server {url} MODEL.")
                return
            connected = remote.connect(url, model, api_key_env, timeout=self.server_timeout)
        except QwenError as error:
            raise UsageError(str(error) + self._still_loaded()) from None
        self._free_model()  # only once the server has answered: a wrong URL keeps the model that works
        self.loaded = connected
        print(self.loaded.summary() + self._sampling_note())

    def _still_loaded(self):
        return f" {self.loaded.name} is still loaded." if self.loaded is not None else ""

    @line_magic
    def qwen_unload(self, line):
        """Free the model and its GPU memory."""
        if self.loaded is None:
            print("No model is loaded.")
            return
        name = self.loaded.name
        self._free_model()
        print(f"Unloaded {name}.")

    def _free_model(self):
        if self.loaded is None:
            return
        from . import loader

        loaded, self.loaded = self.loaded, None
        loader.free(loaded)

    # --- chatting

    @magic_arguments()
    @argument("--new", action="store_true", help="start a fresh conversation first")
    @argument("--system", metavar="TEXT", help="system prompt of this conversation from now on")
    @argument("--no-history", action="store_true", help="ask outside the conversation: neither read nor change it")
    @argument("--max-new-tokens", type=int, metavar="N")
    @argument("--temperature", type=float, metavar="T")
    @argument("--top-p", type=float, metavar="P")
    @argument("--top-k", type=int, metavar="K")
    @argument("--seed", type=int, metavar="N")
    @argument("--greedy", action="store_true", help="pick the likeliest token every step (no sampling)")
    @argument("--think", action="store_true", help="a thinking model thinks before answering (enable_thinking=True)")
    @argument("--no-think", action="store_true", help="a thinking model answers directly (enable_thinking=False)")
    @argument("--with", dest="attach", action="append", default=[], metavar="CELL_OR_NAME",
              help="attach cell N (source, printed output, result, error) or a variable before the message; may repeat")
    @argument("--image", dest="images", action="append", default=[], metavar="PATH",
              help="attach an image file (a model that sees images); may repeat")
    @argument("--code", action="store_true", help="put the reply's first code block into a new cell below")
    @argument("--chat", metavar="NAME", default="", help="talk in conversation NAME (created on first use)")
    @line_cell_magic
    @no_var_expand  # {Out[7]} and {name} are ours to look up; IPython would evaluate them as Python
    def qwen(self, line, cell=None):
        """Talk to the loaded model: %%qwen [flags] with the message as the cell body, or %qwen MESSAGE.

        The message may refer to the notebook: {In[7]}, {Out[7]}, {Err[7]}, {Stdout[7]} (negative
        numbers count back; {Err[-1]} is the most recent error) and {name} for a variable.
        """
        if cell is None:
            args, question = parse_argstring(self.qwen, ""), line
        else:
            args, question = parse_argstring(self.qwen, line), cell
        question = question.strip()
        if not question and not args.attach and not args.images:
            raise UsageError("The message is empty: write it in the cell below %%qwen (or after %qwen).")
        problem = first_problem(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k
        )
        if problem:
            raise UsageError(problem)
        self._require_model()
        if args.think and args.no_think:
            raise UsageError("Give --think or --no-think, not both.")
        thinking = True if args.think else False if args.no_think else None
        settings = self.settings(thinking).overridden(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            do_sample=False if args.greedy else None,
        )
        attach = self._attachments()
        files = [self._image_file(path, attach) for path in args.images]
        question = self._with_notebook(question, args.attach, attach)
        if files:
            question = "\n\n".join([" ".join(files)] + ([question] if question else []))
        reply = self._turn(question, settings, chat=args.chat, new=args.new, system=args.system,
                           no_history=args.no_history, cell_id=self._cell_id() if cell is not None else None,
                           images=attach.images if attach else None)
        if args.code:
            self._code_to_next_cell(reply.text)

    @magic_arguments()
    @argument("cell_number", nargs="?", type=int, metavar="N", help="the cell (default: the most recent that raised)")
    @line_magic
    def qwen_explain(self, line):
        """Ask the model to explain the error of cell N and how to fix it (source and traceback attached)."""
        args = parse_argstring(self.qwen_explain, line)
        self._require_model()
        notebook = self.notebook()
        number = args.cell_number if args.cell_number is not None else notebook.latest_error()
        if number is None:
            raise UsageError("No cell has raised an error since qwen_magic was loaded: run one, or give its number.")
        trim = self._trimmer()
        try:
            source, error = notebook.part("In", number), notebook.part("Err", number)
        except NotebookReferenceError as problem:
            raise UsageError(str(problem)) from None
        attach = self._attachments()
        shown = self.notebook(attach).displayed(number) if attach else ""
        question = (
            f"This notebook cell raised an error. Explain what went wrong and how to fix it.\n\n"
            f"```python\n{trim(source)}\n```\n\nThe error:\n```\n{trim(error)}\n```"
            + (f"\n\nThe cell displayed: {shown}" if shown else "")
        )
        self._turn(question, self.settings(), images=attach.images if attach else None)

    def _require_model(self):
        if self.loaded is None:
            raise UsageError("No model is loaded: run %qwen_load first (e.g. %qwen_load Qwen/Qwen2.5-7B-Instruct).")

    def _turn(self, question, settings, *, chat="", new=False, system=None, no_history=False, cell_id=None, drop_last=False,
              images=None):
        """One exchange. The conversation is replaced only once the reply is in: a failure changes nothing.

        A cell that asked before (same cell id) has its exchange replaced, and the exchanges
        after it are dropped: they answered a conversation that no longer exists.
        """
        from .chat import ask

        if no_history:
            working = Conversation(system=system)
        else:
            working = Conversation() if new else self.conversations.get(chat, Conversation()).copy()
            if system is not None:
                working.system = system
        if drop_last:
            working.undo()
        index = working.exchange_of_cell(cell_id)
        if index is not None:
            later = len(working.exchanges) - index - 1
            working.keep_exchanges(index)
            dropped = f", and dropped the {later} later exchange{'s' if later != 1 else ''}" if later else ""
            print(f"Re-ran this cell: replaced its earlier exchange (turn {index + 1}){dropped}.")
        try:
            reply = ask(working, self.loaded, question, settings, self.turn_options(record=not no_history),
                        ReplyView(self.shell, live=self.stream), cell_id=cell_id, images=images)
        except (PromptTooLong, QwenError) as error:
            raise UsageError(str(error)) from None
        if not no_history:
            self.conversations[chat] = working
            self._autosave()
        self.shell.user_ns["_qwen"] = reply.text
        return reply

    @magic_arguments()
    @argument("--chat", metavar="NAME", default="", help="the conversation (default: the unnamed one)")
    @line_magic
    def qwen_regenerate(self, line):
        """Drop the last reply and ask the same question again (a new sample)."""
        args = parse_argstring(self.qwen_regenerate, line)
        self._require_model()
        conversation = self._existing(args.chat)
        if not conversation.messages:
            raise UsageError("Nothing to regenerate: the conversation is empty.")
        asked = conversation.messages[-2]
        images = {name: conversation.images[name] for name in asked.get("images", ())}
        self._turn(asked["content"], self.settings(), chat=args.chat, drop_last=True, cell_id=asked.get("cell_id"), images=images)

    @magic_arguments()
    @argument("--chat", metavar="NAME", default="", help="the conversation (default: the unnamed one)")
    @argument("--max-new-tokens", type=int, metavar="N")
    @line_magic
    def qwen_continue(self, line):
        """Continue the last reply where it stopped (at max_new_tokens, or interrupted), in the same message."""
        from .chat import continue_last

        args = parse_argstring(self.qwen_continue, line)
        problem = first_problem(max_new_tokens=args.max_new_tokens)
        if problem:
            raise UsageError(problem)
        self._require_model()
        conversation = self._existing(args.chat)
        if not conversation.messages:
            raise UsageError("Nothing to continue: the conversation is empty.")
        if not conversation.messages[-1].get("unfinished"):
            print("The last reply had finished; continuing it anyway.")
        working = conversation.copy()
        try:
            reply = continue_last(working, self.loaded, self.settings().overridden(max_new_tokens=args.max_new_tokens),
                                  self.turn_options(), ReplyView(self.shell, live=self.stream))
        except (PromptTooLong, QwenError) as error:
            raise UsageError(str(error)) from None
        self.conversations[args.chat] = working
        self._autosave()
        self.shell.user_ns["_qwen"] = working.messages[-1]["content"]
        return reply

    def _existing(self, chat):
        if chat not in self.conversations:
            raise UsageError(f"There is no conversation named {chat!r}: start it with %%qwen --chat {chat}.")
        return self.conversations[chat]

    # --- history

    @magic_arguments()
    @argument("--chat", metavar="NAME", default="", help="the conversation (default: the unnamed one)")
    @argument("--clear", action="store_true", help="empty the conversation")
    @argument("--undo", action="store_true", help="drop the last exchange")
    @argument("--json", action="store_true", help="print the messages as JSON")
    @argument("--save", metavar="PATH", help="write the conversation to a JSON file")
    @argument("--load", metavar="PATH", help="read a conversation (or an autosave file of all of them)")
    @argument("--export", metavar="PATH", help="write the conversation as a Markdown transcript")
    @line_magic
    def qwen_history(self, line):
        """Show the conversation, or clear, undo, print, save, load or export it."""
        args = parse_argstring(self.qwen_history, line)
        acted = args.load or args.save or args.clear or args.undo or args.json or args.export
        if args.load:
            self._load_history(args.load, args.chat)
        conversation = self._existing(args.chat)
        if args.undo:
            working = conversation.copy()
            if not working.undo():
                raise UsageError("Nothing to undo: the conversation is empty.")
            self.conversations[args.chat] = conversation = working
            print(f"Dropped the last exchange; {len(conversation.exchanges)} left.")
            self._autosave()
        if args.save:
            self._write(args.save, conversation.dumps())
            print(f"Saved {len(conversation.exchanges)} exchanges to {args.save}.")
        if args.export:
            title = f"Conversation {args.chat}" if args.chat else "Conversation"
            files = self._write_images(args.export, conversation.used_images())
            self._write(args.export, conversation.to_markdown(title, files))
            pictures = f" and {len(files)} image{'s' if len(files) != 1 else ''} beside it" if files else ""
            print(f"Exported {len(conversation.exchanges)} exchanges to {args.export}{pictures}.")
        if args.clear:
            self.conversations[args.chat] = Conversation()
            print("The conversation is empty.")
            self._autosave()
        if args.json:
            print(json.dumps(conversation.to_json(), ensure_ascii=False, indent=1))
        if not acted:
            markdown, plain = history_table(conversation, self.loaded, self.settings(), self.turn_options() if self.loaded else None, self.max_turns)
            from IPython.display import display

            display(MarkdownText(markdown, plain))



