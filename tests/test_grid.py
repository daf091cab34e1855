"""train_grid: every run of a grid equals the same run trained alone (Trainer, fast='eager').

Tolerances: a vmapped model runs grouped convolutions and batched matmuls, which sum in
another order than one model's ops, so float32 results differ by rounding that training
amplifies a little. Over the 14 steps here: losses within rel 1e-4, accuracies within one
example, per-layer statistics within rel 1e-3 / abs 5e-4, final parameters
within rel 1e-3 / abs 1e-4.
"""
import os

import pytest
import torch

from bnviz import Config, preset
from bnviz.data import make_synthetic
from bnviz.grid import VmapGroup, group_key, solo_reason, train_grid
from bnviz.train import Trainer

LOSS_REL = 1e-4
STAT = dict(rel=1e-3, abs=5e-4)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def data():
    # 200 = 6 x 32 + 8: every epoch ends with a partial batch
    return make_synthetic(200, 100, seed=3)


def cfg(**kw):
    base = dict(model=preset("lenet-bn"), dataset="synthetic", batch_size=32, lr=0.5, epochs=2,
                snapshot_every=3, device="cpu", fast="eager")
    base.update(kw)
    return Config(**base)


def solo(c, data):
    t = Trainer(c, data=data)
    return t.fit(), t


def assert_same_run(h, ref, n_train, n_test):
    assert (h.status, h.message) == (ref.status, ref.message)
    assert h.dataset_label == ref.dataset_label and h.device == ref.device
    assert [(s.kind, s.step, s.epoch, s.examples) for s in h.snapshots] == \
        [(s.kind, s.step, s.epoch, s.examples) for s in ref.snapshots]
    for a, b in zip(h.snapshots, ref.snapshots):
        assert a.loss == pytest.approx(b.loss, rel=LOSS_REL), (a.kind, a.step)
        assert a.train_acc == pytest.approx(b.train_acc, abs=1.01 / n_train)
        if b.test_acc is None:
            assert a.test_acc is None
        else:
            assert a.test_acc == pytest.approx(b.test_acc, abs=1.01 / n_test)
        assert (a.lr, a.bn_momentum, a.eps, a.batch_size) == (b.lr, b.bn_momentum, b.eps, b.batch_size)
        assert list(a.layers) == list(b.layers)
        for name, la in a.layers.items():
            lb = b.layers[name]
            for f in ("gamma", "beta", "running_mean", "running_var", "batch_mean", "batch_var"):
                assert len(getattr(la, f)) == len(getattr(lb, f)), (name, f)
                assert getattr(la, f) == pytest.approx(getattr(lb, f), **STAT), (a.step, name, f)


def test_each_run_of_a_grid_equals_its_solo_run(data):
    configs = [cfg(seed=0, lr=0.5), cfg(seed=1, lr=1.0, weight_decay=5e-4),
               cfg(model=preset("lenet-bn-scratch"), seed=2, lr=0.3),
               cfg(model=preset("lenet-bn-scratch"), seed=3, lr=1.0, init="pytorch"),
               cfg(model=preset("lenet"), seed=4, lr=0.9), cfg(model=preset("lenet"), seed=5, lr=0.3)]
    hists = train_grid(configs, data=data, progress=False, vectorize=True)
    assert [h.config for h in hists] == configs
    for c, h in zip(configs, hists):
        ref, _ = solo(c, data)
        assert h.status == "finished"
        assert_same_run(h, ref, 200, 100)
        assert all(len(s.layers[n].batch_mean) > 0 for s in h.snapshots for n in s.layers)


def test_final_parameters_and_running_statistics_equal_solo(data):
    configs = [cfg(seed=0, lr=0.5), cfg(seed=7, lr=1.0), cfg(seed=8, lr=0.2, weight_decay=1e-3)]
    group = VmapGroup(configs, data, None)
    group.fit()
    for k, c in enumerate(configs):
        _, t = solo(c, data)
        state = t.model.state_dict()
        stacked = {**group.params, **group.buffers}
        assert set(stacked) == set(state)
        for name, value in state.items():
            got = stacked[name][k].detach()
            if value.dtype == torch.long:  # num_batches_tracked: per model, 2 x 7 steps
                assert got.item() == value.item() == 14
            else:
                torch.testing.assert_close(got, value, rtol=1e-3, atol=1e-4, msg=f"run {k} {name}")


def test_a_diverging_run_is_frozen_and_the_others_finish(data):
    lenet = preset("lenet")
    configs = [cfg(model=lenet, seed=0, lr=0.5), cfg(model=lenet, seed=1, lr=1e4),
               cfg(model=lenet, seed=2, lr=0.9)]
    hists = train_grid(configs, data=data, progress=False, vectorize=True)
    ref, _ = solo(configs[1], data)
    assert ref.status == hists[1].status == "diverged"
    assert hists[1].message == ref.message and "Likely causes" in ref.message
    assert [s.step for s in hists[1].snapshots] == [s.step for s in ref.snapshots]
    for k in (0, 2):
        assert hists[k].status == "finished"
        assert_same_run(hists[k], solo(configs[k], data)[0], 200, 100)


def test_mixed_configs_come_back_in_input_order(data):
    configs = [cfg(seed=0, epochs=1), cfg(model=preset("lenet"), seed=1, epochs=1),
               cfg(seed=2, batch_size=50, epochs=1), cfg(seed=3, lr=1.0, epochs=1),
               cfg(model=preset("lenet-bn", dropout=0.3), seed=4, epochs=1),
               cfg(model=preset("lenet"), seed=5, lr=0.3, epochs=1)]
    assert solo_reason(configs[4]).startswith("dropout")
    keys = [group_key(c, torch.device("cpu")) for c in configs]
    assert keys[0] == keys[3] and keys[1] == keys[5] and len(set(keys)) == 4
    hists = train_grid(configs, data=data, progress=False, vectorize=True)
    assert [h.config for h in hists] == configs
    for c, h in zip(configs, hists):
        assert_same_run(h, solo(c, data)[0], 200, 100)


def test_what_runs_solo():
    assert solo_reason(cfg()) is None
    assert "host" in solo_reason(cfg(bn_momentum=None))
    assert solo_reason(cfg(model=preset("lenet-bn-scratch"), bn_momentum=None)) is None
    assert "d2l" in solo_reason(cfg(model=preset("lenet-bn", norm="d2l")))


def test_cumulative_scratch_bn_matches_solo(data):
    configs = [cfg(model=preset("lenet-bn-scratch"), bn_momentum=None, seed=s, epochs=1) for s in (0, 1)]
    hists = train_grid(configs, data=data, progress=False, vectorize=True)
    for c, h in zip(configs, hists):
        assert_same_run(h, solo(c, data)[0], 200, 100)


def test_a_run_at_chance_gets_the_solo_note():
    small = make_synthetic(200, 50, seed=4)  # 50 steps of 4: the 'did not learn' note applies
    configs = [cfg(model=preset("lenet"), batch_size=4, lr=1e-4, epochs=1, snapshot_every=25, seed=s)
               for s in (0, 1)]
    hists = train_grid(configs, data=small, progress=False, vectorize=True)
    for c, h in zip(configs, hists):
        ref = solo(c, small)[0]
        assert "did not learn" in ref.message
        assert_same_run(h, ref, 200, 50)


def test_bad_input_raises_naming_what_is_valid(data):
    for bad in ([], (), "lenet", Config(), None, [Config(), "x"], [Config(), {"lr": 1.0}]):
        with pytest.raises(ValueError, match="valid: a non-empty list of bnviz Config"):
            train_grid(bad, data=data, progress=False, vectorize=True)
    with pytest.raises(ValueError, match="epochs=None"):
        train_grid([cfg(epochs=None)], data=data, progress=False, vectorize=True)
    with pytest.raises(ValueError, match="data must be a bnviz Dataset"):
        train_grid([cfg()], data="mnist", progress=False)
    with pytest.raises(ValueError, match="vectorize='yes' is not valid; valid: None"):
        train_grid([cfg()], data=data, progress=False, vectorize="yes")
    with pytest.raises(ValueError, match="Batch size 1"):
        train_grid([cfg(), cfg(batch_size=1)], data=data, progress=False, vectorize=True)


def test_progress_bar_counts_every_runs_epochs(data, capsys):
    hists = train_grid([cfg(seed=0, epochs=1), cfg(seed=1, epochs=1), cfg(seed=2, epochs=1, batch_size=100)],
                       data=data, progress=True, vectorize=True)
    assert all(h.status == "finished" for h in hists)
    assert "grid of 3 runs" in capsys.readouterr().err


def test_on_a_cpu_the_default_trains_parallel_solo_runs_with_solo_numbers(data, monkeypatch):
    """On a CPU (vmap measured slower there) the runs train as solo Trainers in parallel
    threads: each History equals its solo run exactly (the same code on the same batches;
    models built one at a time under the seeding lock), and the torch thread count is restored."""
    import threading

    import bnviz.grid as grid

    monkeypatch.setattr(grid, "VmapGroup", None)  # would raise if a group were vmapped
    names = set()

    class Where:
        def on_fit_start(self, trainer):
            names.add(threading.current_thread().name)

    configs = [cfg(seed=s, epochs=1, lr=lr) for s, lr in ((0, 0.5), (1, 0.5), (2, 0.1), (3, 1.0))]
    configs.append(cfg(seed=4, epochs=1, model=preset("lenet-bn", dropout=0.3)))  # trains alone
    threads = torch.get_num_threads()
    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # two workers, also on a bigger machine
    original = Trainer.__init__

    def spy(self, *a, callbacks=(), **k):
        original(self, *a, callbacks=[*callbacks, Where()], **k)

    monkeypatch.setattr(grid.Trainer, "__init__", spy)
    hists = train_grid(configs, data=data, progress=False)
    monkeypatch.undo()
    assert torch.get_num_threads() == threads
    assert any(n.startswith("bnviz-grid") for n in names), names  # really in worker threads
    for c, h in zip(configs, hists):
        ref = solo(c, data)[0]
        assert [s.loss for s in h.snapshots] == [s.loss for s in ref.snapshots]  # exactly
        assert [s.test_acc for s in h.epochs] == [s.test_acc for s in ref.epochs]


def test_grid_speed_benchmark_runs():
    """A crash test of benchmarks/grid_speed.py (tiny sizes; no time is asserted)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "grid_speed.py"
    out = subprocess.run([sys.executable, str(script), "--quick", "--runs", "2"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1].startswith("ratio grid/sequential: ")
