"""Training throughput: bnviz's Trainer vs d2l's ``train_ch6`` on the same data and device.

    .venv/bin/python benchmarks/throughput.py              # what `make bench` runs (5 rounds)
    .venv/bin/python benchmarks/throughput.py --rounds 9 --epochs 2 --train-size 20000 --profile

What is timed (same model, batch size, learning rate, examples and device for every row):

* ``bnviz nn.BatchNorm``: ``Trainer(Config(model=preset("lenet-bn"), ...)).fit()``: data resident
  on the device as uint8, batches sliced from an on-device permutation, metrics copied to the
  host once per snapshot (every 50 steps), the test set evaluated at every epoch end.
* ``bnviz scratch BN``: the same with ``norm='scratch'`` (:class:`bnviz.norms.BatchNorm`).
* ``d2l train_ch6``: ``d2l.train_ch6(net, train_iter, test_iter, epochs, lr, device)`` fed the
  way ``d2l.load_data_fashion_mnist`` feeds it: a torchvision-style Dataset that returns
  ``ToTensor()(PIL.Image.fromarray(uint8 28×28))`` per sample, in a ``DataLoader`` with
  ``d2l.get_dataloader_workers()`` (= 4) worker processes. Its ``Animator`` draws with
  matplotlib (Agg backend); each ``display(fig)`` renders the figure to SVG exactly as
  JupyterLab's inline backend does, so the drawing cost a learner pays is included.

Examples/s = training examples (epochs × train size) / wall-clock seconds of the whole call,
per-epoch test evaluation included for every row (each tool's own figure, which leaves the
evaluation out, is printed too). Every run is preceded by a warm-up run on a few hundred
examples. The data is the SYNTHETIC stand-in (same shape as Fashion-MNIST): throughput does not
depend on pixel values.

One run of each side is too noisy to judge a threshold (five single runs on an idle 2-core CPU
gave ratios 1.86-3.57). So ``--rounds N`` (default 5) times bnviz nn.BatchNorm and d2l N times
each, alternately (the order swaps every round, so a slow spell of the machine hits both sides),
prints each round's ratio and ends with ``ratio bnviz/d2l: median X.XX (range A-B over N rounds)``,
the median of the per-round ratios. The scratch-BN row is timed once.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import re
import statistics
import time
import warnings

import matplotlib

matplotlib.use("Agg")  # before d2l imports pyplot: draw off-screen, never show

import torch  # noqa: E402

from bnviz import Config, Trainer, build_lenet, make_synthetic, preset  # noqa: E402
from bnviz.data import Dataset, resolve_device  # noqa: E402

LENET_BN = preset("lenet-bn")


# ----------------------------------------------------------------------------- machine


def machine_info(device: torch.device) -> dict:
    """Device, versions and CPU facts printed with every benchmark."""
    info = {
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    try:
        import d2l

        info["d2l"] = getattr(d2l, "__version__", "?")
    except ImportError:
        info["d2l"] = None
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    try:
        info["load_avg_1min"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- bnviz


def bnviz_config(norm: str, epochs: int, device: torch.device, fast: str = "eager", batch_size=256,
                 lr=1.0) -> Config:
    return Config(model=LENET_BN.replace(norm=norm), dataset="synthetic", batch_size=batch_size,
                  lr=lr, epochs=epochs, seed=0, device=str(device), snapshot_every=50,
                  fast=fast, label=f"bnviz {norm}")


def time_bnviz(data: Dataset, norm: str, epochs: int, fast: str = "eager", warmup: int = 512,
               batch_size: int = 256, lr: float = 1.0) -> dict:
    """Warm up on ``warmup`` examples (CUDA context, cuDNN, inductor's cache), then time a full
    ``Trainer.fit()``. ``wall_s`` is the training loop with its per-epoch test evaluation;
    ``setup_s`` (building the model, compiling and capturing the step) is reported apart."""
    device = data.device
    cfg = bnviz_config(norm, epochs, device, fast, batch_size, lr)
    warm_s = 0.0
    if warmup:
        n_warm = min(len(data.train_x), max(warmup, batch_size + len(data.train_x) % batch_size))
        small = data.subset(n_warm, min(len(data.test_x), 512))
        t = time.perf_counter()
        hw = Trainer(cfg.replace(epochs=1), data=small).fit()
        sync(device)
        warm_s = time.perf_counter() - t
        if hw.status != "finished":
            raise RuntimeError(f"bnviz {norm} warm-up ended {hw.status}: {hw.message}")
    sync(device)
    trainer = Trainer(cfg, data=data)
    h = trainer.fit()
    sync(device)
    wall = h.wall_time_s - h.setup_time_s
    n = epochs * len(data.train_x)
    if h.status != "finished":
        raise RuntimeError(f"bnviz {norm} run ended {h.status}: {h.message}")
    captured = trainer.captured.info if trainer.captured is not None else None
    return {"name": f"bnviz {'nn.BatchNorm' if norm == 'torch' else 'scratch BN'}"
                    + ("" if fast == "eager" else f" fast={fast}"),
            "norm": norm, "fast": fast, "examples": n, "wall_s": wall, "setup_s": h.setup_time_s,
            "examples_per_s": n / wall, "own_examples_per_s": h.examples_per_s,
            "test_acc": h.final_test_acc, "message": h.message, "warmup_s": warm_s,
            "captured": captured}


# ----------------------------------------------------------------------------- d2l


class PILDataset(torch.utils.data.Dataset):
    """What ``torchvision.datasets.FashionMNIST`` + ``transforms.ToTensor()`` do per sample:
    a uint8 28×28 array -> ``PIL.Image`` (mode 'L') -> float tensor (1, 28, 28) in [0, 1]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        from torchvision import transforms

        self.data = images.reshape(-1, 28, 28).cpu()
        self.targets = labels.cpu()
        self.transform = transforms.ToTensor()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        from PIL import Image

        img = Image.fromarray(self.data[i].numpy(), mode="L")
        return self.transform(img), int(self.targets[i])


class _SVGDisplay:
    """Stands in for ``IPython.display`` inside d2l: ``display(fig)`` renders the figure to SVG
    the way the inline backend does in a notebook, and throws the bytes away."""

    renders = 0

    def display(self, *objs, **kwargs):
        from IPython.core.pylabtools import print_figure

        for fig in objs:
            print_figure(fig, "svg", bbox_inches="tight")
            _SVGDisplay.renders += 1

    def clear_output(self, wait=False):
        pass


def d2l_loaders(data: Dataset, batch_size: int = 256, workers: int | None = None):
    """``d2l.load_data_fashion_mnist(batch_size)`` on the given tensors."""
    from d2l import torch as d2l

    workers = d2l.get_dataloader_workers() if workers is None else workers
    train = torch.utils.data.DataLoader(PILDataset(data.train_x, data.train_y), batch_size,
                                        shuffle=True, num_workers=workers)
    test = torch.utils.data.DataLoader(PILDataset(data.test_x, data.test_y), batch_size,
                                       shuffle=False, num_workers=workers)
    return train, test


def run_d2l(data: Dataset, epochs: int, device: torch.device, lr: float = 1.0,
            batch_size: int = 256, workers: int | None = None) -> tuple[float, str]:
    """One ``d2l.train_ch6`` call; returns (wall seconds, what it printed)."""
    import matplotlib.pyplot as plt
    from d2l import torch as d2l

    d2l.display = _SVGDisplay()  # the Animator calls d2l.display.display(fig)
    torch.manual_seed(0)
    net = build_lenet(LENET_BN)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        # d2l uses 4 DataLoader workers whatever the machine (PyTorch warns on 2 cores) and
        # sets xlim [1, 1] for one epoch (matplotlib warns).
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        warnings.filterwarnings("ignore", message="Attempting to set identical low and high xlims")
        train_iter, test_iter = d2l_loaders(data, batch_size, workers)
        sync(device)
        t = time.perf_counter()
        d2l.train_ch6(net, train_iter, test_iter, epochs, lr, device)
    sync(device)
    wall = time.perf_counter() - t
    plt.close("all")
    return wall, out.getvalue()


def time_d2l(data: Dataset, epochs: int, device: torch.device, warmup: int = 512, lr: float = 1.0,
             batch_size: int = 256, workers: int | None = None) -> dict:
    if warmup:  # train_ch6 needs at least 5 batches per epoch (it plots every num_batches // 5)
        n_warm = min(len(data.train_x), max(warmup, 5 * batch_size))
        run_d2l(data.subset(n_warm, min(512, len(data.test_x))), 1, device,
                lr, batch_size, workers)
    _SVGDisplay.renders = 0
    wall, printed = run_d2l(data, epochs, device, lr, batch_size, workers)
    n = epochs * len(data.train_x)
    own = re.search(r"([\d.]+) examples/sec", printed)
    acc = re.search(r"test acc ([\d.]+)", printed)
    return {"name": "d2l train_ch6", "examples": n, "wall_s": wall, "examples_per_s": n / wall,
            "own_examples_per_s": float(own.group(1)) if own else None,
            "test_acc": float(acc.group(1)) if acc else None, "svg_renders": _SVGDisplay.renders,
            "printed": printed.strip()}


# ----------------------------------------------------------------------------- profile


def profile_step(data: Dataset, norm: str = "torch", batch_size: int = 256, steps: int = 5,
                 row_limit: int = 15) -> str:
    """torch.profiler table (top ops by self CPU time) of ``steps`` eager training steps of the
    Trainer's step (forward + loss + backward + SGD) after 20 warm-up steps; times are totals
    over the steps, the table title gives the per-step wall time."""
    from torch.profiler import ProfilerActivity, profile

    device = data.device
    trainer = Trainer(bnviz_config(norm, 1, device, "eager", batch_size), data=data)
    trainer._setup()  # model, optimizer and sums, as fit() builds them
    gen = torch.Generator(device=device).manual_seed(0)

    def step():
        trainer.step(torch.randint(0, len(data.train_x), (batch_size,), device=device, generator=gen))

    for _ in range(20):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    per_step = (time.perf_counter() - t) / steps
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit)
    n_ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")) / steps
    return (f"profile of {steps} steps, {norm} BN, batch {batch_size} on {device}: "
            f"{per_step * 1e3:.2f} ms per step under the profiler, {n_ops:.0f} aten op calls per step\n"
            + table)


# ----------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=1, help="epochs per timed run (default 1)")
    ap.add_argument("--train-size", type=int, default=60000, help="training examples (default 60000)")
    ap.add_argument("--test-size", type=int, default=10000, help="test examples (default 10000)")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    ap.add_argument("--warmup", type=int, default=512, help="examples in each warm-up run (default 512)")
    ap.add_argument("--workers", type=int, default=None, help="d2l DataLoader workers (default d2l's: 4)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's choice, the number of cores)")
    ap.add_argument("--skip-d2l", action="store_true", help="time bnviz only (no ratio line)")
    ap.add_argument("--profile", action="store_true", help="also print a torch.profiler table of one step")
    ap.add_argument("--rounds", type=int, default=5,
                    help="bnviz and d2l timed alternately this many times; the median ratio is reported (default 5)")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    for name in ("epochs", "train_size", "test_size"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.train_size > 60000 or args.test_size > 10000:
        ap.error("--train-size is at most 60000 and --test-size at most 10000 (the synthetic set's sizes)")
    try:
        device = resolve_device(args.device)
    except (ValueError, RuntimeError) as err:
        ap.error(str(err))

    if args.threads is not None:
        if args.threads < 1:
            ap.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    data = make_synthetic(60000, 10000).subset(args.train_size, args.test_size).to(device)
    info = machine_info(device)
    print(f"device: {info['device']} ({info['device_name']}), {info['cpu_count']} CPU cores, "
          f"torch threads {info['torch_threads']}, load avg {info.get('load_avg_1min', '?')}")
    print(f"versions: python {info['python']}, torch {info['torch']}, d2l {info['d2l']}")
    print(f"data: {data.label}, {args.train_size} train / {args.test_size} test, batch 256, lr 1.0, "
          f"{args.epochs} epoch(s), LeNet-BN (avg pool, sigmoid), test evaluated every epoch")
    rows = []
    r = time_bnviz(data, "scratch", args.epochs, warmup=args.warmup)
    rows.append(r)
    _print_bnviz(r)
    if args.profile:
        for norm in ("torch", "scratch"):
            print("\n" + profile_step(data, norm))
    result = {"machine": info, "rows": rows, "args": vars(args)}
    if args.skip_d2l:
        r = time_bnviz(data, "torch", args.epochs, warmup=args.warmup)
        rows.insert(0, r)
        _print_bnviz(r)
        return result
    ratios = []
    for k in range(args.rounds):
        order = ("bnviz", "d2l") if k % 2 == 0 else ("d2l", "bnviz")
        got = {}
        for side in order:
            if side == "bnviz":
                got[side] = time_bnviz(data, "torch", args.epochs, warmup=args.warmup)
                _print_bnviz(got[side], f"round {k + 1}: ")
            else:
                got[side] = d = time_d2l(data, args.epochs, device, warmup=args.warmup, workers=args.workers)
                own = f"{d['own_examples_per_s']:.0f}/s" if d["own_examples_per_s"] else "?"
                print(f"round {k + 1}: {d['name']:<22} {d['examples_per_s']:>9.0f} examples/s  ({d['wall_s']:.2f} s "
                      f"wall; d2l's own printed figure without data loading and drawing {own}; "
                      f"{d['svg_renders']} SVG redraws; test acc {d['test_acc']})", flush=True)
        ratios.append(got["bnviz"]["examples_per_s"] / got["d2l"]["examples_per_s"])
        print(f"round {k + 1}: ratio {ratios[-1]:.2f}", flush=True)
        rows += [got["bnviz"], got["d2l"]]
    result["ratios"] = ratios
    result["ratio"] = statistics.median(ratios)
    print(f"ratio bnviz/d2l: median {result['ratio']:.2f} (range {min(ratios):.2f}-{max(ratios):.2f} over "
          f"{len(ratios)} round(s), load avg {machine_info(device).get('load_avg_1min', '?')} at the end)")
    return result


def _print_bnviz(r: dict, prefix: str = "") -> None:
    print(f"{prefix}{r['name']:<22} {r['examples_per_s']:>9.0f} examples/s  ({r['wall_s']:.2f} s wall; "
          f"trainer's own figure without evaluation {r['own_examples_per_s']:.0f}/s; "
          f"test acc {r['test_acc']:.3f})", flush=True)

if __name__ == "__main__":
    main()
