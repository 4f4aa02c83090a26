"""The example notebook runs headless from top to bottom with the tiny model."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

pytestmark = pytest.mark.kernel
NOTEBOOK = Path(__file__).parent.parent / "examples" / "quickstart.ipynb"


def test_quickstart_notebook_runs(tiny_model_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("QWEN_MAGIC_MODEL", tiny_model_dir)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    cells = [c for c in notebook.cells if c.cell_type == "code"]
    load = next(c for c in cells if "%qwen_load" in c.source)
    assert f"Loaded {tiny_model_dir}" in "".join(o.get("text", "") for o in load.outputs)
    chats = [c for c in cells if c.source.startswith("%%qwen")]
    assert len(chats) == 4
    for cell in chats:
        markdown = [o for o in cell.outputs if "text/markdown" in o.get("data", {})]
        assert len(markdown) == 1  # one output area, updated in place
        assert "tokens · " in markdown[0]["data"]["text/markdown"]
    history = next(c for c in cells if c.source == "%qwen_history")
    assert "介绍广州这座城市" in history.outputs[0]["data"]["text/markdown"]
