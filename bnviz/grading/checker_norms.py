"""The trusted checker of assignment 2, "Normalization in depth" (``notebooks/assignments/norms``).

Same shape as ``checker.py``: nothing here runs student code; ``make_tests(seed)`` draws fresh
float64 inputs and returns ``TestCase``s whose probes the sandboxed worker runs (all of the generic
kind ``call``: ``worker.probe_call``) and whose judges compare the outputs with references computed
here with PyTorch itself: autograd on float64 graphs, ``F.layer_norm``, ``F.group_norm``,
``F.instance_norm``, central differences and closed-form gradients, and ``nn.BatchNorm`` with
``momentum=None`` for the recomputed statistics. Questions 7 and 8 (the experiments, never re-run
here: tiny probes only) live in ``checker_norms_experiments.py``.

Conventions the notebook states: a batch-norm cache is the dict of graph nodes the provided
``bn_forward_reference`` returns; LayerNorm normalises each example over every axis but 0 with
``gamma``/``beta`` of shape ``x.shape[1:]`` (``F.layer_norm(x, x.shape[1:])``); GroupNorm splits the
C channels into G groups of consecutive channels, ``gamma``/``beta`` of shape ``(C,)``.

A class variant (``variants_norms.NormsVariant``, ``make_tests(seed, variant)``) changes questions 4
and 5 only: their probes carry 4-D tensors in the variant's layout and their references are
``variants_norms.layer_norm_reference`` / ``group_norm_reference`` (explicit float64 formulas;
autograd through them for the backward passes) instead of ``F.layer_norm`` / ``F.group_norm``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from . import checker_norms_experiments as experiments
from .call_probes import _call, _calls, _fn, _out
from .checker import Fail, TestCase, _is_tensor, _probe_result, judge_all, question_points  # noqa: F401
from . import variants_norms
from .variants import Variant
from .variants_norms import NormsVariant, variant_of  # noqa: F401 (grade.py reads a built notebook's variant)

RTOL, ATOL = 1e-8, 1e-10  # forward outputs (float64)
REL_ERR = 1e-8  # hand-written backward passes: ||a - b|| / ||b||
GRAD_TOL = 1e-7  # numerical_gradient (h = 1e-5, float64) against the closed-form gradient
EPS = 1e-5
NORMS = ("batch", "layer", "group", "instance")
# question -> forbidden features (rules.py's names); the strict re-run blocks autograd and these kernels
# during these questions' probes only (q9 needs nn.BatchNorm). Batch norm computes LayerNorm on x.T and
# instance norm; LayerNorm and GroupNorm compute each other by reshaping: q4 and q5 forbid all three.
_NORM_KERNELS = {"autograd", "batch_norm", "layer_norm", "group_norm"}
RULES = {"q1": {"autograd", "batch_norm"}, "q2": {"autograd", "batch_norm"}, "q4": _NORM_KERNELS, "q5": _NORM_KERNELS}
# answer name -> question, for the source scan (the counterpart of rules.ANSWERS)
ANSWERS = {"bn_backward_graph": "q1", "bn_backward_simplified": "q2", "numerical_gradient": "q3", "rel_error": "q3",
           "layer_norm_forward": "q4", "layer_norm_backward": "q4", "group_norm_forward": "q5",
           "group_norm_backward": "q5", "concepts": "q6", "build_init_model": "q7", "run_init_experiment": "q7",
           "plan_runs": "q8", "train_run": "q8", "recompute_bn_stats": "q9"}
MANUAL = {"q2w": 3, "q3w": 1, "q6w": 2, "q7w": 7, "q8w": 7, "q9w": 2}  # graded by hand (rubrics in the notebook)


def _f64(*shape, g):
    return torch.randn(*shape, dtype=torch.float64, generator=g)


def _pos(*shape, g):
    return torch.rand(*shape, dtype=torch.float64, generator=g) + 0.5


def _rel(a, b, name) -> float:
    a = _is_tensor(a, b.shape, name)
    if not a.dtype.is_floating_point:
        return float("inf")
    return float((a.to(b.dtype) - b).norm() / b.norm().clamp_min(1e-300))


def _check_rel(mine, refs: dict, what: str, tol=REL_ERR) -> None:
    errors = {k: _rel(mine.get(k) if isinstance(mine, dict) else None, v, k) for k, v in refs.items()}
    if not all(e < tol for e in errors.values()):  # NaN fails too
        raise Fail(f"{what}: relative errors vs autograd " + ", ".join(f"{k}={v:.1e}" for k, v in errors.items()))


def _close(a, b, what, rtol=RTOL, atol=ATOL) -> None:
    a = _is_tensor(a, b.shape, what)
    if not a.dtype.is_floating_point or not torch.allclose(a.to(b.dtype), b, rtol=rtol, atol=atol):
        raise Fail(f"{what} differs from the reference")


def _case(number, points, hidden, build, judge_with):
    return number, points, hidden, build, judge_with


# --------------------------------------------------------------------------- q1, q2: BN backward


def bn_graph_reference(x, gamma, beta, dy, eps=EPS):
    """(cache, grads): the provided forward's graph in float64 and autograd's gradients of
    L = sum(dy * y) w.r.t. x, gamma, beta and the nodes mu, var, std, x_hat."""
    x, gamma, beta = (t.clone().requires_grad_() for t in (x, gamma, beta))
    mu = x.mean(dim=0)
    xc = x - mu
    var = (xc ** 2).mean(dim=0)
    std = torch.sqrt(var + eps)
    x_hat = xc / std
    for t in (mu, var, std, x_hat):
        t.retain_grad()
    (gamma * x_hat + beta).backward(dy)
    cache = {"x": x, "mu": mu, "xc": xc, "var": var, "std": std, "x_hat": x_hat, "gamma": gamma, "eps": eps}
    cache = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in cache.items()}
    grads = {"dx": x.grad, "dgamma": gamma.grad, "dbeta": beta.grad,
             "x_hat": x_hat.grad, "std": std.grad, "var": var.grad, "mu": mu.grad}
    return cache, grads


def _bn_inputs(shape, g, scale, negative_gamma):
    x = 1.0 + scale * _f64(*shape, g=g)
    gamma = _pos(shape[1], g=g) * (-1 if negative_gamma else 1)
    return x, gamma, _f64(shape[1], g=g), _f64(*shape, g=g)


def _q1_case(number, points, hidden, shapes, check, scale=2.0, negative_gamma=False):
    """check: "outputs" (dx, dgamma, dbeta) or "nodes" (the gradients w.r.t. the graph's nodes)."""
    def build(g):
        probes, refs = [], {}
        for i, shape in enumerate(shapes):
            x, gamma, beta, dy = _bn_inputs(shape, g, scale, negative_gamma)
            cache, grads = bn_graph_reference(x, gamma, beta, dy)
            pid = f"q1-{number}-{i}"
            probes.append(_call(pid, "q1", _fn("bn_backward_graph", dy, cache)))
            refs[pid] = (shape, grads)
        return probes, refs

    def judge_with(refs):
        def judge(outputs):
            for pid, (shape, grads) in refs.items():
                out = _out(outputs, pid, n=4, what="bn_backward_graph")
                if check == "outputs":
                    _check_rel(dict(zip(["dx", "dgamma", "dbeta"], out)), {k: grads[k] for k in ("dx", "dgamma", "dbeta")},
                               f"dx, dgamma, dbeta for {shape}")
                else:
                    if not isinstance(out[3], dict):
                        raise Fail("the 4th value must be a dict of the intermediate gradients (keys x_hat, std, var, mu)")
                    _check_rel(out[3], {k: grads[k] for k in ("x_hat", "std", "var", "mu")},
                               f"intermediate gradients for {shape}")
        return judge

    return _case(number, points, hidden, build, judge_with)


def _q2_case(number, points, hidden, shapes, scale=2.0, negative_gamma=False, check_args=False):
    def build(g):
        probes, refs = [], {}
        for i, shape in enumerate(shapes):
            x, gamma, beta, dy = _bn_inputs(shape, g, scale, negative_gamma)
            cache, grads = bn_graph_reference(x, gamma, beta, dy)
            args = [dy, cache["x_hat"], 1.0 / cache["std"], gamma]
            pid = f"q2-{number}-{i}"
            probes.append(_call(pid, "q2", _fn("bn_backward_simplified", *args, return_args=check_args)))
            refs[pid] = (shape, grads, args)
        return probes, refs

    def judge_with(refs):
        def judge(outputs):
            for pid, (shape, grads, args) in refs.items():
                out = _out(outputs, pid, n=3, what="bn_backward_simplified")
                _check_rel(dict(zip(["dx", "dgamma", "dbeta"], out)), {k: grads[k] for k in ("dx", "dgamma", "dbeta")},
                           f"bn_backward_simplified for {shape}")
                if check_args:
                    after = _calls(outputs, pid)[0].get("args")
                    if not isinstance(after, list) or len(after) != 4 or not all(
                            isinstance(a, torch.Tensor) and torch.equal(a, b) for a, b in zip(after, args)):
                        raise Fail("bn_backward_simplified changed its inputs (dy, x_hat, inv_std or gamma) in place")
        return judge

    return _case(number, points, hidden, build, judge_with)


def _q1_cases():
    return [_q1_case(1, 1, False, [(4, 3)], "outputs"),
            _q1_case(2, 1, False, [(4, 3)], "nodes"),
            _q1_case(3, 2, True, [(16, 5), (2, 7), (64, 3)], "nodes", scale=10.0, negative_gamma=True),
            _q1_case(4, 2, True, [(16, 5), (2, 7), (64, 3)], "outputs", scale=10.0, negative_gamma=True)]


def _q2_cases():
    return [_q2_case(1, 1, False, [(8, 4)]),
            _q2_case(2, 2, True, [(2, 3), (32, 6), (5, 1)], scale=10.0, negative_gamma=True),
            _q2_case(3, 1, True, [(256, 3)], check_args=True)]


# --------------------------------------------------------------------------- q3: gradient check


def scalar_fn(c, a, b, d):
    """The worker's ``{"__fn__": [c, a, b, d]}``: x -> c + sum(a x + b x^2 + d sin x), and its gradient."""
    def f(x):
        return c + (a.to(x.dtype) * x + b.to(x.dtype) * x ** 2 + d.to(x.dtype) * torch.sin(x)).sum()

    def grad(x):
        return a + 2 * b * x + d * torch.cos(x)
    return f, grad


def central_differences(f, x, h):
    """The float64 reference: (f(x + h e_i) - f(x - h e_i)) / 2h for every element i."""
    x = x.clone()
    grad, flat = torch.zeros_like(x), x.view(-1)
    for i in range(flat.numel()):
        old = flat[i].item()
        flat[i] = old + h
        fp = float(f(x))
        flat[i] = old - h
        fm = float(f(x))
        flat[i] = old
        grad.view(-1)[i] = (fp - fm) / (2 * h)
    return grad


def rel_error_reference(a, b) -> float:
    return float(((a - b).abs() / (a.abs() + b.abs()).clamp_min(1e-8)).max())


def _q3_rel_error(number, points, hidden):
    def build(g):
        probes, refs = [], {}
        for i, n in enumerate((5, 7)):
            a = _f64(n, g=g)
            b = a + 1e-6 * _f64(n, g=g)
            a[1], b[1] = 1e-3, 2e-3  # the largest elementwise error sits on a small entry
            a[2] = b[2] = 0.0  # equal zeros: 0, not NaN
            probes.append(_call(f"q3-{number}-{i}", "q3", _fn("rel_error", a, b)))
            refs[f"q3-{number}-{i}"] = rel_error_reference(a, b)
        return probes, refs

    def judge_with(refs):
        def judge(outputs):
            for pid, ref in refs.items():
                out = _out(outputs, pid, what="rel_error")
                value = float(out) if isinstance(out, (int, float)) or (isinstance(out, torch.Tensor) and out.numel() == 1) else None
                if value is None or not abs(value - ref) <= 1e-9 * ref + 1e-15:
                    raise Fail(f"rel_error returned {out if value is None else f'{value:.3e}'}, expected {ref:.3e} "
                               "(max over elements of |a - b| / max(1e-8, |a| + |b|))")
        return judge

    return _case(number, points, hidden, build, judge_with)


def _q3_grad_case(number, points, hidden, setups):
    """setups: [(shape, dtype, c, b_scale, h or None, against: "analytic" | "central")]."""
    def build(g):
        probes, refs = [], {}
        for i, (shape, dtype, c, b_scale, h, against) in enumerate(setups):
            a, b, d = _f64(*shape, g=g), b_scale * _f64(*shape, g=g), 5.0 * _f64(*shape, g=g)
            x = _f64(*shape, g=g)
            f, grad = scalar_fn(c, a, b, d)
            ref = grad(x) if against == "analytic" else central_differences(f, x, h)
            kwargs = {} if h is None else {"h": h}
            pid = f"q3-{number}-{i}"
            probes.append(_call(pid, "q3", _fn("numerical_gradient", {"__fn__": [c, a, b, d]}, x.to(dtype),
                                               return_args=True, **kwargs)))
            refs[pid] = (shape, dtype, h, against, ref, x.to(dtype))
        return probes, refs

    def judge_with(refs):
        def judge(outputs):
            for pid, (shape, dtype, h, against, ref, x) in refs.items():
                out = _is_tensor(_out(outputs, pid, what="numerical_gradient"), shape, "the numerical gradient")
                if out.dtype != dtype:
                    raise Fail(f"numerical_gradient returned {out.dtype} for a {dtype} input (keep x's dtype)")
                err = _rel(out, ref, "the numerical gradient")
                tol = 0.1 if dtype == torch.float32 else (GRAD_TOL if against == "analytic" else 1e-9)
                if not err < tol:
                    what = "the exact gradient" if against == "analytic" else f"central differences with h={h}"
                    raise Fail(f"numerical gradient for a {dtype} input of shape {shape} is off from {what}: "
                               f"relative error {err:.1e} (want < {tol:.0e})")
                after = _calls(outputs, pid)[0].get("args")
                if not isinstance(after, list) or len(after) != 2 or not (
                        isinstance(after[1], torch.Tensor) and torch.equal(after[1], x)):
                    raise Fail("numerical_gradient must leave x as it found it (restore every element)")
        return judge

    return _case(number, points, hidden, build, judge_with)


def _q3_cases():
    f64, f32 = torch.float64, torch.float32
    return [_q3_rel_error(1, 1, False),
            _q3_grad_case(2, 1, False, [((3,), f64, 0.0, 1.0, None, "analytic")]),
            _q3_grad_case(3, 1, True, [((6,), f64, 100.0, 30.0, None, "analytic"),  # punishes h=1e-10 and one-sided
                                       ((4,), f64, 0.0, 1.0, 1e-3, "central")]),  # h must be the one passed
            _q3_grad_case(4, 1, True, [((2, 3), f64, 0.0, 1.0, None, "analytic"),
                                       ((4,), f32, 0.0, 0.5, None, "analytic")])]


# --------------------------------------------------------------------------- q4, q5: LayerNorm, GroupNorm


def ln_reference(x, gamma, beta, eps=EPS, v: NormsVariant | None = None):
    """PyTorch's own LayerNorm; a class variant's (``variants_norms``) when ``v`` is not the default."""
    if v is None or v.is_default:
        return F.layer_norm(x, x.shape[1:], gamma, beta, eps)
    return variants_norms.layer_norm_reference(v, x, gamma, beta, eps)


def gn_reference(x, gamma, beta, G, eps=EPS, v: NormsVariant | None = None):
    if v is None or v.is_default:
        return F.group_norm(x, G, gamma, beta, eps)
    return variants_norms.group_norm_reference(v, x, gamma, beta, G, eps)


def _ref_name(q, G, v):
    if v is not None and not v.is_default:
        return "the reference (this class's conventions)" + ("" if q == "q4" else f", G={G}")
    return "F.layer_norm" if q == "q4" else f"F.group_norm with G={G}"


NORM = {"q4": ("layer_norm", ln_reference), "q5": ("group_norm", gn_reference)}


def _norm_inputs(q, shape, G, g, scale=2.0, v=None):
    """x (in the variant's layout), gamma, beta, [G]; ``shape`` is given as (N, C, H, W)."""
    v = v or NormsVariant()
    x = v.to_layout(0.5 + scale * _f64(*shape, g=g))
    pshape = v.ln_param_shape(shape) if q == "q4" else shape[1:2]
    gamma, beta = _pos(*pshape, g=g) * torch.where(torch.rand(pshape, generator=g) < 0.3, -1.0, 1.0).double(), _f64(*pshape, g=g)
    extra = [] if q == "q4" else [G]
    return x, gamma, beta, extra


def _norm_forward_case(q, number, points, hidden, setups, scale=2.0, v=None):
    """setups: [(shape, G)]; G is ignored for LayerNorm; shapes as (N, C, H, W), drawn in v's layout."""
    name, ref_fn = NORM[q]

    def build(g):
        probes, refs = [], {}
        for i, (shape, G) in enumerate(setups):
            x, gamma, beta, extra = _norm_inputs(q, shape, G, g, scale, v)
            pid = f"{q}-{number}-{i}"
            probes.append(_call(pid, q, _fn(f"{name}_forward", x, gamma, beta, *extra)))
            refs[pid] = (tuple(x.shape), G, ref_fn(x, gamma, beta, *extra, v=v))
        return probes, refs

    def judge_with(refs):
        def judge(outputs):
            for pid, (shape, G, ref) in refs.items():
                out = _out(outputs, pid, n=2, what=f"{name}_forward (a pair (y, cache))")
                ref_name = _ref_name(q, G, v)
                tiny = "" if scale > 1e-2 else ", tiny variance: " + (
                    "eps inside the square root" if (v or NormsVariant()).eps == "inside" else
                    "eps is added to the standard deviation, outside the square root")
                _close(out[0], ref, f"the output for {shape} (compared with {ref_name}{tiny})")
        return judge

    return _case(number, points, hidden, build, judge_with)


def _norm_backward_case(q, number, points, hidden, setups, v=None):
    name, ref_fn = NORM[q]

    def build(g):
        probes, refs = [], {}
        for i, (shape, G) in enumerate(setups):
            x, gamma, beta, extra = _norm_inputs(q, shape, G, g, v=v)
            dy = _f64(*x.shape, g=g)
            xr, gr, br = (t.clone().requires_grad_() for t in (x, gamma, beta))
            grads = torch.autograd.grad(ref_fn(xr, gr, br, *extra, v=v), (xr, gr, br), dy)
            pid = f"{q}-{number}-{i}"
            probes.append(_call(pid, q, _fn(f"{name}_forward", x, gamma, beta, *extra),
                                _fn(f"{name}_backward", dy, {"__out__": [0, 1]})))
            refs[pid] = (tuple(x.shape), G, dict(zip(["dx", "dgamma", "dbeta"], grads)))
        return probes, refs

    def judge_with(refs):
        def judge(outputs):
            for pid, (shape, G, grads) in refs.items():
                _out(outputs, pid, 0, n=2, what=f"{name}_forward (a pair (y, cache))")
                out = _out(outputs, pid, 1, n=3, what=f"{name}_backward")
                _check_rel(dict(zip(["dx", "dgamma", "dbeta"], out)), grads,
                           f"{name}_backward for {shape}" + ("" if q == "q4" else f", G={G}"))
        return judge

    return _case(number, points, hidden, build, judge_with)


def _independence_case(q, number, points, hidden, shape, G=1, j=1, v=None):
    """Example j changed: every other example's output must stay the same (no batch statistics)."""
    name, ref_fn = NORM[q]
    nchw, shape = shape, (v or NormsVariant()).layout_shape(shape)  # drawn as (N, C, H, W), probed in v's layout

    def build(g):
        x, gamma, beta, extra = _norm_inputs(q, nchw, G, g, v=v)
        x2 = x.clone()
        x2[j] = 5.0 + 10.0 * _f64(*shape[1:], g=g)
        pid = f"{q}-{number}-indep"
        return [_call(pid, q, _fn(f"{name}_forward", x, gamma, beta, *extra),
                      _fn(f"{name}_forward", x2, gamma, beta, *extra))], pid

    def judge_with(pid):
        def judge(outputs):
            y1 = _is_tensor(_out(outputs, pid, 0, n=2, what=f"{name}_forward")[0], shape, "y")
            y2 = _is_tensor(_out(outputs, pid, 1, n=2, what=f"{name}_forward")[0], shape, "y")
            keep = [i for i in range(shape[0]) if i != j]
            if not torch.allclose(y1[keep], y2[keep], rtol=1e-12, atol=1e-12):
                raise Fail(f"changing example {j} changed the output of the other examples: "
                           f"{name} must normalise each example on its own (no statistics over the batch)")
        return judge

    return _case(number, points, hidden, build, judge_with)


def _combine(number, points, hidden, *parts):
    """One test case made of several (number, points, hidden, build, judge_with) parts."""
    def build(g):
        return [part[3](g) for part in parts]

    def judge_with(built):
        judges = [part[4](refs) for part, (_, refs) in zip(parts, built)]

        def judge(outputs):
            for j in judges:
                j(outputs)
        return judge

    def build_flat(g):
        built = build(g)
        return [p for probes, _ in built for p in probes], built

    return number, points, hidden, build_flat, judge_with


def _q4_cases(v=None):
    fwd, bwd = (lambda *a, **k: _norm_forward_case("q4", *a, v=v, **k)), (lambda *a: _norm_backward_case("q4", *a, v=v))
    return [fwd(1, 1, False, [((4, 5), None)]),
            bwd(2, 1, False, [((4, 5), None)]),
            fwd(3, 1, True, [((3, 4, 5, 2), None), ((2, 3, 1, 1), None), ((1, 6), None)]),
            bwd(4, 1, True, [((3, 4, 5, 2), None), ((1, 6), None), ((8, 2, 3, 3), None)]),
            _independence_case("q4", 5, 1, True, (4, 3, 2, 2), v=v),
            fwd(6, 1, True, [((6, 5), None), ((2, 3, 2, 2), None)], scale=1e-3)]


def _gn_identities(v=None):
    """G = 1 is LayerNorm over (C, H, W), G = C is instance norm (gamma = 1, beta = 0); in a
    variant's layout, with its eps, as explicit formulas (``variants_norms.normalise``)."""
    def build(g):
        probes, refs = [], {}
        for i, (shape, G) in enumerate([((3, 4, 2, 3), 1), ((3, 4, 2, 3), 4)]):
            x = (v or NormsVariant()).to_layout(1.0 + 3.0 * _f64(*shape, g=g))
            ones, zeros = torch.ones(shape[1], dtype=torch.float64), torch.zeros(shape[1], dtype=torch.float64)
            if v is None or v.is_default:
                ref = F.layer_norm(x, x.shape[1:], eps=EPS) if G == 1 else F.instance_norm(x, eps=EPS)
            else:  # every value of an example, or every position of one channel of it
                spatial = (2, 3) if v.layout == "channels_first" else (1, 2)
                ref = variants_norms.normalise(v, x, (1, 2, 3) if G == 1 else spatial, EPS)
            probes.append(_call(f"q5-5-{i}", "q5", _fn("group_norm_forward", x, ones, zeros, G)))
            refs[f"q5-5-{i}"] = (G, ref)
        return probes, refs

    def judge_with(refs):
        def judge(outputs):
            for pid, (G, ref) in refs.items():
                what = "G = 1 must equal LayerNorm over (C, H, W)" if G == 1 else "G = C must equal instance norm"
                _close(_out(outputs, pid, n=2, what="group_norm_forward")[0], ref, what)
        return judge

    return _case(5, 1, True, build, judge_with)


def _gn_bad_groups(v=None):
    C, G = 6, 4

    def build(g):
        x = (v or NormsVariant()).to_layout(_f64(2, C, 2, 2, g=g))
        return [_call("q5-6-bad", "q5", _fn("group_norm_forward", x, torch.ones(C, dtype=torch.float64),
                                             torch.zeros(C, dtype=torch.float64), G, expect_error=True))], None

    def judge_with(_):
        def judge(outputs):
            calls = _calls(outputs, "q5-6-bad")
            raised = calls[0].get("raised") if calls and isinstance(calls[0], dict) else None
            if not isinstance(raised, str):
                raise Fail(f"group_norm_forward with C={C}, G={G} must raise a ValueError (C is not divisible by G)")
            if not raised.startswith("ValueError") or str(C) not in raised or str(G) not in raised:
                raise Fail(f"with C={C}, G={G} the error must be a ValueError naming C and G, got: {raised[:80]}")
        return judge

    return _case(6, 1, True, build, judge_with)


def _q5_cases(v=None):
    fwd, bwd = (lambda *a: _norm_forward_case("q5", *a, v=v)), (lambda *a: _norm_backward_case("q5", *a, v=v))
    return [fwd(1, 1, False, [((2, 4, 3, 3), 2)]),
            bwd(2, 1, False, [((2, 4, 2, 2), 2)]),
            fwd(3, 1, True, [((3, 6, 4, 5), 3), ((2, 8, 1, 1), 4), ((1, 6, 2, 3), 2)]),
            bwd(4, 2, True, [((3, 6, 4, 5), 3), ((2, 4, 3, 3), 1), ((2, 4, 3, 3), 4), ((1, 6, 2, 3), 2)]),
            _gn_identities(v),
            _combine(6, 1, True, _gn_bad_groups(v), _independence_case("q5", 6, 0, True, (3, 6, 2, 2), G=3, j=2, v=v))]


# --------------------------------------------------------------------------- q6: concepts


CONCEPTS = {  # the answer key; the notebook lists the allowed values
    "depends_on_batch_train": {"batch"},
    "depends_on_batch_eval": set(),
    "per_feature_standardization": "batch",  # dataset mean / std per feature: statistics across examples
    "per_image_standardization": "layer",  # each image by its own mean / std
    "ln_fails_when": "very_few_features",
}
LN_CHOICES = ("very_deep_network", "very_few_features", "very_large_batch")


def _concepts(outputs) -> dict:
    out = _out(outputs, "q6", what="concepts()")
    if not isinstance(out, dict) or set(out) != set(CONCEPTS):
        raise Fail(f"concepts() must return a dict with exactly the keys {sorted(CONCEPTS)}")
    for key in ("depends_on_batch_train", "depends_on_batch_eval"):
        if not isinstance(out[key], list) or not all(isinstance(v, str) and v in NORMS for v in out[key]):
            raise Fail(f"{key} must be a list (or set) of names from {list(NORMS)}")
    for key in ("per_feature_standardization", "per_image_standardization"):
        if out[key] not in ("batch", "layer"):
            raise Fail(f"{key} must be 'batch' or 'layer'")
    if out["ln_fails_when"] not in LN_CHOICES:
        raise Fail(f"ln_fails_when must be one of {list(LN_CHOICES)}")
    return out


def _q6_case(number, points, hidden, keys):
    def build(g):
        return [_call("q6", "q6", _fn("concepts"))], None

    def judge_with(_):
        def judge(outputs):
            out = _concepts(outputs)
            for key in keys:
                mine = set(out[key]) if isinstance(out[key], list) else out[key]
                if mine != CONCEPTS[key]:
                    raise Fail(f"{key} is not right")
        return judge

    return _case(number, points, hidden, build, judge_with)


def _q6_cases():
    return [_q6_case(1, 0.5, False, []),  # the format only
            _q6_case(2, 1, True, ["depends_on_batch_train"]),
            _q6_case(3, 0.5, True, ["depends_on_batch_eval"]),
            _q6_case(4, 1, True, ["per_feature_standardization", "per_image_standardization", "ln_fails_when"])]


# --------------------------------------------------------------------------- q9: recomputed statistics


MODELS = {"mlp": ([["linear", 5, 8], ["bn1d", 8], ["relu"], ["linear", 8, 4], ["bn1d", 4]], (5,)),
          "cnn": ([["conv", 2, 4, 3], ["bn2d", 4], ["relu"], ["flatten"], ["linear", 16, 3], ["bn1d", 3]], (2, 4, 4))}
LAYERS = {"linear": torch.nn.Linear, "conv": torch.nn.Conv2d, "bn1d": torch.nn.BatchNorm1d,
          "bn2d": torch.nn.BatchNorm2d, "relu": torch.nn.ReLU, "flatten": torch.nn.Flatten}


def build_model(layers, g) -> torch.nn.Sequential:
    """The worker's ``__model__`` network, with every parameter and running statistic drawn from g."""
    model = torch.nn.Sequential(*[LAYERS[name](*sizes) for name, *sizes in layers]).double()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(7)
            elif name.endswith("running_var") or name.endswith("weight") and t.dim() == 1:
                t.copy_(_pos(*t.shape, g=g))
            else:
                t.copy_(_f64(*t.shape, g=g) * (0.5 if t.dim() > 1 else 1.0))
    return model


def recompute_reference(model, batches) -> torch.nn.Module:
    """PyTorch's own cumulative average: a copy, statistics reset, momentum None, train mode."""
    ref = copy.deepcopy(model)
    bns = [m for m in ref.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    ref.train()
    with torch.no_grad():
        for xb in batches:
            ref(xb)
    return ref


def _q9_check_model(model: dict, before: dict, after: dict, flags: list) -> None:
    """The model after recompute_bn_stats (the worker's summary) against the reference's state."""
    state = model.get("state")
    if not isinstance(state, dict) or state.get("keys") != list(before):
        raise Fail("the model's state_dict keys changed")
    values = dict(zip(state["keys"], state.get("values") or []))
    for key, ref in after.items():
        if key.endswith("num_batches_tracked"):
            continue
        a = _is_tensor(values.get(key), ref.shape, key)
        if not key.endswith(("running_mean", "running_var")):
            if not torch.equal(a, before[key]):
                raise Fail(f"{key} changed: recompute_bn_stats must not train (use torch.no_grad(), no optimizer)")
        elif not torch.allclose(a.to(ref.dtype), ref, rtol=RTOL, atol=ATOL):
            raise Fail(f"{key} differs from the cumulative average of the batch statistics "
                       "(every batch weighs the same; running_var averages the unbiased variances)")
    if model.get("momentum") != [0.1] * sum(k.endswith("running_mean") for k in before):
        raise Fail(f"momentum was not restored: {str(model.get('momentum'))[:60]} (it must be 0.1 again afterwards)")
    if model.get("training") != flags:
        raise Fail(f"the model's mode was not restored: training flags {str(model.get('training'))[:120]} after, "
                   f"{flags} before")


def _q9_case(number, points, hidden, kind, n_batches, batch_size, train):
    def build(g):
        layers, in_shape = MODELS[kind]
        model = build_model(layers, g).train(train)
        batches = [1.0 + 2.0 * _f64(batch_size, *in_shape, g=g) for _ in range(n_batches)]
        state = model.state_dict()
        spec = {"__model__": {"layers": layers, "state": {"keys": list(state), "values": [v.clone() for v in state.values()]},
                              "train": train}}
        pid = f"q9-{number}"
        ref = recompute_reference(model, batches)
        flags = [m.training for m in model.modules()]
        return [_call(pid, "q9", _fn("recompute_bn_stats", spec, batches, return_args=True))], (pid, state, ref.state_dict(), flags, batches)

    def judge_with(refs):
        pid, before, after, flags, batches = refs

        def judge(outputs):
            calls = _calls(outputs, pid)
            args = calls[0].get("args") if calls and isinstance(calls[0], dict) else None
            if not isinstance(args, list) or len(args) != 2 or not isinstance(args[0], dict):
                raise Fail("recompute_bn_stats did not return")
            _q9_check_model(args[0], before, after, flags)
            if not isinstance(args[1], list) or len(args[1]) != len(batches) or not all(
                    isinstance(a, torch.Tensor) and torch.equal(a, b) for a, b in zip(args[1], batches)):
                raise Fail("recompute_bn_stats changed the batches it was given")
        return judge

    return _case(number, points, hidden, build, judge_with)


def _q9_cases():
    return [_q9_case(1, 1, False, "mlp", 3, 16, False),
            _q9_case(2, 1, True, "mlp", 5, 8, True),
            _q9_case(3, 1, True, "cnn", 4, 6, False)]


# --------------------------------------------------------------------------- all tests


QUESTIONS = {"q1": _q1_cases, "q2": _q2_cases, "q3": _q3_cases, "q4": _q4_cases, "q5": _q5_cases,
             "q6": _q6_cases, "q7": experiments.q7_cases, "q8": experiments.q8_cases, "q9": _q9_cases}


VARIANT_QUESTIONS = {"q4", "q5"}  # their case lists take the class variant (variants_norms.py)


def make_tests(seed: int, variant: NormsVariant | None = None) -> list[TestCase]:
    """Every autograded test case of assignment 2 with fresh inputs drawn from ``seed``, for the
    class ``variant`` (``variants_norms.NormsVariant``; None or assignment 1's default ``Variant()``:
    PyTorch's conventions). Assignment 1's other variants do not apply here: TypeError."""
    if isinstance(variant, Variant) and variant.is_default:
        variant = None
    if variant is not None and not isinstance(variant, NormsVariant):
        raise TypeError("assignment 'norms' takes a variants_norms.NormsVariant or None as its variant, got "
                        f"{type(variant).__name__} (assignment 1's variants.Variant does not apply to it)")
    v = None if variant is None or variant.is_default else variant
    g = torch.Generator().manual_seed(int(seed))
    tests = []
    for question, cases in QUESTIONS.items():
        for number, points, hidden, build, judge_with in (cases(v) if question in VARIANT_QUESTIONS else cases()):
            probes, refs = build(g)
            tests.append(TestCase(question, number, float(points), hidden, probes, judge_with(refs)))
    return tests
