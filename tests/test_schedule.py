"""The lr schedule (Config.lr_schedule) and same-step scoring (Config.score_at).

References: a plain PyTorch loop with ``torch.optim.lr_scheduler.LambdaLR`` (the schedule), the
solo Trainer (the vmapped grid), and PreciseBN computed by hand at the expected steps (scoring).
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from bnviz import Config, preset
from bnviz.data import make_synthetic, to_float
from bnviz.grid import train_grid
from bnviz.models import build_lenet, configure_norms, init_weights
from bnviz.precise import precise_bn_accuracy
from bnviz.runs import Run, run_accuracy, scored_snapshots
from bnviz.sweeps import fixed_steps
from bnviz.train import Trainer, evaluate


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def data():
    return make_synthetic(200, 100, seed=3)  # 200 = 6 x 32 + 8: 7 steps per epoch


def cfg(**kw):
    base = dict(model=preset("lenet-bn"), dataset="synthetic", batch_size=32, lr=0.5, epochs=2,
                snapshot_every=3, device="cpu", fast="eager", lr_schedule="linear")
    base.update(kw)
    return Config(**base)


def lambda_lr_loop(c: Config, data):
    """c's run as a plain loop, the lr from LambdaLR(1 - k/T): (per-step losses, lrs used, model)."""
    torch.manual_seed(c.seed)
    model = configure_norms(init_weights(build_lenet(c.model), c.init), c.bn_momentum, c.eps)
    gen = torch.Generator().manual_seed(c.seed)
    n, bs = len(data.train_x), c.batch_size
    total = c.epochs * -(-n // bs)
    opt = torch.optim.SGD(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / total)
    losses, lrs = [], []
    for _ in range(c.epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, bs):
            idx = order[start:start + bs]
            lrs.append(opt.param_groups[0]["lr"])
            loss = F.cross_entropy(model(to_float(data.train_x[idx])), data.train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
    return losses, lrs, model


def test_linear_schedule_equals_lambda_lr_on_a_plain_loop(data):
    c = cfg(snapshot_every=1, weight_decay=1e-3)
    t = Trainer(c, data=data)
    h = t.fit()
    losses, lrs, ref = lambda_lr_loop(c, data)
    steps = h.steps
    assert [s.step for s in steps] == list(range(1, 15))
    assert [s.lr for s in steps] == pytest.approx(lrs, rel=1e-12)  # the lr each step used
    assert lrs[0] == 0.5 and lrs[-1] == pytest.approx(0.5 / 14)  # full lr first, lr/T last
    assert [s.loss for s in steps] == pytest.approx(losses, rel=1e-4)
    for (name, p), q in zip(t.model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5, msg=name)


def test_constant_schedule_leaves_the_lr_alone(data):
    h = Trainer(cfg(lr_schedule="constant"), data=data).fit()
    assert {s.lr for s in h.snapshots} == {0.5}


def test_a_live_lr_change_is_scaled_by_the_schedule(data):
    c = cfg(snapshot_every=1)
    t = Trainer(c, data=data)
    t.live.set(lr=0.8)  # queued before the first step: the schedule scales the new lr
    h = t.fit()
    assert h.status == "finished"
    assert [s.lr for s in h.steps] == pytest.approx([0.8 * (1 - k / 14) for k in range(14)], rel=1e-12)


def test_grid_with_mixed_schedules_equals_solo_runs(data):
    configs = [cfg(seed=0), cfg(seed=1, lr=1.0, lr_schedule="constant"), cfg(seed=2, lr=0.3, weight_decay=5e-4),
               cfg(model=preset("lenet"), seed=4, lr=0.9)]
    for vectorize in (True, False):
        hists = train_grid(configs, data=data, progress=False, vectorize=vectorize)
        for c, h in zip(configs, hists):
            ref = Trainer(c, data=data).fit()
            assert [(s.kind, s.step) for s in h.snapshots] == [(s.kind, s.step) for s in ref.snapshots]
            assert [s.lr for s in h.snapshots] == pytest.approx([s.lr for s in ref.snapshots], rel=1e-6)
            assert [s.loss for s in h.snapshots] == pytest.approx([s.loss for s in ref.snapshots], rel=1e-4)
            assert [s.test_acc for s in h.epochs] == pytest.approx([s.test_acc for s in ref.epochs], abs=0.0101)
    assert hists[0].steps[-1].lr == pytest.approx(0.5 / 14) and hists[1].steps[-1].lr == 1.0


@pytest.mark.parametrize("bad, match", [
    (dict(lr_schedule="cosine"), "lr_schedule='cosine' is not valid; valid: 'constant', 'linear'"),
    (dict(epochs=None), "epochs=None is not valid"),
    (dict(lr_schedule="constant", score_at=(0.9, 0.5)), "score_at"),
    (dict(lr_schedule="constant", score_at=(0.0, 1.0)), "score_at"),
    (dict(lr_schedule="constant", score_at=(1.5,)), "score_at"),
])
def test_bad_schedule_or_score_steps_are_refused(bad, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        cfg(**bad)


def test_score_at_survives_a_json_round_trip():
    c = cfg(score_at=(0.9, 1.0))
    assert Config.from_dict(__import__("json").loads(__import__("json").dumps(c.to_dict()))) == c


class AtSteps:
    """Reference: PreciseBN and EMA accuracy computed by hand on the trainer's model at ``steps``."""

    def __init__(self, data, steps, images):
        self.data, self.steps, self.images, self.seen = data, steps, images, {}

    def on_snapshot(self, trainer, s):
        if s.step in self.steps and s.step not in self.seen:
            m = copy.deepcopy(trainer.model)
            self.seen[s.step] = (precise_bn_accuracy(m, self.data, self.images),
                                 float(evaluate(m.eval(), self.data.test_x, self.data.test_y)))


def test_cells_of_different_batch_sizes_are_scored_at_the_same_steps():
    """Fixed steps (sweeps.fixed_steps), batch 8 and 32: 40 steps each; score_at (0.9, 0.95, 1)
    gives steps 36, 38, 40 for both, though one epoch is 5 steps at B = 8 and 10 at B = 32, and the
    score is the mean of PreciseBN there, computed by hand on the model at those steps."""
    big = make_synthetic(400, 100, seed=5)
    runs = []
    for bs in (8, 32):
        n, epochs = fixed_steps(40, bs, len(big.train_x))
        d = big.subset(n, 100)
        c = cfg(batch_size=bs, epochs=epochs, lr_schedule="constant", score_at=(0.9, 0.95, 1.0),
                snapshot_every=7, lr=0.2)
        ref = AtSteps(d, {36, 38, 40}, 64)
        from bnviz.precise import PreciseBNEval
        h = Trainer(c, data=d, callbacks=[PreciseBNEval(64), ref]).fit()
        scored = scored_snapshots(h)
        assert [s.step for s in scored] == [36, 38, 40]
        assert set(ref.seen) == {36, 38, 40}
        for s in scored:
            assert s.precise_test_acc == pytest.approx(ref.seen[s.step][0], abs=1e-6)
            assert s.test_acc == pytest.approx(ref.seen[s.step][1], abs=1e-6)
        want = sum(p for p, _ in ref.seen.values()) / 3
        assert run_accuracy(h) == pytest.approx(want, abs=1e-6)
        assert Run("r", {}, h).acc_ema == pytest.approx(sum(e for _, e in ref.seen.values()) / 3, abs=1e-6)
        runs.append((epochs, h))
    assert runs[0][0] != runs[1][0]  # different epochs, the same scored steps


def test_the_vmapped_grid_scores_at_the_same_steps_as_solo(data):
    configs = [cfg(seed=0, score_at=(0.5, 0.9, 1.0)), cfg(seed=1, lr=0.3, score_at=(0.5, 0.9, 1.0))]
    hists = train_grid(configs, data=data, progress=False, vectorize=True, precise_bn=64)
    for c, h in zip(configs, hists):
        from bnviz.precise import PreciseBNEval
        ref = Trainer(c, data=data, callbacks=[PreciseBNEval(64)]).fit()
        got, want = scored_snapshots(h), scored_snapshots(ref)
        assert [s.step for s in got] == [s.step for s in want] == [7, 13, 14]
        assert [s.precise_test_acc for s in got] == pytest.approx([s.precise_test_acc for s in want], abs=0.0101)


@pytest.mark.parametrize("on, decayed", [
    ("weights", {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight", "out.weight"}),
    ("normalized", {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"}),
])
def test_weight_decay_on_some_parameters_equals_sgd_param_groups(data, on, decayed):
    """Config.weight_decay_on against torch.optim.SGD with two hand-made parameter groups (the
    names listed here, not the library's selection): one step of each, parameters equal."""
    c = cfg(lr_schedule="constant", weight_decay=0.05, weight_decay_on=on, epochs=1)
    t = Trainer(c, data=data)
    t._setup()
    ref = copy.deepcopy(t.model)
    named = dict(ref.named_parameters())
    assert decayed < set(named)
    opt = torch.optim.SGD([{"params": [named[k] for k in decayed], "weight_decay": 0.05},
                           {"params": [p for k, p in named.items() if k not in decayed], "weight_decay": 0.0}], lr=0.5)
    idx = torch.arange(32)
    t.step(idx)
    F.cross_entropy(ref(to_float(data.train_x[idx])), data.train_y[idx]).backward()
    opt.step()
    for (name, p), q in zip(t.model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)
    assert "weight decay on" in __import__("bnviz.grid", fromlist=["solo_reason"]).solo_reason(c)
