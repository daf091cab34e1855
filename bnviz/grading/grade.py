"""``grade``: grade a folder of submissions. The trusted side: it never imports student code.

For each submission: parse the notebook (data only), scan its source for forbidden APIs
(``rules.py``), send its code cells and the test inputs to a fresh sandbox running
``worker.py`` (``sandbox.py``), load the worker's report as plain data (``weights_only=True``),
judge it against references computed here (``checker.py``). The gradebook and the per-student
JSON files are written at the end, after every sandbox is gone, each atomically.
"""

from __future__ import annotations

import concurrent.futures
import csv
import io
import json
import os
import re
import secrets
import shutil
import tempfile
import time
import unicodedata
import warnings
import zipfile
from pathlib import Path
from typing import Any

from . import checker, rules, sandbox, similarity
from .build import natural_key

MAX_TEXT = 120


def clean(text: Any, limit: int = MAX_TEXT) -> str:
    """One line of printable text, at most ``limit`` characters (for text that came from a student)."""
    text = "".join(ch if unicodedata.category(ch)[0] not in "CZ" or ch == " " else " " for ch in str(text))
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else str(src)


_CHECK_RE = re.compile(r"""^grader\.check\(\s*["'](\w+)["']\s*\)$""")
_GRADER_RE = re.compile(r"\b(Checker|GradingResults|otter\.(execute|test_files|run|api)|OK_FORMAT|init_grading_mode"
                        r"|doctest|DocTestRunner)\b|\bgrader\s*\.\s*\w+\s*=(?!=)|\bgrader\s*=(?!=)(?!\s*otter\.Notebook\()")


def tamper_notes(nb: dict, student_nb: dict | None) -> list[str]:
    """Reasons to look at a submission by hand (grading never uses anything the notebook carries)."""
    notes = []
    handed_out: set[str] = set()
    if student_nb is not None:
        handed_out = {_source(c).strip() for c in student_nb["cells"] if c.get("cell_type") == "code"}
        expected = [s for s in handed_out if _CHECK_RE.match(s)]
        present = {_source(c).strip() for c in nb.get("cells", []) if c.get("cell_type") == "code"}
        missing = sorted(_CHECK_RE.match(e).group(1) for e in expected if e not in present)
        if missing:
            notes.append("check cells edited or deleted for " + ", ".join(missing))
    if (nb.get("metadata", {}).get("otter", {}) or {}).get("tests"):
        notes.append("notebook carries its own tests in its metadata")
    for i, cell in enumerate(nb.get("cells", [])):
        if cell.get("cell_type") != "code" or _source(cell).strip() in handed_out:
            continue
        lines = [s.strip() for s in _source(cell).splitlines()]
        if any(_GRADER_RE.search(s) for s in lines if s and not s.startswith("#") and not _CHECK_RE.match(s)):
            notes.append(f"cell {i} touches the grader or test machinery")
    if notes:
        notes.append("graded with the official tests")
    return notes


def prepare(path: Path) -> tuple[dict | None, list[str], str | None]:
    """Read a submission (.ipynb, or the .zip of grader.export()): (notebook, notes, fatal error)."""
    import nbformat

    notes: list[str] = []
    try:
        if path.suffix == ".zip":
            with zipfile.ZipFile(path) as zf:
                nbs = [n for n in zf.namelist()
                       if n.endswith(".ipynb") and "/" not in n.strip("/") and not n.startswith("__MACOSX")]
                if len(nbs) != 1:
                    return None, notes, f"invalid submission zip: expected one notebook at its top level, found {len(nbs)}"
                if zf.getinfo(nbs[0]).file_size > 64 * sandbox.MiB:
                    return None, notes, "invalid submission: notebook larger than 64 MB"
                raw = zf.read(nbs[0])
                if any(n.startswith("tests/") for n in zf.namelist()):
                    notes.append("zip contains a tests/ folder (ignored; graded with the official tests)")
        else:
            if path.stat().st_size > 64 * sandbox.MiB:
                return None, notes, "invalid submission: notebook larger than 64 MB"
            raw = path.read_bytes()
    except (OSError, zipfile.BadZipFile) as e:
        return None, notes, f"unreadable submission: {clean(type(e).__name__)}"
    try:
        nb = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, notes, f"invalid notebook: not valid JSON ({clean(e)})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. MissingIDFieldWarning from older notebooks
            nbformat.validate(nbformat.reads(json.dumps(nb), as_version=4))
    except Exception as e:  # nbformat raises several types
        return None, notes, f"invalid notebook: {clean(type(e).__name__ + ': ' + str(e), 200)}"
    return nb, notes, None


def code_cells(nb: dict) -> list[tuple[int, str]]:
    return [(i, _source(c)) for i, c in enumerate(nb.get("cells", [])) if c.get("cell_type") == "code"]


# --------------------------------------------------------------------------- one submission


class Session:
    """What every submission of one grading run shares: tests (inputs drawn once per run from a
    fresh seed, references computed once), sandbox settings, rules, question list."""

    def __init__(self, work: Path, backend: str, limits: sandbox.Limits, masks: list[Path],
                 forbidden: dict[str, set[str]], student_nb: dict | None, seed: int | None = None,
                 docker_image: str | None = None):
        self.seed = secrets.randbits(62) if seed is None else int(seed)
        self.tests = checker.make_tests(self.seed, checker.variant_of(student_nb))  # the class variant (build --variant)
        self.questions = checker.question_points(self.tests)
        self.probes = [p for t in self.tests for p in t.probes]
        self.work, self.backend, self.limits, self.masks = work, backend, limits, masks
        self.forbidden, self.student_nb, self.docker_image = forbidden, student_nb, docker_image
        self.worker_root = sandbox.make_worker_root(work / "worker")

    def request(self, cells: list[tuple[int, str]]) -> bytes:
        import torch

        buf = io.BytesIO()
        torch.save({"cells": cells, "probes": self.probes, "limits": self.limits.for_worker()}, buf)
        return buf.getvalue()


def load_report(data: bytes | None) -> dict | None:
    """The worker's report as plain data, or None. ``weights_only=True``: no code from the
    sandbox can run here, only tensors, containers and primitive values are rebuilt."""
    import torch

    if not data:
        return None
    try:  # a torch.save file is a zip of stored (uncompressed) entries: refuse anything that could inflate
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            entries = zf.infolist()
        if any(e.compress_type != zipfile.ZIP_STORED for e in entries) or sum(e.file_size for e in entries) > len(data):
            return None
        report = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception:
        return None
    return report if isinstance(report, dict) and report.get("protocol") == 1 else None


def _empty_result(name: str, path: Path, questions: dict[str, float]) -> dict[str, Any]:
    return {"student": name, "submission": path.name, "scores": {q: 0.0 for q in questions},
            "possible": dict(questions), "total": 0.0, "possible_total": float(sum(questions.values())),
            "error": "", "flags": "", "failed_tests": [], "notes": [], "elapsed_s": 0.0}


def _cell_error_text(cell_errors: list, limits: sandbox.Limits) -> list[str]:
    errors = [e for e in cell_errors if isinstance(e, dict)]
    if not errors:
        return []
    first = errors[0]
    text = f"{len(errors)} cell(s) raised; first: cell {clean(first.get('cell'), 8)}: student code raised {clean(first.get('error'))}"
    out = [text]
    if any(re.search(r"MemoryError|can't allocate memory|Cannot allocate memory", str(e.get("error"))) for e in errors):
        out.append(f"memory limit ({limits.memory_bytes / sandbox.GiB:g} GiB) reached: an allocation failed (grading went on)")
    return out


def _tripwire_trouble(report: dict, passed_questions: set[str]) -> tuple[str | None, bool]:
    """(why the sandbox's rule checks cannot be trusted for this submission, withhold all points?).

    Missing or removed tripwires withhold everything (honest code never touches them). A question
    whose calls the dispatch mode saw no aten op for is only flagged: code that works on numpy
    arrays and converts back can be honest."""
    tw = report.get("tripwire")
    if not isinstance(tw, dict) or not tw.get("installed"):
        return "tripwire report missing: all points withheld, check by hand", True
    if not tw.get("intact"):
        return "tripwires removed or replaced by the submission: all points withheld, check by hand", True
    ops = tw.get("ops") if isinstance(tw.get("ops"), dict) else {}
    blind = sorted(q for q in passed_questions if not ops.get(q))
    if blind:
        return f"the run-time tripwire saw no torch operation for {', '.join(blind)}: check by hand", False
    return None, False


def _score(session: Session, result: dict, report: dict, scanned: dict) -> None:
    """Fill in scores, failed tests and flags from a report (judged here) and the source scan."""
    judged = checker.judge_all(session.tests, report.get("probes") if isinstance(report.get("probes"), dict) else {})
    for t in judged:
        if t["passed"]:
            result["scores"][t["question"]] += t["points"]
        else:  # a reason may quote the report, which the submission could have forged: clean it
            result["failed_tests"].append({**{k: t[k] for k in ("question", "name", "hidden", "points")},
                                           "reason": clean(t["reason"], 300)})
    hits = report.get("tripwire", {}).get("hits", []) if isinstance(report.get("tripwire"), dict) else []
    hits = [h for h in hits if isinstance(h, dict)] if isinstance(hits, list) else []
    flags = []
    for question, reasons in rules.violations(scanned, hits, session.forbidden).items():
        if result["scores"].get(question):
            flags.append(f"{question}: {result['scores'][question]:g} points withheld, forbidden " + "; ".join(reasons))
        else:
            flags.append(f"{question}: forbidden " + "; ".join(reasons))
        result["scores"][question] = 0.0
    trouble, withhold = _tripwire_trouble(report, {q for q, s in result["scores"].items() if s})
    if trouble:
        flags.append(trouble)
    if withhold:
        result["scores"] = {q: 0.0 for q in result["scores"]}
    result["flags_list"] = flags


def grade_submission(path: Path, name: str, session: Session) -> dict[str, Any]:
    """Grade one submission; never raises for anything the submission does."""
    result = _empty_result(name, path, session.questions)
    t0 = time.monotonic()
    nb, notes, fatal = prepare(path)
    errors: list[str] = [fatal] if fatal else []
    flags: list[str] = []
    log = b""
    if nb is not None:
        notes += tamper_notes(nb, session.student_nb)
        cells = code_cells(nb)
        scanned = rules.scan(cells)
        run = sandbox.run_worker(session.request(cells), session.backend, session.limits, session.worker_root,
                                 session.masks, session.docker_image)
        log = run.log_tail
        report = load_report(run.report)
        if run.problem:
            errors.append(run.problem)
        elif report is None:
            errors.append(f"the sandboxed run ended without a valid report (exit status {run.returncode}); no score")
        else:
            errors += _cell_error_text(report.get("cell_errors") or [], session.limits)
            _score(session, result, report, scanned)
            flags += result.pop("flags_list")
        if report is None:
            result["failed_tests"] = [{"question": t.question, "name": t.name, "hidden": t.hidden, "points": t.points,
                                       "reason": "no result"} for t in session.tests]
    result["scores"] = {q: float(s) for q, s in result["scores"].items()}
    result["total"] = float(sum(result["scores"].values()))
    result["notes"] = notes
    result["error"] = "; ".join(errors)
    result["flags"] = "; ".join(flags + notes)
    result["elapsed_s"] = round(time.monotonic() - t0, 2)
    result["_log"] = log
    return result


# --------------------------------------------------------------------------- a folder


def _atomic_write(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def gradebook_columns(questions: dict[str, float], manual: dict[str, float]) -> list[str]:
    qs = sorted(set(questions) | set(manual), key=natural_key)
    return ["student", *qs, "total", "possible", "error", "flags"]


def gradebook_row(result: dict, columns: list[str], manual: dict[str, float]) -> dict[str, str]:
    row = {"student": result["student"], "total": f"{result['total']:g}",
           "possible": f"{result['possible_total']:g}", "error": result["error"], "flags": result["flags"]}
    for q in columns[1:-4]:
        row[q] = "" if q in manual else f"{result['scores'].get(q, 0.0):g}"
    return {c: row[c] for c in columns}


def write_records(out: Path, results: list[dict], columns: list[str], manual: dict[str, float]) -> None:
    """Per-student JSON (the gradebook row plus details), logs, then the gradebook; all atomic."""
    (out / "logs").mkdir(exist_ok=True)
    for r in results:
        log = r.pop("_log", b"")
        r["row"] = gradebook_row(r, columns, manual)
        _atomic_write(out / "logs" / f"{r['student']}.log", log)
        _atomic_write(out / f"{r['student']}.json", json.dumps(r, indent=2))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for r in results:
        w.writerow(r["row"])
    _atomic_write(out / "gradebook.csv", buf.getvalue())


def _student_names(files: list[Path]) -> dict[Path, str]:
    names: dict[Path, str] = {}
    for p in files:
        name = re.sub(r"[^\w.-]", "_", p.stem)[:100] or "submission"
        while name in names.values():
            name = f"{name}{p.suffix.replace('.', '_')}"
        names[p] = name
    return names


def grade_folder(submissions_dir: str | os.PathLike, out_dir: str | os.PathLike, *, timeout_s: float = 300.0,
                 jobs: int = 1, student_notebook: str | os.PathLike | None = None,
                 manual_questions: dict[str, float] | None = None, sandbox_backend: str = "auto",
                 limits: sandbox.Limits | None = None, forbidden: dict[str, Any] | None = None,
                 allow_forbidden: bool = False, seed: int | None = None, docker_image: str | None = None,
                 extra_masks: list[str | os.PathLike] = (), log=print) -> list[dict[str, Any]]:
    """Grade every ``*.ipynb`` / ``*.zip`` in ``submissions_dir`` (not recursive) into ``out_dir``.

    Writes ``<out>/<student>.json`` (student = file stem): ``scores``/``possible`` per question,
    ``total``, ``possible_total``, ``failed_tests`` (question, test name, hidden, points, reason),
    ``error``, ``flags``, ``notes`` and ``row`` (exactly the gradebook row); ``<out>/logs/<student>.log``
    (the end of what the submission printed) and ``<out>/gradebook.csv`` with the columns
    ``student, <one per question>, total, possible, error, flags``. Manual questions get an empty
    column and do not count in ``possible``. Raises ``sandbox.SandboxUnavailable`` if no sandbox
    can be used and ``sandbox_backend`` is not ``"none"``.
    """
    sub_dir, out = Path(submissions_dir).resolve(), Path(out_dir).resolve()
    backend = sandbox.choose_backend(sandbox_backend, docker_image)
    if backend == "none":
        log(sandbox.NO_SANDBOX_WARNING)
    limits = limits or sandbox.Limits(timeout_s=timeout_s, threads=1 if jobs > 1 else 2)
    rules_ = {} if allow_forbidden else {q: set(f) for q, f in (forbidden if forbidden is not None else rules.DEFAULT_RULES).items()}
    student_nb = json.loads(Path(student_notebook).read_text(encoding="utf-8")) if student_notebook else None
    files = sorted(p for p in sub_dir.iterdir()
                   if p.is_file() and p.suffix in (".ipynb", ".zip") and not p.name.startswith("."))
    names = _student_names(files)
    manual = dict(manual_questions or {})
    work = Path(tempfile.mkdtemp(prefix="bnviz-grading-"))
    try:
        masks = [sub_dir, out, work, Path(__file__).resolve().parents[1], *map(Path, extra_masks)]
        if student_notebook:
            masks.append(Path(student_notebook).resolve().parent.parent)
        session = Session(work, backend, limits, [m.resolve() for m in masks], rules_, student_nb, seed, docker_image)

        def one(p: Path) -> dict[str, Any]:
            try:
                res = grade_submission(p, names[p], session)
            except Exception as e:  # a grader bug must not stop the others
                res = _empty_result(names[p], p, session.questions)
                res.update(error=f"grading driver error: {type(e).__name__}: {clean(e)}", _log=b"")
            log(f"{res['student']}: {res['total']:g}/{res['possible_total']:g}"
                + (f"  [{res['error']}]" if res["error"] else "") + (f"  {{{res['flags']}}}" if res["flags"] else ""))
            return res

        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            results = list(pool.map(one, files))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # every sandbox is gone: only now is anything written to the output folder
    out.mkdir(parents=True, exist_ok=True)
    for r in results:
        r["seed"] = session.seed
    similarity.flag_results(results, sub_dir, out, student_notebook, log=log)  # similarity flags (issue 17 item 6); never raises
    write_records(out, results, gradebook_columns(session.questions, manual), manual)
    return results
