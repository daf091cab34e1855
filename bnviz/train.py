"""A fast trainer with live hyperparameters: Config -> Trainer -> History.

* ``Config``: everything that defines a run (frozen; a changed copy is ``cfg.replace(...)``).
* ``LiveParams``: lr, BN momentum and eps that another thread (a slider) may change during a
  run; they take effect at the next step. A new batch size takes effect at the next epoch.
* ``Trainer``: plain SGD on cross-entropy (as d2l's ``train_ch6``), data resident on the
  device, batches from an on-device permutation, metrics summed **on the device** and copied to
  the host once per snapshot (no ``.item()`` per step).
* ``History``: what a run produced (snapshots, hyperparameter changes, status, message);
  saved to / loaded from JSON.

Snapshot semantics: a ``'step'`` snapshot every ``snapshot_every`` steps holds the mean loss and
accuracy of the training batches since the previous snapshot; an ``'epoch'`` snapshot at every
epoch end holds the epoch's mean training loss and accuracy (what d2l prints) and the test
accuracy (model in eval mode, the whole test set in large chunks).
"""
from __future__ import annotations

import itertools
import json
import math
import os
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .data import Dataset, batches, load_dataset, resolve_device, to_float
from .models import PRESETS, LeNetSpec, build_lenet, norm_layers, preset

__all__ = ["Config", "LiveParams", "Trainer", "History", "Snapshot", "Change", "train",
           "evaluate", "layer_stats", "save_histories", "load_histories", "STATUSES"]

STATUSES = ("pending", "running", "finished", "stopped", "diverged", "error")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_CHOICES = ("force",) + COMPILE_MODES
_run_ids = itertools.count(1)


def _check_lr(lr):
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number (e.g. 0.001 to 100), got {lr!r}")


def _check_momentum(m):
    if m is not None and not (isinstance(m, (int, float)) and 0.0 <= m <= 1.0):
        raise ValueError(f"BN momentum must be in [0, 1] (weight of the new batch, PyTorch convention) "
                         f"or None (cumulative average), got {m!r}")


def _check_eps(eps):
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive number (e.g. 1e-8 to 1), got {eps!r}")


def _check_batch_size(bs):
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise ValueError(f"batch_size must be a positive integer (e.g. 1 to 1024), got {bs!r}")


@dataclass(frozen=True)
class Config:
    """Everything that defines a training run.

    lr: SGD learning rate (d2l's LeNet-BN uses 1.0 with the older API, 0.1 in d2l 1.0).
    bn_momentum: weight of the new batch in the running statistics (PyTorch convention);
        None = cumulative average. eps: added to the variance inside the square root.
    dataset: 'auto' | 'fashion-mnist' | 'mnist' | 'synthetic' (see :mod:`bnviz.data`);
        train_size/test_size: use only that many examples (fast runs).
    snapshot_every: steps between 'step' snapshots.
    compile: capture the training step (forward + loss + backward) with ``torch.compile``:
        False (eager), True (on CUDA with mode 'reduce-overhead' = CUDA graphs; elsewhere eager
        with a note in ``History.message``), a torch.compile mode name (on CUDA, that mode), or
        'force' (compile on any device, e.g. CPU in tests). See :func:`_maybe_compile`.
    divergence_factor: the run is 'diverged' when the loss is not finite or exceeds this many
        times max(first snapshot's loss, ln(classes)).
    """

    model: LeNetSpec = PRESETS["lenet-bn"]
    dataset: str = "auto"
    train_size: int | None = None
    test_size: int | None = None
    batch_size: int = 256
    lr: float = 1.0
    bn_momentum: float | None = 0.1
    eps: float = 1e-5
    epochs: int = 10
    seed: int = 0
    device: str = "auto"
    snapshot_every: int = 50
    drop_last: bool = False
    weight_decay: float = 0.0
    compile: bool | str = False
    divergence_factor: float = 4.0
    label: str | None = None

    def __post_init__(self):
        if isinstance(self.model, str):
            object.__setattr__(self, "model", preset(self.model))
        if isinstance(self.model, dict):
            object.__setattr__(self, "model", LeNetSpec.from_dict(self.model))
        _check_lr(self.lr)
        _check_momentum(self.bn_momentum)
        _check_eps(self.eps)
        _check_batch_size(self.batch_size)
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {self.epochs!r}")
        if not isinstance(self.snapshot_every, int) or self.snapshot_every < 1:
            raise ValueError(f"snapshot_every must be a positive integer, got {self.snapshot_every!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not (isinstance(self.compile, bool) or self.compile in COMPILE_CHOICES):
            raise ValueError(f"compile must be True, False, 'force' (compile on any device, e.g. CPU "
                             f"for tests) or a torch.compile mode {COMPILE_MODES}, got {self.compile!r}")

    def replace(self, **changes) -> "Config":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        d = dict(d)
        d["model"] = LeNetSpec.from_dict(d["model"])
        return cls(**d)

    def describe(self) -> str:
        """A short label for legends: the model plus the optimisation settings."""
        mom = "cumulative" if self.bn_momentum is None else f"{self.bn_momentum:g}"
        bn = f", mom {mom}, eps {self.eps:g}" if self.model.is_batch_norm else ""
        return f"{self.model.label()} | bs {self.batch_size}, lr {self.lr:g}{bn}, seed {self.seed}"


class LiveParams:
    """Hyperparameters another thread may change while a run is going.

    ``set(lr=..., bn_momentum=..., eps=..., batch_size=...)`` validates at once (a bad value
    raises ``ValueError`` in the caller's thread, the run is untouched) and queues the change;
    the trainer applies lr / bn_momentum / eps before its next step and batch_size at the next
    epoch, and records each change in ``History.changes`` with the step it took effect.
    """

    NAMES = ("lr", "bn_momentum", "eps", "batch_size")

    def __init__(self, lr: float, bn_momentum: float | None, eps: float, batch_size: int):
        self._lock = threading.Lock()
        self._pending: dict = {}
        self.values = {"lr": lr, "bn_momentum": bn_momentum, "eps": eps, "batch_size": batch_size}

    @classmethod
    def from_config(cls, config: Config) -> "LiveParams":
        return cls(config.lr, config.bn_momentum, config.eps, config.batch_size)

    def set(self, **changes) -> None:
        checks = {"lr": _check_lr, "bn_momentum": _check_momentum, "eps": _check_eps,
                  "batch_size": _check_batch_size}
        for name, value in changes.items():
            if name not in checks:
                raise ValueError(f"{name!r} cannot be changed during a run; live parameters: {self.NAMES}")
            checks[name](value)
        with self._lock:
            self._pending.update(changes)

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def take(self, names=NAMES) -> dict:
        """Remove and return the pending changes among ``names``."""
        with self._lock:
            taken = {k: v for k, v in self._pending.items() if k in names}
            for k in taken:
                del self._pending[k]
        return taken

    def __getitem__(self, name):
        return self.values[name]


@dataclass
class Change:
    """A live hyperparameter change: ``name`` went from ``old`` to ``new`` at ``step`` (the first
    step that used the new value) in epoch ``epoch``."""

    step: int
    epoch: int
    name: str
    old: float | int | None
    new: float | int | None


@dataclass
class LayerStats:
    """Per-channel values of one normalisation layer (lists of floats, one per channel).

    gamma/beta: the affine parameters (empty if none); running_mean/running_var: the buffers
    (empty for norms without them); batch_mean/batch_var: the per-channel mean and biased
    variance of the layer's **input** in the last training batch before the snapshot.
    """

    gamma: list[float] = field(default_factory=list)
    beta: list[float] = field(default_factory=list)
    running_mean: list[float] = field(default_factory=list)
    running_var: list[float] = field(default_factory=list)
    batch_mean: list[float] = field(default_factory=list)
    batch_var: list[float] = field(default_factory=list)


@dataclass
class Snapshot:
    kind: str  # 'step' or 'epoch'
    step: int  # optimisation steps done so far
    epoch: int  # 1-based epoch this snapshot belongs to
    examples: int  # training examples seen so far
    time_s: float  # seconds since the run started
    loss: float
    train_acc: float
    test_acc: float | None
    examples_per_s: float
    lr: float
    bn_momentum: float | None
    eps: float
    batch_size: int
    layers: dict[str, LayerStats] = field(default_factory=dict)


@dataclass
class History:
    """What one run produced. ``status`` is one of STATUSES; ``message`` explains 'diverged'
    and 'error' (and warns when accuracy stayed at chance)."""

    config: Config
    run_id: int = field(default_factory=lambda: next(_run_ids))
    dataset_label: str = ""
    device: str = ""
    snapshots: list[Snapshot] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    status: str = "pending"
    message: str = ""
    wall_time_s: float = 0.0
    train_time_s: float = 0.0

    @property
    def label(self) -> str:
        return self.config.label or f"run {self.run_id}: {self.config.describe()}"

    @property
    def steps(self) -> list[Snapshot]:
        return [s for s in self.snapshots if s.kind == "step"]

    @property
    def epochs(self) -> list[Snapshot]:
        return [s for s in self.snapshots if s.kind == "epoch"]

    def _last(self, attr):
        for s in reversed(self.epochs):
            if getattr(s, attr) is not None:
                return getattr(s, attr)
        return None

    @property
    def final_test_acc(self) -> float | None:
        return self._last("test_acc")

    @property
    def final_train_acc(self) -> float | None:
        return self._last("train_acc")

    @property
    def final_loss(self) -> float | None:
        return self._last("loss")

    @property
    def examples_per_s(self) -> float | None:
        """Training throughput over the whole run (evaluation time excluded)."""
        if not self.snapshots or self.train_time_s <= 0:
            return None
        return self.snapshots[-1].examples / self.train_time_s

    def summary(self) -> str:
        """A d2l-style line: 'loss 0.250, train acc 0.907, test acc 0.801, N examples/sec on dev'."""
        parts = [f"[{self.status}]"]
        if self.final_loss is not None:
            parts.append(f"loss {self.final_loss:.3f}, train acc {self.final_train_acc:.3f}")
        if self.final_test_acc is not None:
            parts.append(f"test acc {self.final_test_acc:.3f}")
        if self.examples_per_s:
            parts.append(f"{self.examples_per_s:.1f} examples/sec on {self.device}")
        return ", ".join(parts) + f" ({self.dataset_label})"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["config"] = self.config.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "History":
        d = dict(d)
        d["config"] = Config.from_dict(d["config"])
        d["snapshots"] = [Snapshot(**{**s, "layers": {k: LayerStats(**v) for k, v in s["layers"].items()}})
                          for s in d["snapshots"]]
        d["changes"] = [Change(**c) for c in d["changes"]]
        return cls(**d)

    def save(self, path) -> Path:
        return save_histories([self], path)

    @classmethod
    def load(cls, path) -> "History":
        return load_histories(path)[0]


def save_histories(histories: list[History], path) -> Path:
    """Write runs to a JSON file (``{"bnviz_histories": 1, "runs": [...]}``)."""
    path = Path(path)
    data = {"bnviz_histories": 1, "runs": [h.to_dict() for h in histories]}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, allow_nan=True))
    tmp.replace(path)
    return path


def load_histories(path) -> list[History]:
    """Read runs written by :func:`save_histories`. New run ids are given to avoid clashes."""
    try:
        data = json.loads(Path(path).read_text())
        runs = [History.from_dict(r) for r in data["runs"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a bnviz history file ({type(err).__name__}: {err})") from err
    for h in runs:
        h.run_id = next(_run_ids)
    return runs


# ----------------------------------------------------------------------------- helpers


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 5000) -> torch.Tensor:
    """Accuracy of ``model`` in eval mode on uint8 images ``x``; a 0-d tensor on the device
    (no host sync). The mode is restored afterwards."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    with torch.inference_mode():
        for s in range(0, len(x), chunk):
            correct += (model(to_float(x[s:s + chunk])).argmax(1) == y[s:s + chunk]).sum()
    model.train(was_training)
    return correct.float() / max(len(x), 1)


def _per_channel(t: torch.Tensor | None, channels: int) -> torch.Tensor | None:
    """Reduce a γ/β of any norm layer to one value per channel (LayerNorm on a conv has a
    (C, H, W) weight: mean over H, W; d2l's has shape (1, C, 1, 1))."""
    if t is None:
        return None
    t = t.detach()
    if t.dim() == 1 and t.numel() == channels:
        return t
    if t.dim() >= 1 and t.shape[0] == channels:
        return t.reshape(channels, -1).mean(1)
    return t.reshape(-1)[:channels] if t.numel() == channels else t.reshape(channels, -1).mean(1)


def _num_channels(module: nn.Module) -> int:
    for attr in ("num_features", "num_channels"):
        if hasattr(module, attr):
            return int(getattr(module, attr))
    if hasattr(module, "normalized_shape"):
        return int(module.normalized_shape[0])
    if hasattr(module, "gamma"):
        return int(module.gamma.shape[1])
    raise ValueError(f"cannot tell the channel count of {module}")


def layer_stats(module: nn.Module) -> dict[str, torch.Tensor | None]:
    """Per-channel tensors (on the device) of one norm layer: gamma, beta, running_mean,
    running_var (None where the layer has none)."""
    c = _num_channels(module)
    gamma = getattr(module, "weight", None) if hasattr(module, "weight") else getattr(module, "gamma", None)
    beta = getattr(module, "bias", None) if hasattr(module, "bias") else getattr(module, "beta", None)
    rm = getattr(module, "running_mean", None)
    rv = getattr(module, "running_var", None)
    if rm is None and hasattr(module, "moving_mean"):
        rm, rv = module.moving_mean, module.moving_var
    return {"gamma": _per_channel(gamma, c), "beta": _per_channel(beta, c),
            "running_mean": _per_channel(rm, c), "running_var": _per_channel(rv, c)}


def _diagnose(message_start: str, config: Config, stuck: bool = False) -> str:
    causes = []
    if stuck and config.model.activation == "sigmoid" and not config.model.uses_norm:
        causes.append("a sigmoid network without normalisation often sits at chance for a few "
                      "epochs before it starts learning (train longer, or add batch norm)")
    if stuck and config.lr < 0.05:
        causes.append(f"the learning rate {config.lr:g} may be too small to leave the plateau")
    elif config.lr >= 1 and not config.model.is_batch_norm:
        causes.append(f"the learning rate {config.lr:g} is high for a network without batch norm (try 0.1 to 0.9)")
    elif config.lr > 10:
        causes.append(f"the learning rate {config.lr:g} is very high even with batch norm (try 0.1 to 1)")
    elif not stuck:
        causes.append("the learning rate is too high for this model (try a value 3 to 10 times smaller)")
    if config.model.is_batch_norm and config.eps < 1e-6:
        causes.append(f"eps={config.eps:g} is tiny: a channel with almost no variance gets divided by ~sqrt(eps)")
    if config.model.is_batch_norm and config.batch_size < 8:
        causes.append(f"batch size {config.batch_size} gives very noisy batch statistics")
    if config.model.activation == "relu" and not config.model.uses_norm:
        causes.append("ReLU without normalisation lets activations grow layer by layer")
    return message_start + " Likely causes: " + "; ".join(causes) + "."


_BATCH_ONE = (
    "Batch size {bs} with batch normalization: in training mode a fully connected BN layer sees "
    "one value per channel, so the batch variance is undefined and x - mean is always 0; PyTorch "
    "refuses to train (\"{err}\"). A convolutional BN layer still works with one image (it "
    "normalises over H×W, i.e. it becomes instance normalisation). Use a batch size of at least 2 "
    "(8 or more for useful statistics), or a norm that does not use the batch: LayerNorm or "
    "GroupNorm. Prediction (model.eval()) works with any batch size, even 1, because it uses the "
    "running statistics."
)

_DATA_CACHE: dict = {}


def _cached_dataset(config: Config, device: torch.device) -> Dataset:
    key = (config.dataset, str(device), config.train_size, config.test_size)
    if key not in _DATA_CACHE:
        ds = load_dataset(config.dataset, device=device, train_size=config.train_size, test_size=config.test_size)
        _DATA_CACHE.clear()  # keep one data set resident at a time
        _DATA_CACHE[key] = ds
    return _DATA_CACHE[key]


# ----------------------------------------------------------------------------- trainer


class Trainer:
    """Train the LeNet of ``config`` (or ``model``) on ``data`` (loaded from the config if None).

    ``run()`` trains in the calling thread and returns the :class:`History`; ``start()`` runs it
    in a background thread (``join()`` waits). ``stop()`` (any thread) ends the run before the
    next step. ``on_snapshot(history, snapshot)`` is called from the training thread after each
    snapshot; an exception in it is reported once as a warning and does not stop training.
    """

    def __init__(
        self,
        config: Config,
        data: Dataset | None = None,
        live: LiveParams | None = None,
        on_snapshot: Callable[[History, Snapshot], None] | None = None,
        model: nn.Module | None = None,
        progress: bool = False,
    ):
        self.config = config
        self.device = resolve_device(config.device) if data is None else data.device
        self.data = data
        self.live = live or LiveParams.from_config(config)
        self.on_snapshot = on_snapshot
        self.history = History(config=config, device=str(self.device))
        self._model = model
        self.progress = progress
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._callback_warned = False
        self.model: nn.Module | None = None

    # -- control from other threads
    def stop(self) -> None:
        self._stop.set()

    @property
    def status(self) -> str:
        return self.history.status

    def start(self) -> threading.Thread:
        if self._thread is not None:
            raise RuntimeError("this Trainer has already been started; make a new one for a new run")
        self._thread = threading.Thread(target=self.run, name=f"bnviz-run-{self.history.run_id}", daemon=True)
        self._thread.start()
        return self._thread

    def join(self, timeout: float | None = None) -> History:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.history

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the run
    def run(self) -> History:
        h = self.history
        h.status = "running"
        t_start = time.perf_counter()
        try:
            self._run()
        except Exception as err:  # reported in the History, never lost
            h.status = "error"
            text = f"{type(err).__name__}: {err}"
            if "more than 1 value per channel" in str(err):
                text = _BATCH_ONE.format(bs=self.live["batch_size"], err=str(err).splitlines()[0])
            h.message = f"{text} {h.message}".strip()  # the explanation first, earlier notes after
        finally:
            h.wall_time_s = time.perf_counter() - t_start
            if self._pbar is not None:
                self._pbar.close()
        return h

    _pbar = None
    compiled = None  # the _CompiledStep of a compile=... run (its .info: mode, shapes, compile time)

    def _build(self) -> nn.Module:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        model = self._model if self._model is not None else build_lenet(cfg.model)
        model = model.to(self.device)
        for m in norm_layers(model).values():
            if hasattr(m, "momentum") and cfg.model.norm != "d2l":
                m.momentum = cfg.bn_momentum
            if hasattr(m, "eps"):
                m.eps = cfg.eps
        return model

    def _run(self) -> None:
        cfg, h, live = self.config, self.history, self.live
        if self.data is None:
            self.data = _cached_dataset(cfg, self.device)
        data = self.data
        h.dataset_label = data.label
        model = self.model = self._build()
        norms = norm_layers(model)
        compiled = self.compiled = None
        if cfg.compile:
            def fallback_note(note):
                h.message = f"{h.message} {note}".strip()

            compiled, note = _maybe_compile(model, self.device, cfg.compile, on_fallback=fallback_note)
            self.compiled = compiled
            if note:
                fallback_note(note)
        # On CUDA the compiled path also uses the fused SGD kernel (one launch for all parameters).
        fused = {"fused": True} if compiled is not None and self.device.type == "cuda" else {}
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
        gen = torch.Generator(device=self.device).manual_seed(cfg.seed)

        # Per-channel statistics of each norm layer's input, captured only on snapshot steps.
        capture = {"on": False}
        batch_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def hook(name):
            def fn(module, inputs):
                if capture["on"]:
                    x = inputs[0].detach()
                    var, mean = torch.var_mean(x, dim=[0] + list(range(2, x.dim())), correction=0)
                    batch_stats[name] = (mean, var)
            return fn

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in norms.items()]
        dev = self.device
        zero = lambda: torch.zeros((), device=dev)  # noqa: E731
        snap_loss, snap_correct, snap_n = zero(), zero(), 0
        ep_loss, ep_correct, ep_n = zero(), zero(), 0
        step, examples = 0, 0
        batch_size = live["batch_size"]
        ref_loss = math.log(10)
        t0 = time.perf_counter()
        train_time = 0.0
        t_mark, ex_mark = t0, 0
        n_train = len(data.train_x)
        if self.progress:
            from tqdm.auto import tqdm

            self._pbar = tqdm(total=cfg.epochs, desc=f"run {h.run_id} ({data.label})", unit="epoch")

        def apply_live(names):
            for name, new in live.take(names).items():
                old = live.values[name]
                if new == old:
                    continue
                live.values[name] = new
                if name == "lr":
                    for g in opt.param_groups:
                        g["lr"] = new
                elif name in ("bn_momentum", "eps"):
                    attr = "momentum" if name == "bn_momentum" else "eps"
                    for m in norms.values():
                        if hasattr(m, attr):
                            setattr(m, attr, new)
                h.changes.append(Change(step=step + 1, epoch=epoch, name=name, old=old, new=new))

        def snapshot(kind: str, loss_sum, correct, n, test_acc=None) -> Snapshot:
            nonlocal t_mark, ex_mark, train_time
            tensors = [loss_sum / max(n, 1), correct / max(n, 1)]
            if test_acc is not None:
                tensors.append(test_acc)
            per_layer = {}
            for name, m in norms.items():
                st = layer_stats(m)
                bm, bv = batch_stats.get(name, (None, None))
                st.update(batch_mean=bm, batch_var=bv)
                per_layer[name] = st
                tensors.extend(t.float().reshape(-1) for t in st.values() if t is not None)
            flat = torch.cat([t.float().reshape(-1) for t in tensors]).tolist()  # the one host copy
            now = time.perf_counter()
            loss, acc = flat[0], flat[1]
            pos = 2
            tacc = None
            if test_acc is not None:
                tacc, pos = flat[2], 3
            layers = {}
            for name, st in per_layer.items():
                vals = {}
                for key, t in st.items():
                    k = t.numel() if t is not None else 0
                    vals[key] = flat[pos:pos + k]
                    pos += k
                layers[name] = LayerStats(**vals)
            if kind == "step":
                dt = now - t_mark
                eps_ = (examples - ex_mark) / dt if dt > 0 else 0.0
                train_time += dt
                t_mark, ex_mark = now, examples
            else:
                eps_ = h.snapshots[-1].examples_per_s if h.snapshots else 0.0
            s = Snapshot(kind=kind, step=step, epoch=epoch, examples=examples, time_s=now - t0,
                         loss=loss, train_acc=acc, test_acc=tacc, examples_per_s=eps_,
                         lr=live["lr"], bn_momentum=live["bn_momentum"], eps=live["eps"],
                         batch_size=batch_size, layers=layers)
            h.snapshots.append(s)
            h.train_time_s = train_time
            return s

        def emit(s: Snapshot) -> bool:
            """Publish a snapshot; return False if the run has diverged."""
            nonlocal ref_loss
            diverged = None
            if not math.isfinite(s.loss):
                diverged = f"The loss became {s.loss} at step {s.step}."
            elif s.loss > cfg.divergence_factor * ref_loss:
                diverged = (f"The loss rose to {s.loss:.3g} at step {s.step}, more than "
                            f"{cfg.divergence_factor:g}× its starting level {ref_loss:.3g}.")
            if len(h.steps) == 1 and s.kind == "step" and math.isfinite(s.loss):
                ref_loss = max(ref_loss, s.loss)
            if diverged:
                h.status = "diverged"
                h.message = (_diagnose(diverged + " The run was stopped.", self.config.replace(
                    lr=live["lr"], eps=live["eps"], batch_size=batch_size)) + " " + h.message).strip()
            if self.on_snapshot is not None:
                try:
                    self.on_snapshot(h, s)
                except Exception as err:  # a view's bug must not kill the run
                    if not self._callback_warned:
                        self._callback_warned = True
                        warnings.warn(f"on_snapshot callback failed: {type(err).__name__}: {err}")
            return diverged is None

        model.train()
        epoch = 0
        try:
            for epoch in range(1, cfg.epochs + 1):
                if self._stop.is_set():
                    break
                apply_live(("batch_size",))
                batch_size = live["batch_size"]
                drop_last = cfg.drop_last or (batch_size > 1 and n_train % batch_size == 1)
                for xb, yb in batches(data.train_x, data.train_y, batch_size, shuffle=True,
                                      drop_last=drop_last, generator=gen):
                    if self._stop.is_set():
                        break
                    if live.has_pending:
                        apply_live(("lr", "bn_momentum", "eps"))
                    snap_due = (step + 1) % cfg.snapshot_every == 0
                    capture["on"] = snap_due
                    # Gradients are dropped before the forward (same numbers as after it): with
                    # CUDA graphs the previous step's .grad lives in the graph's memory pool.
                    opt.zero_grad(set_to_none=True)
                    if compiled is not None and not snap_due:
                        loss, cd = compiled(xb, yb)
                    else:  # eager (always on snapshot steps: the statistics hooks run there)
                        loss, cd = _forward(model, xb, yb)
                    loss.backward()
                    opt.step()
                    step += 1
                    n = len(yb)
                    examples += n
                    with torch.no_grad():
                        ld = loss.detach() * n
                        snap_loss += ld
                        snap_correct += cd
                        ep_loss += ld
                        ep_correct += cd
                    snap_n += n
                    ep_n += n
                    if snap_due:
                        capture["on"] = False
                        s = snapshot("step", snap_loss, snap_correct, snap_n)
                        snap_loss, snap_correct, snap_n = zero(), zero(), 0
                        if not emit(s):
                            return
                if ep_n == 0:
                    break
                stopped = self._stop.is_set()
                # The epoch (or the part of it before a stop): train metrics + test accuracy.
                if snap_n:
                    s = snapshot("step", snap_loss, snap_correct, snap_n)
                    snap_loss, snap_correct, snap_n = zero(), zero(), 0
                    if not emit(s):
                        return
                t_eval = time.perf_counter()
                test_acc = evaluate(model, data.test_x, data.test_y)
                s = snapshot("epoch", ep_loss, ep_correct, ep_n, test_acc)
                t_mark += time.perf_counter() - t_eval  # evaluation time is not training time
                ep_loss, ep_correct, ep_n = zero(), zero(), 0
                if self._pbar is not None:
                    self._pbar.update(1)
                    self._pbar.set_postfix(loss=f"{s.loss:.3f}", train=f"{s.train_acc:.3f}",
                                           test=f"{s.test_acc:.3f}")
                if not emit(s):
                    return
                if stopped:
                    break
        finally:
            for hd in handles:
                hd.remove()
        if self._stop.is_set():
            h.status = "stopped"
            h.message = f"Stopped by the user at step {step} (epoch {epoch}). {h.message}".strip()
        else:
            h.status = "finished"
            acc = h.final_train_acc
            if acc is not None and acc < 0.15 and step >= 50:
                h.message = (_diagnose(
                    f"Training finished but the training accuracy is {acc:.3f}, about chance (0.1): "
                    "the network did not learn.", cfg.replace(lr=live["lr"], eps=live["eps"],
                                                             batch_size=batch_size), stuck=True)
                             + " " + h.message).strip()


def _forward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One training forward: ``(mean cross-entropy loss, number of correct predictions)``,
    both 0-d tensors on the device (no host sync). The compiled path captures this function."""
    out = model(x)
    loss = F.cross_entropy(out, y)
    correct = (out.detach().argmax(1) == y).sum()
    return loss, correct


class _CompiledStep:
    """``_forward`` of one model captured with ``torch.compile``; call it as ``step(x, y)``.

    * ``dynamic=False``: one graph per batch shape. An epoch of 60000 examples at batch 256 has
      two shapes (234 × 256 and a last batch of 96), so the run compiles twice, in the first
      epoch, and every later epoch reuses both graphs (``info['shapes']`` lists them).
    * If compiling, recording or running a captured graph fails in the first three calls of a
      batch shape (a missing compiler, an unsupported GPU), the step reruns eagerly, ``on_fallback`` gets a message, and the rest of the run is eager.
      A genuine error of the step (e.g. batch size 1 with BN) is raised again by the eager rerun.
    * ``info``: ``mode``, ``device``, ``shapes`` {batch size: seconds of its first call, i.e.
      the forward's compile time; the backward compiles at the first ``backward()``},
      ``calls`` (steps that ran the captured graph), ``fallback`` (None or the reason).
    """

    def __init__(self, model: nn.Module, device: torch.device, mode: str | None, on_fallback=None):
        self.model = model
        self.cudagraphs = device.type == "cuda" and mode in ("reduce-overhead", "max-autotune")
        self.fn = torch.compile(partial(_forward, model), mode=mode, dynamic=False)
        self.info = {"mode": mode or "default", "device": str(device), "shapes": {}, "calls": 0,
                     "fallback": None}
        self.on_fallback = on_fallback
        self._ok: dict[int, int] = {}  # successful calls per batch size

    def __call__(self, x: torch.Tensor, y: torch.Tensor):
        if self.info["fallback"] is not None:
            return _forward(self.model, x, y)
        if self.cudagraphs:  # a new training iteration: earlier graph outputs may be reused
            torch.compiler.cudagraph_mark_step_begin()
        bs = int(x.shape[0])
        first = bs not in self.info["shapes"]
        t = time.perf_counter()
        try:
            out = self.fn(x, y)
        except Exception as err:
            # CUDA graphs are recorded at the 2nd/3rd call of a shape; after that the captured
            # graph has run fine, so an error is genuine, not a compile failure.
            if self._ok.get(bs, 0) >= 3:
                raise
            loss, correct = _forward(self.model, x, y)  # a genuine error raises here
            reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            self.info["fallback"] = reason
            if self.on_fallback is not None:
                self.on_fallback(f"compile: torch.compile failed ({reason[:300]}); the run continues eager.")
            return loss, correct
        if first:
            self.info["shapes"][bs] = time.perf_counter() - t
        self.info["calls"] += 1
        self._ok[bs] = self._ok.get(bs, 0) + 1
        return out


def _compile_unavailable(device: torch.device, force: bool) -> str | None:
    """Why ``torch.compile`` should not be used on ``device`` (None: it can be)."""
    import sys

    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile does not support this Python ({sys.version.split()[0]})"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (7, 0):
            return (f"the GPU has compute capability {major}.{minor}; torch.compile (triton) needs "
                    f"7.0 or newer")
        from torch.utils._triton import has_triton

        if not has_triton():
            return "triton is not installed (pip install triton; Linux only)"
        if sys.platform == "win32" and not force:
            return "torch.compile on Windows is not used by bnviz (use Linux or WSL)"
        return None
    if not force:
        return (f"torch.compile is only used on CUDA (on a CPU it was not faster for this small "
                f"network; Config(compile='force') compiles anyway)")
    if device.type != "cpu":
        return f"torch.compile is not supported on {device.type} by bnviz"
    import shutil

    if not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")):
        return "no C++ compiler found (torch.compile on a CPU needs g++ or clang++)"
    return None


def _maybe_compile(model: nn.Module, device: torch.device, request: bool | str = True, on_fallback=None):
    """The compiled training step for ``Config.compile=request``: ``(step, note)``.

    ``step`` is a :class:`_CompiledStep` or None (train eagerly); ``note`` says why not.

    Mode: on CUDA ``True``/``'force'`` use ``'reduce-overhead'``: inductor fuses the network
    (a scratch BN layer's many small kernels become a few) and replays the forward and the
    backward as CUDA graphs, one launch each. A LeNet step is bound by per-kernel launch and
    Python dispatch costs (an estimated ~48 kernels per step with nn.BatchNorm, ~196 with the
    scratch layer, 5-20 µs each), while 10 epochs in 1 s leave 425 µs per step. Not yet
    measured on a GPU: ``benchmarks/gpu_speed.py`` compares the modes. 'max-autotune*' spends
    minutes benchmarking kernels at the first call, too long for a learner; a mode name in
    ``Config.compile`` picks another mode. On a CPU (``'force'`` only) the default mode is used.

    Live changes of BN momentum / eps are Python constants in the graph: a new value makes
    torch.compile recompile (after its recompile limit of 8 it runs that code eagerly); the
    learning rate lives in the optimizer and changes freely.
    """
    force = request == "force"
    why = _compile_unavailable(device, force)
    if why is not None:
        return None, f"compile={request!r}: {why}; running eager on {device.type}."
    if device.type == "cuda":
        mode = request if isinstance(request, str) and request in COMPILE_MODES else "reduce-overhead"
    else:
        mode = request if isinstance(request, str) and request in COMPILE_MODES else None
    mode = None if mode == "default" else mode
    try:
        return _CompiledStep(model, device, mode, on_fallback), ""
    except Exception as err:  # pragma: no cover - depends on the platform
        return None, f"compile={request!r}: torch.compile unavailable ({type(err).__name__}: {err}); running eager."


def train(config: Config | None = None, data: Dataset | None = None, progress: bool = True, **changes) -> History:
    """Train one run in this thread and return its History: ``train(Config(...))`` or
    ``train(lr=0.5, epochs=2)`` (fields of :class:`Config`)."""
    config = (config or Config()).replace(**changes) if changes else (config or Config())
    return Trainer(config, data=data, progress=progress).run()
