"""The example notebooks run headless from top to bottom with the tiny model."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

pytestmark = pytest.mark.kernel
EXAMPLES = Path(__file__).parent.parent / "examples"


def run_notebook(name, model_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("QWEN_MAGIC_MODEL", model_dir)
    notebook = nbformat.read(EXAMPLES / name, as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    cells = [c for c in notebook.cells if c.cell_type == "code"]
    assert [o for c in cells for o in c.outputs if o.get("name") == "stderr"] == []  # no warning blocks
    return cells


def printed(cell):
    return "".join(o.get("text", "") for o in cell.outputs)


def replies(cells):
    """Each %%qwen cell shows one output area (updated in place) with the statistics line."""
    shown = []
    for cell in (c for c in cells if c.source.startswith("%%qwen")):
        markdown = [o for o in cell.outputs if "text/markdown" in o.get("data", {})]
        assert len(markdown) == 1
        assert "tokens · " in markdown[0]["data"]["text/markdown"]
        shown.append(markdown[0]["data"]["text/markdown"])
    return shown


def test_quickstart_notebook_runs(tiny_model_dir, monkeypatch, tmp_path):
    cells = run_notebook("quickstart.ipynb", tiny_model_dir, monkeypatch, tmp_path)
    load = next(c for c in cells if "%qwen_load" in c.source)
    assert f"Loaded {tiny_model_dir}" in printed(load)
    assert len(replies(cells)) == 5
    plot = next(c for c in cells if c.source.startswith("%%qwen --with -1"))
    assert "tokens · " in plot.outputs[-1]["data"]["text/markdown"]  # a text-only model: the plot cell's code, no picture
    history = next(c for c in cells if c.source == "%qwen_history")
    assert "介绍广州这座城市" in history.outputs[0]["data"]["text/markdown"]


def test_chinese_quickstart_notebook_runs(tiny_model_dir, monkeypatch, tmp_path):
    cells = run_notebook("quickstart.zh-CN.ipynb", tiny_model_dir, monkeypatch, tmp_path)
    loads = [c for c in cells if "%qwen_load" in c.source]
    assert len(loads) == 2 and all(f"Loaded {tiny_model_dir}" in printed(c) for c in loads)
    shown = replies(cells)
    assert len(shown) == 6  # the classification, 广州, 美食, one with a window of one turn, the plot, one after the restart
    assert shown[3].startswith("<sub>1 earlier exchange left out of the window.</sub>")
    history = next(c for c in cells if "%qwen_history" in c.source and "--load" not in c.source)
    table = history.outputs[0]["data"]["text/markdown"]
    assert "介绍广州这座城市" in table and "它有什么好吃的美食吗?" in table
    assert "Restored 1 conversation from " in printed(loads[1])  # the autosave file brought the chat back
    assert "print(_qwen" in cells[-1].source and printed(cells[-1]).strip()
