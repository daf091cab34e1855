"""The course notebooks: they run top to bottom in fast mode, every learner question has its
anchor in the notebook ``bnviz.questions.QUESTIONS`` names, and they are committed without
outputs. ``notebooks/assignments/`` has its own tests."""
from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import pytest

from bnviz.course import REPO_URL
from bnviz.questions import QUESTIONS

ROOT = Path(__file__).resolve().parent.parent
NB_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))
ANCHOR = re.compile(r"""<a\s+id\s*=\s*["']([^"']+)["']\s*>\s*</a>""")
LINK = re.compile(r"\]\((\d\d_[\w-]+\.ipynb)(?:#([\w-]+))?\)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _read(path: Path):
    return nbformat.read(path, as_version=4)


def _anchors(nb) -> list[str]:
    return [a for cell in nb.cells if cell.cell_type == "markdown" for a in ANCHOR.findall(cell.source)]


ALL_ANCHORS = {p.name: _anchors(_read(p)) for p in NOTEBOOKS}


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks found in {NB_DIR}"


# ----------------------------------------------------------------------------- execution


@pytest.mark.notebooks
@pytest.mark.timeout(600)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_in_fast_mode(path, monkeypatch, tmp_path):
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    # The kernel inherits this process's environment.
    monkeypatch.setenv("BNVIZ_FAST", "1")
    monkeypatch.setenv("BNVIZ_DATASET", "synthetic")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = _read(path)
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NB_DIR)}})
    try:
        client.execute()
        # the course site (tests/test_site.py, make site) reuses this run instead of executing again
        from sitebuild import site

        site.store_executed(path, nb)
    except (CellExecutionError, CellTimeoutError) as err:
        for i, cell in enumerate(nb.cells):
            errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
            if errors:
                e = errors[0]
                tb = ANSI.sub("", "\n".join(e.get("traceback", [])))
                pytest.fail(f"{path.name}: cell {i} failed\n--- source ---\n{cell.source}\n"
                            f"--- error ---\n{e['ename']}: {e['evalue']}\n{tb[-3000:]}", pytrace=False)
        pytest.fail(f"{path.name}: {type(err).__name__}: {ANSI.sub('', str(err))[-3000:]}", pytrace=False)
    finally:
        # keep the executed copy for a human to look at (never written back to notebooks/)
        nbformat.write(nb, tmp_path / path.name)


# ----------------------------------------------------------------------------- questions


@pytest.mark.parametrize("qid", sorted(QUESTIONS))
def test_question_has_its_home(qid):
    """Each question id is an anchor in exactly one notebook: the one QUESTIONS names."""
    expected = QUESTIONS[qid][0]
    homes = {name: anchors.count(qid) for name, anchors in ALL_ANCHORS.items() if qid in anchors}
    assert homes, f'<a id="{qid}"></a> is in no notebook; QUESTIONS says {expected}'
    assert list(homes) == [expected], f"{qid} is anchored in {sorted(homes)}; QUESTIONS says {expected}"
    assert homes[expected] == 1, f"{qid} is anchored {homes[expected]} times in {expected}"


def test_no_unknown_question_anchors():
    unknown = {name: [a for a in anchors if a.startswith("q-") and a not in QUESTIONS]
               for name, anchors in ALL_ANCHORS.items()}
    unknown = {k: v for k, v in unknown.items() if v}
    assert not unknown, f"anchors that bnviz.questions.QUESTIONS does not know: {unknown}"


def test_question_table_names_only_known_notebooks():
    chapters = {name for name, _ in QUESTIONS.values()}
    assert all(re.fullmatch(r"\d\d_\w+\.ipynb", c) for c in chapters), chapters


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_links_between_notebooks_resolve(path):
    """A markdown link like [..](04_training_vs_prediction.ipynb#q-fold) must reach an anchor.
    A link to a chapter that is not written yet fails (the map in 00 would be broken)."""
    bad = []
    for cell in _read(path).cells:
        if cell.cell_type != "markdown":
            continue
        for target, anchor in LINK.findall(cell.source):
            if target not in ALL_ANCHORS:
                if not (NB_DIR / target).exists():
                    bad.append(f"{target} (no such notebook)")
            elif anchor and anchor not in ALL_ANCHORS[target]:
                bad.append(f"{target}#{anchor} (no such anchor)")
    assert not bad, f"{path.name} links to: {bad}"


# ----------------------------------------------------------------------------- hygiene


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    nb = _read(path)
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: cells {dirty} have outputs; clear them "
                       f"(jupyter nbconvert --clear-output --inplace {path.relative_to(ROOT)})")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_starts_with_colab_setup(path):
    code = [c.source for c in _read(path).cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code"
    first = code[0]
    assert "google.colab" in first and REPO_URL in first and "d2l==1.0.3" in first, (
        f"{path.name}: the first code cell must be the Colab setup cell "
        f"(pip install git+{REPO_URL} and d2l==1.0.3 --no-deps when in Colab); got:\n{first}")
