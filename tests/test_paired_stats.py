"""The verdict rule of chapters 05-07 (bnviz.verdicts): paired t-intervals against scipy, Holm,
and the measured CAUTION causes. No training: histories are built by hand."""
import math

import pytest
from scipy import stats as sps

from bnviz import experiments as ex
from bnviz import verdicts as vd
from run_helpers import hand_run


@pytest.mark.parametrize("ref, other", [
    ([0.80, 0.82, 0.84], [0.83, 0.86, 0.86]),  # 3 seeds (CPU)
    ([0.71, 0.74, 0.69, 0.75, 0.72], [0.73, 0.77, 0.70, 0.74, 0.76]),  # 5 seeds (GPU)
    ([0.5, 0.6, 0.7], [0.1, 0.1, 0.1]),  # an arm stuck at chance
])
def test_paired_matches_scipy_ttest_rel(ref, other):
    p = vd.paired(ref, other)
    want = sps.ttest_rel(other, ref)
    ci = want.confidence_interval(0.95)
    assert p.n == len(ref) and p.kind == "paired"
    assert math.isclose(p.t, want.statistic, rel_tol=1e-9) and math.isclose(p.p, want.pvalue, rel_tol=1e-9)
    assert p.ci == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert math.isclose(p.delta, sum(other) / len(other) - sum(ref) / len(ref), abs_tol=1e-12)
    # one rule for 3 and 5 seeds: "better/worse" exactly when the 5% test rejects
    assert p.significant == (want.pvalue < 0.05)
    assert p.outcome in ((vd.Outcome.BETTER, vd.Outcome.WORSE) if want.pvalue < 0.05 else (vd.Outcome.WITHIN_NOISE,))


def test_the_threshold_printed_is_the_threshold_applied():
    ref, other = [0.80, 0.82, 0.84], [0.83, 0.86, 0.86]
    v = ex.verdict(ex.seed_stats(ref), ex.seed_stats(other))
    p = vd.paired(ref, other)
    assert v.half_width == p.half_width == pytest.approx(sps.t.ppf(0.975, 2) * p.sd / math.sqrt(3))
    # the verdict flips exactly where |Δ| crosses the printed threshold
    shift = [x + v.half_width * 1.001 - p.delta for x in other]
    assert vd.paired(ref, shift).outcome is vd.Outcome.BETTER
    shift = [x + v.half_width * 0.999 - p.delta for x in other]
    assert vd.paired(ref, shift).outcome is vd.Outcome.WITHIN_NOISE


def test_a_stuck_arm_does_not_shrink_the_threshold():
    moving = [0.50, 0.60, 0.70]
    stuck = [0.100, 0.100, 0.100]
    p = vd.paired(stuck, moving)
    assert p.sd == pytest.approx(ex.seed_stats(moving).std)  # not the pooled (0.1 + 0) / 2 ...
    assert p.half_width > 2 * ex.pooled_std(ex.seed_stats(moving), ex.seed_stats(stuck))


def test_diverged_seeds_are_dropped_from_the_pairs_and_named():
    ref, other = ex.seed_stats([0.8, 0.82, 0.81]), ex.seed_stats([0.9, None, 0.91])
    v = ex.verdict(ref, other)
    assert v.n_pairs == 2 and v.kind == "paired"
    assert v.has(vd.CauseKind.DIVERGED, "this variant") and not v.has(vd.CauseKind.DIVERGED, "reference")
    assert "diverged seeds (1 of 3)" in str(v) and "CAUTION" in str(v)
    dead = ex.verdict(ref, ex.seed_stats([None, None, None]))
    assert dead.outcome is vd.Outcome.NOT_COMPARABLE and dead.test is None and "no comparison" in str(dead)
    stuck = ex.verdict(ex.seed_stats([0.1, 0.11, 0.1]), ex.seed_stats([0.1, 0.1, 0.12]))
    assert stuck.outcome is vd.Outcome.NOT_COMPARABLE and str(stuck).startswith("no comparison: both never left chance")


def test_unpaired_fallback_is_welch():
    a, b = ex.seed_stats([0.80, 0.82, 0.84]), ex.seed_stats([0.86, 0.90, 0.94, 0.9])
    v = ex.verdict(a, b)
    want = sps.ttest_ind(b.values, a.values, equal_var=False)
    assert v.kind == "welch" and math.isclose(v.p, want.pvalue, rel_tol=1e-6)


def test_holm_against_its_definition():
    ps = [0.01, 0.04, 0.03, 0.005, float("nan")]
    adj = vd.holm(ps)
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1 -> max(0.06, 0.04)=0.06
    assert adj[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02]) and math.isnan(adj[4])
    note = vd.multiplicity_note(ps[:4])
    assert "4 comparisons" in note and "4 came out" in note and "0.2 would" in note and "keeps 2 of them" in note


# ----------------------------------------------------------------------------- causes


_run = hand_run


def _texts(*a, **k):
    return [str(c) for c in vd.cell_causes(*a, **k)]


def test_each_cause_is_measured_and_named():
    flat = [0.5] * 12
    rising = [0.3 + 0.03 * i for i in range(12)]  # +0.09 over the last quarter against the one before
    assert _texts([_run(flat, [0.6, 0.6, 0.6], seed=s) for s in range(3)]) == []
    chance = _texts([_run([0.1] * 12, [a] * 3, seed=s) for s, a in enumerate((0.10, 0.11, 0.113))])
    assert chance == ["never left chance (best seed 0.113 < 0.15)"]
    still = _texts([_run(rising, [0.6, 0.7, 0.8], seed=s) for s in range(3)])  # +0.09 with 0.4 left
    assert len(still) == 1 and still[0].startswith("nearly converged: training accuracy +0.090 ±")
    assert still[0].endswith("0.22× the training error left (0.400)")
    noisy = [0.5 + (0.2 if i % 2 else -0.2) for i in range(11)] + [0.7]  # a gain of +0.13 between the quarters, inside ±0.2 noise
    assert _texts([_run(noisy, [0.6] * 3, seed=s) for s in range(3)]) == []
    runs = [_run(flat, [0.6] * 3, seed=0), _run(flat, [0.6] * 3, status="diverged", seed=1)]
    assert _texts(runs) == ["diverged seeds (1 of 2)"]
    far = _texts([_run(flat, [0.53] * 3, seed=s) for s in range(3)], full_size=0.88)
    assert far == ["not converged: far below its full-size accuracy (0.530 vs 0.880)"]
    sat = _texts([_run(flat, [0.6] * 3, saturated=0.62, seed=s) for s in range(3)])
    assert sat == ["saturation (62% of sigmoid outputs (all layers pooled) saturated at the end)"]
    assert _texts([_run(flat, [0.6] * 3, saturated=0.4)]) == []


def test_caution_is_per_cell_not_per_model():
    """The 05 bug: a no-BN arm at chance at lr 0.1 was hidden because the caution grouped by model."""
    from bnviz.experiments import GridResult

    runs = []
    for lr, accs in ((0.1, [0.10, 0.11, 0.105]), (1.0, [0.60, 0.65, 0.62])):
        for s, a in enumerate(accs):
            r = _run([0.5] * 12, [a] * 3, seed=s)
            r.tags = {"model": "no BN", "lr": lr, "seed": s}
            runs.append(r)
    text = ex.caution(GridResult(runs, "SYNTHETIC"))
    assert "CAUTION: no BN, lr 0.1: never left chance (best seed 0.110 < 0.15)" in text
    assert "lr 1.0" not in text


# ----------------------------------------------------------------------------- typed results


def test_causes_are_typed_values_with_their_measured_numbers():
    rising = [0.3 + 0.03 * i for i in range(12)]
    (still,) = vd.cell_causes([_run(rising, [0.6, 0.7, 0.8], seed=s) for s in range(3)])
    assert still.kind is vd.CauseKind.NEARLY_CONVERGED and still.value == pytest.approx(0.09)
    assert not still.unconverged and not still.caution and still.ref == pytest.approx(0.4)
    (chance,) = vd.cell_causes([_run([0.1] * 12, [a] * 3, seed=s) for s, a in enumerate((0.10, 0.11, 0.113))])
    assert chance.kind is vd.CauseKind.NEVER_LEFT_CHANCE and chance.value == pytest.approx(0.113)
    assert chance.ref == vd.CHANCE_LIMIT and not chance.unconverged
    runs = [_run([0.5] * 12, [0.6] * 3, seed=0), _run([0.5] * 12, [0.6] * 3, status="diverged", seed=1)]
    (div,) = vd.cell_causes(runs)
    assert (div.kind, div.value, div.ref) == (vd.CauseKind.DIVERGED, 1, 2)
    (far,) = vd.cell_causes([_run([0.5] * 12, [0.53] * 3, seed=s) for s in range(3)], full_size=0.88)
    assert far.kind is vd.CauseKind.FAR_BELOW_FULL_SIZE and (far.value, far.ref) == pytest.approx((0.53, 0.88))
    (sat,) = vd.cell_causes([_run([0.5] * 12, [0.6] * 3, saturated=0.62, seed=s) for s in range(3)])
    assert sat.kind is vd.CauseKind.SATURATION and sat.value == pytest.approx(0.62)


@pytest.mark.parametrize("ref, other, outcome", [
    ([0.80, 0.82, 0.84], [0.90, 0.93, 0.95], vd.Outcome.BETTER),
    ([0.80, 0.82, 0.84], [0.70, 0.71, 0.75], vd.Outcome.WORSE),
    ([0.80, 0.82, 0.84], [0.81, 0.80, 0.86], vd.Outcome.WITHIN_NOISE),
    ([0.80, 0.82, 0.84], [None, None, 0.86], vd.Outcome.NOT_COMPARABLE),  # one pair left
    ([0.10, 0.11, 0.10], [0.10, 0.10, 0.12], vd.Outcome.NOT_COMPARABLE),  # both stuck at chance
])
def test_the_outcome_comes_from_the_numbers_not_the_sentence(monkeypatch, ref, other, outcome):
    v = ex.verdict(ex.seed_stats(ref), ex.seed_stats(other), names=("a", "b"))
    assert v.outcome is outcome and v.decided == (outcome in (vd.Outcome.BETTER, vd.Outcome.WORSE))
    if outcome is not vd.Outcome.NOT_COMPARABLE:
        assert v.decided == (v.ci[0] > 0 or v.ci[1] < 0)  # decided exactly when the interval excludes 0
    # rewording every sentence changes no outcome, no cause and no number
    monkeypatch.setattr(vd.Cause, "__str__", lambda self: "reworded cause")
    monkeypatch.setattr(vd.Paired, "__str__", lambda self: "reworded test")
    w = ex.verdict(ex.seed_stats(ref), ex.seed_stats(other), names=("a", "b"))
    assert w.outcome is v.outcome and w.causes == v.causes and w.decided == v.decided
    assert w.delta == v.delta or (math.isnan(w.delta) and math.isnan(v.delta))
    assert "reworded" in str(w) or str(w).startswith("no comparison")


def _grid():
    from bnviz.runs import GridResult

    runs = []
    for model, lr, accs in (("BN", 1.0, [0.80, 0.82, 0.84]), ("BN", 0.1, [0.70, 0.71, 0.75]),
                            ("no BN", 1.0, [0.60, 0.62, 0.61])):
        for s, a in reversed(list(enumerate(accs))):  # stored out of seed order on purpose
            r = _run([0.5] * 12, [a] * 3, seed=s)
            r.tags = {"model": model, "lr": lr, "seed": s}
            runs.append(r)
    return GridResult(runs, "SYNTHETIC")


def test_a_chapter_asks_a_cell_for_numbers():
    res = _grid()
    c = res.cell(model="BN", lr=1.0)
    assert c.values() == pytest.approx([0.80, 0.82, 0.84])  # seed order
    assert c.mean == pytest.approx(0.82) and c.std == pytest.approx(0.02) and c.causes == []
    assert c.name == "BN, lr 1" and c.tags == {"model": "BN", "lr": 1.0}
    v = res.cell(model="BN", lr=0.1).vs(c)
    assert v.outcome is vd.Outcome.WORSE and v.names == ("BN, lr 1", "BN, lr 0.1")
    assert v.delta == pytest.approx(vd.paired([0.80, 0.82, 0.84], [0.70, 0.71, 0.75]).delta)
    assert [x.name for x in res.cells()] == ["BN, lr 1", "BN, lr 0.1", "no BN, lr 1"]
    with pytest.raises(ValueError, match="match 2 cells"):
        res.cell(model="BN")
    with pytest.raises(KeyError, match="no run has the tags"):
        res.cell(model="BN", lr=3.0)
