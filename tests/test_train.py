"""The trainer: seeding, live parameters from another thread, stop, divergence, history I/O."""
import math
import re
import threading
import time

import pytest
import torch

import bnviz
from bnviz import Config, LiveParams, Trainer, preset
from bnviz.history import load_histories, save_histories


def cfg(**kw):
    base = dict(model=preset("lenet-bn"), dataset="synthetic", batch_size=64, lr=0.5, epochs=1,
                snapshot_every=2, device="cpu", fast="eager")
    base.update(kw)
    return Config(**base)


def test_same_config_and_seed_give_the_same_curve(tiny_data):
    a = Trainer(cfg(epochs=2), data=tiny_data).fit()
    b = Trainer(cfg(epochs=2), data=tiny_data).fit()
    assert a.status == b.status == "finished"
    assert [s.loss for s in a.snapshots] == [s.loss for s in b.snapshots]
    c = Trainer(cfg(epochs=2, seed=1), data=tiny_data).fit()
    assert [s.loss for s in a.snapshots] != [s.loss for s in c.snapshots]


def test_scratch_and_torch_bn_train_identically(tiny_data):
    a = Trainer(cfg(model=preset("lenet-bn", norm="torch")), data=tiny_data).fit()
    b = Trainer(cfg(model=preset("lenet-bn", norm="scratch")), data=tiny_data).fit()
    for sa, sb in zip(a.snapshots, b.snapshots):
        assert sa.loss == pytest.approx(sb.loss, rel=1e-4, abs=1e-5)
    for name in ("conv1", "fc2"):
        la, lb = a.snapshots[-1].layers[name], b.snapshots[-1].layers[name]
        assert la.running_var == pytest.approx(lb.running_var, rel=1e-3, abs=1e-5)


def test_learns_well_above_chance_on_synthetic_data():
    from bnviz.data import make_synthetic

    data = make_synthetic(3000, 1000, seed=2)
    h = Trainer(cfg(batch_size=128, lr=1.0, epochs=3, snapshot_every=10), data=data).fit()
    assert h.final_test_acc > 0.4, h.summary()  # chance is 0.1
    assert h.steps[-1].loss < h.steps[0].loss


def test_snapshot_contents(tiny_data):
    t = Trainer(cfg(snapshot_every=3), data=tiny_data)
    h = t.fit()
    steps_per_epoch = math.ceil(512 / 64)
    assert [s.step for s in h.steps] == [3, 6, 8]  # every 3 steps, plus the epoch's end
    (ep,) = h.epochs
    assert ep.step == steps_per_epoch and ep.examples == 512 and 0 <= ep.test_acc <= 1
    layers = ep.layers
    assert list(layers) == ["conv1", "conv2", "fc1", "fc2"]
    assert len(layers["conv1"].gamma) == 6 and len(layers["fc1"].beta) == 120
    bn = t.model.norm_conv2
    assert layers["conv2"].running_mean == pytest.approx(bn.running_mean.tolist())
    assert layers["conv2"].running_var == pytest.approx(bn.running_var.tolist())
    assert len(h.steps[0].layers["conv2"].batch_mean) == 16 and len(h.steps[0].layers["conv2"].batch_var) == 16
    assert all(v >= 0 for v in h.steps[0].layers["fc1"].batch_var)
    assert ep.examples_per_s > 0 and h.examples_per_s > 0
    assert "SYNTHETIC" in h.dataset_label and "SYNTHETIC" in h.summary()


def test_epoch_metrics_are_epoch_means(tiny_data):
    h = Trainer(cfg(snapshot_every=1), data=tiny_data).fit()
    steps = h.steps
    weights = [s.examples - (steps[i - 1].examples if i else 0) for i, s in enumerate(steps)]
    mean_loss = sum(w * s.loss for w, s in zip(weights, steps)) / sum(weights)
    assert h.epochs[0].loss == pytest.approx(mean_loss, rel=1e-5)


def test_no_host_sync_per_step(tiny_data, monkeypatch):
    """Metrics stay on the device: host copies happen only at snapshots, not per step."""
    calls = {"n": 0}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *a, _orig=original, **k):
            calls["n"] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    h = Trainer(cfg(snapshot_every=1000, epochs=2), data=tiny_data).fit()
    steps = h.epochs[-1].step
    assert steps == 16
    # two snapshots per epoch (end of steps + epoch) -> a handful of copies, not one per step
    assert calls["n"] <= 2 * len(h.snapshots), calls


def test_live_lr_change_from_another_thread_and_stop(tiny_data):
    t = Trainer(cfg(epochs=200, snapshot_every=1, batch_size=32), data=tiny_data)
    thread = t.start()
    deadline = time.time() + 30
    while len(t.history.steps) < 3 and time.time() < deadline:
        time.sleep(0.01)
    t.live.set(lr=0.05)
    while not t.history.changes and time.time() < deadline:
        time.sleep(0.01)
    (change,) = t.history.changes
    assert change.name == "lr" and change.old == 0.5 and change.new == 0.05
    while len(t.history.steps) < change.step + 2 and time.time() < deadline:
        time.sleep(0.01)
    steps_at_stop_request = t.history.steps[-1].step
    t.stop()
    thread.join(10)
    assert not thread.is_alive()
    h = t.history
    assert h.status == "stopped" and "Stopped" in h.message
    assert h.steps[-1].step <= steps_at_stop_request + 2  # within a step (plus the one in flight)
    before = [s for s in h.steps if s.step < change.step]
    after = [s for s in h.steps if s.step >= change.step]
    assert before and after
    assert all(s.lr == 0.5 for s in before) and all(s.lr == 0.05 for s in after)
    assert t.model is not None
    # the optimiser really uses the new lr
    assert h.epochs == [] or h.epochs[-1].lr == 0.05


def test_live_momentum_and_eps_reach_the_layers(tiny_data):
    live = LiveParams(lr=0.5, bn_momentum=0.1, eps=1e-5, batch_size=64)
    live.set(bn_momentum=None, eps=1e-3)
    t = Trainer(cfg(), data=tiny_data, live=live)
    h = t.fit()
    assert {c.name for c in h.changes} == {"bn_momentum", "eps"}
    assert all(c.step == 1 for c in h.changes)
    for m in (t.model.norm_conv1, t.model.norm_fc2):
        assert m.momentum is None and m.eps == 1e-3


def test_batch_size_change_waits_for_next_epoch(tiny_data):
    seen = []

    def on_snapshot(h, s):
        seen.append((s.epoch, s.batch_size))
        if s.step == 2:
            t.live.set(batch_size=128)

    t = Trainer(cfg(epochs=2, snapshot_every=2), data=tiny_data, on_snapshot=on_snapshot)
    h = t.fit()
    assert {bs for ep, bs in seen if ep == 1} == {64}
    assert {bs for ep, bs in seen if ep == 2} == {128}
    assert h.epochs[1].step - h.epochs[0].step == 4  # 512 / 128
    (change,) = h.changes
    assert change.name == "batch_size" and change.epoch == 2 and change.step == 9


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1), "lr=-1 is not valid; valid: a positive"), (dict(lr=float("nan")), "lr=nan"),
    (dict(lr=True), "lr=True is not valid"), (dict(bn_momentum=2.0), "bn_momentum=2.0 is not valid"),
    (dict(eps=0.0), "eps=0.0 is not valid; valid: a positive"), (dict(batch_size=0), "batch_size=0"),
    (dict(epochs=0), "epochs=0 is not valid; valid: a positive integer, or None"),
    (dict(model="vgg"), "unknown preset 'vgg'"), (dict(dataset="cifar"), "dataset='cifar' is not valid"),
    (dict(train_size=-5), "train_size=-5 is not valid"), (dict(test_size=0), "test_size=0 is not valid"),
    (dict(device="tpu"), "device='tpu' is not valid; valid: 'auto', 'cpu', 'cuda'"),
    (dict(divergence_factor=-1), "divergence_factor=-1 is not valid; valid: a number > 1"),
    (dict(init="he"), "init='he' is not valid; valid: 'd2l', 'pytorch'"),
    (dict(seed=-1), "seed=-1"), (dict(snapshot_every=0), "snapshot_every=0"),
    (dict(weight_decay=-0.1), "weight_decay=-0.1"), (dict(drop_last="yes"), "drop_last='yes'"),
])
def test_bad_config_is_refused_with_valid_range(kwargs, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        cfg(**kwargs)


def test_train_raises_on_bad_input_before_doing_anything(tiny_data):
    with pytest.raises(ValueError, match="dataset='cifar' is not valid"):
        bnviz.train(dataset="cifar")
    with pytest.raises(ValueError, match="unknown Config field"):
        bnviz.train(learning_rate=0.1)
    with pytest.raises(ValueError, match="config must be a bnviz Config"):
        Trainer({"lr": 0.1})


def test_an_unavailable_device_is_a_clear_value_error(tiny_data):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available; valid here: 'cpu', 'auto'"):
        bnviz.train(cfg(device="cuda"), progress=False)


def test_environment_dataset_is_honoured_and_missing_data_raises(monkeypatch, tmp_path):
    """Config.dataset=None means $BNVIZ_DATASET: an explicit 'fashion-mnist' without its files
    raises DataUnavailable instead of training on the synthetic set."""
    import importlib

    from bnviz import data as data_mod

    train_mod = importlib.import_module("bnviz.train")  # (bnviz.train the attribute is the function)

    def unavailable(name, root, download):
        raise data_mod.DataUnavailable(f"{name} is not in {root} (test)")

    monkeypatch.setattr(data_mod, "_load_torchvision", unavailable)
    monkeypatch.setattr(train_mod, "_DATA_CACHE", {})
    monkeypatch.setenv("BNVIZ_DATASET", "fashion-mnist")
    with pytest.raises(data_mod.DataUnavailable, match="fashion-mnist is not in"):
        bnviz.train(Config(device="cpu", epochs=1), progress=False)
    monkeypatch.setenv("BNVIZ_DATASET", "synthetic")
    h = bnviz.train(Config(device="cpu", epochs=1, train_size=256, test_size=64, batch_size=64), progress=False)
    assert "SYNTHETIC" in h.dataset_label


def test_bad_live_value_is_refused_and_run_untouched():
    live = LiveParams(lr=0.5, bn_momentum=0.1, eps=1e-5, batch_size=64)
    with pytest.raises(ValueError, match="lr=0 is not valid"):
        live.set(lr=0)
    with pytest.raises(ValueError, match="bn_momentum=1.5 is not valid"):
        live.set(lr=0.1, bn_momentum=1.5)  # one bad value: nothing of the call is queued
    with pytest.raises(ValueError, match="cannot be changed during a run"):
        live.set(epochs=3)
    assert not live.has_pending


def test_divergence_is_detected_and_explained(tiny_data):
    spec = preset("lenet", activation="relu")
    h = Trainer(cfg(model=spec, lr=50.0, epochs=3), data=tiny_data).fit()
    assert h.status == "diverged"
    assert "Likely causes" in h.message and "learning rate" in h.message
    assert h.snapshots  # what happened before is kept


def test_stuck_at_chance_is_reported(tiny_data):
    h = Trainer(cfg(model=preset("lenet"), lr=0.01, epochs=2, batch_size=16), data=tiny_data).fit()
    assert h.status == "finished"
    assert "chance" in h.message and "did not learn" in h.message


def test_batch_size_one_with_bn_raises_before_training_with_the_explanation(tiny_data):
    t = Trainer(cfg(batch_size=1), data=tiny_data)
    with pytest.raises(ValueError, match="one value per channel") as err:
        t.fit()
    assert "LayerNorm" in str(err.value) and "model.eval()" in str(err.value)
    assert t.history.status == "error" and "one value per channel" in t.history.message
    assert t.history.snapshots == []
    conv_only = preset("lenet-bn", norm_layers=("conv1", "conv2"))
    h2 = Trainer(cfg(model=conv_only, batch_size=1, epochs=1, lr=0.05), data=tiny_data.subset(20, 10)).fit()
    assert h2.status == "finished"  # conv BN with one image = instance normalisation


def test_a_background_run_keeps_its_error_in_the_history(tiny_data):
    wrong = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(10, 10))  # expects 10 inputs
    t = Trainer(cfg(batch_size=8), data=tiny_data, model=wrong)
    t.start()  # the error happens inside the running job: kept, not raised into the caller
    h = t.join(60)
    assert h.status == "error" and "RuntimeError" in h.message and "cannot be multiplied" in h.message
    bad = Trainer(cfg(batch_size=1), data=tiny_data)
    bad.start()
    assert bad.join(60).status == "error" and "Batch size 1" in bad.history.message


def test_until_stopped_runs_past_any_epoch_count_until_stop(tiny_data):
    t = Trainer(cfg(epochs=None, batch_size=256, snapshot_every=1000), data=tiny_data.subset(256, 32))
    t.start()
    deadline = time.time() + 60
    while len(t.history.epochs) < 4 and time.time() < deadline:
        time.sleep(0.01)
    t.stop()
    h = t.join(30)
    assert h.status == "stopped" and len(h.epochs) >= 4


def test_step_is_one_sgd_step_of_pytorch(tiny_data):
    """Trainer.step against an independent reference: the same model copy, torch.optim.SGD on
    the same batch, cross-entropy; parameters equal after one step (float64)."""
    import copy

    import torch.nn.functional as F

    from bnviz.data import to_float

    t = Trainer(cfg(lr=0.3, weight_decay=1e-3), data=tiny_data)
    t._setup()
    t.model.double()
    ref = copy.deepcopy(t.model)
    t._loss = lambda x, y: Trainer._loss(t, x.double(), y)
    idx = torch.arange(64)
    before = t.sums.clone()
    out = t.step(idx)
    opt = torch.optim.SGD(ref.parameters(), lr=0.3, weight_decay=1e-3)
    loss = F.cross_entropy(ref(to_float(tiny_data.train_x[idx]).double()), tiny_data.train_y[idx])
    loss.backward()
    opt.step()
    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-12)
    for (name, p), q in zip(t.model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12, msg=name)
    for b, r in zip(t.model.buffers(), ref.buffers()):
        torch.testing.assert_close(b, r)  # running statistics too
    d = (t.sums - before).tolist()
    assert d[2] == d[5] == 64 and d[0] == pytest.approx(64 * loss.item(), rel=1e-6)


def test_partial_last_batch_of_one_is_dropped_not_fatal(tiny_data):
    h = Trainer(cfg(batch_size=73), data=tiny_data.subset(147, 20)).fit()  # 147 = 2*73 + 1
    assert h.status == "finished" and h.epochs[0].examples == 146


def test_callback_error_does_not_kill_the_run(tiny_data):
    def broken(h, s):
        raise RuntimeError("view bug")

    with pytest.warns(UserWarning, match="view bug"):
        h = Trainer(cfg(), data=tiny_data, on_snapshot=broken).fit()
    assert h.status == "finished"


def test_history_json_round_trip(tiny_data, tmp_path):
    t = Trainer(cfg(epochs=2), data=tiny_data)
    t.live.set(lr=0.25)
    h = t.fit()
    path = save_histories([h], tmp_path / "runs.json")
    (a,) = load_histories(path)
    assert a.to_dict() | {"run_id": 0} == h.to_dict() | {"run_id": 0}
    assert a.run_id != h.run_id and a.uid == h.uid
    assert a.config == h.config and a.changes == h.changes
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a bnviz history file"):
        load_histories(tmp_path / "bad.json")


def test_saving_merges_and_never_loses_earlier_runs(tiny_data, tmp_path):
    one = Trainer(cfg(epochs=1, seed=1), data=tiny_data).fit()
    two = Trainer(cfg(epochs=1, seed=2), data=tiny_data).fit()
    three = Trainer(cfg(epochs=1, seed=3), data=tiny_data).fit()
    path = tmp_path / "runs.json"
    save_histories([one, two], path)
    save_histories([three], path)  # default: merge
    save_histories([three], path)  # the same run again is stored once
    assert [h.uid for h in load_histories(path)] == [one.uid, two.uid, three.uid]
    with pytest.raises(FileExistsError, match="exists"):
        save_histories([three], path, mode="new")
    save_histories([three], path, mode="overwrite")
    assert [h.uid for h in load_histories(path)] == [three.uid]
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"my": "notes"}')
    with pytest.raises(ValueError, match="not a bnviz history file"):
        save_histories([one], foreign)
    assert foreign.read_text() == '{"my": "notes"}'  # untouched
    with pytest.raises(ValueError, match="mode='append' is not valid"):
        save_histories([one], path, mode="append")


def test_start_twice_is_refused(tiny_data):
    t = Trainer(cfg(), data=tiny_data)
    t.start()
    with pytest.raises(RuntimeError, match="already been started"):
        t.start()
    t.join(30)


def test_live_batch_size_one_is_refused_at_the_slider_for_bn_in_fc_layers(tiny_data):
    """The model-dependent check runs in the caller's thread: nothing is queued, the run goes on."""
    t = Trainer(cfg(), data=tiny_data)
    with pytest.raises(ValueError, match="Batch size 1 with batch normalization in a fully connected"):
        t.live.set(batch_size=1)
    assert not t.live.has_pending
    conv_only = Trainer(cfg(model=preset("lenet-bn", norm_layers=("conv1", "conv2"))), data=tiny_data)
    conv_only.live.set(batch_size=1)  # conv BN with one image is instance normalisation: allowed
    assert conv_only.live.has_pending


def test_wait_for_stop_wakes_at_stop(tiny_data):
    t = Trainer(cfg(), data=tiny_data)
    assert t.wait_for_stop(0.01) is False
    threading.Timer(0.05, t.stop).start()
    start = time.perf_counter()
    assert t.wait_for_stop(10) is True and time.perf_counter() - start < 5


def test_the_not_learning_diagnosis_names_init_only_when_it_is_the_suspect():
    from bnviz.callbacks import diagnose

    plain = cfg(model=preset("lenet"), lr=0.9)
    with_pytorch_init = diagnose("Stuck.", plain.replace(init="pytorch"), stuck=True)
    assert "init='pytorch'" in with_pytorch_init and "try init='d2l'" in with_pytorch_init
    with_d2l_init = diagnose("Stuck.", plain, stuck=True)
    assert "init=" not in with_d2l_init and "plateau" in with_d2l_init and "batch norm" in with_d2l_init


def test_snapshot_layout_packs_and_unpacks_every_value_of_every_run():
    """One (runs, width) host copy and back, against the values put in (independent sums)."""
    from bnviz.history import LayerStats, SnapshotLayout

    g = torch.Generator().manual_seed(0)
    runs = 3
    sums = torch.rand(runs, 6, generator=g) * 100 + 1
    epoch_values = {"test_acc": torch.tensor([0.5, 0.25, 0.75]),
                    "precise_test_acc": torch.tensor([0.625, float("nan"), 0.125])}
    gamma, mean, var = (torch.rand(runs, 4, generator=g) for _ in range(3))
    layers = {"conv1": {"gamma": gamma, "beta": None, "batch_mean": mean, "batch_var": var},
              "fc2": {"running_mean": torch.zeros(runs, 2), "running_var": torch.ones(runs, 2)}}
    for kind, (lo, hi) in (("step", (0, 3)), ("epoch", (3, 6))):
        layout = SnapshotLayout(runs)
        flat = layout.pack(sums, epoch_values if kind == "epoch" else {}, layers)
        assert flat.shape == (runs, 6 + (2 if kind == "epoch" else 0) + 3 * 4 + 2 * 2)
        for k, row in enumerate(flat.tolist()):
            got = layout.unpack(row, kind)
            loss_sum, correct, n = sums[k, lo:hi].tolist()
            assert got["loss"] == pytest.approx(loss_sum / n) and got["train_acc"] == pytest.approx(correct / n)
            if kind == "epoch":
                assert got["test_acc"] == [0.5, 0.25, 0.75][k]
                assert got["precise_test_acc"] == [0.625, None, 0.125][k]  # NaN: not measured
            else:
                assert got["test_acc"] is None and got["precise_test_acc"] is None
            assert got["saturated"] is None
            assert list(got["layers"]) == ["conv1", "fc2"]
            c1 = got["layers"]["conv1"]
            assert c1.gamma == pytest.approx(gamma[k].tolist()) and c1.beta == []
            assert c1.batch_mean == pytest.approx(mean[k].tolist()) and c1.batch_var == pytest.approx(var[k].tolist())
            assert got["layers"]["fc2"] == LayerStats(running_mean=[0.0, 0.0], running_var=[1.0, 1.0])
    one = SnapshotLayout()  # a trainer: one run, (C,) tensors
    row = one.pack(sums[0], {}, {"conv1": {"gamma": gamma[0]}}).tolist()[0]
    assert one.unpack(row, "step")["layers"]["conv1"].gamma == pytest.approx(gamma[0].tolist())


def test_a_live_value_is_checked_once_when_queued_then_applied_at_the_top_of_a_step(tiny_data, monkeypatch):
    """Queued before step 3 (by a callback, as a slider would), applied before step 4's
    callbacks, recorded as a Change with step 4; the optimiser and the snapshots use it; the
    value is validated once, by LiveParams.set, not again when applied."""
    from bnviz import config as config_mod

    calls = []
    check_lr = config_mod.CHECKS["lr"]
    monkeypatch.setitem(config_mod.CHECKS, "lr", lambda v: (calls.append(v), check_lr(v)))
    seen = {}

    class Slider:
        def before_step(self, trainer):
            seen[trainer.step_count] = trainer.opt.param_groups[0]["lr"]
            if trainer.step_count == 2:
                trainer.live.set(lr=0.05)

        def on_snapshot(self, trainer, s):
            seen.setdefault("checks at snapshots", []).append(calls.count(0.05))

    t = Trainer(cfg(epochs=1, snapshot_every=1), data=tiny_data, callbacks=[Slider()])
    h = t.fit()
    assert seen[2] == 0.5 and seen[3] == 0.05 and t.opt.param_groups[0]["lr"] == 0.05
    from bnviz.history import Change

    assert h.changes == [Change(step=4, epoch=1, name="lr", old=0.5, new=0.05)]
    assert [s.lr for s in h.steps] == [0.5] * 3 + [0.05] * 5
    assert set(seen["checks at snapshots"][3:]) == {1}  # checked once, when queued
    with pytest.raises(ValueError, match="lr=0 is not valid"):
        t.live.set(lr=0)
    assert not t.live.has_pending


def test_live_batch_size_and_norm_values_are_applied_where_they_are_used(tiny_data):
    """batch size: from the next epoch (its batches); momentum and eps: on every norm layer."""
    from bnviz.models import norm_layers

    class Slider:
        def before_step(self, trainer):
            if trainer.step_count == 1:
                trainer.live.set(batch_size=128, bn_momentum=0.5, eps=1e-3)

    t = Trainer(cfg(epochs=2, snapshot_every=100, model=preset("lenet-bn-scratch")), data=tiny_data,
                callbacks=[Slider()])
    h = t.fit()
    assert [(c.name, c.step, c.epoch) for c in h.changes] == [
        ("bn_momentum", 3, 1), ("eps", 3, 1), ("batch_size", 9, 2)]
    assert h.epochs[1].step - h.epochs[0].step == 4  # 512 / 128
    assert all(m.momentum == 0.5 and m.eps == 1e-3 for m in norm_layers(t.model).values())
