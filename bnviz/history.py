"""What a run produced: :class:`Snapshot` (a curve point), :class:`Change` (a live
hyperparameter change), :class:`History` (one run), and JSON save/load; and
:class:`SnapshotLayout`, how a snapshot's device values travel to the host in one copy.

Snapshot semantics: a ``'step'`` snapshot every ``Config.snapshot_every`` steps holds the mean
loss and accuracy of the training batches since the previous snapshot; an ``'epoch'`` snapshot
at every epoch end holds the epoch's mean training loss and accuracy (what d2l prints) and the
test accuracy (model in eval mode, i.e. BN with its running statistics).

Saving never loses runs: :func:`save_histories` on an existing file *merges* (the runs already
in the file are kept; a run saved twice is stored once), unless ``mode='overwrite'`` is asked.
"""
from __future__ import annotations

import itertools
import json
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from .config import Config

__all__ = ["STATUSES", "LayerStats", "Snapshot", "Change", "History", "SnapshotLayout", "save_histories",
           "load_histories"]

STATUSES = ("pending", "running", "finished", "stopped", "diverged", "error")
_run_ids = itertools.count(1)


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


LAYER_FIELDS = tuple(f.name for f in fields(LayerStats))
EPOCH_VALUES = ("test_acc", "precise_test_acc", "saturated")  # measured at an epoch end only
SATURATED_PREFIX = "saturated:"  # an epoch value "saturated:<layer>": that layer's saturated share


class SnapshotLayout:
    """The one host copy of a snapshot, for ``runs`` runs at once (a trainer: 1; a grid: K).

    :meth:`pack` lays every device value a snapshot needs into one ``(runs, width)`` float
    tensor: the six metric sums (loss, correct, n since the previous snapshot | in this epoch),
    the epoch values present (:data:`EPOCH_VALUES`), then each layer's :class:`LayerStats`
    fields (a None tensor takes no room). :meth:`unpack` turns one run's row of the host copy
    (a list of floats) back into :class:`Snapshot` fields. NaN in an epoch value: not measured.
    """

    def __init__(self, runs: int = 1):
        self.runs = runs
        self.slots: list[tuple[object, int]] = []
        self.layers: list[str] = []

    def pack(self, sums: torch.Tensor, epoch_values: dict[str, torch.Tensor],
             layers: dict[str, dict[str, torch.Tensor | None]]) -> torch.Tensor:
        """``sums``: (runs, 6); ``epoch_values``: (runs,) each; ``layers``: per layer, per
        LayerStats field, (runs, C) or (C,) for one run, or None."""
        parts, self.slots, self.layers = [], [], list(layers)

        def add(key, t):
            t = t.detach().float().reshape(self.runs, -1)
            self.slots.append((key, t.shape[1]))
            parts.append(t)

        add("sums", sums)
        for name, t in epoch_values.items():
            add(name, t)
        for layer, state in layers.items():
            for f in LAYER_FIELDS:
                if state.get(f) is not None:
                    add((layer, f), state[f])
        return torch.cat(parts, dim=1)

    def unpack(self, row: list[float], kind: str) -> dict:
        """Snapshot fields of one run: loss, train_acc, the epoch values, layers."""
        values, pos = {}, 0
        for key, width in self.slots:
            values[key], pos = row[pos:pos + width], pos + width
        loss_sum, correct, n = values["sums"][3:6] if kind == "epoch" else values["sums"][0:3]
        out = {"loss": loss_sum / max(n, 1), "train_acc": correct / max(n, 1),
               "layers": {layer: LayerStats(**{f: values.get((layer, f), []) for f in LAYER_FIELDS})
                          for layer in self.layers}}
        for name in EPOCH_VALUES:
            v = values.get(name, [float("nan")])[0]
            out[name] = None if v != v else v
        per_layer = {k[len(SATURATED_PREFIX):]: v[0] for k, v in values.items()
                     if isinstance(k, str) and k.startswith(SATURATED_PREFIX) and v[0] == v[0]}
        if per_layer:
            out["saturated_layers"] = per_layer
        return out


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
    # Epoch snapshots of runs trained with recomputed statistics (bnviz.precise; else None):
    precise_test_acc: float | None = None  # test accuracy, BN statistics recomputed (PreciseBN)
    saturated: float | None = None  # share of sigmoid outputs < 0.05 or > 0.95 (same images)
    saturated_layers: dict | None = None  # the same share per sigmoid layer ({'conv1': ..., 'fc3': ...})


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
class History:
    """What one run produced. ``status`` is one of STATUSES; ``message`` explains 'diverged'
    and 'error' (and warns when accuracy stayed at chance). ``uid`` identifies the run across
    files (``run_id`` is only a counter for this session's legends)."""

    config: Config
    run_id: int = field(default_factory=lambda: next(_run_ids))
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)
    dataset_label: str = ""
    device: str = ""
    snapshots: list[Snapshot] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    status: str = "pending"
    message: str = ""
    wall_time_s: float = 0.0
    train_time_s: float = 0.0
    setup_time_s: float = 0.0  # building, compiling and capturing the step, before the timed run

    def note(self, text: str, first: bool = False) -> None:
        """Add ``text`` to ``message`` (at its end, or at its start with ``first``)."""
        parts = [text, self.message] if first else [self.message, text]
        self.message = " ".join(t.strip() for t in parts if t and t.strip())

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

    def mean_test_acc(self, last: int = 3) -> float | None:
        """Mean test accuracy of the last ``last`` epochs: less sensitive to one epoch's luck
        (and to the moving averages' lag) than the final value."""
        accs = [s.test_acc for s in self.epochs if s.test_acc is not None][-last:]
        return sum(accs) / len(accs) if accs else None

    @property
    def examples_per_s(self) -> float | None:
        """Training throughput over the whole run (evaluation and setup time excluded)."""
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

    def save(self, path, mode: str = "merge") -> Path:
        return save_histories([self], path, mode=mode)

    @classmethod
    def load(cls, path) -> "History":
        return load_histories(path)[0]


SAVE_MODES = ("merge", "overwrite", "new")


def save_histories(histories: list[History], path, mode: str = "merge") -> Path:
    """Write runs to a JSON file (``{"bnviz_histories": 1, "runs": [...]}``), atomically.

    ``mode``: 'merge' (default): if the file exists, keep its runs and add these (a run already
    in the file, same ``uid``, is replaced by its newer copy); 'overwrite': replace the file;
    'new': refuse (FileExistsError) if the file exists. A file that exists but is not a bnviz
    history file is never touched (ValueError).
    """
    if mode not in SAVE_MODES:
        raise ValueError(f"mode={mode!r} is not valid; valid: {SAVE_MODES}")
    path = Path(path)
    runs = [h.to_dict() for h in histories]
    if path.exists() and mode == "new":
        raise FileExistsError(f"{path} exists; choose another name, or mode='merge' to add these runs to it")
    if path.exists() and mode == "merge":
        earlier = _read_runs(path)  # raises ValueError for a foreign file: nothing is written
        ours = {r["uid"] for r in runs}
        runs = [r for r in earlier if r.get("uid") not in ours] + runs
    data = {"bnviz_histories": 1, "runs": runs}
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(data, allow_nan=True))
    tmp.replace(path)
    return path


def _read_runs(path) -> list[dict]:
    try:
        data = json.loads(Path(path).read_text())
        runs = data["runs"]
        if data.get("bnviz_histories") != 1 or not isinstance(runs, list):
            raise KeyError("bnviz_histories")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path} is not a bnviz history file ({type(err).__name__}: {err})") from err
    for r in runs:  # files from before uids existed
        r.setdefault("uid", uuid.uuid4().hex)
        r.setdefault("setup_time_s", 0.0)
    return runs


def load_histories(path) -> list[History]:
    """Read runs written by :func:`save_histories`. New run ids are given to avoid clashes."""
    try:
        runs = [History.from_dict(r) for r in _read_runs(path)]
    except ValueError:
        raise
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a bnviz history file ({type(err).__name__}: {err})") from err
    for h in runs:
        h.run_id = next(_run_ids)
    return runs
