"""The experiment machinery of chapters 05-07 (bnviz.experiments, bnviz.figures) on tiny synthetic runs."""
import math

import pytest
import torch
from torch import nn

from bnviz import Config, build_lenet, make_synthetic, preset
from bnviz import experiments as ex
from bnviz import sweeps
from bnviz import figures as fg
from bnviz.data import to_float
from bnviz.history import History


@pytest.fixture(scope="module")
def data():
    return make_synthetic(256, 128, seed=2)


def base(**kw):
    d = dict(model=preset("lenet-bn"), dataset="synthetic", batch_size=64, lr=0.5, epochs=1,
             snapshot_every=2, device="cpu")
    d.update(kw)
    return Config(**d)


# ----------------------------------------------------------------------------- grids


def test_pooling_grid_has_four_runs_with_their_settings(data):
    variants = {f"{pool}, {'BN' if bn else 'no BN'}": {"pool": pool, "norm": "torch" if bn else "none"}
                for pool in ("avg", "max") for bn in (False, True)}
    res = ex.run_grid(base(), variants, data=data, progress=False)
    assert [r.label for r in res] == list(variants)
    for r in res:
        spec = r.history.config.model
        assert spec.pool == r.tags["pool"]
        assert spec.is_batch_norm == (r.tags["norm"] == "torch")
        assert r.history.config.label == r.label  # legends name the run
        assert r.status == "finished" and 0.0 <= r.test_acc <= 1.0
    table = res.table()
    assert len(table) == 4 and {"pool", "norm", "train_acc", "test_acc", "gap", "status"} <= set(table.columns)
    assert res.dataset_label == data.label and "SYNTHETIC" in res.dataset_label
    # The two models really differ: BN layers exist only where asked.
    assert res["max, BN"].history.config.model.norm == "torch"
    assert res["avg, no BN"].history.config.model.norm == "none"


def test_apply_changes_routes_fields_and_rejects_unknown():
    cfg = ex.apply_changes(base(), {"lr": 0.1, "pool": "max", "padding": 2, "batch_size": 32})
    assert (cfg.lr, cfg.batch_size, cfg.model.pool, cfg.model.padding) == (0.1, 32, "max", 2)
    assert ex.apply_changes(base(), {"model": "lenet"}).model == preset("lenet")
    with pytest.raises(ValueError, match="unknown setting.*colour"):
        ex.apply_changes(base(), {"colour": "red"})
    with pytest.raises(ValueError, match="pool"):
        ex.apply_changes(base(), {"pool": "median"})


def test_grid_subsets_data_when_a_variant_asks_for_fewer_examples(data):
    res = ex.run_grid(base(), {"all": {}, "half": {"train_size": 128}}, data=data, progress=False)
    assert res["all"].history.snapshots[-1].examples == 256
    assert res["half"].history.snapshots[-1].examples == 128


def test_lr_sweep_has_one_row_per_model_and_lr(data):
    lrs = [0.1, 1.0, 300.0]
    res = ex.lr_sweep(base(), lrs, {"BN": preset("lenet-bn"), "no BN": preset("lenet", padding=0)},
                      data=data, progress=False)
    t = res.table()
    assert len(t) == 6
    assert sorted(zip(t["model"], t["lr"])) == sorted((m, lr) for m in ("BN", "no BN") for lr in lrs)
    for r in res:
        assert r.history.config.lr == r.tags["lr"]
        assert r.history.config.model.is_batch_norm == (r.tags["model"] == "BN")
    # lr 300 without BN blows up the loss: the trainer must say so (not a silent 'finished').
    assert res["no BN, lr 300"].status == "diverged"


# ----------------------------------------------------------------------------- max_lr


def rows(model, pairs, status=None):
    status = status or {}
    return [{"model": model, "lr": lr, "test_acc": acc, "status": status.get(lr, "finished")} for lr, acc in pairs]


def test_max_lr_follows_its_definition():
    r = rows("A", [(0.1, 0.70), (1.0, 0.80), (3.0, 0.77), (10.0, 0.74), (30.0, 0.30)])
    r += rows("B", [(0.1, 0.60), (1.0, 0.62), (10.0, 0.61), (100.0, 0.80)], status={100.0: "diverged"})
    out = ex.max_lr(r, tolerance=0.05)
    # A: best 0.80 at lr 1; within 0.05: lrs 1 and 3 (0.77); 10 gives 0.74 < 0.75.
    assert out["A"].lr == 3.0 and out["A"].best_lr == 1.0 and out["A"].best_acc == 0.80
    assert out["A"].acc_at_max == 0.77 and out["A"].largest_finished_lr == 30.0
    # B: the diverged run at 100 does not count, even with the highest accuracy.
    assert out["B"].lr == 10.0 and out["B"].best_acc == 0.62
    # A larger tolerance admits lr 10 for A.
    assert ex.max_lr(r, tolerance=0.07)["A"].lr == 10.0


def test_max_lr_is_none_when_nothing_learned():
    r = rows("stuck", [(0.1, 0.11), (1.0, 0.12), (1000.0, 0.18)])
    out = ex.max_lr(r)
    assert out["stuck"].lr is None and out["stuck"].best_acc == 0.18
    with pytest.raises(ValueError, match="missing"):
        ex.max_lr([{"model": "x", "lr": 1.0}])


def test_max_lr_accepts_a_sweep_result_and_averages_seeds(data):
    res = ex.lr_sweep(base(), [0.3, 1.0], {"BN": preset("lenet-bn")}, seeds=(0, 1), data=data, progress=False)
    assert len(res) == 4 and sorted(r.tags["seed"] for r in res) == [0, 0, 1, 1]
    out = ex.max_lr(res, floor=0.0)
    accs = {lr: sum(r.acc for r in res if r.tags["lr"] == lr) / 2 for lr in (0.3, 1.0)}
    best = max(accs.values())
    assert math.isclose(out["BN"].best_acc, best)
    assert out["BN"].lr == max(lr for lr, a in accs.items() if a >= best - 0.05)
    summary = ex.sweep_summary(res)
    assert list(summary["n"]) == [2, 2] and (summary["std"] >= 0).all()


# ----------------------------------------------------------------------------- numeric checks


def test_bias_before_bn_is_cancelled_exactly():
    r = ex.bias_check(preset("lenet-bn"))
    assert r["removed"] == ["conv1.bias", "conv2.bias", "fc1.bias", "fc2.bias"]
    assert r["max_abs_diff"] < 1e-6 and r["output_scale"] > 0.1
    assert r["bias_grad_norm"] < 1e-6
    # In float32 too (what training uses).
    assert ex.bias_check(dtype=torch.float32)["max_abs_diff"] < 1e-5


def test_bias_is_not_cancelled_when_bn_comes_after_the_activation():
    r = ex.bias_check(preset("lenet-bn", norm_position="after"))
    assert r["max_abs_diff"] > 1e-3 and r["bias_grad_norm"] > 1e-4


def test_scale_invariance_check_against_theory():
    t = ex.scale_invariance_check(factors=(0.5, 10.0, 1000.0), eps=1e-12)
    assert (t["max_abs_diff"] < 1e-8).all()
    for _, row in t.iterrows():
        assert math.isclose(row["grad_ratio"], 1 / row["c"], rel_tol=1e-4)
        assert math.isclose(row["turn_ratio"], 1 / row["c"] ** 2, rel_tol=1e-4)
        assert abs(row["cos_w_grad"]) < 1e-6  # the gradient is orthogonal to W: SGD can only grow ||W||
    # With PyTorch's eps the invariance breaks where c^2 * var is comparable to eps (small c).
    t5 = ex.scale_invariance_check(factors=(1e-3,), eps=1e-5)
    assert t5["max_abs_diff"].iloc[0] > 1e-3
    # Without normalisation there is no invariance: refuse rather than report nonsense.
    with pytest.raises(ValueError, match="batch norm"):
        ex.scale_invariance_check(spec=preset("lenet"))


def test_batch_stat_noise_shrinks_like_one_over_sqrt_batch(data):
    torch.manual_seed(0)
    model = build_lenet("lenet-bn")
    # Batches up to 1/4 of the 256 examples, so sampling without replacement changes little.
    t = ex.batch_stat_noise(model, data, batch_sizes=(2, 8, 32, 64), n_batches=40, population=256)
    assert list(t["batch_size"]) == [2, 8, 32, 64]
    assert list(t["values_per_channel"]) == [2, 8, 32, 64]  # fc1: one value per example
    assert t["mean_noise"].is_monotonic_decreasing
    # Independent values would give 1/sqrt(B); fc1's inputs are close to that (within a factor 2).
    ratio = t["mean_noise"] / t["iid_mean_noise"]
    assert ((ratio > 0.5) & (ratio < 2.0)).all()
    assert model.training  # the mode is restored
    with pytest.raises(ValueError, match="no norm"):
        ex.batch_stat_noise(model, data, layer="out")


# ----------------------------------------------------------------------------- landscape


def test_landscape_probe_is_finite_shaped_and_leaves_the_model_alone(data):
    torch.manual_seed(0)
    model = build_lenet("lenet-bn").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = to_float(data.train_x[:64]), data.train_y[:64]
    p = ex.loss_landscape_probe(model, x, y, etas=(0.1, 0.5, 1.0))
    assert len(p.losses) == len(p.grad_changes) == 3
    assert all(math.isfinite(v) for v in p.losses + p.grad_changes + [p.loss, p.grad_norm, p.beta])
    assert p.loss_range >= 0 and p.beta > 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # The loss at eta 0 is the model's own training-mode loss on the batch.
    with torch.no_grad():
        ref = nn.functional.cross_entropy(model(x), y)
    assert math.isclose(p.loss, float(ref), rel_tol=1e-5)
    # A tiny step changes the loss by about eta*|g|^2 (first-order Taylor).
    q = ex.loss_landscape_probe(model, x, y, etas=(1e-3,))
    assert math.isclose(q.loss - q.losses[0], 1e-3 * q.grad_norm ** 2, rel_tol=0.05)
    with pytest.raises(ValueError, match="positive"):
        ex.loss_landscape_probe(model, x, y, etas=(0.0,))


def test_landscape_during_training_rows(data):
    df, hists = ex.landscape_during_training(base(snapshot_every=2), {"BN": "lenet-bn", "no BN": preset("lenet")},
                                             data=data, progress=False)
    assert set(df["model"]) == {"BN", "no BN"} and set(hists) == {"BN", "no BN"}
    steps = hists["BN"].snapshots[-1].step
    assert len(df[df["model"] == "BN"]) == len(hists["BN"].steps) and steps == 4
    assert df[["loss", "loss_range", "max_grad_change", "beta"]].notna().all().all()


# ----------------------------------------------------------------------------- deep nets


def test_deep_plain_sigmoid_net_has_vanishing_gradients_and_bn_fixes_it(data):
    x, y = to_float(data.train_x[:64]), data.train_y[:64]
    plain = ex.grad_norms_at_init(ex.deep_mlp(10, bn=False), x, y)
    bn = ex.grad_norms_at_init(ex.deep_mlp(10, bn=True), x, y)
    assert list(plain) == [f"fc{i}" for i in range(1, 11)] + ["out"]
    assert plain["fc1"] / plain["out"] < 1e-4
    assert bn["fc1"] / bn["out"] > 1e-2
    res = ex.run_grid(base(), {"deep BN": {}, "lenet": {}}, data=data, progress=False,
                      models={"deep BN": lambda: ex.deep_mlp(4, bn=True)})
    assert res["deep BN"].status == "finished" and res["lenet"].status == "finished"
    res_plain = ex.grad_norms_at_init(ex.deep_mlp(10, bn=False, residual=True, seed=0), x, y)
    assert list(res_plain) == list(plain)
    assert res_plain["fc1"] / res_plain["out"] > 100 * plain["fc1"] / plain["out"]  # the skip path carries the gradient
    # Each seed of a comparison gets its own initial weights, also for a custom model.
    cmp = ex.compare(base(), {"deep": {}}, seeds=(0, 1), data=data, progress=False,
                     models={"deep": lambda: ex.deep_mlp(3, bn=True)})
    losses = [r.history.snapshots[0].loss for r in cmp.runs]
    assert losses[0] != losses[1]
    with pytest.raises(ValueError, match="activation"):
        ex.deep_mlp(3, activation="swish")


# ----------------------------------------------------------------------------- figures


def test_figures_name_the_data_set_and_have_readable_axes(data):
    res = ex.lr_sweep(base(), [0.5, 1.0, 500.0], {"BN": preset("lenet-bn"), "no BN": preset("lenet")},
                      seeds=(0, 1), data=data, progress=False)
    noise = ex.batch_stat_noise(build_lenet("lenet-bn"), data, batch_sizes=(2, 8, 32), population=256)
    cmp = ex.compare(base(), {"BN": {}, "no BN": {"model": "lenet", "lr": 500.0}}, seeds=(0, 1), data=data,
                     progress=False)
    figs = [fg.lr_sweep_figure(res, maxima=ex.max_lr(res, floor=0.0)), fg.curves_figure(res),
            fg.curves_figure(res, metric="loss", x="step"), fg.bar_figure(res), fg.comparison_figure(cmp),
            fg.line_figure(noise, "batch_size", "mean_noise", dataset_label=res.dataset_label, log_x=True)]
    for f in figs:
        assert f.layout.title.text.count("SYNTHETIC") == 1  # the data set once, in the title
        assert "SYNTHETIC" not in (f.layout.legend.title.text or "")  # not repeated in the legend
        assert f.layout.legend.orientation == "h" and f.layout.legend.yref == "container"  # below the plot
        assert all(len(line) <= 60 for line in f.layout.title.text.split("<br>"))  # wrapped for a phone
        assert f.layout.yaxis.title.text and "_" not in f.layout.yaxis.title.text
        assert f.layout.xaxis.title.text is None or "_" not in f.layout.xaxis.title.text
    assert figs[-1].layout.xaxis.title.text.startswith("batch size")
    for f in (figs[0], figs[1], figs[3], figs[4]):  # accuracy axes: fixed range up to 1
        assert f.layout.yaxis.range[1] >= 1.0 and f.layout.yaxis.range[0] <= 0
    # The lr 500 run without BN diverged: its marker sits on the 'diverged' row below 0, not at chance.
    crosses = [t for t in figs[0].data if t.name == "no BN: diverged"]
    assert crosses and all(y < 0 for y in crosses[0].y)
    dead = [t for t in figs[4].data if t.name == "all seeds diverged"]
    assert dead and all(y < 0 for y in dead[0].y)
    assert len(figs[0].data) >= 2  # one line per model on the same axes
    assert {t.name for t in figs[1].data} == {r.label + ("" if r.status == "finished" else f" [{r.status}]")
                                             for r in res}
    # issue 15 figure fixes: no value labels over the seed dots; the diverged row is named by a y tick
    # (no annotation in the margin over the y title); few log ticks; a chance line on demand; verdict
    # subtitles only against the reference a variant is paired with.
    assert all(getattr(t, "text", None) is None for t in figs[4].data if t.type == "bar")
    assert "diverged ✕" in figs[0].layout.yaxis.ticktext
    assert not [a for a in figs[0].layout.annotations if a.xref == "paper" and a.xanchor == "right"]
    assert list(figs[0].layout.xaxis.tickvals) == [0.5, 1.0, 500.0]
    assert list(figs[-1].layout.xaxis.tickvals) == [2, 8, 32]
    with_chance = fg.line_figure(noise, "batch_size", "mean_noise", dataset_label="SYNTHETIC", chance=0.1)
    assert any(sh.y0 == 0.1 for sh in with_chance.layout.shapes)
    only = fg.comparison_figure(cmp, pairs={})
    assert all("<i>" not in x for x in only.data[0].x)
    paired = fg.comparison_figure(cmp, pairs={"no BN": "BN"})
    assert any("vs BN" in x for x in paired.data[0].x)
    with pytest.raises(ValueError, match="dataset_label"):
        fg.line_figure(res.table(), "lr", "test_acc")
    with pytest.raises(ValueError, match="metric"):
        fg.curves_figure(res, metric="accuracy")


def test_status_table_reports_divergence(data):
    res = ex.run_grid(base(), {"ok": {}, "too high": {"model": "lenet", "lr": 500.0}}, data=data, progress=False)
    t = ex.status_table(res)
    row = t.set_index("label").loc["too high"]
    assert row["status"] == "diverged" and "learning rate" in row["message"]


# ----------------------------------------------------------------------------- seeds and verdicts


def test_seed_stats_known_values():
    s = ex.seed_stats([0.80, 0.82, 0.84, None, float("nan")])
    assert s.n == 3 and s.failed == 2
    assert math.isclose(s.mean, 0.82) and math.isclose(s.std, 0.02)  # sample std (ddof=1)
    assert (s.min, s.max) == (0.80, 0.84)
    assert ex.fmt_stats(s) == "0.820 ± 0.020 (0.800–0.840, 3 seeds), 2 diverged"
    one = ex.seed_stats([0.5])
    assert one.std == 0.0 and ex.seed_stats([]).n == 0


def test_pooled_std_and_verdict_follow_their_definitions():
    a = ex.seed_stats([0.80, 0.82, 0.84])  # std 0.02
    b = ex.seed_stats([0.86, 0.90, 0.94])  # std 0.04
    # pooled: sqrt((2*0.02^2 + 2*0.04^2) / 4) = sqrt(0.001) = 0.0316 (kept, no longer the rule)
    assert math.isclose(ex.pooled_std(a, b), math.sqrt(0.001))
    # paired: d = (0.06, 0.08, 0.10), mean 0.08, sd 0.02, threshold t(0.975, 2) * 0.02 / sqrt(3)
    v = ex.verdict(a, b)
    assert math.isclose(v.delta, 0.08) and math.isclose(v.half_width, 4.302652729749464 * 0.02 / math.sqrt(3))
    assert v.outcome is ex.Outcome.BETTER and v.ci == pytest.approx((0.030317, 0.129683), abs=1e-6)
    assert str(v).startswith("better (Δ +0.080, 95% CI +0.030 to +0.130)")  # the sentence, made from the numbers
    assert ex.verdict(b, a).outcome is ex.Outcome.WORSE and str(ex.verdict(b, a)).startswith("worse (Δ -0.080")
    c = ex.seed_stats([0.83, 0.81, 0.87])  # d = (0.03, -0.01, 0.03): the interval holds 0
    assert ex.verdict(a, c).outcome is ex.Outcome.WITHIN_NOISE
    assert ex.verdict(a, a).outcome is ex.Outcome.WITHIN_NOISE  # Δ = 0 with no spread
    failed = ex.verdict(a, ex.seed_stats([0.9, None, None]))
    assert failed.outcome is ex.Outcome.NOT_COMPARABLE and failed.n_pairs == 1
    assert [(c.kind, c.value, c.ref) for c in failed.causes["this variant"]] == [(ex.CauseKind.DIVERGED, 2, 3)]
    assert "diverged seeds (2 of 3)" in str(failed)
    assert ex.verdict(a, ex.seed_stats([None, None, None])).outcome is ex.Outcome.NOT_COMPARABLE


def test_compare_runs_every_seed_and_reuses_included_runs(data):
    floor = ex.compare(base(), {"base": {}}, seeds=(0, 1, 2), data=data, progress=False)
    assert floor.reference == "base" and len(floor.runs) == 3
    assert sorted(r.history.config.seed for r in floor.runs) == [0, 1, 2]
    assert math.isclose(floor.noise_floor, ex.seed_stats(floor.values("base")).std)
    cmp = ex.compare(base(), {"base": {}, "max pool": {"pool": "max"}}, data=data, include=floor, progress=False)
    assert cmp.variants == ["base", "max pool"] and len(cmp.runs) == 6
    assert [r.history for r in cmp.runs_of("base")] == [r.history for r in floor.runs]  # not rerun
    assert all(r.history.config.model.pool == "max" for r in cmp.runs_of("max pool"))
    t = cmp.table().set_index("variant")
    m = cmp.stats("max pool")
    assert math.isclose(t.loc["max pool", "mean"], m.mean) and t.loc["base", "verdict"] == "(reference)"
    assert t.loc["max pool", "verdict"] == cmp.contrast("base", "max pool").headline()
    assert cmp.contrast("base", "max pool").other.raw == cmp.cell("max pool").values()
    # The accuracy is the mean of the last 3 epochs with recomputed statistics; acc_ema the eval-mode one.
    r = cmp.runs_of("max pool")[0]
    precise = [e.precise_test_acc for e in r.history.epochs][-3:]
    assert None not in precise and r.acc == pytest.approx(sum(precise) / len(precise))
    assert r.acc_ema == r.history.mean_test_acc(3)
    assert cmp.contrast("base", "max pool").half_width == t.loc["max pool", "threshold"]
    with pytest.raises(ValueError, match="seeds"):
        ex.compare(base(), {"x": {}}, seeds=(0, 1), data=data, include=floor, progress=False)


def test_same_seed_same_run_so_reuse_is_honest(data):
    a = ex.run_grid(base(), {"a": {}}, data=data, progress=False)["a"].history
    b = ex.run_grid(base(), {"b": {}}, data=data, progress=False)["b"].history
    assert [s.loss for s in a.snapshots] == pytest.approx([s.loss for s in b.snapshots], rel=1e-5)


def test_caution_names_each_cell_with_its_measured_cause(data):
    cmp = ex.compare(base(), {"BN": {}, "tiny lr": {"lr": 1e-6, "norm": "none"}}, seeds=(0, 1), data=data,
                     progress=False)
    best = max(cmp.values("tiny lr"))
    text = cmp.caution()
    assert f"CAUTION: tiny lr: never left chance (best seed {best:.3f} < 0.15)" in text
    assert ex.caution(cmp.runs) == text
    assert [str(c) for c in cmp.causes("tiny lr")] == [f"never left chance (best seed {best:.3f} < 0.15)"]
    assert cmp.causes("tiny lr")[0].kind is ex.CauseKind.NEVER_LEFT_CHANCE and cmp.causes("tiny lr")[0].value == best
    assert cmp.contrast("tiny lr", "BN").has(ex.CauseKind.NEVER_LEFT_CHANCE, "tiny lr")
    assert "CAUTION: tiny lr: never left chance" in str(cmp.contrast("tiny lr", "BN"))
    assert cmp.table().set_index("variant").loc["tiny lr", "caution"].startswith("never left chance")
    assert cmp.caution(limit=0.0) == "" or "never left chance" not in cmp.caution(limit=0.0)


def test_fixed_steps_batch_grid_gives_every_batch_size_the_same_steps(data):
    assert ex.fixed_steps(8, 2, 256) == (16, 1) and ex.fixed_steps(8, 64, 256) == (256, 2)
    assert ex.fixed_steps(8, 256, 256) == (256, 8)
    with pytest.raises(ValueError, match="larger than"):
        ex.fixed_steps(8, 512, 256)
    res = ex.batch_size_grid(base(), {"BN": {"norm": "torch"}, "GN": {"norm": "group"}}, (2, 64), seeds=(0,),
                             data=data, steps=8, lrs={"BN": 0.1, ("GN", 2): 0.05, ("GN", 64): 0.2}, progress=False)
    for r in res:
        steps = [s for s in r.history.snapshots if s.kind == "step"]
        assert steps[-1].step == 8 and steps[-1].examples == 8 * r.tags["batch_size"]
        assert r.history.config.lr == {("BN", 2): 0.1, ("BN", 64): 0.1, ("GN", 2): 0.05, ("GN", 64): 0.2}[
            (r.tags["norm"], r.tags["batch_size"])]
        assert r.tags["steps"] == 8
    with pytest.raises(ValueError, match="no learning rate"):
        ex.batch_size_grid(base(), {"BN": {}}, (2,), data=data, steps=8, lrs={"GN": 0.1}, progress=False)
    best, table = ex.tune_lr(base(), {"BN": {}}, (2,), steps=4, factors=(0.5, 1.0), data=data, progress=False,
                             max_extend=0)
    assert list(table["lr"]) == pytest.approx([0.5 * math.sqrt(2 / 64) * f for f in (0.5, 1.0)])
    assert best[("BN", 2)] == table.loc[table["acc"].astype(float).idxmax(), "lr"]


def test_tune_lr_extends_the_sweep_only_when_the_best_lr_is_at_an_edge(data, monkeypatch):
    """A fake grid with a known accuracy curve per norm (peak factor; a factor that diverges):
    the sweep goes ×3 beyond an edge best (up or down), not beyond an inside best, stops at a
    diverged edge, batches each round into one run_grid call and lists every lr it tried."""
    peak = {"up": 9.0, "inside": 1.0, "down": 1 / 9, "diverges": 100.0}
    calls = []

    def fake_run_grid(base_cfg, variants, seeds=None, data=None, progress=True, tags=None, precise_bn=None):
        calls.append(sorted((t["norm"], round(t["factor"], 6)) for t in tags.values()))
        runs = []
        for label, t in tags.items():
            f, norm = t["factor"], t["norm"]
            diverged = norm == "diverges" and f > 5
            h = History(config=base_cfg)
            h.status = "diverged" if diverged else "finished"
            run = ex.Run(label, dict(t), h)
            runs.append((run, None if diverged else 0.9 - abs(math.log(f / peak[norm])) / 10))
        return ex.GridResult([FakeAcc(r, a) for r, a in runs])

    class FakeAcc(ex.Run):
        def __init__(self, run, acc):
            super().__init__(run.label, run.tags, run.history)
            self._acc = acc

        @property
        def acc(self):
            return self._acc

    monkeypatch.setattr(sweeps, "run_grid", fake_run_grid)
    norms = {k: {} for k in peak}
    best, table = ex.tune_lr(base(), norms, (64,), data=data, progress=False, max_extend=3)
    lr = lambda f: 0.5 * f  # noqa: E731  (base lr 0.5 at the base batch size 64)
    tried = {n: sorted(round(f, 6) for f in table[table["norm"] == n]["factor"]) for n in peak}
    assert tried["up"] == [round(f, 6) for f in (1 / 3, 1, 3, 9, 27)]  # 3 is an edge, 9 too, 27 is worse
    assert tried["inside"] == [round(f, 6) for f in (1 / 3, 1, 3)]  # no extension
    assert tried["down"] == [round(f, 6) for f in (1 / 27, 1 / 9, 1 / 3, 1, 3)]
    assert tried["diverges"] == [round(f, 6) for f in (1 / 3, 1, 3, 9)]  # 9 diverged: stop
    assert best[("up", 64)] == pytest.approx(lr(9)) and best[("inside", 64)] == pytest.approx(lr(1))
    assert best[("down", 64)] == pytest.approx(lr(1 / 9)) and best[("diverges", 64)] == pytest.approx(lr(3))
    # one run_grid call per round; a round holds exactly the cells that extend, one run each
    assert len(calls) == 3 and len(calls[0]) == 12  # round 3: no cell at an edge, no call
    assert calls[1] == [("diverges", 9.0), ("down", round(1 / 9, 6)), ("up", 9.0)]
    assert calls[2] == [("down", round(1 / 27, 6)), ("up", 27.0)]
    rounds = table.set_index(["norm", table["factor"].round(6)])["round"]
    assert rounds[("up", 27.0)] == 2 and rounds[("up", 9.0)] == 1 and rounds[("up", 3.0)] == 0
    assert list(table[table["norm"] == "up"]["lr"]) == sorted(table[table["norm"] == "up"]["lr"])
    assert table.set_index(["norm", table["factor"].round(6)]).loc[("diverges", 9.0), "status"] == "diverged"
    calls.clear()
    ex.tune_lr(base(), norms, (64,), data=data, progress=False, max_extend=1)
    assert len(calls) == 2  # max_extend rounds at most
    with pytest.raises(ValueError, match="max_extend=-1 is not valid"):
        ex.tune_lr(base(), norms, (64,), data=data, progress=False, max_extend=-1)


def test_tune_lr_extension_follows_the_rule_on_real_runs(data):
    best, table = ex.tune_lr(base(), {"BN": {}}, (8,), steps=3, factors=(0.3, 1.0), data=data, progress=False,
                             max_extend=1)
    first = table[table["round"] == 0]
    ok = first[first["acc"].notna()]
    top = ok.loc[ok["acc"].astype(float).idxmax(), "factor"] if len(ok) else None
    added = sorted(table[table["round"] == 1]["factor"])
    expected = [] if top is None else [0.3 / (1 / 0.3)] if top == 0.3 else [1.0 / 0.3] if top == 1.0 else []
    assert added == pytest.approx(expected)
    assert len(table) == 2 + len(expected)
    done = table[table["acc"].notna()]
    assert best[("BN", 8)] == pytest.approx(done.loc[done["acc"].astype(float).idxmax(), "lr"])


def test_summarize_groups_over_seeds(data):
    res = ex.batch_size_grid(base(), {"BN": {"norm": "torch"}, "GN": {"norm": "group"}}, (32, 64),
                             seeds=(0, 1), data=data, progress=False)
    assert len(res) == 8
    t = ex.summarize(res, ("norm", "batch_size"))
    assert len(t) == 4 and (t["n"] + t["diverged"] == 2).all()
    assert math.isclose(res["BN, bs 32 · seed 0"].history.config.lr, 0.5 * 32 / 64)
    with pytest.raises(ValueError, match="tag"):
        ex.summarize(res, ("colour",))


def test_answer_table_checks_ids_and_chapters():
    t = ex.answer_table({"q-max-lr": "BN: 3", "q-lr-compare": "x"}, chapter="05_optimisation.ipynb")
    assert list(t["id"]) == ["q-max-lr", "q-lr-compare"] and "maximum" in t["question"].iloc[0]
    with pytest.raises(ValueError, match="unknown"):
        ex.answer_table({"q-nope": "x"})
    with pytest.raises(ValueError, match="other chapters"):
        ex.answer_table({"q-bias": "x"}, chapter="05_optimisation.ipynb")


# ----------------------------------------------------------------------------- probes


def test_run_with_probe_starts_at_step_zero(data):
    torch.manual_seed(0)
    cfg = base(label="probe")
    h, rows = ex.run_with_probe(cfg, lambda model, snap: ex.weight_norms(model), data=data)
    assert rows[0]["step"] == 0 and rows[0]["kind"] == "start"
    from bnviz.models import init_weights
    torch.manual_seed(cfg.seed)
    fresh = init_weights(build_lenet(cfg.model), cfg.init)
    assert rows[0]["conv1"] == pytest.approx(float(fresh.conv1.weight.detach().norm()), rel=1e-6)
    assert rows[-1]["step"] == h.snapshots[-1].step
    g = ex.weight_norm_growth(rows).set_index("layer")
    assert list(g.index) == ["conv1", "conv2", "fc1", "fc2"]
    assert math.isclose(g.loc["fc1", "growth ×"], rows[-1]["fc1"] / rows[0]["fc1"])

    def broken(model, snap):
        raise RuntimeError("probe bug")

    with pytest.raises(RuntimeError, match="probe bug"):
        ex.run_with_probe(cfg, broken, data=data)


def test_layer_health_measures_saturation_and_ratios(data):
    torch.manual_seed(0)
    model = build_lenet("lenet")
    x, y = to_float(data.train_x[:64]), data.train_y[:64]
    rows = ex.layer_health(model, x, y, lr=0.5)
    assert [r["layer"] for r in rows] == ["conv1", "conv2", "fc1", "fc2"]
    for r in rows:
        assert 0 <= r["saturated"] <= 1 and math.isclose(sum(r["hist"]), 1.0, rel_tol=1e-5)
        assert math.isclose(r["update_data"], 0.5 * r["grad_data"])
    # Saturation by hand for conv1: sigmoid outputs outside [0.05, 0.95].
    a = torch.sigmoid(model.conv1(x)).flatten()
    assert math.isclose(rows[0]["saturated"], float(((a < 0.05) | (a > 0.95)).float().mean()), abs_tol=1e-6)
    # Scaling the weights up by 20 drives the sigmoids into saturation.
    with torch.no_grad():
        model.conv1.weight.mul_(20)
    assert ex.layer_health(model, x, y, lr=0.5)[0]["saturated"] > rows[0]["saturated"]
    df, hists = ex.health_during_training(base(), {"BN": "lenet-bn"}, data=data, probe_batch=32, progress=False)
    assert set(df["step"]) >= {0} and set(df["layer"]) == {"conv1", "conv2", "fc1", "fc2"}
    fg.saturation_figure(df, data.label)
    fg.ratio_figure(df, data.label)


def test_border_ink_and_dropout_variance_shift(data):
    b = ex.border_ink(data, border=2)
    assert 0 <= b["ink_share"] <= 1 and math.isclose(b["area_share"], 1 - (24 / 28) ** 2)
    torch.manual_seed(0)
    model = build_lenet(preset("lenet-bn", dropout=0.5))
    x = to_float(data.train_x[:128])
    model.train()
    with torch.no_grad():
        for _ in range(20):
            model(x)  # running statistics learned with dropout on
    v = ex.dropout_variance_shift(model, x, layer="fc2")
    assert v["train_over_eval"] > 1.05  # dropout (scaled by 1/(1-p)) adds variance in training
    assert v["running_over_eval"] > 1.05
    with pytest.raises(ValueError, match="no dropout"):
        ex.dropout_variance_shift(build_lenet("lenet-bn"), x)


def test_course_pick_has_a_cpu_size(monkeypatch):
    from bnviz import course

    monkeypatch.delenv("BNVIZ_FAST", raising=False)
    monkeypatch.setenv("BNVIZ_SIZES", "cpu")
    assert course.pick(10, 1) == 10 and course.pick(10, 1, cpu=4) == 4
    monkeypatch.setenv("BNVIZ_SIZES", "gpu")
    assert course.pick(10, 1, cpu=4) == 10
    monkeypatch.setenv("BNVIZ_FAST", "1")
    assert course.pick(10, 1, cpu=4) == 1 and course.sizes() == "fast"
    assert ex.default_seeds() == (0, 1)
    monkeypatch.delenv("BNVIZ_FAST")
    assert ex.default_seeds(cuda=True) == (0, 1, 2, 3, 4) and ex.default_seeds(cuda=False) == (0, 1, 2)
    monkeypatch.setenv("BNVIZ_SIZES", "tpu")
    with pytest.raises(ValueError, match="BNVIZ_SIZES"):
        course.sizes()
