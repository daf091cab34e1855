"""A grid of 8 runs trained at once (``bnviz.grid.train_grid``) vs the same 8 runs one after another.

    .venv/bin/python benchmarks/grid_speed.py                 # CPU: 4000 examples x 1 epoch
    .venv/bin/python benchmarks/grid_speed.py --quick         # crash test (tiny sizes)
    .venv/bin/python benchmarks/grid_speed.py --device cuda   # 60k x 10 epochs (the issue's target: <= 3 s)

On CUDA ``train_grid`` stacks the 8 models into one vmapped network; on a CPU (where that was
measured slower) it trains them as parallel solo runs, one thread per core
(``--vectorize yes`` forces the vmapped network on a CPU too).

The grid: LeNet-BN (nn.BatchNorm, avg pool, sigmoid), 8 seeds, batch 256, lr 1.0, on the
SYNTHETIC stand-in (same shape as Fashion-MNIST; speed does not depend on the pixels). Both
ways are timed in this one process, warm (one small warm-up of each first), and interleaved:
``--repeats`` rounds of (grid, sequential) or (sequential, grid), alternating which goes
first; the sums over the rounds are compared. Times are wall-clock seconds of the whole call
(setup, per-epoch test evaluation and, on CUDA, capture included); the training-only time
(``History.train_time_s``) and this process's CPU seconds are printed too, because the CPU
machine is shared (its load average is printed first).

The last line is ``ratio grid/sequential: X``: X = sequential seconds / grid seconds (the
speed-up of the grid; > 1 means the grid is faster).
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from bnviz import Config, make_synthetic, preset
from bnviz.data import resolve_device
from bnviz.grid import train_grid
from bnviz.train import Trainer


def configs(n_runs: int, epochs: int, batch_size: int, device: str, fast: str) -> list[Config]:
    return [Config(model=preset("lenet-bn"), dataset="synthetic", batch_size=batch_size, lr=1.0,
                   epochs=epochs, seed=seed, device=device, fast=fast, snapshot_every=50)
            for seed in range(n_runs)]


def timed(fn) -> tuple[float, float, object]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t, time.process_time() - c, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--runs", type=int, default=8)
    p.add_argument("--train-size", type=int, default=None, help="default: 60000 on CUDA, 4000 on CPU")
    p.add_argument("--test-size", type=int, default=None, help="default: 10000 on CUDA, 1000 on CPU")
    p.add_argument("--epochs", type=int, default=None, help="default: 10 on CUDA, 1 on CPU")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2, help="rounds of (grid, sequential)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for both ways (default: torch's own, the number of cores)")
    p.add_argument("--vectorize", choices=("auto", "yes", "no"), default="auto",
                   help="train_grid(vectorize=...): auto = vmap on CUDA, parallel solo runs on a CPU")
    p.add_argument("--fast", default="auto", help="Config.fast of every run (sequential runs use it too)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a crash test, not a measurement")
    a = p.parse_args()
    device = resolve_device(a.device)
    cuda = device.type == "cuda"
    if a.threads:
        torch.set_num_threads(a.threads)
    vectorize = {"auto": None, "yes": True, "no": False}[a.vectorize]
    n_train = a.train_size or (300 if a.quick else 60000 if cuda else 4000)
    n_test = a.test_size or (100 if a.quick else 10000 if cuda else 1000)
    epochs = a.epochs or (1 if a.quick or not cuda else 10)
    repeats = 1 if a.quick else a.repeats
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if cuda else "")
          + (f", load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""))
    data = make_synthetic(n_train, n_test, seed=0, device=device)
    grid = configs(a.runs, epochs, a.batch_size, str(device), a.fast)
    print(f"grid: {a.runs} x LeNet-BN (seeds 0..{a.runs - 1}), batch {a.batch_size}, lr 1.0, "
          f"{n_train} train / {n_test} test (SYNTHETIC), {epochs} epoch(s), fast={a.fast!r}, "
          f"vectorize={a.vectorize}")

    def run_grid():
        return train_grid(grid, data=data, progress=False, vectorize=vectorize)

    def run_sequential():
        return [Trainer(c, data=data).fit() for c in grid]

    warm = make_synthetic(2 * a.batch_size + 10, 100, seed=1, device=device)  # warm-up: both shapes
    small = [c.replace(epochs=1) for c in grid]
    train_grid(small, data=warm, progress=False, vectorize=vectorize)
    [Trainer(c, data=warm).fit() for c in small]

    total = {"grid": [0.0, 0.0, 0.0], "sequential": [0.0, 0.0, 0.0]}
    for r in range(repeats):
        order = [("grid", run_grid), ("sequential", run_sequential)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            wall, cpu, hists = timed(fn)
            # a vmapped group shares one train time; parallel solo runs overlap (their sum
            # counts seconds on several cores at once): the longest run is printed
            train = max(h.train_time_s for h in hists) if name == "grid" else sum(h.train_time_s for h in hists)
            for i, v in enumerate((wall, cpu, train)):
                total[name][i] += v
            accs = [h.final_test_acc for h in hists]
            print(f"round {r + 1} {name:10s}: {wall:7.2f} s wall, {cpu:7.2f} s CPU, {train:7.2f} s training; "
                  f"test acc {min(accs):.3f}..{max(accs):.3f}; statuses {sorted({h.status for h in hists})}")
            notes = {h.message for h in hists if h.message}
            if notes:
                print("   notes:", " | ".join(sorted(notes))[:400])
    (gw, gc, gt), (sw, sc, st) = total["grid"], total["sequential"]
    print(f"total over {repeats} round(s): grid {gw:.2f} s wall ({gt:.2f} s longest training, {gc:.2f} s CPU); "
          f"sequential {sw:.2f} s wall ({st:.2f} s training, {sc:.2f} s CPU)")
    print(f"CPU-time ratio: {sc / gc:.2f} (sequential CPU seconds / grid CPU seconds: how much less "
          f"work the grid did; the wall-clock ratio below also counts idle cores)")
    print(f"ratio grid/sequential: {sw / gw:.2f}")


if __name__ == "__main__":
    main()
