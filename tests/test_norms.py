"""bnviz.norms against PyTorch's own BatchNorm: outputs, gradients, buffers, conventions."""

import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnviz.norms import BatchNorm, D2LBatchNorm, LiteBatchNorm, batch_norm, d2l_batch_norm

SHAPES = [(16, 7), (5, 3), (8, 4, 9), (6, 5, 4, 3), (4, 3, 7, 7)]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def reference_for(shape, **kwargs):
    return (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(shape[1], **kwargs)


def random_affine_pair(shape, dtype, **kwargs):
    ref = reference_for(shape, **kwargs).to(dtype)
    ours = BatchNorm(shape[1], **kwargs).to(dtype)
    if ref.affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 2.0)
            ref.bias.normal_()
            ours.weight.copy_(ref.weight)
            ours.bias.copy_(ref.bias)
    return ref, ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False)])
def test_matches_torch_train_then_eval(dtype, shape, momentum, affine, track):
    # a seed that is the same in every process (hash() of a tuple holding None is not, on 3.11)
    torch.manual_seed(zlib.crc32(repr((shape, momentum, affine, track)).encode()))
    ref, ours = random_affine_pair(shape, dtype, momentum=momentum, affine=affine, track_running_stats=track)
    tol = TOL[dtype]
    for step in range(12):  # many steps in training mode, with shifting statistics
        x = (torch.randn(shape, dtype=dtype) * (1 + step) + step).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        y_ref, y = ref(x), ours(x2)
        torch.testing.assert_close(y, y_ref, **tol)
        g = torch.randn_like(y)
        y_ref.backward(g)
        y.backward(g)
        torch.testing.assert_close(x2.grad, x.grad, **tol)
        if affine:
            # γ/β grads accumulate over the 12 steps, each a float32 sum over N·H·W values: the
            # summation order differs from PyTorch's kernel (worst seen over 200 seeds: 1.6e-5 above
            # rtol·|grad|), so float32 gets atol 5e-5 here; float64 keeps 1e-10
            ptol = {**tol, "atol": 5e-5} if dtype == torch.float32 else tol
            torch.testing.assert_close(ours.weight.grad, ref.weight.grad, **ptol)
            torch.testing.assert_close(ours.bias.grad, ref.bias.grad, **ptol)
    if track:
        torch.testing.assert_close(ours.running_mean, ref.running_mean, **tol)
        torch.testing.assert_close(ours.running_var, ref.running_var, **tol)
        assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == 12
    ref.eval()
    ours.eval()
    for n in ((1, shape[0]) if track else (shape[0],)):  # eval works with any batch size, even 1
        x = torch.randn((n,) + shape[1:], dtype=dtype, requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        y_ref, y = ref(x), ours(x2)
        torch.testing.assert_close(y, y_ref, **tol)
        y_ref.sum().backward()
        y.sum().backward()
        # Without running statistics the output is normalised by the batch's own statistics, so
        # d(sum y)/dx is 0 up to rounding: compare at the rounding level of the reduction order
        # (which depends on the thread count), not at 1e-5.
        zero_tol = {} if track else {"atol": 1e-4 if dtype == torch.float32 else 1e-9, "rtol": 0}
        torch.testing.assert_close(x2.grad, x.grad, **{**tol, **zero_tol})


def test_running_var_is_unbiased_and_momentum_weights_new_batch():
    bn = BatchNorm(3, momentum=0.25)
    x = torch.randn(10, 3, dtype=torch.float64) * 2 + 5
    bn.double()(x)
    var_unbiased = x.var(0, unbiased=True)
    torch.testing.assert_close(bn.running_var, 0.75 * 1.0 + 0.25 * var_unbiased)
    torch.testing.assert_close(bn.running_mean, 0.25 * x.mean(0))


def test_cumulative_average_when_momentum_none():
    bn = BatchNorm(4, momentum=None).double()
    xs = [torch.randn(6, 4, dtype=torch.float64) + i for i in range(5)]
    for x in xs:
        bn(x)
    torch.testing.assert_close(bn.running_mean, torch.stack([x.mean(0) for x in xs]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([x.var(0) for x in xs]).mean(0))


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (3, 2, 4, 4)])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_float64(shape, training):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = torch.rand(shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    rm = torch.randn(shape[1], dtype=torch.float64)
    rv = torch.rand(shape[1], dtype=torch.float64) + 0.5

    def f(x, w, b):
        return batch_norm(x, w, b, rm.clone(), rv.clone(), None, training=training, momentum=0.1, eps=1e-5)

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradgradcheck(f, (x, w, b), eps=1e-6, atol=1e-6)


def test_functional_matches_torch_functional():
    torch.manual_seed(1)
    x = torch.randn(8, 5, 3, 3, dtype=torch.float64)
    w, b = torch.rand(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    rm1, rv1 = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    rm2, rv2 = rm1.clone(), rv1.clone()
    y1 = F.batch_norm(x, rm1, rv1, w, b, training=True, momentum=0.3, eps=1e-3)
    y2 = batch_norm(x, w, b, rm2, rv2, training=True, momentum=0.3, eps=1e-3)
    torch.testing.assert_close(y2, y1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rm2, rm1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rv2, rv1, rtol=1e-12, atol=1e-12)


def test_state_dict_round_trip_and_same_keys_as_torch():
    ours = BatchNorm(5)
    ours(torch.randn(8, 5, 2, 2))
    ref = nn.BatchNorm2d(5)
    assert set(ours.state_dict()) == set(ref.state_dict())
    ref.load_state_dict(ours.state_dict())  # interchangeable with nn.BatchNorm2d
    fresh = BatchNorm(5)
    fresh.load_state_dict(ours.state_dict())
    for k, v in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert [n for n, _ in ours.named_buffers()] == ["running_mean", "running_var", "num_batches_tracked"]
    assert [n for n, _ in ours.named_parameters()] == ["weight", "bias"]


def test_to_moves_buffers():
    bn = BatchNorm(3).to(torch.float64)
    assert bn.running_mean.dtype == torch.float64 and bn.running_var.dtype == torch.float64
    assert bn.num_batches_tracked.dtype == torch.long
    bn(torch.randn(4, 3, dtype=torch.float64))


def test_track_running_stats_false_uses_batch_stats_in_eval():
    bn = BatchNorm(3, track_running_stats=False).eval()
    ref = nn.BatchNorm1d(3, track_running_stats=False).eval()
    x = torch.randn(7, 3)
    torch.testing.assert_close(bn(x), ref(x))
    assert bn.running_mean is None and "running_mean" not in bn.state_dict()


def test_mode_comes_from_self_training_not_grad_mode():
    bn = BatchNorm(3)
    bn(torch.randn(16, 3) * 3 + 2)
    bn.eval()
    x = torch.randn(4, 3)
    with torch.enable_grad():
        y = bn(x)
    expected = (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(y, expected)
    bn.train()
    with torch.no_grad():  # training mode under no_grad still uses (and updates) batch stats
        before = bn.num_batches_tracked.item()
        y = bn(x)
    assert bn.num_batches_tracked.item() == before + 1
    torch.testing.assert_close(y.mean(0), torch.zeros(3), atol=1e-6, rtol=0)


def test_one_value_per_channel_raises_like_torch():
    x = torch.randn(1, 4)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training") as ours:
        BatchNorm(4)(x)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        nn.BatchNorm1d(4)(x)
    assert "batch size" in str(ours.value)  # and says what to do
    BatchNorm(4).eval()(x)  # prediction with one example is fine
    BatchNorm(4)(torch.randn(1, 4, 3, 3))  # conv input: 9 values per channel is fine


@pytest.mark.parametrize("bad", [torch.randn(2), torch.randn(2, 3, 4, 5, 6)])
def test_bad_rank_names_the_valid_shapes(bad):
    with pytest.raises(ValueError, match=r"2D \(N, C\), 3D \(N, C, L\) or 4D"):
        BatchNorm(3)(bad)


def test_wrong_channel_count_and_bad_arguments():
    with pytest.raises(ValueError, match="expected 3 channels"):
        BatchNorm(3)(torch.randn(4, 5))
    with pytest.raises(ValueError, match="momentum"):
        BatchNorm(3, momentum=1.5)
    with pytest.raises(ValueError, match="eps"):
        BatchNorm(3, eps=0)
    with pytest.raises(ValueError, match="num_features"):
        BatchNorm(0)


def test_live_changes_of_momentum_and_eps_take_effect():
    ref, ours = random_affine_pair((8, 3), torch.float64)
    for m, e in [(0.1, 1e-5), (0.9, 1e-1), (None, 1.0)]:
        ref.momentum = ours.momentum = m
        ref.eps = ours.eps = e
        x = torch.randn(8, 3, dtype=torch.float64)
        torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_var, ref.running_var)


def test_lite_variants():
    x = torch.randn(32, 4, dtype=torch.float64) * 3 + 7
    center = LiteBatchNorm(4, mode="center").double()(x)
    torch.testing.assert_close(center, x - x.mean(0))
    scale = LiteBatchNorm(4, mode="scale").double()(x)
    torch.testing.assert_close(scale, x / torch.sqrt(x.var(0, unbiased=False) + 1e-5))
    with pytest.raises(ValueError, match="'center' or 'scale'"):
        LiteBatchNorm(4, mode="both")


# ------------------------------------------------------------------ the d2l-book variant


def test_d2l_forward_equals_torch_in_training():
    torch.manual_seed(3)
    x = torch.randn(8, 6, 5, 5)
    d2l, ref = D2LBatchNorm(6, num_dims=4), nn.BatchNorm2d(6)
    torch.testing.assert_close(d2l(x), ref(x), rtol=1e-5, atol=1e-5)


def test_d2l_stores_biased_variance_difference_is_factor_m_over_m_minus_1():
    x = torch.randn(4, 3, dtype=torch.float64) * 2
    d2l, ref = D2LBatchNorm(3, num_dims=2), nn.BatchNorm1d(3).double()
    d2l.moving_var = d2l.moving_var.double()
    d2l.moving_mean = d2l.moving_mean.double()
    d2l.gamma.data = d2l.gamma.data.double()
    d2l.beta.data = d2l.beta.data.double()
    d2l(x)
    ref(x)
    m = x.shape[0]
    # moving = 0.9 * 1 + 0.1 * var: the batch parts differ exactly by m / (m - 1)
    batch_part_d2l = (d2l.moving_var.flatten() - 0.9) / 0.1
    batch_part_ref = (ref.running_var - 0.9) / 0.1
    torch.testing.assert_close(batch_part_ref, batch_part_d2l * m / (m - 1))
    assert (batch_part_ref > batch_part_d2l).all()


def test_d2l_mode_follows_grad_mode_not_eval():
    torch.manual_seed(4)
    d2l = D2LBatchNorm(3, num_dims=2)
    for _ in range(3):
        d2l(torch.randn(16, 3) * 2 + 3)
    d2l.eval()  # ignored by the d2l layer
    x = torch.randn(5, 3) * 2 + 3
    y_eval_with_grad = d2l(x)
    assert torch.allclose(y_eval_with_grad.mean(0), torch.zeros(3), atol=1e-5)  # batch statistics!
    with torch.no_grad():
        y_nograd = d2l(x)
    expected = (x - d2l.moving_mean) / torch.sqrt(d2l.moving_var + 1e-5)
    torch.testing.assert_close(y_nograd, expected)


def test_d2l_moving_stats_are_not_buffers():
    d2l = D2LBatchNorm(3, num_dims=4)
    assert set(d2l.state_dict()) == {"gamma", "beta"}  # moving stats are lost on save
    d2l.double()
    assert d2l.moving_mean.dtype == torch.float32  # .to()/.double() did not touch them


def test_momentum_conventions_agree_when_converted():
    x = [torch.randn(8, 2, dtype=torch.float64) for _ in range(4)]
    mm_new, mv_new = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    mm_old, mv_old = mm_new.clone(), mv_new.clone()
    for xb in x:
        with torch.enable_grad():
            _, mm_new, mv_new = d2l_batch_norm(xb, 1.0, 0.0, mm_new, mv_new, 1e-5, 0.1)
            _, mm_old, mv_old = d2l_batch_norm(xb, 1.0, 0.0, mm_old, mv_old, 1e-5, 0.9, old_convention=True)
    torch.testing.assert_close(mm_new, mm_old)
    torch.testing.assert_close(mv_new, mv_old)


def test_bad_shapes_raise_before_any_buffer_changes():
    """A wrong channel count or an empty input raises a clear ValueError and leaves the running
    statistics exactly as they were (nothing is mutated before validation)."""
    rm, rv, nbt = torch.full((3,), 2.0), torch.full((3,), 3.0), torch.tensor(7)
    for x, match in ((torch.randn(4, 5), "running_mean has shape \\(3,\\) but the input has 5 channels"),
                     (torch.randn(4, 0), "at least one example and one channel"),
                     (torch.randn(0, 3), "at least one example and one channel")):
        with pytest.raises(ValueError, match=match):
            batch_norm(x, None, None, rm, rv, nbt, training=True)
        assert rm.tolist() == [2.0] * 3 and rv.tolist() == [3.0] * 3 and nbt.item() == 7
    with pytest.raises(ValueError, match="weight has shape"):
        batch_norm(torch.randn(4, 3), torch.ones(2), None, rm, rv, training=True)
    with pytest.raises(ValueError, match="momentum must be in"):
        batch_norm(torch.randn(4, 3), None, None, rm, rv, training=True, momentum=1.5)
    assert rm.tolist() == [2.0] * 3
