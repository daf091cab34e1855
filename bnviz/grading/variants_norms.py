"""Variants of assignment 2 ("Normalization in depth"): one set of LayerNorm / GroupNorm conventions
per class, derived from a secret, as ``variants.py`` does for assignment 1.

Every convention here is one a real library or paper uses, so the standard formula stays honest;
what changes is *which* values a statistic is taken over and how the result is laid out. They
apply to questions 4 (LayerNorm) and 5 (GroupNorm); ``NormsVariant()`` is PyTorch's:

* ``layout``: 4-D inputs are ``"channels_first"``, ``(N, C, H, W)`` (PyTorch), or
  ``"channels_last"``, ``(N, H, W, C)`` (TensorFlow, JAX, ``torch.channels_last`` code);
* ``ln_axes``: LayerNorm of a 4-D input normalises each example over ``"all"`` its values, with
  ``gamma``/``beta`` of shape ``x.shape[1:]`` (``F.layer_norm(x, x.shape[1:])``), or over the
  ``"channel"`` axis only, separately at every position, with ``gamma``/``beta`` of shape ``(C,)``
  (ConvNeXt's LayerNorm, ``nn.LayerNorm(C)`` on channels-last tensors: each pixel is a token).
  For ``(N, D)`` inputs both are the same: each row over its D features;
* ``groups``: GroupNorm's G groups of C / G channels are ``"contiguous"`` (channels
  ``0 .. C/G - 1`` form group 0, PyTorch) or ``"strided"`` (channel c belongs to group ``c % G``,
  the grouping of ``channel shuffle`` layouts);
* ``eps``: ``"inside"`` the square root, ``(x - mean) / sqrt(var + eps)``, or ``"outside"``,
  ``(x - mean) / (sqrt(var) + eps)`` (as in assignment 1's variants).

Statistics are always the mean and the biased variance; ``gamma``/``beta`` are always applied after
normalising. ``derive(secret)`` is ``variants.pick`` with this assignment's own label
(``DERIVATION_LABEL``) over ``candidates()``: every variant that differs from PyTorch's in at least
two conventions (11 of the 16), so a derived variant never equals the default.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import ClassVar

import torch

from . import variants

DERIVATION_LABEL = b"bnviz/norms/variant/v1"
CHOICES: dict[str, tuple] = {
    "layout": ("channels_first", "channels_last"),
    "ln_axes": ("all", "channel"),
    "groups": ("contiguous", "strided"),
    "eps": variants.CHOICES["eps"],
}
MIN_CHANGES = 2
VARIANT_META = "bnviz_norms_variant"  # the built student notebook's metadata key (assignment 1 uses variants.VARIANT_META)


@dataclasses.dataclass(frozen=True)
class NormsVariant(variants.Conventions):
    """One set of conventions (module docstring); ``NormsVariant()`` is PyTorch's."""

    CHOICES: ClassVar[dict[str, tuple]] = CHOICES
    KIND: ClassVar[str] = "a norms variant"

    layout: str = "channels_first"
    ln_axes: str = "all"
    groups: str = "contiguous"
    eps: str = "inside"

    def __post_init__(self):
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed or not isinstance(getattr(self, name), str):
                raise ValueError(f"norms variant {name}={getattr(self, name)!r} is not one of {list(allowed)}")

    def to_layout(self, t: torch.Tensor) -> torch.Tensor:
        """A 4-D tensor drawn as (N, C, H, W), in this variant's layout (2-D tensors unchanged)."""
        return t.movedim(1, -1).contiguous() if t.dim() == 4 and self.layout == "channels_last" else t

    def layout_shape(self, shape) -> tuple:
        shape = tuple(shape)
        return (shape[0], *shape[2:], shape[1]) if len(shape) == 4 and self.layout == "channels_last" else shape

    def ln_param_shape(self, shape) -> tuple:
        """gamma / beta's shape for LayerNorm of an input of ``shape`` (given as (N, C, H, W))."""
        if len(shape) == 4 and self.ln_axes == "channel":
            return (shape[1],)
        return self.layout_shape(shape)[1:]


def candidates() -> list[NormsVariant]:
    out = [NormsVariant(*values) for values in itertools.product(*CHOICES.values())]
    return [v for v in out if v.changes() >= MIN_CHANGES]


def derive(secret: str) -> NormsVariant:
    """The class's variant of this assignment: deterministic in ``secret`` (``variants.pick``)."""
    return variants.pick(secret, DERIVATION_LABEL, candidates())


def variant_of(student_nb: dict | None) -> NormsVariant:
    """The variant recorded in a built student notebook (PyTorch's if none)."""
    return NormsVariant.from_dict(((student_nb or {}).get("metadata") or {}).get(VARIANT_META))


# --------------------------------------------------------------------------- references
# Written with ``torch.`` names only, explicit formulas, differentiable (autograd gives the
# backward references); ``v`` only needs the four attributes, so a SimpleNamespace will do.


def normalise(v, x, dims, eps):
    """(x - mean) / std over ``dims`` (biased variance), eps inside or outside the square root."""
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    std = torch.sqrt(var + eps) if v.eps == "inside" else torch.sqrt(var) + eps
    return (x - mean) / std


def layer_norm_reference(v, x, gamma, beta, eps=1e-5):
    """LayerNorm of an (N, D) input, or a 4-D one in ``v.layout``, with ``v``'s conventions."""
    channel = 1 if v.layout == "channels_first" else x.dim() - 1
    if x.dim() == 4 and v.ln_axes == "channel":
        shape = [1] * x.dim()
        shape[channel] = -1
        x_hat = normalise(v, x, (channel,), eps)
        return gamma.reshape(shape) * x_hat + beta.reshape(shape)
    return gamma * normalise(v, x, tuple(range(1, x.dim())), eps) + beta


def group_order(v, C, G):
    """Channel indices ordered group by group: group g is ``order[g * C/G : (g + 1) * C/G]``."""
    if v.groups == "contiguous":
        return torch.arange(C)
    return torch.arange(C).reshape(C // G, G).t().reshape(-1)  # group g: channels g, g + G, g + 2G, ...


def group_norm_reference(v, x, gamma, beta, G, eps=1e-5):
    """GroupNorm of a 4-D input in ``v.layout`` with ``v``'s grouping and eps; gamma, beta (C,)."""
    xf = x.movedim(-1, 1) if v.layout == "channels_last" else x  # (N, C, H, W)
    N, C = xf.shape[:2]
    if G < 1 or C % G:
        raise ValueError(f"the number of channels C={C} must be divisible by the number of groups G={G}")
    order = group_order(v, C, G)
    grouped = xf[:, order].reshape(N, G, -1)
    x_hat = normalise(v, grouped, (2,), eps).reshape(xf.shape)[:, torch.argsort(order)]
    shape = [1, C] + [1] * (xf.dim() - 2)
    y = gamma.reshape(shape) * x_hat + beta.reshape(shape)
    return y.movedim(1, -1) if v.layout == "channels_last" else y


# --------------------------------------------------------------------------- text


def describe(v: NormsVariant) -> list[str]:
    """The conventions as short lines (build's summary, the README, the question text)."""
    four = "(N, C, H, W)" if v.layout == "channels_first" else "(N, H, W, C)"
    ln = ("each example over all its values, gamma/beta of shape x.shape[1:]" if v.ln_axes == "all" else
          "each example at each position over its C channels only, gamma/beta of shape (C,)")
    gn = ("groups of consecutive channels (channel c in group c // (C / G))" if v.groups == "contiguous" else
          "strided groups (channel c in group c % G)")
    eps = "inside the square root" if v.eps == "inside" else "added to the standard deviation, outside the square root"
    return [f"4-D layout {four}", f"LayerNorm of a 4-D input: {ln}", f"GroupNorm: {gn}", f"eps {eps}"]


# --------------------------------------------------------------------------- the answer key

_LN_KEY = '''def layer_norm_forward(x, gamma, beta, eps=1e-5):
    """LayerNorm of x, shape (N, D) or {four}:
    {ln_doc} Returns (y, cache)."""
    # BEGIN SOLUTION
    dims = {dims}
    mu = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, keepdim=True, correction=0)
{std}
    x_hat = (x - mu) * inv_std
    shape = {shape}  # gamma, beta reshaped to broadcast against x
    return gamma.reshape(shape) * x_hat + beta.reshape(shape), (x_hat, inv_std, gamma, dims, shape, k)
    # END SOLUTION


def layer_norm_backward(dy, cache):
    """Gradients of L = sum(dy * y) w.r.t. x, gamma, beta for layer_norm_forward's cache."""
    # BEGIN SOLUTION
    x_hat, inv_std, gamma, dims, shape, k = cache
    M = x_hat.numel() // inv_std.numel()  # values per normalised group
    rest = [d for d in range(dy.dim()) if d not in dims]  # gamma and beta are shared along these axes
    g = dy * gamma.reshape(shape)  # dL/dx_hat
    dx = inv_std / M * (M * g - g.sum(dim=dims, keepdim=True) - k * x_hat * (g * x_hat).sum(dim=dims, keepdim=True))
    return dx, (dy * x_hat).sum(dim=rest), dy.sum(dim=rest)
    # END SOLUTION
'''

_GN_KEY = '''def group_norm_forward(x, gamma, beta, G, eps=1e-5):
    """GroupNorm of x {four}: {gn_doc}; each (example, group) normalised over its channels and
    positions; gamma, beta (C,). Raises ValueError naming C and G when C is not divisible by G.
    Returns (y, cache)."""
    # BEGIN SOLUTION
    xf = {to_first}  # (N, C, H, W)
    N, C = xf.shape[:2]
    if G < 1 or C % G != 0:
        raise ValueError(f"the number of channels C={{C}} must be divisible by the number of groups G={{G}}")
    order = {order}  # the channels, group by group
    xg = xf[:, order].reshape(N, G, -1)
    mu = xg.mean(dim=2, keepdim=True)
    var = xg.var(dim=2, keepdim=True, correction=0)
{std}
    x_hat = ((xg - mu) * inv_std).reshape(xf.shape)[:, torch.argsort(order)]
    shape = [1, C] + [1] * (xf.dim() - 2)
    y = gamma.reshape(shape) * x_hat + beta.reshape(shape)
    return {y_back}, (x_hat, inv_std, gamma, G, order, k)
    # END SOLUTION


def group_norm_backward(dy, cache):
    """Gradients of L = sum(dy * y) w.r.t. x, gamma, beta for group_norm_forward's cache."""
    # BEGIN SOLUTION
    x_hat, inv_std, gamma, G, order, k = cache
    dyf = {dy_first}  # (N, C, H, W)
    N, C = dyf.shape[:2]
    axes = [0] + list(range(2, dyf.dim()))
    dbeta, dgamma = dyf.sum(dim=axes), (dyf * x_hat).sum(dim=axes)
    g = (dyf * gamma.reshape([1, C] + [1] * (dyf.dim() - 2)))[:, order].reshape(N, G, -1)
    xh = x_hat[:, order].reshape(N, G, -1)
    M = xh.shape[2]
    dx = inv_std / M * (M * g - g.sum(dim=2, keepdim=True) - k * xh * (g * xh).sum(dim=2, keepdim=True))
    dx = dx.reshape(dyf.shape)[:, torch.argsort(order)]
    return {dx_back}, dgamma, dbeta
    # END SOLUTION
'''


def _std_lines(v) -> str:
    if v.eps == "inside":
        return "    inv_std = 1.0 / torch.sqrt(var + eps)\n    k = 1.0  # (see the eps-outside variant)"
    return ("    std = torch.sqrt(var)\n    inv_std = 1.0 / (std + eps)  # eps added to the standard deviation\n"
            "    k = (std + eps) / std  # d(std + eps)/d(var) = 1 / (2 std): the x_hat term of dx grows by this")


def answer_key(v: NormsVariant) -> tuple[str, str]:
    """The answer cells of questions 4 and 5 for variant ``v`` (the solution notebook's code cells,
    with otter's ``# BEGIN SOLUTION`` markers)."""
    last = v.layout == "channels_last"
    four = "(N, H, W, C)" if last else "(N, C, H, W)"
    channel = "(x.dim() - 1,)" if last else "(1,)"
    ln_all = v.ln_axes == "all"
    ln = _LN_KEY.format(
        four=four, std=_std_lines(v),
        ln_doc=("each example normalised over every axis but 0, then y = gamma * x_hat + beta\n    with gamma, "
                "beta of shape x.shape[1:]." if ln_all else "each example normalised over the channel axis only, "
                "at each position, then\n    y = gamma * x_hat + beta with gamma, beta of shape (C,)."),
        dims="tuple(range(1, x.dim()))" if ln_all else channel,
        shape="list(gamma.shape)" if ln_all or last else "[1, -1] + [1] * (x.dim() - 2)")
    gn = _GN_KEY.format(
        four=four, std=_std_lines(v),
        gn_doc=("the C channels are split into G groups of C // G consecutive\n    channels" if v.groups == "contiguous"
                else "the C channels are split into G groups, channel c in group\n    c % G"),
        to_first="x.movedim(-1, 1)" if last else "x", dy_first="dy.movedim(-1, 1)" if last else "dy",
        y_back="y.movedim(1, -1)" if last else "y", dx_back="dx.movedim(1, -1)" if last else "dx",
        order="torch.arange(C)" if v.groups == "contiguous" else "torch.arange(C).reshape(C // G, G).t().reshape(-1)")
    return ln, gn
