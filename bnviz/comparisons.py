"""Comparisons and verdicts: variants run with the same seeds, compared seed by seed.

* **Seeds and verdicts** (:func:`compare`, :mod:`bnviz.verdicts`): each variant runs with every
  seed (the seed sets the initial weights and the batch order). A variant is summarised by the
  mean, the sample standard deviation (``ddof=1``) and the min–max of its accuracy over the
  seeds. Against the reference, the per-seed differences give Δ and a 95% t-interval; the
  :class:`~bnviz.verdicts.Verdict`'s outcome is better/worse when the interval excludes 0, else
  within noise (not comparable when a side has nothing to compare); the threshold printed is the
  half-width applied. Each compared cell carries its measured causes
  (:class:`~bnviz.verdicts.Cause`).
* Every table names its data set (``History.dataset_label``); on the synthetic stand-in that
  label says SYNTHETIC, because its numbers are not Fashion-MNIST results.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from .config import Config
from .data import Dataset
from .precise import PRECISE_BN_IMAGES
from .runs import ACCURACY, Cell, GridResult, Run, _seeds, run_grid
from .verdicts import CHANCE_LIMIT, SeedStats, Verdict, cell_causes, describe, seed_stats

__all__ = ["Comparison", "compare", "caution", "summarize", "ema_vs_precise", "status_table", "answer_table"]


@dataclass
class Comparison:
    """Variants run with the same seeds (from :func:`compare`). ``cell(v)`` is the variant's
    :class:`~bnviz.runs.Cell`; ``stats(v)`` its :class:`SeedStats` of :data:`ACCURACY` in seed
    order, with its causes; ``contrast(a, b)`` compares b against a seed by seed (a
    :class:`~bnviz.verdicts.Verdict`); ``table()`` has one row per variant: mean, std, min, max, Δ
    against the reference, the threshold applied (the 95% t-interval's half-width), the interval,
    p, the verdict and the caution. ``statistics='ema'`` uses the moving-average accuracy."""

    reference: str
    variants: list[str]
    seeds: tuple[int, ...]
    runs: GridResult
    metric: str = ACCURACY
    full_size: dict[str, float] = field(default_factory=dict)

    @property
    def dataset_label(self) -> str:
        return self.runs.dataset_label

    def cell(self, variant: str) -> Cell:
        """The variant's runs in the order of ``seeds``, as a :class:`~bnviz.runs.Cell`."""
        if variant not in self.variants:
            raise KeyError(f"no variant {variant!r}; variants: {self.variants}")
        runs = [r for r in self.runs if r.tags.get("variant") == variant]
        order = {s: i for i, s in enumerate(self.seeds)}
        runs = sorted(runs, key=lambda r: order.get(r.tags.get("seed"), len(order)))
        return Cell((("variant", variant),), runs, self.full_size.get(variant), train_size=self.runs.train_size)

    def select(self, names: dict[str, str]) -> "Comparison":
        """The variants ``names`` ({variant: name in the new comparison}) of this comparison, under
        their new names, sharing the runs (nothing retrained): pass it as ``compare(include=...)`` to
        reuse an arm another section already trained (the ledger counts the same arms once)."""
        missing = [v for v in names if v not in self.variants]
        if missing:
            raise ValueError(f"select: no variant(s) {missing}; variants: {self.variants}")
        runs = [Run(r.label, {**r.tags, "variant": new}, r.history) for v, new in names.items() for r in self.runs_of(v)]
        ref = names.get(self.reference, next(iter(names.values())))
        return Comparison(ref, list(names.values()), self.seeds, GridResult(runs, self.dataset_label, self.runs.train_size),
                          self.metric, {names[v]: a for v, a in self.full_size.items() if v in names})

    def runs_of(self, variant: str) -> list[Run]:
        """The variant's runs, in the order of ``seeds``."""
        return self.cell(variant).runs

    def values(self, variant: str, statistics: str = "precise") -> list[float | None]:
        return self.cell(variant).values(statistics)

    def stats(self, variant: str, statistics: str = "precise") -> SeedStats:
        return self.cell(variant).stats(statistics)

    def causes(self, variant: str) -> list:
        """The measured causes of this variant (:func:`bnviz.verdicts.cell_causes`)."""
        return self.cell(variant).causes

    def contrast(self, a: str, b: str, statistics: str = "precise") -> Verdict:
        """``b`` against ``a``, seed by seed (see :func:`bnviz.verdicts.verdict`)."""
        return self.cell(b).vs(self.cell(a), statistics, names=(a, b))

    @property
    def noise_floor(self) -> float:
        """The seed-to-seed sample std of the reference (a description of the noise; the
        threshold of a verdict is ``contrast(a, b).half_width``)."""
        return self.stats(self.reference).std

    def table(self, reference: str | None = None, statistics: str = "precise"):
        import pandas as pd

        ref = reference or self.reference
        nan = float("nan")
        rows = []
        for v in self.variants:
            s = self.stats(v, statistics)
            row = {"variant": v, "seeds": s.n + s.failed, "mean": s.mean, "std": s.std, "min": s.min,
                   "max": s.max, "diverged": s.failed}
            if v == ref:
                row.update({"Δ": 0.0, "threshold": nan, "CI low": nan, "CI high": nan, "p": nan,
                            "verdict": "(reference)"})
            else:
                c = self.contrast(ref, v, statistics)
                row.update({"Δ": c.delta, "threshold": c.half_width, "CI low": c.ci[0], "CI high": c.ci[1],
                            "p": c.p, "verdict": c.headline()})
            row["caution"] = describe(s.causes, notes=False)  # notes (nearly converged) are not CAUTIONs
            rows.append(row)
        return pd.DataFrame(rows)

    def say(self, a: str, b: str) -> str:
        """'b vs a: Δ +0.012 ± 0.022 (95% t-interval over 3 paired seeds) → within noise (...)'."""
        return self.contrast(a, b).say()

    def caution(self, limit: float = CHANCE_LIMIT) -> str:
        """See :func:`caution`: one line per variant with a measured cause."""
        return caution(self, limit)

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
            precise_bn: int | None = PRECISE_BN_IMAGES, full_size: dict[str, float] | None = None) -> Comparison:
    """Run every variant with every seed (:func:`bnviz.runs.run_grid`) and return a :class:`Comparison`.

    ``reference``: the variant the others are compared with (default: the first; it may be in
    ``include``). ``include``: a Comparison run earlier with the same seeds whose variants are
    reused, not rerun (e.g. the chapter's base run). ``seeds``: default
    :func:`bnviz.course.default_seeds`. ``full_size``: ``{variant: accuracy at full size}``, if
    known, for the "far below its full-size accuracy" cause.
    """
    seeds = _seeds(seeds) if include is None or seeds is not None else tuple(include.seeds)
    if include is not None and tuple(include.seeds) != seeds:
        raise ValueError(f"include was run with seeds {include.seeds}, this comparison asks for {seeds}")
    new = {k: v for k, v in variants.items() if include is None or k not in include.variants}
    if not new and include is None:
        raise ValueError("variants is empty: give at least one label -> changes")
    runs = run_grid(base, new, seeds, data=data, progress=progress, models=models,
                    precise_bn=precise_bn) if new else GridResult(dataset_label=include.dataset_label,
                                                                  train_size=include.runs.train_size)
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
                      include.dataset_label or new.dataset_label, include.runs.train_size or new.runs.train_size)
    return Comparison(reference or next(iter(variants)), order, new.seeds, runs,
                      full_size={**include.full_size, **new.full_size})


def _cells(result: "GridResult | Comparison") -> list[Cell]:
    if isinstance(result, Comparison):
        return [result.cell(v) for v in result.variants]
    return result.cells()


def caution(result: "GridResult | Comparison", limit: float = CHANCE_LIMIT, full_size: dict | None = None) -> str:
    """One line per compared **cell** (runs that differ only by seed: a variant, a (model, lr),
    a (norm, batch size)) that has a measured cause (:func:`bnviz.verdicts.cell_causes`):
    'CAUTION: LeNet, no BN, lr 0.1: never left chance (best seed 0.113 < 0.15)'. Empty string if
    no cell has one. ``full_size``: ``{cell name: full-size accuracy}`` (a Comparison uses its own)."""
    if isinstance(result, Comparison):
        full_size = {**result.full_size, **(full_size or {})}
    lines, notes = [], []
    for c in _cells(result):
        causes = cell_causes(c.runs, (full_size or {}).get(c.name), limit, train_size=c.train_size,
                             saturation=c.saturation)
        if any(x.caution for x in causes):
            lines.append(f"CAUTION: {c.name}: {describe(causes, notes=False)}")
        notes += [f"note: {c.name}: {x}" for x in causes if not x.caution]
    cautioned = bool(lines)
    lines += notes
    if not cautioned:
        return "\n".join(lines)
    if not lines:
        return ""
    runs = result.runs if isinstance(result, Comparison) else result
    steps = max((r.history.snapshots[-1].step for r in runs if r.history.snapshots), default=0)
    return "\n".join(lines) + (f"\n(after up to {steps} steps: a verdict involving a flagged cell compares what the "
                               "runs reached in this budget, not what the settings reach after full training)")


def summarize(result: GridResult, by: Sequence[str]):
    """One row per combination of the tags ``by`` (over the seeds): ``n`` (runs with an
    accuracy), ``mean``, ``std`` (sample), ``min``, ``max`` of :data:`ACCURACY`, ``acc_ema`` (the
    mean of :data:`ACCURACY_EMA`), ``diverged`` (runs that failed), ``status`` ('diverged' if any
    run of the group failed) and ``caution`` (the group's measured causes, '' if none)."""
    import pandas as pd

    groups: dict[tuple, list[Run]] = {}
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
                     "status": "diverged" if s.failed else "finished",
                     "caution": describe(cell_causes(runs, train_size=result.train_size), notes=False)})
    return pd.DataFrame(rows)


def ema_vs_precise(result: "GridResult | Comparison"):
    """Per cell: the mean over seeds of :data:`ACCURACY` (recomputed statistics) and of
    :data:`ACCURACY_EMA` (moving averages), and ``ema_cost`` = precise − EMA: what the moving
    averages' lag costs at the end of these runs."""
    import pandas as pd

    rows = []
    for c in _cells(result):
        p, e = c.stats(), c.stats("ema")
        rows.append({"cell": c.name, "precise": p.mean, "ema": e.mean, "ema_cost": p.mean - e.mean,
                     "precise_std": p.std, "ema_std": e.std})
    return pd.DataFrame(rows)


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

