"""Data sets resident on the training device, and a batch iterator with no per-sample work.

Images are kept as ``uint8`` tensors of shape (N, 1, 28, 28) on the device (47 MB for the
60k Fashion-MNIST training images); labels as ``int64`` (N,). A batch is a slice of an
on-device random permutation, converted to float in [0, 1] (``x / 255``, what torchvision's
``ToTensor`` gives d2l; no mean/std normalisation, as in the book).

Which data set (``name`` argument, else the ``BNVIZ_DATASET`` environment variable):

* ``fashion-mnist`` / ``mnist``: through torchvision, in :func:`data_root` (``data/`` in a clone),
  downloaded if missing. Offline and missing: a :class:`DataUnavailable` error that says how to
  place the files by hand.
* ``synthetic``: a deterministic, made-up data set of the same shape (see
  :func:`make_synthetic`). Its name says "synthetic" everywhere it is shown.
* ``auto`` (default): Fashion-MNIST if present or downloadable, otherwise synthetic with a
  loud warning.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

__all__ = [
    "Dataset",
    "DataUnavailable",
    "DATASET_NAMES",
    "data_root",
    "load_dataset",
    "make_synthetic",
    "batches",
    "batch_slices",
    "planned_steps",
    "batch_sizes",
    "drops_last",
    "count_correct",
    "accuracy",
    "evaluate",
    "to_float",
    "resolve_device",
]

DATASET_NAMES = ("auto", "fashion-mnist", "mnist", "synthetic")
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat",
                   "sandal", "shirt", "sneaker", "bag", "ankle boot"]
SYNTHETIC_CLASSES = [f"synthetic-{i}" for i in range(10)]


class DataUnavailable(RuntimeError):
    """The requested data set is not on disk and cannot be downloaded."""


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' (or None): CUDA if available, then Apple MPS, then CPU; else the named device."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; valid here: 'cpu', 'auto'")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} requested but Apple MPS is not available; valid here: 'cpu', 'auto'")
    return dev


def data_root() -> Path:
    """Where data sets live: ``$BNVIZ_DATA`` if set; else, in a source checkout (a clone, or
    ``pip install -e``), the repository's ``data/`` folder; else (a wheel install, e.g. Colab's
    ``pip install git+...``, where the package sits in site-packages) a per-user cache folder,
    ``$XDG_CACHE_HOME/bnviz/data`` (default ``~/.cache/bnviz/data``), never site-packages."""
    env = os.environ.get("BNVIZ_DATA")
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parent.parent
    if (repo / "pyproject.toml").is_file() and (repo / "bnviz").is_dir():
        return repo / "data"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "bnviz" / "data"


@dataclass
class Dataset:
    """A data set as tensors: ``train_x``/``test_x`` uint8 (N, 1, 28, 28); ``*_y`` int64 (N,)."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]

    @property
    def synthetic(self) -> bool:
        return self.name == "synthetic"

    @property
    def label(self) -> str:
        """How charts and tables name this data set."""
        return {"fashion-mnist": "Fashion-MNIST", "mnist": "MNIST"}.get(
            self.name, "SYNTHETIC data (not Fashion-MNIST)")

    @property
    def device(self) -> torch.device:
        return self.train_x.device

    def to(self, device) -> "Dataset":
        device = torch.device(device)
        if device == self.device:
            return self
        return Dataset(self.name, *(t.to(device) for t in (self.train_x, self.train_y, self.test_x, self.test_y)),
                       self.classes)

    def subset(self, train_size: int | None = None, test_size: int | None = None) -> "Dataset":
        """The first ``train_size`` / ``test_size`` examples (None keeps all)."""
        for what, n, have in (("train_size", train_size, len(self.train_x)), ("test_size", test_size, len(self.test_x))):
            if n is not None and not 1 <= n <= have:
                raise ValueError(f"{what}={n} is not valid for {self.label}: it has {have} examples")
        tr = slice(None, train_size)
        te = slice(None, test_size)
        return Dataset(self.name, self.train_x[tr], self.train_y[tr], self.test_x[te], self.test_y[te], self.classes)

    def __repr__(self) -> str:
        return (f"Dataset({self.label}: {len(self.train_x)} train / {len(self.test_x)} test, "
                f"{tuple(self.train_x.shape[1:])} uint8 on {self.device})")


# ----------------------------------------------------------------------------- synthetic


# Garment-like silhouettes. Each image: a class's shape (a few filled, soft-edged primitives with
# per-image proportions), warped (rotation, scale, shift), lit with a random brightness, a smooth
# texture, sometimes a striped print, and faint pixel noise, on a black background.
_SYN_SIZE = 28
_SYN_SLOTS = 8     # primitives per shape (unused slots are off)
_SYN_BANK = 256    # shape variants drawn per class; each image warps one of them


def _syn_uniform(g: torch.Generator, m: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(m, generator=g)


def _syn_class_shapes(c: int, m: int, g: torch.Generator) -> torch.Tensor:
    """``m`` random shapes of class ``c`` as primitives, a tensor (m, slots, 8) of: centre x, centre
    y, half height, half width at the top, half width at the bottom (a trapezoid), angle
    (radians), kind (+1 adds, -1 cuts out, 0 off), gain. Pixel units on the 28×28 canvas.

    Classes imitate Fashion-MNIST's: 0 t-shirt, 1 trouser, 2 pullover, 3 dress, 4 coat,
    5 sandal, 6 shirt, 7 sneaker, 8 bag, 9 ankle boot. The four tops share the torso and differ
    by sleeves, length, collar and opening, with overlapping ranges (as shirt / t-shirt /
    pullover / coat overlap in Fashion-MNIST)."""
    U = lambda lo, hi: _syn_uniform(g, m, lo, hi)  # noqa: E731
    P = torch.zeros(m, _SYN_SLOTS, 8)
    slot = [0]

    def put(x, y, hh, hw_top, hw_bottom, angle, kind=1.0, gain=1.0):
        for i, value in enumerate((x, y, hh, hw_top, hw_bottom, angle, kind, gain)):
            P[:, slot[0], i] = value
        slot[0] += 1

    s, w = U(0.98, 1.18), U(0.8, 1.2)  # size, width factor
    cx, cy = 14 + U(-1.5, 1.5), 14 + U(-1.5, 1.5)
    draw = _syn_top if c in (0, 2, 4, 6) else _SYN_DRAW[c]
    draw(_SynPen(put, U, g, m, s, w, cx, cy), c)
    return P


@dataclass
class _SynPen:
    """What one class's drawing needs: ``put`` (one primitive per slot), ``U`` (uniform draws, one
    per shape), the generator, the count, the size and width factors and the centre."""
    put: Callable
    U: Callable
    g: torch.Generator
    m: int
    s: torch.Tensor
    w: torch.Tensor
    cx: torch.Tensor
    cy: torch.Tensor

    @property
    def one(self) -> torch.Tensor:
        return torch.ones(self.m)


_DEG = math.pi / 180


def _syn_top(p: _SynPen, c: int) -> None:
    """Tops: 0 t-shirt, 2 pullover, 4 coat, 6 shirt (a torso, sleeves, a collar or an opening)."""
    put, U, s, cx, cy, one = p.put, p.U, p.s, p.cx, p.cy, p.one
    hh = {0: 11.0, 2: 9.5, 4: 10.5, 6: 10.0}[c] * s * U(0.88, 1.05) - 1
    hw = 6.3 * s * p.w
    top = cy - hh
    put(cx, cy, hh, hw * U(0.95, 1.1), hw * U(0.9, 1.1), 0 * one)
    if c == 0:    # short sleeves
        sleeve, angle = 2.6 * s * U(0.8, 1.8), U(25, 65) * _DEG
    elif c == 6:  # shirt: long sleeves, sometimes short
        sleeve, angle = 7.5 * s * U(0.35, 1.1), U(10, 50) * _DEG
    else:         # pullover, coat: long sleeves
        sleeve, angle = 8.2 * s * U(0.8, 1.1), U(8, 32) * _DEG
    sw = 2.3 * s * U(0.85, 1.15)
    for side in (-1, 1):
        put(cx + side * hw + side * sleeve * torch.sin(angle), top + 2.0 + sleeve * torch.cos(angle),
            sleeve, sw, sw * 1.05, -side * angle)
    neck = 2.2 * s * U(0.8, 1.2)
    if c == 6:    # V collar, on 70 % of shirts
        put(cx, top + 1.6, 2.4 * one, neck, 0.2 * one, 0 * one, -1.0 * (torch.rand(p.m, generator=p.g) < 0.7))
    elif c == 4:  # coat: an opening down the middle (faint to clear) and a collar
        put(cx, cy, hh, 0.45 * one, 0.45 * one, 0 * one, -1, U(0, 0.8))
        put(cx, top + 0.8, 1.5 * one, neck, 0.5 * neck, 0 * one, -1)
    else:
        put(cx, top, 1.3 * one, neck, neck * 0.8, 0 * one, -1)


def _syn_trouser(p: _SynPen, c: int) -> None:
    """Two legs and a waist band."""
    put, s, cx, cy, one = p.put, p.s, p.cx, p.cy, p.one
    hh, lw, spread = 12.0 * s, 2.5 * s * p.w, p.U(0, 4) * _DEG
    for side in (-1, 1):
        put(cx + side * (lw + 0.3 + 0.25 * hh * torch.sin(spread)), cy + 0.5, hh, lw * 0.95, lw * 1.05,
            -side * spread)
    put(cx, cy - hh + 1.5, 1.6 * one, 2 * lw + 0.8, 2 * lw + 0.8, 0 * one)


def _syn_dress(p: _SynPen, c: int) -> None:
    """A trapezoid widening downwards, and straps."""
    put, U, s, w, cx, cy, one = p.put, p.U, p.s, p.w, p.cx, p.cy, p.one
    hh = 12.0 * s * U(0.9, 1.05)
    put(cx, cy, hh, 3.2 * s * w, 7.5 * s * w * U(0.85, 1.15), 0 * one)
    put(cx, cy - hh - 0.5, 1.5 * one, 3.0 * s * w, 3.0 * s * w, 0 * one)
    put(cx, cy - hh - 1.5, 1.2 * one, 1.3 * one, 1.3 * one, 0 * one, -1)


def _syn_sandal(p: _SynPen, c: int) -> None:
    """A sole and thin straps."""
    put, U, s, cx, cy, one = p.put, p.U, p.s, p.cx, p.cy, p.one
    base, length = cy + 3 + U(-1, 1), 11.5 * s * p.w
    put(cx, base + 2.5, 1.3 * one, length, length, U(-4, 4) * _DEG)
    for j, offset in enumerate((-0.55, 0.0, 0.55)):
        put(cx + offset * length, base - 1.5, 4.5 * s * one, 0.9 * one, 0.9 * one,
            U(20, 60) * _DEG * (1 if j % 2 else -1))
    put(cx + 0.5 * length, base - 3.5, 0.8 * one, 0.45 * length, 0.45 * length, 0 * one)


def _syn_sneaker(p: _SynPen, c: int) -> None:
    """A low shoe with a bright sole."""
    put, U, s, cx, cy, one = p.put, p.U, p.s, p.cx, p.cy, p.one
    base, length = cy + 2 + U(-1, 1), 12.0 * s * p.w
    put(cx, base, 4.0 * s * U(0.85, 1.15), 0.55 * length, length, 0 * one)
    put(cx - 0.35 * length, base - 4.5 * s, 2.2 * s * one, 0.3 * length, 0.35 * length, U(-8, 8) * _DEG)
    put(cx, base + 4.0 * s, 1.0 * one, length, length, 0 * one, 1, 1.3)


def _syn_boot(p: _SynPen, c: int) -> None:
    """Ankle boot: a sole and a tall shaft (an L)."""
    put, U, s, cx, cy, one = p.put, p.U, p.s, p.cx, p.cy, p.one
    base, length = cy + 6 + U(-1, 1), 11.5 * s * p.w
    put(cx, base, 3.0 * s * one, 0.8 * length, length, 0 * one)
    shaft = 8.0 * s * U(0.8, 1.15)
    put(cx - 0.35 * length, base - shaft, shaft, 4.6 * s * one, 5.0 * s * one, U(-8, 8) * _DEG)


def _syn_bag(p: _SynPen, c: int) -> None:
    """A body and a handle (a ring)."""
    put, U, s, cx, cy, one = p.put, p.U, p.s, p.cx, p.cy, p.one
    bh, bw, by = 7.0 * s * U(0.8, 1.2), 10.5 * s * p.w, cy + 3
    put(cx, by, bh, bw * 0.9, bw, 0 * one)
    hh = 4.5 * s * U(0.7, 1.3)
    put(cx, by - bh - hh + 1, hh, 0.45 * bw, 0.55 * bw, 0 * one)
    put(cx, by - bh - hh + 2.3, hh - 1.3, 0.45 * bw - 1.6, 0.55 * bw - 1.6, 0 * one, -1)


_SYN_DRAW = {1: _syn_trouser, 3: _syn_dress, 5: _syn_sandal, 7: _syn_sneaker, 8: _syn_bag, 9: _syn_boot}


def _syn_render(P: torch.Tensor) -> torch.Tensor:
    """Primitives (n, slots, 8) → shapes (n, 28, 28) in [0, 1.3], edges one pixel soft."""
    n = P.shape[0]
    coords = torch.arange(_SYN_SIZE, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    xx, yy = xx.reshape(1, 1, -1), yy.reshape(1, 1, -1)
    cx, cy, hh, hw_top, hw_bottom, angle, kind, gain = (P[..., i:i + 1] for i in range(8))
    dx, dy = xx - cx, yy - cy
    cos, sin = torch.cos(angle), torch.sin(angle)
    u, v = dx * cos - dy * sin, dx * sin + dy * cos
    t = ((v / hh.clamp_min(1e-3)) + 1).clamp(0, 2) / 2
    hw = hw_top + (hw_bottom - hw_top) * t
    inside = (hh - v.abs() + 0.5).clamp(0, 1) * (hw - u.abs() + 0.5).clamp(0, 1)
    add = (inside * gain * (kind > 0)).amax(1)
    cut = (inside * gain * (kind < 0)).amax(1)
    return (add * (1 - cut)).clamp(0, 1.3).view(n, _SYN_SIZE, _SYN_SIZE)


def _syn_images(n: int, g: torch.Generator, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randint(0, 10, (n,), generator=g)
    variant = torch.randint(0, _SYN_BANK, (n,), generator=g)
    angle = (torch.rand(n, generator=g) - 0.5) * (16 * math.pi / 180)   # ±8°
    scale = 0.88 + 0.24 * torch.rand(n, generator=g)
    shift = (torch.rand(n, 2, generator=g) - 0.5) * (4 / 14)            # ±2 px
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    bright = 0.4 + 0.6 * torch.rand(n, 1, 1, 1, generator=g) ** 0.6
    # A print on about a third of the items: horizontal stripes of random period, phase and depth.
    period = 2.5 + 3 * torch.rand(n, 1, 1, 1, generator=g)
    phase = 2 * math.pi * torch.rand(n, 1, 1, 1, generator=g)
    depth = 0.5 * (torch.rand(n, 1, 1, 1, generator=g) < 0.35) * torch.rand(n, 1, 1, 1, generator=g)
    rows = torch.arange(_SYN_SIZE, dtype=torch.float32).view(1, 1, _SYN_SIZE, 1)
    stripes = 1 - depth * (0.5 + 0.5 * torch.sin(2 * math.pi * rows / period + phase))
    out = torch.empty(n, 1, _SYN_SIZE, _SYN_SIZE, dtype=torch.uint8)
    for s in range(0, n, 10000):
        e = min(n, s + 10000)
        grid = F.affine_grid(theta[s:e], (e - s, 1, _SYN_SIZE, _SYN_SIZE), align_corners=False)
        shape = F.grid_sample(bank[y[s:e], variant[s:e]], grid, align_corners=False)
        texture = F.interpolate(torch.randn(e - s, 1, 7, 7, generator=g), size=_SYN_SIZE, mode="bilinear",
                                align_corners=False)
        img = (shape * bright[s:e] * (1 + 0.35 * texture) * stripes[s:e]
               + 0.03 * shape * torch.randn(e - s, 1, _SYN_SIZE, _SYN_SIZE, generator=g))
        out[s:e] = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return out, y


@lru_cache(maxsize=4)
def _synthetic_cpu(n_train: int, n_test: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    shapes = torch.cat([_syn_class_shapes(c, _SYN_BANK, g) for c in range(10)])
    bank = torch.cat([_syn_render(shapes[s:s + 640]) for s in range(0, len(shapes), 640)])
    bank = bank.view(10, _SYN_BANK, 1, _SYN_SIZE, _SYN_SIZE)
    train_x, train_y = _syn_images(n_train, g, bank)
    test_x, test_y = _syn_images(n_test, g, bank)
    return train_x, train_y, test_x, test_y


def make_synthetic(n_train: int = 60000, n_test: int = 10000, seed: int = 0, device="cpu") -> Dataset:
    """A deterministic **synthetic** stand-in for Fashion-MNIST: same shape (1×28×28 uint8,
    10 classes, labels drawn uniformly), made up here for offline use (CI, a classroom without
    internet). It is **not** Fashion-MNIST, and no result on it is a Fashion-MNIST result.

    What it is: garment-like silhouettes on a black background, one class per Fashion-MNIST
    category (t-shirt, trouser, pullover, dress, coat, sandal, shirt, sneaker, bag, ankle boot;
    the names stay ``synthetic-0..9``). Each class's shape is a few filled, soft-edged
    primitives with random proportions (torso length and width, sleeve length and angle,
    collar, coat opening, strap angles, handle size, ...): 256 variants are drawn per class,
    and each image warps one of them (rotation ±8°, scale 0.88–1.12, shift ±2 px), with a
    random brightness, a smooth texture, a striped print on about a third of the items and
    faint pixel noise. The four tops share the torso and have overlapping sleeve ranges, so
    they are genuinely confusable, as in Fashion-MNIST.

    How it was calibrated (``benchmarks/calibrate_synthetic.py``, 2-core CPU, seed 0): pixel
    mean and std after /255 near Fashion-MNIST's 0.286 / 0.353, and the d2l recipes behave as in
    the book: with d2l's init (xavier, :func:`bnviz.models.init_weights`) the plain sigmoid
    LeNet at lr 0.9 sits on the loss plateau (2.30) for about one epoch, then learns; LeNet-BN
    at lr 1.0 learns within its first epoch and ends higher. See ``data/README.md`` for the
    measured numbers. The previous stand-in (blurred strokes) kept the plain LeNet at chance.

    Same arguments, same bytes (a seeded CPU generator; all arithmetic on the CPU whatever
    ``device`` is; cached per arguments). Generating 60k + 10k images took 2.8 s of CPU time
    on one core here.
    """
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be >= 1, got {n_train}, {n_test}")
    tensors = _synthetic_cpu(int(n_train), int(n_test), int(seed))
    return Dataset("synthetic", *tensors, list(SYNTHETIC_CLASSES)).to(device)


# ----------------------------------------------------------------------------- torchvision

_TV_CLASS = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}


def _load_torchvision(name: str, root: Path, download: bool) -> Dataset:
    try:
        import torchvision
    except Exception as err:  # not installed, or built for another torch ("operator ... does not exist")
        raise DataUnavailable(
            f"torchvision cannot be imported ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}), "
            f"so {name} cannot be loaded. Fix: `pip install torchvision` matching your torch, or use "
            "BNVIZ_DATASET=synthetic to train on the synthetic stand-in.") from err

    cls = getattr(torchvision.datasets, _TV_CLASS[name])
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except Exception as err:  # torchvision raises RuntimeError / URLError / OSError
        raise DataUnavailable(_missing_message(name, root, err)) from err
    classes = FASHION_CLASSES if name == "fashion-mnist" else [str(i) for i in range(10)]
    return Dataset(name, train.data.unsqueeze(1).contiguous(), train.targets.long(),
                   test.data.unsqueeze(1).contiguous(), test.targets.long(), classes)


def _missing_message(name: str, root: Path, err: Exception | None) -> str:
    folder = root / _TV_CLASS[name] / "raw"
    prefix = "" if name == "mnist" else "(from the Fashion-MNIST project) "
    return (
        f"{name} is not in {folder} and could not be downloaded ({type(err).__name__}: {err}).\n"
        f"Fix: connect to the internet and run again (torchvision downloads it), or copy the four "
        f"files {prefix}train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        f"t10k-labels-idx1-ubyte (or their .gz) into {folder} (see data/README.md), or set "
        f"BNVIZ_DATA to a folder that has them, or use BNVIZ_DATASET=synthetic to train offline "
        f"on the synthetic stand-in."
    )


_auto_failed: set[str] = set()


def load_dataset(
    name: str | None = None,
    device="cpu",
    train_size: int | None = None,
    test_size: int | None = None,
    root: str | Path | None = None,
    download: bool = True,
    seed: int = 0,
) -> Dataset:
    """Load a data set onto ``device`` (see the module docstring for ``name``).

    ``train_size``/``test_size`` take the first examples (for fast runs). For the synthetic set
    they are its sizes (default 60000/10000) and ``seed`` its generator seed.
    """
    name = (name or os.environ.get("BNVIZ_DATASET") or "auto").lower()
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown data set {name!r}; valid: {', '.join(DATASET_NAMES)}")
    device = resolve_device(device)
    root = Path(root) if root is not None else data_root()
    if name == "synthetic":
        return make_synthetic(train_size or 60000, test_size or 10000, seed=seed, device=device)
    if name == "auto":
        if "fashion-mnist" not in _auto_failed:
            try:
                return load_dataset("fashion-mnist", device, train_size, test_size, root, download)
            except DataUnavailable as err:
                _auto_failed.add("fashion-mnist")
                reason = str(err).splitlines()[0]
        else:
            reason = "it was not available earlier in this session"
        warnings.warn(
            "\n" + "!" * 78 + "\n"
            f"Fashion-MNIST is not available ({reason}).\n"
            "Using the SYNTHETIC stand-in data set instead: every chart and table says so.\n"
            "Its numbers are NOT Fashion-MNIST results. See data/README.md to get the real data.\n"
            + "!" * 78,
            stacklevel=2,
        )
        return make_synthetic(train_size or 60000, test_size or 10000, seed=seed, device=device)
    ds = _load_torchvision(name, root, download)
    if train_size is not None or test_size is not None:
        ds = ds.subset(train_size, test_size)
    return ds.to(device)


# ----------------------------------------------------------------------------- batches


def to_float(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1] (torchvision's ToTensor scaling)."""
    return x_uint8.to(torch.float32).div_(255.0)


def drops_last(n: int, batch_size: int, drop_last: bool = False) -> bool:
    """Whether an epoch of ``n`` examples drops its last partial batch: when ``drop_last`` asks,
    or when that batch would hold one example (a BN layer cannot normalise a batch of one)."""
    return drop_last or (batch_size > 1 and n % batch_size == 1)


def batch_slices(n: int, batch_size: int, drop_last: bool = False) -> list[slice]:
    """One epoch's batches as slices of a permutation of ``n`` examples: full batches, then the
    last partial one (e.g. 60000 = 234×256 + 96) unless ``drop_last``. The one batching rule of
    the Trainer, the grid and :func:`batches`."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    stop = n - n % batch_size if drop_last else n
    return [slice(start, min(start + batch_size, n)) for start in range(0, stop, batch_size)]


def planned_steps(epochs: int, n: int, batch_size: int, drop_last: bool = False) -> int:
    """The steps of ``epochs`` epochs over ``n`` examples, as the Trainer and the grid plan them:
    :func:`batch_slices` per epoch, with the last batch dropped where :func:`drops_last` says."""
    return epochs * len(batch_slices(n, batch_size, drops_last(n, batch_size, drop_last)))


def batch_sizes(n: int, batch_size: int, drop_last: bool = False) -> list[int]:
    """The distinct sizes of :func:`batch_slices`, largest first (a captured step has one
    graph per size)."""
    return sorted({s.stop - s.start for s in batch_slices(n, batch_size, drop_last)}, reverse=True)


def batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    shuffle: bool = True,
    drop_last: bool = False,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(float images, labels)`` batches by slicing an on-device permutation
    (:func:`batch_slices`). No per-sample Python work and no host synchronisation."""
    slices = batch_slices(len(x), batch_size, drop_last)
    order = torch.randperm(len(x), device=x.device, generator=generator) if shuffle else None
    for s in slices:
        idx = s if order is None else order[s]
        yield to_float(x[idx]), y[idx]


@torch.no_grad()
def count_correct(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                  chunk: int = 10000) -> torch.Tensor:
    """How many of the uint8 images ``x`` ``forward`` (float images -> logits) classifies as
    ``y``, in chunks; a device tensor (no host read). Logits may carry leading run dimensions (a
    vmapped grid: (K, B, classes) gives (K,) counts). The one evaluation of the Trainer, the
    grid, PreciseBN and the captured evaluation."""
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    for s in range(0, len(x), chunk):
        correct = correct + (forward(to_float(x[s:s + chunk])).argmax(-1) == y[s:s + chunk]).sum(-1)
    return correct


def accuracy(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
             chunk: int = 10000) -> torch.Tensor:
    """:func:`count_correct` as a share (float32 device tensor)."""
    return count_correct(forward, x, y, chunk).float() / max(len(x), 1)


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 10000) -> torch.Tensor:
    """Accuracy of ``model`` in eval mode on uint8 images ``x`` (:func:`accuracy`); a 0-d tensor on
    the device (no host sync). The mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        return accuracy(model, x, y, chunk)
    finally:
        model.train(was_training)
