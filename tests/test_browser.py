"""JupyterLab in a real browser: headless Chromium runs the quickstart through the UI, with the tiny model.

It checks what a person sees: each reply is one rendered Markdown output that grows in place, with
its statistics line, no red error blocks, and the toolbar's stop button ends a long reply with the
partial reply kept and marked. Screenshots go to .ci/screenshots/ (or $QWEN_MAGIC_SCREENSHOTS).

Needs JupyterLab, Playwright (pip) and Chromium (Debian's ``chromium`` package; Playwright's own
browser download is not used): ``.ci/run`` installs them. Elsewhere it is skipped.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("jupyterlab")
CHROMIUM = os.environ.get("QWEN_MAGIC_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("needs Chromium (apt-get install chromium)", allow_module_level=True)

pytestmark = pytest.mark.browser
ROOT = Path(__file__).parent.parent
SCREENSHOTS = Path(os.environ.get("QWEN_MAGIC_SCREENSHOTS", ROOT / ".ci" / "screenshots"))
TOKEN = "qwen-magic-browser-test"
CELL_TIMEOUT = 120_000  # ms


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory, tiny_model_dir):
    """A JupyterLab server on 127.0.0.1 whose kernels load the tiny model through QWEN_MAGIC_MODEL."""
    home = tmp_path_factory.mktemp("lab")
    from qwen_magic.tiny import write_tiny_model

    endless = write_tiny_model(home / "endless-qwen", endless=True, context_length=2**20)  # room for a long reply
    work = home / "work"
    work.mkdir()
    shutil.copy(ROOT / "examples" / "quickstart.ipynb", work)
    stop = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell(f"%load_ext qwen_magic\n%qwen_load {endless}"),
        nbformat.v4.new_code_cell("%%qwen --max-new-tokens 500000\nWrite forever."),
        nbformat.v4.new_code_cell("%qwen_history"),
        nbformat.v4.new_code_cell(  # the reply as the conversation keeps it, rendered the same way
            "from IPython.display import Markdown\n"
            "Markdown(get_ipython().magics_manager.registry['QwenMagics'].conversation.exchanges[-1][-1]['content'])"),
    ], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(stop, work / "stop.ipynb")
    port = free_port()
    env = dict(os.environ, QWEN_MAGIC_MODEL=tiny_model_dir, JUPYTER_CONFIG_DIR=str(home / "config"),
               JUPYTER_DATA_DIR=str(home / "data"), JUPYTER_RUNTIME_DIR=str(home / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(home / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"))
    settings = home / "settings" / "@jupyterlab"
    for extension, name, value in [("apputils-extension", "notification", '{"fetchNews": "false"}'),  # no news prompt
                                   ("notebook-extension", "tracker", '{"autoStartDefaultKernel": true}')]:  # no kernel dialog
        (settings / extension).mkdir(parents=True, exist_ok=True)
        (settings / extension / f"{name}.jupyterlab-settings").write_text(value)
    log = open(home / "lab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={work}",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                log.close()
                raise RuntimeError("JupyterLab did not start:\n" + (home / "lab.log").read_text()[-3000:])
            time.sleep(0.5)
    yield url
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium
        chromium.close()


def open_notebook(browser, lab, name):
    page = browser.new_page(viewport={"width": 1280, "height": 1000}, locale="zh-CN")
    page.goto(f"{lab}/lab/workspaces/{Path(name).stem}/tree/{name}?token={TOKEN}")  # a workspace of its own
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=CELL_TIMEOUT)
    # Opened before the kernel list has arrived, JupyterLab may ask which kernel: take the notebook's own.
    page.wait_for_function(
        """() => document.querySelector('.jp-Dialog') ||
                 document.querySelector('.jp-Notebook-ExecutionIndicator')?.getAttribute('data-status') === 'idle'""",
        timeout=CELL_TIMEOUT,
    )
    if page.locator(".jp-Dialog", has_text="Select Kernel").count():
        page.locator(".jp-Dialog .jp-mod-accept").click()
    ensure_kernel(page)
    wait_idle(page)
    return page


def ensure_kernel(page):
    """The notebook has its Python kernel. A "Select Kernel" dialog shown before the kernel list arrived
    (a busy machine) offers only "No Kernel", and accepting it leaves the notebook without one: pick Python."""
    name = page.locator(".jp-NotebookPanel-toolbar .jp-Toolbar-kernelName")
    for _ in range(3):
        page.wait_for_timeout(500)
        if "No Kernel" not in (name.text_content() or ""):
            return
        if not page.locator(".jp-Dialog").count():
            name.click()
        page.wait_for_function(
            "() => [...document.querySelectorAll('.jp-Dialog select option')].some(o => /Python 3/.test(o.textContent))",
            timeout=CELL_TIMEOUT,
        )
        dialog = page.locator(".jp-Dialog")
        label = next(text for text in dialog.locator("select option").all_text_contents() if "Python 3" in text)
        dialog.locator("select").select_option(label=label)
        dialog.locator(".jp-mod-accept").click()
    assert "No Kernel" not in (name.text_content() or ""), "the notebook got no kernel"


def wait_idle(page, all_ran=False):
    """The kernel is connected and idle, no cell is queued or running ([*]) and, with ``all_ran``,
    every code cell has run ([n])."""
    try:
        page.wait_for_function(
        """(allRan) => {
            const status = document.querySelector('.jp-Notebook-ExecutionIndicator');
            const prompts = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')].map(p => p.textContent);
            const done = allRan ? prompts.every(p => /\\[\\d+\\]/.test(p)) : !prompts.some(p => p.includes('*'));
            return status && status.getAttribute('data-status') === 'idle' && done;
        }""",
        arg=all_ran,
        timeout=CELL_TIMEOUT,
    )
    except sync_api.TimeoutError:
        shot(page, "timed-out.png")
        raise


def run_menu(page, command):
    page.locator(".lm-MenuBar-item", has_text="Run").first.click()
    page.locator(f'.lm-Menu-item[data-command="{command}"]').click()


def code_cells(page):
    return page.locator(".jp-Notebook .jp-CodeCell")


def source(cell):
    return cell.locator(".jp-InputArea-editor").text_content()


def outputs(cell):
    return cell.locator(".jp-OutputArea-output")


def red_blocks(page):
    return page.locator('.jp-Notebook [data-mime-type="application/vnd.jupyter.stderr"]').count()


def shot(page, name):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / name), full_page=True)


def test_the_quickstart_runs_in_jupyterlab(browser, lab):
    page = open_notebook(browser, lab, "quickstart.ipynb")
    run_menu(page, "runmenu:run-all")
    wait_idle(page, all_ran=True)
    cells = code_cells(page)
    chats = [cells.nth(i) for i in range(cells.count()) if source(cells.nth(i)).startswith("%%qwen")]
    notebook = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    assert len(chats) == sum(c.cell_type == "code" and c.source.startswith("%%qwen") for c in notebook.cells) >= 4
    for cell in chats:
        cell.scroll_into_view_if_needed()
        assert outputs(cell).count() == 1  # one output area, updated in place
        rendered = cell.locator(".jp-OutputArea-output.jp-RenderedMarkdown")
        assert rendered.count() == 1
        assert rendered.locator("sub").last.text_content().split(" · ")[0].endswith(" tokens")  # the statistics line
    load = next(cells.nth(i) for i in range(cells.count()) if "%qwen_load" in source(cells.nth(i)))
    shown = load.locator(".jp-OutputArea").text_content()
    assert "Loaded " in shown and "Loading weights" in shown and "IProgress" not in shown
    assert red_blocks(page) == 0
    page.locator(".jp-Notebook .jp-Cell").first.scroll_into_view_if_needed()
    shot(page, "quickstart-top.png")
    chats[2].scroll_into_view_if_needed()  # 它有什么好吃的美食吗?
    shot(page, "quickstart-chat.png")
    page.close()


def test_the_stop_button_keeps_the_partial_reply(browser, lab):
    page = open_notebook(browser, lab, "stop.ipynb")
    run_menu(page, "runmenu:run-all")
    long_reply = code_cells(page).nth(1)
    markdown = long_reply.locator(".jp-OutputArea-output.jp-RenderedMarkdown")
    try:
        markdown.wait_for(state="attached", timeout=CELL_TIMEOUT)
    except sync_api.TimeoutError:
        shot(page, "timed-out.png")
        raise
    lengths = []
    while len(lengths) < 5 or lengths[-1] < 2000:  # it streams: the same single output keeps growing
        assert outputs(long_reply).count() == 1
        lengths.append(len(markdown.text_content()))
        page.wait_for_timeout(200)
    # Markdown rendered from random bytes is not monotonic in its source (a later `*` or `<` can fold text
    # away), so: it grew between most samples, and ends far longer than it began.
    grew = sum(later > earlier for earlier, later in zip(lengths, lengths[1:]))
    assert grew >= (len(lengths) - 1) / 2 and lengths[-1] > lengths[0] + 1000, lengths
    shot(page, "stop-before.png")
    pressed = time.monotonic()
    page.locator('.jp-NotebookPanel-toolbar [data-command="notebook:interrupt-kernel"]').click()
    long_reply.locator("sub", has_text="interrupted").wait_for(state="attached", timeout=20_000)
    print(f"the reply was marked interrupted {time.monotonic() - pressed:.2f} s after the stop button was pressed")
    wait_idle(page, all_ran=True)
    assert outputs(long_reply).count() == 1
    # The cell ends showing the reply as the conversation keeps it (the full decode of its tokens, so random
    # bytes may render a little differently from the streamed pieces), not cut back to a stub.
    shown = markdown.text_content()
    footer = long_reply.locator("sub").last.text_content()
    body = shown[:shown.rindex(footer)].strip()
    kept = code_cells(page).nth(3).locator(".jp-OutputArea-output.jp-RenderedMarkdown").text_content().strip()
    assert body == kept and len(body) > lengths[-1] / 2
    history = code_cells(page).nth(2).locator(".jp-OutputArea-output.jp-RenderedMarkdown").text_content()
    assert "Write forever." in history and "assistant" in history  # the partial reply stayed in the conversation
    assert red_blocks(page) == 0
    long_reply.locator("sub").last.scroll_into_view_if_needed()
    shot(page, "stop-after.png")
    page.close()
