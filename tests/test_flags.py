"""The flags of issue 25 (bnviz.verdicts.cell_causes): convergence graded by the gain against the
training error left; cells that saw under one epoch; seeds that learned while others did not;
saturation per layer. And Holm carried into the readings: the chapter's ledger (bnviz.course.Chapter)
counts no test twice and each recorded verdict says "holds after Holm" or "nominal". No training
but the per-layer saturation probe on an untrained LeNet."""
import pytest
import torch

from bnviz import build_lenet, preset
from bnviz import experiments as ex
from bnviz import verdicts as vd
from bnviz.course import Chapter
from bnviz.runs import Cell
from run_helpers import hand_run

K = vd.CauseKind


def _cell(curve, accs=(0.6, 0.6, 0.6), **kw):
    return [hand_run(curve, [a] * 3, seed=s, **kw) for s, a in enumerate(accs)]


# the two cells of the issue: LeNet-BN at 0.92 gaining +0.028, no BN at 0.758 gaining +0.367
BN_CURVE = [0.5] * 6 + [0.892] * 3 + [0.92] * 3
NO_BN_CURVE = [0.1] * 6 + [0.391] * 3 + [0.758] * 3


def test_convergence_is_graded_by_the_gain_against_the_error_left():
    (bn,) = vd.cell_causes(_cell(BN_CURVE))
    (plain,) = vd.cell_causes(_cell(NO_BN_CURVE))
    assert bn.kind is K.NEARLY_CONVERGED and plain.kind is K.STILL_IMPROVING
    assert (bn.value, bn.ref) == pytest.approx((0.028, 0.08)) and (plain.value, plain.ref) == pytest.approx((0.367, 0.242))
    assert str(bn).startswith("nearly converged: training accuracy +0.028") and "0.35× the training error left" in str(bn)
    assert str(plain).startswith("far from converged: training accuracy +0.367") and "1.5×" in str(plain)
    # far is a CAUTION and unconverged; nearly converged is a note, not a CAUTION
    assert plain.caution and plain.unconverged and not bn.caution and not bn.unconverged
    # the grade's line: half the error left
    (edge,) = vd.cell_causes(_cell([0.5] * 6 + [0.6] * 3 + [0.8] * 3))  # +0.2 with 0.2 left: far
    assert edge.kind is K.STILL_IMPROVING
    (below,) = vd.cell_causes(_cell([0.5] * 6 + [0.7] * 3 + [0.79] * 3))  # +0.09 with 0.21 left: nearly
    assert below.kind is K.NEARLY_CONVERGED
    # in a verdict: the note is printed, not as a CAUTION
    cells = {"BN": Cell((("variant", "BN"),), _cell(BN_CURVE, (0.90, 0.91, 0.93))),
             "no BN": Cell((("variant", "no BN"),), _cell(NO_BN_CURVE, (0.70, 0.74, 0.76)))}
    v = cells["BN"].vs(cells["no BN"])
    assert v.cautioned and v.caution().startswith("no BN: far from converged") and "BN: nearly" not in v.caution()
    assert "(note: BN: nearly converged" in str(v)
    quiet = cells["BN"].vs(Cell((("variant", "BN2"),), _cell([0.9] * 12, (0.90, 0.91, 0.93))))
    assert not quiet.cautioned and "CAUTION" not in str(quiet)


def test_a_cell_that_saw_under_one_epoch_is_flagged():
    flat = [0.5] * 12
    (short,) = vd.cell_causes(_cell(flat, examples=2000), train_size=8000)
    assert short.kind is K.UNDER_ONE_EPOCH and short.value == pytest.approx(0.25) and short.ref == 1
    assert short.caution and short.unconverged and str(short) == "under one epoch: saw 0.25 of the training set"
    assert vd.cell_causes(_cell(flat, examples=8000), train_size=8000) == []
    assert vd.cell_causes(_cell(flat, examples=24000), train_size=8000) == []
    # without the experiment's size, the run's own config.train_size is used
    (own,) = vd.cell_causes(_cell(flat, examples=500, train_size=1000))
    assert own.kind is K.UNDER_ONE_EPOCH and own.value == pytest.approx(0.5)
    assert vd.cell_causes(_cell(flat, examples=500)) == []  # no size known: nothing claimed
    # a grid's cell knows the training set the grid drew from
    runs = _cell(flat, examples=2000)
    for r in runs:
        r.tags = {"norm": "BN", "batch_size": 2, "seed": r.tags["seed"]}
    grid = ex.GridResult(runs, "SYNTHETIC", train_size=8000)
    assert [c.kind for c in grid.cell(norm="BN", batch_size=2).causes] == [K.UNDER_ONE_EPOCH]
    assert "under one epoch" in ex.caution(grid)


def test_seeds_that_learned_are_counted_per_seed():
    (mixed,) = vd.cell_causes(_cell([0.5] * 12, (0.093, 0.462, 0.678)))
    assert mixed.kind is K.SOME_SEEDS_LEARNED and (mixed.value, mixed.ref) == (2, 3) and mixed.caution
    assert str(mixed) == "2 of 3 seeds learned (the other stayed below 0.15)"
    assert str(vd.Cause(K.SOME_SEEDS_LEARNED, 1, 3)) == "1 of 3 seeds learned (the others stayed below 0.15)"
    assert [c.kind for c in vd.cell_causes(_cell([0.1] * 12, (0.10, 0.11, 0.12)))] == [K.NEVER_LEFT_CHANCE]
    assert vd.cell_causes(_cell([0.5] * 12, (0.45, 0.46, 0.48))) == []
    # the float-only path (seed_stats of values) says the same
    assert [c.kind for c in vd.seed_stats([0.093, 0.462, 0.678]).causes] == [K.SOME_SEEDS_LEARNED]
    # a diverged seed is not a seed that stayed at chance
    runs = [hand_run([0.5] * 12, [0.6] * 3), hand_run([0.5] * 12, [0.6] * 3, status="diverged", seed=1)]
    assert [c.kind for c in vd.cell_causes(runs)] == [K.DIVERGED]


def test_saturation_is_per_layer():
    # conv1 has most of the outputs: pooled, fc1's 80% would drown in conv1's 30%
    sat = {"conv1": 0.30, "conv2": 0.10, "fc1": 0.80, "fc2": 0.40}
    (fc1,) = vd.cell_causes(_cell([0.5] * 12, saturated=sat))
    assert fc1.kind is K.SATURATION and fc1.layer == "fc1" and fc1.value == pytest.approx(0.80)
    assert str(fc1) == "saturation (80% of fc1's sigmoid outputs saturated at the end)"
    both = vd.cell_causes(_cell([0.5] * 12, saturated={**sat, "conv1": 0.9}))
    assert [(c.layer, round(c.value, 2)) for c in both] == [("conv1", 0.9), ("fc1", 0.8)]
    # a probe's per-layer measurement, handed to the cell, decides over the pooled snapshot value
    runs = _cell([0.5] * 12, saturated=0.2)
    assert vd.cell_causes(runs) == []
    (probe,) = vd.cell_causes(runs, saturation={"conv1": 0.2, "fc2": 0.7})
    assert probe.layer == "fc2"
    assert [c.layer for c in Cell((("variant", "v"),), runs, saturation={"fc2": 0.7}).causes] == ["fc2"]


def test_saturation_alone_is_a_note_and_beside_another_caution_a_caution():
    """A cell that learned and settled with saturated sigmoids (confident units) gets a note; the
    same saturation in a cell that never left chance, or is still far from converged, is a CAUTION."""
    settled = vd.cell_causes(_cell([0.9] * 12, (0.90, 0.91, 0.92), saturated={"fc2": 0.7}))
    assert [(c.kind, c.caution) for c in settled] == [(K.SATURATION, False)]
    assert vd.describe(settled, notes=False) == "" and "fc2" in vd.describe(settled)
    stuck = vd.cell_causes(_cell([0.1] * 12, (0.10, 0.11, 0.10), saturated={"fc2": 0.7}))
    assert [(c.kind, c.caution) for c in stuck] == [(K.NEVER_LEFT_CHANCE, True), (K.SATURATION, True)]
    climbing = vd.cell_causes(_cell([0.1] * 6 + [0.391] * 3 + [0.758] * 3, (0.7, 0.7, 0.7), saturated={"fc2": 0.7}))
    assert [(c.kind, c.caution) for c in climbing] == [(K.STILL_IMPROVING, True), (K.SATURATION, True)]
    # a verdict against a settled, saturated reference carries no CAUTION for it
    ref, other = vd.seed_stats([0.90, 0.91, 0.92]), vd.seed_stats([0.80, 0.81, 0.83])
    ref.causes = settled
    assert not vd.verdict(ref, other).cautioned


def test_the_saturation_probe_measures_each_layer_alone():
    torch.manual_seed(0)
    net = build_lenet(preset("lenet")).train()
    with torch.no_grad():
        net.fc1.weight.mul_(200)  # drive fc1's sigmoids into their tails, leave the others
    x = torch.rand(16, 1, 28, 28)
    got = ex.saturation_by_layer(net, x)
    assert list(got) == ["conv1", "conv2", "fc1", "fc2"] and net.training  # mode restored
    outs = {}
    hooks = [getattr(net, f"act_{n}").register_forward_hook(lambda m, i, o, n=n: outs.__setitem__(n, o))
             for n in got]
    net.eval()
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    for n, o in outs.items():
        assert got[n] == pytest.approx(float(((o < 0.05) | (o > 0.95)).float().mean()))
    assert got["fc1"] > 0.5 > got["conv2"]
    assert ex.saturation_by_layer(build_lenet(preset("lenet-bn", activation="relu")), x) == {}


# ----------------------------------------------------------------------------- Holm in the readings


def _v(ref, other, names=("a", "b")):
    return vd.verdict(vd.seed_stats(ref), vd.seed_stats(other), names=names)


def test_each_recorded_verdict_says_holds_after_holm_or_nominal():
    ch = Chapter("x", (0, 1, 2))
    strong = ch.record("strong", _v([0.80, 0.82, 0.84], [0.90, 0.93, 0.95]))  # p ≈ 0.001
    weak = ch.record("weak", _v([0.80, 0.82, 0.84], [0.82, 0.86, 0.87]))      # p ≈ 0.03
    noise = ch.record("noise", _v([0.80, 0.82, 0.84], [0.81, 0.80, 0.86]))
    assert weak.p < 0.05 and weak.decided
    adj = ch.holm()
    assert adj["strong"] < 0.05 <= adj["weak"]
    assert strong.holm_status(words=False) == vd.HOLDS and strong.held
    assert weak.holm_status(words=False) == vd.NOMINAL and not weak.held
    assert noise.holm_status() == "" and not noise.held  # within noise: nothing to hold
    assert "[holds after Holm (adjusted p" in str(strong) and "3 tests so far" in str(strong)
    assert f"[nominal: p {weak.p:.2g}, Holm-adjusted {adj['weak']:.2g} over 3 tests so far]" in str(weak)
    assert ch.status("strong") == vd.HOLDS and ch.status("weak") == vd.NOMINAL and ch.status("noise") == ""
    ch.report()
    assert "3 tests)]" in str(strong) and "so far" not in str(strong)  # the family is closed
    with pytest.raises(ValueError, match="closed"):
        ch.record("late", _v([0.5, 0.6, 0.7], [0.6, 0.7, 0.85]))
    # an unrecorded verdict claims nothing
    assert _v([0.80, 0.82, 0.84], [0.90, 0.93, 0.95]).holm_status() == ""
    # a Paired (an interaction) is recorded the same way
    ch2 = Chapter("y", (0, 1, 2))
    p = ch2.record("interaction", vd.paired([0.1, 0.2, 0.3], [0.3, 0.41, 0.52]))
    assert p.holm_status().startswith("holds after Holm") and "[holds after Holm" in str(p)


def test_no_test_is_counted_twice_in_a_family():
    ch = Chapter("x", (0, 1, 2))
    v = _v([0.80, 0.82, 0.84], [0.90, 0.93, 0.95], names=("base", "no BN"))
    ch.record("base vs no BN", v)
    ch.record("base vs no BN", v)  # the same name, the same test: once
    # the same arms under another name (06 asked base vs no BN in three places): an alias, once
    again = ch.record("no BN against the base (dropout section)", _v([0.80, 0.82, 0.84], [0.90, 0.93, 0.95],
                                                                     names=("no BN", "base")))
    assert list(ch.pvalues) == ["base vs no BN"] and ch.aliases == {
        "no BN against the base (dropout section)": "base vs no BN"}
    assert again.ledger[1] == "base vs no BN" and again.held
    # a name reused for a different test is refused
    with pytest.raises(ValueError, match="already in x's ledger with another test"):
        ch.record("base vs no BN", _v([0.80, 0.82, 0.84], [0.70, 0.71, 0.75]))
    # two different tests that both have nothing to compare are not the same test
    ch.record("dead 1", _v([None, None, None], [0.5, 0.6, 0.7]))
    ch.record("dead 2", _v([None, None, None], [0.5, 0.6, 0.8]))
    assert {"dead 1", "dead 2"} <= set(ch.pvalues)


def test_bind_finds_a_recorded_test_and_adds_none():
    ch = Chapter("x", (0, 1, 2))
    ch.record("b vs a", _v([0.80, 0.82, 0.84], [0.90, 0.93, 0.95]))
    again = ch.bind(_v([0.80, 0.82, 0.84], [0.90, 0.93, 0.95]))
    assert again.ledger == (ch, "b vs a") and again.reading() == "better (holds after Holm so far)"
    stranger = ch.bind(_v([0.80, 0.82, 0.84], [0.70, 0.71, 0.75]))
    assert stranger.ledger is None and stranger.reading() == "worse (nominal: not in the chapter's Holm family)"
    assert list(ch.pvalues) == ["b vs a"]
    ch.report()
    assert ch.bind(_v([0.80, 0.82, 0.84], [0.90, 0.93, 0.95])).reading() == "better (holds after Holm)"


def test_the_same_arms_are_one_test_and_equal_numbers_are_not():
    """Arms stuck at chance give equal accuracies by coincidence (a constant prediction): different
    arms with equal numbers are different tests; the same arms (same configs, trained twice) are one."""
    def cell(name, lr, accs):
        runs = [hand_run([0.5] * 12, [a] * 3, seed=s) for s, a in enumerate(accs)]
        for r in runs:
            r.history.config = r.history.config.replace(lr=lr)
        return Cell((("variant", name),), runs)

    base = cell("base", 1.0, (0.80, 0.82, 0.84))
    ch = Chapter("x", (0, 1, 2))
    ch.record("LayerNorm vs base", cell("LayerNorm", 0.5, (0.109, 0.109, 0.109)).vs(base))
    ch.record("GroupNorm vs base", cell("GroupNorm", 0.3, (0.109, 0.109, 0.109)).vs(base))
    assert list(ch.pvalues) == ["LayerNorm vs base", "GroupNorm vs base"] and not ch.aliases
    # the no-BN arm trained again (another label, the same config): the same test
    ch.record("no BN vs base", cell("no BN", 0.5, (0.109, 0.109, 0.109)).vs(base))
    assert ch.aliases == {"no BN vs base": "LayerNorm vs base"}
    # models given as functions share one config: their losses tell them apart (06's deep MLPs)
    other = cell("residual", 0.5, (0.109, 0.109, 0.109))
    for r in other.runs:
        r.history.snapshots[-1].loss = 2.3456
    ch.record("residual vs base", other.vs(base))
    assert "residual vs base" in ch.pvalues


def test_a_diverged_run_is_not_under_one_epoch():
    runs = [hand_run([0.5] * 12, [0.6] * 3, seed=0, examples=8000),
            hand_run([0.5] * 12, [0.6] * 3, status="diverged", seed=1, examples=300)]
    assert [c.kind for c in vd.cell_causes(runs, train_size=8000)] == [K.DIVERGED]


def test_log_axes_get_more_than_one_full_label():
    import plotly.graph_objects as go

    from bnviz.figures import _log_y_ticks

    for values, want in (([0.45, 5.8], ("0.5", "1", "2", "5")), ([0.77, 3.9], ("1", "2"))):
        f = go.Figure()
        _log_y_ticks(f, values)
        assert f.layout.yaxis.ticktext == want
    f = go.Figure()
    _log_y_ticks(f, [1.01, 1.05])  # under a decade, no 1-2-5 value inside: four distinct labels
    assert len(set(f.layout.yaxis.ticktext)) == 4


def test_a_table_cell_gets_the_short_status():
    ch = Chapter("x", (0, 1, 2))
    strong = ch.record("strong", _v([0.80, 0.82, 0.84], [0.90, 0.93, 0.95]))
    weak = ch.record("weak", _v([0.80, 0.82, 0.84], [0.82, 0.86, 0.87]))
    ch.record("noise", _v([0.80, 0.82, 0.84], [0.81, 0.80, 0.86]))  # a third test: Holm no longer keeps 'weak'
    assert strong.headline(short=True).endswith("[holds after Holm]") and weak.headline(short=True).endswith("[nominal]")
    assert len(weak.headline(short=True)) < 100  # fits a table cell (pandas max_colwidth 100)
    assert "Holm-adjusted" in weak.headline()


def test_a_note_is_not_listed_as_a_caution():
    runs = _cell(BN_CURVE, (0.90, 0.91, 0.93))
    for r in runs:
        r.tags = {"model": "BN", "lr": 1.0, "seed": r.tags["seed"]}
    grid = ex.GridResult(runs, "SYNTHETIC")
    assert ex.summarize(grid, ("model", "lr"))["caution"].tolist() == [""]
    text = ex.caution(grid)
    assert text.startswith("note: BN, lr 1: nearly converged") and "CAUTION" not in text
    # and in a comparison's table
    runs = []
    for v in ("BN", "BN again"):
        for r in _cell(BN_CURVE, (0.90, 0.91, 0.93)):
            r.tags = {"variant": v, "seed": r.tags["seed"]}
            runs.append(r)
    cmp = ex.Comparison("BN", ["BN", "BN again"], (0, 1, 2), ex.GridResult(runs, "SYNTHETIC"))
    assert cmp.table()["caution"].tolist() == ["", ""]


def test_a_bimodal_cell_is_reported_as_such_and_no_interval_wider_than_possible_is_printed():
    """05's lr-3 cell (seeds 0.093 / 0.462 / 0.678) against a steady cell: the cell reads as
    bimodal with its seeds, and the verdict prints no 95% CI reaching past +1 (the interval is
    computed as scipy's, then withheld in words)."""
    from scipy import stats as sps

    from bnviz.verdicts import fmt_stats, seed_stats, verdict

    ref, odd = seed_stats([0.10, 0.10, 0.10]), seed_stats([0.093, 0.462, 0.978])
    text = fmt_stats(odd)
    assert text.startswith("bimodal: seeds 0.093 / 0.462 / 0.978")
    assert fmt_stats(seed_stats([0.80, 0.82, 0.81])).startswith("0.810 ± 0.010")
    v = verdict(ref, odd)
    lo, hi = sps.ttest_rel([0.093, 0.462, 0.978], [0.10] * 3).confidence_interval()
    assert hi > 1 and v.ci == pytest.approx((lo, hi))
    assert "wider than the possible range" in str(v) and f"{hi:+.3f}" not in str(v)
    narrow = verdict(seed_stats([0.5, 0.52, 0.51]), seed_stats([0.6, 0.61, 0.63]))
    assert "95% CI +" in str(narrow)


def test_an_arm_is_shared_between_sections_not_trained_again(monkeypatch):
    """Comparison.select + compare(include=...): the no-BN arm of one section is reused by another
    under its own name; run_grid is asked to train only the new variant, the shared cell holds the
    same History objects, and the ledger counts the shared contrast once."""
    from bnviz import Config, comparisons
    from bnviz.runs import GridResult, Run

    def fake_grid(runs_by_variant):
        return GridResult([Run(f"{v} · seed {r.tags['seed']}", {"variant": v, "seed": r.tags["seed"]}, r.history)
                           for v, rs in runs_by_variant.items() for r in rs], "SYNTHETIC", 1000)

    first = comparisons.Comparison("base", ["base", "avg pool, no BN"], (0, 1, 2), fake_grid({
        "base": _cell(BN_CURVE, (0.92, 0.93, 0.91)), "avg pool, no BN": _cell(NO_BN_CURVE, (0.75, 0.76, 0.74))}))
    trained = []

    def run_grid(base, variants, seeds, **kw):
        trained.extend(variants)
        return fake_grid({v: _cell(BN_CURVE, (0.80, 0.81, 0.79)) for v in variants})

    monkeypatch.setattr(comparisons, "run_grid", run_grid)
    shared = first.select({"base": "base", "avg pool, no BN": "no BN"})
    every = comparisons.compare(Config(), {"base": {}, "fc only": {"norm_layers": ("fc1", "fc2")}, "no BN": {"norm": "none"}},
                                seeds=(0, 1, 2), include=shared, progress=False)
    assert trained == ["fc only"]  # base and no BN are not trained again
    assert every.variants == ["base", "fc only", "no BN"]
    assert [r.history for r in every.runs_of("no BN")] == [r.history for r in first.runs_of("avg pool, no BN")]
    ch = Chapter("t", (0, 1, 2))
    ch.record("BN vs no BN (pooling section)", first.contrast("avg pool, no BN", "base"))
    ch.record("BN vs no BN (every-layer section)", every.contrast("no BN", "base"))
    assert len(ch.holm()) == 1
    with pytest.raises(ValueError, match="no variant"):
        first.select({"max pool": "x"})
