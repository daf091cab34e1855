"""The trainer: seeding, live parameters from another thread, stop, divergence, history I/O."""
import math
import threading
import time

import pytest
import torch

from bnviz import Config, LiveParams, Trainer, preset
from bnviz.train import History, load_histories, save_histories


def cfg(**kw):
    base = dict(model=preset("lenet-bn"), dataset="synthetic", batch_size=64, lr=0.5, epochs=1,
                snapshot_every=2, device="cpu")
    base.update(kw)
    return Config(**base)


def test_same_config_and_seed_give_the_same_curve(tiny_data):
    a = Trainer(cfg(epochs=2), data=tiny_data).run()
    b = Trainer(cfg(epochs=2), data=tiny_data).run()
    assert a.status == b.status == "finished"
    assert [s.loss for s in a.snapshots] == [s.loss for s in b.snapshots]
    c = Trainer(cfg(epochs=2, seed=1), data=tiny_data).run()
    assert [s.loss for s in a.snapshots] != [s.loss for s in c.snapshots]


def test_scratch_and_torch_bn_train_identically(tiny_data):
    a = Trainer(cfg(model=preset("lenet-bn", norm="torch")), data=tiny_data).run()
    b = Trainer(cfg(model=preset("lenet-bn", norm="scratch")), data=tiny_data).run()
    for sa, sb in zip(a.snapshots, b.snapshots):
        assert sa.loss == pytest.approx(sb.loss, rel=1e-4, abs=1e-5)
    for name in ("conv1", "fc2"):
        la, lb = a.snapshots[-1].layers[name], b.snapshots[-1].layers[name]
        assert la.running_var == pytest.approx(lb.running_var, rel=1e-3, abs=1e-5)


def test_learns_well_above_chance_on_synthetic_data():
    from bnviz.data import make_synthetic

    data = make_synthetic(3000, 1000, seed=2)
    h = Trainer(cfg(batch_size=128, lr=1.0, epochs=3, snapshot_every=10), data=data).run()
    assert h.final_test_acc > 0.4, h.summary()  # chance is 0.1
    assert h.steps[-1].loss < h.steps[0].loss


def test_snapshot_contents(tiny_data):
    t = Trainer(cfg(snapshot_every=3), data=tiny_data)
    h = t.run()
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
    h = Trainer(cfg(snapshot_every=1), data=tiny_data).run()
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
    h = Trainer(cfg(snapshot_every=1000, epochs=2), data=tiny_data).run()
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
    h = t.run()
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
    h = t.run()
    assert {bs for ep, bs in seen if ep == 1} == {64}
    assert {bs for ep, bs in seen if ep == 2} == {128}
    assert h.epochs[1].step - h.epochs[0].step == 4  # 512 / 128
    (change,) = h.changes
    assert change.name == "batch_size" and change.epoch == 2 and change.step == 9


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1), "lr must be a positive"), (dict(lr=float("nan")), "lr must be"),
    (dict(bn_momentum=2.0), "momentum must be in"), (dict(eps=0.0), "eps must be a positive"),
    (dict(batch_size=0), "batch_size must be a positive"), (dict(epochs=0), "epochs"),
    (dict(model="vgg"), "unknown preset"),
])
def test_bad_config_is_refused_with_valid_range(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cfg(**kwargs)


def test_bad_live_value_is_refused_and_run_untouched():
    live = LiveParams(lr=0.5, bn_momentum=0.1, eps=1e-5, batch_size=64)
    with pytest.raises(ValueError, match="lr must be"):
        live.set(lr=0)
    with pytest.raises(ValueError, match="cannot be changed during a run"):
        live.set(epochs=3)
    assert not live.has_pending


def test_divergence_is_detected_and_explained(tiny_data):
    spec = preset("lenet", activation="relu")
    h = Trainer(cfg(model=spec, lr=50.0, epochs=3), data=tiny_data).run()
    assert h.status == "diverged"
    assert "Likely causes" in h.message and "learning rate" in h.message
    assert h.snapshots  # what happened before is kept


def test_stuck_at_chance_is_reported(tiny_data):
    h = Trainer(cfg(model=preset("lenet"), lr=0.01, epochs=2, batch_size=16), data=tiny_data).run()
    assert h.status == "finished"
    assert "chance" in h.message and "did not learn" in h.message


def test_batch_size_one_with_bn_is_explained(tiny_data):
    h = Trainer(cfg(batch_size=1), data=tiny_data).run()
    assert h.status == "error"
    assert "one value per channel" in h.message and "LayerNorm" in h.message
    conv_only = preset("lenet-bn", norm_layers=("conv1", "conv2"))
    h2 = Trainer(cfg(model=conv_only, batch_size=1, epochs=1), data=tiny_data.subset(20, 10)).run()
    assert h2.status == "finished"  # conv BN with one image = instance normalisation


def test_partial_last_batch_of_one_is_dropped_not_fatal(tiny_data):
    h = Trainer(cfg(batch_size=73), data=tiny_data.subset(147, 20)).run()  # 147 = 2*73 + 1
    assert h.status == "finished" and h.epochs[0].examples == 146


def test_callback_error_does_not_kill_the_run(tiny_data):
    def broken(h, s):
        raise RuntimeError("view bug")

    with pytest.warns(UserWarning, match="view bug"):
        h = Trainer(cfg(), data=tiny_data, on_snapshot=broken).run()
    assert h.status == "finished"


def test_history_json_round_trip(tiny_data, tmp_path):
    t = Trainer(cfg(epochs=2), data=tiny_data)
    t.live.set(lr=0.25)
    h = t.run()
    path = save_histories([h, h], tmp_path / "runs.json")
    a, b = load_histories(path)
    assert a.to_dict() | {"run_id": 0} == h.to_dict() | {"run_id": 0}
    assert a.run_id != b.run_id != h.run_id
    assert a.config == h.config and a.changes == h.changes
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a bnviz history file"):
        load_histories(tmp_path / "bad.json")


def test_compile_falls_back_on_cpu_with_a_message(tiny_data):
    h = Trainer(cfg(compile=True), data=tiny_data).run()
    assert h.status == "finished" and "eager" in h.message


def test_start_twice_is_refused(tiny_data):
    t = Trainer(cfg(), data=tiny_data)
    t.start()
    with pytest.raises(RuntimeError, match="already been started"):
        t.start()
    t.join(30)
