"""Sweeps: learning rates and batch sizes, one run per (setting, seed) in one grid, and what is
read from them (the maximum lr, an lr tuned per cell). Each (model, lr) or (norm, batch size)
is a cell of the :class:`~bnviz.runs.GridResult` (``result.cell(model=..., lr=...)``)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

from .config import Config
from .data import Dataset
from .models import LeNetSpec
from .precise import PRECISE_BN_IMAGES
from .comparisons import summarize
from .runs import _FAILED, GridResult, _data_for, _seeds, run_grid

__all__ = ["lr_sweep", "sweep_summary", "MaxLR", "max_lr", "fixed_steps", "batch_size_grid", "tune_lr"]


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
    return run_grid(base, variants, data=data, progress=progress, tags=tags, precise_bn=precise_bn)


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
    return run_grid(base, variants, data=data, progress=progress, tags=tags, precise_bn=precise_bn)


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
    grid = run_grid(base, variants, data=data, progress=progress, tags=tags, precise_bn=precise_bn)
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

