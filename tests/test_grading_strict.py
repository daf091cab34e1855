"""Grading v3, item 1 (issue 23): a strict pass the student cannot reach.

Four hostile submissions, each a path the third hostile set used to keep q1's points while calling
PyTorch's batch norm. Each first quiets the normal pass's tripwires (their class, found by walking
up the frames: an advisory in-process check, which the strict pass is there to back), then:

* ``replay``: computes in the normal pass, saves the results in ``/scratch`` and replays them in the
  strict pass (the two passes shared one sandbox and its ``/scratch``);
* ``globals``: reaches the worker module through ``get_ipython.__globals__``, destroys the strict
  pass's raising kernels (``torch.library.Library`` objects found by ``gc``) and forges the report's
  ``intact`` by rebinding ``json`` in the worker's globals (its ``encode`` looks it up there);
* ``frames``: the same, reaching the kernels' handles (``libs``) and the worker's globals through
  the traceback frames of a ``Forbidden`` error;
* ``ppid_mem``: rewrites the worker parent's strict plan through ``/proc/<ppid>/mem`` from the
  normal pass (the parent forked the strict pass afterwards, from the rewritten memory).

Against the code before this change each kept q1's 9 points with nothing withheld (shown by running
this file with ``PYTHONPATH`` at that code: every ``test_*_is_withheld`` failed with q1 = 9); now
the strict pass withholds q1 for each. The last tests check the pieces directly in one sandbox.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import pytest

pytest.importorskip("otter", reason="otter-grader is not installed (pip install -e .[grading])")
torch = pytest.importorskip("torch")

from bnviz import grading  # noqa: E402

from test_grading_trusted import CACHE, _insert_after  # noqa: E402

pytestmark = pytest.mark.grading

# the normal pass's tripwires quieted (class found up the frames) and PyTorch's batch norm by a name
# built at run time, so that only the strict pass can tell
COMMON = CACHE + r'''
import sys, gc, os
import torch
def _quiet_tripwires():
    f = sys._getframe()
    while f is not None:
        tw = f.f_locals.get("tw")
        if tw is not None and hasattr(type(tw), "_h" + "it"):
            setattr(type(tw), "_h" + "it", lambda *a, **k: None)
            return
        f = f.f_back
_quiet_tripwires()
_bn = getattr(__import__("torch.nn.functional", fromlist=["x"]), "batch" + "_norm")
def batch_norm_forward(x, gamma, beta, running_mean, running_var, momentum=0.1, eps=1e-5, training=True):
    y = _bn(x, running_mean, running_var, gamma, beta, training, momentum, eps)
    return y, _cache(x, gamma, running_mean, running_var, eps, training)
'''
REPLAY = COMMON + r'''
import hashlib, threading
_DIR = "/scratch/replay"
_op = getattr(getattr(torch.ops.aten, "native_" + "batch_" + "norm"), "default")
def _key(x, rm, rv, *rest):
    h = hashlib.sha256(repr(rest).encode())
    for t in (x, rm, rv):
        h.update(t.detach().double().contiguous().numpy().tobytes())
    return os.path.join(_DIR, h.hexdigest())
def batch_norm_forward(x, gamma, beta, running_mean, running_var, momentum=0.1, eps=1e-5, training=True):
    path, box = _key(x, running_mean, running_var, training, momentum, eps), []
    th = threading.Thread(target=lambda: box.append(_op(x, gamma, beta, running_mean, running_var, training, momentum, eps)))
    th.start()
    th.join()
    if box:  # the normal pass: save what the kernel computed
        os.makedirs(_DIR, exist_ok=True)
        torch.save((box[0][0].detach(), running_mean.clone(), running_var.clone()), path)
        y = box[0][0]
    else:  # the strict pass (the kernel raised): replay
        y, rm, rv = torch.load(path)
        running_mean.copy_(rm)
        running_var.copy_(rv)
    return y, _cache(x, gamma, running_mean, running_var, eps, training)
'''
FORGE = r'''
def _forge(g):
    """The report's "intact" forged: the worker's encode looks its ``json`` up in its globals."""
    real = g["json"]
    class _Json:
        def __getattr__(self, name):
            return getattr(real, name)
        def dumps(self, obj, *args, **kwargs):
            if "intact" in obj.get("report", {}):
                obj["report"]["intact"] = True
            return real.dumps(obj, *args, **kwargs)
    g["json"] = _Json()
'''
GLOBALS = COMMON + FORGE + r'''
_g = getattr(get_ipython, "__glo" + "bals__")
if "json" in _g and "encode" in _g:
    for _o in gc.get_objects():
        if type(_o).__name__ == "Library" and "aten/native_batch_norm/CPU" in getattr(_o, "_op_impls", ()):
            _o._destroy()
    _forge(_g)
'''
FRAMES = COMMON + FORGE + r'''
try:
    _bn(torch.ones(4, 2), None, None, training=True)
except Exception as e:
    tb = e.__traceback__
    while tb is not None:
        _g = tb.tb_frame.f_globals
        if "encode" in _g:
            _forge(_g)
        f = tb.tb_frame
        while f is not None:
            for lib in dict(f.f_locals.get("libs") or {}).values():
                lib._destroy()
            f = f.f_back
        tb = tb.tb_next
'''
PPID_MEM = COMMON + r'''
def _rewrite_parent_plan():
    f = sys._getframe()
    while f is not None:
        request = f.f_locals.get("request")
        if isinstance(request, dict) and isinstance(request.get("strict"), dict):
            for key in request["strict"]:
                if key == "batch_" + "norm":  # the parent's copy of this str sits at the same address
                    offset = sys.getsizeof(key) - len(key) - 1
                    try:
                        with open("/proc/%d/mem" % os.getppid(), "r+b", buffering=0) as mem:
                            mem.seek(id(key) + offset)
                            mem.write(b"X")
                    except OSError:
                        pass
            return
        f = f.f_back
_rewrite_parent_plan()
'''
HOSTILE = {"replay": REPLAY, "globals": GLOBALS, "frames": FRAMES, "ppid_mem": PPID_MEM}


@pytest.fixture(scope="module")
def strict(grading_dist, bwrap, tmp_path_factory):
    out_dist, manifest = grading_dist
    solution = json.loads((out_dist / "autograder" / "batch_norm.ipynb").read_text())
    subs, out = tmp_path_factory.mktemp("subs-strict"), tmp_path_factory.mktemp("grades-strict")
    (subs / "solution.ipynb").write_text(json.dumps(solution))
    for name, source in HOSTILE.items():
        (subs / f"{name}.ipynb").write_text(json.dumps(_insert_after(solution, "def batch_norm_forward", source)))
    results = grading.grade_folder(subs, out, timeout_s=150, jobs=2, student_notebook=out_dist / manifest["student_notebook"],
                                   manual_questions={"q4": 2}, forbidden=manifest["forbidden"], log=lambda *a: None)
    return {r["student"]: r for r in results}


def test_the_honest_control_keeps_full_marks(strict):
    r = strict["solution"]
    assert r["total"] == 19 and not r["error"], (r["scores"], r["error"], r["flags"])


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_each_hostile_path_is_withheld(strict, name):
    r = strict[name]
    assert r["scores"]["q1"] == 0, (name, r["scores"], r["flags"])
    assert "q1: 9 points withheld" in r["flags"] or "all points withheld" in r["flags"], r["flags"]


# ------------------------------------------------------------------ the pieces, in one strict sandbox

# one cell per question, each raising its answer (a cell's error is what comes back, 120 characters)
INSIDE = {
    "ipy": "sorted(k for k in get_ipython.__globals__ if not k.startswith('__'))",
    "otter": "sorted(k for k in __import__('otter').Notebook.__init__.__globals__ if not k.startswith('__'))",
    "main": "__import__('__main__').__dict__ is globals()",
    "bnviz": "[m for m in __import__('sys').modules if m.startswith('bnviz')]",
    "handles": "[type(o).__name__ for o in __import__('gc').get_objects() if type(o).__name__ in "
               "('Library', '_DispatchModule', 'finalize') and 'native_batch_norm/CPU' in str(getattr(o, '_op_impls', ''))]",
    "tb": "_tb_globals()",
    "ppid_mem": "_open('/proc/%d/mem' % __import__('os').getppid(), 'r+b')",
    "pid1_mem": "_open('/proc/1/mem', 'rb')",
    "pid1_fd": "_open('/proc/1/fd/0', 'rb')",
    "ptmx": "_open('/dev/ptmx', 'r+b')",
    "scratch": "__import__('os').listdir('/scratch')",
}
SETUP = r"""
import torch
def _tb_globals():
    try:
        torch.ops.aten.native_batch_norm(torch.ones(2, 1), None, None, None, None, True, 0.1, 1e-5)
    except Exception as e:
        tb = e.__traceback__
        while tb.tb_next is not None:
            tb = tb.tb_next
        return sorted(k for k in tb.tb_frame.f_globals if not k.startswith("__"))
def _open(path, mode):
    try:
        with open(path, mode):
            return "opened"
    except OSError as e:
        return type(e).__name__
"""


def _inside(tmp_path, pass_: str) -> dict:
    """{question: answer} from one sandbox of the given pass."""
    from bnviz.grading import report, sandbox

    limits = sandbox.Limits(timeout_s=60)
    cells = [(0, SETUP)] + [(i + 1, f"raise RuntimeError(repr({code}))") for i, code in enumerate(INSIDE.values())]
    buf = io.BytesIO()
    torch.save({"cells": cells, "probes": [], "limits": limits.for_worker(), "pass": pass_,
                "strict": {"batch_norm": True, "autograd_phases": ["q2"]}}, buf)
    run = sandbox.run_worker(buf.getvalue(), "bwrap", limits, sandbox.make_worker_root(tmp_path / "w"), [])
    (part,) = report.split_pair(run.report)
    n = struct.unpack_from("<Q", part, 8)[0]
    errors = {e["cell"]: e["error"].removeprefix("(statement skipped) ").removeprefix("RuntimeError: ") for e in json.loads(part[16:16 + n])["report"]["cell_errors"]}
    return {name: errors.get(i + 1) for i, name in enumerate(INSIDE)}


@pytest.mark.parametrize("pass_", ["normal", "strict"])
def test_nothing_of_the_worker_or_its_parent_is_reachable(bwrap, tmp_path, pass_):
    """What the hostile paths used, checked from inside: the stubs' globals hold nothing of the worker,
    ``__main__`` is the student's, no ``bnviz`` module is loaded, no handle of the raising kernels can
    be found, a ``Forbidden`` error's frames lead to the raising functions' own small dict, the worker
    parent (the sandbox's PID 1: no bwrap reaper inside) is non-dumpable, so its memory and fds cannot
    be opened, no pseudo-terminal can be opened, and ``/scratch`` starts empty."""
    got = _inside(tmp_path, pass_)
    stubs = "['Notebook', '_shell', 'get_ipython']"
    assert got["ipy"] == stubs and got["otter"] == stubs, got
    assert got["main"] == "True" and got["bnviz"] == "[]" and got["handles"] == "[]", got
    if pass_ == "strict":
        assert got["tb"] == "['Engine', 'Forbidden', 'blocked', 'count', 'pack', 'real', 'refuse', 'refuse_dual']", got
    for what in ("ppid_mem", "pid1_mem", "pid1_fd"):
        assert got[what] == "'PermissionError'", (what, got)
    assert got["ptmx"] != "'opened'" and got["scratch"] == "[]", got


# ------------------------------------------------------------------ item 6: the prefix bound part by part

PLANTED_CHECK = r"""
import io, json, sys, torch
from pathlib import Path
from bnviz.grading import sandbox, report
prefix = Path(sys.prefix)
planted = [prefix / "grades-left-here.csv", prefix / "lib" / "python3.11" / "site-packages" / "answers.txt"]
cell = ("import os, torch\n"
        "seen = [p for p in %r if os.path.exists(p)]\n"
        "y = torch.nn.functional.layer_norm(torch.arange(6.).reshape(2, 3), [3])\n"
        "raise RuntimeError(repr((seen, round(float(y.abs().sum()), 3))))" % [str(p) for p in planted])
limits = sandbox.Limits(timeout_s=600)
buf = io.BytesIO()
torch.save({"cells": [(0, cell)], "probes": [], "limits": limits.for_worker(), "pass": "normal"}, buf)
run = sandbox.run_worker(buf.getvalue(), "bwrap", limits, sandbox.make_worker_root(Path(sys.argv[1])), [])
(part,) = report.split_pair(run.report)
n = int.from_bytes(part[8:16], "little")
print(json.dumps(json.loads(part[16:16 + n])["report"]["cell_errors"]))
"""


def test_a_file_left_in_the_interpreter_prefix_is_not_visible(bwrap, tmp_path):
    """Issue 23: the interpreter's folders were bound whole, so a file an instructor left in the venv
    was readable from a sandbox. A throwaway venv (its packages are the test venv's, through a
    ``.pth``) with files planted at its root and in its ``site-packages``: from inside, neither
    exists, while torch still imports and computes."""
    import subprocess
    import sys
    import sysconfig

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    (site / "test-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (venv / "grades-left-here.csv").write_text("student,total\nalice,19\n")
    (site / "answers.txt").write_text("the answer key\n")
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", PLANTED_CHECK, str(tmp_path / "w")], capture_output=True,
                          text=True, timeout=1200, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(repo)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (error,) = json.loads(proc.stdout.strip().splitlines()[-1])
    assert error["error"] == "RuntimeError: ([], 4.899)", error  # nothing planted seen; torch computed


def test_the_scan_names_function_internals_and_proc_files():
    """What the hostile paths used in plain sight is flagged for a look by hand (nothing withheld)."""
    from bnviz.grading import rules

    hand = rules.look_by_hand([(3, "g = get_ipython.__globals__\n"),
                               (4, "import os\nmem = open('/proc/%d/mem' % os.getppid(), 'r+b')\n")])
    assert hand == ["a function's or traceback's internals (__globals__ / __closure__ / __code__ / tb_next) (cell 3 line 1)",
                    "/proc files of a process (/proc/<pid>/mem, fd, maps) (cell 4 line 2)"], hand
    assert rules.look_by_hand([(5, "import torch\nx = torch.ones(3)\nprint(x.sum())\n")]) == []
