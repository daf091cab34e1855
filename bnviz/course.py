"""Course-wide settings the notebooks share: fast mode and sizes.

``BNVIZ_FAST=1`` (set by ``make test`` / CI) makes every notebook run top to bottom in
seconds: small data, few steps. Without it a notebook runs its full experiment (what a learner
runs). Notebooks pick sizes with :func:`pick`, so the fast and full settings sit side by side.
"""
from __future__ import annotations

import os

REPO_URL = "https://github.com/bnviz-course/bnviz"


def fast_mode() -> bool:
    """True when ``BNVIZ_FAST`` is set to 1/true/yes."""
    return os.environ.get("BNVIZ_FAST", "").strip().lower() in ("1", "true", "yes")


_UNSET = object()
SIZES = ("gpu", "cpu", "fast")


def sizes() -> str:
    """Which sizes a chapter uses: 'fast' (``BNVIZ_FAST=1``), else ``$BNVIZ_SIZES`` if set
    ('gpu' or 'cpu'), else 'gpu' when CUDA is available and 'cpu' otherwise (an Apple GPU
    counts as 'cpu': its per-step overhead is closer to a CPU's)."""
    if fast_mode():
        return "fast"
    chosen = os.environ.get("BNVIZ_SIZES", "").strip().lower()
    if chosen:
        if chosen not in ("gpu", "cpu"):
            raise ValueError(f"BNVIZ_SIZES={chosen!r} is not valid; valid: 'gpu', 'cpu' (or unset)")
        return chosen
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def pick(full, fast, cpu=_UNSET):
    """``fast`` in fast mode, else ``full``: ``epochs = pick(10, 1)``.

    With ``cpu``, full mode on a machine without CUDA (see :func:`sizes`) uses ``cpu``
    instead: ``train_size = pick(60000, 512, cpu=6000)``. Without it, full mode is ``full``
    everywhere (the behaviour chapters 00-04 rely on)."""
    if fast_mode():
        return fast
    if cpu is not _UNSET and sizes() == "cpu":
        return cpu
    return full


_FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                  "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "not installed"


def environment_report() -> dict:
    """What this course runs on: package versions, the device, and which data set a run will use.

    Returns a dict (``'python'``, ``'torch'``, ..., ``'device'``, ``'dataset'``,
    ``'fashion_mnist_present'``, ``'fast_mode'``, ``'notes'``); nothing is downloaded. ``notes``
    lists what a learner must know (e.g. the synthetic fallback), in capitals where it matters.
    """
    import platform

    import torch

    from .data import data_root, resolve_device

    dev = resolve_device("auto")
    if dev.type == "cuda":
        device = f"cuda ({torch.cuda.get_device_name(0)})"
    elif dev.type == "mps":
        device = "mps (Apple GPU)"
    else:
        device = f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    raw = data_root() / "FashionMNIST" / "raw"
    present = all((raw / f).exists() or (raw / (f + ".gz")).exists() for f in _FASHION_FILES)
    choice = (os.environ.get("BNVIZ_DATASET") or "auto").lower()
    notes = []
    if choice == "synthetic":
        dataset = "SYNTHETIC (BNVIZ_DATASET=synthetic)"
        notes.append("BNVIZ_DATASET=synthetic: every run uses the SYNTHETIC stand-in data set. "
                     "Its numbers are NOT Fashion-MNIST results.")
    elif choice in ("auto", "fashion-mnist") and present:
        dataset = f"Fashion-MNIST (found in {raw})"
    elif choice == "auto":
        dataset = "Fashion-MNIST, downloaded on first use; SYNTHETIC fallback if offline"
        notes.append(f"Fashion-MNIST is not in {raw} yet. It is downloaded on first use; WITHOUT "
                     "INTERNET the course falls back to the SYNTHETIC stand-in (charts then say "
                     "'SYNTHETIC data (not Fashion-MNIST)'). See data/README.md to place the files.")
    else:
        dataset = choice
    if dev.type == "cpu":
        notes.append("No GPU: everything runs, just slower. On the 2-core CPU this course was built on, "
                     "a LeNet-BN epoch over 60,000 images took about 4 s on an idle machine and minutes on a "
                     "busy one (benchmarks/RESULTS.md); your CPU differs. "
                     "In Colab: Runtime > Change runtime type > GPU.")
    if fast_mode():
        notes.append("FAST MODE (BNVIZ_FAST=1): small data and few steps; numbers are rough.")
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "plotly": _version("plotly"),
        "ipywidgets": _version("ipywidgets"),
        "d2l": _version("d2l"),
        "bnviz": _version("bnviz"),
        "device": device,
        "dataset": dataset,
        "fashion_mnist_present": present,
        "fast_mode": fast_mode(),
        "notes": notes,
    }


def default_seeds(cuda: bool | None = None) -> tuple[int, ...]:
    """The seeds of a comparison: 5 on a GPU, 3 on a CPU (2 in fast mode, only to check the
    notebooks run)."""
    if fast_mode():
        return (0, 1)
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    return (0, 1, 2, 3, 4) if cuda else (0, 1, 2)


class Chapter:
    """One chapter's setup: the header every chapter prints (:func:`chapter`) and the chapter's
    p-value ledger, the family Holm's correction runs over.

    ``record(name, v)`` keeps the p-value of a verdict (a :class:`~bnviz.verdicts.Verdict` or
    :class:`~bnviz.verdicts.Paired`) and returns it bound to the ledger, so that it says whether
    it holds after Holm or is nominal (:meth:`~bnviz.verdicts.Verdict.holm_status`). No test is
    counted twice: a name recorded again with the same test is kept once; a name recorded again
    with a different test is refused (ValueError); the same test (same arms, same per-seed
    values) under a second name is an alias of the first, not a second member of the family.
    ``holm()`` gives the adjusted p-values, ``kept()`` the names that hold after Holm,
    ``report()`` prints the count of comparisons and those names, and closes the family (statuses
    printed before it say "so far"). ``verdicts`` keeps each recorded verdict, by name."""

    def __init__(self, name: str, seeds: tuple[int, ...]):
        self.name, self.seeds = name, tuple(seeds)
        self.pvalues: dict[str, float] = {}
        self.verdicts: dict = {}
        self.aliases: dict[str, str] = {}
        self._signatures: dict[tuple, str] = {}
        self.closed = False

    @staticmethod
    def _signature(v) -> tuple:
        """What makes two recorded tests the same test: the same two arms (what was trained, in
        either order) for a Verdict of cells; else the arms' per-seed values; the numbers for a
        Paired."""
        ref, other = getattr(v, "reference", None), getattr(v, "other", None)
        if ref is not None and other is not None and ref.arm and other.arm:
            return ("arms", tuple(sorted([ref.arm, other.arm])))
        if ref is not None and other is not None and ref.raw is not None and other.raw is not None:
            if not any(x is not None for x in ref.raw) or not any(x is not None for x in other.raw):
                return ("untested", id(v))  # nothing to compare: never the same test as another
            arms = sorted([tuple(ref.raw), tuple(other.raw)], key=repr)
            return ("verdict", tuple(arms))
        return ("paired", round(float(v.delta), 12), round(float(v.p), 12), int(getattr(v, "n", 0) or 0))

    def record(self, name: str, v):
        """Keep ``v``'s p-value under ``name`` in this chapter's family and return ``v`` bound to
        the ledger (see the class docstring for duplicates)."""
        from dataclasses import replace

        sig = self._signature(v)
        if name in self.pvalues or name in self.aliases:
            first = self.aliases.get(name, name)
            if self._signatures.get(sig) != first:
                raise ValueError(f"{name!r} is already in {self.name}'s ledger with another test; a test is "
                                 "recorded once: give this one its own name")
            return replace(v, ledger=(self, first))
        if sig in self._signatures:  # the same test under another name: one member of the family
            first = self._signatures[sig]
            self.aliases[name] = first
            return replace(v, ledger=(self, first))
        if self.closed:
            raise ValueError(f"{self.name}'s family was closed by report(); record every test before it")
        self.pvalues[name] = float(v.p)
        self._signatures[sig] = name
        bound = replace(v, ledger=(self, name))
        self.verdicts[name] = bound
        return bound

    def bind(self, v):
        """``v`` bound to its entry when the same test is in the ledger (under any name), so it
        reads 'holds after Holm' or 'nominal'; else ``v`` unchanged (a decided verdict outside
        the family then reads as nominal). Never adds a test."""
        from dataclasses import replace

        name = self._signatures.get(self._signature(v))
        return replace(v, ledger=(self, name)) if name is not None else v

    def holm(self) -> dict[str, float]:
        from .verdicts import holm

        return dict(zip(self.pvalues, holm(list(self.pvalues.values()))))

    def kept(self, alpha: float = 0.05) -> list[str]:
        return [k for k, p in self.holm().items() if p < alpha]

    def status(self, name: str) -> str:
        """'holds after Holm' or 'nominal' for a decided test, '' for one within noise."""
        v = self.verdicts[self.aliases.get(name, name)]
        return v.holm_status(words=False) if hasattr(v, "names") else (
            "" if not v.significant else ("holds after Holm" if self.holm()[self.aliases.get(name, name)] < v.alpha
                                          else "nominal"))

    def report(self, what: str = "this chapter") -> None:
        """Print the count of comparisons, how many Holm keeps and which; close the family."""
        from .verdicts import multiplicity_note

        self.closed = True
        print(multiplicity_note(list(self.pvalues.values()), what=what))
        kept = self.kept()
        print("verdicts that hold after Holm's correction: " + ("; ".join(kept) if kept else "none"))
        if self.aliases:
            print("counted once (the same test under two names): "
                  + "; ".join(f"{a} = {b}" for a, b in self.aliases.items()))


def chapter(name: str) -> Chapter:
    """Print the header every chapter starts with (the chapter, the data set, the sizes and their
    mode, the seeds a comparison uses, the machine) and return the chapter's :class:`Chapter`."""
    env = environment_report()
    mode = "fast (BNVIZ_FAST=1)" if env["fast_mode"] else "full"
    seeds = default_seeds()
    print(f"chapter {name}")
    print(f"  data set: {env['dataset']}")
    print(f"  mode: {mode}; sizes: {sizes()}; seeds of a comparison: {list(seeds)}")
    print(f"  machine: {env['device']}; python {env['python']}, torch {env['torch']}")
    for note in env["notes"]:
        print(f"  note: {note}")
    return Chapter(name, seeds)
