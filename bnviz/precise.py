"""Evaluation with recomputed BN statistics ("PreciseBN", Wu & Johnson 2021).

A BN network in eval mode normalises with its **moving averages**, which average the batch
statistics of many earlier steps, i.e. of earlier weights: while the weights still move, that
lag costs accuracy (chapter 04 measured 14 points). PreciseBN recomputes the statistics on the
**final** weights before evaluating, so a comparison measures the weights, not the lag.

Conventions:

* The statistics are recomputed on the first :data:`PRECISE_BN_IMAGES` (2,000) training images,
  in batches of :data:`PRECISE_BN_BATCH` (250), with equal weights
  (one pass: :func:`bnviz.stats.average_batch_stats`), on a **copy**: the run itself goes on
  with its own moving averages untouched. A batch of 250 keeps the (B−1)/B bias of an average
  of batch variances below 0.4%.
* At every epoch end ``Snapshot.precise_test_acc`` (BN models only; None otherwise) and
  ``Snapshot.saturated`` (models with sigmoids: the share of sigmoid outputs below 0.05 or above
  0.95 on the first 250 of those images, in eval mode; None otherwise) and
  ``Snapshot.saturated_layers`` (the same share per sigmoid layer) are written by
  :class:`PreciseBNEval` (a Trainer callback) for a run alone, and by
  :func:`precise_bn_stacked` (the same pass, the same evaluation, vmapped) for the K runs of a
  vmapped grid; ``train_grid(precise_bn=N)`` uses whichever applies.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .data import Dataset, accuracy, count_correct, to_float
from .stats import average_batch_stats, bn_layers, recompute_bn_stats

__all__ = ["PRECISE_BN_IMAGES", "PRECISE_BN_BATCH", "SATURATED", "precise_bn_accuracy", "precise_model",
           "saturation", "saturated_share", "saturated_shares", "sigmoid_layers", "PreciseBNEval", "precise_bn_stacked"]

PRECISE_BN_IMAGES = 2000
PRECISE_BN_BATCH = 250
SATURATED = 0.05  # a sigmoid output below 0.05 or above 0.95: its slope is < 19% of the maximum


def _check_images(images) -> int:
    if not isinstance(images, int) or isinstance(images, bool) or images < 1:
        raise ValueError(f"images={images!r} is not valid; valid: a positive number of training images, "
                         f"e.g. {PRECISE_BN_IMAGES}")
    return images


def eval_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """``model``'s accuracy on the uint8 images ``x`` in eval mode (it is left in eval mode)."""
    model.eval()
    with torch.no_grad():
        return int(count_correct(model, x, y)) / max(len(x), 1)


def precise_model(model: nn.Module, data: Dataset, images: int = PRECISE_BN_IMAGES,
                  batch_size: int = PRECISE_BN_BATCH) -> nn.Module:
    """A copy of ``model`` whose BN statistics are recomputed on the first ``images`` training
    images (batches of ``batch_size``), in eval mode. ``model`` is not changed."""
    m = copy.deepcopy(model)
    recompute_bn_stats(m, data.train_x[:_check_images(images)], batch_size=batch_size)
    return m.eval()


def precise_bn_accuracy(model: nn.Module, data: Dataset, images: int = PRECISE_BN_IMAGES,
                        batch_size: int = PRECISE_BN_BATCH) -> float:
    """Test accuracy of ``model`` with BN statistics recomputed on the first ``images`` training
    images (:func:`precise_model`); the model (weights, buffers, mode) is left as it was."""
    if not bn_layers(model):
        raise ValueError("precise_bn_accuracy: the model has no BN layer with running statistics; "
                         "its eval-mode accuracy is already exact")
    return eval_accuracy(precise_model(model, data, images, batch_size), data.test_x, data.test_y)


def sigmoid_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``model``'s sigmoids in module order, by layer name (``act_conv1`` -> 'conv1'; a sigmoid
    not named ``act_*`` keeps its module name)."""
    return {(n[len("act_"):] if n.startswith("act_") else n): m for n, m in model.named_modules()
            if isinstance(m, nn.Sigmoid)}


def saturated_shares(forward, model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The share of the outputs of ``model``'s sigmoids below :data:`SATURATED` or above
    1 − SATURATED while ``forward(x)`` runs (float images; a device tensor, no host read; it
    also runs vmapped): ``(L + 1,)``, one share per sigmoid layer (:func:`sigmoid_layers`' order),
    then the share pooled over all of them. None if the model has no ``nn.Sigmoid``."""
    sigs = list(sigmoid_layers(model).values())
    if not sigs:
        return None
    seen: dict[int, tuple] = {}

    def hook(mod, inp, out):
        seen[id(mod)] = (((out < SATURATED) | (out > 1 - SATURATED)).sum().float(), out.numel())

    handles = [m.register_forward_hook(hook) for m in sigs]
    try:
        with torch.no_grad():
            forward(x)
    finally:
        for h in handles:
            h.remove()
    counts = [seen[id(m)] for m in sigs]
    pooled = sum(c for c, _ in counts) / max(sum(n for _, n in counts), 1)
    return torch.stack([c / max(n, 1) for c, n in counts] + [pooled])


def saturated_share(forward, model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The share pooled over all of ``model``'s sigmoids (:func:`saturated_shares`' last value)."""
    shares = saturated_shares(forward, model, x)
    return None if shares is None else shares[-1]


def saturation(model: nn.Module, x: torch.Tensor, per_layer: bool = False) -> float | dict | None:
    """:func:`saturated_share` of ``model`` in eval mode (the mode is restored) on the uint8
    images ``x``, as a number; with ``per_layer`` ``{layer: share}`` (:func:`sigmoid_layers`'
    names). None if the model has no ``nn.Sigmoid``."""
    pooled, layers = _saturation(model, x)
    return layers if per_layer else pooled


def _saturation(model: nn.Module, x: torch.Tensor) -> tuple[float | None, dict | None]:
    """(pooled share, {layer: share}) of :func:`saturated_shares` in eval mode, one forward pass."""
    was_training = model.training
    try:
        model.eval()
        shares = saturated_shares(model, model, to_float(x))
    finally:
        model.train(was_training)
    if shares is None:
        return None, None
    return float(shares[-1]), dict(zip(sigmoid_layers(model), shares[:-1].tolist()))


class PreciseBNEval:
    """Trainer callback: at each epoch end (and at each step snapshot the trainer scored, see
    ``Config.score_at``), ``snapshot.precise_test_acc`` (BN models) and ``snapshot.saturated``
    (sigmoid models), measured on a copy (see the module docstring)."""

    def __init__(self, images: int = PRECISE_BN_IMAGES, batch_size: int = PRECISE_BN_BATCH):
        self.images, self.batch_size = _check_images(images), batch_size

    def on_snapshot(self, trainer, s) -> None:
        if s.kind != "epoch" and s.test_acc is None:  # also where the trainer scored (Config.score_at)
            return
        model, data = trainer.model, trainer.data
        if bn_layers(model):
            model = precise_model(model, data, self.images, self.batch_size)
            s.precise_test_acc = eval_accuracy(model, data.test_x, data.test_y)
        s.saturated, s.saturated_layers = _saturation(model, data.train_x[:min(self.batch_size, self.images)])


@torch.no_grad()
def precise_bn_stacked(skeleton: nn.Module, params: dict, buffers: dict, data: Dataset, images: int,
                       batch_size: int = PRECISE_BN_BATCH, chunk: int = 10000) -> torch.Tensor:
    """:class:`PreciseBNEval` for K stacked models (the vmapped grid: ``params``/``buffers`` of
    ``torch.func.stack_module_state``, ``skeleton`` the module they fill): a (K, 2) device
    tensor of the test accuracy with BN statistics recomputed (:func:`average_batch_stats`, on
    copies of the buffers) and the saturated share (:func:`saturated_share`), then (K, L) more
    columns: the share per sigmoid layer (:func:`saturated_shares`, L = 0 without sigmoids); NaN
    where not measured (no BN). The skeleton is left in training mode."""
    from torch.func import functional_call

    def forward(p, b, x):
        return functional_call(skeleton, (p, b), (x,))

    predict = torch.vmap(forward, in_dims=(0, 0, None))
    K, device = next(iter(params.values())).shape[0], data.device
    x = data.train_x[:images]
    buffers = {k: v.clone() for k, v in buffers.items()}
    acc = sat = torch.full((K,), float("nan"), device=device)
    per_layer = torch.zeros(K, 0, device=device)
    bns = list(bn_layers(skeleton).values())
    if bns:
        skeleton.train()
        average_batch_stats(lambda xb: predict(params, buffers, xb), bns,
                            (to_float(x[s:s + batch_size]) for s in range(0, len(x), batch_size)))
    skeleton.eval()
    try:
        if bns:
            acc = accuracy(lambda xb: predict(params, buffers, xb), data.test_x, data.test_y, chunk)
        if any(isinstance(m, nn.Sigmoid) for m in skeleton.modules()):
            share = lambda p, b, xb: saturated_shares(lambda z: forward(p, b, z), skeleton, xb)  # noqa: E731
            shares = torch.vmap(share, in_dims=(0, 0, None))(params, buffers, to_float(x[:batch_size]))
            sat, per_layer = shares[:, -1], shares[:, :-1]
    finally:
        skeleton.train()
    return torch.cat([torch.stack([acc, sat], 1), per_layer], 1)
