"""The trusted half of grading: test inputs, references, tolerances and scores.

Nothing here imports or executes student code. ``make_tests(seed)`` draws fresh random float64
inputs (the seed is chosen per grading run, so outputs cannot be precomputed) and returns the test
cases of the assignment, with the same questions, points and coverage as the visible + hidden
tests in the solution notebook (``tests/test_grading.py`` checks that they agree). Each case lists
the *probes* the sandboxed worker must run (inputs only) and judges the worker's outputs against
references computed here with PyTorch itself (``F.batch_norm``, ``nn.BatchNorm1d/2d``, autograd).

A bug costs once: question 2's probes carry a reference ``batch_norm_forward`` (source text,
``Ref.forward_source``) whose cache (``variants.reference_cache``, the layout question 1 states)
goes to the student's ``batch_norm_backward``, and question 3's module probes carry it too: the
worker puts it in place of the student's ``batch_norm_forward`` while the module runs. So a q1 bug
costs q1's points only, and q2 and q3 are graded on their own code.

Visible tests (``hidden=False``) get fresh random inputs here too, of the shapes of the
notebook's visible tests, which use fixed tiny inputs; ``BEHAVIOUR`` names what each test checks,
and ``visible_coverage`` says how many points a student can check with a visible test.

A class's variant (``variants.py``, ``make_tests(seed, variant)``) changes the conventions: the
probes carry their tensors in the variant's layout (the worker does not change), and the
references are ``variants.batch_norm_reference`` / ``ReferenceBatchNorm`` (explicit float64
formulas) and autograd through them. PyTorch's conventions (the default) keep ``F.batch_norm`` and
``nn.BatchNorm``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .variants import ReferenceBatchNorm, Variant, apply_messages, batch_norm_reference, variant_of  # noqa: F401 (grade.py)
from . import variants

RTOL, ATOL = 1e-8, 1e-10  # forward / module outputs and running statistics (float64)
GRAD_RTOL = 1e-7  # module input / parameter gradients
REL_ERR = 1e-8  # batch_norm_backward: ||a - b|| / (the size of the terms the gradient is built from)


class Fail(Exception):
    """A failed check; its message is the reason shown to the instructor."""


@dataclasses.dataclass
class TestCase:
    question: str
    number: int
    points: float
    hidden: bool
    probes: list[dict]
    judge: Callable[[dict[str, Any]], None]  # raises Fail

    @property
    def name(self) -> str:
        return f"{self.question} - {self.number}"


def _f64(*shape, g):
    return torch.randn(*shape, dtype=torch.float64, generator=g)


@dataclasses.dataclass(frozen=True)
class Ref:
    """The references of one variant: PyTorch's own for the default, variants.py's otherwise."""

    variant: Variant

    def bn(self, x, running_mean, running_var, weight, bias, training=False, momentum=0.1, eps=1e-5):
        if self.variant.is_default:
            return F.batch_norm(x, running_mean, running_var, weight, bias, training=training, momentum=momentum, eps=eps)
        return batch_norm_reference(self.variant, x, running_mean, running_var, weight, bias, training, momentum, eps)

    def module(self, C: int, dims: int = 4) -> torch.nn.Module:
        if self.variant.is_default:
            return (torch.nn.BatchNorm2d if dims == 4 else torch.nn.BatchNorm1d)(C)
        return ReferenceBatchNorm(C, self.variant)

    def x(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor drawn with channels on axis 1, in the variant's layout."""
        return self.variant.to_layout(t)

    def shape(self, shape) -> tuple:
        return self.variant.layout_shape(shape)

    def msg(self, text: str) -> str:
        return apply_messages(self.variant, text)

    @property
    def forward_source(self) -> str:
        """A reference ``batch_norm_forward`` with the student's signature and the specified cache,
        as source for the sandbox (explicit formulas: the strict pass's raising kernels allow it)."""
        return _forward_source(self.variant)


@functools.lru_cache(maxsize=64)
def _forward_source(v: Variant) -> str:
    import inspect

    return "\n".join([
        "import torch", "import types as _types", f"_V = _types.SimpleNamespace(**{v.to_dict()!r})",
        inspect.getsource(variants.batch_norm_reference), inspect.getsource(variants.reference_cache),
        f"def batch_norm_forward(x, gamma, beta, running_mean, running_var, momentum={v.momentum!r}, eps=1e-5, training=True):",
        "    y = batch_norm_reference(_V, x, running_mean, running_var, gamma, beta, training, momentum, eps)",
        "    return y, (reference_cache(_V, x, gamma, eps) if training else None)", ""])


def _is_tensor(t, shape=None, what="value") -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise Fail(f"{what} is missing or not a tensor")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise Fail(f"{what} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t


def _close(a, b, rtol=RTOL, atol=ATOL) -> bool:
    a = _is_tensor(a)
    if a.shape != b.shape or not a.dtype.is_floating_point:
        return False
    return bool(torch.allclose(a.to(b.dtype), b, rtol=rtol, atol=atol))


def _probe_result(outputs: dict, pid: str) -> dict:
    res = outputs.get(pid)
    if not isinstance(res, dict):
        raise Fail("no result (the submission did not finish this test)")
    if res.get("error"):
        raise Fail(str(res["error"])[:200])
    return res


# --------------------------------------------------------------------------- q1: forward


def _forward_probe(pid, shape, g, ref, momentum=None, eps=1e-5, training=True, steps=1, scale=3.0,
                   pass_momentum=True):
    """Inputs for batch_norm_forward and the F.batch_norm references (like the notebook's
    ``_bn_compare``); ``shape`` has the channels on axis 1, the probe's tensors are in the layout
    of ``ref``'s variant; momentum None: the variant's default."""
    momentum = ref.variant.momentum if momentum is None else momentum
    C = shape[1]
    gamma = torch.rand(C, dtype=torch.float64, generator=g) + 0.5
    beta = _f64(C, g=g)
    rm = _f64(C, g=g)
    rv = torch.rand(C, dtype=torch.float64, generator=g) + 0.5
    xs = [ref.x(0.5 + scale * _f64(*shape, g=g)) for _ in range(steps)]
    rm_ref, rv_ref, refs = rm.clone(), rv.clone(), []
    for x in xs:
        y = ref.bn(x, rm_ref, rv_ref, gamma, beta, training=training, momentum=momentum, eps=eps)
        refs.append({"y": y, "rm": rm_ref.clone(), "rv": rv_ref.clone()})
    spec = {"id": pid, "kind": "forward", "gamma": gamma, "beta": beta, "rm": rm, "rv": rv, "xs": xs,
            "momentum": momentum if pass_momentum else None, "eps": eps, "training": training}
    return spec, refs


def _forward_steps(outputs, pid, refs):
    res = _probe_result(outputs, pid)
    steps = res.get("steps")
    if not isinstance(steps, list) or len(steps) != len(refs):
        raise Fail("batch_norm_forward did not return for every step")
    for step, ref in zip(steps, refs):
        if not isinstance(step, dict):
            raise Fail("malformed result")
        _is_tensor(step.get("y"), ref["y"].shape, "y")
    return steps


def _q1_case(number, points, hidden, shapes, checks, ref_, **kw):
    """One q1 test: several shapes, each step checked by every (ok(step, ref) -> bool, message)."""
    checks = [(ok, ref_.msg(message)) for ok, message in checks]

    def build(g):
        probes, refs = [], {}
        for i, shape in enumerate(shapes):
            spec, ref = _forward_probe(f"q1-{number}-{i}", shape, g, ref_, **kw)
            probes.append(spec)
            refs[spec["id"]] = (ref_.shape(shape), ref)
        return probes, refs

    def judge_with(refs):
        def judge(outputs):
            for pid, (shape, ref) in refs.items():
                for k, (step, r) in enumerate(zip(_forward_steps(outputs, pid, ref), ref)):
                    for ok, message in checks:
                        if not ok(step, r):
                            raise Fail(message.format(shape=shape, step=k + 1))
        return judge

    return number, points, hidden, build, judge_with


def _ok(key):
    return lambda step, ref: _close(step.get(key), ref[key])


def _q1_cases(r: Ref):
    y, rm, rv = _ok("y"), _ok("rm"), _ok("rv")
    stats_msg = "running statistics for {shape} after step {step} with momentum=0.3 differ from PyTorch's " \
                "(running = (1 - momentum) * running + momentum * batch)"
    return [
        _q1_case(1, 1, False, [(16, 4)], [(y, "training-mode output for an (N, C) input differs from F.batch_norm")], r),
        _q1_case(2, 1, False, [(16, 4)], [(rm, "running_mean after one training step (momentum=0.1) differs from PyTorch's")], r),
        _q1_case(3, 0.5, True, [(8, 3, 5, 4), (2, 5, 3, 3), (16, 2, 1, 1)], [
            (y, "training-mode output for a 4-D input {shape} differs from F.batch_norm (normalise per channel over N, H, W)")], r),
        _q1_case(4, 1, True, [(16, 4), (4, 3, 5, 5)], [
            (rv, "running_var for {shape} differs from PyTorch's (it must store the UNBIASED batch variance)")], r),
        _combine(
            _q1_case(5, 0.5, True, [(10, 3), (4, 2, 3, 3)], [(rm, stats_msg), (rv, stats_msg)], r, momentum=0.3, steps=3),
            _q1_case(5, 0.5, True, [(6, 3)], [(rm, "the default momentum must be 0.1"), (rv, "the default momentum must be 0.1")],
                     r, steps=2, pass_momentum=False)),
        _combine(*[_q1_case(6, 1, True, [(32, 3), (8, 2, 4, 4)], [
            (y, f"output for an input with tiny variance (eps={eps}) differs from F.batch_norm: eps belongs inside the square root")],
            r, eps=eps, scale=1e-3) for eps in (1e-5, 1e-3)]),
        _q1_case(7, 0.5, True, [(16, 4), (4, 3, 5, 5)], [
            (y, "evaluation-mode output for {shape} differs from F.batch_norm (use running_mean / running_var)"),
            (rm, "evaluation mode must not change the running statistics"),
            (rv, "evaluation mode must not change the running statistics")], r, training=False, steps=2),
        _q1_case(8, 0.5, True, [(5, 3, 4, 6)], [
            (rm, "running_mean of a 4-D input after step {step} differs from PyTorch's"),
            (rv, "running_var of a 4-D input after step {step} differs from PyTorch's")], r, steps=2),
        # visible (the notebook's fixed tiny inputs; fresh random ones here)
        _q1_case(9, 1, False, [(3, 2)], [
            (y, "evaluation-mode output for {shape} at step {step} differs from F.batch_norm (normalise with running_mean / running_var)"),
            (rm, "in evaluation mode running_mean / running_var must stay as they are"),
            (rv, "in evaluation mode running_mean / running_var must stay as they are")], r, training=False, steps=2),
        _q1_case(10, 1, False, [(2, 2, 2, 2)], [
            (y, "training-mode output for the 4-D input {shape} at step {step} differs from F.batch_norm (normalise per channel over N, H, W)"),
            (rm, "running_mean of the 4-D input {shape} after step {step} differs from PyTorch's"),
            (rv, "running_var of the 4-D input {shape} after step {step} differs from PyTorch's")], r, steps=2),
        _q1_case(11, 1, False, [(4, 2)], [(rm, stats_msg), (rv, stats_msg)], r, momentum=0.3, steps=2),
    ]


def _combine(*parts):
    """One test case made of several _q1_case parts (all must pass)."""
    number, points, hidden = parts[0][:3]

    def build(g):
        probes, refs = [], []
        for j, part in enumerate(parts):
            p, r = part[3](g)
            for spec in p:  # make ids unique across parts
                old = spec["id"]
                spec["id"] = f"{old}-{j}"
                r[spec["id"]] = r.pop(old)
            probes += p
            refs.append(r)
        return probes, refs

    def judge_with(refs):
        judges = [part[4](r) for part, r in zip(parts, refs)]

        def judge(outputs):
            for j in judges:
                j(outputs)
        return judge

    return number, points, hidden, build, judge_with


# --------------------------------------------------------------------------- q2: backward


def grad_scales(v: Variant, x, gamma, dy, eps=1e-5) -> list[torch.Tensor]:
    """The size of the terms each gradient is built from, for (dx, dgamma, dbeta): ||gamma dy / d||
    (d: the denominator of x_hat; dx is its projection, which can cancel to nearly 0: with two values
    per channel dx is about eps / var of it), || sum |dy x_hat| || and || sum |dy| || (sums per
    channel). Errors are measured against these, so a correct float64 answer is about 1e-15 whatever
    the inputs, and a near-zero reference cannot make rounding look like a bug."""
    x_hat, inv_std, _, dims, shape = variants.reference_cache(v, x, gamma, eps)[:5]
    return [(dy * (gamma * inv_std).reshape(shape)).norm(), (dy * x_hat).abs().sum(dim=dims).norm(),
            dy.abs().sum(dim=dims).norm()]


def _q2_case(number, points, hidden, shapes, r: Ref, scale=2.0, negative_gamma=False):
    def build(g):
        probes, refs = [], {}
        for i, shape in enumerate(shapes):
            C = shape[1]
            x = r.x(1.0 + scale * _f64(*shape, g=g))
            gamma = torch.rand(C, dtype=torch.float64, generator=g) + 0.5
            gamma = -gamma if negative_gamma else gamma
            beta, dy = _f64(C, g=g), r.x(_f64(*shape, g=g))
            xr, gr, br = (t.clone().requires_grad_() for t in (x, gamma, beta))
            y = r.bn(xr, None, None, gr, br, training=True, eps=1e-5)
            grads = torch.autograd.grad(y, (xr, gr, br), dy)
            refs[f"q2-{number}-{i}"] = (r.shape(shape), grads, grad_scales(r.variant, x, gamma, dy))
            probes.append({"id": f"q2-{number}-{i}", "kind": "backward", "x": x, "gamma": gamma, "beta": beta, "dy": dy,
                           "reference_forward": r.forward_source})
        return probes, refs

    def judge_with(refs):
        def judge(outputs):
            for pid, (shape, ref, scales) in refs.items():
                out = _probe_result(outputs, pid).get("out")
                if not isinstance(out, list) or len(out) != 3:
                    raise Fail("batch_norm_backward must return (dx, dgamma, dbeta)")
                errors = {}
                for name, a, b, size in zip(["dx", "dgamma", "dbeta"], out, ref, scales):
                    a = _is_tensor(a, b.shape, name)
                    errors[name] = float((a.to(b.dtype) - b).norm() / size) if a.dtype.is_floating_point else float("inf")
                if not all(e < REL_ERR for e in errors.values()):  # NaN fails too
                    raise Fail(f"relative errors vs autograd for {shape}: "
                               + ", ".join(f"{k}={v:.1e}" for k, v in errors.items()))
        return judge

    return number, points, hidden, build, judge_with


def _q2_cases(r: Ref):
    return [_q2_case(1, 1, False, [(10, 4)], r),
            _q2_case(2, 1, True, [(6, 3, 4, 4), (2, 4, 3, 5)], r),
            _q2_case(3, 1, True, [(2, 3), (3, 5, 2, 2), (64, 7)], r, scale=10.0, negative_gamma=True),
            _q2_case(4, 1, False, [(2, 2, 2, 2)], r)]  # visible: the notebook's fixed tiny 4-D input


# --------------------------------------------------------------------------- q3: the module


def _state(module) -> dict:
    sd = module.state_dict()
    return {"keys": list(sd.keys()), "values": [v.detach().clone() for v in sd.values()]}


def _run_reference(ref: torch.nn.Module, spec: dict) -> list[dict]:
    """The worker's ``probe_module`` script, run here on PyTorch's own module."""
    if spec.get("load_state") is not None:
        ref.load_state_dict(dict(zip(spec["load_state"]["keys"], spec["load_state"]["values"])))
    ref = ref.double()
    if spec.get("wb") is not None:
        with torch.no_grad():
            ref.weight.copy_(spec["wb"][0])
            ref.bias.copy_(spec["wb"][1])
    out = []
    for step in spec["steps"]:
        (ref.train if step["mode"] == "train" else ref.eval)()
        x = step["x"].clone().requires_grad_(bool(step.get("requires_grad")))
        with torch.no_grad() if step.get("no_grad") else torch.enable_grad():
            y = ref(x)
        res = {"y": y.detach().clone(), "state": _state(ref)}
        if step.get("grad_weights") is not None:
            (y * step["grad_weights"]).sum().backward()
            res["grads"] = [x.grad.clone(), ref.weight.grad.clone(), ref.bias.grad.clone()]
        out.append(res)
    return out


def _state_check(mine, ref) -> None:
    if not isinstance(mine, dict) or not isinstance(mine.get("keys"), list) or not isinstance(mine.get("values"), list):
        raise Fail("state_dict missing")
    if mine["keys"] != ref["keys"]:
        raise Fail(f"state_dict keys {mine['keys'][:6]} != {ref['keys']}")
    for k, a, b in zip(ref["keys"], mine["values"], ref["values"]):
        a = _is_tensor(a, b.shape, k)
        if a.dtype != b.dtype:
            raise Fail(f"{k} has dtype {a.dtype}, expected {b.dtype}")
        same = torch.allclose(a, b, rtol=RTOL, atol=ATOL) if b.is_floating_point() else torch.equal(a, b)
        if not same:
            raise Fail(f"{k} differs from nn.BatchNorm's")


def _module_steps(outputs, pid, refs, messages):
    res = _probe_result(outputs, pid)
    steps = res.get("steps")
    if not isinstance(steps, list) or len(steps) != len(refs):
        raise Fail("the module did not complete every step")
    for k, (mine, ref) in enumerate(zip(steps, refs)):
        if not isinstance(mine, dict) or not _close(mine.get("y"), ref["y"]):
            raise Fail(messages[k].format(step=k + 1))
        _state_check(mine.get("state"), ref["state"])
    return res, steps


def _pair_spec(pid, C, g, steps, r: Ref):
    w = torch.rand(C, dtype=torch.float64, generator=g) + 0.5
    return {"id": pid, "kind": "module", "C": C, "load_state": None, "wb": [w, _f64(C, g=g)], "steps": steps,
            "reference_forward": r.forward_source}


def _q3_init():
    def build(g):
        return [{"id": "q3-1", "kind": "module_init", "C": 3}], _state(torch.nn.BatchNorm2d(3))

    def judge_with(ref):
        def judge(outputs):
            res = _probe_result(outputs, "q3-1")
            if res.get("params") != ["weight", "bias"]:
                raise Fail(f"parameters: {str(res.get('params'))[:80]} (expected ['weight', 'bias'])")
            if res.get("buffers") != ["running_mean", "running_var", "num_batches_tracked"]:
                raise Fail(f"buffers: {str(res.get('buffers'))[:100]} (register running_mean, running_var, num_batches_tracked)")
            try:
                _state_check(res.get("state"), ref)
            except Fail as e:
                raise Fail(f"initial state differs from nn.BatchNorm2d's: {e}") from None
        return judge

    return 1, 1, False, build, judge_with


def _q3_train(r: Ref):
    def build(g):
        probes, refs = [], {}
        for shape in [(8, 3, 4, 4), (12, 3)]:
            pid = f"q3-2-{len(shape)}"
            spec = _pair_spec(pid, 3, g, [{"mode": "train", "x": r.x(1.0 + 2.0 * _f64(*shape, g=g))} for _ in range(3)], r)
            probes.append(spec)
            refs[pid] = (r.shape(shape), _run_reference(r.module(3, len(shape)), spec))
        return probes, refs

    def judge_with(refs):
        def judge(outputs):
            for pid, (shape, ref) in refs.items():
                msg = r.msg(f"training-mode output for {shape} at step {{step}} differs from nn.BatchNorm")
                _module_steps(outputs, pid, ref, [msg] * len(ref))
        return judge

    return 2, 1, True, build, judge_with


def _q3_modes(r: Ref):
    def build(g):
        steps = [{"mode": "train", "no_grad": True, "x": r.x(1.0 + 2.0 * _f64(6, 4, 3, 3, g=g))} for _ in range(2)]
        steps.append({"mode": "eval", "requires_grad": True, "x": r.x(_f64(5, 4, 3, 3, g=g))})
        spec = _pair_spec("q3-3", 4, g, steps, r)
        return [spec], _run_reference(r.module(4), spec)

    def judge_with(ref):
        msgs = ["in train() mode under torch.no_grad() the module must still use batch statistics"] * 2 + [
            "in eval() mode (gradients enabled) the module must use the running statistics"]
        return lambda outputs: _module_steps(outputs, "q3-3", ref, msgs)

    return 3, 1, True, build, judge_with


def _q3_load(r: Ref):
    def build(g):
        src = torch.nn.BatchNorm2d(3).train()  # trained by PyTorch: only its state is used
        with torch.no_grad():
            for _ in range(4):
                src(torch.randn(6, 3, 2, 2, generator=g) * 3 + 1)
        spec = {"id": "q3-4", "kind": "module", "C": 3, "load_state": _state(src), "wb": None,
                "steps": [{"mode": "eval", "x": r.x(_f64(4, 3, 2, 2, g=g))}], "reference_forward": r.forward_source}
        return [spec], _run_reference(src if r.variant.is_default else r.module(3), spec)

    def judge_with(ref):
        def judge(outputs):
            res = _probe_result(outputs, "q3-4")
            if res.get("dtypes") != ["torch.float64", "torch.float64"]:
                raise Fail(".double() must convert the running statistics (register them as buffers)")
            _module_steps(outputs, "q3-4", ref, ["after load_state_dict from a trained nn.BatchNorm2d, eval outputs differ"])
        return judge

    return 4, 0.5, True, build, judge_with


def _q3_grad(r: Ref):
    def build(g):
        x, w = r.x(_f64(7, 3, 2, 5, g=g)), r.x(_f64(7, 3, 2, 5, g=g))
        spec = _pair_spec("q3-5", 3, g, [{"mode": "train", "x": x, "requires_grad": True, "grad_weights": w}], r)
        return [spec], _run_reference(r.module(3), spec)

    def judge_with(ref):
        def judge(outputs):
            res = _probe_result(outputs, "q3-5")
            steps = res.get("steps")
            grads = steps[0].get("grads") if isinstance(steps, list) and steps and isinstance(steps[0], dict) else None
            if not isinstance(grads, list) or len(grads) != 3 or any(t is None for t in grads):
                raise Fail("forward must be differentiable with autograd")
            for name, a, b in zip(["the input", "weight", "bias"], grads, ref[0]["grads"]):
                if not _close(a, b, rtol=GRAD_RTOL):
                    raise Fail(r.msg(f"gradient w.r.t. {name} differs from nn.BatchNorm2d's"))
        return judge

    return 5, 0.5, True, build, judge_with


def _q3_visible(r: Ref):
    """Visible: one training step then one evaluation step of a tiny 4-D input (the notebook's fixed
    one), output and state_dict (buffers, num_batches_tracked) after each."""
    def build(g):
        steps = [{"mode": "train", "x": r.x(1.0 + 2.0 * _f64(2, 2, 2, 2, g=g))}, {"mode": "eval", "x": r.x(_f64(2, 2, 2, 2, g=g))}]
        spec = _pair_spec("q3-6", 2, g, steps, r)
        return [spec], _run_reference(r.module(2), spec)

    def judge_with(ref):
        msgs = [r.msg("training-mode output for the 4-D input (2, 2, 2, 2) differs from nn.BatchNorm2d's"),
                r.msg("evaluation-mode output after one training step differs from nn.BatchNorm2d's (use the running statistics)")]
        return lambda outputs: _module_steps(outputs, "q3-6", ref, msgs)

    return 6, 2, False, build, judge_with


def _q3_cases(r: Ref):
    return [_q3_init(), _q3_train(r), _q3_modes(r), _q3_load(r), _q3_grad(r), _q3_visible(r)]


# --------------------------------------------------------------------------- all tests


QUESTIONS = {"q1": _q1_cases, "q2": _q2_cases, "q3": _q3_cases}  # each called with a Ref


def make_tests(seed: int, variant: Variant | None = None) -> list[TestCase]:
    """Every autograded test case with fresh inputs drawn from ``seed``, for ``variant``'s
    conventions (None: PyTorch's)."""
    if variant is not None and not isinstance(variant, Variant):
        raise TypeError(f"variant must be a variants.Variant or None, got {type(variant).__name__}")
    g = torch.Generator().manual_seed(int(seed))
    r = Ref(variant or Variant())
    tests = []
    for question, cases in QUESTIONS.items():
        for number, points, hidden, build, judge_with in cases(r):
            probes, refs = build(g)
            tests.append(TestCase(question, number, float(points), hidden, probes, judge_with(refs)))
    return tests


# What each test checks (issue 24 item 7: a student can check a point when a visible test checks its behaviour)
BEHAVIOUR = {
    "q1 - 1": "output 2-D", "q1 - 2": "running stats", "q1 - 3": "output 4-D", "q1 - 4": "running stats",
    "q1 - 5": "momentum", "q1 - 6": "eps", "q1 - 7": "eval mode", "q1 - 8": "running stats 4-D",
    "q1 - 9": "eval mode", "q1 - 10": ("output 4-D", "running stats 4-D", "running stats"),
    "q1 - 11": ("momentum", "running stats"),
    "q2 - 1": "backward 2-D", "q2 - 2": "backward 4-D", "q2 - 3": ("backward 2-D", "backward 4-D"),
    "q2 - 4": "backward 4-D",
    "q3 - 1": "buffers", "q3 - 2": ("module train", "buffers"), "q3 - 3": ("module train", "module eval"),
    "q3 - 4": ("state_dict", "module eval"), "q3 - 5": "module gradients",
    "q3 - 6": ("module train", "module eval", "buffers", "state_dict"),
}


def _behaviours(name: str) -> set[str]:
    b = BEHAVIOUR[name]
    return {b} if isinstance(b, str) else set(b)


def visible_coverage(tests: list[TestCase] | None = None) -> dict[str, float]:
    """{visible, covered, total}: the points of the visible tests, the points of every test whose
    behaviours (``BEHAVIOUR``) are all checked by some visible test, and all points."""
    tests = tests or make_tests(0)
    seen = set().union(*(_behaviours(t.name) for t in tests if not t.hidden))
    return {"visible": sum(t.points for t in tests if not t.hidden),
            "covered": sum(t.points for t in tests if _behaviours(t.name) <= seen),
            "total": sum(t.points for t in tests)}


def question_points(tests: list[TestCase] | None = None) -> dict[str, float]:
    points: dict[str, float] = {}
    for t in tests or make_tests(0):
        points[t.question] = points.get(t.question, 0.0) + t.points
    return points


def judge_all(tests: list[TestCase], outputs: dict) -> list[dict]:
    """[{question, name, hidden, points, passed, reason}] for one submission's probe outputs."""
    results = []
    for t in tests:
        try:
            t.judge(outputs)
            passed, reason = True, None
        except Fail as e:
            passed, reason = False, str(e)
        except Exception as e:  # malformed outputs must never crash the grader
            passed, reason = False, f"malformed result ({type(e).__name__})"
        results.append({"question": t.question, "name": t.name, "hidden": t.hidden, "points": t.points,
                        "passed": passed, "reason": reason})
    return results
