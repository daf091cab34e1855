"""Assignment 2 ("Normalization in depth", issue 26) through the real grader: build, the CLI's
``grade`` (which picks ``checker_norms`` from ``assignment.json``), the sandbox's two passes.

ONE grading run (a module fixture) over a folder of submissions, asserted per student:

* the answer key: full autograded marks, no flag;
* honest but unusual answers: other broadcasting (``unsqueeze`` / ``einsum`` instead of
  ``keepdim``), float64 throughout, helper functions in cells of their own, a scratch cell that
  compares with ``F.layer_norm`` / ``F.group_norm`` under the answers' own local names, a
  numerical gradient without a loop: full marks;
* hostile ones: ``F.layer_norm`` / ``nn.GroupNorm`` in plain sight (the source scan); the aliasing
  tricks of assignment 1's hostile sets (``getattr`` on a built string, ``importlib``,
  ``torch.ops.aten``) and batch norm on ``x.T`` as LayerNorm (the strict re-run, where those kernels
  raise during q4 / q5 only); autograd hidden in the four hand-written backward passes (the strict
  re-run); the tripwires' report cleaned and the worker's JSON encoder replaced (assignment 1's
  ``EVADE_MAIN`` / ``REPORT_BIG_STRING``, reused); assignment 1's answer key handed in here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("otter", reason="otter-grader is not installed (pip install -e .[grading])")
torch = pytest.importorskip("torch")

from test_grading_trusted import EVADE_MAIN, REPORT_BIG_STRING, _insert_after, _write  # noqa: E402

pytestmark = pytest.mark.grading

REPO = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------ honest but unusual

BROADCAST = r'''
def layer_norm_forward(x, gamma, beta, eps=1e-5):
    x64 = x.double()  # float64 throughout, the input's dtype back at the end
    flat = x64.reshape(x64.shape[0], -1)
    mu = flat.mean(1)
    var = ((flat - mu.unsqueeze(1)) ** 2).mean(1)
    inv_std = torch.rsqrt(var + eps)
    x_hat = torch.einsum("nd,n->nd", flat - mu[:, None], inv_std).reshape(x.shape)
    return (gamma.double() * x_hat + beta.double()).to(x.dtype), (x_hat, inv_std, gamma.double())

def layer_norm_backward(dy, cache):
    x_hat, inv_std, gamma = cache
    n = x_hat.shape[0]
    g = (dy.double() * gamma).reshape(n, -1)
    xh = x_hat.reshape(n, -1)
    m = xh.shape[1]
    dx = torch.einsum("n,nd->nd", inv_std / m, m * g - g.sum(1)[:, None] - xh * torch.einsum("nd,nd->n", g, xh)[:, None])
    return dx.reshape(dy.shape).to(dy.dtype), (dy * x_hat).sum(0), dy.sum(0)

def group_norm_forward(x, gamma, beta, G, eps=1e-5):
    N, C = x.shape[0], x.shape[1]
    if C % G:
        raise ValueError(f"C={C} is not divisible by G={G}")
    xg = x.double().reshape(N, G, C // G, -1)
    mu = xg.mean(dim=(2, 3)).unsqueeze(-1).unsqueeze(-1)
    inv_std = (((xg - mu) ** 2).mean(dim=(2, 3)) + eps).rsqrt().unsqueeze(-1).unsqueeze(-1)
    x_hat = ((xg - mu) * inv_std).reshape(x.shape)
    y = torch.einsum("nc...,c->nc...", x_hat, gamma.double()) + torch.einsum("nc...,c->nc...", torch.ones_like(x_hat), beta)
    return y.to(x.dtype), (x_hat, inv_std, gamma, G)

def group_norm_backward(dy, cache):
    x_hat, inv_std, gamma, G = cache
    N, C = dy.shape[0], dy.shape[1]
    g = torch.einsum("nc...,c->nc...", dy, gamma).reshape(N, G, C // G, -1)
    xh = x_hat.reshape(N, G, C // G, -1)
    m = xh[0, 0].numel()
    dx = inv_std / m * (m * g - g.sum(dim=(2, 3), keepdim=True) - xh * (g * xh).sum(dim=(2, 3), keepdim=True))
    other = [0] + list(range(2, dy.dim()))
    return dx.reshape(dy.shape), (dy * x_hat).sum(dim=other), dy.sum(dim=other)
'''
# helpers in a cell of their own, then a scratch cell whose top-level names (x, y, mu, ...) are the
# answers' local names, bound to PyTorch's own norms; a numerical gradient without a loop
HELPERS = r'''
def _stats(t, dims):
    mu = t.mean(dim=dims, keepdim=True)
    return mu, 1.0 / torch.sqrt(((t - mu) ** 2).mean(dim=dims, keepdim=True) + 1e-5)
'''
SCRATCH = r'''
x = torch.randn(4, 6, 3, 3)
y = F.group_norm(x, 3)
mu = F.layer_norm(x, x.shape[1:])
var = torch.nn.LayerNorm(x.shape[1:])(x)
print("my forward agrees with PyTorch:", float((group_norm_forward(x, torch.ones(6), torch.zeros(6), 3)[0] - y).abs().max()))
'''
HELPER_ANSWERS = r'''
def layer_norm_forward(x, gamma, beta, eps=1e-5):
    dims = tuple(range(1, x.dim()))
    mu, inv_std = _stats(x, dims)
    x_hat = (x - mu) * inv_std
    y = gamma * x_hat + beta
    return y, (x_hat, inv_std, gamma, dims)

def numerical_gradient(f, x, h=1e-5):
    basis = torch.eye(x.numel(), dtype=x.dtype).reshape(x.numel(), *x.shape) * h
    plus = torch.tensor([float(f(x + e)) for e in basis], dtype=torch.float64)
    minus = torch.tensor([float(f(x - e)) for e in basis], dtype=torch.float64)
    return ((plus - minus) / (2 * h)).to(x.dtype).reshape(x.shape)
'''

# ------------------------------------------------------------------ hostile

DIRECT = r'''
def layer_norm_forward(x, gamma, beta, eps=1e-5):
    y = F.layer_norm(x, x.shape[1:], gamma, beta, eps)
    dims = tuple(range(1, x.dim()))
    mu, var = x.mean(dim=dims, keepdim=True), x.var(dim=dims, keepdim=True, correction=0)
    return y, ((x - mu) / torch.sqrt(var + eps), 1.0 / torch.sqrt(var + eps), gamma, dims)

def group_norm_forward(x, gamma, beta, G, eps=1e-5):
    m = torch.nn.GroupNorm(G, x.shape[1], eps=eps).double()
    with torch.no_grad():
        m.weight.copy_(gamma)
        m.bias.copy_(beta)
        y = m(x)
    xg = x.reshape(x.shape[0], G, -1)
    inv_std = 1.0 / torch.sqrt(xg.var(dim=2, keepdim=True, correction=0) + eps)
    return y, (((xg - xg.mean(dim=2, keepdim=True)) * inv_std).reshape(x.shape), inv_std, gamma, G)
'''
# names built at run time: the source scan is blind; only the strict re-run can tell
_HIDDEN_FWD = r'''
def _ln_cache(x, gamma, eps):
    dims = tuple(range(1, x.dim()))
    mu, var = x.mean(dim=dims, keepdim=True), x.var(dim=dims, keepdim=True, correction=0)
    return ((x - mu) / torch.sqrt(var + eps), 1.0 / torch.sqrt(var + eps), gamma, dims)

def _gn_cache(x, gamma, G, eps):
    if x.shape[1] % G:
        raise ValueError(f"C={x.shape[1]} is not divisible by G={G}")
    xg = x.reshape(x.shape[0], G, -1)
    inv_std = 1.0 / torch.sqrt(xg.var(dim=2, keepdim=True, correction=0) + eps)
    return (((xg - xg.mean(dim=2, keepdim=True)) * inv_std).reshape(x.shape), inv_std, gamma, G)
'''
ALIASES = _HIDDEN_FWD + r'''
import importlib
_ln = getattr(F, "layer" + "_norm")
_fn = importlib.import_module("torch.nn." + "functional")

def layer_norm_forward(x, gamma, beta, eps=1e-5):
    return _ln(x, x.shape[1:], gamma, beta, eps), _ln_cache(x, gamma, eps)

def group_norm_forward(x, gamma, beta, G, eps=1e-5):
    cache = _gn_cache(x, gamma, G, eps)
    return getattr(_fn, "group" + "_norm")(x, G, gamma, beta, eps), cache
'''
ATEN = _HIDDEN_FWD + r'''
_bn = getattr(torch, "batch" + "_norm")
_gn = getattr(getattr(torch.ops.aten, "native_" + "group" + "_norm"), "default")

def layer_norm_forward(x, gamma, beta, eps=1e-5):  # batch norm of x.T normalises each example
    flat = x.reshape(x.shape[0], -1).t()
    x_hat = _bn(flat, None, None, None, None, True, 0.0, eps, False).t().reshape(x.shape)
    return gamma * x_hat + beta, _ln_cache(x, gamma, eps)

def group_norm_forward(x, gamma, beta, G, eps=1e-5):
    N, C = x.shape[:2]
    cache = _gn_cache(x, gamma, G, eps)
    return _gn(x, gamma, beta, N, C, x[0, 0].numel(), G, eps)[0], cache
'''
AUTOGRAD = r'''
_ag = getattr(torch, "auto" + "grad")

def bn_backward_graph(dy, cache):
    x = cache["x"].detach().clone().requires_grad_()
    gamma = cache["gamma"].detach().clone().requires_grad_()
    beta = torch.zeros_like(gamma, requires_grad=True)
    with torch.enable_grad():
        y, nodes = bn_forward_reference(x, gamma, beta, cache["eps"])
        keys = ["x_hat", "std", "var", "mu"]
        grads = _ag.grad(y, [x, gamma, beta] + [nodes[k] for k in keys], dy)
    return grads[0], grads[1], grads[2], dict(zip(keys, grads[3:]))

def bn_backward_simplified(dy, x_hat, inv_std, gamma):
    x = (x_hat / inv_std).detach().requires_grad_()  # an input with this x_hat and inv_std
    eps = 1.0 / inv_std ** 2 - x.detach().var(0, correction=0)  # the eps its forward used
    g, b = gamma.detach().clone().requires_grad_(), torch.zeros_like(gamma, requires_grad=True)
    with torch.enable_grad():
        y, _ = bn_forward_reference(x, g, b, eps)
        return tuple(_ag.grad(y, [x, g, b], dy))

def layer_norm_forward(x, gamma, beta, eps=1e-5):
    dims = tuple(range(1, x.dim()))
    x_hat = (x - x.mean(dim=dims, keepdim=True)) / torch.sqrt(x.var(dim=dims, keepdim=True, correction=0) + eps)
    return gamma * x_hat + beta, (x, gamma, beta, eps)

def layer_norm_backward(dy, cache):
    x, gamma, beta = (t.detach().clone().requires_grad_() for t in cache[:3])
    with torch.enable_grad():
        y, _ = layer_norm_forward(x, gamma, beta, cache[3])
        return tuple(_ag.grad(y, (x, gamma, beta), dy))

def group_norm_forward(x, gamma, beta, G, eps=1e-5):
    N, C = x.shape[:2]
    if C % G:
        raise ValueError(f"C={C} is not divisible by G={G}")
    xg = x.reshape(N, G, -1)
    x_hat = ((xg - xg.mean(2, keepdim=True)) / torch.sqrt(xg.var(2, keepdim=True, correction=0) + eps)).reshape(x.shape)
    shape = [1, C] + [1] * (x.dim() - 2)
    return gamma.reshape(shape) * x_hat + beta.reshape(shape), (x, gamma, beta, G, eps)

def group_norm_backward(dy, cache):
    x, gamma, beta = (t.detach().clone().requires_grad_() for t in cache[:3])
    with torch.enable_grad():
        y, _ = group_norm_forward(x, gamma, beta, cache[3], cache[4])
        return tuple(_ag.grad(y, (x, gamma, beta), dy))
'''
# assignment 1's tripwire-report cleaner (EVADE_MAIN: it also defines a batch_norm_forward, unused
# here), then GroupNorm by a built name: the tripwires report nothing, the strict re-run catches it
TAMPER = EVADE_MAIN + _HIDDEN_FWD + r'''
def group_norm_forward(x, gamma, beta, G, eps=1e-5):
    cache = _gn_cache(x, gamma, G, eps)
    return getattr(F, "group" + "_norm")(x, G, gamma, beta, eps), cache
'''
# the probes' inputs found up the frames while the cells run, LayerNorm computed for them there and
# handed back by the probes: only refusing the kernel during the cells too (not just during q4's
# probes) withholds it (shown by grading it with layer_norm in assignments.NEEDS: q4 kept its 6)
PRECOMPUTE = _HIDDEN_FWD + r"""
import sys
_ln, _pre = getattr(F, "layer" + "_norm"), {}
def _request():
    f = sys._getframe()
    while f is not None and not isinstance(f.f_locals.get("request"), dict):
        f = f.f_back
    return f.f_locals["request"] if f is not None else {"probes": []}
for _pp in _request()["probes"]:  # names of its own: the notebook's check cells bind _x, _g, ...
    for _pc in _pp.get("calls", []):
        if _pc.get("fn") == "layer_norm_forward" and all(isinstance(a, torch.Tensor) for a in _pc["args"][:3]):
            _px, _pg, _pb = _pc["args"][:3]
            try:
                _pre[_px.detach().numpy().tobytes()] = _ln(_px, _px.shape[1:], _pg, _pb, 1e-5)
            except Exception:
                pass

def layer_norm_forward(x, gamma, beta, eps=1e-5):
    y = _pre.get(x.detach().numpy().tobytes())  # detach: q7 and q8 train through it
    return (_ln(x, x.shape[1:], gamma, beta, eps) if y is None else y), _ln_cache(x, gamma, eps)
"""
GN_CELL = "def group_norm_forward"
SUBMISSIONS = {  # name -> (cell to insert after, source)
    "honest_broadcast": (GN_CELL, BROADCAST),
    "direct": (GN_CELL, DIRECT), "aliases": (GN_CELL, ALIASES), "aten": (GN_CELL, ATEN),
    "autograd": (GN_CELL, AUTOGRAD), "tamper_tripwires": (GN_CELL, TAMPER), "precompute": (GN_CELL, PRECOMPUTE),
    "report_big_string": ("import time", REPORT_BIG_STRING),
}


def _ran(nb: dict, sid: str, salt: str, printed_sid: str | None = None) -> dict:
    """``nb`` as a student hands it in after running it (``test_assignment_norms.ran``), with
    ``printed_sid``'s seeds in this class (default: ``sid``'s own; another id: a classmate's outputs)."""
    from bnviz.grading import student_seeds
    from test_assignment_norms import ran

    printed = printed_sid if printed_sid is not None else sid
    return ran(nb, sid, printed, student_seeds.seeds_for(salt, printed))


@pytest.fixture(scope="module")
def norms_dist(tmp_path_factory):
    """assignment 2 built once (otter assign checks the answer key passes every test)."""
    from bnviz.grading import build

    out = tmp_path_factory.mktemp("norms-dist")
    manifest = build.build_assignment(out, REPO / "notebooks" / "assignments" / "norms" / "norms.ipynb")
    return out, manifest


@pytest.fixture(scope="module")
def graded(norms_dist, bwrap, tmp_path_factory):
    """Every submission graded in ONE run of the command line's ``grade`` (assignment.json names
    the assignment; nothing else tells it): {student: its JSON}."""
    from bnviz.grading import cli

    dist, manifest = norms_dist
    salt = manifest["seed_salt"]
    solution = _ran(json.loads((dist / "autograder" / "norms.ipynb").read_text()), "sol-1", salt)
    subs, out = tmp_path_factory.mktemp("subs-norms"), tmp_path_factory.mktemp("grades-norms")
    _write(subs / "solution.ipynb", solution)
    for name, (after, source) in SUBMISSIONS.items():
        _write(subs / f"{name}.ipynb", _insert_after(solution, after, source))
    helpers = _insert_after(solution, "def bn_backward_graph", HELPERS)
    _write(subs / "honest_helpers.ipynb", _insert_after(_insert_after(helpers, GN_CELL, HELPER_ANSWERS), GN_CELL, SCRATCH))
    _write(subs / "copied_outputs.ipynb", _ran(solution, "carol", salt, printed_sid="dave"))  # dave's run, carol's id
    bn_key = REPO / "notebooks" / "assignments" / "batch_norm" / "batch_norm.ipynb"
    (subs / "wrong_assignment.ipynb").write_bytes(bn_key.read_bytes())
    rc = cli.main(["grade", str(subs), "--dist", str(dist), "--out", str(out), "--timeout", "240", "--jobs", "2"])
    assert rc == 0
    return {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}, manifest


def _full(manifest) -> dict[str, float]:
    return {q: float(c["points"]) for q, c in manifest["questions"].items() if not c["manual"]}


def _own_flags(r: dict) -> str:
    """The flags of the rules and tripwires (similarity's, about copies of one notebook, left out)."""
    return "; ".join(f for f in r["flags"].split("; ") if f and not f.startswith("similar to"))


def _withheld(r: dict, q: str, points: float) -> bool:
    """q scored nothing and the flags say why: the strict re-run withheld it, or the run-time
    tripwire did and the strict re-run confirmed it."""
    flags = r["flags"]
    return r["scores"][q] == 0 and (f"{q}: {points:g} points withheld, its answer works only while" in flags or (
        f"{q}: {points:g} points withheld, forbidden" in flags and f"{q}: confirmed by the strict re-run" in flags))


def test_the_answer_key_gets_full_autograded_marks(graded):
    res, manifest = graded
    r = res["solution"]
    assert manifest["assignment"] == "norms" and manifest["forbidden"]["q4"] == ["autograd", "batch_norm", "group_norm",
                                                                                 "layer_norm"]
    assert r["scores"] == _full(manifest) and r["total"] == manifest["autograded_points"] > 0, (r["scores"], r["error"], r["flags"])
    assert r["error"] == "" and _own_flags(r) == "", (r["error"], r["flags"])


@pytest.mark.parametrize("name", ["honest_broadcast", "honest_helpers"])
def test_honest_but_unusual_answers_keep_full_marks(graded, name):
    res, manifest = graded
    r = res[name]
    assert r["scores"] == _full(manifest), (name, r["scores"], r["failed_tests"], r["flags"])
    assert r["error"] == "" and _own_flags(r) == "", (r["error"], r["flags"])


def test_outputs_run_with_a_classmates_seeds_are_flagged_and_cost_nothing(graded):
    """Issue 26: the grader reads the printed seeds (never run, never scored) against the
    submission's own STUDENT_ID with the class's salt; honest runs (every other submission here)
    get no such flag."""
    from bnviz.grading import student_seeds

    res, manifest = graded
    r = res["copied_outputs"]
    carol, dave = (student_seeds.seeds_for(manifest["seed_salt"], s) for s in ("carol", "dave"))
    assert r["scores"] == _full(manifest) and r["error"] == "", (r["scores"], r["error"])
    assert r["flags"].count(f"seeds {dave} for student 'dave', but STUDENT_ID 'carol' gives {carol}") == 3, r["flags"]
    others = {name: other["flags"] for name, other in res.items() if name not in ("copied_outputs", "wrong_assignment")}
    assert not any("seed check" in f for f in others.values()), others
    assert "seed check: STUDENT_ID is empty or missing" in res["wrong_assignment"]["flags"]  # assignment 1's notebook


def test_forbidden_calls_in_plain_sight_are_withheld_by_the_scan(graded):
    res, manifest = graded
    r, full = res["direct"], _full(manifest)
    assert r["scores"]["q4"] == 0 and r["scores"]["q5"] == 0, (r["scores"], r["flags"])
    assert (f"q4: {full['q4']:g} points withheld, forbidden F.layer_norm / torch.layer_norm / nn.LayerNorm "
            "in the source") in r["flags"], r["flags"]
    assert (f"q5: {full['q5']:g} points withheld, forbidden F.group_norm / F.instance_norm / nn.GroupNorm / "
            "nn.InstanceNorm* in the source") in r["flags"], r["flags"]
    assert all(r["scores"][q] == full[q] for q in full if q not in ("q4", "q5")), r["scores"]


@pytest.mark.parametrize("name", ["aliases", "aten", "tamper_tripwires", "precompute"])
def test_aliased_kernels_are_withheld_by_the_strict_rerun(graded, name):
    res, manifest = graded
    r, full = res[name], _full(manifest)
    questions = {"tamper_tripwires": ["q5"], "precompute": ["q4"]}.get(name, ["q4", "q5"])
    for q in questions:
        assert _withheld(r, q, full[q]), (name, q, r["scores"], r["flags"])
    assert "in the source" not in r["flags"], r["flags"]  # the names were built at run time
    kept = [q for q in full if q not in questions]  # q9 still has nn.BatchNorm's kernels
    assert all(r["scores"][q] == full[q] for q in kept), r["scores"]
    if name == "aliases":
        assert "importlib" in r["flags"], r["flags"]  # and the scan asks for a look by hand
    if name in ("tamper_tripwires", "precompute"):
        assert "frame access" in r["flags"] and "called at run time" not in r["flags"], r["flags"]


def test_autograd_in_the_hand_written_backwards_is_withheld(graded):
    res, manifest = graded
    r, full = res["autograd"], _full(manifest)
    for q in ("q1", "q2", "q4", "q5"):
        assert _withheld(r, q, full[q]), (q, r["scores"], r["flags"])
    assert "in the source" not in r["flags"] and "autograd" in r["flags"], r["flags"]
    assert all(r["scores"][q] == full[q] for q in ("q3", "q6", "q9")), r["scores"]


def test_a_forged_report_and_the_wrong_notebook_score_nothing(graded):
    res = graded[0]
    big = res["report_big_string"]
    assert big["total"] == 0 and "report was rejected" in big["error"], big["error"]
    wrong = res["wrong_assignment"]  # assignment 1's answer key handed in for assignment 2
    assert wrong["total"] == 0 and "bn_backward_graph is not defined" in json.dumps(wrong["failed_tests"])


# ------------------------------------------------------------------ Gradescope: the same checker in the zip


def test_gradescope_zip_grades_the_answer_key_with_the_norms_checker(norms_dist, bwrap, tmp_path):
    """``make gradescope ASSIGNMENT=norms``: the zip ships the name and checker_norms; its
    run_autograder gives the answer key every test of checker_norms, in Gradescope's format."""
    from bnviz.grading import checker_norms, cli
    from test_grading_gradescope import Autograder, check_results

    dist, manifest = norms_dist
    zip_path = tmp_path / "autograder.zip"
    assert cli.main(["gradescope", "--dist", str(dist), "--out", str(zip_path)]) == 0
    ag = Autograder(zip_path, json.loads((dist / "autograder" / "norms.ipynb").read_text()))
    try:
        assert json.loads((ag.root / "source" / "dist" / "assignment.json").read_text())["assignment"] == "norms"
        data, _ = ag.run()
    finally:
        ag.close()
    assert check_results(data) == [], check_results(data)
    names = [t.name for t in checker_norms.make_tests(0)]
    assert [t["name"].replace(" (hidden)", "") for t in data["tests"]] == names
    assert data["score"] == manifest["autograded_points"] and all(t["status"] == "passed" for t in data["tests"])


# ------------------------------------------------------------------ the wiring, without a sandbox


def test_the_assignment_is_picked_by_name_and_an_unknown_one_is_refused(tmp_path):
    from bnviz.grading import assignments, checker, checker_norms, cli, grade

    assert assignments.checker_of(assignments.name_of({})) is checker  # built before assignment 2
    assert assignments.checker_of(assignments.name_of({"assignment": "norms"})) is checker_norms
    with pytest.raises(ValueError, match=r"unknown assignment 'layer_norms': grading knows batch_norm, norms"):
        assignments.name_of({"assignment": "layer_norms"})
    (tmp_path / "subs").mkdir()
    with pytest.raises(ValueError, match="grading knows batch_norm, norms"):
        grade.grade_folder(tmp_path / "subs", tmp_path / "grades", assignment="layer_norms")
    assert not (tmp_path / "grades").exists()  # refused before anything was written
    dist = tmp_path / "dist"
    dist.mkdir()
    (dist / "assignment.json").write_text(json.dumps({"assignment": "layer_norms", "student_notebook": "s.ipynb"}))
    with pytest.raises(SystemExit):
        cli.main(["grade", str(tmp_path / "subs"), "--dist", str(dist), "--out", str(tmp_path / "grades")])
    assert not (tmp_path / "grades").exists()


def test_a_variant_of_an_assignment_without_variants_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    """The one place the refusal lives (assignments.VARIANTS): an assignment taken out of it gets a
    clear error and no dist folder (norms has variants now: variants_norms.py)."""
    from bnviz.grading import assignments, build

    monkeypatch.setattr(assignments, "VARIANTS", {"batch_norm"})
    with pytest.raises(ValueError, match="assignment 'norms' has no class variants yet"):
        build.build_assignment(tmp_path / "dist", REPO / "notebooks" / "assignments" / "norms" / "norms.ipynb",
                               variant="our class secret")
    assert not (tmp_path / "dist").exists()


def test_the_strict_plan_keeps_batch_norm_for_q9_only():
    """Assignment 1: batch norm refused for the whole strict pass (as before). Assignment 2: layer
    and group norm too (cells included: none can compute a q4 / q5 answer ahead of its probes);
    batch norm, which q9 needs, only from the first probe of q1, q2, q4, q5 on (they forbid autograd
    too, so those probes run last); a needed kernel forbidden where autograd is allowed is an error."""
    from bnviz.grading import assignments

    plan = {n: assignments.strict_plan(assignments.rules_of(n), assignments.NEEDS[n]) for n in ("batch_norm", "norms")}
    assert plan["batch_norm"] == {"batch_norm": True, "kernels": ["batch_norm"], "late_kernels": [],
                                  "autograd_phases": ["q2"]}
    assert plan["norms"] == {"batch_norm": False, "kernels": ["group_norm", "layer_norm"], "late_kernels": ["batch_norm"],
                             "autograd_phases": ["q1", "q2", "q4", "q5"]}
    with pytest.raises(ValueError, match="forbidden in q3, which allow autograd"):
        assignments.strict_plan({"q1": {"autograd", "batch_norm"}, "q3": {"batch_norm"}}, {"batch_norm"})
    assert assignments.strict_plan({}) is None


def test_the_scan_follows_answers_not_an_answers_own_local_names():
    """A scratch cell binding ``y = F.group_norm(...)`` is not the ``y`` inside group_norm_forward
    (the answer key's own local name: it was flagged before ``_local_names``); an alias reached
    through ``global`` or a nested function still is."""
    from bnviz.grading import checker_norms, rules

    scratch = (0, "import torch.nn.functional as F\nx = torch.randn(2, 4, 3, 3)\ny = F.group_norm(x, 2)\n")
    answer = (1, "def group_norm_forward(x, gamma, beta, G, eps=1e-5):\n    y = x * gamma\n    return y, None\n")
    assert rules.scan([scratch, answer], checker_norms.ANSWERS) == {}
    sneaky = (1, "def group_norm_forward(x, gamma, beta, G, eps=1e-5):\n    def inner():\n        y = 1\n"
                 "    return y(x, G), None\n")
    assert rules.scan([scratch, sneaky], checker_norms.ANSWERS) == {"q5": {"group_norm": "cell 0 line 3"}}
    default = (1, "def group_norm_forward(x, gamma, beta, G, eps=1e-5, y=y):\n    return y(x, G), None\n")
    assert rules.scan([scratch, default], checker_norms.ANSWERS) == {"q5": {"group_norm": "cell 0 line 3"}}
    aliased = (1, "from torch.nn.functional import layer_norm as _ln\n"
                  "def layer_norm_forward(x, gamma, beta, eps=1e-5):\n    return _ln(x, x.shape[1:]), None\n")
    assert rules.scan([aliased], checker_norms.ANSWERS) == {"q4": {"layer_norm": "cell 1 line 1"}}
    assert rules.scan([aliased]) == {}  # assignment 1's answer names: not an answer there


def test_a_comprehension_variable_is_not_a_top_level_name():
    """``[nodes[k] for k in keys]`` inside an answer does not reach an experiment cell's top-level
    ``k`` (whose loop trains with autograd: q1 was flagged through it once q7/q8 existed); a name
    loaded outside the comprehension too, or in its first iterable, still reaches the top level."""
    from bnviz.grading import checker_norms, rules

    loop = (0, "for k in range(3):\n    loss = model(x).sum()\n    loss.backward()\n")
    answer = (1, "def bn_backward_graph(dy, cache):\n    keys = ['mu']\n"
                 "    return dy, dy, dy, {k: cache[k] for k in keys}\n")
    assert rules.scan([loop, answer], checker_norms.ANSWERS) == {}
    outside = (1, "def bn_backward_graph(dy, cache):\n    ks = [k for k in cache]\n    return k, dy, dy, {}\n")
    iterable = (1, "def bn_backward_graph(dy, cache):\n    return [k for k in k], dy, dy, {}\n")
    for leaky in (outside, iterable):
        assert rules.scan([loop, leaky], checker_norms.ANSWERS) == {"q1": {"autograd": "cell 0 line 3"}}
    # the same at the top level: a statement an answer reaches, with a comprehension of its own
    table = (1, "_pre = {}\nfor c in calls:\n    _pre[c] = [v for v in c if all(isinstance(k, int) for k in v)]\n"
                "def layer_norm_forward(x, gamma, beta, eps=1e-5):\n    return _pre.get(x), None\n")
    assert rules.scan([loop, table], checker_norms.ANSWERS) == {}
    leaky_table = (1, table[1].replace("all(isinstance(k, int) for k in v)", "k"))
    assert rules.scan([loop, leaky_table], checker_norms.ANSWERS) == {"q4": {"autograd": "cell 0 line 3"}}
