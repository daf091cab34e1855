"""Google Colab: the course installed into Colab's runtime changes nothing Colab pins, and the lab
draws there.

* Unmarked (fast): :mod:`bnviz.colab` (the restart check, the drawing chosen where the lab runs,
  the custom widget manager enabled only for a FigureWidget); the lab's ``"display"`` drawing
  through a real IPython display publisher (display ids, updates, a live lr change);
  ``load_dataset`` without torchvision; the setup cells.
* ``colab``: an emulation of Colab's runtime (``tests/colab_env.py``: Colab's published versions
  of the Jupyter stack, plotly, ipywidgets, numpy, ..., with this machine's torch). The chapters'
  setup cell runs there as it does in Colab (its ``%pip install "bnviz @ git+URL"`` clones a
  snapshot of this checkout), then: no Colab package changed version, ``pip check`` finds nothing
  new, chapters 00, 01, 03 and 05 run in fast mode on Colab's ipykernel 6.17, and the lab runs
  headless with display handles (a run starts, the charts update, a live lr change lands).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import nbformat
import pytest

import colab_env
from sitebuild import site

ROOT = Path(__file__).resolve().parent.parent
NB_DIR = ROOT / "notebooks"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


# ----------------------------------------------------------------------------- fast: bnviz.colab


@pytest.fixture
def fake_colab(monkeypatch, tmp_path):
    """A stand-in google.colab in sys.modules; returns the list of enable_custom_widget_manager calls."""
    calls = []
    google, colab, output = (types.ModuleType(n) for n in ("google", "google.colab", "google.colab.output"))
    output.enable_custom_widget_manager = lambda: calls.append("enable")
    colab.output, google.colab = output, colab
    for name, mod in (("google", google), ("google.colab", colab), ("google.colab.output", output)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delenv("BNVIZ_LAB_DRAWING", raising=False)
    monkeypatch.delenv("VSCODE_PID", raising=False)
    return calls


def test_default_drawing_is_display_in_colab_and_vscode_widget_elsewhere(monkeypatch):
    from bnviz.colab import default_drawing

    monkeypatch.delenv("BNVIZ_LAB_DRAWING", raising=False)
    monkeypatch.delenv("VSCODE_PID", raising=False)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    assert default_drawing() == "widget"
    monkeypatch.setenv("VSCODE_PID", "1234")
    assert default_drawing() == "display"
    monkeypatch.setenv("BNVIZ_LAB_DRAWING", "widget")
    assert default_drawing() == "widget"
    monkeypatch.setenv("BNVIZ_LAB_DRAWING", "canvas")
    with pytest.raises(ValueError, match="BNVIZ_LAB_DRAWING='canvas' is not valid; valid: 'widget', 'display'"):
        default_drawing()


def test_default_drawing_in_colab(fake_colab):
    from bnviz.colab import default_drawing, in_colab

    assert in_colab() and default_drawing() == "display"


def test_check_runtime_passes_when_nothing_changed(capsys):
    from bnviz.colab import check_runtime

    import plotly  # noqa: F401 - loaded, and unchanged on disk

    check_runtime()
    assert "left as they were" in capsys.readouterr().out


def test_check_runtime_stops_when_a_loaded_package_changed_on_disk(monkeypatch):
    """A package the kernel imported before pip replaced it: restart needed, and the cell stops."""
    from bnviz.colab import changed_packages, check_runtime

    fake = types.ModuleType("tqdm")
    fake.__version__ = "0.0.1"  # what the running kernel loaded; tqdm's metadata on disk says otherwise
    monkeypatch.setitem(sys.modules, "tqdm", fake)
    assert [d for d, *_ in changed_packages()] == ["tqdm"]
    with pytest.raises(SystemExit, match=r"tqdm 0\.0\.1 -> .*Runtime -> Restart session.*Stopped here"):
        check_runtime()


def test_check_runtime_compares_versions_not_strings(monkeypatch):
    from importlib.metadata import version

    from bnviz.colab import changed_packages

    fake = types.ModuleType("tqdm")
    fake.__version__ = version("tqdm") + ".0" if version("tqdm").count(".") < 3 else version("tqdm")
    monkeypatch.setitem(sys.modules, "tqdm", fake)  # "4.67.1.0" == "4.67.1" as versions
    assert changed_packages() == []


def test_custom_widget_manager_only_for_figurewidgets(fake_colab):
    """In Colab, the lab with FigureWidgets enables Colab's custom widget manager; the display
    drawing (core widgets and plain outputs only) never does."""
    from bnviz.dashboard import show_lab

    show_lab(drawing="display", dataset="synthetic", train_size=256, test_size=128, epochs=1, device="cpu")
    assert fake_colab == []
    show_lab(drawing="widget", dataset="synthetic", train_size=256, test_size=128, epochs=1, device="cpu")
    assert fake_colab and set(fake_colab) == {"enable"}  # anywidget (plotly >= 6) may enable it too


def test_no_setup_cell_enables_the_custom_widget_manager():
    """The setup cells install only; what needs Colab's custom widget manager enables it itself."""
    for path in site.chapters():
        first = next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
        assert "enable_custom_widget_manager" not in first.source, path.name
        assert "check_runtime()" in first.source and "--no-deps d2l==1.0.3" in first.source, path.name


def test_a_bad_drawing_is_refused_before_anything_is_built():
    from bnviz.dashboard import Lab

    with pytest.raises(ValueError, match=r"drawing='canvas'; valid: 'widget', 'display'"):
        Lab(drawing="canvas", dataset="synthetic", train_size=256)


# ----------------------------------------------------------------------------- fast: the display drawing


@pytest.fixture
def shell():
    """A real IPython shell whose display publisher records every display and update."""
    from IPython.core.displaypub import CapturingDisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell

    sh = InteractiveShell.instance()
    old = sh.display_pub
    sh.display_pub = CapturingDisplayPublisher()
    yield sh
    sh.display_pub = old


def _plotly(output) -> dict:
    """{"data", "layout"} of a figure sent as HTML (Plotly.newPlot(id, data, layout, config))."""
    html = output["data"]["text/html"]
    start = html.index("[", html.index("Plotly.newPlot("))
    dec = json.JSONDecoder()
    data, end = dec.raw_decode(html[start:])
    rest = html[start + end:]
    layout, _ = dec.raw_decode(rest[rest.index("{"):])
    return {"data": data, "layout": layout}


def test_display_drawing_updates_the_charts_through_display_handles(shell):
    from bnviz.dashboard import show_lab

    lab = show_lab(drawing="display", dataset="synthetic", train_size=2000, test_size=500, epochs=3,
                   batch_size=64, pace="fast", device="cpu", min_interval=0.05)
    outs = shell.display_pub.outputs
    shown = [o for o in outs if (o.get("transient") or {}).get("display_id")]
    assert len(shown) == 3, "curves, γ/β and statistics: one output each, with a display id"
    ids = {o["transient"]["display_id"] for o in shown}
    # plotly.js goes on the page once (before the figures); no figure output carries it again
    big = [o for o in outs if len(str(o["data"])) > 200_000]
    assert len(big) <= 1 and (not big or outs.index(big[0]) < outs.index(shown[0])), [len(str(o["data"])) for o in outs]

    h = lab.run_clicked()
    deadline = time.monotonic() + 120
    while not h.steps and time.monotonic() < deadline:
        time.sleep(0.05)
    lab.w_lr.value = 0.3  # the slider, moved during the run
    lab.wait(300)
    assert h.status == "finished", h.message
    assert [(c.name, c.new) for c in h.changes] == [("lr", 0.3)], "the live change landed"

    updates = [o for o in outs if o.get("update")]
    assert updates and {o["transient"]["display_id"] for o in updates} <= ids
    assert all(len(str(o["data"])) < 200_000 and "Plotly.newPlot" in o["data"]["text/html"] for o in updates)
    assert lab.view.updates == len(updates) >= 3
    last_curves = [o for o in updates if o["transient"]["display_id"] == shown[0]["transient"]["display_id"]][-1]
    fig = _plotly(last_curves)
    loss = fig["data"][lab._slots[-1][0]]
    assert _length(loss["x"]) == len(h.steps), "the last curves sent show every step of the run"
    marks = [s for s in fig["layout"]["shapes"] if s.get("line", {}).get("dash") == "dash"]
    assert marks and marks[0]["x0"] == h.changes[0].step, "the lr change is marked where it happened"
    gamma = _plotly([o for o in updates if o["transient"]["display_id"] == shown[1]["transient"]["display_id"]][-1])
    assert _length(gamma["data"][1]["x"]) == 120, "γ of fc1 (120 channels) at the last snapshot"


def test_display_drawing_in_colab_sends_colab_html(shell, fake_colab):
    from bnviz.dashboard import show_lab

    lab = show_lab(dataset="synthetic", train_size=256, test_size=128, epochs=1, device="cpu")
    assert lab.drawing == "display" and fake_colab == []
    shown = [o for o in shell.display_pub.outputs if (o.get("transient") or {}).get("display_id")]
    assert len(shown) == 3
    for o in shown:
        assert set(o["data"]) == {"text/html"} and "Plotly.newPlot" in o["data"]["text/html"]


# ----------------------------------------------------------------------------- fast: data without torchvision


def test_auto_data_falls_back_to_the_stand_in_when_torchvision_cannot_be_imported(monkeypatch, tmp_path):
    from bnviz import data

    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision -> ImportError
    monkeypatch.setattr(data, "_auto_failed", set())
    with pytest.warns(UserWarning, match=r"Fashion-MNIST is not available \(torchvision cannot be imported"):
        ds = data.load_dataset("auto", train_size=64, test_size=32, root=tmp_path)
    assert ds.name == "synthetic" and len(ds.train_x) == 64
    with pytest.raises(data.DataUnavailable, match="torchvision cannot be imported.*BNVIZ_DATASET=synthetic"):
        data.load_dataset("fashion-mnist", root=tmp_path)


# ----------------------------------------------------------------------------- emulated Colab runtime

COLAB_CHAPTERS = ("00_start_here.ipynb", "01_batch_norm_from_scratch.ipynb", "03_lab.ipynb", "05_optimisation.ipynb")


@pytest.fixture(scope="module")
def colab(tmp_path_factory):
    """The emulated runtime: its python, a kernelspec, a git redirect to a snapshot of this
    checkout, and the pip state before the course is installed."""
    python = colab_env.colab_venv()
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", "bnviz", "d2l"], capture_output=True)
    where = tmp_path_factory.mktemp("colab")
    kernel = colab_env.kernel_spec(python, where)
    repo = colab_env.snapshot_repo(where / "repo")
    gitconfig = where / "gitconfig"
    url = site.project_urls()["Repository"]
    gitconfig.write_text(f'[url "file://{repo}"]\n\tinsteadOf = {url}\n')
    before = colab_env.installed(python)
    check_before = subprocess.run([str(python), "-m", "pip", "check"], capture_output=True, text=True).stdout
    env = {"JUPYTER_PATH": str(where), "GIT_CONFIG_GLOBAL": str(gitconfig), "BNVIZ_FAST": "1",
           "BNVIZ_DATASET": "synthetic", "MPLBACKEND": "Agg", "BNVIZ_COLAB_STANDIN_LOG": str(where / "standin.log"),
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    os.environ.pop("PYTHONPATH", None)  # the emulated kernel must import the installed bnviz, not this checkout
    (where / "standin.log").write_text("")
    yield dict(python=python, kernel=kernel, before=before, check_before=check_before, log=where / "standin.log",
               where=where)
    for k, v in old.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _run(nb, colab, cwd: Path, timeout: int = 600):
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    client = NotebookClient(nb, timeout=timeout, kernel_name=colab["kernel"], resources={"metadata": {"path": str(cwd)}})
    try:
        client.execute()
    except CellExecutionError as err:
        pytest.fail(ANSI.sub("", str(err))[-4000:], pytrace=False)
    return nb


def _newplot_data(html: str) -> list:
    """The traces a plotly HTML output draws (the list passed to Plotly.newPlot)."""
    start = html.index("[", html.index("Plotly.newPlot("))
    return json.JSONDecoder().raw_decode(html[start:])[0]


def _length(x) -> int:
    """Points in a trace's x: a list, or plotly 6's typed array {"dtype", "bdata"}."""
    if isinstance(x, dict):
        import base64

        import numpy as np

        return len(np.frombuffer(base64.b64decode(x["bdata"]), dtype=x["dtype"]))
    return len(x)


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


@pytest.mark.colab
@pytest.mark.timeout(1800)
def test_setup_cell_installs_the_course_and_changes_nothing_colab_pins(colab):
    setup = site.setup_cell_source()
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell(setup),
        nbformat.v4.new_code_cell("import bnviz, d2l, sys; from d2l import torch as d2l_torch\n"
                                  "print('BNVIZ', bnviz.__file__, 'COLAB', 'google.colab' in sys.modules)")])
    _run(nb, colab, colab["where"])
    out = _text(nb.cells[0]) + _text(nb.cells[1])
    assert "left as they were (no restart needed)" in out, out
    assert "COLAB True" in out and "site-packages/bnviz/__init__.py" in out, out

    after = colab_env.installed(colab["python"])
    pins = colab_env.colab_pins()
    changed = {n: (v, after.get(n)) for n, v in colab["before"].items() if after.get(n) != v}
    assert changed == {}, f"installing the course changed packages of the runtime: {changed}"
    colab_pinned = sorted(n for n in colab["before"] if n in pins and not n.startswith(colab_env.NOT_PINNED))
    assert {"ipython", "ipykernel", "jupyter-client", "traitlets", "notebook", "ipywidgets", "plotly",
            "anywidget", "numpy"} <= set(colab_pinned)
    assert all(colab["before"][n] == pins[n] for n in colab_pinned), "the emulation holds Colab's versions"
    added = sorted(set(after) - set(colab["before"]))
    assert "bnviz" in added and "d2l" in added
    print("added by the setup cell:", added)  # new packages are allowed; changed ones are not
    check_after = subprocess.run([str(colab["python"]), "-m", "pip", "check"], capture_output=True, text=True).stdout
    new_problems = set(check_after.splitlines()) - set(colab["check_before"].splitlines())
    # d2l's own 2023 pins are why it is installed --no-deps (README): pip check reports them, as expected
    assert not [p for p in new_problems if not p.startswith("d2l 1.0.3 ")], \
        f"pip check after the install: {sorted(new_problems)}"
    assert any("numpy==1.23.5" in p for p in new_problems), "d2l is installed without its pins"


@pytest.mark.colab
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("name", COLAB_CHAPTERS)
def test_chapter_runs_in_emulated_colab(colab, name, tmp_path):
    """Each chapter as a Colab user runs it: its setup cell takes the Colab branch (installs, checks
    the runtime), then every cell in fast mode on Colab's ipykernel 6.17 / IPython 7.34."""
    nb = nbformat.read(NB_DIR / name, as_version=4)
    colab["log"].write_text("")
    _run(nb, colab, NB_DIR)
    setup_out = _text(next(c for c in nb.cells if c.cell_type == "code"))
    assert "no restart needed" in setup_out, setup_out
    assert colab["log"].read_text() == "", f"{name} enabled Colab's custom widget manager without a custom widget"
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
               if o.get("output_type") in ("display_data", "execute_result")]
    assert not [o for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})], \
        "a figure used plotly's mimetype, which Colab does not render: it must go through Colab's renderer"
    if name == "05_optimisation.ipynb":
        assert [o for o in outputs if "Plotly.newPlot" in o.get("data", {}).get("text/html", "")], \
            "05's figures, drawn by plotly's Colab renderer"
    nbformat.write(nb, tmp_path / name)


LAB_DRIVER = '''\
import time, json
from bnviz.dashboard import show_lab
lab = show_lab(dataset="synthetic", train_size=2000, test_size=500, epochs=3, batch_size=64, pace="fast",
               device="cpu", min_interval=0.05)
h = lab.run_clicked()
t0 = time.monotonic()
while not h.steps and time.monotonic() - t0 < 120:
    time.sleep(0.05)
lab.w_lr.value = 0.3
lab.wait(300)
print("RESULT", json.dumps(dict(drawing=lab.drawing, status=h.status, steps=len(h.steps),
      changes=[[c.name, c.new, c.step] for c in h.changes], updates=lab.view.updates, loss_trace=lab._slots[-1][0])))
'''


@pytest.mark.colab
@pytest.mark.timeout(900)
def test_lab_runs_in_emulated_colab_with_display_handles(colab):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(site.setup_cell_source()),
                                         nbformat.v4.new_code_cell(LAB_DRIVER),
                                         nbformat.v4.new_code_cell(
                                             "from bnviz.dashboard import show_lab\n"
                                             "w = show_lab(drawing='widget', dataset='synthetic', train_size=256)")])
    colab["log"].write_text("")
    _run(nb, colab, colab["where"])
    line = next(ln for ln in _text(nb.cells[1]).splitlines() if ln.startswith("RESULT"))
    r = json.loads(line.removeprefix("RESULT "))
    assert r["drawing"] == "display" and r["status"] == "finished", r
    assert [c[:2] for c in r["changes"]] == [["lr", 0.3]], r
    assert r["updates"] >= 3, r
    # nbclient applied every update_display_data to the outputs: the curves shown are the last ones sent
    html = [o for o in nb.cells[1].outputs if o.get("output_type") == "display_data" and "text/html" in o["data"]]
    assert len(html) == 3 and all("Plotly.newPlot" in o["data"]["text/html"] for o in html)
    traces = _newplot_data(html[0]["data"]["text/html"])
    assert _length(traces[r["loss_trace"]]["x"]) == r["steps"], "the curves on the page show every step of the run"
    # the widget drawing, asked for explicitly, enables Colab's custom widget manager
    calls = colab["log"].read_text().split()
    assert calls and set(calls) == {"enable_custom_widget_manager"}


def test_chapters_store_the_kernel_metadata_the_course_kernel_reports():
    """JupyterLab marks a notebook modified when the kernel's kernelspec/language_info differ
    from the file's; `make lab`'s kernel (bnviz.kernel) reports exactly what the chapters store,
    with no Python version in it (tests/test_browser.py opens one in JupyterLab)."""
    from bnviz.kernel import KERNELSPEC, LANGUAGE_INFO, kernel_json

    for path in site.chapters():
        meta = json.loads(path.read_text())["metadata"]
        assert meta["kernelspec"] == KERNELSPEC and meta["language_info"] == LANGUAGE_INFO, path.name
    spec = kernel_json("/x/python")
    assert spec["argv"][:3] == ["/x/python", "-m", "bnviz.kernel"] and spec["display_name"] == KERNELSPEC["display_name"]
    assert "version" not in LANGUAGE_INFO


def test_lab_in_plain_python_prints_no_figure_json():
    """Without IPython there is no page: the lab trains and keeps its runs, and prints nothing
    (neither the widgets' repr nor a figure's JSON). In a fresh process: this one has a shell."""
    code = """
from bnviz.dashboard import show_lab
for drawing in ("display", "widget"):
    lab = show_lab(drawing=drawing, dataset="synthetic", train_size=256, test_size=128, epochs=1, device="cpu")
    h = lab.run_clicked(); lab.wait(300)
    assert h.status == "finished" and lab.histories == [h], h.message
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == "", proc.stdout[:500]
