"""Grading v2, the trusted side: rule checks that say what they prove, a trusted side no report can
stall, every honest notebook graded and every file accounted for (issue 17 items 2, 3, 5).

One folder of planted submissions (evasions of the in-process tripwires, hostile reports, a killed
trusted-side judge, honest notebooks in every shape a student hands in) is graded once in bubblewrap
sandboxes, then graded again to check that the run resumes. The rest checks the pieces directly
(no sandbox). Each hostile submission sits beside honest ones that must keep 19/19.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import pickle
import shutil
import signal
import threading
import time
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("otter", reason="otter-grader is not installed (pip install -e .[grading])")
torch = pytest.importorskip("torch")

from bnviz import grading  # noqa: E402
from bnviz.grading import grade, ingest, judge, records, report, rules, scoring, worker  # noqa: E402

pytestmark = pytest.mark.grading

TIMEOUT_S = 150  # generous: on a loaded 2-core box one pass of an honest notebook took 40 s
CJK = "中" * 80  # 240 bytes of UTF-8: with ".ipynb" a legal 246-byte file name

# ------------------------------------------------------------------ the four evasions of issue 17
# Each replaces batch_norm_forward with one that calls F.batch_norm past the in-process tripwires,
# with the name built at run time so that the source scan does not see it either.
EVADE_MODES = r'''
import torch, torch.nn.functional as F
from torch.utils._python_dispatch import _disable_current_modes
def batch_norm_forward(x, gamma, beta, running_mean, running_var, momentum=0.1, eps=1e-5, training=True):
    bn = getattr(torch, "batch_" + "norm")
    bn = getattr(bn, "__wrapped__", bn)
    with _disable_current_modes():
        y = bn(x, gamma, beta, running_mean, running_var, training, momentum, eps, False)
    return y, _cache(x, gamma, running_mean, running_var, eps, training)
'''
EVADE_THREAD = r'''
import threading, torch
_bn = getattr(torch, "batch_" + "norm")
_bn = getattr(_bn, "__wrapped__", _bn)
def batch_norm_forward(x, gamma, beta, running_mean, running_var, momentum=0.1, eps=1e-5, training=True):
    out = []
    t = threading.Thread(target=lambda: out.append(_bn(x, gamma, beta, running_mean, running_var, training, momentum, eps, False)))
    t.start()
    t.join()
    return out[0], _cache(x, gamma, running_mean, running_var, eps, training)
'''
EVADE_STACK = r'''
import sys, torch, torch.nn.functional as F
def batch_norm_forward(x, gamma, beta, running_mean, running_var, momentum=0.1, eps=1e-5, training=True):
    f = sys._getframe(1)
    while f is not None:
        for v in list(f.f_locals.values()):
            if type(v).__name__ == "Tripwires":
                v._hit = lambda *a, **k: None
        f = f.f_back
    y = getattr(F, "batch_" + "norm")(x, running_mean, running_var, gamma, beta, training, momentum, eps)
    return y, _cache(x, gamma, running_mean, running_var, eps, training)
'''
EVADE_MAIN = r'''
import sys, torch, torch.nn.functional as F
def _worker_globals():  # the worker module, up the frames (issue 23: it is no longer in sys.modules)
    f = sys._getframe()
    while "encode" not in f.f_globals:
        f = f.f_back
    return f.f_globals
_T = _worker_globals()["Tripwires"]
_report = _T.report
def _clean(self):
    r = _report(self)
    r["hits"], r["intact"] = [], True
    return r
_T.report = _clean
def batch_norm_forward(x, gamma, beta, running_mean, running_var, momentum=0.1, eps=1e-5, training=True):
    y = getattr(F, "batch_" + "norm")(x, running_mean, running_var, gamma, beta, training, momentum, eps)
    return y, _cache(x, gamma, running_mean, running_var, eps, training)
'''
# the cache batch_norm_backward expects (x_hat, inv_std, gamma, dims, shape), computed honestly
CACHE = r'''
def _cache(x, gamma, running_mean, running_var, eps, training):
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean, var = (x.mean(dim=dims), x.var(dim=dims, correction=0)) if training else (running_mean, running_var)
    inv_std = 1.0 / torch.sqrt(var + eps)
    return (x - mean.reshape(shape)) * inv_std.reshape(shape), inv_std, gamma, dims, shape
'''
EVASIONS = {"evade_modes": EVADE_MODES, "evade_thread": EVADE_THREAD, "evade_stack": EVADE_STACK,
            "evade_main": EVADE_MAIN}

# ------------------------------------------------------------------ hostile reports (issue 17)
# The student's code replaces the worker's JSON encoder (it lives in the same process), so the
# pass's report is whatever the student wants: a 16 MB string, or a pickled DAG of depth 40.
# the worker module, found up the frames (issue 23: it is no longer in sys.modules), gets the
# student's json.dumps
REPLACE_WORKER_JSON = r'''
def _worker_globals():
    f = sys._getframe()
    while "encode" not in f.f_globals:
        f = f.f_back
    return f.f_globals
_worker_globals()["json"] = types.SimpleNamespace(dumps=_dumps)
'''
REPORT_BIG_STRING = r'''
import json, sys, types
def _dumps(obj):
    if obj["report"].get("pass") == "normal":
        obj["report"]["cell_errors"] = [{"cell": 1, "error": "MemoryError " + "x" * (16 << 20)}]
    return json.dumps(obj)
''' + REPLACE_WORKER_JSON
REPORT_PICKLE_DAG = r'''
import json, pickle, sys, types
def _dumps(obj):
    if obj["report"].get("pass") != "normal":
        return json.dumps(obj)
    node = ["y" * (16 << 20)] * 1200
    for _ in range(40):
        node = [node, node]
    return pickle.dumps({"protocol": 2, "pass": "normal", "cell_errors": [{"cell": 0, "error": node}]}).decode("latin-1")
''' + REPLACE_WORKER_JSON


def _src(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _insert_after(nb: dict, startswith: str, source: str) -> dict:
    nb = copy.deepcopy(nb)
    idx = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" and _src(c).startswith(startswith)]
    assert len(idx) == 1, startswith
    nb["cells"].insert(idx[0] + 1, {"cell_type": "code", "execution_count": None, "metadata": {},
                                    "outputs": [], "source": source})
    return nb


def _edit_cell(nb: dict, startswith: str, edit) -> dict:
    nb = copy.deepcopy(nb)
    hits = [c for c in nb["cells"] if c["cell_type"] == "code" and _src(c).startswith(startswith)]
    assert len(hits) == 1, startswith
    hits[0]["source"] = edit(_src(hits[0]))
    return nb


def _write(path: Path, nb: dict) -> None:
    path.write_text(json.dumps(nb))


def _honest_shapes(solution: dict, subs: Path) -> None:
    """Honest notebooks as students hand them in: each must get 19/19."""
    import nbformat

    _write(subs / "solution.ipynb", solution)
    v3 = nbformat.convert(nbformat.reads(json.dumps(solution), 4), 3)  # worksheets, "input", prompt_number
    assert v3["nbformat"] == 3
    (subs / "nbformat3.ipynb").write_text(nbformat.writes(v3))
    no_count = copy.deepcopy(solution)
    for cell in no_count["cells"]:
        cell.pop("execution_count", None)
        cell.pop("id", None)
    _write(subs / "no_execution_count.ipynb", no_count)
    magics = _edit_cell(solution, "def batch_norm_forward", lambda s: "%%time\n" + s)
    magics = _edit_cell(magics, "def batch_norm_backward", lambda s: "%%capture captured\n" + s)
    magics = _edit_cell(magics, "class BatchNorm", lambda s: s + "\n%timeit -n1 -r1 BatchNorm(3)\n_m = %time BatchNorm(2)\n")
    magics = _insert_after(magics, "import torch", "%%bash\necho this cell is not run")
    _write(subs / "magics.ipynb", magics)
    big = copy.deepcopy(solution)
    first_code = next(c for c in big["cells"] if c["cell_type"] == "code")
    first_code["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "x" * (65 << 20)}]  # 65 MB
    _write(subs / "big_outputs.ipynb", big)
    _write(subs / "UPPER.IPYNB", solution)
    with zipfile.ZipFile(subs / "nested.Zip", "w") as zf:
        zf.writestr("handin/work/batch_norm.ipynb", json.dumps(solution))
        zf.writestr("handin/scratch.ipynb", json.dumps({"cells": []}))
        zf.writestr("__MACOSX/handin/._batch_norm.ipynb", "junk")
    _write(subs / f"{CJK}.ipynb", solution)
    _write(subs / "-=HYPERLINK(1).ipynb", solution)


def _hostile(solution: dict, subs: Path, out: Path) -> None:
    fwd = "def batch_norm_forward"
    for name, source in EVASIONS.items():
        _write(subs / f"{name}.ipynb", _insert_after(solution, fwd, CACHE + source))
    _write(subs / "report_big_string.ipynb", _insert_after(solution, "import torch", REPORT_BIG_STRING))
    _write(subs / "report_pickle_dag.ipynb", _insert_after(solution, "import torch", REPORT_PICKLE_DAG))
    _write(subs / "code_1mb.ipynb", _insert_after(solution, "import torch", "x = 1\n" + "# " + "y" * (1 << 20) + "\n"))
    _write(subs / "judge_killed.ipynb", solution)
    _write(subs / "unwritable.ipynb", solution)
    (out / "unwritable.json").mkdir(parents=True)  # its result file cannot be written
    (subs / "notes.txt").write_text("not a submission")
    (subs / ".DS_Store").write_bytes(b"\0")
    (subs / "a_folder").mkdir()
    (subs / "link.ipynb").symlink_to(subs / "solution.ipynb")


def _kill_during(name: str):
    """Judge.call, but the judge child is stopped before it reads ``name``'s notebook and killed
    (SIGKILL) a second later, while the grader waits for its answer."""
    original = judge.Judge.call

    def call(self, op, msg, blob=b""):
        if op == "ingest" and msg.get("path", "").endswith(name):
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            pid = self.proc.pid
            os.kill(pid, signal.SIGSTOP)
            threading.Timer(1.0, os.killpg, (pid, signal.SIGKILL)).start()
        return original(self, op, msg, blob)

    return call


@pytest.fixture(scope="module")
def trusted(grading_dist, bwrap, tmp_path_factory):
    out_dist, manifest = grading_dist
    solution = json.loads((out_dist / "autograder" / "batch_norm.ipynb").read_text())
    subs, out = tmp_path_factory.mktemp("subs-trusted"), tmp_path_factory.mktemp("grades-trusted")
    _honest_shapes(solution, subs)
    _hostile(solution, subs, out)
    lines: list[str] = []
    kw = dict(timeout_s=TIMEOUT_S, jobs=2, student_notebook=out_dist / manifest["student_notebook"],
              manual_questions={"q4": 2}, forbidden=manifest["forbidden"], log=lambda *a: lines.append(" ".join(map(str, a))))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(judge.Judge, "call", _kill_during("judge_killed.ipynb"))
        results = grading.grade_folder(subs, out, **kw)
    first = {r["student"]: r for r in results}
    gradebook = (out / "gradebook.csv").read_text(encoding="utf-8")
    # the second run: one file changed, everything else as it was
    _write(subs / "solution.ipynb", _edit_cell(solution, "def batch_norm_forward",
                                               lambda s: s.replace("momentum * var * n / (n - 1)", "momentum * var")))
    again = {r["student"]: r for r in grading.grade_folder(subs, out, **kw)}
    return {"res": first, "again": again, "out": out, "subs": subs, "log": lines, "gradebook": gradebook}


HONEST = ["solution", "nbformat3", "no_execution_count", "magics", "big_outputs", "UPPER", "nested",
          "judge_killed", "unwritable"]


def _own_flags(r: dict) -> str:
    """The flags this part of the grader writes (similarity flags, another part's, left out)."""
    return "; ".join(f for f in r["flags"].split("; ") if f and not f.startswith("similar to"))


# ------------------------------------------------------------------ A. rule checks


@pytest.mark.parametrize("name", sorted(EVASIONS))
def test_tripwire_evasions_are_flagged_and_withheld(trusted, name):
    r = trusted["res"][name]
    assert r["scores"]["q1"] == 0, (r["scores"], r["flags"])
    assert "q1: 9 points withheld" in r["flags"], r["flags"]
    assert "look by hand" in r["flags"], r["flags"]  # the source scan names the trick too
    assert r["scores"]["q2"] == 4  # the honest backward keeps its points


def test_strict_rerun_is_what_catches_them(trusted):
    """The names are built at run time (the source scan is blind) and the tripwires are evaded or
    merely advisory: the strict re-run, where the batch-norm kernels raise, catches each one."""
    for name in EVASIONS:
        flags = trusted["res"][name]["flags"]
        assert "in the source" not in flags, (name, flags)
        assert ("q1: 9 points withheld, its answer works only while F.batch_norm / torch.batch_norm / "
                "nn.BatchNorm* can run (strict re-run" in flags or "q1: confirmed by the strict re-run" in flags), (name, flags)
    for name in ("evade_stack", "evade_main"):  # the tripwires saw nothing: only the strict re-run
        assert "called at run time" not in trusted["res"][name]["flags"]
    hand = {n: trusted["res"][n]["flags"] for n in EVASIONS}
    assert "__wrapped__" in hand["evade_modes"] and "dispatch" in hand["evade_modes"]
    assert "threads" in hand["evade_thread"]
    assert "frame access" in hand["evade_stack"]
    assert "frame access" in hand["evade_main"]  # sys.modules no longer holds the worker (issue 23)


def test_honest_notebooks_are_graded_in_full(trusted):
    res = trusted["res"]
    for name in HONEST[:-2]:
        assert res[name]["total"] == 19, (name, res[name]["error"], res[name]["flags"])
        assert res[name]["scores"] == {"q1": 9, "q2": 4, "q3": 6}, name
        assert "withheld" not in res[name]["flags"] and "look by hand" not in res[name]["flags"], name
    assert _own_flags(res["solution"]) == "" and res["solution"]["error"] == ""
    cjk = [n for n in res if n.startswith("中")]
    assert len(cjk) == 1 and res[cjk[0]]["total"] == 19 and len(cjk[0].encode()) <= ingest.MAX_NAME_BYTES
    assert "nbformat 3" in res["nbformat3"]["flags"] and "edited" not in res["nbformat3"]["flags"]
    assert "cell magic %%bash is not run by the grader" in res["magics"]["error"]
    assert "zip holds 2 notebooks" in res["nested"]["flags"] and "handin/work/batch_norm.ipynb" in res["nested"]["flags"]


# ------------------------------------------------------------------ B. a trusted side no report can stall


def test_hostile_reports_are_rejected_without_stalling(trusted):
    res = trusted["res"]
    big, dag = res["report_big_string"], res["report_pickle_dag"]
    assert "report was rejected" in big["error"] and "16777" in big["error"] and "at most 1000" in big["error"], big["error"]
    assert "report was rejected" in dag["error"] and "header is not valid JSON" in dag["error"], dag["error"]
    for r in (big, dag):
        assert r["total"] == 0 and r["elapsed_s"] < TIMEOUT_S
        assert "memory limit" not in r["error"]  # the 16 MB string never reached a regex or str()
    code = res["code_1mb"]
    assert code["total"] == 0 and "KB of code (at most 256 KB" in code["error"] and code["elapsed_s"] < 30


def test_killed_judge_loses_one_row_only(trusted):
    r = trusted["res"]["judge_killed"]
    assert r["total"] == 0 and "ingest step died (killed by signal 9)" in r["error"], r["error"]
    assert r["final"] is False
    assert all(trusted["res"][n]["total"] == 19 for n in HONEST[:-2] if n != "judge_killed")


def test_a_result_that_cannot_be_written_stops_nothing(trusted):
    r = trusted["res"]["unwritable"]
    assert r["total"] == 19 and "could not write its result file" in r["error"]
    rows = list(csv.DictReader(io.StringIO(trusted["gradebook"])))
    assert any(row["student"] == "unwritable" and row["total"] == "19" for row in rows)


def test_results_are_written_as_judged_and_the_run_resumes(trusted):
    first, again, out = trusted["res"], trusted["again"], trusted["out"]
    assert set(first) == set(again)
    for name, r in again.items():
        redo = name in ("solution", "judge_killed", "unwritable")  # changed file, trusted-side failures
        assert bool(r.get("resumed")) is not redo, name
        if not redo:  # (similarity flags are recomputed each run: compared apart from the flags)
            assert {k: v for k, v in r["row"].items() if k != "flags"} == \
                {k: v for k, v in first[name]["row"].items() if k != "flags"}, name
            assert _own_flags(r) == _own_flags(first[name]), name
    assert again["solution"]["scores"]["q1"] < 9  # the changed file was graded again
    assert again["judge_killed"]["total"] == 19 and again["judge_killed"]["error"] == ""
    assert any("kept from an earlier run" in line for line in trusted["log"])
    data = json.loads((out / "nbformat3.json").read_text())
    assert data["final"] is True and len(data["submission_sha256"]) == 64
    assert not list(out.glob(".w*.tmp"))


def test_regrade_starts_over(grading_dist, bwrap, tmp_path):
    out_dist, manifest = grading_dist
    subs, out = tmp_path / "subs", tmp_path / "grades"
    subs.mkdir()
    shutil.copy(out_dist / "autograder" / "batch_norm.ipynb", subs / "one.ipynb")
    kw = dict(timeout_s=TIMEOUT_S, forbidden=manifest["forbidden"], log=lambda *a: None)
    grading.grade_folder(subs, out, **kw)
    (out / "one.json").write_text((out / "one.json").read_text().replace('"total": 19.0', '"total": 7.0'))
    assert grading.grade_folder(subs, out, **kw)[0]["total"] == 7  # resumed: the stored result is kept
    assert grading.grade_folder(subs, out, regrade=True, **kw)[0]["total"] == 19


# ------------------------------------------------------------------ C. every file accounted for


def test_every_file_is_in_the_gradebook_or_skipped(trusted):
    out, subs = trusted["out"], trusted["subs"]
    rows = list(csv.DictReader(io.StringIO(trusted["gradebook"])))
    with open(out / "skipped.csv", newline="", encoding="utf-8") as f:
        skipped = {r["file"]: r["reason"] for r in csv.DictReader(f)}
    assert skipped == {".DS_Store": "a hidden file or folder (name starts with '.')",
                       "a_folder": "a folder (submissions are the files directly in the folder)",
                       "link.ipynb": "a symbolic link (not followed)",
                       "notes.txt": "not a notebook (.ipynb) or a zip (.zip)"}
    assert len(rows) + len(skipped) == len(list(subs.iterdir()))
    assert any("skipped notes.txt" in line for line in trusted["log"])


def test_no_csv_cell_reads_as_a_formula(trusted):
    out = trusted["out"]
    for name in ("gradebook.csv", "skipped.csv"):
        with open(out / name, newline="", encoding="utf-8") as f:
            for row in csv.reader(f):
                assert not any(c[:1] in ("=", "+", "-", "@") for c in row), (name, row)
    names = [r["student"] for r in csv.DictReader(io.StringIO(trusted["gradebook"]))]
    assert "__HYPERLINK_1_" in names  # '-' and '=' became '_': no file or option starts with '-'
    assert all(not n.startswith("-") for n in os.listdir(out)) and all(not n.startswith("-") for n in os.listdir(out / "logs"))
    assert records.csv_cell("=1+1") == "'=1+1" and records.csv_cell("-2") == "'-2" and records.csv_cell("@x") == "'@x"


# ------------------------------------------------------------------ the pieces, directly (no sandbox)


def _pair(*parts: bytes) -> bytes:
    return worker.MAGIC_PAIR + b"".join(len(p).to_bytes(8, "little") + p for p in parts)


def _normal(**extra) -> dict:
    return {"protocol": 2, "pass": "normal", "cell_errors": [], "probes": {"p": {"y": torch.arange(6.0).reshape(2, 3)}},
            "tripwire": {"installed": True, "intact": True, "hits": [], "ops": {"q1": 3}}, **extra}


def test_report_format_round_trip_and_schema():
    n, s = report.parse(_pair(worker.encode(torch, _normal()),
                              worker.encode(torch, {"protocol": 2, "pass": "strict", "cell_errors": [],
                                                    "probes": {}, "intact": True})))
    assert torch.equal(n["probes"]["p"]["y"], torch.arange(6.0).reshape(2, 3)) and s["intact"] is True
    bad = {
        "a 16 MB string": _normal(cell_errors=[{"cell": 1, "error": "x" * (16 << 20)}]),
        "nested 40 deep": _normal(probes={"p": {"deep": json.loads("[" * 40 + "]" * 40)}}),
        "wrong types": _normal(cell_errors=[{"cell": "1", "error": 5}]),
        "a long list": _normal(probes={"p": {"l": list(range(5000))}}),
    }
    for what, rep in bad.items():
        with pytest.raises(report.ReportError):
            report.parse(_pair(worker.encode(torch, rep)))
    good = worker.encode(torch, _normal())
    header_len = int.from_bytes(good[8:16], "little")
    header = json.loads(good[16:16 + header_len])
    header["report"]["probes"]["q"] = header["report"]["probes"]["p"]  # the same tensor twice
    forged = json.dumps(header).encode()
    with pytest.raises(report.ReportError, match="used twice"):
        report.parse(_pair(worker.MAGIC + len(forged).to_bytes(8, "little") + forged + good[16 + header_len:]))
    dag: list = ["y" * 1000] * 1200
    for _ in range(40):
        dag = [dag, dag]
    with pytest.raises(report.ReportError, match="format"):
        report.parse(_pair(pickle.dumps(dag)))  # a shared-reference DAG cannot even be expressed


def test_cell_error_text_is_plain_and_short():
    errors = [{"cell": 3, "error": "MemoryError: " + "x" * 990}] * 4096
    out = scoring.cell_error_text(errors, "4 GiB")
    assert out[0].startswith("4096 cell(s) raised; first: cell 3: student code raised MemoryError") and len(out[0]) < 200
    assert "memory limit (4 GiB) reached" in out[1]


def test_rules_flag_the_tricks_for_a_look_by_hand(grading_dist):
    for name, source in EVASIONS.items():
        assert rules.look_by_hand([(5, CACHE + source)]), name
    solution = json.loads((grading_dist[0] / "autograder" / "batch_norm.ipynb").read_text())
    cells = [(i, _src(c)) for i, c in enumerate(solution["cells"]) if c["cell_type"] == "code"]
    assert rules.look_by_hand(cells) == []  # the setup cell's `"google.colab" in sys.modules` is fine
    found = " ".join(rules.look_by_hand([(1, "import ctypes\nfrom torch.library import Library\nx = torch.ops.aten.add\n"
                                             "y = torch._C._get_tracing_state\nimport gc\ngc.get_objects()\n"
                                             "import concurrent.futures\nimport inspect")]))
    for what in ("ctypes", "torch.library", "torch.ops", "torch._C", "gc.get_objects", "threads", "frame access"):
        assert what in found, what


def test_ipython_syntax_becomes_the_code_that_runs():
    assert ingest.to_python("%%time\nx = 1\ny = 2")[0].strip() == "x = 1\ny = 2"
    assert ingest.to_python("%%timeit -n1 -r1\nx = 1")[0].strip() == "x = 1"
    assert ingest.to_python("%%capture out\nx = 1")[0].strip() == "x = 1"
    assert ingest.to_python("y = %time f(2)")[0].strip() == "y = f(2)"
    assert ingest.to_python("if True:\n    %timeit -n 3 g()")[0].strip() == "if True:\n    g()"
    code, problem = ingest.to_python("%%bash\nrm -rf /")
    assert code == "" and "cell magic %%bash is not run" in problem
    assert "get_ipython().run_line_magic('matplotlib'" in ingest.to_python("%matplotlib inline")[0]


def test_student_names_fit_the_file_system():
    files = [Path(f"/x/{CJK}{CJK}.ipynb"), Path(f"/x/{CJK}{CJK}.zip"), Path("/x/-rf.ipynb"), Path("/x/.x.ipynb"),
             Path("/x/Alice.ipynb"), Path("/x/alice.ipynb")]
    names = ingest.student_names(files)
    assert len(set(n.lower() for n in names.values())) == len(files)
    assert all(len(n.encode()) <= ingest.MAX_NAME_BYTES and not n.startswith(("-", ".")) for n in names.values())
    assert names[Path("/x/-rf.ipynb")] == "_rf"


def test_atomic_write_with_a_name_at_the_limit(tmp_path):
    path = tmp_path / ("中" * 83 + ".js")  # 252 bytes: the longest legal name, nearly
    records.atomic_write(path, "{}")
    assert path.read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_judge_survives_its_child_dying(tmp_path):
    nb = tmp_path / "x.ipynb"
    nb.write_text(json.dumps({"cells": [{"cell_type": "code", "source": "print(1)"}], "metadata": {}}))
    j = judge.Judge({"rules": {}, "handed_out": None}, timeout_s=120)
    try:
        assert j.call("ingest", {"path": str(nb)})["cells"] == [[0, "print(1)\n"]]
        os.killpg(j.proc.pid, signal.SIGKILL)
        with pytest.raises(judge.JudgeError, match="died"):
            j.call("ingest", {"path": str(nb)})
        assert j.call("ingest", {"path": str(nb)})["cells"] == [[0, "print(1)\n"]]  # a fresh child
    finally:
        j.close()


def test_judge_memory_limit(tmp_path):
    nb = tmp_path / "huge.ipynb"
    with open(nb, "w") as f:  # 48 MB of empty lists: ~1 GB of Python objects
        f.write('{"cells": [], "metadata": {"x": [')
        f.write("[]," * (16 << 20))
        f.write("[]]}}")
    j = judge.Judge({"rules": {}, "handed_out": None}, memory_bytes=512 << 20, timeout_s=300)
    try:
        t0 = time.monotonic()
        with pytest.raises(judge.JudgeError, match="memory limit|died"):
            j.call("ingest", {"path": str(nb)})
        assert time.monotonic() - t0 < 300
    finally:
        j.close()
