"""What does the lab cost? Training throughput with the dashboard attached against none.

Both sides train the same Config (the lab's default CPU run: LeNet-BN, batch 256, the lab's
snapshot frequency of ~25 snapshots per epoch) on the same pre-loaded data, in this process:

* headless:  ``Trainer(cfg).start()`` + ``join()`` (a background thread, as in the lab), no callback;
* dashboard: ``Lab.run_clicked()`` + ``Lab.wait()``: the training thread calls the lab's snapshot
  callback, which updates the three plotly FigureWidgets and the status line exactly as in a
  notebook (no browser attached, so the comm messages go nowhere; the Python-side cost of
  building and validating the updates is what is measured).

The two alternate ``--repeats`` times after one warm-up run of each; throughput is
``History.examples_per_s`` (training time only, evaluation excluded) and the medians are
compared. The last line is ``ratio dashboard/headless: X.XX`` (target >= 0.90).

    python benchmarks/dashboard_overhead.py [--train-size 10000] [--epochs 1] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from bnviz.dashboard import Lab
from bnviz.train import Trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-size", type=int, default=10000)
    ap.add_argument("--test-size", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dataset", default="synthetic")
    args = ap.parse_args()

    lab = Lab(dataset=args.dataset, train_size=args.train_size, test_size=args.test_size, epochs=args.epochs)
    cfg = lab.config()
    print(f"config: {cfg.describe()}; {args.train_size} examples x {args.epochs} epoch(s), "
          f"snapshot every {cfg.snapshot_every} steps; torch threads {torch.get_num_threads()}")

    def headless() -> float:
        # in a background thread like the lab's run (torch's intra-op threading can differ
        # between the main thread and others); the data set comes from the per-process cache
        t = Trainer(cfg)
        t.start()
        h = t.join()
        assert h.status == "finished", h.message
        return h.examples_per_s

    def dashboard() -> float:
        draws = lab.draw_count
        h = lab.run_clicked()
        lab.wait()
        assert h.status == "finished", h.message
        assert lab.draw_count > draws, "the dashboard did not draw"
        return h.examples_per_s

    t0 = time.perf_counter()
    headless(), dashboard()  # warm-up: data set generation, first FigureWidget updates
    label = lab.histories[-1].dataset_label
    print(f"data: {label}; warm-up {time.perf_counter() - t0:.1f} s")
    rates = {"headless": [], "dashboard": []}
    for i in range(args.repeats):
        for name, fn in (("headless", headless), ("dashboard", dashboard)):
            rates[name].append(fn())
            print(f"  repeat {i + 1} {name:9s} {rates[name][-1]:9.0f} examples/s")
    draws, draw_s = lab.draw_count, lab.draw_time_s
    print(f"dashboard draws: {draws} in total, {1000 * draw_s / max(draws, 1):.1f} ms each on average")
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"headless  median: {med['headless']:.0f} examples/s")
    print(f"dashboard median: {med['dashboard']:.0f} examples/s")
    print(f"ratio dashboard/headless: {med['dashboard'] / med['headless']:.2f}")


if __name__ == "__main__":
    main()
