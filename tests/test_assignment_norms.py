"""Assignment 2 ("norms"): the answer key against the trusted checker, and planted bugs.

The solution's functions come from the source notebook's solution cells; the checker's probes run
in this process through the worker's own probe code (``worker.run_probes``, the ``call`` probe)
and its report encoding, so no sandbox is needed here. Each question's tests must fail on at least
three planted bugs, with the message the instructor would see. The checker's references are
compared with independent ones (F.batch_norm autograd, closed-form gradients, hand-computed
cumulative averages).
"""

import copy
import functools
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bnviz.grading import checker_norms, report, worker

SOURCE = Path(__file__).resolve().parents[1] / "notebooks" / "assignments" / "norms" / "norms.ipynb"


def _cells():
    return [(c["cell_type"], "".join(c["source"])) for c in json.loads(SOURCE.read_text())["cells"]]


PROVIDED = ("def rel_error_check", "def bn_forward_reference", "def student_seeds", "class Norm(")  # handed-out cells


def _solution_sources() -> list[str]:
    """The provided helpers and every code cell between # BEGIN SOLUTION and # END SOLUTION."""
    out, inside = [], False
    for kind, src in _cells():
        if kind == "raw" and src.startswith("# BEGIN SOLUTION"):
            inside = True
        elif kind == "raw" and src.startswith("# END SOLUTION"):
            inside = False
        elif kind == "code" and (inside or any(k in src for k in PROVIDED)):
            out.append(src)
    return out


@pytest.fixture(scope="module")
def solution() -> dict:
    return fresh_solution()


def fresh_solution() -> dict:
    """The solution's namespace (its functions look names up in it: a planted bug replaces one for all)."""
    import os  # the setup cell's; no `grader` here, so the seeds cell reads GRADING = True (no experiments)

    ns: dict = {"__name__": "__main__", "os": os, "STUDENT_ID": "s-test", "grader": None}
    for src in _solution_sources():
        exec(compile(src, "<solution>", "exec"), ns)
    return ns


def run_in_process(ns: dict, tests) -> dict:
    """The worker's probes on ``ns``, their report encoded and decoded as the grader does."""
    probes = [p for t in tests for p in t.probes]
    results = worker.run_probes(ns, worker.Direct(), torch, probes)
    return report.decode(worker.encode(torch, {"probes": results}))["probes"]


@functools.lru_cache(maxsize=4)
def _tests(seed: int) -> tuple:
    """make_tests(seed), drawn once (the probes' tensors are copied by the worker, judges are pure)."""
    return tuple(checker_norms.make_tests(seed))


def failures(ns: dict, question: str, seed: int = 0) -> dict:
    tests = [t for t in _tests(seed) if t.question == question]
    return {r["name"]: r["reason"] for r in checker_norms.judge_all(tests, run_in_process(ns, tests)) if not r["passed"]}


def test_solution_scores_full_marks(solution):
    tests = checker_norms.make_tests(1234)
    results = checker_norms.judge_all(tests, run_in_process(dict(solution), tests))
    failed = {r["name"]: r["reason"] for r in results if not r["passed"]}
    assert failed == {}
    assert checker_norms.question_points(tests) == {"q1": 6, "q2": 4, "q3": 4, "q4": 6, "q5": 7, "q6": 3, "q7": 3, "q8": 2,
                                                     "q9": 3}


def _notebook_tests():
    """[(question, points, hidden, source)] of the notebook's test cells."""
    out, question = [], None
    for kind, src in _cells():
        if kind == "raw" and src.startswith("# BEGIN QUESTION"):
            question = src.split("name:")[1].split()[0]
        if kind == "code" and src.startswith('""" # BEGIN TEST CONFIG'):
            config = src.split('""" # END TEST CONFIG')[0]
            points = float(config.split("points:")[1].split()[0])
            out.append((question, points, "hidden: true" in config, src))
    return out


def test_notebook_tests_match_the_checker_and_pass_on_the_solution(solution):
    nb = _notebook_tests()
    mine = [(t.question, t.points, t.hidden) for t in checker_norms.make_tests(0)]
    assert [(q, p, h) for q, p, h, _ in nb] == mine
    for question, _, _, src in nb:  # what `otter assign` runs at build time
        exec(compile(src, f"<{question} test>", "exec"), dict(solution))


# question -> [(bug, source that replaces the solution's function, expected failing message)]
BUGS = {
    "q1": [
        ("no variance path into xc", """
def bn_backward_graph(dy, cache):
    xc, std, x_hat, gamma = cache["xc"], cache["std"], cache["x_hat"], cache["gamma"]
    N = dy.shape[0]
    dx_hat = dy * gamma
    dstd = -(dx_hat * xc).sum(0) / std ** 2
    dvar = dstd / (2 * std)
    dxc = dx_hat / std
    dmu = -dxc.sum(0)
    return dxc + dmu / N, (dy * x_hat).sum(0), dy.sum(0), {"x_hat": dx_hat, "std": dstd, "var": dvar, "mu": dmu}
""", "relative errors vs autograd dx="),
        ("dvar without the factor 1/2", """
_good = bn_backward_graph
def bn_backward_graph(dy, cache):
    dx, dg, db, grads = _good(dy, cache)
    return dx, dg, db, dict(grads, var=2 * grads["var"])
""", "intermediate gradients for (4, 3): relative errors vs autograd"),
        ("std and var swapped", """
_good = bn_backward_graph
def bn_backward_graph(dy, cache):
    dx, dg, db, grads = _good(dy, cache)
    return dx, dg, db, dict(grads, var=grads["std"], std=grads["var"])
""", "intermediate gradients"),
        ("no intermediate gradients", """
_good = bn_backward_graph
def bn_backward_graph(dy, cache):
    return _good(dy, cache)[:3] + (None,)
""", "the 4th value must be a dict"),
    ],
    "q2": [
        ("N - 1", """
def bn_backward_simplified(dy, x_hat, inv_std, gamma):
    N = dy.shape[0] - 1
    db, dg = dy.sum(0), (dy * x_hat).sum(0)
    return (gamma * inv_std / N) * (N * dy - db - x_hat * dg), dg, db
""", "relative errors vs autograd dx="),
        ("no x_hat * dgamma term", """
def bn_backward_simplified(dy, x_hat, inv_std, gamma):
    N = dy.shape[0]
    db, dg = dy.sum(0), (dy * x_hat).sum(0)
    return (gamma * inv_std / N) * (N * dy - db), dg, db
""", "bn_backward_simplified for (8, 4): relative errors"),
        ("dy scaled in place", """
_good = bn_backward_simplified
def bn_backward_simplified(dy, x_hat, inv_std, gamma):
    out = _good(dy, x_hat, inv_std, gamma)
    dy.mul_(2.0)
    return out
""", "changed its inputs"),
    ],
    "q3": [
        ("one-sided differences", """
def numerical_gradient(f, x, h=1e-5):
    grad, flat = torch.zeros_like(x), x.view(-1)
    f0 = float(f(x))
    for i in range(flat.numel()):
        old = flat[i].item(); flat[i] = old + h; fp = float(f(x)); flat[i] = old
        grad.view(-1)[i] = (fp - f0) / h
    return grad
""", "is off from the exact gradient"),
        ("h ignored (1e-10)", """
_good = numerical_gradient
def numerical_gradient(f, x, h=1e-5):
    return _good(f, x, 1e-10)
""", "is off from"),
        ("x not restored", """
def numerical_gradient(f, x, h=1e-5):
    grad, flat = torch.zeros_like(x), x.view(-1)
    for i in range(flat.numel()):
        old = flat[i].item(); flat[i] = old + h; fp = float(f(x)); flat[i] = old - h; fm = float(f(x))
        grad.view(-1)[i] = (fp - fm) / (2 * h)
    return grad
""", "must leave x as it found it"),
        ("float32 gradient", """
_good = numerical_gradient
def numerical_gradient(f, x, h=1e-5):
    return _good(f, x, h).float()
""", "returned torch.float32 for a torch.float64 input"),
        ("rel_error over the norms", """
def rel_error(a, b):
    return float((a - b).norm() / (a.norm() + b.norm()))
""", "rel_error returned"),
        ("rel_error without the 1e-8 floor", """
def rel_error(a, b):
    return float(((a - b).abs() / (a.abs() + b.abs())).max())
""", "rel_error returned nan"),
    ],
    "q4": [
        ("last axis only", """
def layer_norm_forward(x, gamma, beta, eps=1e-5):
    mu, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, correction=0)
    inv_std = 1 / torch.sqrt(var + eps)
    x_hat = (x - mu) * inv_std
    return gamma * x_hat + beta, (x_hat, inv_std, gamma, (x.dim() - 1,))
""", "the output for (3, 4, 5, 2) (compared with F.layer_norm)"),
        ("unbiased variance", """
def layer_norm_forward(x, gamma, beta, eps=1e-5):
    dims = tuple(range(1, x.dim()))
    mu, var = x.mean(dims, keepdim=True), x.var(dims, keepdim=True)
    inv_std = 1 / torch.sqrt(var + eps)
    x_hat = (x - mu) * inv_std
    return gamma * x_hat + beta, (x_hat, inv_std, gamma, dims)
""", "the output for (4, 5) (compared with F.layer_norm)"),
        ("eps outside the square root", """
def layer_norm_forward(x, gamma, beta, eps=1e-5):
    dims = tuple(range(1, x.dim()))
    mu, var = x.mean(dims, keepdim=True), x.var(dims, keepdim=True, correction=0)
    inv_std = 1 / (torch.sqrt(var) + eps)
    x_hat = (x - mu) * inv_std
    return gamma * x_hat + beta, (x_hat, inv_std, gamma, dims)
""", "tiny variance: eps inside the square root"),
        ("batch statistics (axis 0)", """
def layer_norm_forward(x, gamma, beta, eps=1e-5):
    mu, var = x.mean(0, keepdim=True), x.var(0, keepdim=True, correction=0)
    inv_std = 1 / torch.sqrt(var + eps)
    x_hat = (x - mu) * inv_std
    return gamma * x_hat + beta, (x_hat, inv_std, gamma, tuple(range(1, x.dim())))
""", "must normalise each example on its own"),
        ("backward without the x_hat term", """
def layer_norm_backward(dy, cache):
    x_hat, inv_std, gamma, dims = cache
    M = x_hat[0].numel()
    g = dy * gamma
    return inv_std / M * (M * g - g.sum(dims, keepdim=True)), (dy * x_hat).sum(0), dy.sum(0)
""", "layer_norm_backward for (4, 5): relative errors vs autograd dx="),
    ],
    "q5": [
        ("no divisibility check (groups straddle channels)", """
def group_norm_forward(x, gamma, beta, G, eps=1e-5):
    N, C = x.shape[:2]
    xg = x.reshape(N, G, -1)
    mu, var = xg.mean(2, keepdim=True), xg.var(2, keepdim=True, correction=0)
    inv_std = 1 / torch.sqrt(var + eps)
    x_hat = ((xg - mu) * inv_std).reshape(x.shape)
    shape = [1, C] + [1] * (x.dim() - 2)
    return gamma.reshape(shape) * x_hat + beta.reshape(shape), (x_hat, inv_std, gamma, G)
""", "must raise a ValueError (C is not divisible by G)"),  # 6 channels reshape into 4 groups of 1.5
        ("silently uses gcd(C, G) groups", """
import math
_good = group_norm_forward
def group_norm_forward(x, gamma, beta, G, eps=1e-5):
    return _good(x, gamma, beta, math.gcd(x.shape[1], G), eps)
""", "must raise a ValueError (C is not divisible by G)"),
        ("error without the numbers", """
_good = group_norm_forward
def group_norm_forward(x, gamma, beta, G, eps=1e-5):
    if x.shape[1] % G:
        raise ValueError("bad number of groups")
    return _good(x, gamma, beta, G, eps)
""", "must be a ValueError naming C and G"),
        ("interleaved groups (channel c in group c % G)", """
_good = group_norm_forward
def group_norm_forward(x, gamma, beta, G, eps=1e-5):
    N, C = x.shape[:2]
    perm = torch.arange(C).reshape(C // G, G).t().reshape(-1) if C % G == 0 else torch.arange(C)
    inv = torch.argsort(perm)
    y, cache = _good(x[:, perm], gamma[perm], beta[perm], G, eps)
    return y[:, inv], cache
""", "compared with F.group_norm with G="),
        ("dgamma summed over the batch only", """
_good = group_norm_backward
def group_norm_backward(dy, cache):
    dx, dg, db = _good(dy, cache)
    return dx, (dy * cache[0]).sum(0).sum(-1).sum(-1) / dy.shape[-1], db
""", "relative errors vs autograd"),
    ],
    "q6": [
        ("BN depends on the batch in eval", """
_good = concepts
def concepts():
    return dict(_good(), depends_on_batch_eval=["batch"])
""", "depends_on_batch_eval is not right"),
        ("preprocessing swapped", """
_good = concepts
def concepts():
    return dict(_good(), per_feature_standardization="layer", per_image_standardization="batch")
""", "per_feature_standardization is not right"),
        ("a key missing", """
_good = concepts
def concepts():
    a = _good(); a.pop("ln_fails_when"); return a
""", "must return a dict with exactly the keys"),
        ("LN in the train list", """
_good = concepts
def concepts():
    return dict(_good(), depends_on_batch_train=["batch", "layer"])
""", "depends_on_batch_train is not right"),
    ],
    "q9": [
        ("mode not restored", """
_good = recompute_bn_stats
def recompute_bn_stats(model, batches):
    return _good(model, batches).train()
""", "the model's mode was not restored"),
        ("EMA instead of the cumulative average", """
def recompute_bn_stats(model, batches):
    mode = model.training
    model.train()
    with torch.no_grad():
        for xb in batches:
            model(xb)
    return model.train(mode)
""", "differs from the cumulative average"),
        ("momentum left at None", """
def recompute_bn_stats(model, batches):
    modes = [m.training for m in model.modules()]
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats(); m.momentum = None
    model.train()
    with torch.no_grad():
        for xb in batches:
            model(xb)
    for m, t in zip(model.modules(), modes):
        m.training = t
    return model
""", "momentum was not restored"),
        ("statistics not reset", """
_good = recompute_bn_stats
def recompute_bn_stats(model, batches):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats = lambda: None
    return _good(model, batches)
""", "differs from the cumulative average"),
    ],
}


BUGS["q7"] = [
    ("output layer scaled too", """
def build_init_model(norm, scale, seed, depth=8, width=64, d_in=784, n_out=10):
    model = _good_build(norm, scale, seed, depth, width, d_in, n_out)
    with torch.no_grad():
        model[-1].weight.mul_(scale)
    return model
""", "must not depend on the init scale"),
    ("init scale ignored", """
def build_init_model(norm, scale, seed, depth=8, width=64, d_in=784, n_out=10):
    return _good_build(norm, 1.0, seed, depth, width, d_in, n_out)
""", "gave the same output"),
    ("batches from the global generator",  # the q7 solution cell with torch.randint(..) lacking generator=g
     next(src for src in _solution_sources() if "def run_init_experiment" in src).replace(
         "(batch_size,), generator=g)", "(batch_size,))"), "the same seeds gave different results"),
    ("results transposed", """
def run_init_experiment(*args, **kwargs):
    r = _good_run(*args, **kwargs)
    return dict(r, final_loss=r["final_loss"].T, final_acc=r["final_acc"].T)
""", "final_loss (shape (len(scales), len(seeds))) has shape (2, 3), expected (3, 2)"),
    ("seeds cell edited", """
def student_seeds(student_id, n=3, salt=None):
    return [1, 2, 3][:n]
""", "student_seeds does not follow the seeds cell's convention"),
]
BUGS["q8"] = [
    ("floor instead of ceil", """
def plan_runs(batch_sizes, budget):
    p = _good_plan(batch_sizes, budget)
    return {k: {b: budget // b if k == "equal_examples" else budget // max(batch_sizes) for b in v} for k, v in p.items()}
""", "returned"),
    ("equal steps of the smallest batch", """
def plan_runs(batch_sizes, budget):
    p = _good_plan(batch_sizes, budget)
    return dict(p, equal_steps={b: p["equal_examples"][min(batch_sizes)] for b in batch_sizes})
""", "expected"),
    ("float steps", """
def plan_runs(batch_sizes, budget):
    return {"equal_examples": {b: budget / b for b in batch_sizes},
            "equal_steps": {b: budget / max(batch_sizes) for b in batch_sizes}}
""", "int steps"),
    ("no validation", """
def plan_runs(batch_sizes, budget):
    largest = -(-budget // max(batch_sizes, default=1) if batch_sizes else 1)
    return {"equal_examples": {b: -(-budget // b) if b else 0 for b in batch_sizes},
            "equal_steps": {b: largest for b in batch_sizes}}
""", "must raise a ValueError"),
]


@pytest.mark.parametrize("question,bug,source,message",
                         [(q, b, s, m) for q, bugs in BUGS.items() for b, s, m in bugs],
                         ids=[f"{q}-{b}" for q, bugs in BUGS.items() for b, _, _ in bugs])
def test_planted_bug_fails_with_a_clear_message(solution, question, bug, source, message):
    ns = fresh_solution()
    ns.update(_good_build=solution["build_init_model"], _good_run=solution["run_init_experiment"],
              _good_plan=solution["plan_runs"])
    exec(compile(source, f"<{bug}>", "exec"), ns)
    failed = failures(ns, question)
    assert failed, f"planted bug {bug!r} passed every {question} test"
    assert any(message in reason for reason in failed.values()), failed


def test_references_agree_with_independent_ones():
    g = torch.Generator().manual_seed(3)
    x, gamma, beta, dy = (torch.randn(*s, dtype=torch.float64, generator=g) for s in ((9, 4), (4,), (4,), (9, 4)))
    cache, grads = checker_norms.bn_graph_reference(x, gamma, beta, dy)
    xr, gr, br = (t.clone().requires_grad_() for t in (x, gamma, beta))
    ref = torch.autograd.grad(F.batch_norm(xr, None, None, gr, br, training=True), (xr, gr, br), dy)
    for a, b in zip((grads["dx"], grads["dgamma"], grads["dbeta"]), ref):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    assert torch.allclose(grads["x_hat"], dy * gamma) and torch.allclose(cache["x_hat"] * cache["std"], cache["xc"])
    # central differences of a closed-form function: the checker's reference and the exact gradient
    f, grad = checker_norms.scalar_fn(0.0, *(torch.randn(5, dtype=torch.float64, generator=g) for _ in range(3)))
    x5 = torch.randn(5, dtype=torch.float64, generator=g)
    assert torch.allclose(checker_norms.central_differences(f, x5, 1e-5), grad(x5), rtol=1e-7, atol=1e-9)
    # rel_error's reference by hand
    assert checker_norms.rel_error_reference(torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0])) == 0.5
    # recomputed statistics: one BatchNorm1d after a Linear, the mean of the batch means / unbiased variances
    model = checker_norms.build_model([["linear", 3, 2], ["bn1d", 2]], g).eval()
    batches = [torch.randn(6, 3, dtype=torch.float64, generator=g) for _ in range(4)]
    ref_model = checker_norms.recompute_reference(model, batches)
    with torch.no_grad():
        feats = [model[0](b) for b in batches]
    assert torch.allclose(ref_model[1].running_mean, torch.stack([h.mean(0) for h in feats]).mean(0))
    assert torch.allclose(ref_model[1].running_var, torch.stack([h.var(0) for h in feats]).mean(0))
    assert not model.training and model[1].momentum == 0.1  # the reference works on a copy


def test_make_tests_refuses_assignment_one_variants():
    from bnviz.grading.variants import candidates
    with pytest.raises(TypeError, match="does not apply"):
        checker_norms.make_tests(0, next(v for v in candidates() if not v.is_default))


def test_call_probe_keeps_the_strict_pass_protections():
    """An expected error never hides a strict-pass refusal; outputs are plain values."""
    class Sneaky(int):
        def __int__(self):
            raise AssertionError("ran student code")

    def refused(*args):
        raise worker.Forbidden("forbidden in this assignment: a batch-norm kernel (strict re-run)")

    ns = {"refused": refused, "sneaky": lambda: (Sneaky(3), torch.ones(2))}
    probes = [{"id": "a", "kind": "call", "phase": "q5", "calls": [{"fn": "refused", "args": [], "expect_error": True}]},
              {"id": "b", "kind": "call", "phase": "q5", "calls": [{"fn": "sneaky", "args": []}]},
              {"id": "c", "kind": "call", "phase": "q5", "calls": [{"fn": "missing", "args": []}]}]
    out = report.decode(worker.encode(torch, {"probes": worker.run_probes(ns, worker.Direct(), torch, probes)}))["probes"]
    assert out["a"]["error"].startswith("student code raised Forbidden")
    value, tensor = out["b"]["calls"][0]["out"]
    assert type(value) is int and value == 3 and torch.equal(tensor, torch.ones(2))
    assert out["c"]["error"] == "missing is not defined"


# --------------------------------------------------------------------------- through the sandbox

STRICT = {"batch_norm": False, "autograd_phases": sorted(q for q, f in checker_norms.RULES.items() if "autograd" in f)}
AUTOGRAD_LN = '''
def layer_norm_forward(x, gamma, beta, eps=1e-5):
    dims = tuple(range(1, x.dim()))
    x_hat = (x - x.mean(dims, keepdim=True)) / torch.sqrt(x.var(dims, keepdim=True, correction=0) + eps)
    return gamma * x_hat + beta, (x, gamma, beta, eps)

def layer_norm_backward(dy, cache):
    x, gamma, beta = (t.detach().clone().requires_grad_() for t in cache[:3])
    with torch.enable_grad():
        y, _ = layer_norm_forward(x, gamma, beta, cache[3])
    return torch.autograd.grad(y, (x, gamma, beta), dy)
'''


def _sandboxed(cells, tests, tmp_path):
    import io
    import struct

    from bnviz.grading import sandbox

    limits = sandbox.Limits(timeout_s=240)
    parts = []
    for pass_ in ("normal", "strict"):  # each pass in a fresh sandbox of its own, as grade.py runs them
        buf = io.BytesIO()
        torch.save({"cells": cells, "probes": [p for t in tests for p in t.probes], "strict": STRICT, "pass": pass_,
                    "limits": {**limits.for_worker(), "report_bytes": limits.report_bytes, "pass_seconds": None}}, buf)
        run = sandbox.run_worker(buf.getvalue(), "bwrap", limits, sandbox.make_worker_root(tmp_path / pass_), [])
        assert run.report, (run.problem, run.log_tail[-2000:])
        parts += report.split_pair(run.report)
    pair = worker.MAGIC_PAIR + b"".join(struct.pack("<Q", len(p)) + p for p in parts)
    normal, strict = report.parse(pair)
    assert normal["cell_errors"] == [] and strict["cell_errors"] == [], (normal["cell_errors"], strict["cell_errors"])
    return [{r["name"]: r["reason"] for r in checker_norms.judge_all(tests, p["probes"]) if not r["passed"]}
            for p in (normal, strict)]


@pytest.mark.grading
def test_answer_key_through_the_sandbox_and_autograd_caught_by_the_strict_pass(bwrap, tmp_path):
    """Every code cell of the answer key (setup, checks, timing, training) as a submission: full
    marks in both passes; LayerNorm's backward done with autograd passes the normal pass and fails
    q4's backward tests in the strict one."""
    cells = [(i, src) for i, (kind, src) in enumerate(_cells())
             if kind == "code" and not src.startswith('""" # BEGIN TEST CONFIG')]
    tests = checker_norms.make_tests(99)
    assert _sandboxed(cells, tests, tmp_path) == [{}, {}]
    normal, strict = _sandboxed(cells + [(len(cells) + 100, AUTOGRAD_LN)], tests, tmp_path / "autograd")
    assert normal == {}
    assert set(strict) == {"q4 - 2", "q4 - 4"} and all("autograd (strict re-run)" in r for r in strict.values()), strict


def test_source_notebook_format():
    """Committed without outputs; the config first, the student id next; imports only torch,
    matplotlib and the standard library the template uses."""
    import ast

    raw_cells = json.loads(SOURCE.read_text())["cells"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in raw_cells if c["cell_type"] == "code")
    kinds = _cells()
    assert kinds[0][0] == "raw" and kinds[0][1].startswith("# ASSIGNMENT CONFIG")
    assert kinds[2][0] == "code" and kinds[2][1].lstrip().startswith("# Your student id") and "STUDENT_ID" in kinds[2][1]
    allowed = {"torch", "matplotlib", "otter", "glob", "os", "sys", "zipfile", "subprocess", "time", "contextlib",
               "io", "copy", "math", "hashlib", "hmac", "torchvision", "bnviz"}  # torchvision / bnviz: load_data only
    for kind, src in kinds:
        if kind == "code":
            for node in ast.walk(ast.parse(src)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) else []
                assert {n.split(".")[0] for n in names} <= allowed, names


HONEST = '''
_concepts, _rel, _lnb, _rec = concepts, rel_error, layer_norm_backward, recompute_bn_stats
def concepts():  # sets and tuples instead of lists
    a = _concepts()
    return dict(a, depends_on_batch_train=set(a["depends_on_batch_train"]), depends_on_batch_eval=())
def rel_error(a, b):  # a 0-d float64 tensor instead of a float
    return ((a - b).abs() / torch.maximum(a.abs() + b.abs(), torch.tensor(1e-8, dtype=a.dtype))).max()
def numerical_gradient(f, x, h=1e-5):  # a copy per element, no in-place restore
    rows = []
    for i in range(x.numel()):
        e = torch.zeros_like(x).view(-1)
        e[i] = h
        e = e.view(x.shape)
        rows.append((f(x + e) - f(x - e)) / (2 * h))
    return torch.stack(rows).reshape(x.shape).to(x.dtype)
def layer_norm_backward(dy, cache):  # a list instead of a tuple
    return list(_lnb(dy, cache))
def recompute_bn_stats(model, batches):  # returns nothing
    _rec(model, batches)
'''


def test_honest_but_unusual_answers_keep_full_marks(solution):
    ns = copy.copy(solution)
    exec(compile(HONEST, "<honest>", "exec"), ns)
    for question in ("q3", "q4", "q6", "q9"):
        assert failures(ns, question, seed=5) == {}, question


def test_assignment_one_probes_still_dispatch():
    """The call probe's registration (``phase_of`` in run_probes) leaves assignment 1's probe kinds
    working: its answer key still scores full marks through the same in-process runner."""
    from bnviz.grading import checker

    nb = json.loads((SOURCE.parents[1] / "batch_norm" / "batch_norm.ipynb").read_text())
    ns: dict = {"__name__": "__main__"}
    inside = False
    for c in nb["cells"]:
        src = "".join(c["source"])
        inside = (inside or src.startswith("# BEGIN SOLUTION")) and not src.startswith("# END SOLUTION")
        if c["cell_type"] == "code" and (inside or src.startswith("import torch")):
            exec(compile(src, "<batch_norm solution>", "exec"), ns)
    tests = checker.make_tests(7)
    results = checker.judge_all(tests, run_in_process(ns, tests))
    assert [r["name"] for r in results if not r["passed"]] == []

    class Recorder(worker.Direct):  # which question's code ran, in order
        def run(self, phase, fn, *args, **kwargs):
            seen.append(phase)
            return super().run(phase, fn, *args, **kwargs)

    seen: list = []
    worker.run_probes(ns, Recorder(), torch, [p for t in tests for p in t.probes], {"q2"}, lambda: seen.append("switch"))
    switch = seen.index("switch")  # the strict pass blocks autograd here: q2's probes must all come after
    assert "q2" not in seen[:switch] and "q2" in seen[switch:] and set(seen[switch + 1:]) <= {"q1", "q2"}


def test_student_seeds_follow_one_convention_and_the_class_secret_stays_out(tmp_path, monkeypatch):
    """The notebook's seeds cell (student side) and student_seeds.seeds_for (instructor side) agree;
    the build's stamp writes a salt derived from the class secret, never the secret itself."""
    from bnviz.grading import student_seeds

    monkeypatch.delenv(student_seeds.SECRET_ENV, raising=False)
    assert student_seeds.class_salt() == student_seeds.PUBLIC_SALT
    secret = "instructor-secret-Xq7"
    salt = student_seeds.class_salt(secret)
    assert secret not in salt and salt != student_seeds.class_salt("another-secret")
    monkeypatch.setenv(student_seeds.SECRET_ENV, secret)
    assert student_seeds.class_salt() == salt
    nb_path = tmp_path / "norms.ipynb"
    nb_path.write_text(SOURCE.read_text())
    assert student_seeds.stamp_notebook(nb_path, salt)
    text = nb_path.read_text()
    cell = next("".join(c["source"]) for c in json.loads(text)["cells"] if "def student_seeds" in "".join(c["source"]))
    assert secret not in text and f'SEED_SALT = "{salt}"' in cell
    import os

    monkeypatch.delenv("BNVIZ_GRADING", raising=False)
    for sid in ("alice", " bob "):
        ns = {"os": os, "STUDENT_ID": sid, "grader": None}
        exec(compile(cell, "<seeds cell>", "exec"), ns)
        assert ns["SEEDS"] == student_seeds.seeds_for(salt, sid) and ns["GRADING"] is False
    # GRADING (experiments skipped): the course sandbox's variable, or otter's own grading mode only
    from bnviz.grading import sandbox

    assert sandbox.worker_env(sandbox.Limits())["BNVIZ_GRADING"] == "1"
    for env, mode, want in [("1", None, True), (None, True, True), (None, False, False), ("0", None, False)]:
        if env is None:
            monkeypatch.delenv("BNVIZ_GRADING", raising=False)
        else:
            monkeypatch.setenv("BNVIZ_GRADING", env)
        grader = type("Notebook", (), {} if mode is None else {"_grading_mode": mode})()
        ns = {"os": os, "STUDENT_ID": "alice", "grader": grader}
        exec(compile(cell, "<seeds cell>", "exec"), ns)
        assert ns["GRADING"] is want, (env, mode)
    assert student_seeds.seeds_for(salt, "alice") != student_seeds.seeds_for(salt, "bob")
    assert student_seeds.seeds_for(salt, "alice") != student_seeds.seeds_for(student_seeds.PUBLIC_SALT, "alice")
    with pytest.raises(ValueError, match="salt"):
        student_seeds.stamp_notebook(nb_path, 'x" ; import os #')


def _printed(source_line: str, sid: str, seeds: list[int]) -> str:
    """What a notebook line prints, run for real (the check must read the notebook's own format)."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(source_line.strip(), {"STUDENT_ID": sid, "SEEDS": seeds})
    return buf.getvalue()


def ran(nb: dict, sid: str, printed_sid: str, printed_seeds, outputs=True) -> dict:
    """A copy of notebook ``nb`` as a student hands it in: STUDENT_ID set to ``sid`` and, where
    ``outputs``, the seeds cell's and both experiment cells' output as a run with ``printed_sid``'s
    seeds leaves it: their own print line, run for real, and a figure (which the check must ignore).
    ``printed_sid`` other than ``sid``: a classmate's outputs. The grading tests use it too."""
    nb = json.loads(json.dumps(nb))
    for c in nb["cells"]:
        src = "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
        if c["cell_type"] != "code":
            continue
        if src.startswith("# Your student id"):
            c["source"] = re.sub(r"^STUDENT_ID = .*$", f"STUDENT_ID = {sid!r}", src, count=1, flags=re.M)
        line = next((ln for ln in src.splitlines() if "experiment seeds" in ln and "print(" in ln), None)
        if outputs and line is not None:
            text = _printed(line, printed_sid, printed_seeds)
            c["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["data: SYNTHETIC\n", text]},
                            {"output_type": "display_data", "metadata": {},
                             "data": {"image/png": "iVBORw0KGgo=", "text/plain": ["<Figure size 1100x400 with 2 Axes>"]}}]
    return nb


def _handed_in(tmp_path, sid: str, printed_sid: str, printed_seeds, outputs=True, name="sub.ipynb"):
    """The source notebook run as :func:`ran` leaves it, read back through ingest as the grader reads it."""
    from bnviz.grading import ingest, student_seeds

    path = tmp_path / name
    path.write_text(json.dumps(ran(json.loads(SOURCE.read_text()), sid, printed_sid, printed_seeds, outputs)))
    sub = ingest.read_submission(path, "norms.ipynb")
    assert sub.error is None, sub.error
    return sub, student_seeds


def test_the_seed_check_flags_outputs_made_with_another_ids_seeds(tmp_path):
    """Issue 26: a classmate's experiment outputs (their seeds), outputs from another class's
    notebook (another salt), experiments handed in without output and an empty STUDENT_ID are
    flagged for the instructor; an honest run is not. The printed lines come from the notebook's
    own print statements, run here."""
    from bnviz.grading import student_seeds

    salt = student_seeds.class_salt("class-secret-26")
    alice, bob = student_seeds.seeds_for(salt, "alice"), student_seeds.seeds_for(salt, "bob")
    assert alice != bob
    nb_cells = [(c["cell_type"], "".join(c["source"])) for c in json.loads(SOURCE.read_text())["cells"]]
    experiments = [i for i, (k, s) in enumerate(nb_cells) if k == "code" and s.startswith("# Experiment ")]
    assert len(experiments) == 2 and all("experiment seeds" in nb_cells[i][1] for i in experiments)

    sub, _ = _handed_in(tmp_path, "alice", "alice", alice)
    assert len(sub.outputs) == 3 and all("<Figure" in t for i, t in sub.outputs if i in experiments)
    assert student_seeds.check_outputs(sub.sources, sub.outputs, salt) == []
    sub, _ = _handed_in(tmp_path, " alice ", "alice", alice)  # the notebook strips the id too
    assert student_seeds.check_outputs(sub.sources, sub.outputs, salt) == []

    sub, _ = _handed_in(tmp_path, "alice", "bob", bob)  # bob's outputs, alice's id
    flags = student_seeds.check_outputs(sub.sources, sub.outputs, salt)
    assert len(flags) == 3 and all(f"printed seeds {bob} for student 'bob', but STUDENT_ID 'alice' gives {alice}" in f
                                   for f in flags), flags
    assert {int(f.split("cell ")[1].split(" ")[0]) for f in flags} >= set(experiments)

    public = student_seeds.seeds_for(student_seeds.PUBLIC_SALT, "alice")  # run in the public notebook
    sub, _ = _handed_in(tmp_path, "alice", "alice", public)
    assert len(student_seeds.check_outputs(sub.sources, sub.outputs, salt)) == 3

    sub, _ = _handed_in(tmp_path, "alice", "alice", alice, outputs=False)
    flags = student_seeds.check_outputs(sub.sources, sub.outputs, salt)
    assert sorted(f.split(" was handed")[0] for f in flags) == ["seed check: experiment A (question 7)",
                                                               "seed check: experiment B (question 8)"], flags

    sub, _ = _handed_in(tmp_path, "", "", student_seeds.seeds_for(salt, ""))
    flags = student_seeds.check_outputs(sub.sources, sub.outputs, salt)
    assert len(flags) == 1 and "STUDENT_ID is empty" in flags[0], flags

    # an older notebook's experiment cells printed no seeds line: asked to look at the figure
    sub, _ = _handed_in(tmp_path, "alice", "alice", alice)
    old = [(i, t if i not in experiments else "data: SYNTHETIC\n") for i, t in sub.outputs]
    flags = student_seeds.check_outputs(sub.sources, old, salt)
    assert len(flags) == 2 and all("has no seeds line" in f for f in flags), flags


def test_printed_text_is_capped_and_never_raises_on_odd_outputs():
    from bnviz.grading import ingest

    big = {"outputs": [{"output_type": "stream", "text": "x" * (3 * ingest.MAX_OUTPUT_CHARS)},
                       {"output_type": "stream", "text": "never reached"}]}
    assert ingest.printed_text(big) == "x" * ingest.MAX_OUTPUT_CHARS
    odd = {"outputs": [None, 3, {"output_type": "stream", "text": 5}, {"output_type": "execute_result", "data": []},
                       {"output_type": "error", "ename": "E", "traceback": ["t"]},
                       {"output_type": "execute_result", "data": {"text/plain": ["1", "2"]}},
                       {"output_type": "display_data", "data": {"image/png": "AAAA"}}]}
    assert ingest.printed_text(odd) == "12"
    assert ingest.printed_text({"outputs": "not a list"}) == "" == ingest.printed_text([])
