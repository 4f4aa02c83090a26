"""Quantized checkpoints: save the 4-bit model once, load it next time with no download and no
quantization; recognise checkpoints that come quantized (AWQ, GPTQ, a saved bitsandbytes copy).

Everything here that can refuse runs before the old model is freed (``plan``), from the
checkpoint's config.json alone, so a refusal is one line and the loaded model stays.
"""

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from typing import Optional

from .errors import QwenError

MARKER = "qwen_magic.json"  # written into a saved copy: what it was made from
LABELS = {"awq": "AWQ", "gptq": "GPTQ", "bitsandbytes": "bitsandbytes"}


class QuantizedError(QwenError):
    """A quantized checkpoint or a save target that cannot be used; the message is one line."""


@dataclass
class Plan:
    source: str  # what to load: the name given, or the saved copy that stands for it
    stored: Optional[str] = None  # the checkpoint comes quantized (awq, gptq, bitsandbytes): load it as it is
    save_to: Optional[str] = None  # where to write the quantized model once it is loaded
    note: str = ""  # one line to print before loading


def _config_json(name: str, revision: Optional[str]) -> dict:
    """The checkpoint's config.json as a dict; {} when it cannot be read here (the loader then says why)."""
    path = os.path.expanduser(name)
    try:
        if os.path.isdir(path):
            config_path = os.path.join(path, "config.json")
        else:
            from huggingface_hub import hf_hub_download

            config_path = hf_hub_download(name, "config.json", revision=revision)
        with open(config_path, encoding="utf-8") as file:
            return json.load(file)
    except Exception:  # offline, misspelt, no config.json: the loader reports it in its own words
        return {}


def quant_method(config) -> Optional[str]:
    """``awq``, ``gptq``, ``bitsandbytes``, … for a checkpoint stored quantized (a dict or a config object)."""
    settings = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config", None)
    if not settings:
        return None
    method = settings.get("quant_method") if isinstance(settings, dict) else getattr(settings, "quant_method", None)
    return str(getattr(method, "value", method)).lower() if method else None


def needed_packages(method: str) -> list:
    """The packages transformers needs here to load a checkpoint quantized with ``method``, missing ones only."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    wanted = {
        "awq": [("gptqmodel", "gptqmodel")] if major >= 5 else [("autoawq", "awq")],
        "gptq": [("optimum", "optimum"), ("gptqmodel", "gptqmodel")],
        "bitsandbytes": [("bitsandbytes", "bitsandbytes")],
    }.get(method, [])
    return [package for package, module in wanted if importlib.util.find_spec(module) is None]


def precision(config, compute: str) -> str:
    """The summary line's precision for a checkpoint stored quantized."""
    method = quant_method(config)
    settings = config.quantization_config
    get = settings.get if isinstance(settings, dict) else lambda key, default=None: getattr(settings, key, default)
    if method == "bitsandbytes":
        if get("load_in_8bit"):
            return "8-bit (LLM.int8), saved copy"
        compute = str(get("bnb_4bit_compute_dtype") or compute).replace("torch.", "")
        return f"4-bit {str(get('bnb_4bit_quant_type', 'nf4')).upper()} ({compute} compute), saved copy"
    bits = get("bits")
    return f"{LABELS.get(method, method)}{f' {bits}-bit' if bits else ''} (from the checkpoint)"


def copy_path(root: str, name: str, bits: int) -> str:
    """Where ``QwenMagics.quantized_dir`` keeps the copy of model ``name`` at ``bits``."""
    slug = name.strip("/").replace("/", "--").replace(os.sep, "--")
    return os.path.join(os.path.expanduser(root), f"{slug}-{bits}bit")


def plan(name: str, *, bits: int, save_to: Optional[str], keep_in: Optional[str], revision: Optional[str]) -> Plan:
    """Check before anything is freed; say what to load and where to save. Raises QuantizedError."""
    import torch

    cuda = torch.cuda.is_available()
    method = quant_method(_config_json(name, revision))
    label = LABELS.get(method, method)
    if save_to:
        if bits == 16:
            raise QuantizedError("--save-quantized saves a 4-bit or 8-bit copy: use it with --bits 4 or --bits 8.")
        if method:
            raise QuantizedError(f"{name} is already quantized ({label}): load it as it is, without --save-quantized.")
        target = os.path.expanduser(save_to)
        if os.path.exists(target) and (not os.path.isdir(target) or os.listdir(target)):
            raise QuantizedError(f"{save_to} already exists and is not empty: give a new directory (load a saved copy with %qwen_load {save_to}).")
        if not cuda:
            raise QuantizedError("--save-quantized needs a CUDA GPU to quantize on, and there is none here; nothing changed.")
    if method:
        missing = needed_packages(method)
        if missing:
            instead = "" if method == "bitsandbytes" else ", or load the unquantized model in 4 bits instead"
            raise QuantizedError(
                f"{name} is quantized with {label}: loading it needs {' and '.join(missing)} "
                f"(run %pip install {' '.join(missing)}){instead}."
            )
        if not cuda:
            raise QuantizedError(f"{name} is quantized with {label}, which needs a CUDA GPU: load the unquantized model here instead.")
        return Plan(source=name, stored=method)
    if save_to:
        return Plan(source=name, save_to=save_to)
    if keep_in and cuda and bits in (4, 8) and importlib.util.find_spec("bitsandbytes") is not None:
        copy = copy_path(keep_in, name, bits)
        if os.path.isfile(os.path.join(copy, "config.json")):
            return Plan(source=copy, stored="bitsandbytes", note=f"Loading the saved {bits}-bit copy of {name} from {copy} (no download, no quantization).")
        return Plan(source=name, save_to=copy)
    return Plan(source=name)


def save(loaded, target: str, source: str) -> str:
    """Write the loaded (quantized) model, tokenizer and generation settings to ``target``; return one line.

    Written into a temporary folder beside ``target`` and renamed at the end, so a runtime that
    drops mid-save leaves no half copy that a later ``%qwen_load`` would take for a whole one.
    A failure is reported in the returned line; the loaded model stays loaded either way.
    """
    from . import __version__

    target = os.path.expanduser(target)
    partial = f"{target.rstrip(os.sep)}.partial-{os.getpid()}"
    try:
        shutil.rmtree(partial, ignore_errors=True)
        loaded.model.save_pretrained(partial)
        loaded.tokenizer.save_pretrained(partial)
        with open(os.path.join(partial, MARKER), "w", encoding="utf-8") as file:
            json.dump({"source": source, "precision": loaded.precision, "qwen_magic": __version__}, file, indent=1)
        if os.path.isdir(target) and not os.listdir(target):
            os.rmdir(target)
        os.replace(partial, target)
    except KeyboardInterrupt:
        shutil.rmtree(partial, ignore_errors=True)
        return f"Saving interrupted: no copy was written to {target}; the model is loaded all the same."
    except Exception as error:  # disk full, no permission, a Drive that went away: the chat goes on
        shutil.rmtree(partial, ignore_errors=True)
        text = str(error).strip()
        reason = getattr(error, "strerror", None) or (text.splitlines()[0] if text else type(error).__name__)
        return f"Warning: could not save the quantized model to {target} ({reason}); the model is loaded all the same."
    size = sum(os.path.getsize(os.path.join(folder, f)) for folder, _, files in os.walk(target) for f in files)
    return f"Saved the quantized model to {target} ({size / 1e9:.1f} GB): next time, %qwen_load {target} loads it with no download and no quantization."
