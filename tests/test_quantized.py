"""Saved quantized copies and checkpoints that come quantized (AWQ, GPTQ, bitsandbytes), as far as a
CPU can check them: every refusal is one line before anything is freed; the save writes a whole copy
or none. Quantizing and loading the 4-bit copy itself: tests/test_gpu.py."""

import json
import os
import shutil

import transformers

from helpers import ask, usage_error
from qwen_magic import quantized

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


def checkpoint_with(tmp_path, model_dir, quantization_config):
    """A copy of the tiny model whose config.json says it is stored quantized."""
    target = tmp_path / quantization_config["quant_method"]
    shutil.copytree(model_dir, target)
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (target / "config.json").write_text(json.dumps(config))
    return str(target)


def still_loaded(ip, magics, model_dir):
    assert magics.loaded is not None and magics.loaded.name == model_dir
    assert "tokens · " in ask(ip, "还在吗?").outputs[-1].data["text/markdown"]


AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False}
BNB = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float16"}


def test_an_awq_checkpoint_names_what_to_install_and_keeps_the_model(ip, chat, tiny_model_dir, tmp_path):
    awq = checkpoint_with(tmp_path, tiny_model_dir, AWQ)
    package = "gptqmodel" if TRANSFORMERS_MAJOR >= 5 else "autoawq"
    assert usage_error(ip.run_line_magic, "qwen_load", awq) == (
        f"{awq} is quantized with AWQ: loading it needs {package} (run %pip install {package}), "
        f"or load the unquantized model in 4 bits instead. {tiny_model_dir} is still loaded."
    )
    still_loaded(ip, chat, tiny_model_dir)


def test_a_gptq_checkpoint_names_both_packages(ip, chat, tiny_model_dir, tmp_path):
    gptq = checkpoint_with(tmp_path, tiny_model_dir, GPTQ)
    message = usage_error(ip.run_line_magic, "qwen_load", gptq)
    assert message.startswith(f"{gptq} is quantized with GPTQ: loading it needs optimum and gptqmodel (run %pip install optimum gptqmodel)")
    still_loaded(ip, chat, tiny_model_dir)


def test_a_saved_4bit_copy_without_cuda_is_one_line(ip, chat, tiny_model_dir, tmp_path):
    copy = checkpoint_with(tmp_path, tiny_model_dir, BNB)
    message = usage_error(ip.run_line_magic, "qwen_load", copy)
    if quantized.needed_packages("bitsandbytes"):
        assert message == f"{copy} is quantized with bitsandbytes: loading it needs bitsandbytes (run %pip install bitsandbytes). {tiny_model_dir} is still loaded."
    else:
        assert message == f"{copy} is quantized with bitsandbytes, which needs a CUDA GPU: load the unquantized model here instead. {tiny_model_dir} is still loaded."
    still_loaded(ip, chat, tiny_model_dir)


def test_save_quantized_refusals_leave_the_model_loaded(ip, chat, tiny_model_dir, tmp_path):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    kept = f" {tiny_model_dir} is still loaded."

    def load(line):
        message = usage_error(ip.run_line_magic, "qwen_load", line)
        assert message.endswith(kept)  # each refusal says the model that works stays
        return message[: -len(kept)]

    assert load(f"{tiny_model_dir} --bits 16 --save-quantized {tmp_path}/new") == (
        "--save-quantized saves a 4-bit or 8-bit copy: use it with --bits 4 or --bits 8.")
    assert load(f"{tiny_model_dir} --save-quantized {occupied}") == (
        f"{occupied} already exists and is not empty: give a new directory (load a saved copy with %qwen_load {occupied}).")
    awq = checkpoint_with(tmp_path, tiny_model_dir, AWQ)
    assert load(f"{awq} --save-quantized {tmp_path}/new") == (
        f"{awq} is already quantized (AWQ): load it as it is, without --save-quantized.")
    assert load(f"{tiny_model_dir} --save-quantized {tmp_path}/new") == (
        "--save-quantized needs a CUDA GPU to quantize on, and there is none here; nothing changed.")
    assert not os.path.exists(tmp_path / "new") and os.listdir(occupied) == ["notes.txt"]
    assert usage_error(ip.run_line_magic, "qwen_load", "--save-quantized") == "argument --save-quantized: expected one argument"
    still_loaded(ip, chat, tiny_model_dir)


def test_quantized_dir_without_cuda_loads_as_usual_and_saves_nothing(ip, qwen, tiny_model_dir, tmp_path):
    ip.run_line_magic("config", f"QwenMagics.quantized_dir = '{tmp_path}/drive'")
    from IPython.utils.capture import capture_output

    with capture_output() as shown:
        ip.run_line_magic("qwen_load", tiny_model_dir)
    assert shown.stdout.strip().splitlines()[-1].startswith(f"Loaded {tiny_model_dir} · float32 · cpu")
    assert not os.path.exists(tmp_path / "drive")


def test_a_saved_copy_is_whole_and_loads_to_the_same_replies(ip, chat, tiny_model_dir, tmp_path):
    """The save itself (here of the unquantized CPU model): a complete folder, a marker, no leftovers."""
    first = ask(ip, "介绍广州这座城市", "--no-history").outputs[-1].data["text/markdown"]
    target = tmp_path / "saved" / "tiny-copy"
    target.parent.mkdir()
    line = quantized.save(chat.loaded, str(target), "tiny")
    assert line.startswith(f"Saved the quantized model to {target} (") and line.endswith(
        f"next time, %qwen_load {target} loads it with no download and no quantization.")
    assert os.listdir(target.parent) == ["tiny-copy"]  # the temporary folder was renamed, nothing left over
    assert {"config.json", "generation_config.json", "tokenizer.json", "model.safetensors", quantized.MARKER} <= set(os.listdir(target))
    assert json.loads((target / quantized.MARKER).read_text())["source"] == "tiny"
    ip.run_line_magic("qwen_load", str(target))
    again = ask(ip, "介绍广州这座城市", "--no-history").outputs[-1].data["text/markdown"]
    assert again.split("<sub>")[0] == first.split("<sub>")[0]


def test_a_failed_save_is_one_warning_and_the_model_stays(ip, chat, tiny_model_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    line = quantized.save(chat.loaded, str(blocker / "copy"), "tiny")
    assert line.startswith(f"Warning: could not save the quantized model to {blocker / 'copy'} (")
    assert line.endswith("); the model is loaded all the same.") and "\n" not in line
    assert os.listdir(tmp_path) == ["a-file"]
    still_loaded(ip, chat, tiny_model_dir)


def test_the_copy_of_a_hub_model_has_a_folder_of_its_own(tmp_path):
    assert quantized.copy_path(str(tmp_path), "Qwen/Qwen2.5-7B-Instruct", 4) == str(tmp_path / "Qwen--Qwen2.5-7B-Instruct-4bit")
    assert quantized.copy_path(str(tmp_path), "Qwen/Qwen2.5-7B-Instruct", 8) != quantized.copy_path(str(tmp_path), "Qwen/Qwen2.5-7B-Instruct", 4)


def test_an_interrupted_save_leaves_no_half_copy(ip, chat, tiny_model_dir, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        (tmp_path / f"copy.partial-{os.getpid()}" / "model.safetensors").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(chat.loaded.tokenizer, "save_pretrained", interrupted)
    line = quantized.save(chat.loaded, str(tmp_path / "copy"), "tiny")
    assert line == f"Saving interrupted: no copy was written to {tmp_path / 'copy'}; the model is loaded all the same."
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    still_loaded(ip, chat, tiny_model_dir)
