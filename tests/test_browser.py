"""Real-browser tests: JupyterLab in headless Chromium, and the offline HTML pages.

Run by ``make test-browser`` (which installs Debian's ``chromium`` and ``chromium-driver`` when they are
missing and sets UMV2_BROWSER=1); skipped otherwise.  For notebooks 01, 02 and 04 the test

1. starts JupyterLab on 127.0.0.1 with a random token, serving copies of the notebooks (so autosave
   never touches the checkout), smoke sizes (UMV2_SMOKE=1);
2. opens each notebook in headless Chromium, waits until the server reports its kernel idle, runs all
   cells from the Run menu (retried when no cell starts), waits for every code cell to finish,
   saves, and asserts that the saved notebook has no error output;
3. moves the first slider of the notebook's ipywidgets control one step with the keyboard and asserts
   that the figure the control draws changes;

and stops the server by its PID.  A second test opens a page written by tools/render_html.py from a
``file://`` URL and asserts that the local MathJax typeset its equations with no network request.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["01_product_key_memory", "02_tdqkr", "04_peer_ffn_values"]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1000"]
RUN_TIMEOUT_S = 420  # one notebook's cells, smoke size, on a busy 2-core machine
PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"  # the notebook tab in front (earlier tabs stay open, hidden)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(os.environ.get("UMV2_BROWSER") != "1", reason="real-browser test: run `make test-browser`"),
]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: `make test-browser` installs Debian's chromium and chromium-driver")
    return path


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = _tool("chromium")
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(_tool("chromedriver")), options=options)
    browser.set_script_timeout(60)
    try:
        yield browser
    finally:
        browser.quit()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _settings(folder: Path) -> None:
    """JupyterLab user settings for the test: every cell in the DOM, no news or update checks."""
    for plugin, values in {"@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
                           "@jupyterlab/apputils-extension/notification": {"fetchNews": "false",
                                                                            "checkForUpdates": False}}.items():
        path = folder / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """(base URL, token, served folder) of a JupyterLab server; stopped by PID afterwards."""
    served = tmp_path_factory.mktemp("served")
    for name in NOTEBOOKS:
        shutil.copy(ROOT / "notebooks" / f"{name}.ipynb", served)
    home = tmp_path_factory.mktemp("lab-home")
    _settings(home / "settings")
    token, port = os.urandom(16).hex(), _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), UMV2_SMOKE="1", OMP_NUM_THREADS="1", TQDM_DISABLE="1",
               JUPYTERLAB_SETTINGS_DIR=str(home / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
               JUPYTER_RUNTIME_DIR=str(home / "runtime"), JUPYTER_CONFIG_DIR=str(home / "config"))
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={served}",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(home / "lab.log", "w")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=served)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail("JupyterLab did not start:\n" + (home / "lab.log").read_text()[-3000:])
            time.sleep(1)
        yield base, token, served
    finally:
        os.kill(server.pid, signal.SIGTERM)  # stop the server by its PID
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
        log.close()


PROMPTS_JS = """
return Array.from(document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputPrompt'))
    .map(e => e.textContent.trim());
"""


ERRORS_JS = f"""
return Array.from(document.querySelectorAll('{PANEL} .jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'))
    .map(e => e.textContent).filter(t => t.includes('Traceback') || /\\w+Error\\b/.test(t.split('\\n')[0]));
"""


def _wait(condition, timeout: float, what: str, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def _kernel_ready(base: str, token: str, name: str) -> bool:
    """True once the server has a session for the notebook whose kernel is started and idle."""
    try:
        with urllib.request.urlopen(f"{base}/api/sessions?token={token}", timeout=5) as reply:
            sessions = json.loads(reply.read())
    except OSError:
        return False
    return any(s.get("path", "").endswith(f"{name}.ipynb") and (s.get("kernel") or {}).get("execution_state") == "idle"
               for s in sessions)


DIALOG_JS = "return Array.from(document.querySelectorAll('.jp-Dialog')).map(e => e.textContent.trim());"


def _run_all_cells(driver, name: str, served: Path, tries: int = 3) -> None:
    """Run > Run All Cells, then check that a cell started; a click that did not take is retried.

    On a slow machine the first click can land while the notebook's session is still attaching its
    kernel (JupyterLab then clears the cells and runs nothing) or behind a dialog; each retry first
    dismisses any dialog, and the last failure says what was on the screen."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    dialogs = []
    for attempt in range(tries):
        dialogs = driver.execute_script(DIALOG_JS)
        if dialogs:  # e.g. a kernel chooser opened by an earlier click: accept its default
            accept = driver.find_elements(By.CSS_SELECTOR, ".jp-Dialog .jp-mod-accept")
            (accept[0].click() if accept else driver.find_element(By.CSS_SELECTOR, "body").send_keys(Keys.ESCAPE))
            time.sleep(2)
        driver.find_element(By.CSS_SELECTOR, f"{PANEL} .jp-Notebook .jp-Cell").click()  # this notebook is current
        menu = driver.find_element(By.XPATH, "//li[contains(@class, 'lm-MenuBar-item')][.//div[text()='Run']]")
        menu.click()
        item = _wait(lambda: driver.find_elements(
            By.CSS_SELECTOR, "li[data-command='runmenu:run-all']:not(.lm-mod-disabled), "
                             "li[data-command='notebook:run-all-cells']:not(.lm-mod-disabled)"), 30,
            "the Run All Cells menu item")
        item[0].click()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(p != "[ ]:" for p in driver.execute_script(PROMPTS_JS)):  # "[*]:" queued, or already "[1]:"
                return
            time.sleep(1)
        driver.save_screenshot(str(served / f"{name}-run-all-{attempt}.png"))
    pytest.fail(f"{name}: Run All Cells started no cell after {tries} tries; dialogs on screen: {dialogs}")


def _widget_image(driver, slider):
    """The src of the image the slider's interact control shows (None while it has none)."""
    return driver.execute_script("""
        const box = arguments[0].closest('.widget-interact') || arguments[0].closest('.jupyter-widgets.widget-vbox');
        const img = box ? box.querySelector('.widget-output img') : null;
        return img ? img.getAttribute('src') : null;""", slider)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_jupyterlab_and_its_slider_redraws(driver, lab, name):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    base, token, served = lab
    driver.get(f"{base}/lab/tree/{name}.ipynb?token={token}")
    _wait(lambda: any(t.text.strip() == f"{name}.ipynb" for t in driver.find_elements(
        By.CSS_SELECTOR, "#jp-main-dock-panel .lm-TabBar-tab.lm-mod-current .lm-TabBar-tabLabel")), 120, f"{name} in front")
    _wait(lambda: driver.find_elements(By.CSS_SELECTOR, f"{PANEL} .jp-Notebook .jp-Cell"), 120, "the notebook to open")
    _wait(lambda: _kernel_ready(base, token, name), 180, f"the kernel of {name} to start")  # server side
    _wait(lambda: driver.find_elements(By.CSS_SELECTOR, f"{PANEL} .jp-Notebook-ExecutionIndicator[data-status='idle']"),
          120, "an idle kernel")
    _run_all_cells(driver, name, served)

    def finished():
        errors = driver.execute_script(ERRORS_JS)
        if errors:  # Run All stops at an error: report it now instead of waiting for the timeout
            raise AssertionError(f"{name}: a cell raised in JupyterLab:\n" + "\n".join(errors)[-3000:])
        prompts = driver.execute_script(PROMPTS_JS)
        return prompts and all(p[1:-2].isdigit() for p in prompts)  # "[12]:" everywhere, no "[*]:" or "[ ]:"

    try:
        _wait(finished, RUN_TIMEOUT_S, f"all cells of {name} to run", poll=2.0)
    except pytest.fail.Exception:
        driver.save_screenshot(str(served / f"{name}-timeout.png"))
        raise AssertionError(f"{name}: cell prompts when it stopped: {driver.execute_script(PROMPTS_JS)}") from None
    driver.find_element(By.CSS_SELECTOR, "body").send_keys(Keys.CONTROL, "s")
    saved = served / f"{name}.ipynb"

    def saved_with_outputs():
        nb = json.loads(saved.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        return nb if all(c.get("execution_count") for c in code) else None

    nb = _wait(saved_with_outputs, 60, f"{name} to be saved")
    errors = [(i, o.get("ename"), o.get("evalue")) for i, c in enumerate(nb["cells"]) for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, f"{name}: cells raised {errors}"

    sliders = _wait(lambda: driver.find_elements(By.CSS_SELECTOR, f"{PANEL} .widget-slider .noUi-handle"), 60, "a slider")
    slider = sliders[0]
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].focus();", slider)
    before = _wait(lambda: _widget_image(driver, slider), 60, "the control's first figure")
    slider.send_keys(Keys.ARROW_RIGHT)  # noUiSlider: one step up
    after = _wait(lambda: (src := _widget_image(driver, slider)) and src != before and src, 90,
                  "the figure to change after moving the slider")
    assert after != before


def test_offline_page_typesets_math_without_network(driver, tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    import build_notebooks
    import render_html

    nb = tmp_path / "01_math.ipynb"
    nb.write_text(build_notebooks.build_text(
        "# %% [markdown]\n# Inline $s_{row}[i] + s_{col}[j]$, primes $C'=\\{c'_1..c'_n\\}$ and\n"
        "# $$\\sigma_V = \\left(\\frac{0.2 k h}{k L}\\right)^{1/4}$$\n"))
    assert render_html.main([str(nb), "--out", str(tmp_path / "build"), "--no-execute"]) == 0
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.emulateNetworkConditions",  # the browser is offline from here on
                           {"offline": True, "latency": 0, "downloadThroughput": 0, "uploadThroughput": 0})
    try:
        driver.get((tmp_path / "build" / "01_math.html").as_uri())
        typeset = _wait(lambda: driver.execute_script(
            "return document.querySelectorAll('.MathJax, .MathJax_Display, .MathJax_CHTML, mjx-container').length"),
            60, "MathJax to typeset the equations")
        assert typeset >= 2
        assert driver.execute_script("return typeof MathJax !== 'undefined' && !!MathJax.Hub")
        text = driver.find_element("css selector", "body").text
        assert "$" not in text and "\\frac" not in text, "raw TeX left on the page"
        assert "Math Processing Error" not in text
    finally:
        driver.execute_cdp_cmd("Network.emulateNetworkConditions",
                               {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
