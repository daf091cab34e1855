"""The assignment and its grading: build, planted bugs, hostile submissions, the sandbox.

The assignment is built once per module (``otter assign`` also runs every test against the
solution); one folder of planted and hostile submissions is graded once with ``grade_folder``
(each submission in its own bubblewrap sandbox); the tests then inspect the per-student results,
the gradebook, the host's files and what this process's sandboxes left running (only its own:
another grader may be running on the same host). Needs otter-grader (``pip install -e
.[grading]``) and bubblewrap (``apt-get install bubblewrap``): without bwrap the sandbox tests are
skipped, or fail when ``BNVIZ_REQUIRE_SANDBOX=1`` (CI). About 3-4 minutes on a busy 2-core machine.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("otter", reason="otter-grader is not installed (pip install -e .[grading])")
pytest.importorskip("torch")

from bnviz import grading  # noqa: E402
from bnviz.grading import checker, rules, sandbox  # noqa: E402
from bnviz.grading.build import read_question_points  # noqa: E402

pytestmark = pytest.mark.grading

REPO = Path(__file__).resolve().parent.parent
SOURCE_DIR = REPO / "notebooks" / "assignments" / "batch_norm"
TIMEOUT_S = 90  # honest runs: a submission takes ~2 s alone, 5-40 s on a loaded 2-core box (30 s failed there)
HANG_TIMEOUT_S = 10  # the never-ending submission's own run: the limit itself is under test
MARK = uuid.uuid4().hex[:12]  # names this run's hostile files and processes

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
# 1 visible (N,C) output, 2 visible running_mean, 3 hidden 4-D output, 4 hidden unbiased
# running_var, 5 hidden momentum / several steps, 6 hidden tiny variance (eps), 7 hidden eval mode,
# 8 hidden 4-D running statistics; issue 24, visible with fixed tiny inputs in the notebook: 9 eval
# mode, 10 4-D output and running statistics, 11 momentum=0.3.
# mutation -> (q1 tests that must fail, q1 tests that must pass, other expectations)
EXPECTED = {
    "biased_running_var": ({4, 5, 8, 10, 11}, {1, 2, 3, 6, 7, 9}),
    "momentum_swapped": ({2, 4, 5, 8, 10, 11}, {1, 3, 6, 7, 9}),
    "wrong_axes": ({3, 4, 5, 6, 8, 10}, {1, 2, 7, 9, 11}),
    "eps_outside_sqrt": ({6}, {2, 4, 5, 8, 11}),
    "running_not_updated": ({2, 4, 5, 8, 10, 11}, {1, 3, 6, 7, 9}),
    "eval_uses_batch_stats": ({7, 9}, {1, 2, 3, 4, 5, 6, 8, 10, 11}),
}
Q1_POINTS = {1: 1, 2: 1, 3: 0.5, 4: 1, 5: 0.5, 6: 1, 7: 0.5, 8: 0.5, 9: 1, 10: 1, 11: 1}


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


# ------------------------------------------------------------------ hostile submissions
# Each is (base notebook, cells to add after "import torch", replacements); see _hostile().
PATCH_MACHINERY = r'''
import doctest, sys, types, numpy, torch, torch.nn.functional as F
doctest.DocTestRunner.summarize = lambda self, verbose=None: doctest.TestResults(0, 0)
sys.modules["otter.execute"] = types.ModuleType("otter.execute")
torch.allclose = lambda *a, **k: True
torch.Tensor.allclose = lambda *a, **k: True
torch.equal = lambda *a, **k: True
torch.testing.assert_close = lambda *a, **k: None
numpy.allclose = lambda *a, **k: True
numpy.testing.assert_allclose = lambda *a, **k: None
'''
# the reference replaced by the student's own (wrong) function; and torch.save forged to look right
PATCH_REFERENCE = r'''
import torch, torch.nn.functional as F
def _mine(x, running_mean=None, running_var=None, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    return x
F.batch_norm = _mine
torch.nn.functional.batch_norm = _mine
torch.batch_norm = lambda x, *a, **k: x
'''
WRONG_FORWARD = ("    if training:\n        mean = x.mean", "    if False:\n        mean = x.mean")  # never normalises with batch stats

READ_SECRETS = r'''
import os, sys, glob
_markers = %(markers)r
_found, _n = [], 0
for _root in ["/", os.getcwd(), os.path.expanduser("~"), "/tmp", "/work", "/root", "/home", "/opt", "/srv", "/mnt"]:
    for _dir, _subdirs, _files in os.walk(_root):
        if _dir.startswith(("/proc", "/sys", "/dev", "/usr")) or "site-packages" in _dir:
            _subdirs[:] = []
            continue
        for _f in _files:
            _p = os.path.join(_dir, _f)
            try:
                if os.path.getsize(_p) > 5_000_000:
                    continue
                _data = open(_p, "rb").read()
            except OSError:
                continue
            _n += 1
            if _f.endswith(("-autograder.zip", "gradebook.csv")) or any(m.encode() in _data for m in _markers):
                _found.append(_p)
for _p in ["/proc/1/cmdline", "/proc/%%d/cmdline" %% os.getppid(), "/proc/self/environ"]:
    try:
        _data = open(_p, "rb").read()
    except OSError:
        continue
    if b"submissions" in _data or b"grades" in _data or b"autograder" in _data:
        _found.append(_p)
print("SEARCHED", _n, "files")
for _p in _found:
    print("LEAK", _p)
'''
LONG_ERROR = 'raise ValueError("hidden: " + "x" * 500 + "\\nsecond line, \\x1b[31mred\\x1b[0m")'

FORWARD_WITH_FBN = r'''
def batch_norm_forward(x, gamma, beta, running_mean, running_var, momentum=0.1, eps=1e-5, training=True):
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    y = %(call)s(x, running_mean, running_var, gamma, beta, training, momentum, eps)
    mean, var = (x.mean(dim=dims), x.var(dim=dims, correction=0)) if training else (running_mean, running_var)
    inv_std = 1.0 / torch.sqrt(var + eps)
    x_hat = (x - mean.reshape(shape)) * inv_std.reshape(shape)
    return y, (x_hat, inv_std, gamma, dims, shape)
'''
BACKWARD_WITH_AUTOGRAD = r'''
def batch_norm_backward(dy, cache):
    x_hat, inv_std, gamma, dims, shape = cache
    with torch.enable_grad():
        x = (x_hat / inv_std.reshape(shape)).detach().requires_grad_()  # x minus its mean
        g = gamma.detach().clone().requires_grad_()
        b = torch.zeros_like(g).requires_grad_()
        mean = x.mean(dim=dims, keepdim=True)
        var = x.var(dim=dims, correction=0, keepdim=True)
        y = g.reshape(shape) * (x - mean) / torch.sqrt(var + 1e-5) + b.reshape(shape)
        return tuple(t.detach() for t in %(grad)s(y, (x, g, b), dy))
'''
MODULE_WITH_NN = r'''
class BatchNorm(nn.BatchNorm2d):
    def _check_input_dim(self, x):
        pass
'''
WRITES_OUTSIDE = r'''
import os, glob
_wrote = []
for _p in ["/tmp/pwned-%(mark)s", os.path.expanduser("~/pwned-%(mark)s"), "%(repo)s/pwned-%(mark)s",
           "%(subs)s/pwned-%(mark)s", "/pwned-%(mark)s", "/opt/bnviz-worker/pwned-%(mark)s",
           "/usr/pwned-%(mark)s", "%(venv)s/pwned-%(mark)s", "/scratch/pwned-%(mark)s"]:
    try:
        with open(_p, "w") as _f:
            _f.write("pwned")
        _wrote.append(_p)
    except OSError:
        pass
print("WROTE", _wrote)
'''
DAMAGE_SIBLINGS = r'''
import os
_damaged = []
for _root in ["/", "/tmp", os.getcwd(), os.path.expanduser("~")]:
    for _dir, _subdirs, _files in os.walk(_root):
        if _dir.startswith(("/proc", "/sys", "/dev", "/usr")) or "site-packages" in _dir:
            _subdirs[:] = []
            continue
        for _f in _files:
            if _f.endswith((".ipynb", ".json", ".csv", ".zip")):
                try:
                    with open(os.path.join(_dir, _f), "w") as _h:
                        _h.write("plagiarism detected")
                    _damaged.append(os.path.join(_dir, _f))
                except OSError:
                    pass
print("DAMAGED", _damaged)
'''
ESCAPES = r'''
import os, sys, time
_code = """
import glob, os, time
# BNVIZ-ESCAPE-%(mark)s
time.sleep(2)
for p in glob.glob("/**/gradebook.csv", recursive=True) + glob.glob("%(grades)s/*"):
    try:
        open(p, "a").write("escaped,19,4,6,,19,19,,\\n")
    except OSError:
        pass
open("/tmp/escaped-%(mark)s", "w").write("still alive")
"""
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, "-c", _code])
    os._exit(0)
time.sleep(0.5)
'''
MEMORY_BOMB = r'''
import torch
try:
    _big = torch.ones(8 << 30, dtype=torch.uint8)  # 8 GiB at once
except RuntimeError as e:
    print("8 GiB refused:", str(e)[:80])
_chunks = []
for _ in range(32):  # then 256 MiB at a time, up to 8 GiB
    _chunks.append(torch.ones(256 << 20, dtype=torch.uint8))
'''
OUTPUT_BOMB = 'import sys\n_line = "x" * 1023 + "\\n"\nfor _ in range(500 * 1024):\n    sys.stdout.write(_line)\n'
PRINTS_50MB = OUTPUT_BOMB.replace("500 * 1024", "50 * 1024")
FORK_BOMB = r'''
import os, time
_n = 0
for _ in range(400):
    try:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        _n += 1
    except OSError:
        break
print("FORKED", _n)
'''
UNDO_TRIPWIRES = r'''
import torch, torch.nn.functional as F
F.batch_norm = getattr(F.batch_norm, "__wrapped__", F.batch_norm)
torch.autograd.grad = getattr(torch.autograd.grad, "__wrapped__", torch.autograd.grad)
'''


def _hostile(nb: dict, *sources: str, replace: list | None = None) -> dict:
    """nb with replacements applied and cells inserted after the `import torch` cell."""
    nb = _mutate(nb, replace or [])
    for source in reversed(sources):
        nb = _insert_after(nb, "import torch", source)
    return nb


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _processes_with(marker: str) -> list[int]:
    """Every process on the host whose command line holds marker (give it one of this run's own)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


# What this process's sandboxes left behind. Only its own: another grader (a second developer,
# a CI job beside this one) may run sandboxes on the same host at the same moment. Ours are
# descendants of this process (bwrap, the worker and, in their PID namespace, all they start),
# and everything they start stays in their cgroups, named bnviz-<this pid>-<token>
# (sandbox.Cgroups), even a process reparented to init.
def _own_cgroups() -> list[Path]:
    """Cgroup folders anywhere under /sys/fs/cgroup named for this process's sandboxes."""
    prefix = f"bnviz-{os.getpid()}-"
    return sorted(Path(d) / n for d, subdirs, _ in os.walk("/sys/fs/cgroup") for n in subdirs if n.startswith(prefix))


def _own_sandbox_processes() -> list[str]:
    """'pid command' of each live process that is in one of this process's sandbox cgroups, or
    descends from this process and runs the worker (bwrap's command line names it too)."""
    me, procs = os.getpid(), {}
    for entry in os.scandir("/proc"):
        try:
            stat = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()  # state, ppid, ...
            procs[int(entry.name)] = (stat[0], int(stat[1]), Path(entry.path, "cmdline").read_bytes(),
                                      Path(entry.path, "cgroup").read_text())
        except (OSError, IndexError, ValueError):
            pass  # not a process, or gone meanwhile

    def descends(pid: int) -> bool:
        for _ in range(64):
            pid = procs[pid][1] if pid in procs else 0
            if pid in (0, 1, me):
                return pid == me
        return False

    return [f"{pid} " + cmd.replace(b"\0", b" ").decode(errors="replace")[:200]
            for pid, (state, _, cmd, cgroups) in procs.items()
            if pid != me and state not in "ZX"  # a zombie runs nothing and holds nothing
            and (f"/bnviz-{me}-" in cgroups or (b"bnviz.grading.worker" in cmd and descends(pid)))]


def _assert_nothing_left() -> None:
    assert _own_sandbox_processes() == []
    assert _own_cgroups() == []


@pytest.fixture(scope="module")
def dist(grading_dist):
    """Built once per session from a copy of the assignment folder only (conftest.py)."""
    return grading_dist


def _planted(solution: dict, subs: Path) -> None:
    _write(subs / "solution.ipynb", solution)
    for name, repl in MUTATIONS.items():
        _write(subs / f"{name}.ipynb", _mutate(solution, repl))
    # raises: question 2's answer cell replaced by an exception; the rest still gets graded
    _write(subs / "raises.ipynb", _replace_cell(solution, "def batch_norm_backward",
                                                 'raise NotImplementedError("I did not finish question 2")'))
    _write(subs / "long_error.ipynb", _replace_cell(solution, "def batch_norm_backward", LONG_ERROR))
    (subs / "not_json.ipynb").write_text('{"cells": [ this is not JSON')
    (subs / "not_a_notebook.ipynb").write_text(json.dumps({"hello": "world"}))
    _write(subs / "tampered.ipynb", _tampered(solution))
    # an export zip with the same bug and a doctored local tests/ folder that passes everything
    with zipfile.ZipFile(subs / "tampered_zip.zip", "w") as zf:
        zf.writestr("batch_norm.ipynb", json.dumps(_mutate(solution, MUTATIONS["biased_running_var"])))
        for q in ("q1", "q2", "q3"):
            zf.writestr(f"tests/{q}.py", f"OK_FORMAT = True\ntest = {{'name': '{q}', 'points': 1, 'suites': []}}\n")


def _hostiles(solution: dict, student: dict, subs: Path, grades: Path) -> None:
    fmt = {"mark": MARK, "repo": REPO, "subs": subs, "grades": grades, "venv": Path(sys.prefix)}
    _write(subs / "patch_machinery.ipynb", _hostile(student, PATCH_MACHINERY))
    wrong = [WRONG_FORWARD]
    _write(subs / "patch_reference.ipynb", _hostile(solution, PATCH_MACHINERY, PATCH_REFERENCE, replace=wrong))
    _write(subs / "patch_reference_twin.ipynb", _hostile(solution, replace=wrong))  # the same honest content
    markers = HIDDEN_MESSAGES + SOLUTION_LINES[:3] + ["submission 0 of the sibling"]
    _write(subs / "read_secrets.ipynb", _hostile(solution, READ_SECRETS % {"markers": markers}))
    fwd = "def batch_norm_forward"
    _write(subs / "forbidden_fbn.ipynb", _insert_after(solution, fwd, FORWARD_WITH_FBN % {"call": "F.batch_norm"}))
    _write(subs / "forbidden_fbn_hidden.ipynb", _insert_after(
        solution, fwd, FORWARD_WITH_FBN % {"call": 'getattr(torch.nn.functional, "batch" + "_norm".strip())'}))
    bwd = "def batch_norm_backward"
    _write(subs / "forbidden_autograd.ipynb", _insert_after(solution, bwd, BACKWARD_WITH_AUTOGRAD % {"grad": "torch.autograd.grad"}))
    _write(subs / "forbidden_autograd_hidden.ipynb", _insert_after(
        solution, bwd, BACKWARD_WITH_AUTOGRAD % {"grad": 'getattr(getattr(torch, "auto" + "grad"), "gr" + "ad")'}))
    _write(subs / "forbidden_module.ipynb", _insert_after(solution, "class BatchNorm", MODULE_WITH_NN))
    _write(subs / "writes_outside.ipynb", _hostile(solution, WRITES_OUTSIDE % fmt))
    _write(subs / "damages_siblings.ipynb", _hostile(solution, DAMAGE_SIBLINGS))
    _write(subs / "escapes.ipynb", _hostile(solution, ESCAPES % fmt))
    _write(subs / "memory_bomb.ipynb", _hostile(solution, MEMORY_BOMB))
    _write(subs / "output_bomb.ipynb", _hostile(solution, OUTPUT_BOMB))
    _write(subs / "prints_50mb.ipynb", _hostile(solution, PRINTS_50MB))
    _write(subs / "undo_tripwires.ipynb", _hostile(solution, UNDO_TRIPWIRES))
    if sandbox.Cgroups._base("pids") is not None:  # without a pids cgroup nothing bounds a fork bomb as root
        _write(subs / "fork_bomb.ipynb", _hostile(solution, FORK_BOMB))
    (subs / "zz_sibling.ipynb").write_text(json.dumps(solution).replace("# BEGIN", "# submission 0 of the sibling"))


@pytest.fixture(scope="module")
def graded(dist, bwrap, tmp_path_factory):
    out, manifest = dist
    solution = json.loads((out / "autograder" / "batch_norm.ipynb").read_text())
    student = json.loads((out / "student" / "batch_norm.ipynb").read_text())
    subs = tmp_path_factory.mktemp("submissions")
    results_dir = tmp_path_factory.mktemp("grades")
    _planted(solution, subs)
    _hostiles(solution, student, subs, results_dir)
    before = _digest(subs)
    t0 = time.monotonic()
    results = grading.grade_folder(subs, results_dir, timeout_s=TIMEOUT_S, jobs=2,
                                   student_notebook=out / manifest["student_notebook"], manual_questions={"q4": 2},
                                   forbidden=manifest["forbidden"], log=lambda *a: None)
    elapsed = time.monotonic() - t0
    gradebook_after = (results_dir / "gradebook.csv").read_bytes()
    by_student = {r["student"]: r for r in results}
    print(f"graded {len(results)} submissions in {elapsed:.0f} s")
    return {"dir": results_dir, "res": by_student, "subs": subs, "before": before, "gradebook": gradebook_after,
            "solution": solution}


def _own_flags(result) -> str:
    """The flags without the similarity flags (every planted submission here is a copy of the
    solution, so all are flagged as similar; tests/test_grading_variants.py tests those)."""
    return "; ".join(f for f in result["flags"].split("; ") if f and not f.startswith("similar to "))


def _failed_q1(result) -> set[int]:
    return {int(t["name"].split("-")[-1]) for t in result["failed_tests"] if t["question"] == "q1"}


def _log(graded, student) -> str:
    return (graded["dir"] / "logs" / f"{student}.log").read_text(errors="replace")


# ------------------------------------------------------------------ build


def test_build_outputs(dist):
    out, manifest = dist
    assert (out / "student" / "batch_norm.ipynb").is_file()
    assert (out / manifest["autograder_zip"]).is_file()
    assert manifest["questions"]["q4"] == {"points": 2, "manual": True}
    assert read_question_points(out / manifest["autograder_zip"]) == {"q1": 9, "q2": 4, "q3": 6}
    assert manifest["forbidden"] == {"q1": ["batch_norm"], "q2": ["autograd", "batch_norm"], "q3": ["batch_norm"]}
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
    assert {n: len(c) for n, c in student_cases.items()} == {"q1.py": 5, "q2.py": 2, "q3.py": 2}
    assert not any(c["hidden"] for cs in student_cases.values() for c in cs)
    student_tests_code = "\n".join(c["code"] for cs in student_cases.values() for c in cs)
    for line in SOLUTION_LINES:
        assert line not in student_code, f"solution leaked into the student notebook: {line!r}"
    for msg in HIDDEN_MESSAGES:
        assert msg not in student_text and msg not in student_tests_code, f"hidden test leaked: {msg!r}"
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


def test_checker_matches_the_notebook_tests(dist):
    """The trusted checker grades with the same test cases (names, points, hidden) as the notebook."""
    out, _ = dist
    with zipfile.ZipFile(out / "batch_norm-autograder.zip") as zf:
        nb_cases = [(q, i + 1, float(c["points"]), bool(c["hidden"]))
                    for q in ("q1", "q2", "q3") for i, c in enumerate(_cases(zf.read(f"tests/{q}.py").decode()))]
    ours = [(t.question, t.number, t.points, t.hidden) for t in checker.make_tests(0)]
    assert ours == nb_cases
    for msg in HIDDEN_MESSAGES[:3]:  # the checker explains failures with the notebook's messages
        assert msg in Path(checker.__file__).read_text()


def test_inputs_change_every_run():
    a, b = checker.make_tests(1), checker.make_tests(2)
    assert not checker.torch.equal(a[0].probes[0]["xs"][0], b[0].probes[0]["xs"][0])


# ------------------------------------------------------------------ grading: planted bugs


def test_solution_gets_full_marks(graded):
    r = graded["res"]["solution"]
    assert r["error"] == "" and _own_flags(r) == ""
    assert r["failed_tests"] == []
    assert r["scores"] == {"q1": 9, "q2": 4, "q3": 6}
    assert r["total"] == r["possible_total"] == 19


@pytest.mark.parametrize("bug", sorted(EXPECTED))
def test_forward_bugs_lose_points(graded, bug):
    r = graded["res"][bug]
    must_fail, must_pass = EXPECTED[bug]
    failed = _failed_q1(r)
    assert must_fail <= failed, f"{bug}: expected q1 tests {sorted(must_fail)} to fail, failed {sorted(failed)}"
    assert not (must_pass & failed), f"{bug}: q1 tests {sorted(must_pass & failed)} should pass"
    assert r["scores"]["q1"] == 9 - sum(Q1_POINTS[i] for i in failed)
    assert r["scores"]["q1"] < 9
    hidden_failed = [t for t in r["failed_tests"] if t["question"] == "q1" and t["hidden"]]
    assert hidden_failed, f"{bug} must be caught by a hidden test"
    assert all(t["reason"] for t in r["failed_tests"])
    assert _own_flags(r) == ""


def test_failure_reasons_name_the_bug(graded):
    res = graded["res"]
    reasons = lambda s: " ".join(t["reason"] for t in res[s]["failed_tests"])  # noqa: E731
    assert "UNBIASED" in reasons("biased_running_var")
    assert "eps belongs inside the square root" in reasons("eps_outside_sqrt")
    assert "use running_mean / running_var" in reasons("eval_uses_batch_stats")
    assert "momentum=0.3" in reasons("momentum_swapped")


def test_backward_and_module_bugs_lose_points(graded):
    res = graded["res"]
    bw = res["backward_no_stats_terms"]
    assert bw["scores"] == {"q1": 9, "q2": 0, "q3": 6}
    assert {t["name"] for t in bw["failed_tests"]} == {"q2 - 1", "q2 - 2", "q2 - 3", "q2 - 4"}
    mod = res["module_d2l_style"]
    assert mod["scores"]["q1"] == 9 and mod["scores"]["q2"] == 4
    failed = {t["name"] for t in mod["failed_tests"] if t["question"] == "q3"}
    assert {"q3 - 1", "q3 - 2", "q3 - 3", "q3 - 4"} <= failed
    assert mod["scores"]["q3"] <= 1


def test_raising_submission_is_graded_with_reason(graded):
    r = graded["res"]["raises"]
    assert r["scores"] == {"q1": 9, "q2": 0, "q3": 6}
    assert "student code raised NotImplementedError: I did not finish question 2" in r["error"]


def test_student_exception_text_is_short_and_marked(graded):
    r = graded["res"]["long_error"]
    assert r["scores"] == {"q1": 9, "q2": 0, "q3": 6}
    assert "student code raised ValueError: hidden: xxx" in r["error"]
    assert "second line" not in r["error"] and "\x1b" not in r["error"] and "\n" not in r["error"]
    assert "x" * 121 not in r["error"]


def test_never_ending_submission_is_killed(dist, bwrap, tmp_path):
    """Graded on its own, under a short limit (the big run's generous one would cost 90 s)."""
    out, manifest = dist
    subs = tmp_path / "subs"
    subs.mkdir()
    solution = json.loads((out / "autograder" / "batch_norm.ipynb").read_text())
    _write(subs / "hangs.ipynb", _insert_after(solution, "import torch", "while True:\n    pass"))
    (r,) = grading.grade_folder(subs, tmp_path / "grades", timeout_s=HANG_TIMEOUT_S, forbidden=manifest["forbidden"],
                                log=lambda *a: None)
    assert "timed out" in r["error"]
    assert r["total"] == 0
    assert HANG_TIMEOUT_S <= r["elapsed_s"] < HANG_TIMEOUT_S + 30
    row = next(csv.DictReader(io.StringIO((tmp_path / "grades" / "gradebook.csv").read_text())))
    assert row["student"] == "hangs" and row["total"] == "0" and "timed out" in row["error"]
    _assert_nothing_left()


def test_invalid_files_are_reported(graded):
    res = graded["res"]
    assert res["not_json"]["error"].startswith("invalid notebook: not valid JSON")
    assert res["not_a_notebook"]["error"].startswith("invalid notebook")
    for s in ("not_json", "not_a_notebook"):
        assert res[s]["total"] == 0 and res[s]["possible_total"] == 19


def test_tampered_submission_uses_official_tests(graded):
    res = graded["res"]
    for s in ("tampered", "tampered_zip"):
        r = res[s]
        assert r["scores"] == res["biased_running_var"]["scores"], s
        assert _failed_q1(r) == _failed_q1(res["biased_running_var"]), s
        assert "graded with the official tests" in r["flags"], s
    flags = res["tampered"]["flags"]
    assert "check cells edited or deleted for q1, q2" in flags
    assert "own tests in its metadata" in flags
    assert "touches the grader" in flags
    assert "tests/ folder (ignored" in res["tampered_zip"]["flags"]
    assert res["biased_running_var"]["error"] == ""


def test_result_files_and_gradebook(graded):
    results_dir, res = graded["dir"], graded["res"]
    with open(results_dir / "gradebook.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0].keys()) == ["student", "q1", "q2", "q3", "q4", "total", "possible", "error", "flags"]
    assert sorted(r["student"] for r in rows) == sorted(res)
    for row in rows:  # each JSON holds exactly its gradebook row
        data = json.loads((results_dir / f"{row['student']}.json").read_text())
        assert data["row"] == row
        assert set(data) >= {"scores", "possible", "total", "failed_tests", "error", "flags", "seed"}
        assert f"{data['total']:g}" == row["total"]
    by = {r["student"]: r for r in rows}
    assert by["solution"]["total"] == "19" and by["solution"]["possible"] == "19" and by["solution"]["q4"] == ""
    assert by["raises"]["total"] == "15" and "NotImplementedError" in by["raises"]["error"]
    assert float(by["biased_running_var"]["q1"]) == res["biased_running_var"]["scores"]["q1"]
    assert (results_dir / "logs" / "solution.log").is_file()
    assert not list(results_dir.glob(".*tmp"))  # atomic writes left no temp files


# ------------------------------------------------------------------ grading: hostile submissions


def test_patching_the_test_machinery_gains_nothing(graded):
    res = graded["res"]
    assert res["patch_machinery"]["total"] == 0  # empty answers stay empty
    assert "touches the grader" in res["patch_machinery"]["flags"]
    # a wrong forward behind a patched reference and patched comparisons: no more than the honest
    # twin (the same answers without the patches) gets; replacing F.batch_norm also replaced the
    # sandbox's tripwire, which withholds everything
    patched, twin = res["patch_reference"]["scores"], res["patch_reference_twin"]["scores"]
    assert all(patched[q] <= twin[q] for q in twin) and twin["q1"] < 9
    assert "tripwires removed" in res["patch_reference"]["flags"]


def test_hidden_tests_and_other_files_are_unreachable(graded):
    log = _log(graded, "read_secrets")
    searched = int(log.split("SEARCHED ")[1].split()[0])
    assert searched > 100, log[-2000:]  # it did look around (Python's own files, at least)
    assert "LEAK" not in log, log[-2000:]
    assert graded["res"]["read_secrets"]["total"] == 19


@pytest.mark.parametrize("name,question", [("forbidden_fbn", "q1"), ("forbidden_fbn_hidden", "q1"),
                                           ("forbidden_autograd", "q2"), ("forbidden_autograd_hidden", "q2"),
                                           ("forbidden_module", "q3")])
def test_forbidden_apis_are_flagged_and_withheld(graded, name, question):
    r = graded["res"][name]
    assert r["scores"][question] == 0, r
    assert f"{question}: " in r["flags"] and "withheld" in r["flags"], r["flags"]
    if name.endswith("_hidden"):  # no trace in the source: caught at run time
        assert "called at run time" in r["flags"]
    else:
        assert "in the source (cell" in r["flags"]
    # the other questions keep their points (q3 calls the q1 function, so a forbidden q1 costs q3 too)
    keep = {"q1": ["q2"], "q2": ["q1", "q3"], "q3": ["q1", "q2"]}[question]
    for q in keep:
        assert r["scores"][q] == graded["res"]["solution"]["scores"][q], (q, r["scores"])


def test_allow_forbidden_override(dist, bwrap, tmp_path):
    out, manifest = dist
    solution = json.loads((out / "autograder" / "batch_norm.ipynb").read_text())
    subs = tmp_path / "subs"
    subs.mkdir()
    _write(subs / "fbn.ipynb", _insert_after(solution, "def batch_norm_forward", FORWARD_WITH_FBN % {"call": "F.batch_norm"}))
    res = grading.grade_folder(subs, tmp_path / "grades", timeout_s=TIMEOUT_S, allow_forbidden=True, log=lambda *a: None)
    assert res[0]["total"] == 19 and _own_flags(res[0]) == ""


def test_undoing_tripwires_withholds_everything(graded):
    r = graded["res"]["undo_tripwires"]
    assert r["total"] == 0
    assert "tripwires removed" in r["flags"]


def test_nothing_written_outside_the_sandbox(graded):
    log = _log(graded, "writes_outside")
    wrote = log.split("WROTE ")[1].splitlines()[0]
    assert "/tmp/pwned" in wrote and "/scratch/pwned" in wrote  # its own private folders: fine
    for p in [Path("/tmp") / f"pwned-{MARK}", Path.home() / f"pwned-{MARK}", REPO / f"pwned-{MARK}",
              graded["subs"] / f"pwned-{MARK}", Path(f"/pwned-{MARK}"), Path(sys.prefix) / f"pwned-{MARK}"]:
        assert not p.exists(), p
    assert graded["res"]["writes_outside"]["total"] == 19


def test_other_submissions_and_grades_are_intact(graded):
    log = _log(graded, "damages_siblings")
    assert "DAMAGED" in log
    assert _digest(graded["subs"]) == graded["before"]  # every submission file untouched
    res = graded["res"]
    assert res["zz_sibling"]["total"] == 19 and res["solution"]["total"] == 19
    assert res["damages_siblings"]["total"] == 19


def test_escaped_process_dies_with_the_sandbox(graded):
    time.sleep(3)  # the escaper would have woken up after 2 s
    assert _processes_with(f"BNVIZ-ESCAPE-{MARK}") == []
    assert not (Path("/tmp") / f"escaped-{MARK}").exists()
    assert (graded["dir"] / "gradebook.csv").read_bytes() == graded["gradebook"]
    assert b"escaped" not in graded["gradebook"]
    assert graded["res"]["escapes"]["total"] == 19
    _assert_nothing_left()


def test_memory_bomb_is_stopped(graded):
    r = graded["res"]["memory_bomb"]
    assert "memory limit (4 GiB) reached" in r["error"], r["error"]
    assert "8 GiB refused" in _log(graded, "memory_bomb")
    # the bomb's cell failed and grading went on; what it kept (4 GiB) starves its own answers
    assert r["total"] <= 19 and graded["res"]["solution"]["total"] == 19


def test_output_bomb_is_stopped_and_honest_printing_is_fine(graded):
    bomb = graded["res"]["output_bomb"]
    assert "printed more than 100 MB" in bomb["error"] and bomb["total"] == 0
    assert (graded["dir"] / "logs" / "output_bomb.log").stat().st_size <= 64 * 1024
    honest = graded["res"]["prints_50mb"]
    assert honest["total"] == 19 and honest["error"] == ""


def test_fork_bomb_is_bounded(graded):
    if "fork_bomb" not in graded["res"]:
        pytest.skip("no pids cgroup on this host: the process count is not limited (see the README)")
    forked = int(_log(graded, "fork_bomb").split("FORKED ")[1].split()[0])
    assert forked < 128
    assert graded["res"]["fork_bomb"]["total"] == 19
    _assert_nothing_left()


# ------------------------------------------------------------------ sandbox and rules, directly


def test_leftover_checks_see_this_graders_sandboxes_only():
    """The leftover checks above can fail, and do not see a neighbour's sandboxes: a worker left
    below this process and an orphan left in one of its sandbox cgroups are seen; a worker of
    another process tree and another grader's cgroup are not."""
    tag = f"leftover-check-{MARK}"
    groups = sandbox.Cgroups(uuid.uuid4().hex[:16], sandbox.Limits())
    ours = {d.resolve() for d in groups.unique_dirs()}
    neighbour_cgroup = next(iter(ours), Path("/nonexistent")).parent / f"bnviz-{os.getppid()}-{tag}"
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    below = subprocess.Popen([*sleeper, "bnviz.grading.worker", tag], start_new_session=True)
    subprocess.run(["setsid", "-f", *sleeper, "bnviz.grading.worker", "neighbour", tag], check=True)
    subprocess.run(groups.wrap(["setsid", "-f", *sleeper, "orphan", tag]), check=True)  # in our cgroups, not below us

    def pythons() -> int:  # the sleepers that run Python by now (setsid -f returns before its child does)
        n = 0
        for pid in _processes_with(tag):
            try:
                n += Path(f"/proc/{pid}/cmdline").read_bytes().startswith(os.fsencode(sys.executable) + b"\0")
            except OSError:
                pass
        return n

    try:
        if ours:
            neighbour_cgroup.mkdir()
        deadline = time.monotonic() + 30
        while pythons() < 3:
            assert time.monotonic() < deadline, "the three sleepers did not start"
            time.sleep(0.1)
        seen = " ".join(_own_sandbox_processes())
        assert f"{below.pid} " in seen and "neighbour" not in seen
        assert ("orphan" in seen) == bool(ours)
        found = {d.resolve() for d in _own_cgroups()}
        assert ours <= found and neighbour_cgroup.resolve() not in found
    finally:
        groups.close()  # kills the orphan
        for pid in {below.pid, *_processes_with(tag)}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        below.wait()
        if neighbour_cgroup.is_dir():
            neighbour_cgroup.rmdir()
    _assert_nothing_left()


def test_cpu_time_limit(bwrap, tmp_path):
    import torch

    limits = sandbox.Limits(timeout_s=60, cpu_seconds=2)
    buf = io.BytesIO()
    torch.save({"cells": [(0, "while True:\n    pass")], "probes": [], "limits": limits.for_worker()}, buf)
    root = sandbox.make_worker_root(tmp_path / "w")
    run = sandbox.run_worker(buf.getvalue(), "bwrap", limits, root, [])
    assert run.problem and "CPU time limit" in run.problem, (run.problem, run.returncode)
    assert run.elapsed_s < 30


def test_rules_scan():
    cells = [
        (0, "import torch\nimport torch.nn as nn\nimport torch.nn.functional as F\n"
            "from torch.nn.functional import batch_norm as bn"),
        (1, "def helper(x):\n    return bn(x, None, None, training=True)\n"
            "def batch_norm_forward(x, *a, **k):\n    return helper(x), None"),
        (2, "def batch_norm_backward(dy, cache):\n    '''no autograd here, promise'''\n    return cache"),
        (3, "class BatchNorm(nn.Module):\n    def forward(self, x):\n        return x"),
        (4, "print(F.batch_norm(torch.ones(2, 3), None, None, training=True))\nnn.BatchNorm1d(3)"),
    ]
    assert set(rules.scan(cells)) == {"q1"}
    cells[2] = (2, "def batch_norm_backward(dy, cache):\n    return torch.autograd.grad(cache, dy)")
    cells[3] = (3, "class BatchNorm(nn.Module):\n    def __init__(self):\n        self.m = getattr(nn, 'BatchNorm2d')(3)")
    found = rules.scan(cells)
    assert set(found) == {"q1", "q2", "q3"} and "autograd" in found["q2"] and "batch_norm" in found["q3"]


def test_missing_sandbox_refuses_with_install_hint(monkeypatch, tmp_path):
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    with pytest.raises(sandbox.SandboxUnavailable, match="apt-get install bubblewrap"):
        grading.grade_folder(tmp_path, tmp_path / "grades")
    assert not (tmp_path / "grades").exists()


def test_no_sandbox_flag_warns(dist, tmp_path):
    out, _ = dist
    subs = tmp_path / "subs"
    subs.mkdir()
    shutil.copy(out / "autograder" / "batch_norm.ipynb", subs / "good.ipynb")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "bnviz.grading", "grade", "subs", "--dist", str(out),
                           "--out", "grades", "--no-sandbox"], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "WARNING: --no-sandbox" in proc.stdout and "other submissions" in proc.stdout
    # total 19 of 21 possible: q4's 2 points are graded by hand (grades/manual.csv), still blank
    assert "good,9,4,6,,19,21,," in (tmp_path / "grades" / "gradebook.csv").read_text()


def test_cli_grade(dist, bwrap, tmp_path):
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
    assert rows[0] == ["student", "q1", "q2", "q3", "q4", "total", "possible", "error", "flags", "manual_ungraded"]
    # possible counts q4's 2 hand-graded points; manual_ungraded says they are still to grade
    assert rows[1][0] == "broken" and rows[1][5:7] == ["0", "21"] and "not valid JSON" in rows[1][7]
    assert rows[2][0] == "good" and rows[2][5:8] == ["19", "21", ""], rows[2]
    assert "q4" in rows[2][9], rows[2]
    assert rows[2][8].startswith("similar to the public solution (score"), rows[2]  # the answer key is a copy
    assert (tmp_path / "grades" / "similarity.html").is_file()
    assert len(rows) == 3


def test_reports_are_loaded_as_plain_data_only(tmp_path):
    """The report is JSON + raw tensor bytes parsed on the trusted side: a pickle (which could run
    code or share references) is refused, whatever it holds (tests/test_grading_trusted.py has more)."""
    import pickle

    import torch

    from bnviz.grading import worker
    from bnviz.grading.grade import load_report

    def pair(*parts):
        return worker.MAGIC_PAIR + b"".join(len(p).to_bytes(8, "little") + p for p in parts)

    ok = {"protocol": 2, "pass": "normal", "cell_errors": [], "probes": {"a": {"y": torch.ones(2)}},
          "tripwire": {"installed": True, "intact": True, "hits": [], "ops": {}}}
    assert load_report(pair(worker.encode(torch, ok)))["probes"]["a"]["y"].tolist() == [1.0, 1.0]

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    bad = io.BytesIO()
    torch.save({"protocol": 1, "x": Evil()}, bad, pickle_protocol=2)
    assert load_report(bad.getvalue()) is None and load_report(pair(bad.getvalue())) is None
    assert not (tmp_path / "pwned").exists()
    assert load_report(pickle.dumps({"protocol": 1})) is None


def test_sandbox_command_lines(tmp_path):
    """What bwrap and docker are asked for (static: also runs where neither exists)."""
    limits = sandbox.Limits()
    cmd = sandbox.bwrap_command(tmp_path, limits, [REPO / "dist", Path(sys.prefix) / "lib"], sandbox.worker_env(limits))
    for flag in ("--unshare-all", "--die-with-parent", "--new-session", "--clearenv"):
        assert flag in cmd
    assert cmd[cmd.index("--cap-drop") + 1] == "ALL"
    binds = [cmd[i + 1] for i, a in enumerate(cmd) if a in ("--ro-bind", "--bind", "--ro-bind-try")]
    assert "--bind" not in cmd  # nothing of the host is writable
    assert str(REPO) not in binds and "/" not in binds and "/root" not in binds and "/home" not in binds
    assert str(tmp_path) in binds  # the worker-only package tree
    tmpfs = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--tmpfs"]
    assert {"/tmp", "/scratch"} <= set(tmpfs) and str(Path(sys.prefix) / "lib") in tmpfs  # masked: inside a bind
    assert str(REPO / "dist") not in tmpfs or str(REPO / "dist").startswith(sys.prefix)
    assert cmd[-5:] == [sys.executable, "-s", "-B", "-m", "bnviz.grading.worker"]
    d = sandbox.docker_command("bnviz-x", tmp_path, limits, "img")
    for flag in ("--network", "--read-only", "--pids-limit", "--memory", "--cap-drop", "--user"):
        assert flag in d
    assert d[d.index("--network") + 1] == "none" and f"{tmp_path}:/opt/bnviz-worker:ro" in d
