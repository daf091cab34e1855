"""The canned experiments of chapter 05: grids of runs, learning-rate sweeps, and probes.

Conventions:

* A **variant** is a dict of changes to a base :class:`~bnviz.train.Config`. Keys that are
  ``Config`` fields (``lr``, ``batch_size``, ``epochs``, ...) change the config; keys that are
  :class:`~bnviz.models.LeNetSpec` fields (``norm``, ``pool``, ``padding``, ``bias``,
  ``dropout``, ...) change its model; ``model`` replaces the spec (a spec or a preset name).
* A run's **final** metrics are its last epoch's (``History.final_*``: loss and training
  accuracy averaged over that epoch, test accuracy in eval mode at its end). A run that
  diverged keeps what it reached and its ``status``; it has no test accuracy if it diverged
  before its first epoch ended.
* Every figure names the data set in its title (``History.dataset_label``); on the synthetic
  stand-in that label says SYNTHETIC, because its numbers are not Fashion-MNIST results.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .data import Dataset, load_dataset, resolve_device, to_float
from .models import LeNetSpec, build_lenet, norm_layers, preset
from .train import Config, History, Trainer

__all__ = [
    "Run", "GridResult", "apply_changes", "run_grid", "lr_sweep", "max_lr", "MaxLR",
    "batch_size_grid", "run_with_probe", "weight_norms", "bias_check", "scale_invariance_check",
    "batch_stat_noise", "LandscapeProbe", "loss_landscape_probe", "landscape_during_training",
    "deep_mlp", "grad_norms_at_init", "Rescale", "curves_figure", "bar_figure",
    "lr_sweep_figure", "line_figure", "landscape_figure", "status_table",
]

_CONFIG_FIELDS = {f.name for f in fields(Config)}
_SPEC_FIELDS = {f.name for f in fields(LeNetSpec)}
_FAILED = ("diverged", "error")


# ----------------------------------------------------------------------------- results


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
        return self.history.final_test_acc

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
                "train_acc": self.train_acc, "test_acc": self.test_acc, "gap": self.gap,
                "steps": h.snapshots[-1].step if h.snapshots else 0,
                "time_s": round(h.wall_time_s, 2)}


@dataclass
class GridResult:
    """The runs of one experiment, in order. ``table()`` is a pandas DataFrame with one row per
    run (its tags and final metrics); ``result['label']`` is one :class:`Run`."""

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
        return load_dataset(cfg.dataset, device=resolve_device(cfg.device), train_size=cfg.train_size,
                            test_size=cfg.test_size)
    n_tr = min(cfg.train_size or len(data.train_x), len(data.train_x))
    n_te = min(cfg.test_size or len(data.test_x), len(data.test_x))
    if (n_tr, n_te) != (len(data.train_x), len(data.test_x)):
        return data.subset(n_tr, n_te)
    return data


def _tag(value):
    return value.label() if isinstance(value, LeNetSpec) else value


def run_grid(base: Config, variants: dict[str, dict], data: Dataset | None = None,
             progress: bool = True, tags: dict[str, dict] | None = None,
             models: dict[str, nn.Module | Callable[[], nn.Module]] | None = None,
             desc: str = "runs") -> GridResult:
    """Train one run per variant (``label -> changes``, see :func:`apply_changes`), all on the
    same data set (loaded once from ``base`` if ``data`` is None), and return a GridResult.

    ``tags[label]`` overrides what the table shows for a run (default: its changes).
    ``models[label]`` gives a ready-made model (or a function making one) instead of the
    LeNet of the config, e.g. :func:`deep_mlp`.
    """
    if not variants:
        raise ValueError("variants is empty: give at least one label -> changes")
    configs = {label: apply_changes(base, ch).replace(label=label) for label, ch in variants.items()}
    if data is None:
        data = _data_for(base, None)
    result = GridResult(dataset_label=data.label)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(configs), desc=f"{desc} ({data.label})", unit="run")
    try:
        for label, cfg in configs.items():
            model = (models or {}).get(label)
            if callable(model) and not isinstance(model, nn.Module):
                model = model()
            h = Trainer(cfg, data=_data_for(cfg, data), model=model).run()
            shown = (tags or {}).get(label, {k: _tag(v) for k, v in variants[label].items()})
            result.runs.append(Run(label, dict(shown), h))
            if bar is not None:
                acc = h.final_test_acc
                bar.set_postfix_str(f"{label}: {h.status}, test acc {'-' if acc is None else f'{acc:.3f}'}")
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return result


def lr_sweep(base: Config, lrs: Iterable[float], models: dict[str, LeNetSpec | str],
             data: Dataset | None = None, progress: bool = True) -> GridResult:
    """One run per (model, lr): the table has columns ``model`` (the name given) and ``lr``."""
    lrs = [float(lr) for lr in lrs]
    if not lrs or not models:
        raise ValueError("lr_sweep needs at least one learning rate and one model")
    variants, tags = {}, {}
    for name, spec in models.items():
        for lr in lrs:
            label = f"{name}, lr {lr:g}"
            variants[label] = {"model": spec, "lr": lr}
            tags[label] = {"model": name, "lr": lr}
    return run_grid(base, variants, data=data, progress=progress, tags=tags, desc="lr sweep")


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
        return [r.row() for r in results.runs]
    if hasattr(results, "to_dict") and hasattr(results, "columns"):  # a DataFrame
        return results.to_dict("records")
    return [dict(r) for r in results]


def max_lr(results, tolerance: float = 0.05, floor: float = 0.2) -> dict[str, MaxLR]:
    """The maximum learning rate of each model in a sweep, by this definition:

    *the largest lr in the sweep whose run did not diverge (status not 'diverged'/'error') and
    whose final test accuracy is within* ``tolerance`` *of the best final test accuracy over all
    lrs for that model.* The best must itself be at least ``floor`` (default 0.2, twice chance
    for 10 classes): if no lr reached it, the model did not learn and its max lr is None.

    ``results``: a :class:`GridResult` from :func:`lr_sweep`, a DataFrame, or rows (dicts) with
    keys ``model``, ``lr``, ``test_acc``, ``status``.
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


def batch_size_grid(base: Config, norms: dict[str, dict], batch_sizes: Iterable[int],
                    scale_lr: bool = True, data: Dataset | None = None, progress: bool = True) -> GridResult:
    """One run per (norm, batch size), the same number of epochs (so the same examples) each.

    ``norms``: name -> model changes, e.g. ``{'BN': {'norm': 'torch'}, 'GroupNorm': {'norm':
    'group'}}``. With ``scale_lr`` the lr follows the linear scaling rule
    ``lr = base.lr * batch_size / base.batch_size`` (Goyal et al. 2017), so that an epoch moves
    the weights about as far whatever the batch size. Table columns: ``norm``, ``batch_size``, ``lr``.
    """
    variants, tags = {}, {}
    for name, changes in norms.items():
        for bs in batch_sizes:
            lr = base.lr * bs / base.batch_size if scale_lr else base.lr
            label = f"{name}, bs {bs}"
            variants[label] = {**changes, "batch_size": int(bs), "lr": lr}
            tags[label] = {"norm": name, "batch_size": int(bs), "lr": lr}
    return run_grid(base, variants, data=data, progress=progress, tags=tags, desc="batch sizes")


def status_table(results):
    """Status and the trainer's message of each run (a DataFrame): what the lab shows when a
    run diverges or stays at chance."""
    import pandas as pd

    return pd.DataFrame([{"label": r.label, "status": r.status, "train_acc": r.train_acc,
                          "test_acc": r.test_acc, "message": r.history.message} for r in results])


# ----------------------------------------------------------------------------- probes during a run


def run_with_probe(cfg: Config, probe: Callable[[nn.Module, object], dict], data: Dataset | None = None,
                   model: nn.Module | None = None) -> tuple[History, list[dict]]:
    """Train ``cfg`` and call ``probe(model, snapshot)`` at every snapshot (every
    ``cfg.snapshot_every`` steps and each epoch end). Returns the History and the probe's rows,
    each with ``step`` and ``epoch`` added. The probe runs in the training thread, between steps;
    it must not change the model (work on a copy)."""
    rows: list[dict] = []
    trainer: Trainer | None = None
    errors: list[BaseException] = []

    def on_snapshot(history, snap):
        try:
            rows.append({"step": snap.step, "epoch": snap.epoch, "kind": snap.kind,
                         **probe(trainer.model, snap)})
        except Exception as err:  # re-raised below: a probe bug must not pass silently
            errors.append(err)

    trainer = Trainer(cfg, data=_data_for(cfg, data), on_snapshot=on_snapshot, model=model)
    h = trainer.run()
    if errors:
        raise RuntimeError(f"the probe failed: {type(errors[0]).__name__}: {errors[0]}") from errors[0]
    return h, rows


def weight_norms(model: nn.Module) -> dict[str, float]:
    """ℓ2 norm of the weight of each conv/linear layer that feeds a norm layer (LeNet names:
    conv1, conv2, fc1, fc2)."""
    names = set(norm_layers(model))
    return {name: float(m.weight.detach().norm()) for name, m in model.named_modules()
            if name in names and isinstance(m, (nn.Conv2d, nn.Linear))}


# ----------------------------------------------------------------------------- numeric checks


def _probe_input(n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g, dtype=dtype)


def bias_check(spec: LeNetSpec | None = None, batch: int = 32, seed: int = 0,
               dtype=torch.float64) -> dict:
    """Is the bias of a layer right before BN cancelled? Build the model with biases (random, as
    initialised) and the same model without the biases of the layers that feed a norm, with all
    other weights equal; feed the same batch in training mode. Returns ``max_abs_diff`` of the
    outputs, ``bias_grad_norm`` (the gradient of a loss w.r.t. those biases, which is exactly 0
    in theory) and ``removed`` (the biases that were dropped). Eval mode is different: there BN
    subtracts ``running_mean``, which learned the bias in training, so it cancels only as well
    as the running mean has converged."""
    spec = spec or preset("lenet-bn")
    torch.manual_seed(seed)
    with_bias = build_lenet(spec.replace(bias=True)).to(dtype).train()
    without = build_lenet(spec.replace(bias=False)).to(dtype).train()
    state = {k: v for k, v in with_bias.state_dict().items() if k in without.state_dict()}
    removed = sorted(set(with_bias.state_dict()) - set(without.state_dict()))
    without.load_state_dict(state)
    x = _probe_input(batch, seed + 1, dtype)
    y = torch.arange(batch) % 10
    out_a = with_bias(x)
    out_b = without(x)
    F.cross_entropy(out_a, y).backward()
    params = dict(with_bias.named_parameters())
    grads = [params[k].grad for k in removed if k in params]
    grad_norm = float(torch.sqrt(sum((g ** 2).sum() for g in grads))) if grads else 0.0
    return {"max_abs_diff": float((out_a - out_b).detach().abs().max()), "bias_grad_norm": grad_norm,
            "output_scale": float(out_a.detach().abs().max()), "removed": removed}


def scale_invariance_check(factors=(0.1, 10.0, 1000.0), layer: str = "conv1", batch: int = 32,
                           seed: int = 0, dtype=torch.float64, spec: LeNetSpec | None = None,
                           eps: float = 1e-5):
    """BN makes a layer's output invariant to the scale of the weights before it:
    BN(c·W x + c·b) = BN(W x + b) for c > 0, so the loss is the same, and the gradient w.r.t. W
    shrinks as 1/c. One row per factor c (a DataFrame): the largest output difference, the ratio
    ‖∇_{cW}‖ / ‖∇_W‖ (expected 1/c) and the "effective step" ratio (how far one SGD step turns
    the weight direction, relative to c = 1: expected 1/c²), and ``cos_w_grad``, the cosine
    between W and its gradient: 0, since the loss does not change along W, so plain SGD can
    only make ‖W‖ grow (‖W − η∇‖² = ‖W‖² + η²‖∇‖²).

    The invariance is exact only for ``eps = 0``: BN divides by sqrt(var + eps), so when c
    makes the variance c²·var comparable to eps (small c), the outputs differ a little."""
    import pandas as pd

    spec = spec or preset("lenet-bn")
    if layer not in spec.norm_layers or not spec.is_batch_norm:
        raise ValueError(f"layer {layer!r} must feed a batch norm; this spec normalises {spec.norm_layers} "
                         f"with norm={spec.norm!r}")
    torch.manual_seed(seed)
    base = build_lenet(spec).to(dtype).train()
    for m in norm_layers(base).values():
        m.eps = eps
    x = _probe_input(batch, seed + 1, dtype)
    y = torch.arange(batch) % 10

    def run(c):
        m = copy.deepcopy(base)
        lay = dict(m.named_modules())[layer]
        with torch.no_grad():
            lay.weight.mul_(c)
            if lay.bias is not None:
                lay.bias.mul_(c)
        out = m(x)
        F.cross_entropy(out, y).backward()
        w, g = lay.weight.detach(), lay.weight.grad
        cos = float((w * g).sum() / (w.norm() * g.norm()))
        return out.detach(), float(g.norm()), float(g.norm() / w.norm()), cos

    out1, g1, turn1, _ = run(1.0)
    rows = []
    for c in factors:
        out, g, turn, cos = run(float(c))
        rows.append({"c": c, "max_abs_diff": float((out - out1).abs().max()), "grad_ratio": g / g1,
                     "expected_grad_ratio": 1 / c, "turn_ratio": turn / turn1, "expected_turn_ratio": 1 / c ** 2,
                     "cos_w_grad": cos})
    return pd.DataFrame(rows)


def batch_stat_noise(model: nn.Module, data: Dataset, batch_sizes=(2, 4, 8, 16, 32, 64, 128, 256),
                     layer: str = "fc1", n_batches: int = 50, population: int = 4096, seed: int = 0):
    """How noisy are the statistics that BN computes from one batch? For each batch size B, draw
    ``n_batches`` random batches, take the per-channel mean and (biased) variance of the input of
    norm layer ``layer``, and compare with the population values (from ``population`` examples).

    Columns (averaged over channels): ``mean_noise`` = std over batches of the batch mean /
    population std; ``var_noise`` = std over batches of the batch variance / population variance;
    ``values_per_channel`` m (B for a fully connected layer, B·H·W for a conv layer);
    ``iid_mean_noise`` = 1/√m, what independent values would give. The model runs in eval mode,
    so the layers before ``layer`` are deterministic and only the sampling noise is measured.
    """
    import pandas as pd

    norms = norm_layers(model)
    if layer not in norms:
        raise ValueError(f"layer {layer!r} has no norm in this model; layers with a norm: {sorted(norms)}")
    captured = []
    hook = norms[layer].register_forward_pre_hook(lambda mod, inp: captured.append(inp[0].detach()))
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    n = len(data.train_x)

    def stats(idx):
        captured.clear()
        with torch.no_grad():
            model(to_float(data.train_x[idx.to(data.device)]).to(dev))
        x = captured[0].double()
        dims = [0] + list(range(2, x.dim()))
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        return mean, var, x.numel() // x.shape[1]

    try:
        pop_mean, pop_var, _ = stats(torch.randperm(n, generator=g)[:min(population, n)])
        rows = []
        for bs in batch_sizes:
            if bs > n:
                raise ValueError(f"batch size {bs} is larger than the {n} training examples")
            ms, vs = [], []
            for _ in range(n_batches):
                m, v, per = stats(torch.randperm(n, generator=g)[:bs])
                ms.append(m)
                vs.append(v)
            ms, vs = torch.stack(ms), torch.stack(vs)
            keep = pop_var > 1e-12
            rows.append({"batch_size": bs, "values_per_channel": per,
                         "mean_noise": float((ms.std(0)[keep] / pop_var[keep].sqrt()).mean()),
                         "var_noise": float((vs.std(0)[keep] / pop_var[keep]).mean()),
                         "iid_mean_noise": 1 / math.sqrt(per)})
    finally:
        hook.remove()
        model.train(was_training)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- loss landscape


@dataclass
class LandscapeProbe:
    """Loss and gradient along the gradient direction from one point (Santurkar et al. 2018).

    ``etas``: step sizes; ``losses[i]`` = L(w − etas[i]·g); ``grad_changes[i]`` =
    ‖∇L(w − etas[i]·g) − g‖₂ with g = ∇L(w)."""

    loss: float
    grad_norm: float
    etas: list[float]
    losses: list[float]
    grad_changes: list[float]

    @property
    def loss_range(self) -> float:
        """max − min of the loss over the step sizes (and η = 0): "loss Lipschitzness"."""
        vals = [self.loss] + self.losses
        return max(vals) - min(vals)

    @property
    def max_grad_change(self) -> float:
        return max(self.grad_changes)

    @property
    def beta(self) -> float:
        """Effective β-smoothness: max over η of ‖Δg‖ / ‖η·g‖ (how fast the gradient turns)."""
        return max(d / (e * self.grad_norm) for d, e in zip(self.grad_changes, self.etas)) if self.grad_norm > 0 else 0.0


def _loss_and_grad(model, params, x, y):
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params)
    return float(loss.detach()), [g.detach() for g in grads]


def loss_landscape_probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                         etas=(0.25, 0.5, 1.0, 2.0, 4.0)) -> LandscapeProbe:
    """At the model's current weights w, take the gradient g of the cross-entropy on the batch
    (x float images, y labels; the model in training mode, so BN uses this batch's statistics)
    and step to w − η·g for each η: record the loss and how much the gradient changed. Works on
    a copy: the model (weights and running statistics) is left as it was."""
    etas = [float(e) for e in etas]
    if not etas or min(etas) <= 0:
        raise ValueError(f"etas must be positive step sizes, got {etas}")
    probe = copy.deepcopy(model).train()
    params = [p for p in probe.parameters() if p.requires_grad]
    loss0, g0 = _loss_and_grad(probe, params, x, y)
    start = [p.detach().clone() for p in params]
    gnorm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in g0)))
    losses, changes = [], []
    for eta in etas:
        with torch.no_grad():
            for p, w, g in zip(params, start, g0):
                p.copy_(w - eta * g)
        loss, g1 = _loss_and_grad(probe, params, x, y)
        losses.append(loss)
        changes.append(float(torch.sqrt(sum(((a.double() - b.double()) ** 2).sum() for a, b in zip(g1, g0)))))
    return LandscapeProbe(loss0, gnorm, etas, losses, changes)


def landscape_during_training(base: Config, models: dict[str, LeNetSpec | str], data: Dataset | None = None,
                              etas_rel=(0.25, 0.5, 1.0, 2.0, 4.0), probe_batch: int = 256,
                              progress: bool = True):
    """Train each model with ``base`` and, at every snapshot, probe the loss landscape along the
    gradient on a fixed batch of ``probe_batch`` training examples, with step sizes
    ``etas_rel × lr``. Returns ``(DataFrame, {name: History})``; the frame has one row per
    (model, snapshot) with ``loss``, ``loss_range``, ``max_grad_change``, ``beta``."""
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
            if snap.kind != "step":
                return {"skip": True}
            p = loss_landscape_probe(model, xb, yb, etas)
            return {"skip": False, "loss": p.loss, "grad_norm": p.grad_norm, "loss_range": p.loss_range,
                    "max_grad_change": p.max_grad_change, "beta": p.beta}

        h, prow = run_with_probe(cfg, probe, data=data)
        hists[name] = h
        rows += [{"model": name, **r} for r in prow if not r["skip"]]
    df = pd.DataFrame(rows)
    return (df.drop(columns=["skip", "kind"]) if len(df) else df), hists


# ----------------------------------------------------------------------------- deep networks


class Rescale(nn.Module):
    """Multiply the input by a constant: ``Rescale(255)`` in front of a model undoes the
    ``/255`` scaling, i.e. feeds it unscaled pixels (a common bug, q-gpu-not-learning)."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = float(factor)

    def forward(self, x):
        return x * self.factor


def deep_mlp(depth: int = 16, width: int = 64, bn: bool = False, activation: str = "sigmoid",
             seed: int = 0) -> nn.Sequential:
    """A plain (no residual) fully connected network on 28×28 images: ``depth`` hidden layers
    ``fc1..fcN`` of ``width`` units, each Linear → [BatchNorm1d] → activation, then a 10-way
    output. PyTorch's default initialisation. Norm modules are named ``norm_fcI``."""
    if depth < 1 or width < 2:
        raise ValueError(f"depth must be >= 1 and width >= 2, got depth={depth}, width={width}")
    acts = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}
    if activation not in acts:
        raise ValueError(f"activation {activation!r} is not valid; valid: {sorted(acts)}")
    torch.manual_seed(seed)
    layers, fan_in = [("flatten", nn.Flatten())], 28 * 28
    for i in range(1, depth + 1):
        layers.append((f"fc{i}", nn.Linear(fan_in, width)))
        if bn:
            layers.append((f"norm_fc{i}", nn.BatchNorm1d(width)))
        layers.append((f"act_fc{i}", acts[activation]()))
        fan_in = width
    layers.append(("out", nn.Linear(fan_in, 10)))
    from collections import OrderedDict

    return nn.Sequential(OrderedDict(layers))


def grad_norms_at_init(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """‖∂loss/∂W‖ of each Linear/Conv weight for one batch, in training mode (input side first).
    In a deep plain sigmoid network the early layers' gradients are orders of magnitude smaller."""
    m = copy.deepcopy(model).train()
    m.zero_grad(set_to_none=True)
    F.cross_entropy(m(x), y).backward()
    return {n: float(mod.weight.grad.norm()) for n, mod in m.named_modules()
            if isinstance(mod, (nn.Linear, nn.Conv2d))}


# ----------------------------------------------------------------------------- figures


def _runs(results) -> list[tuple[str, History]]:
    if isinstance(results, History):
        results = [results]
    out = []
    for r in results:
        if isinstance(r, Run):
            out.append((r.label, r.history))
        elif isinstance(r, History):
            out.append((r.label, r))
        else:
            raise TypeError(f"expected a GridResult, Runs or Histories, got {type(r).__name__}")
    return out


def _dataset_label(hists) -> str:
    labels = sorted({h.dataset_label for h in hists if h.dataset_label})
    return " / ".join(labels) or "data set unknown"


def _title(text: str, dataset_label: str) -> dict:
    return {"text": f"{text}<br><sup>data: {dataset_label}</sup>"}


_METRICS = {"test_acc": "test accuracy", "train_acc": "training accuracy", "loss": "training loss",
            "gap": "train − test accuracy"}


def curves_figure(results, metric: str = "test_acc", x: str = "epoch", title: str | None = None):
    """One line per run: ``metric`` ('test_acc', 'train_acc', 'loss') against 'epoch' (epoch
    snapshots) or 'step' (step snapshots; test accuracy exists only per epoch)."""
    import plotly.graph_objects as go

    if metric not in ("test_acc", "train_acc", "loss"):
        raise ValueError(f"metric {metric!r} is not valid; valid: 'test_acc', 'train_acc', 'loss'")
    if x not in ("epoch", "step"):
        raise ValueError(f"x {x!r} is not valid; valid: 'epoch', 'step'")
    runs = _runs(results)
    fig = go.Figure()
    for label, h in runs:
        snaps = h.epochs if (x == "epoch" or metric == "test_acc") else h.steps
        pts = [(getattr(s, x), getattr(s, metric)) for s in snaps if getattr(s, metric) is not None]
        name = label if h.status == "finished" else f"{label} [{h.status}]"
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers", name=name))
    ds = _dataset_label([h for _, h in runs])
    fig.update_layout(title=_title(title or f"{_METRICS[metric]} per {x}", ds), xaxis_title=x,
                      yaxis_title=_METRICS[metric], legend_title_text=ds, template="plotly_white")
    return fig


def bar_figure(results, metrics=("train_acc", "test_acc"), title: str | None = None):
    """Grouped bars of the final ``metrics`` of each run; diverged runs are marked in the name."""
    import plotly.graph_objects as go

    runs = _runs(results)
    bad = [m for m in metrics if m not in _METRICS]
    if bad:
        raise ValueError(f"metrics {bad} not valid; valid: {sorted(_METRICS)}")
    names = [label if h.status == "finished" else f"{label} [{h.status}]" for label, h in runs]
    fig = go.Figure()
    for m in metrics:
        vals = [Run(label, {}, h).row()[m] for label, h in runs]
        fig.add_trace(go.Bar(x=names, y=vals, name=_METRICS[m],
                             text=[None if v is None else f"{v:.3f}" for v in vals], textposition="outside"))
    ds = _dataset_label([h for _, h in runs])
    fig.update_layout(title=_title(title or "final " + " and ".join(_METRICS[m] for m in metrics), ds),
                      barmode="group", legend_title_text=ds, template="plotly_white")
    return fig


def lr_sweep_figure(result: GridResult, metric: str = "test_acc", maxima: dict[str, MaxLR] | None = None,
                    title: str | None = None):
    """Final ``metric`` against lr (log axis), one line per model, on the same axes. Diverged
    runs are drawn as ✕ at their last value (or at 0.1 if they have none); ``maxima`` (from
    :func:`max_lr`) adds a dotted vertical line at each model's maximum lr."""
    import plotly.graph_objects as go

    table = result.table()
    fig = go.Figure()
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    for i, (model, rows) in enumerate(table.groupby("model", sort=False)):
        rows = rows.sort_values("lr")
        color = colors[i % len(colors)]
        ok = rows[~rows["status"].isin(_FAILED)]
        fig.add_trace(go.Scatter(x=ok["lr"], y=ok[metric], mode="lines+markers", name=model,
                                 line={"color": color}))
        bad = rows[rows["status"].isin(_FAILED)]
        if len(bad):
            y = [0.1 if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in bad[metric]]
            fig.add_trace(go.Scatter(x=bad["lr"], y=y, mode="markers", name=f"{model}: diverged",
                                     marker={"symbol": "x", "size": 12, "color": color}))
        if maxima and model in maxima and maxima[model].lr is not None:
            fig.add_vline(x=maxima[model].lr, line_dash="dot", line_color=color,
                          annotation_text=f"max lr {model}: {maxima[model].lr:g}")
    fig.update_layout(title=_title(title or f"final {_METRICS.get(metric, metric)} against learning rate",
                                   result.dataset_label),
                      xaxis_type="log", xaxis_title="learning rate (log scale)",
                      yaxis_title=_METRICS.get(metric, metric), legend_title_text=result.dataset_label,
                      template="plotly_white")
    return fig


def line_figure(df, x: str, y: str, color: str | None = None, title: str = "", dataset_label: str = "",
                log_x: bool = False, log_y: bool = False):
    """A plotly-express line chart of a tidy table, titled with the data set."""
    import plotly.express as px

    if not dataset_label:
        raise ValueError("dataset_label is required: every chart names its data set")
    fig = px.line(df, x=x, y=y, color=color, markers=True, log_x=log_x, log_y=log_y)
    fig.update_layout(title=_title(title, dataset_label), legend_title_text=f"{color or ''} ({dataset_label})",
                      template="plotly_white")
    return fig


def landscape_figure(df, dataset_label: str):
    """Two panels from :func:`landscape_during_training`: the loss range along the gradient and
    the effective β-smoothness, against the training step, one line per model."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if not dataset_label:
        raise ValueError("dataset_label is required: every chart names its data set")
    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss range along the gradient (Lipschitzness)",
                                                        "gradient change / step (β-smoothness)"))
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    for i, (model, rows) in enumerate(df.groupby("model", sort=False)):
        c = colors[i % len(colors)]
        fig.add_trace(go.Scatter(x=rows["step"], y=rows["loss_range"], name=model, line={"color": c}), 1, 1)
        fig.add_trace(go.Scatter(x=rows["step"], y=rows["beta"], name=model, line={"color": c},
                                 showlegend=False), 1, 2)
    fig.update_yaxes(type="log")
    fig.update_xaxes(title_text="training step")
    fig.update_layout(title=_title("Loss landscape along the gradient, with and without BN", dataset_label),
                      legend_title_text=dataset_label, template="plotly_white")
    return fig
