"""The Gradescope autograder (issue 24 item 4) and rebuilds that keep the instructor's keys.

The zip ``python -m bnviz.grading gradescope`` builds is unpacked into a temporary folder laid out as
Gradescope's ``/autograder`` (``source/`` = the zip, ``run_autograder``, ``submission/``,
``results/``, ``submission_metadata.json``) and its ``run_autograder`` is run there, with this venv's
Python (``$BNVIZ_GRADESCOPE_PYTHON``; setup.sh's pip installs are not run). Each ``results.json`` is
checked against the format Gradescope documents (``check_results``), and its scores against what
``grade`` (``make grade``) gives the same file with the same seed.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.grading

# ----------------------------------------------------------------- Gradescope's documented format
# https://gradescope-autograders.readthedocs.io/en/latest/specs/#output-format (the "Output format" JSON,
# "Controlling Test Case Visibility", "Controlling standard output visibility"; status and *_format fields
# from the same page's current version)
VISIBILITY = {"hidden", "after_due_date", "after_published", "visible"}
FORMATS = {"text", "html", "simple_format", "md", "ansi"}
TOP = {"score": (int, float), "execution_time": (int, float), "output": str, "output_format": str,
       "test_output_format": str, "test_name_format": str, "visibility": str, "stdout_visibility": str,
       "extra_data": dict, "tests": list, "leaderboard": list}
TEST = {"score": (int, float), "max_score": (int, float), "status": str, "name": str, "name_format": str,
        "number": str, "output": str, "output_format": str, "tags": list, "visibility": str, "extra_data": dict}


def check_results(data) -> list[str]:
    """What in ``data`` breaks Gradescope's documented results.json format (empty: none)."""
    bad = []
    if not isinstance(data, dict):
        return ["not a JSON object"]
    for key, value in data.items():
        if key not in TOP:
            bad.append(f"unknown top-level key {key!r}")
        elif isinstance(value, bool) or not isinstance(value, TOP[key]):
            bad.append(f"{key}: {type(value).__name__}")
    tests = data.get("tests", [])
    if "score" not in data and (not tests or any("score" not in t for t in tests if isinstance(t, dict))):
        bad.append("no top-level score and a test without one")
    for key in ("visibility", "stdout_visibility"):
        if key in data and data[key] not in VISIBILITY:
            bad.append(f"{key}={data[key]!r}")
    for i, t in enumerate(tests if isinstance(tests, list) else []):
        if not isinstance(t, dict):
            bad.append(f"tests[{i}] is not an object")
            continue
        for key, value in t.items():
            if key not in TEST:
                bad.append(f"tests[{i}]: unknown key {key!r}")
            elif isinstance(value, bool) or not isinstance(value, TEST[key]):
                bad.append(f"tests[{i}].{key}: {type(value).__name__}")
        if t.get("visibility", "visible") not in VISIBILITY:
            bad.append(f"tests[{i}].visibility={t['visibility']!r}")
        if t.get("status", "passed") not in ("passed", "failed"):
            bad.append(f"tests[{i}].status={t['status']!r}")
        if any(t.get(k, "text") not in FORMATS for k in ("output_format", "name_format")):
            bad.append(f"tests[{i}]: unknown format")
    return bad


def test_the_checker_rejects_what_the_format_forbids():
    case = {"name": "a", "score": 1.0, "max_score": 1.0, "status": "passed", "visibility": "visible"}
    good = {"score": 1.0, "stdout_visibility": "hidden", "tests": [case]}
    assert check_results(good) == [] and check_results({"score": 1.0, "tests": [{"name": "a"}]}) == []
    for broken in ({**good, "visibility": "students"}, {**good, "score": "1"}, {"tests": [{"name": "a"}]},
                   {**good, "tests": [{**case, "visibility": "after_grading"}]}, {**good, "tests": [{**case, "status": "ok"}]},
                   {**good, "tests": [{**case, "max_score": True}]}, {**good, "total": 1}, [good]):
        assert check_results(broken), broken

# ----------------------------------------------------------------- a folder laid out as /autograder


def _notebook(solution: dict, mutations=(), extra_cell: str | None = None) -> dict:
    nb = json.loads(json.dumps(solution))
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            for old, new in mutations:
                src = src.replace(old, new)
            cell["source"] = src
    if extra_cell:
        nb["cells"].append({"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
                            "source": extra_cell})
    return nb


class Autograder:
    """Gradescope's /autograder in a temporary folder that other users can traverse (0755, as
    /autograder is), so that a run whose student code is not dropped to an unprivileged user shows."""

    def __init__(self, zip_path: Path, submission: dict | None, submission_id: int = 123456):
        self.root = Path(tempfile.mkdtemp(prefix="gradescope-root-", dir="/tmp"))
        self.root.chmod(0o755)
        for sub in ("source", "submission", "results"):
            (self.root / sub).mkdir(mode=0o755)
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(self.root / "source")
        shutil.copyfile(self.root / "source" / "run_autograder", self.root / "run_autograder")
        (self.root / "run_autograder").chmod(0o755)
        if submission is not None:
            (self.root / "submission" / "batch_norm.ipynb").write_text(json.dumps(submission))
        (self.root / "submission_metadata.json").write_text(json.dumps(
            {"id": submission_id, "created_at": "2026-12-07T10:00:00-05:00", "users": [{"email": "s@example.com", "id": 1, "name": "S"}]}))

    def run(self, **env) -> tuple[dict, str]:
        full = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
                "AUTOGRADER_ROOT": str(self.root), "BNVIZ_GRADESCOPE_PYTHON": sys.executable, **env}
        proc = subprocess.run(["bash", str(self.root / "run_autograder")], cwd="/", env=full,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return json.loads((self.root / "results" / "results.json").read_text()), proc.stdout

    def seed(self) -> int:
        from bnviz.grading import gradescope

        return gradescope.seed_for(self.root, log=lambda *_: None)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def gs(grading_dist, bwrap, tmp_path_factory):
    from bnviz.grading import cli

    dist, manifest = grading_dist
    zip_path = tmp_path_factory.mktemp("gs") / "autograder.zip"
    assert cli.main(["gradescope", "--dist", str(dist), "--out", str(zip_path)]) == 0
    solution = json.loads((dist / "autograder" / "batch_norm.ipynb").read_text())
    return zip_path, solution, dist, manifest


def test_the_zip_holds_what_gradescope_needs_and_never_the_solution(gs):
    zip_path, solution, dist, _ = gs
    with zipfile.ZipFile(zip_path) as zf:
        names = set(zf.namelist())
        modes = {i.filename: i.external_attr >> 16 for i in zf.infolist()}
        setup = zf.read("setup.sh").decode()
        shipped = json.loads(zf.read("dist/assignment.json"))
        texts = b"".join(zf.read(n) for n in names)
    assert {"setup.sh", "run_autograder", "secret.key", "dist/assignment.json", "dist/student/batch_norm.ipynb",
            "vendor/bnviz/grading/worker.py", "vendor/bnviz/grading/checker.py", "vendor/bnviz/grading/grade.py"} <= names
    assert modes["run_autograder"] & 0o111 and modes["setup.sh"] & 0o111 and not modes["secret.key"] & 0o077
    assert not any(n.startswith(("autograder", "dist/autograder")) for n in names)
    assert "source" not in shipped and shipped["questions"] == json.loads((dist / "assignment.json").read_text())["questions"]
    # the only notebook is the public student notebook (the answer key's notebook is not shipped)
    with zipfile.ZipFile(zip_path) as zf:
        assert [n for n in names if n.endswith(".ipynb")] == ["dist/student/batch_norm.ipynb"]
        assert zf.read("dist/student/batch_norm.ipynb") == (dist / "student" / "batch_norm.ipynb").read_bytes()
    assert json.dumps(solution).encode() not in texts
    import torch

    assert f'"torch=={torch.__version__.split("+")[0]}"' in setup and "download.pytorch.org/whl/cpu" in setup


def test_reference_solution_gets_full_marks_in_gradescopes_format(gs):
    zip_path, solution, _, manifest = gs
    ag = Autograder(zip_path, solution)
    try:
        data, stdout = ag.run()
        assert check_results(data) == [], check_results(data)
        assert f"bnviz {ag.root / 'source' / 'vendor' / 'bnviz'}" in stdout  # the zip's bnviz ran, not the checkout's
        assert data["score"] == manifest["autograded_points"] == sum(t["max_score"] for t in data["tests"])
        assert all(t["status"] == "passed" and t["score"] == t["max_score"] for t in data["tests"])
        from bnviz.grading import checker

        tests = checker.make_tests(0)
        assert [t["name"].replace(" (hidden)", "") for t in data["tests"]] == [t.name for t in tests]
        assert [t["visibility"] for t in data["tests"]] == ["after_published" if t.hidden else "visible" for t in tests]
        assert data["stdout_visibility"] == "hidden" and str(ag.seed()) not in json.dumps(data)
        assert stat.S_IMODE((ag.root / "source" / "secret.key").stat().st_mode) == 0o600
    finally:
        ag.close()


def test_a_planted_bug_loses_exactly_its_tests_points_as_grade_does(gs, tmp_path):
    """biased running variance: the same tests fail and the same score as ``grade --seed`` (the
    seed HMAC(secret.key, submission id)) gives the same file; q1 - 4 is among them."""
    from bnviz.grading import cli

    zip_path, solution, dist, manifest = gs
    bug = _notebook(solution, [("momentum * var * n / (n - 1)", "momentum * var")])
    ag = Autograder(zip_path, bug, submission_id=777)
    try:
        data, _ = ag.run()
        seed = ag.seed()
    finally:
        ag.close()
    assert check_results(data) == []
    subs, out = tmp_path / "subs", tmp_path / "grades"
    subs.mkdir()
    (subs / "submission.ipynb").write_text(json.dumps(bug))
    assert cli.main(["grade", str(subs), "--dist", str(dist), "--out", str(out), "--seed", str(seed), "--timeout", "240"]) == 0
    ref = json.loads((out / "submission.json").read_text())
    failed = {t["name"].replace(" (hidden)", "") for t in data["tests"] if t["status"] == "failed"}
    assert failed == {f["name"] for f in ref["failed_tests"]} and "q1 - 4" in failed
    assert data["score"] == ref["total"] == manifest["autograded_points"] - sum(
        t["max_score"] for t in data["tests"] if t["status"] == "failed")
    for t in data["tests"]:
        assert t["score"] == (0.0 if t["status"] == "failed" else t["max_score"])
        reason = {f["name"]: f["reason"] for f in ref["failed_tests"]}.get(t["name"].replace(" (hidden)", ""))
        assert t["output"] == (reason if reason else "passed")


def test_without_bwrap_student_code_runs_unprivileged(gs):
    """No bubblewrap (forced): the worker runs as bnviz-grader, so student code can neither write
    results/ nor read secret.key (as root it could do both), and the solution still scores."""
    if os.geteuid() != 0:
        pytest.skip("the drop to bnviz-grader is for a grader running as root (as on Gradescope)")
    zip_path, solution, _, manifest = gs
    drop = Path(tempfile.mkdtemp(prefix="gradescope-drop-", dir="/tmp"))
    drop.chmod(0o777)
    ag = Autograder(zip_path, None)
    hostile = (f"import os, shutil\nfor _f in (lambda: open({str(ag.root / 'results' / 'pwned')!r}, 'w').write('x'),\n"
               f"           lambda: shutil.copyfile({str(ag.root / 'source' / 'secret.key')!r}, {str(drop / 'key')!r})):\n"
               "    try:\n        _f()\n    except OSError:\n        pass\n"
               f"open({str(drop / 'uid')!r}, 'w').write(str(os.getuid()))\n")
    (ag.root / "submission" / "batch_norm.ipynb").write_text(json.dumps(_notebook(solution, extra_cell=hostile)))
    try:
        data, stdout = ag.run(BNVIZ_GRADESCOPE_SANDBOX="none")
        assert "runs as the unprivileged user bnviz-grader" in stdout, stdout
        assert (drop / "uid").read_text() != "0"  # the cell ran, not as root
        assert not (ag.root / "results" / "pwned").exists() and not (drop / "key").exists()
        assert check_results(data) == [] and data["score"] == manifest["autograded_points"]
    finally:
        ag.close()
        shutil.rmtree(drop, ignore_errors=True)


def test_seeds_follow_the_secret_and_the_submission_id(tmp_path):
    """A rerun of one submission draws its inputs again; another submission or another zip's
    secret draws others; no id: a random seed per run."""
    from bnviz.grading import gradescope

    (tmp_path / "source").mkdir()

    def seed(key: bytes, sid) -> int:
        (tmp_path / "source" / "secret.key").write_bytes(key)
        (tmp_path / "submission_metadata.json").write_text(json.dumps({} if sid is None else {"id": sid}))
        return gradescope.seed_for(tmp_path, log=lambda *_: None)

    a = seed(b"k1", 1)
    assert a == seed(b"k1", 1) and len({a, seed(b"k1", 2), seed(b"k2", 1)}) == 3
    assert seed(b"k1", None) != seed(b"k1", None)


def test_withheld_points_and_errors_are_said_without_grader_internals():
    """A question the rules lowered below its passing tests gets a visible 0-point note; a cell
    error reaches the student, the sandbox's own words do not; the score is the checker's total."""
    from bnviz.grading import gradescope

    tests = [("q1", "q1 - 1", False, 1.0), ("q1", "q1 - 2", True, 2.0), ("q2", "q2 - 1", False, 4.0)]
    result = {"scores": {"q1": 0.0, "q2": 4.0}, "total": 4.0, "possible_total": 7.0, "elapsed_s": 3.2,
              "failed_tests": [{"name": "q1 - 2", "reason": "hidden input (2, 3) differs"}],
              "error": "1 cell(s) raised; first: cell 5: student code raised NameError: name 'x' is not defined; "
                       "the sandboxed run ended without a report (exit status 137); no score"}
    data = gradescope.results_json(result, tests, {"q4": 2.0})
    assert check_results(data) == [] and data["score"] == 4.0
    by_name = {t["name"]: t for t in data["tests"]}
    assert by_name["q1 - 2 (hidden)"]["visibility"] == "after_published" and by_name["q1 - 2 (hidden)"]["score"] == 0
    withheld = by_name["q1: points withheld under the assignment's rules"]
    assert withheld["visibility"] == "visible" and withheld["max_score"] == 0 and not any(n.startswith("q2:") for n in by_name)
    assert "NameError: name 'x' is not defined" in data["output"] and "exit status" not in data["output"]
    assert "q4 (2 points)" in data["output"]


def test_building_without_an_assignment_says_what_to_do(tmp_path):
    from bnviz.grading import gradescope

    with pytest.raises(FileNotFoundError, match="make assignment"):
        gradescope.build_zip(tmp_path)
    assert not any(tmp_path.iterdir())


def test_no_notebook_is_a_zero_with_the_reason(gs):
    zip_path, *_ = gs
    ag = Autograder(zip_path, None)
    (ag.root / "submission" / "notes.txt").write_text("oops")
    try:
        data, _ = ag.run()
    finally:
        ag.close()
    assert check_results(data) == [] and data["score"] == 0 and "no .ipynb file" in data["output"]


# ----------------------------------------------------------------- rebuilds keep the instructor's keys


def test_a_rebuild_keeps_the_late_policy_and_the_instructors_keys(grading_dist, tmp_path, monkeypatch):
    """``build`` again over a dist whose assignment.json has ``late`` and a key of the instructor's:
    both are still there, the generated keys are rewritten; an unreadable assignment.json stops the
    build before anything is removed. (otter assign is replaced by a copy of the session's build.)"""
    from bnviz.grading import build

    dist, _ = grading_dist
    source = Path(__file__).resolve().parent.parent / "notebooks" / "assignments" / "batch_norm" / "batch_norm.ipynb"

    def fake_assign(src, out, timeout_s, variant):
        for sub in ("student", "autograder"):
            shutil.copytree(dist / sub, out / sub)

    monkeypatch.setattr(build, "_otter_assign", fake_assign)
    out = tmp_path / "dist"
    first = build.build_assignment(out, source)
    late = {"policy": "percent_per_day", "percent_per_day": 10, "due": "2026-12-01T23:59:00+00:00", "extensions": {"anna": 2}}
    edited = {**first, "late": late, "course_note": "TA: Ben", "autograded_points": 999}
    (out / "assignment.json").write_text(json.dumps(edited))
    again = build.build_assignment(out, source)
    on_disk = json.loads((out / "assignment.json").read_text())
    assert on_disk == again and on_disk["late"] == late and on_disk["course_note"] == "TA: Ben"
    assert on_disk["autograded_points"] == first["autograded_points"] == 19
    (out / "assignment.json").write_text('{"late": {"policy": ')  # cut short while editing
    with pytest.raises(ValueError, match="cannot be read as JSON"):
        build.build_assignment(out, source)
    assert (out / "student" / "batch_norm.ipynb").is_file()  # nothing removed
