"""The plain PyTorch loop (bnviz.plain_loop) equals a member of a grid, and PreciseBN inside
train_grid equals stats.recompute_bn_stats on the solo run."""
import copy

import pytest
import torch

from bnviz import Config, preset
from bnviz.data import make_synthetic
from bnviz.grid import train_grid
from bnviz.plain_loop import plain_train
from bnviz.stats import recompute_bn_stats
from bnviz.train import Trainer, evaluate


@pytest.fixture(scope="module")
def data():
    return make_synthetic(300, 200, seed=4)


def cfg(**kw):
    d = dict(model=preset("lenet-bn"), dataset="synthetic", batch_size=32, lr=0.5, epochs=2, seed=1,
             snapshot_every=5, device="cpu", fast="eager")
    d.update(kw)
    return Config(**d)


@pytest.mark.parametrize("vectorize", [False, True])
def test_plain_loop_equals_a_grid_member(data, vectorize):
    configs = [cfg(seed=0), cfg(seed=1, lr=0.3), cfg(seed=2)]
    member = train_grid(configs, data=data, progress=False, vectorize=vectorize, precise_bn=100)[1]
    plain = plain_train(configs[1], data, precise_bn=100)
    assert [e.loss for e in member.epochs] == pytest.approx(plain["loss"], rel=1e-4)
    assert [e.test_acc for e in member.epochs] == pytest.approx(plain["test_acc"], abs=1e-6)
    assert [e.precise_test_acc for e in member.epochs] == pytest.approx(plain["precise_test_acc"], abs=1e-6)


@pytest.mark.parametrize("vectorize", [False, True])
def test_precise_bn_in_the_grid_equals_recompute_bn_stats_on_a_solo_run(data, vectorize):
    c = cfg(epochs=1, lr=2.0, bn_momentum=0.01)  # a slow EMA: recomputing matters
    grid = train_grid([c, cfg(epochs=1, seed=5)], data=data, progress=False, vectorize=vectorize, precise_bn=150)[0]
    t = Trainer(c, data=data)
    t.fit()
    m = recompute_bn_stats(copy.deepcopy(t.model), data.train_x[:150], batch_size=250)
    want = float(evaluate(m, data.test_x, data.test_y))
    assert grid.epochs[-1].precise_test_acc == pytest.approx(want, abs=1e-6)
    assert grid.epochs[-1].test_acc == pytest.approx(float(evaluate(t.model, data.test_x, data.test_y)), abs=1e-6)
    # the run's own moving averages are untouched by the evaluation
    assert not torch.equal(m.norm_conv1.running_mean, t.model.norm_conv1.running_mean)


def test_without_bn_there_is_nothing_to_recompute(data):
    h = train_grid([cfg(model=preset("lenet"), epochs=1), cfg(model=preset("lenet"), epochs=1, seed=3)], data=data,
                   progress=False, precise_bn=100)[0]
    assert h.epochs[-1].precise_test_acc is None
    assert 0.0 <= h.epochs[-1].saturated <= 1.0  # a sigmoid LeNet: the saturated share is measured
