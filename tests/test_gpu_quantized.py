"""On a CUDA GPU with bitsandbytes: --save-quantized writes the 4-bit model, the copy loads as it is
(NF4 layers, no quantization) and answers exactly as the model it was saved from; QwenMagics.quantized_dir
saves on the first load and reads the copy on the next. Skipped elsewhere (CI has no GPU)."""

import importlib.util
import json
import os

import pytest
import torch
from IPython.utils.capture import capture_output

from qwen_magic import quantized

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes"),
]

from test_gpu import SHAPE  # noqa: E402  the width bitsandbytes' batch-1 4-bit kernels take


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from qwen_magic.tiny import write_tiny_model

    return str(write_tiny_model(tmp_path_factory.mktemp("gpu-qwen"), **SHAPE))


@pytest.fixture
def ip():
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.extension_manager.load_extension("qwen_magic")
    yield shell
    shell.extension_manager.unload_extension("qwen_magic")
    shell.config.pop("QwenMagics", None)


def load(ip, line):
    with capture_output() as shown:
        ip.run_line_magic("qwen_load", line)
    return shown.stdout.strip().splitlines()


def greedy(ip, question):
    with capture_output():
        ip.run_cell_magic("qwen", "--no-history --greedy --max-new-tokens 24", question)
    return ip.user_ns["_qwen"]


def nf4_layers(ip):
    import bitsandbytes as bnb

    model = ip.magics_manager.registry["QwenMagics"].loaded.model
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) and m.weight.quant_state.quant_type == "nf4"]


def test_save_quantized_then_load_the_copy(ip, model_dir, tmp_path):
    copy = tmp_path / "copy"
    lines = load(ip, f"{model_dir} --dtype float16 --save-quantized {copy}")
    assert "4-bit NF4 (float16 compute)" in lines[-2] and lines[-1].startswith(f"Saved the quantized model to {copy} (")
    assert json.loads((copy / quantized.MARKER).read_text())["source"] == model_dir
    layers = len(nf4_layers(ip))
    answers = [greedy(ip, q) for q in ("介绍广州这座城市", "它有什么好吃的美食吗?")]

    lines = load(ip, f"{copy} --dtype float16")
    assert f"Loaded {copy} · 4-bit NF4 (float16 compute), saved copy · cuda:0 · " in lines[-1]
    assert not any("Saved" in line for line in lines)
    assert len(nf4_layers(ip)) == layers > 0  # quantized as stored, not again and not dequantized
    assert [greedy(ip, q) for q in ("介绍广州这座城市", "它有什么好吃的美食吗?")] == answers


def test_quantized_dir_saves_once_then_reads_the_copy(ip, model_dir, tmp_path):
    drive = tmp_path / "drive"
    ip.run_line_magic("config", f"QwenMagics.quantized_dir = '{drive}'")
    copy = quantized.copy_path(str(drive), model_dir, 4)
    first = load(ip, model_dir)
    assert first[-1].startswith(f"Saved the quantized model to {copy} (")
    assert os.listdir(drive) == [os.path.basename(copy)]
    second = load(ip, model_dir)
    assert second[0] == f"Loading the saved 4-bit copy of {model_dir} from {copy} (no download, no quantization)."
    assert ", saved copy · cuda:0 · " in second[-1] and not any("Saved" in line for line in second)
    assert nf4_layers(ip)
