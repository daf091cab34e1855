"""bnviz.stats against PyTorch's own references: update_bn, fuse_conv_bn_eval,
fuse_linear_bn_eval, nn.BatchNorm's running buffers."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval
from torch.optim.swa_utils import update_bn

from bnviz import BatchNorm, build_lenet, preset
from bnviz.stats import (bn_layers, ema_lag, ema_trace, ema_warmup_steps, fold_bn, fold_into,
                         layer_input_stats, recompute_bn_stats, shift_images)

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _randomise_bn(model, gen):
    """Give every BN non-trivial γ, β and running statistics."""
    with torch.no_grad():
        for m in bn_layers(model).values():
            c = m.num_features
            if m.weight is not None:
                m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                m.bias.copy_(torch.randn(c, generator=gen))
            m.running_mean.copy_(torch.randn(c, generator=gen))
            m.running_var.copy_(0.2 + 2 * torch.rand(c, generator=gen))
    return model


def _images(n, seed=0):
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- recompute


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch_size,n", [(64, 256), (100, 250), (7, 30)])
def test_recompute_matches_update_bn(dtype, batch_size, n):
    torch.manual_seed(0)
    model = build_lenet(preset("lenet-bn")).to(dtype)
    _randomise_bn(model, torch.Generator().manual_seed(1))
    x = _images(n)
    ref = copy.deepcopy(model)
    model.eval()
    recompute_bn_stats(model, x, batch_size=batch_size)
    loader = [(x[s:s + batch_size].to(dtype) / 255) for s in range(0, n, batch_size)]
    update_bn(loader, ref)
    assert not model.training, "the mode must be restored"
    for (name, a), b in zip(bn_layers(model).items(), bn_layers(ref).values()):
        assert a.momentum == 0.1, "momentum must be restored"
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=tol, atol=tol, msg=name)
        torch.testing.assert_close(a.running_var, b.running_var, rtol=tol, atol=tol, msg=name)
        assert int(a.num_batches_tracked) == -(-n // batch_size)


def test_recompute_scratch_bn_matches_torch_bn():
    """The scratch BatchNorm has no _BatchNorm base, so update_bn skips it; ours must not."""
    torch.manual_seed(0)
    scratch = build_lenet(preset("lenet-bn", norm="scratch")).double()
    torch.manual_seed(0)
    ref = build_lenet(preset("lenet-bn")).double()
    ref.load_state_dict(scratch.state_dict())
    x = _images(300)
    recompute_bn_stats(scratch, x, batch_size=128)
    update_bn([x[s:s + 128].double() / 255 for s in range(0, 300, 128)], ref)
    for a, b in zip(bn_layers(scratch).values(), bn_layers(ref).values()):
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-12, atol=1e-12)


def test_recompute_num_batches_and_errors():
    model = build_lenet("lenet-bn")
    x = _images(100)
    recompute_bn_stats(model, x, batch_size=10, num_batches=3)
    assert all(int(m.num_batches_tracked) == 3 for m in bn_layers(model).values())
    with pytest.raises(ValueError, match="no batch norm"):
        recompute_bn_stats(build_lenet("lenet"), x)
    with pytest.raises(ValueError, match="batch_size"):
        recompute_bn_stats(model, x, batch_size=0)


@pytest.mark.parametrize("training", [True, False])
def test_layer_input_stats_first_layer_and_untouched(training):
    torch.manual_seed(0)
    model = build_lenet("lenet-bn")
    _randomise_bn(model, torch.Generator().manual_seed(2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _images(130)
    stats = layer_input_stats(model, x, batch_size=50, training=training)
    # conv1's BN input does not depend on any BN: compare with a direct float64 computation.
    with torch.no_grad():
        z = model.conv1.double()(x.double() / 255)
    model.conv1.float()
    mean, var = stats["norm_conv1"]
    torch.testing.assert_close(mean, z.mean((0, 2, 3)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var, z.var((0, 2, 3), correction=0), rtol=1e-5, atol=1e-6)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"
    assert model.training  # build_lenet returns a model in training mode; it must stay so


def test_layer_input_stats_train_mode_uses_batch_stats():
    """fc1's input in training mode: with one batch = all data, conv BNs normalise with the full
    batch's statistics, so the result equals a plain forward pass of the whole set."""
    torch.manual_seed(0)
    model = build_lenet("lenet-bn").double()
    x = _images(64)
    stats = layer_input_stats(model, x, batch_size=64, training=True)
    captured = {}
    h = model.norm_fc1.register_forward_pre_hook(lambda m, i: captured.setdefault("x", i[0].detach()))
    with torch.no_grad():
        copy.deepcopy(model).train()(x.double() / 255)
    h.remove()
    # (the hook was registered on the original; the deep copy carries it too)
    z = captured["x"]
    torch.testing.assert_close(stats["norm_fc1"][0], z.mean(0), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(stats["norm_fc1"][1], z.var(0, correction=0), rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- EMA


@pytest.mark.parametrize("momentum", [0.01, 0.1, 0.5, None])
def test_ema_trace_matches_batchnorm_running_mean(momentum):
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3, momentum=momentum).double()
    batches = [torch.randn(16, 3, dtype=torch.float64) * 2 + t * 0.05 for t in range(40)]
    running = []
    for xb in batches:
        bn(xb)
        running.append(bn.running_mean.clone())
    trace = ema_trace(torch.stack([xb.mean(0) for xb in batches]), momentum, init=0.0)
    torch.testing.assert_close(trace, torch.stack(running), rtol=1e-12, atol=1e-12)


def test_ema_lag_and_warmup():
    for m in (0.01, 0.1, 0.3, 0.9):
        k = torch.arange(0, 20000, dtype=torch.float64)
        mean_age = (k * m * (1 - m) ** k).sum().item()
        assert ema_lag(m) == pytest.approx(mean_age, rel=1e-9)
        for f in (0.5, 0.01):
            steps = ema_warmup_steps(m, f)
            assert (1 - m) ** steps < f <= (1 - m) ** (steps - 1)
    # Under a steady drift of d per step the EMA trails the true value by d * lag.
    d, m = 0.01, 0.1
    trace = ema_trace(torch.arange(1, 2001, dtype=torch.float64) * d, m, init=0.0)
    assert (2000 * d - trace[-1].item()) == pytest.approx(d * ema_lag(m), rel=1e-6)
    with pytest.raises(ValueError, match="momentum"):
        ema_lag(0.0)
    with pytest.raises(ValueError, match="momentum"):
        ema_trace([1.0, 2.0], momentum=1.5)


# ----------------------------------------------------------------------------- folding


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("cin,cout,k", [(1, 6, 5), (6, 16, 3), (3, 4, 1)])
def test_fold_conv_matches_torch_fusion(dtype, bias, affine, cin, cout, k):
    gen = torch.Generator().manual_seed(cin * 100 + cout)
    torch.manual_seed(cout)
    conv = nn.Conv2d(cin, cout, k, bias=bias).to(dtype)
    bn = nn.BatchNorm2d(cout, affine=affine).to(dtype)
    _randomise_bn(nn.Sequential(bn), gen)
    bn.eval()
    ours, ref = fold_into(conv, bn), fuse_conv_bn_eval(conv.eval(), bn)
    torch.testing.assert_close(ours.weight, ref.weight, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(ours.bias, ref.bias, rtol=TOL[dtype], atol=TOL[dtype])
    x = torch.randn(5, cin, 12, 12, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), bn(conv(x)), rtol=10 * TOL[dtype], atol=10 * TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fin,fout", [(256, 120), (120, 84), (5, 1)])
def test_fold_linear_matches_torch_fusion(dtype, bias, fin, fout):
    torch.manual_seed(fin)
    lin = nn.Linear(fin, fout, bias=bias).to(dtype)
    bn = nn.BatchNorm1d(fout).to(dtype)
    _randomise_bn(nn.Sequential(bn), torch.Generator().manual_seed(fout))
    bn.eval()
    ours, ref = fold_into(lin, bn), fuse_linear_bn_eval(lin.eval(), bn)
    torch.testing.assert_close(ours.weight, ref.weight, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(ours.bias, ref.bias, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("norm", ["torch", "scratch"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fold_bn_lenet_equals_eval_output(norm, dtype):
    torch.manual_seed(0)
    model = build_lenet(preset("lenet-bn", norm=norm)).to(dtype)
    _randomise_bn(model, torch.Generator().manual_seed(3))
    folded = fold_bn(model)
    assert not bn_layers(folded), "every BN must be folded away"
    assert model.training, "the original must not change"
    x = _images(40).to(dtype) / 255
    model.eval()
    with torch.no_grad():
        want, got = model(x), folded(x)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert list(dict(folded.named_children())) == list(dict(model.named_children()))


def test_fold_bn_after_activation_is_left_alone():
    torch.manual_seed(0)
    model = build_lenet(preset("lenet-bn", norm_position="after"))
    _randomise_bn(model, torch.Generator().manual_seed(4))
    folded = fold_bn(model)
    assert len(bn_layers(folded)) == 4, "a BN after the activation cannot be folded backwards"
    x = _images(8).float() / 255
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x))
    with pytest.raises(ValueError, match="cannot fold"):
        fold_bn(model, strict=True)
    with pytest.raises(ValueError, match="Sequential"):
        fold_bn(BatchNorm(3))


# ----------------------------------------------------------------------------- shift


def test_shift_images():
    x = _images(10)
    assert torch.equal(shift_images(x), x)
    y = shift_images(x, brightness=0.2, contrast=0.5)
    ref = ((x.double() / 255 * 0.5 + 0.2).clamp(0, 1) * 255).round().to(torch.uint8)
    # float32 arithmetic may round a value sitting exactly on .5 the other way: at most 1 level
    assert (y.int() - ref.int()).abs().max() <= 1
    # brightness alone: +0.2 is +51 grey levels, clipped at 255
    assert torch.equal(shift_images(x, brightness=0.2), (x.int() + 51).clamp(max=255).to(torch.uint8))
    assert y.dtype == torch.uint8 and y.shape == x.shape
    assert shift_images(x, brightness=1.0).min() == 255
    with pytest.raises(ValueError, match="uint8"):
        shift_images(x.float())
    with pytest.raises(ValueError, match="brightness"):
        shift_images(x, brightness=2)
    with pytest.raises(ValueError, match="contrast"):
        shift_images(x, contrast=-1)
