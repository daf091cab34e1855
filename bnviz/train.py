"""The training loop: ``Trainer.fit()`` is a short loop around one ``step()``.

* ``step(idx)`` is pure device work: gather the batch ``idx`` from the data set resident on the
  device, zero the grads, forward, cross-entropy, backward, plain SGD (as d2l's ``train_ch6``),
  and add the loss and correct count to device sums. No host sync. How it executes (eagerly,
  compiled, captured as CUDA graphs; the test evaluation too) is the run's
  :class:`bnviz.fastpath.FastPath`.
* Live hyperparameters (:class:`~bnviz.config.LiveParams`, validated when queued) are applied at
  the top of a step (lr, BN momentum, eps) or of an epoch (batch size) by :meth:`Trainer.apply_live`,
  which also records them in the History.
* Everything else is a callback (:mod:`bnviz.callbacks`): stop, divergence, per-layer
  statistics, progress, probes, the lab.
* A snapshot (every ``Config.snapshot_every`` steps and at each epoch end) is the one moment
  the host reads device values: one copy of a flat tensor (:class:`~bnviz.history.SnapshotLayout`).

``fit()`` raises on errors (a bad setting, batch size 1 with BN, missing data) after recording
them in the History; ``start()`` runs ``fit()`` in a background thread (the lab) and keeps the
error in ``history.status``/``history.message`` instead. ``train(...)`` is the one-line form.
"""
from __future__ import annotations

import functools
import itertools
import threading
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import fastpath
from .callbacks import (BATCH_ONE, BatchStatsRecorder, CancelFit, Divergence, Progress, SnapshotFunction,
                        StopSignal, at_chance_note, dispatch)
from .config import FAST_MODES, Config, LiveParams, check_batch_size, lr_factor, resolve_dataset, score_steps
from .data import (Dataset, batch_sizes, batch_slices, drops_last, evaluate, load_dataset, planned_steps,
                   resolve_device, to_float)
from .history import (STATUSES, Change, History, Snapshot, SnapshotLayout, load_histories,
                      save_histories)
from .models import build_lenet, configure_norms, init_weights, norm_layers
from .stats import layer_state

__all__ = ["Config", "LiveParams", "Trainer", "History", "Snapshot", "Change", "StepOut", "train",
           "evaluate", "build_model", "save_histories", "load_histories", "STATUSES", "FAST_MODES", "CancelFit"]


@dataclass
class StepOut:
    """What one step returns: 0-d device tensors (read them only at a snapshot)."""

    loss: torch.Tensor
    correct: torch.Tensor
    n: int


_DATA_CACHE: dict = {}
_DATA_LOCK = threading.Lock()
_BUILD_LOCK = threading.Lock()  # seeding + building use torch's global RNG: one build at a time
DROP_NOTE = "The last batch of each epoch (1 example) is dropped: BN cannot normalise a batch of one."


def cached_dataset(config: Config, device: torch.device) -> Dataset:
    """The data set of ``config`` on ``device``; the last one loaded stays resident (one at a
    time), so runs on the same data share it."""
    with _DATA_LOCK:
        name = resolve_dataset(config.dataset)
        key = (name, str(device), config.train_size, config.test_size)
        if key not in _DATA_CACHE:
            ds = load_dataset(name, device=device, train_size=config.train_size, test_size=config.test_size)
            _DATA_CACHE.clear()  # keep one data set resident at a time
            _DATA_CACHE[key] = ds
        return _DATA_CACHE[key]


def build_model(config: Config, device: torch.device, model: nn.Module | None = None,
                channels_last: bool = False) -> nn.Module:
    """The LeNet of ``config`` (``torch.manual_seed(config.seed)``, then ``Config.init``), or
    ``model`` as given, on ``device``, with the config's BN momentum and eps. The Trainer and
    the grid build every model here."""
    if model is None:
        with _BUILD_LOCK:  # trainers in other threads (the lab, a grid) seed the same RNG
            torch.manual_seed(config.seed)
            model = init_weights(build_lenet(config.model), config.init)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return configure_norms(model, config.bn_momentum, config.eps)


def decay_groups(model: nn.Module, weight_decay: float, on: str = "all"):
    """SGD's parameter groups for ``Config.weight_decay_on``: 'all': every parameter (one group);
    'weights': conv/linear weights decayed, every other parameter (biases, γ, β) not;
    'normalized': only the weights of the conv/linear layers ``name`` that a norm layer
    ``norm_<name>`` follows (:func:`~bnviz.models.norm_layers`), i.e. the scale-invariant ones."""
    if on == "all" or not weight_decay:
        return list(model.parameters())
    if on == "weights":
        chosen = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    elif on == "normalized":
        chosen = {id(getattr(model, name).weight) for name in norm_layers(model) if hasattr(model, name)}
    else:
        raise ValueError(f"weight_decay_on={on!r} is not valid; valid: 'all', 'weights', 'normalized'")
    params = list(model.parameters())
    return [{"params": [p for p in params if id(p) in chosen], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in chosen], "weight_decay": 0.0}]


class Meter:
    """The device side of the snapshots of one run or K runs: the metric sums (loss, correct, n
    since the previous snapshot | in this epoch: (6,) or (6, K)), the steps since the previous
    snapshot, and the training time (evaluation excluded)."""

    def __init__(self, sums: torch.Tensor):
        self.sums, self.since_snapshot = sums, 0
        self.t0 = self.mark = time.perf_counter()
        self.examples_mark, self.train_time, self.rate = 0, 0.0, 0.0

    def read(self, kind: str, examples: int, started: float, epoch_values: dict,
             layers: dict) -> tuple[list[list[float]], SnapshotLayout, float]:
        """The one host copy of the sums, ``epoch_values`` and ``layers`` (see
        :class:`~bnviz.history.SnapshotLayout`): ``(rows, layout, now)``. The sums read are
        zeroed; :attr:`rate` becomes a step snapshot's examples/s since the previous one (an
        epoch end keeps it, and its evaluation since ``started`` is not training time)."""
        runs = self.sums.numel() // 6
        layout = SnapshotLayout(runs)
        rows = layout.pack(self.sums.reshape(6, runs).t(), epoch_values, layers).tolist()
        now = time.perf_counter()
        if kind != "step":
            self.sums[3:].zero_()
            self.mark += time.perf_counter() - started
            return rows, layout, now
        self.sums[:3].zero_()
        dt, self.since_snapshot = now - self.mark, 0
        self.rate = (examples - self.examples_mark) / dt if dt > 0 else 0.0
        self.train_time += dt
        self.mark, self.examples_mark = now, examples
        return rows, layout, now


def _predict(model: nn.Module, channels_last: bool, x: torch.Tensor) -> torch.Tensor:
    """Logits of ``model`` for float images (the captured evaluation's forward)."""
    return model(x.contiguous(memory_format=torch.channels_last) if channels_last else x)


class Trainer:
    """Train the LeNet of ``config`` (or ``model``) on ``data`` (loaded from the config if None).

    ``fit()`` trains in this thread and returns the :class:`History`; ``start()`` runs it in a
    background thread (``join()`` waits). ``stop()`` (any thread) ends the run before the next
    step; ``live.set(...)`` (any thread) changes lr, BN momentum, eps or the batch size.
    ``callbacks``: objects with any of the methods listed in :mod:`bnviz.callbacks`;
    ``on_snapshot(history, snapshot)``: a plain function called after each snapshot.
    A custom ``model`` is used as given (no ``Config.init``). ``channels_last``: NHWC layout
    for the model and its inputs (a GPU option).
    """

    def __init__(self, config: Config, data: Dataset | None = None, live: LiveParams | None = None,
                 callbacks=(), model: nn.Module | None = None, progress: bool = False, on_snapshot=None,
                 channels_last: bool = False):
        if not isinstance(config, Config):
            raise ValueError(f"config must be a bnviz Config, got {type(config).__name__}")
        if not isinstance(channels_last, bool):
            raise ValueError(f"channels_last={channels_last!r} is not valid; valid: True or False")
        self.config, self.data, self._model, self.channels_last = config, data, model, channels_last
        self.live = live or LiveParams.from_config(config)
        self.live.spec = config.model if model is None else None  # batch size 1 is refused when queued
        self.history = History(config=config)
        self.stop_signal = StopSignal()
        self.recorder = BatchStatsRecorder()
        self.callbacks = [self.stop_signal, self.recorder, Divergence(config.divergence_factor), *callbacks]
        if on_snapshot is not None:
            self.callbacks.append(SnapshotFunction(on_snapshot))
        if progress:
            self.callbacks.append(Progress())
        self.model: nn.Module | None = None
        self.fast: fastpath.FastPath | None = None
        self.step_count = self.epoch = self.examples = 0
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ control (any thread)
    def stop(self) -> None:
        self.stop_signal.stop()

    def wait_for_stop(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds, waking at once if ``stop()`` is called (True then)."""
        return self.stop_signal.event.wait(timeout)

    def start(self) -> threading.Thread:
        if self._thread is not None:
            raise RuntimeError("this Trainer has already been started; make a new one for a new run")
        self._thread = threading.Thread(target=self._fit_quietly, name=f"bnviz-run-{self.history.run_id}",
                                        daemon=True)
        self._thread.start()
        return self._thread

    def _fit_quietly(self) -> None:
        try:
            self.fit()
        except Exception:  # already recorded in self.history (status 'error', message)
            pass

    def join(self, timeout: float | None = None) -> History:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.history

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ the run
    def fit(self) -> History:
        h, t0 = self.history, time.perf_counter()
        h.status = "running"
        try:
            self._setup()
            h.setup_time_s = time.perf_counter() - t0
            self._loop()
        except CancelFit as end:
            h.status = end.status
            h.note(end.message, first=True)
        except Exception as err:
            h.status = "error"
            if str(err).startswith("Expected more than 1 value per channel"):  # a custom model
                err = ValueError(BATCH_ONE.format(bs=self.live["batch_size"]))
            h.note(f"{type(err).__name__}: {err}", first=True)
            raise err
        else:
            h.status = "finished"
            h.note(at_chance_note(h, self.current_config(), self.step_count), first=True)
        finally:
            h.wall_time_s = time.perf_counter() - t0
            if self.fast is not None:
                self.fast.release()
            self._call("on_fit_end")
        return h

    def _loop(self) -> None:
        cfg, n = self.config, len(self.data.train_x)
        self.meter, self._epoch_examples = Meter(self.sums), 0
        self.model.train()
        for self.epoch in range(1, cfg.epochs + 1) if cfg.epochs else itertools.count(1):
            self.apply_live(LiveParams.AT_EPOCH)
            self._call("before_epoch")
            try:
                bs = self.live["batch_size"]
                order = torch.randperm(n, device=self.device, generator=self.gen)
                slices = batch_slices(n, bs, drops_last(n, bs, cfg.drop_last))
                for i, batch in enumerate(slices):
                    self.apply_live(LiveParams.AT_STEP)
                    self._schedule_lr()
                    self._call("before_step")
                    last = i == len(slices) - 1  # an epoch snapshot follows (it is evaluated anyway)
                    score = not last and self.step_count + 1 in self.score_steps
                    due = (self.step_count + 1) % cfg.snapshot_every == 0 or score
                    # Eager steps record the layer statistics only where a snapshot follows
                    # (they cost a fifth of a CPU step); compiled and captured steps always do.
                    self.recorder.enabled = self.fast.record_always or due or last
                    self.fast(order[batch])
                    self.step_count += 1
                    self.examples += batch.stop - batch.start
                    self._epoch_examples += batch.stop - batch.start
                    self.meter.since_snapshot += 1
                    if due:
                        self._snapshot("step", score)
            except CancelFit as end:
                if end.status == "stopped":
                    self._end_epoch()  # keep the part of the epoch that was trained
                raise
            self._end_epoch()

    def _end_epoch(self) -> None:
        if self.meter.since_snapshot:
            self._snapshot("step")
        if self._epoch_examples:  # a stop before the epoch's first step has nothing to report
            self._snapshot("epoch")
        self._epoch_examples = 0

    def _schedule_lr(self) -> None:
        """Set the lr of the next step from ``Config.lr_schedule`` (:func:`~bnviz.config.lr_factor`
        of the live lr; a constant schedule leaves the optimizer alone)."""
        if self.config.lr_schedule == "constant":
            return
        self.lr_now = self.live["lr"] * lr_factor(self.config.lr_schedule, self.step_count, self.total_steps)
        fastpath.set_lr(self.opt, self.lr_now)

    def apply_live(self, names: tuple[str, ...]) -> None:
        """Apply the queued live values among ``names`` (validated when queued) from the next
        step on, and record each as a :class:`~bnviz.history.Change`. lr: the optimizer's (a
        ``fill_`` of the tensor the graphs read); batch size: its graphs (or compiled shapes)
        are made; BN momentum/eps: set on the layers, then the fast path re-captures once."""
        changes = self.live.take(names)
        if changes:
            _apply_changes(self, changes)

    def current_config(self) -> Config:
        """The config with the live values now in use."""
        return self.config.replace(**self.live.values)

    # ------------------------------------------------------------------ the step
    def step(self, idx: torch.Tensor) -> StepOut:
        """One optimisation step on the training examples ``idx`` (a device index tensor)."""
        self.opt.zero_grad(set_to_none=False)
        loss, correct = self.fast.forward(idx)
        loss.backward()
        self.opt.step()
        return StepOut(loss, correct, len(idx))

    def _forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather the batch ``idx`` from the resident data set, uint8 -> float, the loss and
        correct count, and add both to the metric sums: the part of the step that the fast path
        compiles as one function."""
        x, y = to_float(self.data.train_x[idx]), self.data.train_y[idx]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss, correct = self._loss(x, y)
        n = idx.shape[0]
        with torch.no_grad():
            ld, cd = loss.detach() * n, correct.to(torch.float32)
            self.sums.view(2, 3).add_(torch.stack([ld, cd, torch.full_like(ld, n)]))
        return loss, correct

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy and the number of correct predictions (0-d tensors)."""
        out = self.model(x)
        return F.cross_entropy(out, y), (out.detach().argmax(1) == y).sum()

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        cfg, h = self.config, self.history
        self.device = self.data.device if self.data is not None else resolve_device(cfg.device)
        check_batch_size(self.live.spec, cfg.batch_size)
        if self.data is None:
            self.data = cached_dataset(cfg, self.device)
        h.dataset_label, h.device = self.data.label, str(self.device)
        self.model = build_model(cfg, self.device, self._model, self.channels_last)
        self.norms = norm_layers(self.model)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
        self.opt = fastpath.sgd(decay_groups(self.model, cfg.weight_decay, cfg.weight_decay_on), cfg.lr,
                                cfg.weight_decay, self.device)
        self.lr_now = cfg.lr  # the lr of the last step (Config.lr_schedule)
        n = len(self.data.train_x)
        self.total_steps = planned_steps(cfg.epochs, n, cfg.batch_size, cfg.drop_last) if cfg.epochs else None
        self.score_steps = frozenset(score_steps(cfg.score_at, self.total_steps)) if cfg.score_at else frozenset()
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.sums = torch.zeros(6, device=self.device)  # loss, correct, n: since snapshot | epoch
        if drops_last(len(self.data.train_x), cfg.batch_size):
            h.note(DROP_NOTE)
        test = self.data.test_x, self.data.test_y
        self.fast = fastpath.FastPath(
            cfg.fast, self.model, self.device, step=self.step, state=self._state, note=h.note,
            forward=self._forward, evaluate=lambda: evaluate(self.model, *test),
            capture_eval=lambda: fastpath.CapturedEval(
                self.model, *test, functools.partial(_predict, self.model, self.channels_last)))
        self._call("on_fit_start")
        self.fast.prepare(self._batch_sizes(cfg.batch_size))

    def _batch_sizes(self, batch_size: int) -> list[int]:
        n = len(self.data.train_x)
        return batch_sizes(n, batch_size, drops_last(n, batch_size, self.config.drop_last))

    def _state(self) -> list[torch.Tensor]:
        """Every tensor a step writes but its gradients (restored after warm-up and capture;
        a step zeroes the gradients first)."""
        tensors = [p for p in self.model.parameters()] + [b for b in self.model.buffers()]
        return tensors + [self.sums] + [t for pair in self.recorder.buffers.values() for t in pair]

    @property
    def captured(self) -> fastpath.CapturedStep | None:
        """The captured step (``.info``: batch sizes, capture times), or None: ``fast.captured``."""
        return self.fast.captured if self.fast is not None else None

    # ------------------------------------------------------------------ snapshots
    def _snapshot(self, kind: str, score: bool = False) -> Snapshot:
        """Read the device sums, the layer statistics and, at an epoch end or a ``score`` step
        (``Config.score_at``), the test accuracy in one host copy."""
        started, h = time.perf_counter(), self.history
        epoch_values = {"test_acc": self.fast.evaluate()} if kind == "epoch" or score else {}
        layers = {name: {**layer_state(m), **self.recorder.stats(name)} for name, m in self.norms.items()}
        (row,), layout, now = self.meter.read(kind, self.examples, started, epoch_values, layers)
        live = {**self.live.values, "lr": self.lr_now} if self.config.lr_schedule != "constant" else self.live.values
        s = Snapshot(kind=kind, step=self.step_count, epoch=self.epoch, examples=self.examples,
                     time_s=now - self.meter.t0, examples_per_s=self.meter.rate, **live, **layout.unpack(row, kind))
        h.snapshots.append(s)
        h.train_time_s = self.meter.train_time
        self._call("on_snapshot", s)
        return s

    def _call(self, event: str, *args) -> None:
        dispatch(self.callbacks, event, self, *args)


def _apply_changes(tr: Trainer, changes: dict) -> None:
    """Apply live values taken from ``tr.live`` (validated when queued) from the next step on and
    record each as a :class:`~bnviz.history.Change` (see :meth:`Trainer.apply_live`)."""
    values, at = tr.live.values, tr.step_count + 1
    tr.history.changes += [Change(at, tr.epoch, k, values[k], new) for k, new in changes.items()]
    values.update(changes)
    if "lr" in changes:
        fastpath.set_lr(tr.opt, values["lr"])
    if "batch_size" in changes:
        tr.fast.add_sizes(tr._batch_sizes(values["batch_size"]), at)
    if {"bn_momentum", "eps"} & changes.keys():
        configure_norms(tr.model, values["bn_momentum"], values["eps"])
        tr.fast.norms_changed(at)


def train(config: Config | None = None, data: Dataset | None = None, progress: bool = True,
          callbacks=(), **changes) -> History:
    """Train one run in this thread and return its History: ``train(Config(...))`` or
    ``train(lr=0.5, epochs=2)`` (fields of :class:`Config`). Raises on errors (a bad value, a
    missing data set, batch size 1 with BN); a diverged run returns with status 'diverged'."""
    return Trainer(Config.make(config, **changes), data=data, progress=progress, callbacks=callbacks).fit()
