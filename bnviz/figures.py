"""Static figures of the experiment chapters (plotly), from :mod:`bnviz.experiments` results.

Rules every figure here follows: its title names the data set (SYNTHETIC on the stand-in);
axes have readable titles (never raw column names); accuracy axes run from 0 to 1; a run
that diverged has no accuracy and is drawn on a separate "diverged" marker row below the
axis, never at a made-up accuracy (which would sit on the chance line).
"""
from __future__ import annotations

import math

from .comparisons import Comparison
from .runs import GridResult, Run
from .sweeps import MaxLR, sweep_summary
from .history import History

__all__ = ["READABLE", "readable", "curves_figure", "bar_figure", "comparison_figure", "lr_sweep_figure",
           "line_figure", "landscape_figure", "saturation_figure", "ratio_figure", "forest_figure", "short_label"]

_FAILED = ("diverged", "error")
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]

# Axis and legend titles for the columns the chapters plot.
READABLE = {
    "test_acc": "test accuracy", "train_acc": "training accuracy", "loss": "training loss",
    "gap": "train − test accuracy", "acc": "test accuracy (recomputed BN statistics, mean of last 3 epochs)",
    "mean": "test accuracy (recomputed BN statistics, mean of last 3 epochs)", "lr": "learning rate", "batch_size": "batch size",
    "mean_noise": "noise of the batch mean<br>(std over batches ÷ population std)",
    "var_noise": "noise of the batch variance<br>(std over batches ÷ population variance)",
    "iid_mean_noise": "1/√m (independent values)", "step": "training step", "epoch": "epoch",
    "layer": "layer", "grad_norm": "‖∂loss/∂W‖", "norm": "normalisation", "model": "model",
    "network": "network", "weight_norm": "‖W‖", "update_data": "update ÷ data (lr·std(∇W)/std(W))",
    "saturated": "fraction of saturated sigmoid outputs", "lr_label": "learning rate",
}


def readable(name: str) -> str:
    """The axis title for a column name (the name itself, with _ as spaces, if unknown)."""
    return READABLE.get(name, name.replace("_", " "))


def _wrap(title: str, width: int = 45) -> str:
    """A long axis title broken at the last space before ``width`` (plotly does not wrap)."""
    if "<br>" in title or len(title) <= width:
        return title
    cut = title.rfind(" ", 0, width)
    return title if cut < 0 else title[:cut] + "<br>" + title[cut + 1:]


def _log_ticks(fig, axis: str, values) -> None:
    """Few ticks on a log axis: at the data values when there are at most 10, else at powers of 10."""
    vals = sorted({float(v) for v in values if v is not None and v == v and v > 0})
    upd = fig.update_xaxes if axis == "x" else fig.update_yaxes
    if 0 < len(vals) <= 10:
        upd(tickvals=vals, ticktext=[f"{v:g}" for v in vals])
    else:
        upd(dtick=1)


def _runs(results) -> list[tuple[str, History]]:
    if isinstance(results, History):
        results = [results]
    if isinstance(results, Comparison):
        results = results.runs
    out = []
    for r in results:
        if isinstance(r, Run):
            out.append((r.label, r.history))
        elif isinstance(r, History):
            out.append((r.label, r))
        else:
            raise TypeError(f"expected a GridResult, Runs or Histories, got {type(r).__name__}")
    return out


def _dataset_label(hists) -> str:
    labels = sorted({h.dataset_label for h in hists if h.dataset_label})
    return " / ".join(labels) or "data set unknown"


TITLE_WIDTH = 38  # characters per title line: what a 358-px figure (a 390-px phone) shows at 16 px


def _title(text: str, dataset_label: str) -> dict:
    """The title, wrapped to :data:`TITLE_WIDTH` characters a line, and the data set once, on its
    own small line (the only place a figure names it: legends do not repeat it)."""
    text = text if "<br>" in text else short_label(text, TITLE_WIDTH)
    return {"text": f"{text}<br><sup>data: {dataset_label}</sup>", "x": 0.01, "xanchor": "left",
            "y": 0.985, "yref": "container", "yanchor": "top", "pad": {"t": 10}, "font": {"size": 16}}


def _legible(fig, legend_title: str | None = None, legend: bool = True):
    """What every figure here does for a 688-px column and a 390-px phone: the legend below the
    plot (horizontal, titled without the data set), the top margin fitted to the title's lines,
    axis titles kept clear of the tick labels."""
    title = fig.layout.title.text or ""
    lines = title.count("<br>") + 1
    above = any(a.yref == "paper" and (a.y or 0) >= 0.99 for a in fig.layout.annotations)  # subplot titles
    bottom = 60
    if legend:
        n = sum(1 for t in fig.data if t.showlegend is not False and t.name)
        bottom = 90 + 18 * min(max(n - 1, 0), 8)
        fig.update_layout(legend={"orientation": "h", "x": 0, "xanchor": "left", "y": 0, "yref": "container",
                                  "yanchor": "bottom", "font": {"size": 11},
                                  "title": {"text": legend_title or "", "side": "top left"}})
    top = 20 + 21 * lines + (28 if above else 0)
    fig.update_layout(margin={"t": top, "b": bottom, "l": 10, "r": 10, "autoexpand": True},
                      height=fig.layout.height or max(480, top + bottom + 280))
    fig.update_xaxes(automargin=True, title_standoff=6)
    fig.update_yaxes(automargin=True, title_standoff=6)
    return fig


def _log_y_ticks(fig, values, **where) -> None:
    """A log y axis with more than one labelled tick, each labelled in full (plotly's own 1-2-5
    labels read '5' for 0.5): 1-2-5 values over up to 2.5 decades, four values under a decade
    where fewer than two 1-2-5 values fall, powers of 10 beyond."""
    vals = [float(v) for v in values if v is not None and v == v and v > 0]
    if not vals:
        return
    lo, hi = math.log10(min(vals)), math.log10(max(vals))
    if hi - lo > 2.5:
        fig.update_yaxes(dtick=1, **where)
        return
    ticks = [m * 10.0 ** k for k in range(math.floor(lo) - 1, math.ceil(hi) + 1) for m in (1, 2, 5)
             if lo - 0.02 <= math.log10(m) + k <= hi + 0.02]
    if len(ticks) < 2:
        span = max(hi - lo, 0.02)
        ticks = [10 ** (lo - 0.05 * span + k * 1.1 * span / 3) for k in range(4)]
    digits = next(d for d in range(2, 8) if len({f"{t:.{d}g}" for t in ticks}) == len(ticks) or d == 7)
    fig.update_yaxes(tickvals=ticks, ticktext=[f"{t:.{digits}g}" for t in ticks], **where)


_METRICS = {"test_acc": "test accuracy", "train_acc": "training accuracy", "loss": "training loss",
            "gap": "train − test accuracy", "acc": "test accuracy (recomputed BN statistics, mean of last 3 epochs)",
            "precise_test_acc": "test accuracy (recomputed BN statistics)"}
_ACC_RANGE = [0, 1]


def curves_figure(results, metric: str = "test_acc", x: str = "epoch", title: str | None = None):
    """One line per run: ``metric`` ('test_acc', 'train_acc', 'loss') against 'epoch' (epoch
    snapshots) or 'step' (step snapshots; test accuracy exists only per epoch). Accuracy
    axes run from 0 to 1."""
    import plotly.graph_objects as go

    if metric not in ("test_acc", "train_acc", "loss"):
        raise ValueError(f"metric {metric!r} is not valid; valid: 'test_acc', 'train_acc', 'loss'")
    if x not in ("epoch", "step"):
        raise ValueError(f"x {x!r} is not valid; valid: 'epoch', 'step'")
    runs = _runs(results)
    fig = go.Figure()
    for label, h in runs:
        snaps = h.epochs if (x == "epoch" or metric == "test_acc") else h.steps
        pts = [(getattr(s, x), getattr(s, metric)) for s in snaps if getattr(s, metric) is not None]
        name = label if h.status == "finished" else f"{label} [{h.status}]"
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers", name=name))
    ds = _dataset_label([h for _, h in runs])
    fig.update_layout(title=_title(title or f"{_METRICS[metric]} per {x}", ds), xaxis_title=readable(x),
                      yaxis_title=_wrap(_METRICS[metric], 30), template="plotly_white")
    if metric != "loss":
        fig.update_yaxes(range=_ACC_RANGE)
    return _legible(fig)


def bar_figure(results, metrics=("train_acc", "test_acc"), title: str | None = None):
    """Grouped bars of the final ``metrics`` of each run (y axis 0–1, titled); runs that
    diverged are named as such and get no bar."""
    import plotly.graph_objects as go

    runs = _runs(results)
    bad = [m for m in metrics if m not in _METRICS or m == "loss"]
    if bad:
        raise ValueError(f"metrics {bad} not valid; valid: {sorted(set(_METRICS) - {'loss'})}")
    names = [label if h.status == "finished" else f"{label} [{h.status}]" for label, h in runs]
    fig = go.Figure()
    for m in metrics:
        vals = [Run(label, {}, h).row()[m] for label, h in runs]
        fig.add_trace(go.Bar(x=names, y=vals, name=_METRICS[m],
                             text=[None if v is None else f"{v:.3f}" for v in vals], textposition="outside"))
    ds = _dataset_label([h for _, h in runs])
    low = -0.2 if "gap" in metrics else 0
    fig.update_layout(title=_title(title or "final " + " and ".join(_METRICS[m] for m in metrics), ds),
                      barmode="group", template="plotly_white",
                      yaxis_title="accuracy" if "gap" not in metrics else "accuracy / gap")
    fig.update_yaxes(range=[low, 1.05])
    return _legible(fig)


def comparison_figure(cmp: Comparison, title: str | None = None, chance: float = 0.1, verdicts: bool = True,
                      pairs: dict[str, str] | None = None):
    """One bar per variant: the mean over seeds of :data:`bnviz.experiments.ACCURACY`, an error
    bar of ± one seed std, and each seed's value as a dot (so min–max shows; the mean is in the
    hover, not written over the dots). The y axis runs from 0 to 1. Under each bar: its verdict
    against its reference: ``pairs[variant]`` if given (e.g. a ReLU variant against the ReLU base;
    a variant missing from ``pairs`` gets no verdict), else the comparison's reference;
    ``verdicts=False``: none. A CAUTION cell is marked ⚠. A variant whose runs all diverged gets a
    ✕ on the 'diverged' row below the axis."""
    import plotly.graph_objects as go

    table = cmp.table()
    names = []
    for v in table["variant"]:
        ref = (pairs or {}).get(v) if pairs is not None else (None if v == cmp.reference else cmp.reference)
        flag = " ⚠" if cmp.causes(v) else ""
        if v == cmp.reference and pairs is None:
            sub = "reference"
        elif not verdicts or ref is None or ref == v:
            sub = ""
        else:
            sub = f"{cmp.contrast(ref, v).outcome.value} vs {ref}"
        names.append(f"{v}{flag}" + (f"<br><i>{sub}</i>" if sub else ""))
    fig = go.Figure()
    fig.add_trace(go.Bar(x=names, y=table["mean"], name="mean over seeds",
                         error_y={"type": "data", "array": table["std"].fillna(0), "visible": True},
                         hovertemplate="%{x}<br>mean %{y:.3f}<extra></extra>", marker_color="#9ecae1"))
    xs, ys = [], []
    for name, v in zip(names, table["variant"]):
        for a in cmp.values(v):
            if a is not None:
                xs.append(name)
                ys.append(a)
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", name="one seed", marker={"color": "#08306b", "size": 7}))
    dead = [n for n, m in zip(names, table["mean"]) if math.isnan(m)]
    if dead:
        fig.add_trace(go.Scatter(x=dead, y=[-0.08] * len(dead), mode="markers", name="all seeds diverged",
                                 marker={"symbol": "x", "size": 12, "color": "#d62728"}))
    fig.add_hline(y=chance, line_dash="dot", line_color="gray", annotation_text="chance",
                  annotation_position="bottom right")
    fig.update_layout(title=_title(title or "accuracy over seeds (bar: mean ± std; dots: seeds; ⚠: see CAUTION)",
                                   cmp.dataset_label),
                      yaxis_title="test accuracy (PreciseBN,<br>last 3 epochs)", template="plotly_white", bargap=0.4)
    ticks = [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    fig.update_yaxes(range=[-0.15 if dead else 0, 1], tickvals=([-0.08] if dead else []) + ticks,
                     ticktext=(["diverged"] if dead else []) + [f"{t:g}" for t in ticks], automargin=True)
    return _legible(fig)


def lr_sweep_figure(result: GridResult, maxima: dict[str, MaxLR] | None = None, title: str | None = None,
                    chance: float = 0.1):
    """Accuracy (:data:`bnviz.experiments.ACCURACY`, mean over seeds, error bars ± std) against
    lr (log axis), one line per model, on the same axes (0–1). An lr where a run diverged is
    marked with ✕ on a separate row labelled 'diverged' below the axis (with how many seeds
    diverged); ``maxima`` (from :func:`~bnviz.experiments.max_lr`) adds a dotted vertical line at
    each model's maximum lr."""
    import plotly.graph_objects as go

    table = sweep_summary(result)
    fig = go.Figure()
    row_y = -0.1
    any_bad = False
    for i, (model, rows) in enumerate(table.groupby("model", sort=False)):
        rows = rows.sort_values("lr")
        color = COLORS[i % len(COLORS)]
        ok = rows[rows["n"] > 0]
        fig.add_trace(go.Scatter(x=ok["lr"], y=ok["mean"], mode="lines+markers", name=model,
                                 line={"color": color},
                                 error_y={"type": "data", "array": ok["std"].fillna(0), "visible": True}))
        bad = rows[rows["diverged"] > 0]
        if len(bad):
            any_bad = True
            fig.add_trace(go.Scatter(x=bad["lr"], y=[row_y - 0.04 * i] * len(bad), mode="markers+text",
                                     name=f"{model}: diverged", marker={"symbol": "x", "size": 11, "color": color},
                                     text=[f"{d}/{d + n}" for d, n in zip(bad["diverged"], bad["n"])],
                                     textposition="middle right", textfont={"size": 9, "color": color}))
        if maxima and model in maxima and maxima[model].lr is not None:
            fig.add_vline(x=maxima[model].lr, line_dash="dot", line_color=color,
                          annotation_text=f"max lr {model}: {maxima[model].lr:g}")
    fig.add_hline(y=chance, line_dash="dot", line_color="gray", annotation_text="chance",
                  annotation_position="top left")
    fig.update_layout(title=_title(title or "accuracy against learning rate (mean ± std over seeds)",
                                   result.dataset_label),
                      xaxis_type="log", xaxis_title="learning rate (log scale)",
                      yaxis_title="test accuracy (PreciseBN,<br>last 3 epochs)", template="plotly_white")
    _log_ticks(fig, "x", table["lr"])
    ticks = [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    fig.update_yaxes(range=[-0.25 if any_bad else 0, 1], automargin=True,
                     tickvals=([row_y] if any_bad else []) + ticks,  # the ✕ row is named by its tick
                     ticktext=(["diverged ✕"] if any_bad else []) + [f"{t:g}" for t in ticks])
    return _legible(fig)


def line_figure(df, x: str, y: str, color: str | None = None, title: str = "", dataset_label: str = "",
                log_x: bool = False, log_y: bool = False, x_title: str | None = None, y_title: str | None = None,
                error_y: str | None = None, chance: float | None = None):
    """A line chart of a tidy table, titled with the data set, with readable axis and legend
    titles (:data:`READABLE`, or ``x_title``/``y_title``; long ones wrap); ``error_y`` names a
    column of error bar sizes (e.g. 'std'); ``chance`` draws a dotted chance line; log axes get
    ticks at the data values (at most 10) or at powers of 10."""
    import plotly.express as px

    if not dataset_label:
        raise ValueError("dataset_label is required: every chart names its data set")
    labels = {c: readable(c) for c in (x, y, color) if c}
    if x_title:
        labels[x] = x_title
    if y_title:
        labels[y] = y_title
    fig = px.line(df, x=x, y=y, color=color, markers=True, log_x=log_x, log_y=log_y, labels=labels,
                  error_y=error_y)
    fig.update_layout(title=_title(title, dataset_label),
                      xaxis_title=_wrap(labels[x] + (" (log scale)" if log_x else ""), 40),
                      yaxis_title=_wrap(labels[y] + (" (log scale)" if log_y else ""), 30), template="plotly_white")
    fig.update_yaxes(automargin=True)
    if log_x:
        _log_ticks(fig, "x", df[x])
    if log_y:
        _log_y_ticks(fig, df[y])
    if chance is not None:
        fig.add_hline(y=chance, line_dash="dot", line_color="gray", annotation_text="chance",
                      annotation_position="bottom right")
    return _legible(fig, labels.get(color, "") if color else None)  # a legend below even before traces are added


def landscape_figure(df, dataset_label: str):
    """Two panels from :func:`~bnviz.experiments.landscape_during_training`: the loss range along
    the gradient and the effective β-smoothness, against the training step, one line per model."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if not dataset_label:
        raise ValueError("dataset_label is required: every chart names its data set")
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.14,
                        subplot_titles=("loss range along the gradient (Lipschitzness)",
                                        "gradient change per step (β-smoothness)"))
    for i, (model, rows) in enumerate(df.groupby("model", sort=False)):
        c = COLORS[i % len(COLORS)]
        fig.add_trace(go.Scatter(x=rows["step"], y=rows["loss_range"], name=model, line={"color": c}), 1, 1)
        fig.add_trace(go.Scatter(x=rows["step"], y=rows["beta"], name=model, line={"color": c},
                                 showlegend=False), 2, 1)
    fig.update_yaxes(type="log")
    _log_y_ticks(fig, df["loss_range"], row=1, col=1)
    _log_y_ticks(fig, df["beta"], row=2, col=1)
    fig.update_yaxes(title_text="max − min of the loss<br>(log scale)", row=1, col=1)
    fig.update_yaxes(title_text="‖Δ∇L‖ / ‖η∇L‖<br>(log scale)", row=2, col=1)
    fig.update_xaxes(title_text="training step", row=2, col=1)
    fig.update_layout(title=_title("Loss landscape along the gradient, with and without BN", dataset_label),
                      template="plotly_white", height=620)
    for ann in fig.layout.annotations:
        ann.font.size = 12
    return _legible(fig)


def saturation_figure(df, dataset_label: str, steps: tuple[str, str] = ("start", "end")):
    """Karpathy-style histograms of each layer's sigmoid outputs (from
    :func:`~bnviz.experiments.health_during_training`): one row per model, one column per
    layer; the first probe (step 0) and the last are overlaid. The title of each panel gives
    the saturated fraction (outputs below 0.05 or above 0.95) at the end."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if not dataset_label:
        raise ValueError("dataset_label is required: every chart names its data set")
    models = list(dict.fromkeys(df["model"]))
    layers = list(dict.fromkeys(df["layer"]))
    titles = []
    for m in models:
        for lay in layers:
            d = df[(df.model == m) & (df.layer == lay)]
            titles.append(f"{lay}<br>{d.iloc[0]['saturated']:.0%}→{d.iloc[-1]['saturated']:.0%}")
    fig = make_subplots(rows=len(models), cols=len(layers), subplot_titles=titles, shared_yaxes=True,
                        vertical_spacing=0.3 if len(models) > 1 else 0.1, horizontal_spacing=0.04)
    for r, m in enumerate(models, 1):
        for c, lay in enumerate(layers, 1):
            d = df[(df.model == m) & (df.layer == lay)]
            for which, row, color in (("step 0", d.iloc[0], "#aaaaaa"), (f"step {d.iloc[-1]['step']}", d.iloc[-1], "#d62728")):
                edges = row["hist_edges"]
                mids = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
                fig.add_trace(go.Bar(x=mids, y=row["hist"], name=which, marker_color=color, opacity=0.6,
                                     showlegend=(r == 1 and c == 1)), r, c)
    fig.update_layout(barmode="overlay", template="plotly_white", height=260 * len(models) + 200,
                      title=_title("Sigmoid outputs per layer at step 0 (grey) and at the end (red); "
                                   "panel titles: saturated share start→end", dataset_label))
    fig.update_xaxes(range=[0, 1], tickvals=[0, 0.5, 1], ticktext=["0", ".5", "1"])
    fig.update_xaxes(title_text="sigmoid output", row=len(models), col=1)  # once: four would overprint
    for r, m in enumerate(models, 1):
        fig.update_yaxes(title_text=f"<b>{m}</b><br>share of outputs", row=r, col=1)
    for ann in fig.layout.annotations:
        ann.font.size = 11
    return _legible(fig)


def ratio_figure(df, dataset_label: str, y: str = "update_data"):
    """log10 of the update-to-data ratio (or ``y='grad_data'``) of each layer against the
    training step, one panel per model, one line per layer (from
    :func:`~bnviz.experiments.health_during_training`); a dotted line at 1e-3."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if not dataset_label:
        raise ValueError("dataset_label is required: every chart names its data set")
    models = list(dict.fromkeys(df["model"]))
    fig = make_subplots(rows=1, cols=len(models), subplot_titles=models, shared_yaxes=True)
    for c, m in enumerate(models, 1):
        d = df[df.model == m]
        for i, (lay, rows) in enumerate(d.groupby("layer", sort=False)):
            vals = [math.log10(v) if v > 0 else None for v in rows[y]]
            fig.add_trace(go.Scatter(x=rows["step"], y=vals, name=lay, line={"color": COLORS[i % len(COLORS)]},
                                     showlegend=(c == 1)), 1, c)
        fig.add_hline(y=-3, line_dash="dot", line_color="gray", col=c, row=1)
    what = "lr·std(∇W) / std(W)" if y == "update_data" else "std(∇W) / std(W)"
    fig.update_yaxes(title_text=f"log10 {what}", col=1)
    fig.update_xaxes(title_text="training step")
    fig.update_layout(title=_title(f"{'Update' if y == 'update_data' else 'Gradient'}-to-data ratio per layer "
                                   "(dotted: 1e-3)", dataset_label), template="plotly_white")
    return _legible(fig, "layer")


STATUS_STYLE = {  # status -> (legend name, colour, marker)
    "holds after Holm": ("holds after Holm", "#08519c", "circle"),
    "nominal": ("nominal (not kept by Holm)", "#e6550d", "diamond"),
    "within noise": ("within noise", "#969696", "circle-open"),
}


def short_label(text: str, width: int = 30) -> str:
    """``text`` broken into lines of at most ``width`` characters (at spaces), for axis labels
    that must fit a phone's width."""
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}" if line else w
    return "<br>".join(lines + ([line] if line else []))


def _forest_status(v) -> str:
    """A verdict's row colour: "holds after Holm", "nominal" or "within noise"."""
    decided = v.decided if hasattr(v, "decided") else v.significant
    if not decided:
        return "within noise"
    if hasattr(v, "names"):
        return "holds after Holm" if v.holm_status(words=False) == "holds after Holm" else "nominal"
    return "holds after Holm" if "holds" in v.holm_status() else "nominal"


def _forest_rows(items) -> tuple[dict, list[str], list[str]]:
    """The forest plot's points by status (x, y, CI minus/plus, hover text), the labels of rows
    without an interval, and every row's label (⚠ where a cell carries a CAUTION)."""
    rows = {key: ([], [], [], [], []) for key in STATUS_STYLE}
    missing, labels = [], []
    for n, v in items:
        lo, hi = v.ci
        label = short_label(n + (" ⚠" if getattr(v, "cautioned", False) else ""))
        labels.append(label)
        if lo != lo or hi != hi:  # NaN: no interval
            missing.append(label)
            continue
        xs, ys, minus, plus, text = rows[_forest_status(v)]
        xs.append(v.delta)
        ys.append(label)
        minus.append(v.delta - lo)
        plus.append(hi - v.delta)
        text.append(f"{n}<br>Δ {v.delta:+.3f} (95% CI {lo:+.3f} to {hi:+.3f}), p {v.p:.2g}")
    return rows, missing, labels


def forest_figure(verdicts, title: str = "Answers: Δ with its 95% interval", dataset_label: str = "",
                  names: list[str] | None = None):
    """A forest plot of a chapter's verdicts: one row per test, its Δ (other − reference,
    accuracy) and 95% interval, coloured by its status: holds after Holm (over the chapter's
    family), nominal (a 5% result Holm does not keep), within noise. A row whose cells carry a
    CAUTION is marked ⚠ (the cause is printed where the verdict was made). ``verdicts``: a
    :class:`~bnviz.course.Chapter` (its recorded verdicts, in order) or ``{name: Verdict}``;
    ``names``: only these rows. Rows without an interval (not comparable) are listed as such."""
    import plotly.graph_objects as go

    if hasattr(verdicts, "verdicts"):
        dataset_label = dataset_label or ""
        verdicts = verdicts.verdicts
    items = [(n, v) for n, v in verdicts.items() if names is None or n in names]
    rows, missing, labels = _forest_rows(items)
    fig = go.Figure()
    for status, (xs, ys, minus, plus, text) in rows.items():
        if not xs:
            continue
        name, color, symbol = STATUS_STYLE[status]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", name=name, hovertext=text, hoverinfo="text",
                                 marker={"color": color, "symbol": symbol, "size": 9},
                                 error_x={"type": "data", "symmetric": False, "array": plus, "arrayminus": minus,
                                          "color": color, "thickness": 1.5, "width": 4}))
    if missing:
        fig.add_trace(go.Scatter(x=[0] * len(missing), y=missing, mode="markers", name="no comparison",
                                 marker={"symbol": "x", "color": "#bdbdbd", "size": 8}))
    fig.add_vline(x=0, line_color="#444", line_width=1)
    n_rows = len(labels)
    lines = sum(label.count("<br>") + 1 for label in labels)
    sub = (f"<br><sup>data: {dataset_label}</sup>" if dataset_label else "") + "<br><sup>⚠: a cell with a CAUTION</sup>"
    text = short_label(title, TITLE_WIDTH) + sub
    top = 20 + 21 * (text.count("<br>") + 1)
    fig.update_layout(title={"text": text, "x": 0.01, "xanchor": "left", "y": 0.985, "yref": "container",
                             "yanchor": "top", "pad": {"t": 10}}, template="plotly_white",
                      height=max(300, top + 130 + 16 * lines + 10 * n_rows),
                      margin={"l": 10, "r": 10, "t": top, "b": 110},
                      legend={"orientation": "h", "x": 0, "xanchor": "left", "y": 0, "yref": "container",
                              "yanchor": "bottom", "font": {"size": 11}},
                      xaxis={"title": {"text": "Δ accuracy (other − reference)", "standoff": 6}, "zeroline": False},
                      yaxis={"categoryorder": "array", "categoryarray": labels[::-1], "automargin": True,
                             "tickfont": {"size": 11}})
    return fig
