"""Batch normalization written from scratch, matching ``torch.nn.BatchNorm1d/2d``.

Conventions (the same as PyTorch's; each one is a trap when reading other code):

* Shapes: input is ``(N, C)``, ``(N, C, L)`` or ``(N, C, H, W)``. Statistics are per channel
  ``C``, taken over every other axis (``N``, or ``N×L``, or ``N×H×W``).
* Normalising uses the **biased** batch variance (divide by ``m``, the number of values per
  channel). ``running_var`` stores the **unbiased** one (divide by ``m - 1``).
* ``momentum`` weights the **new** batch:
  ``running = (1 - momentum) * running + momentum * batch`` (PyTorch default 0.1).
  Keras/TensorFlow/CS231n (and d2l before Aug 2022) call ``1 - momentum`` "momentum"
  (0.9, 0.99, ...): the weight on the **old** value.
* ``momentum=None`` means a cumulative (equal-weight) average over all batches seen so far,
  using ``num_batches_tracked``: ``factor = 1 / num_batches_tracked``.
* Training vs prediction is decided by ``self.training`` (``model.train()`` / ``model.eval()``),
  never by ``torch.is_grad_enabled()``.
* Running statistics are registered **buffers**: they are in ``state_dict()`` and move with
  ``.to(device)``, but the optimiser never sees them.

The d2l-book variant (:class:`D2LBatchNorm`) is here too, so a notebook can show every
difference numerically. :class:`GhostBatchNorm` (Hoffer, Hubara & Soudry 2017) normalises
consecutive virtual batches ("ghost batches") of a large batch separately.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "batch_norm",
    "BatchNorm",
    "LiteBatchNorm",
    "d2l_batch_norm",
    "D2LBatchNorm",
    "GhostBatchNorm",
    "ghost_batch_norm",
    "channel_stats",
]


def _reduce_dims(x: torch.Tensor) -> list[int]:
    """Axes that a per-channel statistic reduces over: all but axis 1 (the channel axis)."""
    return [0] + list(range(2, x.dim()))


def _channel_shape(x: torch.Tensor) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector against ``x``: (1, C, 1, ...)."""
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(mean, biased variance)`` of ``x`` of shape (N, C, *)."""
    var, mean = torch.var_mean(x, dim=_reduce_dims(x), correction=0)
    return mean, var


def _check_inputs(x, weight, bias, running_mean, running_var, momentum, eps) -> None:
    """Every shape and value is checked before anything (a running buffer) is changed."""
    if x.dim() < 2:
        raise ValueError(f"batch_norm expects input of shape (N, C, *), got {tuple(x.shape)}")
    c = x.shape[1]
    if c < 1 or x.shape[0] < 1:
        raise ValueError(f"batch_norm needs at least one example and one channel, got input of shape "
                         f"{tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is not None and tuple(t.shape) != (c,):
            raise ValueError(f"{name} has shape {tuple(t.shape)} but the input has {c} channels on "
                             f"axis 1 (shape {tuple(x.shape)}): expected shape ({c},)")
    if momentum is not None and not (isinstance(momentum, (int, float)) and 0.0 <= momentum <= 1.0):
        raise ValueError(f"momentum must be in [0, 1] (weight of the new batch) or None (cumulative "
                         f"average), got {momentum!r}")
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps must be a positive number, got {eps!r}")


def batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None = None,
    training: bool = True,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    center: bool = True,
    scale: bool = True,
) -> torch.Tensor:
    """Batch normalization of ``x`` (N, C, *) per channel, as ``torch.nn.functional.batch_norm``.

    ``training=True``: normalise with this batch's mean and **biased** variance, and (if the
    running buffers are given) update them in place: ``num_batches_tracked += 1``,
    ``running_mean = (1-f)*running_mean + f*mean``,
    ``running_var = (1-f)*running_var + f*var_unbiased`` with ``f = momentum``, or
    ``f = 1/num_batches_tracked`` when ``momentum is None`` (cumulative average).

    ``training=False``: normalise with ``running_mean``/``running_var`` (if they are None, with
    the batch statistics, as PyTorch does for ``track_running_stats=False``).

    ``center``/``scale`` (not in PyTorch) give the "lite" variants: only subtract the mean, or
    only divide by the standard deviation.

    The output is computed as ``x * a + b`` with per-channel ``a = weight / sqrt(var + eps)``
    and ``b = bias - mean * a``: the same function as ``weight * (x - mean) / sqrt(var + eps) +
    bias``, with two full-size operations instead of four (the backward pass through ``a`` and
    ``b`` is done by autograd and is exact).
    """
    _check_inputs(x, weight, bias, running_mean, running_var, momentum, eps)
    use_batch_stats = training or running_mean is None or running_var is None
    if use_batch_stats:
        values_per_channel = x.numel() // x.shape[1]
        if training and values_per_channel <= 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got input size "
                f"{x.shape}. Batch norm needs at least 2 values per channel to compute a "
                "variance: use a batch size >= 2 (or spatial inputs), or call model.eval()."
            )
        mean, var = channel_stats(x)
        if training and running_mean is not None and running_var is not None:
            with torch.no_grad():
                _update_running(running_mean, running_var, num_batches_tracked, momentum, mean,
                                var * (values_per_channel / max(values_per_channel - 1, 1)))
    else:
        mean, var = running_mean, running_var

    shape = _channel_shape(x)
    return _affine(x, mean.view(shape), var.view(shape), weight, bias, eps, 1, center, scale)


class BatchNorm(nn.Module):
    """From-scratch batch normalization for (N, C), (N, C, L) and (N, C, H, W) inputs.

    Same constructor, parameters (``weight`` = γ, ``bias`` = β), buffers (``running_mean``,
    ``running_var``, ``num_batches_tracked``), ``state_dict`` keys and numbers as
    ``nn.BatchNorm1d`` / ``nn.BatchNorm2d``; see the module docstring for the conventions.
    ``momentum`` and ``eps`` are read at every call, so they can be changed during training.
    """

    center = True
    scale = True

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None (cumulative average), got {momentum}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def _check_input(self, x: torch.Tensor) -> None:
        """(N, C), (N, C, L) or (N, C, H, W) with ``num_features`` channels, else a clear error."""
        if x.dim() not in (2, 3, 4):
            raise ValueError(
                f"expected 2D (N, C), 3D (N, C, L) or 4D (N, C, H, W) input (got {x.dim()}D input)"
            )
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"expected {self.num_features} channels on axis 1, got input of shape {tuple(x.shape)}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return batch_norm(
            x,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            self.num_batches_tracked,
            training=self.training,
            momentum=self.momentum,
            eps=self.eps,
            center=self.center,
            scale=self.scale,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}"
        )


class LiteBatchNorm(BatchNorm):
    """A "lite" batch norm that only centres (``mode='center'``: x - mean) or only scales
    (``mode='scale'``: x / sqrt(var + eps)), then applies γ and β. Running statistics are
    kept exactly as in :class:`BatchNorm`."""

    def __init__(self, num_features: int, mode: str = "center", **kwargs):
        if mode not in ("center", "scale"):
            raise ValueError(f"mode must be 'center' or 'scale', got {mode!r}")
        super().__init__(num_features, **kwargs)
        self.mode = mode
        self.center = mode == "center"
        self.scale = mode == "scale"

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode!r}"


def _check_ghost_batch(ghost_batch) -> None:
    if not isinstance(ghost_batch, int) or isinstance(ghost_batch, bool) or ghost_batch < 2:
        raise ValueError(f"ghost_batch={ghost_batch!r} is not valid; valid: an int >= 2 (examples per "
                         "ghost batch), e.g. 32")


def _ghost_split(n: int, ghost_batch: int, values_per_example: int) -> tuple[int, int]:
    """``(k, rest)``: the first ``k * ghost_batch`` examples form ``k`` full ghost batches, the
    last ``rest`` examples one smaller ghost batch (``rest`` 0: none). A remainder with a single
    value per channel (one example of a 2-d input: no variance) joins the last full batch."""
    k, rest = divmod(n, ghost_batch)
    if rest and rest * values_per_example == 1 and k:
        k, rest = k - 1, ghost_batch + rest
    return k, rest


def ghost_batch_norm(x, weight, bias, running_mean, running_var, num_batches_tracked=None,
                     ghost_batch: int = 32, training: bool = True, momentum: float | None = 0.1,
                     eps: float = 1e-5) -> torch.Tensor:
    """Ghost batch normalization (Hoffer, Hubara & Soudry 2017) of ``x`` (N, C, *).

    Training (or no running statistics): the batch is cut into consecutive ghost batches of
    ``ghost_batch`` examples (:func:`_ghost_split`: the last one may be smaller and is normalised
    with its own statistics; a last one of a single 2-d example joins the previous one) and each
    is normalised with **its own** mean and biased variance, as BN normalises a batch. The full
    ghost batches are done at once, reshaped to (k, ghost_batch, C, *), not in a Python loop.

    Running statistics (training, buffers given) are updated **once per call**, with PyTorch's
    convention ``new = (1 - f) * old + f * batch_value``, ``f = momentum`` (or
    ``1/num_batches_tracked``, the cumulative average, when ``momentum is None``); the batch
    values are the **mean over ghost batches** (equal weights, the smaller one included) of the
    ghost batches' means and of their **unbiased** variances.

    With ``N <= ghost_batch`` (one ghost batch) this is BN exactly: ``F.batch_norm``, the
    function ``nn.BatchNorm1d/2d`` calls. Eval mode with running statistics: ``F.batch_norm``
    with them, as BN.
    """
    _check_inputs(x, weight, bias, running_mean, running_var, momentum, eps)
    _check_ghost_batch(ghost_batch)
    n, c = x.shape[0], x.shape[1]
    per_example = x.numel() // max(n * c, 1)  # values per channel of one example (H*W, or 1)
    tracked = running_mean is not None and running_var is not None
    if not training and tracked:  # prediction: the running statistics, exactly as BN
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    if n <= ghost_batch:  # one ghost batch: BN's own kernel
        return _one_ghost_batch(x, weight, bias, running_mean, running_var, num_batches_tracked,
                                training and tracked, momentum, eps)
    k, rest = _ghost_split(n, ghost_batch, per_example)
    head = k * ghost_batch
    xs = x[:head].reshape(k, ghost_batch, *x.shape[1:])  # (k, g, C, *)
    dims = [1] + list(range(3, xs.dim()))
    var, mean = torch.var_mean(xs, dim=dims, correction=0, keepdim=True)  # (k, 1, C, 1, ...)
    means, vars_, sizes = [mean.reshape(k, c)], [var.reshape(k, c)], [ghost_batch * per_example]
    outs = [_affine(xs, mean, var, weight, bias, eps, 2).reshape(head, *x.shape[1:])]
    if rest:  # the last, smaller ghost batch (at least 2 values per channel: see _ghost_split)
        xr = x[head:]
        var_r, mean_r = torch.var_mean(xr, dim=_reduce_dims(xr), correction=0, keepdim=True)
        means.append(mean_r.reshape(1, c))
        vars_.append(var_r.reshape(1, c))
        sizes.append(rest * per_example)
        outs.append(_affine(xr, mean_r, var_r, weight, bias, eps, 1))
    if training and tracked:  # the mean over ghost batches of their means and unbiased variances
        with torch.no_grad():
            _update_running(running_mean, running_var, num_batches_tracked, momentum, torch.cat(means).mean(0),
                            torch.cat([v * (m / max(m - 1, 1)) for v, m in zip(vars_, sizes)]).mean(0))
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def _one_ghost_batch(x, weight, bias, running_mean, running_var, num_batches_tracked, update: bool,
                     momentum, eps) -> torch.Tensor:
    """A batch of at most ``ghost_batch`` examples: ``F.batch_norm``, as ``nn.BatchNorm`` calls it
    (bit for bit the same output, gradients and, with a numeric momentum, running statistics).
    With ``momentum=None`` the cumulative average uses a tensor factor ``1/num_batches_tracked``
    (no host read, unlike ``nn.BatchNorm``): equal up to rounding."""
    if update and momentum is not None:
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)
    y = F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    if update:
        mean, var = channel_stats(x.detach())
        n = x.numel() // x.shape[1]
        _update_running(running_mean, running_var, num_batches_tracked, momentum, mean, var * (n / max(n - 1, 1)))
    return y


def _affine(x, mean, var, weight, bias, eps, channel_axis: int, center: bool = True,
            scale: bool = True) -> torch.Tensor:
    """``weight * (x - mean) / sqrt(var + eps) + bias`` as ``x * a + b`` (see :func:`batch_norm`);
    ``mean``/``var`` broadcast against ``x`` (they keep the reduced axes), weight/bias are laid
    along ``channel_axis``. ``center``/``scale`` False drop the mean / the division (lite BN)."""
    shape = [1] * x.dim()
    shape[channel_axis] = -1
    a = torch.rsqrt(var + eps) if scale else torch.ones_like(var)
    if weight is not None:
        a = a * weight.view(shape)
    b = -mean * a if center else torch.zeros_like(mean)
    if bias is not None:
        b = b + bias.view(shape)
    return torch.addcmul(b, x, a)


def _update_running(running_mean, running_var, num_batches_tracked, momentum, mean, var_unbiased) -> None:
    """One in-place update of the running buffers (call under ``torch.no_grad()``):
    ``num_batches_tracked += 1``; ``running = (1-f)*running + f*value`` with ``f = momentum``, or
    ``f = 1/num_batches_tracked`` when ``momentum is None`` (cumulative average; a tensor factor:
    no host sync)."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if momentum is None:
        factor = (num_batches_tracked.to(running_mean.dtype).reciprocal()
                  if num_batches_tracked is not None else 0.0)
    else:
        factor = momentum
    running_mean.mul_(1 - factor).add_(mean * factor)
    running_var.mul_(1 - factor).add_(var_unbiased * factor)


class GhostBatchNorm(BatchNorm):
    """Ghost batch normalization (Hoffer, Hubara & Soudry 2017, "Train longer, generalize
    better"): in training, each consecutive group of ``ghost_batch`` examples of a batch is
    normalised with its own statistics (see :func:`ghost_batch_norm` for the last, smaller group
    and the running statistics). A large batch then keeps the noise of BN at a small batch while
    its throughput stays that of the large batch.

    Same parameters (γ = ``weight``, β = ``bias``), buffers and ``state_dict`` keys as
    :class:`BatchNorm` / ``nn.BatchNorm2d``; eval mode normalises with the running statistics
    exactly as BN. With batches of at most ``ghost_batch`` examples it *is* BN. Inputs:
    (N, C), (N, C, L) or (N, C, H, W).
    """

    def __init__(self, num_features: int, ghost_batch: int = 32, **kwargs):
        _check_ghost_batch(ghost_batch)
        super().__init__(num_features, **kwargs)
        self.ghost_batch = ghost_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return ghost_batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var,
                                self.num_batches_tracked, ghost_batch=self.ghost_batch,
                                training=self.training, momentum=self.momentum, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_batch={self.ghost_batch}"


def d2l_batch_norm(X, gamma, beta, moving_mean, moving_var, eps, momentum, old_convention=False):
    """The d2l book's scratch function (chapter "Batch Normalization"), kept as the book has it.

    Differences from PyTorch, on purpose: the mode is decided by ``torch.is_grad_enabled()``;
    ``moving_var`` gets the **biased** variance; only 2-D and 4-D inputs. With
    ``old_convention=False`` (the book since Aug 2022) ``moving = (1-momentum)*moving +
    momentum*batch`` with momentum 0.1; with ``old_convention=True`` (before) ``moving =
    momentum*moving + (1-momentum)*batch`` with momentum 0.9. Returns ``Y, moving_mean,
    moving_var`` (the new moving statistics as detached tensors).
    """
    if not torch.is_grad_enabled():
        X_hat = (X - moving_mean) / torch.sqrt(moving_var + eps)
    else:
        if len(X.shape) not in (2, 4):
            raise ValueError(f"d2l's batch_norm handles 2-D and 4-D input only, got {X.dim()}-D")
        if len(X.shape) == 2:
            mean = X.mean(dim=0)
            var = ((X - mean) ** 2).mean(dim=0)
        else:
            mean = X.mean(dim=(0, 2, 3), keepdim=True)
            var = ((X - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        X_hat = (X - mean) / torch.sqrt(var + eps)
        if old_convention:
            moving_mean = momentum * moving_mean + (1.0 - momentum) * mean
            moving_var = momentum * moving_var + (1.0 - momentum) * var
        else:
            moving_mean = (1.0 - momentum) * moving_mean + momentum * mean
            moving_var = (1.0 - momentum) * moving_var + momentum * var
    Y = gamma * X_hat + beta
    return Y, moving_mean.data, moving_var.data


class D2LBatchNorm(nn.Module):
    """The d2l book's ``BatchNorm`` module: ``num_dims`` is 2 (fully connected) or 4 (conv).

    Kept with its traps so they can be shown: ``moving_mean``/``moving_var`` are plain
    attributes (not buffers: missing from ``state_dict()``, not moved by ``.to()``; the book
    moves them in ``forward``), γ/β have shape (1, C) or (1, C, 1, 1), and eval mode is
    ``torch.no_grad()``, not ``model.eval()``.
    """

    def __init__(self, num_features: int, num_dims: int, eps: float = 1e-5,
                 momentum: float | None = None, old_convention: bool = False):
        super().__init__()
        shape = (1, num_features) if num_dims == 2 else (1, num_features, 1, 1)
        self.gamma = nn.Parameter(torch.ones(shape))
        self.beta = nn.Parameter(torch.zeros(shape))
        self.moving_mean = torch.zeros(shape)
        self.moving_var = torch.ones(shape)
        self.eps = eps
        self.old_convention = old_convention
        self.momentum = (0.9 if old_convention else 0.1) if momentum is None else momentum

    def forward(self, X):
        if self.moving_mean.device != X.device:
            self.moving_mean = self.moving_mean.to(X.device)
            self.moving_var = self.moving_var.to(X.device)
        Y, self.moving_mean, self.moving_var = d2l_batch_norm(
            X, self.gamma, self.beta, self.moving_mean, self.moving_var,
            eps=self.eps, momentum=self.momentum, old_convention=self.old_convention,
        )
        return Y


# ----------------------------------------------------------------------------- Batch Renormalization


def _check_limits(rmax, dmax) -> None:
    for name, v, lo, valid in (("rmax", rmax, 1.0, "a number >= 1 (1 = r fixed at 1, BN)"),
                               ("dmax", dmax, 0.0, "a number >= 0 (0 = d fixed at 0, BN)")):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo <= float(v) < float("inf")):
            raise ValueError(f"{name}={v!r} is not valid; valid: {valid}")


def batch_renorm(x, weight, bias, running_mean, running_var, num_batches_tracked=None, training=True,
                 momentum=0.1, eps=1e-5, rmax=3.0, dmax=5.0) -> torch.Tensor:
    """Batch Renormalization (Ioffe 2017, "Batch Renormalization: Towards Reducing Minibatch
    Dependence in Batch-Normalized Models"), Algorithm 1, per channel of ``x`` (N, C, *).

    Training (the running buffers are required)::

        mu_B, var_B = mean, biased variance of the batch;  sigma_B = sqrt(var_B + eps)
        sigma = sqrt(running_var + eps)                     (the running statistics BEFORE this batch)
        r = stop_gradient(clip(sigma_B / sigma, 1/rmax, rmax))
        d = stop_gradient(clip((mu_B - running_mean) / sigma, -dmax, dmax))
        y = weight * ((x - mu_B) / sigma_B * r + d) + bias

    then the running buffers are updated exactly as BN's (:func:`batch_norm`: ``momentum`` weights
    the NEW batch, PyTorch's direction; ``running_var`` stores the UNBIASED batch variance; None =
    cumulative average). Where r and d are not clipped, ``y = weight * (x - running_mean) / sigma +
    bias``: the output eval mode gives. ``rmax=1, dmax=0`` gives r = 1, d = 0: BN in training.
    Eval: BN's eval (the running statistics), whatever rmax and dmax. ``rmax``/``dmax``: numbers or
    0-d tensors (a tensor can be changed in place during training: :meth:`BatchRenorm.set_limits`).
    """
    if not training:
        return batch_norm(x, weight, bias, running_mean, running_var, training=False, eps=eps)
    _check_inputs(x, weight, bias, running_mean, running_var, momentum, eps)
    if running_mean is None or running_var is None:
        raise ValueError("batch_renorm needs running_mean and running_var in training: r and d compare the "
                         "batch with the running statistics")
    m = x.numel() // x.shape[1]
    if m <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")
    mean, var = channel_stats(x)
    sigma_b = torch.sqrt(var + eps)
    with torch.no_grad():
        sigma = torch.sqrt(running_var + eps)
        r = torch.minimum(torch.maximum(sigma_b / sigma, 1.0 / torch.as_tensor(rmax, dtype=x.dtype, device=x.device)),
                          torch.as_tensor(rmax, dtype=x.dtype, device=x.device))
        dmax_t = torch.as_tensor(dmax, dtype=x.dtype, device=x.device)
        d = torch.minimum(torch.maximum((mean - running_mean) / sigma, -dmax_t), dmax_t)
        _update_running(running_mean, running_var, num_batches_tracked, momentum, mean.detach(),
                        var.detach() * (m / (m - 1)))
    shape = _channel_shape(x)
    y = (x - mean.view(shape)) / sigma_b.view(shape) * r.view(shape) + d.view(shape)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y


class BatchRenorm(BatchNorm):
    """Batch Renormalization (Ioffe 2017) as a layer: :func:`batch_renorm` with this layer's
    parameters (γ = ``weight``, β = ``bias``) and BN's buffers (``running_mean``, ``running_var``,
    ``num_batches_tracked``; same ``state_dict`` keys as ``nn.BatchNorm2d`` plus ``rmax`` and
    ``dmax``). Inputs (N, C), (N, C, L) or (N, C, H, W).

    Conventions: ``momentum`` weights the new batch (PyTorch's direction, 0.1; the paper's α);
    the normalisation uses the biased batch variance, ``running_var`` stores the unbiased one (as
    BN); r and d use the running statistics from before the batch and carry no gradient. In
    training the running statistics enter the output (through r and d), unlike BN. ``rmax`` and
    ``dmax`` are 0-d buffers: the paper starts at rmax = 1, dmax = 0 (BN) and relaxes them to
    3 and 5 during training; :meth:`set_limits` changes them in place. Eval mode: exactly BN's.
    """

    def __init__(self, num_features: int, rmax: float = 3.0, dmax: float = 5.0, **kwargs):
        _check_limits(rmax, dmax)
        kwargs.setdefault("track_running_stats", True)
        if not kwargs["track_running_stats"]:
            raise ValueError("track_running_stats=False is not valid for BatchRenorm: r and d need the "
                             "running statistics; valid: True")
        super().__init__(num_features, **kwargs)
        self.register_buffer("rmax", torch.tensor(float(rmax)))
        self.register_buffer("dmax", torch.tensor(float(dmax)))

    def set_limits(self, rmax: float, dmax: float) -> None:
        """Set rmax (>= 1) and dmax (>= 0) in place (checked first; nothing changes on a bad value)."""
        _check_limits(rmax, dmax)
        self.rmax.fill_(float(rmax))
        self.dmax.fill_(float(dmax))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return batch_renorm(x, self.weight, self.bias, self.running_mean, self.running_var,
                            self.num_batches_tracked, training=self.training, momentum=self.momentum,
                            eps=self.eps, rmax=self.rmax.to(x.dtype), dmax=self.dmax.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rmax={float(self.rmax):g}, dmax={float(self.dmax):g}"


__all__ += ["batch_renorm", "BatchRenorm"]
