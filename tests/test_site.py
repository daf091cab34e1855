"""The course site (site/build.py), the replay of a lab run (bnviz.lab_charts.replay), and the one
place the repository URL lives (pyproject's [project.urls]).

* Unmarked: the replay against the History it was made from; the setup-cell sync tool on copies
  of the notebooks; every chapter's setup cell equals what the tool generates.
* ``site``: builds the site in fast mode (``BNVIZ_FAST=1``; the chapters come from the execution
  cache that tests/test_notebooks.py fills, else they run here) and reads it: every page there,
  no address outside the site loaded by any page (it must work offline), no broken internal link
  or anchor, each assignment's page without solutions or hidden tests; then headless Chromium
  (Playwright, Debian's chromium) opens every page: no console error, no request that leaves
  the site, each chapter's figures drawn, the replay plays, search finds a word, and on a phone's
  width nothing makes the page scroll sideways; at the 688-px column and at 390 px every figure's
  title, legend and controls sit inside it and off its plot areas, no code block on 01 and 05
  scrolls sideways, and no chapter shows its setup cell, a raw warning or test scaffolding.
  Screenshots go to test-artifacts/.
"""
from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nbformat
import numpy as np
import pytest

from sitebuild import site
from bnviz.course import REPO_URL
from bnviz.history import load_histories, save_histories

ROOT = Path(__file__).resolve().parent.parent
CHAPTER_PAGES = [p.stem + ".html" for p in site.chapters()]
ASSIGNMENT_PAGES = [a.page + ".html" for a in site.ASSIGNMENTS]
PAGES = ["index.html", *CHAPTER_PAGES, *ASSIGNMENT_PAGES, "questions.html", "run-locally.html"]


# ----------------------------------------------------------------------------- the URL, once


def test_repository_url_is_set_once_in_pyproject():
    urls = site.project_urls()
    assert urls["Repository"] == REPO_URL, "bnviz.course.REPO_URL must equal pyproject's [project.urls] Repository"
    links = site.links("03_lab.ipynb", urls)
    owner_name = urls["Repository"].removeprefix("https://github.com/")
    assert links["Open in Colab"] == (f"https://colab.research.google.com/github/{owner_name}/blob/main/"
                                      "notebooks/03_lab.ipynb")
    assert f'"bnviz @ git+{urls["Repository"]}"' in site.setup_cell_source(urls)


@pytest.mark.parametrize("path", site.chapters(), ids=lambda p: p.name)
def test_setup_cell_is_generated_from_pyproject(path):
    """Run `python site/build.py sync-setup-cells` after changing the URL or the template."""
    first = next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
    assert first.source == site.setup_cell_source(), (
        f"{path.name}: its setup cell is not the one generated from pyproject.toml; run "
        "`.venv/bin/python site/build.py sync-setup-cells`")


def test_sync_rewrites_only_the_setup_cell(tmp_path):
    copies = [Path(shutil.copy2(p, tmp_path / p.name)) for p in site.chapters()]
    before = {p.name: nbformat.read(p, as_version=4) for p in copies}
    stale = copies[0]
    nb = nbformat.read(stale, as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    first.source = first.source.replace("d2l==1.0.3", "d2l==0.17")
    nbformat.write(nb, stale)
    assert stale.name in site.sync_setup_cells(check=True, paths=copies)
    assert "d2l==0.17" in stale.read_text(), "--check must not write"
    site.sync_setup_cells(paths=copies)
    assert site.sync_setup_cells(check=True, paths=copies) == []  # idempotent: nothing left to do
    for p in copies:
        after = nbformat.read(p, as_version=4)
        code = [i for i, c in enumerate(after.cells) if c.cell_type == "code"]
        assert after.cells[code[0]].source == site.setup_cell_source()
        others = [(c.cell_type, c.source) for i, c in enumerate(after.cells) if i != code[0]]
        assert others == [(c.cell_type, c.source) for i, c in enumerate(before[p.name].cells) if i != code[0]]


def test_a_prose_edit_reuses_the_executed_chapter_and_a_code_edit_does_not(tmp_path):
    """The execution cache: editing a markdown cell keeps the key (the cached outputs are reused
    and show the new prose); editing a code cell, moving a prose cell, or another bnviz source
    changes it."""
    ctx = {"sizes": "cpu", "dataset": "SYNTHETIC", "machine": "m", "source": "s"}
    path = tmp_path / "05_x.ipynb"
    shutil.copy2(site.chapters()[5], path)
    key = site.cache_key(path, ctx)
    executed = nbformat.read(path, as_version=4)
    code = next(c for c in executed.cells[1:] if c.cell_type == "code" and c.source.strip())
    code.outputs = [nbformat.v4.new_output("stream", text="measured 0.123\n")]
    nb = nbformat.read(path, as_version=4)
    prose = next(i for i, c in enumerate(nb.cells) if c.cell_type == "markdown")
    nb.cells[prose].source += "\n\nA sentence added later."
    nbformat.write(nb, path)
    assert site.cache_key(path, ctx) == key
    shown = site.with_current_prose(executed, path)
    assert shown.cells[prose].source.endswith("A sentence added later.")
    assert "measured 0.123" in json.dumps(shown.cells[executed.cells.index(code)].outputs)
    assert site.cache_key(path, {**ctx, "source": "another"}) != key
    nb.cells.insert(prose + 1, nb.cells.pop(prose))  # the prose cell moved below a code cell
    nbformat.write(nb, path)
    assert site.cache_key(path, ctx) != key
    with pytest.raises(ValueError, match="do not line up"):
        nb.cells.append(nbformat.v4.new_markdown_cell("one more"))
        nbformat.write(nb, path)
        site.with_current_prose(executed, path)
    nb = nbformat.read(site.chapters()[5], as_version=4)
    next(c for c in nb.cells[1:] if c.cell_type == "code").source += "\nx = 1"
    nbformat.write(nb, path)
    assert site.cache_key(path, ctx) != key


def test_vertical_line_labels_are_stacked_and_the_checkouts_path_is_not_shown():
    """Two labelled vertical lines (05's max lr of each model) get labels one below the other on
    the site (at 390 px they printed over each other); a printed path inside the building machine's
    checkout is shown relative to it."""
    import plotly.graph_objects as go

    fig = go.Figure(go.Scatter(x=[0.1, 1, 10], y=[0.2, 0.5, 0.9], name="a"))
    fig.add_vline(x=1, annotation_text="max lr A: 1")
    fig.add_vline(x=3, annotation_text="max lr B: 3")
    fig.add_hline(y=0.1, annotation_text="chance")
    web, _ = site.web_figure(fig.to_plotly_json())
    shifts = {a["text"]: a.get("yshift") or 0 for a in web["layout"]["annotations"]}
    assert shifts["max lr A: 1"] != shifts["max lr B: 3"] and shifts["chance"] == 0, shifts
    out = nbformat.v4.new_output("stream", text=f"note: Fashion-MNIST is not in {ROOT}/data/FashionMNIST/raw yet.\n")
    shown = site._web_output(out)["text"]
    assert str(ROOT) not in shown and "not in data/FashionMNIST/raw yet" in shown


def test_no_chapter_depends_on_the_grader():
    """The cache key leaves bnviz/grading/ out of the source hash: no chapter and no other bnviz
    module may import it."""
    pattern = re.compile(r"\b(bnviz\.grading|from \.+grading|from bnviz import grading|from \. import grading)\b")
    for path in site.chapters():
        code = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
        assert not pattern.search(code), path.name
    for path in (ROOT / "bnviz").glob("*.py"):
        assert not pattern.search(path.read_text()), path.name


@pytest.mark.parametrize("path", site.chapters(), ids=lambda p: p.name)
def test_the_site_hides_setup_warnings_and_the_labs_scaffolding(path):
    """Cell tags myst-nb honours, added at staging (the notebooks keep every cell)."""
    nb = nbformat.read(path, as_version=4)
    web = site.site_notebook(nb, path.name, site.project_urls())
    tags = lambda c: c.get("metadata", {}).get("tags", [])  # noqa: E731
    code = [c for c in web.cells if c.cell_type == "code"]
    assert code[0].source == site.setup_cell_source() and "remove-cell" in tags(code[0])
    assert all("remove-stderr" in tags(c) for c in code)
    shown = [c for c in web.cells if "remove-cell" not in tags(c)]
    assert not any("google.colab" in c.source for c in shown)
    assert nb.cells[0].get("metadata", {}).get("tags") is None or "remove-cell" not in nb.cells[0].metadata.tags
    if path.name.startswith("03_"):
        assert not any(c.cell_type == "code" and "assert " in c.source for c in shown), "test scaffolding published"
        assert not any(c.source.lstrip().startswith(site.LAB_CHECK_NOTE) for c in shown)
        session = [c for c in code if "replay(runs)" in c.source or "for h in lab.histories" in c.source]
        assert len(session) == 2 and all("remove-output" in tags(c) for c in session)
    else:
        assert len(shown) == len(web.cells) - 1  # only the setup cell is hidden


def test_a_chapters_own_figure_and_printed_banner_are_made_web_ready():
    """A figure a chapter lays out itself (as 00 and 04 do: the data set in the title, plotly's
    legend at the right) gets bnviz.figures' layout on the site; a row of '!' is dropped from
    printed output. (Both shown on a 390-px phone by the Chromium tests below.)"""
    import plotly.graph_objects as go

    label = "SYNTHETIC data (not Fashion-MNIST)"
    fig = go.Figure([go.Scatter(x=[1, 2], y=[0.3, 0.5], name="moving averages (eval mode)"),
                     go.Scatter(x=[1, 2], y=[0.4, 0.6], name="recomputed on 2,000 images")])
    fig.update_layout(height=360, title=f"Running estimates vs the true mean of one channel ({label})")
    web, wide = site.web_figure(fig.to_plotly_json())
    title = web["layout"]["title"]["text"]
    lines = title.split("<br>")
    assert title.count(label) == 1 and lines[-1] == f"<sup>data: {label}</sup>", title
    assert all(len(line) <= 38 for line in lines[:-1]) and "(" not in lines[-2], title
    assert web["layout"]["legend"]["yref"] == "container" and web["layout"]["legend"]["orientation"] == "h"
    assert not wide and web["layout"]["height"] >= 360
    done = site.web_figure(web)[0]
    assert done["layout"]["title"]["text"] == title  # bnviz.figures' own figures are left as they are
    out = nbformat.v4.new_output("stream", name="stdout", text="a\n" + "!" * 78 + "\nSYNTHETIC note\n" + "!" * 78 + "\n")
    assert site._web_output(out)["text"] == "a\nSYNTHETIC note\n"


def test_a_url_that_colab_cannot_open_is_refused(tmp_path):
    bad = tmp_path / "pyproject.toml"
    bad.write_text('[project]\nname = "x"\n[project.urls]\nRepository = "https://gitlab.com/a/b.git"\n')
    with pytest.raises(ValueError, match="Repository.*not valid.*github.com/OWNER/NAME"):
        site.project_urls(bad)


# ----------------------------------------------------------------------------- the replay


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory):
    """A real (tiny) run of the lab's trainer with the lr moved from 1.0 to 0.2 mid-run, saved."""
    from bnviz.config import Config
    from bnviz.data import make_synthetic
    from bnviz.train import Trainer

    cfg = Config(train_size=256, test_size=128, epochs=3, batch_size=32, snapshot_every=2, lr=1.0, seed=3)
    trainer = Trainer(cfg, data=make_synthetic(256, 128, seed=2))

    class Lower:
        def on_snapshot(self, tr, snap):
            if snap.step >= 12 and not tr.history.changes:
                tr.live.set(lr=0.2)

    trainer.callbacks.append(Lower())
    h = trainer.fit()
    path = save_histories([h], tmp_path_factory.mktemp("runs") / "bnviz_runs.json", mode="overwrite")
    return path, h


def _frame_values(fig, k: int) -> dict:
    fr = fig.frames[k]
    return {i: d for i, d in zip(fr.traces, fr.data)}


def test_replay_frames_follow_the_saved_run(lab_run):
    from bnviz.lab_charts import replay

    path, h = lab_run
    fig = replay(path, layer="fc1")
    (saved,) = load_histories(path)
    snaps = [s for s in saved.snapshots if "fc1" in s.layers]
    assert len(fig.frames) == len(snaps) >= 10
    assert len(fig.layout.sliders[0].steps) == len(fig.frames)
    assert [b.label for b in fig.layout.updatemenus[0].buttons][0].endswith("Play")
    for k in (0, len(snaps) // 2, len(snaps) - 1):
        s, v = snaps[k], _frame_values(fig, k)
        steps_so_far = [p.step for p in saved.snapshots[:saved.snapshots.index(s) + 1] if p.kind == "step"]
        assert list(v[0].x) == steps_so_far  # the loss curve grows frame by frame
        np.testing.assert_allclose(np.asarray(v[4].x, float), s.layers["fc1"].gamma)  # γ now
        np.testing.assert_allclose(np.asarray(v[8].y, float), s.layers["fc1"].batch_mean)  # batch mean
        np.testing.assert_allclose(np.asarray(v[9].y, float), s.layers["fc1"].running_var)  # running var
        assert f"step {s.step} " in fr_title(fig, k) and f"lr {s.lr:.3g}" in fr_title(fig, k)
    np.testing.assert_allclose(np.asarray(fig.data[3].x, float), snaps[0].layers["fc1"].gamma)  # γ at the start
    (change,) = h.changes
    assert (change.name, change.old, change.new) == ("lr", 1.0, 0.2)
    marks = [sh for sh in fig.layout.shapes if sh.x0 == change.step and sh.line.dash == "dash"]
    assert len(marks) == 3, "the lr change is marked on the three curve panels"
    assert any(a.text == "lr→0.2" for a in fig.layout.annotations)
    assert "SYNTHETIC" in fig.layout.title.text


def fr_title(fig, k: int) -> str:
    return fig.frames[k].layout.title.text


def test_replay_keeps_the_change_when_it_thins_frames(lab_run):
    from bnviz.lab_charts import replay

    path, h = lab_run
    fig = replay(h, max_frames=5)
    steps = [int(s.label) for s in fig.layout.sliders[0].steps]
    assert len(steps) <= 7 and steps[0] == h.snapshots[0].step and steps[-1] == h.snapshots[-1].step
    assert any(s >= h.changes[0].step for s in steps) and any(s < h.changes[0].step for s in steps)


def test_replay_refuses_what_it_cannot_play(lab_run, tmp_path):
    from bnviz.lab_charts import replay

    path, h = lab_run
    with pytest.raises(ValueError, match="not a file"):
        replay(tmp_path / "missing.json")
    (tmp_path / "other.json").write_text(json.dumps({"some": "thing"}))
    with pytest.raises(ValueError, match="not a bnviz history file"):
        replay(tmp_path / "other.json")
    with pytest.raises(ValueError, match=r"out of range; valid: 0\.\.0"):
        replay(path, run=3)
    with pytest.raises(ValueError, match="matches no run"):
        replay(path, run="nope")
    with pytest.raises(ValueError, match=r"not a normalisation layer.*'conv1'"):
        replay(path, layer="fc9")
    with pytest.raises(ValueError, match="max_frames"):
        replay(path, max_frames=1)
    with pytest.raises(ValueError, match="file path, a History"):
        replay(42)


# ----------------------------------------------------------------------------- the built site


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.ids = [], set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        if a.get("name") and tag == "a":
            self.ids.add(a["name"])
        for key in ("href", "src"):
            if a.get(key) and not (tag == "link" and a.get("rel") in ("canonical",)):
                self.refs.append((tag, key, a[key]))


@functools.lru_cache(maxsize=None)
def _parse(path: Path) -> _Links:
    p = _Links()
    p.feed(path.read_text(errors="replace"))
    return p


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The site, built in fast mode on the synthetic data (as CI does), in a temporary folder;
    or, with ``BNVIZ_SITE_DIR=_build/site``, a site already built (e.g. by ``make site``)."""
    if os.environ.get("BNVIZ_SITE_DIR"):
        return Path(os.environ["BNVIZ_SITE_DIR"]).resolve()
    out = tmp_path_factory.mktemp("site") / "site"
    env = dict(os.environ, BNVIZ_FAST="1", BNVIZ_DATASET="synthetic", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(ROOT / "site" / "build.py"), "build", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, f"site build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return out


@pytest.mark.site
@pytest.mark.timeout(1800)
def test_every_page_is_built_and_states_its_run(built):
    for page in PAGES + ["search.html", "notebooks/00_start_here.ipynb", "bnviz_runs.json",
                         *(a.zip_name for a in site.ASSIGNMENTS), "_static/plotly.min.js", "_static/mathjax/tex-chtml.js"]:
        assert (built / page).is_file(), f"{page} is missing from the site"
    urls = site.project_urls()
    for page in CHAPTER_PAGES:
        text = (built / page).read_text()
        assert re.search(r"real run on <strong>SYNTHETIC data \(not Fashion-MNIST\)</strong>, on <strong>a \d+-core "
                         r"CPU.*</strong>, on <strong>\d{4}-\d\d-\d\d \d\d:\d\d UTC</strong>.*"
                         + (r"(FAST MODE|the CPU sizes|the full \(GPU\) sizes)" if os.environ.get("BNVIZ_SITE_DIR")  # make site's own
                            else "FAST MODE"), text), page
        colab = site.links(page[:-5] + ".ipynb", urls)["Open in Colab"]
        assert f'href="{colab}"' in text and 'href="notebooks/' + page[:-5] + '.ipynb"' in text, page
        assert 'href="run-locally.html"' in text, page
    assert f'href="{urls["Repository"]}"' in (built / "run-locally.html").read_text()


@pytest.mark.site
def test_no_page_loads_anything_from_outside_the_site(built):
    """Offline: every script, stylesheet, image and font the pages load is in the site."""
    outside = []
    for path in built.rglob("*.html"):
        for tag, key, ref in _parse(path).refs:
            if key == "src" or tag == "link":
                if urlsplit(ref).scheme in ("http", "https") or ref.startswith("//"):
                    outside.append(f"{path.name}: <{tag} {key}={ref}>")
    assert not outside, outside
    css = "\n".join(p.read_text(errors="replace") for p in built.rglob("*.css"))
    assert not re.search(r"@import\s+url\(\s*['\"]?https?:", css)


@pytest.mark.site
def test_no_internal_link_is_broken(built):
    broken = []
    for path in sorted(built.rglob("*.html")):
        if "_static" in path.parts:
            continue
        for tag, key, ref in _parse(path).refs:
            parts = urlsplit(ref)
            if parts.scheme or ref.startswith(("//", "mailto:", "javascript:")):
                continue
            target = path if not parts.path else (path.parent / unquote(parts.path)).resolve()
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                broken.append(f"{path.relative_to(built)}: {ref} (no such file)")
            elif parts.fragment and target.suffix == ".html" and unquote(parts.fragment) not in _parse(target).ids:
                broken.append(f"{path.relative_to(built)}: {ref} (no such anchor)")
    assert not broken, "\n".join(broken[:40])


@pytest.mark.site
def test_question_index_links_each_question_to_its_answer(built):
    from bnviz.questions import QUESTIONS

    refs = {ref for _, key, ref in _parse(built / "questions.html").refs if key == "href"}
    for qid, (nb, _) in QUESTIONS.items():
        ref = f"{nb[:-6]}.html#{qid}"
        assert ref in refs, f"the question index does not link {qid} to {ref}"
        assert qid in _parse(built / ref.split("#")[0]).ids, f"{ref}: no such anchor on the page"


def _solution_and_hidden_lines(source: Path) -> list[str]:
    """Lines of an assignment's source that only its solutions and hidden tests contain."""
    nb = nbformat.read(source, as_version=4)
    secret, public, raw_solution = [], set(), False
    for cell in nb.cells:
        if cell.cell_type == "raw":
            raw_solution = cell.source.strip() == "# BEGIN SOLUTION" or (raw_solution and cell.source.strip() != "# END SOLUTION")
            continue
        hidden = cell.cell_type == "code" and re.search(r"^hidden:\s*true", cell.source, re.M)
        inside = False
        for line in cell.source.splitlines():
            s = line.strip()
            if s.startswith("# BEGIN SOLUTION"):
                inside = True
            elif s.startswith("# END SOLUTION"):
                inside = False
            elif inside or hidden or s.endswith("# SOLUTION"):
                secret.append(s)
            else:
                public.add(s)
    return sorted({s for s in secret if len(s) >= 12 and s not in public})


STUDENT_STUBS = {"batch_norm": "def batch_norm_forward(", "norms": "def bn_backward_graph("}


@pytest.mark.site
@pytest.mark.parametrize("assignment", site.ASSIGNMENTS, ids=lambda a: a.name)
def test_assignment_page_is_the_student_version(built, assignment):
    """Each assignment (issue 26: the second one too) has its page, listed on the index, with
    the student version: the question stubs, no solution line, no hidden test."""
    import html as html_lib

    page = built / f"{assignment.page}.html"
    assert page.is_file(), f"{page.name}: no page for the assignment {assignment.name}"
    text = html_lib.unescape(re.sub(r"<[^>]+>", "", page.read_text()))
    secret = _solution_and_hidden_lines(assignment.source)
    assert len(secret) > 30, "the solution and hidden-test lines could not be read from the source"
    shown = {line.strip() for line in text.splitlines()}  # whole lines: `_g = ...` is not the secret `g = ...`
    leaked = [s for s in secret if s in shown]
    assert not leaked, f"the {assignment.name} page shows solution or hidden-test lines: {leaked[:5]}"
    assert STUDENT_STUBS[assignment.name] in text and 'grader.check("q1")' in text
    assert f'href="{assignment.page}.html"' in (built / "index.html").read_text(), "the index does not link it"
    assert (built / assignment.zip_name).is_file(), f"{assignment.zip_name} is not served by the site"


# ----------------------------------------------------------------------------- in Chromium


@pytest.fixture(scope="module")
def served(built):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(built))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser_page():
    from browser_helpers import chromium, require_browser

    with chromium(require_browser(), width=1280, height=900) as page:
        yield page


JS_FIGURES = """() => {
  const boxes = Array.from(document.querySelectorAll('.bnviz-plotly'));
  const drawn = boxes.filter(b => { const gd = b.querySelector('.js-plotly-plot');
    return gd && gd._fullLayout && gd.querySelector('svg.main-svg .trace, svg.main-svg .hm, svg.main-svg image'); });
  const imgs = Array.from(document.querySelectorAll('div.cell_output img'));
  const mathjax = document.querySelectorAll('mjx-container').length;
  return {figures: boxes.length, drawn: drawn.length, images: imgs.length,
          images_loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length, math: mathjax,
          overflow: document.documentElement.scrollWidth - window.innerWidth};
}"""

JS_REPLAY = """() => {
  const gd = document.querySelector('.bnviz-replay .js-plotly-plot');
  if (!gd || !gd._fullLayout) return null;
  return {active: gd._fullLayout.sliders[0].active, points: (gd.data[0].x || []).length,
          frames: (gd._transitionData._frames || []).length};
}"""


def _visit(page, url: str) -> list[str]:
    """Open ``url``; return the console errors, page errors and requests that left the site."""
    problems = []
    origin = url.split("/", 3)[:3]
    on_console = lambda m: m.type == "error" and problems.append(f"console: {m.text}")  # noqa: E731
    on_error = lambda e: problems.append(f"page error: {e}")  # noqa: E731
    on_request = lambda r: r.url.split("/", 3)[:3] != origin and not r.url.startswith("data:") and \
        problems.append(f"request outside the site: {r.url}")  # noqa: E731
    page.on("console", on_console)
    page.on("pageerror", on_error)
    page.on("request", on_request)
    try:
        page.goto(url, wait_until="load")
        page.wait_for_timeout(600)
    finally:
        page.remove_listener("console", on_console)
        page.remove_listener("pageerror", on_error)
        page.remove_listener("request", on_request)
    return problems


@pytest.mark.site
@pytest.mark.browser
@pytest.mark.timeout(600)
def test_every_page_renders_in_chromium_with_its_figures(built, served, browser_page):
    from browser_helpers import shot

    page, failures = browser_page, {}
    for name in PAGES:
        problems = _visit(page, f"{served}/{name}")
        seen = page.evaluate(JS_FIGURES)
        expected = (built / name).read_text().count('class="bnviz-plotly')
        if seen["figures"] != expected or seen["drawn"] != seen["figures"]:
            problems.append(f"figures: {seen} (the page holds {expected})")
        if seen["images_loaded"] != seen["images"]:
            problems.append(f"images not loaded: {seen}")
        if name in CHAPTER_PAGES and seen["figures"] + seen["images"] == 0:
            problems.append("a chapter page without a single figure")
        if problems:
            failures[name] = problems
    assert not failures, json.dumps(failures, indent=1)[:6000]
    _visit(page, f"{served}/01_batch_norm_from_scratch.html")
    assert page.evaluate(JS_FIGURES)["math"] > 5, "MathJax (served by the site) typeset no formula"
    _visit(page, f"{served}/00_start_here.html")
    shot(page, "site-chapter", full_page=False)


@pytest.mark.site
@pytest.mark.browser
@pytest.mark.timeout(300)
def test_replay_plays_in_the_lab_page(served, browser_page):
    from browser_helpers import shot, wait_for

    page = browser_page
    assert not _visit(page, f"{served}/03_lab.html")
    start = page.evaluate(JS_REPLAY)
    assert start and start["frames"] >= 5 and start["active"] == 0, start
    page.locator(".bnviz-replay").first.scroll_into_view_if_needed()
    page.locator(".bnviz-replay .updatemenu-button", has_text="Play").first.click()
    moved = wait_for(page, lambda: (r := page.evaluate(JS_REPLAY)) and r["active"] > 0 and
                     r["points"] > start["points"] and r, 30, "the replay to move after ▶ Play")
    assert moved["active"] > 0
    page.locator(".bnviz-replay").first.scroll_into_view_if_needed()
    shot(page, "site-replay", full_page=False)


@pytest.mark.site
@pytest.mark.browser
@pytest.mark.timeout(300)
def test_search_and_phone_width(served, browser_page):
    from browser_helpers import wait_for

    page = browser_page
    assert not _visit(page, f"{served}/search.html?q=momentum")
    wait_for(page, lambda: page.locator("#search-results li").count() > 0, 30, "search results for 'momentum'")
    with _viewport(page, 390, 844):
        for name in ("05_optimisation.html", "03_lab.html", "questions.html"):
            assert not _visit(page, f"{served}/{name}")
            overflow = page.evaluate(JS_FIGURES)["overflow"]
            assert overflow <= 1, f"{name} scrolls sideways by {overflow}px on a 390-px phone"


# ----------------------------------------------------------------------------- what a reader sees

JS_LAYOUT = """() => {
  const box = el => { const r = el.getBoundingClientRect();
    return {l: r.left, r: r.right, t: r.top, b: r.bottom, w: r.width, h: r.height}; };
  const hit = (a, b) => Math.min(a.r, b.r) - Math.max(a.l, b.l) > 2 && Math.min(a.b, b.b) - Math.max(a.t, b.t) > 2;
  return Array.from(document.querySelectorAll('.bnviz-plotly .js-plotly-plot')).map(gd => {
    const svg = box(gd.querySelector('svg.main-svg'));
    const name = ((gd.querySelector('.gtitle') || {}).textContent || 'untitled').slice(0, 50);
    const problems = [];
    const inside = r => r.w === 0 || (r.l >= svg.l - 1 && r.r <= svg.r + 1 && r.t >= svg.t - 1 && r.b <= svg.b + 1);
    const parts = [];
    gd.querySelectorAll('.gtitle').forEach(t => parts.push(['title', box(t)]));
    gd.querySelectorAll('.legend').forEach(t => parts.push(['legend', box(t)]));
    gd.querySelectorAll('.slider-container').forEach(t => parts.push(['slider', box(t)]));
    gd.querySelectorAll('.updatemenu-container').forEach(t => parts.push(['buttons', box(t)]));
    gd.querySelectorAll('.annotation').forEach(t => parts.push(['annotation "' + t.textContent.slice(0, 25) + '"', box(t)]));
    gd.querySelectorAll('g[class*="title"]').forEach(t => /^g-[xy]\\d*title$/.test(t.getAttribute('class')) &&
      t.textContent && parts.push(['axis title "' + t.textContent.slice(0, 25) + '"', box(t)]));
    for (const [what, r] of parts)
      if (['title', 'legend', 'slider', 'buttons'].includes(what) && !inside(r)) problems.push(what + ' cut off');
    for (let i = 0; i < parts.length; i++)
      for (let j = i + 1; j < parts.length; j++)
        if (hit(parts[i][1], parts[j][1])) problems.push(parts[i][0] + ' overlaps ' + parts[j][0]);
    for (const [k, ax] of Object.entries(gd._fullLayout))
      if (/^[xy]axis\\d*$/.test(k) && ax.type === 'log' && ax.visible !== false) {
        const n = (ax._vals || []).filter(v => v.text && String(v.text).trim()).length;
        if (n < 2) problems.push(k + ': a log axis with ' + n + ' tick label(s)');
      }
    // the plot areas (one per subplot) from plotly's axes: no legend, title or slider drawn over one
    const o = gd.querySelector('svg.main-svg').getBoundingClientRect(), fl = gd._fullLayout;
    const areas = ((fl._subplots || {}).cartesian || []).map(id => {
      const m = id.match(/^x([0-9]*)y([0-9]*)$/), xa = fl['xaxis' + m[1]], ya = fl['yaxis' + m[2]];
      return [id, {l: o.left + xa._offset, r: o.left + xa._offset + xa._length,
                   t: o.top + ya._offset, b: o.top + ya._offset + ya._length}];
    });
    for (const [what, r] of parts)
      if (['title', 'legend', 'slider', 'buttons'].includes(what))
        for (const [id, a] of areas) if (hit(r, a)) problems.push(what + ' over the plot area ' + id);
    const legendText = Array.from(gd.querySelectorAll('.legend text')).map(t => t.textContent).join(' | ');
    if ((legendText.match(/SYNTHETIC/g) || []).length) problems.push('the legend repeats the data set');
    return {name, width: Math.round(svg.w), replay: !!gd.closest('.bnviz-replay'), problems};
  });
}"""

FIGURE_PAGES = CHAPTER_PAGES  # a page without a figure costs one visit
WIDTHS = pytest.mark.parametrize("width", [1280, 390], ids=["688-px column", "390-px phone"])


@contextlib.contextmanager
def _viewport(page, width: int, height: int = 900):
    """The page at ``width`` x ``height`` for the block, then back at the default 1280 x 900."""
    page.set_viewport_size({"width": width, "height": height})
    try:
        yield page
    finally:
        page.set_viewport_size({"width": 1280, "height": 900})


@pytest.mark.site
@pytest.mark.browser
@pytest.mark.timeout(600)
@WIDTHS
def test_figures_are_legible_in_the_column_and_on_a_phone(served, browser_page, width):
    """Every figure of the chapters that draw plotly figures: its title, legend, slider and buttons
    inside the figure and off every plot area, no two of them (nor subplot titles, annotations,
    axis titles) drawn over each other, log axes with more than one tick label, the data set not
    repeated in legends; the replay's buttons, step slider and legend apart. Screenshots of every
    figure go to test-artifacts/."""
    from browser_helpers import shot

    page, failures = browser_page, {}
    with _viewport(page, width):
        for name in FIGURE_PAGES:
            assert not _visit(page, f"{served}/{name}")
            page.wait_for_timeout(400)
            figures = page.evaluate(JS_LAYOUT)
            if width == 1280:
                widths = {f["width"] for f in figures if not f["replay"]}
                assert not widths or max(widths) <= 700, f"{name}: figures wider than the column: {widths}"
            for f in figures:
                if f["problems"]:
                    failures.setdefault(name, []).append(f"{f['name']!r} ({f['width']} px): {f['problems']}")
            boxes = page.locator(".bnviz-plotly")
            for k in range(boxes.count()):
                boxes.nth(k).scroll_into_view_if_needed()
                boxes.nth(k).screenshot(path=str(_artifact(f"site-{name[:2]}-{width}-fig{k}.png")))
            if name == "03_lab.html":
                assert any(f["replay"] for f in figures), "no replay on the lab page"
                page.locator(".bnviz-replay").first.screenshot(path=str(_artifact(f"site-replay-{width}.png")))
        shot(page, f"site-07-{width}", full_page=False)
    assert not failures, json.dumps(failures, indent=1, ensure_ascii=False)[:8000]


JS_READER = """() => {
  const article = document.querySelector('article') || document.body;
  const inputs = Array.from(article.querySelectorAll('div.cell_input pre, div.cell_input .highlight pre'));
  const code = inputs.map(p => p.textContent);
  const scrolls = inputs.filter(p => p.scrollWidth > p.clientWidth + 1)
    .map(p => p.scrollWidth - p.clientWidth + 'px: ' + p.textContent.split('\\n').sort((a, b) => b.length - a.length)[0].slice(0, 60));
  return {text: article.innerText, code: code, blocks: inputs.length, scrolls: scrolls};
}"""

# what a web reader must not see: the Colab setup cell, a raw warning (with the building machine's
# paths) or its row of '!', and on the lab page the headless check (asserts, its tiny run)
LEAKS = ("google.colab", "%pip install", "UserWarning", "Warning:", "!!!!", "site-packages/", "/work/",
         "lab.run_clicked()", "assert history.status")


@pytest.mark.site
@pytest.mark.browser
@pytest.mark.timeout(600)
@WIDTHS
def test_a_reader_sees_readable_code_and_no_setup_warning_or_test_scaffolding(served, browser_page, width):
    """On every chapter page: no setup cell, no raw warning, no test scaffolding (no `assert` in
    the lab's published code); on 01 and 05 (the pages with the most code) no code block scrolls
    sideways (scrollWidth <= clientWidth) in the 688-px column or on a 390-px phone."""
    page, failures = browser_page, {}
    with _viewport(page, width):
        for name in CHAPTER_PAGES:
            assert not _visit(page, f"{served}/{name}")
            seen = page.evaluate(JS_READER)
            assert seen["blocks"] > 0, f"{name}: no code block found (has the page's HTML changed?)"
            problems = [f"the page shows {leak!r}" for leak in LEAKS if leak in seen["text"]]
            if name.startswith("03_"):
                problems += [f"test scaffolding published: {c[:80]!r}" for c in seen["code"]
                             if re.search(r"^\s*assert\b", c, re.M)]
            if name[:2] in ("01", "05") and seen["scrolls"]:
                problems.append(f"{len(seen['scrolls'])} of {seen['blocks']} code blocks scroll sideways: "
                                f"{seen['scrolls'][:4]}")
            if problems:
                failures[name] = problems
    assert not failures, json.dumps(failures, indent=1, ensure_ascii=False)[:8000]


def _artifact(name: str) -> Path:
    from browser_helpers import ARTIFACTS

    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS / name
