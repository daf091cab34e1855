"""Ghost batch normalization (bnviz.norms.GhostBatchNorm, Hoffer, Hubara & Soudry 2017).

The independent reference is PyTorch's own ``F.batch_norm(training=True)`` called on each ghost
batch in a Python loop and concatenated; the running statistics are checked against the formula
written out per ghost batch with ``torch.var(unbiased=True)``.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from bnviz import Config, build_lenet
from bnviz.data import make_synthetic
from bnviz.grid import train_grid
from bnviz.models import LeNetSpec
from bnviz.norms import GhostBatchNorm, ghost_batch_norm
from bnviz.precise import PreciseBNEval
from bnviz.stats import bn_layers, recompute_bn_stats
from bnviz.train import Trainer

# (shape, ghost_batch): N a multiple of g, N with a smaller last ghost batch, a last ghost batch
# of a single 2-d example (joins the previous one), of a single 4-d example (own statistics over
# H*W), and N <= g (plain BN).
CASES = [((64, 6), 16), ((70, 6), 16), ((65, 6), 16), ((24, 3, 5, 5), 8), ((29, 3, 5, 5), 8),
         ((33, 3, 5, 5), 8), ((40, 4, 7), 16), ((6, 4), 8), ((8, 3, 5, 5), 8)]
IDS = [f"{'x'.join(map(str, s))}-g{g}" for s, g in CASES]


def bounds(n, g, dim):
    """The documented ghost batches: consecutive g examples, the rest its own smaller batch,
    except a rest of one 2-d example, which joins the batch before it."""
    edges = list(range(0, n, g)) + [n]
    if dim == 2 and n % g == 1 and n > g:
        edges.pop(-2)
    return list(zip(edges, edges[1:]))


def reference(x, weight, bias, g, eps=1e-5):
    return torch.cat([F.batch_norm(x[a:b], None, None, weight, bias, training=True, eps=eps)
                      for a, b in bounds(len(x), g, x.dim())])


def make(shape, g, dtype, seed=0):
    torch.manual_seed(seed)
    m = GhostBatchNorm(shape[1], ghost_batch=g, dtype=dtype)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-1.0, 1.0)
    x = (torch.randn(*shape, dtype=dtype) * 3 + 1).requires_grad_()
    return m, x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,g", CASES, ids=IDS)
def test_training_output_and_grads_equal_a_loop_of_batch_norm_per_ghost_batch(shape, g, dtype):
    m, x = make(shape, g, dtype)
    w = m.weight.detach().clone().requires_grad_()
    b = m.bias.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    y, ref = m.train()(x), reference(xr, w, b, g)
    torch.testing.assert_close(y, ref)
    up = torch.randn_like(y)
    (y * up).sum().backward()
    (ref * up).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(m.weight.grad, w.grad)
    torch.testing.assert_close(m.bias.grad, b.grad)
    if len(bounds(shape[0], g, len(shape))) > 1:  # more than one ghost batch: not BN of the whole batch
        whole = F.batch_norm(xr.detach(), None, None, w.detach(), b.detach(), training=True)
        assert not torch.allclose(y, whole, atol=1e-3)


@pytest.mark.parametrize("shape,g", CASES, ids=IDS)
def test_running_statistics_follow_the_formula_and_eval_uses_them(shape, g):
    m, x = make(shape, g, torch.float64)
    m.momentum = 0.3
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    for step in range(2):
        xs = x.detach() + step  # a second, shifted batch: the momentum is applied twice
        m.train()(xs)
        dims = [0] + list(range(2, xs.dim()))
        chunks = [xs[a:b] for a, b in bounds(len(xs), g, xs.dim())]
        mean = torch.stack([c.mean(dims) for c in chunks]).mean(0)
        var = torch.stack([torch.var(c.transpose(0, 1).reshape(shape[1], -1), dim=1, unbiased=True)
                           for c in chunks]).mean(0)
        rm, rv = 0.7 * rm + 0.3 * mean, 0.7 * rv + 0.3 * var
        torch.testing.assert_close(m.running_mean, rm)
        torch.testing.assert_close(m.running_var, rv)
        assert m.num_batches_tracked.item() == step + 1
    # eval: the running statistics, exactly as BN; the buffers do not move
    m.eval()
    y = m(x.detach())
    torch.testing.assert_close(y, F.batch_norm(x.detach(), rm, rv, m.weight, m.bias, training=False))
    torch.testing.assert_close(m.running_mean, rm)
    assert m.num_batches_tracked.item() == 2


def test_cumulative_average_with_momentum_none():
    m, x = make((64, 5), 16, torch.float64)
    m.momentum = None
    batches = [x.detach(), 2 * x.detach() - 3]
    values = []
    for xs in batches:
        m.train()(xs)
        chunks = xs.split(16)
        values.append((torch.stack([c.mean(0) for c in chunks]).mean(0),
                       torch.stack([c.var(0, unbiased=True) for c in chunks]).mean(0)))
    torch.testing.assert_close(m.running_mean, (values[0][0] + values[1][0]) / 2)
    torch.testing.assert_close(m.running_var, (values[0][1] + values[1][1]) / 2)


def test_recomputed_statistics_average_every_ghost_batch_with_equal_weight():
    m, x = make((192, 6), 16, torch.float64)
    m.running_mean.fill_(5.0)
    recompute_bn_stats(nn.Sequential(m), x.detach(), batch_size=64)  # 3 batches of 4 ghost batches
    chunks = x.detach().split(16)
    torch.testing.assert_close(m.running_mean, torch.stack([c.mean(0) for c in chunks]).mean(0))
    torch.testing.assert_close(m.running_var, torch.stack([c.var(0, unbiased=True) for c in chunks]).mean(0))
    assert m.momentum == 0.1 and m.training  # restored


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape", [(32, 6), (20, 6), (32, 3, 5, 5), (7, 3, 5, 5)])
def test_a_batch_of_at_most_ghost_batch_examples_is_plain_batch_norm(shape, momentum):
    ghost, x = make(shape, 32, torch.float32)
    ghost.momentum = momentum
    bn = (nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d)(shape[1], momentum=momentum)
    bn.load_state_dict(ghost.state_dict())
    x2 = x.detach().clone().requires_grad_()
    for step in range(2):
        y, ref = ghost.train()(x + step), bn.train()(x2 + step)
        torch.testing.assert_close(y, ref)
        (y.square() * torch.arange(y.numel()).reshape(y.shape)).sum().backward()
        (ref.square() * torch.arange(ref.numel()).reshape(ref.shape)).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    for name, value in bn.state_dict().items():
        torch.testing.assert_close(ghost.state_dict()[name], value, msg=name)
    torch.testing.assert_close(ghost.weight.grad, bn.weight.grad)
    torch.testing.assert_close(ghost.bias.grad, bn.bias.grad)
    torch.testing.assert_close(ghost.eval()(x), bn.eval()(x2))


@pytest.mark.parametrize("shape,g", [((24, 3), 8), ((21, 3), 8), ((17, 2, 3, 3), 4), ((12, 2, 3, 3), 4)])
def test_gradcheck_float64(shape, g):
    torch.manual_seed(1)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w = torch.rand(shape[1], dtype=torch.float64).add(0.5).requires_grad_()
    b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, b: ghost_batch_norm(x, w, b, None, None, ghost_batch=g)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_full_ghost_batches_are_vectorised_not_looped():
    """The same ops run whether the batch holds 2 or 16 ghost batches (a loop over ghost
    batches would run more ops for more of them)."""
    counts = []
    for n in (32, 256):
        m, x = make((n, 6, 4, 4), 16, torch.float32)
        with _CountOps() as c:
            m.train()(x.detach())
        counts.append(c.ops)
    assert counts[0] == counts[1]
    assert sum("var_mean" in op for op in counts[1]) == 1


def test_bad_ghost_batch_values_raise_naming_the_field():
    for bad in (0, 1, -4, 2.5, "32", True, None):
        with pytest.raises(ValueError, match=r"ghost_batch=.* is not valid; valid: an int >= 2"):
            GhostBatchNorm(4, ghost_batch=bad)
        with pytest.raises(ValueError, match=r"LeNetSpec\.ghost_batch=.* is not valid; valid: an int >= 2"):
            LeNetSpec(norm="ghost", ghost_batch=bad)
    with pytest.raises(ValueError, match="ghost_batch=1 is not valid"):
        ghost_batch_norm(torch.randn(4, 3), None, None, None, None, ghost_batch=1)


def test_ghost_lenet_is_a_bn_model_that_says_so():
    spec = LeNetSpec(norm="ghost", ghost_batch=16)
    assert spec.is_batch_norm and spec.uses_norm
    assert spec.label().startswith("ghost BN (virtual batch 16)")
    assert "ghost BN (virtual batch 16)" in Config(model=spec).describe() and "mom 0.1" in Config(model=spec).describe()
    model = build_lenet(spec)
    ghosts = [m for m in model.modules() if isinstance(m, GhostBatchNorm)]
    assert len(ghosts) == 4 and all(m.ghost_batch == 16 for m in ghosts)
    assert len(bn_layers(model)) == 4  # so PreciseBN recomputes its statistics
    assert LeNetSpec.from_dict(spec.to_dict()) == spec


def cfg(**kw):
    base = dict(model=LeNetSpec(norm="ghost", ghost_batch=16), dataset="synthetic", batch_size=64, lr=0.5,
                epochs=1, snapshot_every=2, device="cpu", fast="eager")
    base.update(kw)
    return Config(**base)


@pytest.fixture(scope="module")
def small_data():
    return make_synthetic(256, 64, seed=1)


def test_trainer_trains_a_ghost_lenet_and_a_large_ghost_batch_is_bn(small_data):
    t = Trainer(cfg(), data=small_data)
    h = t.fit()
    assert h.status == "finished" and all(torch.isfinite(torch.tensor(s.loss)) for s in h.snapshots)
    steps = h.snapshots[-1].step
    assert steps == 4  # 256 examples / 64
    assert all(m.num_batches_tracked.item() == steps for m in bn_layers(t.model).values())
    as_bn = Trainer(cfg(model=LeNetSpec(norm="scratch")), data=small_data).fit()
    one_ghost = Trainer(cfg(model=LeNetSpec(norm="ghost", ghost_batch=64)), data=small_data).fit()
    assert [s.loss for s in one_ghost.snapshots] == pytest.approx([s.loss for s in as_bn.snapshots], rel=1e-5)
    # 4 ghost batches of 16 train differently from BN over the batch of 64
    assert [s.loss for s in h.snapshots] != pytest.approx([s.loss for s in as_bn.snapshots], rel=1e-3)


def test_a_vmapped_grid_run_equals_the_solo_run():
    data = make_synthetic(200, 100, seed=3)  # 200 = 6 x 32 + 8: the last batch is one ghost batch
    spec = LeNetSpec(norm="ghost", ghost_batch=12)  # 32 = 2 x 12 + 8: a smaller last ghost batch
    configs = [cfg(model=spec, batch_size=32, epochs=2, snapshot_every=3, seed=s, lr=lr)
               for s, lr in ((0, 0.5), (1, 1.0))]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        hists = train_grid(configs, data=data, progress=False, vectorize=True, precise_bn=100)
        for c, h in zip(configs, hists):
            ref = Trainer(c, data=data, callbacks=[PreciseBNEval(100)]).fit()
            assert h.status == ref.status == "finished"
            assert [(s.kind, s.step) for s in h.snapshots] == [(s.kind, s.step) for s in ref.snapshots]
            assert [s.loss for s in h.snapshots] == pytest.approx([s.loss for s in ref.snapshots], rel=1e-4)
            for name in ("conv1", "fc2"):
                a, b = h.snapshots[-1].layers[name], ref.snapshots[-1].layers[name]
                assert a.running_var == pytest.approx(b.running_var, rel=1e-3, abs=5e-4)
                assert a.running_mean == pytest.approx(b.running_mean, rel=1e-3, abs=5e-4)
            assert all(s.precise_test_acc is not None for s in h.epochs)  # PreciseBN recomputes ghost BN
            assert [s.precise_test_acc for s in h.epochs] == pytest.approx(
                [s.precise_test_acc for s in ref.epochs], abs=1.01 / 100)
    finally:
        torch.set_num_threads(threads)
