"""The interactive lab: sliders that retrain a real LeNet live, with curves and per-channel BN stats.

This is the only module that imports ipywidgets and plotly's FigureWidget. It is a *view*: it
builds a :class:`bnviz.train.Config` from the controls, runs a :class:`bnviz.train.Trainer` in a
background thread (``Trainer.start()``; threads are named ``bnviz-run-<id>``) and draws the
:class:`bnviz.train.History` that the trainer fills. It never reaches into the trainer's model.

Conventions
-----------
* Live controls: learning rate, BN momentum (or "cumulative" = ``momentum=None``) and eps are
  sent to ``trainer.live.set(...)`` and take effect at the next step; batch size at the next
  epoch. Model, data set, epochs, device, seed and train-set size apply to the next Run.
* One run at a time: Run while a run is going stops it, joins its thread and then starts the
  new run (a lock makes this safe even if Run is called from several threads).
* Drawing: the figures are created once, with their data and layout passed to the constructor
  (Voilà drops changes made before the page connects). A figure whose browser model stops
  answering updates (anywidget drops all messages to a model whose 5 MB plotly module took over
  2 s to load: frequent in Voilà on a busy machine) is rebuilt from its current data after
  ``revive_after`` seconds (see :class:`_LiveFigure`), at most ``MAX_REVIVALS`` times per lab. Each draw is one ``batch_update`` per
  figure with numpy arrays. Draws are throttled: at most ``1 / min_interval`` per second
  (10/s), and never more than ``max_draw_share`` (5 %) of the wall time, measured.
* Errors never escape as bare tracebacks: a bad value or an exception in a widget callback is
  shown in the message box (and its traceback in the log below the lab).

Programmatic use (tests, headless notebooks)::

    lab = Lab(dataset="synthetic", train_size=512, epochs=1)
    lab.run_clicked(); lab.wait()
    lab.histories[-1].status, lab.status_text, lab.fig_curves.data[...]
"""
from __future__ import annotations

import html
import math
import os
import threading
import time
import traceback
from pathlib import Path

import ipywidgets as W
import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .data import DATASET_NAMES, resolve_device
from .models import NORM_LAYER_NAMES, preset
from .train import Config, History, Trainer, load_histories, save_histories

__all__ = ["Lab", "show_lab", "default_settings", "BATCH_SIZES", "NORM_CHOICES"]

BATCH_SIZES = tuple(2 ** i for i in range(11))  # 1 .. 1024
NORM_CHOICES = (("no normalisation", "none"), ("BN from scratch (bnviz)", "scratch"),
                ("nn.BatchNorm (PyTorch)", "torch"), ("LayerNorm", "layer"), ("GroupNorm", "group"))
TRAIN_SIZES = ((" 1,000", 1000), (" 2,000", 2000), (" 5,000", 5000), ("10,000", 10000),
               ("20,000", 20000), ("all (60,000)", None))
CURVES_WIDTH, PANEL_WIDTH = 1060, 525  # px: plotly widgets do not resize to their cell by themselves
EARLIER_SLOTS = 5  # earlier runs drawn faded behind the current one
MAX_REVIVALS = 6  # figure rebuilds per lab before it gives up and asks for a page reload
POINTS_PER_EPOCH = 25  # step snapshots per epoch the lab asks the trainer for
CURRENT_COLOR = "#1f5fbf"
EARLIER_COLORS = ("#e07b39", "#3a9d5d", "#9467bd", "#c44e52", "#8c8c8c")
STATE_COLORS = {"idle": "#6b7280", "pending": "#6b7280", "running": "#15803d", "stopping": "#b45309",
                "finished": "#1d4ed8", "stopped": "#b45309", "diverged": "#b91c1c", "error": "#b91c1c"}
SETTINGS = ("norm", "pool", "activation", "batch_size", "lr", "bn_momentum", "eps", "epochs",
            "dataset", "device", "seed", "train_size", "test_size")


def default_settings() -> dict:
    """The lab's defaults: d2l's LeNet-BN (nn.BatchNorm, avg pool, sigmoid, batch 256, lr 1.0,
    momentum 0.1, eps 1e-5). On a GPU the full d2l run (60k examples, 10 epochs); on a CPU a
    short one (10,000 examples, 3 epochs) that finishes in well under a minute."""
    gpu = resolve_device("auto").type == "cuda"
    return dict(norm="torch", pool="avg", activation="sigmoid", batch_size=256, lr=1.0,
                bn_momentum=0.1, eps=1e-5, epochs=10 if gpu else 3,
                dataset=os.environ.get("BNVIZ_DATASET", "auto").lower() or "auto",
                device="auto", seed=0, train_size=None if gpu else 10000, test_size=None)


def _devices() -> list[str]:
    devs = ["auto", "cpu"]
    if resolve_device("auto").type == "cuda":
        devs.append("cuda")
    if resolve_device("auto").type == "mps":
        devs.append("mps")
    return devs


def _fmt(v) -> str:
    if v is None:
        return "cumulative"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


RANGES = {"lr": (1e-3, 100.0), "eps": (1e-8, 1.0), "bn_momentum": (0.0, 1.0), "epochs": (1, 30)}


def _check_settings(s: dict) -> None:
    """Check that every setting fits its control; raise ValueError naming the valid values."""
    for name, (lo, hi) in RANGES.items():
        v = s[name]
        if name == "bn_momentum" and v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise ValueError(f"{name}={v!r} is outside the lab's range [{lo:g}, {hi:g}]"
                             + (" (or None = cumulative average)" if name == "bn_momentum" else ""))
    if s["batch_size"] not in BATCH_SIZES:
        raise ValueError(f"batch_size={s['batch_size']!r}: the lab offers powers of two {BATCH_SIZES}")
    choices = {"norm": [v for _, v in NORM_CHOICES], "pool": ["avg", "max"], "activation": ["sigmoid", "relu"],
               "dataset": list(DATASET_NAMES), "device": _devices()}
    for name, valid in choices.items():
        if s[name] not in valid:
            what = "data set" if name == "dataset" else name
            raise ValueError(f"{what}={s[name]!r} is not offered by the lab; valid: {', '.join(valid)}")
    if s["train_size"] is not None and (not isinstance(s["train_size"], int) or s["train_size"] < 1):
        raise ValueError(f"train_size={s['train_size']!r}: give a positive number of examples or None (all)")
    if not isinstance(s["seed"], int) or s["seed"] < 0:
        raise ValueError(f"seed={s['seed']!r}: give a non-negative integer")


class _LiveFigure(go.FigureWidget):
    """A FigureWidget that another thread may update, and that knows whether its page still listens.

    1. ipywidgets applies a state update from the browser (plotly's views send one back after
       every redraw) under ``hold_trait_notifications``: a trait that another thread sets in that
       window is sent afterwards with its *current* value. Plotly's update messages are one-shot
       (``_py2js_update`` is set, then reset to None), so such an update would be lost and the
       chart would stop changing. A lock held by ``set_state`` and by :meth:`Lab.draw` keeps the
       two apart.
    2. A browser model can be dead for good while its chart is on screen: anywidget (0.11) gives
       each model 2 s to import its ES module (plotly's is ~5 MB, imported once per figure) and
       otherwise drops *every* later message to that model, silently. Voilà creates all models at
       once when the page connects, so on a loaded machine one or two of the three figures froze
       in ~half the sessions. Every plotly view answers each update with ``_js2py_traceDeltas``
       carrying the update's ``trace_edit_id``; :meth:`stale` says when a view has shown itself
       (it sent deltas), has never answered any later update, and an update stayed unanswered for
       ``timeout`` seconds. The lab then replaces the figure by a fresh widget built from the
       current data (:meth:`Lab._revive`). A model that answered once received messages, so it
       is never suspected again (a hidden tab or a slow page cannot cause needless rebuilds).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._sync_lock = threading.RLock()
        self._view_seen = False  # some browser view rendered this figure (it sent deltas)
        self._acked = -1  # highest trace_edit_id a view has answered
        self._first_ack = None  # the edit id the first view rendered with
        self._answered = False  # a view answered an update sent after it rendered: the model listens
        self._pending_since = None  # monotonic time of the oldest unanswered update

    def set_state(self, sync_data):
        with self._sync_lock:
            deltas = sync_data.get("_js2py_traceDeltas")
            if isinstance(deltas, dict) and isinstance(deltas.get("trace_edit_id"), int):
                self._view_seen = True
                if self._first_ack is None:
                    self._first_ack = deltas["trace_edit_id"]
                elif deltas["trace_edit_id"] > self._first_ack:
                    self._answered = True
                if deltas["trace_edit_id"] > self._acked:
                    self._acked = deltas["trace_edit_id"]
                    # an answer is progress: restart the clock if more updates are outstanding
                    self._pending_since = None if self._acked >= self._last_trace_edit_id else time.monotonic()
            super().set_state(sync_data)

    def sent(self) -> None:
        """Note that an update may just have been sent (call after ``batch_update``)."""
        with self._sync_lock:
            if self._last_trace_edit_id > self._acked and self._pending_since is None:
                self._pending_since = time.monotonic()

    def stale(self, timeout: float) -> bool:
        """True if a view has shown itself, never answered an update since, and the oldest
        unanswered update is older than ``timeout`` s."""
        with self._sync_lock:
            return self.waiting() and time.monotonic() - self._pending_since > timeout

    def waiting(self) -> bool:
        """A view has shown itself, has not answered yet, and an update is outstanding."""
        with self._sync_lock:
            return self._view_seen and not self._answered and self._pending_since is not None


class _LabTrainer(Trainer):
    """A Trainer that calls ``on_end(history)`` in its own thread when the run is over."""

    def __init__(self, *args, on_end=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.on_end = on_end

    def run(self) -> History:
        try:
            return super().run()
        finally:
            if self.on_end is not None:
                self.on_end(self.history)


class Lab:
    """The batch normalization lab. ``Lab(**settings)`` builds the controls and figures;
    display ``lab`` (or ``lab.widget``) in a notebook. Settings (see :func:`default_settings`):
    norm, pool, activation, batch_size, lr, bn_momentum (None = cumulative), eps, epochs,
    dataset, device, seed, train_size (None = all), test_size (None = all)."""

    def __init__(self, min_interval: float = 0.1, max_draw_share: float = 0.05, revive_after: float = 8.0,
                 **settings):
        unknown = set(settings) - set(SETTINGS)
        if unknown:
            raise ValueError(f"unknown lab setting(s) {sorted(unknown)}; valid: {', '.join(SETTINGS)}")
        s = {**default_settings(), **settings}
        _check_settings(s)
        self.settings = s
        self.test_size = s["test_size"]
        self.min_interval = min_interval
        self.max_draw_share = max_draw_share
        self.revive_after = revive_after  # s without an answer before a figure is rebuilt
        self.revivals = 0  # figures rebuilt because their browser model stopped listening
        self._check_timer = None
        self.histories: list[History] = []
        self.trainer: _LabTrainer | None = None
        self._run_lock = threading.Lock()
        self._draw_lock = threading.RLock()
        self._next_draw = 0.0
        self._drawn = {}  # what each figure part last showed, to skip unchanged parts
        self.draw_count = 0
        self.draw_time_s = 0.0
        self._state_override = None  # 'stopping' between Stop and the end of the run
        self._build_controls(s)
        self._build_figures()
        self._build_layout()
        self._set_status()
        try:  # the settings must make a valid run; say so now rather than at Run
            self.config()
        except ValueError as err:
            raise ValueError(f"invalid lab settings: {err}") from None

    # ------------------------------------------------------------------ controls
    def _build_controls(self, s: dict) -> None:
        wide = W.Layout(width="330px")
        style = {"description_width": "118px"}
        kw = dict(layout=wide, style=style)
        self.w_lr = W.FloatLogSlider(value=s["lr"], base=10, min=-3, max=2, step=0.05,
                                     description="learning rate", readout_format=".3g",
                                     continuous_update=False, **kw)
        mom = s["bn_momentum"]
        self.w_momentum = W.FloatSlider(value=0.1 if mom is None else mom, min=0.0, max=1.0, step=0.01,
                                        description="BN momentum", readout_format=".2f",
                                        continuous_update=False, disabled=mom is None, **kw)
        self.w_cumulative = W.Checkbox(value=mom is None, description="cumulative average (momentum=None)",
                                       indent=False, layout=W.Layout(width="330px", margin="0 0 0 122px"))
        self.w_eps = W.FloatLogSlider(value=s["eps"], base=10, min=-8, max=0, step=0.25,
                                      description="BN eps", readout_format=".1e",
                                      continuous_update=False, **kw)
        self.w_batch = W.SelectionSlider(options=list(BATCH_SIZES), value=s["batch_size"],
                                         description="batch size", continuous_update=False, **kw)
        self.w_norm = W.Dropdown(options=list(NORM_CHOICES), value=s["norm"], description="normalisation", **kw)
        self.w_pool = W.ToggleButtons(options=[("avg", "avg"), ("max", "max")], value=s["pool"],
                                      description="pooling", style={**style, "button_width": "90px"},
                                      layout=wide)
        self.w_act = W.ToggleButtons(options=["sigmoid", "relu"], value=s["activation"],
                                     description="activation", style={**style, "button_width": "90px"},
                                     layout=wide)
        self.w_epochs = W.IntSlider(value=s["epochs"], min=1, max=30, description="epochs",
                                    continuous_update=False, **kw)
        self.w_dataset = W.Dropdown(options=list(DATASET_NAMES), value=s["dataset"], description="data set", **kw)
        self.w_device = W.Dropdown(options=_devices(), value=s["device"], description="device", **kw)
        self.w_seed = W.BoundedIntText(value=s["seed"], min=0, max=2 ** 31 - 1, description="seed", **kw)
        sizes = list(TRAIN_SIZES)
        if s["train_size"] not in [v for _, v in sizes]:
            sizes.insert(0, (f"{s['train_size']:,}", s["train_size"]))
        self.w_train_size = W.Dropdown(options=sizes, value=s["train_size"], description="train examples", **kw)
        self.w_layer = W.Dropdown(options=list(NORM_LAYER_NAMES), value="fc1", description="show layer",
                                  style={"description_width": "80px"}, layout=W.Layout(width="220px"))

        self.b_run = W.Button(description="Run", icon="play", button_style="success", tooltip="train a new run "
                              "with these settings (stops the current run first)", layout=W.Layout(width="110px"))
        self.b_stop = W.Button(description="Stop", icon="stop", button_style="warning",
                               tooltip="stop the current run at the next step", layout=W.Layout(width="110px"))
        self.b_clear = W.Button(description="Clear history", icon="trash", tooltip="forget earlier runs",
                                layout=W.Layout(width="130px"))
        self.w_path = W.Text(value="bnviz_runs.json", description="file", style={"description_width": "40px"},
                             layout=W.Layout(width="260px"))
        self.b_save = W.Button(description="Save runs", icon="save", layout=W.Layout(width="110px"))
        self.b_load = W.Button(description="Load runs", icon="folder-open", layout=W.Layout(width="110px"))

        self.b_run.on_click(self._guard(self.run_clicked))
        self.b_stop.on_click(self._guard(self.stop_clicked))
        self.b_clear.on_click(self._guard(self.clear_clicked))
        self.b_save.on_click(self._guard(self.save_clicked))
        self.b_load.on_click(self._guard(self.load_clicked))
        self.w_lr.observe(self._guard(lambda c: self._live_change("lr", c["new"])), "value")
        self.w_eps.observe(self._guard(lambda c: self._live_change("eps", c["new"])), "value")
        self.w_momentum.observe(self._guard(self._momentum_changed), "value")
        self.w_cumulative.observe(self._guard(self._cumulative_changed), "value")
        self.w_batch.observe(self._guard(lambda c: self._live_change("batch_size", c["new"])), "value")
        for w in (self.w_norm, self.w_pool, self.w_act, self.w_epochs, self.w_dataset, self.w_device,
                  self.w_seed, self.w_train_size):
            w.observe(self._guard(self._next_run_change), "value")
        self.w_layer.observe(self._guard(lambda c: self.draw(force=True)), "value")

    def _guard(self, fn):
        """Wrap a widget callback: an exception is shown in the lab, never lost silently."""
        def wrapped(*args):
            try:
                return fn(*args)
            except Exception as err:  # noqa: BLE001 - every error must reach the learner
                self._report_exception(err)
        return wrapped

    def _report_exception(self, err: Exception) -> None:
        self.say(f"Something went wrong in the lab: {type(err).__name__}: {err} "
                 "(the traceback is in the log below; the lab keeps working)", "error")
        try:
            self.log.append_stderr("".join(traceback.format_exception(type(err), err, err.__traceback__)))
        except Exception:  # noqa: BLE001
            pass

    # ------------------------------------------------------------------ config
    def momentum_value(self) -> float | None:
        return None if self.w_cumulative.value else float(self.w_momentum.value)

    def config(self) -> Config:
        """The Config the controls describe (raises ValueError with a clear message if invalid)."""
        spec = preset("lenet-bn").replace(norm=self.w_norm.value, pool=self.w_pool.value,
                                          activation=self.w_act.value)
        n = self.w_train_size.value or 60000
        steps = math.ceil(n / self.w_batch.value)
        return Config(model=spec, dataset=self.w_dataset.value, train_size=self.w_train_size.value,
                      test_size=self.test_size, batch_size=int(self.w_batch.value), lr=float(self.w_lr.value),
                      bn_momentum=self.momentum_value(), eps=float(self.w_eps.value),
                      epochs=int(self.w_epochs.value), seed=int(self.w_seed.value), device=self.w_device.value,
                      snapshot_every=max(1, steps // POINTS_PER_EPOCH))

    # ------------------------------------------------------------------ actions
    @property
    def running(self) -> bool:
        return self.trainer is not None and self.trainer.running

    def run_clicked(self, _button=None) -> History | None:
        """Start a new run with the current settings (stopping the current run first).
        Returns the new run's History, or None if the settings are invalid."""
        with self._run_lock:
            try:
                cfg = self.config()
            except ValueError as err:
                self.say(f"Cannot start: {err}", "error")
                return None
            if self.running:
                old = self.trainer
                old.stop()
                old.join(timeout=120)
                if old.running:
                    self.say("The current run did not stop within 120 s; not starting a second one. "
                             "Try Run again in a moment.", "error")
                    return None
            try:
                trainer = _LabTrainer(cfg, on_snapshot=self._on_snapshot, on_end=self._on_end)
            except ValueError as err:  # e.g. device 'cuda' without a GPU
                self.say(f"Cannot start: {err}", "error")
                return None
            self._state_override = None
            self.trainer = trainer
            self.histories.append(trainer.history)
            note = ""
            if cfg.batch_size == 1 and cfg.model.is_batch_norm:
                note = " Batch size 1 with batch norm: watch what happens."
            self.say(f"Run {trainer.history.run_id} started: {cfg.describe()}.{note}", "info")
            self.draw(force=True)
            trainer.start()
            return trainer.history

    def stop_clicked(self, _button=None) -> None:
        """Ask the current run to stop at its next step (returns at once; see :meth:`wait`)."""
        if not self.running:
            self.say("No run is going. Press Run to start one.", "info")
            return
        self._state_override = "stopping"
        self.trainer.stop()
        self._set_status()

    def wait(self, timeout: float | None = None) -> History | None:
        """Block until the current run has ended (for tests and headless notebooks)."""
        if self.trainer is None:
            return None
        return self.trainer.join(timeout)

    def clear_clicked(self, _button=None) -> None:
        """Forget all runs except the one that is going."""
        keep = [self.trainer.history] if self.running else []
        n = len(self.histories) - len(keep)
        self.histories[:] = keep
        if not keep:
            self.trainer = None
        self.say(f"Cleared {n} run(s) from the history.", "info")
        self.draw(force=True)

    def save_clicked(self, _button=None) -> Path | None:
        """Save the finished runs to the JSON file named in the path box."""
        path = Path(self.w_path.value.strip() or "bnviz_runs.json").expanduser()
        runs = [h for h in self.histories if h.status not in ("running", "pending")]
        if not runs:
            self.say("Nothing to save yet: no run has ended.", "warning")
            return None
        try:
            save_histories(runs, path)
        except OSError as err:
            self.say(f"Could not save to {path}: {err}. Enter a writable file path, e.g. bnviz_runs.json.", "error")
            return None
        going = " (the current run is still going: save again when it ends)" if self.running else ""
        self.say(f"Saved {len(runs)} run(s) to {path.resolve()}{going}.", "info")
        return path

    def load_clicked(self, _button=None) -> list[History]:
        """Add the runs saved in the JSON file named in the path box to the history."""
        path = Path(self.w_path.value.strip()).expanduser()
        if not path.is_file():
            self.say(f"No such file: {path}. Enter the path of a file written by Save runs.", "error")
            return []
        try:
            runs = load_histories(path)
        except ValueError as err:
            self.say(str(err), "error")
            return []
        current = [self.trainer.history] if self.running else []
        earlier = [h for h in self.histories if h not in current]
        self.histories[:] = earlier + runs + current
        self.say(f"Loaded {len(runs)} run(s) from {path}.", "info")
        self.draw(force=True)
        return runs

    def _live_change(self, name: str, value) -> None:
        if not self.running:
            return  # applies to the next Run through config()
        self.trainer.live.set(**{name: value})
        when = "from the next epoch" if name == "batch_size" else "from the next step"
        pretty = {"lr": "learning rate", "bn_momentum": "BN momentum", "eps": "BN eps",
                  "batch_size": "batch size"}[name]
        extra = ""
        if name in ("bn_momentum", "eps") and not self.trainer.config.model.is_batch_norm:
            extra = " (this model has no batch norm: " + (
                "momentum has no effect)" if name == "bn_momentum" else "eps only enters Layer/GroupNorm)")
        self.say(f"{pretty} set to {_fmt(value)} {when} of run {self.trainer.history.run_id}{extra}; "
                 "a dashed line marks it on the curves.", "info")

    def _momentum_changed(self, change) -> None:
        if not self.w_cumulative.value:  # while "cumulative" is ticked the slider is inactive
            self._live_change("bn_momentum", float(change["new"]))

    def _cumulative_changed(self, change) -> None:
        self.w_momentum.disabled = bool(change["new"])
        self._live_change("bn_momentum", self.momentum_value())

    def _next_run_change(self, change) -> None:
        if self.running:
            self.say(f"{change['owner'].description} = {change['new']!r} applies to the next Run "
                     "(press Run to restart with it).", "info")

    # ------------------------------------------------------------------ messages and status
    def say(self, text: str, level: str = "info") -> None:
        """Show a message in the lab's message box (level: info, warning, error)."""
        self.message_text, self.message_level = text, level
        colors = {"info": ("#eff6ff", "#1e40af", "#bfdbfe"), "warning": ("#fffbeb", "#92400e", "#fde68a"),
                  "error": ("#fef2f2", "#991b1b", "#fca5a5")}
        bg, fg, border = colors.get(level, colors["info"])
        weight = "600" if level == "error" else "400"
        self.w_message.value = (
            f"<div class='bnviz-message bnviz-{level}' style='background:{bg};color:{fg};border:1px solid {border};"
            f"border-radius:6px;padding:6px 10px;font-size:13px;font-weight:{weight};line-height:1.4'>"
            f"{html.escape(text)}</div>")

    def _status_parts(self) -> tuple[str, list[str]]:
        t = self.trainer
        if t is None:
            return "idle", ["no run yet: choose settings and press Run"]
        h = t.history
        state = self._state_override if (self._state_override and t.running) else h.status
        if state == "pending" and t.running:
            state = "running"
        cfg = h.config
        last = h.snapshots[-1] if h.snapshots else None
        parts = [f"run {h.run_id}"]
        if last is not None:
            parts += [f"epoch {last.epoch}/{cfg.epochs}", f"step {last.step}", f"{last.examples_per_s:,.0f} examples/s"]
            parts.append(f"loss {last.loss:.3f}")
            if h.final_test_acc is not None:
                parts.append(f"test acc {h.final_test_acc:.3f}")
        else:
            parts.append("preparing the data and the model…" if state == "running" else "no steps")
        parts.append(f"device {h.device}")
        parts.append(f"data: {h.dataset_label or cfg.dataset}")
        return state, parts

    def _set_status(self) -> None:
        state, parts = self._status_parts()
        self.status_text = f"{state} · " + " · ".join(parts)
        color = STATE_COLORS.get(state, "#374151")
        body = " · ".join(html.escape(p) for p in parts)
        body = body.replace("SYNTHETIC", "<b style='color:#b91c1c'>SYNTHETIC</b>")
        self.w_status.value = (
            f"<div class='bnviz-status' style='font-size:14px;line-height:1.6'>"
            f"<span class='bnviz-state' style='background:{color};color:white;border-radius:10px;padding:2px 10px;"
            f"font-weight:600;text-transform:uppercase;letter-spacing:0.5px'>{state}</span>&nbsp; {body}</div>")

    # ------------------------------------------------------------------ figures
    def _build_figures(self) -> None:
        self.w_title = W.HTML()
        self.w_status = W.HTML()
        self.w_message = W.HTML()
        self.log = W.Output(layout=W.Layout(max_height="160px", overflow="auto"))
        self.say("Choose settings and press Run. Learning rate, momentum and eps act live during a run; "
                 "batch size from the next epoch; the rest at the next Run.", "info")

        # Training curves: EARLIER_SLOTS faded runs (3 traces each) then the current run (bold).
        fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.07,
                            subplot_titles=("training loss (log scale)", "training accuracy",
                                            "test accuracy (end of each epoch)"))
        self._slots = []
        for k in range(EARLIER_SLOTS + 1):
            current = k == EARLIER_SLOTS
            color = CURRENT_COLOR if current else EARLIER_COLORS[k % len(EARLIER_COLORS)]
            idx = []
            for col, metric in enumerate(("loss", "train_acc", "test_acc"), start=1):
                idx.append(len(fig.data))
                fig.add_trace(go.Scatter(
                    x=[], y=[], mode="lines+markers" if metric == "test_acc" else "lines",
                    name="", legendgroup=f"slot{k}", showlegend=False, visible=True,
                    line=dict(color=color, width=3 if current else 1.5),
                    marker=dict(size=8 if current else 5), opacity=1.0 if current else 0.45,
                    hovertemplate=f"step %{{x}}<br>{metric.replace('_', ' ')} %{{y:.4f}}<extra>%{{fullData.name}}</extra>"),
                    row=1, col=col)
            self._slots.append(idx)
        fig.update_xaxes(title_text="step", rangemode="tozero", matches="x")
        fig.update_yaxes(type="log", row=1, col=1, title_text="loss")
        fig.update_yaxes(range=[0, 1.02], row=1, col=2, title_text="accuracy")
        fig.update_yaxes(range=[0, 1.02], row=1, col=3)
        self._base_annotations = [a.to_plotly_json() for a in fig.layout.annotations]
        self._base_shapes = [dict(type="line", xref=f"x{c} domain", yref=f"y{c}", x0=0, x1=1, y0=0.1, y1=0.1,
                                  line=dict(color="#9ca3af", width=1, dash="dot")) for c in ("2", "3")]
        fig.update_layout(shapes=self._base_shapes, width=CURVES_WIDTH, height=380,
                          margin=dict(l=60, r=20, t=60, b=40),
                          template="plotly_white", title=dict(text=self._curves_title(), x=0.01, font=dict(size=15)),
                          legend=dict(orientation="h", yanchor="top", y=-0.2, x=0, font=dict(size=11)),
                          hovermode="closest", uirevision="keep")
        self.fig_curves = _LiveFigure(fig)

        # γ and β across channels: histograms of the first snapshot (faded) and now.
        fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                            subplot_titles=("γ (scale) across channels", "β (shift) across channels"))
        for col in (1, 2):
            for when, color, op in (("start", "#9ca3af", 0.55), ("now", CURRENT_COLOR, 0.75)):
                fig.add_trace(go.Histogram(x=[], name={"start": "first snapshot", "now": "latest snapshot"}[when],
                                           marker_color=color, opacity=op, nbinsx=24,
                                           bingroup=col, showlegend=col == 1, legendgroup=when),
                              row=1, col=col)
        fig.update_xaxes(title_text="γ value", row=1, col=1)
        fig.update_xaxes(title_text="β value", row=1, col=2)
        fig.update_yaxes(title_text="channels")
        fig.update_layout(barmode="overlay", width=PANEL_WIDTH, height=360, template="plotly_white",
                          margin=dict(l=55, r=15, t=85, b=40),
                          title=dict(text=self._layer_title("γ and β"), x=0.01, font=dict(size=14)),
                          legend=dict(orientation="h", x=0, y=-0.22, font=dict(size=11)))
        self._param_annotations = [a.to_plotly_json() for a in fig.layout.annotations]
        self.fig_params = _LiveFigure(fig)

        # Running statistics (bars) beside the current batch's statistics (markers), per channel.
        fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                            subplot_titles=("mean of the layer input", "variance of the layer input"))
        for col in (1, 2):
            fig.add_trace(go.Bar(x=[], y=[], name="running (used in eval)", marker_color="#60a5fa",
                                 showlegend=col == 1, legendgroup="running"), row=1, col=col)
            fig.add_trace(go.Scatter(x=[], y=[], mode="markers", name="this batch",
                                     marker=dict(color="#b91c1c", symbol="x", size=6),
                                     showlegend=col == 1, legendgroup="batch"), row=1, col=col)
        fig.update_xaxes(title_text="channel")
        fig.update_layout(width=PANEL_WIDTH, height=360, template="plotly_white", margin=dict(l=55, r=15, t=85, b=40),
                          title=dict(text=self._layer_title("running vs batch statistics"), x=0.01,
                                     font=dict(size=14)),
                          legend=dict(orientation="h", x=0, y=-0.22, font=dict(size=11)), bargap=0.15)
        self._stats_annotations = [a.to_plotly_json() for a in fig.layout.annotations]
        self.fig_stats = _LiveFigure(fig)
        self.figures = (self.fig_curves, self.fig_params, self.fig_stats)

    def _dataset_label(self) -> str:
        h = self.trainer.history if self.trainer else (self.histories[-1] if self.histories else None)
        if h is not None and h.dataset_label:
            return h.dataset_label
        name = self.w_dataset.value
        return {"fashion-mnist": "Fashion-MNIST", "mnist": "MNIST", "synthetic": "SYNTHETIC data (not Fashion-MNIST)"
                }.get(name, "data set: auto (Fashion-MNIST if available, else SYNTHETIC)")

    def _curves_title(self) -> str:
        return f"<b>Training curves</b> — {html.escape(self._dataset_label())}"

    def _layer_title(self, what: str) -> str:
        return f"<b>{what}</b> of layer {self.w_layer.value} — {html.escape(self._dataset_label())}"

    def _build_layout(self) -> None:
        def box(title, *children):
            return W.VBox([W.HTML(f"<div style='font-weight:600;font-size:13px;color:#374151;margin-bottom:2px'>"
                                  f"{title}</div>"), *children],
                          layout=W.Layout(border="1px solid #e5e7eb", padding="6px 8px", margin="0 8px 0 0"))

        self.w_title.value = ("<div style='font-size:20px;font-weight:700;color:#111827'>Batch normalization lab"
                              "</div><div style='color:#4b5563;font-size:13px'>Train LeNet live. Change the "
                              "learning rate, BN momentum or eps during a run and watch the curves and the "
                              "per-channel statistics react.</div>")
        controls = W.HBox([
            box("Optimisation (live during a run)", self.w_lr, self.w_momentum, self.w_cumulative, self.w_eps,
                self.w_batch),
            box("Model (next run)", self.w_norm, self.w_pool, self.w_act),
            box("Data and run (next run)", self.w_dataset, self.w_train_size, self.w_epochs, self.w_device,
                self.w_seed),
        ], layout=W.Layout(flex_flow="row wrap"))
        buttons = W.HBox([self.b_run, self.b_stop, self.b_clear, W.HTML("&nbsp;&nbsp;"), self.w_path,
                          self.b_save, self.b_load], layout=W.Layout(margin="8px 0 4px 0", flex_flow="row wrap"))
        self.widget = W.VBox([
            self.w_title, controls, buttons, self.w_status, self.w_message,
            self.fig_curves,
            W.HBox([self.w_layer, W.HTML("<span style='color:#4b5563;font-size:12px'>γ/β start at 1/0 and spread "
                                         "out as each channel learns its own scale and shift.</span>")]),
            W.HBox([self.fig_params, self.fig_stats], layout=W.Layout(flex_flow="row wrap")),
            self.log,
        ], layout=W.Layout(width="100%"))
        self.widget.add_class("bnviz-lab")

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    # ------------------------------------------------------------------ drawing
    def _on_snapshot(self, history: History, snapshot) -> None:
        """Trainer callback (training thread): draw unless throttled."""
        if self.trainer is None or history is not self.trainer.history:
            return
        if time.perf_counter() >= self._next_draw:
            self.draw()

    def _on_end(self, history: History) -> None:
        """Called in the training thread when a run ends: final draw and the run's message."""
        try:
            self._state_override = None
            self.draw(force=True)
            level = {"error": "error", "diverged": "error", "stopped": "warning"}.get(history.status, "info")
            if history.status == "finished" and history.message:
                level = "warning"
            text = f"Run {history.run_id} {history.status}: " + (history.message or history.summary())
            if history.status == "error" and "Batch size" in history.message:
                text = f"Run {history.run_id} could not train. " + history.message
            self.say(text, level)
        except Exception as err:  # noqa: BLE001
            self._report_exception(err)

    def draw(self, force: bool = False) -> None:
        """Update the status line and the figures from the histories (any thread)."""
        with self._draw_lock:
            t0 = time.perf_counter()
            try:
                self._set_status()
                self._draw_curves(force)
                self._draw_layer(force)
                self._check_figures()
            except Exception as err:  # noqa: BLE001 - a drawing bug must not stop training
                self._report_exception(err)
            dt = time.perf_counter() - t0
            self.draw_count += 1
            self.draw_time_s += dt
            self._next_draw = time.perf_counter() + max(self.min_interval, dt / self.max_draw_share)

    def _check_figures(self) -> None:
        """Rebuild figures whose browser model stopped answering; re-check later while any waits."""
        for fig in self.figures:
            if fig.stale(self.revive_after):
                self._revive(fig)
        if any(f.waiting() for f in self.figures) and not (self._check_timer and self._check_timer.is_alive()):
            # a run may end (no more draws) before an unanswered update times out: check again then
            self._check_timer = threading.Timer(self.revive_after + 0.5, self._timer_check)
            self._check_timer.daemon = True
            self._check_timer.start()

    def _timer_check(self) -> None:
        with self._draw_lock:
            try:
                self._check_figures()
            except Exception as err:  # noqa: BLE001
                self._report_exception(err)

    def _revive(self, old: _LiveFigure) -> None:
        """Replace ``old`` in the lab by a new widget with the same data and layout (passed to the
        constructor, so the new browser model starts with the current picture)."""
        if self.revivals >= MAX_REVIVALS:
            if self.revivals == MAX_REVIVALS:
                self.revivals += 1
                self.say("A chart stopped receiving updates from the kernel (its browser model did not load). "
                         "Reload the page to get it back; training and the other charts are not affected.",
                         "warning")
            return
        self.revivals += 1
        with old._sync_lock:
            # to_plotly_json keeps numpy arrays (to_dict would turn them into base64 specs)
            new = _LiveFigure(data=[t.to_plotly_json() for t in old.data], layout=old.layout.to_plotly_json())
        names = ("fig_curves", "fig_params", "fig_stats")
        for name in names:
            if getattr(self, name) is old:
                setattr(self, name, new)
        self.figures = tuple(getattr(self, name) for name in names)
        _swap_child(self.widget, old, new)
        old.close()

    def _runs(self):
        current = self.trainer.history if self.trainer is not None else None
        if current is not None and current not in self.histories:
            current = None
        earlier = [h for h in self.histories if h is not current][-EARLIER_SLOTS:]
        return current, earlier

    @staticmethod
    def _series(h: History):
        steps = h.steps
        ep = [s for s in h.epochs if s.test_acc is not None]
        return (np.array([s.step for s in steps], dtype=float), np.array([s.loss for s in steps], dtype=float),
                np.array([s.train_acc for s in steps], dtype=float),
                np.array([s.step for s in ep], dtype=float), np.array([s.test_acc for s in ep], dtype=float))

    def _legend_name(self, h: History, current: History | None) -> str:
        name = h.label
        if h is current:
            name = "▶ " + name
        label = current.dataset_label if current is not None else None
        if h.dataset_label and h.dataset_label != label:
            name += f" [{h.dataset_label}]"
        if h.status in ("diverged", "error", "stopped"):
            name += f" ({h.status})"
        return name

    def _draw_curves(self, force: bool) -> None:
        current, earlier = self._runs()
        fig = self.fig_curves
        runs = [(k, h) for k, h in enumerate(earlier)] + [(EARLIER_SLOTS, current)]
        keys = {k: (None if h is None else (id(h), len(h.snapshots), h.status)) for k, h in runs}
        for k in range(len(earlier), EARLIER_SLOTS):
            keys[k] = None
        changes = tuple((c.step, c.name, c.new) for c in current.changes) if current is not None else ()
        title = self._curves_title()
        with fig._sync_lock, fig.batch_update():
            for k in range(EARLIER_SLOTS + 1):
                if not force and self._drawn.get(("curve", k)) == keys[k]:
                    continue
                self._drawn[("curve", k)] = keys[k]
                h = dict(runs).get(k)
                traces = [fig.data[i] for i in self._slots[k]]
                if h is None:
                    for tr in traces:
                        tr.x, tr.y, tr.showlegend = [], [], False
                    continue
                x, loss, acc, xt, tacc = self._series(h)
                loss = np.where(np.isfinite(loss) & (loss > 0), loss, np.nan)
                traces[0].x, traces[0].y = x, loss
                traces[1].x, traces[1].y = x, acc
                traces[2].x, traces[2].y = xt, tacc
                name = self._legend_name(h, current)
                for tr in traces:
                    tr.name = name
                traces[0].showlegend = True
            if force or self._drawn.get("marks") != changes:
                self._drawn["marks"] = changes
                shapes, notes = list(self._base_shapes), list(self._base_annotations)
                for i, (step, name, new) in enumerate(changes):
                    for c in ("", "2", "3"):
                        shapes.append(dict(type="line", xref=f"x{c}", yref=f"y{c} domain", x0=step, x1=step,
                                           y0=0, y1=1, line=dict(color="#b91c1c", width=1.5, dash="dash")))
                    short = {"bn_momentum": "momentum", "batch_size": "batch"}.get(name, name)
                    notes.append(dict(x=step, y=1 - 0.09 * (i % 4), xref="x", yref="y domain", text=f"{short}→{_fmt(new)}",
                                      showarrow=False, xanchor="left", font=dict(size=11, color="#b91c1c"),
                                      bgcolor="rgba(255,255,255,0.8)"))
                fig.layout.shapes = shapes
                fig.layout.annotations = notes
            if self._drawn.get("curves_title") != title:
                self._drawn["curves_title"] = title
                fig.layout.title.text = title
        fig.sent()

    def _layer_snapshots(self):
        """(first, last) snapshot of the shown run that has the chosen layer, or (None, None)."""
        h = self.trainer.history if self.trainer is not None else (self.histories[-1] if self.histories else None)
        if h is None or not h.snapshots:
            return h, None, None
        name = self.w_layer.value
        with_layer = [s for s in (h.snapshots[0], h.snapshots[-1]) if name in s.layers]
        if not with_layer:
            return h, None, None
        return h, with_layer[0], with_layer[-1]

    def _draw_layer(self, force: bool) -> None:
        h, first, last = self._layer_snapshots()
        key = (id(h), self.w_layer.value, None if last is None else (last.step, last.kind))
        if not force and self._drawn.get("layer") == key:
            return
        self._drawn["layer"] = key
        name = self.w_layer.value
        fp, fs = self.fig_params, self.fig_stats
        empty = np.array([], dtype=float)
        if last is None:
            why = "no run yet" if h is None else (
                f"this model has no normalisation layer {name}" if h.snapshots else "waiting for the first snapshot")
            g0 = g1 = b0 = b1 = rm = rv = bm = bv = empty
            sub = why
        else:
            st0, st = first.layers[name], last.layers[name]
            g0, g1, b0, b1 = (np.asarray(v, dtype=float) for v in (st0.gamma, st.gamma, st0.beta, st.beta))
            rm, rv, bm, bv = (np.asarray(v, dtype=float) for v in (st.running_mean, st.running_var,
                                                                     st.batch_mean, st.batch_var))
            n = max(len(g1), len(bm))
            sub = f"{n} channels · grey: first snapshot (step {first.step}) · blue: step {last.step}"
            if not len(rm):
                sub += " · no running statistics: this norm uses each example's own"
        with fp._sync_lock, fp.batch_update():
            fp.data[0].x, fp.data[1].x, fp.data[2].x, fp.data[3].x = g0, g1, b0, b1
            fp.layout.title.text = self._layer_title("γ and β") + f"<br><span style='font-size:11px'>{sub}</span>"
            if len(g1):
                notes = [dict(a) for a in self._param_annotations]
                notes[0]["text"] = f"γ (scale): mean {g1.mean():.3f}, sd {g1.std():.3f}"
                notes[1]["text"] = f"β (shift): mean {b1.mean():.3f}, sd {b1.std():.3f}"
                fp.layout.annotations = notes
            else:
                fp.layout.annotations = self._param_annotations
        fp.sent()
        ch = np.arange(max(len(rm), len(bm)), dtype=float)
        with fs._sync_lock, fs.batch_update():
            fs.data[0].x, fs.data[0].y = ch[:len(rm)], rm
            fs.data[1].x, fs.data[1].y = ch[:len(bm)], bm
            fs.data[2].x, fs.data[2].y = ch[:len(rv)], rv
            fs.data[3].x, fs.data[3].y = ch[:len(bv)], bv
            if last is None:
                note = sub
            elif len(rm):
                note = f"step {last.step} · bars: running estimate (used in eval) · ×: the current training batch"
            else:
                note = f"step {last.step} · ×: the current training batch (this norm keeps no running estimate)"
            fs.layout.title.text = (self._layer_title("running vs batch statistics")
                                    + f"<br><span style='font-size:11px'>{note}</span>")
        fs.sent()


def _swap_child(box: W.Widget, old: W.Widget, new: W.Widget) -> bool:
    """Replace ``old`` by ``new`` among the children of ``box`` or of a box inside it."""
    children = getattr(box, "children", None)
    if not children:
        return False
    if any(c is old for c in children):
        box.children = tuple(new if c is old else c for c in children)
        return True
    return any(_swap_child(c, old, new) for c in children)


def show_lab(**settings) -> Lab:
    """Create a :class:`Lab` with ``settings`` (see :func:`default_settings`), display it and
    return it (keep the returned object to drive the lab from code)."""
    from IPython.display import display

    lab = Lab(**settings)
    display(lab.widget)
    return lab
