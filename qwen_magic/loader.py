"""Load a causal LM and its tokenizer (a vision-language model also its processor): quantization, dtype, devices; free them again."""

import gc
import importlib
import importlib.util
import os
import re
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from . import quantized, split
from .engine import GenerateEngine
from .errors import QwenError
from .prompt import has_chat_template

GENERATIVE = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")  # architecture names that generate text
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class LoadError(QwenError):
    """A model that cannot be loaded for a reason the user can fix; the message is one line."""


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    name: str
    precision: str
    devices: str
    gpu_bytes: int
    context_length: int
    seconds: float
    engine: object = None  # GenerateEngine, fast.FastEngine or vision.VisionEngine
    engine_note: str = ""
    processor: object = None  # a vision-language model's (AutoProcessor): it sees images

    @property
    def sees_images(self) -> bool:
        return self.processor is not None

    @property
    def chat_template(self) -> bool:
        return has_chat_template(self.tokenizer)

    def summary(self) -> str:
        memory = f"{self.gpu_bytes / 2**30:.1f} GiB GPU memory" if self.gpu_bytes else "no GPU memory"
        return (
            f"Loaded {self.name} · {self.precision} · {self.devices} · {memory} · "
            f"context {self.context_length:,} tokens · {self.seconds:.1f} s · "
            + ("sees images · " if self.sees_images else "") + f"engine: {self.engine.name}{self.engine_note}"
        )


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _resolve(name: str) -> str:
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise LoadError(f"{name} has no config.json: it is not a model directory.")
        return path
    if os.path.exists(path):
        raise LoadError(f"{name} is a file; give the model's directory.")
    if _looks_like_path(name):
        raise LoadError(f"No such directory: {name}")
    return name


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _pick_dtype(dtype: str, cuda: bool) -> torch.dtype:
    if dtype != "auto":
        return DTYPES[dtype]
    if not cuda:
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16  # a T4 has no bfloat16


def _gpu_bytes() -> int:
    if not torch.cuda.is_available():
        return 0
    return sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count()))


WEIGHTS = (".safetensors", ".bin", ".pt", ".pth")  # weight files a local model directory must hold


@dataclass
class LoadPlan:
    """Everything checked before the old model is freed: ``load_prepared`` then only loads the weights."""

    name: str
    source: str
    config: object
    tokenizer: object
    model_kwargs: dict
    precision: str
    engine: str
    started: float
    processor: object = None  # a vision-language model's


def _check_weights(name: str, source: str) -> None:
    if os.path.isdir(source) and not any(f.endswith(WEIGHTS) for f in os.listdir(source)):
        raise LoadError(f"{name} has a config.json but no weights (*.safetensors or *.bin): is the download complete?")


def _check_bitsandbytes(bits: int) -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise LoadError(f"--bits {bits} needs bitsandbytes: run %pip install bitsandbytes, or load with --bits 16.")
    try:
        importlib.import_module("bitsandbytes")
    except Exception as error:  # installed but broken (a CUDA library it cannot find, say)
        raise LoadError(f"--bits {bits} needs bitsandbytes, which fails to import ({_first_line(error)}): "
                        "run %pip install -U bitsandbytes, or load with --bits 16.") from None


def _check_device_map(device_map: Optional[str], cuda: bool) -> None:
    """A CUDA device that is not there fails deep inside loading; say so first."""
    if not isinstance(device_map, (str, type(None))):
        return  # a dict from module names to devices (Python callers): transformers checks it
    named = re.fullmatch(r"cuda(?::(\d+))?", (device_map or "").strip())
    if named is None:
        return
    count = torch.cuda.device_count() if cuda else 0
    if int(named.group(1) or 0) >= count:
        raise LoadError(f"--device-map {device_map}: this machine has {count or 'no'} CUDA device{'s' if count != 1 else ''}; "
                        "use --device-map auto (or leave it out).")


def prepare(
    name: str,
    *,
    bits: int = 4,
    dtype: str = "auto",
    device_map=None,  # "auto", "balanced", "cuda:1", ... or a dict from module names to devices
    revision: Optional[str] = None,
    trust_remote_code: bool = False,
    engine: str = "auto",
    notify: Callable[[str], None] = print,
) -> LoadPlan:
    """Check all that can be checked cheaply: path, config, architecture, tokenizer, weights, bitsandbytes.

    Raises LoadError with one line; nothing is loaded onto a device yet, so a model
    already loaded can stay while this runs.
    """
    started = time.perf_counter()
    source = _resolve(name)
    cuda = torch.cuda.is_available()
    common = dict(revision=revision, trust_remote_code=trust_remote_code)
    if bits in (4, 8) and cuda:
        _check_bitsandbytes(bits)
    _check_device_map(device_map, cuda)
    compute = _pick_dtype(dtype, cuda)

    try:
        config = AutoConfig.from_pretrained(source, **common)
    except (OSError, ValueError) as error:
        raise LoadError(f"Could not load {name}: {_first_line(error)}") from None

    architectures = getattr(config, "architectures", None) or []
    if architectures and not any(a.endswith(GENERATIVE) for a in architectures):
        raise LoadError(f"{name} is a {config.model_type} model, not a causal language model (chat models are).")
    _check_weights(name, source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
    except Exception as error:  # missing or broken tokenizer files: say so before anything is freed
        raise LoadError(f"Could not load the tokenizer of {name}: {_first_line(error)}") from None
    if not tokenizer("Hello", add_special_tokens=False)["input_ids"]:  # newer transformers make an empty one
        raise LoadError(f"Could not load the tokenizer of {name}: it has no vocabulary (tokenizer.json or vocab files missing?).")
    processor = _processor(name, source, config, common)

    if not cuda and bits != 16:
        notify(f"No CUDA GPU here: loading {name} unquantized ({str(compute).replace('torch.', '')}) on the CPU; replies will be slow for large models.")
        bits = 16
    kwargs = dict(common)
    if bits == 4:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
        )
        precision = f"4-bit NF4 ({str(compute).replace('torch.', '')} compute)"
    elif bits == 8:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        precision = "8-bit (LLM.int8)"
    else:
        precision = str(compute).replace("torch.", "")
        if quantized.quant_method(config):  # AWQ, GPTQ or a saved 4-bit copy: its own quantization config
            precision = quantized.precision(config, precision)
    kwargs["dtype"] = compute
    if device_map or cuda:
        kwargs["device_map"] = device_map or "auto"
    return LoadPlan(name=name, source=source, config=config, tokenizer=tokenizer, model_kwargs=kwargs,
                    precision=precision, engine=engine, started=started, processor=processor)


def load_prepared(plan: LoadPlan, notify: Callable[[str], None] = print) -> LoadedModel:
    """Load the weights that ``prepare`` checked (the slow part, and the one that takes GPU memory)."""
    name, config, tokenizer = plan.name, plan.config, plan.tokenizer
    notify(f"Loading {name} ({plan.precision}) …")
    if plan.engine != "generate" and torch.cuda.is_available():
        from . import kernels  # the fast engine's kernels compile and check while the weights load

        named = re.fullmatch(r"cuda:(\d+)", str(plan.model_kwargs.get("device_map", "")).strip())
        kernels.start_checks(torch.device("cuda", int(named.group(1)) if named else torch.cuda.current_device()),
                             plan.model_kwargs.get("dtype"))
    try:
        if plan.processor is not None:
            from transformers import AutoModelForImageTextToText

            model = AutoModelForImageTextToText.from_pretrained(plan.source, **plan.model_kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(plan.source, **plan.model_kwargs)
    except ValueError as error:
        if "Unrecognized configuration class" in str(error):
            raise LoadError(f"{name} is a {config.model_type} model, not a causal language model (chat models are).") from None
        raise LoadError(f"Could not load {name}: {_first_line(error)}") from None
    except OSError as error:
        raise LoadError(f"Could not load {name}: {_first_line(error)}") from None
    except torch.cuda.OutOfMemoryError:
        free(None)  # whatever was placed on the GPU before the failure
        raise _out_of_memory(name) from None
    model.eval()

    if getattr(model, "hf_device_map", None):
        devices = ", ".join(sorted({str(d) if not isinstance(d, int) else f"cuda:{d}" for d in model.hf_device_map.values()}))
        if split.is_split(split.placement(model)):  # "split over 2 GPUs: cuda:0 layers 0–13 (2.1 GiB), ..."
            devices = split.describe(split.placement(model), split.device_bytes(model))
    else:
        devices = str(model.device)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    context = int(getattr(text_config, "max_position_embeddings", None) or getattr(tokenizer, "model_max_length", 0))
    try:
        chosen, note = pick_engine(model, tokenizer, plan.engine, context)
    except torch.cuda.OutOfMemoryError:  # the weights fit, the engine's first cache and graphs did not
        model = None
        free(None)
        raise _out_of_memory(name) from None
    if plan.processor is not None:
        chosen, note = _vision_engine(model, plan.processor, chosen, note)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        precision=plan.precision,
        devices=devices,
        gpu_bytes=_gpu_bytes(),
        context_length=context,
        seconds=time.perf_counter() - plan.started,
        engine=chosen,
        engine_note=note,
        processor=plan.processor,
    )


def _processor(name: str, source: str, config, common: dict):
    """A vision-language model's processor (image processor, tokenizer, chat template); None for a text model."""
    if getattr(config, "vision_config", None) is None:
        return None
    try:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(source, **common)
    except Exception as error:  # missing files, or torchvision / PIL missing for its image processor
        missing = [m for m in ("torchvision", "PIL") if importlib.util.find_spec(m) is None]
        hint = f": run %pip install {' '.join('pillow' if m == 'PIL' else m for m in missing)}" if missing else ""
        raise LoadError(f"Could not load the image processor of {name} ({_first_line(error)}){hint}.") from None
    if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise LoadError(f"{name} has a vision config but no image processor (preprocessor_config.json missing?).")
    return processor


def _vision_engine(model, processor, chosen, note: str):
    """A vision-language model's engine: the fast engine where it was picked, for windows with pictures too
    (pixel values and 3-D positions in its prefill), else ``generate`` with the processor's inputs."""
    from .fast import FastEngine
    from .vision import VisionEngine

    if isinstance(chosen, FastEngine):
        return VisionEngine(model, processor, text_engine=chosen), note
    chosen.close()
    return VisionEngine(model, processor), note


def _out_of_memory(name: str) -> "LoadError":
    return LoadError(f"Out of GPU memory loading {name}: load it in 4 bits (--bits 4), pick a smaller model, "
                     "or free memory (%qwen_unload, or restart the runtime).")


def load(name: str, *, notify: Callable[[str], None] = print, **options) -> LoadedModel:
    """``prepare`` then ``load_prepared``: check, then load (``options`` as ``prepare`` takes them)."""
    return load_prepared(prepare(name, notify=notify, **options), notify)


def pick_engine(model, tokenizer, wanted: str, context_length: int):
    """The fast engine on a GPU (or when asked for), else ``generate``; with a note when the fast one failed.

    A model split over several GPUs takes the fast engine too (one decode graph per device, split.py),
    except a hybrid one (recurrent layers), which stays on ``generate``.
    """
    if wanted == "generate" or (wanted == "auto" and not torch.cuda.is_available()):
        return GenerateEngine(model, tokenizer), ""
    from .hybrid import is_hybrid

    if wanted == "auto" and is_hybrid(model.config) and split.is_split(split.placement(model)):
        return GenerateEngine(model, tokenizer), " (a hybrid model split over several GPUs runs on generate)"
    from .fast import FastEngine

    fast = None
    try:
        fast = FastEngine(model, tokenizer, context_length=context_length)
        fast.warm_up()
        return fast, fast.note
    except torch.cuda.OutOfMemoryError:  # not the architecture: the card is full (the loader says so)
        if fast is not None:
            fast.close()
        raise
    except Exception as error:  # an architecture or setup the fast loop cannot run: fall back, say why
        if fast is not None:
            fast.close()
        if wanted == "fast":
            raise LoadError(f"The fast engine cannot run this model: {_first_line(error)}") from None
        return GenerateEngine(model, tokenizer), f" (the fast engine could not run: {_first_line(error)})"


def free(loaded: Optional[LoadedModel]) -> None:
    """Drop the model's weights and give its GPU memory back to the driver."""
    if loaded is not None:
        if loaded.engine is not None:
            loaded.engine.close()
        loaded.model = loaded.tokenizer = loaded.engine = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
