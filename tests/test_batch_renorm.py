"""bnviz.norms.BatchRenorm (Ioffe 2017) against an independent float64 implementation of the
paper's Algorithm 1 (a loop over channels, written from the equations), PyTorch's BN where they
must agree (r = 1, d = 0; eval mode), and float64 gradcheck."""

import pytest
import torch
from torch import nn

from bnviz.norms import BatchRenorm, batch_renorm

SHAPES = [(8, 6), (5, 6, 6), (4, 6, 5, 5)]


def paper_reference(x, gamma, beta, mu, var, rmax, dmax, eps, momentum):
    """Algorithm 1 of Ioffe (2017), one channel at a time, in float64. ``mu``/``var``: the moving
    mean and (unbiased) variance before the batch; sigma = sqrt(var + eps). Returns y, r, d and
    the moving statistics after the batch (momentum = the weight of the new batch)."""
    x = x.double()
    y = torch.empty_like(x)
    rs, ds, new_mu, new_var = [], [], [], []
    for c in range(x.shape[1]):
        v = x[:, c].reshape(-1)
        m = v.numel()
        mu_b = v.sum() / m
        var_b = ((v - mu_b) ** 2).sum() / m
        sigma_b = torch.sqrt(var_b + eps)
        sigma = torch.sqrt(var[c].double() + eps)
        r = min(max(float(sigma_b / sigma), 1 / rmax), rmax)
        d = min(max(float((mu_b - mu[c]) / sigma), -dmax), dmax)
        y[:, c] = gamma[c] * ((x[:, c] - mu_b) / sigma_b * r + d) + beta[c]
        rs.append(r)
        ds.append(d)
        new_mu.append((1 - momentum) * mu[c] + momentum * mu_b)
        new_var.append((1 - momentum) * var[c] + momentum * var_b * m / (m - 1))
    f64 = torch.float64
    return y, torch.tensor(rs, dtype=f64), torch.tensor(ds, dtype=f64), torch.stack(new_mu), torch.stack(new_var)


def layer(shape, rmax, dmax, momentum=0.1, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    brn = BatchRenorm(shape[1], rmax=rmax, dmax=dmax, momentum=momentum).to(dtype)
    with torch.no_grad():
        brn.weight.copy_(torch.rand(shape[1], generator=g) + 0.5)
        brn.bias.copy_(torch.randn(shape[1], generator=g))
        # running statistics that leave some channels inside the clip and push others outside it
        brn.running_mean.copy_(torch.linspace(-1.0, 1.0, shape[1]))
        brn.running_var.copy_(torch.logspace(-0.5, 1.0, shape[1]))
    return brn


@pytest.mark.parametrize("shape", SHAPES)
def test_training_matches_the_papers_equations(shape):
    torch.manual_seed(1)
    x = torch.randn(shape, dtype=torch.float64) * 1.5 + 0.3
    brn = layer(shape, rmax=1.5, dmax=0.5, momentum=0.2)
    mu, var = brn.running_mean.clone(), brn.running_var.clone()
    y = brn(x)
    ref, r, d, new_mu, new_var = paper_reference(x, brn.weight.detach(), brn.bias.detach(), mu, var,
                                                 1.5, 0.5, brn.eps, 0.2)
    clipped = (r.abs() - 1.5).abs().lt(1e-12) | (r - 1 / 1.5).abs().lt(1e-12) | (d.abs() - 0.5).abs().lt(1e-12)
    assert clipped.any() and not clipped.all(), "the case must have clipped and unclipped channels"
    torch.testing.assert_close(y.detach(), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(brn.running_mean, new_mu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(brn.running_var, new_var, rtol=1e-12, atol=1e-12)
    assert int(brn.num_batches_tracked) == 1


@pytest.mark.parametrize("shape", SHAPES)
def test_gradient_treats_r_and_d_as_constants(shape):
    """The paper's backward pass: r and d are stop_gradient. Reference: autograd through the
    float64 equations with r and d computed first and held constant."""
    torch.manual_seed(2)
    x = (torch.randn(shape, dtype=torch.float64) * 2).requires_grad_()
    brn = layer(shape, rmax=2.0, dmax=1.0)
    _, r, d, _, _ = paper_reference(x.detach(), brn.weight.detach(), brn.bias.detach(), brn.running_mean,
                                    brn.running_var, 2.0, 1.0, brn.eps, 0.1)
    dims = [0] + list(range(2, x.dim()))
    view = (1, -1) + (1,) * (x.dim() - 2)
    mu_b = x.mean(dims, keepdim=True)
    sigma_b = torch.sqrt(((x - mu_b) ** 2).mean(dims, keepdim=True) + brn.eps)
    w = brn.weight.detach().clone().requires_grad_()
    b = brn.bias.detach().clone().requires_grad_()
    ref = w.view(view) * ((x - mu_b) / sigma_b * r.view(view) + d.view(view)) + b.view(view)
    up = torch.randn(shape, dtype=torch.float64)
    want = torch.autograd.grad((ref * up).sum(), (x, w, b))
    got = torch.autograd.grad((brn(x) * up).sum(), (x, brn.weight, brn.bias))
    for g1, g2 in zip(got, want):
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
def test_gradcheck_float64_where_r_and_d_are_clipped(shape):
    """With r and d at their clip bounds they are locally constant, so the stop-gradient function
    is differentiable as written and numerical derivatives must match autograd."""
    torch.manual_seed(3)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(shape[1], dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    rm = torch.full((shape[1],), 500.0, dtype=torch.float64)  # (mu_B - rm)/sigma ≈ -5: d = -dmax
    rv = torch.full((shape[1],), 1e4, dtype=torch.float64)    # sigma_B / sigma << 1/rmax: r = 1/rmax

    def f(x, w, b):
        return batch_renorm(x, w, b, rm.clone(), rv.clone(), None, training=True, momentum=0.1, eps=1e-5,
                            rmax=3.0, dmax=0.5)

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_rmax_1_dmax_0_is_batch_norm_in_training(shape, momentum):
    torch.manual_seed(4)
    ref = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(shape[1], momentum=momentum).double()
    brn = BatchRenorm(shape[1], rmax=1.0, dmax=0.0, momentum=momentum).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2.0)
        ref.bias.normal_()
        brn.weight.copy_(ref.weight)
        brn.bias.copy_(ref.bias)
        for m in (ref, brn):
            m.running_mean.fill_(0.7)
            m.running_var.fill_(3.0)
    for step in range(3):
        x = (torch.randn(shape, dtype=torch.float64) * 2 + step).requires_grad_()
        y_ref, y = ref(x), brn(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        up = torch.randn(shape, dtype=torch.float64)
        g_ref = torch.autograd.grad((y_ref * up).sum(), (x, ref.weight, ref.bias))
        g = torch.autograd.grad((y * up).sum(), (x, brn.weight, brn.bias))
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(brn.running_mean, ref.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(brn.running_var, ref.running_var, rtol=1e-12, atol=1e-12)
    assert int(brn.num_batches_tracked) == int(ref.num_batches_tracked) == 3


@pytest.mark.parametrize("shape", SHAPES)
def test_eval_is_batch_norm_eval_and_leaves_buffers(shape):
    brn = layer(shape, rmax=3.0, dmax=5.0, dtype=torch.float32)
    ref = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(shape[1])
    ref.load_state_dict({k: v for k, v in brn.state_dict().items() if k not in ("rmax", "dmax")})
    brn.eval(), ref.eval()
    x = torch.randn(shape)
    before = {k: v.clone() for k, v in brn.state_dict().items()}
    torch.testing.assert_close(brn(x), ref(x))
    for k, v in brn.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_unclipped_training_output_is_the_eval_output():
    """Where r and d are not clipped, training normalises with the running statistics: the
    output training gives is the output eval mode gives (the point of the method)."""
    torch.manual_seed(5)
    x = torch.randn(16, 3, 4, 4, dtype=torch.float64) * 1.2 + 0.1
    brn = BatchRenorm(3, rmax=100.0, dmax=100.0).double()
    with torch.no_grad():
        brn.running_mean.copy_(torch.tensor([0.0, 0.5, -0.5]))
        brn.running_var.copy_(torch.tensor([1.0, 2.0, 0.5]))
    brn.eval()
    y_eval = brn(x)
    brn.train()
    torch.testing.assert_close(brn(x), y_eval, rtol=1e-10, atol=1e-10)


def test_bad_values_are_refused_and_nothing_changes():
    with pytest.raises(ValueError, match="rmax=0.5 is not valid; valid: a number >= 1"):
        BatchRenorm(3, rmax=0.5)
    with pytest.raises(ValueError, match="dmax=-1 is not valid"):
        BatchRenorm(3, dmax=-1)
    with pytest.raises(ValueError, match="track_running_stats=False is not valid"):
        BatchRenorm(3, track_running_stats=False)
    brn = BatchRenorm(3, rmax=2.0, dmax=1.0)
    with pytest.raises(ValueError, match="dmax"):
        brn.set_limits(3.0, float("nan"))
    assert float(brn.rmax) == 2.0 and float(brn.dmax) == 1.0
    state = {k: v.clone() for k, v in brn.state_dict().items()}
    with pytest.raises(ValueError, match="channels"):
        brn(torch.randn(4, 5, 2, 2))
    assert all(torch.equal(v, state[k]) for k, v in brn.state_dict().items())
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        brn(torch.randn(1, 3))


def test_state_dict_has_batch_norms_keys_and_the_limits():
    keys = set(BatchRenorm(4).state_dict())
    assert keys == set(nn.BatchNorm2d(4).state_dict()) | {"rmax", "dmax"}
