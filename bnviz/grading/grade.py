"""``grade``: grade a folder of submissions. The trusted side: it never imports student code.

For each submission, in order: read the notebook as data, turn IPython syntax into Python and scan
the source (``ingest.py``, ``rules.py``), run its code cells and the test inputs in fresh sandboxes
(``sandbox.py``, ``worker.py``: a normal pass and a strict pass, each in a sandbox of its own),
parse and check the worker's report against a strict schema (``report.py``) and judge it against references computed here
(``checker.py``, ``scoring.py``). Reading, scanning, parsing and judging happen in a child process
with its own memory and time limits (``judge.py``), so no submission can stall or crash the run.
This module only drives: it hands each file to a judge child and a sandbox and writes the records
(``records.py``: the ``Result`` type, gradebook rows, atomic writes, the resume key).

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
import hashlib
import hmac
import dataclasses
import io
import json
import os
import queue
import secrets
import shutil
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from . import assignments, checker, ingest, lms, records, report, sandbox, scoring, seeds, similarity, student_seeds, worker
from .judge import GiB, Judge, JudgeError
from .records import Result
from .text import clean, visible

# --------------------------------------------------------------------------- one submission


def _variant(student_nb: dict | None, assignment: str = assignments.DEFAULT):
    """The class variant recorded in the built student notebook (None: PyTorch's conventions)."""
    variant_of = getattr(assignments.checker_of(assignment), "variant_of", None)
    v = variant_of(student_nb) if variant_of else None
    return None if v is None or getattr(v, "is_default", False) else v


SEED_CONTEXT = b"bnviz/grading/seed/v1\0"


def derive_seed(secret: bytes, student: str) -> int:
    """The seed of one student's test inputs: HMAC-SHA256(secret, student), 62 bits."""
    digest = hmac.new(secret, SEED_CONTEXT + student.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "little") >> 2


class Session:
    """What every submission of one grading run shares: the run's secret (drawn fresh, kept only in
    this process's memory: never printed, logged or written), sandbox settings, rules, question
    list. Each student's test inputs come from their own seed, derived from the secret and their
    name (``seed_for``) and recorded in their JSON; ``seed`` (``--seed``) instead gives every
    submission that seed: to reproduce one student's run from the seed in their JSON."""

    def __init__(self, work: Path, backend: str, limits: sandbox.Limits, masks: list[Path],
                 forbidden: dict[str, set[str]], student_nb: dict | None, seed: int | None = None,
                 docker_image: str | None = None, assignment: str = assignments.DEFAULT):
        self.assignment = assignment
        self._secret = secrets.token_bytes(32) if seed is None else None
        self.fixed_seed = None if seed is None else int(seed)
        self.recorded: dict[str, int] = {}  # seeds in the students' JSON, reused for unchanged files (seeds.py)
        self.variant = _variant(student_nb, assignment)  # the class variant (build --variant)
        self.tests = self.tests_for(0)  # the questions, tests and points (the same for every seed)
        self.questions = checker.question_points(self.tests)
        self.work, self.backend, self.limits, self.masks = work, backend, limits, masks
        self.forbidden, self.student_nb, self.docker_image = forbidden, student_nb, docker_image
        self.worker_root = sandbox.make_worker_root(work / "worker")
        # the strict pass: forbidden kernels raise (throughout, or with autograd in its questions' probes)
        self.strict = assignments.strict_plan(forbidden, assignments.NEEDS.get(assignment, set()))
        # two passes, each in its own sandbox with the whole limits (issue 23: nothing shared)
        self.run_limits = limits

    def seed_for(self, student: str) -> int:
        if self.fixed_seed is not None:
            return self.fixed_seed
        return self.recorded[student] if student in self.recorded else derive_seed(self._secret, student)

    def tests_for(self, seed: int) -> list:
        return assignments.make_tests(self.assignment, seed, self.variant)

    def request(self, cells: list, seed: int, pass_: str = "normal") -> bytes:
        """The worker's request for one pass (``"normal"`` or ``"strict"``)."""
        import torch

        buf = io.BytesIO()
        limits = {**self.run_limits.for_worker(), "report_bytes": self.limits.report_bytes, "pass_seconds": None}
        probes = [p for t in self.tests_for(seed) for p in t.probes]  # inputs only
        torch.save({"cells": [(int(i), str(c)) for i, c in cells], "probes": probes, "limits": limits,
                    "strict": self.strict, "pass": pass_}, buf)
        return buf.getvalue()

    def run(self, cells: list, seed: int, pass_: str) -> sandbox.Run:
        """One pass in a fresh sandbox of its own."""
        return sandbox.run_worker(self.request(cells, seed, pass_), self.backend, self.run_limits, self.worker_root,
                                  self.masks, self.docker_image)

    def judge_config(self, handed_out: list[str] | None, preferred: str) -> dict:
        return {"assignment": self.assignment, "rules": {q: sorted(f) for q, f in self.forbidden.items()},
                "handed_out": handed_out, "preferred": preferred,
                "variant": self.variant.to_dict() if self.variant is not None else None,
                # the class's experiment-seed salt (assignment 2): the judge checks the printed seeds
                "seed_salt": student_seeds.salt_of(self.student_nb)}


def load_report(data: bytes | None) -> dict | None:
    """The worker's normal-pass report, parsed and checked (``report.parse``), or None."""
    try:
        return report.parse(data)[0]
    except report.ReportError:
        return None


def _one_part(run: sandbox.Run) -> bytes | None:
    """The one report a single-pass sandbox framed (``worker.main``), or None."""
    try:
        parts = report.split_pair(run.report or b"")
    except report.ReportError:
        return None
    return parts[0] if len(parts) == 1 else None


def _run_problem(run: sandbox.Run) -> str | None:
    if run.problem:
        return run.problem
    if not run.report:
        return f"the sandboxed run ended without a report (exit status {run.returncode}); no score"
    return None


def _run_passes(session: Session, cells: list, seed: int) -> tuple[bytes, bytes, str | None]:
    """(both passes' reports framed as one pair for the judge, what the normal pass printed, a
    problem that costs the score). The normal pass and, where there are rules, the strict pass,
    each in a sandbox of its own: they share no file, folder or process. A strict pass that ran
    but framed no report leaves the pair with the normal report only, which the judge withholds."""
    run = session.run(cells, seed, "normal")
    problem = _run_problem(run)
    normal = _one_part(run)
    if problem or normal is None:
        return b"", run.log_tail, problem or "the sandbox's report was rejected (malformed framing); no score"
    parts = [normal]
    if session.strict:
        strict_run = session.run(cells, seed, "strict")
        if strict_run.problem:  # a limit: no score, as for the normal pass
            return b"", run.log_tail, strict_run.problem + " (the strict re-run)"
        strict = _one_part(strict_run)
        if strict is not None:
            parts.append(strict)
    return worker.MAGIC_PAIR + b"".join(struct.pack("<Q", len(p)) + p for p in parts), run.log_tail, None


def grade_submission(path: Path, name: str, session: Session, judge: Judge) -> Result:
    """Grade one submission; never raises for anything the submission does. ``final`` is False
    where the trusted side failed (the next run grades it again)."""
    result = Result.empty(name, ingest.printable(path.name), session.questions)
    result.seed = seed = session.seed_for(name)
    t0 = time.monotonic()
    errors, flags, notes, log, final = [], [], [], b"", True
    verdict: dict = {"judged": False}
    try:
        got = judge.call("ingest", {"path": str(path)})
        notes = got["notes"]
        if got.get("error"):
            errors.append(got["error"])
        else:
            result.cells = got["cells"]
            errors += got["problems"]
            if session.forbidden and got["hand"]:
                flags.append("look by hand (advisory, nothing withheld): " + "; ".join(got["hand"]))
            flags += got.get("seed_flags") or []  # assignment 2: outputs made with another id's seeds
            data, log, problem = _run_passes(session, got["cells"], seed)
            if problem:
                errors.append(problem)
            else:
                memory = f"{session.limits.memory_bytes / sandbox.GiB:g} GiB"
                verdict = judge.call("judge", {"scanned": got["scanned"], "memory_text": memory, "seed": seed}, data)
                errors += verdict["errors"]
    except JudgeError as e:
        errors.append(f"{e}: this submission was not graded (it will be on the next run)")
        final = False
    if verdict.get("judged"):
        result.scores = {q: float(verdict["scores"].get(q, 0.0)) for q in session.questions}
        result.failed_tests = verdict["failed_tests"]
        flags = verdict["flags"] + flags
    else:
        result.failed_tests = scoring.no_result(session.tests)
    result.total = float(sum(result.scores.values()))
    result.notes, result.error, result.flags, result.final = notes, "; ".join(errors), "; ".join(flags + notes), final
    result.elapsed_s, result.log = round(time.monotonic() - t0, 2), log
    return result


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


def _read_cells(p: Path, judges: _Judges) -> list | None:
    judge = judges.free.get()
    try:
        got = judge.call("ingest", {"path": str(p)})
        return None if got.get("error") else got["cells"]
    except JudgeError:
        return None
    finally:
        judges.free.put(judge)


def _grade_one(p: Path, name: str, session: Session, judges: _Judges, ctx: dict) -> Result:
    """Resume or grade one file, write its records at once; never raises."""
    digest = records.sha256(p)
    if not ctx["regrade"] and name not in ctx.get("only", ()):
        prev = records.previous_result(ctx["out"], name, digest, ctx["config"], ctx["columns"])
        if prev is not None:
            prev.resumed = True
            prev.cells = _read_cells(p, judges)  # for similarity, which compares every submission
            ctx["log"](f"{name}: {prev.total:g}/{prev.possible_total:g} (kept from an earlier run)")
            return prev
    judge = judges.free.get()
    try:
        res = grade_submission(p, name, session, judge)
    except Exception as e:  # a grader bug must not stop the others
        res = Result.empty(name, ingest.printable(p.name), session.questions)
        res.error, res.final, res.failed_tests = f"grading driver error: {type(e).__name__}", False, scoring.no_result(session.tests)
    finally:
        judges.free.put(judge)
    res.seed, res.submission_sha256, res.config = session.seed_for(name), digest, ctx["config"]
    records.write_student(ctx["out"], res, ctx["columns"], ctx["manual"])
    ctx["log"](visible(f"{res.student}: {res.total:g}/{res.possible_total:g}"
                       + (f"  [{res.error}]" if res.error else "") + (f"  {{{res.flags}}}" if res.flags else "")))
    return res


def _limits_key(limits: sandbox.Limits, jobs: int) -> dict:
    """The limits a result was graded under, for the resume key (who sandboxes run as aside)."""
    return {**{k: v for k, v in dataclasses.asdict(limits).items() if k != "user"}, "jobs": max(1, int(jobs))}


def grade_folder(submissions_dir: str | os.PathLike, out_dir: str | os.PathLike, *, timeout_s: float = 300.0,
                 jobs: int = 1, student_notebook: str | os.PathLike | None = None,
                 manual_questions: dict[str, float] | None = None, sandbox_backend: str = "auto",
                 limits: sandbox.Limits | None = None, forbidden: dict[str, Any] | None = None,
                 allow_forbidden: bool = False, seed: int | None = None, docker_image: str | None = None,
                 extra_masks: list[str | os.PathLike] = (), regrade: bool = False,
                 judge_memory_bytes: int = 3 * GiB, judge_timeout_s: float = 120.0, log=print,
                 only: set[str] = frozenset(), new_seed: bool = False,
                 assignment: str = assignments.DEFAULT) -> list[Result]:
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
    ``assignment``: which one (``assignments.CHECKERS``; ``assignment.json``'s ``"assignment"``):
    its checker, its default rules (``forbidden`` None) and its answer names for the scan.
    """
    assignments.checker_of(assignment)  # an unknown name stops before anything is written
    sub_dir, out = Path(submissions_dir).resolve(), Path(out_dir).resolve()
    if not sub_dir.is_dir():
        raise NotADirectoryError(f"{submissions_dir}: not a folder of submissions")
    backend = sandbox.choose_backend(sandbox_backend, docker_image)
    if backend == "none":
        log(sandbox.NO_SANDBOX_WARNING)
    limits = limits or sandbox.Limits(timeout_s=timeout_s, threads=1 if jobs > 1 else 2)
    rules_ = {} if allow_forbidden else {q: set(f) for q, f in (forbidden if forbidden is not None
                                                                 else assignments.rules_of(assignment)).items()}
    student_nb = json.loads(Path(student_notebook).read_text(encoding="utf-8")) if student_notebook else None
    preferred = Path(student_notebook).name if student_notebook else f"{assignment}.ipynb"
    files, names, skipped, _ = lms.collect(sub_dir, preferred)
    manual = dict(manual_questions or {})
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bnviz-grading-"))
    judges = None
    try:
        masks = _masks(sub_dir, out, work, student_notebook, extra_masks)
        session = Session(work, backend, limits, masks, rules_, student_nb, seed, docker_image, assignment)
        if not new_seed:  # issue 24: an unchanged file keeps its recorded seed (seeds.py)
            session.recorded = seeds.recorded_seeds(out, {names[p]: records.sha256(p) for p in files})
        handed_out = ([ingest._text(c.get("source", "")) or "" for c in student_nb["cells"] if c.get("cell_type") == "code"]
                      if student_nb else None)
        judges = _Judges(max(1, jobs), session.judge_config(handed_out, preferred), judge_memory_bytes, judge_timeout_s)
        columns = records.gradebook_columns(session.questions, manual)
        ctx = {"out": out, "columns": columns, "manual": manual, "regrade": regrade, "log": log, "only": set(only),
               "config": records.fingerprint(session.questions, rules_, manual, session.variant, _limits_key(limits, jobs))}
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            results = list(pool.map(lambda p: _grade_one(p, names[p], session, judges, ctx), files))
    finally:
        if judges is not None:
            judges.close()
        shutil.rmtree(work, ignore_errors=True)
    _finish(results, sub_dir, out, student_notebook, columns, manual, {names[p]: str(p) for p in files}, skipped, log)
    return results


def _masks(sub_dir: Path, out: Path, work: Path, student_notebook, extra_masks) -> list[Path]:
    """What sandboxes must not see: the submissions, the grades, the work folder, bnviz itself,
    the assignment's folder (its solution) and the instructor's extra masks."""
    masks = [sub_dir, out, work, Path(__file__).resolve().parents[1], *map(Path, extra_masks)]
    if student_notebook:
        masks.append(Path(student_notebook).resolve().parent.parent)
    return [m.resolve() for m in masks]


def _finish(results: list[Result], sub_dir: Path, out: Path, student_notebook, columns, manual, paths: dict,
            skipped: list, log) -> None:
    """Similarity flags and similarity.html, on exactly the cells grading read (ingest; never
    raises), then gradebook.csv and skipped.csv."""
    codes = {r.student: None if r.cells is None else "\n".join(c for _, c in r.cells) for r in results}
    similarity.flag_results(results, sub_dir, out, student_notebook, row=lambda r: records.gradebook_row(r, columns, manual),
                            log=log, paths=paths, codes=codes)
    records.write_gradebook(out, results, columns)
    records.write_table(out / "skipped.csv", ["file", "reason"], [list(s) for s in skipped])
    for name, why in skipped:
        log(f"skipped {clean(name, 80)}: {why}")
