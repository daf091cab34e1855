"""Class variants of assignment 2 ("norms", ``bnviz/grading/variants_norms.py``).

In this process, on the trusted side: the derivation; the variant references against independent
ones (PyTorch's ``F.layer_norm`` / ``F.group_norm`` on permuted tensors, and a numpy formula that
loops over examples and groups); every variant's answer key (``variants_norms.answer_key``, with the
notebook's own answers for the other questions) through ``checker_norms``'s cases, run by the
worker's probe code and judged by the grader's judges; and the public solution on every variant.
"""

from __future__ import annotations

import copy
import functools
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnviz.grading import checker_norms, variants, variants_norms
from bnviz.grading.variants_norms import NormsVariant
from test_assignment_norms import fresh_solution, run_in_process

SECRET = "test-class-0"


# ------------------------------------------------------------------ derivation


def test_derivation_is_deterministic_never_public_and_covers_every_convention():
    secrets_ = [f"class-{i}" for i in range(60)]
    derived = [variants_norms.derive(s) for s in secrets_]
    assert derived == [variants_norms.derive(s) for s in secrets_]
    # the whole secret counts: a trailing space picks another variant about 10 times in 11
    assert sum(variants_norms.derive(s) != variants_norms.derive(s + " ") for s in secrets_) >= 40
    for name, allowed in variants_norms.CHOICES.items():
        assert {getattr(v, name) for v in derived} == set(allowed), name
    assert all(v.changes() >= 2 and not v.is_default for v in derived)
    assert len(variants_norms.candidates()) == 11  # 16 combinations less the default and the 4 one-change ones
    assert len(set(derived)) == 11
    # its own label: not assignment 1's index reused (the same secrets pick differently)
    own = [variants_norms.candidates().index(v) for v in derived]
    as_bn = [variants.pick(s, variants.DERIVATION_LABEL, variants_norms.candidates()) for s in secrets_]
    assert own != [variants_norms.candidates().index(v) for v in as_bn]


# a bad secret: tests/test_grading_variants.py::test_bad_secret_is_refused covers both assignments


def test_bad_variant_records_are_refused():
    with pytest.raises(ValueError, match="groups"):
        NormsVariant(groups="interleaved")
    with pytest.raises(ValueError, match="keys"):
        NormsVariant.from_dict({"running_var": "biased"})  # assignment 1's conventions
    assert NormsVariant.from_dict(None).is_default
    assert variants_norms.variant_of({"metadata": {variants_norms.VARIANT_META: {"groups": "strided"}}}) == \
        NormsVariant(groups="strided")
    with pytest.raises(TypeError, match="does not apply"):
        checker_norms.make_tests(0, variants.derive(SECRET))
    with pytest.raises(TypeError, match="NormsVariant"):
        checker_norms.make_tests(0, {"groups": "strided"})


# ------------------------------------------------------------------ references


def _np_norm(v, x: np.ndarray, gamma, beta, groups_of, eps):
    """Independent: loop over examples and the index sets each statistic is taken over."""
    y = np.empty_like(x)
    for n in range(x.shape[0]):
        for idx in groups_of(x.shape[1:]):
            vals = x[n][idx]
            d = np.sqrt(vals.var() + eps) if v.eps == "inside" else np.sqrt(vals.var()) + eps
            y[n][idx] = (vals - vals.mean()) / d
    return y * gamma + beta


def _np_layer_norm(v, x, gamma, beta, eps):
    cl = v.layout == "channels_last"
    if x.ndim == 2 or v.ln_axes == "all":
        return _np_norm(v, x, gamma, beta, lambda s: [(Ellipsis,)], eps)
    g_shape = (gamma.shape[0],) if cl else (gamma.shape[0], 1, 1)
    positions = (lambda s: [(i, j, slice(None)) for i in range(s[0]) for j in range(s[1])]) if cl else \
        (lambda s: [(slice(None), i, j) for i in range(s[1]) for j in range(s[2])])
    return _np_norm(v, x, gamma.reshape(g_shape), beta.reshape(g_shape), positions, eps)


def _np_group_norm(v, x, gamma, beta, G, eps):
    cl = v.layout == "channels_last"
    C = x.shape[-1] if cl else x.shape[1]
    members = [[c for c in range(C) if (c % G if v.groups == "strided" else c // (C // G)) == grp] for grp in range(G)]
    index = (lambda s: [(Ellipsis, m) for m in members]) if cl else (lambda s: [(m,) for m in members])
    g_shape = (C,) if cl else (C, 1, 1)
    return _np_norm(v, x, gamma.reshape(g_shape), beta.reshape(g_shape), index, eps)


COVERING = [NormsVariant()] + variants_norms.candidates()


@pytest.mark.parametrize("v", COVERING, ids=lambda v: "-".join(v.to_dict().values()))
def test_references_match_independent_ones(v):
    g = torch.Generator().manual_seed(4)
    eps = 1e-3  # large enough that eps inside and outside differ by far more than the tolerance
    for shape in [(3, 5), (2, 6, 3, 2), (1, 4, 2, 3)]:
        x = v.to_layout(0.5 + 2 * torch.randn(shape, dtype=torch.float64, generator=g))
        pshape = v.ln_param_shape(shape)
        gamma, beta = torch.randn(pshape, dtype=torch.float64, generator=g), torch.randn(pshape, dtype=torch.float64, generator=g)
        y = checker_norms.ln_reference(x, gamma, beta, eps, v=v)
        np.testing.assert_allclose(y.numpy(), _np_layer_norm(v, x.numpy(), gamma.numpy(), beta.numpy(), eps), rtol=1e-10, atol=1e-12)
        if len(shape) == 2:
            continue
        for G in (1, 2, shape[1]):
            gamma, beta = torch.randn(shape[1], dtype=torch.float64, generator=g), torch.randn(shape[1], dtype=torch.float64, generator=g)
            y = checker_norms.gn_reference(x, gamma, beta, G, eps, v=v)
            np.testing.assert_allclose(y.numpy(), _np_group_norm(v, x.numpy(), gamma.numpy(), beta.numpy(), G, eps),
                                       rtol=1e-10, atol=1e-12)


def test_variant_references_are_pytorch_on_permuted_tensors():
    """eps inside: strided groups are F.group_norm on channels permuted group by group (then
    permuted back); channels-last LayerNorm is F.layer_norm on the permuted tensor; autograd through
    both agrees, so the backward references (autograd of these) are PyTorch's too."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 3, 2, dtype=torch.float64, generator=g, requires_grad=True)
    gamma, beta = (torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    dy = torch.randn(2, 6, 3, 2, dtype=torch.float64, generator=g)
    perm = torch.tensor([0, 3, 1, 4, 2, 5])  # G = 3 strided: groups {0, 3}, {1, 4}, {2, 5}
    inv = torch.argsort(perm)
    strided = NormsVariant(groups="strided", eps="inside", layout="channels_first", ln_axes="channel")
    mine = variants_norms.group_norm_reference(strided, x, gamma, beta, 3)
    torch_ = F.group_norm(x[:, perm], 3, gamma[perm], beta[perm])[:, inv]
    assert torch.allclose(mine, torch_, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(mine, (x, gamma, beta), dy), torch.autograd.grad(torch_, (x, gamma, beta), dy)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    last = NormsVariant(layout="channels_last", ln_axes="channel")
    xl = x.detach().permute(0, 2, 3, 1).contiguous().requires_grad_()
    mine = variants_norms.layer_norm_reference(last, xl, gamma, beta)
    assert torch.allclose(mine, F.layer_norm(xl, (6,), gamma, beta), rtol=1e-12, atol=1e-12)  # nn.LayerNorm(C) on NHWC
    first = variants_norms.layer_norm_reference(NormsVariant(ln_axes="channel", groups="strided"), x, gamma, beta)
    assert torch.allclose(first, mine.permute(0, 3, 1, 2), rtol=1e-12, atol=1e-12)  # ConvNeXt's channels-first LN
    everything = NormsVariant(layout="channels_last", groups="strided")
    gl, bl = (torch.randn(3, 2, 6, dtype=torch.float64, generator=g) for _ in range(2))
    assert torch.allclose(variants_norms.layer_norm_reference(everything, xl, gl, bl), F.layer_norm(xl, (3, 2, 6), gl, bl),
                          rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="C=6.*G=4"):
        variants_norms.group_norm_reference(strided, x, gamma, beta, 4)


# ------------------------------------------------------------------ scores, in process


@functools.lru_cache(maxsize=1)
def _public_ns() -> dict:
    return fresh_solution()  # the public solution's namespace, as test_assignment_norms builds it


def _key_ns(v: NormsVariant) -> dict:
    """The public solution with questions 4 and 5 replaced by the variant's answer key."""
    ns = copy.copy(_public_ns())
    for i, src in enumerate(variants_norms.answer_key(v)):
        exec(compile(src, f"<answer key {i + 4}>", "exec"), ns)
    return ns


def _score(ns: dict, v: NormsVariant, seed: int, questions=None) -> tuple[float, dict]:
    """Points and failures of ``ns`` on ``v``'s tests (``questions``: only those)."""
    tests = [t for t in checker_norms.make_tests(seed, v) if questions is None or t.question in questions]
    judged = checker_norms.judge_all(tests, run_in_process(ns, tests))
    return sum(r["points"] for r in judged if r["passed"]), {r["name"]: r["reason"] for r in judged if not r["passed"]}


TOTAL = 38.0  # autograded points of questions 1-9 (q7, q8: the experiments' probes)
Q45 = 13.0  # the points of questions 4 and 5, the ones the conventions touch


def test_derived_variant_answer_key_full_marks_public_solution_not():
    """Every question, one derived variant: the key gets full marks, the public solution loses
    only in questions 4 and 5 (the score is printed)."""
    v = variants_norms.derive(SECRET)
    assert _score(_key_ns(v), v, seed=11) == (TOTAL, {})
    public, failed = _score(_public_ns(), v, seed=11)
    print(f"public solution on {SECRET!r} ({'; '.join(variants_norms.describe(v))}): {public:g}/{TOTAL:g}")
    assert {name.split(" - ")[0] for name in failed} == {"q4", "q5"} and public <= TOTAL - 7


def test_every_variant_answer_key_passes_and_the_public_solution_loses_q4_q5():
    """All 11 variants, questions 4 and 5: the answer key written for a variant passes its tests
    (and the generated key passes PyTorch's); the public solution loses at least 7 of the 13 points
    on each (the range and each variant's loss are printed)."""
    assert _score(_key_ns(NormsVariant()), NormsVariant(), 0, {"q4", "q5"}) == (Q45, {})
    lost = {}
    for i, v in enumerate(variants_norms.candidates()):
        assert _score(_key_ns(v), v, i, {"q4", "q5"}) == (Q45, {}), v
        lost[v] = Q45 - _score(_public_ns(), v, i, {"q4", "q5"})[0]
    print(f"public solution on the 11 norms variants: loses {min(lost.values()):g}..{max(lost.values()):g} of the "
          f"{Q45:g} points of q4 + q5, so scores {TOTAL - max(lost.values()):g}..{TOTAL - min(lost.values()):g} of {TOTAL:g}")
    for v, points in lost.items():
        print(f"  {'; '.join(variants_norms.describe(v))}: loses {points:g}")
    assert min(lost.values()) >= 7.0  # the least: channels last + strided groups (LayerNorm over all axes is layout-free)


def test_each_convention_alone_costs_points():
    """For each convention, two variants that differ in it only: the key of one loses points on
    the other's tests (so no convention is decorative)."""
    cands = variants_norms.candidates()
    for name in variants_norms.CHOICES:
        a, b = next((a, b) for a in cands for b in cands
                    if [k for k in variants_norms.CHOICES if getattr(a, k) != getattr(b, k)] == [name])
        points, failed = _score(_key_ns(a), b, 3, {"q4", "q5"})
        assert points < Q45, (name, a, b)
        print(f"{name}: the key of {a.to_dict()[name]!r} on {b.to_dict()[name]!r} scores {points:g}/{Q45:g}")


# ------------------------------------------------------------------ the notebook of a variant

from pathlib import Path  # noqa: E402

from bnviz.grading import variants_norms_nb  # noqa: E402

SOURCE = Path(__file__).resolve().parents[1] / "notebooks" / "assignments" / "norms" / "norms.ipynb"


def _nb_cells(nb: dict) -> list[tuple[str, str]]:
    return [(c["cell_type"], "".join(c["source"]) if isinstance(c["source"], list) else c["source"]) for c in nb["cells"]]


def _test_cells(nb: dict) -> list[tuple[str, float, bool, str]]:
    out, question = [], None
    for kind, src in _nb_cells(nb):
        if kind == "raw" and src.startswith("# BEGIN QUESTION"):
            question = src.split("name:")[1].split()[0]
        if kind == "code" and src.startswith('""" # BEGIN TEST CONFIG'):
            config = src.split('""" # END TEST CONFIG')[0]
            out.append((question, float(config.split("points:")[1].split()[0]), "hidden: true" in config, src))
    return out


@pytest.fixture(scope="module")
def source_nb():
    import json

    return json.loads(SOURCE.read_text(encoding="utf-8"))


@pytest.mark.parametrize("v", [variants_norms.derive(SECRET), NormsVariant("channels_last", "all", "strided", "inside"),
                               NormsVariant("channels_last", "channel", "contiguous", "outside")],
                         ids=lambda v: "-".join(v.to_dict().values()))
def test_variant_notebook_tests_pass_on_its_key_and_fail_on_the_public_solution(source_nb, v):
    """What ``otter assign`` would run: the rewritten notebook's test cells match the checker's cases
    (question, points, hidden), pass on the rewritten answer cells (with the notebook's own answers
    to the other questions) and fail on the public solution's q4 / q5; the check cells run."""
    nb = variants_norms_nb.variant_notebook(source_nb, v)
    cells = _test_cells(nb)
    assert [(q, p, h) for q, p, h, _ in cells] == [(t.question, t.points, t.hidden) for t in checker_norms.make_tests(0, v)]
    key: dict = dict(_public_ns())  # the public solution (q7, q8's experiments' functions too), then
    for kind, src in _nb_cells(nb):  # imports, the provided forward and every answer cell of the rewritten notebook
        if kind == "code" and src.startswith(("import time", "def bn_", "def rel_error", "def layer_norm", "def group_norm", "def concepts", "def recompute")):
            exec(compile(src, "<answer>", "exec"), key)
    failed_public = []
    for q, points, hidden, src in cells:
        exec(compile(src, f"<{q} test>", "exec"), dict(key))
        if q in ("q4", "q5"):
            try:
                exec(compile(src, f"<{q} test>", "exec"), dict(_public_ns()))
            except Exception:  # AssertionError or a shape error: the public solution fails this test
                failed_public.append(points)
    print(f"public solution on the rewritten notebook's q4/q5 tests ({'; '.join(variants_norms.describe(v))}): "
          f"fails {len(failed_public)} tests, {sum(failed_public):g} of {Q45:g} points")
    assert sum(failed_public) >= 7
    import contextlib
    import io

    for kind, src in _nb_cells(nb):
        if kind == "code" and "numerical_gradient(lambda x:" in src:
            with contextlib.redirect_stdout(io.StringIO()) as out:
                exec(compile(src, "<check>", "exec"), dict(key))
            err = float(out.getvalue().split("numerical_gradient")[1].split()[0])
            assert err < 1e-5, out.getvalue()


def test_variant_notebook_states_the_conventions(source_nb):
    v = NormsVariant("channels_last", "channel", "strided", "outside")
    texts = [src for _, src in _nb_cells(variants_norms_nb.variant_notebook(source_nb, v))]
    q4 = next(t for t in texts if t.startswith("## Question 4"))
    q5 = next(t for t in texts if t.startswith("## Question 5"))
    for phrase in ["`(N, H, W, C)`", "over its `C` channels only", "**added to the standard deviation**", "`(C,)`"]:
        assert phrase in q4, phrase
    for phrase in ["`(N, H, W, C)`", "channel `c` belongs to group `c % G`", "**added to the standard deviation**"]:
        assert phrase in q5, phrase
    assert not any("F.layer_norm(_x" in t or "F.group_norm(_x" in t for t in texts)  # PyTorch's conventions: not these
    import json

    broken = json.loads(json.dumps(source_nb).replace("**consecutive** channels", "consecutive channels"))
    with pytest.raises(ValueError, match="not found"):
        variants_norms_nb.variant_notebook(broken, v)


def test_build_hooks_pick_the_norms_conventions(tmp_path):
    """build: a norms source takes the secret through variants_norms.derive, records the
    conventions under the norms key (read back by checker_norms.variant_of, which grade uses);
    assignment 1 is unchanged."""
    import json

    from bnviz.grading import build

    assert variants_norms_nb.is_norms_source(SOURCE) and not variants_norms_nb.is_norms_source("x/batch_norm.ipynb")
    assert variants_norms_nb.resolve(None).is_default and variants_norms_nb.resolve(SECRET) == variants_norms.derive(SECRET)
    with pytest.raises(TypeError, match="norms"):
        variants_norms_nb.resolve(variants.Variant())
    with pytest.raises(ValueError, match="secret is empty"):
        variants_norms_nb.resolve(" ")
    v = variants_norms.derive(SECRET)
    path = tmp_path / "norms.ipynb"
    path.write_text(json.dumps({"cells": [], "metadata": {}}))
    build._record_variant(path, v)
    student = json.loads(path.read_text())
    assert checker_norms.variant_of(student) == v and variants.VARIANT_META not in student["metadata"]
    assert [t.name for t in checker_norms.make_tests(0, checker_norms.variant_of(student))] == \
        [t.name for t in checker_norms.make_tests(0)]
    assert variants_norms_nb.describe_any(v.to_dict()) == variants_norms.describe(v)
    bn = variants.derive(SECRET)
    assert variants_norms_nb.describe_any(bn.to_dict()) == variants.describe(bn)
    assert variants_norms_nb.from_dict_any(v.to_dict()) == v and variants_norms_nb.from_dict_any(bn.to_dict()) == bn
    assert variants_norms_nb.from_dict_any(None) == variants.Variant()  # no variant: assignment 1's default, as before
    build._record_variant(path, bn)  # assignment 1: its own key, as before
    assert variants.variant_of(json.loads(path.read_text())) == bn


@pytest.mark.grading
def test_derived_variant_through_the_sandbox(bwrap, tmp_path, source_nb):
    """As assignment 1's variant is measured: every code cell of the variant's solution notebook as a
    submission, run by the sandboxed worker in both passes (the strict one blocks autograd in q4 and
    q5), judged by checker_norms; then the public solution notebook on the same variant's tests."""
    from test_assignment_norms import _sandboxed

    v = variants_norms.derive(SECRET)
    tests = checker_norms.make_tests(77, v)
    points = {t.name: t.points for t in tests}

    def cells_of(nb):
        return [(i, src) for i, (kind, src) in enumerate(_nb_cells(nb))
                if kind == "code" and not src.startswith('""" # BEGIN TEST CONFIG')]

    assert _sandboxed(cells_of(variants_norms_nb.variant_notebook(source_nb, v)), tests, tmp_path / "key") == [{}, {}]
    normal, strict = _sandboxed(cells_of(source_nb), tests, tmp_path / "public")
    assert {name.split(" - ")[0] for name in normal} == {"q4", "q5"} and set(strict) >= set(normal)
    score = TOTAL - sum(points[name] for name in normal)
    print(f"public solution on {SECRET!r} through the sandbox: {score:g}/{TOTAL:g} (the variant's key: {TOTAL:g}/{TOTAL:g})")
    assert score <= TOTAL - 7
