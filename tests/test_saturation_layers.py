"""Per-layer sigmoid saturation stored by the engine (Snapshot.saturated_layers): the solo run's
and the vmapped grid's against a direct computation on the final model, and the per-layer CAUTION
it feeds (an fc layer's saturation no longer hidden in a share pooled over conv1's outputs)."""
import pytest
import torch

from bnviz import Config, preset
from bnviz.data import make_synthetic, to_float
from bnviz.grid import train_grid
from bnviz.history import History, Snapshot
from bnviz.precise import PreciseBNEval, precise_model
from bnviz.runs import Run
from bnviz.train import Trainer
from bnviz.verdicts import CauseKind, cell_causes


@pytest.fixture(scope="module")
def data():
    return make_synthetic(200, 100, seed=3)


def cfg(**kw):
    base = dict(model=preset("lenet-bn"), dataset="synthetic", batch_size=32, lr=2.0, epochs=2, snapshot_every=5,
                device="cpu", fast="eager")
    base.update(kw)
    return Config(**base)


def direct(model, x, sizes=None):
    """{layer: share of its sigmoid outputs < 0.05 or > 0.95}, eval mode, from forward hooks on act_*
    (``sizes`` gets each layer's number of outputs)."""
    out, sizes = {}, {} if sizes is None else sizes

    def hook(m, i, o, n):
        out[n] = ((o < 0.05) | (o > 0.95)).double().mean().item()
        sizes[n] = o.numel()

    hooks = [getattr(model, f"act_{n}").register_forward_hook(lambda m, i, o, n=n: hook(m, i, o, n))
             for n in ("conv1", "conv2", "fc1", "fc2")]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return out


@pytest.mark.parametrize("spec", ["lenet-bn", "lenet"])
def test_solo_and_grid_store_one_share_per_sigmoid_layer(data, spec):
    torch.set_num_threads(1)
    configs = [cfg(model=preset(spec), seed=0, init="pytorch"), cfg(model=preset(spec), seed=1, lr=0.5)]
    t = Trainer(configs[0], data=data, callbacks=[PreciseBNEval(64)])
    solo = t.fit()
    m = precise_model(t.model, data, 64) if spec == "lenet-bn" else t.model
    sizes = {}
    want = direct(m, to_float(data.train_x[:64]), sizes)
    got = solo.epochs[-1].saturated_layers
    assert list(got) == ["conv1", "conv2", "fc1", "fc2"]
    assert got == pytest.approx(want, abs=1e-6)
    grid = train_grid(configs, data=data, progress=False, vectorize=True, precise_bn=64)
    if spec == "lenet-bn":  # the layers differ (conv1 about 0.035, fc1 0): a mix-up of layers shows
        assert max(want.values()) - min(want.values()) > 0.01
    assert grid[0].epochs[-1].saturated_layers == pytest.approx(want, abs=2e-3)  # vmapped: rounding
    assert all(s.saturated_layers is None for s in grid[0].steps)  # measured at epoch ends only
    # the pooled share is the per-layer shares weighted by each layer's outputs
    pooled = sum(want[k] * n for k, n in sizes.items()) / sum(sizes.values())
    assert solo.epochs[-1].saturated == pytest.approx(pooled, abs=1e-6)


def run_with(layers, pooled):
    h = History(config=cfg())
    h.status = "finished"
    h.snapshots = [Snapshot(kind="epoch", step=10, epoch=1, examples=320, time_s=0, loss=1.0, train_acc=0.8,
                            test_acc=0.8, examples_per_s=0, lr=2.0, bn_momentum=0.1, eps=1e-5, batch_size=32,
                            saturated=pooled, saturated_layers=layers)]
    return Run("r", {}, h)


def test_the_per_layer_caution_fires_from_stored_shares_where_the_pooled_share_would_not():
    layers = {"conv1": 0.10, "conv2": 0.2, "fc1": 0.9, "fc2": 0.4}
    pooled = 0.12  # conv1's many outputs dominate the pooled share
    causes = [c for c in cell_causes([run_with(layers, pooled)] * 2) if c.kind is CauseKind.SATURATION]
    assert [(c.layer, round(c.value, 3)) for c in causes] == [("fc1", 0.9)]
    assert not [c for c in cell_causes([run_with(None, pooled)] * 2) if c.kind is CauseKind.SATURATION]
