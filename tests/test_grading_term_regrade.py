"""A term with bnviz (issue 24 item 5, part): one-student regrades and recorded seeds.

A regrade reuses each unchanged file's recorded seed (so a borderline tolerance cannot flip);
``--new-seed`` draws fresh ones; a changed file gets a fresh seed (its old inputs may have been
released); ``--only STUDENT`` grades that student again and resumes the others.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bnviz import grading
from bnviz.grading import seeds


def _seeds(out: Path) -> dict[str, int]:
    return {p.stem: json.loads(p.read_text())["seed"] for p in out.glob("*.json")}


def test_recorded_seeds_only_for_the_same_file(tmp_path):
    (tmp_path / "anna.json").write_text(json.dumps({"student": "anna", "submission_sha256": "aa", "seed": 5}))
    (tmp_path / "ben.json").write_text(json.dumps({"student": "ben", "submission_sha256": "bb", "seed": 6}))
    (tmp_path / "cara.json").write_text(json.dumps({"student": "x", "submission_sha256": "cc", "seed": 7}))
    (tmp_path / "dan.json").write_text("{broken")
    got = seeds.recorded_seeds(tmp_path, {"anna": "aa", "ben": "changed", "cara": "cc", "dan": "dd", "eve": "ee"})
    assert got == {"anna": 5}


def test_regrades_keep_seeds_new_seed_draws_and_only_regrades_one(grading_dist, bwrap, tmp_path):
    dist, manifest = grading_dist
    solution = (dist / "autograder" / "batch_norm.ipynb").read_text()
    subs, out = tmp_path / "subs", tmp_path / "grades"
    subs.mkdir()
    (subs / "anna.ipynb").write_text(solution)
    (subs / "ben.ipynb").write_text(solution)
    lines: list[str] = []

    def run(**kw):
        lines.clear()
        grading.grade_folder(subs, out, timeout_s=150, jobs=1, student_notebook=dist / manifest["student_notebook"],
                             manual_questions={"q4": 2}, forbidden=manifest["forbidden"],
                             log=lambda *a: lines.append(" ".join(map(str, a))), **kw)
        return _seeds(out)

    first = run()
    assert first["anna"] != first["ben"]
    assert run(regrade=True) == first  # both graded again, on the same inputs
    assert not any("kept from an earlier run" in ln for ln in lines)
    fresh = run(regrade=True, new_seed=True)
    assert fresh["anna"] != first["anna"] and fresh["ben"] != first["ben"]
    (subs / "ben.ipynb").write_text(solution.replace("# BEGIN", "# BEGIN ", 1) + "\n")  # a new submission
    assert (subs / "ben.ipynb").read_text() != solution
    again = run(only={"anna"})
    assert again["anna"] == fresh["anna"] and again["ben"] != fresh["ben"]  # the changed file: a fresh seed
    assert not any(ln.startswith("anna") and "kept" in ln for ln in lines)  # --only: graded again
    kept = run(only={"anna"})
    assert any(ln.startswith("ben") and "kept from an earlier run" in ln for ln in lines)  # the others resume
    assert not any(ln.startswith("anna") and "kept" in ln for ln in lines)
    assert kept == again
