"""Overrides (issue 24 item 5, part): ``grades/overrides.csv`` (``student, target, points,
reason``), the instructor's file, applied after judging on every ``grade`` run and logged in the
student's JSON.

* ``target`` a question (``q1``): that question's score becomes ``points``.
* ``target`` a test (``q1 - 3``, as in ``failed_tests`` and ``items.csv``): that test is worth
  ``points`` instead of what it got (0 if it failed, its points if it passed); the question's
  score changes by the difference.
Scores stay between 0 and the question's points. Manual questions are graded in ``manual.csv``,
not here. A row naming an unknown student, question or test, or whose points are not a number,
is not applied and is printed.

The JSON keeps the judged scores (``judged_scores``) next to the scores after overrides
(``scores``, ``total``, ``row``) and the overrides applied (``overrides``: target, points, reason,
the question's score before and after), so running again (resumed or not) applies the current
file to the judged scores, never twice.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .records import MAX_JSON_BYTES, atomic_write, gradebook_row

COLUMNS = ["student", "target", "points", "reason"]


def read_overrides(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8-sig") as f:
        return [{k.strip().lower(): (v or "").strip().lstrip("'") for k, v in r.items() if k} for r in csv.DictReader(f)]


def _judged(out: Path, r) -> dict[str, float]:
    """The scores as judged: the JSON's ``judged_scores`` for a resumed result, else its scores."""
    if getattr(r, "resumed", False):
        path = out / f"{r.student}.json"
        try:
            if path.stat().st_size <= MAX_JSON_BYTES:
                data = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(data.get("judged_scores"), dict):
                    return {q: float(v) for q, v in data["judged_scores"].items()}
        except (OSError, ValueError, TypeError, AttributeError):
            pass
    return {q: float(v) for q, v in r.scores.items()}


def apply_overrides(out: Path, results: list, tests: list[tuple[str, str, bool, float]],
                    manual: dict[str, float], log=print) -> list[str]:
    """Apply ``<out>/overrides.csv`` to ``results`` (scores, total, row) and rewrite their JSON.
    Returns the problems (rows not applied)."""
    rows = read_overrides(out / "overrides.csv")
    by_student = {r.student: r for r in results}
    test_of = {name: (q, pts) for q, name, _hidden, pts in tests}
    problems, wanted = [], {}
    for i, row in enumerate(rows, start=2):
        s, target = row.get("student", ""), row.get("target", "")
        try:
            points = float(row.get("points", ""))
        except ValueError:
            points = None
        r = by_student.get(s)
        why = ("unknown student" if r is None else "a manual question: use manual.csv" if target in manual
               else "unknown question or test" if target not in test_of and target not in r.possible
               else "points not a number" if points is None or points != points else "")
        if why:
            problems.append(f"overrides.csv line {i}: {why} ({s!r}, {target!r}); not applied")
            continue
        wanted.setdefault(s, []).append((target, points, row.get("reason", "")))
    for r in results:
        judged = _judged(out, r)
        scores, applied = dict(judged), []
        for target, points, reason in wanted.get(r.student, []):
            if target in test_of:
                q, pts = test_of[target]
                failed = any(f.get("name") == target for f in r.failed_tests or [])
                got = 0.0 if failed else pts
                new = scores.get(q, 0.0) + points - got
            else:
                q, new = target, points
            new = min(max(new, 0.0), float(r.possible.get(q, 0.0)))
            applied.append({"target": target, "points": points, "reason": reason, "question": q,
                            "before": scores.get(q, 0.0), "after": new})
            scores[q] = new
        if not applied and scores == {q: float(v) for q, v in r.scores.items()}:
            continue  # nothing to apply, nothing applied before
        r.scores, r.total = scores, float(sum(scores.values()))
        r.row = gradebook_row(r, list(r.row), manual) if r.row else r.row
        data = r.to_dict()
        data["judged_scores"], data["overrides"] = judged, applied
        path = out / f"{r.student}.json"
        try:
            atomic_write(path, json.dumps(data, indent=2))
        except (OSError, ValueError) as e:
            problems.append(f"{r.student}: could not record the overrides ({type(e).__name__})")
        for a in applied:
            log(f"override {r.student} {a['target']}: {a['question']} {a['before']:g} -> {a['after']:g} ({a['reason']})")
    for p in problems:
        log(p)
    return problems
