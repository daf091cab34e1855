"""The lab's controls: ipywidgets that describe a :class:`~bnviz.config.Config`.

``check_settings(settings)`` validates the lab's settings (the keyword arguments of
``show_lab``/``Lab``) with the Config validators (:func:`bnviz.config.check`; their messages name
the valid values) and then with what the controls can show (slider ranges, offered choices).
:class:`LabControls` builds the widgets from valid settings and turns their current values back
into a Config (:meth:`LabControls.config`). It knows nothing about runs or figures: the
controller (:mod:`bnviz.dashboard`) wires the widgets' events.
"""
from __future__ import annotations

import math

import ipywidgets as W

from .config import Config, check
from .data import DATASET_NAMES, resolve_device
from .models import NORM_LAYER_NAMES, preset

__all__ = ["LabControls", "check_settings", "default_settings", "SETTINGS", "BATCH_SIZES",
           "NORM_CHOICES", "PACES", "pace_text", "WATCHABLE_S", "UNTIL_STOPPED_EPOCHS", "MAX_EPOCHS", "POINTS_PER_EPOCH"]

BATCH_SIZES = tuple(2 ** i for i in range(11))  # 1 .. 1024
NORM_CHOICES = (("no normalisation", "none"), ("BN from scratch (bnviz)", "scratch"),
                ("nn.BatchNorm (PyTorch)", "torch"), ("LayerNorm", "layer"), ("GroupNorm", "group"))
TRAIN_SIZES = ((" 1,000", 1000), (" 2,000", 2000), (" 5,000", 5000), ("10,000", 10000),
               ("20,000", 20000), ("all (60,000)", None))
# The pace of a run. 'watchable': the host sleeps before steps so that a run of N epochs lasts
# about WATCHABLE_S seconds (a GPU trains 10 epochs in ~1 s: no time to move a slider); a run
# "until stopped" goes at UNTIL_STOPPED_EPOCHS epochs per WATCHABLE_S. A run that is slower by
# itself (a CPU) is never slowed down. 'fast': no pause.
PACES = (("as fast as possible", "fast"), ("watchable (~20 s)", "watchable"))
WATCHABLE_S = 20.0
UNTIL_STOPPED_EPOCHS = 2
MAX_EPOCHS = 50  # the epochs slider; more: "until stopped"
POINTS_PER_EPOCH = 25  # step snapshots per epoch the lab asks the trainer for
RANGES = {"lr": (1e-3, 100.0), "eps": (1e-8, 1.0)}  # the log sliders' ends
SETTINGS = ("norm", "pool", "activation", "batch_size", "lr", "bn_momentum", "eps", "epochs", "pace",
            "dataset", "device", "seed", "train_size", "test_size")
CONFIG_FIELDS = ("batch_size", "lr", "bn_momentum", "eps", "epochs", "dataset", "device", "seed",
                 "train_size", "test_size")
LIVE_NAMES = {"lr": "learning rate", "bn_momentum": "BN momentum", "eps": "BN eps", "batch_size": "batch size"}


def pace_text(pace: str, epochs: int | None, watchable_s: float = WATCHABLE_S) -> str:
    """The pace as the lab's messages say it."""
    if pace == "fast":
        return "as fast as possible"
    if epochs is None:
        return f"watchable, {UNTIL_STOPPED_EPOCHS} epochs per {watchable_s:g} s"
    return f"watchable, about {watchable_s:g} s a run"


def _is_cuda(device: str) -> bool:
    try:
        return resolve_device(device).type == "cuda"
    except (ValueError, RuntimeError):
        return False


def default_settings(device: str = "auto") -> dict:
    """The lab's defaults: d2l's LeNet-BN (nn.BatchNorm, avg pool, sigmoid, batch 256, lr 1.0,
    momentum 0.1, eps 1e-5). On a GPU the full d2l run (60k examples, 10 epochs) at the
    *watchable* pace (about 20 s; unthrottled it takes ~1 s); on a CPU a short run (10,000
    examples, 3 epochs) as fast as possible (well under a minute)."""
    import os

    gpu = _is_cuda(device)
    return dict(norm="torch", pool="avg", activation="sigmoid", batch_size=256, lr=1.0,
                bn_momentum=0.1, eps=1e-5, epochs=10 if gpu else 3, pace="watchable" if gpu else "fast",
                dataset=(os.environ.get("BNVIZ_DATASET") or "auto").lower(),
                device=device, seed=0, train_size=None if gpu else 10000, test_size=None)


def devices(chosen: str = "auto") -> list[str]:
    """The device names the lab offers here (plus ``chosen`` if it is valid, e.g. 'cuda:1')."""
    auto = resolve_device("auto").type
    devs = ["auto", "cpu"] + ([auto] if auto in ("cuda", "mps") else [])
    if chosen not in devs:
        resolve_device(chosen)  # raises ValueError naming the valid devices
        devs.append(chosen)
    return devs


def check_settings(s: dict) -> None:
    """Raise ValueError (naming the valid values) unless the settings make a run the controls can
    show. First the Config validators, then the controls' own limits."""
    unknown = sorted(set(s) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown lab setting(s) {unknown}; valid: {', '.join(SETTINGS)}")
    for name in CONFIG_FIELDS:
        check(name, s[name])
    for name, (lo, hi) in RANGES.items():
        if not lo <= s[name] <= hi:
            raise ValueError(f"{name}={s[name]!r} is outside the lab's slider range [{lo:g}, {hi:g}] "
                             f"(train with bnviz.train({name}={s[name]!r}) in code for other values)")
    if s["batch_size"] not in BATCH_SIZES:
        raise ValueError(f"batch_size={s['batch_size']!r} is not on the lab's slider; valid: the powers of "
                         f"two {', '.join(map(str, BATCH_SIZES))}")
    if s["epochs"] is not None and s["epochs"] > MAX_EPOCHS:
        raise ValueError(f"epochs={s['epochs']!r} is beyond the lab's slider; valid: 1 to {MAX_EPOCHS}, or "
                         "None (train until stopped)")
    choices = {"norm": [v for _, v in NORM_CHOICES], "pool": ["avg", "max"], "activation": ["sigmoid", "relu"],
               "pace": [v for _, v in PACES], "dataset": list(DATASET_NAMES)}
    for name, valid in choices.items():
        if s[name] not in valid:
            what = "data set" if name == "dataset" else name
            raise ValueError(f"{what}={s[name]!r} is not offered by the lab; valid: {', '.join(map(repr, valid))}")
    devices(s["device"])


class LabControls:
    """The lab's widgets (attributes ``w_*`` for values, ``b_*`` for buttons) built from valid
    settings (see :func:`check_settings`), and the Config they describe."""

    def __init__(self, s: dict):
        wide, style = W.Layout(width="330px"), {"description_width": "118px"}
        kw = dict(layout=wide, style=style)
        self._optimisation(s, kw)
        self.w_norm = W.Dropdown(options=list(NORM_CHOICES), value=s["norm"], description="normalisation", **kw)
        toggles = dict(style={**style, "button_width": "90px"}, layout=wide)
        self.w_pool = W.ToggleButtons(options=[("avg", "avg"), ("max", "max")], value=s["pool"],
                                      description="pooling", **toggles)
        self.w_act = W.ToggleButtons(options=["sigmoid", "relu"], value=s["activation"],
                                     description="activation", **toggles)
        self._data_and_run(s, kw)
        self.w_layer = W.Dropdown(options=list(NORM_LAYER_NAMES), value="fc1", description="show layer",
                                  style={"description_width": "80px"}, layout=W.Layout(width="220px"))
        self._buttons(s)
        # "cumulative" and "until stopped" switch off the slider they replace
        self.w_cumulative.observe(lambda c: setattr(self.w_momentum, "disabled", bool(c["new"])), "value")
        self.w_until.observe(lambda c: setattr(self.w_epochs, "disabled", bool(c["new"])), "value")

    def _optimisation(self, s: dict, kw: dict) -> None:
        self.w_lr = W.FloatLogSlider(value=s["lr"], base=10, min=-3, max=2, step=0.05,
                                     description="learning rate", readout_format=".3g",
                                     continuous_update=False, **kw)
        mom = s["bn_momentum"]
        self.w_momentum = W.FloatSlider(value=0.1 if mom is None else mom, min=0.0, max=1.0, step=0.01,
                                        description="BN momentum", readout_format=".2f",
                                        continuous_update=False, disabled=mom is None, **kw)
        self.w_cumulative = W.Checkbox(value=mom is None, description="cumulative (momentum=None)",
                                       indent=False, layout=W.Layout(width="auto", margin="0 0 0 122px"))
        self.w_eps = W.FloatLogSlider(value=s["eps"], base=10, min=-8, max=0, step=0.25,
                                      description="BN eps", readout_format=".1e",
                                      continuous_update=False, **kw)
        self.w_batch = W.SelectionSlider(options=list(BATCH_SIZES), value=s["batch_size"],
                                         description="batch size", continuous_update=False, **kw)

    def _data_and_run(self, s: dict, kw: dict) -> None:
        self.w_dataset = W.Dropdown(options=list(DATASET_NAMES), value=s["dataset"], description="data set", **kw)
        sizes = list(TRAIN_SIZES)
        if s["train_size"] not in [v for _, v in sizes]:
            sizes.insert(0, (f"{s['train_size']:,}", s["train_size"]))
        self.w_train_size = W.Dropdown(options=sizes, value=s["train_size"], description="train examples", **kw)
        until = s["epochs"] is None
        self.w_epochs = W.IntSlider(value=3 if until else s["epochs"], min=1, max=MAX_EPOCHS, description="epochs",
                                    continuous_update=False, disabled=until, **kw)
        self.w_until = W.Checkbox(value=until, description="until stopped (Stop ends it)", indent=False,
                                  layout=W.Layout(width="auto", margin="0 0 0 122px"))
        self.w_device = W.Dropdown(options=devices(s["device"]), value=s["device"], description="device", **kw)
        # a plain integer box: a bad seed (negative, too large) gets a message instead of a silent clamp
        self.w_seed = W.IntText(value=s["seed"], description="seed", **kw)

    def _buttons(self, s: dict) -> None:
        def button(text, icon, width="110px", **kw):
            return W.Button(description=text, icon=icon, layout=W.Layout(width=width), **kw)

        self.b_run = button("Run", "play", button_style="success",
                            tooltip="train a new run with these settings (stops the current run first)")
        self.b_stop = button("Stop", "stop", button_style="warning", tooltip="stop the current run at the next step")
        self.b_clear = button("Clear history", "trash", "130px", tooltip="forget earlier runs")
        self.w_pace = W.ToggleButtons(options=list(PACES), value=s["pace"],
                                      tooltips=["no pause between steps",
                                                f"about {WATCHABLE_S:g} s per run ({UNTIL_STOPPED_EPOCHS} epochs per "
                                                f"{WATCHABLE_S:g} s until stopped); a slower device is never slowed"],
                                      style={"button_width": "150px"}, layout=W.Layout(width="auto"))
        self.w_path = W.Text(value="bnviz_runs.json", description="file", style={"description_width": "40px"},
                             layout=W.Layout(width="260px"))
        self.b_save = button("Save runs", "save", tooltip="add the ended runs to the file (its runs are kept)")
        self.b_load = button("Load runs", "folder-open", tooltip="show the runs saved in the file")

    # ------------------------------------------------------------------ values
    NEXT_RUN = ("w_norm", "w_pool", "w_act", "w_epochs", "w_until", "w_dataset", "w_device", "w_seed",
                "w_train_size")

    def next_run_widgets(self) -> list[W.Widget]:
        """The controls that apply at the next Run."""
        return [getattr(self, n) for n in self.NEXT_RUN]

    def momentum_value(self) -> float | None:
        return None if self.w_cumulative.value else float(self.w_momentum.value)

    def epochs_value(self) -> int | None:
        return None if self.w_until.value else int(self.w_epochs.value)

    def config(self, test_size: int | None) -> Config:
        """The Config the controls describe; ValueError (naming the valid values) if invalid."""
        spec = preset("lenet-bn").replace(norm=self.w_norm.value, pool=self.w_pool.value,
                                          activation=self.w_act.value)
        n = self.w_train_size.value or 60000
        steps = math.ceil(n / self.w_batch.value)
        return Config(model=spec, dataset=self.w_dataset.value, train_size=self.w_train_size.value,
                      test_size=test_size, batch_size=int(self.w_batch.value), lr=float(self.w_lr.value),
                      bn_momentum=self.momentum_value(), eps=float(self.w_eps.value),
                      epochs=self.epochs_value(), seed=self.w_seed.value, device=self.w_device.value,
                      snapshot_every=max(1, steps // POINTS_PER_EPOCH))

    # ------------------------------------------------------------------ layout
    def boxes(self) -> W.Widget:
        """The three groups of controls (they wrap on a narrow page)."""
        def box(title, *children):
            head = W.HTML(f"<div style='font-weight:600;font-size:13px;color:#374151;margin-bottom:2px'>{title}</div>")
            return W.VBox([head, *children],
                          layout=W.Layout(border="1px solid #e5e7eb", padding="6px 8px", margin="0 8px 4px 0"))

        return W.HBox([
            box("Optimisation (live during a run)", self.w_lr, self.w_momentum, self.w_cumulative, self.w_eps,
                self.w_batch),
            box("Model (next run)", self.w_norm, self.w_pool, self.w_act),
            box("Data and run (next run)", self.w_dataset, self.w_train_size, self.w_epochs, self.w_until,
                self.w_device, self.w_seed),
        ], layout=W.Layout(flex_flow="row wrap"))

    def button_rows(self) -> W.Widget:
        pace = W.HTML("<span style='margin:0 6px 0 14px;color:#374151;font-size:13px'>pace (live)</span>",
                      layout=W.Layout(align_self="center"))
        runs = W.HBox([self.b_run, self.b_stop, pace, self.w_pace], layout=W.Layout(flex_flow="row wrap"))
        files = W.HBox([self.b_clear, W.HTML("&nbsp;&nbsp;"), self.w_path, self.b_save, self.b_load],
                       layout=W.Layout(flex_flow="row wrap"))
        return W.VBox([runs, files], layout=W.Layout(margin="6px 0 4px 0"))
