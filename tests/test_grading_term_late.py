"""A term with bnviz (issue 24 item 5, part): a late policy from assignment.json, extensions, and
the gradebook's raw score, penalty and final score (which the LMS CSVs export)."""

from __future__ import annotations

import csv
import json
import os
import shutil
from datetime import datetime, timezone

import pytest

from bnviz.grading import late

DUE = "2026-12-01T23:59:00+00:00"


def _ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


def test_percent_per_day_zero_after_and_extensions():
    p = late.parse_policy({"late": {"due": DUE, "policy": "percent_per_day", "percent_per_day": 10,
                                    "zero_after": "2026-12-05T23:59:00Z", "extensions": {"ext": "+3d", "abs": "2026-12-10T00:00:00Z"}}})
    assert late.assess(p, "a", "2026-12-01T23:00:00+00:00") == (0.0, 0.0, "")
    days, share, _ = late.assess(p, "a", "2026-12-02 09:00:00.123456789 +01:00")  # Gradescope's format: 9 h late
    assert (days, share) == (1.0, pytest.approx(0.1))
    assert late.assess(p, "a", "2026-12-04T00:00:01Z")[:2] == (3.0, pytest.approx(0.3))
    assert late.assess(p, "a", "2026-12-06T00:00:00Z")[1] == 1.0  # after zero_after
    assert late.assess(p, "ext", "2026-12-04T00:00:01Z")[:2] == (0.0, 0.0)  # +3 days
    assert late.assess(p, "abs", "2026-12-09T00:00:00Z")[:2] == (0.0, 0.0)  # past zero_after, within the extension
    assert late.assess(p, "a", "2026-11-30T00:00:00Z", canvas_late=True)[:2] == (1.0, pytest.approx(0.1))
    z = late.parse_policy({"late": {"due": DUE, "policy": "zero_after"}})
    assert late.assess(z, "a", "2026-12-02T00:00:00Z")[1] == 1.0 and late.assess(z, "a", DUE)[1] == 0.0
    assert late.parse_policy({"late": {"policy": "none"}}) is None and late.parse_policy({}) is None
    with pytest.raises(late.PolicyError):
        late.parse_policy({"late": {"due": DUE, "policy": "half"}})


def test_merge_shows_raw_penalty_final(tmp_path):
    from types import SimpleNamespace

    from bnviz.grading import manual

    (tmp_path / "manual.csv").write_text("student,question,points,rubric_items,comment,grader\na,q4,2,,,\n")
    res = [SimpleNamespace(student="a", total=18.0, possible_total=19.0,
                           row={"student": "a", "q1": "9", "q4": "", "total": "18", "possible": "19", "error": "", "flags": ""})]
    manual.merge_gradebook(tmp_path, res, {"q4": 2.0}, {"a": (2.0, 0.2, "2 day(s) late x 10%")})
    with open(tmp_path / "gradebook.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert (row["total"], row["late_days"], row["penalty"], row["final"]) == ("20", "2", "4", "16")


def test_a_late_file_loses_points_in_the_gradebook_and_canvas_csv(grading_dist, bwrap, tmp_path):
    from bnviz.grading import cli

    dist0, _ = grading_dist
    dist = tmp_path / "dist"
    shutil.copytree(dist0, dist)
    manifest = json.loads((dist / "assignment.json").read_text())
    manifest["late"] = {"due": DUE, "policy": "percent_per_day", "percent_per_day": 25, "extensions": {"23456": "+5d"}}
    (dist / "assignment.json").write_text(json.dumps(manifest))
    subs = tmp_path / "subs"
    subs.mkdir()
    solution = (dist / "autograder" / "batch_norm.ipynb").read_text()
    for name, when in [("alphaanna_LATE_12345_901_batch_norm.ipynb", "2026-12-03T10:00:00"),
                       ("bravoben_LATE_23456_902_batch_norm.ipynb", "2026-12-03T10:00:00")]:
        (subs / name).write_text(solution)
        os.utime(subs / name, (_ts(when), _ts(when)))
    out = tmp_path / "g"
    assert cli.main(["grade", str(subs), "--dist", str(dist), "--out", str(out), "--seed", "982451653"]) == 0
    with open(out / "gradebook.csv", newline="") as f:
        book = {r["student"]: r for r in csv.DictReader(f)}
    a, b = book["12345"], book["23456"]
    assert (a["total"], a["late_days"], a["penalty"], a["final"]) == ("19", "2", "9.5", "9.5")
    assert (b["late_days"], b["penalty"], b["final"]) == ("0", "0", "19")  # extension
    with open(out / "canvas.csv", newline="") as f:
        canvas = {r["ID"]: r for r in csv.DictReader(f)}
    assert canvas["12345"]["batch_norm"] == "9.5" and canvas["23456"]["batch_norm"] == "19"
    manifest["late"]["policy"] = "weekly"
    (dist / "assignment.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit):  # a wrong policy stops before grading
        cli.main(["grade", str(subs), "--dist", str(dist), "--out", str(out)])
    assert cli.main(["feedback", str(out), "--dist", str(dist0)]) == 0
    page_a = (out / "feedback" / "12345.html").read_text()
    page_b = (out / "feedback" / "23456.html").read_text()
    assert "Late: 2 day(s); penalty 9.5 points; final score 9.5 / 21" in page_a and "Late:" not in page_b
