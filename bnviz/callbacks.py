"""Small callbacks around :meth:`bnviz.train.Trainer.fit`: everything that is not the step.

A callback is any object with some of these methods (each gets the trainer; missing ones are
skipped). The trainer calls them in list order::

    on_fit_start(trainer)              after the model and data are ready (before compile/capture)
    before_epoch(trainer)              a new epoch is about to start (trainer.epoch is set)
    before_step(trainer)               before every step: keep it cheap (no host sync)
    on_snapshot(trainer, snapshot)     after each snapshot was added to trainer.history
    on_fit_end(trainer)                always, also after an error or a CancelFit

To end a run early a callback raises :class:`CancelFit` with the final status ('stopped' or
'diverged') and a message; the trainer records both in the History.

Here: the calling rule (:func:`dispatch`), stopping from another thread (:class:`StopSignal`),
divergence detection with its explanation (:class:`Divergence`, :func:`diagnose`,
:func:`at_chance_note`), the per-layer input statistics (:func:`input_stats_hook`, the grid's
too) written inside the step (:class:`BatchStatsRecorder`), a tqdm progress bar
(:class:`Progress`) and a probe that calls a function on every snapshot (:class:`Probe`).
Live hyperparameters are not a callback: the trainer applies them at the top of a step
(:meth:`bnviz.train.Trainer.apply_live`).
"""
from __future__ import annotations

import math
import threading
import warnings
from typing import Callable

import torch

from .config import BATCH_ONE

__all__ = ["CancelFit", "StopSignal", "Divergence", "BatchStatsRecorder", "input_stats_hook",
           "Progress", "Probe", "SnapshotFunction", "diagnose", "at_chance_note", "dispatch", "BATCH_ONE"]


def dispatch(callbacks, event: str, trainer, *args) -> None:
    """Call ``event`` on every callback that has it, in list order. ``on_fit_end`` reaches every
    callback, and an error in one is a warning: none may hide the run's own error."""
    for cb in callbacks:
        fn = getattr(cb, event, None)
        if fn is None:
            continue
        if event != "on_fit_end":
            fn(trainer, *args)
            continue
        try:
            fn(trainer, *args)
        except Exception as err:
            warnings.warn(f"{type(cb).__name__}.on_fit_end failed: {type(err).__name__}: {err}")


class CancelFit(Exception):
    """Raised by a callback to end a run: ``status`` is 'stopped' or 'diverged'."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# ----------------------------------------------------------------------------- stop


class StopSignal:
    """``stop()`` (from any thread) ends the run before its next step."""

    def __init__(self):
        self.event = threading.Event()

    def stop(self) -> None:
        self.event.set()

    def before_step(self, trainer) -> None:
        if self.event.is_set():
            raise CancelFit("stopped", f"Stopped by the user at step {trainer.step_count} "
                                       f"(epoch {trainer.epoch}).")

    before_epoch = before_step


# ----------------------------------------------------------------------------- divergence


def diagnose(start: str, config, stuck: bool = False) -> str:
    """``start`` plus the likely causes of a run that diverged (``stuck=False``) or finished at
    chance (``stuck=True``), from its settings (a :class:`~bnviz.config.Config`)."""
    m, causes = config.model, []
    if stuck and m.activation == "sigmoid" and not m.uses_norm:
        init = ("PyTorch's default init (init='pytorch') starts it with tiny signals: try init='d2l' "
                "(xavier, as d2l's train_ch6), " if config.init == "pytorch" else "")
        causes.append("a sigmoid network without normalisation can sit on the loss plateau at "
                      f"ln(10) = 2.303 for a while: {init}train longer, use a larger batch, or add "
                      "batch norm")
    elif stuck and config.init == "pytorch":
        causes.append("PyTorch's default init (init='pytorch') gives small starting signals; "
                      "try init='d2l' (xavier, as d2l's train_ch6)")
    if stuck and config.lr < 0.05:
        causes.append(f"the learning rate {config.lr:g} may be too small to leave the plateau")
    elif config.lr >= 1 and not m.is_batch_norm:
        causes.append(f"the learning rate {config.lr:g} is high for a network without batch norm "
                      "(try 0.1 to 0.9)")
    elif config.lr > 10:
        causes.append(f"the learning rate {config.lr:g} is very high even with batch norm (try 0.1 to 1)")
    elif not stuck:
        causes.append("the learning rate is too high for this model (try a value 3 to 10 times smaller)")
    if m.is_batch_norm and config.eps < 1e-6:
        causes.append(f"eps={config.eps:g} is tiny: a channel with almost no variance gets divided "
                      "by ~sqrt(eps)")
    if m.is_batch_norm and config.batch_size < 8:
        causes.append(f"batch size {config.batch_size} gives very noisy batch statistics")
    if m.activation == "relu" and not m.uses_norm:
        causes.append("ReLU without normalisation lets activations grow layer by layer")
    if stuck and (config.dataset or "").startswith("synth"):
        causes.append("(the SYNTHETIC stand-in data set is used, not Fashion-MNIST)")
    return start + " Likely causes: " + "; ".join(causes) + "."


class Divergence:
    """Ends the run as 'diverged' when a snapshot's loss is not finite or exceeds
    ``factor`` × max(first snapshot's loss, ln(classes)); the message lists likely causes."""

    def __init__(self, factor: float, num_classes: int = 10):
        self.factor = factor
        self.ref = math.log(num_classes)
        self.seen = 0

    def on_snapshot(self, trainer, s) -> None:
        why = self.reason(s)
        if why:
            raise self.stop(why, trainer.current_config())

    def reason(self, s) -> str | None:
        """Why snapshot ``s`` (of a run seen snapshot by snapshot) diverged; None: it did not."""
        why = None
        if not math.isfinite(s.loss):
            why = f"The loss became {s.loss} at step {s.step}."
        elif s.loss > self.factor * self.ref:
            why = (f"The loss rose to {s.loss:.3g} at step {s.step}, more than "
                   f"{self.factor:g}× its starting level {self.ref:.3g}.")
        if s.kind == "step" and self.seen == 0 and math.isfinite(s.loss):
            self.ref = max(self.ref, s.loss)
        self.seen += 1
        return why

    @staticmethod
    def stop(why: str, config) -> CancelFit:
        """The CancelFit that ends a diverged run with ``config`` (the values in use)."""
        return CancelFit("diverged", diagnose(why + " The run was stopped.", config))


def at_chance_note(history, config, steps: int) -> str:
    """The note for a run that finished (``steps`` steps, at least 50) with a training accuracy
    about chance, with its likely causes; '' otherwise."""
    acc = history.final_train_acc
    if acc is None or acc >= 0.15 or steps < 50:
        return ""
    return diagnose(f"Training finished but the training accuracy is {acc:.3f}, about chance (0.1): "
                    "the network did not learn.", config, stuck=True)


# ----------------------------------------------------------------------------- layer statistics


def input_stats_hook(write: Callable[[torch.Tensor, torch.Tensor], None], enabled: Callable[[], bool] = lambda: True):
    """A forward pre-hook for a norm layer: in training mode (and while ``enabled()``), the
    per-channel mean and biased variance of the layer's input are passed to ``write(mean, var)``.
    Cost: one ``var_mean``. The Trainer writes them into static buffers (:class:`BatchStatsRecorder`);
    the vmapped grid returns them from its step."""
    def hook(module, inputs):
        if module.training and enabled():
            x = inputs[0].detach()
            var, mean = torch.var_mean(x.float(), dim=[0] + list(range(2, x.dim())), correction=0)
            write(mean, var)
    return hook


class BatchStatsRecorder:
    """The input statistics of each norm layer (:func:`input_stats_hook`), written into static
    device buffers during training steps, so a snapshot reads the last training batch's
    statistics without an extra forward.

    ``enabled``: the trainer sets it before each step. An eager step records only when a
    snapshot follows it (the last step of an epoch, or a ``snapshot_every`` step); a compiled or
    captured step always records (a per-step switch would be baked into the graph). After a stop
    in the middle of an epoch the snapshot shows the last recorded batch."""

    def __init__(self):
        self.buffers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.handles = []
        self.enabled = True

    def on_fit_start(self, trainer) -> None:
        from .stats import num_channels

        for name, m in trainer.norms.items():
            mean_buf, var_buf = (torch.zeros(num_channels(m), device=trainer.device) for _ in range(2))
            self.buffers[name] = (mean_buf, var_buf)
            write = lambda mean, var, mb=mean_buf, vb=var_buf: (mb.copy_(mean), vb.copy_(var))  # noqa: E731
            self.handles.append(m.register_forward_pre_hook(input_stats_hook(write, lambda: self.enabled)))

    def stats(self, name: str) -> dict[str, torch.Tensor | None]:
        """The recorded ``batch_mean`` and ``batch_var`` of layer ``name``."""
        mean, var = self.buffers.get(name, (None, None))
        return {"batch_mean": mean, "batch_var": var}

    def on_fit_end(self, trainer) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


# ----------------------------------------------------------------------------- progress, probes


class Progress:
    """A tqdm bar over the epochs (over snapshots when the run has no epoch limit)."""

    def __init__(self):
        self.bar = None

    def on_fit_start(self, trainer) -> None:
        from tqdm.auto import tqdm

        total = trainer.config.epochs
        self.bar = tqdm(total=total, desc=trainer.config.label or trainer.config.model.label(),
                        unit="epoch", leave=True)

    def on_snapshot(self, trainer, s) -> None:
        if s.kind == "epoch" and self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{s.loss:.3f}", train=f"{s.train_acc:.3f}",
                                 test=f"{s.test_acc:.3f}")

    def on_fit_end(self, trainer) -> None:
        if self.bar is not None:
            self.bar.close()


class Probe:
    """Calls ``probe(model, snapshot) -> dict`` on every snapshot whose kind is in ``kinds``
    and collects the rows (with step, epoch and the snapshot's metrics) in ``self.rows``."""

    def __init__(self, probe: Callable, kinds=("step", "epoch")):
        self.probe, self.kinds, self.rows = probe, kinds, []

    def on_snapshot(self, trainer, s) -> None:
        if s.kind in self.kinds:
            row = {"step": s.step, "epoch": s.epoch, "kind": s.kind, "loss": s.loss}
            row.update(self.probe(trainer.model, s))
            self.rows.append(row)


class SnapshotFunction:
    """Wraps a plain ``fn(history, snapshot)`` (the old ``on_snapshot=`` argument). An exception
    in it is reported once as a warning and does not stop training (a view's bug must not kill
    the run)."""

    def __init__(self, fn: Callable):
        self.fn, self.warned = fn, False

    def on_snapshot(self, trainer, s) -> None:
        try:
            self.fn(trainer.history, s)
        except Exception as err:
            if not self.warned:
                self.warned = True
                warnings.warn(f"on_snapshot callback failed: {type(err).__name__}: {err}")
