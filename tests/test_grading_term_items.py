"""A term with bnviz (issue 24 item 8, part): grades/items.csv, the class pass rate per test."""

from __future__ import annotations

import csv
from types import SimpleNamespace

from bnviz.grading import items

TESTS = [("q1", "q1 - 1", False, 1.0), ("q1", "q1 - 2", True, 2.0), ("q2", "q2 - 1", False, 1.0)]


def test_items_counts_pass_fail_and_no_result(tmp_path):
    res = [SimpleNamespace(failed_tests=[]),
           SimpleNamespace(failed_tests=[{"name": "q1 - 2", "reason": "running_var differs"}]),
           SimpleNamespace(failed_tests=[{"name": "q1 - 2", "reason": "wrong"}, {"name": "q2 - 1", "reason": "no result"}]),
           SimpleNamespace(failed_tests=[{"name": n, "reason": "no result (the submission did not finish this test)"}
                                         for _, n, _, _ in TESTS])]
    items.write_items(tmp_path, res, TESTS)
    with open(tmp_path / "items.csv", newline="") as f:
        rows = {r["test"]: r for r in csv.DictReader(f)}
    assert (rows["q1 - 1"]["passed"], rows["q1 - 1"]["failed"], rows["q1 - 1"]["no_result"], rows["q1 - 1"]["pass_rate"]) == ("3", "0", "1", "1.00")
    assert (rows["q1 - 2"]["passed"], rows["q1 - 2"]["failed"], rows["q1 - 2"]["pass_rate"], rows["q1 - 2"]["hidden"]) == ("1", "2", "0.33", "yes")
    assert (rows["q2 - 1"]["passed"], rows["q2 - 1"]["no_result"], rows["q2 - 1"]["pass_rate"]) == ("2", "2", "1.00")


def test_histogram_counts_each_score(tmp_path):
    res = [SimpleNamespace(scores={"q1": 9.0, "q2": 4.0}), SimpleNamespace(scores={"q1": 9.0, "q2": 1.5}),
           SimpleNamespace(scores={"q1": 0.0, "q2": 4.0})]
    lines: list[str] = []
    items.write_histogram(tmp_path, res, {"q1": 9.0, "q2": 4.0}, log=lines.append)
    with open(tmp_path / "histogram.csv", newline="") as f:
        rows = {(r["question"], r["score"]): int(r["students"]) for r in csv.DictReader(f)}
    assert rows[("q1", "9")] == 2 and rows[("q1", "0")] == 1 and rows[("q1", "5")] == 0
    assert rows[("q2", "1.5")] == 1 and rows[("q2", "4")] == 2 and sum(rows.values()) == 6
    assert any(ln.startswith("q2 (4 points)") for ln in lines)
