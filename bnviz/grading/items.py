"""What the instructor learns (issue 24 item 8, part): ``grades/items.csv``, the class pass rate
per test, so a misread specification shows (a test that most of the class fails).

Columns: ``question, test, hidden, points, passed, failed, no_result, pass_rate``. ``no_result``:
students whose notebook gave that test no result (it did not run, timed out, was unreadable);
``pass_rate`` = passed / (passed + failed), empty when nobody was judged on it.
"""

from __future__ import annotations

from pathlib import Path

from .records import write_table

NO_RESULT = "no result"


def write_items(out: Path, results: list, tests: list[tuple[str, str, bool, float]]) -> list[list[str]]:
    """``tests``: (question, name, hidden, points) of every autograded test, in order."""
    rows = []
    for q, name, hidden, points in tests:
        passed = failed = none = 0
        for r in results:
            got = next((f for f in (r.failed_tests or []) if f.get("name") == name), None)
            if got is None:
                passed += 1
            elif str(got.get("reason") or "").startswith(NO_RESULT):
                none += 1
            else:
                failed += 1
        rate = f"{passed / (passed + failed):.2f}" if passed + failed else ""
        rows.append([q, name, "yes" if hidden else "", f"{points:g}", str(passed), str(failed), str(none), rate])
    write_table(out / "items.csv", ["question", "test", "hidden", "points", "passed", "failed", "no_result", "pass_rate"], rows)
    return rows


def write_histogram(out: Path, results: list, questions: dict[str, float], log=print) -> list[list[str]]:
    """``<out>/histogram.csv`` (``question, score, students``: how many students got each score of
    each autograded question, every score from 0 to the points in steps of 1 plus any other score
    seen) and a text histogram in the log."""
    from .text import natural_key

    rows = []
    for q in sorted(questions, key=natural_key):
        counts: dict[float, int] = {float(k): 0 for k in range(int(questions[q]) + 1)}
        for r in results:
            s = float(r.scores.get(q, 0.0))
            counts[s] = counts.get(s, 0) + 1
        width = max(counts.values()) or 1
        log(f"{q} ({questions[q]:g} points):")
        for s in sorted(counts):
            rows.append([q, f"{s:g}", str(counts[s])])
            log(f"  {s:>5g} | {'#' * round(30 * counts[s] / width)} {counts[s]}")
    write_table(out / "histogram.csv", ["question", "score", "students"], rows)
    return rows
