"""bnviz.batch_studies: same-step scoring, Wu & He's plan, the lr picked over seeds, and the B = 2
probes, each against an independent reference (PyTorch's BN, the engine's PreciseBN, arithmetic)."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from bnviz import Config, Trainer, build_lenet, load_dataset, preset
from bnviz import batch_studies as bs
from bnviz.data import to_float
from bnviz.models import init_weights
from bnviz.precise import PreciseBNEval, precise_bn_accuracy
from bnviz.sweeps import fixed_steps
from bnviz.train import evaluate


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", device="cpu", train_size=256, test_size=64)


def _lenet(norm="torch", seed=0):
    torch.manual_seed(seed)
    return init_weights(build_lenet(preset("lenet-bn", norm=norm)))


def test_total_steps_counts_the_batches_the_engine_takes():
    assert bs.total_steps(Config(batch_size=8, epochs=3), 20) == 9
    assert bs.total_steps(Config(batch_size=8, epochs=3, drop_last=True), 20) == 6
    assert bs.total_steps(Config(batch_size=8, epochs=2), 17) == 4  # a last batch of 1 is dropped (BN needs 2)
    # the reference: the steps a Trainer actually took
    small = load_dataset("synthetic", device="cpu", train_size=17, test_size=16)
    h = Trainer(Config(model=preset("lenet-bn"), dataset="synthetic", batch_size=8, epochs=2, fast="eager"), data=small).fit()
    assert h.epochs[-1].step == 4


def test_wu_he_plan_scales_lr_linearly_and_keeps_examples():
    plan = bs.wu_he_plan([2, 8, 32], lr_ref=0.4, batch_ref=32, epochs=2, n_train=100)
    assert [p["lr"] for p in plan] == pytest.approx([0.025, 0.1, 0.4])
    assert [p["steps"] for p in plan] == [100, 26, 8]  # 2 epochs of ceil(100/B) steps
    for bad in (dict(batch_sizes=[1]), dict(lr_ref=0), dict(epochs=0), dict(n_train=4)):
        args = dict(batch_sizes=[2, 8], lr_ref=0.4, batch_ref=32, epochs=2, n_train=100) | bad
        with pytest.raises(ValueError, match="not valid"):
            bs.wu_he_plan(**args)


def test_run_study_scores_equal_a_solo_trainer_scored_at_the_same_steps(data):
    """run_study trains in the grid (K runs at once) and reads the engine's score_at snapshots;
    the reference is each run alone in a Trainer with PreciseBNEval, read by hand."""
    small = data.subset(64, 64)
    base = Config(model=preset("lenet-bn"), dataset="synthetic", batch_size=8, lr=0.5, epochs=2, snapshot_every=3,
                  fast="eager")
    variants = {f"s{s}": {"seed": s} for s in (3, 4)}
    st = bs.run_study(base, variants, {k: {"norm": "BN", "seed": v["seed"]} for k, v in variants.items()},
                      data=small, progress=False)
    for r in st.runs:
        assert r.steps == (14, 15, 16)  # 16 steps: round(14.4), round(15.2), 16: not multiples of snapshot_every
        solo = Trainer(base.replace(seed=r.run.tags["seed"], score_at=(0.9, 0.95, 1.0)), data=small,
                       callbacks=[PreciseBNEval()]).fit()
        want = {sn.step: sn for sn in solo.snapshots if sn.step in r.steps and sn.test_acc is not None}
        assert [x.step for x in r.scores] == [14, 15, 16]
        for x in r.scores:
            assert x.precise == pytest.approx(want[x.step].precise_test_acc, abs=1e-6)
            assert x.ema == pytest.approx(want[x.step].test_acc, abs=1e-6)
        assert r.value() == pytest.approx(sum(want[k].precise_test_acc for k in r.steps) / 3, abs=1e-6)


def test_run_study_scores_every_batch_size_at_the_same_steps(data):
    small = data.subset(32, 64)
    base = Config(model=preset("lenet-bn"), dataset="synthetic", batch_size=8, lr=0.5, epochs=1, snapshot_every=2)
    variants, tags = {}, {}
    for b in (2, 8):  # B = 8: 2 epochs of 4 steps; B = 2: one epoch of 8 steps
        n, e = fixed_steps(8, b, 32)
        for s in (0, 1):
            variants[f"{b}-{s}"] = {"batch_size": b, "train_size": n, "epochs": e, "seed": s}
            tags[f"{b}-{s}"] = {"norm": "BN", "batch_size": b, "seed": s}
    st = bs.run_study(base, variants, tags, data=small, progress=False)
    assert {r.steps for r in st.runs} == {(7, 8)}  # round(0.9 * 8), round(0.95 * 8), 8: the same for both B
    for r in st.runs:
        assert [x.step for x in r.scores] == [7, 8]
        assert r.value() == pytest.approx(sum(x.precise for x in r.scores) / 2)
        assert r.value("ema") == pytest.approx(sum(x.ema for x in r.scores) / 2)
    s2 = st.stats(norm="BN", batch_size=2)
    assert s2.raw == [r.value() for r in st.cell(norm="BN", batch_size=2)]
    v = st.vs({"norm": "BN", "batch_size": 8}, {"norm": "BN", "batch_size": 2})
    assert v.delta == pytest.approx(s2.mean - st.stats(norm="BN", batch_size=8).mean)
    assert st.stats(norm="BN", batch_size=2).arm != st.stats(norm="BN", batch_size=8).arm


def test_bn_output_levels_fully_connected_bn_at_batch_2_outputs_plus_minus_gamma(data):
    model = _lenet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-1, 1)
        model.fc1.weight.mul_(100)  # inputs of the fc BNs far apart: x̂ = ±d/√(d² + 4 eps) is ±1 to 1e-3
        model.fc2.weight.mul_(100)
    x = to_float(data.train_x[:2])
    levels = bs.bn_output_levels(model, x).set_index("layer")
    assert levels.loc["fc1", "share of x̂ at ±1"] == 1.0 and levels.loc["fc2", "share of x̂ at ±1"] == 1.0
    assert levels.loc["fc1", "distinct x̂ per channel (median)"] == 2
    assert levels.loc["conv1", "share of x̂ at ±1"] < 0.1 and levels.loc["conv1", "distinct x̂ per channel (median)"] > 100
    assert list(levels["values per channel"]) == [2 * 24 * 24, 2 * 8 * 8, 2, 2]
    # the reference: PyTorch's own BatchNorm1d on fc1's input, train mode: ±γ + β exactly
    m = copy.deepcopy(model).train()
    seen = {}
    m.norm_fc1.register_forward_hook(lambda mod, i, o: seen.update(out=o))
    with torch.no_grad():
        m(x)
    g, b = model.norm_fc1.weight, model.norm_fc1.bias
    assert torch.allclose((seen["out"] - b).abs(), g.expand(2, -1), atol=1e-3)
    # two values per channel whatever their distance: ±d/√(d² + 4 eps) for the unscaled net too
    plain = bs.bn_output_levels(_lenet(), x).set_index("layer")
    assert plain.loc["fc2", "distinct x̂ per channel (median)"] == 2
    seen.clear()
    m = _lenet().train()
    m.norm_fc2.register_forward_hook(lambda mod, i, o: seen.update(inp=i[0], out=o))
    with torch.no_grad():
        m(x)
    d = seen["inp"][0] - seen["inp"][1]
    share = ((d.abs() / (d ** 2 + 4 * m.norm_fc2.eps).sqrt() - 1).abs() < 1e-3).float().mean()
    assert plain.loc["fc2", "share of x̂ at ±1"] == pytest.approx(float(share))


def test_eval_modes_against_batch_statistics_set_by_hand(data):
    model = _lenet(seed=1)
    trainer = Trainer(Config(model=preset("lenet-bn"), dataset="synthetic", batch_size=32, lr=0.5, epochs=1,
                             seed=1, fast="eager"), data=data)
    trainer.fit()
    model = trainer.model
    n = len(data.test_x)
    got = bs.eval_modes(model, data, batch_size=n, images=128)  # one test batch: its own statistics
    ref = copy.deepcopy(model).train()
    values = {"norm_conv1": n * 24 * 24, "norm_conv2": n * 8 * 8, "norm_fc1": n, "norm_fc2": n}
    with torch.no_grad():
        for name, layer in ref.named_modules():
            if name in values:
                layer.momentum = 1.0
        ref(to_float(data.test_x))  # running stats := this batch's (unbiased) statistics
        for name, layer in ref.named_modules():
            if name in values:
                layer.running_var.mul_((values[name] - 1) / values[name])  # biased, as training normalises
    assert got["train mode"] == pytest.approx(float(evaluate(ref, data.test_x, data.test_y)))
    assert got["EMA"] == pytest.approx(float(evaluate(model, data.test_x, data.test_y)))
    assert got["recomputed"] == pytest.approx(precise_bn_accuracy(model, data, images=128))
    with pytest.raises(ValueError, match="batch_size=1 is not valid"):
        bs.eval_modes(model, data, batch_size=1)


def test_layer_offsets_against_the_layers_input_computed_directly(data):
    model = _lenet("lite-scale", seed=2)
    x = to_float(data.train_x[:64])
    got = bs.layer_offsets(model, x).set_index("layer")
    with torch.no_grad():
        h = model.conv1(x).double()
    var, mean = torch.var_mean(h, dim=[0, 2, 3], correction=0)
    assert got.loc["conv1", "input |mean|/std"] == pytest.approx(float((mean.abs() / var.sqrt()).median()), rel=1e-6)
    # scale only (γ = 1, β = 0): x / σ keeps the offset in units of std; full BN removes it
    assert got["output |mean|/std"].to_numpy() == pytest.approx(got["input |mean|/std"].to_numpy(), rel=1e-3)
    full = bs.layer_offsets(_lenet("torch", seed=2), x)
    assert full["output |mean|/std"].max() < 1e-3


def test_tune_lr_seeds_picks_the_best_mean_and_a_diverged_seed_disqualifies(monkeypatch):
    accs = {(0.1, 100): 0.50, (0.1, 101): 0.52, (0.3, 100): 0.70, (0.3, 101): 0.20,  # mean 0.51 vs 0.45
            (1.0, 100): 0.90, (1.0, 101): None}                                        # 0.9, but a seed diverged

    def fake_grid(base, variants, data=None, progress=True, tags=None):
        return [SimpleNamespace(tags=tags[k], acc=accs[(tags[k]["lr"], tags[k]["seed"])],
                                acc_ema=0.1 * tags[k]["seed"]) for k in variants]

    monkeypatch.setattr(bs, "run_grid", fake_grid)
    best, table = bs.tune_lr_seeds(Config(), {"BN": {}}, {"BN": [0.1, 0.3, 1.0]})
    assert best == {"BN": 0.1}
    assert table["mean"].tolist()[:2] == pytest.approx([0.51, 0.45]) and table["mean"].isna().tolist()[2]
    assert table["ema"].tolist()[0] == pytest.approx(10.05)
    with pytest.raises(ValueError, match="lrs has no learning rates"):
        bs.tune_lr_seeds(Config(), {"GN": {}}, {"BN": [0.1]})


def test_epoch_states_keep_each_epochs_weights(data):
    keep = bs.EpochStates()
    trainer = Trainer(Config(model=preset("lenet-bn"), dataset="synthetic", batch_size=64, lr=0.5, epochs=2,
                             fast="eager"), data=data, callbacks=[keep])
    trainer.fit()
    assert len(keep.states) == 2
    final = trainer.model.state_dict()
    assert all(torch.equal(keep.states[-1][k], final[k]) for k in final)
    assert not torch.equal(keep.states[0]["conv1.weight"], final["conv1.weight"])
