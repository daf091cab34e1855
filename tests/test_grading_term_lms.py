"""A term with bnviz (issue 24 item 3): LMS in and out.

In: a Canvas bulk download (the user id is the student, LATE kept, an older duplicate skipped with
the reason) and a Gradescope export (``submission_<id>/`` folders + ``submission_metadata.yml``:
the email is the student, the submission time kept, the older of two submissions skipped), read
without a sandbox; then one Canvas folder graded through the command line. Out: ``canvas.csv``
and ``gradescope.csv`` checked against the layouts the tools document (Canvas: Student, ID,
SIS User ID, SIS Login ID, Section, then one column per assignment; Gradescope: Name, SID, Email,
scores, matched by Email/SID) and read back.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from bnviz.grading import lms

CANVAS_HEAD = ["Student", "ID", "SIS User ID", "SIS Login ID", "Section"]
META = """\
submission_111:
  :submitters:
  - :name: Anna Alpha
    :sid: '9001'
    :email: anna@uni.example
  :created_at: 2026-12-01 10:00:00.000000000 -08:00
  :score: 0.0
submission_222:
  :submitters:
  - :name: Anna Alpha
    :sid: '9001'
    :email: anna@uni.example
  :created_at: 2026-12-02 09:00:00.000000000 -08:00
  :score: 0.0
submission_333:
  :submitters:
  - :name: Ben Bravo
    :sid: '9002'
    :email: ben@uni.example
  :created_at: 2026-12-01 11:00:00.000000000 -08:00
  :score: 0.0
"""


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_canvas_names_the_user_id_is_the_student_late_kept_older_skipped(tmp_path):
    for name, t in [("alphaanna_12345_900_batch_norm.ipynb", 100), ("alphaanna_LATE_12345_901_batch_norm-1.ipynb", 200),
                    ("bravoben_LATE_23456_902_batch_norm.zip", 100), ("plain.ipynb", 100)]:
        (tmp_path / name).write_text("{}")
        os.utime(tmp_path / name, (t, t))
    files, names, skipped, infos = lms.collect(tmp_path)
    by = {names[p]: p.name for p in files}
    assert by == {"12345": "alphaanna_LATE_12345_901_batch_norm-1.ipynb", "23456": "bravoben_LATE_23456_902_batch_norm.zip",
                  "plain": "plain.ipynb"}
    assert infos["12345"].late and infos["23456"].late and infos["12345"].source == "canvas"
    assert infos["12345"].submission_id == "901" and infos["plain"].source == "folder"
    assert skipped == [("alphaanna_12345_900_batch_norm.ipynb",
                        "an older submission of 12345 (alphaanna_LATE_12345_901_batch_norm-1.ipynb is graded)")]


def test_gradescope_export_the_email_is_the_student_newest_graded(tmp_path):
    (tmp_path / "submission_metadata.yml").write_text(META)
    for sub in ("submission_111", "submission_222", "submission_333", "submission_444"):
        (tmp_path / sub).mkdir()
    (tmp_path / "submission_111" / "batch_norm.ipynb").write_text("{}")
    (tmp_path / "submission_222" / "work").mkdir()
    (tmp_path / "submission_222" / "work" / "batch_norm.ipynb").write_text("{}")
    (tmp_path / "submission_222" / "notes.ipynb").write_text("{}")
    (tmp_path / "submission_333" / "x.zip").write_text("")
    files, names, skipped, infos = lms.collect(tmp_path)
    by = {names[p]: str(p.relative_to(tmp_path)) for p in files}
    assert by == {"anna_uni.example": "submission_222/work/batch_norm.ipynb", "ben_uni.example": "submission_333/x.zip"}
    a = infos["anna_uni.example"]
    assert (a.email, a.sid, a.name, a.source) == ("anna@uni.example", "9001", "Anna Alpha", "gradescope")
    assert a.submitted_at.startswith("2026-12-02")
    reasons = dict(skipped)
    assert reasons["submission_111/batch_norm.ipynb"].startswith("an older submission of anna_uni.example")
    assert reasons["submission_222/notes.ipynb"].startswith("another notebook of submission_222")
    assert "no notebook" in reasons["submission_444"] and "submission_metadata.yml" not in reasons


def _check_canvas(path: Path, column: str) -> list[dict]:
    raw = path.read_bytes()
    raw.decode("utf-8")  # Canvas reads UTF-8
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f))
    assert header == CANVAS_HEAD + [column]
    rows = _rows(path)
    for r in rows:
        assert r["Student"] and (r["ID"] or r["SIS User ID"] or r["SIS Login ID"]), r  # Canvas matches on these
        float(r[column])  # a number Canvas imports, no formula guard in front
    return rows


def _check_gradescope(path: Path, questions: list[str]) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f))
    assert header == ["Name", "SID", "Email", *questions, "Total Score", "Max Points"]
    rows = _rows(path)
    for r in rows:
        assert r["Email"] or r["SID"], r  # Gradescope matches rows by email or SID
        float(r["Total Score"]), float(r["Max Points"])
    return rows


def test_lms_csvs_follow_the_documented_layouts(tmp_path):
    infos = {"12345": lms.Info("canvas", "12345", "901", late=True), "ben_uni.example": lms.Info(
        "gradescope", "", "333", "Ben Bravo", "ben@uni.example", "9002", "2026-12-01T11:00:00-08:00")}
    rows = [{"student": "12345", "q1": "9", "q4": "2", "total": "11"}, {"student": "ben_uni.example", "q1": "0", "q4": "", "total": "0"}]
    roster = lms.read_roster(None)
    (tmp_path / "roster.csv").write_text("Canvas ID,Name,Email,SIS ID,Login,Section\n12345,\"Alpha, Anna\",anna@uni.example,S1,aalpha,A\n")
    roster = lms.read_roster(tmp_path / "roster.csv")
    lms.write_lms_csvs(tmp_path, rows, infos, {"12345": "a.ipynb", "ben_uni.example": "submission_333/x.zip"},
                       ["q1", "q4"], 11.0, roster, "Batch norm (777)")
    canvas = _check_canvas(tmp_path / "canvas.csv", "Batch norm (777)")
    assert canvas[0] == {"Student": "Alpha, Anna", "ID": "12345", "SIS User ID": "S1", "SIS Login ID": "aalpha",
                         "Section": "A", "Batch norm (777)": "11"}
    gs = _check_gradescope(tmp_path / "gradescope.csv", ["q1", "q4"])
    assert gs[1]["Email"] == "ben@uni.example" and gs[1]["SID"] == "9002" and gs[0]["Email"] == "anna@uni.example"
    subs = {r["student"]: r for r in _rows(tmp_path / "submissions.csv")}
    assert subs["12345"]["late"] == "yes" and subs["ben_uni.example"]["submitted_at"].startswith("2026-12-01")


@pytest.fixture(scope="module")
def canvas_graded(grading_dist, bwrap, tmp_path_factory):
    pytest.importorskip("otter")
    from bnviz.grading import cli

    dist, _ = grading_dist
    solution = (dist / "autograder" / "batch_norm.ipynb").read_text()
    handout = (dist / "student" / "batch_norm.ipynb").read_text()
    subs, out = tmp_path_factory.mktemp("canvas-subs"), tmp_path_factory.mktemp("canvas-grades")
    (subs / "alphaanna_12345_900_batch_norm.ipynb").write_text(handout)  # older: not graded
    (subs / "alphaanna_LATE_12345_901_batch_norm.ipynb").write_text(solution)
    (subs / "bravoben_23456_902_batch_norm.ipynb").write_text(handout)
    os.utime(subs / "alphaanna_12345_900_batch_norm.ipynb", (100, 100))
    roster = subs.parent / "canvas-roster.csv"
    roster.write_text("id,name,sis_id,login_id,section\n12345,\"Alpha, Anna\",S1,aalpha,A\n23456,\"Bravo, Ben\",S2,bbravo,B\n")
    assert cli.main(["grade", str(subs), "--dist", str(dist), "--out", str(out), "--jobs", "1", "--timeout", "150", "--seed", "982451653",
                     "--roster", str(roster), "--canvas-assignment", "Batch norm (777)"]) == 0
    return out


def test_a_canvas_download_is_graded_and_its_csv_reads_back(canvas_graded):
    out = canvas_graded
    book = {r["student"]: r for r in _rows(out / "gradebook.csv")}
    assert set(book) == {"12345", "23456"} and book["12345"]["total"] == "19"  # the LATE (newer) file was graded
    skipped = _rows(out / "skipped.csv")
    assert [r["file"] for r in skipped] == ["alphaanna_12345_900_batch_norm.ipynb"] and "older" in skipped[0]["reason"]
    canvas = {r["ID"]: r for r in _check_canvas(out / "canvas.csv", "Batch norm (777)")}
    assert canvas["12345"]["Student"] == "Alpha, Anna" and canvas["12345"]["SIS User ID"] == "S1"
    assert {k: float(v["Batch norm (777)"]) for k, v in canvas.items()} == {k: float(v["total"]) for k, v in book.items()}
    _check_gradescope(out / "gradescope.csv", ["q1", "q2", "q3", "q4"])
    subs = {r["student"]: r for r in _rows(out / "submissions.csv")}
    assert subs["12345"]["late"] == "yes" and subs["23456"]["late"] == ""
    assert json.loads((out / "12345.json").read_text())["submission"] == "alphaanna_LATE_12345_901_batch_norm.ipynb"


def test_a_gradescope_export_is_graded(grading_dist, bwrap, tmp_path):
    from bnviz.grading import cli

    dist, _ = grading_dist
    subs = tmp_path / "export"
    (subs / "submission_222" / "work").mkdir(parents=True)
    (subs / "submission_metadata.yml").write_text(META)
    (subs / "submission_222" / "work" / "batch_norm.ipynb").write_text((dist / "autograder" / "batch_norm.ipynb").read_text())
    assert cli.main(["grade", str(subs), "--dist", str(dist), "--out", str(tmp_path / "g"), "--timeout", "150", "--seed", "982451653"]) == 0
    book = _rows(tmp_path / "g" / "gradebook.csv")
    assert [(r["student"], r["total"]) for r in book] == [("anna_uni.example", "19")]
    gs = _check_gradescope(tmp_path / "g" / "gradescope.csv", ["q1", "q2", "q3", "q4"])
    assert (gs[0]["Email"], gs[0]["SID"], gs[0]["Name"], gs[0]["Total Score"], gs[0]["Max Points"]) == (
        "anna@uni.example", "9001", "Anna Alpha", "19", "21")


def test_items_csv_of_a_graded_folder(canvas_graded):
    from bnviz.grading import checker

    rows = _rows(canvas_graded / "items.csv")
    assert [r["test"] for r in rows] == [t.name for t in checker.make_tests(0)]
    for r in rows:  # two students: 12345 (the solution) passes all, 23456 (the hand-out) none
        assert int(r["passed"]) + int(r["failed"]) + int(r["no_result"]) == 2, r
        assert r["passed"] == "1", r


def test_a_plain_folder_is_read_as_before(tmp_path):
    from bnviz.grading import ingest

    for name in ("b.ipynb", "A.zip", "a.IPYNB", "notes.txt", ".hidden.ipynb", "x\x1by.ipynb", "hw_1_2_x.ipynb"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "folder").mkdir()
    (tmp_path / "submission_5").mkdir()  # no submission_metadata.yml: a folder as any other
    files, skipped = ingest.list_folder(tmp_path)
    got_files, got_names, got_skipped, _ = lms.collect(tmp_path)
    assert (got_files, got_names, got_skipped) == (files, ingest.student_names(files), skipped)


def test_histogram_csv_of_a_graded_folder(canvas_graded):
    rows = _rows(canvas_graded / "histogram.csv")
    per_q: dict[str, int] = {}
    for r in rows:
        per_q[r["question"]] = per_q.get(r["question"], 0) + int(r["students"])
    assert per_q == {"q1": 2, "q2": 2, "q3": 2}  # every student once per autograded question
    assert {(r["question"], r["score"]): r["students"] for r in rows}[("q1", "9")] == "1"  # the solution
