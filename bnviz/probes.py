"""Measurements on a model or a data set, with no training: what chapters 05-07 ask a learner
to trust, each a short function (the chapters write the main ones out in full).

* **During a run** (called by :func:`bnviz.experiments.run_with_probe` at each snapshot, on
  copies: the model is never changed): :func:`weight_norms`, :func:`layer_health` (saturated
  share of each sigmoid layer, update/data ratio lr·std(∇W)/std(W)), :func:`loss_landscape_probe`
  (loss range and β-smoothness along the gradient, Santurkar et al. 2018).
* **Numeric checks** in float64: :func:`bias_check` (the bias before BN cancels),
  :func:`scale_invariance_check` (BN(cW) = BN(W), gradient ∝ 1/c and ⟂ W).
* **Statistics of batches and data**: :func:`batch_stat_noise` (noise of a batch mean against
  1/√B), :func:`dropout_variance_shift`, :func:`border_ink`.
* **Deep networks** for q-residual: :func:`deep_mlp`, :func:`grad_norms_at_init`; and
  :class:`Rescale` (feeds a model unscaled 0..255 pixels).

Conventions: variances are biased (``correction=0``) where they describe a batch, as BN uses
them; "saturated" means a sigmoid output below :data:`bnviz.precise.SATURATED` (0.05) or above
0.95, where its slope is under 19% of its maximum.
"""
from __future__ import annotations

import copy
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .data import Dataset, to_float
from .models import LeNetSpec, build_lenet, norm_layers, preset
from .norms import channel_stats
from .precise import SATURATED
from .stats import layer_state

__all__ = [
    "weight_norms", "weight_norm_growth", "layer_health", "bias_check", "scale_invariance_check",
    "batch_stat_noise", "border_ink", "dropout_variance_shift", "LandscapeProbe", "loss_landscape_probe",
    "Rescale", "Residual", "deep_mlp", "grad_norms_at_init", "saturation_by_layer",
]


# ----------------------------------------------------------------------------- probes during a run


def weight_norms(model: nn.Module) -> dict[str, float]:
    """ℓ2 norm of the weight of each conv/linear layer that feeds a norm layer (LeNet names:
    conv1, conv2, fc1, fc2)."""
    names = set(norm_layers(model))
    return {name: float(m.weight.detach().norm()) for name, m in model.named_modules()
            if name in names and isinstance(m, (nn.Conv2d, nn.Linear))}


def weight_norm_growth(rows: list[dict], layers: Sequence[str] | None = None):
    """From :func:`run_with_probe` rows of :func:`weight_norms` (with the step-0 row): per
    layer, ‖W‖ at step 0, at the end, and the growth factor end / start."""
    import pandas as pd

    if not rows or rows[0]["step"] != 0:
        raise ValueError("the rows must start at step 0 (run_with_probe(..., at_start=True))")
    layers = layers or [k for k in rows[0] if k not in ("step", "epoch", "kind", "loss")]
    first, last = rows[0], rows[-1]
    return pd.DataFrame([{"layer": k, "start": first[k], "end": last[k], "growth ×": last[k] / first[k]}
                         for k in layers])




def _act_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The activation modules after conv/linear layers, by layer name (act_conv1 -> conv1)."""
    return {name[len("act_"):]: m for name, m in model.named_modules()
            if name.startswith("act_") and isinstance(m, (nn.Sigmoid, nn.ReLU, nn.Tanh))}


@torch.no_grad()
def saturation_by_layer(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """{layer: share of its sigmoid outputs below SATURATED or above 1 − SATURATED} when ``model``
    (eval mode; its mode is restored) sees the float images ``x``: one share per sigmoid layer
    (``act_conv1`` -> 'conv1'), not one pooled over all of them (where conv1's many outputs
    outweigh fc1's and fc2's). {} for a model without sigmoids. What
    :func:`bnviz.verdicts.cell_causes` takes as ``saturation`` (the mean over a cell's seeds)."""
    acts = {n: m for n, m in _act_modules(model).items() if isinstance(m, nn.Sigmoid)}
    shares: dict[str, float] = {}
    handles = [m.register_forward_hook(
        lambda mod, inp, out, n=n: shares.__setitem__(n, float(((out < SATURATED) | (out > 1 - SATURATED))
                                                                 .float().mean())))
        for n, m in acts.items()]
    was_training = model.training
    try:
        model.eval()
        model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: shares[n] for n in acts if n in shares}


def layer_health(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, bins: int = 20) -> list[dict]:
    """Karpathy-style diagnostics of each layer on one batch (on a copy, in training mode):

    * ``saturated``: the fraction of the activation's outputs in the flat tails (sigmoid
      below 0.05 or above 0.95; ReLU: exactly 0, "dead");
    * ``hist``: a histogram of the outputs (``bins`` bins on [0, 1] for a sigmoid; counts);
    * ``grad_data``: std(∂loss/∂W) / std(W) of the layer's weight;
    * ``update_data``: lr × std(∂loss/∂W) / std(W), the relative size of one plain-SGD step
      (Karpathy suggests around 1e-3 as a healthy order of magnitude).

    ``x`` float images, ``y`` labels. Returns one dict per layer (input side first)."""
    m = copy.deepcopy(model).train()
    acts = _act_modules(m)
    outs: dict[str, torch.Tensor] = {}
    handles = [mod.register_forward_hook(lambda mod, inp, out, n=n: outs.__setitem__(n, out.detach()))
               for n, mod in acts.items()]
    try:
        m.zero_grad(set_to_none=True)
        F.cross_entropy(m(x), y).backward()
    finally:
        for h in handles:
            h.remove()
    layers = dict(m.named_modules())
    rows = []
    for name, a in outs.items():
        sig = isinstance(acts[name], nn.Sigmoid)
        a = a.float().flatten()
        sat = ((a < SATURATED) | (a > 1 - SATURATED)).float().mean() if sig else (a == 0).float().mean()
        lo, hi = (0.0, 1.0) if sig else (0.0, max(float(a.max()), 1e-6))
        hist = torch.histc(a, bins=bins, min=lo, max=hi)
        w = layers[name].weight
        gd = float(w.grad.std() / w.detach().std()) if w.grad is not None else float("nan")
        rows.append({"layer": name, "activation": "sigmoid" if sig else type(acts[name]).__name__.lower(),
                     "saturated": float(sat), "act_mean": float(a.mean()), "act_std": float(a.std()),
                     "grad_data": gd, "update_data": lr * gd,
                     "hist": (hist / hist.sum()).tolist(), "hist_edges": torch.linspace(lo, hi, bins + 1).tolist()})
    return rows


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
        mean, var = channel_stats(x)  # per channel, biased: the one definition (bnviz.norms)
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




def border_ink(data: Dataset, border: int = 2, n: int = 10000) -> dict:
    """Where the ink is: the share of the total pixel intensity that lies in the outer
    ``border`` pixels of the 28×28 images (the area ``padding=2`` lets conv1 see fully), against
    that border's share of the area. Uses the first ``n`` training images."""
    x = data.train_x[:n].double()
    total = float(x.sum())
    inner = float(x[..., border:-border, border:-border].sum())
    area = 1 - ((28 - 2 * border) / 28) ** 2
    ink = (total - inner) / total if total > 0 else float("nan")
    rows_with_ink = float((x[..., :border, :].amax(dim=(1, 2, 3)) > 64).double().mean())
    return {"border": border, "ink_share": ink, "area_share": area,
            "images_with_ink_in_top_rows": rows_with_ink}


@torch.no_grad()
def dropout_variance_shift(model: nn.Module, x: torch.Tensor, layer: str = "fc2", repeats: int = 4) -> dict:
    """The "variance shift" of dropout before a BN layer (Li et al. 2019): the per-channel
    variance of the input of norm layer ``layer`` with dropout active (as in training) and
    with dropout off (as in prediction), everything else in eval mode, and the layer's
    ``running_var`` (what prediction divides by, learned with dropout on). Works on a copy.

    Returns the channel-mean of var(dropout on), var(dropout off), running_var and the ratios
    ``train_over_eval`` and ``running_over_eval``: a ratio far from 1 means prediction
    normalises with a variance its inputs no longer have."""
    m = copy.deepcopy(model).eval()
    norms = norm_layers(m)
    if layer not in norms:
        raise ValueError(f"layer {layer!r} has no norm in this model; layers with a norm: {sorted(norms)}")
    drops = [mod for mod in m.modules() if isinstance(mod, nn.Dropout)]
    if not drops:
        raise ValueError("the model has no dropout layer: there is no variance shift to measure")
    seen = []
    hook = norms[layer].register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].detach().double()))
    try:
        m(x)
        _, var_eval = channel_stats(seen.pop())
        for d in drops:
            d.train()
        vs = []
        for _ in range(repeats):
            m(x)
            vs.append(channel_stats(seen.pop())[1])
        var_train = torch.stack(vs).mean(0)
    finally:
        hook.remove()
    rv = layer_state(norms[layer])["running_var"]
    out = {"layer": layer, "var_dropout_on": float(var_train.mean()), "var_dropout_off": float(var_eval.mean()),
           "train_over_eval": float((var_train / var_eval.clamp_min(1e-12)).mean())}
    if rv is not None:
        rv = rv.double().to(var_eval.device)
        out["running_var"] = float(rv.mean())
        out["running_over_eval"] = float((rv / var_eval.clamp_min(1e-12)).mean())
    return out


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


# ----------------------------------------------------------------------------- deep networks


class Rescale(nn.Module):
    """Multiply the input by a constant: ``Rescale(255)`` in front of a model undoes the
    ``/255`` scaling, i.e. feeds it unscaled pixels (a common bug, q-gpu-not-learning)."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = float(factor)

    def forward(self, x):
        return x * self.factor


class Residual(nn.Module):
    """``x + block(x)``: an identity path around ``block`` (a ResNet-style skip connection)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return x + self.block(x)


def deep_mlp(depth: int = 16, width: int = 64, bn: bool = False, activation: str = "sigmoid",
             residual: bool = False, seed: int | None = None) -> nn.Sequential:
    """A deep fully connected network on 28×28 images: ``depth`` hidden layers ``fc1..fcN`` of
    ``width`` units, each Linear → [BatchNorm1d] → activation, then a 10-way output. With
    ``residual`` every hidden layer after the first is a pre-activation residual block
    (He et al. 2016): ``x + Linear(act([BN](x)))`` (modules ``fcI.block.N``), so the sum of the
    blocks' outputs, not of the sigmoids' positive outputs, builds up along the depth. PyTorch's default initialisation, drawn from the
    global RNG (``seed`` reseeds it first; None keeps the current state, so a trainer's seed
    decides)."""
    if depth < 1 or width < 2:
        raise ValueError(f"depth must be >= 1 and width >= 2, got depth={depth}, width={width}")
    acts = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}
    if activation not in acts:
        raise ValueError(f"activation {activation!r} is not valid; valid: {sorted(acts)}")
    if seed is not None:
        torch.manual_seed(seed)
    layers, fan_in = [("flatten", nn.Flatten())], 28 * 28
    for i in range(1, depth + 1):
        if residual and i > 1:  # pre-activation (He et al. 2016): x + W·act(BN(x))
            block = ([nn.BatchNorm1d(width)] if bn else []) + [acts[activation](), nn.Linear(fan_in, width)]
            layers.append((f"fc{i}", Residual(nn.Sequential(*block))))
        else:
            layers.append((f"fc{i}", nn.Linear(fan_in, width)))
            if bn:
                layers.append((f"norm_fc{i}", nn.BatchNorm1d(width)))
            layers.append((f"act_fc{i}", acts[activation]()))
        fan_in = width
    layers.append(("out", nn.Linear(fan_in, 10)))
    return nn.Sequential(OrderedDict(layers))


def grad_norms_at_init(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """‖∂loss/∂W‖ of each Linear/Conv weight for one batch, in training mode (input side first).
    In a deep plain sigmoid network the early layers' gradients are orders of magnitude smaller."""
    m = copy.deepcopy(model).train()
    m.zero_grad(set_to_none=True)
    F.cross_entropy(m(x), y).backward()
    return {re.sub(r"\.block\.\d+$", "", n): float(mod.weight.grad.norm()) for n, mod in m.named_modules()
            if isinstance(mod, (nn.Linear, nn.Conv2d))}
