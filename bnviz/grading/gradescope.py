"""A Gradescope autograder that runs bnviz's own grading (issue 24 item 4).

``build_zip`` (``python -m bnviz.grading gradescope``, ``make gradescope``) writes a zip in
Gradescope's autograder format (https://gradescope-autograders.readthedocs.io/en/latest/specs/)::

    setup.sh          once, as root, when Gradescope builds the image: apt packages (bubblewrap,
                      libseccomp2, python3-venv), a venv at /autograder/venv with the pinned torch
                      (CPU wheel), numpy, pyyaml, pyseccomp, copydetect (the versions this grader ran)
    run_autograder    for each submission: ``python -m bnviz.grading gradescope-run``
    vendor/bnviz/     this bnviz's own Python sources (the driver, the worker, the trusted checker)
    dist/             assignment.json, the student notebook, public_answers.py (never the solution)
    secret.key        32 random bytes drawn when the zip is built (root-only in the container)

``run`` (``gradescope-run``) grades ``<root>/submission`` with ``grade.grade_folder``: the same
worker (normal + strict pass), judge and trusted checker as ``make grade``, and writes
``<root>/results/results.json``: one test per checker test (visible tests ``"visible"``, hidden tests
``"after_published"``: their messages can quote hidden inputs), the top-level ``score`` (the checker's
total, which also counts the rules' withheld points), student-readable errors in ``output``.

Seeds: each submission's test inputs come from HMAC(secret.key, Gradescope's submission id)
(``grade.derive_seed``): fresh inputs per submission, while Gradescope's "Rerun autograder" on the
same submission reproduces its inputs (a borderline tolerance cannot flip on a rerun). Without a
submission id (a local run), a fresh random seed per run. The seed is printed to the instructor's
stdout only (``grade --seed`` reproduces it), never put in results.json.

Isolation: Gradescope runs every submission in a fresh container, as root. The container is the
outer sandbox. Inside it, bubblewrap is used when it can create its namespaces; otherwise (Docker's
default AppArmor profile usually refuses them) the worker runs unsandboxed but as the unprivileged
``bnviz-grader`` user (``sandbox.Limits.user`` under ``--no-sandbox``): it cannot read secret.key
or write results/, but it shares the container's network and file system (what is world-readable).
Where that user cannot run this Python (it lives in a folder closed to others), the worker runs as
root and stdout says so. Paths: ``$AUTOGRADER_ROOT`` (default /autograder).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
import zipfile
from importlib import metadata
from pathlib import Path

ROOT_ENV, PYTHON_ENV, SANDBOX_ENV, TIMEOUT_ENV = ("AUTOGRADER_ROOT", "BNVIZ_GRADESCOPE_PYTHON",
                                                  "BNVIZ_GRADESCOPE_SANDBOX", "BNVIZ_GRADESCOPE_TIMEOUT")
HIDDEN_VISIBILITY = "after_published"
# what the driver, the judge and the worker import; pinned to this grader's versions in setup.sh
PINNED = ("numpy", "pyyaml", "pyseccomp", "copydetect")
SEED_PREFIX = "gradescope-submission:"

RUN_AUTOGRADER = """#!/usr/bin/env bash
# bnviz's Gradescope autograder (built by `python -m bnviz.grading gradescope`): grades the notebook in
# $ROOT/submission with bnviz's own worker and trusted checker, writes $ROOT/results/results.json.
# AUTOGRADER_ROOT (default /autograder) and BNVIZ_GRADESCOPE_PYTHON (default: setup.sh's venv) are for
# running it outside Gradescope (tests). The bnviz it runs is the one in this zip (vendor/), not an install.
ROOT="${AUTOGRADER_ROOT:-/autograder}"
PY="${BNVIZ_GRADESCOPE_PYTHON:-$ROOT/venv/bin/python}"
chmod 600 "$ROOT/source/secret.key" 2>/dev/null
cd "$ROOT" && PYTHONPATH="$ROOT/source/vendor" exec "$PY" -s -m bnviz.grading gradescope-run --root "$ROOT"
"""

SETUP_SH = """#!/usr/bin/env bash
# bnviz's Gradescope autograder: installs what run_autograder needs (Gradescope runs this once, as root,
# when it builds the image). Pins: the versions the grader that built this zip ran ({python}).
set -euxo pipefail
apt-get update
apt-get install -y --no-install-recommends python3 python3-venv bubblewrap libseccomp2 util-linux
python3 -c 'import sys; assert sys.version_info >= {min_py}, "the pins need Python >= {min_txt}: pick a newer base image"'
python3 -m venv /autograder/venv
/autograder/venv/bin/pip install --upgrade pip
/autograder/venv/bin/pip install --index-url https://download.pytorch.org/whl/cpu "torch=={torch}"
/autograder/venv/bin/pip install {pins}
id bnviz-grader >/dev/null 2>&1 || useradd --system --user-group --no-create-home --home-dir /nonexistent \\
    --shell /usr/sbin/nologin bnviz-grader
chmod 600 /autograder/source/secret.key
chmod -R a+rX /autograder/venv /autograder/source/vendor /autograder/source/dist
/autograder/venv/bin/python -c "import torch, numpy; print('torch', torch.__version__, 'numpy', numpy.__version__)"
"""


def _version(dist: str) -> str:
    return metadata.version(dist).split("+")[0]  # 2.14.1+cu130 -> 2.14.1 (the CPU wheel of the same release)


def _min_python() -> tuple[int, int]:
    """The highest ``Requires-Python: >=3.N`` of the pinned packages (numpy 2.4: 3.11), at least 3.10."""
    import re

    found = [(3, 10)]
    for dist in ("torch", *PINNED):
        m = re.search(r">=\s*3\.(\d+)", metadata.metadata(dist).get("Requires-Python") or "")
        if m:
            found.append((3, int(m.group(1))))
    return max(found)


def setup_script() -> str:
    pins = " ".join(f'"{p}=={_version(p)}"' for p in PINNED)
    low = _min_python()
    return SETUP_SH.format(torch=_version("torch"), pins=pins, python=f"Python {sys.version.split()[0]}",
                           min_py=repr(low), min_txt=f"{low[0]}.{low[1]}")


def _add(zf: zipfile.ZipFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
    info.external_attr = (0o100000 | mode) << 16  # a regular file with these permission bits
    info.compress_type = zipfile.ZIP_DEFLATED
    zf.writestr(info, data)


def build_zip(dist: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """The autograder zip for the assignment built in ``dist`` (``build``'s output folder); returns
    its path (default ``<dist>/gradescope_autograder.zip``). Ships ``assignment.json`` (without the
    instructor's source path), the student notebook and ``public_answers.py``, never the solution."""
    dist = Path(dist)
    manifest_path = dist / "assignment.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found: build the assignment first (make assignment)")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    from .assignments import name_of

    name_of(manifest)  # ValueError for an assignment grading does not know, before anything is written
    student_nb = dist / manifest["student_notebook"]
    if not student_nb.is_file():
        raise FileNotFoundError(f"{student_nb} not found: build the assignment again (make assignment)")
    out = Path(out) if out else dist / "gradescope_autograder.zip"
    package = Path(__file__).resolve().parents[1]  # this bnviz
    shipped = {k: v for k, v in manifest.items() if k != "source"}
    tmp = out.with_name(out.name + ".part")
    with zipfile.ZipFile(tmp, "w") as zf:
        _add(zf, "setup.sh", setup_script().encode(), 0o755)
        _add(zf, "run_autograder", RUN_AUTOGRADER.encode(), 0o755)
        _add(zf, "secret.key", secrets.token_hex(32).encode(), 0o600)
        _add(zf, "dist/assignment.json", json.dumps(shipped, indent=2).encode())
        _add(zf, f"dist/{manifest['student_notebook']}", student_nb.read_bytes())
        if (dist / "public_answers.py").is_file():
            _add(zf, "dist/public_answers.py", (dist / "public_answers.py").read_bytes())
        for src in sorted(package.glob("*.py")) + sorted((package / "grading").glob("*.py")):
            _add(zf, f"vendor/{src.relative_to(package.parent).as_posix()}", src.read_bytes())
    os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------- in the container


def seed_for(root: Path, log=print) -> int:
    """HMAC(secret.key, the Gradescope submission id), or a fresh random seed (no id or no key)."""
    from .grade import derive_seed

    try:
        key = (root / "source" / "secret.key").read_bytes().strip()
        meta = json.loads((root / "submission_metadata.json").read_text(encoding="utf-8"))
        sid = meta["id"]
    except (OSError, ValueError, KeyError, TypeError):
        log("no secret.key or no submission id in submission_metadata.json: a fresh random seed for this run")
        return secrets.randbits(62)
    return derive_seed(key, f"{SEED_PREFIX}{sid}")


def find_submission(folder: Path, preferred: str) -> Path:
    """The notebook (or zip) the student uploaded; ValueError in words a student can act on."""
    found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in (".ipynb", ".zip")
                   and ".ipynb_checkpoints" not in p.parts)
    if not found:
        raise ValueError(f"no .ipynb file in your submission: upload your {preferred}")
    notebooks = [p for p in found if p.suffix.lower() == ".ipynb"] or found
    if len(notebooks) == 1:
        return notebooks[0]
    named = [p for p in notebooks if p.name == preferred]
    if len(named) == 1:
        return named[0]
    raise ValueError(f"{len(notebooks)} notebooks in your submission ({', '.join(p.name for p in notebooks[:5])}): "
                     f"upload only your {preferred}")


def isolation(log=print) -> tuple[str, str | None]:
    """(backend, user) for ``grade_folder``: bubblewrap where it works here, else ``none`` with the
    worker run as the unprivileged ``bnviz-grader`` when this process is root and that user can
    run this Python, else ``none`` as this user (said on stdout). $BNVIZ_GRADESCOPE_SANDBOX=bwrap
    or none forces one."""
    import subprocess

    from . import sandbox, users

    forced = os.environ.get(SANDBOX_ENV, "")
    if forced not in ("", "bwrap", "none"):
        raise ValueError(f"${SANDBOX_ENV}={forced!r}: use bwrap, none, or leave it unset")
    if forced != "none":
        try:
            sandbox.choose_backend("bwrap")
            sandbox.prepare(sandbox.Limits())  # one test sandbox, as the grader's own user
            return "bwrap", None
        except sandbox.SandboxUnavailable as e:
            if forced == "bwrap":
                raise
            log(f"bubblewrap cannot sandbox here ({str(e)[:300]}): the Gradescope container is the sandbox")
    if os.geteuid() != 0:
        return "none", None
    try:
        user = users.resolve(users.DEFAULT_USER)
        probe = subprocess.run(user.setpriv() + [sys.executable, "-s", "-c", "import torch"], cwd="/",
                               capture_output=True, text=True, timeout=300)
        if probe.returncode == 0:
            log(f"student code runs as the unprivileged user {user.name} (uid {user.uid}), without bubblewrap")
            return "none", user.name
        why = f"{user.name} cannot run {sys.executable} with torch: {probe.stderr.strip()[-200:]}"
    except (users.NoSandboxUser, OSError, subprocess.TimeoutExpired) as e:
        why = str(e)[:300]
    log(f"WARNING: student code runs as root in this container ({why}); only the container isolates it")
    return "none", None


def test_list(assignment: str = "batch_norm") -> list[tuple[str, str, bool, float]]:
    """(question, test name, hidden, points) of every autograded test (the same for every seed)."""
    from . import assignments

    return [(t.question, t.name, t.hidden, t.points) for t in assignments.make_tests(assignment, 0)]


def results_json(result, tests: list[tuple[str, str, bool, float]], manual: dict[str, float]) -> dict:
    """Gradescope's results.json for one graded submission (``grade.Result`` or its JSON dict):
    a test per checker test (hidden ones ``after_published``), a visible note per question whose
    points the rules withheld, the checker's total as ``score``, what stopped the notebook in
    ``output``. No seed, flag, log or sandbox detail."""
    from .feedback import student_error

    failed = {f.get("name"): f for f in result["failed_tests"] or [] if isinstance(f, dict)}
    entries = []
    for q, name, hidden, points in tests:
        f = failed.get(name)
        msg = "passed" if f is None else (str(f.get("reason") or "failed"))[:4000]
        entries.append({"name": name + (" (hidden)" if hidden else ""), "score": points if f is None else 0.0,
                        "max_score": points, "status": "passed" if f is None else "failed", "output": msg,
                        "visibility": HIDDEN_VISIBILITY if hidden else "visible"})
    for q, got in sorted(result["scores"].items()):
        passed = sum(p for qq, n, _, p in tests if qq == q and n not in failed)
        if float(got) < passed - 1e-9:
            entries.append({"name": f"{q}: points withheld under the assignment's rules", "score": 0.0,
                            "max_score": 0.0, "status": "failed", "visibility": "visible",
                            "output": f"{q} scores {float(got):g} although its passing tests add up to {passed:g}: "
                                      "a forbidden function (see the Rules in the notebook) or the strict re-run; "
                                      "ask your instructor"})
    lines = [f"Autograded score: {float(result['total']):g} / {float(result['possible_total']):g}."]
    if manual:
        lines.append("Graded by hand later: " + ", ".join(f"{q} ({p:g} points)" for q, p in sorted(manual.items())) + ".")
    lines.append("Hidden tests show their messages after the grades are published.")
    errors = student_error(result["error"]) if result["error"] else []
    if errors:
        lines += ["", "What stopped your notebook:"] + [f"- {e}" for e in errors]
    return {"score": float(result["total"]), "execution_time": int(round(float(result["elapsed_s"] or 0))),
            "output": "\n".join(lines), "stdout_visibility": "hidden", "tests": entries}


def failure_json(message: str) -> dict:
    """results.json when nothing could be graded (score 0, the reason in words)."""
    return {"score": 0.0, "output": message, "stdout_visibility": "hidden", "tests": []}


def _write(root: Path, data: dict) -> Path:
    target = root / "results" / "results.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name("results.json.part")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, target)
    return target


def grade_one(root: Path, log=print) -> dict:
    """Grade ``<root>/submission`` (the student's upload) and return results.json's content."""
    from . import sandbox
    from .grade import grade_folder

    dist = root / "source" / "dist"
    manifest = json.loads((dist / "assignment.json").read_text(encoding="utf-8"))
    student_nb = dist / manifest["student_notebook"]
    from .assignments import name_of

    try:
        assignment = name_of(manifest)
    except ValueError as e:
        return failure_json(f"Not graded: {e}; ask your instructor.")
    try:
        upload = find_submission(root / "submission", Path(manifest["student_notebook"]).name)
    except ValueError as e:
        return failure_json(f"Not graded: {e}.")
    manual = {q: float(c["points"] or 0) for q, c in manifest.get("questions", {}).items() if c.get("manual")}
    backend, user = isolation(log)
    seed = seed_for(root, log)
    log(f"seed {seed} (reproduce: python -m bnviz.grading grade FOLDER --seed {seed}); backend {backend}")
    work = Path(tempfile.mkdtemp(prefix="bnviz-gradescope-"))  # root-only: student code cannot reach it
    try:
        subs = work / "submissions"
        subs.mkdir()
        shutil.copyfile(upload, subs / ("submission" + upload.suffix.lower()))
        limits = sandbox.Limits(timeout_s=float(os.environ.get(TIMEOUT_ENV, "240")), threads=2, user=user)
        results = grade_folder(subs, work / "grades", jobs=1, limits=limits, student_notebook=student_nb,
                               manual_questions=manual, forbidden=manifest.get("forbidden"), seed=seed,
                               sandbox_backend=backend, extra_masks=[root / "source", root / "results"], log=log,
                               assignment=assignment)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if len(results) != 1:
        return failure_json("Not graded: the grader found no notebook to grade; ask your instructor.")
    return results_json(results[0], test_list(assignment), manual)


def run(root: str | os.PathLike | None = None, log=print) -> int:
    """run_autograder's body: grade, write ``<root>/results/results.json`` (also when grading
    fails: score 0 and the reason); 0, or 1 on a grader failure."""
    root = Path(root or os.environ.get(ROOT_ENV) or "/autograder").resolve()
    t0 = time.monotonic()
    log(f"bnviz {Path(__file__).resolve().parents[1]} ({sys.executable}); submission "
        + hashlib.sha256(b"".join(p.read_bytes() for p in sorted((root / "submission").rglob("*")) if p.is_file())).hexdigest()[:16])
    try:
        data, rc = grade_one(root, log), 0
    except Exception as e:  # noqa: BLE001 (a results.json must be written whatever failed)
        import traceback

        traceback.print_exc(file=sys.stdout)
        data, rc = failure_json("The autograder failed on its side (not your code's fault): ask your instructor. "
                                f"({type(e).__name__})"), 1
    path = _write(root, data)
    log(f"{path}: score {data['score']:g} in {time.monotonic() - t0:.1f} s")
    return rc
