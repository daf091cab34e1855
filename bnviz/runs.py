"""Runs and grids: train many configurations at once and keep their results as typed values.

* A **variant** is a dict of changes to a base :class:`~bnviz.config.Config`. Keys that are
  ``Config`` fields (``lr``, ``batch_size``, ``init``, ...) change the config; keys that are
  :class:`~bnviz.models.LeNetSpec` fields (``norm``, ``pool``, ``padding``, ``bias``,
  ``dropout``, ...) change its model; ``model`` replaces the spec (a spec or a preset name).
* :func:`run_grid` is the one pipeline: variants (× seeds) → configs → :func:`bnviz.grid.train_grid`
  (K runs at once, each equal to the same run alone) → a :class:`GridResult` of :class:`Run` s.
* **The accuracy a comparison uses** (:data:`ACCURACY`): the test accuracy with BN statistics
  **recomputed** on 2,000 training images at each epoch end (PreciseBN, :mod:`bnviz.precise`;
  the eval-mode accuracy for networks without BN), averaged over the last 3 epochs (fewer if
  the run has fewer epochs). ``Run.acc_ema`` keeps the eval-mode number on the moving averages.
  A run that diverged (or failed) has no accuracy: it is counted, not averaged.
* A **cell** is the runs that differ only by their seed (a variant, a (model, lr), a (norm, batch
  size)): ``result.cell(model="LeNet-BN", lr=1.0)`` is a :class:`Cell` with its numbers
  (``.stats()``, ``.mean``), its measured causes and ``.vs(other_cell)`` → a
  :class:`~bnviz.verdicts.Verdict`.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from typing import Callable

import torch
from torch import nn

from .callbacks import Probe
from .config import Config, score_steps
from .course import default_seeds
from .data import Dataset, load_dataset, resolve_device, to_float
from .grid import train_grid
from .history import History
from .models import LeNetSpec, preset
from .precise import PRECISE_BN_IMAGES, PreciseBNEval
from .probes import layer_health, loss_landscape_probe
from .train import Trainer
from .verdicts import SeedStats, Verdict, cell_causes, seed_stats, verdict

__all__ = ["ACCURACY", "ACCURACY_EMA", "run_accuracy", "scored_snapshots", "Run", "Cell", "GridResult", "apply_changes", "run_grid",
           "default_seeds", "run_with_probe", "health_during_training", "landscape_during_training"]

ACCURACY = ("test accuracy with BN statistics recomputed on 2,000 training images (PreciseBN; eval mode "
            "for nets without BN), mean of the last 3 epochs")
ACCURACY_EMA = "test accuracy in eval mode on the moving averages (EMA), mean of the last 3 epochs"

_CONFIG_FIELDS = {f.name for f in fields(Config)}
_SPEC_FIELDS = {f.name for f in fields(LeNetSpec)}
_FAILED = ("diverged", "error")


# ----------------------------------------------------------------------------- results


def run_accuracy(h: History, last: int = 3, statistics: str = "precise") -> float | None:
    """The accuracy comparisons use (:data:`ACCURACY`): the mean over the last ``last`` epochs of
    the test accuracy with recomputed BN statistics (``Snapshot.precise_test_acc``; the eval-mode
    accuracy where it was not measured: nets without BN), or with ``statistics='ema'`` of the
    eval-mode accuracy on the moving averages. A run with ``Config.score_at`` is scored at those
    steps instead (:func:`scored_snapshots`: the same steps for every cell of the same length,
    whatever its batch size; ``last`` is not used). None for a run that diverged or failed."""
    if statistics not in ("precise", "ema"):
        raise ValueError(f"statistics={statistics!r} is not valid; valid: 'precise' (recomputed), 'ema'")
    if h.status in _FAILED:
        return None
    pick = lambda s: (s.precise_test_acc if statistics == "precise" and s.precise_test_acc is not None  # noqa: E731
                      else s.test_acc)
    scored = scored_snapshots(h)
    accs = [pick(s) for s in (scored if scored is not None else h.epochs)]
    accs = [a for a in accs if a is not None][-last if scored is None else None:]
    acc = sum(accs) / len(accs) if accs else None
    return None if acc is None or not math.isfinite(acc) else float(acc)


def scored_snapshots(h: History) -> list | None:
    """The snapshots a run with ``Config.score_at`` is scored on: one per step of
    :func:`~bnviz.config.score_steps` (fractions of the run's length, its last epoch snapshot's
    step), each evaluated there; None for a run scored on its last epochs (no ``score_at``)."""
    if not h.config.score_at or not h.epochs:
        return None
    wanted = set(score_steps(h.config.score_at, h.epochs[-1].step))
    out = {}
    for s in h.snapshots:
        if s.step in wanted and s.test_acc is not None:
            out.setdefault(s.step, s)
    return [out[k] for k in sorted(out)]


@dataclass
class Run:
    """One run of a grid: its label, the settings that define it (``tags``, shown in tables)
    and its :class:`History`."""

    label: str
    tags: dict
    history: History

    # the final epoch's numbers (test_acc: eval mode, on the running statistics)
    status = property(lambda self: self.history.status)
    test_acc = property(lambda self: self.history.final_test_acc)
    train_acc = property(lambda self: self.history.final_train_acc)
    loss = property(lambda self: self.history.final_loss)

    @property
    def acc(self) -> float | None:
        """The accuracy comparisons use: :func:`run_accuracy` (PreciseBN; None if the run failed)."""
        return run_accuracy(self.history)

    @property
    def acc_ema(self) -> float | None:
        """The same mean of the last 3 epochs, in eval mode on the moving averages."""
        return run_accuracy(self.history, statistics="ema")

    @property
    def test_acc_precise(self) -> float | None:
        """The final epoch's test accuracy with recomputed BN statistics (None if not measured)."""
        e = self.history.epochs
        return e[-1].precise_test_acc if e else None

    @property
    def gap(self) -> float | None:
        """Final training accuracy minus final test accuracy (overfitting shows as a large gap)."""
        if self.train_acc is None or self.test_acc is None:
            return None
        return self.train_acc - self.test_acc

    def row(self) -> dict:
        h = self.history
        return {"label": self.label, **self.tags, "status": self.status, "loss": self.loss,
                "train_acc": self.train_acc, "test_acc": self.test_acc, "test_acc_precise": self.test_acc_precise,
                "acc": self.acc, "acc_ema": self.acc_ema, "gap": self.gap,
                "steps": h.snapshots[-1].step if h.snapshots else 0,
                "time_s": round(h.wall_time_s, 2)}


def cell_key(tags: dict) -> tuple:
    """A cell is the runs that differ only by seed: every tag but ``seed`` (and, when a
    ``variant`` tag exists, that tag alone)."""
    if "variant" in tags:
        return (("variant", tags["variant"]),)
    return tuple((k, v) for k, v in tags.items() if k != "seed")


def cell_name(key: tuple) -> str:
    """'LeNet, no BN, lr 0.1' / 'BN, batch 8, lr 0.125': names as given, numbers short."""
    short = {"batch_size": "batch"}
    return ", ".join(str(v) if k in ("variant", "model", "norm") else
                     f"{short.get(k, k)} {v:.4g}" if isinstance(v, float) else f"{short.get(k, k)} {v}"
                     for k, v in key if k != "steps")


@dataclass
class Cell:
    """The runs of one cell (they differ only by their seed), in seed order, with its numbers:
    ``stats()`` (a :class:`~bnviz.verdicts.SeedStats` of :data:`ACCURACY`, or of
    :data:`ACCURACY_EMA` with ``statistics='ema'``), ``mean``/``std``/``values``, ``causes`` (the
    measured :class:`~bnviz.verdicts.Cause` list) and ``vs(reference)``: this cell against
    another, seed by seed (a :class:`~bnviz.verdicts.Verdict`). ``full_size``: the cell's
    full-size accuracy, if known (for the 'far below full size' cause)."""

    key: tuple
    runs: list[Run]
    full_size: float | None = None
    train_size: int | None = None  # the experiment's training-set size (for 'under one epoch')
    saturation: dict | None = None  # {layer: saturated share}, when measured per layer by a probe

    @property
    def name(self) -> str:
        return cell_name(self.key)

    @property
    def tags(self) -> dict:
        return dict(self.key)

    @property
    def causes(self) -> list:
        return cell_causes(self.runs, self.full_size, train_size=self.train_size, saturation=self.saturation)

    def values(self, statistics: str = "precise") -> list[float | None]:
        """The accuracy of each run in seed order (None for a run that diverged)."""
        return [run_accuracy(r.history, statistics=statistics) for r in self.runs]

    @property
    def arm(self) -> str:
        """What this cell trained: its runs' configs without their labels, and each run's final
        loss to 4 significant digits (a model given as a function is not in the config: two such
        cells with one config differ by their losses, also when both sit at chance with equal
        accuracies). Two cells with the same arm are the same runs, trained twice."""
        import hashlib

        loss = lambda r: None if r.loss is None or r.loss != r.loss else float(f"{r.loss:.4g}")  # noqa: E731
        text = repr([(r.history.config.to_dict() | {"label": None}, loss(r)) for r in self.runs])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def stats(self, statistics: str = "precise") -> SeedStats:
        s = seed_stats(self.values(statistics))
        s.causes = self.causes
        s.arm = f"{self.arm}:{statistics}"
        return s

    @property
    def mean(self) -> float:
        return self.stats().mean

    @property
    def std(self) -> float:
        return self.stats().std

    def vs(self, reference: "Cell", statistics: str = "precise", names: tuple[str, str] | None = None) -> Verdict:
        """This cell against ``reference``, seed by seed (:func:`bnviz.verdicts.verdict`)."""
        return verdict(reference.stats(statistics), self.stats(statistics), names=names or (reference.name, self.name))


def _by_seed(runs: list[Run]) -> list[Run]:
    return sorted(runs, key=lambda r: r.tags.get("seed", 0))


@dataclass
class GridResult:
    """The runs of one experiment, in order. ``table()`` is a pandas DataFrame with one row per
    run (its tags and final metrics; ``acc`` is :data:`ACCURACY`); ``result['label']`` is one
    :class:`Run`; ``result.cell(model=..., lr=...)`` is one :class:`Cell` (the runs with those
    tags, which must differ only by seed); ``result.cells()`` all of them, in order."""

    runs: list[Run] = field(default_factory=list)
    dataset_label: str = ""
    train_size: int | None = None  # the training set the grid drew from (a run may use a slice of it)

    def table(self):
        import pandas as pd

        return pd.DataFrame([r.row() for r in self.runs])

    @property
    def histories(self) -> list[History]:
        return [r.history for r in self.runs]

    def cells(self) -> list[Cell]:
        """The runs grouped by cell (runs that differ only by seed), in order."""
        out: OrderedDict = OrderedDict()
        for r in self.runs:
            out.setdefault(cell_key(r.tags), []).append(r)
        return [Cell(k, _by_seed(v), train_size=self.train_size) for k, v in out.items()]

    def cell(self, **tags) -> Cell:
        """The cell whose runs have these tags, e.g. ``cell(model='LeNet-BN', lr=1.0)``."""
        runs = [r for r in self.runs if all(k in r.tags and r.tags[k] == v for k, v in tags.items())]
        if not runs:
            raise KeyError(f"no run has the tags {tags}; cells: {[c.name for c in self.cells()]}")
        keys = list(OrderedDict.fromkeys(cell_key(r.tags) for r in runs))
        if len(keys) > 1:
            raise ValueError(f"the tags {tags} match {len(keys)} cells ({[cell_name(k) for k in keys]}); "
                             "name more tags")
        return Cell(keys[0], _by_seed(runs), train_size=self.train_size)

    def __getitem__(self, label: str) -> Run:
        for r in self.runs:
            if r.label == label:
                return r
        raise KeyError(f"no run labelled {label!r}; labels: {[r.label for r in self.runs]}")

    def __iter__(self):
        return iter(self.runs)

    def __len__(self) -> int:
        return len(self.runs)

    def __add__(self, other: "GridResult") -> "GridResult":
        return GridResult(self.runs + other.runs, self.dataset_label or other.dataset_label,
                          self.train_size or other.train_size)


def apply_changes(base: Config, changes: dict) -> Config:
    """``base`` with ``changes`` applied: Config fields to the config, LeNetSpec fields to its
    model, ``model`` (a spec or preset name) replaces the model."""
    changes = dict(changes)
    model = changes.pop("model", base.model)
    if isinstance(model, str):
        model = preset(model)
    spec_changes = {k: changes.pop(k) for k in list(changes) if k in _SPEC_FIELDS and k not in _CONFIG_FIELDS}
    unknown = set(changes) - _CONFIG_FIELDS
    if unknown:
        raise ValueError(f"unknown setting(s) {sorted(unknown)}; valid: Config fields "
                         f"{sorted(_CONFIG_FIELDS)} or LeNetSpec fields {sorted(_SPEC_FIELDS)}")
    if spec_changes:
        model = model.replace(**spec_changes)
    return base.replace(model=model, **changes)


def _data_for(cfg: Config, data: Dataset | None) -> Dataset:
    if data is None:
        from .config import resolve_dataset

        return load_dataset(resolve_dataset(cfg.dataset), device=resolve_device(cfg.device),
                            train_size=cfg.train_size, test_size=cfg.test_size)
    n_tr = min(cfg.train_size or len(data.train_x), len(data.train_x))
    n_te = min(cfg.test_size or len(data.test_x), len(data.test_x))
    if (n_tr, n_te) != (len(data.train_x), len(data.test_x)):
        return data.subset(n_tr, n_te)
    return data


def _tag(value):
    return value.label() if isinstance(value, LeNetSpec) else value



# ----------------------------------------------------------------------------- the pipeline


def _seeds(seeds) -> tuple[int, ...]:
    seeds = default_seeds() if seeds is None else tuple(int(s) for s in seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct integers, at least one; got {seeds}")
    return seeds


def _seeded(make: Callable[[], nn.Module], seed: int) -> Callable[[], nn.Module]:
    """``make`` called with the global RNG seeded by ``seed``: each seed gets its own init."""
    def fn():
        torch.manual_seed(seed)
        return make()
    return fn


def _with_seeds(variants: dict, seeds, tags: dict | None, models: dict | None):
    """Every variant with every seed: labels '<variant> · seed <s>', tags ``variant`` and ``seed``."""
    runs, run_tags, run_models = {}, {}, {}
    for name, changes in variants.items():
        shown = (tags or {}).get(name, {k: _tag(v) for k, v in changes.items()})
        for s in _seeds(seeds):
            label = f"{name} · seed {s}"
            runs[label] = {**changes, "seed": s}
            run_tags[label] = {"variant": name, **shown, "seed": s}
            if models and name in models:
                run_models[label] = _seeded(models[name], s)
    return runs, run_tags, run_models


def _fit(cfg: Config, data: Dataset, model: nn.Module | None = None, callbacks=()) -> History:
    """One run; an error is kept in the History (status 'error'), as the grid does."""
    trainer = Trainer(cfg, data=data, model=model, callbacks=callbacks)
    try:
        return trainer.fit()
    except Exception:
        if trainer.history.status != "error":
            raise
        return trainer.history


def run_grid(base: Config, variants: dict[str, dict], seeds=None, *, data: Dataset | None = None,
             progress: bool = True, tags: dict[str, dict] | None = None,
             models: dict[str, nn.Module | Callable[[], nn.Module]] | None = None,
             precise_bn: int | None = PRECISE_BN_IMAGES) -> GridResult:
    """Train one run per variant (``label -> changes``, see :func:`apply_changes`), or with
    ``seeds`` one per (variant, seed) (labels ``'<variant> · seed <s>'``, tags ``variant`` and
    ``seed``), all on the same data set (loaded once from ``base`` if ``data`` is None), and
    return a :class:`GridResult`. Runs that use the same slice of ``data`` train together through
    :func:`bnviz.grid.train_grid` (K runs at once, each equal to the same run alone).

    ``tags[label]`` overrides what the table shows for a run (default: its changes).
    ``models[label]`` gives a ready-made model (or a function making one; with ``seeds``, called
    with the global RNG seeded by the seed) instead of the LeNet of the config, e.g.
    :func:`bnviz.probes.deep_mlp`; such a run trains alone. ``precise_bn``: evaluate BN runs at each
    epoch end with statistics recomputed on that many training images (None: off).
    """
    if not variants:
        raise ValueError("variants is empty: give at least one label -> changes")
    if seeds is not None:
        variants, tags, models = _with_seeds(variants, seeds, tags, models)
    labels = list(variants)
    configs = [apply_changes(base, variants[label]).replace(label=label) for label in labels]
    if data is None:
        data = _data_for(base, None)
    models = models or {}
    hists: dict[str, History] = {}
    groups: dict[tuple, list[int]] = OrderedDict()
    for i, cfg in enumerate(configs):
        if labels[i] not in models:
            sub = _data_for(cfg, data)
            groups.setdefault((len(sub.train_x), len(sub.test_x)), []).append(i)
    for idx in groups.values():
        sub = _data_for(configs[idx[0]], data)
        out = train_grid([configs[i] for i in idx], data=sub, progress=progress, precise_bn=precise_bn or None)
        hists.update({labels[i]: h for i, h in zip(idx, out)})
    for label, model in models.items():
        i = labels.index(label)
        model = model() if callable(model) and not isinstance(model, nn.Module) else model
        hists[label] = _fit(configs[i], _data_for(configs[i], data), model=model,
                            callbacks=(PreciseBNEval(precise_bn),) if precise_bn else ())
    result = GridResult(dataset_label=data.label, train_size=len(data.train_x))
    for label in labels:
        shown = (tags or {}).get(label, {k: _tag(v) for k, v in variants[label].items()})
        result.runs.append(Run(label, dict(shown), hists[label]))
    return result


# ----------------------------------------------------------------------------- runs with a probe


class _ProbeFromStart(Probe):
    """:class:`bnviz.callbacks.Probe` that also probes the initial model (step 0, kind
    'start', snapshot None) once the trainer has built it."""

    def on_fit_start(self, trainer) -> None:
        row = {"step": 0, "epoch": 0, "kind": "start", "loss": None}
        row.update(self.probe(trainer.model, None))
        self.rows.append(row)


def run_with_probe(cfg: Config, probe: Callable[[nn.Module, object], dict], data: Dataset | None = None,
                   model: nn.Module | None = None, at_start: bool = True,
                   kinds=("step", "epoch")) -> tuple[History, list[dict]]:
    """Train ``cfg`` with a :class:`bnviz.callbacks.Probe` that calls ``probe(model, snapshot)``
    at every snapshot of a kind in ``kinds`` (and, with ``at_start``, once on the initial model,
    with ``snapshot=None``: row step 0, kind 'start'). Returns the History and the rows (each
    with ``step``, ``epoch``, ``kind``, ``loss``). The probe runs in the training thread between
    steps and must not change the model (work on a copy). An error in it ends the run and is
    raised."""
    cb = (_ProbeFromStart if at_start else Probe)(probe, kinds=kinds)
    h = Trainer(cfg, data=_data_for(cfg, data), callbacks=(cb,), model=model).fit()
    return h, cb.rows


def health_during_training(base: Config, models: dict[str, LeNetSpec | str | dict], data: Dataset | None = None,
                           probe_batch: int = 256, progress: bool = True):
    """Train each model (``name -> spec or changes``) with ``base`` and call :func:`layer_health`
    on a fixed batch of ``probe_batch`` training examples at the start (step 0) and at every
    snapshot. Returns ``(DataFrame, {name: History})``: one row per (model, step, layer)."""
    import pandas as pd

    data = _data_for(base, data)
    xb, yb = to_float(data.train_x[:probe_batch]), data.train_y[:probe_batch]
    rows, hists = [], {}
    items = list(models.items())
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc=f"layer health ({data.label})", unit="run")
    for name, spec in items:
        changes = spec if isinstance(spec, dict) else {"model": spec}
        cfg = apply_changes(base, changes).replace(label=name)
        h, prow = run_with_probe(cfg, lambda model, snap: {"layers": layer_health(model, xb, yb, cfg.lr)},
                                 data=data, kinds=("step",))
        hists[name] = h
        for r in prow:
            rows += [{"model": name, "step": r["step"], **lay} for lay in r["layers"]]
    return pd.DataFrame(rows), hists


def landscape_during_training(base: Config, models: dict[str, LeNetSpec | str], data: Dataset | None = None,
                              etas_rel=(0.25, 0.5, 1.0, 2.0, 4.0), probe_batch: int = 256,
                              progress: bool = True):
    """Train each model with ``base`` and, at every step snapshot, probe the loss landscape
    along the gradient on a fixed batch of ``probe_batch`` training examples, with step sizes
    ``etas_rel × lr``. Returns ``(DataFrame, {name: History})``; the frame has one row per
    (model, snapshot) with ``loss``, ``grad_norm``, ``loss_range``, ``max_grad_change``, ``beta``."""
    import pandas as pd

    data = _data_for(base, data)
    xb = to_float(data.train_x[:probe_batch])
    yb = data.train_y[:probe_batch]
    rows, hists = [], {}
    items = list(models.items())
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc=f"landscape probes ({data.label})", unit="run")
    for name, spec in items:
        cfg = apply_changes(base, {"model": spec}).replace(label=name)
        etas = [e * cfg.lr for e in etas_rel]

        def probe(model, snap):
            p = loss_landscape_probe(model, xb, yb, etas)
            return {"loss": p.loss, "grad_norm": p.grad_norm, "loss_range": p.loss_range,
                    "max_grad_change": p.max_grad_change, "beta": p.beta}

        h, prow = run_with_probe(cfg, probe, data=data, at_start=False, kinds=("step",))
        hists[name] = h
        rows += [{"model": name, **{k: v for k, v in r.items() if k != "kind"}} for r in prow]
    return pd.DataFrame(rows), hists

