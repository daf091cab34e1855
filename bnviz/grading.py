"""Grading driver for the otter-grader assignment in ``notebooks/assignments/batch_norm``.

Two steps, both also available from the command line::

    python -m bnviz.grading build [--source NOTEBOOK] [--out dist/batch_norm]
    python -m bnviz.grading grade SUBMISSIONS_DIR [--dist dist/batch_norm] [--out grades] [--timeout 300]

``build_assignment`` runs ``otter assign`` (which also runs every test against the solution) and
leaves in ``out_dir``::

    student/batch_norm.ipynb, student/tests/   what students get (no solutions, no hidden tests)
    batch_norm-student.zip                     the same as one zip (upload it to Colab)
    autograder/…zip, batch_norm-autograder.zip the autograder, with the hidden tests
    autograder/batch_norm.ipynb                the solution notebook without tests
    assignment.json                            questions, points, manual questions, paths

``grade_folder`` grades every ``.ipynb`` (and every ``.zip`` made by ``grader.export()``) in a
folder with ``otter run`` -- local, NO Docker -- one submission per subprocess, each with a
wall-clock limit after which the whole process tree (otter and its Jupyter kernel, which runs in
its own session) is killed. It writes ``<out>/<student>.json`` per submission and
``<out>/gradebook.csv``. A bad submission (raises, never ends, is not a notebook, has edited or
deleted check cells) gets a reason in the ``error`` column and never stops the others.

``otter run`` executes student code as the user running this script, with its permissions and
its network access; use ``otter grade`` (Docker) for isolation.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
import zipfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = REPO_ROOT / "notebooks" / "assignments" / "batch_norm" / "batch_norm.ipynb"
DEFAULT_DIST = REPO_ROOT / "dist" / "batch_norm"
DEFAULT_TIMEOUT_S = 300.0

# Environment variable set (to a fresh random value) in every grading subprocess; the Jupyter
# kernel and anything the student's code starts inherit it, which lets us find and kill them all
# even after they have left the subprocess's process group (jupyter_client starts kernels with
# start_new_session=True) or been re-parented.
_TOKEN_VAR = "BNVIZ_GRADING_TOKEN"

# Runs inside the per-submission subprocess: grades one notebook with otter and writes a JSON
# summary (per question score, per test case result, errors raised by the notebook's cells).
_CHILD_SOURCE = r'''
import json, re, sys, traceback
submission, autograder, out_dir, result_path = sys.argv[1:5]

def reason_of(message):
    """The most telling line of an otter/doctest failure message."""
    lines = [l.strip() for l in (message or "").splitlines() if l.strip()]
    for l in lines:
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b", l):
            return l[:500]
    return (lines[-1] if lines else "failed")[:500]

out = {"questions": {}, "cell_errors": [], "catastrophic": None}
try:
    import otter.run
    results = otter.run.main(submission, autograder=autograder, output_dir=out_dir, no_logo=True)
    if results.has_catastrophic_failure():
        out["catastrophic"] = repr(results.catastrophic_error)[:1000]
    for qname, tf in results.results.items():
        tests = []
        for tcr in tf.test_case_results:
            tc = tcr.test_case
            tests.append({
                "name": tc.name, "hidden": bool(tc.hidden), "points": float(tc.points or 0),
                "passed": bool(tcr.passed),
                "reason": None if tcr.passed else reason_of(tcr.message),
            })
        out["questions"][qname] = {"score": float(tf.score), "possible": float(tf.possible), "tests": tests}
    nb = getattr(results, "notebook", None)
    if nb is not None:
        for i, cell in enumerate(nb.cells):
            for o in cell.get("outputs", []):
                if o.get("output_type") == "error":
                    out["cell_errors"].append({"cell": i, "error": f"{o.get('ename')}: {o.get('evalue')}"[:500]})
except BaseException as e:
    out["catastrophic"] = "".join(traceback.format_exception_only(type(e), e)).strip()[-1000:]
with open(result_path, "w") as f:
    json.dump(out, f)
'''


# --------------------------------------------------------------------------- helpers


def _child_env(work: Path, token: str | None = None, threads: int | None = None) -> dict[str, str]:
    """Environment for otter subprocesses.

    Puts this interpreter's bin/ first on PATH and provides a ``python3`` kernelspec that starts
    *this* interpreter, so the kernel that runs a submission sees the same packages (torch,
    otter) whatever other Jupyter kernels the machine has.
    """
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    data_dir = work / "jupyter-data"
    spec_dir = data_dir / "kernels" / "python3"
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (grading)",
        "language": "python",
    }))
    env["JUPYTER_DATA_DIR"] = str(data_dir)
    env.pop("JUPYTER_PATH", None)
    tmp = work / "tmp"
    tmp.mkdir(exist_ok=True)
    env["TMPDIR"] = str(tmp)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTHONPATH", None)  # the kernel must not import the grader's own modules by accident
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    if token:
        env[_TOKEN_VAR] = token
    return env


def _pids_with_token(token: str) -> list[int]:
    """PIDs of this user's processes whose environment carries ``token`` (Linux /proc)."""
    pids = []
    me = os.getpid()
    needle = f"{_TOKEN_VAR}={token}".encode()
    proc = Path("/proc")
    if not proc.is_dir():
        return pids
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _kill_tree(proc: subprocess.Popen, token: str) -> None:
    """Kill a grading subprocess, its process group, and every process carrying its token."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # started with start_new_session=True
    except (ProcessLookupError, PermissionError):
        pass
    for _ in range(3):  # a second pass catches processes forked while we were killing
        pids = _pids_with_token(token)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.2)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def read_question_points(autograder_zip: str | os.PathLike) -> dict[str, float]:
    """Points per autograded question, read from the OK-format test files in the autograder zip
    (without executing them)."""
    points: dict[str, float] = {}
    with zipfile.ZipFile(autograder_zip) as zf:
        names = sorted(n for n in zf.namelist() if re.fullmatch(r"tests/[^/]+\.py", n))
        for name in names:
            tree = ast.parse(zf.read(name).decode("utf-8"))
            for node in tree.body:
                if (isinstance(node, ast.Assign) and len(node.targets) == 1
                        and getattr(node.targets[0], "id", None) == "test"):
                    spec = ast.literal_eval(node.value)
                    cases = [c for suite in spec.get("suites", []) for c in suite.get("cases", [])]
                    total = spec.get("points")
                    if isinstance(total, (int, float)):
                        points[spec["name"]] = float(total)
                    else:
                        points[spec["name"]] = float(sum(c.get("points") or 0 for c in cases))
    return dict(sorted(points.items(), key=lambda kv: _natural_key(kv[0])))


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _question_configs(source: Path) -> dict[str, dict[str, Any]]:
    """Question name -> {points, manual} from the ``# BEGIN QUESTION`` cells of a source notebook."""
    import yaml  # a dependency of otter-grader

    nb = json.loads(source.read_text(encoding="utf-8"))
    questions = {}
    for cell in nb["cells"]:
        src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        if cell["cell_type"] == "raw" and re.match(r"#\s*BEGIN\s+QUESTION", src, re.I):
            cfg = yaml.safe_load("\n".join(src.splitlines()[1:])) or {}
            questions[cfg["name"]] = {"points": cfg.get("points"), "manual": bool(cfg.get("manual", False))}
    return questions


# --------------------------------------------------------------------------- build


def build_assignment(out_dir: str | os.PathLike = DEFAULT_DIST,
                     source: str | os.PathLike = DEFAULT_SOURCE,
                     timeout_s: float = 600.0) -> dict[str, Any]:
    """Run ``otter assign`` on the solution notebook into ``out_dir``; return the manifest.

    ``otter assign`` runs every test (visible and hidden) against the solution and fails the build
    if one fails. The source folder is copied to a scratch directory first, so nothing is written
    next to the source notebook.
    """
    out = Path(out_dir).resolve()
    source = Path(source).resolve()
    for sub in ("student", "autograder"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bnviz-assign-") as scratch:
        scratch = Path(scratch)
        src_copy = scratch / "src"
        shutil.copytree(source.parent, src_copy,
                        ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__", "dist"))
        env = _child_env(scratch)
        cmd = [sys.executable, "-m", "otter", "assign", str(src_copy / source.name), str(scratch / "dist")]
        proc = subprocess.run(cmd, env=env, cwd=scratch, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0 or "Test case failed" in proc.stdout + proc.stderr:
            raise RuntimeError(f"otter assign failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        shutil.copytree(scratch / "dist" / "student", out / "student")
        shutil.copytree(scratch / "dist" / "autograder", out / "autograder")

    zips = sorted((out / "autograder").glob("*-autograder_*.zip"))
    if len(zips) != 1:
        raise RuntimeError(f"expected one autograder zip in {out / 'autograder'}, found {zips}")
    stable_zip = out / f"{source.stem}-autograder.zip"
    shutil.copyfile(zips[0], stable_zip)

    student_zip = out / f"{source.stem}-student.zip"
    with zipfile.ZipFile(student_zip, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted((out / "student").rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(out / "student").as_posix())

    questions = _question_configs(source)
    for name, pts in read_question_points(stable_zip).items():
        questions.setdefault(name, {"manual": False})["points"] = pts
    manifest = {
        "source": str(source),
        "notebook": source.name,
        "autograder_zip": stable_zip.name,
        "student_notebook": f"student/{source.name}",
        "student_zip": student_zip.name,
        "questions": questions,
        "autograded_points": sum(q["points"] or 0 for q in questions.values() if not q["manual"]),
        "manual_points": sum(q["points"] or 0 for q in questions.values() if q["manual"]),
    }
    (out / "assignment.json").write_text(json.dumps(manifest, indent=2))
    return manifest


# --------------------------------------------------------------------------- grade


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


_CHECK_RE = re.compile(r"""^grader\.check\(\s*["'](\w+)["']\s*\)$""")


def _tamper_notes(nb: dict, student_nb: dict | None) -> list[str]:
    """Reasons to look at a submission by hand. Grading always uses the official tests."""
    notes = []
    if student_nb is not None:
        expected = [_source(c).strip() for c in student_nb["cells"]
                    if c.get("cell_type") == "code" and _CHECK_RE.match(_source(c).strip())]
        present = {_source(c).strip() for c in nb.get("cells", []) if c.get("cell_type") == "code"}
        missing = [_CHECK_RE.match(e).group(1) for e in expected if e not in present]
        if missing:
            notes.append("check cells edited or deleted for " + ", ".join(missing))
    if (nb.get("metadata", {}).get("otter", {}) or {}).get("tests"):
        notes.append("notebook carries its own tests in its metadata")
    handed_out = set()
    if student_nb is not None:
        handed_out = {_source(c).strip() for c in student_nb["cells"] if c.get("cell_type") == "code"}
    for i, cell in enumerate(nb.get("cells", [])):
        if cell.get("cell_type") != "code" or _source(cell).strip() in handed_out:
            continue
        for line in _source(cell).splitlines():
            s = line.strip()
            if _CHECK_RE.match(s) or s.startswith("#"):
                continue
            if re.search(r"\b(Checker|GradingResults|otter\.(execute|test_files|run|api)|OK_FORMAT|init_grading_mode)\b", s) \
                    or re.search(r"\bgrader\s*\.\s*\w+\s*=(?!=)|\bgrader\s*=(?!=)(?!\s*otter\.Notebook\()", s):
                notes.append(f"cell {i} touches the grader ({s[:80]!r})")
                break
    if notes:
        notes.append("graded with the official tests")
    return notes


def _prepare(path: Path, work: Path) -> tuple[Path | None, dict | None, list[str], str | None]:
    """Validate a submission and write a gradable copy (.ipynb, kernel set to python3) into work.

    Returns (notebook copy, parsed notebook, notes, fatal error).
    """
    import nbformat

    notes: list[str] = []
    try:
        if path.suffix == ".zip":
            with zipfile.ZipFile(path) as zf:
                nbs = [n for n in zf.namelist()
                       if n.endswith(".ipynb") and "/" not in n.strip("/") and not n.startswith("__MACOSX")]
                if len(nbs) != 1:
                    return None, None, notes, f"invalid submission zip: expected one notebook at its top level, found {len(nbs)}"
                raw = zf.read(nbs[0])
                if any(n.startswith("tests/") for n in zf.namelist()):
                    notes.append("zip contains a tests/ folder (ignored; graded with the official tests)")
        else:
            raw = path.read_bytes()
    except (OSError, zipfile.BadZipFile) as e:
        return None, None, notes, f"unreadable submission: {e}"
    try:
        nb_json = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, None, notes, f"invalid notebook: not valid JSON ({e})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. MissingIDFieldWarning from older notebooks
            nb = nbformat.reads(json.dumps(nb_json), as_version=4)
            nbformat.validate(nb)
    except Exception as e:  # nbformat raises several types
        return None, None, notes, f"invalid notebook: {type(e).__name__}: {str(e)[:300]}"
    ks = nb.metadata.get("kernelspec", {}) or {}
    if ks.get("name") not in (None, "python3"):
        notes.append(f"kernel {ks.get('name')!r} replaced by python3")
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    dest = work / "submission.ipynb"
    nbformat.write(nb, str(dest))
    return dest, nb_json, notes, None


def grade_one(submission: str | os.PathLike, autograder_zip: str | os.PathLike,
              work_dir: str | os.PathLike, timeout_s: float = DEFAULT_TIMEOUT_S,
              student_nb: dict | None = None, threads: int | None = None) -> dict[str, Any]:
    """Grade one submission in its own subprocess; return the result dict (see ``grade_folder``)."""
    submission, work = Path(submission).resolve(), Path(work_dir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    questions = read_question_points(autograder_zip)
    result: dict[str, Any] = {
        "student": submission.stem, "submission": submission.name,
        "scores": {q: 0.0 for q in questions}, "possible": dict(questions),
        "total": 0.0, "possible_total": float(sum(questions.values())),
        "failed_tests": [], "notes": [], "error": "", "elapsed_s": 0.0,
    }
    t0 = time.monotonic()
    nb_path, nb_json, notes, fatal = _prepare(submission, work)
    result["notes"] = notes
    if fatal:
        result["error"] = fatal
        return result
    result["notes"] += _tamper_notes(nb_json, student_nb)

    token = uuid.uuid4().hex
    child_json = work / "child.json"
    (work / "otter-out").mkdir()
    log_path = work / "otter.log"
    cmd = [sys.executable, "-c", _CHILD_SOURCE, str(nb_path), str(Path(autograder_zip).resolve()),
           str(work / "otter-out"), str(child_json)]
    errors: list[str] = []
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=work, env=_child_env(work, token, threads), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            errors.append(f"timed out after {timeout_s:g} s (killed; no score)")
        finally:
            _kill_tree(proc, token)  # also reaps kernels left behind by a normal exit
    result["elapsed_s"] = round(time.monotonic() - t0, 2)

    if not errors:
        try:
            child = json.loads(child_json.read_text())
        except (OSError, json.JSONDecodeError):
            tail = log_path.read_text(errors="replace")[-500:].strip().splitlines()
            child = {"questions": {}, "cell_errors": [],
                     "catastrophic": f"grader crashed (rc={proc.returncode}): {tail[-1] if tail else ''}"}
        if child.get("catastrophic"):
            errors.append(f"grading failed: {child['catastrophic']}")
        for q, qres in child.get("questions", {}).items():
            result["scores"][q] = qres["score"]
            result["possible"].setdefault(q, qres["possible"])
            for t in qres["tests"]:
                if not t["passed"]:
                    result["failed_tests"].append({"question": q, **{k: t[k] for k in ("name", "hidden", "points", "reason")}})
        cell_errors = child.get("cell_errors", [])
        if cell_errors:
            first = cell_errors[0]
            errors.append(f"{len(cell_errors)} cell(s) raised; first: cell {first['cell']}: {first['error']}")
    result["total"] = float(sum(result["scores"].values()))
    result["error"] = "; ".join(errors + result["notes"])
    shutil.rmtree(work / "tmp", ignore_errors=True)
    shutil.rmtree(work / "jupyter-data", ignore_errors=True)
    return result


def grade_folder(submissions_dir: str | os.PathLike, autograder_zip: str | os.PathLike,
                 out_dir: str | os.PathLike, timeout_s: float = DEFAULT_TIMEOUT_S,
                 jobs: int = 1, student_notebook: str | os.PathLike | None = None,
                 manual_questions: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Grade every ``*.ipynb`` / ``*.zip`` in ``submissions_dir`` (not recursive).

    Writes ``<out_dir>/<student>.json`` (student = file stem) with ``scores`` and ``possible``
    per question, ``total``, ``possible_total``, ``failed_tests`` (question, test name, hidden,
    points, reason), ``notes`` and ``error``; and ``<out_dir>/gradebook.csv`` with the columns
    ``student, <one per question>, total, possible, error``. Manually graded questions get an
    empty column (to be filled in by hand) and do not count in ``possible``. otter's output for
    each submission goes to ``<out_dir>/logs/<student>.log``.
    """
    sub_dir, out = Path(submissions_dir).resolve(), Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work_root = out / ".work"
    questions = read_question_points(autograder_zip)
    manual = dict(manual_questions or {})
    student_nb = json.loads(Path(student_notebook).read_text(encoding="utf-8")) if student_notebook else None
    files = sorted(p for p in sub_dir.iterdir()
                   if p.is_file() and p.suffix in (".ipynb", ".zip") and not p.name.startswith("."))
    names: dict[Path, str] = {}
    for p in files:
        name = p.stem
        if name in names.values():
            name = f"{p.stem}{p.suffix.replace('.', '_')}"
        names[p] = name
    threads = 1 if jobs > 1 else None

    def run(p: Path) -> dict[str, Any]:
        try:
            res = grade_one(p, autograder_zip, work_root / names[p], timeout_s, student_nb, threads)
        except Exception as e:  # never let one submission stop the others
            res = {"student": names[p], "submission": p.name, "scores": {q: 0.0 for q in questions},
                   "possible": dict(questions), "total": 0.0, "possible_total": float(sum(questions.values())),
                   "failed_tests": [], "notes": [], "error": f"grading driver error: {type(e).__name__}: {e}"}
        res["student"] = names[p]
        (out / f"{names[p]}.json").write_text(json.dumps(res, indent=2))
        log = work_root / names[p] / "otter.log"
        if log.is_file():  # otter's output, for looking into failures
            (out / "logs").mkdir(exist_ok=True)
            shutil.copyfile(log, out / "logs" / f"{names[p]}.log")
        print(f"{names[p]}: {res['total']:g}/{res['possible_total']:g}"
              + (f"  [{res['error']}]" if res["error"] else ""), flush=True)
        return res

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = list(pool.map(run, files))

    columns = sorted(set(questions) | set(manual), key=_natural_key)
    with open(out / "gradebook.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["student", *columns, "total", "possible", "error"])
        for r in results:
            w.writerow([r["student"],
                        *("" if q in manual else f"{r['scores'].get(q, 0.0):g}" for q in columns),
                        f"{r['total']:g}", f"{r['possible_total']:g}", r["error"]])
    shutil.rmtree(work_root, ignore_errors=True)
    return results


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bnviz.grading", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="otter assign the solution notebook")
    b.add_argument("--source", default=str(DEFAULT_SOURCE))
    b.add_argument("--out", default=str(DEFAULT_DIST))
    g = sub.add_parser("grade", help="grade a folder of submissions with otter run (no Docker)")
    g.add_argument("submissions")
    g.add_argument("--dist", default=str(DEFAULT_DIST), help="output folder of `build`")
    g.add_argument("--autograder", default=None, help="autograder zip (default: from --dist)")
    g.add_argument("--out", default="grades")
    g.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per submission")
    g.add_argument("--jobs", type=int, default=1, help="submissions graded at the same time")
    args = parser.parse_args(argv)

    if args.cmd == "build":
        manifest = build_assignment(args.out, args.source)
        print(f"built {args.out}: student notebook {manifest['student_notebook']}, "
              f"autograder {manifest['autograder_zip']}, student zip {manifest['student_zip']}; "
              f"{manifest['autograded_points']:g} autograded + {manifest['manual_points']:g} manual points")
        return 0

    dist = Path(args.dist)
    manifest_path = dist / "assignment.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    autograder = args.autograder or (dist / manifest["autograder_zip"] if manifest else None)
    if autograder is None or not Path(autograder).is_file():
        parser.error(f"no autograder zip: run `python -m bnviz.grading build --out {dist}` or pass --autograder")
    student_nb = dist / manifest["student_notebook"] if manifest else None
    manual = {q: c["points"] for q, c in manifest.get("questions", {}).items() if c.get("manual")}
    results = grade_folder(args.submissions, autograder, args.out, timeout_s=args.timeout, jobs=args.jobs,
                           student_notebook=student_nb if student_nb and student_nb.is_file() else None,
                           manual_questions=manual)
    print(f"graded {len(results)} submission(s) -> {Path(args.out) / 'gradebook.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
