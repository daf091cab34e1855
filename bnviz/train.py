"""The training loop: ``Trainer.fit()`` is a short loop around one ``step()``.

* ``step(idx)`` is pure device work: gather the batch ``idx`` from the data set resident on the
  device, zero the grads, forward, cross-entropy, backward, plain SGD (as d2l's ``train_ch6``),
  and add the loss and correct count to device sums. No host sync. On CUDA the fast path
  (:mod:`bnviz.fastpath`) compiles the forward (``_forward``: gather .. metric sums) and
  captures the whole step as a CUDA graph per batch size, released at the end of ``fit()``; on
  a CPU or MPS the same ``step`` runs eagerly.
* Everything else is a callback (:mod:`bnviz.callbacks`): live hyperparameters, stop,
  divergence, per-layer statistics, progress, probes, the lab.
* A snapshot (every ``Config.snapshot_every`` steps and at each epoch end) is the one moment
  the host reads device values: one copy of a flat tensor.

``fit()`` raises on errors (a bad setting, batch size 1 with BN, missing data) after recording
them in the History; ``start()`` runs ``fit()`` in a background thread (the lab) and keeps the
error in ``history.status``/``history.message`` instead. ``train(...)`` is the one-line form.
"""
from __future__ import annotations

import functools
import itertools
import threading
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import fastpath
from .callbacks import (BATCH_ONE, BatchStatsRecorder, CancelFit, Divergence, LiveUpdates, Progress,
                        SnapshotFunction, StopSignal, diagnose)
from .config import FAST_MODES, Config, LiveParams, check, resolve_dataset
from .data import Dataset, load_dataset, resolve_device, to_float
from .history import STATUSES, Change, History, LayerStats, Snapshot, load_histories, save_histories
from .models import build_lenet, init_weights, norm_layers
from .stats import layer_state

__all__ = ["Config", "LiveParams", "Trainer", "History", "Snapshot", "Change", "StepOut", "train",
           "evaluate", "save_histories", "load_histories", "STATUSES", "FAST_MODES", "CancelFit"]


@dataclass
class StepOut:
    """What one step returns: 0-d device tensors (read them only at a snapshot)."""

    loss: torch.Tensor
    correct: torch.Tensor
    n: int


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 10000) -> torch.Tensor:
    """Accuracy of ``model`` in eval mode on uint8 images ``x``; a 0-d tensor on the device
    (no host sync). The mode is restored afterwards."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    with torch.inference_mode():
        for s in range(0, len(x), chunk):
            correct += (model(to_float(x[s:s + chunk])).argmax(1) == y[s:s + chunk]).sum()
    model.train(was_training)
    return correct.float() / max(len(x), 1)


_DATA_CACHE: dict = {}
_DATA_LOCK = threading.Lock()
_BUILD_LOCK = threading.Lock()  # seeding + building use torch's global RNG: one build at a time
DROP_NOTE = "The last batch of each epoch (1 example) is dropped: BN cannot normalise a batch of one."


def cached_dataset(config: Config, device: torch.device) -> Dataset:
    """The data set of ``config`` on ``device``; the last one loaded stays resident (one at a
    time), so runs on the same data share it."""
    with _DATA_LOCK:
        return _load_cached(config, device)


def _load_cached(config: Config, device: torch.device) -> Dataset:
    name = resolve_dataset(config.dataset)
    key = (name, str(device), config.train_size, config.test_size)
    if key not in _DATA_CACHE:
        ds = load_dataset(name, device=device, train_size=config.train_size, test_size=config.test_size)
        _DATA_CACHE.clear()  # keep one data set resident at a time
        _DATA_CACHE[key] = ds
    return _DATA_CACHE[key]


class Clock:
    """Training time between snapshots: ``lap(examples)`` at a step snapshot returns the
    examples/s since the previous one; ``exclude(seconds)`` takes evaluation time out."""

    def __init__(self):
        self.t0 = self.mark = time.perf_counter()
        self.examples_mark, self.train_time = 0, 0.0

    def lap(self, examples: int, now: float) -> float:
        dt = now - self.mark
        rate = (examples - self.examples_mark) / dt if dt > 0 else 0.0
        self.train_time += dt
        self.mark, self.examples_mark = now, examples
        return rate

    def exclude(self, seconds: float) -> None:
        self.mark += seconds


class Trainer:
    """Train the LeNet of ``config`` (or ``model``) on ``data`` (loaded from the config if None).

    ``fit()`` trains in this thread and returns the :class:`History`; ``start()`` runs it in a
    background thread (``join()`` waits). ``stop()`` (any thread) ends the run before the next
    step. ``callbacks``: objects with any of the methods listed in :mod:`bnviz.callbacks`;
    ``on_snapshot(history, snapshot)``: a plain function called after each snapshot.
    A custom ``model`` is used as given (no ``Config.init``).
    """

    def __init__(self, config: Config, data: Dataset | None = None, live: LiveParams | None = None,
                 callbacks=(), model: nn.Module | None = None, progress: bool = False, on_snapshot=None,
                 channels_last: bool = False):
        if not isinstance(config, Config):
            raise ValueError(f"config must be a bnviz Config, got {type(config).__name__}")
        if not isinstance(channels_last, bool):
            raise ValueError(f"channels_last={channels_last!r} is not valid; valid: True or False")
        self.config, self.data, self._model = config, data, model
        self.channels_last = channels_last  # NHWC layout for the model and its inputs (a GPU option)
        self.live = live or LiveParams.from_config(config)
        self.live.model_checks["batch_size"] = self.check_batch_size  # refused at the slider
        self.history = History(config=config)
        self.stop_signal = StopSignal()
        self.recorder = BatchStatsRecorder()
        self.callbacks = [LiveUpdates(), self.stop_signal, self.recorder,
                          Divergence(config.divergence_factor), *callbacks]
        if on_snapshot is not None:
            self.callbacks.append(SnapshotFunction(on_snapshot))
        if progress:
            self.callbacks.append(Progress())
        self.model: nn.Module | None = None
        self.captured: fastpath.CapturedStep | None = None
        self.compiled = False  # the forward (gather .. metric sums) runs compiled
        self.forward_fn = self._forward
        self._warmed: set[int] = set()  # batch sizes the compiled forward has seen (compiled only)
        self.step_count = self.epoch = self.examples = 0
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ control (any thread)
    def stop(self) -> None:
        self.stop_signal.stop()

    def wait_for_stop(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds, waking at once if ``stop()`` is called (True then)."""
        return self.stop_signal.event.wait(timeout)

    @property
    def status(self) -> str:
        return self.history.status

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
            h.status, h.message = end.status, _join(end.message, h.message)
        except Exception as err:
            h.status = "error"
            if str(err).startswith("Expected more than 1 value per channel"):  # a custom model
                err = ValueError(BATCH_ONE.format(bs=self.live["batch_size"]))
            h.message = _join(f"{type(err).__name__}: {err}", h.message)
            raise err
        else:
            h.status = "finished"
            acc = h.final_train_acc
            if acc is not None and acc < 0.15 and self.step_count >= 50:
                h.message = _join(diagnose(f"Training finished but the training accuracy is {acc:.3f}, "
                                           "about chance (0.1): the network did not learn.",
                                           self.current_config(), stuck=True), h.message)
        finally:
            h.wall_time_s = time.perf_counter() - t0
            self._release_fast_path()
            self._call("on_fit_end")
        return h

    run = fit  # the name before the redesign

    def _loop(self) -> None:
        cfg = self.config
        self.clock = Clock()
        self._since_snapshot, self._epoch_examples = 0, 0
        self.model.train()
        for self.epoch in range(1, cfg.epochs + 1) if cfg.epochs else itertools.count(1):
            self._call("before_epoch")
            try:
                batches = self._epoch_batches(self.live["batch_size"])
                for i, idx in enumerate(batches):
                    self._call("before_step")
                    # Eager steps record the layer statistics only where a snapshot follows
                    # (they cost a fifth of a CPU step); compiled and captured steps always do.
                    self.recorder.enabled = self._record_always or i == len(batches) - 1 or (
                        (self.step_count + 1) % cfg.snapshot_every == 0)
                    self._run_step(idx)
                    self.step_count += 1
                    self.examples += len(idx)
                    self._epoch_examples += len(idx)
                    self._since_snapshot += 1
                    if self.step_count % cfg.snapshot_every == 0:
                        self._snapshot("step")
            except CancelFit as end:
                if end.status == "stopped":
                    self._end_epoch()  # keep the part of the epoch that was trained
                raise
            self._end_epoch()

    def _end_epoch(self) -> None:
        if self._since_snapshot:
            self._snapshot("step")
        if self._epoch_examples:  # a stop before the epoch's first step has nothing to report
            self._snapshot("epoch")
        self._epoch_examples = 0

    # ------------------------------------------------------------------ the step
    def step(self, idx: torch.Tensor) -> StepOut:
        """One optimisation step on the training examples ``idx`` (a device index tensor)."""
        self.opt.zero_grad(set_to_none=False)
        loss, correct = self.forward_fn(idx)
        loss.backward()
        self.opt.step()
        return StepOut(loss, correct, len(idx))

    def _forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather the batch ``idx`` from the resident data set, uint8 -> float, the loss and
        correct count (``loss_fn``), and add both to the metric sums: the part of the step that
        the fast path compiles as one function."""
        x, y = to_float(self.data.train_x[idx]), self.data.train_y[idx]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss, correct = self.loss_fn(x, y)
        n = idx.shape[0]
        with torch.no_grad():
            ld, cd = loss.detach() * n, correct.to(torch.float32)
            self.sums.view(2, 3).add_(torch.stack([ld, cd, torch.full_like(ld, n)]))
        return loss, correct

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy and the number of correct predictions (0-d tensors)."""
        out = self.model(x)
        return F.cross_entropy(out, y), (out.detach().argmax(1) == y).sum()

    def _evaluate(self) -> torch.Tensor:
        return evaluate(self.model, self.data.test_x, self.data.test_y)

    def _run_step(self, idx: torch.Tensor) -> None:
        if self.captured is not None:
            self.captured(idx)
        else:
            self.step(idx)

    def _epoch_batches(self, batch_size: int) -> list[torch.Tensor]:
        """This epoch's batches: slices (views) of one on-device permutation."""
        n = len(self.data.train_x)
        order = torch.randperm(n, device=self.device, generator=self.gen)
        stop = n - n % batch_size if self._drop_last(batch_size) else n
        return [order[start:start + batch_size] for start in range(0, stop, batch_size)]

    def _drop_last(self, batch_size: int) -> bool:
        # A last batch of one example cannot be normalised by a BN layer: drop it (noted).
        return self.config.drop_last or (batch_size > 1 and len(self.data.train_x) % batch_size == 1)

    def _batch_sizes(self, batch_size: int) -> list[int]:
        n = len(self.data.train_x)
        sizes = [min(batch_size, n)]
        if n % batch_size and n > batch_size and not self._drop_last(batch_size):
            sizes.append(n % batch_size)
        return sizes

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        cfg, h = self.config, self.history
        self.device = self.data.device if self.data is not None else resolve_device(cfg.device)
        self.check_batch_size(cfg.batch_size)
        if self.data is None:
            self.data = cached_dataset(cfg, self.device)
        h.dataset_label, h.device = self.data.label, str(self.device)
        self.model = self._build_model()
        self.norms = norm_layers(self.model)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
        self.opt = fastpath.sgd(self.model.parameters(), cfg.lr, cfg.weight_decay, self.device)
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.sums = torch.zeros(6, device=self.device)  # loss, correct, n: since snapshot | epoch
        if self._drop_last(cfg.batch_size) and not cfg.drop_last:
            h.message = _join(h.message, DROP_NOTE)
        compile_, capture, note = fastpath.plan(cfg.fast, self.model, self.device)
        h.message = _join(h.message, note)
        self._record_always = compile_ or capture  # a per-step switch cannot enter a graph
        self._call("on_fit_start")
        self.loss_fn, self.evaluator = self._loss, self._evaluate
        self._prepare_fast_path(compile_, capture)

    def _build_model(self) -> nn.Module:
        cfg = self.config
        if self._model is None:
            with _BUILD_LOCK:  # trainers in other threads (the lab, a grid) seed the same RNG
                torch.manual_seed(cfg.seed)
                model = init_weights(build_lenet(cfg.model), cfg.init)
        else:
            model = self._model
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        for m in norm_layers(model).values():
            if hasattr(m, "momentum") and cfg.model.norm != "d2l":
                m.momentum = cfg.bn_momentum
            if hasattr(m, "eps"):
                m.eps = cfg.eps
        return model

    def check_batch_size(self, batch_size: int) -> None:
        """Raise ValueError (with the explanation) for batch size 1 when a fully connected
        layer of this run's model has BN: its batch variance would be undefined."""
        spec = self.config.model
        if (batch_size == 1 and self._model is None and spec.is_batch_norm
                and any(name.startswith("fc") for name in spec.norm_layers)):
            raise ValueError(BATCH_ONE.format(bs=batch_size))

    def _state(self) -> list[torch.Tensor]:
        """Every tensor a step writes but its gradients (restored after warm-up and capture;
        a step zeroes the gradients first)."""
        tensors = [p for p in self.model.parameters()] + [b for b in self.model.buffers()]
        return tensors + [self.sums] + [t for pair in self.recorder.buffers.values() for t in pair]

    def _prepare_fast_path(self, compile_: bool, capture: bool) -> None:
        """Compile (each batch shape) and capture now, before the timed run; both leave no trace
        (:func:`bnviz.fastpath.preserved`). On a failure the run goes on eagerly with a note and
        the numbers of an eager run; a genuine error of the step then raises at the first eager
        step."""
        if not (compile_ or capture):
            return
        try:
            if compile_:
                self.forward_fn, self.compiled = fastpath.compile_fn(self._forward), True
            if capture:
                self.captured = fastpath.CapturedStep(self.step, self._state, self.device)
            self._prepare_sizes(self._batch_sizes(self.config.batch_size))
            if capture:
                self._capture_eval()
        except Exception as err:
            self._fast_path_failed(err, mid_run=False)

    def _prepare_sizes(self, sizes: list[int]) -> None:
        """Capture (or, compiled only, compile) the step for batch sizes not prepared yet."""
        sample = torch.arange(max(sizes), device=self.device)
        if self.captured is not None:
            self.captured.capture(sizes, sample)
        elif self.compiled:
            for bs in sorted(set(sizes) - self._warmed, reverse=True):
                with fastpath.preserved(self._state, self.device):
                    self.step(sample[:bs])
                self._warmed.add(bs)

    def _capture_eval(self) -> None:
        if isinstance(self.evaluator, fastpath.CapturedEval):
            self.evaluator.release()
        self.evaluator = self._evaluate
        forward = functools.partial(_predict, self.model, self.channels_last)
        self.evaluator = fastpath.CapturedEval(self.model, self.data.test_x, self.data.test_y, forward)
        self.captured.info["eval_captures"] += 1

    def _fast_path_failed(self, err: Exception, mid_run: bool) -> None:
        """Go on eagerly with a note (warm-up and capture restored the state themselves)."""
        self._release_fast_path()
        self.captured, self.forward_fn, self.compiled = None, self._forward, False
        self._record_always = False
        for p in self.model.parameters():
            p.grad = None
        reason = f"{type(err).__name__}: " + (str(err).strip().splitlines() or [""])[0][:300]
        at = f" at step {self.step_count + 1}" if mid_run else ""
        self.history.message = _join(self.history.message, f"The fast path failed{at} ({reason}); "
                                     f"{'from then on ' if mid_run else ''}the run continues eagerly.")

    def _release_fast_path(self) -> None:
        """Free the CUDA graphs and their memory pools now (the end of fit(), or a fallback):
        the graphs' references to this trainer are cycles that kept them until the cyclic
        garbage collector ran."""
        if self.captured is not None:
            self.captured.release()
        evaluator = getattr(self, "evaluator", None)
        if isinstance(evaluator, fastpath.CapturedEval):
            evaluator.release()
            self.evaluator = self._evaluate

    def _mid_run(self, fn) -> None:
        try:
            fn()
        except Exception as err:
            self._fast_path_failed(err, mid_run=True)

    # ------------------------------------------------------------------ live changes
    def set_hyperparameter(self, name: str, value) -> None:
        """Apply one live change now (see :meth:`set_hyperparameters`)."""
        self.set_hyperparameters({name: value})

    def set_hyperparameters(self, changes: dict) -> None:
        """Apply live changes now (:class:`~bnviz.callbacks.LiveUpdates` passes every pending
        one). All are checked first (ValueError before anything changes). lr: a ``fill_`` of the
        device tensor the graphs read. batch_size: its graphs (or compiled shapes) are made.
        bn_momentum/eps: set on the layers, then the graphs are re-captured once for all."""
        for name, value in changes.items():
            check(name, value)
            if name == "batch_size":
                self.check_batch_size(value)
        for name, value in changes.items():
            if name == "batch_size":
                if self.captured is not None or self.compiled:
                    self._mid_run(functools.partial(self._prepare_sizes, self._batch_sizes(value)))
            elif name == "lr":
                for g in self.opt.param_groups:
                    if isinstance(g["lr"], torch.Tensor):
                        g["lr"].fill_(value)  # read by the captured graph at its next replay
                    else:
                        g["lr"] = value
            else:
                attr = "momentum" if name == "bn_momentum" else "eps"
                for m in self.norms.values():
                    if hasattr(m, attr) and not (attr == "momentum" and self.config.model.norm == "d2l"):
                        setattr(m, attr, value)
        if {"bn_momentum", "eps"} & set(changes):
            self._after_norm_change()

    def _after_norm_change(self) -> None:
        """BN momentum/eps are baked into the compiled forward and the graphs. Compiled: the
        eager forward runs from the next step (a recompile takes seconds; the target for a live
        change is 0.2 s), noted in the History. Captured: every graph is re-captured once, or
        the step goes eager if the new value cannot be captured."""
        at = self.step_count + 1
        if self.compiled:
            self.forward_fn, self.compiled = self._forward, False
            self._record_always = self.captured is not None
            self.history.message = _join(self.history.message, f"From step {at} the forward runs uncompiled "
                                         "(a live BN momentum/eps change; recompiling would take seconds).")
        if self.captured is None:
            return
        why = fastpath.capture_unavailable(self.model, self.device)
        if why:
            self._release_fast_path()
            self.captured, self._record_always = None, False
            self.history.message = _join(self.history.message, f"From step {at} the step runs eagerly: {why}.")
            return
        sample = torch.arange(max(self.captured.info["batch_sizes"]), device=self.device)
        self._mid_run(lambda: (self.captured.invalidate(sample), self._capture_eval()))

    def current_config(self) -> Config:
        """The config with the live values now in use."""
        v = self.live.values
        return self.config.replace(lr=v["lr"], bn_momentum=v["bn_momentum"], eps=v["eps"],
                                   batch_size=v["batch_size"])

    # ------------------------------------------------------------------ snapshots
    def _snapshot(self, kind: str) -> Snapshot:
        """Read the device sums (and, at an epoch end, the test accuracy) in one host copy."""
        t_eval = time.perf_counter()
        parts = [self.sums]
        if kind == "epoch":
            parts.append(self.evaluator().reshape(1))
        layers = {}
        for name, m in self.norms.items():
            st = layer_state(m)
            st["batch_mean"], st["batch_var"] = self.recorder.buffers.get(name, (None, None))
            layers[name] = st
            parts.extend(t.float().reshape(-1) for t in st.values() if t is not None)
        flat = torch.cat([t.float().reshape(-1) for t in parts]).tolist()  # the one host copy
        now = time.perf_counter()
        loss_sum, correct, n = flat[3:6] if kind == "epoch" else flat[0:3]
        pos = 7 if kind == "epoch" else 6
        test_acc = flat[6] if kind == "epoch" else None
        stats = {}
        for name, st in layers.items():
            vals = {}
            for key, t in st.items():
                k = t.numel() if t is not None else 0
                vals[key], pos = flat[pos:pos + k], pos + k
            stats[name] = LayerStats(**vals)
        if kind == "step":
            self.sums[:3].zero_()
            self._since_snapshot = 0
            rate = self.clock.lap(self.examples, now)
        else:
            self.sums[3:].zero_()
            rate = self.history.snapshots[-1].examples_per_s if self.history.snapshots else 0.0
            self.clock.exclude(time.perf_counter() - t_eval)  # evaluation is not training time
        v = self.live.values
        s = Snapshot(kind=kind, step=self.step_count, epoch=self.epoch, examples=self.examples,
                     time_s=now - self.clock.t0, loss=loss_sum / max(n, 1), train_acc=correct / max(n, 1),
                     test_acc=test_acc, examples_per_s=rate, lr=v["lr"], bn_momentum=v["bn_momentum"],
                     eps=v["eps"], batch_size=v["batch_size"], layers=stats)
        self.history.snapshots.append(s)
        self.history.train_time_s = self.clock.train_time
        self._call("on_snapshot", s)
        return s

    def _call(self, event: str, *args) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, event, None)
            if fn is None:
                continue
            if event != "on_fit_end":
                fn(self, *args)
                continue
            try:  # every callback gets its end, and none may hide the run's own error
                fn(self, *args)
            except Exception as err:
                warnings.warn(f"{type(cb).__name__}.on_fit_end failed: {type(err).__name__}: {err}")


def _predict(model: nn.Module, channels_last: bool, x: torch.Tensor) -> torch.Tensor:
    """Logits of ``model`` for uint8 images ``x`` (the captured evaluation's forward)."""
    x = to_float(x)
    return model(x.contiguous(memory_format=torch.channels_last) if channels_last else x)


def _join(*texts: str) -> str:
    return " ".join(t.strip() for t in texts if t and t.strip())


def train(config: Config | None = None, data: Dataset | None = None, progress: bool = True,
          callbacks=(), **changes) -> History:
    """Train one run in this thread and return its History: ``train(Config(...))`` or
    ``train(lr=0.5, epochs=2)`` (fields of :class:`Config`). Raises on errors (a bad value, a
    missing data set, batch size 1 with BN); a diverged run returns with status 'diverged'."""
    return Trainer(Config.make(config, **changes), data=data, progress=progress, callbacks=callbacks).fit()
