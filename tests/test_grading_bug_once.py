"""Issue 24 item 6: a bug costs once, and question 2 is judged fairly.

Question 2's tests hand ``batch_norm_backward`` a cache built by a reference forward pass (the
layout question 1 states, ``variants.reference_cache``), and question 3's module runs with the
reference ``batch_norm_forward`` in place of the student's (shipped as source in the probe spec,
``checker.Ref.forward_source``; the worker defines it in a namespace of its own). So a planted q1
bug loses q1 points only. Most checks run the worker's probe functions here, on our own answer code
(the solution notebook's cells, with bugs planted), never on a student's; one submission is graded
for real in the sandbox (normal and strict pass), where the reference travels through the request.

The backward tolerance: the error of each gradient is measured against the size of the terms it is
built from (``checker.grad_scales``), not against the reference's own norm, which nearly cancels to
0 with two values per channel (dx is about eps / var of its terms there): the solution failed
``q2 - 3`` at 2 of 3,000 seeds with ``||a - b|| / ||b||``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from bnviz.grading import checker, variants, worker
from bnviz.grading.variants import Variant

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "notebooks" / "assignments" / "batch_norm" / "batch_norm.ipynb"
# planted q1 bugs: (old, new) in the solution's forward cell
Q1_BUGS = {
    "wrong_variance": ("var = x.var(dim=dims, correction=0)", "var = x.var(dim=dims)"),  # unbiased normalises
    "eps_outside": ("inv_std = 1.0 / torch.sqrt(var + eps)", "inv_std = 1.0 / (torch.sqrt(var) + eps)"),
    "running_update": ("running_mean.mul_(1 - momentum).add_(momentum * mean)",
                       "running_mean.mul_(momentum).add_((1 - momentum) * mean)"),
    "missing": ("    # BEGIN SOLUTION\n    dims = [0]", "    raise NotImplementedError\n    # BEGIN SOLUTION\n    dims = [0]"),
}


class _Direct:
    def run(self, phase, fn, *args, **kwargs):
        return fn(*args, **kwargs)


def _src(cell) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _answers(nb: dict, old: str = "", new: str = "") -> dict:
    """The solution's answer cells run here (our own code), with ``old`` replaced by ``new``."""
    ns: dict = {}
    for cell in nb["cells"]:
        src = _src(cell)
        if cell["cell_type"] == "code" and src.startswith(("import torch", "def batch_norm_", "class BatchNorm")):
            if old:
                assert src.count(old) <= 1
                src = src.replace(old, new)
            exec(compile(src, "<answer>", "exec"), ns)
    return ns


def _scores(ns: dict, variant: Variant | None = None, seed: int = 0) -> dict[str, float]:
    tests = checker.make_tests(seed, variant)
    outputs = {}
    for t in tests:
        for spec in t.probes:
            try:
                outputs[spec["id"]] = worker.PROBES[spec["kind"]](ns, _Direct(), torch, spec)
            except Exception as e:
                outputs[spec["id"]] = {"error": f"{type(e).__name__}: {e}"}
    scores = {q: 0.0 for q in ("q1", "q2", "q3")}
    for r in checker.judge_all(tests, outputs):
        scores[r["question"]] += r["points"] if r["passed"] else 0.0
    return scores


@pytest.fixture(scope="module")
def source_nb():
    return json.loads(SOURCE.read_text(encoding="utf-8"))


@pytest.mark.parametrize("bug", sorted(Q1_BUGS))
def test_a_q1_bug_costs_q1_only(source_nb, bug):
    old, new = Q1_BUGS[bug]
    assert old in json.dumps(source_nb) or old in "".join(_src(c) for c in source_nb["cells"])
    scores = _scores(_answers(source_nb, old, new))
    assert scores["q1"] < 9, scores
    assert scores["q2"] == 4 and scores["q3"] == 6, (bug, scores)


def test_a_q1_bug_costs_q1_only_in_a_variant(source_nb):
    """The variant's answer key with its forward broken: q2 (the variant's cache, with ``std``) and
    q3 (the variant's reference forward and default momentum) keep their points."""
    from bnviz.grading import build

    v = variants.derive("test-class-0")  # eps outside, channels first, old-average momentum
    key = build.variant_notebook(source_nb, v)
    assert _scores(_answers(key), v) == {"q1": 9, "q2": 4, "q3": 6}
    broken = _scores(_answers(key, "inv_std = 1.0 / (std + eps)", "inv_std = 1.0 / std"), v)
    assert broken["q1"] < 9 and broken["q2"] == 4 and broken["q3"] == 6, broken


def test_the_students_forward_is_back_after_the_module_probe(source_nb):
    ns = _answers(source_nb)
    own = ns["batch_norm_forward"]
    module_probe = next(p for t in checker.make_tests(0) for p in t.probes if p["kind"] == "module")
    assert isinstance(module_probe["reference_forward"], str)
    res = worker.PROBES["module"](ns, _Direct(), torch, module_probe)
    assert res["error"] is None and ns["batch_norm_forward"] is own
    del ns["batch_norm_forward"]  # no q1 answer at all: the module still runs, and nothing is left behind
    assert worker.PROBES["module"](ns, _Direct(), torch, module_probe)["error"] is None
    assert "batch_norm_forward" not in ns


def test_the_reference_cache_is_what_question_1_states(source_nb):
    """The solution's own forward returns exactly the reference cache (so the layout stated in the
    notebook is the one the tests use), for PyTorch's conventions and a variant with eps outside."""
    from bnviz.grading import build

    for v in (Variant(), variants.derive("test-class-0")):
        ns = _answers(source_nb if v.is_default else build.variant_notebook(source_nb, v))
        g = torch.Generator().manual_seed(1)
        x = v.to_layout(torch.randn(4, 3, 2, 5, dtype=torch.float64, generator=g))
        gamma = torch.rand(3, dtype=torch.float64, generator=g) + 0.5
        _, mine = ns["batch_norm_forward"](x, gamma, torch.zeros(3, dtype=torch.float64),
                                           torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
        ref = variants.reference_cache(v, x, gamma)
        assert len(mine) == len(ref) == (5 if v.eps == "inside" else 6)
        for a, b in zip(mine, ref):
            if isinstance(b, torch.Tensor):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
            else:
                assert list(a) == list(b) or torch.broadcast_shapes(tuple(a), x.shape) == x.shape
        assert "(x_hat, inv_std, gamma, dims, shape" in variants.conventions_markdown(v)


# ------------------------------------------------------------------ the backward tolerance


def _old_rel_err(a, b) -> float:
    return float((a - b).norm() / b.norm())


OLD_METRIC_FAILS = [518, 2757]  # the seeds of 0..2999 where the old metric failed the solution at (2, 3)


def test_backward_tolerance_holds_for_the_solution_over_many_seeds(source_nb, one_thread):
    """q2 - 3's hardest shape, (2, 3) with inputs of scale 10, over 500 seeds and the two of 3,000
    where the old metric (relative to the reference's own norm) failed the solution: the solution
    passes every one under the new metric with a margin of 10^4, and the old metric does fail
    those two (the exact dx is about 1e-8 of its terms there)."""
    ns = _answers(source_nb)
    r = checker.Ref(Variant())
    worst, old = 0.0, {}
    for seed in list(range(500)) + OLD_METRIC_FAILS:
        number, points, hidden, build, judge_with = checker._q2_case(3, 1, True, [(2, 3)], r, scale=10.0, negative_gamma=True)
        probes, refs = build(torch.Generator().manual_seed(seed))
        out = worker.PROBES["backward"](ns, _Direct(), torch, probes[0])
        (shape, grads, scales), = refs.values()
        judge_with(refs)({probes[0]["id"]: out})  # raises checker.Fail on a failure
        worst = max(worst, max(float((a - b).norm() / s) for a, b, s in zip(out["out"], grads, scales)))
        old[seed] = _old_rel_err(out["out"][0], grads[0])
    print(f"worst scaled error {worst:.1e}; old metric at seeds {OLD_METRIC_FAILS}: "
          f"{[f'{old[s]:.1e}' for s in OLD_METRIC_FAILS]}")
    assert worst < checker.REL_ERR * 1e-4
    assert all(old[s] >= checker.REL_ERR for s in OLD_METRIC_FAILS)  # why the metric changed


@pytest.mark.parametrize("bug", ["no_stats_terms", "dgamma_without_x_hat", "dx_without_mean_term"])
def test_backward_bugs_still_fail_at_every_seed(source_nb, bug, one_thread):
    plant = {"no_stats_terms": ("        - x_hat * (dx_hat * x_hat).sum(dim=dims, keepdim=True)\n", ""),
             "dgamma_without_x_hat": ("dgamma = (dy * x_hat).sum(dim=dims)", "dgamma = dy.sum(dim=dims)"),
             "dx_without_mean_term": ("        - dx_hat.sum(dim=dims, keepdim=True)\n", "")}[bug]
    ns = _answers(source_nb, *plant)
    r = checker.Ref(Variant())
    for seed in range(10):
        for case in checker._q2_cases(r):
            probes, refs = case[3](torch.Generator().manual_seed(seed))
            outs = {p["id"]: worker.PROBES["backward"](ns, _Direct(), torch, p) for p in probes}
            with pytest.raises(checker.Fail):
                case[4](refs)(outs)


# ------------------------------------------------------------------ one submission, graded for real


@pytest.mark.grading
def test_sandboxed_grading_keeps_q2_and_q3_with_a_q1_bug(grading_dist, bwrap, tmp_path):
    """The reference forward travels in the request, runs in both passes (the strict pass's raising
    kernels included: no points withheld) and the student's module uses it."""
    from bnviz import grading

    out, manifest = grading_dist
    solution = json.loads((out / "autograder" / "batch_norm.ipynb").read_text())
    subs = tmp_path / "subs"
    subs.mkdir()
    old, new = Q1_BUGS["wrong_variance"]
    buggy = copy.deepcopy(solution)
    for cell in buggy["cells"]:
        if cell["cell_type"] == "code" and old in _src(cell):
            cell["source"] = _src(cell).replace(old, new)
    (subs / "q1_bug.ipynb").write_text(json.dumps(buggy))
    results = grading.grade_folder(subs, tmp_path / "grades", timeout_s=150, jobs=1,
                                   student_notebook=out / manifest["student_notebook"], manual_questions={"q4": 2},
                                   forbidden=manifest["forbidden"], log=lambda *a: None)
    r = results[0]
    assert r["error"] == "", r["error"]
    assert r["scores"]["q1"] < 9 and r["scores"]["q2"] == 4 and r["scores"]["q3"] == 6, (r["scores"], r["failed_tests"])
    assert "withheld" not in r["flags"], r["flags"]
