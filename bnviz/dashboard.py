"""The interactive lab: sliders that retrain a real LeNet live, with curves and per-channel BN stats.

The lab's modules are the only ones that import ipywidgets and plotly's FigureWidget:

* :mod:`bnviz.lab_controls`: the widgets and the :class:`~bnviz.config.Config` they describe;
* :mod:`bnviz.lab_charts`: the figures, drawn from :class:`~bnviz.history.History` objects only;
* :mod:`bnviz.lab_views`: how the figures reach the page (FigureWidgets, or plain figures re-sent
  through display handles: ``drawing="widget" | "display"``, the latter in Colab);
* :mod:`bnviz.lab_status`: the status line and the message box; :mod:`bnviz.lab_files`: Save/Load runs;
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
* Drawing (``drawing``): ``"widget"`` updates FigureWidgets in place, created once with their
  data and layout passed to the constructor (Voilà drops changes made before the page connects);
  a figure whose browser model stops answering is rebuilt after ``revive_after`` seconds, at most
  ``MAX_REVIVALS`` times per lab. ``"display"`` re-sends plain figures through display handles
  (what Colab supports without a custom widget manager). Default: :func:`bnviz.colab.default_drawing`.
  Draws are throttled: at most ``1 / min_interval`` per second (10/s with widgets, 1/s with
  display handles), and never more than ``max_draw_share`` (5 %) of the wall time, measured.
* Save runs *adds* the ended runs to the file (the runs already in it are kept) and says how
  many it holds; a file that is not a bnviz history file is reported and left untouched.
* Errors never escape as bare tracebacks: a bad value or an exception in a widget callback is
  shown in the message box (and its traceback in the log below the lab).

Programmatic use (tests, headless notebooks)::

    lab = Lab(dataset="synthetic", train_size=512, epochs=1)   # drawing="display" in Colab
    lab.run_clicked(); lab.wait()
    lab.histories[-1].status, lab.status_text, lab.fig_curves.data[...]
"""
from __future__ import annotations

import threading
import time

import ipywidgets as W

from .config import Config, check
from .history import History
from .lab_charts import EARLIER_SLOTS, LabCharts, dataset_label
from .lab_controls import (BATCH_SIZES, NORM_CHOICES, PACES, SETTINGS, UNTIL_STOPPED_EPOCHS, WATCHABLE_S,
                           LabControls, check_settings, default_settings, pace_text)
from .lab_files import load_runs, save_runs
from .lab_status import WELCOME, StatusBar, end_message, guard, live_change_message, live_refused_message, status_parts
from .lab_views import DRAWINGS, MAX_REVIVALS, build_view, pick_drawing
from .train import Trainer

__all__ = ["Lab", "Pacer", "show_lab", "default_settings", "BATCH_SIZES", "NORM_CHOICES", "PACES", "SETTINGS",
           "EARLIER_SLOTS", "MAX_REVIVALS", "DRAWINGS"]


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
    """The batch normalization lab; display ``lab`` in a notebook. Settings: see
    :func:`default_settings` (None for bn_momentum = cumulative, for epochs = until stopped, for
    train/test_size = all). ``drawing``: 'widget', 'display' or None (the default where it runs,
    :func:`bnviz.colab.default_drawing`); ``min_interval``: seconds between draws (None: the
    drawing's own). Widgets: ``lab.w_lr``, ``lab.b_run``, ... (:class:`~bnviz.lab_controls.LabControls`);
    figures: ``lab.fig_curves``, ``lab.fig_params``, ``lab.fig_stats``."""

    def __init__(self, drawing: str | None = None, min_interval: float | None = None, max_draw_share: float = 0.05,
                 revive_after: float = 8.0, watchable_s: float = WATCHABLE_S, **settings):
        drawing = pick_drawing(drawing)  # ValueError for an unknown one
        s = {**default_settings(settings.get("device", "auto")), **settings}
        try:
            check_settings(s)
        except ValueError as err:
            raise ValueError(f"invalid lab setting: {err}") from None
        self.settings, self.test_size, self.watchable_s = s, s["test_size"], watchable_s
        self.histories: list[History] = []
        self.trainer: Trainer | None = None
        self.pacer: Pacer | None = None
        self.draw_count, self.draw_time_s, self._next_draw = 0, 0.0, 0.0
        self._run_lock, self._draw_lock = threading.Lock(), threading.RLock()
        self._state_override = None  # 'stopping' between Stop and the end of the run
        self.controls, self.status = LabControls(s), StatusBar()
        self.charts = LabCharts(self._dataset_label(), self.w_layer.value, widgets=drawing == "widget")
        self.log = W.Output(layout=W.Layout(max_height="160px", overflow="auto"))
        self.say(WELCOME, "info")
        self.view = build_view(drawing, self.charts, self.controls, self.status, self.log, self.say, revive_after)
        self.min_interval = self.view.min_interval if min_interval is None else min_interval
        self.max_draw_share = max_draw_share
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
    widget = property(lambda self: self.view.widget)
    drawing = property(lambda self: self.view.drawing)
    revivals = property(lambda self: self.view.revivals)
    status_text = property(lambda self: self.status.status_text)
    message_text = property(lambda self: self.status.message_text)
    message_level = property(lambda self: self.status.message_level)

    # ------------------------------------------------------------------ building
    def _wire(self) -> None:
        ctl, g = self.controls, (lambda fn: guard(fn, self._report_exception))
        for button, action in ((ctl.b_run, self.run_clicked), (ctl.b_stop, self.stop_clicked),
                               (ctl.b_clear, self.clear_clicked), (ctl.b_save, self.save_clicked),
                               (ctl.b_load, self.load_clicked)):
            button.on_click(g(action))
        for name, w in (("lr", ctl.w_lr), ("eps", ctl.w_eps), ("batch_size", ctl.w_batch)):
            w.observe(g(lambda change, name=name: self._live_change(name, change["new"])), "value")
        for w in (ctl.w_momentum, ctl.w_cumulative):
            w.observe(g(self._momentum_changed), "value")
        ctl.w_pace.observe(g(self._pace_changed), "value")
        for w in ctl.next_run_widgets():
            w.observe(g(self._next_run_change), "value")
        ctl.w_layer.observe(g(lambda change: self.draw(force=True)), "value")

    def _ipython_display_(self):
        self.view.show()

    def _report_exception(self, err: Exception) -> None:
        self.status.report(err, self.log)

    # ------------------------------------------------------------------ config
    def config(self) -> Config:
        """The Config the controls describe (raises ValueError naming the valid values)."""
        return self.controls.config(self.test_size)

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
            self.say(f"Run {trainer.history.run_id} started ({length}, pace: {pace_text(self.w_pace.value, cfg.epochs, self.watchable_s)}): "
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

    def save_clicked(self, _button=None):
        """Add the ended runs to the JSON file in the file box (see :mod:`bnviz.lab_files`)."""
        text, level, path = save_runs(self.w_path.value, self.histories, self.running)
        self.say(text, level)
        return path

    def load_clicked(self, _button=None) -> list[History]:
        """Show the runs saved in the JSON file in the file box (runs already shown are not added twice)."""
        text, level, runs = load_runs(self.w_path.value, self.histories)
        self.say(text, level)
        if runs:
            current = [self.trainer.history] if self.running else []
            self.histories[:] = [h for h in self.histories if h not in current] + runs + current
            self.draw(force=True)
        return runs

    # ------------------------------------------------------------------ live changes
    def _live_change(self, name: str, value) -> None:
        if self.running:  # else it applies to the next Run through config()
            try:
                self.trainer.live.set(**{name: value})  # also refuses batch size 1 with BN in an fc layer
            except ValueError as err:
                self.say(live_refused_message(name, value, err), "error")
                return
            self.say(live_change_message(name, value, self.trainer), "info")

    def _momentum_changed(self, _change=None) -> None:  # the slider or "cumulative" (None)
        self._live_change("bn_momentum", self.controls.momentum_value())

    def _pace_changed(self, change) -> None:
        if self.running and self.pacer is not None:
            self.pacer.set_pace(change["new"])
            t = self.trainer
            self.say(f"Pace of run {t.history.run_id}: {pace_text(self.w_pace.value, t.config.epochs, self.watchable_s)} (from now on).", "info")
            self._set_status()

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
            self.say(*end_message(trainer.history))
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
                self.view.after_draw(force)
            except Exception as err:  # noqa: BLE001 - a drawing bug must not stop training
                self._report_exception(err)
            dt = time.perf_counter() - t0
            self.draw_count += 1
            self.draw_time_s += dt
            self._next_draw = time.perf_counter() + max(self.min_interval, dt / self.max_draw_share)

    def _check_figures(self) -> None:
        """Rebuild figures whose browser model stopped answering (widget drawing; tests)."""
        with self._draw_lock:
            self.view.after_draw()

    def _runs(self) -> tuple[History | None, list[History]]:
        current = self.trainer.history if self.trainer is not None else None
        if current is not None and current not in self.histories:
            current = None
        return current, [h for h in self.histories if h is not current][-EARLIER_SLOTS:]

    def _dataset_label(self) -> str:
        h = self.trainer.history if self.trainer else (self.histories[-1] if self.histories else None)
        return dataset_label(h, self.w_dataset.value)

    # ------------------------------------------------------------------ messages and status
    def say(self, text: str, level: str = "info") -> None:
        """Show a message in the lab's message box (level: info, warning, error)."""
        self.status.say(text, level)

    def _set_status(self) -> None:
        watchable = self.pacer is not None and self.pacer.pace == "watchable"
        self.status.show(*status_parts(self.trainer, self._state_override, watchable))


def show_lab(drawing: str | None = None, **settings) -> Lab:
    """Create a :class:`Lab` with ``settings`` (see :func:`default_settings`), display it and
    return it (keep the returned object to drive the lab from code). ``drawing``: 'widget'
    (FigureWidgets updated in place: JupyterLab, Notebook 7, Voila), 'display' (plain figures
    re-sent through display handles: Colab, VS Code) or None for the default of where it runs."""
    lab = Lab(drawing=drawing, **settings)
    lab.view.show()
    return lab
