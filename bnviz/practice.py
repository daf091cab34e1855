"""BN where it is used (chapter 08): arms with their own model, optimiser groups or BN mode, run
over the same seeds with the course's :class:`~bnviz.train.Trainer` and compared as every other
chapter compares (:class:`~bnviz.comparisons.Comparison`, typed verdicts, the chapter's Holm ledger).

* :class:`Arm`: what one arm trains: a model made per seed, Config changes, Trainer callbacks,
  its own data set. :func:`run_arms` runs every arm with every seed and returns a
  :class:`Practice` (the Comparison, and each run's trained model, for fine-tuning).
* The practices, each a Trainer callback that acts before the run's first step (before any
  compile or capture) or at every step:

  - :class:`DecayGroups`: weight decay on the conv/linear weights only (γ, β and every bias
    get none), against ``Config.weight_decay`` on every parameter (plain SGD's default);
  - :class:`FreezeBN`: BN in **eval mode** during training (fine-tuning with frozen
    statistics: each BN layer normalises with the running mean/variance it came with, which
    are not updated; γ and β still learn; the gradient flows through the fixed affine map);
  - :class:`RenormWarmup`: Batch Renormalization's rmax/dmax relaxed linearly from 1/0 (BN) to
    their final values over the first ``steps`` steps (Ioffe 2017 relaxes them gradually too).

* :func:`shifted`: a task whose inputs are shifted (:func:`bnviz.stats.shift_images`);
  :func:`shift_baselines`: what the pre-trained models score on it before any fine-tuning (eval
  mode, and with the BN statistics recomputed on the shifted images, "AdaBN", Li et al. 2016).

Seeds: an arm's model is made by ``make(seed)`` with the global torch RNG seeded by ``seed``
(the initial weights), and the Trainer's ``Config.seed`` is the seed (the batch order).
"""
from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from . import fastpath
from .comparisons import Comparison
from .config import Config
from .data import Dataset
from .models import norm_layers
from .precise import PRECISE_BN_IMAGES, PreciseBNEval, precise_bn_accuracy
from .runs import GridResult, Run
from .stats import bn_layers, shift_images
from .train import Trainer

__all__ = ["Arm", "Practice", "run_arms", "param_groups", "DecayGroups", "FreezeBN", "RenormWarmup",
           "renorm_as_bn", "PreciseEval", "shifted", "shift_baselines"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two SGD groups: ``weight_decay`` on the weights of conv and linear layers; 0 on every
    parameter of a norm layer (γ, β) and on every bias (the usual "no decay on BN and bias"
    rule, e.g. Goyal et al. 2017, He et al. 2019 "Bag of tricks"). Every parameter is in exactly
    one group."""
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise ValueError(f"weight_decay={weight_decay!r} is not valid; valid: a number >= 0, e.g. 5e-4")
    norm_params = {id(p) for m in norm_layers(model).values() for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if id(p) in norm_params or name.endswith("bias") else decay).append(p)
    return [{"params": decay, "weight_decay": float(weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]


class DecayGroups:
    """Trainer callback: the run's SGD rebuilt from :func:`param_groups` with the config's
    ``weight_decay`` (same lr, same plain SGD), before the first step."""

    def on_fit_start(self, trainer) -> None:
        cfg = trainer.config
        trainer.opt = fastpath.sgd(param_groups(trainer.model, cfg.weight_decay), cfg.lr, cfg.weight_decay,
                                   trainer.device)


class FreezeBN:
    """Trainer callback: every BN layer (with running statistics) in eval mode for the whole
    run: it normalises with its running mean and variance, which stay as they were (eval mode
    does not update them); γ and β still train. Set before the first step and again before
    every step (the trainer's ``model.train()`` and its evaluations would undo it)."""

    def _freeze(self, trainer) -> None:
        for m in bn_layers(trainer.model).values():
            m.eval()

    on_fit_start = before_epoch = before_step = _freeze


@dataclass
class RenormWarmup:
    """Trainer callback: at step t (0-based) every :class:`~bnviz.norms.BatchRenorm` layer gets
    ``rmax_t = 1 + (rmax - 1)·min(1, t/steps)`` and ``dmax_t = dmax·min(1, t/steps)``: BN at the
    start, the full correction after ``steps`` steps."""

    rmax: float = 3.0
    dmax: float = 5.0
    steps: int = 100

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps={self.steps!r} is not valid; valid: an int >= 0 (0: no warm-up)")
        from .norms import _check_limits

        _check_limits(self.rmax, self.dmax)

    def limits(self, t: int) -> tuple[float, float]:
        f = 1.0 if self.steps == 0 else min(1.0, t / self.steps)
        return 1.0 + (self.rmax - 1.0) * f, self.dmax * f

    def before_step(self, trainer) -> None:
        from .norms import BatchRenorm

        rmax, dmax = self.limits(trainer.step_count)
        for m in trainer.model.modules():
            if isinstance(m, BatchRenorm):
                m.set_limits(rmax, dmax)

    on_fit_start = before_step


@contextmanager
def renorm_as_bn(model: nn.Module):
    """Inside the block every :class:`~bnviz.norms.BatchRenorm` layer of ``model`` has rmax = 1,
    dmax = 0, i.e. is BN in training mode; its limits are restored after. PreciseBN's pass
    (:func:`bnviz.stats.recompute_bn_stats`) resets the running statistics and runs in training
    mode: a Batch Renorm layer would then correct each batch towards those half-built statistics
    (r, d clipped) and feed distorted inputs to the layers after it. As BN, the pass recomputes
    each layer's statistics exactly as it does for a BN network."""
    from .norms import BatchRenorm

    layers = [m for m in model.modules() if isinstance(m, BatchRenorm)]
    saved = [(m.rmax.clone(), m.dmax.clone()) for m in layers]
    try:
        for m in layers:
            m.set_limits(1.0, 0.0)
        yield model
    finally:
        for m, (r, d) in zip(layers, saved):
            m.rmax.copy_(r)
            m.dmax.copy_(d)


class PreciseEval(PreciseBNEval):
    """:class:`~bnviz.precise.PreciseBNEval` with Batch Renorm layers recomputed as BN
    (:func:`renorm_as_bn`); for a model without Batch Renorm it is PreciseBNEval."""

    def on_snapshot(self, trainer, s) -> None:
        with renorm_as_bn(trainer.model):
            super().on_snapshot(trainer, s)


@dataclass
class Arm:
    """One arm of a comparison. ``make(seed)``: its model (called with the global RNG seeded by
    ``seed``); ``changes``: Config fields changed from the base; ``callbacks()``: fresh Trainer
    callbacks for each run; ``data``: its own data set (default: the one given to
    :func:`run_arms`)."""

    make: Callable[[int], nn.Module]
    changes: dict = field(default_factory=dict)
    callbacks: Callable[[], tuple] = tuple
    data: Dataset | None = None


@dataclass
class Practice:
    """What :func:`run_arms` returns: the :class:`~bnviz.comparisons.Comparison` and each run's
    trained model by ``(arm, seed)``."""

    comparison: Comparison
    models: dict = field(default_factory=dict)


def run_arms(base: Config, arms: dict[str, Arm], seeds, data: Dataset, reference: str | None = None,
             precise_bn: int | None = PRECISE_BN_IMAGES, progress: bool = True) -> Practice:
    """Train every arm with every seed (one :class:`~bnviz.train.Trainer` run each, labels
    ``'<arm> · seed <s>'``, tags ``variant`` and ``seed``) and return a :class:`Practice`.
    ``precise_bn``: evaluate at each epoch end with BN statistics recomputed on that many
    training images too (:class:`PreciseEval`; None: off). ``progress``: one line per run as it ends."""
    if not arms:
        raise ValueError("arms is empty: give at least one name -> Arm")
    seeds = tuple(int(s) for s in seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct integers, at least one; got {seeds}")
    if reference is not None and reference not in arms:
        raise ValueError(f"reference {reference!r} is not among the arms {list(arms)}")
    runs, models = GridResult(dataset_label=data.label, train_size=len(data.train_x)), {}
    for name, arm in arms.items():
        for s in seeds:
            t0, d = time.perf_counter(), arm.data or data
            cfg = base.replace(**arm.changes, seed=s, label=f"{name} · seed {s}")
            torch.manual_seed(s)
            model = arm.make(s)
            cbs = tuple(arm.callbacks()) + ((PreciseEval(precise_bn),) if precise_bn else ())
            trainer = Trainer(cfg, data=d, model=model, callbacks=cbs)
            h = trainer.fit()
            runs.runs.append(Run(cfg.label, {"variant": name, "seed": s}, h))
            models[(name, s)] = trainer.model
            if progress:
                print(f"  {cfg.label}: {h.summary()}; {time.perf_counter() - t0:.1f} s", flush=True)
    cmp = Comparison(reference or next(iter(arms)), list(arms), seeds, runs)
    return Practice(cmp, models)


def shifted(data: Dataset, brightness: float = 0.0, contrast: float = 1.0, train: slice = slice(None)) -> Dataset:
    """``data`` with every image shifted (:func:`bnviz.stats.shift_images`: ``clamp(contrast·x +
    brightness, 0, 1)`` in [0, 1] units), its training set cut to ``train``; labels unchanged."""
    x = data.train_x[train]
    if len(x) == 0:
        raise ValueError(f"train={train} selects no training example of {data!r}")
    return Dataset(data.name, shift_images(x, brightness, contrast), data.train_y[train],
                   shift_images(data.test_x, brightness, contrast), data.test_y, data.classes)


def shift_baselines(models: dict, task: Dataset, images: int = PRECISE_BN_IMAGES) -> list[dict]:
    """For each pre-trained model (``{(arm, seed): model}``), before any fine-tuning: its
    eval-mode test accuracy on ``task`` (``as_is``) and with its BN statistics recomputed on the
    first ``images`` training images of ``task`` (``adabn``). The models are not changed."""
    from .data import count_correct

    rows = []
    for (arm, seed), model in models.items():
        m = copy.deepcopy(model).eval()
        with torch.no_grad():
            as_is = int(count_correct(m, task.test_x, task.test_y)) / len(task.test_x)
        adabn = precise_bn_accuracy(model, task, images=min(images, len(task.train_x)))
        rows.append({"arm": arm, "seed": seed, "as_is": as_is, "adabn": adabn})
    return rows
