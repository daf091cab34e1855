"""Scoring: what a sandbox report is worth. Used by the judge child (``judge.py``), which alone
handles what a student made, and by the driver (``grade.py``) for the rows of submissions that got
no report. Nothing here runs student code or writes a file.

``judge_report`` parses one report (``report.parse``: a strict schema), compares the normal pass
with the references (``checker.judge_all``), applies the rules (the source scan's findings, the
advisory tripwires, the strict re-run) and returns the scores, failed tests, flags and errors.
``tamper_notes`` lists what an instructor should look at by hand in a notebook's cells.
"""

from __future__ import annotations

import re

from . import checker, report, rules
from .text import clean, natural_key

_CHECK_RE = re.compile(r"""^grader\.check\(\s*["'](\w+)["']\s*\)$""")
_GRADER_RE = re.compile(r"\b(Checker|GradingResults|otter\.(execute|test_files|run|api)|OK_FORMAT|init_grading_mode"
                        r"|doctest|DocTestRunner)\b|\bgrader\s*\.\s*\w+\s*=(?!=)|\bgrader\s*=(?!=)(?!\s*otter\.Notebook\()")


def tamper_notes(sources: list[tuple[str, str]], otter_tests: bool, handed_out: list[str] | None) -> list[str]:
    """Reasons to look at a submission by hand (grading never uses anything the notebook carries).
    ``sources``: (cell_type, source) of every cell; ``handed_out``: the student notebook's code
    cells (None: not known)."""
    notes = []
    given = {s.strip() for s in handed_out or []}
    if handed_out is not None:
        expected = [s for s in given if _CHECK_RE.match(s)]
        present = {s.strip() for kind, s in sources if kind == "code"}
        missing = sorted(_CHECK_RE.match(e).group(1) for e in expected if e not in present)
        if missing:
            notes.append("check cells edited or deleted for " + ", ".join(missing))
    if otter_tests:
        notes.append("notebook carries its own tests in its metadata")
    for i, (kind, source) in enumerate(sources):
        if kind != "code" or source.strip() in given:
            continue
        lines = [ln.strip() for ln in source.splitlines()]
        if any(_GRADER_RE.search(ln) for ln in lines if ln and not ln.startswith("#") and not _CHECK_RE.match(ln)):
            notes.append(f"cell {i} touches the grader or test machinery")
    if notes:
        notes.append("graded with the official tests")
    return notes


_MEMORY_WORDS = ("MemoryError", "can't allocate memory", "Cannot allocate memory")


def cell_error_text(cell_errors: list, memory_text: str) -> list[str]:
    """The error column's words for cells that raised (``cell_errors`` passed ``report.parse``:
    short strings; plain substring tests, linear in their length)."""
    if not cell_errors:
        return []
    first = cell_errors[0]
    out = [f"{len(cell_errors)} cell(s) raised; first: cell {int(first['cell'])}: student code raised "
           f"{clean(first['error'])}"]
    if any(w in e["error"] for e in cell_errors for w in _MEMORY_WORDS):
        out.append(f"memory limit ({memory_text}) reached: an allocation failed (grading went on)")
    return out


def _scores(tests: list, probes: dict) -> tuple[dict[str, float], list[dict]]:
    scores: dict[str, float] = {}
    failed = []
    for t in checker.judge_all(tests, probes):
        scores.setdefault(t["question"], 0.0)
        if t["passed"]:
            scores[t["question"]] += t["points"]
        else:  # a reason may quote the report, which the submission could have forged: clean it
            failed.append({**{k: t[k] for k in ("question", "name", "hidden", "points")},
                           "reason": clean(t["reason"], 300)})
    return scores, failed


def _tripwire_trouble(tw: dict, passed_questions: set[str]) -> tuple[str | None, bool]:
    """(why the sandbox's advisory tripwires cannot be trusted for this submission, withhold all?).

    Missing or removed tripwires withhold everything (honest code never touches them). A question
    under rules (``passed_questions`` holds only those) whose calls the dispatch mode saw no aten
    op for is only flagged: code that works on numpy arrays and converts back can be honest."""
    if not tw.get("installed"):
        return "tripwire report missing: all points withheld, check by hand", True
    if not tw.get("intact"):
        return "tripwires removed or replaced by the submission (advisory in-process check): all points withheld, check by hand", True
    blind = sorted(q for q in passed_questions if not tw["ops"].get(q))
    if blind:
        return f"advisory: the run-time tripwire saw no torch operation for {', '.join(blind)}: check by hand", False
    return None, False


def _strict_flags(tests, rules_: dict, raw: dict, scores: dict, strict: dict | None, flagged: set,
                  normal_probes: dict) -> tuple[list[str], bool]:
    """(flags, withhold all?) from the strict pass: a question that scores less (than ``raw``, its
    normal-pass score) when the forbidden kernels raise (and, where forbidden, autograd) only works
    with them; its points in ``scores`` are withheld. Questions already ``flagged`` get a
    confirmation."""
    if strict is None:
        return ["the strict re-run (forbidden kernels raising) gave no report: all points withheld, check by hand"], True
    if not strict["intact"]:
        return ["the strict re-run's raising kernels were removed by the submission: all points withheld, check by hand"], True
    # a test that failed in another question's function (q2's test runs the q1 forward first) is
    # judged from the normal pass; said in the flags when that question itself is not flagged
    skipped = {k: v["skipped"] for k, v in strict["probes"].items() if isinstance(v.get("skipped"), str)}
    probes = {**strict["probes"], **{k: normal_probes[k] for k in skipped if k in normal_probes}}
    strict_scores, strict_failed = _scores(tests, probes)
    flags = []
    unchecked = sorted({t.question for t in tests for p in t.probes if str(p["id"]) in skipped} - flagged, key=natural_key)
    if unchecked:
        flags.append(f"advisory: the strict re-run could not check {', '.join(unchecked)} on its own "
                     "(its tests need another question's function, which needs a forbidden API)")
    for q in sorted(rules_, key=natural_key):
        if raw.get(q, 0.0) <= strict_scores.get(q, 0.0) + 1e-9:
            continue
        what = " / ".join(rules.DESCRIBE[f] for f in sorted(rules_[q]))
        why = clean(next((t["reason"] for t in strict_failed if t["question"] == q), ""), 100)
        if q in flagged:
            flags.append(f"{q}: confirmed by the strict re-run, where {what} cannot run ({why})")
            continue
        flags.append(f"{q}: {raw[q]:g} points withheld, its answer works only while {what} can run "
                     f"(strict re-run: {why})")
        scores[q] = 0.0
    return flags, False


def judge_report(tests: list, rules_: dict[str, set[str]], data: bytes, scanned: dict, memory_text: str) -> dict:
    """Parse, check and judge one sandbox report (runs in the judge child): {scores, failed_tests,
    flags, errors, judged}."""
    try:
        normal, strict = report.parse(data)
    except report.ReportError as e:
        return {"errors": [f"the sandbox's report was rejected ({clean(e, 200)}); no score"], "judged": False}
    errors = cell_error_text(normal["cell_errors"], memory_text)
    scores, failed = _scores(tests, normal["probes"])
    raw, flags = dict(scores), []
    tw = normal["tripwire"]
    flagged = set()
    for question, reasons in rules.violations(scanned, tw["hits"], rules_).items():
        lost = f"{scores[question]:g} points withheld, " if scores.get(question) else ""
        flags.append(f"{question}: {lost}forbidden " + "; ".join(reasons))
        scores[question] = 0.0
        flagged.add(question)
    withhold = False
    if rules_:
        more, withhold = _strict_flags(tests, rules_, raw, scores, strict, flagged, normal["probes"])
        flags += more
    trouble, withhold_tw = _tripwire_trouble(tw, {q for q, s in scores.items() if s and q in rules_})
    if trouble:
        flags.append(trouble)
    if withhold or withhold_tw:
        scores = {q: 0.0 for q in scores}
    return {"scores": scores, "failed_tests": failed, "flags": flags, "errors": errors, "judged": True}


def no_result(tests) -> list[dict]:
    return [{"question": t.question, "name": t.name, "hidden": t.hidden, "points": t.points, "reason": "no result"}
            for t in tests]
