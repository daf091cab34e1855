"""Population statistics and BN folding: the machinery behind "training vs prediction".

Conventions (the same as :mod:`bnviz.norms` and PyTorch):

* A "BN layer" here is a batch norm with running statistics: ``nn.BatchNorm1d/2d/3d`` or
  :class:`bnviz.norms.BatchNorm` (``LiteBatchNorm`` included) with ``track_running_stats``.
* ``momentum`` weights the **new** value: ``running = (1 - m) * running + m * batch``;
  ``momentum=None`` is the cumulative (equal-weight) average.
* Statistics of a layer's *input* are per channel (axis 1) over every other axis; variances
  are biased (divide by m) unless the name says ``unbiased``.

Functions:

* :func:`recompute_bn_stats`: PreciseBN-style population statistics: reset the running
  buffers and average the batch statistics of a pass over data with equal weights
  (``momentum=None``). Same numbers as ``torch.optim.swa_utils.update_bn`` on the same batches.
* :func:`layer_input_stats`: the exact mean and (biased) variance of every BN layer's input
  over a whole data set, computed as in training (earlier BN layers use batch statistics).
* :func:`ema_trace`, :func:`ema_lag`, :func:`ema_warmup_steps`: what an exponential moving
  average of per-step batch statistics remembers, and how far it lags.
* :func:`fold_bn`: merge each BN into the conv/linear layer in front of it, for inference.
* :func:`shift_images`: a brightness/contrast shift of uint8 images (a simple domain shift).
* :func:`layer_state`, :func:`per_channel`, :func:`num_channels`: one value per channel of any
  norm layer's γ, β and running statistics (the one place that reads them; the trainer, the
  lab and the experiments use it).
"""
from __future__ import annotations

import copy
import itertools
import math

import torch
from torch import nn

from .data import to_float
from .norms import BatchNorm

__all__ = [
    "bn_layers",
    "layer_state",
    "per_channel",
    "num_channels",
    "recompute_bn_stats",
    "average_batch_stats",
    "layer_input_stats",
    "ema_trace",
    "ema_lag",
    "ema_warmup_steps",
    "fold_bn",
    "fold_into",
    "shift_images",
]


def _is_bn(m: nn.Module) -> bool:
    """A batch norm with running statistics (PyTorch's or bnviz's)."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return m.track_running_stats
    return isinstance(m, BatchNorm) and m.track_running_stats


def bn_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The BN layers (with running statistics) of ``model``, by module path."""
    return {name: m for name, m in model.named_modules() if _is_bn(m)}


def num_channels(module: nn.Module) -> int:
    """The channel count of a norm layer (BatchNorm, GroupNorm, LayerNorm, d2l's layer)."""
    for attr in ("num_features", "num_channels"):
        if hasattr(module, attr):
            return int(getattr(module, attr))
    if hasattr(module, "normalized_shape"):
        return int(module.normalized_shape[0])
    if hasattr(module, "gamma"):
        return int(module.gamma.shape[1])
    raise ValueError(f"cannot tell the channel count of {type(module).__name__}")


def per_channel(t: torch.Tensor | None, channels: int) -> torch.Tensor | None:
    """One value per channel of a γ/β/statistic of any norm layer, detached (a LayerNorm on a
    conv has a (C, H, W) weight: the mean over H, W; d2l's layer has shape (1, C, 1, 1))."""
    if t is None:
        return None
    t = t.detach()
    if t.numel() == channels:
        return t.reshape(channels)
    return t.reshape(channels, -1).mean(1)


def layer_state(module: nn.Module) -> dict[str, torch.Tensor | None]:
    """Per-channel tensors (on the device, no host copy) of one norm layer: ``gamma``, ``beta``,
    ``running_mean``, ``running_var`` (None where the layer has none)."""
    c = num_channels(module)
    gamma = getattr(module, "weight", None) if hasattr(module, "weight") else getattr(module, "gamma", None)
    beta = getattr(module, "bias", None) if hasattr(module, "bias") else getattr(module, "beta", None)
    rm = getattr(module, "running_mean", None)
    rv = getattr(module, "running_var", None)
    if rm is None and hasattr(module, "moving_mean"):
        rm, rv = module.moving_mean, module.moving_var
    return {"gamma": per_channel(gamma, c), "beta": per_channel(beta, c),
            "running_mean": per_channel(rm, c), "running_var": per_channel(rv, c)}


def _model_dtype(model: nn.Module) -> torch.dtype:
    p = next(iter(model.parameters()), None)
    return p.dtype if p is not None and p.is_floating_point() else torch.float32


def _as_batches(x: torch.Tensor, batch_size: int, dtype: torch.dtype = torch.float32):
    """Float batches (uint8 images -> [0, 1] in ``dtype``, float tensors as they are), in order."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if len(x) == 0:
        raise ValueError("no data: x is empty")
    for s in range(0, len(x), batch_size):
        xb = x[s:s + batch_size]
        yield xb.to(dtype).div_(255.0) if xb.dtype == torch.uint8 else xb


@torch.no_grad()
def recompute_bn_stats(
    model: nn.Module,
    x: torch.Tensor,
    batch_size: int = 256,
    num_batches: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
) -> nn.Module:
    """Recompute every BN layer's running statistics from data ("PreciseBN", Wu & Johnson 2021).

    The running buffers are reset, then one pass over ``x`` in training mode
    (:func:`average_batch_stats`: the cumulative average) makes each buffer the **equal-weight average** of the batch statistics
    (``running_var`` averages the unbiased batch variances, as PyTorch stores them). Nothing
    else changes: parameters, momenta and the train/eval mode are restored. ``x``: uint8 images
    (converted as in training, to the model's dtype) or float inputs. ``num_batches`` limits the pass; ``shuffle``
    draws the batches in a random order (``seed``). Modifies ``model`` in place and returns it.

    With the same batches this gives the same numbers as ``torch.optim.swa_utils.update_bn``.
    Note the batch size matters: the average of batch variances misses the spread of the batch
    means (a factor of about (B-1)/B of the population variance for i.i.d. batches of size B).
    """
    layers = list(bn_layers(model).values())
    if not layers:
        raise ValueError("recompute_bn_stats: the model has no batch norm layer with running statistics "
                         "(nn.BatchNorm*d or bnviz BatchNorm with track_running_stats=True)")
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    if shuffle:
        g = torch.Generator().manual_seed(seed)
        x = x[torch.randperm(len(x), generator=g).to(x.device)]
    was_training = model.training
    for m in layers:
        m.reset_running_stats()
    model.train()
    try:
        average_batch_stats(model, layers, itertools.islice(_as_batches(x, batch_size, _model_dtype(model)),
                                                            num_batches))
    finally:
        model.train(was_training)
    return model


@torch.no_grad()
def average_batch_stats(forward, layers: list[nn.Module], batches) -> None:
    """Run ``forward`` (training mode) on each batch with every BN layer of ``layers`` at
    momentum ``1/t`` for the t-th batch, so each running buffer ends as the **equal-weight
    average** of the batch statistics (the first batch overwrites it): PyTorch's cumulative
    average (``momentum=None``) without reading ``num_batches_tracked``, so it also runs vmapped.
    The layers' momenta are restored. The one PreciseBN pass (:func:`recompute_bn_stats`, the
    grid's :mod:`bnviz.precise`)."""
    momenta = [m.momentum for m in layers]
    try:
        for t, xb in enumerate(batches, 1):
            for m in layers:
                m.momentum = 1.0 / t
            forward(xb)
    finally:
        for m, mom in zip(layers, momenta):
            m.momentum = mom


@torch.no_grad()
def layer_input_stats(model: nn.Module, x: torch.Tensor, batch_size: int = 1000,
                      training: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The exact per-channel ``(mean, biased variance)`` of each BN layer's input over all of ``x``.

    ``training=True`` computes the inputs as training does (earlier BN layers normalise with
    their batch statistics, batches of ``batch_size``); ``False`` as prediction does (running
    statistics). The model's buffers and mode are left exactly as they were. Mean and variance
    are accumulated in float64 over all batches (not an average of batch variances).
    """
    layers = bn_layers(model)
    if not layers:
        raise ValueError("layer_input_stats: the model has no batch norm layer with running statistics")
    sums: dict[str, list] = {name: [0, 0.0, 0.0] for name in layers}

    def hook(name):
        def fn(module, inputs):
            v = inputs[0].detach().double().transpose(0, 1).reshape(inputs[0].shape[1], -1)
            acc = sums[name]
            acc[0] += v.shape[1]
            acc[1] = acc[1] + v.sum(1)
            acc[2] = acc[2] + (v * v).sum(1)
        return fn

    saved = {k: v.clone() for k, v in model.state_dict().items()}
    was_training = model.training
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    model.train(training)
    try:
        for xb in _as_batches(x, batch_size, _model_dtype(model)):
            model(xb)
    finally:
        for h in handles:
            h.remove()
        model.load_state_dict(saved)
        model.train(was_training)
    out = {}
    for name, (n, s1, s2) in sums.items():
        mean = s1 / n
        out[name] = (mean, (s2 / n - mean * mean).clamp_min(0))
    return out


def _check_momentum(momentum):
    if momentum is not None and not (isinstance(momentum, (int, float)) and 0.0 < momentum <= 1.0):
        raise ValueError(f"momentum must be in (0, 1] (weight of the new value, PyTorch convention) "
                         f"or None (cumulative average), got {momentum!r}")


def ema_trace(values, momentum: float | None = 0.1, init: float | torch.Tensor = 0.0) -> torch.Tensor:
    """The running value after each step when ``values[t]`` (a tensor of shape (T, ...)) arrive
    one per step: ``r_t = (1 - m) r_{t-1} + m v_t`` from ``r_0 = init`` (PyTorch's update), or the
    cumulative average ``r_t = mean(v_1..v_t)`` for ``momentum=None``. Returns shape (T, ...)."""
    _check_momentum(momentum)
    v = torch.as_tensor(values, dtype=torch.float64)
    if v.dim() == 0 or len(v) == 0:
        raise ValueError("values must be a non-empty sequence (one value or tensor per step)")
    if momentum is None:
        steps = torch.arange(1, len(v) + 1, dtype=torch.float64).reshape(-1, *([1] * (v.dim() - 1)))
        return v.cumsum(0) / steps
    out = torch.empty_like(v)
    r = torch.as_tensor(init, dtype=torch.float64).expand_as(v[0]).clone()
    for t in range(len(v)):
        r = (1 - momentum) * r + momentum * v[t]
        out[t] = r
    return out


def ema_lag(momentum: float) -> float:
    """Mean age, in steps, of what an EMA with this momentum (weight of the new value) holds:
    ``sum_k k m (1-m)^k = (1 - m) / m``. Momentum 0.1 -> 9 steps, 0.01 -> 99 steps. While the
    statistic drifts at a steady rate, the EMA trails it by about this many steps' worth of drift."""
    _check_momentum(momentum)
    if momentum is None:
        raise ValueError("ema_lag needs a number: the cumulative average (None) has no fixed lag")
    return (1.0 - momentum) / momentum


def ema_warmup_steps(momentum: float, fraction: float = 0.01) -> int:
    """Steps until the initial value (PyTorch starts at mean 0, var 1) weighs less than
    ``fraction`` in the EMA: the smallest k with ``(1 - m)^k < fraction``."""
    _check_momentum(momentum)
    if momentum is None:
        raise ValueError("ema_warmup_steps needs a number: the cumulative average forgets its start at step 1")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    if momentum >= 1.0:
        return 1
    return int(math.floor(math.log(fraction) / math.log(1.0 - momentum))) + 1


# ----------------------------------------------------------------------------- folding


@torch.no_grad()
def fold_into(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of ``layer`` (``nn.Conv2d``/``nn.Conv1d`` or ``nn.Linear``) with the eval-mode BN
    ``bn`` that follows it merged in: per output channel ``a = γ / sqrt(running_var + eps)``,
    ``W' = a W``, ``b' = a (b - running_mean) + β`` (b = 0 without a bias; γ = 1, β = 0
    without affine). Computed in the layer's dtype, like ``torch.nn.utils.fusion``."""
    if not _is_bn(bn):
        raise ValueError(f"fold_into: {type(bn).__name__} is not a batch norm with running statistics")
    if not isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        raise ValueError(f"fold_into: can fold only into Conv1d/2d/3d or Linear, got {type(layer).__name__}")
    c = layer.out_channels if isinstance(layer, nn.modules.conv._ConvNd) else layer.out_features
    if bn.num_features != c:
        raise ValueError(f"fold_into: {type(layer).__name__} has {c} outputs but the BN has {bn.num_features}")
    w = layer.weight
    a = torch.rsqrt(bn.running_var.to(w.dtype) + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(a)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(a)
    a = a * gamma.to(w.dtype)
    b = layer.bias if layer.bias is not None else torch.zeros_like(a)
    fused = copy.deepcopy(layer)
    fused.weight = nn.Parameter(w * a.reshape(-1, *([1] * (w.dim() - 1))), requires_grad=w.requires_grad)
    fused.bias = nn.Parameter((b - bn.running_mean.to(w.dtype)) * a + beta.to(w.dtype),
                              requires_grad=w.requires_grad)
    return fused


def fold_bn(model: nn.Module, strict: bool = False) -> nn.Module:
    """A copy of ``model`` (an ``nn.Sequential``, e.g. from :func:`bnviz.build_lenet`) for
    inference, with every BN that directly follows a conv/linear layer folded into it (the BN
    becomes ``nn.Identity``, names are kept). The copy is in eval mode; its outputs equal the
    original's eval-mode outputs up to float rounding.

    A BN that does not directly follow a conv/linear (e.g. ``norm_position='after'``: conv ->
    sigmoid -> BN) cannot be folded backwards; it is left as it is (``strict=True`` raises
    instead). The original model is not changed.
    """
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"fold_bn expects an nn.Sequential (e.g. from build_lenet), got {type(model).__name__}")
    folded = copy.deepcopy(model).eval()
    names = list(folded._modules)
    left = []
    for i, name in enumerate(names):
        m = folded._modules[name]
        if not _is_bn(m):
            continue
        prev = folded._modules[names[i - 1]] if i > 0 else None
        if isinstance(prev, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            folded._modules[names[i - 1]] = fold_into(prev, m)
            folded._modules[name] = nn.Identity()
        else:
            left.append(name)
    if left and strict:
        raise ValueError(f"fold_bn: cannot fold {left}: each BN must directly follow a Conv or Linear "
                         "layer (norm before the activation)")
    return folded


# ----------------------------------------------------------------------------- domain shift


def shift_images(x: torch.Tensor, brightness: float = 0.0, contrast: float = 1.0) -> torch.Tensor:
    """A brightness/contrast shift of uint8 images, returned as uint8.

    In [0, 1] units: ``out = clamp(contrast * x + brightness, 0, 1)``, rounded to 0..255.
    ``brightness`` in [-1, 1] (0 = unchanged), ``contrast`` in [0, 10] (1 = unchanged)."""
    if x.dtype != torch.uint8:
        raise ValueError(f"shift_images expects uint8 images (0..255), got dtype {x.dtype}")
    if not (isinstance(brightness, (int, float)) and -1.0 <= brightness <= 1.0):
        raise ValueError(f"brightness must be in [-1, 1] (0 = unchanged), got {brightness!r}")
    if not (isinstance(contrast, (int, float)) and 0.0 <= contrast <= 10.0):
        raise ValueError(f"contrast must be in [0, 10] (1 = unchanged), got {contrast!r}")
    y = to_float(x) * contrast + brightness
    return (y.clamp(0, 1) * 255).round().to(torch.uint8)
