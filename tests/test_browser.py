"""The lab in a real browser: JupyterLab and Voilà in headless Chromium (Playwright).

What a learner does: open notebooks/03_lab.ipynb, run all cells, press Run, move the
learning-rate slider during the run, look at the γ/β histograms, press Stop. Everything is read
back from the page (plotly's graph div and the lab's status line). Screenshots go to
test-artifacts/. Needs Debian's chromium (apt-get install chromium); skipped without it unless
BNVIZ_REQUIRE_BROWSER=1 (CI), then it fails.
"""
from __future__ import annotations

import time

import pytest

from browser_helpers import (ROOT, chromium, click_button, curve, jupyter_lab, layer_charts, require_browser,
                             run_all_cells, set_readout, shot, status, voila, wait_for, wait_kernel_idle)

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


def run_and_watch_curve(page, name: str) -> dict:
    """Set a long run (30 epochs), press Run, and check that the loss curve gains points."""
    set_readout(page, "epochs", "30")
    click_button(page, "Run")
    first = wait_for(page, lambda: (c := curve(page)) and c["points"] >= 2 and c, 150,
                     "the first points of the loss curve")
    assert "epoch 1/30" in status(page), status(page)  # the epochs typed in the page reached the kernel
    later = wait_for(page, lambda: (c := curve(page)) and c["points"] >= first["points"] + 3 and c, 90,
                     "the loss curve to gain points")
    assert later["svgPoints"] >= 2, later  # drawn in the SVG, not only in the data
    assert later["name"].startswith("▶ run") and "SYNTHETIC" in later["title"], later
    shot(page, f"{name}-running")
    return later


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
    shot(page, f"{name}-layer-charts")


def stop_and_check(page, name: str) -> None:
    click_button(page, "Stop")
    wait_for(page, lambda: state(page) == "stopped", 90, "the status to say stopped")
    assert "Stopped by the user" in page.locator(".bnviz-lab .bnviz-message").first.text_content()
    shot(page, f"{name}-stopped")


def test_lab_in_jupyterlab(chromium_path, tmp_path, notebook_guard):
    t0 = time.monotonic()
    with jupyter_lab(tmp_path) as (base, token, _proc), chromium(chromium_path) as page:
        try:
            page.goto(f"{base}/lab/tree/{NOTEBOOK}?token={token}")
            page.wait_for_selector(".jp-Notebook", timeout=90_000)
            wait_kernel_idle(page)
            page.keyboard.press("Control+b")  # hide the file browser: more room for the lab
            run_all_cells(page)
            wait_for(page, lambda: page.locator(".bnviz-lab .js-plotly-plot").count() == 3, 150,
                     "the lab's three figures")
            wait_kernel_idle(page, 120)
            page.locator(".bnviz-lab").first.scroll_into_view_if_needed()
            assert state(page) == "idle" and "no run yet" in status(page)
            shot(page, "jupyterlab-ready")

            before = run_and_watch_curve(page, "jupyterlab")

            # move the learning rate during the run: typed into the slider's readout
            set_readout(page, "learning rate", "0.3")
            marked = wait_for(page, lambda: (c := curve(page)) and "lr→0.3" in c["annotations"] and c["marks"]
                              and c, 90, "the lr change to be marked on the chart")
            assert min(marked["marks"]) > 0 and len(marked["marks"]) == 3  # one dashed line per subplot
            assert marked["points"] >= before["points"]
            msg = page.locator(".bnviz-lab .bnviz-message").first.text_content()
            assert "learning rate set to 0.3" in msg, msg

            watch_layer_charts(page, "jupyterlab")
            page.locator(".bnviz-lab").first.screenshot(path=str(ROOT / "test-artifacts" / "jupyterlab-lab.png"))

            stop_and_check(page, "jupyterlab")
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
