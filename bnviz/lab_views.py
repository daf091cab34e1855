"""How the lab puts its figures on the page. Two ways, chosen by ``show_lab(drawing=...)``:

* :class:`WidgetView` (``"widget"``, the default in JupyterLab, Notebook 7 and Voila): the
  figures are plotly FigureWidgets inside the lab's box; a draw changes their data in place (one
  small message per figure). It needs the page to load plotly's widget. A figure whose browser
  model stops answering is rebuilt from its data (at most ``MAX_REVIVALS`` times per lab).
* :class:`DisplayView` (``"display"``, the default in Colab and VS Code, see
  :func:`bnviz.colab.default_drawing`): the figures are plain plotly figures, each in its own
  output with a display id (``IPython.display.display(..., display_id=True)``); a draw re-sends
  the figures that changed through their handles (``DisplayHandle.update``) as HTML. Nothing but
  core ipywidgets (the controls) and plain outputs is used: what Colab renders without a custom
  widget manager. A re-sent figure is redrawn whole, so the lab draws at most once a second.

Both have ``widget`` (what holds the controls), ``show()`` (display everything), and
``after_draw(force)`` (called by the lab after each draw, any thread).
"""
from __future__ import annotations

import threading

import ipywidgets as W

from .colab import default_drawing, enable_custom_widgets, in_colab
from .lab_charts import LabCharts, LiveFigure

__all__ = ["WidgetView", "DisplayView", "build_view", "pick_drawing", "MAX_REVIVALS", "DRAWINGS"]

MAX_REVIVALS = 6  # figure rebuilds per lab before it gives up and asks for a page reload
DRAWINGS = ("widget", "display")


class WidgetView:
    """FigureWidgets in one box with the controls (see the module docstring)."""

    drawing = "widget"
    min_interval = 0.1  # s between draws: 10 per second at most

    def __init__(self, charts: LabCharts, head: list, layer_row, log, say, revive_after: float = 8.0):
        self.charts, self.say, self.revive_after = charts, say, revive_after
        self.revivals = 0  # figures rebuilt because their browser model stopped listening
        self._timer = None
        self._lock = threading.RLock()
        c = charts
        self.widget = W.VBox([*head, c.fig_curves, layer_row,
                              W.HBox([c.fig_params, c.fig_stats], layout=W.Layout(flex_flow="row wrap")), log],
                             layout=W.Layout(width="100%"))
        self.widget.add_class("bnviz-lab")

    def show(self) -> None:
        from IPython.display import display

        if not _in_ipython():
            return
        enable_custom_widgets()  # Colab shows a FigureWidget only with its custom widget manager
        display(self.widget)

    def after_draw(self, force: bool = False) -> None:
        """Rebuild figures whose browser model stopped answering; re-check later while any waits."""
        with self._lock:
            for fig in self.charts.stale(self.revive_after):
                self._revive(fig)
            if self.charts.waiting() and not (self._timer and self._timer.is_alive()):
                # a run may end (no more draws) before an unanswered update times out: check again then
                self._timer = threading.Timer(self.revive_after + 0.5, self._timer_check)
                self._timer.daemon = True
                self._timer.start()

    def _timer_check(self) -> None:
        try:
            self.after_draw()
        except Exception as err:  # noqa: BLE001 - a timer thread has nobody else to tell
            self.say(f"Checking the charts failed: {type(err).__name__}: {err}", "warning")

    def _revive(self, old: LiveFigure) -> None:
        """Replace ``old`` in the page by a new widget with the same data and layout."""
        if self.revivals >= MAX_REVIVALS:
            if self.revivals == MAX_REVIVALS:
                self.revivals += 1
                self.say("A chart stopped receiving updates from the kernel (its browser model did not load). "
                         "Reload the page to get it back; training and the other charts are not affected. "
                         "If it keeps happening, use show_lab(drawing='display').", "warning")
            return
        self.revivals += 1
        new = self.charts.rebuild(old)
        _swap_child(self.widget, old, new)
        old.close()


class DisplayView:
    """Plain figures in outputs with display ids, re-sent when they change (see the module docstring)."""

    drawing = "display"
    min_interval = 1.0  # s between draws: each update re-renders whole figures

    def __init__(self, charts: LabCharts, head: list, layer_row, log, say):
        self.charts, self.say = charts, say
        self.revivals = 0  # nothing to revive: kept for the lab's interface
        self.widget = W.VBox(head, layout=W.Layout(width="100%"))
        self.widget.add_class("bnviz-lab")
        self.layer_row, self.log = layer_row, log
        self.handles: dict[str, object] = {}
        self.updates = 0  # figures re-sent through a handle (tests, the curious)
        self._lock = threading.Lock()

    def show(self) -> None:
        """Display the controls, then each figure in its own output (the layer picker above the
        two layer figures, the log last)."""
        from IPython.display import display

        if not _in_ipython():
            return
        with self._lock:
            _load_plotlyjs()
            display(self.widget)
            self.handles["fig_curves"] = display(_bundle(self.charts.fig_curves), raw=True, display_id=True)
            display(self.layer_row)
            for name in ("fig_params", "fig_stats"):
                self.handles[name] = display(_bundle(getattr(self.charts, name)), raw=True, display_id=True)
            display(self.log)
            for fig in self.charts.figures:
                fig.dirty = False

    def after_draw(self, force: bool = False) -> None:
        """Re-send the figures that changed since they were last sent (all of them if ``force``)."""
        with self._lock:
            for name in LabCharts.NAMES:
                fig, handle = getattr(self.charts, name), self.handles.get(name)
                if handle is None or not (fig.dirty or force):
                    continue
                fig.dirty = False
                handle.update(_bundle(fig), raw=True)
                self.updates += 1


def _in_ipython() -> bool:
    """True inside IPython or a Jupyter kernel. In plain Python there is no page to show the lab
    on (``display`` would print its parts as text): the lab still trains, keeps ``lab.histories``
    and updates its figures in memory."""
    from IPython.core.interactiveshell import InteractiveShell

    return InteractiveShell.initialized()


def _bundle(fig) -> dict:
    """The figure as one HTML output. In Colab: plotly's Colab renderer (the HTML loads plotly.js
    from its CDN). Elsewhere: the figure's HTML without plotly.js, drawn by the plotly.js that
    :meth:`DisplayView.show` put on the page once (plotly's "notebook" renderer). Built here, not
    by displaying the figure: plotly's ``_ipython_display_`` ignores display ids, its default
    renderers re-send the whole plotly.js (about 5 MB) with every figure, and JupyterLab's plotly
    mimetype renderer does not redraw an updated output (checked in Chromium)."""
    import plotly.io as pio

    with fig._sync_lock:
        fig_dict = fig.to_dict()
    if in_colab():
        return pio.renderers["colab"].to_mimebundle(fig_dict)
    html = pio.to_html(fig_dict, include_plotlyjs=False, full_html=False, validate=False)
    return {"text/html": html, "text/plain": "<plotly figure: the bnviz lab's chart>"}


def _load_plotlyjs() -> None:
    """Put plotly.js on the page once (outside Colab), as plotly's notebook renderer does."""
    import plotly.io as pio

    if not in_colab():
        pio.renderers["notebook"].activate()


def pick_drawing(drawing: str | None) -> str:
    """``drawing`` if valid, the default where the lab runs if None; ValueError otherwise."""
    drawing = default_drawing() if drawing is None else drawing
    if drawing not in DRAWINGS:
        raise ValueError(f"invalid lab setting: drawing={drawing!r}; valid: {', '.join(map(repr, DRAWINGS))} "
                         "or None (display in Colab and VS Code, widget elsewhere)")
    return drawing


def build_view(drawing: str, charts: LabCharts, controls, status, log, say, revive_after: float = 8.0):
    """The lab's page: title, controls, buttons, status line and messages, then the figures,
    the layer picker and the log, as a :class:`WidgetView` or a :class:`DisplayView`."""
    title = W.HTML(
        "<div style='font-size:20px;font-weight:700;color:#111827'>Batch normalization lab</div>"
        "<div style='color:#4b5563;font-size:13px'>Train LeNet live. Change the learning rate, BN momentum "
        "or eps during a run and watch the curves and the per-channel statistics react.</div>")
    hint = W.HTML("<span style='color:#4b5563;font-size:12px'>γ/β start at 1/0 and spread out as each "
                  "channel learns its own scale and shift.</span>")
    head = [title, controls.boxes(), controls.button_rows(), status.w_status, status.w_message]
    layer_row = W.HBox([controls.w_layer, hint], layout=W.Layout(flex_flow="row wrap"))
    if drawing == "display":
        return DisplayView(charts, head, layer_row, log, say)
    return WidgetView(charts, head, layer_row, log, say, revive_after)


def _swap_child(box: W.Widget, old: W.Widget, new: W.Widget) -> bool:
    """Replace ``old`` by ``new`` among the children of ``box`` or of a box inside it."""
    children = getattr(box, "children", None)
    if not children:
        return False
    if any(c is old for c in children):
        box.children = tuple(new if c is old else c for c in children)
        return True
    return any(_swap_child(c, old, new) for c in children)
