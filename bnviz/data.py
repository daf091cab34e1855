"""Data sets resident on the training device, and a batch iterator with no per-sample work.

Images are kept as ``uint8`` tensors of shape (N, 1, 28, 28) on the device (47 MB for the
60k Fashion-MNIST training images); labels as ``int64`` (N,). A batch is a slice of an
on-device random permutation, converted to float in [0, 1] (``x / 255``, what torchvision's
``ToTensor`` gives d2l; no mean/std normalisation, as in the book).

Which data set (``name`` argument, else the ``BNVIZ_DATASET`` environment variable):

* ``fashion-mnist`` / ``mnist``: through torchvision, in ``data/`` (or ``BNVIZ_DATA``),
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
from typing import Iterator

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
    """Where data sets live: ``$BNVIZ_DATA`` if set, else the repository's ``data/`` folder."""
    env = os.environ.get("BNVIZ_DATA")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parent.parent / "data"


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


@lru_cache(maxsize=4)
def _synthetic_cpu(n_train: int, n_test: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    size = 28
    coords = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")

    # Each class: a template of 4 oriented strokes (anisotropic Gaussians) in the centre.
    templates = torch.zeros(10, size, size)
    for c in range(10):
        for _ in range(4):
            cx, cy = (torch.rand(2, generator=g) - 0.5) * 0.9
            theta = torch.rand(1, generator=g) * math.pi
            long_, short = 0.25 + 0.3 * torch.rand(1, generator=g), 0.07 + 0.05 * torch.rand(1, generator=g)
            u = (xx - cx) * torch.cos(theta) + (yy - cy) * torch.sin(theta)
            v = -(xx - cx) * torch.sin(theta) + (yy - cy) * torch.cos(theta)
            templates[c] += torch.exp(-0.5 * ((u / long_) ** 2 + (v / short) ** 2))
        templates[c] /= templates[c].max()

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 10, (n,), generator=g)
        other = (y + torch.randint(1, 10, (n,), generator=g)) % 10
        w_true = 0.55 + 0.45 * torch.rand(n, 1, 1, generator=g)
        w_other = 0.75 * torch.rand(n, 1, 1, generator=g)
        img = w_true * templates[y] + w_other * templates[other]
        # A random affine warp per image: rotation ±20°, scale 0.8..1.2, shift ±3 px.
        angle = (torch.rand(n, generator=g) - 0.5) * (40 * math.pi / 180)
        scale = 0.8 + 0.4 * torch.rand(n, generator=g)
        shift = (torch.rand(n, 2, generator=g) - 0.5) * (6 / 14)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        out = torch.empty(n, 1, size, size, dtype=torch.uint8)
        for s in range(0, n, 10000):
            e = min(n, s + 10000)
            grid = F.affine_grid(theta[s:e], (e - s, 1, size, size), align_corners=False)
            warped = F.grid_sample(img[s:e, None], grid, align_corners=False)
            contrast = 0.6 + 0.8 * torch.rand(e - s, 1, 1, 1, generator=g)
            noisy = warped * contrast + 0.12 * torch.randn(warped.shape, generator=g)
            out[s:e] = (noisy.clamp(0, 1) * 255).round().to(torch.uint8)
        return out, y

    train_x, train_y = split(n_train)
    test_x, test_y = split(n_test)
    return train_x, train_y, test_x, test_y


def make_synthetic(n_train: int = 60000, n_test: int = 10000, seed: int = 0, device="cpu") -> Dataset:
    """A deterministic **synthetic** stand-in for Fashion-MNIST: same shape (1×28×28 uint8,
    10 classes), made up here, for offline use. It is not Fashion-MNIST and no result on it is
    a Fashion-MNIST result.

    Each class is a template of four blurred strokes. An image is its class's template (weight
    0.55..1) plus another class's template (weight 0..0.75), warped by a random rotation, scale
    and shift, with random contrast and Gaussian pixel noise. The overlap makes it not trivially
    separable (some images are genuinely ambiguous), yet LeNet learns it well above chance in
    one epoch. Same arguments, same bytes, on every machine (CPU generator).
    """
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be >= 1, got {n_train}, {n_test}")
    tensors = _synthetic_cpu(int(n_train), int(n_test), int(seed))
    return Dataset("synthetic", *tensors, list(SYNTHETIC_CLASSES)).to(device)


# ----------------------------------------------------------------------------- torchvision

_TV_CLASS = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}


def _load_torchvision(name: str, root: Path, download: bool) -> Dataset:
    import torchvision

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


def batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    shuffle: bool = True,
    drop_last: bool = False,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(float images, labels)`` batches by slicing an on-device permutation.

    No per-sample Python work and no host synchronisation. The last partial batch
    (e.g. 60000 = 234×256 + 96) is kept unless ``drop_last``.
    """
    n = len(x)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    order = torch.randperm(n, device=x.device, generator=generator) if shuffle else None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        if order is None:
            yield to_float(x[start:start + batch_size]), y[start:start + batch_size]
        else:
            idx = order[start:start + batch_size]
            yield to_float(x[idx]), y[idx]
