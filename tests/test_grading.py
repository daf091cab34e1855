"""The otter-grader assignment: build it, grade the solution, planted bugs and bad submissions.

The assignment is built once per module (``otter assign`` also runs every test against the
solution) and one folder of planted submissions is graded once with ``grade_folder``; the tests
then inspect the per-student results and the gradebook. Needs otter-grader (``pip install
-e .[grading]``); skipped without it. About 2-3 minutes on a 2-core machine.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("otter", reason="otter-grader is not installed (pip install -e .[grading])")
pytest.importorskip("torch")

from bnviz import grading  # noqa: E402

pytestmark = pytest.mark.grading

REPO = Path(__file__).resolve().parent.parent
SOURCE_DIR = REPO / "notebooks" / "assignments" / "batch_norm"
TIMEOUT_S = 75  # generous: a normal submission takes ~10 s alone, ~30 s on a loaded 2-core box

# Lines that exist only in the solution; none may reach students.
SOLUTION_LINES = [
    "dims = [0] + list(range(2, x.dim()))",
    "running_mean.mul_(1 - momentum).add_(momentum * mean)",
    "momentum * var * n / (n - 1)",
    "inv_std = 1.0 / torch.sqrt(var + eps)",
    "dx_hat.sum(dim=dims, keepdim=True)",
    'self.register_buffer("num_batches_tracked"',
    "self.num_batches_tracked.add_(1)",
    "the output\nis just $\\beta$",  # the written answer of question 4
]
# Assertion messages that exist only in hidden tests.
HIDDEN_MESSAGES = [
    "eps belongs inside the square root",
    "it must store the UNBIASED batch variance",
    "evaluation mode must not change the running statistics",
    "under torch.no_grad() the module must still use batch statistics",
]

# ------------------------------------------------------------------ planted submissions
# Each mutation is (old, new) text replacements applied to the solution's code cells.
FORWARD_UPDATE = (
    "            running_mean.mul_(1 - momentum).add_(momentum * mean)\n"
    "            running_var.mul_(1 - momentum).add_(momentum * var * n / (n - 1))  # unbiased"
)
MUTATIONS = {
    "biased_running_var": [("momentum * var * n / (n - 1)", "momentum * var")],
    "momentum_swapped": [
        ("running_mean.mul_(1 - momentum).add_(momentum * mean)", "running_mean.mul_(momentum).add_((1 - momentum) * mean)"),
        ("running_var.mul_(1 - momentum).add_(momentum * var", "running_var.mul_(momentum).add_((1 - momentum) * var"),
    ],
    "wrong_axes": [("dims = [0] + list(range(2, x.dim()))", "dims = [0]")],  # only over N
    "eps_outside_sqrt": [("1.0 / torch.sqrt(var + eps)", "1.0 / (torch.sqrt(var) + eps)")],
    "running_not_updated": [(FORWARD_UPDATE, "            pass")],
    "eval_uses_batch_stats": [("    if training:\n        mean = x.mean", "    if True:\n        mean = x.mean")],
    "backward_no_stats_terms": [
        ("    dx = (inv_std.reshape(shape) / m) * (\n"
         "        m * dx_hat\n"
         "        - dx_hat.sum(dim=dims, keepdim=True)\n"
         "        - x_hat * (dx_hat * x_hat).sum(dim=dims, keepdim=True)\n"
         "    )", "    dx = dx_hat * inv_std.reshape(shape)"),
    ],
    "module_d2l_style": [  # plain attributes instead of buffers, mode from is_grad_enabled()
        ('self.register_buffer("running_mean", torch.zeros(num_features))', "self.running_mean = torch.zeros(num_features)"),
        ('self.register_buffer("running_var", torch.ones(num_features))', "self.running_var = torch.ones(num_features)"),
        ('self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))', "self.num_batches_tracked = torch.tensor(0)"),
        ("        if self.training:\n            self.num_batches_tracked", "        if torch.is_grad_enabled():\n            self.num_batches_tracked"),
        ("self.momentum, self.eps, self.training)", "self.momentum, self.eps, torch.is_grad_enabled())"),
    ],
}

# q1 test cases, in the order of the notebook (see batch_norm.ipynb):
# 1 visible (N,C) output, 2 visible running_mean, 3 hidden 4-D output (2 points), 4 hidden unbiased
# running_var, 5 hidden momentum / several steps, 6 hidden tiny variance (eps), 7 hidden eval mode,
# 8 hidden 4-D running statistics.
# mutation -> (q1 tests that must fail, q1 tests that must pass, other expectations)
EXPECTED = {
    "biased_running_var": ({4, 5, 8}, {1, 2, 3, 6, 7}),
    "momentum_swapped": ({2, 4, 5, 8}, {1, 3, 6, 7}),
    "wrong_axes": ({3, 4, 5, 6, 8}, {1, 2, 7}),
    "eps_outside_sqrt": ({6}, {2, 4, 5, 8}),
    "running_not_updated": ({2, 4, 5, 8}, {1, 3, 6, 7}),
    "eval_uses_batch_stats": ({7}, {1, 2, 3, 4, 5, 6, 8}),
}
Q1_POINTS = {1: 1, 2: 1, 3: 2, 4: 1, 5: 1, 6: 1, 7: 1, 8: 1}


def _cases(test_file_text: str) -> list[dict]:
    """The test cases of an OK-format test file (parsed, not executed)."""
    import ast

    for node in ast.parse(test_file_text).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "test":
            spec = ast.literal_eval(node.value)
            return [c for suite in spec["suites"] for c in suite["cases"]]
    raise AssertionError("no `test` dict in test file")


def _src(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _mutate(nb: dict, replacements) -> dict:
    nb = copy.deepcopy(nb)
    for old, new in replacements:
        hits = 0
        for cell in nb["cells"]:
            if cell["cell_type"] == "code" and old in _src(cell):
                cell["source"] = _src(cell).replace(old, new)
                hits += 1
        assert hits == 1, f"planted bug does not apply: {old!r} found in {hits} cells"
    return nb


def _replace_cell(nb: dict, startswith: str, new_source: str | None) -> dict:
    """Replace (or delete, if new_source is None) the one code cell whose source starts so."""
    nb = copy.deepcopy(nb)
    idx = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" and _src(c).startswith(startswith)]
    assert len(idx) == 1, (startswith, idx)
    if new_source is None:
        del nb["cells"][idx[0]]
    else:
        nb["cells"][idx[0]]["source"] = new_source
    return nb


def _insert_after(nb: dict, startswith: str, source: str) -> dict:
    nb = copy.deepcopy(nb)
    idx = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" and _src(c).startswith(startswith)]
    assert len(idx) == 1
    nb["cells"].insert(idx[0] + 1, {"cell_type": "code", "execution_count": None, "metadata": {},
                                    "outputs": [], "source": source})
    return nb


def _write(path: Path, nb: dict):
    path.write_text(json.dumps(nb, indent=1))


def _tampered(solution: dict) -> dict:
    """A biased-running-variance bug hidden behind edited/deleted checks and fake local tests."""
    nb = _mutate(solution, MUTATIONS["biased_running_var"])
    nb = _replace_cell(nb, 'grader.check("q1")', None)
    nb = _replace_cell(nb, 'grader.check("q2")', 'print("q2 passed!")')
    nb = _insert_after(nb, "import torch", "grader.check = lambda *args, **kwargs: 'All tests passed!'")
    fake = {"name": "q1", "points": 9, "suites": [{"cases": [{"code": ">>> True\nTrue", "hidden": False, "locked": False}],
                                                   "scored": True, "setup": "", "teardown": "", "type": "doctest"}]}
    nb.setdefault("metadata", {})["otter"] = {"OK_FORMAT": True, "tests": {"q1": fake}}
    return nb


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """Build from a copy of the assignment folder only (as from a clean checkout)."""
    root = tmp_path_factory.mktemp("assign")
    src = root / "batch_norm"
    shutil.copytree(SOURCE_DIR, src, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    out = root / "dist"
    before = sorted(p.name for p in src.iterdir())
    manifest = grading.build_assignment(out, src / "batch_norm.ipynb")
    # nothing was written next to the source notebook
    assert sorted(p.name for p in src.iterdir()) == before
    return out, manifest


@pytest.fixture(scope="module")
def graded(dist, tmp_path_factory):
    out, manifest = dist
    solution = json.loads((out / "autograder" / "batch_norm.ipynb").read_text())
    subs = tmp_path_factory.mktemp("submissions")
    _write(subs / "solution.ipynb", solution)
    for name, repl in MUTATIONS.items():
        _write(subs / f"{name}.ipynb", _mutate(solution, repl))
    # raises: question 2's answer cell replaced by an exception; the rest still gets graded
    _write(subs / "raises.ipynb", _replace_cell(solution, "def batch_norm_backward",
                                                 'raise NotImplementedError("I did not finish question 2")'))
    # never finishes
    _write(subs / "hangs.ipynb", _insert_after(solution, "import torch", "while True:\n    pass"))
    (subs / "not_json.ipynb").write_text('{"cells": [ this is not JSON')
    (subs / "not_a_notebook.ipynb").write_text(json.dumps({"hello": "world"}))
    _write(subs / "tampered.ipynb", _tampered(solution))
    # an export zip with the same bug and a doctored local tests/ folder that passes everything
    with zipfile.ZipFile(subs / "tampered_zip.zip", "w") as zf:
        zf.writestr("batch_norm.ipynb", json.dumps(_mutate(solution, MUTATIONS["biased_running_var"])))
        for q in ("q1", "q2", "q3"):
            zf.writestr(f"tests/{q}.py", f"OK_FORMAT = True\ntest = {{'name': '{q}', 'points': 1, 'suites': []}}\n")
    results_dir = tmp_path_factory.mktemp("grades")
    results = grading.grade_folder(subs, out / manifest["autograder_zip"], results_dir, timeout_s=TIMEOUT_S,
                                   jobs=2, student_notebook=out / manifest["student_notebook"],
                                   manual_questions={"q4": 2})
    by_student = {r["student"]: r for r in results}
    return results_dir, by_student


def _failed_q1(result) -> set[int]:
    return {int(t["name"].split("-")[-1]) for t in result["failed_tests"] if t["question"] == "q1"}


# ------------------------------------------------------------------ build


def test_build_outputs(dist):
    out, manifest = dist
    assert (out / "student" / "batch_norm.ipynb").is_file()
    assert (out / manifest["autograder_zip"]).is_file()
    assert manifest["questions"]["q4"] == {"points": 2, "manual": True}
    assert grading.read_question_points(out / manifest["autograder_zip"]) == {"q1": 9, "q2": 4, "q3": 6}
    with zipfile.ZipFile(out / manifest["student_zip"]) as zf:
        assert {"batch_norm.ipynb", "tests/q1.py", "tests/q2.py", "tests/q3.py"} <= set(zf.namelist())
    assert (out / "student" / "tests" / "q1.py").is_file()


def test_student_version_has_no_solutions_and_no_hidden_tests(dist):
    out, _ = dist
    student_text = (out / "student" / "batch_norm.ipynb").read_text()
    student_nb = json.loads(student_text)
    student_code = "\n".join(_src(c) for c in student_nb["cells"])
    test_texts = {p.name: p.read_text() for p in (out / "student" / "tests").glob("*.py")}
    assert set(test_texts) == {"q1.py", "q2.py", "q3.py"}
    student_cases = {n: _cases(t) for n, t in test_texts.items()}
    assert {n: len(c) for n, c in student_cases.items()} == {"q1.py": 2, "q2.py": 1, "q3.py": 1}
    assert not any(c["hidden"] for cs in student_cases.values() for c in cs)
    student_tests_code = "\n".join(c["code"] for cs in student_cases.values() for c in cs)
    for line in SOLUTION_LINES:
        assert line not in student_code, f"solution leaked into the student notebook: {line!r}"
    for msg in HIDDEN_MESSAGES:
        assert msg not in student_text and msg not in student_tests_code, f"hidden test leaked: {msg!r}"
    # ... while the autograder has them, and students still get stubs, visible tests and checks
    with zipfile.ZipFile(out / "batch_norm-autograder.zip") as zf:
        ag_cases = [c for q in ("q1", "q2", "q3") for c in _cases(zf.read(f"tests/{q}.py").decode())]
    ag_code = "\n".join(c["code"] for c in ag_cases)
    assert all(msg in ag_code for msg in HIDDEN_MESSAGES)
    assert sum(c["hidden"] for c in ag_cases) == 6 + 2 + 4
    assert "def batch_norm_forward(x, gamma, beta, running_mean, running_var, momentum=0.1, eps=1e-5, training=True):" in student_code
    assert "class BatchNorm(nn.Module):" in student_code
    for q in ("q1", "q2", "q3"):
        assert f'grader.check("{q}")' in student_code
    assert "grader.check_all()" in student_code and "grader.export(" in student_code
    assert "_Type your answer here, replacing this text._" in student_code
    assert "import bnviz" not in student_code and "from bnviz" not in student_code


# ------------------------------------------------------------------ grading


def test_solution_gets_full_marks(graded):
    _, res = graded
    r = res["solution"]
    assert r["error"] == ""
    assert r["failed_tests"] == []
    assert r["scores"] == {"q1": 9, "q2": 4, "q3": 6}
    assert r["total"] == r["possible_total"] == 19


@pytest.mark.parametrize("bug", sorted(EXPECTED))
def test_forward_bugs_lose_points(graded, bug):
    _, res = graded
    r = res[bug]
    must_fail, must_pass = EXPECTED[bug]
    failed = _failed_q1(r)
    assert must_fail <= failed, f"{bug}: expected q1 tests {sorted(must_fail)} to fail, failed {sorted(failed)}"
    assert not (must_pass & failed), f"{bug}: q1 tests {sorted(must_pass & failed)} should pass"
    assert r["scores"]["q1"] == 9 - sum(Q1_POINTS[i] for i in failed)
    assert r["scores"]["q1"] < 9
    hidden_failed = [t for t in r["failed_tests"] if t["question"] == "q1" and t["hidden"]]
    assert hidden_failed, f"{bug} must be caught by a hidden test"
    assert all(t["reason"] for t in r["failed_tests"])


def test_failure_reasons_name_the_bug(graded):
    _, res = graded
    reasons = lambda s: " ".join(t["reason"] for t in res[s]["failed_tests"])  # noqa: E731
    assert "UNBIASED" in reasons("biased_running_var")
    assert "eps belongs inside the square root" in reasons("eps_outside_sqrt")
    assert "use running_mean / running_var" in reasons("eval_uses_batch_stats")
    assert "momentum=0.3" in reasons("momentum_swapped")


def test_backward_and_module_bugs_lose_points(graded):
    _, res = graded
    bw = res["backward_no_stats_terms"]
    assert bw["scores"] == {"q1": 9, "q2": 0, "q3": 6}
    assert {t["name"] for t in bw["failed_tests"]} == {"q2 - 1", "q2 - 2", "q2 - 3"}
    mod = res["module_d2l_style"]
    assert mod["scores"]["q1"] == 9 and mod["scores"]["q2"] == 4
    failed = {t["name"] for t in mod["failed_tests"] if t["question"] == "q3"}
    assert {"q3 - 1", "q3 - 2", "q3 - 3", "q3 - 4"} <= failed
    assert mod["scores"]["q3"] <= 1


def test_raising_submission_is_graded_with_reason(graded):
    _, res = graded
    r = res["raises"]
    assert r["scores"] == {"q1": 9, "q2": 0, "q3": 6}
    assert "NotImplementedError: I did not finish question 2" in r["error"]


def test_never_ending_submission_is_killed(graded):
    _, res = graded
    r = res["hangs"]
    assert "timed out" in r["error"]
    assert r["total"] == 0
    assert TIMEOUT_S <= r["elapsed_s"] < TIMEOUT_S + 30
    # neither the grading subprocess nor its kernel (own session) survived
    leftovers = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if any(v.startswith(grading._TOKEN_VAR.encode() + b"=")
                       for v in (entry / "environ").read_bytes().split(b"\0")):
                    leftovers.append(int(entry.name))
            except OSError:
                pass
    assert leftovers == [], f"grading processes left running: {leftovers}"


def test_invalid_files_are_reported(graded):
    _, res = graded
    assert res["not_json"]["error"].startswith("invalid notebook: not valid JSON")
    assert res["not_a_notebook"]["error"].startswith("invalid notebook")
    for s in ("not_json", "not_a_notebook"):
        assert res[s]["total"] == 0 and res[s]["possible_total"] == 19


def test_tampered_submission_uses_official_tests(graded):
    _, res = graded
    for s in ("tampered", "tampered_zip"):
        r = res[s]
        # same points as the plain biased-variance bug: the official hidden tests ran
        assert r["scores"] == res["biased_running_var"]["scores"], s
        assert _failed_q1(r) == _failed_q1(res["biased_running_var"]), s
        assert "graded with the official tests" in r["error"], s
    err = res["tampered"]["error"]
    assert "check cells edited or deleted for q1, q2" in err
    assert "own tests in its metadata" in err
    assert "touches the grader" in err
    assert "tests/ folder (ignored" in res["tampered_zip"]["error"]
    assert res["biased_running_var"]["error"] == ""


def test_result_files_and_gradebook(graded):
    results_dir, res = graded
    for student in res:
        data = json.loads((results_dir / f"{student}.json").read_text())
        assert set(data) >= {"scores", "possible", "total", "failed_tests", "error"}
    with open(results_dir / "gradebook.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0].keys()) == ["student", "q1", "q2", "q3", "q4", "total", "possible", "error"]
    assert sorted(r["student"] for r in rows) == sorted(res)
    by = {r["student"]: r for r in rows}
    assert by["solution"]["total"] == "19" and by["solution"]["possible"] == "19" and by["solution"]["q4"] == ""
    assert by["hangs"]["total"] == "0" and "timed out" in by["hangs"]["error"]
    assert float(by["biased_running_var"]["q1"]) == res["biased_running_var"]["scores"]["q1"]
    assert (results_dir / "logs" / "solution.log").is_file()


def test_cli_grade(dist, tmp_path):
    out, _ = dist
    subs = tmp_path / "subs"
    subs.mkdir()
    (subs / "broken.ipynb").write_text("nope")
    (subs / "notes.txt").write_text("ignored")
    shutil.copy(out / "autograder" / "batch_norm.ipynb", subs / "good.ipynb")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # relative paths, as `make grade SUBMISSIONS=subs` passes them
    proc = subprocess.run([sys.executable, "-m", "bnviz.grading", "grade", "subs", "--dist", str(out),
                           "--out", "grades", "--timeout", str(TIMEOUT_S)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.reader(io.StringIO((tmp_path / "grades" / "gradebook.csv").read_text())))
    assert rows[0] == ["student", "q1", "q2", "q3", "q4", "total", "possible", "error"]
    assert rows[1][0] == "broken" and rows[1][5:7] == ["0", "19"] and "not valid JSON" in rows[1][7]
    assert rows[2][0] == "good" and rows[2][5:8] == ["19", "19", ""], rows[2]
    assert len(rows) == 3
