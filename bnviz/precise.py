"""Evaluation with recomputed BN statistics ("PreciseBN", Wu & Johnson 2021), run by run.

A BN network in eval mode normalises with its **moving averages**, which average the batch
statistics of many earlier steps, i.e. of earlier weights: while the weights still move, that
lag costs accuracy (chapter 04 measured 14 points). PreciseBN recomputes the statistics on the
**final** weights before evaluating, so a comparison measures the weights, not the lag.

Conventions:

* The statistics are recomputed on the first :data:`PRECISE_BN_IMAGES` (2,000) training images,
  in batches of :data:`PRECISE_BN_BATCH` (250), with equal weights
  (:func:`bnviz.stats.recompute_bn_stats`), on a **copy**: the run itself goes on with its own
  moving averages untouched. A batch of 250 keeps the (B−1)/B bias of an average of batch
  variances below 0.4%.
* :class:`PreciseBNEval` (a Trainer callback; ``train_grid(precise_bn=N)`` adds it) writes, at
  every epoch end, ``Snapshot.precise_test_acc`` (BN models only; None otherwise) and
  ``Snapshot.saturated`` (models with sigmoids: the share of sigmoid outputs below 0.05 or above
  0.95 on the first 250 of those images, in eval mode; None otherwise).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .data import Dataset, to_float
from .stats import bn_layers, recompute_bn_stats

__all__ = ["PRECISE_BN_IMAGES", "PRECISE_BN_BATCH", "SATURATED", "precise_bn_accuracy", "saturation",
           "PreciseBNEval"]

PRECISE_BN_IMAGES = 2000
PRECISE_BN_BATCH = 250
SATURATED = 0.05  # a sigmoid output below 0.05 or above 0.95: its slope is < 19% of the maximum


def _check_images(images) -> int:
    if not isinstance(images, int) or isinstance(images, bool) or images < 1:
        raise ValueError(f"images={images!r} is not valid; valid: a positive number of training images, "
                         f"e.g. {PRECISE_BN_IMAGES}")
    return images


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 10000) -> float:
    model.eval()
    correct = 0
    for s in range(0, len(x), chunk):
        correct += int((model(to_float(x[s:s + chunk])).argmax(1) == y[s:s + chunk]).sum())
    return correct / max(len(x), 1)


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
    return _accuracy(precise_model(model, data, images, batch_size), data.test_x, data.test_y)


@torch.no_grad()
def saturation(model: nn.Module, x: torch.Tensor) -> float | None:
    """The share of all sigmoid outputs below :data:`SATURATED` or above 1 − SATURATED when
    ``model`` (eval mode, on a copy's mode: restored) sees the uint8 images ``x``; None if the
    model has no ``nn.Sigmoid``."""
    sigs = [m for m in model.modules() if isinstance(m, nn.Sigmoid)]
    if not sigs:
        return None
    counts = [0, 0]

    def hook(mod, inp, out):
        counts[0] += int(((out < SATURATED) | (out > 1 - SATURATED)).sum())
        counts[1] += out.numel()

    handles = [m.register_forward_hook(hook) for m in sigs]
    was_training = model.training
    try:
        model.eval()
        model(to_float(x))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return counts[0] / max(counts[1], 1)


class PreciseBNEval:
    """Trainer callback: at each epoch end, ``snapshot.precise_test_acc`` (BN models) and
    ``snapshot.saturated`` (sigmoid models), measured on a copy (see the module docstring)."""

    def __init__(self, images: int = PRECISE_BN_IMAGES, batch_size: int = PRECISE_BN_BATCH):
        self.images, self.batch_size = _check_images(images), batch_size

    def on_snapshot(self, trainer, s) -> None:
        if s.kind != "epoch":
            return
        model, data = trainer.model, trainer.data
        if bn_layers(model):
            model = precise_model(model, data, self.images, self.batch_size)
            s.precise_test_acc = _accuracy(model, data.test_x, data.test_y)
        s.saturated = saturation(model, data.train_x[:min(self.batch_size, self.images)])
