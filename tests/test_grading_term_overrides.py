"""A term with bnviz (issue 24 item 5, part): grades/overrides.csv applied after judging, logged in
the student's JSON, applied to the judged scores on every run (a resumed result is not overridden
twice; an override removed from the file is undone)."""

from __future__ import annotations

import json

from bnviz.grading import overrides, records
from bnviz.grading.records import Result

TESTS = [("q1", "q1 - 1", False, 1.0), ("q1", "q1 - 2", True, 2.0), ("q2", "q2 - 1", False, 4.0)]
QUESTIONS = {"q1": 3.0, "q2": 4.0}
COLUMNS = records.gradebook_columns(QUESTIONS, {"q4": 2.0})


def _graded(out, name, scores, failed):
    r = Result.empty(name, f"{name}.ipynb", QUESTIONS)
    r.scores, r.total, r.failed_tests = dict(scores), sum(scores.values()), failed
    records.write_student(out, r, COLUMNS, {"q4": 2.0})
    return r


def _resume(out, name):
    r = Result.from_dict(json.loads((out / f"{name}.json").read_text()))
    r.resumed = True
    return r


def test_overrides_apply_once_are_logged_and_undone(tmp_path):
    a = _graded(tmp_path, "anna", {"q1": 1.0, "q2": 4.0}, [{"name": "q1 - 2", "question": "q1", "points": 2.0}])
    b = _graded(tmp_path, "ben", {"q1": 3.0, "q2": 0.0}, [{"name": "q2 - 1", "question": "q2", "points": 4.0}])
    (tmp_path / "overrides.csv").write_text(
        "student,target,points,reason\n"
        "anna,q1 - 2,2,tolerance too strict for her (correct) formula\n"
        "ben,q2,1.5,partial credit by hand\n"
        "ben,q4,2,manual\n"
        "zed,q1,3,typo\n"
        "ben,q9,1,typo\n"
        "ben,q1,lots,typo\n")
    lines: list[str] = []
    problems = overrides.apply_overrides(tmp_path, [a, b], TESTS, {"q4": 2.0}, log=lines.append)
    assert len(problems) == 4 and all("not applied" in p for p in problems)
    assert (a.scores["q1"], a.total, b.scores["q2"], b.total) == (3.0, 7.0, 1.5, 4.5)
    assert a.row["q1"] == "3" and a.row["total"] == "7"
    data = json.loads((tmp_path / "anna.json").read_text())
    assert data["judged_scores"] == {"q1": 1.0, "q2": 4.0} and data["scores"]["q1"] == 3.0
    assert data["overrides"][0]["reason"].startswith("tolerance") and data["overrides"][0]["before"] == 1.0
    assert data["row"] == a.row and list(data["row"]) == COLUMNS  # still resumable
    assert any(ln.startswith("override anna q1 - 2: q1 1 -> 3") for ln in lines)
    # the next run resumes both: the overrides apply to the judged scores, not on top of themselves
    a2, b2 = _resume(tmp_path, "anna"), _resume(tmp_path, "ben")
    overrides.apply_overrides(tmp_path, [a2, b2], TESTS, {"q4": 2.0}, log=lines.append)
    assert (a2.scores["q1"], b2.scores["q2"]) == (3.0, 1.5)
    # the instructor deletes ben's row: his judged score comes back
    (tmp_path / "overrides.csv").write_text("student,target,points,reason\nanna,q1 - 2,2,tolerance\n")
    a3, b3 = _resume(tmp_path, "anna"), _resume(tmp_path, "ben")
    overrides.apply_overrides(tmp_path, [a3, b3], TESTS, {"q4": 2.0}, log=lines.append)
    assert (a3.scores["q1"], b3.scores["q2"], b3.total) == (3.0, 0.0, 3.0)
    assert json.loads((tmp_path / "ben.json").read_text())["overrides"] == []


def test_scores_stay_within_the_question(tmp_path):
    a = _graded(tmp_path, "anna", {"q1": 3.0, "q2": 4.0}, [])
    (tmp_path / "overrides.csv").write_text("student,target,points,reason\nanna,q1 - 1,5,x\nanna,q2,-3,y\n")
    overrides.apply_overrides(tmp_path, [a], TESTS, {}, log=lambda *_: None)
    assert (a.scores["q1"], a.scores["q2"]) == (3.0, 0.0)


def test_feedback_shows_the_adjustment_not_the_reason(tmp_path):
    from bnviz.grading import feedback

    a = _graded(tmp_path, "anna", {"q1": 1.0, "q2": 4.0}, [{"name": "q1 - 2", "question": "q1", "points": 2.0,
                                                             "hidden": True, "reason": "x"}])
    (tmp_path / "overrides.csv").write_text("student,target,points,reason\nanna,q1 - 2,2,same bug as ben_secret\n")
    overrides.apply_overrides(tmp_path, [a], TESTS, {}, log=lambda *_: None)
    data = json.loads((tmp_path / "anna.json").read_text())
    page = feedback.page(data, {}, {}, {}, TESTS, False)
    assert "q1 - 2: q1 1 &rarr; 3 points" in page and "Score: 7 / 7" in page
    assert "ben_secret" not in page and "withheld" not in page
