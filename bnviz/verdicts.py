"""Seed statistics, paired verdicts and per-cell cautions: how chapters 05-07 decide "better",
"worse" or "within noise", and when a verdict needs a CAUTION. Used by :mod:`bnviz.experiments`.

Conventions:

* A **cell** is a set of runs that differ only by their seed (a variant of a comparison, a
  (model, lr) of an lr sweep, a (norm, batch size) of a batch-size grid). Every cell of an
  experiment runs on the **same seeds** (the seed sets the initial weights and the batch order),
  so two cells are compared seed by seed.
* **Paired verdict** (:func:`paired`): dᵢ = acc(other, seed i) − acc(reference, seed i) over the
  seeds where both runs finished; Δ = mean(d), s_d = std(d) (ddof 1), and the 95% t-interval
  Δ ± t₀.₉₇₅,ₙ₋₁·s_d/√n. The **threshold** is that half-width; "better"/"worse" when |Δ| exceeds
  it (the interval excludes 0: a paired t-test at 5%), else "within noise". One rule for 3
  seeds (t = 4.30) and 5 (t = 2.78). A stuck arm's std of ≈ 0 cannot shrink the threshold: s_d is
  then the other arm's std.
* **Many comparisons** (:func:`holm`, :func:`multiplicity_note`): each verdict is a 5% test; a
  chapter that makes 45 of them expects about 2 false "better/worse" when nothing differs.
* **Causes** (:func:`cell_causes`): each is measured, never fixed text: never left chance; some
  seeds learned and others did not ("2 of 3 seeds learned"); convergence, graded (far from
  converged: a CAUTION; nearly converged: a note, not a CAUTION); under one epoch of data seen;
  diverged seeds; far below a given full-size accuracy; saturation, per layer where measured.
  :class:`Cause` holds the numbers; ``str(cause)`` (made in :meth:`Cause.__str__` only) the words.
* **Holm in the readings** (:meth:`Verdict.holm_status`): a verdict recorded in a chapter's
  ledger (:class:`bnviz.course.Chapter`) says whether it "holds after Holm" over the chapter's
  family or is "nominal" (a 5% result that Holm's correction does not keep).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Iterable

__all__ = ["ALPHA", "CHANCE_LIMIT", "STILL_IMPROVING", "FAR_FROM_CONVERGED", "FAR_BELOW", "SATURATION_LIMIT",
           "SeedStats",
           "fmt_stats", "seed_stats", "pooled_std", "Paired", "paired", "welch", "holm", "multiplicity_note",
           "CauseKind", "NOTE_KINDS", "Cause", "describe", "cell_causes", "epochs_seen", "layer_saturation", "HOLDS",
           "NOMINAL", "Outcome", "Verdict", "verdict"]

ALPHA = 0.05  # each verdict is a two-sided test at 5%: the 95% t-interval of the paired difference
CHANCE_LIMIT = 0.15  # a cell whose best seed stays below this (chance is 0.1) never left chance
STILL_IMPROVING = 0.02  # training accuracy gained over the last quarter of the steps: not converged
FAR_FROM_CONVERGED = 0.5  # that gain ≥ half the remaining training error (1 − training accuracy): far from it
FAR_BELOW = 0.05  # this far below its full-size accuracy: not converged
SATURATION_LIMIT = 0.5  # over half the sigmoid outputs in the flat tails at the end: saturated


# ----------------------------------------------------------------------------- one cell


@dataclass
class SeedStats:
    """The spread of one accuracy over seeds. ``values``: the finished runs' accuracies;
    ``std`` is the sample standard deviation (``ddof=1``; 0 with one value); ``failed`` counts
    runs without an accuracy (diverged). ``raw``: the accuracies in seed order with None for a
    failed run (what pairing uses); ``causes``: the cell's caution causes (:func:`cell_causes`)."""

    values: list[float]
    failed: int = 0
    raw: list[float | None] | None = None
    causes: list[Cause] = field(default_factory=list)
    arm: str | None = None  # what was trained (configs without labels) and measured; set by Cell.stats

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / self.n if self.n else float("nan")

    @property
    def std(self) -> float:
        if self.n < 2:
            return 0.0 if self.n == 1 else float("nan")
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (self.n - 1))

    @property
    def min(self) -> float:
        return min(self.values) if self.values else float("nan")

    @property
    def max(self) -> float:
        return max(self.values) if self.values else float("nan")

    def __str__(self) -> str:
        return fmt_stats(self)


def fmt_stats(s: SeedStats) -> str:
    """'0.812 ± 0.011 (0.800–0.824, 3 seeds)', with the failed runs named."""
    if s.n == 0:
        return f"no accuracy ({s.failed} run(s) diverged)"
    text = f"{s.mean:.3f} ± {s.std:.3f} ({s.min:.3f}–{s.max:.3f}, {s.n} seed{'s' if s.n != 1 else ''})"
    if any(c.kind is CauseKind.SOME_SEEDS_LEARNED for c in (s.causes or ())):  # a mean describes neither mode
        text = (f"bimodal: seeds {' / '.join('diverged' if v is None else f'{v:.3f}' for v in (s.raw or s.values))}"
                f" (mean {s.mean:.3f} describes neither mode)")
    if s.failed:
        text += f", {s.failed} diverged"
    return text


def _is_run(x) -> bool:
    return hasattr(x, "history") and hasattr(x, "acc")


def seed_stats(values: Iterable, full_size: float | None = None) -> SeedStats:
    """Mean, sample std, min and max of accuracies over seeds, in seed order. ``values``: floats
    (None / NaN for runs that diverged, counted in ``failed``) or :class:`~bnviz.experiments.Run`
    objects (then ``causes`` has every measured cause; floats give only "never left chance" and
    "diverged seeds"). ``full_size``: the cell's full-size accuracy, if known."""
    items = list(values)
    runs = [x for x in items if _is_run(x)]
    raw = [x.acc if _is_run(x) else x for x in items]
    raw = [None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in raw]
    ok = [v for v in raw if v is not None]
    s = SeedStats(ok, len(raw) - len(ok), raw)
    s.causes = cell_causes(runs, full_size) if runs and len(runs) == len(items) else _value_causes(s)
    return s


def pooled_std(*groups: SeedStats) -> float:
    """The pooled sample standard deviation of groups: ``sqrt(Σ(nᵢ−1)sᵢ² / Σ(nᵢ−1))`` (groups
    with fewer than 2 values add nothing); 0 when no group has 2 values. (Not the verdict rule
    since issue 15: see :func:`paired`.)"""
    dof = sum(g.n - 1 for g in groups if g.n >= 2)
    if dof == 0:
        return 0.0
    return math.sqrt(sum((g.n - 1) * g.std ** 2 for g in groups if g.n >= 2) / dof)


# ----------------------------------------------------------------------------- causes


class CauseKind(Enum):
    """Why a verdict about a cell needs a CAUTION, or a note (each measured, see :class:`Cause`)."""

    NEVER_LEFT_CHANCE = "never left chance"
    SOME_SEEDS_LEARNED = "some seeds learned"
    STILL_IMPROVING = "far from converged"
    NEARLY_CONVERGED = "nearly converged"
    UNDER_ONE_EPOCH = "under one epoch"
    DIVERGED = "diverged"
    FAR_BELOW_FULL_SIZE = "far below full size"
    SATURATION = "saturation"


NOTE_KINDS = frozenset({CauseKind.NEARLY_CONVERGED})  # shown as a note, not a CAUTION


@dataclass(frozen=True)
class Cause:
    """One measured reason for a CAUTION (or a note): its ``kind``, the measured ``value`` and
    what it was held against (``ref``):

    * NEVER_LEFT_CHANCE: value = the best seed's accuracy, ref = the limit (:data:`CHANCE_LIMIT`);
    * SOME_SEEDS_LEARNED: value = the seeds that left chance, ref = the seeds that finished
      ("2 of 3 seeds learned": a bimodal cell, whose mean and interval describe neither mode);
    * STILL_IMPROVING (far from converged) and NEARLY_CONVERGED: value = the mean training-accuracy
      gain over the last quarter of the steps, ref = the training error left (1 − the mean training
      accuracy over that quarter), ``se`` = the gain's standard error. Far when the gain is at least
      :data:`FAR_FROM_CONVERGED` of the error left (another quarter at that pace would close half
      of it), nearly converged below;
    * UNDER_ONE_EPOCH: value = the epochs of the training set seen (examples ÷ training-set size),
      ref = 1;
    * DIVERGED: value = the seeds that diverged, ref = the seeds run;
    * FAR_BELOW_FULL_SIZE: value = the cell's mean accuracy, ref = its full-size accuracy;
    * SATURATION: value = the share of a layer's sigmoid outputs saturated at the end (``layer``
      names it; None: all sigmoids pooled, when only that was measured), ref = :data:`SATURATION_LIMIT`.
      ``note=True`` where it is the cell's only cause (see :func:`cell_causes`): then a note.

    Code decides on ``kind`` and the numbers; ``str(cause)`` is the sentence shown (made here only)."""

    kind: CauseKind
    value: float
    ref: float
    se: float | None = None
    layer: str | None = None
    note: bool = False  # shown as a note, not a CAUTION, whatever the kind

    @property
    def unconverged(self) -> bool:
        """True for the kinds that say the cell is not converged (far from converged, under one
        epoch, far below full size); a nearly converged cell is not."""
        return self.kind in (CauseKind.STILL_IMPROVING, CauseKind.FAR_BELOW_FULL_SIZE, CauseKind.UNDER_ONE_EPOCH)

    @property
    def caution(self) -> bool:
        """True when this cause makes a CAUTION (all kinds but the notes: nearly converged, and a
        saturation marked ``note``)."""
        return self.kind not in NOTE_KINDS and not self.note

    def __str__(self) -> str:
        k, v, r = self.kind, self.value, self.ref
        if k is CauseKind.NEVER_LEFT_CHANCE:
            return f"never left chance (best seed {v:.3f} < {r:g})"
        if k is CauseKind.SOME_SEEDS_LEARNED:
            return f"{v:.0f} of {r:.0f} seeds learned (the other{'s' if r - v > 1 else ''} stayed below {CHANCE_LIMIT:g})"
        if k in (CauseKind.STILL_IMPROVING, CauseKind.NEARLY_CONVERGED):
            se = f" ± {self.se:.3f}" if self.se is not None else ""
            what = "far from converged" if k is CauseKind.STILL_IMPROVING else "nearly converged"
            return (f"{what}: training accuracy {v:+.3f}{se} over the last quarter of the steps, "
                    f"{v / r if r > 0 else math.inf:.2g}× the training error left ({r:.3f})")
        if k is CauseKind.UNDER_ONE_EPOCH:
            return f"under one epoch: saw {v:.2g} of the training set"
        if k is CauseKind.FAR_BELOW_FULL_SIZE:
            return f"not converged: far below its full-size accuracy ({v:.3f} vs {r:.3f})"
        if k is CauseKind.DIVERGED:
            return f"diverged seeds ({v:.0f} of {r:.0f})"
        where = f"{self.layer}'s sigmoid outputs" if self.layer else "sigmoid outputs (all layers pooled)"
        return f"saturation ({v:.0%} of {where} saturated at the end)"


def describe(causes: Iterable[Cause], notes: bool = True) -> str:
    """The causes as one text: 'never left chance (...); diverged seeds (1 of 3)' ('' for none);
    ``notes=False`` leaves out the notes (nearly converged)."""
    return "; ".join(str(c) for c in causes if notes or c.caution)


def _value_causes(s: SeedStats, limit: float = CHANCE_LIMIT) -> list[Cause]:
    causes = []
    if s.n and s.max < limit:
        causes.append(Cause(CauseKind.NEVER_LEFT_CHANCE, s.max, limit))
    elif s.n and s.min < limit:
        stuck = [v for v in s.values if v < limit]
        causes.append(Cause(CauseKind.SOME_SEEDS_LEARNED, s.n - len(stuck), s.n))
    if s.failed:
        causes.append(Cause(CauseKind.DIVERGED, s.failed, s.n + s.failed))
    return causes


def _gain(history) -> tuple[float, float, float] | None:
    """(gain, its standard error, the training accuracy reached): the mean training accuracy of the
    step snapshots in the last quarter of the steps minus that in the quarter before, and the mean
    over the last quarter; None with fewer than 8 snapshots."""
    steps = [s for s in history.snapshots if s.kind == "step"]
    if len(steps) < 8:
        return None
    total = steps[-1].step
    last = [s.train_acc for s in steps if s.step > 0.75 * total]
    before = [s.train_acc for s in steps if 0.5 * total < s.step <= 0.75 * total]
    if len(last) < 2 or len(before) < 2:
        return None
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    var = lambda v: sum((x - mean(v)) ** 2 for x in v) / (len(v) - 1)  # noqa: E731
    return mean(last) - mean(before), math.sqrt(var(last) / len(last) + var(before) / len(before)), mean(last)


def epochs_seen(history, train_size: int | None = None) -> float | None:
    """Epochs of the training set a run saw: the examples of its last snapshot ÷ ``train_size``
    (default: the run's ``config.train_size``); None when neither size is known."""
    n = train_size or getattr(history.config, "train_size", None)
    if not n or not history.snapshots:
        return None
    return history.snapshots[-1].examples / n


def layer_saturation(snapshot) -> dict:
    """{layer: saturated share} from a snapshot's ``saturated`` (a dict per layer, or one pooled
    float, returned as ``{None: share}``); {} when not measured."""
    layers = getattr(snapshot, "saturated_layers", None)
    if layers:  # the engine's per-layer shares (bnviz.precise.saturated_shares)
        return {k: float(v) for k, v in layers.items() if v is not None}
    sat = getattr(snapshot, "saturated", None)
    if sat is None:
        return {}
    if isinstance(sat, dict):
        return {k: float(v) for k, v in sat.items() if v is not None}
    return {None: float(sat)}


def cell_causes(runs, full_size: float | None = None, limit: float = CHANCE_LIMIT, train_size: int | None = None,
                saturation: dict | None = None) -> list[Cause]:
    """The measured reasons a verdict about this cell (runs that differ only by seed) needs a
    CAUTION (or a note), as :class:`Cause` values, in this order:

    1. never left chance (the best seed below ``limit``), or some seeds learned and others did
       not (the worst finished seed below ``limit``, the best above);
    2. convergence, graded: when the mean gain over the finished seeds is above
       :data:`STILL_IMPROVING` and above twice its standard error (from the spread of the
       snapshots: small batches' accuracy is noisy), "far from converged" if that gain is at least
       :data:`FAR_FROM_CONVERGED` of the training error left, else "nearly converged" (a note);
    3. under one epoch: the mean over the finished seeds of :func:`epochs_seen` below 1
       (``train_size``: the training-set size of the experiment; default each run's
       ``config.train_size``; a diverged run, stopped early, is not counted);
    4. diverged seeds;
    5. far below ``full_size`` (more than :data:`FAR_BELOW`);
    6. saturation, per layer: each layer whose share of saturated sigmoid outputs (mean over the
       finished seeds' last snapshots, or ``saturation`` = {layer: share} measured by a probe,
       e.g. :func:`bnviz.probes.saturation_by_layer`) is above :data:`SATURATION_LIMIT`. Where
       only one pooled share was measured, that share, named as pooled. Saturation makes a
       CAUTION only in a cell that has another CAUTION (it failed to learn, or has not settled,
       and saturated sigmoids are a measured reason why); in a cell that learned and settled it
       is a note: confident units, not a reason to doubt the comparison.

    A cell that never left chance is not also 'not converged'. Empty when none applies."""
    runs = list(runs)
    s = SeedStats([r.acc for r in runs if r.acc is not None], sum(r.acc is None for r in runs))
    causes = [c for c in _value_causes(s, limit) if c.kind is not CauseKind.DIVERGED]
    ok = [r for r in runs if r.acc is not None]
    stuck = any(c.kind is CauseKind.NEVER_LEFT_CHANCE for c in causes)
    gains = [g for g in (_gain(r.history) for r in ok) if g is not None]
    if gains and not stuck:
        g = sum(x for x, _, _ in gains) / len(gains)
        se = math.sqrt(sum(e ** 2 for _, e, _ in gains)) / len(gains)
        left = 1 - sum(a for _, _, a in gains) / len(gains)
        if g > STILL_IMPROVING and g > 2 * se:  # a real rise, not the noise of small batches' accuracy
            far = left <= 0 or g >= FAR_FROM_CONVERGED * left
            causes.append(Cause(CauseKind.STILL_IMPROVING if far else CauseKind.NEARLY_CONVERGED, g, left, se=se))
    seen = [e for e in (epochs_seen(r.history, train_size) for r in ok) if e is not None]  # a diverged run stopped early
    if seen and sum(seen) / len(seen) < 1:
        causes.append(Cause(CauseKind.UNDER_ONE_EPOCH, sum(seen) / len(seen), 1.0))
    if s.failed:
        causes.append(Cause(CauseKind.DIVERGED, s.failed, s.n + s.failed))
    if full_size is not None and s.n and not stuck and s.mean < full_size - FAR_BELOW:
        causes.append(Cause(CauseKind.FAR_BELOW_FULL_SIZE, s.mean, full_size))
    if saturation is None:
        per: dict = {}
        for r in ok:
            for k, v in layer_saturation(r.history.snapshots[-1]).items():
                per.setdefault(k, []).append(v)
        saturation = {k: sum(v) / len(v) for k, v in per.items()}
    alone = not any(c.caution for c in causes)  # no other CAUTION: saturation is a note
    for layer, share in saturation.items():
        if share > SATURATION_LIMIT:
            causes.append(Cause(CauseKind.SATURATION, share, SATURATION_LIMIT, layer=layer, note=alone))
    return causes


# ----------------------------------------------------------------------------- verdicts


def _t_quantile(q: float, dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(q, dof))


def _t_sf(t: float, dof: int) -> float:
    from scipy.stats import t as student

    return float(student.sf(t, dof))


class Outcome(Enum):
    """What a comparison concluded (the sentence is made from it, never the other way round)."""

    BETTER = "better"
    WORSE = "worse"
    WITHIN_NOISE = "within noise"
    NOT_COMPARABLE = "not comparable"


@dataclass
class Paired:
    """A paired comparison of two cells over seeds (see the module docstring). ``delta`` =
    mean difference (other − reference), ``sd`` its std over pairs, ``half_width`` the threshold
    applied (t·sd/√n), ``ci`` the interval, ``t`` and two-sided ``p``; ``dropped`` pairs where a
    run diverged. ``kind`` is 'paired' (or 'welch' when the cells were not run on the same seeds)."""

    n: int
    delta: float
    sd: float
    half_width: float
    ci: tuple[float, float]
    t: float
    p: float
    alpha: float = ALPHA
    dropped: int = 0
    kind: str = "paired"
    ledger: tuple | None = field(default=None, compare=False, repr=False)

    def holm_status(self) -> str:
        """See :meth:`Verdict.holm_status`."""
        return _holm_status(self, self.significant)

    def reading(self) -> str:
        """See :meth:`Verdict.reading`."""
        return _reading(self, self.significant)

    @property
    def significant(self) -> bool:
        return self.n >= 2 and self.delta != 0 and abs(self.delta) > self.half_width

    @property
    def outcome(self) -> "Outcome":
        """NOT_COMPARABLE with fewer than 2 pairs; BETTER/WORSE when the interval excludes 0; else
        WITHIN_NOISE."""
        if self.n < 2:
            return Outcome.NOT_COMPARABLE
        if not self.significant:
            return Outcome.WITHIN_NOISE
        return Outcome.BETTER if self.delta > 0 else Outcome.WORSE

    def __str__(self) -> str:
        """'within noise (Δ +0.004, 95% CI -0.010 to +0.018)', from the numbers."""
        if self.n < 2:
            return f"no comparison: {self.n} seed(s) where both runs finished (2 needed)"
        ci = f"{1 - self.alpha:.0%} CI {self.ci[0]:+.3f} to {self.ci[1]:+.3f}"
        if self.ci[0] < -1 or self.ci[1] > 1:  # a difference of accuracies lies in [-1, 1]
            ci = (f"{1 - self.alpha:.0%} CI wider than the possible range −1 to +1 (half-width "
                  f"{self.half_width:.2f}): the seeds disagree too much for an interval to mean anything")
        status = self.holm_status()
        return f"{self.outcome.value} (Δ {self.delta:+.3f}, {ci})" + (f" [{status}]" if status else "")


def paired(reference, other, alpha: float = ALPHA) -> Paired:
    """``other`` against ``reference``, seed by seed: two sequences of accuracies in the same seed
    order (None / NaN: the run diverged; that pair is dropped). Same t, p and interval as
    ``scipy.stats.ttest_rel(other, reference)``."""
    a, b = list(reference), list(other)
    if len(a) != len(b):
        raise ValueError(f"paired needs one value per seed on both sides; got {len(a)} and {len(b)}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha!r} is not valid; valid: a number in (0, 1), e.g. 0.05")
    ok = lambda v: v is not None and not (isinstance(v, float) and math.isnan(v))  # noqa: E731
    d = [float(y) - float(x) for x, y in zip(a, b) if ok(x) and ok(y)]
    n, dropped = len(d), len(a) - len(d)
    if n < 2:
        nan = float("nan")
        return Paired(n, sum(d) / n if n else nan, nan, nan, (nan, nan), nan, nan, alpha, dropped)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    se = sd / math.sqrt(n)
    half = _t_quantile(1 - alpha / 2, n - 1) * se
    t = mean / se if se > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))
    p = min(1.0, 2 * _t_sf(abs(t), n - 1)) if math.isfinite(t) else 0.0
    return Paired(n, mean, sd, half, (mean - half, mean + half), t, p, alpha, dropped)


def welch(reference: SeedStats, other: SeedStats, alpha: float = ALPHA) -> Paired:
    """Unpaired fallback (Welch's t-interval) for cells not run on the same seeds."""
    a, b = reference, other
    nan = float("nan")
    if a.n < 2 or b.n < 2:
        return Paired(min(a.n, b.n), b.mean - a.mean, nan, nan, (nan, nan), nan, nan, alpha, kind="welch")
    va, vb = a.std ** 2 / a.n, b.std ** 2 / b.n
    se = math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va ** 2 / (a.n - 1) + vb ** 2 / (b.n - 1)) if se > 0 else a.n + b.n - 2
    delta = b.mean - a.mean
    from scipy.stats import t as student

    half = float(student.ppf(1 - alpha / 2, dof)) * se
    t = delta / se if se > 0 else (0.0 if delta == 0 else math.copysign(math.inf, delta))
    p = min(1.0, 2 * float(student.sf(abs(t), dof))) if math.isfinite(t) else 0.0
    return Paired(min(a.n, b.n), delta, se, half, (delta - half, delta + half), t, p, alpha, kind="welch")


def holm(pvalues: Iterable[float]) -> list[float]:
    """Holm-adjusted p-values (same order): with m tests sorted p₍₁₎ ≤ … ≤ p₍ₘ₎, the adjusted
    p₍ᵢ₎ = max over j ≤ i of min(1, (m − j + 1)·p₍ⱼ₎). "Adjusted p < 0.05" controls the chance of
    any false "better/worse" among the m at 5%. NaN stays NaN (not counted)."""
    ps = list(pvalues)
    idx = sorted((i for i, p in enumerate(ps) if p == p), key=lambda i: ps[i])
    m, out, running = len(idx), [float("nan")] * len(ps), 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        out[i] = running
    return out


def multiplicity_note(pvalues: Iterable[float], alpha: float = ALPHA, what: str = "this chapter") -> str:
    """A sentence stating how many comparisons were made, how many were 'better/worse' at
    ``alpha`` each, how many chance alone would give, and how many survive Holm."""
    ps = [p for p in pvalues if p == p]
    m = len(ps)
    hits = sum(p < alpha for p in ps)
    kept = sum(p < alpha for p in holm(ps))
    return (f"{what} made {m} comparisons, each a {alpha:.0%} test: {hits} came out 'better/worse'; if no "
            f"variant differed, about {alpha * m:.1f} would by chance alone. Holm's correction over all {m} "
            f"(family-wise error 5%) keeps {kept} of them.")


HOLDS = "holds after Holm"
NOMINAL = "nominal"


def _holm_status(v, decided: bool, words: bool = True) -> str:
    """'holds after Holm' / 'nominal' for a decided verdict recorded in a chapter's ledger ('' when
    not recorded or not decided: a within-noise verdict has nothing to hold). While the chapter's
    family is still open the status is over the tests recorded so far (adding tests can turn
    'holds' into 'nominal', never the reverse)."""
    if v.ledger is None or not decided:
        return ""
    chapter, name = v.ledger
    adj = chapter.holm().get(name, float("nan"))
    held = adj < v.alpha if hasattr(v, "alpha") else adj < ALPHA
    if not words:
        return HOLDS if held else NOMINAL
    m = len(chapter.pvalues)
    family = f"{m} test{'s' if m != 1 else ''}" + ("" if chapter.closed else " so far")
    return (f"{HOLDS} (adjusted p {adj:.2g}, {family})" if held
            else f"{NOMINAL}: p {v.p:.2g}, Holm-adjusted {adj:.2g} over {family}")


def _reading(v, decided: bool) -> str:
    word = v.outcome.value
    if not decided:
        return word
    if v.ledger is None:
        return f"{word} (nominal: not in the chapter's Holm family)"
    status = _holm_status(v, decided, words=False)
    so_far = "" if v.ledger[0].closed else " so far"
    return f"{word} ({HOLDS}{so_far})" if status == HOLDS else f"{word} (nominal: not kept by Holm)"


@dataclass(frozen=True)
class Verdict:
    """One cell against a reference, over the same seeds: the paired numbers, the outcome and the
    measured causes of both cells.

    ``names`` = (reference, other); ``reference``/``other``: their :class:`SeedStats` (seed order);
    ``test``: the :class:`Paired` interval (None when a side has no finished run); ``outcome``:
    :class:`Outcome`; ``causes``: name -> that cell's :class:`Cause` list. Code reads the fields
    (``v.outcome is Outcome.WORSE``, ``v.delta``, ``v.p``, ``v.cautioned``); ``str(v)`` is the
    sentence, produced here from them (rewording it changes no outcome)."""

    names: tuple[str, str]
    reference: SeedStats
    other: SeedStats
    test: Paired | None
    outcome: Outcome
    causes: dict = field(default_factory=dict)
    ledger: tuple | None = field(default=None, compare=False, repr=False)  # (Chapter, name) once recorded

    # the paired numbers (NaN where there is no test)
    @property
    def delta(self) -> float:
        return self.test.delta if self.test else float("nan")

    @property
    def half_width(self) -> float:
        """The threshold applied: the half-width of the 95% t-interval of the per-seed differences."""
        return self.test.half_width if self.test else float("nan")

    @property
    def ci(self) -> tuple[float, float]:
        return self.test.ci if self.test else (float("nan"), float("nan"))

    @property
    def p(self) -> float:
        return self.test.p if self.test else float("nan")

    @property
    def n_pairs(self) -> int:
        return self.test.n if self.test else 0

    @property
    def kind(self) -> str:
        """'paired', 'welch' or 'none'."""
        return self.test.kind if self.test else "none"

    @property
    def decided(self) -> bool:
        """True for better/worse (the interval excludes 0)."""
        return self.outcome in (Outcome.BETTER, Outcome.WORSE)

    @property
    def alpha(self) -> float:
        return self.test.alpha if self.test else ALPHA

    @property
    def cautioned(self) -> bool:
        """True when either cell has a measured cause that makes a CAUTION (notes do not)."""
        return any(c.caution for n in self.names for c in self.causes.get(n, ()))

    def holm_status(self, words: bool = True) -> str:
        """For a decided verdict recorded in a chapter's ledger (:meth:`bnviz.course.Chapter.record`):
        'holds after Holm (adjusted p 0.004, 12 tests)' or 'nominal: p 0.017, Holm-adjusted 0.31
        over 12 tests'; ``words=False``: just :data:`HOLDS` or :data:`NOMINAL`. '' when the verdict
        is within noise or not recorded. Over the tests recorded so far until the chapter closes
        its family (:meth:`~bnviz.course.Chapter.report`)."""
        return _holm_status(self, self.decided, words)

    @property
    def held(self) -> bool:
        """True for a decided verdict that holds after Holm over its chapter's family."""
        return self.holm_status(words=False) == HOLDS

    def reading(self) -> str:
        """The outcome as a chapter's headline may state it: 'worse (holds after Holm)', 'worse
        (nominal: not kept by Holm)', 'worse (not in the chapter's ledger: nominal)', 'within
        noise'; with ' so far' while the family is open."""
        return _reading(self, self.decided)

    def has(self, kind: CauseKind, name: str | None = None) -> bool:
        """True when a cell (``name``, or either) has a cause of this kind."""
        return any(c.kind is kind for n in ([name] if name else self.names) for c in self.causes.get(n, ()))

    # the sentences, made from the fields above
    def headline(self, short: bool = False) -> str:
        """'better (Δ +0.012, 95% CI +0.004 to +0.020)', without the CAUTION, with the Holm status
        when recorded ('[holds after Holm (adjusted p ..., 12 tests)]'; ``short``: '[nominal]',
        '[holds after Holm]', for a table cell)."""
        if self.test is None:
            who = self.names[1] if self.other.n == 0 else self.names[0]
            return f"no comparison: every run of {who} diverged"
        if all(self.has(CauseKind.NEVER_LEFT_CHANCE, n) for n in self.names):
            return "no comparison: both never left chance"
        status = self.holm_status(words=not short) if not short else self.holm_status(words=False)
        return str(replace(self.test, ledger=None)) + (f" [{status}]" if status else "")

    def caution(self) -> str:
        """'no BN, lr 30: never left chance (...)' for each cell with a cause that makes a CAUTION,
        joined by '; '."""
        return "; ".join(f"{n}: {describe(self.causes[n], notes=False)}" for n in self.names
                         if any(c.caution for c in self.causes.get(n, ())))

    def notes(self) -> str:
        """'BN, lr 1: nearly converged (...)' for each cell with a note (not a CAUTION)."""
        return "; ".join(f"{n}: " + "; ".join(str(c) for c in self.causes[n] if not c.caution)
                         for n in self.names if any(not c.caution for c in self.causes.get(n, ())))

    def __str__(self) -> str:
        caution = self.caution() if self.test is not None else ""
        notes = self.notes() if self.test is not None else ""
        return (self.headline() + (f" — CAUTION: {caution}" if caution else "")
                + (f" (note: {notes})" if notes else ""))

    def say(self) -> str:
        """'b vs a: Δ +0.012 ± 0.022 (threshold: 95% t-interval over 3 paired seeds) → <verdict>'."""
        a, b = self.names
        if self.n_pairs < 2 or math.isnan(self.half_width):
            return f"{b} vs {a}: {self}"
        return (f"{b} vs {a}: Δ {self.delta:+.3f} ± {self.half_width:.3f} (threshold: 95% t-interval over "
                f"{self.n_pairs} {'paired ' if self.kind == 'paired' else ''}seeds) → {self}")


def verdict(reference: SeedStats, other: SeedStats, alpha: float = ALPHA,
            names: tuple[str, str] = ("reference", "this variant")) -> Verdict:
    """``other`` against ``reference``: the paired t-interval (:func:`paired`) over the seeds,
    when both were built in the same seed order (``raw`` of equal length, as :func:`seed_stats`
    and every experiment builds them); else Welch's unpaired interval. The outcome is
    NOT_COMPARABLE when a side has no finished run, fewer than 2 pairs finished, or both cells
    never left chance; else better/worse when the interval excludes 0, within noise otherwise."""
    causes = {names[0]: list(reference.causes), names[1]: list(other.causes)}
    if reference.n == 0 or other.n == 0:
        return Verdict(tuple(names), reference, other, None, Outcome.NOT_COMPARABLE, causes)
    if reference.raw is not None and other.raw is not None and len(reference.raw) == len(other.raw):
        c = paired(reference.raw, other.raw, alpha)
    else:
        c = welch(reference, other, alpha)
    stuck = lambda s: any(x.kind is CauseKind.NEVER_LEFT_CHANCE for x in s.causes)  # noqa: E731
    outcome = Outcome.NOT_COMPARABLE if stuck(reference) and stuck(other) else c.outcome
    return Verdict(tuple(names), reference, other, c, outcome, causes)
