"""The lab's charts: three plotly figures drawn from :class:`~bnviz.history.History` objects only
(no trainer, no lab, no widgets other than the figures). They are FigureWidgets
(:class:`LiveFigure`, updated in place) or plain figures (:class:`ShownFigure`, re-sent through
a display handle) depending on how the lab draws (:mod:`bnviz.lab_views`).

* ``fig_curves``: training loss (log), training accuracy and test accuracy against the step, for
  the current run (bold) and up to ``EARLIER_SLOTS`` earlier runs (faded); a dashed red line in
  each panel at every live hyperparameter change of the current run, labelled on the loss panel.
* ``fig_params``: histograms of γ and β across the channels of one norm layer, at the run's
  first snapshot (grey) and its latest (blue).
* ``fig_stats``: that layer's running mean/variance (bars, used in eval) beside the current
  training batch's mean/variance (×), per channel.

Sizes: a plotly widget does not follow its cell's width (plotly's anywidget view never resizes
after its first render), so the widths are fixed to what a 1280-px-wide JupyterLab leaves for an
output with the file browser open (about 848 px): the curves are ``CURVES_WIDTH`` = 840 px; the
two panels (``PANEL_WIDTH`` = 525 px each) sit side by side where there is room (sidebar
collapsed: about 1100 px) and wrap below each other where there is not. Nothing is cut off.

Each draw is one ``batch_update`` per figure with numpy arrays, under the figure's sync lock
(see :class:`LiveFigure`); parts that did not change since the last draw are skipped.
"""
from __future__ import annotations

import html
import threading
import time

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .history import History

__all__ = ["LabCharts", "LiveFigure", "ShownFigure", "dataset_label", "EARLIER_SLOTS", "CURVES_WIDTH", "PANEL_WIDTH", "fmt_value", "replay"]

CURVES_WIDTH, CURVES_HEIGHT = 840, 400  # px: fits a 1280-px JupyterLab with its sidebar open
PANEL_WIDTH, PANEL_HEIGHT = 525, 360
EARLIER_SLOTS = 5  # earlier runs drawn faded behind the current one
CURRENT_COLOR = "#1f5fbf"
EARLIER_COLORS = ("#e07b39", "#3a9d5d", "#9467bd", "#c44e52", "#8c8c8c")
CHANGE_COLOR = "#b91c1c"
SHORT_NAMES = {"bn_momentum": "momentum", "batch_size": "batch"}


def fmt_value(v) -> str:
    """A hyperparameter value as the lab shows it (None: the cumulative average)."""
    if v is None:
        return "cumulative"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


class LiveFigure(go.FigureWidget):
    """A FigureWidget that another thread may update, and that knows whether its page still listens.

    1. ipywidgets applies a state update from the browser (plotly's views send one back after
       every redraw) under ``hold_trait_notifications``: a trait that another thread sets in that
       window is sent afterwards with its *current* value. Plotly's update messages are one-shot
       (``_py2js_update`` is set, then reset to None), so such an update would be lost and the
       chart would stop changing. ``_sync_lock``, held by ``set_state`` and by every draw, keeps
       the two apart.
    2. A browser model can be dead for good while its chart is on screen: anywidget (0.11) gives
       each model 2 s to import its ES module (plotly's is ~5 MB, imported once per figure) and
       otherwise drops *every* later message to that model, silently. Voilà creates all models at
       once when the page connects, so on a loaded machine one or two of the three figures froze
       in ~half the sessions. Every plotly view answers each update with ``_js2py_traceDeltas``
       carrying the update's ``trace_edit_id``; :meth:`stale` says when a view has shown itself
       (it sent deltas), has never answered any later update, and an update stayed unanswered for
       ``timeout`` seconds. The lab then replaces the figure by a fresh widget built from the
       current data (:meth:`LabCharts.rebuild`). A model that answered once received messages,
       so it is never suspected again (a hidden tab or a slow page cannot cause needless rebuilds).
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
                self._note_answer(deltas["trace_edit_id"])
            super().set_state(sync_data)

    def _note_answer(self, edit_id: int) -> None:
        self._view_seen = True
        if self._first_ack is None:
            self._first_ack = edit_id
        elif edit_id > self._first_ack:
            self._answered = True
        if edit_id > self._acked:
            self._acked = edit_id
            # an answer is progress: restart the clock if more updates are outstanding
            self._pending_since = None if self._acked >= self._last_trace_edit_id else time.monotonic()

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

    def copy_widget(self) -> "LiveFigure":
        """A new widget with this one's data and layout, passed to the constructor (so a new
        browser model starts with the current picture; Voilà drops later changes)."""
        with self._sync_lock:
            # to_plotly_json keeps numpy arrays (to_dict would turn them into base64 specs)
            return LiveFigure(data=[t.to_plotly_json() for t in self.data], layout=self.layout.to_plotly_json())


class ShownFigure(go.Figure):
    """A plain plotly figure with :class:`LiveFigure`'s drawing interface, for the lab's
    ``"display"`` drawing: a draw changes the figure in memory and marks it ``dirty``; the lab's
    view re-sends dirty figures through their display handles (:class:`bnviz.lab_views.DisplayView`).
    It has no browser model, so it is never stale."""

    dirty = True  # declared on the class: plotly figures refuse unknown attributes

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._sync_lock = threading.RLock()

    def sent(self) -> None:
        self.dirty = True

    def stale(self, timeout: float) -> bool:
        return False

    def waiting(self) -> bool:
        return False


def series(h: History):
    """(steps, loss, train acc) of the step snapshots and (steps, test acc) of the epoch ends."""
    steps = h.steps
    ep = [s for s in h.epochs if s.test_acc is not None]
    return (np.array([s.step for s in steps], dtype=float), np.array([s.loss for s in steps], dtype=float),
            np.array([s.train_acc for s in steps], dtype=float),
            np.array([s.step for s in ep], dtype=float), np.array([s.test_acc for s in ep], dtype=float))


DATASET_LABELS = {"fashion-mnist": "Fashion-MNIST", "mnist": "MNIST", "synthetic": "SYNTHETIC data (not Fashion-MNIST)"}


def dataset_label(h: History | None, chosen: str) -> str:
    """The data set the charts' titles name: the run's own label, else what the control chose."""
    if h is not None and h.dataset_label:
        return h.dataset_label
    return DATASET_LABELS.get(chosen, "data set: auto (Fashion-MNIST if available, else SYNTHETIC)")


def legend_name(h: History, current: History | None) -> str:
    name = ("▶ " if h is current else "") + h.label
    label = current.dataset_label if current is not None else None
    if h.dataset_label and h.dataset_label != label:
        name += f" [{h.dataset_label}]"
    if h.status in ("diverged", "error", "stopped"):
        name += f" ({h.status})"
    return name


def _title(what: str, layer: str | None, dataset_label: str) -> str:
    of = f" of layer {layer}" if layer else ""
    return f"<b>{what}</b>{of} — {html.escape(dataset_label)}"


def _curves_figure(dataset_label: str):
    """The curves figure and, per slot, the indices of its (loss, train acc, test acc) traces:
    EARLIER_SLOTS faded runs, then the current run (bold)."""
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.085,
                        subplot_titles=("training loss (log scale)", "training accuracy",
                                        "test accuracy (each epoch end)"))
    slots = []
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
                marker=dict(size=7 if current else 5), opacity=1.0 if current else 0.45,
                hovertemplate=f"step %{{x}}<br>{metric.replace('_', ' ')} %{{y:.4f}}<extra>%{{fullData.name}}</extra>"),
                row=1, col=col)
        slots.append(idx)
    fig.update_xaxes(title_text="step", rangemode="tozero", matches="x")
    fig.update_yaxes(type="log", row=1, col=1, title_text="loss")
    fig.update_yaxes(range=[0, 1.02], row=1, col=2, title_text="accuracy")
    fig.update_yaxes(range=[0, 1.02], row=1, col=3)
    fig.update_annotations(font_size=13)
    return fig, slots


class LabCharts:
    """The three figures and how to draw Histories into them (any thread)."""

    def __init__(self, dataset_label: str, layer: str = "fc1", widgets: bool = True):
        """``widgets``: FigureWidgets (:class:`LiveFigure`) if True, else :class:`ShownFigure`."""
        self.figure_class = LiveFigure if widgets else ShownFigure
        fig, self.slots = _curves_figure(dataset_label)
        self.base_annotations = [a.to_plotly_json() for a in fig.layout.annotations]
        # chance level (0.1) on both accuracy panels
        self.base_shapes = [dict(type="line", xref=f"x{c} domain", yref=f"y{c}", x0=0, x1=1, y0=0.1, y1=0.1,
                                 line=dict(color="#9ca3af", width=1, dash="dot")) for c in ("2", "3")]
        fig.update_layout(shapes=self.base_shapes, width=CURVES_WIDTH, height=CURVES_HEIGHT,
                          margin=dict(l=55, r=15, t=70, b=40), template="plotly_white",
                          title=dict(text=_title("Training curves", None, dataset_label), x=0.01,
                                     font=dict(size=15)),
                          legend=dict(orientation="h", yanchor="top", y=-0.2, x=0, font=dict(size=11)),
                          hovermode="closest", uirevision="keep")
        self.fig_curves = self.figure_class(fig)
        self.fig_params, self.param_annotations = self._params_figure(dataset_label, layer)
        self.fig_stats = self._stats_figure(dataset_label, layer)
        self._drawn: dict = {}  # what each figure part last showed, to skip unchanged parts

    NAMES = ("fig_curves", "fig_params", "fig_stats")

    @property
    def figures(self) -> tuple:
        return tuple(getattr(self, n) for n in self.NAMES)

    def _params_figure(self, dataset_label: str, layer: str):
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
        fig.update_layout(barmode="overlay", width=PANEL_WIDTH, height=PANEL_HEIGHT, template="plotly_white",
                          margin=dict(l=55, r=15, t=85, b=40),
                          title=dict(text=_title("γ and β", layer, dataset_label), x=0.01, font=dict(size=14)),
                          legend=dict(orientation="h", x=0, y=-0.22, font=dict(size=11)))
        return self.figure_class(fig), [a.to_plotly_json() for a in fig.layout.annotations]

    def _stats_figure(self, dataset_label: str, layer: str):
        fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                            subplot_titles=("mean of the layer input", "variance of the layer input"))
        for col in (1, 2):
            fig.add_trace(go.Bar(x=[], y=[], name="running (used in eval)", marker_color="#60a5fa",
                                 showlegend=col == 1, legendgroup="running"), row=1, col=col)
            fig.add_trace(go.Scatter(x=[], y=[], mode="markers", name="this batch",
                                     marker=dict(color=CHANGE_COLOR, symbol="x", size=6),
                                     showlegend=col == 1, legendgroup="batch"), row=1, col=col)
        fig.update_xaxes(title_text="channel")
        fig.update_layout(width=PANEL_WIDTH, height=PANEL_HEIGHT, template="plotly_white",
                          margin=dict(l=55, r=15, t=85, b=40),
                          title=dict(text=_title("running vs batch statistics", layer, dataset_label), x=0.01,
                                     font=dict(size=14)),
                          legend=dict(orientation="h", x=0, y=-0.22, font=dict(size=11)), bargap=0.15)
        return self.figure_class(fig)

    # ------------------------------------------------------------------ rebuilding a deaf figure
    def stale(self, timeout: float) -> list[LiveFigure]:
        return [f for f in self.figures if f.stale(timeout)]

    def waiting(self) -> bool:
        return any(f.waiting() for f in self.figures)

    def rebuild(self, old: LiveFigure) -> LiveFigure:
        """Replace ``old`` (one of the figures) by a copy with the same data; returns the copy.
        The caller puts it in the page and closes ``old``."""
        new = old.copy_widget()
        for name in self.NAMES:
            if getattr(self, name) is old:
                setattr(self, name, new)
        return new

    # ------------------------------------------------------------------ drawing
    def draw(self, current: History | None, earlier: list[History], layer_run: History | None,
             layer: str, dataset_label: str, force: bool = False) -> None:
        """Show ``current`` (bold) over ``earlier`` (faded, the last EARLIER_SLOTS), and layer
        ``layer`` of ``layer_run``. ``force`` redraws parts that seem unchanged."""
        self.draw_curves(current, earlier[-EARLIER_SLOTS:], dataset_label, force)
        self.draw_layer(layer_run, layer, dataset_label, force)

    def draw_curves(self, current: History | None, earlier: list[History], dataset_label: str,
                    force: bool = False) -> None:
        fig = self.fig_curves
        runs = dict(enumerate(earlier))
        runs[EARLIER_SLOTS] = current
        title = _title("Training curves", None, dataset_label)
        changed = False
        with fig._sync_lock, fig.batch_update():
            for k in range(EARLIER_SLOTS + 1):
                h = runs.get(k)
                key = None if h is None else (id(h), len(h.snapshots), h.status, h is current)
                if force or self._drawn.get(("curve", k)) != key:
                    self._drawn[("curve", k)] = key
                    self._draw_slot([fig.data[i] for i in self.slots[k]], h, current)
                    changed = True
            changed |= self._draw_changes(fig, current, force)
            if self._drawn.get("curves_title") != title:
                self._drawn["curves_title"] = title
                fig.layout.title.text = title
                changed = True
        if changed:
            fig.sent()

    @staticmethod
    def _draw_slot(traces, h: History | None, current: History | None) -> None:
        if h is None:
            for tr in traces:
                tr.x, tr.y, tr.showlegend = [], [], False
            return
        x, loss, acc, xt, tacc = series(h)
        loss = np.where(np.isfinite(loss) & (loss > 0), loss, np.nan)  # log axis: hide 0, inf, nan
        traces[0].x, traces[0].y = x, loss
        traces[1].x, traces[1].y = x, acc
        traces[2].x, traces[2].y = xt, tacc
        name = legend_name(h, current)
        for tr in traces:
            tr.name = name
        traces[0].showlegend = True

    def _draw_changes(self, fig, current: History | None, force: bool) -> bool:
        """A dashed line in each panel at the first step that used a new value, labelled.
        Returns whether anything was drawn."""
        changes = tuple((c.step, c.name, c.new) for c in current.changes) if current is not None else ()
        if not force and self._drawn.get("marks") == changes:
            return False
        self._drawn["marks"] = changes
        shapes, notes = list(self.base_shapes), list(self.base_annotations)
        for i, (step, name, new) in enumerate(changes):
            for c in ("", "2", "3"):
                shapes.append(dict(type="line", xref=f"x{c}", yref=f"y{c} domain", x0=step, x1=step,
                                   y0=0, y1=1, line=dict(color=CHANGE_COLOR, width=1.5, dash="dash")))
            notes.append(dict(x=step, y=1 - 0.09 * (i % 4), xref="x", yref="y domain",
                              text=f"{SHORT_NAMES.get(name, name)}→{fmt_value(new)}", showarrow=False,
                              xanchor="left", font=dict(size=11, color=CHANGE_COLOR),
                              bgcolor="rgba(255,255,255,0.8)"))
        fig.layout.shapes = shapes
        fig.layout.annotations = notes
        return True

    @staticmethod
    def layer_snapshots(h: History | None, layer: str):
        """(first, last) snapshot of ``h`` that has ``layer``, or (None, None)."""
        if h is None or not h.snapshots:
            return None, None
        with_layer = [s for s in (h.snapshots[0], h.snapshots[-1]) if layer in s.layers]
        if not with_layer:
            return None, None
        return with_layer[0], with_layer[-1]

    def draw_layer(self, h: History | None, layer: str, dataset_label: str, force: bool = False) -> None:
        first, last = self.layer_snapshots(h, layer)
        key = (id(h), layer, dataset_label, None if last is None else (last.step, last.kind))
        if not force and self._drawn.get("layer") == key:
            return
        self._drawn["layer"] = key
        empty = np.array([], dtype=float)
        if last is None:
            sub = "no run yet" if h is None else (
                f"this model has no normalisation layer {layer}" if h.snapshots else "waiting for the first snapshot")
            values = dict(g0=empty, g1=empty, b0=empty, b1=empty, rm=empty, rv=empty, bm=empty, bv=empty)
        else:
            st0, st = first.layers[layer], last.layers[layer]
            values = {k: np.asarray(v, dtype=float) for k, v in dict(
                g0=st0.gamma, g1=st.gamma, b0=st0.beta, b1=st.beta, rm=st.running_mean, rv=st.running_var,
                bm=st.batch_mean, bv=st.batch_var).items()}
            n = max(len(values["g1"]), len(values["bm"]))
            sub = f"{n} channels · grey: first snapshot (step {first.step}) · blue: step {last.step}"
            if not len(values["rm"]):
                sub += " · no running statistics: this norm uses each example's own"
        self._draw_params(values, layer, dataset_label, sub)
        self._draw_stats(values, layer, dataset_label, last, sub)

    def _draw_params(self, v: dict, layer: str, dataset_label: str, sub: str) -> None:
        fp = self.fig_params
        with fp._sync_lock, fp.batch_update():
            fp.data[0].x, fp.data[1].x, fp.data[2].x, fp.data[3].x = v["g0"], v["g1"], v["b0"], v["b1"]
            fp.layout.title.text = (_title("γ and β", layer, dataset_label)
                                    + f"<br><span style='font-size:11px'>{sub}</span>")
            notes = [dict(a) for a in self.param_annotations]
            if len(v["g1"]):
                notes[0]["text"] = f"γ (scale): mean {v['g1'].mean():.3f}, sd {v['g1'].std():.3f}"
                notes[1]["text"] = f"β (shift): mean {v['b1'].mean():.3f}, sd {v['b1'].std():.3f}"
            fp.layout.annotations = notes
        fp.sent()

    def _draw_stats(self, v: dict, layer: str, dataset_label: str, last, sub: str) -> None:
        fs = self.fig_stats
        rm, rv, bm, bv = v["rm"], v["rv"], v["bm"], v["bv"]
        ch = np.arange(max(len(rm), len(bm)), dtype=float)
        if last is None:
            note = sub
        elif len(rm):
            note = f"step {last.step} · bars: running estimate (used in eval) · ×: the current training batch"
        else:
            note = f"step {last.step} · ×: the current training batch (this norm keeps no running estimate)"
        with fs._sync_lock, fs.batch_update():
            fs.data[0].x, fs.data[0].y = ch[:len(rm)], rm
            fs.data[1].x, fs.data[1].y = ch[:len(bm)], bm
            fs.data[2].x, fs.data[2].y = ch[:len(rv)], rv
            fs.data[3].x, fs.data[3].y = ch[:len(bv)], bv
            fs.layout.title.text = (_title("running vs batch statistics", layer, dataset_label)
                                    + f"<br><span style='font-size:11px'>{note}</span>")
        fs.sent()


# ---------------------------------------------------------------------------------- replay
# A saved run played back: plotly frames, a play button and a step slider. Nothing needs a
# kernel: the figure is plain plotly (a static HTML page, a notebook output, the course site).

REPLAY_HEIGHT = 840
# The replay's bottom band, from the plot area down (px): the row-2 axis titles, the legend (up to
# three lines on a 390-px phone), the ▶/❚❚ buttons on their own row, then the step slider across the
# whole width with its "step N" label: nothing shares a row, so nothing overlaps at any width.
_REPLAY_TOP, _REPLAY_BOTTOM = 95, 250
_BAND = dict(axis=42, legend=62, buttons=44)
_REPLAY_TRACES = ("loss", "train acc", "test acc", "γ first", "γ now", "β first", "β now",
                  "running mean", "batch mean", "running var", "batch var")
_ANIMATED = (0, 1, 2, 4, 6, 7, 8, 9, 10)  # trace indices a frame updates (3, 5: the start, fixed)


def _replay_runs(source) -> list[History]:
    from pathlib import Path

    from .history import load_histories

    if isinstance(source, History):
        return [source]
    if isinstance(source, (str, Path)):
        if not Path(source).is_file():
            raise ValueError(f"{source} is not a file; give a bnviz_runs.json saved by the lab "
                             "(Save runs) or save_histories(), a History, or a list of Histories")
        return load_histories(source)
    if isinstance(source, (list, tuple)) and all(isinstance(h, History) for h in source):
        return list(source)
    raise ValueError(f"replay() takes a file path, a History or a list of Histories, not {type(source).__name__}")


def _replay_pick(runs: list[History], run) -> History:
    """The run to replay: an index into ``runs`` (default -1, the last), or a uid or label."""
    if not runs:
        raise ValueError("there is no run to replay (the file holds no runs)")
    labels = [f"{i}: {h.label} ({h.status})" for i, h in enumerate(runs)]
    if isinstance(run, int) and not isinstance(run, bool):
        if -len(runs) <= run < len(runs):
            h = runs[run]
        else:
            raise ValueError(f"run={run} is out of range; valid: 0..{len(runs) - 1} (or -1); runs: {labels}")
    else:
        found = [h for h in runs if run in (h.uid, h.label, h.config.label)]
        if not found:
            raise ValueError(f"run={run!r} matches no run's uid or label; valid: an index or one of {labels}")
        h = found[-1]
    if not h.snapshots:
        raise ValueError(f"run {h.label!r} has no snapshots (status {h.status}): nothing to replay")
    return h


def _replay_layer(h: History, layer: str | None) -> str:
    """``layer``, checked, or 'fc1' (as in the lab), else the run's first normalisation layer."""
    names = [n for n, st in h.snapshots[-1].layers.items() if st.gamma or st.running_mean]
    if layer is None:
        if not names:
            raise ValueError(f"run {h.label!r} has no normalisation layer to show (model without norm)")
        return "fc1" if "fc1" in names else names[0]  # the lab's default: 120 channels fill a histogram
    if layer not in names:
        raise ValueError(f"layer={layer!r} is not a normalisation layer of this run; valid: {names}")
    return layer


def _replay_snapshots(h: History, layer: str, max_frames: int) -> list:
    """At most ``max_frames`` snapshots with ``layer``, evenly spread; the first, the last and
    those on either side of every live change always kept."""
    snaps = [s for s in h.snapshots if layer in h.snapshots[-1].layers and layer in s.layers]
    if len(snaps) <= max_frames:
        return snaps
    keep = {0, len(snaps) - 1}
    for c in h.changes:
        i = next((j for j, s in enumerate(snaps) if s.step >= c.step), len(snaps) - 1)
        keep.update({max(i - 1, 0), i})
    spare = max(max_frames - len(keep), 0)
    keep.update(round(j * (len(snaps) - 1) / max(spare - 1, 1)) for j in range(spare))
    return [snaps[j] for j in sorted(keep)]


def _bins(values: list[list[float]], n: int = 24) -> dict:
    flat = np.concatenate([np.asarray(v, dtype=float) for v in values if len(v)] or [np.zeros(1)])
    flat = flat[np.isfinite(flat)]
    lo, hi = (float(flat.min()), float(flat.max())) if flat.size else (0.0, 1.0)
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5
    return dict(start=lo, end=hi + (hi - lo) / n * 1e-3, size=(hi - lo) / n)


def _replay_data(h: History, s, layer: str) -> list[dict]:
    """The animated traces' data at snapshot ``s`` (in ``_ANIMATED`` order)."""
    upto = h.snapshots[:next(i for i, p in enumerate(h.snapshots) if p is s) + 1]
    steps = [p for p in upto if p.kind == "step"]
    ep = [p for p in upto if p.kind == "epoch" and p.test_acc is not None]
    st = s.layers[layer]
    loss = [p.loss if np.isfinite(p.loss) and p.loss > 0 else None for p in steps]
    ch = lambda v: list(range(len(v)))  # noqa: E731 - channel numbers
    return [dict(x=[p.step for p in steps], y=loss), dict(x=[p.step for p in steps], y=[p.train_acc for p in steps]),
            dict(x=[p.step for p in ep], y=[p.test_acc for p in ep]), dict(x=st.gamma), dict(x=st.beta),
            dict(x=ch(st.running_mean), y=st.running_mean), dict(x=ch(st.batch_mean), y=st.batch_mean),
            dict(x=ch(st.running_var), y=st.running_var), dict(x=ch(st.batch_var), y=st.batch_var)]


def _replay_caption(h: History, s) -> str:
    return (f"step {s.step} · epoch {s.epoch} · lr {fmt_value(s.lr)} · momentum {fmt_value(s.bn_momentum)}"
            f" · batch {s.batch_size} · loss {s.loss:.3f}, train acc {s.train_acc:.3f}"
            + (f", test acc {s.test_acc:.3f}" if s.test_acc is not None else ""))


def _replay_figure(h: History, layer: str, snaps: list) -> go.Figure:
    """The empty grid: curves on top (loss wide), γ, β, mean and variance of ``layer`` below."""
    fig = make_subplots(rows=2, cols=4, vertical_spacing=0.2, horizontal_spacing=0.07,
                        specs=[[{"colspan": 2}, None, {}, {}], [{}, {}, {}, {}]],
                        subplot_titles=("training loss (log scale)", "training accuracy", "test accuracy",
                                        f"γ of {layer}", f"β of {layer}", "mean: running vs batch",
                                        "variance: running vs batch"))
    first = snaps[0].layers[layer]
    line = lambda w: dict(color=CURRENT_COLOR, width=w)  # noqa: E731
    fig.add_trace(go.Scatter(x=[], y=[], mode="lines", name="training loss", line=line(2.5)), row=1, col=1)
    fig.add_trace(go.Scatter(x=[], y=[], mode="lines", name="training accuracy", line=line(2.5)), row=1, col=3)
    fig.add_trace(go.Scatter(x=[], y=[], mode="lines+markers", name="test accuracy", line=line(2.5)), row=1, col=4)
    for col, key in ((1, "gamma"), (2, "beta")):
        everything = [getattr(s.layers[layer], key) for s in snaps]
        bins = _bins(everything)
        fig.add_trace(go.Histogram(x=getattr(first, key), xbins=bins, autobinx=False, marker_color="#9ca3af",
                                   opacity=0.55, name=f"step {snaps[0].step} (start)", showlegend=col == 1,
                                   legendgroup="start"), row=2, col=col)
        fig.add_trace(go.Histogram(x=[], xbins=bins, autobinx=False, marker_color=CURRENT_COLOR, opacity=0.75,
                                   name="this step", showlegend=col == 1, legendgroup="now"), row=2, col=col)
    for col in (3, 4):
        fig.add_trace(go.Bar(x=[], y=[], marker_color="#60a5fa", name="running (used in eval)",
                             showlegend=col == 3), row=2, col=col)
        fig.add_trace(go.Scatter(x=[], y=[], mode="markers", name="this batch", showlegend=col == 3,
                                 marker=dict(color=CHANGE_COLOR, symbol="x", size=6)), row=2, col=col)
    return fig


def _replay_axes(fig: go.Figure, h: History, layer: str, snaps: list) -> None:
    """Fixed ranges (the picture must not jump between frames) and the live-change marks."""
    last = max(s.step for s in h.snapshots)
    for col in (1, 3, 4):
        fig.update_xaxes(range=[0, last * 1.02 + 1], title_text="step", row=1, col=col)
    losses = [s.loss for s in h.steps if np.isfinite(s.loss) and s.loss > 0] or [1.0]
    fig.update_yaxes(type="log", range=[np.log10(min(losses)) - 0.1, np.log10(max(losses)) + 0.1], row=1, col=1)
    for col in (3, 4):
        fig.update_yaxes(range=[0, 1.02], row=1, col=col)
    for col, key in ((3, ("running_mean", "batch_mean")), (4, ("running_var", "batch_var"))):
        vals = np.concatenate([np.asarray(getattr(s.layers[layer], k), dtype=float) for s in snaps for k in key]
                              or [np.zeros(1)])
        vals = vals[np.isfinite(vals)] if vals.size else np.zeros(1)
        lo, hi = min(float(vals.min()), 0.0), max(float(vals.max()), 0.0)
        pad = (hi - lo) * 0.05 or 0.5
        fig.update_yaxes(range=[lo - pad, hi + pad], row=2, col=col)
        fig.update_xaxes(title_text="channel", row=2, col=col)
    for i, c in enumerate(h.changes):
        for col in (1, 3, 4):
            fig.add_vline(x=c.step, line=dict(color=CHANGE_COLOR, width=1.5, dash="dash"), row=1, col=col)
        fig.add_annotation(x=c.step, y=1 - 0.1 * (i % 4), xref="x", yref="y domain", showarrow=False,
                           text=f"{SHORT_NAMES.get(c.name, c.name)}→{fmt_value(c.new)}", xanchor="left",
                           font=dict(size=11, color=CHANGE_COLOR), bgcolor="rgba(255,255,255,0.8)")


def _replay_controls(snaps: list, frame_ms: int) -> dict:
    play = dict(label="▶ Play", method="animate",
                args=[None, dict(frame=dict(duration=frame_ms, redraw=True), fromcurrent=True,
                                 transition=dict(duration=0), mode="immediate")])
    pause = dict(label="❚❚ Pause", method="animate",
                 args=[[None], dict(frame=dict(duration=0, redraw=False), mode="immediate",
                                    transition=dict(duration=0))])
    steps = [dict(label=str(s.step), method="animate",
                  args=[[f"f{k}"], dict(mode="immediate", frame=dict(duration=0, redraw=True),
                                        transition=dict(duration=0))]) for k, s in enumerate(snaps)]
    plot_h = REPLAY_HEIGHT - _REPLAY_TOP - _REPLAY_BOTTOM
    below = lambda px: -px / plot_h  # noqa: E731  (paper coordinates below the plot area)
    return dict(updatemenus=[dict(type="buttons", direction="left", x=0, xanchor="left", yanchor="top",
                                  y=below(_BAND["axis"] + _BAND["legend"]), pad=dict(r=10, t=0),
                                  showactive=False, buttons=[play, pause])],
                sliders=[dict(active=0, steps=steps, x=0, len=1, xanchor="left", yanchor="top",
                              y=below(_BAND["axis"] + _BAND["legend"] + _BAND["buttons"]),
                              currentvalue=dict(prefix="step ", font=dict(size=13, color="#111827"), xanchor="left"),
                              font=dict(size=1, color="rgba(0,0,0,0)"),  # no per-step labels: they pile up
                              ticklen=3, minorticklen=0, pad=dict(t=8, b=4))])


def replay(source, run=-1, layer: str | None = None, max_frames: int = 60, frame_ms: int = 250) -> go.Figure:
    """A saved run, played back: a plotly figure with frames, a ▶ Play button and a step slider.

    ``source``: a ``bnviz_runs.json`` (the lab's *Save runs*, or :func:`~bnviz.history.save_histories`),
    a :class:`History`, or a list of them; ``run``: which one (an index, default -1 = the last,
    or a uid or label). Each frame is one snapshot: the loss, training and test accuracy up to that
    step (top), and, for ``layer`` (default 'fc1' as in the lab, else the first norm layer), the histograms of γ
    and β across channels (grey: the first snapshot), and its running mean/variance (bars, used
    in eval) beside the training batch's (×). Dashed red lines mark live changes (e.g. the lr
    moved mid-run). At most ``max_frames`` frames (evenly spread; the steps around each change
    kept); ``frame_ms`` per frame when playing. Works anywhere plotly does: ``replay(path).show()``.
    """
    if not isinstance(max_frames, int) or isinstance(max_frames, bool) or max_frames < 2:
        raise ValueError(f"max_frames={max_frames!r} is not valid; valid: an integer >= 2")
    h = _replay_pick(_replay_runs(source), run)
    layer = _replay_layer(h, layer)
    snaps = _replay_snapshots(h, layer, max_frames)
    fig = _replay_figure(h, layer, snaps)
    _replay_axes(fig, h, layer, snaps)
    frames = []
    for k, s in enumerate(snaps):
        frames.append(go.Frame(name=f"f{k}", traces=list(_ANIMATED), data=[
            go.Scatter(**d) if i not in (4, 6) else go.Histogram(**d)
            for i, d in zip(_ANIMATED, _replay_data(h, s, layer))],
            layout=dict(title_text=_replay_title(h, s))))
    fig.frames = frames
    for i, d in zip(_ANIMATED, _replay_data(h, snaps[0], layer)):
        fig.data[i].update(**d)
    fig.update_layout(height=REPLAY_HEIGHT, autosize=True, template="plotly_white", barmode="overlay",
                      title=dict(text=_replay_title(h, snaps[0]), x=0.01, font=dict(size=14)),
                      margin=dict(l=55, r=20, t=_REPLAY_TOP, b=_REPLAY_BOTTOM), hovermode="closest", bargap=0.15,
                      legend=dict(orientation="h", x=0, xanchor="left", yanchor="top", font=dict(size=11),
                                  y=-_BAND["axis"] / (REPLAY_HEIGHT - _REPLAY_TOP - _REPLAY_BOTTOM)),
                      **_replay_controls(snaps, frame_ms))
    fig.update_annotations(font_size=12)
    return fig


def _replay_title(h: History, s) -> str:
    return (f"<b>Replay</b> of {html.escape(h.label)} — {html.escape(h.dataset_label or 'data set not recorded')}"
            f"<br><span style='font-size:12px'>{html.escape(_replay_caption(h, s))}</span>")
