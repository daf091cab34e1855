"""Feedback students can be given (issue 24 item 2): ``python -m bnviz.grading feedback GRADES``.

For each ``GRADES/<student>.json`` written by ``grade``: ``GRADES/feedback/<student>.html`` and
all of them in ``GRADES/feedback/feedback.zip`` (one ``<student>.html`` per student, for an LMS's
bulk feedback upload or a mail merge). A page holds, for that student only: the score per question
(manual points included) and per test, the visible tests' messages, the manual points with the
rubric items given and the grader's comment, and what stopped the notebook (a cell that raised, a
time-out, a cell magic that is not run) in words a student can act on.

Never on a page: another student's name (the page is built from this student's JSON and their
``manual.csv`` rows only, never from ``flags``, ``notes``, ``similarity.html`` or the log), the
sandbox's internals (limits, exit statuses, the report's rejection, seeds, hashes), similarity
flags. Hidden tests show only passed / failed and their points; their messages (which can quote
hidden inputs) only with ``release_hidden=True`` (``--release-hidden``).
"""

from __future__ import annotations

import html
import io
import json
import re
import zipfile
from pathlib import Path

from . import manual as manual_mod
from .records import MAX_JSON_BYTES, atomic_write
from .text import clean, natural_key

STYLE = ("body{font-family:sans-serif;max-width:50em;margin:auto}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left}.fail{color:#a00}.pass{color:#070}")
# clauses of the error column a student may read (their own code's failure); any other clause
# (the grader's or the sandbox's) becomes OTHER
_STUDENT_ERRORS = (re.compile(r"^\d+ cell\(s\) raised; first: cell \d+: student code raised "),
                   re.compile(r"^cell \d+ not run: "), re.compile(r"^timed out after [\d.]+ s"),
                   re.compile(r"^invalid (?:notebook|submission)"), re.compile(r"^unreadable submission"))
OTHER = "grading could not finish for a reason on the grader's side: ask your instructor"


def _all_tests() -> list[tuple[str, str, bool, float]]:
    """(question, test name, hidden, points) of every autograded test (the same for every seed)."""
    from . import checker

    return [(t.question, t.name, t.hidden, t.points) for t in checker.make_tests(0)]


def student_error(error: str) -> list[str]:
    out, clauses = [], []
    for c in filter(None, (c.strip() for c in (error or "").split("; "))):
        if c.startswith("first: ") and clauses:  # the cell error's own "N cell(s) raised; first: ..."
            clauses[-1] += "; " + c
        else:
            clauses.append(c)
    for clause in clauses:
        if any(p.match(clause) for p in _STUDENT_ERRORS):
            clause = re.sub(r" \(killed; no score\)$", " (no score)", clause)
            out.append(clean(clause, 300))
        elif "memory limit" in clause:
            out.append("your notebook ran out of memory")
        elif OTHER not in out and not clause.startswith("memory limit"):
            out.append(OTHER)
    return out


def _score_table(scores, possible, manual, manual_rows) -> tuple[str, float, float]:
    """The per-question table; returns it with the total (manual points included) and the maximum."""
    e = html.escape
    total, out_of = sum(scores.values()), sum(possible.values()) + sum(manual.values())
    rows = []
    for q in sorted(set(possible) | set(manual), key=natural_key):
        if q in manual:
            v = manual_rows.get(q, (None,))[0]
            total += v or 0.0
            rows.append(f"<tr><td>{e(q)}</td><td>{'not graded yet' if v is None else f'{v:g}'} / {manual[q]:g}</td>"
                        "<td>graded by hand</td></tr>")
        else:
            rows.append(f"<tr><td>{e(q)}</td><td>{scores.get(q, 0.0):g} / {possible[q]:g}</td><td>autograded</td></tr>")
    table = (f"<h2>Score: {total:g} / {out_of:g}</h2><table><tr><th>question</th><th>points</th><th></th></tr>"
             + "".join(rows) + "</table>")
    return table, total, out_of


def _tests_table(tests, failed: dict, release_hidden: bool) -> str:
    """Every test with its result; a hidden test's message only after ``release_hidden``."""
    e = html.escape
    trs = []
    for q, name, hidden, points in tests:
        f = failed.get(name)
        status = "<span class=pass>passed</span>" if f is None else "<span class=fail>failed</span>"
        got = points if f is None else 0.0
        if f is None:
            msg = ""
        elif hidden and not release_hidden:
            msg = "hidden test: its message is released after grading"
        else:
            msg = clean(f.get("reason") or "", 400)
        trs.append(f"<tr><td>{e(name)}{' (hidden)' if hidden else ''}</td><td>{status}</td><td>{got:g} / {points:g}</td>"
                   f"<td>{e(msg)}</td></tr>")
    return ("<h2>Tests</h2><table><tr><th>test</th><th>result</th><th>points</th><th>message</th></tr>"
            + "".join(trs) + "</table>")


def _adjustments(data: dict, scores, possible, tests, failed: dict) -> list[str]:
    """Overrides (what changed, not the instructor's reason) and points withheld under the rules."""
    e = html.escape
    parts = []
    adjusted = [o for o in data.get("overrides") or [] if isinstance(o, dict)]
    if adjusted:
        parts.append("<h2>Adjusted by your instructor</h2><ul>" + "".join(
            f"<li>{e(str(o.get('target', '')))}: {e(str(o.get('question', '')))} "
            f"{float(o.get('before', 0)):g} &rarr; {float(o.get('after', 0)):g} points</li>" for o in adjusted) + "</ul>")
    judged = {q: float(v) for q, v in (data.get("judged_scores") or scores).items()}
    lowered = [q for q in possible if judged.get(q, 0.0) < sum(p for qq, n, _, p in tests if qq == q and n not in failed) - 1e-9]
    if lowered:
        parts.append("<p>" + e(", ".join(sorted(lowered, key=natural_key))) + ": points withheld under the "
                     "assignment's rules (for example a forbidden function); ask your instructor.</p>")
    return parts


def _manual_section(q: str, out_of: float, manual_row: tuple, rubric: list[dict]) -> str:
    """One hand-graded question: points, the rubric items given (ticked) and the grader's comment."""
    e = html.escape
    v, _why, row = manual_row
    given = {s.strip() for s in re.split(r"[;,]", (row or {}).get("rubric_items", "")) if s.strip()}
    items = "".join(f"<li>{'&#10003;' if str(r.get('id')) in given else '&#10007;'} {e(str(r.get('item', '')))} "
                    f"({float(r.get('points', 0)):g} pt)</li>" for r in rubric)
    comment = (row or {}).get("comment", "").lstrip("'")
    return (f"<h2>{e(q)} (graded by hand): {'not graded yet' if v is None else f'{v:g}'} / {out_of:g}</h2>"
            + (f"<ul>{items}</ul>" if items and v is not None else "")
            + (f"<p>Comment: {e(clean(comment, 2000))}</p>" if comment and v is not None else ""))


def page(data: dict, manual_rows: dict[str, tuple], manual: dict[str, float], rubric: dict[str, list[dict]],
         tests: list[tuple[str, str, bool, float]], release_hidden: bool, late_row: dict | None = None) -> str:
    """One student's feedback page (HTML) from their JSON and their manual.csv entries."""
    e = html.escape
    failed = {f.get("name"): f for f in data.get("failed_tests") or [] if isinstance(f, dict)}
    scores = {q: float(v) for q, v in (data.get("scores") or {}).items()}
    possible = {q: float(v) for q, v in (data.get("possible") or {}).items()}
    table, _total, out_of = _score_table(scores, possible, manual, manual_rows)
    parts = [table]
    if late_row and late_row.get("final", "") != "" and late_row.get("late_days", "0") not in ("", "0"):
        parts.append(f"<p>Late: {e(late_row['late_days'])} day(s); penalty {e(late_row.get('penalty', ''))} points; "
                     f"final score {e(late_row['final'])} / {out_of:g}.</p>")
    errors = student_error(data.get("error", ""))
    if errors:
        parts.append("<h2>What stopped your notebook</h2><ul>" + "".join(f"<li>{e(x)}</li>" for x in errors) + "</ul>")
    parts.append(_tests_table(tests, failed, release_hidden))
    parts += _adjustments(data, scores, possible, tests, failed)
    parts += [_manual_section(q, manual[q], manual_rows.get(q, (None, "", None)), rubric.get(q, []))
              for q in sorted(manual, key=natural_key)]
    student = str(data.get("student", ""))
    return (f"<!doctype html><meta charset=utf-8><title>Feedback: {e(student)}</title><style>{STYLE}</style>"
            f"<h1>Feedback for {e(student)}</h1>" + "".join(parts))


def write_feedback(grades: Path, manifest: dict, release_hidden: bool = False) -> list[Path]:
    """``<grades>/feedback/<student>.html`` for every student JSON in ``grades`` and
    ``<grades>/feedback/feedback.zip`` holding them. Returns the pages."""
    grades = Path(grades)
    manual = {q: float(c["points"] or 0) for q, c in manifest.get("questions", {}).items() if c.get("manual")}
    rubric = manual_mod.rubrics(manifest)
    points = manual_mod.manual_points(manual_mod.read_manual(grades / "manual.csv"), manual)
    tests = _all_tests()
    late_rows = {}
    if (grades / "gradebook.csv").is_file():  # only the late columns are read from it
        import csv

        with open(grades / "gradebook.csv", newline="", encoding="utf-8") as f:
            late_rows = {r.get("student", "").lstrip("'"): {k: (r.get(k) or "").lstrip("'") for k in ("late_days", "penalty", "final")}
                         for r in csv.DictReader(f)}
    fb = grades / "feedback"
    fb.mkdir(exist_ok=True)
    pages = []
    for path in sorted(grades.glob("*.json"), key=lambda p: natural_key(p.stem)):
        try:
            if path.stat().st_size > MAX_JSON_BYTES:
                continue
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or data.get("student") != path.stem or "failed_tests" not in data:
            continue
        target = fb / f"{path.stem}.html"
        atomic_write(target, page(data, points.get(path.stem, {}), manual, rubric, tests, release_hidden, late_rows.get(path.stem)))
        pages.append(target)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in pages:
            zf.write(p, p.name)
    atomic_write(fb / "feedback.zip", buf.getvalue())
    return pages
