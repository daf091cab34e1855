"""One LeNet builder with the options the course compares, and the d2l presets.

Layout (d2l's LeNet-5 for 1×28×28 Fashion-MNIST images)::

    conv1: Conv2d(1, 6, 5, padding=p)  [norm] act  pool(2, 2)
    conv2: Conv2d(6, 16, 5)            [norm] act  pool(2, 2)
    flatten
    fc1:   Linear(16*5*5, 120)          [norm] act  [dropout]
    fc2:   Linear(120, 84)              [norm] act  [dropout]
    out:   Linear(84, 10)

The four normalisable layers are named ``conv1``, ``conv2``, ``fc1``, ``fc2``. With
``padding=0`` the flattened size is 16×4×4 = 256 (d2l's LeNet-BN); with ``padding=2`` it is
16×5×5 = 400 (d2l's plain LeNet). ``pool='none'`` drops both pooling layers (a learner's
question, q-smaller-net); ``hidden`` sets the fully connected widths (``(84,)`` drops fc1).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from .norms import BatchNorm, D2LBatchNorm, GhostBatchNorm, LiteBatchNorm

__all__ = ["LeNetSpec", "PRESETS", "NORM_KINDS", "INITS", "build_lenet", "init_weights", "norm_layers", "preset",
           "configure_norms"]

NORM_KINDS = ("none", "scratch", "torch", "layer", "group", "instance",
              "lite-center", "lite-scale", "d2l", "ghost")
NORM_LAYER_NAMES = ("conv1", "conv2", "fc1", "fc2")
BN_KINDS = ("scratch", "torch", "lite-center", "lite-scale", "d2l", "ghost")
# Weight initialisation schemes for init_weights: d2l's train_ch6 (xavier) or PyTorch's default.
INITS = ("d2l", "pytorch")


@dataclass(frozen=True)
class LeNetSpec:
    """What LeNet to build. Every field is a plain value, so a spec can be saved as JSON.

    norm: one of NORM_KINDS. 'scratch' = :class:`bnviz.norms.BatchNorm`, 'torch' =
        ``nn.BatchNorm1d/2d``, 'layer' = LayerNorm over (C, H, W) / features, 'group' =
        GroupNorm (``groups`` groups; fully connected layers use groups of the features),
        'instance' = InstanceNorm2d with affine (fc layers: LayerNorm), 'lite-*' = BN that only
        centres or only scales, 'd2l' = the d2l book's scratch layer, 'ghost' = ghost BN
        (:class:`bnviz.norms.GhostBatchNorm`, Hoffer et al. 2017: each ``ghost_batch``
        consecutive examples of a training batch are normalised with their own statistics).
    norm_layers: which of conv1, conv2, fc1, fc2 get the norm.
    norm_position: 'before' the activation (d2l, Ioffe & Szegedy) or 'after' it.
    bias: keep the bias of each conv/linear layer that has a norm (False removes it; with
        the norm *before* the activation BN's mean subtraction cancels that bias exactly, with
        the norm *after* the activation it does not: chapter 05, q-bias, shows both). Layers
        without a norm always keep their bias.
    ghost_batch: examples per ghost (virtual) batch of ``norm='ghost'``: an int >= 2 (a batch
        of at most that many examples is normalised exactly as BN). Ignored by other norms.
    """

    norm: str = "torch"
    pool: str = "avg"
    activation: str = "sigmoid"
    padding: int = 0
    bias: bool = True
    dropout: float = 0.0
    norm_position: str = "before"
    norm_layers: tuple[str, ...] = NORM_LAYER_NAMES
    hidden: tuple[int, ...] = (120, 84)
    groups: int = 2
    affine: bool = True
    ghost_batch: int = 32

    def __post_init__(self):
        def bad(field, value, valid):
            raise ValueError(f"LeNetSpec.{field}={value!r} is not valid; valid: {valid}")

        if self.norm not in NORM_KINDS:
            bad("norm", self.norm, NORM_KINDS)
        if self.pool not in ("avg", "max", "none"):
            bad("pool", self.pool, "'avg', 'max', 'none'")
        if self.activation not in ("sigmoid", "relu"):
            bad("activation", self.activation, "'sigmoid', 'relu'")
        if self.padding not in (0, 2):
            bad("padding", self.padding, "0 (d2l LeNet-BN) or 2 (d2l plain LeNet)")
        if not 0.0 <= self.dropout < 1.0:
            bad("dropout", self.dropout, "a probability in [0, 1)")
        if self.norm_position not in ("before", "after"):
            bad("norm_position", self.norm_position, "'before' or 'after' (the activation)")
        object.__setattr__(self, "norm_layers", tuple(self.norm_layers))
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        unknown = set(self.norm_layers) - set(NORM_LAYER_NAMES)
        if unknown:
            bad("norm_layers", self.norm_layers, f"a subset of {NORM_LAYER_NAMES}")
        if len(self.hidden) not in (1, 2) or min(self.hidden) < 1:
            bad("hidden", self.hidden, "one or two positive widths, e.g. (120, 84) or (84,)")
        if self.norm == "group" and 6 % self.groups:
            bad("groups", self.groups, "a divisor of 6 (conv1 has 6 channels): 1, 2, 3 or 6")
        if not isinstance(self.ghost_batch, int) or isinstance(self.ghost_batch, bool) or self.ghost_batch < 2:
            bad("ghost_batch", self.ghost_batch, "an int >= 2 (examples per ghost batch of norm='ghost'), e.g. 32")

    @property
    def uses_norm(self) -> bool:
        return self.norm != "none" and len(self.norm_layers) > 0

    @property
    def is_batch_norm(self) -> bool:
        return self.norm in BN_KINDS and len(self.norm_layers) > 0

    def replace(self, **changes) -> "LeNetSpec":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LeNetSpec":
        return cls(**d)

    def label(self) -> str:
        norm = f"ghost BN (virtual batch {self.ghost_batch})" if self.norm == "ghost" else self.norm
        parts = [norm if self.uses_norm else "no norm", f"{self.pool} pool", self.activation]
        if self.padding:
            parts.append(f"pad {self.padding}")
        if self.uses_norm and tuple(self.norm_layers) != NORM_LAYER_NAMES:
            parts.append("norm on " + "+".join(self.norm_layers))
        if self.uses_norm and self.norm_position == "after":
            parts.append("norm after act")
        if not self.bias:
            parts.append("no bias before norm")
        if self.dropout:
            parts.append(f"dropout {self.dropout:g}")
        if self.hidden != (120, 84):
            parts.append("fc " + "-".join(map(str, self.hidden)))
        return ", ".join(parts)


PRESETS: dict[str, LeNetSpec] = {
    # d2l "LeNet" (chapter_convolutional-neural-networks/lenet): padding 2, avg pool, no norm.
    "lenet": LeNetSpec(norm="none", pool="avg", padding=2),
    # d2l "Batch Normalization" today: no padding, BN before sigmoid, avg pool.
    "lenet-bn": LeNetSpec(norm="torch", pool="avg", padding=0),
    "lenet-bn-scratch": LeNetSpec(norm="scratch", pool="avg", padding=0),
    # d2l before June 2021 (PR #1660) and the forum seeds: max pooling.
    "lenet-bn-maxpool": LeNetSpec(norm="torch", pool="max", padding=0),
}


def preset(name: str, **changes) -> LeNetSpec:
    """A named preset, optionally changed: ``preset('lenet-bn', norm='scratch')``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {sorted(PRESETS)}")
    return PRESETS[name].replace(**changes) if changes else PRESETS[name]


def _make_norm(spec: LeNetSpec, channels: int, conv: bool, spatial: tuple[int, int]) -> nn.Module:
    kind = spec.norm
    if kind == "scratch":
        return BatchNorm(channels, affine=spec.affine)
    if kind == "torch":
        return (nn.BatchNorm2d if conv else nn.BatchNorm1d)(channels, affine=spec.affine)
    if kind in ("lite-center", "lite-scale"):
        return LiteBatchNorm(channels, mode=kind.split("-")[1], affine=spec.affine)
    if kind == "ghost":
        return GhostBatchNorm(channels, ghost_batch=spec.ghost_batch, affine=spec.affine)
    if kind == "d2l":
        return D2LBatchNorm(channels, num_dims=4 if conv else 2)
    if kind == "layer":
        shape = (channels, *spatial) if conv else (channels,)
        return nn.LayerNorm(shape, elementwise_affine=spec.affine)
    if kind == "group":
        groups = spec.groups if channels % spec.groups == 0 else 1
        return nn.GroupNorm(groups, channels, affine=spec.affine)
    if kind == "instance":
        if conv:
            return nn.InstanceNorm2d(channels, affine=spec.affine)
        return nn.LayerNorm(channels, elementwise_affine=spec.affine)
    raise ValueError(kind)


def build_lenet(spec: LeNetSpec | str = "lenet-bn", num_classes: int = 10) -> nn.Sequential:
    """Build the LeNet described by ``spec`` (a :class:`LeNetSpec` or a preset name).

    Returns an ``nn.Sequential`` whose normalisation modules are named ``norm_conv1``,
    ``norm_conv2``, ``norm_fc1``, ``norm_fc2`` (see :func:`norm_layers`).
    """
    if isinstance(spec, str):
        spec = preset(spec)
    act = nn.Sigmoid if spec.activation == "sigmoid" else nn.ReLU
    pool = {"avg": nn.AvgPool2d, "max": nn.MaxPool2d}.get(spec.pool)
    layers: list[tuple[str, nn.Module]] = []

    def block(name: str, core: nn.Module, channels: int, conv: bool, spatial=(1, 1)):
        normed = spec.norm != "none" and name in spec.norm_layers
        layers.append((name, core))
        norm = [(f"norm_{name}", _make_norm(spec, channels, conv, spatial))] if normed else []
        activation = [(f"act_{name}", act())]
        layers.extend(norm + activation if spec.norm_position == "before" else activation + norm)

    size = 28 + 2 * spec.padding - 4  # after conv1 (kernel 5)
    bias = lambda name: spec.bias or spec.norm == "none" or name not in spec.norm_layers  # noqa: E731
    block("conv1", nn.Conv2d(1, 6, 5, padding=spec.padding, bias=bias("conv1")), 6, True, (size, size))
    if pool:
        layers.append(("pool1", pool(2, 2)))
        size //= 2
    size -= 4
    block("conv2", nn.Conv2d(6, 16, 5, bias=bias("conv2")), 16, True, (size, size))
    if pool:
        layers.append(("pool2", pool(2, 2)))
        size //= 2
    layers.append(("flatten", nn.Flatten()))
    width = 16 * size * size
    fc_names = ("fc1", "fc2")[-len(spec.hidden):] if len(spec.hidden) == 1 else ("fc1", "fc2")
    for name, hidden in zip(fc_names, spec.hidden):
        block(name, nn.Linear(width, hidden, bias=bias(name)), hidden, False)
        if spec.dropout:
            layers.append((f"dropout_{name}", nn.Dropout(spec.dropout)))
        width = hidden
    layers.append(("out", nn.Linear(width, num_classes)))
    return nn.Sequential(OrderedDict(layers))


def norm_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The normalisation modules of a model, by layer name. For a model from
    :func:`build_lenet` the keys are ``conv1``, ``conv2``, ``fc1``, ``fc2`` (those that have a
    norm); for any other model, the module paths."""
    kinds = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, BatchNorm, D2LBatchNorm)
    return {
        (name[len("norm_"):] if name.startswith("norm_") else name): module
        for name, module in model.named_modules()
        if name and isinstance(module, kinds)
    }


def configure_norms(model: nn.Module, momentum: float | None, eps: float) -> nn.Module:
    """Set ``momentum`` (PyTorch's convention: the weight of the new batch; None = cumulative
    average) and ``eps`` on every norm layer of ``model`` that has them, in place; returns the
    model. The d2l-book layer keeps its own momentum (the book's convention). The one place a
    run's BN momentum and eps reach the layers: at build time and after a live change."""
    for m in norm_layers(model).values():
        if hasattr(m, "momentum") and not isinstance(m, D2LBatchNorm):
            m.momentum = momentum
        if hasattr(m, "eps"):
            m.eps = eps
    return model


def init_weights(model: nn.Module, scheme: str = "d2l", generator: torch.Generator | None = None) -> nn.Module:
    """Initialise ``model``'s weights in place by ``scheme`` and return it.

    * ``'d2l'``: ``nn.init.xavier_uniform_`` on the weight of every ``nn.Conv2d`` and
      ``nn.Linear`` (exactly what d2l's ``train_ch6`` does before training). Biases and the
      norm layers' parameters are left as built.
    * ``'pytorch'``: nothing changes: PyTorch's default init stays (Kaiming-uniform with
      ``a=sqrt(5)`` on weights, as each layer's ``reset_parameters`` draws it).

    Convention: the draws come from the global torch RNG, in module order
    (``model.modules()``), so ``torch.manual_seed(s); m = init_weights(build_lenet(spec))``
    gives the same model every time. Pass ``generator`` to draw from it instead.
    """
    if scheme not in INITS:
        raise ValueError(f"init scheme {scheme!r} is not valid; valid: {', '.join(map(repr, INITS))}")
    if scheme == "d2l":
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight, generator=generator)
    return model


# ----------------------------------------------------------------------------- a small ResNet (chapter 08)


class BasicBlock(nn.Module):
    """A ReLU residual block (He et al. 2016, "basic" block, post-activation)::

        out = relu( bn2(conv2( relu(bn1(conv1(x))) )) + shortcut(x) )

    conv1 (3×3, ``stride``), conv2 (3×3) without bias (BN's β is the bias). ``shortcut`` is
    the identity, or a 1×1 conv (``stride``) + norm where the shape changes. ``norm``: a
    function ``channels -> module`` (default ``nn.BatchNorm2d``). ``bn2`` is "the last BN of
    the block": zero-initialising its γ makes the block start as the identity (Goyal et al. 2017).
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, norm=None):
        super().__init__()
        norm = norm or nn.BatchNorm2d
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = norm(c_out)
        self.shortcut = (nn.Identity() if stride == 1 and c_in == c_out else
                         nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), norm(c_out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _check_resnet(channels, blocks, stem_stride) -> None:
    if (not isinstance(channels, (tuple, list)) or not channels
            or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in channels)):
        raise ValueError(f"channels={channels!r} is not valid; valid: a non-empty tuple of positive ints, "
                         "one per stage, e.g. (8, 16)")
    if (not isinstance(blocks, (tuple, list)) or len(blocks) != len(channels)
            or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in blocks)):
        raise ValueError(f"blocks={blocks!r} is not valid; valid: one positive int per stage "
                         f"({len(channels)} stages), e.g. {tuple(1 for _ in channels)}")
    if stem_stride not in (1, 2):
        raise ValueError(f"stem_stride={stem_stride!r} is not valid; valid: 1 or 2")


def resnet_bn(channels: tuple[int, ...] = (8, 16), blocks: tuple[int, ...] = (1, 1), num_classes: int = 10,
              norm=None, zero_init_last: bool = False, stem_stride: int = 2, in_channels: int = 1) -> nn.Sequential:
    """A small ReLU ResNet with BN for 1×28×28 images, small enough to train on a CPU::

        stem:    Conv2d(1, channels[0], 3, stride=stem_stride, padding=1)  norm  ReLU
        stage i: blocks[i] BasicBlocks with channels[i] (the first one strides 2 for i >= 1)
        pool:    global average pool;  fc: Linear(channels[-1], num_classes)

    With the defaults: 28×28 → 14×14 (stem) → 14×14 (stage 1, 8 channels) → 7×7 (stage 2,
    16 channels) → 16 features. ``norm``: a function ``channels -> module`` (default
    ``nn.BatchNorm2d``, e.g. ``functools.partial(BatchRenorm, rmax=3.0)``).

    Init (drawn from the global torch RNG, in module order): conv weights Kaiming-normal
    (fan_out, ReLU gain, as torchvision's ResNet), norm γ = 1 and β = 0, the fc layer PyTorch's
    default. ``zero_init_last=True``: γ = 0 in the last norm of each residual block (``bn2``), so
    every block starts as the identity (Goyal et al. 2017, "Accurate, Large Minibatch SGD").
    """
    _check_resnet(channels, blocks, stem_stride)
    norm = norm or nn.BatchNorm2d
    layers: list[tuple[str, nn.Module]] = [
        ("stem", nn.Conv2d(in_channels, channels[0], 3, stride=stem_stride, padding=1, bias=False)),
        ("stem_bn", norm(channels[0])), ("stem_act", nn.ReLU())]
    c_in = channels[0]
    for i, (c, n) in enumerate(zip(channels, blocks)):
        for j in range(n):
            stride = 2 if i > 0 and j == 0 else 1
            layers.append((f"s{i + 1}b{j + 1}", BasicBlock(c_in, c, stride, norm)))
            c_in = c
    layers += [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("fc", nn.Linear(c_in, num_classes))]
    model = nn.Sequential(OrderedDict(layers))
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif getattr(m, "weight", None) is not None and m in _norms_of(model):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_last:
        for block in residual_blocks(model):
            nn.init.zeros_(block.bn2.weight)
    return model


def _norms_of(model: nn.Module) -> list[nn.Module]:
    return list(norm_layers(model).values())


def residual_blocks(model: nn.Module) -> list[BasicBlock]:
    """The :class:`BasicBlock` s of a model, in order."""
    return [m for m in model.modules() if isinstance(m, BasicBlock)]


__all__ += ["BasicBlock", "resnet_bn", "residual_blocks"]
