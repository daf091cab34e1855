"""A term with bnviz (issue 24 item 1): manual grades are never lost.

One folder is graded through the command line (what ``make grade`` runs) three times: two students;
then, with manual grades typed and a late file added, a resumed run; then ``--regrade``. Every
typed grade must be in ``manual.csv`` byte for byte and counted in the gradebook each time. The
pure parts (appending rows, merging, the written-answer page) are checked without a sandbox.
"""

from __future__ import annotations

import base64
import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from bnviz.grading import manual

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()
SCRIPT = "<script>alert('x')</script>"


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- pure parts


def test_sync_only_appends_and_keeps_every_typed_byte(tmp_path):
    typed = ("student,question,points,rubric_items,comment,grader,my notes\r\n"
             "anna,q4,1.5,output,\"good, but \"\"NaN\"\" missing\",TA1,x\r\n"
             "gone,q4,2,,student dropped,TA2,\r\n"
             "ben,q4,-1,,typo,TA1,")  # no newline at the end, an extra column, a bad value
    (tmp_path / "manual.csv").write_bytes(typed.encode())
    added = manual.sync_manual_csv(tmp_path, ["anna", "ben", "cara"], {"q4": 2.0})
    data = (tmp_path / "manual.csv").read_bytes()
    assert data.startswith(typed.encode()) and added == [("cara", "q4")]
    rows = _rows(tmp_path / "manual.csv")
    assert [r["student"] for r in rows] == ["anna", "gone", "ben", "cara"] and rows[-1]["points"] == ""
    assert manual.sync_manual_csv(tmp_path, ["anna", "ben", "cara"], {"q4": 2.0}) == []
    assert (tmp_path / "manual.csv").read_bytes() == data  # a second run changes nothing


def test_merge_counts_manual_points_and_names_the_ungraded(tmp_path):
    (tmp_path / "manual.csv").write_text("student,question,points,rubric_items,comment,grader\n"
                                         "anna,q4,1.5,,,\nben,q4,3,,,\ncara,q4,,,,\n")
    cols = ["student", "q1", "q4", "total", "possible", "error", "flags"]
    res = [SimpleNamespace(student=s, total=9.0, possible_total=9.0,
                           row={"student": s, "q1": "9", "q4": "", "total": "9", "possible": "9", "error": "", "flags": ""})
           for s in ("anna", "ben", "cara")]
    assert manual.merge_gradebook(tmp_path, res, {"q4": 2.0}) == cols + ["manual_ungraded"]
    by = {r["student"]: r for r in _rows(tmp_path / "gradebook.csv")}
    assert (by["anna"]["q4"], by["anna"]["total"], by["anna"]["possible"], by["anna"]["manual_ungraded"]) == ("1.5", "10.5", "11", "")
    assert by["ben"]["total"] == "9" and by["ben"]["manual_ungraded"].startswith("q4 (points '3' not a number from 0 to 2")
    assert by["cara"]["manual_ungraded"] == "q4" and by["cara"]["possible"] == "11"


def test_written_page_escapes_everything_and_shows_plots(tmp_path):
    nb = {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [
        {"cell_type": "markdown", "metadata": {}, "source": "## Question 3: x"},
        {"cell_type": "markdown", "metadata": {}, "source": "<!-- BEGIN QUESTION -->\n\n## Question 4: a batch of one"},
        {"cell_type": "code", "metadata": {}, "source": "plot()", "execution_count": 1, "outputs": [
            {"output_type": "display_data", "metadata": {}, "data": {"image/png": PNG, "text/plain": "<Figure>"}},
            {"output_type": "display_data", "metadata": {}, "data": {"text/html": SCRIPT}},
            {"output_type": "stream", "name": "stdout", "text": f"out {SCRIPT}\x1b[31m"}]},
        {"cell_type": "markdown", "metadata": {}, "source": f"my answer {SCRIPT}"},
        {"cell_type": "markdown", "metadata": {}, "source": "## Check your work"},
        {"cell_type": "markdown", "metadata": {}, "source": "after the question"}]}
    subs = tmp_path / "subs"
    subs.mkdir()
    (subs / "anna.ipynb").write_text(json.dumps(nb))
    (subs / "ben.ipynb").write_text("{ not json")
    rubric = {"q4": [{"id": "output", "points": 1, "item": "beta <b>"}]}
    manual.write_written_pages(tmp_path, {"anna": subs / "anna.ipynb", "ben": subs / "ben.ipynb"},
                               {"q4": 2.0}, rubric, None, "batch_norm.ipynb")
    page = (tmp_path / "written" / "q4.html").read_text()
    assert "<script" not in page and "&lt;script&gt;" in page and "\x1b" not in page
    assert f"data:image/png;base64,{PNG}" in page and "my answer" in page and "after the question" not in page
    assert page.index("Rubric for q4") < page.index("anna") and "beta &lt;b&gt;" in page
    assert "could not read this submission" in page
    anon = (tmp_path / "written" / "q4-anonymous.html").read_text()
    key = {r["student"]: r["number"] for r in _rows(tmp_path / "written" / "anonymous-key.csv")}
    assert ">anna<" not in anon and ">ben<" not in anon and f"Submission {key['anna']}" in anon
    manual.write_written_pages(tmp_path, {"anna": subs / "anna.ipynb", "ben": subs / "ben.ipynb",
                                          "cara": subs / "anna.ipynb"}, {"q4": 2.0}, rubric, None, "x.ipynb")
    key2 = {r["student"]: r["number"] for r in _rows(tmp_path / "written" / "anonymous-key.csv")}
    assert {k: key2[k] for k in key} == key and key2["cara"] not in key.values()  # numbers stay


def test_the_assignment_source_has_a_rubric_for_every_manual_question(grading_dist):
    _, manifest = grading_dist
    rub = manual.rubrics(manifest)
    assert rub and set(rub) == {q for q, c in manifest["questions"].items() if c["manual"]}
    for q, items in rub.items():
        assert items and sum(i["points"] for i in items) == manifest["questions"][q]["points"], q


# --------------------------------------------------------------------------- through `grade`, three runs


@pytest.fixture(scope="module")
def term(grading_dist, bwrap, tmp_path_factory):
    pytest.importorskip("otter")
    from bnviz.grading import cli

    dist, _ = grading_dist
    solution = json.loads((dist / "autograder" / "batch_norm.ipynb").read_text())
    subs, out = tmp_path_factory.mktemp("term-subs"), tmp_path_factory.mktemp("term-grades")
    (subs / "anna.ipynb").write_text(json.dumps(solution))
    (subs / "ben.ipynb").write_text((dist / "student" / "batch_norm.ipynb").read_text())
    argv = ["grade", str(subs), "--dist", str(dist), "--out", str(out), "--jobs", "1", "--timeout", "150", "--seed", "982451653"]
    assert cli.main(argv) == 0
    return SimpleNamespace(dist=dist, subs=subs, out=out, argv=argv, solution=solution)


def test_manual_grades_survive_a_late_file_a_resume_and_a_regrade(term):
    from bnviz.grading import cli

    rows = _rows(term.out / "manual.csv")
    assert [(r["student"], r["question"], r["points"]) for r in rows] == [("anna", "q4", ""), ("ben", "q4", "")]
    book = {r["student"]: r for r in _rows(term.out / "gradebook.csv")}
    assert book["anna"]["total"] == "19" and book["anna"]["possible"] == "21" and book["anna"]["manual_ungraded"] == "q4"
    # the instructor types grades (in Excel's way: CRLF) and a late file arrives
    typed = ("student,question,points,rubric_items,comment,grader\r\n"
             "anna,q4,2,output;consequences,\"clear, complete\",TA1\r\n"
             "ben,q4,0.5,output,only the output,TA2\r\n")
    (term.out / "manual.csv").write_bytes(typed.encode())
    (term.subs / "cara.ipynb").write_text(json.dumps(term.solution))
    for extra in ([], ["--regrade"]):
        assert cli.main(term.argv + extra) == 0
        assert (term.out / "manual.csv").read_bytes().startswith(typed.encode()), extra
        rows = _rows(term.out / "manual.csv")
        assert [(r["student"], r["points"]) for r in rows] == [("anna", "2"), ("ben", "0.5"), ("cara", "")], extra
        book = {r["student"]: r for r in _rows(term.out / "gradebook.csv")}
        assert (book["anna"]["q4"], book["anna"]["total"], book["anna"]["possible"]) == ("2", "21", "21"), extra
        assert book["ben"]["q4"] == "0.5" and float(book["ben"]["total"]) == float(book["ben"]["q1"] or 0) + float(
            book["ben"]["q2"] or 0) + float(book["ben"]["q3"] or 0) + 0.5, extra
        assert book["cara"]["manual_ungraded"] == "q4" and book["cara"]["total"] == "19", extra
        assert book["anna"]["manual_ungraded"] == "" and book["ben"]["manual_ungraded"] == "", extra


def test_written_page_of_the_graded_folder(term):
    page = (term.out / "written" / "q4.html").read_text()
    assert "Rubric for q4" in page and "running_var becomes NaN" in page  # the source's rubric
    assert "anna" in page and "ben" in page and "Type your answer here" in page  # ben's untouched hand-out
    assert "With one example per channel" in page  # anna's written answer
