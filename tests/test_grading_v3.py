"""Grading v3 (issue 23): honest shapes graded right (item 5).

One folder of planted submissions is graded once in bubblewrap sandboxes (``v3``); each honest
shape must get 19/19, each hostile name must leave no control character in the gradebook, the CSVs
or the log. The rest checks the pieces directly.
"""

from __future__ import annotations

import copy
import json
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("otter", reason="otter-grader is not installed (pip install -e .[grading])")
torch = pytest.importorskip("torch")

from bnviz import grading  # noqa: E402
from bnviz.grading import ingest  # noqa: E402

pytestmark = pytest.mark.grading

TIMEOUT_S = 150
FWD = "def batch_norm_forward"
# a comparison with PyTorch's batch norm computed above the def, in the q1 cell: allowed while working
# (the notebook says so)
REF_ABOVE_DEF = ("import torch.nn.functional as F\n_x = torch.randn(8, 3, dtype=torch.float64)\n"
                 "_ref = F.batch_norm(_x, None, None, training=True)\n")
ESC = "\x1b]0;pwned\x07\x1b[31m"  # a terminal title and a colour: what a zip member name can carry


def _src(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _edit_cell(nb: dict, startswith: str, edit) -> dict:
    nb = copy.deepcopy(nb)
    hits = [c for c in nb["cells"] if c["cell_type"] == "code" and _src(c).startswith(startswith)]
    assert len(hits) == 1, startswith
    hits[0]["source"] = edit(_src(hits[0]))
    return nb


def _write(path: Path, nb: dict) -> None:
    path.write_text(json.dumps(nb))


def _plant(solution: dict, handout: dict, subs: Path) -> None:
    _write(subs / "solution.ipynb", solution)
    _write(subs / "ref_above_def.ipynb", _edit_cell(solution, FWD, lambda s: REF_ABOVE_DEF + s))
    spaced = _edit_cell(solution, FWD, lambda s: "    \n%%time\n" + s)  # a line of spaces first
    spaced = _edit_cell(spaced, "def batch_norm_backward", lambda s: "\n  %%capture out\n  " + s.replace("\n", "\n  "))
    _write(subs / "space_magic.ipynb", spaced)
    with zipfile.ZipFile(subs / "handout_and_work.zip", "w") as zf:  # the hand-out is the less deep one
        zf.writestr("batch_norm.ipynb", json.dumps(handout))
        zf.writestr("work/batch_norm.ipynb", json.dumps(solution))


@pytest.fixture(scope="module")
def v3(grading_dist, bwrap, tmp_path_factory):
    out_dist, manifest = grading_dist
    solution = json.loads((out_dist / "autograder" / "batch_norm.ipynb").read_text())
    student_nb = out_dist / manifest["student_notebook"]
    subs, out = tmp_path_factory.mktemp("subs-v3"), tmp_path_factory.mktemp("grades-v3")
    _plant(solution, json.loads(student_nb.read_text()), subs)
    lines: list[str] = []
    results = grading.grade_folder(subs, out, timeout_s=TIMEOUT_S, jobs=2, student_notebook=student_nb,
                                   manual_questions={"q4": 2}, forbidden=manifest["forbidden"],
                                   log=lambda *a: lines.append(" ".join(map(str, a))))
    return {"res": {r["student"]: r for r in results}, "out": out, "log": lines}


def _own_flags(r) -> str:
    return "; ".join(f for f in r["flags"].split("; ") if f and not f.startswith("similar to"))


# ------------------------------------------------------------------ item 5: honest shapes


def test_a_comparison_above_the_def_is_not_withheld(v3):
    r = v3["res"]["ref_above_def"]
    assert r["total"] == 19 and "withheld" not in r["flags"], (r["scores"], r["flags"], r["error"])
    assert v3["res"]["solution"]["total"] == 19


def test_a_cell_magic_after_blank_lines_or_indented_runs_its_body(v3):
    r = v3["res"]["space_magic"]
    assert r["total"] == 19 and r["error"] == "", (r["scores"], r["error"])


def test_ipython_cleanup_before_cell_magics():
    assert ingest.to_python("   \n%%time\nx = 1\n") == ("x = 1\n", None)
    assert ingest.to_python("\n  %%capture out\n  y = 2\n") == ("y = 2\n", None)
    code, why = ingest.to_python(" \n %%bash\n echo hi\n")
    assert code == "" and "%%bash is not run" in why


def test_a_zip_with_the_hand_out_and_a_worked_copy_grades_the_worked_one(v3):
    r = v3["res"]["handout_and_work"]
    assert r["total"] == 19, (r["error"], r["flags"])
    assert "graded work/batch_norm.ipynb (the others are the untouched hand-out)" in r["flags"], r["flags"]


def test_the_limits_are_part_of_the_resume_key(grading_dist, bwrap, tmp_path):
    """Graded with a time limit too short for torch's import (a time-out, 0), then again, without
    --regrade, with a longer one: the time-out is not kept."""
    out_dist, manifest = grading_dist
    subs, out = tmp_path / "subs", tmp_path / "grades"
    subs.mkdir()
    (subs / "one.ipynb").write_text((out_dist / "autograder" / "batch_norm.ipynb").read_text())
    kw = dict(forbidden=manifest["forbidden"], log=lambda *a: None)
    first = grading.grade_folder(subs, out, timeout_s=1, **kw)[0]
    assert first["total"] == 0 and "timed out" in first["error"], first["error"]
    again = grading.grade_folder(subs, out, timeout_s=TIMEOUT_S, **kw)[0]
    assert not again.get("resumed") and again["total"] == 19, again["error"]
    assert grading.grade_folder(subs, out, timeout_s=TIMEOUT_S, **kw)[0].get("resumed")  # same limits: kept

