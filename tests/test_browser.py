"""The lab in a real browser: JupyterLab and Voilà in headless Chromium (Playwright).

What a learner does: open notebooks/03_lab.ipynb in a 1280×800 window, run all cells, check that
every chart fits (file browser open, then collapsed), tick *until stopped*, press Run, move the
learning-rate slider during the run, look at the γ/β histograms, press Stop, then try batch size
1 with BN and read the explanation. Everything is read back from the page (plotly's graph div,
the drawn SVG, the lab's status line and message box). Screenshots go to test-artifacts/. Needs
Debian's chromium (apt-get install chromium); skipped without it unless BNVIZ_REQUIRE_BROWSER=1
(CI), then it fails.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

try:
    from playwright.sync_api import Error as PlaywrightError
except ImportError:  # the tests skip (or fail under BNVIZ_REQUIRE_BROWSER) through require_browser
    PlaywrightError = Exception

from browser_helpers import (ROOT, chromium, click_button, curve, fit, jupyter_lab, layer_charts, readout,
                             require_browser, run_all_cells, set_readout, shot, slider_keys, status, tick, voila,
                             wait_for, wait_kernel_idle)

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

NOTEBOOK = "notebooks/03_lab.ipynb"


@pytest.fixture(scope="module")
def chromium_path():
    return require_browser()


@pytest.fixture
def notebook_guard():
    """The browser must never write outputs into the committed notebook."""
    path = ROOT / NOTEBOOK
    before = path.read_bytes()
    yield
    after = path.read_bytes()
    if after != before:
        path.write_bytes(before)
        pytest.fail(f"{NOTEBOOK} was modified by the browser session (restored)")


def state(page) -> str:
    return (page.locator(".bnviz-lab .bnviz-state").first.text_content(timeout=10_000) or "").strip()


def message(page) -> str:
    return page.locator(".bnviz-lab .bnviz-message").first.text_content(timeout=10_000) or ""


def scroll_to(locator, tries: int = 5) -> None:
    """Scroll an element into view for a screenshot. The status line and the message box are
    re-rendered at every snapshot, so the element may be replaced while Playwright scrolls:
    try again with the new one."""
    for i in range(tries):
        try:
            locator.scroll_into_view_if_needed(timeout=10_000)
            return
        except PlaywrightError:
            if i == tries - 1:
                raise
            time.sleep(0.2)


def run_and_watch_curve(page, name: str, until_stopped: bool = False) -> dict:
    """Set a long run (30 epochs, or *until stopped*), press Run, and check that the loss curve
    gains points."""
    if until_stopped:
        tick(page, "until stopped")
    else:
        set_readout(page, "epochs", "30")
    click_button(page, "Run")
    first = wait_for(page, lambda: (c := curve(page)) and c["points"] >= 2 and c, 150,
                     "the first points of the loss curve")
    # the epochs chosen in the page reached the kernel
    # (a fast machine may already be in a later epoch: any epoch number, the right total)
    expected = r"epoch \d+ \(until stopped\)" if until_stopped else r"epoch \d+/30"
    assert re.search(expected, status(page)), status(page)
    later = wait_for(page, lambda: (c := curve(page)) and c["points"] >= first["points"] + 3 and c, 90,
                     "the loss curve to gain points")
    assert later["svgPoints"] >= 2, later  # drawn in the SVG, not only in the data
    assert later["name"].startswith("▶ run") and "SYNTHETIC" in later["title"], later
    scroll_to(page.locator(".bnviz-lab .bnviz-status").first)
    page.mouse.wheel(0, 120)  # the status line, the message and the curves
    shot(page, f"{name}-running")
    return later


def check_fits(page, name: str, sidebar_open: bool) -> dict:
    """Every chart is drawn inside the visible output area and the window: its SVG's right edge
    is left of both (a figure wider than its cell is cut off at the cell's edge)."""
    def ready():
        f = fit(page)
        return f and len(f["plots"]) == 3 and all(p["width"] > 0 for p in f["plots"]) and \
            (f["sidebar"] > 100) == sidebar_open and f
    f = wait_for(page, ready, 30, f"the three charts with the file browser {'open' if sidebar_open else 'collapsed'}")
    page.wait_for_timeout(500)  # let the notebook finish its re-layout after the sidebar moved
    f = fit(page)
    limit = min(f["viewport"], f["output"]["right"], f["panel"]["right"])
    for i, p in enumerate(f["plots"]):
        assert p["right"] <= limit + 1, (f"chart {i + 1} of 3 is drawn to x={p['right']:.0f} px, beyond the "
                                         f"visible edge at {limit:.0f} px ({name}): {f}")
    assert f["plots"][-1]["right"] <= f["viewport"], f
    assert f["labOverflow"] <= 1, f"the lab is wider than its cell by {f['labOverflow']} px ({name})"
    top = "el => el.scrollIntoView({block: 'start'})"
    page.locator(".bnviz-lab .js-plotly-plot").first.evaluate(top)
    shot(page, f"{name}-curves")
    page.locator(".bnviz-lab .js-plotly-plot").nth(1).evaluate(top)
    shot(page, f"{name}-panels")
    return f


def batch_size_one_is_explained(page, name: str) -> None:
    """Batch size 1 with BN in the fc layers: the run is refused and the message box says why."""
    slider_keys(page, "batch size", "ArrowLeft", 8)  # 256 -> 1 on the powers-of-two slider
    wait_for(page, lambda: readout(page, "batch size") == "1", 30, "the batch size slider at 1")
    click_button(page, "Run")
    wait_for(page, lambda: state(page) == "error", 90, "the status to say error")
    text = message(page)
    assert "could not train. Batch size 1 with batch normalization" in text, text
    assert "LayerNorm" in text, text
    scroll_to(page.locator(".bnviz-lab .bnviz-message").first)
    shot(page, f"{name}-batch-one")


def watch_layer_charts(page, name: str) -> None:
    """During a run the γ/β histograms and the running-vs-batch statistics must show data and then
    change. (Regression: in Voilà a figure's browser model could stay deaf for the whole session
    while the curves kept moving; the lab now rebuilds such a figure, which takes up to ~10 s.)"""
    def filled():
        c = layer_charts(page)
        return c and c["params"]["n"][1] > 0 and c["params"]["n"][3] > 0 and c["stats"]["n"][0] > 0 \
            and c["stats"]["n"][1] > 0 and c["params"]["bars"] > 0 and c["stats"]["bars"] > 0 and c
    first = wait_for(page, filled, 60, "data and bars in the γ/β histograms and the statistics chart")
    assert "step" in first["params"]["title"] and "step" in first["stats"]["title"], first
    changed = wait_for(page, lambda: (c := filled()) and c["params"]["sig"] != first["params"]["sig"]
                       and c["stats"]["sig"] != first["stats"]["sig"] and c, 60,
                       "the γ/β histograms and the statistics chart to change during the run")
    assert changed["params"]["title"] != first["params"]["title"]  # a later step is named
    assert curve(page)["name"].startswith("▶ run") and state(page) in ("running", "stopping"), status(page)
    scroll_to(page.locator(".bnviz-lab .js-plotly-plot").nth(2))
    shot(page, f"{name}-layer-charts")


def stop_and_check(page, name: str) -> None:
    click_button(page, "Stop")
    wait_for(page, lambda: state(page) == "stopped", 90, "the status to say stopped")
    assert "Stopped by the user" in message(page)
    shot(page, f"{name}-stopped")


def open_and_run_lab(page, base: str, token: str, figures: str, enough) -> None:
    """Open the lab's notebook in JupyterLab, run all its cells, and wait until the figures
    matched by the CSS selector ``figures`` are drawn (``enough(count)``) and the kernel is idle."""
    page.goto(f"{base}/lab/tree/{NOTEBOOK}?token={token}")
    page.wait_for_selector(".jp-Notebook", timeout=90_000)
    wait_kernel_idle(page)
    run_all_cells(page)
    wait_for(page, lambda: enough(page.locator(figures).count()), 150, "the lab's three figures")
    wait_kernel_idle(page, 120)


def test_lab_in_jupyterlab(chromium_path, tmp_path, notebook_guard):
    t0 = time.monotonic()
    with jupyter_lab(tmp_path) as (base, token, _proc), chromium(chromium_path, 1280, 800) as page:
        try:
            open_and_run_lab(page, base, token, ".bnviz-lab .js-plotly-plot", lambda n: n == 3)
            page.locator(".bnviz-lab").first.scroll_into_view_if_needed()
            assert state(page) == "idle" and "no run yet" in status(page)

            # a 1280-px window: nothing cut off with the file browser open, nor collapsed
            check_fits(page, "jupyterlab-1280-sidebar-open", sidebar_open=True)
            page.keyboard.press("Control+b")
            check_fits(page, "jupyterlab-1280-sidebar-collapsed", sidebar_open=False)

            before = run_and_watch_curve(page, "jupyterlab", until_stopped=True)

            # move the learning rate during the run: typed into the slider's readout
            set_readout(page, "learning rate", "0.3")
            marked = wait_for(page, lambda: (c := curve(page)) and "lr→0.3" in c["annotations"] and c["marks"]
                              and c, 90, "the lr change to be marked on the chart")
            assert min(marked["marks"]) > 0 and len(marked["marks"]) == 3  # one dashed line per subplot
            assert marked["points"] >= before["points"]
            assert "learning rate set to 0.3" in message(page), message(page)

            watch_layer_charts(page, "jupyterlab")
            assert state(page) == "running" and "(until stopped)" in status(page)  # no end of its own
            stop_and_check(page, "jupyterlab")
            batch_size_one_is_explained(page, "jupyterlab")
            assert time.monotonic() - t0 < 280
        except Exception:
            shot(page, "jupyterlab-failure")
            raise


def test_lab_in_voila(chromium_path, tmp_path):
    with voila(tmp_path, NOTEBOOK) as (base, _proc), chromium(chromium_path) as page:
        try:
            page.goto(base + "/", timeout=120_000)
            wait_for(page, lambda: page.locator(".bnviz-lab .js-plotly-plot").count() == 3, 150,
                     "the lab's three figures in Voilà")
            assert state(page) == "idle"
            shot(page, "voila-ready")
            run_and_watch_curve(page, "voila")
            watch_layer_charts(page, "voila")
            stop_and_check(page, "voila")
        except Exception:
            shot(page, "voila-failure")
            raise


def test_make_lab_opens_the_start_page_unmodified_without_a_news_prompt(chromium_path, tmp_path):
    """What `make lab` gives: the URL JupyterLab prints opens 00_start_here.ipynb (not the
    Launcher); opening it does not mark it modified; no "Jupyter news" prompt (the Makefile's
    overrides.json in the venv)."""
    import sys

    overrides = Path(sys.prefix) / "share" / "jupyter" / "lab" / "settings" / "overrides.json"
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"^START_PAGE := notebooks/00_start_here.ipynb$", make, re.M)
    assert "--LabApp.default_url=/lab/tree/$(START_PAGE)" in make
    if not overrides.exists():
        pytest.skip(f"{overrides} is written by `make install`; this venv was not made by make")
    assert json.loads(overrides.read_text())["@jupyterlab/apputils-extension:notification"]["fetchNews"] == "false"
    with jupyter_lab(tmp_path, as_make_lab=True) as (base, token, proc), chromium(chromium_path, 1280, 800) as page:
        try:
            log = (tmp_path / "jupyterlab.log").read_text()
            printed = re.findall(r"http://127\.0\.0\.1:\d+(/\S*)\?token=", log)
            assert printed and printed[0] == "/lab/tree/notebooks/00_start_here.ipynb", log[-2000:]
            page.goto(f"{base}/?token={token}")  # what the printed URL's server root redirects to
            page.wait_for_selector(".jp-Notebook", timeout=90_000)
            wait_kernel_idle(page)
            tab = page.locator(".lm-DockPanel-tabBar .lm-TabBar-tab.lm-mod-current")
            assert "00_start_here.ipynb" in tab.inner_text()
            page.wait_for_timeout(8000)  # the news prompt shows a few seconds after start
            shot(page, "make-lab-start-page")
            assert page.locator("text=official Jupyter news").count() == 0, "the news prompt appeared"
            assert "jp-mod-dirty" not in (tab.get_attribute("class") or ""), "opening the start page modified it"
        except Exception:
            shot(page, "make-lab-failure")
            raise


def test_lab_display_drawing_redraws_in_jupyterlab(chromium_path, tmp_path, monkeypatch, notebook_guard):
    """The "display" drawing (Colab's default; BNVIZ_LAB_DRAWING=display here) in a real page: the
    figures are outputs re-sent through display handles from the training thread, and the page
    redraws them. (With plotly's mimetype, JupyterLab kept the first, empty picture: checked.)"""
    monkeypatch.setenv("BNVIZ_LAB_DRAWING", "display")
    with jupyter_lab(tmp_path) as (base, token, _proc), chromium(chromium_path, 1280, 1000) as page:
        try:
            open_and_run_lab(page, base, token, ".js-plotly-plot", lambda n: n >= 3)
            assert page.locator(".bnviz-lab .js-plotly-plot").count() == 0, "display drawing: figures are outputs"
            click_button(page, "Run")
            wait_for(page, lambda: state(page) == "finished", 150, "the run to finish")
            points = ("() => Math.max(0, ...Array.from(document.querySelectorAll('.js-plotly-plot'))"
                      ".flatMap(g => (g._fullData || []).map(t => (t.x || []).length)))")  # decoded arrays
            wait_for(page, lambda: page.evaluate(points) > 10, 30, "the curves to show the run's steps")
            page.locator(".js-plotly-plot").first.scroll_into_view_if_needed()
            shot(page, "jupyterlab-display-drawing", full_page=False)
        except Exception:
            shot(page, "jupyterlab-display-drawing-failure")
            raise
