"""The interactive lab: sliders that retrain a real LeNet live, with curves and per-channel BN stats.

Three modules, the only ones that import ipywidgets and plotly's FigureWidget:

* :mod:`bnviz.lab_controls`: the widgets and the :class:`~bnviz.config.Config` they describe;
* :mod:`bnviz.lab_charts`: the figures, drawn from :class:`~bnviz.history.History` objects only;
* this module, the controller: :class:`Lab` runs a :class:`~bnviz.train.Trainer` in a background
  thread (``Trainer.start()``; threads are named ``bnviz-run-<id>``) and is one of its
  *callbacks*: ``on_snapshot`` draws, ``on_fit_end`` reports how the run ended (finished,
  stopped, diverged, or the error recorded in the History) in the message box. A
  :class:`Pacer` callback sets the pace. The lab never reaches into the trainer's model.

Conventions
-----------
* Live controls: learning rate, BN momentum (or "cumulative" = ``momentum=None``) and eps are
  sent to ``trainer.live.set(...)`` and take effect at the next step; batch size at the next
  epoch; the pace at once. Model, data set, epochs (or *until stopped*), device, seed and
  train-set size apply to the next Run.
* Pace: *as fast as possible*, or *watchable*: a run of N epochs lasts about ``watchable_s``
  (20) seconds, a run *until stopped* goes at 2 epochs per 20 s (:class:`Pacer`). Default:
  watchable on CUDA (10 epochs take ~1 s there), as fast as possible elsewhere.
* One run at a time: Run while a run is going stops it, joins its thread and then starts the
  new run (a lock makes this safe even if Run is called from several threads).
* Drawing: the figures are created once, with their data and layout passed to the constructor
  (Voilà drops changes made before the page connects). A figure whose browser model stops
  answering updates is rebuilt from its current data after ``revive_after`` seconds (see
  :class:`bnviz.lab_charts.LiveFigure`), at most ``MAX_REVIVALS`` times per lab. Draws are
  throttled: at most ``1 / min_interval`` per second (10/s), and never more than
  ``max_draw_share`` (5 %) of the wall time, measured.
* Save runs *adds* the ended runs to the file (the runs already in it are kept) and says how
  many it holds; a file that is not a bnviz history file is reported and left untouched.
* Errors never escape as bare tracebacks: a bad value or an exception in a widget callback is
  shown in the message box (and its traceback in the log below the lab).

Programmatic use (tests, headless notebooks)::

    lab = Lab(dataset="synthetic", train_size=512, epochs=1)
    lab.run_clicked(); lab.wait()
    lab.histories[-1].status, lab.status_text, lab.fig_curves.data[...]
"""
from __future__ import annotations

import html
import threading
import time
import traceback
from pathlib import Path

import ipywidgets as W

from .config import Config, check
from .history import History, load_histories, save_histories
from .lab_charts import EARLIER_SLOTS, LabCharts, LiveFigure, fmt_value
from .lab_controls import (BATCH_SIZES, LIVE_NAMES, NORM_CHOICES, PACES, SETTINGS, UNTIL_STOPPED_EPOCHS,
                           WATCHABLE_S, LabControls, check_settings, default_settings)
from .train import Trainer

__all__ = ["Lab", "Pacer", "show_lab", "default_settings", "BATCH_SIZES", "NORM_CHOICES", "PACES", "SETTINGS",
           "EARLIER_SLOTS", "MAX_REVIVALS"]

MAX_REVIVALS = 6  # figure rebuilds per lab before it gives up and asks for a page reload
STATE_COLORS = {"idle": "#6b7280", "pending": "#6b7280", "running": "#15803d", "stopping": "#b45309",
                "finished": "#1d4ed8", "stopped": "#b45309", "diverged": "#b91c1c", "error": "#b91c1c"}
MESSAGE_COLORS = {"info": ("#eff6ff", "#1e40af", "#bfdbfe"), "warning": ("#fffbeb", "#92400e", "#fde68a"),
                  "error": ("#fef2f2", "#991b1b", "#fca5a5")}


class Pacer:
    """Callback that sets a run's pace. ``'fast'``: nothing. ``'watchable'``: before each step,
    sleep until the examples trained so far match a steady rate: ``epochs × train examples /
    seconds`` per second, so a run lasts about ``seconds`` plus its setup; a run without an epoch
    limit goes at ``UNTIL_STOPPED_EPOCHS`` epochs per ``seconds``. The clock starts at the first
    step (setup, compiling and capture are not counted) and restarts when the pace changes
    (:meth:`set_pace`, any thread). A run slower than the rate is never slowed further. Stop
    interrupts a pause at once."""

    def __init__(self, pace: str = "fast", seconds: float = WATCHABLE_S):
        self.pace, self.seconds = pace, seconds
        self.slept_s = 0.0  # time spent pausing (for tests and the curious)
        self._anchor = None  # (time, examples) the steady rate counts from

    def set_pace(self, pace: str) -> None:
        self.pace, self._anchor = pace, None

    def rate(self, trainer) -> float:
        """Training examples per second at the watchable pace."""
        epochs = trainer.config.epochs or UNTIL_STOPPED_EPOCHS
        return max(len(trainer.data.train_x), 1) * epochs / self.seconds

    def before_step(self, trainer) -> None:
        if self.pace != "watchable":
            return
        now, anchor = time.perf_counter(), self._anchor
        if anchor is None:
            self._anchor = (now, trainer.examples)
            return
        wait = anchor[0] + (trainer.examples - anchor[1]) / self.rate(trainer) - now
        if wait > 0:
            self.slept_s += wait
            if trainer.wait_for_stop(wait):  # Stop pressed during the pause
                trainer.stop_signal.before_step(trainer)  # raises the engine's CancelFit('stopped')


class Lab:
    """The batch normalization lab. ``Lab(**settings)`` builds the controls and figures;
    display ``lab`` (or ``lab.widget``) in a notebook. Settings (see :func:`default_settings`):
    norm, pool, activation, batch_size, lr, bn_momentum (None = cumulative), eps, epochs (None =
    until stopped), pace ('fast' or 'watchable'), dataset, device, seed, train_size (None = all),
    test_size (None = all). ``watchable_s``: seconds a run lasts at the watchable pace.

    The widgets are reachable as attributes of the lab (``lab.w_lr``, ``lab.b_run``, ...; see
    :class:`~bnviz.lab_controls.LabControls`), the figures as ``lab.fig_curves``,
    ``lab.fig_params``, ``lab.fig_stats`` (see :class:`~bnviz.lab_charts.LabCharts`)."""

    def __init__(self, min_interval: float = 0.1, max_draw_share: float = 0.05, revive_after: float = 8.0,
                 watchable_s: float = WATCHABLE_S, **settings):
        s = {**default_settings(settings.get("device", "auto")), **settings}
        try:
            check_settings(s)
        except ValueError as err:
            raise ValueError(f"invalid lab setting: {err}") from None
        self.settings, self.test_size = s, s["test_size"]
        self.min_interval, self.max_draw_share = min_interval, max_draw_share
        self.revive_after = revive_after  # s without an answer before a figure is rebuilt
        self.watchable_s = watchable_s
        self.revivals = 0  # figures rebuilt because their browser model stopped listening
        self.histories: list[History] = []
        self.trainer: Trainer | None = None
        self.pacer: Pacer | None = None
        self.draw_count, self.draw_time_s = 0, 0.0
        self._check_timer = None
        self._run_lock, self._draw_lock = threading.Lock(), threading.RLock()
        self._next_draw = 0.0
        self._state_override = None  # 'stopping' between Stop and the end of the run
        self.controls = LabControls(s)
        self.charts = LabCharts(self._dataset_label(), self.w_layer.value)
        self._build_layout()
        self._wire()
        self._set_status()
        self.controls.config(self.test_size)  # the settings make a valid Config (else ValueError)

    def __getattr__(self, name):  # the controls' widgets: lab.w_lr, lab.b_run, ...
        if name.startswith(("w_", "b_")) and "controls" in self.__dict__:
            return getattr(self.__dict__["controls"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # the figures live in self.charts (a rebuilt figure replaces its attribute there)
    fig_curves = property(lambda self: self.charts.fig_curves)
    fig_params = property(lambda self: self.charts.fig_params)
    fig_stats = property(lambda self: self.charts.fig_stats)
    figures = property(lambda self: self.charts.figures)
    _slots = property(lambda self: self.charts.slots)  # trace indices per slot (tests)

    # ------------------------------------------------------------------ building
    def _build_layout(self) -> None:
        self.w_title = W.HTML(
            "<div style='font-size:20px;font-weight:700;color:#111827'>Batch normalization lab</div>"
            "<div style='color:#4b5563;font-size:13px'>Train LeNet live. Change the learning rate, BN momentum "
            "or eps during a run and watch the curves and the per-channel statistics react.</div>")
        self.w_status, self.w_message = W.HTML(), W.HTML()
        self.log = W.Output(layout=W.Layout(max_height="160px", overflow="auto"))
        self.say("Choose settings and press Run. Learning rate, momentum and eps act live during a run; "
                 "batch size from the next epoch; the pace at once; the rest at the next Run.", "info")
        hint = W.HTML("<span style='color:#4b5563;font-size:12px'>γ/β start at 1/0 and spread out as each "
                      "channel learns its own scale and shift.</span>")
        c = self.charts
        self.widget = W.VBox([
            self.w_title, self.controls.boxes(), self.controls.button_rows(), self.w_status, self.w_message,
            c.fig_curves, W.HBox([self.w_layer, hint], layout=W.Layout(flex_flow="row wrap")),
            W.HBox([c.fig_params, c.fig_stats], layout=W.Layout(flex_flow="row wrap")), self.log,
        ], layout=W.Layout(width="100%"))
        self.widget.add_class("bnviz-lab")

    def _wire(self) -> None:
        ctl = self.controls
        for button, action in ((ctl.b_run, self.run_clicked), (ctl.b_stop, self.stop_clicked),
                               (ctl.b_clear, self.clear_clicked), (ctl.b_save, self.save_clicked),
                               (ctl.b_load, self.load_clicked)):
            button.on_click(self._guard(action))
        for name, w in (("lr", ctl.w_lr), ("eps", ctl.w_eps), ("batch_size", ctl.w_batch)):
            w.observe(self._guard(lambda change, name=name: self._live_change(name, change["new"])), "value")
        ctl.w_momentum.observe(self._guard(self._momentum_changed), "value")
        ctl.w_cumulative.observe(self._guard(self._cumulative_changed), "value")
        ctl.w_until.observe(self._guard(self._until_changed), "value")
        ctl.w_pace.observe(self._guard(self._pace_changed), "value")
        for w in ctl.next_run_widgets():
            w.observe(self._guard(self._next_run_change), "value")
        ctl.w_layer.observe(self._guard(lambda change: self.draw(force=True)), "value")

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

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
    def config(self) -> Config:
        """The Config the controls describe (raises ValueError naming the valid values)."""
        return self.controls.config(self.test_size)

    def momentum_value(self) -> float | None:
        return self.controls.momentum_value()

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
            if not self._stop_and_join():
                return None
            pacer = Pacer(self.w_pace.value, self.watchable_s)
            trainer = Trainer(cfg, callbacks=[pacer, self])
            self._state_override = None
            self.trainer, self.pacer = trainer, pacer
            self.histories.append(trainer.history)
            length = "until you press Stop" if cfg.epochs is None else f"{cfg.epochs} epoch(s)"
            self.say(f"Run {trainer.history.run_id} started ({length}, pace: {self._pace_text(cfg.epochs)}): "
                     f"{cfg.describe()}.", "info")
            trainer.start()
            self.draw(force=True)  # the new run's (empty) slot and its status line
            return trainer.history

    def _stop_and_join(self) -> bool:
        """Stop the current run (if any) and wait for its thread; False if it would not end."""
        if not self.running:
            return True
        old = self.trainer
        old.stop()
        old.join(timeout=120)
        if old.running:
            self.say("The current run did not stop within 120 s; not starting a second one. "
                     "Try Run again in a moment.", "error")
            return False
        return True

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

    def _path(self) -> Path | None:
        text = self.w_path.value.strip()
        if not text:
            self.say("Enter a file name in the file box, e.g. bnviz_runs.json.", "error")
            return None
        return Path(text).expanduser()

    def save_clicked(self, _button=None) -> Path | None:
        """Add the ended runs to the JSON file named in the path box. The runs already in the
        file are kept (a run saved before is updated, not repeated); a file that is not a bnviz
        history file is left untouched."""
        path = self._path()
        runs = [h for h in self.histories if h.status not in ("running", "pending")]
        if path is None:
            return None
        if not runs:
            self.say("Nothing to save yet: no run has ended.", "warning")
            return None
        try:
            before = {h.uid for h in load_histories(path)} if path.is_file() else set()
            save_histories(runs, path, mode="merge")  # raises ValueError before writing a foreign file
            total = len(load_histories(path))
        except ValueError as err:  # a foreign or corrupt file: not written
            self.say(f"Not saved: {err}. The file was left as it was; choose another file name.", "error")
            return None
        except OSError as err:
            self.say(f"Could not save to {path}: {err}. Enter a writable file path, e.g. bnviz_runs.json.", "error")
            return None
        added = sum(h.uid not in before for h in runs)
        again = len(runs) - added
        note = f" ({again} run(s) saved before were updated)" if again else ""
        going = " The current run is still going: save again when it ends." if self.running else ""
        self.say(f"Added {added} run(s) to {path.resolve()}{note}, which now holds {total} run(s).{going}", "info")
        return path

    def load_clicked(self, _button=None) -> list[History]:
        """Add the runs saved in the JSON file named in the path box to the history (runs
        already shown are not added twice)."""
        path = self._path()
        if path is None:
            return []
        if not path.is_file():
            self.say(f"No such file: {path}. Enter the path of a file written by Save runs.", "error")
            return []
        try:
            loaded = load_histories(path)
        except ValueError as err:
            self.say(str(err), "error")
            return []
        shown = {h.uid for h in self.histories}
        runs = [h for h in loaded if h.uid not in shown]
        current = [self.trainer.history] if self.running else []
        earlier = [h for h in self.histories if h not in current]
        self.histories[:] = earlier + runs + current
        skipped = f" ({len(loaded) - len(runs)} already shown)" if len(runs) < len(loaded) else ""
        self.say(f"Loaded {len(runs)} run(s) from {path}{skipped}.", "info")
        self.draw(force=True)
        return runs

    # ------------------------------------------------------------------ live changes
    def _live_change(self, name: str, value) -> None:
        if not self.running:
            return  # applies to the next Run through config()
        t = self.trainer
        try:
            t.live.set(**{name: value})  # also refuses batch size 1 with BN in an fc layer
        except ValueError as err:
            prefix = (f"Batch size {value} was not applied to the running run. " if name == "batch_size"
                      else "Not applied: ")
            self.say(f"{prefix}{err}", "error")
            return
        when = "from the next epoch" if name == "batch_size" else "from the next step"
        extra = ""
        if name in ("bn_momentum", "eps") and not t.config.model.is_batch_norm:
            extra = " (this model has no batch norm: " + (
                "momentum has no effect)" if name == "bn_momentum" else "eps only enters Layer/GroupNorm)")
        self.say(f"{LIVE_NAMES[name]} set to {fmt_value(value)} {when} of run {t.history.run_id}{extra}; "
                 "a dashed line marks it on the curves.", "info")

    def _momentum_changed(self, change) -> None:
        if not self.w_cumulative.value:  # while "cumulative" is ticked the slider is inactive
            self._live_change("bn_momentum", float(change["new"]))

    def _cumulative_changed(self, change) -> None:
        self.w_momentum.disabled = bool(change["new"])
        self._live_change("bn_momentum", self.momentum_value())

    def _until_changed(self, change) -> None:
        self.w_epochs.disabled = bool(change["new"])

    def _pace_changed(self, change) -> None:
        if self.running and self.pacer is not None:
            self.pacer.set_pace(change["new"])
            t = self.trainer
            self.say(f"Pace of run {t.history.run_id}: {self._pace_text(t.config.epochs)} (from now on).", "info")
            self._set_status()

    def _pace_text(self, epochs: int | None) -> str:
        if self.w_pace.value == "fast":
            return "as fast as possible"
        if epochs is None:
            return f"watchable, {UNTIL_STOPPED_EPOCHS} epochs per {self.watchable_s:g} s"
        return f"watchable, about {self.watchable_s:g} s a run"

    def _next_run_change(self, change) -> None:
        owner = change["owner"]
        if owner is self.w_seed:
            try:
                check("seed", change["new"])
            except ValueError as err:
                self.say(f"{err}. Enter another seed; Run is refused until then.", "error")
                return
        if self.running:
            self.say(f"{owner.description} = {change['new']!r} applies to the next Run "
                     "(press Run to restart with it).", "info")

    # ------------------------------------------------------------------ callbacks (training thread)
    def on_snapshot(self, trainer: Trainer, snapshot) -> None:
        """Trainer callback: draw unless throttled."""
        if trainer is self.trainer and time.perf_counter() >= self._next_draw:
            self.draw()

    def on_fit_end(self, trainer: Trainer) -> None:
        """Trainer callback, always called when a run ends: the final draw and the message."""
        try:
            if trainer is self.trainer:
                self._state_override = None
            self.draw(force=True)
            self.say(*_end_message(trainer.history))
        except Exception as err:  # noqa: BLE001
            self._report_exception(err)

    # ------------------------------------------------------------------ drawing
    def draw(self, force: bool = False) -> None:
        """Update the status line and the figures from the histories (any thread)."""
        with self._draw_lock:
            t0 = time.perf_counter()
            try:
                self._set_status()
                current, earlier = self._runs()
                shown = current if current is not None else (self.histories[-1] if self.histories else None)
                self.charts.draw(current, earlier, shown, self.w_layer.value, self._dataset_label(), force)
                self._check_figures()
            except Exception as err:  # noqa: BLE001 - a drawing bug must not stop training
                self._report_exception(err)
            dt = time.perf_counter() - t0
            self.draw_count += 1
            self.draw_time_s += dt
            self._next_draw = time.perf_counter() + max(self.min_interval, dt / self.max_draw_share)

    def _runs(self) -> tuple[History | None, list[History]]:
        current = self.trainer.history if self.trainer is not None else None
        if current is not None and current not in self.histories:
            current = None
        return current, [h for h in self.histories if h is not current][-EARLIER_SLOTS:]

    def _dataset_label(self) -> str:
        h = self.trainer.history if self.trainer else (self.histories[-1] if self.histories else None)
        if h is not None and h.dataset_label:
            return h.dataset_label
        return {"fashion-mnist": "Fashion-MNIST", "mnist": "MNIST", "synthetic": "SYNTHETIC data (not Fashion-MNIST)"
                }.get(self.w_dataset.value, "data set: auto (Fashion-MNIST if available, else SYNTHETIC)")

    def _check_figures(self) -> None:
        """Rebuild figures whose browser model stopped answering; re-check later while any waits."""
        for fig in self.charts.stale(self.revive_after):
            self._revive(fig)
        if self.charts.waiting() and not (self._check_timer and self._check_timer.is_alive()):
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

    def _revive(self, old: LiveFigure) -> None:
        """Replace ``old`` in the page by a new widget with the same data and layout."""
        if self.revivals >= MAX_REVIVALS:
            if self.revivals == MAX_REVIVALS:
                self.revivals += 1
                self.say("A chart stopped receiving updates from the kernel (its browser model did not load). "
                         "Reload the page to get it back; training and the other charts are not affected.",
                         "warning")
            return
        self.revivals += 1
        new = self.charts.rebuild(old)
        _swap_child(self.widget, old, new)
        old.close()

    # ------------------------------------------------------------------ messages and status
    def say(self, text: str, level: str = "info") -> None:
        """Show a message in the lab's message box (level: info, warning, error)."""
        self.message_text, self.message_level = text, level
        bg, fg, border = MESSAGE_COLORS.get(level, MESSAGE_COLORS["info"])
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
        cfg, last = h.config, (h.snapshots[-1] if h.snapshots else None)
        parts = [f"run {h.run_id}"]
        if last is not None:
            of = " (until stopped)" if cfg.epochs is None else f"/{cfg.epochs}"
            parts += [f"epoch {last.epoch}{of}", f"step {last.step}", f"{last.examples_per_s:,.0f} examples/s",
                      f"loss {last.loss:.3f}"]
            if h.final_test_acc is not None:
                parts.append(f"test acc {h.final_test_acc:.3f}")
        else:
            parts.append("preparing the data and the model…" if state == "running" else "no steps")
        if t.running and self.pacer is not None and self.pacer.pace == "watchable":
            parts.append("watchable pace")
        parts += [f"device {h.device or cfg.device}", f"data: {h.dataset_label or cfg.dataset}"]
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


def _end_message(h: History) -> tuple[str, str]:
    """The message box text and level for a run that ended."""
    level = {"error": "error", "diverged": "error", "stopped": "warning"}.get(h.status, "info")
    if h.status == "finished" and h.message:
        level = "warning"
    if h.status == "error":
        why = h.message.removeprefix("ValueError: ") if "Batch size" in h.message else h.message
        return f"Run {h.run_id} could not train. {why}", level
    return f"Run {h.run_id} {h.status}: " + (h.message or h.summary()), level


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
