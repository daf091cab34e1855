"""The canned experiments of chapters 05 (optimisation), 06 (architecture) and 07 (batches):
grids of runs with seeds and spreads, learning-rate sweeps, and runs with a probe. The
measurements themselves (probes, numeric checks) are in :mod:`bnviz.probes` and re-exported
here (``ex.layer_health``); the figures are in :mod:`bnviz.figures`.

Conventions:

* A **variant** is a dict of changes to a base :class:`~bnviz.config.Config`. Keys that are
  ``Config`` fields (``lr``, ``batch_size``, ``init``, ...) change the config; keys that are
  :class:`~bnviz.models.LeNetSpec` fields (``norm``, ``pool``, ``padding``, ``bias``,
  ``dropout``, ...) change its model; ``model`` replaces the spec (a spec or a preset name).
* Several runs train through :func:`bnviz.grid.train_grid` (K runs at once, each equal to the
  same run alone).
* **The accuracy a comparison uses** (:data:`ACCURACY`): the test accuracy with BN statistics
  **recomputed** on 2,000 training images at each epoch end (PreciseBN, :mod:`bnviz.precise`;
  the eval-mode accuracy for networks without BN), averaged over the last 3 epochs (fewer if
  the run has fewer epochs). The moving averages' lag (14 points in chapter 04) is then no part
  of the comparison; ``Run.acc_ema`` keeps the eval-mode number on the moving averages. A run
  that diverged (or failed) has no accuracy: it is counted, not averaged.
* **Seeds and verdicts** (:func:`compare`, :mod:`bnviz.verdicts`): each variant runs with every
  seed (the seed sets the initial weights and the batch order). A variant is summarised by the
  mean, the sample standard deviation (``ddof=1``) and the min–max of its accuracy over the
  seeds. Against the reference, the per-seed differences give Δ and a 95% t-interval; the
  verdict is "better"/"worse" when the interval excludes 0, else "within noise"; the threshold
  printed is the half-width applied. Each compared cell carries its measured CAUTION causes.
* Every figure and table names its data set (``History.dataset_label``); on the synthetic
  stand-in that label says SYNTHETIC, because its numbers are not Fashion-MNIST results.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from .callbacks import Probe
from .config import Config
from .data import Dataset, load_dataset, resolve_device, to_float
from .grid import train_grid
from .history import History
from .models import LeNetSpec, preset
from .precise import PRECISE_BN_IMAGES, PreciseBNEval
from .probes import (LandscapeProbe, Rescale, Residual, batch_stat_noise, bias_check, border_ink, deep_mlp,
                     dropout_variance_shift, grad_norms_at_init, layer_health, loss_landscape_probe,
                     scale_invariance_check, weight_norm_growth, weight_norms)
from .train import Trainer
from .verdicts import (ALPHA, CHANCE_LIMIT, Paired, SeedStats, cell_causes, fmt_stats, holm, multiplicity_note,
                       paired, pooled_std, seed_stats, verdict)

__all__ = [
    "ACCURACY", "NOISE_K", "Run", "GridResult", "SeedStats", "Comparison", "apply_changes",
    "run_accuracy", "seed_stats", "pooled_std", "verdict", "compare", "default_seeds",
    "train_configs", "run_grid", "seed_grid", "lr_sweep", "sweep_summary", "summarize", "max_lr",
    "MaxLR", "batch_size_grid", "status_table", "run_with_probe", "weight_norms",
    "weight_norm_growth", "layer_health", "health_during_training", "bias_check",
    "scale_invariance_check", "batch_stat_noise", "border_ink", "dropout_variance_shift",
    "LandscapeProbe", "loss_landscape_probe", "landscape_during_training", "deep_mlp",
    "grad_norms_at_init", "Rescale", "Residual", "caution", "CHANCE_LIMIT", "answer_table", "fmt_stats",
    "ALPHA", "PRECISE_BN_IMAGES", "Paired", "paired", "holm", "multiplicity_note", "cell_causes", "cells",
    "tune_lr", "fixed_steps", "ema_vs_precise",
]

ACCURACY = ("test accuracy with BN statistics recomputed on 2,000 training images (PreciseBN; eval mode "
            "for nets without BN), mean of the last 3 epochs")
ACCURACY_EMA = "test accuracy in eval mode on the moving averages (EMA), mean of the last 3 epochs"
NOISE_K = 2.0  # the pre-issue-15 rule (|Δ| < 2 × pooled std); verdicts now use the paired t-interval

_CONFIG_FIELDS = {f.name for f in fields(Config)}
_SPEC_FIELDS = {f.name for f in fields(LeNetSpec)}
_FAILED = ("diverged", "error")


# ----------------------------------------------------------------------------- results


def run_accuracy(h: History, last: int = 3, statistics: str = "precise") -> float | None:
    """The accuracy comparisons use (:data:`ACCURACY`): the mean over the last ``last`` epochs of
    the test accuracy with recomputed BN statistics (``Snapshot.precise_test_acc``; the eval-mode
    accuracy where it was not measured: nets without BN), or with ``statistics='ema'`` of the
    eval-mode accuracy on the moving averages. None for a run that diverged or failed."""
    if statistics not in ("precise", "ema"):
        raise ValueError(f"statistics={statistics!r} is not valid; valid: 'precise' (recomputed), 'ema'")
    if h.status in _FAILED:
        return None
    accs = [(s.precise_test_acc if statistics == "precise" and s.precise_test_acc is not None else s.test_acc)
            for s in h.epochs]
    accs = [a for a in accs if a is not None][-last:]
    acc = sum(accs) / len(accs) if accs else None
    return None if acc is None or not math.isfinite(acc) else float(acc)


@dataclass
class Run:
    """One run of a grid: its label, the settings that define it (``tags``, shown in tables)
    and its :class:`History`."""

    label: str
    tags: dict
    history: History

    @property
    def status(self) -> str:
        return self.history.status

    @property
    def test_acc(self) -> float | None:
        """The final epoch's test accuracy (eval mode, running statistics)."""
        return self.history.final_test_acc

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
    def train_acc(self) -> float | None:
        return self.history.final_train_acc

    @property
    def loss(self) -> float | None:
        return self.history.final_loss

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


@dataclass
class GridResult:
    """The runs of one experiment, in order. ``table()`` is a pandas DataFrame with one row per
    run (its tags and final metrics; ``acc`` is :data:`ACCURACY`); ``result['label']`` is one
    :class:`Run`."""

    runs: list[Run] = field(default_factory=list)
    dataset_label: str = ""

    def table(self):
        import pandas as pd

        return pd.DataFrame([r.row() for r in self.runs])

    @property
    def histories(self) -> list[History]:
        return [r.history for r in self.runs]

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
        return GridResult(self.runs + other.runs, self.dataset_label or other.dataset_label)


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


# ----------------------------------------------------------------------------- training many runs


def train_configs(configs: Sequence[Config], data: Dataset | None = None, progress: bool = True,
                  models: dict[int, nn.Module | Callable[[], nn.Module]] | None = None,
                  desc: str = "runs", precise_bn: int | None = PRECISE_BN_IMAGES) -> list[History]:
    """Train every config and return their Histories in order. Configs that use the same
    slice of ``data`` train together through :func:`bnviz.grid.train_grid` (K runs at once,
    each equal to the same run alone); ``models[i]`` (a module or a function making one) trains
    config ``i`` with that model instead, alone. ``precise_bn``: evaluate BN runs at each epoch
    end with statistics recomputed on that many training images (:mod:`bnviz.precise`; None: off)."""
    configs = list(configs)
    if not configs:
        raise ValueError("configs is empty: give at least one Config")
    if data is None:
        data = _data_for(configs[0], None)
    models = models or {}
    out: list[History | None] = [None] * len(configs)
    groups: dict[tuple, list[int]] = OrderedDict()
    for i, cfg in enumerate(configs):
        if i in models:
            continue
        sub = _data_for(cfg, data)
        groups.setdefault((len(sub.train_x), len(sub.test_x)), []).append(i)
    for (n_tr, n_te), idx in groups.items():
        sub = _data_for(configs[idx[0]], data)
        hists = train_grid([configs[i] for i in idx], data=sub, progress=progress, precise_bn=precise_bn or None)
        for i, h in zip(idx, hists):
            out[i] = h
    for i, model in models.items():
        if callable(model) and not isinstance(model, nn.Module):
            model = model()
        out[i] = _fit(configs[i], _data_for(configs[i], data), model=model,
                      callbacks=(PreciseBNEval(precise_bn),) if precise_bn else ())
    return out  # type: ignore[return-value]


def _fit(cfg: Config, data: Dataset, model: nn.Module | None = None, callbacks=()) -> History:
    """One run; an error is kept in the History (status 'error'), as the grid does."""
    trainer = Trainer(cfg, data=data, model=model, callbacks=callbacks)
    try:
        return trainer.fit()
    except Exception:
        if trainer.history.status != "error":
            raise
        return trainer.history


def run_grid(base: Config, variants: dict[str, dict], data: Dataset | None = None,
             progress: bool = True, tags: dict[str, dict] | None = None,
             models: dict[str, nn.Module | Callable[[], nn.Module]] | None = None,
             desc: str = "runs", precise_bn: int | None = PRECISE_BN_IMAGES) -> GridResult:
    """Train one run per variant (``label -> changes``, see :func:`apply_changes`), all on the
    same data set (loaded once from ``base`` if ``data`` is None), through the grid runner,
    and return a GridResult.

    ``tags[label]`` overrides what the table shows for a run (default: its changes).
    ``models[label]`` gives a ready-made model (or a function making one) instead of the
    LeNet of the config, e.g. :func:`deep_mlp`. ``precise_bn``: see :func:`train_configs`.
    """
    if not variants:
        raise ValueError("variants is empty: give at least one label -> changes")
    labels = list(variants)
    configs = [apply_changes(base, variants[label]).replace(label=label) for label in labels]
    if data is None:
        data = _data_for(base, None)
    by_index = {labels.index(k): v for k, v in (models or {}).items()}
    hists = train_configs(configs, data=data, progress=progress, models=by_index, desc=desc, precise_bn=precise_bn)
    result = GridResult(dataset_label=data.label)
    for label, h in zip(labels, hists):
        shown = (tags or {}).get(label, {k: _tag(v) for k, v in variants[label].items()})
        result.runs.append(Run(label, dict(shown), h))
    return result


def default_seeds(cuda: bool | None = None) -> tuple[int, ...]:
    """The seeds of a comparison: 5 on a GPU, 3 on a CPU (2 in fast mode, only to check the
    notebooks run)."""
    from .course import fast_mode

    if fast_mode():
        return (0, 1)
    if cuda is None:
        cuda = torch.cuda.is_available()
    return (0, 1, 2, 3, 4) if cuda else (0, 1, 2)


def _seeds(seeds) -> tuple[int, ...]:
    seeds = default_seeds() if seeds is None else tuple(int(s) for s in seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct integers, at least one; got {seeds}")
    return seeds


def seed_grid(base: Config, variants: dict[str, dict], seeds=None, data: Dataset | None = None,
              progress: bool = True, tags: dict[str, dict] | None = None,
              models: dict[str, Callable[[], nn.Module]] | None = None, desc: str = "runs",
              precise_bn: int | None = PRECISE_BN_IMAGES) -> GridResult:
    """Every variant with every seed, in one grid. Run labels are ``'<variant> · seed <s>'``;
    tags get ``variant`` and ``seed`` (plus ``tags[variant]``, default: the changes)."""
    seeds = _seeds(seeds)
    runs, run_tags, run_models = {}, {}, {}
    for name, changes in variants.items():
        shown = (tags or {}).get(name, {k: _tag(v) for k, v in changes.items()})
        for s in seeds:
            label = f"{name} · seed {s}"
            runs[label] = {**changes, "seed": s}
            run_tags[label] = {"variant": name, **shown, "seed": s}
            if models and name in models:
                run_models[label] = _seeded(models[name], s)
    return run_grid(base, runs, data=data, progress=progress, tags=run_tags, models=run_models or None,
                    desc=desc, precise_bn=precise_bn)


def _seeded(make: Callable[[], nn.Module], seed: int) -> Callable[[], nn.Module]:
    """``make`` called with the global RNG seeded by ``seed``: each seed gets its own init."""
    def fn():
        torch.manual_seed(seed)
        return make()
    return fn


# ----------------------------------------------------------------------------- comparisons


@dataclass
class Comparison:
    """Variants run with the same seeds (from :func:`compare`). ``stats(v)`` is a
    :class:`SeedStats` of :data:`ACCURACY` in seed order, with the variant's caution causes;
    ``contrast(a, b)`` compares b against a seed by seed (:func:`bnviz.verdicts.verdict`);
    ``table()`` has one row per variant: mean, std, min, max, Δ against the reference, the
    threshold applied (the 95% t-interval's half-width), the interval, p, the verdict and the
    caution. ``statistics='ema'`` (in ``stats``, ``table``) uses the moving-average accuracy."""

    reference: str
    variants: list[str]
    seeds: tuple[int, ...]
    runs: GridResult
    metric: str = ACCURACY
    full_size: dict[str, float] = field(default_factory=dict)

    @property
    def dataset_label(self) -> str:
        return self.runs.dataset_label

    def runs_of(self, variant: str) -> list[Run]:
        """The variant's runs, in the order of ``seeds``."""
        if variant not in self.variants:
            raise KeyError(f"no variant {variant!r}; variants: {self.variants}")
        runs = [r for r in self.runs if r.tags.get("variant") == variant]
        order = {s: i for i, s in enumerate(self.seeds)}
        return sorted(runs, key=lambda r: order.get(r.tags.get("seed"), len(order)))

    def values(self, variant: str, statistics: str = "precise") -> list[float | None]:
        return [run_accuracy(r.history, statistics=statistics) for r in self.runs_of(variant)]

    def stats(self, variant: str, statistics: str = "precise") -> SeedStats:
        s = seed_stats(self.values(variant, statistics))
        s.causes = self.causes(variant)
        return s

    def causes(self, variant: str) -> list[str]:
        """The measured CAUTION causes of this variant (:func:`bnviz.verdicts.cell_causes`)."""
        return cell_causes(self.runs_of(variant), self.full_size.get(variant))

    def contrast(self, a: str, b: str, statistics: str = "precise") -> dict:
        """``b`` against ``a``, seed by seed (see :func:`bnviz.verdicts.verdict`)."""
        return verdict(self.stats(a, statistics), self.stats(b, statistics), names=(a, b))

    def threshold(self, a: str, b: str) -> float:
        """The threshold applied to ``b`` vs ``a``: the half-width of the 95% t-interval."""
        return self.contrast(a, b)["noise"]

    @property
    def noise_floor(self) -> float:
        """The seed-to-seed sample std of the reference (a description of the noise; the
        threshold of a verdict is :meth:`threshold`)."""
        return self.stats(self.reference).std

    @property
    def n_comparisons(self) -> int:
        return len(self.variants) - 1

    def pvalues(self, reference: str | None = None) -> list[float]:
        ref = reference or self.reference
        return [self.contrast(ref, v)["p"] for v in self.variants if v != ref]

    def table(self, reference: str | None = None, statistics: str = "precise"):
        import pandas as pd

        ref = reference or self.reference
        rows = []
        for v in self.variants:
            s = self.stats(v, statistics)
            row = {"variant": v, "seeds": s.n + s.failed, "mean": s.mean, "std": s.std, "min": s.min,
                   "max": s.max, "diverged": s.failed}
            if v == ref:
                row.update({"Δ": 0.0, "threshold": float("nan"), "CI low": float("nan"), "CI high": float("nan"),
                            "p": float("nan"), "verdict": "(reference)"})
            else:
                c = self.contrast(ref, v, statistics)
                row.update({"Δ": c["delta"], "threshold": c["noise"], "CI low": c["ci"][0], "CI high": c["ci"][1],
                            "p": c["p"], "verdict": c["verdict"].split(" — CAUTION")[0]})
            row["caution"] = "; ".join(s.causes)
            rows.append(row)
        return pd.DataFrame(rows)

    def print(self, reference: str | None = None) -> None:
        """One line per variant: its accuracy with spread, and the verdict against the reference."""
        ref = reference or self.reference
        print(f"accuracy = {self.metric}; {len(self.seeds)} seeds {list(self.seeds)}; {self.dataset_label}")
        width = max(len(v) for v in self.variants)
        for v in self.variants:
            s = self.stats(v)
            tail = "reference" if v == ref else self.contrast(ref, v)["verdict"]
            print(f"  {v:<{width}}  {fmt_stats(s)}  → {tail}")

    def say(self, a: str, b: str) -> str:
        """'b vs a: Δ +0.012 ± 0.022 (95% t-interval over 3 paired seeds) → within noise (...)', from
        the numbers; the CAUTION of either cell is part of the verdict text."""
        c = self.contrast(a, b)
        if c["n_pairs"] < 2 or math.isnan(c["noise"]):
            return f"{b} vs {a}: {c['verdict']}"
        return (f"{b} vs {a}: Δ {c['delta']:+.3f} ± {c['noise']:.3f} (threshold: 95% t-interval over "
                f"{c['n_pairs']} {'paired ' if c['test'] == 'paired' else ''}seeds) → {c['verdict']}")

    def caution(self, limit: float = CHANCE_LIMIT) -> str:
        """See :func:`caution`: one line per variant with a measured cause."""
        return caution(self, "variant", limit)

    def __add__(self, other: "Comparison") -> "Comparison":
        if tuple(self.seeds) != tuple(other.seeds):
            raise ValueError(f"cannot merge comparisons with different seeds: {self.seeds} and {other.seeds}")
        both = set(self.variants) & set(other.variants)
        if both:
            raise ValueError(f"variants {sorted(both)} are in both comparisons")
        return Comparison(self.reference, self.variants + other.variants, self.seeds, self.runs + other.runs,
                          self.metric, {**self.full_size, **other.full_size})


def compare(base: Config, variants: dict[str, dict], seeds=None, data: Dataset | None = None,
            reference: str | None = None, include: Comparison | None = None,
            models: dict[str, Callable[[], nn.Module]] | None = None, progress: bool = True,
            desc: str = "comparison", precise_bn: int | None = PRECISE_BN_IMAGES,
            full_size: dict[str, float] | None = None) -> Comparison:
    """Run every variant with every seed (:func:`seed_grid`) and return a :class:`Comparison`.

    ``reference``: the variant the others are compared with (default: the first; it may be in
    ``include``). ``include``: a Comparison run earlier with the same seeds whose variants are
    reused, not rerun (e.g. the chapter's base run). ``seeds``: default :func:`default_seeds`.
    ``precise_bn``: see :func:`train_configs`. ``full_size``: ``{variant: accuracy at full
    size}``, if known, for the "far below its full-size accuracy" caution.
    """
    seeds = _seeds(seeds) if include is None or seeds is not None else tuple(include.seeds)
    if include is not None and tuple(include.seeds) != seeds:
        raise ValueError(f"include was run with seeds {include.seeds}, this comparison asks for {seeds}")
    new = {k: v for k, v in variants.items() if include is None or k not in include.variants}
    if not new and include is None:
        raise ValueError("variants is empty: give at least one label -> changes")
    runs = seed_grid(base, new, seeds, data=data, progress=progress, models=models, desc=desc,
                     precise_bn=precise_bn) if new else GridResult(dataset_label=include.dataset_label)
    cmp = Comparison(reference or next(iter(variants)), list(new), seeds, runs, full_size=dict(full_size or {}))
    if include is not None:
        cmp = _merge(include, cmp, variants, reference)
    if cmp.reference not in cmp.variants:
        raise ValueError(f"reference {cmp.reference!r} is not among the variants {cmp.variants}")
    return cmp


def _merge(include: Comparison, new: Comparison, variants: dict, reference: str | None) -> Comparison:
    """``include``'s runs and ``new``'s, in the order: variants asked for first, then the rest."""
    order = [v for v in variants] + [v for v in include.variants if v not in variants]
    runs = GridResult([r for v in order for r in (include.runs_of(v) if v in include.variants
                                                   else new.runs_of(v))],
                      include.dataset_label or new.dataset_label)
    return Comparison(reference or next(iter(variants)), order, new.seeds, runs,
                      full_size={**include.full_size, **new.full_size})


def _cell_key(tags: dict) -> tuple:
    """A cell is the runs that differ only by seed: every tag but ``seed`` (and, when a
    ``variant`` tag exists, that tag alone)."""
    if "variant" in tags:
        return (("variant", tags["variant"]),)
    return tuple((k, v) for k, v in tags.items() if k != "seed")


def cells(result: "GridResult | Comparison") -> "OrderedDict[tuple, list[Run]]":
    """The runs of ``result`` grouped by cell (runs that differ only by seed), in order; the key
    is a tuple of (tag, value) pairs."""
    runs = result.runs if isinstance(result, Comparison) else result
    out: OrderedDict = OrderedDict()
    for r in runs:
        out.setdefault(_cell_key(r.tags), []).append(r)
    return out


def _cell_name(key: tuple) -> str:
    """'LeNet, no BN, lr 0.1' / 'BN, batch 8, lr 0.125': names as given, numbers short."""
    short = {"batch_size": "batch"}
    return ", ".join(str(v) if k in ("variant", "model", "norm") else
                     f"{short.get(k, k)} {v:.4g}" if isinstance(v, float) else f"{short.get(k, k)} {v}"
                     for k, v in key if k != "steps")


def caution(result: "GridResult | Comparison", by: str = "variant", limit: float = CHANCE_LIMIT,
            full_size: dict | None = None) -> str:
    """One line per compared **cell** (runs that differ only by seed: a variant, a (model, lr),
    a (norm, batch size)) that has a measured cause (:func:`bnviz.verdicts.cell_causes`):
    'CAUTION: LeNet, no BN, lr 0.1: never left chance (best seed 0.113 < 0.15)'. Empty string if
    no cell has one. ``by`` is kept for old calls: cells are always per (all tags but seed).
    ``full_size``: ``{cell name: full-size accuracy}`` (a Comparison uses its own)."""
    if isinstance(result, Comparison):
        full_size = {**result.full_size, **(full_size or {})}
    lines = []
    for key, runs in cells(result).items():
        name = _cell_name(key)
        causes = cell_causes(runs, (full_size or {}).get(name), limit)
        if causes:
            lines.append(f"CAUTION: {name}: {'; '.join(causes)}")
    if not lines:
        return ""
    steps = max((r.history.snapshots[-1].step for r in (result.runs if isinstance(result, Comparison) else result)
                 if r.history.snapshots), default=0)
    return "\n".join(lines) + (f"\n(after up to {steps} steps: a verdict involving a flagged cell compares what the "
                               "runs reached in this budget, not what the settings reach after full training)")


def summarize(result: GridResult, by: Sequence[str]):
    """One row per combination of the tags ``by`` (over the seeds): ``n`` (runs with an
    accuracy), ``mean``, ``std`` (sample), ``min``, ``max`` of :data:`ACCURACY`, ``acc_ema`` (the
    mean of :data:`ACCURACY_EMA`), ``diverged`` (runs that failed), ``status`` ('diverged' if any
    run of the group failed) and ``caution`` (the group's measured causes, '' if none)."""
    import pandas as pd

    groups: dict[tuple, list[Run]] = OrderedDict()
    for r in result:
        missing = [k for k in by if k not in r.tags]
        if missing:
            raise ValueError(f"run {r.label!r} has no tag(s) {missing}; tags: {sorted(r.tags)}")
        groups.setdefault(tuple(r.tags[k] for k in by), []).append(r)
    rows = []
    for key, runs in groups.items():
        s = seed_stats(r.acc for r in runs)
        ema = seed_stats(r.acc_ema for r in runs)
        rows.append({**dict(zip(by, key)), "n": s.n, "mean": s.mean, "std": s.std, "min": s.min,
                     "max": s.max, "acc_ema": ema.mean, "diverged": s.failed,
                     "status": "diverged" if s.failed else "finished", "caution": "; ".join(cell_causes(runs))})
    return pd.DataFrame(rows)


def ema_vs_precise(result: "GridResult | Comparison"):
    """Per cell: the mean over seeds of :data:`ACCURACY` (recomputed statistics) and of
    :data:`ACCURACY_EMA` (moving averages), and ``ema_cost`` = precise − EMA: what the moving
    averages' lag costs at the end of these runs."""
    import pandas as pd

    rows = []
    for key, runs in cells(result).items():
        p, e = seed_stats(r.acc for r in runs), seed_stats(r.acc_ema for r in runs)
        rows.append({"cell": _cell_name(key), "precise": p.mean, "ema": e.mean, "ema_cost": p.mean - e.mean,
                     "precise_std": p.std, "ema_std": e.std})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- sweeps


def lr_sweep(base: Config, lrs: Iterable[float], models: dict[str, LeNetSpec | str], seeds=(0,),
             data: Dataset | None = None, progress: bool = True,
             precise_bn: int | None = PRECISE_BN_IMAGES) -> GridResult:
    """One run per (model, lr, seed), all in one grid: the table has columns ``model`` (the name
    given), ``lr`` and ``seed``. :func:`sweep_summary` gives the spread over seeds; each
    (model, lr) is a cell of :func:`caution`."""
    lrs = [float(lr) for lr in lrs]
    if not lrs or not models:
        raise ValueError("lr_sweep needs at least one learning rate and one model")
    seeds = _seeds(seeds)
    variants, tags = {}, {}
    for name, spec in models.items():
        for lr in lrs:
            for s in seeds:
                label = f"{name}, lr {lr:g}" + (f" · seed {s}" if len(seeds) > 1 else "")
                variants[label] = {"model": spec, "lr": lr, "seed": s}
                tags[label] = {"model": name, "lr": lr, "seed": s}
    return run_grid(base, variants, data=data, progress=progress, tags=tags, desc="lr sweep", precise_bn=precise_bn)


def sweep_summary(result: GridResult):
    """Per (model, lr): the spread of :data:`ACCURACY` over the seeds (see :func:`summarize`)."""
    return summarize(result, ("model", "lr"))


@dataclass
class MaxLR:
    """The result of :func:`max_lr` for one model (``lr`` is None when no run learned)."""

    model: str
    lr: float | None
    best_lr: float | None
    best_acc: float | None
    acc_at_max: float | None
    largest_finished_lr: float | None


def _rows(results) -> list[dict]:
    if isinstance(results, GridResult):
        return sweep_summary(results).rename(columns={"mean": "test_acc"}).to_dict("records")
    if hasattr(results, "to_dict") and hasattr(results, "columns"):  # a DataFrame
        df = results.rename(columns={"mean": "test_acc"}) if "test_acc" not in results.columns else results
        return df.to_dict("records")
    return [dict(r) for r in results]


def max_lr(results, tolerance: float = 0.05, floor: float = 0.2) -> dict[str, MaxLR]:
    """The maximum learning rate of each model in a sweep, by this definition:

    *the largest lr in the sweep where no run diverged (status not 'diverged'/'error') and
    whose accuracy is within* ``tolerance`` *of the best accuracy over all lrs for that model.*
    The best must itself be at least ``floor`` (default 0.2, twice chance for 10 classes): if
    no lr reached it, the model did not learn and its max lr is None.

    ``results``: a :class:`GridResult` from :func:`lr_sweep` (the accuracy of an lr is the mean
    over its seeds of :data:`ACCURACY`; an lr counts as diverged if any seed diverged), a
    DataFrame (e.g. :func:`sweep_summary`), or rows (dicts) with keys ``model``, ``lr``,
    ``test_acc``, ``status``.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    by_model: dict[str, list[dict]] = {}
    for r in _rows(results):
        missing = {"model", "lr", "test_acc", "status"} - set(r)
        if missing:
            raise ValueError(f"each row needs model, lr, test_acc and status; missing {sorted(missing)} in {r}")
        by_model.setdefault(r["model"], []).append(r)
    out = {}
    for model, rows in by_model.items():
        ok = [r for r in rows if r["status"] not in _FAILED and r["test_acc"] is not None
              and not (isinstance(r["test_acc"], float) and math.isnan(r["test_acc"]))]
        largest = max((r["lr"] for r in ok), default=None)
        if not ok or max(r["test_acc"] for r in ok) < floor:
            best = max(ok, key=lambda r: r["test_acc"], default=None)
            out[model] = MaxLR(model, None, best and best["lr"], best and best["test_acc"], None, largest)
            continue
        best = max(ok, key=lambda r: (r["test_acc"], -r["lr"]))
        good = [r for r in ok if r["test_acc"] >= best["test_acc"] - tolerance]
        top = max(good, key=lambda r: r["lr"])
        out[model] = MaxLR(model, top["lr"], best["lr"], best["test_acc"], top["test_acc"], largest)
    return out


def fixed_steps(steps: int, batch_size: int, n_train: int) -> tuple[int, int]:
    """``(examples, epochs)`` so that a run of batch ``batch_size`` takes exactly ``steps`` full
    steps: ``epochs`` passes over the first ``examples`` = steps·B/epochs training examples, with
    ``epochs`` the smallest divisor of ``steps`` for which that fits in ``n_train``."""
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps={steps!r} is not valid; valid: a positive integer")
    for epochs in range(1, steps + 1):
        if steps % epochs == 0 and steps // epochs * batch_size <= n_train:
            return steps // epochs * batch_size, epochs
    raise ValueError(f"batch size {batch_size} is larger than the {n_train} training examples")


def _lr_for(lrs, name, bs, default):
    if lrs is None:
        return default
    if (name, bs) in lrs:
        return float(lrs[(name, bs)])
    if name in lrs:
        return float(lrs[name])
    raise ValueError(f"lrs has no learning rate for norm {name!r} at batch size {bs}; give "
                     f"{{'{name}': lr}} or {{('{name}', {bs}): lr}}")


def batch_size_grid(base: Config, norms: dict[str, dict], batch_sizes: Iterable[int],
                    scale_lr: bool = True, seeds=(0,), data: Dataset | None = None,
                    progress: bool = True, steps: int | None = None, lrs: dict | None = None,
                    precise_bn: int | None = PRECISE_BN_IMAGES) -> GridResult:
    """One run per (norm, batch size, seed), in one grid.

    ``norms``: name -> model changes, e.g. ``{'BN': {'norm': 'torch'}, 'GroupNorm': {'norm':
    'group'}}``. Without ``steps`` every run takes ``base.epochs`` epochs (the same examples);
    with ``steps`` every run takes exactly that many full steps (:func:`fixed_steps`: batch B
    sees steps·B examples). The lr: ``lrs`` ({norm: lr} or {(norm, batch size): lr}, e.g. from
    :func:`tune_lr`), else with ``scale_lr`` the linear scaling rule ``lr = base.lr *
    batch_size / base.batch_size`` (Goyal et al. 2017), else ``base.lr``. Table columns: ``norm``,
    ``batch_size``, ``lr``, ``seed`` (and ``steps``); :func:`summarize` with ``by=('norm',
    'batch_size')`` gives the spreads, :func:`caution` the cells' causes.
    """
    seeds = _seeds(seeds)
    batch_sizes = [int(b) for b in batch_sizes]
    data = _data_for(base, data)
    variants, tags = {}, {}
    for name, changes in norms.items():
        for bs in batch_sizes:
            default = base.lr * bs / base.batch_size if scale_lr else base.lr
            lr = _lr_for(lrs, name, bs, default)
            size = {}
            if steps is not None:
                n, epochs = fixed_steps(steps, bs, len(data.train_x))
                size = {"train_size": n, "epochs": epochs}
            for s in seeds:
                label = f"{name}, bs {bs}" + (f" · seed {s}" if len(seeds) > 1 else "")
                variants[label] = {**changes, "batch_size": bs, "lr": lr, "seed": s, **size}
                tags[label] = {"norm": name, "batch_size": bs, "lr": lr, "seed": s,
                               **({"steps": steps} if steps is not None else {})}
    return run_grid(base, variants, data=data, progress=progress, tags=tags, desc="batch sizes",
                    precise_bn=precise_bn)


def tune_lr(base: Config, norms: dict[str, dict], batch_sizes: Iterable[int], steps: int | None = None,
            factors=(1 / 3, 1.0, 3.0), seed: int = 100, data: Dataset | None = None, progress: bool = True,
            precise_bn: int | None = PRECISE_BN_IMAGES, max_extend: int = 2):
    """A small lr sweep per (norm, batch size): lr = base.lr·√(B / base.batch_size)·f for each
    factor f (square-root scaling as the centre), one run each with ``seed``, a seed the
    comparison should not use (picking the best lr on the same seeds would favour their luck).
    ``steps`` as in :func:`batch_size_grid`.

    **Extension at the edge.** When a cell's best lr is the largest (smallest) lr tried, the sweep
    goes one factor further in that direction: the edge factor times (divided by) the sweep's
    geometric step (the ratio of the two outermost factors on that side; 3 for the default, 3
    for a single factor), one extra run per cell and direction, up to ``max_extend`` rounds (0:
    no extension). The runs of all cells that extend in a round train in one :func:`run_grid`
    call. An edge lr that diverged is never the best, so it stops the extension in that direction.

    Returns ``(best, table)``: ``best[(norm, B)]`` is the lr with the highest :data:`ACCURACY`
    among runs that did not diverge (the centre lr if none finished); ``table`` a DataFrame with
    **every lr tried**, sorted by cell and lr: norm, batch_size, lr, factor, acc, status and
    ``round`` (0: the first sweep, r: added by the r-th extension)."""
    import pandas as pd

    batch_sizes = [int(b) for b in batch_sizes]
    if not factors or min(factors) <= 0:
        raise ValueError(f"factors={factors!r} is not valid; valid: positive multipliers, e.g. (1/3, 1, 3)")
    if not isinstance(max_extend, int) or isinstance(max_extend, bool) or max_extend < 0:
        raise ValueError(f"max_extend={max_extend!r} is not valid; valid: an int >= 0 (extra rounds), e.g. 2")
    data = _data_for(base, data)
    factors = sorted(float(f) for f in factors)
    up = factors[-1] / factors[-2] if len(factors) > 1 else 3.0
    down = factors[1] / factors[0] if len(factors) > 1 else 3.0
    cells = [(name, b) for name in norms for b in batch_sizes]
    todo = [(name, b, f) for name, b in cells for f in factors]
    rows: list[dict] = []
    for rnd in range(max_extend + 1):
        rows += _tune_round(base, norms, todo, rnd, steps, seed, data, progress, precise_bn)
        if rnd == max_extend:
            break
        todo = [(name, b, f) for name, b in cells for f in _edge_factors(rows, name, b, up, down)]
        if not todo:
            break
    order = {c: i for i, c in enumerate(cells)}
    table = pd.DataFrame(sorted(rows, key=lambda r: (order[(r["norm"], r["batch_size"])], r["lr"])))
    best = {}
    for name, b in cells:
        ok = [r for r in rows if (r["norm"], r["batch_size"]) == (name, b) and r["acc"] is not None]
        centre = base.lr * math.sqrt(b / base.batch_size)
        best[(name, b)] = float(max(ok, key=lambda r: r["acc"])["lr"]) if ok else centre
    return best, table


def _tune_round(base, norms, todo, rnd, steps, seed, data, progress, precise_bn) -> list[dict]:
    """One run per (norm, batch size, factor) of ``todo``, all in one :func:`run_grid` call:
    the rows of :func:`tune_lr`'s table."""
    variants, tags = {}, {}
    for name, b, f in todo:
        size = dict(zip(("train_size", "epochs"), fixed_steps(steps, b, len(data.train_x)))) if steps else {}
        lr = base.lr * math.sqrt(b / base.batch_size) * f
        label = f"{name}, bs {b}, lr {lr:.4g}"
        variants[label] = {**norms[name], "batch_size": b, "lr": lr, "seed": seed, **size}
        tags[label] = {"norm": name, "batch_size": b, "lr": lr, "seed": seed, "factor": f}
    grid = run_grid(base, variants, data=data, progress=progress, tags=tags,
                    desc="lr tuning" + (f" (extension {rnd})" if rnd else ""), precise_bn=precise_bn)
    return [{**{k: r.tags[k] for k in ("norm", "batch_size", "lr", "factor")}, "acc": r.acc,
             "status": r.status, "round": rnd} for r in grid]


def _edge_factors(rows: list[dict], name: str, b: int, up: float, down: float) -> list[float]:
    """The factors to add for one cell: one step beyond the largest (smallest) factor tried when
    the best finished run is that edge; none when the best is inside or nothing finished."""
    cell = [r for r in rows if (r["norm"], r["batch_size"]) == (name, b)]
    ok = [r for r in cell if r["acc"] is not None]
    if not ok:
        return []
    best = max(ok, key=lambda r: r["acc"])["factor"]
    tried = [r["factor"] for r in cell]
    return ([min(tried) / down] if best == min(tried) else []) + ([max(tried) * up] if best == max(tried) else [])


def status_table(results):
    """Status and the trainer's message of each run (a DataFrame): what the lab shows when a
    run diverges or stays at chance."""
    import pandas as pd

    return pd.DataFrame([{"label": r.label, "status": r.status, "train_acc": r.train_acc,
                          "test_acc": r.test_acc, "message": r.history.message} for r in results])


def answer_table(answers: dict[str, str], chapter: str | None = None):
    """The closing table of a chapter: one row per question id (``id -> measured answer``, a
    string the notebook computed from its runs), with the question from
    :data:`bnviz.questions.QUESTIONS`. With ``chapter``, every id must live in that notebook."""
    import pandas as pd

    from .questions import QUESTIONS

    unknown = sorted(set(answers) - set(QUESTIONS))
    if unknown:
        raise ValueError(f"unknown question id(s) {unknown}; known: {sorted(QUESTIONS)}")
    if chapter is not None:
        elsewhere = {q: QUESTIONS[q][0] for q in answers if QUESTIONS[q][0] != chapter}
        if elsewhere:
            raise ValueError(f"these ids are answered in other chapters, not {chapter}: {elsewhere}")
    return pd.DataFrame([{"id": q, "question": QUESTIONS[q][1], "measured answer": a} for q, a in answers.items()])


# ----------------------------------------------------------------------------- probes during a run


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
