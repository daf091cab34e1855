"""What defines a run (:class:`Config`), what may change during one (:class:`LiveParams`), and
the one set of validators both use.

Every invalid value raises ``ValueError`` when the Config is made (or when ``LiveParams.set``
is called), naming the field, the bad value and the valid ones. Nothing else is touched first:
a bad slider value leaves the running job as it was.

Conventions: ``bn_momentum`` is PyTorch's (the weight of the **new** batch in the running
statistics, 0.1 by default; ``None`` = cumulative average). ``eps`` is added to the variance
inside the square root. ``lr`` is plain SGD's step size (no momentum), as d2l's ``train_ch6``.
"""
from __future__ import annotations

import math
import os
import re
import threading
from dataclasses import asdict, dataclass, fields, replace

from .data import DATASET_NAMES
from .models import INITS, PRESETS, LeNetSpec, preset

__all__ = ["Config", "LiveParams", "FAST_MODES", "BATCH_ONE", "LR_SCHEDULES", "check", "check_batch_size",
           "resolve_dataset", "lr_factor", "score_steps", "DECAY_ON"]

# How a training step runs (see bnviz.fastpath): 'auto' = on CUDA one captured CUDA graph per
# step around an inductor-compiled loss; elsewhere eager. The others force one way.
FAST_MODES = ("auto", "eager", "compile", "graph", "graph+compile")
# How the lr moves over a run: 'constant' (d2l's recipe) or 'linear' (decay to zero over the run:
# the "budgeted training" schedule of Li, Yumer & Ramanan 2020). See :func:`lr_factor`.
LR_SCHEDULES = ("constant", "linear")
# Which parameters weight decay acts on: 'all' (torch.optim.SGD's weight_decay), 'weights' (every
# conv/linear weight: no decay on biases, BN's γ and β: "no bias decay", He et al. 2019) or
# 'normalized' (only the weights of the conv/linear layers a norm layer follows: the
# scale-invariant ones). See bnviz.train.decay_groups.
DECAY_ON = ("all", "weights", "normalized")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bad(name: str, value, valid: str):
    raise ValueError(f"{name}={value!r} is not valid; valid: {valid}")


def _check_lr(v):
    if not (_number(v) and v > 0):
        _bad("lr", v, "a positive finite number, e.g. 0.01 to 10 (d2l uses 0.9 for LeNet, 1.0 with BN)")


def _check_momentum(v):
    if v is not None and not (_number(v) and 0.0 <= v <= 1.0):
        _bad("bn_momentum", v, "a number in [0, 1] (the weight of the NEW batch, PyTorch's convention; "
             "Keras' 0.99 is PyTorch's 0.01) or None (cumulative average)")


def _check_eps(v):
    if not (_number(v) and v > 0):
        _bad("eps", v, "a positive number, e.g. 1e-8 to 1 (PyTorch's default 1e-5)")


def _check_batch_size(v):
    if not (_integer(v) and v >= 1):
        _bad("batch_size", v, "a positive integer, e.g. 2 to 1024 (d2l uses 256; BN needs >= 2)")


def _check_epochs(v):
    if v is not None and not (_integer(v) and v >= 1):
        _bad("epochs", v, "a positive integer, or None (train until stopped)")


def _check_size(name):
    def fn(v):
        if v is not None and not (_integer(v) and v >= 1):
            _bad(name, v, "None (the whole split) or a positive integer number of examples")
    return fn


def _check_dataset(v):
    if v is not None and (not isinstance(v, str) or v.lower() not in DATASET_NAMES):
        _bad("dataset", v, f"None (use $BNVIZ_DATASET, else 'auto') or one of {DATASET_NAMES}")


def _check_device(v):
    if not (isinstance(v, str) and _DEVICE.match(v)):
        _bad("device", v, "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")


def _check_choice(name, choices):
    def fn(v):
        if v not in choices:
            _bad(name, v, ", ".join(map(repr, choices)))
    return fn


def _check_nonneg(name, example):
    def fn(v):
        if not (_number(v) and v >= 0):
            _bad(name, v, f"a number >= 0, e.g. {example}")
    return fn


def _check_positive_int(name, example):
    def fn(v):
        if not (_integer(v) and v >= 1):
            _bad(name, v, f"a positive integer, e.g. {example}")
    return fn


def _check_divergence(v):
    if not (_number(v) and v > 1):
        _bad("divergence_factor", v, "a number > 1: the run is 'diverged' when the loss exceeds this "
             "many times its starting level (default 4)")


def _check_score_at(v):
    valid = ("() (score on the last 3 epochs) or increasing fractions of the run in (0, 1], "
             "e.g. (0.9, 0.95, 1.0): every cell is scored at the same steps")
    if not isinstance(v, tuple) or not all(_number(f) and 0 < f <= 1 for f in v) \
            or any(a >= b for a, b in zip(v, v[1:])):
        _bad("score_at", v, valid)


def _check_seed(v):
    if not (_integer(v) and 0 <= v < 2**63):
        _bad("seed", v, "an integer in [0, 2**63)")


def _check_label(v):
    if v is not None and not isinstance(v, str):
        _bad("label", v, "None or a string")


def _check_bool(name):
    def fn(v):
        if not isinstance(v, bool):
            _bad(name, v, "True or False")
    return fn


CHECKS = {
    "init": _check_choice("init", INITS),
    "dataset": _check_dataset,
    "train_size": _check_size("train_size"),
    "test_size": _check_size("test_size"),
    "batch_size": _check_batch_size,
    "lr": _check_lr,
    "bn_momentum": _check_momentum,
    "eps": _check_eps,
    "epochs": _check_epochs,
    "seed": _check_seed,
    "device": _check_device,
    "snapshot_every": _check_positive_int("snapshot_every", "50 (steps between curve points)"),
    "drop_last": _check_bool("drop_last"),
    "weight_decay": _check_nonneg("weight_decay", "0 or 5e-4"),
    "fast": _check_choice("fast", FAST_MODES),
    "lr_schedule": _check_choice("lr_schedule", LR_SCHEDULES),
    "weight_decay_on": _check_choice("weight_decay_on", DECAY_ON),
    "score_at": _check_score_at,
    "divergence_factor": _check_divergence,
    "label": _check_label,
}


def check(name: str, value) -> None:
    """Validate one Config field (raises ValueError naming the valid values)."""
    CHECKS[name](value)


def lr_factor(schedule: str, step: int, total: int | None) -> float:
    """The lr of the step that follows ``step`` steps done, as a fraction of ``Config.lr``:
    'constant': 1; 'linear': 1 − step/total (the first step uses the full lr, the last
    lr/total, and after ``total`` steps the lr is 0), as
    ``torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / total)`` stepped after each step."""
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, 1.0 - step / total)
    _bad("lr_schedule", schedule, ", ".join(map(repr, LR_SCHEDULES)))


def score_steps(score_at: tuple[float, ...], total: int) -> tuple[int, ...]:
    """The step counts ``Config.score_at`` names in a run of ``total`` steps: each fraction f
    gives round(f·total) (at least 1), duplicates removed, in order. Runs of the same number of
    steps are scored at the same steps, whatever their batch size."""
    return tuple(sorted({max(1, round(f * total)) for f in score_at}))


def resolve_dataset(name: str | None) -> str:
    """The data set a run uses: ``name``, else ``$BNVIZ_DATASET``, else 'auto'."""
    chosen = (name or os.environ.get("BNVIZ_DATASET") or "auto").lower()
    if chosen not in DATASET_NAMES:
        raise ValueError(f"BNVIZ_DATASET={chosen!r} is not valid; valid: {DATASET_NAMES}")
    return chosen


def _coerce_model(model) -> LeNetSpec:
    if isinstance(model, LeNetSpec):
        return model
    if isinstance(model, str):
        return preset(model)
    if isinstance(model, dict):
        try:
            return LeNetSpec.from_dict(model)
        except TypeError as err:
            raise ValueError(f"model={model!r} is not a valid LeNetSpec dict ({err})") from None
    _bad("model", model, f"a LeNetSpec, a dict of its fields, or a preset name {sorted(PRESETS)}")


@dataclass(frozen=True)
class Config:
    """Everything that defines a training run (frozen; a changed copy is ``cfg.replace(...)``).

    model: a :class:`~bnviz.models.LeNetSpec` or a preset name ('lenet', 'lenet-bn', ...).
    init: 'd2l' (xavier-uniform conv/linear weights, as d2l's ``train_ch6``) or 'pytorch'
        (PyTorch's default Kaiming-uniform).
    dataset: None (``$BNVIZ_DATASET``, else 'auto') | 'auto' | 'fashion-mnist' | 'mnist' |
        'synthetic'; train_size/test_size: use only that many examples (None: all).
    batch_size, lr, weight_decay: plain SGD on the mean cross-entropy of a batch.
    bn_momentum, eps: set on every norm layer that has them (see the module docstring).
    epochs: a positive integer, or None to train until stopped (the lab's option).
    seed: model init and the order of the batches (an on-device generator).
    device: 'auto' (CUDA, then MPS, then CPU) or a device name.
    snapshot_every: steps between 'step' snapshots (curve points); a snapshot is the one
        moment the host reads device values.
    drop_last: drop the last partial batch of each epoch (kept by default, as d2l does).
    fast: how the step runs: 'auto' (CUDA: a captured CUDA graph around a compiled loss;
        CPU/MPS: eager), 'eager', 'compile' (inductor on any device), 'graph' (CUDA graph,
        no compile), 'graph+compile'. See :mod:`bnviz.fastpath`.
    divergence_factor: the run is 'diverged' when the loss is not finite or exceeds this many
        times max(first snapshot's loss, ln(classes)).
    label: a name for legends (default: made from the settings).
    lr_schedule: 'constant' (d2l's recipe, the default) or 'linear': the lr decays linearly to
        0 over the run's ``epochs`` × batches per epoch steps (:func:`lr_factor`; live lr changes
        set the lr the schedule scales). A snapshot's ``lr`` is then the lr of the last step.
    weight_decay_on: which parameters ``weight_decay`` acts on: 'all' (default), 'weights' (conv
        and linear weights only) or 'normalized' (the weights of the layers a norm follows).
    score_at: () (default: a run is scored on its last 3 epochs) or fractions of the run, e.g.
        (0.9, 0.95, 1.0): the test accuracy (and PreciseBN's) is also measured at those steps
        (:func:`score_steps`), and comparisons score every cell there.
    """

    model: LeNetSpec = PRESETS["lenet-bn"]
    init: str = "d2l"
    dataset: str | None = None
    train_size: int | None = None
    test_size: int | None = None
    batch_size: int = 256
    lr: float = 1.0
    bn_momentum: float | None = 0.1
    eps: float = 1e-5
    epochs: int | None = 10
    seed: int = 0
    device: str = "auto"
    snapshot_every: int = 50
    drop_last: bool = False
    weight_decay: float = 0.0
    fast: str = "auto"
    divergence_factor: float = 4.0
    label: str | None = None
    lr_schedule: str = "constant"
    score_at: tuple = ()
    weight_decay_on: str = "all"

    def __post_init__(self):
        object.__setattr__(self, "model", _coerce_model(self.model))
        if isinstance(self.score_at, list):  # a Config read back from JSON
            object.__setattr__(self, "score_at", tuple(self.score_at))
        for name, fn in CHECKS.items():
            fn(getattr(self, name))
        if isinstance(self.dataset, str):
            object.__setattr__(self, "dataset", self.dataset.lower())
        if self.fast in ("graph", "graph+compile") and self.device in ("cpu", "mps"):
            _bad("fast", self.fast, f"'auto', 'eager' or 'compile' on device {self.device!r} "
                 "(CUDA graphs need a CUDA device)")
        if self.epochs is None and (self.lr_schedule != "constant" or self.score_at):
            _bad("epochs", None, "a positive integer when lr_schedule is not 'constant' or score_at is set "
                 "(both need the run's length)")

    def replace(self, **changes) -> "Config":
        names = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"unknown Config field(s) {unknown}; valid: {sorted(names)}")
        return replace(self, **changes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        d = dict(d)
        d.pop("compile", None)  # files saved before the fast path was redesigned
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def make(cls, config: "Config | None" = None, **changes) -> "Config":
        """``config`` (or the defaults) with ``changes``; unknown names raise ValueError."""
        base = config if config is not None else cls()
        if not isinstance(base, Config):
            raise ValueError(f"config must be a bnviz Config or None, got {type(base).__name__}")
        return base.replace(**changes) if changes else base

    def describe(self) -> str:
        """A short label for legends: the model plus the optimisation settings."""
        mom = "cumulative" if self.bn_momentum is None else f"{self.bn_momentum:g}"
        bn = f", mom {mom}, eps {self.eps:g}" if self.model.is_batch_norm else ""
        init = "" if self.init == "d2l" else f", {self.init} init"
        sched = "" if self.lr_schedule == "constant" else f" ({self.lr_schedule} decay)"
        return f"{self.model.label()} | bs {self.batch_size}, lr {self.lr:g}{sched}{bn}{init}, seed {self.seed}"


BATCH_ONE = (
    "Batch size {bs} with batch normalization in a fully connected layer: in training mode that "
    "layer sees one value per channel, so the batch variance is undefined and x - mean is always "
    "0; PyTorch refuses to train (\"Expected more than 1 value per channel when training\"). A "
    "convolutional BN layer still works with one image (it normalises over H×W, i.e. it becomes "
    "instance normalisation). Use a batch size of at least 2 (8 or more for useful statistics), "
    "or a norm that does not use the batch: LayerNorm or GroupNorm. Prediction (model.eval()) "
    "works with any batch size, even 1, because it uses the running statistics."
)


def check_batch_size(spec: LeNetSpec | None, batch_size: int) -> None:
    """Raise ValueError (with the explanation) for batch size 1 when a fully connected layer of
    the LeNet ``spec`` has BN: its batch variance would be undefined. ``spec=None`` (a custom
    model): nothing is known, nothing is refused here."""
    if (batch_size == 1 and spec is not None and spec.is_batch_norm
            and any(name.startswith("fc") for name in spec.norm_layers)):
        raise ValueError(BATCH_ONE.format(bs=batch_size))


class LiveParams:
    """Hyperparameters another thread (a slider) may change while a run is going.

    ``set(lr=..., bn_momentum=..., eps=..., batch_size=...)`` validates at once, the one time a
    live value is checked: the checks of :class:`Config` and, for the batch size, the model's
    (:func:`check_batch_size` on ``spec``). A bad value raises ``ValueError`` in the caller's
    thread and nothing of the call is queued. The trainer takes the queued values at the top of
    a step (:data:`AT_STEP`) or of an epoch (:data:`AT_EPOCH`), applies them and records each in
    ``History.changes`` (``Trainer.apply_live``).
    """

    AT_STEP = ("lr", "bn_momentum", "eps")
    AT_EPOCH = ("batch_size",)
    NAMES = AT_STEP + AT_EPOCH  # the live names; each is a Config field

    def __init__(self, lr: float, bn_momentum: float | None, eps: float, batch_size: int,
                 spec: LeNetSpec | None = None):
        self.values = dict(zip(self.NAMES, (lr, bn_momentum, eps, batch_size)))
        for name, value in self.values.items():
            CHECKS[name](value)
        self.spec = spec  # the model the batch size is checked against (None: not known)
        self._lock = threading.Lock()
        self._pending: dict = {}

    @classmethod
    def from_config(cls, config: Config) -> "LiveParams":
        return cls(*(getattr(config, name) for name in cls.NAMES), spec=config.model)

    def set(self, **changes) -> None:
        for name, value in changes.items():
            if name not in self.NAMES:
                raise ValueError(f"{name!r} cannot be changed during a run; live parameters: {self.NAMES}")
            CHECKS[name](value)
            if name == "batch_size":
                check_batch_size(self.spec, value)
        with self._lock:
            self._pending.update(changes)

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def take(self, names=NAMES) -> dict:
        """Remove the pending changes among ``names`` and return those that differ from the
        values in use."""
        if not self._pending:  # every step asks: no lock when nothing is queued
            return {}
        with self._lock:
            taken = {k: v for k, v in self._pending.items() if k in names}
            for k in taken:
                del self._pending[k]
        return {k: v for k, v in taken.items() if v != self.values[k]}

    def __getitem__(self, name):
        return self.values[name]
