"""A term with bnviz (issue 24 item 2): feedback students can be given.

Three students are graded through the command line (two hold the same copy of the solution, so
similarity names each in the other's flags; one has a q1 bug that fails hidden tests), a manual
grade is typed, then ``feedback`` runs before and after ``--release-hidden``. No page may name
another student, carry a flag, a seed or a sandbox detail, or a hidden test's message (which quotes
its inputs) before release.
"""

from __future__ import annotations

import copy
import json
import re
import zipfile
from types import SimpleNamespace

import pytest

from bnviz.grading import feedback

STUDENTS = ("zz_alpha_1001", "zz_bravo_1002", "zz_charlie_1003")
BUG = ("momentum * var * n / (n - 1)", "momentum * var")  # biased running variance: hidden q1 tests fail


def _src(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


@pytest.fixture(scope="module")
def fb(grading_dist, bwrap, tmp_path_factory):
    pytest.importorskip("otter")
    from bnviz.grading import cli

    dist, _ = grading_dist
    solution = json.loads((dist / "autograder" / "batch_norm.ipynb").read_text())
    buggy = copy.deepcopy(solution)
    hits = [c for c in buggy["cells"] if c["cell_type"] == "code" and BUG[0] in _src(c)]
    assert len(hits) == 1
    hits[0]["source"] = _src(hits[0]).replace(*BUG)
    subs, out = tmp_path_factory.mktemp("fb-subs"), tmp_path_factory.mktemp("fb-grades")
    (subs / f"{STUDENTS[0]}.ipynb").write_text(json.dumps(solution))
    (subs / f"{STUDENTS[1]}.ipynb").write_text(json.dumps(buggy))
    (subs / f"{STUDENTS[2]}.ipynb").write_text(json.dumps(solution))
    assert cli.main(["grade", str(subs), "--dist", str(dist), "--out", str(out), "--jobs", "1", "--timeout", "150", "--seed", "982451653"]) == 0
    man = (out / "manual.csv").read_text()
    man = man.replace(f"{STUDENTS[0]},q4,,,,", f"{STUDENTS[0]},q4,1.5,output,\"Good; <b>NaN</b> missing\",TA1")
    (out / "manual.csv").write_text(man)
    data = {s: json.loads((out / f"{s}.json").read_text()) for s in STUDENTS}
    assert cli.main(["feedback", str(out), "--dist", str(dist)]) == 0
    before = {s: (out / "feedback" / f"{s}.html").read_text() for s in STUDENTS}
    with zipfile.ZipFile(out / "feedback" / "feedback.zip") as zf:
        zipped = {n: zf.read(n).decode() for n in zf.namelist()}
    assert cli.main(["feedback", str(out), "--dist", str(dist), "--release-hidden"]) == 0
    after = {s: (out / "feedback" / f"{s}.html").read_text() for s in STUDENTS}
    return SimpleNamespace(out=out, data=data, before=before, after=after, zipped=zipped)


def test_the_grading_flags_name_other_students(fb):
    # what must not leak is there to leak: similarity named the other copy in the JSON
    assert STUDENTS[2] in fb.data[STUDENTS[0]]["flags"] and STUDENTS[0] in fb.data[STUDENTS[2]]["flags"]


def test_no_page_names_another_student_or_shows_flags_or_internals(fb):
    for pages in (fb.before, fb.after):
        for s, text in pages.items():
            assert s in text
            for other in STUDENTS:
                if other != s:
                    assert other not in text, (s, other)
            low = text.lower()
            for word in ("similar", "sandbox", "seed", "sha256", "flag", "exit status", "public solution"):
                assert word not in low, (s, word)
            assert str(fb.data[s]["seed"]) not in text
    assert sorted(fb.zipped) == sorted(f"{s}.html" for s in STUDENTS)
    assert fb.zipped[f"{STUDENTS[0]}.html"] == fb.before[STUDENTS[0]]


def test_hidden_messages_only_after_release(fb):
    s = STUDENTS[1]
    hidden = [f for f in fb.data[s]["failed_tests"] if f["hidden"]]
    assert hidden and all(f["reason"] for f in hidden)
    # numbers a visible test's message shows anyway (e.g. a fixed momentum=0.3 that the visible
    # test q1 - 11 uses too) are not hidden inputs
    shown = " ".join(f["reason"] for f in fb.data[s]["failed_tests"] if not f["hidden"])
    for f in hidden:
        # the message and every number it quotes (shapes, values of the hidden inputs)
        assert f["reason"] not in fb.before[s]
        for number in re.findall(r"\d+\.\d+(?:e-?\d+)?", f["reason"]):
            assert number in shown or number not in fb.before[s], number
        assert f"{f['name']} (hidden)" in fb.before[s]
    assert "failed" in fb.before[s] and "released after grading" in fb.before[s]
    import html

    assert all(html.escape(feedback.clean(f["reason"], 400)) in fb.after[s] for f in hidden)


def test_scores_manual_points_rubric_and_comment(fb):
    a, b = fb.before[STUDENTS[0]], fb.before[STUDENTS[1]]
    assert "Score: 20.5 / 21" in a and "q4 (graded by hand): 1.5 / 2" in a
    assert "&lt;b&gt;NaN&lt;/b&gt;" in a and "<b>NaN" not in a  # the comment, escaped
    assert "&#10003; the output is beta" in a and "&#10007; running_var becomes NaN" in a
    total = sum(fb.data[STUDENTS[1]]["scores"].values())
    assert f"Score: {total:g} / 21" in b and "not graded yet" in b
    visible = [f for f in fb.data[STUDENTS[1]]["failed_tests"] if not f["hidden"]]
    for f in visible:  # visible tests' messages are shown at once
        assert feedback.html.escape(feedback.clean(f["reason"], 400)) in b


def test_student_error_keeps_only_what_a_student_can_act_on():
    got = feedback.student_error("1 cell(s) raised; first: cell 7: student code raised ValueError: bad; "
                                 "the sandbox's report was rejected (x); memory limit (4 GiB) reached: an allocation failed")
    assert got == ["1 cell(s) raised; first: cell 7: student code raised ValueError: bad", feedback.OTHER,
                   "your notebook ran out of memory"]
