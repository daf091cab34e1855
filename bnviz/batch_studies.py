"""Chapter 07's batch-size studies: runs scored at the same steps, the two designs (fixed steps;
Wu & He's equal epochs with the lr scaled linearly in B), an lr picked over several seeds, and
the probes that explain what BN does at B = 2.

Conventions:

* **Same-step scoring.** A study's run is scored by the engine at fractions of its steps
  (``Config.score_at``, default 90%, 95% and 100%, :func:`bnviz.config.score_steps`): the test
  accuracy with BN statistics recomputed on the first 2,000 training images (PreciseBN, measured
  by the engine at those steps, on a copy) and on the moving averages (EMA). A run's score is the
  mean over those steps, so cells with the same number of steps are scored on the same steps,
  whatever their epoch length (without ``score_at``, :data:`bnviz.runs.ACCURACY` averages the
  last 3 *epochs*: steps 950-1000 for a 25-step epoch, step 1000 alone for a one-epoch run).
* **Designs.** *Fixed steps*: every B takes the same steps (:func:`bnviz.sweeps.fixed_steps`).
  *Equal epochs* (Wu & He 2018, following Goyal et al. 2017): every B sees the same examples,
  ``lr = lr_ref · B / B_ref`` (:func:`wu_he_plan`).
* A run that diverged has no score (None), as in :mod:`bnviz.runs`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import Config, score_steps
from .data import Dataset, planned_steps, to_float
from .models import norm_layers
from .precise import PRECISE_BN_IMAGES, eval_accuracy, precise_model
from .runs import Cell, Run, _data_for, run_grid, scored_snapshots
from .stats import bn_layers
from .verdicts import SeedStats, Verdict, cell_causes, seed_stats, verdict

__all__ = ["SCORE_FRACTIONS", "total_steps", "StepScore", "scored_run", "ScoredRun", "Study", "run_study",
           "wu_he_plan", "tune_lr_seeds", "EpochStates", "bn_output_levels", "eval_modes", "layer_offsets"]

SCORE_FRACTIONS = (0.9, 0.95, 1.0)


def total_steps(cfg: Config, n_train: int) -> int:
    """The steps of a run of ``cfg`` on ``n_train`` examples, as the engine plans them
    (:func:`bnviz.data.planned_steps`: every epoch ``ceil(n/B)`` batches, or ``floor(n/B)`` when
    the last batch is dropped: ``drop_last``, or a last batch of one example)."""
    return planned_steps(cfg.epochs, n_train, cfg.batch_size, cfg.drop_last)


@dataclass
class StepScore:
    step: int
    precise: float  # test accuracy with recomputed BN statistics (the EMA one for a net without BN)
    ema: float      # test accuracy in eval mode on the moving averages


def scored_run(run: Run, n_train: int) -> "ScoredRun":
    """A grid run with ``Config.score_at`` as a :class:`ScoredRun`: its planned scoring steps
    (:func:`bnviz.config.score_steps` of :func:`total_steps`) and the engine's scores there
    (:func:`bnviz.runs.scored_snapshots`: PreciseBN where the net has BN, else eval mode)."""
    cfg = run.history.config
    steps = score_steps(cfg.score_at, total_steps(cfg, cfg.train_size or n_train))
    snaps = scored_snapshots(run.history) or []
    rows = [StepScore(sn.step, sn.precise_test_acc if sn.precise_test_acc is not None else sn.test_acc, sn.test_acc)
            for sn in snaps]
    return ScoredRun(run, steps, rows)


@dataclass
class ScoredRun:
    """One run of a study and its scores at the scoring steps."""

    run: Run
    steps: tuple[int, ...]
    scores: list[StepScore] = field(default_factory=list)

    def value(self, statistics: str = "precise") -> float | None:
        """The mean of the scores (None: the run diverged or missed a scoring step)."""
        if statistics not in ("precise", "ema"):
            raise ValueError(f"statistics={statistics!r} is not valid; valid: 'precise' (recomputed), 'ema'")
        got = {r.step: getattr(r, statistics) for r in self.scores}
        if self.run.status in ("diverged", "error") or any(s not in got for s in self.steps):
            return None
        return sum(got[s] for s in self.steps) / len(self.steps)


@dataclass
class Study:
    """The scored runs of one study. ``cell(**tags)``: the runs with those tags, in seed order;
    ``stats(**tags)``: a :class:`~bnviz.verdicts.SeedStats` of their scores with the cell's
    measured causes (:func:`~bnviz.verdicts.cell_causes`); ``vs(ref, other)``: a paired verdict."""

    runs: list[ScoredRun]
    train_size: int
    dataset_label: str = ""

    def cell(self, **tags) -> list[ScoredRun]:
        got = [r for r in self.runs if all(r.run.tags.get(k) == v for k, v in tags.items())]
        if not got:
            raise KeyError(f"no run of this study has the tags {tags}")
        keys = {tuple((k, v) for k, v in r.run.tags.items() if k != "seed") for r in got}
        if len(keys) > 1:
            raise ValueError(f"the tags {tags} match {len(keys)} cells; name more tags")
        return sorted(got, key=lambda r: r.run.tags.get("seed", 0))

    def stats(self, statistics: str = "precise", **tags) -> SeedStats:
        runs = self.cell(**tags)
        s = seed_stats([r.value(statistics) for r in runs])
        s.causes = cell_causes([r.run for r in runs], train_size=self.train_size)
        arm = Cell(tuple(tags.items()), [r.run for r in runs]).arm
        s.arm = f"{arm}:{statistics}:steps {runs[0].steps}"
        return s

    def vs(self, reference: dict, other: dict, names: tuple[str, str] | None = None,
           statistics: str = "precise") -> Verdict:
        """The cell ``other`` (tags) against ``reference`` (tags), seed by seed."""
        names = names or (", ".join(f"{v}" for v in reference.values()), ", ".join(f"{v}" for v in other.values()))
        return verdict(self.stats(statistics, **reference), self.stats(statistics, **other), names=names)

    def table(self, by=("norm", "batch_size")):
        """One row per cell: its tags, the mean and std of the scores (recomputed and EMA)."""
        import pandas as pd

        keys = list(dict.fromkeys(tuple(r.run.tags.get(k) for k in by) for r in self.runs))
        rows = []
        for key in keys:
            tags = dict(zip(by, key))
            p, e = self.stats("precise", **tags), self.stats("ema", **tags)
            rows.append({**tags, "lr": self.cell(**tags)[0].run.tags.get("lr"), "seeds": p.n + p.failed,
                         "mean": p.mean, "std": p.std, "ema": e.mean, "ema_cost": p.mean - e.mean,
                         "scored at steps": self.cell(**tags)[0].steps})
        return pd.DataFrame(rows)


def run_study(base: Config, variants: dict[str, dict], tags: dict[str, dict], data: Dataset | None = None,
              fractions=SCORE_FRACTIONS, progress: bool = True) -> Study:
    """Train one run per variant (``label -> changes``, :func:`bnviz.runs.apply_changes`; ``tags[label]``:
    what the tables show, with ``seed``) through :func:`bnviz.runs.run_grid`, each scored by the
    engine at ``fractions`` of its own steps (``Config.score_at``). Returns a :class:`Study`."""
    if not variants:
        raise ValueError("variants is empty: give at least one label -> changes")
    missing = [k for k in variants if k not in tags]
    if missing:
        raise ValueError(f"tags has no entry for {missing}; give each variant its tags (norm, batch_size, seed, ...)")
    data = _data_for(base, data)
    fractions = tuple(float(f) for f in fractions)
    grid = run_grid(base, {k: {**v, "score_at": fractions} for k, v in variants.items()}, data=data,
                    progress=progress, tags={k: dict(tags[k]) for k in variants})
    return Study([scored_run(r, len(data.train_x)) for r in grid.runs], len(data.train_x), data.label)


def wu_he_plan(batch_sizes, lr_ref: float, batch_ref: int, epochs: int, n_train: int) -> list[dict]:
    """Wu & He's design: every batch size sees ``epochs`` epochs of ``n_train`` examples, with
    ``lr = lr_ref · B / batch_ref`` (the linear scaling rule). One dict per B: batch_size, lr,
    epochs, train_size, steps."""
    bss = [int(b) for b in batch_sizes]
    if not bss or min(bss) < 2:
        raise ValueError(f"batch_sizes={batch_sizes!r} is not valid; valid: integers >= 2 (BN needs 2), e.g. [2, 4, 8]")
    if not (lr_ref > 0 and batch_ref >= 1 and isinstance(epochs, int) and epochs >= 1 and n_train >= max(bss)):
        raise ValueError(f"lr_ref={lr_ref!r}, batch_ref={batch_ref!r}, epochs={epochs!r}, n_train={n_train!r} are not "
                         "valid; valid: lr_ref > 0, batch_ref >= 1, epochs a positive int, n_train >= the largest B")
    return [{"batch_size": b, "lr": lr_ref * b / batch_ref, "epochs": epochs, "train_size": n_train,
             "steps": planned_steps(epochs, n_train, b)} for b in bss]


def tune_lr_seeds(base: Config, cells: dict[str, dict], lrs: dict[str, list[float]], seeds=(100, 101),
                  data: Dataset | None = None, progress: bool = True):
    """The lr of each cell (``name -> changes``) chosen from ``lrs[name]`` by the **mean over**
    ``seeds`` of :data:`bnviz.runs.ACCURACY` (seeds a comparison should not use). A diverged seed
    disqualifies its lr. Returns ``(best, table)``: ``best[name]`` (the middle lr if none
    finished) and a DataFrame with one row per (cell, lr): the accuracy of each seed, the mean, and
    the mean on the moving averages (``ema``)."""
    import pandas as pd

    seeds = tuple(int(s) for s in seeds)
    if len(seeds) < 1 or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds={seeds!r} is not valid; valid: distinct integers, e.g. (100, 101)")
    variants, tags = {}, {}
    for name, changes in cells.items():
        if not lrs.get(name):
            raise ValueError(f"lrs has no learning rates for {name!r}; give lrs[{name!r}] = [0.1, 0.3, 1.0]")
        for lr in lrs[name]:
            for s in seeds:
                label = f"{name}, lr {lr:.4g} · seed {s}"
                variants[label], tags[label] = {**changes, "lr": float(lr), "seed": s}, {"cell": name, "lr": float(lr), "seed": s}
    grid = run_grid(base, variants, data=data, progress=progress, tags=tags)
    rows, best = [], {}
    for name in cells:
        for lr in lrs[name]:
            runs = [r for r in grid if r.tags["cell"] == name and r.tags["lr"] == float(lr)]
            accs, emas = [r.acc for r in runs], [r.acc_ema for r in runs]
            ok = all(a is not None for a in accs)
            rows.append({"cell": name, "lr": float(lr), **{f"seed {s}": a for s, a in zip(seeds, accs)},
                         "mean": sum(accs) / len(accs) if ok else None,
                         "ema": sum(emas) / len(emas) if ok and all(e is not None for e in emas) else None})
        done = [r for r in rows if r["cell"] == name and r["mean"] is not None]
        best[name] = max(done, key=lambda r: r["mean"])["lr"] if done else float(sorted(lrs[name])[len(lrs[name]) // 2])
    return best, pd.DataFrame(rows)


class EpochStates:
    """Trainer callback: a copy of the model's weights and buffers at each epoch end, to score
    them afterwards (e.g. with recomputed statistics) without adding to the run's time."""

    def __init__(self):
        self.states: list[dict] = []

    def on_snapshot(self, trainer, s) -> None:
        if s.kind == "epoch":
            self.states.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})


def _norm_io(model: nn.Module, x: torch.Tensor, train: bool) -> dict[str, tuple]:
    """{layer: (input, output)} of each norm layer of a copy of ``model`` run on float images ``x``."""
    m = copy.deepcopy(model).train(train)
    seen: dict[str, tuple] = {}
    hooks = [mod.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, (i[0].detach(), o.detach())))
             for n, mod in norm_layers(m).items()]
    try:
        with torch.no_grad():
            m(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def bn_output_levels(model: nn.Module, x: torch.Tensor, tol: float = 1e-3):
    """What each BN layer's normalised output x̂ = (output − β)/γ looks like in training mode on the
    float batch ``x`` (on a copy): per layer the values per channel m, the share of x̂ within
    ``tol`` of ±1, and the median number of distinct x̂ values in a channel (rounded to ``tol``).
    At B = 2 a fully connected BN layer sees m = 2 values per channel a, b: x̂ = ±d/√(d² + 4·eps)
    with d = a − b, i.e. ±1 unless |a − b| is within a few √eps, and its output ±γ + β: two
    values per channel, whatever the input. Channels with |γ| < 1e-6 are left out. A DataFrame, one row per BN layer."""
    import pandas as pd

    rows = []
    for name, (inp, out) in _norm_io(model, x, train=True).items():
        mod = norm_layers(model)[name]
        if not bn_layers(nn.Sequential(mod)):  # BN layers only (PyTorch's or bnviz's)
            continue
        C = inp.shape[1]
        g = mod.weight.detach().reshape(1, C, *([1] * (inp.dim() - 2))) if mod.weight is not None else 1.0
        b = mod.bias.detach().reshape(1, C, *([1] * (inp.dim() - 2))) if mod.bias is not None else 0.0
        xhat = ((out - b) / g).transpose(0, 1).reshape(C, -1)
        keep = (mod.weight.detach().abs() > 1e-6) if mod.weight is not None else torch.ones(C, dtype=torch.bool)
        xhat = xhat[keep]
        distinct = [len(torch.unique(torch.round(row / tol))) for row in xhat]
        rows.append({"layer": name, "values per channel": xhat.shape[1],
                     "share of x̂ at ±1": float(((xhat.abs() - 1).abs() < tol).float().mean()),
                     "median |x̂|": float(xhat.abs().median()),
                     "distinct x̂ per channel (median)": int(sorted(distinct)[len(distinct) // 2])})
    return pd.DataFrame(rows)


def eval_modes(model: nn.Module, data: Dataset, batch_size: int, images: int = PRECISE_BN_IMAGES) -> dict:
    """Test accuracy of ``model`` three ways: ``train mode`` (each test batch of ``batch_size``
    normalised with its own statistics, as in training; a last batch of one example joins the
    one before), ``EMA`` (eval mode, the moving averages) and ``recomputed`` (PreciseBN on the first
    ``images`` training images). Works on copies: ``model`` is unchanged."""
    if not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size={batch_size!r} is not valid; valid: an int >= 2 (train mode needs 2 per batch)")
    m = copy.deepcopy(model).train()
    n, correct = len(data.test_x), 0
    cuts = list(range(0, n, batch_size))
    if n - cuts[-1] == 1 and len(cuts) > 1:
        cuts.pop()
    with torch.no_grad():
        for a, b in zip(cuts, cuts[1:] + [n]):
            correct += int((m(to_float(data.test_x[a:b])).argmax(1) == data.test_y[a:b]).sum())
    return {"train mode": correct / n, "EMA": eval_accuracy(copy.deepcopy(model), data.test_x, data.test_y),
            "recomputed": eval_accuracy(precise_model(model, data, images), data.test_x, data.test_y)}


def layer_offsets(model: nn.Module, x: torch.Tensor):
    """Per norm layer, on the float batch ``x`` in training mode (a copy): the median over
    channels of |mean| / std of the layer's **input** (a scale-only BN divides by the std without
    subtracting the mean, so its output keeps this offset, in units of std, before γ), and of its
    output. A DataFrame, one row per norm layer."""
    import pandas as pd

    rows = []
    for name, (inp, out) in _norm_io(model, x, train=True).items():
        def offset(t):
            dims = [0, *range(2, t.dim())]
            var, mean = torch.var_mean(t.double(), dim=dims, correction=0)
            return float((mean.abs() / var.clamp_min(1e-12).sqrt()).median())
        rows.append({"layer": name, "input |mean|/std": offset(inp), "output |mean|/std": offset(out)})
    return pd.DataFrame(rows)
