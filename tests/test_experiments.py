"""The experiment machinery of chapter 05 (bnviz.experiments) on tiny synthetic runs."""
import math

import pytest
import torch
from torch import nn

from bnviz import Config, build_lenet, make_synthetic, preset
from bnviz import experiments as ex
from bnviz.data import to_float


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


def test_max_lr_accepts_a_sweep_result(data):
    res = ex.lr_sweep(base(), [0.3, 1.0], {"BN": preset("lenet-bn")}, data=data, progress=False)
    out = ex.max_lr(res, floor=0.0)
    accs = {r.tags["lr"]: r.test_acc for r in res}
    best = max(accs.values())
    assert out["BN"].best_acc == best
    assert out["BN"].lr == max(lr for lr, a in accs.items() if a >= best - 0.05)


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
    res = ex.run_grid(base(), {"deep BN": {}}, data=data, progress=False,
                      models={"deep BN": lambda: ex.deep_mlp(4, bn=True)})
    assert res["deep BN"].status == "finished"
    with pytest.raises(ValueError, match="activation"):
        ex.deep_mlp(3, activation="swish")


# ----------------------------------------------------------------------------- figures


def test_figures_name_the_data_set(data):
    res = ex.lr_sweep(base(), [0.5, 1.0], {"BN": preset("lenet-bn"), "no BN": preset("lenet")},
                      data=data, progress=False)
    figs = [ex.lr_sweep_figure(res, maxima=ex.max_lr(res, floor=0.0)), ex.curves_figure(res),
            ex.curves_figure(res, metric="loss", x="step"), ex.bar_figure(res),
            ex.line_figure(res.table(), "lr", "test_acc", color="model", dataset_label=res.dataset_label)]
    for f in figs:
        assert "SYNTHETIC" in f.layout.title.text
        assert "SYNTHETIC" in f.layout.legend.title.text
    assert len(figs[0].data) >= 2  # one line per model on the same axes
    assert {t.name for t in figs[1].data} == {r.label for r in res}
    with pytest.raises(ValueError, match="dataset_label"):
        ex.line_figure(res.table(), "lr", "test_acc")
    with pytest.raises(ValueError, match="metric"):
        ex.curves_figure(res, metric="accuracy")


def test_status_table_reports_divergence(data):
    res = ex.run_grid(base(), {"ok": {}, "too high": {"model": "lenet", "lr": 500.0}}, data=data, progress=False)
    t = ex.status_table(res)
    row = t.set_index("label").loc["too high"]
    assert row["status"] == "diverged" and "learning rate" in row["message"]
