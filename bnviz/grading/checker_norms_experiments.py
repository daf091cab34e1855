"""Questions 7 and 8 of assignment 2 (the experiments): the autograded part, for ``checker_norms``.

The experiments themselves are never re-run here (the notebook skips them while graded; the
figures and analyses are graded by hand, ``q7w`` / ``q8w``). Only tiny deterministic probes run in
the sandbox, as ``call`` probes like every other question of this assignment:

* q7: ``run_init_experiment`` on a tiny data set (keys, shapes, finite values in range, scales and
  seeds echoed); ``forward_at_init`` (the notebook's provided wrapper of the student's
  ``build_init_model``): batch norm's output at init is the same for two init scales drawn here,
  the unnormalised network's is not, another seed gives another network; the same seeds give the
  same results, different seeds different ones; the notebook's ``student_seeds`` follows the
  convention of ``student_seeds.seeds_for`` (a probe salt and id drawn here).
* q8: ``plan_runs(batch_sizes, budget)`` on batch sizes and budgets drawn here, and bad inputs.

Conventions (the notebook states them): ``budget`` is the number of training examples each run
sees in the equal-examples panel; batch size b gets ``ceil(budget / b)`` steps there, and every b
gets ``ceil(budget / max(batch_sizes))`` steps in the equal-steps panel.
"""

from __future__ import annotations

import math

import torch

from .call_probes import _call, _calls, _fn, _out
from .checker import Fail, _is_tensor
from .student_seeds import seeds_for

LOSS_CAP = 10.0  # the notebook's: what a diverged run records
KEYS = ("norm", "scales", "seeds", "final_loss", "final_acc")


def tiny_data(g, n_train, n_test, d, classes) -> dict:
    return {"train_x": torch.rand(n_train, d, generator=g), "train_y": torch.randint(0, classes, (n_train,), generator=g),
            "test_x": torch.rand(n_test, d, generator=g), "test_y": torch.randint(0, classes, (n_test,), generator=g)}


def _distinct_seeds(g, n) -> list[int]:
    seeds = []
    while len(seeds) < n:
        s = int(torch.randint(0, 1_000_000, (1,), generator=g))
        seeds += [s] if s not in seeds else []
    return seeds


def _result(out, scales, seeds) -> dict:
    if not isinstance(out, dict) or not set(KEYS) <= set(out):
        raise Fail(f"run_init_experiment must return a dict with the keys {list(KEYS)}")
    if out["scales"] != [float(s) for s in scales] or out["seeds"] != seeds:
        raise Fail(f"the result must carry the scales and seeds it was given ({scales}, {seeds}), "
                   f"got {str(out['scales'])[:60]}, {str(out['seeds'])[:60]}")
    shape = (len(scales), len(seeds))
    for key in ("final_loss", "final_acc"):
        t = _is_tensor(out[key], shape, f"{key} (shape (len(scales), len(seeds)))")
        if not t.dtype.is_floating_point or not torch.isfinite(t).all():
            raise Fail(f"{key} must hold finite floats (a diverged run records LOSS_CAP = {LOSS_CAP} and 0.0)")
    if not ((out["final_loss"] >= 0) & (out["final_loss"] <= LOSS_CAP)).all():
        raise Fail(f"final_loss must lie in [0, LOSS_CAP = {LOSS_CAP}] (the mean loss of the last steps, capped)")
    if not ((out["final_acc"] >= 0) & (out["final_acc"] <= 1)).all():
        raise Fail("final_acc must lie in [0, 1] (a fraction of the test set)")
    return out


def _q7_format(number, points, hidden):
    def build(g):
        scales = [round(float(s), 3) for s in 10 ** (torch.rand(3, generator=g, dtype=torch.float64) - 0.5)]
        seeds = _distinct_seeds(g, 2)
        data = tiny_data(g, 64, 32, 12, 4)
        call = _fn("run_init_experiment", "batch", scales, seeds, 3, data, depth=3, width=16, batch_size=16)
        return [_call("q7-1", "q7", call)], (scales, seeds)

    def judge_with(refs):
        def judge(outputs):
            _result(_out(outputs, "q7-1", what="run_init_experiment"), *refs)
        return judge

    return number, points, hidden, build, judge_with


def _q7_invariance(number, points, hidden):
    def build(g):
        low = 0.3 + 0.7 * float(torch.rand(1, generator=g))
        high = low * (4 + 6 * float(torch.rand(1, generator=g)))
        seed = _distinct_seeds(g, 2)
        x = 3 * torch.randn(32, 12, generator=g)
        kw = {"depth": 4, "width": 16}
        calls = [_fn("forward_at_init", "batch", low, seed[0], x, **kw), _fn("forward_at_init", "batch", high, seed[0], x, **kw),
                 _fn("forward_at_init", "none", low, seed[0], x, **kw), _fn("forward_at_init", "none", high, seed[0], x, **kw),
                 _fn("forward_at_init", "batch", low, seed[1], x, **kw)]
        return [_call("q7-2", "q7", *calls)], (low, high)

    def judge_with(refs):
        low, high = refs

        def judge(outputs):
            y = [_is_tensor(_out(outputs, "q7-2", k, what="forward_at_init (build_init_model)"), (32, 10),
                            "the network's output on (32, d_in) inputs") for k in range(5)]
            if not all(t.dtype.is_floating_point and torch.isfinite(t).all() for t in y[:2]):
                raise Fail("the batch-norm network's output at init is not finite")
            if not torch.allclose(y[0], y[1], rtol=1e-3, atol=1e-3 * float(y[0].abs().max())):
                raise Fail(f"with batch norm the output at init must not depend on the init scale ({low:.2f} vs "
                           f"{high:.2f} differ): scale every hidden weight, zero biases, Norm after each hidden Linear")
            if torch.allclose(y[2], y[3], rtol=0.5):
                raise Fail(f"without normalization, init scales {low:.2f} and {high:.2f} gave the same output: "
                           "the hidden weights must be drawn with std scale / sqrt(fan_in)")
            if torch.allclose(y[0], y[4]):
                raise Fail("two seeds gave the same network: draw every weight from torch.Generator().manual_seed(seed)")
        return judge

    return number, points, hidden, build, judge_with


def _q7_seeds(number, points, hidden):
    def build(g):
        seeds, data = _distinct_seeds(g, 2), tiny_data(g, 48, 16, 10, 3)
        call = _fn("run_init_experiment", "layer", [1.0], seeds, 3, data, depth=2, width=8, batch_size=8)
        sid, salt = f"probe-{int(torch.randint(0, 10**9, (1,), generator=g))}", f"salt{int(torch.randint(0, 10**9, (1,), generator=g))}"
        return [_call("q7-3", "q7", call, call, _fn("student_seeds", sid, salt=salt))], (seeds, seeds_for(salt, sid))

    def judge_with(refs):
        seeds, want = refs

        def judge(outputs):
            r1 = _result(_out(outputs, "q7-3", 0, what="run_init_experiment"), [1.0], seeds)
            r2 = _result(_out(outputs, "q7-3", 1, what="run_init_experiment"), [1.0], seeds)
            if not torch.equal(r1["final_loss"], r2["final_loss"]) or not torch.equal(r1["final_acc"], r2["final_acc"]):
                raise Fail("the same seeds gave different results: draw the init and the batches from the seed only")
            if r1["final_loss"][0, 0] == r1["final_loss"][0, 1]:
                raise Fail(f"seeds {seeds} gave the same run: the seed must set the init and the batches")
            if _out(outputs, "q7-3", 2, what="student_seeds") != want:
                raise Fail("student_seeds does not follow the seeds cell's convention (the seeds cell was changed)")
        return judge

    return number, points, hidden, build, judge_with


def plan_reference(batch_sizes: list[int], budget: int) -> dict:
    largest = math.ceil(budget / max(batch_sizes))
    return {"equal_examples": {str(b): math.ceil(budget / b) for b in batch_sizes},
            "equal_steps": {str(b): largest for b in batch_sizes}}


def _q8_case(number, points, hidden, setups, bad=()):
    """setups: [(batch_sizes, budget) or None to draw one]; bad: argument pairs that must raise."""
    def build(g):
        probes, refs = [], {}
        for i, setup in enumerate(setups):
            if setup is None:
                sizes = sorted(set(int(b) for b in torch.randint(1, 100, (4,), generator=g)), key=lambda _: float(torch.rand(1, generator=g)))
                setup = (sizes, int(torch.randint(max(sizes), 5000, (1,), generator=g)))
            probes.append(_call(f"q8-{number}-{i}", "q8", _fn("plan_runs", *setup)))
            refs[f"q8-{number}-{i}"] = (setup, plan_reference(*setup))
        for i, args in enumerate(bad):
            probes.append(_call(f"q8-{number}-bad{i}", "q8", _fn("plan_runs", *args, expect_error=True)))
            refs[f"q8-{number}-bad{i}"] = (args, None)
        return probes, refs

    def judge_with(refs):
        def judge(outputs):
            for pid, (args, want) in refs.items():
                if want is None:
                    raised = _calls(outputs, pid)[0].get("raised") if _calls(outputs, pid) else None
                    if not isinstance(raised, str) or not raised.startswith("ValueError"):
                        raise Fail(f"plan_runs{tuple(args)} must raise a ValueError")
                    continue
                out = _out(outputs, pid, what="plan_runs")
                ok = isinstance(out, dict) and set(out) == set(want) and all(
                    isinstance(out[p], dict) and out[p] == want[p] and all(type(v) is int for v in out[p].values())
                    for p in want)
                if not ok:
                    raise Fail(f"plan_runs{tuple(args)} returned {str(out)[:160]}; expected {want} (int steps: "
                               "equal examples ceil(budget / b), equal steps ceil(budget / max(batch_sizes)))")
        return judge

    return number, points, hidden, build, judge_with


def q7_cases():
    return [_q7_format(1, 1, False), _q7_invariance(2, 1, True), _q7_seeds(3, 1, True)]


def q8_cases():
    return [_q8_case(1, 1, False, [([2, 4, 16, 64], 9600)]),
            _q8_case(2, 1, True, [None, None, ([7], 7)], bad=[([4, 0], 100), ([2, 4], 0), ([2, 2], 10), ([], 10)])]
