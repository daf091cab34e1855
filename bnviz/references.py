"""Reference runs: the chapters' key arms trained at full size, saved, and shown beside the
CPU-size numbers a chapter computes.

A chapter at CPU size trains on 8,000 images for about 1,000 steps; its runs often end "still
improving". A reference run trains the same arm at full size (60,000 training images, 10,000 test
images, batch 256, 10 epochs = 2,350 steps) so a reader sees what a converged run says. They are
made by ``python benchmarks/reference_runs.py`` (hours on a shared CPU, seconds per run on a GPU)
and saved, one JSON file per (arm, seed), as ``data/reference/<arm>__seed<s>.json``.

**Every reference here is on the SYNTHETIC stand-in data set** (``bnviz.make_synthetic``, 60,000
training images), never Fashion-MNIST; each file records that, the machine (CPU model, cores,
torch version), the date and the git revision, and the table says it on every row.

File format: a bnviz history file (:func:`bnviz.history.save_histories`, so
:func:`~bnviz.history.load_histories` reads it) with one run and one more key, ``"reference"``:
``{arm, seed, chapters, dataset, machine, date, git, wall_s}``.

Accuracy convention: :data:`bnviz.runs.ACCURACY` (PreciseBN, mean of the last 3 epochs), as the
chapters' comparisons; the EMA column is the eval-mode accuracy on the moving averages.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .config import Config
from .history import History, load_histories
from .models import preset
from .runs import apply_changes, run_accuracy

__all__ = ["Arm", "ARMS", "REFERENCE_DIR", "DATASET_TEXT", "ReferenceError", "arms_for", "arm", "arm_config",
           "reference_path", "machine_info", "thin", "save_reference", "load_reference", "reference_table",
           "show_references", "reference_curves", "add_reference_traces", "fix_command"]

def _reference_dir() -> Path:
    """``data/reference`` of a checkout (where ``benchmarks/reference_runs.py`` writes); in an
    installed wheel (Colab), its copy ``bnviz/reference_data`` (package data)."""
    checkout = Path(__file__).resolve().parents[1] / "data" / "reference"
    installed = Path(__file__).resolve().parent / "reference_data"
    return checkout if checkout.is_dir() or not installed.is_dir() else installed


REFERENCE_DIR = _reference_dir()
DATASET_TEXT = "SYNTHETIC stand-in (not Fashion-MNIST), 60,000 training / 10,000 test images"
SEEDS = (0, 1)
# Full size: d2l's recipe (batch 256, 10 epochs over all 60,000 images) on the synthetic stand-in.
FULL = Config(model=preset("lenet-bn"), dataset="synthetic", batch_size=256, lr=1.0, epochs=10, seed=0,
              device="cpu", snapshot_every=50)
B07_STEPS = 2000  # chapter 07's GPU design: every batch size trains exactly this many steps


@dataclass(frozen=True)
class Arm:
    """One reference arm: ``name`` (file names, ``--only``), ``label`` (the chapter's own name for
    the variant, so a CPU-size result can be matched), ``chapters`` it backs, ``changes``
    (:func:`bnviz.runs.apply_changes` on :data:`FULL`), ``seeds`` and a ``note`` on its size."""

    name: str
    label: str
    chapters: tuple[str, ...]
    changes: dict = field(default_factory=dict)
    seeds: tuple[int, ...] = SEEDS
    note: str = "60,000 images × 10 epochs, B 256"
    aliases: tuple[str, ...] = ()  # other chapters' names for the same arm


def _b07(norm: dict, b: int) -> dict:
    """07's GPU design at batch b: exactly B07_STEPS steps (train_size, epochs as sweeps.fixed_steps), lr √(B/256)."""
    from .sweeps import fixed_steps

    n, epochs = fixed_steps(B07_STEPS, b, 60000)
    return {**norm, "batch_size": b, "train_size": n, "epochs": epochs, "lr": math.sqrt(b / 256),
            "snapshot_every": max(50, B07_STEPS // 40), "score_at": (0.9, 0.95, 1.0)}


def _s07(b: int) -> str:
    return (f"07's GPU design: {B07_STEPS:,} steps, B {b}, lr √(B/256) = {math.sqrt(b / 256):.3g}, "
            "scored at steps 1,800/1,900/2,000")

# In priority order: the script runs them top to bottom (the headline arms first).
ARMS = (
    Arm("base", "LeNet-BN (base)", ("00", "04", "05", "06", "07"), {}, aliases=("LeNet-BN, lr 1.0", "LeNet-BN")),
    Arm("no-bn", "no BN", ("05", "06"), {"norm": "none"}, aliases=("LeNet, no BN", "avg pool, no BN")),
    Arm("bn-b2", "BN @ 2", ("07",), _b07({"norm": "torch"}, 2), note=_s07(2)),
    Arm("gn-b2", "GroupNorm (2) @ 2", ("07",), _b07({"norm": "group", "groups": 2}, 2), note=_s07(2)),
    Arm("bn-b32", "BN @ 32", ("07",), _b07({"norm": "torch"}, 32), note=_s07(32)),
    Arm("gn-b32", "GroupNorm (2) @ 32", ("07",), _b07({"norm": "group", "groups": 2}, 32), note=_s07(32)),
    Arm("d2l-lenet", "LeNet (no BN), lr 0.9", ("00",), {"model": "lenet", "lr": 0.9}),
    Arm("bn-lr0.3", "LeNet-BN, lr 0.3", ("05",), {"lr": 0.3}),
    Arm("base-linear", "LeNet-BN, lr decayed linearly to 0", ("05",), {"lr_schedule": "linear"},
        aliases=("lr decayed linearly to 0",)),
    Arm("no-bn-linear", "no BN, lr decayed linearly to 0", ("05",), {"norm": "none", "lr_schedule": "linear"}),
    Arm("fixed-gamma-beta", "γ = 1, β = 0 fixed", ("06",), {"affine": False}),
    Arm("bn-after", "FC → act → BN", ("06",), {"norm_position": "after"}),
    Arm("max-pool-bn", "max pool, BN", ("06",), {"pool": "max"}),
    Arm("no-bias", "no bias before BN", ("06",), {"bias": False}),
    Arm("dropout-0.3", "FC → BN → act → dropout 0.3", ("06",), {"dropout": 0.3}),
)
_BY_NAME = {a.name: a for a in ARMS}


class ReferenceError(ValueError):
    """A reference file is missing or unreadable; the message names the file and the fix."""


def arm(name: str) -> Arm:
    if name not in _BY_NAME:
        raise ValueError(f"unknown reference arm {name!r}; valid: {', '.join(_BY_NAME)}")
    return _BY_NAME[name]


def arms_for(chapter: str) -> list[Arm]:
    """The arms that back ``chapter`` ('00', '04', ... as in the notebooks' file names)."""
    chosen = [a for a in ARMS if chapter in a.chapters]
    if not chosen:
        known = sorted({c for a in ARMS for c in a.chapters})
        raise ValueError(f"no reference arms for chapter {chapter!r}; chapters with references: {known}")
    return chosen


def arm_config(a: Arm, seed: int) -> Config:
    return apply_changes(FULL, a.changes).replace(seed=seed, label=f"{a.label} (reference, seed {seed})")


def reference_path(name: str, seed: int, root=None) -> Path:
    return Path(root or REFERENCE_DIR) / f"{name}__seed{seed}.json"


def fix_command(name: str) -> str:
    return f"python benchmarks/reference_runs.py --only {name}"


def machine_info() -> dict:
    """CPU model, cores, torch version, python: what a reference was measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def thin(history: History) -> History:
    """A copy of ``history`` with the per-layer statistics kept at epoch ends only (step
    snapshots' ``layers`` emptied): a full-size run's file stays well under 1 MB."""
    import copy

    h = copy.deepcopy(history)
    for s in h.snapshots:
        if s.kind == "step":
            s.layers = {}
    return h


def save_reference(history: History, a: Arm, seed: int, root=None, force: bool = False,
                   wall_s: float | None = None) -> Path:
    """Write :func:`thin` (``history``) as the reference of (``a``, ``seed``), atomically. An
    existing file is never replaced unless ``force`` (FileExistsError, nothing written)."""
    path = reference_path(a.name, seed, root)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; it is kept. Pass --force (force=True) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"arm": a.name, "label": a.label, "seed": seed, "chapters": list(a.chapters), "size": a.note,
            "dataset": DATASET_TEXT if history.config.dataset == "synthetic" else history.dataset_label,
            "machine": machine_info(), "git": _git_revision(), "wall_s": wall_s,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    doc = {"bnviz_histories": 1, "runs": [thin(history).to_dict()], "reference": meta}
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(doc, allow_nan=True))
    tmp.replace(path)
    return path


def load_reference(name: str, seed: int, root=None) -> tuple[History, dict]:
    """``(history, metadata)`` of one saved reference; :class:`ReferenceError` naming the file
    and the command that makes it when it is missing or corrupt."""
    path = reference_path(name, seed, root)
    if not path.exists():
        raise ReferenceError(f"reference file {path} is missing; make it with `{fix_command(name)}`")
    try:
        meta = json.loads(path.read_text())["reference"]
        (h,) = load_histories(path)
        if not isinstance(meta, dict) or meta.get("arm") != name or meta.get("seed") != seed:
            raise ValueError(f"its metadata names arm {meta.get('arm')!r} seed {meta.get('seed')!r}")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ReferenceError(f"reference file {path} is corrupt ({err}); remake it with "
                             f"`{fix_command(name)} --force`") from None
    changed = _changed_fields(h.config, arm_config(arm(name), seed)) if name in _BY_NAME else []
    if changed:
        raise ReferenceError(f"reference file {path} was made with another configuration than the arm's "
                             f"today (fields {changed}); remake it with `{fix_command(name)} --force`")
    return h, meta


def _changed_fields(saved: Config, now: Config) -> list[str]:
    """The Config fields that differ (label excluded: a name, not a setting)."""
    a, b = saved.to_dict(), now.to_dict()
    return sorted(k for k in a if k != "label" and a[k] != b.get(k))


def _machine_text(meta: dict) -> str:
    """'2-core Intel Xeon CPU' or the GPU's name (the file keeps the full record)."""
    m = meta.get("machine", {})
    if m.get("gpu"):
        return m["gpu"]
    cpu = " ".join(w for w in str(m.get("cpu", "?")).replace("(R)", "").replace("(TM)", "").split()
                   if w not in ("Processor", "CPU"))
    return f"{m.get('cores', '?')}-core {cpu} CPU"


def _cpu_value(cpu, a: Arm):
    """The CPU-size accuracy of arm ``a`` (its label, else an alias) from ``cpu``: a dict
    label -> number, SeedStats (its mean) or History (:func:`~bnviz.runs.run_accuracy`:
    PreciseBN where measured, else the eval-mode accuracy, last 3 epochs), or an object with
    ``.stats(label)`` such as a Comparison, or a list of these (the first that has the arm);
    None where none has any of the arm's names."""
    if cpu is None:
        return None
    if isinstance(cpu, (list, tuple)):
        return next((v for v in (_cpu_value(c, a) for c in cpu) if v is not None), None)
    for name in (a.label, *a.aliases):
        try:
            v = cpu[name] if isinstance(cpu, dict) else cpu.stats(name)
        except (KeyError, ValueError, AttributeError):
            continue
        if isinstance(v, History):
            return run_accuracy(v)
        return v if isinstance(v, (int, float)) else getattr(v, "mean", None)
    return None


def _fmt(values: list[float], runs: int) -> str:
    """'mean ± sample std (n=k)', saying how many saved runs had no accuracy (diverged)."""
    failed = f", {runs - len(values)} diverged" if runs > len(values) else ""
    if not values:
        return f"– (all {runs} diverged)" if runs else "–"
    mean = sum(values) / len(values)
    if len(values) < 2:
        return f"{mean:.3f} (1 seed, no spread{failed})"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.3f} ± {std:.3f} (n={len(values)}{failed})"


def reference_table(chapter: str, cpu=None, root=None):
    """A DataFrame, one row per arm of ``chapter``: ``arm``, ``reference accuracy`` (PreciseBN,
    mean ± sample std over the saved seeds), ``reference EMA``, ``CPU size`` (from ``cpu``, see
    :func:`_cpu_value`, where given), ``size`` and ``source`` ("SYNTHETIC, full size, machine,
    date"). Missing or corrupt files give a row saying so and the command that makes them; the
    table never raises for them. ``.attrs['missing']`` lists the missing (arm, seed) pairs."""
    import pandas as pd

    rows, missing = [], []
    for a in arms_for(chapter):
        precise, ema, metas = [], [], []
        for seed in a.seeds:
            try:
                h, meta = load_reference(a.name, seed, root)
            except ReferenceError as err:
                missing.append((a.name, seed, str(err)))
                continue
            metas.append(meta)
            for out, stat in ((precise, "precise"), (ema, "ema")):
                v = run_accuracy(h, statistics=stat)
                if v is not None:
                    out.append(v)
        kind = "GPU size" if "train_size" in a.changes else "full size"
        any_file = any(reference_path(a.name, s, root).exists() for s in a.seeds)
        src = (f"SYNTHETIC, {kind}, {_machine_text(metas[0])}, {metas[0]['date'][:10]}" if metas
               else f"unusable (stale or corrupt): `{fix_command(a.name)} --force`" if any_file
               else f"not run yet: `{fix_command(a.name)}`")
        cpu_v = _cpu_value(cpu, a)
        rows.append({"arm": a.label, "reference accuracy": _fmt(precise, len(metas)),
                     "reference EMA": _fmt(ema, len(metas)),
                     "CPU size": "–" if cpu_v is None else f"{cpu_v:.3f}",
                     "seeds saved": f"{len(metas)} of {len(a.seeds)}", "size": a.note, "source": src})
    df = pd.DataFrame(rows)
    if cpu is None:
        df = df.drop(columns="CPU size")
    df.attrs["missing"] = missing
    return df


def show_references(chapter: str, cpu=None, root=None):
    """For a notebook: display :func:`reference_table` with a one-line header; a missing file
    gives a note, never an error (the chapter goes on). Returns the table."""
    df = reference_table(chapter, cpu=cpu, root=root)
    print(f"Reference runs for chapter {chapter} ({DATASET_TEXT}; accuracy: PreciseBN, mean of the last 3 "
          "epochs; ± is the sample std over seeds):")
    try:
        from IPython.display import display

        display(df)
    except ImportError:
        print(df.to_string(index=False))
    if df.attrs["missing"]:
        names = sorted({m[0] for m in df.attrs["missing"]})
        print(f"NOTE: {len(df.attrs['missing'])} reference file(s) not found or unreadable (arms: "
              f"{', '.join(names)}); the rows say so. Make them with `python benchmarks/reference_runs.py`.")
    return df


def reference_curves(chapter: str, root=None):
    """Long DataFrame of the saved references' epoch curves: ``arm, seed, epoch, fraction``
    (of the run), ``test_acc`` (EMA) and ``precise_test_acc``; missing files are skipped."""
    import pandas as pd

    rows = []
    for a in arms_for(chapter):
        for seed in a.seeds:
            try:
                h, _ = load_reference(a.name, seed, root)
            except ReferenceError:
                continue
            n = max((s.epoch for s in h.epochs), default=1)
            rows += [{"arm": a.label, "seed": seed, "epoch": s.epoch, "fraction": s.epoch / n,
                      "test_acc": s.test_acc, "precise_test_acc": s.precise_test_acc} for s in h.epochs]
    return pd.DataFrame(rows, columns=["arm", "seed", "epoch", "fraction", "test_acc", "precise_test_acc"])


def add_reference_traces(fig, chapter: str, labels=None, x: str = "fraction", root=None, **trace_kw):
    """Add each saved reference's PreciseBN test-accuracy curve (dotted, grey legend group
    'reference') to a plotly ``fig`` whose x axis is the fraction of the run (``x='fraction'``)
    or the epoch; ``labels``: only these arms. Returns the number of traces added (0 when no
    file is saved: the figure is unchanged)."""
    import plotly.graph_objects as go

    curves = reference_curves(chapter, root)
    if labels is not None:
        curves = curves[curves["arm"].isin(list(labels))]
    added = 0
    for (label, seed), g in curves.groupby(["arm", "seed"], sort=False):
        y = g["precise_test_acc"].where(g["precise_test_acc"].notna(), g["test_acc"])
        fig.add_trace(go.Scatter(x=g[x], y=y, mode="lines", line={"dash": "dot"}, opacity=0.6,
                                 name=f"{label}, seed {seed} (full size, SYNTHETIC)",
                                 legendgroup="reference", **trace_kw))
        added += 1
    return added
