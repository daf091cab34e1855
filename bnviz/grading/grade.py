"""``grade``: grade a folder of submissions. The trusted side: it never imports student code.

For each submission, in order: read the notebook as data, turn IPython syntax into Python and scan
the source (``ingest.py``, ``rules.py``), run its code cells and the test inputs in a fresh sandbox
(``sandbox.py``, ``worker.py``: a normal pass and a strict pass), parse and check the worker's
report against a strict schema (``report.py``) and judge it against references computed here
(``checker.py``). Reading, scanning, parsing and judging happen in a child process with its own
memory and time limits (``judge.py``), so no submission can stall or crash the run.

Records (``<out>`` is the grades folder): ``<out>/<student>.json`` and ``<out>/logs/<student>.log``
are written, each atomically, as soon as that student is judged, so a crash loses nothing already
graded; ``<out>/gradebook.csv`` and ``<out>/skipped.csv`` (every file of the folder that is not
graded, and why) are written atomically at the end. Run again, ``grade_folder`` resumes: a
submission whose JSON is there, final, and made from the same file (SHA-256) under the same
questions and rules is not graded again (``regrade=True`` starts over). No cell of a CSV starts
with ``= + - @`` (such a cell gets a leading ``'``).
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import hashlib
import io
import json
import os
import queue
import re
import secrets
import shutil
import tempfile
import threading
import time
import unicodedata
from pathlib import Path
from typing import Any

from . import checker, ingest, report, rules, sandbox, similarity, worker
from .build import natural_key
from .judge import GiB, Judge, JudgeError

MAX_TEXT = 120
FORMAT = 2  # of the per-student JSON; part of the resume fingerprint


def clean(text: Any, limit: int = MAX_TEXT) -> str:
    """One line of printable text, at most ``limit`` characters. Only for text that is bounded
    already (validated report fields, our own messages): never for an unvalidated object."""
    text = str(text)[:max(4 * limit, 1000)]
    text = "".join(ch if unicodedata.category(ch)[0] not in "CZ" or ch == " " else " " for ch in text)
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[:limit - 1] + "…"


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


# --------------------------------------------------------------------------- one submission


def _variant(student_nb: dict | None):
    """The class variant recorded in the built student notebook (None: PyTorch's conventions)."""
    variant_of = getattr(checker, "variant_of", None)
    v = variant_of(student_nb) if variant_of else None
    return None if v is None or getattr(v, "is_default", False) else v


class Session:
    """What every submission of one grading run shares: tests (inputs drawn once per run from a
    fresh seed, references computed once), sandbox settings, rules, question list."""

    def __init__(self, work: Path, backend: str, limits: sandbox.Limits, masks: list[Path],
                 forbidden: dict[str, set[str]], student_nb: dict | None, seed: int | None = None,
                 docker_image: str | None = None):
        self.seed = secrets.randbits(62) if seed is None else int(seed)
        self.variant = _variant(student_nb)  # the class variant (build --variant)
        self.tests = checker.make_tests(self.seed, self.variant) if self.variant else checker.make_tests(self.seed)
        self.questions = checker.question_points(self.tests)
        self.probes = [p for t in self.tests for p in t.probes]
        self.work, self.backend, self.limits, self.masks = work, backend, limits, masks
        self.forbidden, self.student_nb, self.docker_image = forbidden, student_nb, docker_image
        self.worker_root = sandbox.make_worker_root(work / "worker")
        # the strict pass: batch-norm kernels raise throughout; autograd during these questions' probes
        self.strict = {"batch_norm": any("batch_norm" in f for f in forbidden.values()),
                       "autograd_phases": sorted(q for q, f in forbidden.items() if "autograd" in f)} if forbidden else None
        # two passes: the worker gives each the time limit; the sandbox as a whole gets both
        self.run_limits = limits if not self.strict else dataclasses.replace(
            limits, timeout_s=2 * limits.timeout_s + 15, cpu_seconds=2 * (limits.cpu_seconds or int(limits.timeout_s) + 1))

    def request(self, cells: list) -> bytes:
        import torch

        buf = io.BytesIO()
        limits = {**self.run_limits.for_worker(), "report_bytes": self.limits.report_bytes,
                  "pass_seconds": self.limits.timeout_s if self.strict else None}
        torch.save({"cells": [(int(i), str(c)) for i, c in cells], "probes": self.probes, "limits": limits,
                    "strict": self.strict}, buf)
        return buf.getvalue()

    def judge_config(self, handed_out: list[str] | None, preferred: str) -> dict:
        return {"seed": self.seed, "rules": {q: sorted(f) for q, f in self.forbidden.items()},
                "handed_out": handed_out, "preferred": preferred,
                "variant": self.variant.to_dict() if self.variant is not None else None}


def load_report(data: bytes | None) -> dict | None:
    """The worker's normal-pass report, parsed and checked (``report.parse``), or None."""
    try:
        return report.parse(data)[0]
    except report.ReportError:
        return None


def _empty_result(name: str, path: Path, questions: dict[str, float]) -> dict[str, Any]:
    return {"student": name, "submission": ingest.printable(path.name), "scores": {q: 0.0 for q in questions},
            "possible": dict(questions), "total": 0.0, "possible_total": float(sum(questions.values())),
            "error": "", "flags": "", "failed_tests": [], "notes": [], "elapsed_s": 0.0}


_MEMORY_WORDS = ("MemoryError", "can't allocate memory", "Cannot allocate memory")


def _cell_error_text(cell_errors: list, memory_text: str) -> list[str]:
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
    whose calls the dispatch mode saw no aten op for is only flagged: code that works on numpy
    arrays and converts back can be honest."""
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
    errors = _cell_error_text(normal["cell_errors"], memory_text)
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
    trouble, withhold_tw = _tripwire_trouble(tw, {q for q, s in scores.items() if s})
    if trouble:
        flags.append(trouble)
    if withhold or withhold_tw:
        scores = {q: 0.0 for q in scores}
    return {"scores": scores, "failed_tests": failed, "flags": flags, "errors": errors, "judged": True}


def _no_result(tests) -> list[dict]:
    return [{"question": t.question, "name": t.name, "hidden": t.hidden, "points": t.points, "reason": "no result"}
            for t in tests]


def grade_submission(path: Path, name: str, session: Session, judge: Judge) -> dict[str, Any]:
    """Grade one submission; never raises for anything the submission does. ``final`` is False
    where the trusted side failed (the next run grades it again)."""
    result = _empty_result(name, path, session.questions)
    t0 = time.monotonic()
    errors, flags, notes, log, final = [], [], [], b"", True
    verdict: dict = {"judged": False}
    try:
        got = judge.call("ingest", {"path": str(path)})
        notes = got["notes"]
        if got.get("error"):
            errors.append(got["error"])
        else:
            errors += got["problems"]
            if session.forbidden and got["hand"]:
                flags.append("look by hand (advisory, nothing withheld): " + "; ".join(got["hand"]))
            run = sandbox.run_worker(session.request(got["cells"]), session.backend, session.run_limits,
                                     session.worker_root, session.masks, session.docker_image)
            log = run.log_tail
            if run.problem:
                errors.append(run.problem)
            elif run.returncode in worker.TIMED_OUT.values() and not run.report:
                strict = " (the strict re-run)" if run.returncode == worker.TIMED_OUT[True] else ""
                errors.append(f"timed out after {session.limits.timeout_s:g} s{strict} (killed; no score)")
            elif not run.report:
                errors.append(f"the sandboxed run ended without a report (exit status {run.returncode}); no score")
            else:
                memory = f"{session.limits.memory_bytes / sandbox.GiB:g} GiB"
                verdict = judge.call("judge", {"scanned": got["scanned"], "memory_text": memory}, run.report)
                errors += verdict["errors"]
    except JudgeError as e:
        errors.append(f"{e}: this submission was not graded (it will be on the next run)")
        final = False
    if verdict.get("judged"):
        result["scores"] = {q: float(verdict["scores"].get(q, 0.0)) for q in session.questions}
        result["failed_tests"] = verdict["failed_tests"]
        flags = verdict["flags"] + flags
    else:
        result["failed_tests"] = _no_result(session.tests)
    result["total"] = float(sum(result["scores"].values()))
    result.update(notes=notes, error="; ".join(errors), flags="; ".join(flags + notes), final=final,
                  elapsed_s=round(time.monotonic() - t0, 2), _log=log)
    return result


# --------------------------------------------------------------------------- records


def _atomic_write(path: Path, data: str | bytes) -> None:
    """Write via a short temporary name in the same folder (the name may be as long as the
    file system allows: the temporary one must not be longer), then ``os.replace``."""
    fd, tmp = tempfile.mkstemp(prefix=".w", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def csv_cell(value: Any) -> str:
    """Text for a CSV cell that no spreadsheet reads as a formula (``= + - @``, tab, CR first)."""
    text = str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def gradebook_columns(questions: dict[str, float], manual: dict[str, float]) -> list[str]:
    qs = sorted(set(questions) | set(manual), key=natural_key)
    return ["student", *qs, "total", "possible", "error", "flags"]


def gradebook_row(result: dict, columns: list[str], manual: dict[str, float]) -> dict[str, str]:
    row = {"student": result["student"], "total": f"{result['total']:g}",
           "possible": f"{result['possible_total']:g}", "error": result["error"], "flags": result["flags"]}
    for q in columns[1:-4]:
        row[q] = "" if q in manual else f"{result['scores'].get(q, 0.0):g}"
    return {c: csv_cell(row[c]) for c in columns}


def write_student(out: Path, result: dict, columns: list[str], manual: dict[str, float]) -> None:
    """``<out>/<student>.json`` and ``<out>/logs/<student>.log``, each atomically; a failure is
    recorded in the result's error (and the gradebook), never raised."""
    log = result.pop("_log", b"")
    result["row"] = gradebook_row(result, columns, manual)
    try:
        (out / "logs").mkdir(exist_ok=True)
        _atomic_write(out / "logs" / f"{result['student']}.log", log)
        _atomic_write(out / f"{result['student']}.json", json.dumps(result, indent=2))
    except (OSError, ValueError) as e:
        result["error"] = "; ".join(filter(None, [result["error"], f"could not write its result file ({type(e).__name__})"]))
        result["final"] = False
        result["row"] = gradebook_row(result, columns, manual)


def write_table(path: Path, header: list[str], rows: list[list[str]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows([[csv_cell(c) for c in r] for r in rows])
    _atomic_write(path, buf.getvalue())


def write_gradebook(out: Path, results: list[dict], columns: list[str]) -> None:
    write_table(out / "gradebook.csv", columns, [[r["row"][c] for c in columns] for r in results])


# --------------------------------------------------------------------------- resume


def _sha256(path: Path) -> str | None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


def fingerprint(questions: dict, forbidden: dict, manual: dict, variant) -> str:
    """What a stored result depends on besides the file: a result made under other questions,
    points, rules or variant is graded again."""
    data = {"format": FORMAT, "questions": questions, "manual": manual,
            "rules": {q: sorted(f) for q, f in forbidden.items()},
            "variant": variant.to_dict() if variant is not None else None}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def previous_result(out: Path, name: str, digest: str | None, config: str, columns: list[str]) -> dict | None:
    """The stored result for this student if it can be reused as is, else None."""
    path = out / f"{name}.json"
    try:
        if digest is None or not path.is_file() or path.stat().st_size > 8 * sandbox.MiB:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = (isinstance(data, dict) and data.get("final") is True and data.get("submission_sha256") == digest
          and data.get("config") == config and data.get("student") == name
          and isinstance(data.get("row"), dict) and list(data["row"]) == columns)
    return data if ok else None


# --------------------------------------------------------------------------- a folder


class _Judges:
    """One judge child per grading thread, handed out and back."""

    def __init__(self, n: int, config: dict, memory_bytes: int, timeout_s: float):
        self.all = [Judge(config, memory_bytes, timeout_s) for _ in range(n)]
        self.free: queue.Queue = queue.Queue()
        starting = [threading.Thread(target=j.warm) for j in self.all]
        for t in starting:
            t.start()
        for j, t in zip(self.all, starting):
            t.join()
            self.free.put(j)

    def close(self) -> None:
        for j in self.all:
            j.close()


def _grade_one(p: Path, name: str, session: Session, judges: _Judges, ctx: dict) -> dict[str, Any]:
    """Resume or grade one file, write its records at once; never raises."""
    digest = _sha256(p)
    if not ctx["regrade"]:
        prev = previous_result(ctx["out"], name, digest, ctx["config"], ctx["columns"])
        if prev is not None:
            prev["resumed"] = True
            ctx["log"](f"{name}: {prev['total']:g}/{prev['possible_total']:g} (kept from an earlier run)")
            return prev
    judge = judges.free.get()
    try:
        res = grade_submission(p, name, session, judge)
    except Exception as e:  # a grader bug must not stop the others
        res = _empty_result(name, p, session.questions)
        res.update(error=f"grading driver error: {type(e).__name__}", _log=b"", final=False,
                   failed_tests=_no_result(session.tests))
    finally:
        judges.free.put(judge)
    res.update(seed=session.seed, submission_sha256=digest, config=ctx["config"])
    write_student(ctx["out"], res, ctx["columns"], ctx["manual"])
    ctx["log"](f"{res['student']}: {res['total']:g}/{res['possible_total']:g}"
               + (f"  [{res['error']}]" if res["error"] else "") + (f"  {{{res['flags']}}}" if res["flags"] else ""))
    return res


def grade_folder(submissions_dir: str | os.PathLike, out_dir: str | os.PathLike, *, timeout_s: float = 300.0,
                 jobs: int = 1, student_notebook: str | os.PathLike | None = None,
                 manual_questions: dict[str, float] | None = None, sandbox_backend: str = "auto",
                 limits: sandbox.Limits | None = None, forbidden: dict[str, Any] | None = None,
                 allow_forbidden: bool = False, seed: int | None = None, docker_image: str | None = None,
                 extra_masks: list[str | os.PathLike] = (), regrade: bool = False,
                 judge_memory_bytes: int = 3 * GiB, judge_timeout_s: float = 120.0, log=print) -> list[dict[str, Any]]:
    """Grade every ``*.ipynb`` / ``*.zip`` (any case) in ``submissions_dir`` (not recursive) into ``out_dir``.

    Writes ``<out>/<student>.json`` (student: the file's name without extension, see
    ``ingest.student_names``) as soon as it is judged: ``scores``/``possible`` per question,
    ``total``, ``possible_total``, ``failed_tests`` (question, test name, hidden, points, reason),
    ``error``, ``flags``, ``notes``, ``seed``, ``submission_sha256``, ``final`` and ``row`` (exactly
    the gradebook row); ``<out>/logs/<student>.log`` (the end of what the submission printed); at
    the end ``<out>/gradebook.csv`` (``student, <one per question>, total, possible, error,
    flags``) and ``<out>/skipped.csv`` (``file, reason``) for every entry of the folder that was
    not graded. Manual questions get an empty column and do not count in ``possible``. Results
    already in ``out_dir`` for an unchanged file are kept unless ``regrade``. Raises
    ``sandbox.SandboxUnavailable`` if no sandbox can be used and ``sandbox_backend`` is not ``"none"``.
    """
    sub_dir, out = Path(submissions_dir).resolve(), Path(out_dir).resolve()
    if not sub_dir.is_dir():
        raise NotADirectoryError(f"{submissions_dir}: not a folder of submissions")
    backend = sandbox.choose_backend(sandbox_backend, docker_image)
    if backend == "none":
        log(sandbox.NO_SANDBOX_WARNING)
    limits = limits or sandbox.Limits(timeout_s=timeout_s, threads=1 if jobs > 1 else 2)
    rules_ = {} if allow_forbidden else {q: set(f) for q, f in (forbidden if forbidden is not None else rules.DEFAULT_RULES).items()}
    student_nb = json.loads(Path(student_notebook).read_text(encoding="utf-8")) if student_notebook else None
    files, skipped = ingest.list_folder(sub_dir)
    names = ingest.student_names(files)
    manual = dict(manual_questions or {})
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bnviz-grading-"))
    judges = None
    try:
        masks = [sub_dir, out, work, Path(__file__).resolve().parents[1], *map(Path, extra_masks)]
        if student_notebook:
            masks.append(Path(student_notebook).resolve().parent.parent)
        session = Session(work, backend, limits, [m.resolve() for m in masks], rules_, student_nb, seed, docker_image)
        handed_out = ([ingest._text(c.get("source", "")) or "" for c in student_nb["cells"] if c.get("cell_type") == "code"]
                      if student_nb else None)
        preferred = Path(student_notebook).name if student_notebook else "batch_norm.ipynb"
        judges = _Judges(max(1, jobs), session.judge_config(handed_out, preferred), judge_memory_bytes, judge_timeout_s)
        columns = gradebook_columns(session.questions, manual)
        ctx = {"out": out, "columns": columns, "manual": manual, "regrade": regrade, "log": log,
               "config": fingerprint(session.questions, rules_, manual, session.variant)}
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            results = list(pool.map(lambda p: _grade_one(p, names[p], session, judges, ctx), files))
    finally:
        if judges is not None:
            judges.close()
        shutil.rmtree(work, ignore_errors=True)
    similarity.flag_results(results, sub_dir, out, student_notebook, row=lambda r: gradebook_row(r, columns, manual),
                            log=log)  # similarity flags + similarity.html (issue 17 item 6); never raises
    write_gradebook(out, results, columns)
    write_table(out / "skipped.csv", ["file", "reason"], [list(s) for s in skipped])
    for name, why in skipped:
        log(f"skipped {clean(name, 80)}: {why}")
    return results
