"""What does the lab cost? Training throughput with the dashboard attached against none.

Both sides train the same Config (the lab's default run: LeNet-BN, batch 256, the lab's snapshot
frequency of ~25 snapshots per epoch, as fast as possible: no watchable pace) on the same
pre-loaded data, in this process:

* headless:  ``Trainer(cfg).start()`` + ``join()`` (a background thread, as in the lab), no callback;
* dashboard: ``Lab.run_clicked()`` + ``Lab.wait()``: the lab is a callback of the training
  thread; it updates the three plotly FigureWidgets and the status line exactly as in a
  notebook (no browser attached, so the comm messages go nowhere; the Python-side cost of
  building and validating the updates is what is measured).

The two alternate ``repeats`` times after one warm-up run of each; throughput is
``History.examples_per_s`` (training time only, evaluation and setup excluded) and the medians
are compared. From code (``benchmarks/gpu_speed.py`` does this)::

    from dashboard_overhead import measure
    r = measure(device="cuda", train_size=60000, test_size=10000, epochs=2, repeats=3)
    r["fraction"]  # dashboard / headless examples per second (target >= 0.90)

From the shell, the last line is ``ratio dashboard/headless: X.XX``::

    python benchmarks/dashboard_overhead.py [--train-size 10000] [--epochs 1] [--repeats 3] [--device auto]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from bnviz.dashboard import Lab
from bnviz.train import Trainer


def measure(device: str = "auto", train_size: int = 10000, test_size: int = 2000, epochs: int = 1,
            repeats: int = 3, dataset: str = "synthetic", log=None) -> dict:
    """Median training throughput headless and with the lab attached (alternating, after a
    warm-up of each). ``log``: a function for progress lines (e.g. ``print``), or None.

    Returns a dict: ``headless`` and ``dashboard`` (median examples/s), ``fraction`` (their
    ratio, dashboard/headless; also under ``ratio``), the per-repeat rates, ``draws`` and
    ``draw_ms`` (the lab's redraws and their mean cost), ``config`` (the run's description),
    ``dataset``, ``device`` and the arguments."""
    say = log or (lambda *_: None)
    lab = Lab(dataset=dataset, train_size=train_size, test_size=test_size, epochs=epochs, device=device,
              pace="fast")
    cfg = lab.config()
    say(f"config: {cfg.describe()}; {train_size} examples x {epochs} epoch(s), snapshot every "
        f"{cfg.snapshot_every} steps; torch threads {torch.get_num_threads()}")

    def headless() -> float:
        # in a background thread like the lab's run (torch's intra-op threading can differ
        # between the main thread and others); the data set comes from the per-process cache
        t = Trainer(cfg)
        t.start()
        h = t.join()
        if h.status != "finished":
            raise RuntimeError(f"the headless run ended {h.status}: {h.message}")
        return h.examples_per_s

    def dashboard() -> float:
        draws = lab.draw_count
        h = lab.run_clicked()
        lab.wait()
        if h.status != "finished":
            raise RuntimeError(f"the dashboard run ended {h.status}: {h.message}")
        if lab.draw_count <= draws:
            raise RuntimeError("the dashboard did not draw")
        return h.examples_per_s

    t0 = time.perf_counter()
    headless(), dashboard()  # warm-up: data set generation, compile/capture, first FigureWidget updates
    h = lab.histories[-1]
    say(f"data: {h.dataset_label}; device {h.device}; warm-up {time.perf_counter() - t0:.1f} s")
    rates = {"headless": [], "dashboard": []}
    for i in range(repeats):
        for name, fn in (("headless", headless), ("dashboard", dashboard)):
            rates[name].append(fn())
            say(f"  repeat {i + 1} {name:9s} {rates[name][-1]:9.0f} examples/s")
    med = {k: statistics.median(v) for k, v in rates.items()}
    frac = med["dashboard"] / med["headless"]
    return {"headless": med["headless"], "dashboard": med["dashboard"], "fraction": frac, "ratio": frac,
            "rates": rates, "draws": lab.draw_count, "draw_ms": 1000 * lab.draw_time_s / max(lab.draw_count, 1),
            "config": cfg.describe(), "dataset": h.dataset_label, "device": h.device, "train_size": train_size,
            "test_size": test_size, "epochs": epochs, "repeats": repeats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-size", type=int, default=10000)
    ap.add_argument("--test-size", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dataset", default="synthetic")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    r = measure(device=args.device, train_size=args.train_size, test_size=args.test_size, epochs=args.epochs,
                repeats=args.repeats, dataset=args.dataset, log=print)
    print(f"dashboard draws: {r['draws']} in total, {r['draw_ms']:.1f} ms each on average")
    print(f"headless  median: {r['headless']:.0f} examples/s")
    print(f"dashboard median: {r['dashboard']:.0f} examples/s")
    print(f"ratio dashboard/headless: {r['fraction']:.2f}")


if __name__ == "__main__":
    main()
