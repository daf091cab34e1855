"""The lab's status line and message box: what the run is doing, and what the learner should know.

:class:`StatusBar` owns the two HTML widgets. ``say(text, level)`` shows a message (levels:
info, warning, error; the text is escaped). ``show(state, parts)`` shows the state badge (idle,
running, stopping, finished, stopped, diverged, error) and the parts of the status line; the
word SYNTHETIC is highlighted so a stand-in data set is never mistaken for Fashion-MNIST.
:func:`status_parts` and :func:`end_message` compute those texts from a run's History.
"""
from __future__ import annotations

import html
import traceback

import ipywidgets as W

from .history import History
from .lab_charts import fmt_value
from .lab_controls import LIVE_NAMES

__all__ = ["WELCOME", "StatusBar", "guard", "status_parts", "end_message", "live_change_message", "live_refused_message", "STATE_COLORS", "MESSAGE_COLORS"]

STATE_COLORS = {"idle": "#6b7280", "pending": "#6b7280", "running": "#15803d", "stopping": "#b45309",
                "finished": "#1d4ed8", "stopped": "#b45309", "diverged": "#b91c1c", "error": "#b91c1c"}
MESSAGE_COLORS = {"info": ("#eff6ff", "#1e40af", "#bfdbfe"), "warning": ("#fffbeb", "#92400e", "#fde68a"),
                  "error": ("#fef2f2", "#991b1b", "#fca5a5")}
WELCOME = ("Choose settings and press Run. Learning rate, momentum and eps act live during a run; "
           "batch size from the next epoch; the pace at once; the rest at the next Run.")


class StatusBar:
    """The status line (``w_status``, text in ``status_text``) and the message box
    (``w_message``, text in ``message_text``, level in ``message_level``)."""

    def __init__(self):
        self.w_status, self.w_message = W.HTML(), W.HTML()
        self.status_text = self.message_text = ""
        self.message_level = "info"

    def say(self, text: str, level: str = "info") -> None:
        self.message_text, self.message_level = text, level
        bg, fg, border = MESSAGE_COLORS.get(level, MESSAGE_COLORS["info"])
        weight = "600" if level == "error" else "400"
        self.w_message.value = (
            f"<div class='bnviz-message bnviz-{level}' style='background:{bg};color:{fg};border:1px solid {border};"
            f"border-radius:6px;padding:6px 10px;font-size:13px;font-weight:{weight};line-height:1.4'>"
            f"{html.escape(text)}</div>")

    def report(self, err: Exception, log=None) -> None:
        """An exception in a widget callback or a draw: a message, and its traceback in ``log``."""
        self.say(f"Something went wrong in the lab: {type(err).__name__}: {err} "
                 "(the traceback is in the log below; the lab keeps working)", "error")
        try:
            if log is not None:
                log.append_stderr("".join(traceback.format_exception(type(err), err, err.__traceback__)))
        except Exception:  # noqa: BLE001
            pass

    def show(self, state: str, parts: list[str]) -> None:
        self.status_text = f"{state} · " + " · ".join(parts)
        color = STATE_COLORS.get(state, "#374151")
        body = " · ".join(html.escape(p) for p in parts)
        body = body.replace("SYNTHETIC", "<b style='color:#b91c1c'>SYNTHETIC</b>")
        self.w_status.value = (
            f"<div class='bnviz-status' style='font-size:14px;line-height:1.6'>"
            f"<span class='bnviz-state' style='background:{color};color:white;border-radius:10px;padding:2px 10px;"
            f"font-weight:600;text-transform:uppercase;letter-spacing:0.5px'>{state}</span>&nbsp; {body}</div>")


def guard(fn, report):
    """Wrap a widget callback: an exception goes to ``report``, never lost silently (JupyterLab
    does not show exceptions raised in widget callbacks)."""
    def wrapped(*args):
        try:
            return fn(*args)
        except Exception as err:  # noqa: BLE001 - every error must reach the learner
            report(err)
    return wrapped


def status_parts(trainer, override: str | None, watchable: bool) -> tuple[str, list[str]]:
    """The state and the status line's parts for ``trainer``'s run (None: no run yet).
    ``override``: 'stopping' between Stop and the end of the run; ``watchable``: the run is paced."""
    if trainer is None:
        return "idle", ["no run yet: choose settings and press Run"]
    h = trainer.history
    state = override if (override and trainer.running) else h.status
    if state == "pending" and trainer.running:
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
    if trainer.running and watchable:
        parts.append("watchable pace")
    parts += [f"device {h.device or cfg.device}", f"data: {h.dataset_label or cfg.dataset}"]
    return state, parts


def end_message(h: History) -> tuple[str, str]:
    """The message box text and level for a run that ended."""
    level = {"error": "error", "diverged": "error", "stopped": "warning"}.get(h.status, "info")
    if h.status == "finished" and h.message:
        level = "warning"
    if h.status == "error":
        why = h.message.removeprefix("ValueError: ") if "Batch size" in h.message else h.message
        return f"Run {h.run_id} could not train. {why}", level
    return f"Run {h.run_id} {h.status}: " + (h.message or h.summary()), level


def live_change_message(name: str, value, trainer) -> str:
    """What the lab says when a live control was applied to the running run."""
    when = "from the next epoch" if name == "batch_size" else "from the next step"
    extra = ""
    if name in ("bn_momentum", "eps") and not trainer.config.model.is_batch_norm:
        extra = " (this model has no batch norm: " + (
            "momentum has no effect)" if name == "bn_momentum" else "eps only enters Layer/GroupNorm)")
    return (f"{LIVE_NAMES[name]} set to {fmt_value(value)} {when} of run {trainer.history.run_id}{extra}; "
            "a dashed line marks it on the curves.")


def live_refused_message(name: str, value, err: Exception) -> str:
    """What the lab says when the running run refused a live value (nothing was changed)."""
    prefix = f"Batch size {value} was not applied to the running run. " if name == "batch_size" else "Not applied: "
    return f"{prefix}{err}"
