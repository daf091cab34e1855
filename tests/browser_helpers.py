"""Helpers for the browser tests: start JupyterLab / Voilà on a free local port with throwaway
config/data/runtime dirs, launch Debian's headless Chromium through Playwright, and read the
lab's state from the page.

Servers run in their own process group and are always killed (the whole group) at teardown.
Every wait is bounded.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAKE_LAB_START = "notebooks/00_start_here.ipynb"  # the Makefile's START_PAGE
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


def chromium_path() -> str | None:
    env = os.environ.get("BNVIZ_CHROMIUM")
    for p in ((env,) if env else ()) + CHROMIUM_CANDIDATES:
        if p and Path(p).exists():
            return p
    return shutil.which("chromium")


def require_browser() -> str:
    """The Chromium path, or skip (fail when BNVIZ_REQUIRE_BROWSER=1, as in CI)."""
    reason = None
    path = chromium_path()
    if path is None:
        reason = "no Chromium found (apt-get install chromium, or set BNVIZ_CHROMIUM)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "python playwright is not installed (pip install playwright)"
    if reason:
        if os.environ.get("BNVIZ_REQUIRE_BROWSER") == "1":
            pytest.fail(f"browser tests required (BNVIZ_REQUIRE_BROWSER=1) but {reason}")
        pytest.skip(f"browser test skipped: {reason}")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_env(tmp: Path) -> dict:
    env = dict(os.environ)
    for name in ("config", "data", "runtime"):
        (tmp / name).mkdir(parents=True, exist_ok=True)
    env.update(JUPYTER_CONFIG_DIR=str(tmp / "config"), JUPYTER_DATA_DIR=str(tmp / "data"),
               JUPYTER_RUNTIME_DIR=str(tmp / "runtime"), BNVIZ_DATASET="synthetic",
               JUPYTER_PLATFORM_DIRS="1", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    env.pop("BNVIZ_FAST", None)  # the lab must wait for a click, not run its headless check
    return env


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if url.startswith("tcp://"):  # only check that the port accepts connections
                host, port = url[6:].split(":")
                with socket.create_connection((host, int(port)), timeout=2):
                    return
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"server did not answer {url} within {timeout}s:\n{log.read_text()[-3000:]}")


@contextmanager
def server(cmd: list[str], env: dict, ready_url: str, log: Path, timeout: float = 90):
    """Run a server in its own process group; kill the whole group on exit."""
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait_http(ready_url, proc, log, timeout)
        yield proc
    finally:
        _kill(proc)


def _kill(proc: subprocess.Popen) -> None:
    """Stop the server's process group, then any kernel it started in a session of its own."""
    children = []
    try:
        import psutil

        children = psutil.Process(proc.pid).children(recursive=True)
    except Exception:  # noqa: BLE001 - psutil missing or the server already gone
        pass
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
    for child in children:  # kernels run in their own session: the group kill may miss them
        try:
            child.kill()
        except Exception:  # noqa: BLE001 - already gone
            pass


@contextmanager
def jupyter_lab(tmp: Path, as_make_lab: bool = False):
    """JupyterLab on 127.0.0.1:<free port> with a token; yields the base URL (with token).
    ``as_make_lab``: the settings `make lab` gives (its default URL, the venv's overrides.json for
    the news prompt) instead of this helper's own user settings."""
    port, token = free_port(), secrets.token_hex(16)
    env = _server_env(tmp)
    settings = tmp / "settings"
    note = settings / "@jupyterlab" / "apputils-extension"
    note.mkdir(parents=True, exist_ok=True)
    if not as_make_lab:  # no "news" toast, no update check: nothing may cover the notebook
        (note / "notification.jupyterlab-settings").write_text(
            json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    # never autosave: the notebook in the repository must stay without outputs
    docs = settings / "@jupyterlab" / "docmanager-extension"
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "plugin.jupyterlab-settings").write_text(json.dumps({"autosave": False}))
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={ROOT}", f"--LabApp.user_settings_dir={settings}",
           f"--LabApp.workspaces_dir={tmp / 'workspaces'}", "--ServerApp.disable_check_xsrf=False"]
    if as_make_lab:
        cmd.append(f"--LabApp.default_url=/lab/tree/{MAKE_LAB_START}")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # containers and CI often run as root
    base = f"http://127.0.0.1:{port}"
    with server(cmd, env, f"{base}/api/status?token={token}", tmp / "jupyterlab.log") as proc:
        yield base, token, proc


@contextmanager
def voila(tmp: Path, notebook: str):
    port = free_port()
    env = _server_env(tmp)
    cmd = [sys.executable, "-m", "voila", notebook, "--no-browser", f"--port={port}", "--Voila.ip=127.0.0.1",
           "--Voila.root_dir=" + str(ROOT)]
    base = f"http://127.0.0.1:{port}"
    # (a GET of "/" would already start a kernel and run the notebook: probe the port only)
    with server(cmd, env, f"tcp://127.0.0.1:{port}", tmp / "voila.log") as proc:
        yield base, proc


@contextmanager
def chromium(path: str, width: int = 1400, height: int = 2000):
    """A headless Chromium page with a ``width`` × ``height`` window."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True)
        try:
            ctx = browser.new_context(viewport={"width": width, "height": height})
            page = ctx.new_page()
            page.set_default_timeout(30_000)
            yield page
        finally:
            browser.close()


def shot(page, name: str, **kw) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), **kw)
    return path


# ----------------------------------------------------------------------------- reading the lab

JS_CURVE = """() => {
  const gd = document.querySelector('.bnviz-lab .js-plotly-plot');
  if (!gd || !gd.data) return null;
  // the current run: loss, train acc, test acc (drawn last). _fullData holds decoded arrays; gd.data
  // may hold {dtype, bdata} objects (a figure rebuilt by the lab gets its data in the constructor)
  const cur = (gd._fullData && gd._fullData.length === gd.data.length ? gd._fullData : gd.data).slice(-3);
  const ann = ((gd.layout || {}).annotations || []).map(a => a.text);
  const shapes = ((gd.layout || {}).shapes || []).filter(s => s.yref && s.yref.endsWith('domain')).map(s => s.x0);
  const lines = gd.querySelectorAll('.scatterlayer .trace path.js-line');
  let svgPoints = 0;
  lines.forEach(p => { const d = p.getAttribute('d') || ''; svgPoints = Math.max(svgPoints, (d.match(/[LM]/g) || []).length); });
  return {points: (cur[0].x && cur[0].x.length) || 0, name: cur[0].name, annotations: ann, marks: shapes,
          svgPoints: svgPoints, title: (gd.layout.title || {}).text || ''};
}"""

JS_BARS = """() => {
  const plots = document.querySelectorAll('.bnviz-lab .js-plotly-plot');
  if (plots.length < 3) return null;
  const bars = (gd) => Array.from(gd.querySelectorAll('.barlayer .point path'))
      .filter(p => (p.getAttribute('d') || '').length > 0 && p.getAttribute('d') !== 'M0,0Z').length;
  return {params: bars(plots[1]), stats: bars(plots[2])};
}"""


JS_LAYER = """() => {
  const plots = document.querySelectorAll('.bnviz-lab .js-plotly-plot');
  if (plots.length < 3) return null;
  const sum = (a) => a ? Array.from(a).reduce((s, v) => s + (Number.isFinite(+v) ? +v : 0), 0) : 0;
  const bars = (gd) => Array.from(gd.querySelectorAll('.barlayer .point path'))
      .filter(p => (p.getAttribute('d') || '').length > 0 && p.getAttribute('d') !== 'M0,0Z').length;
  const read = (gd, axis) => {
    const fd = gd._fullData || [];
    return {n: fd.map(t => (t[axis] && t[axis].length) || 0), sig: fd.map(t => sum(t[axis]).toPrecision(12)).join(','),
            bars: bars(gd), title: (((gd._fullLayout || {}).title) || {}).text || ''};
  };
  return {params: read(plots[1], 'x'), stats: read(plots[2], 'y')};
}"""


JS_FIT = """() => {
  const lab = document.querySelector('.bnviz-lab');
  if (!lab) return null;
  const box = (el) => { const b = el.getBoundingClientRect(); return {left: b.left, right: b.right, width: b.width}; };
  // what a plot really draws: its SVG (a figure wider than its cell overflows its .js-plotly-plot div)
  const plots = Array.from(lab.querySelectorAll('.js-plotly-plot')).map(gd => {
    const svgs = Array.from(gd.querySelectorAll('svg.main-svg')).map(box);
    return {div: box(gd), right: Math.max(...svgs.map(b => b.right)), width: Math.max(...svgs.map(b => b.width))};
  });
  const out = lab.closest('.jp-OutputArea-output');
  const panel = lab.closest('.jp-NotebookPanel') || lab.closest('.jp-WindowedPanel-outer');
  const left = document.querySelector('#jp-left-stack');
  return {viewport: window.innerWidth, plots: plots, lab: box(lab),
          labOverflow: lab.scrollWidth - lab.clientWidth,
          output: out ? box(out) : null, panel: panel ? box(panel) : null,
          sidebar: left ? box(left).width : 0};
}"""


def fit(page) -> dict | None:
    """Where the lab and each plot's drawing end on the page (px from the left), the visible
    output area, the notebook panel, the viewport's width and the left sidebar's width."""
    return page.evaluate(JS_FIT)


def tick(page, description: str) -> None:
    """Click the checkbox whose label contains ``description``."""
    page.locator(f".bnviz-lab .widget-checkbox:has-text('{description}') input").first.click()


def slider_keys(page, description: str, key: str, times: int = 1) -> None:
    """Press ``key`` (e.g. 'ArrowLeft') ``times`` times on the handle of the slider labelled
    ``description`` (how a keyboard user moves a selection slider)."""
    slider = page.locator(".bnviz-lab .widget-slider", has=page.locator(f"label:text-is('{description}')")).first
    handle = slider.locator(".noUi-handle").first
    handle.focus()
    for _ in range(times):
        page.keyboard.press(key)


def readout(page, description: str) -> str:
    slider = page.locator(".bnviz-lab .widget-slider", has=page.locator(f"label:text-is('{description}')")).first
    return (slider.locator(".widget-readout").first.text_content() or "").strip()


def layer_charts(page) -> dict | None:
    """The γ/β histogram (params) and the running-vs-batch statistics chart (stats) as drawn:
    values per trace (n), a fingerprint of the values (sig), SVG bars drawn, the title."""
    return page.evaluate(JS_LAYER)


def curve(page) -> dict | None:
    return page.evaluate(JS_CURVE)


def status(page) -> str:
    return page.locator(".bnviz-lab .bnviz-status").first.text_content(timeout=10_000) or ""


def wait_for(page, fn, timeout: float, what: str, interval: float = 0.5):
    """Poll ``fn()`` (reading the page) until truthy; fail with ``what`` after ``timeout`` s."""
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        last = fn()
        if last:
            return last
        page.wait_for_timeout(int(interval * 1000))
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


def set_readout(page, description: str, value: str) -> None:
    """Type ``value`` into the editable readout of the slider labelled ``description``
    (what a learner does by clicking the number next to a slider) and press Enter."""
    slider = page.locator(".bnviz-lab .widget-slider", has=page.locator(f"label:text-is('{description}')")).first
    readout = slider.locator(".widget-readout")
    readout.click()
    page.keyboard.press("Control+A")
    page.keyboard.type(value)
    page.keyboard.press("Enter")


def select(page, description: str, label: str) -> None:
    box = page.locator(".bnviz-lab .widget-dropdown", has=page.locator(f"label:text-is('{description}')")).first
    box.locator("select").select_option(label=label)


def click_button(page, text: str) -> None:
    page.locator(f".bnviz-lab button:has-text('{text}')").first.click()


def accept_kernel_dialog(page) -> bool:
    """JupyterLab sometimes asks which kernel to start: accept its choice (the notebook's
    python3 kernel). Returns True if a dialog was dismissed."""
    dialog = page.locator(".jp-Dialog:has-text('Select Kernel')")
    if dialog.count() and dialog.first.is_visible():
        dialog.first.locator("button.jp-mod-accept").click()
        return True
    return False


def wait_kernel_idle(page, timeout: float = 90) -> None:
    """Wait until the notebook's kernel is started and idle (dismissing a kernel dialog)."""
    def idle():
        accept_kernel_dialog(page)
        ind = page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")
        bar = page.locator("#jp-main-statusbar:has-text('| Idle')")
        return ind.count() > 0 and bar.count() > 0

    wait_for(page, idle, timeout, "the kernel to be idle")


def run_all_cells(page) -> None:
    accept_kernel_dialog(page)
    page.locator(".lm-MenuBar-item:has(.lm-MenuBar-itemLabel:text-is('Run'))").click()
    page.locator(".lm-Menu-item:has(.lm-Menu-itemLabel:text-is('Run All Cells'))").first.click()
    page.wait_for_timeout(500)
    accept_kernel_dialog(page)
