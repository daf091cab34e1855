"""Variants of the assignment: one set of batch-norm conventions per class, derived from a secret.

The solution notebook and every hidden case in ``checker.py`` are public, so a class gets its own
conventions: ``python -m bnviz.grading build --variant SECRET`` (``make assignment VARIANT=...``)
derives them from the instructor's secret, writes them into the student notebook's question text,
the notebook's tests, the answer key and ``assignment.json`` (the conventions, never the secret),
and ``grade`` checks against them. The public (PyTorch-convention) solution then fails tests.

The conventions (``Variant``; the default is PyTorch's, used when no secret is given):

* ``running_var``: the variance stored in ``running_var``: ``"unbiased"`` (divide by m - 1,
  PyTorch) or ``"biased"`` (divide by m, as used to normalise);
* ``momentum_rule``: ``"new"``: ``running = (1 - momentum) * running + momentum * batch``
  (PyTorch: momentum weighs the new batch) or ``"old"``: ``running = momentum * running +
  (1 - momentum) * batch`` (d2l, Keras: momentum weighs the old average);
* ``eps``: ``"inside"`` the square root, ``(x - mean) / sqrt(var + eps)`` (PyTorch), or
  ``"outside"``, added to the standard deviation, ``(x - mean) / (sqrt(var) + eps)``;
* ``channel_axis``: ``1``: ``(N, C)`` / ``(N, C, H, W)`` (PyTorch); ``-1``: channels last,
  ``(N, C)`` / ``(N, H, W, C)``; ``0``: features first, ``(C, N)`` / ``(C, N, H, W)``;
* ``momentum``: the default value of the ``momentum`` argument, in the variant's own rule:
  0.1, 0.05 or 0.2 for ``"new"``; 0.9, 0.95 or 0.8 for ``"old"``.

``derive(secret)`` is HMAC-SHA256(key=secret, message=``DERIVATION_LABEL``) reduced modulo the
number of candidate variants: every variant that differs from PyTorch in at least two of the
first four conventions (54 of them), so a derived variant never equals the default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import itertools
from typing import Any, ClassVar

import torch

DERIVATION_LABEL = b"bnviz/batch_norm/variant/v1"
CHOICES: dict[str, tuple] = {
    "running_var": ("unbiased", "biased"),
    "momentum_rule": ("new", "old"),
    "eps": ("inside", "outside"),
    "channel_axis": (1, -1, 0),
}
MOMENTA = {"new": (0.1, 0.05, 0.2), "old": (0.9, 0.95, 0.8)}
MIN_CHANGES = 2  # a derived variant differs from PyTorch's conventions in at least this many


class Conventions:
    """What a frozen dataclass of conventions shares (:class:`Variant` here, the norms assignment's
    ``NormsVariant``): ``cls()`` is PyTorch's conventions; ``CHOICES`` names the conventions counted
    by :meth:`changes`; ``KIND`` names the dataclass in errors."""

    CHOICES: ClassVar[dict[str, tuple]] = {}
    KIND: ClassVar[str] = "variant"

    @property
    def is_default(self) -> bool:
        return self == type(self)()

    def changes(self) -> int:
        """How many of the conventions in ``CHOICES`` differ from PyTorch's."""
        default = type(self)()
        return sum(getattr(self, k) != getattr(default, k) for k in self.CHOICES)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any):
        """From ``assignment.json`` or a built notebook's metadata (None or missing: PyTorch's conventions)."""
        if data is None:
            return cls()
        keys = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(data, dict) or set(data) - set(keys):
            raise ValueError(f"{cls.KIND} must be a dict with keys among {keys}, got {str(data)[:120]}")
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class Variant(Conventions):
    """One set of conventions (see the module docstring); ``Variant()`` is PyTorch's."""

    CHOICES: ClassVar[dict[str, tuple]] = CHOICES

    running_var: str = "unbiased"
    momentum_rule: str = "new"
    eps: str = "inside"
    channel_axis: int = 1
    momentum: float = 0.1

    def __post_init__(self):
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value not in allowed or type(value) is not type(allowed[0]):
                raise ValueError(f"variant {name}={value!r} is not one of {list(allowed)}")
        if self.momentum not in MOMENTA[self.momentum_rule] or isinstance(self.momentum, bool):
            raise ValueError(f"variant momentum={self.momentum!r} is not one of {list(MOMENTA[self.momentum_rule])} "
                             f"(the defaults allowed with momentum_rule={self.momentum_rule!r})")

    def to_layout(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor drawn in PyTorch's layout (channels on axis 1) moved to this variant's layout."""
        return t.movedim(1, self.channel_axis).contiguous() if self.channel_axis != 1 else t

    def layout_shape(self, shape) -> tuple:
        """A shape given in PyTorch's layout, in this variant's."""
        return tuple(torch.empty(tuple(shape), device="meta").movedim(1, self.channel_axis).shape)


VARIANT_META = "bnviz_variant"  # the key of the built student notebook's metadata that holds the conventions


def variant_of(student_nb: dict | None) -> Variant:
    """The variant recorded in a built student notebook (``build`` writes it; PyTorch's if none)."""
    return Variant.from_dict(((student_nb or {}).get("metadata") or {}).get(VARIANT_META))


def candidates() -> list[Variant]:
    """Every variant ``derive`` can return, in a fixed order."""
    out = []
    for rv, rule, eps, axis in itertools.product(*CHOICES.values()):
        for momentum in MOMENTA[rule]:
            v = Variant(rv, rule, eps, axis, momentum)
            if v.changes() >= MIN_CHANGES:
                out.append(v)
    return out


def pick(secret: str, label: bytes, options: list):
    """``options[HMAC-SHA256(key=secret, message=label) mod len(options)]``: deterministic in
    ``secret``, which cannot be recovered from the choice (each assignment has its own ``label``)."""
    if not isinstance(secret, str):
        raise TypeError(f"the variant secret must be a string, got {type(secret).__name__}")
    if not secret.strip():
        raise ValueError("the variant secret is empty: pass a non-empty string (keep it private; "
                         "it is not stored anywhere), or no --variant for PyTorch's conventions")
    digest = hmac.new(secret.encode("utf-8"), label, hashlib.sha256).digest()
    return options[int.from_bytes(digest, "big") % len(options)]


def derive(secret: str) -> Variant:
    """The variant of a class: deterministic in ``secret``, which cannot be recovered from it."""
    return pick(secret, DERIVATION_LABEL, candidates())


# --------------------------------------------------------------------------- references
# Written with ``torch.`` names only: build.py copies this source into the notebook's tests.


def batch_norm_reference(v, x, running_mean, running_var, weight, bias, training=False, momentum=0.1, eps=1e-5):
    """``F.batch_norm`` with the conventions of variant ``v`` (explicit formulas; differentiable).

    Updates ``running_mean`` / ``running_var`` in place in training mode (when they are given)."""
    axis = v.channel_axis % x.dim()
    dims = [d for d in range(x.dim()) if d != axis]
    shape = [1] * x.dim()
    shape[axis] = -1
    if training:
        m = x.numel() // x.shape[axis]  # values per channel
        mean = x.mean(dim=dims)
        var = ((x - mean.reshape(shape)) ** 2).mean(dim=dims)  # biased: used to normalise
        if running_mean is not None:
            stored = var * m / (m - 1) if v.running_var == "unbiased" else var
            new = momentum if v.momentum_rule == "new" else 1 - momentum  # weight of the batch
            with torch.no_grad():
                running_mean.copy_((1 - new) * running_mean + new * mean.detach())
                running_var.copy_((1 - new) * running_var + new * stored.detach())
    else:
        mean, var = running_mean, running_var
    std = torch.sqrt(var + eps) if v.eps == "inside" else torch.sqrt(var) + eps
    x_hat = (x - mean.reshape(shape)) / std.reshape(shape)
    return weight.reshape(shape) * x_hat + bias.reshape(shape)


def reference_cache(v, x, gamma, eps=1e-5):
    """The ``cache`` of a training-mode forward pass in the layout question 1 specifies (question 2's
    tests hand it to ``batch_norm_backward``, so a forward bug costs question 1 only):
    ``(x_hat, inv_std, gamma, dims, shape)``, plus ``std`` (the square root of the biased variance)
    last when ``eps`` is added to the standard deviation. ``x_hat = (x - mean) * inv_std`` (shape of
    x); ``inv_std`` (C,) is one over the denominator; ``dims`` lists the axes the statistics are
    reduced over; ``shape`` reshapes a (C,) vector to broadcast against x."""
    axis = v.channel_axis % x.dim()
    dims = [d for d in range(x.dim()) if d != axis]
    shape = [1] * x.dim()
    shape[axis] = -1
    mean = x.mean(dim=dims)
    var = ((x - mean.reshape(shape)) ** 2).mean(dim=dims)  # biased
    std = torch.sqrt(var)
    inv_std = torch.rsqrt(var + eps) if v.eps == "inside" else 1.0 / (std + eps)
    x_hat = (x - mean.reshape(shape)) * inv_std.reshape(shape)
    # (no line here may read like the answer key's: build.variant_notebook rewrites those in every cell)
    tup = (x_hat, inv_std, gamma, dims, shape)
    return tup if v.eps == "inside" else tup + (std,)


class ReferenceBatchNorm(torch.nn.Module):
    """``nn.BatchNorm2d``'s parameters, buffers and state_dict, with variant ``v``'s conventions."""

    def __init__(self, num_features, v, eps=1e-5, momentum=None):
        super().__init__()
        self.v, self.eps = v, eps
        self.momentum = v.momentum if momentum is None else momentum
        self.weight = torch.nn.Parameter(torch.ones(num_features))
        self.bias = torch.nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x):
        if self.training:
            self.num_batches_tracked.add_(1)
        return batch_norm_reference(self.v, x, self.running_mean, self.running_var, self.weight, self.bias,
                                    self.training, self.momentum, self.eps)


# --------------------------------------------------------------------------- text


def layout_text(v: Variant) -> tuple[str, str]:
    """(2-D layout, 4-D layout) as the notebook writes them."""
    return {1: ("(N, C)", "(N, C, H, W)"), -1: ("(N, C)", "(N, H, W, C)"), 0: ("(C, N)", "(C, N, H, W)")}[v.channel_axis]


def describe(v: Variant) -> list[str]:
    """The conventions as short lines (for the build's summary and the README)."""
    two, four = layout_text(v)
    return [f"layout {two} / {four} (channel axis {v.channel_axis})",
            f"eps {'inside the square root' if v.eps == 'inside' else 'added to the standard deviation'}",
            f"running_var stores the {v.running_var} batch variance",
            f"momentum weighs the {'new batch' if v.momentum_rule == 'new' else 'old running average'}, default {v.momentum:g}"]


def update_text(v: Variant) -> str:
    return ("running = (1 - momentum) * running + momentum * batch_statistic" if v.momentum_rule == "new"
            else "running = momentum * running + (1 - momentum) * batch_statistic")


def conventions_markdown(v: Variant) -> str:
    """The conventions block of question 1 (between the CONVENTIONS markers of the notebook)."""
    two, four = layout_text(v)
    axis = {1: "axis 1", -1: "the **last** axis", 0: "axis **0**"}[v.channel_axis]
    whose = "PyTorch's, as in `torch.nn.BatchNorm1d` / `torch.nn.BatchNorm2d`" if v.is_default else \
        "this class's variant: they differ from PyTorch's, so `F.batch_norm` will not match"
    norm = (r"$\hat x = (x - \mu) / \sqrt{\sigma^2 + \epsilon}$ (`eps` **inside** the square root)" if v.eps == "inside"
            else r"$\hat x = (x - \mu) / (\sqrt{\sigma^2} + \epsilon)$ (`eps` is added to the standard "
                 r"deviation, **outside** the square root)")
    weight = "the weight of the **new** batch, as in PyTorch" if v.momentum_rule == "new" else \
        "the weight of the **old** running average, as in d2l and Keras"
    stored = "**unbiased** batch variance (divide by $m - 1$)" if v.running_var == "unbiased" else \
        "**biased** batch variance (divide by $m$, the same variance that normalises)"
    return "\n".join([
        f"**Conventions** ({whose}):",
        "",
        f"* **Layout:** `x` has shape `{two}` (after a fully connected layer) or `{four}` (after a",
        f"  convolution): the channel axis is {axis}. The statistics are computed **per channel**, over",
        "  every other axis. `gamma`, `beta`, `running_mean`, `running_var` have shape `(C,)`.",
        f"* **Normalisation:** {norm}, where $\\sigma^2$ is the **biased** batch variance (divide by",
        "  $m$, the number of values per channel); $y = \\gamma \\hat x + \\beta$.",
        f"* **Running statistics:** `{update_text(v)}`, so `momentum` is {weight};",
        f"  `running_var` stores the {stored}.",
        f"* **Default momentum:** `{v.momentum:g}`.",
        *cache_markdown(v),
    ])


def cache_markdown(v: Variant) -> list[str]:
    """The cache's layout (``reference_cache``), as lines of question 1's conventions block."""
    axis = v.channel_axis
    dims = {1: "[0, 2, 3]", -1: "[0, 1, 2]", 0: "[1, 2, 3]"}[axis]
    shape = {1: "[1, -1, 1, 1]", -1: "[1, 1, 1, -1]", 0: "[-1, 1, 1, 1]"}[axis]
    inside = v.eps == "inside"
    names = "(x_hat, inv_std, gamma, dims, shape)" if inside else "(x_hat, inv_std, gamma, dims, shape, std)"
    inv = r"$1/\sqrt{\sigma^2 + \epsilon}$" if inside else r"$1/(\sqrt{\sigma^2} + \epsilon)$"
    return [
        f"* **Cache:** in training mode `cache` is the tuple `{names}`: `x_hat` is $\\hat x$ (the shape of",
        f"  `x`), `inv_std` the `(C,)` vector {inv}, `gamma` the `gamma` you were given,",
        f"  `dims` the list of axes the statistics are reduced over (`{dims}` for a 4-D input) and `shape`",
        f"  a list that reshapes a `(C,)` vector to broadcast against `x` (`{shape}` for a 4-D input)"
        + (";" if inside else r"; `std` is the `(C,)` vector $\sqrt{\sigma^2}$;"),
        "  question 2's tests hand your `batch_norm_backward` a cache built this way by a reference",
        "  forward pass, so a bug in your forward pass costs points in question 1 only.",
    ]


def message_replacements(v: Variant) -> list[tuple[str, str]]:
    """Failure messages of the tests (notebook and checker) that name a convention."""
    if v.is_default:
        return []
    out = [("(it must store the UNBIASED batch variance)",
            f"(it must store the {v.running_var.upper()} batch variance)"),
           ("(running = (1 - momentum) * running + momentum * batch)", f"({update_text(v).replace('_statistic', '')})"),
           ("eps belongs inside the square root", "eps belongs inside the square root" if v.eps == "inside"
            else "eps is added to the standard deviation, outside the square root"),
           ("the default momentum must be 0.1", f"the default momentum must be {v.momentum:g}"),
           ("(momentum=0.1)", f"(momentum={v.momentum:g})"),
           ("(normalise per channel over N, H, W)", f"(normalise per channel over every axis but {v.channel_axis})")]
    if v.channel_axis == 0:
        out.append(("for an (N, C) input", "for a (C, N) input"))
    for who in ("F.batch_norm", "nn.BatchNorm2d's", "nn.BatchNorm", "PyTorch's"):
        out.append((f"differs from {who}", "differs from the reference (this class's conventions)"))
        out.append((f"differ from {who}", "differ from the reference (this class's conventions)"))
    return out


def apply_messages(v: Variant, text: str) -> str:
    for old, new in message_replacements(v):
        text = text.replace(old, new)
    return text
