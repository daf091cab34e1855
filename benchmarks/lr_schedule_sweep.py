"""Constant lr against linear decay to zero (Li, Yumer & Ramanan 2020), with the same steps:
chapter 05's lr sweep (LeNet-BN and the same net without BN, 3 seeds) at its CPU size
(8,000 × 16 epochs of batch 128 = 1,008 steps), both schedules in one run of this script.

Prints, per schedule, each (model, lr) cell's accuracy and convergence grade (far from converged
/ nearly converged / none), how many cells are "far from converged", and the BN-vs-no-BN verdict
per lr; then which verdicts changed. Saves the Histories to ``--out`` (JSON, merged).

    BNVIZ_DATASET=synthetic python benchmarks/lr_schedule_sweep.py [--lrs 0.3 1 3 10] [--seeds 3]

The numbers are SYNTHETIC-data numbers (the stand-in data set), not Fashion-MNIST.
"""
from __future__ import annotations

import argparse
import os
import time

from bnviz import Config, load_dataset, preset
from bnviz.history import save_histories
from bnviz.sweeps import lr_sweep
from bnviz.verdicts import CauseKind


def grade(cell) -> str:
    kinds = {c.kind for c in cell.causes}
    for k in (CauseKind.NEVER_LEFT_CHANCE, CauseKind.STILL_IMPROVING, CauseKind.NEARLY_CONVERGED):
        if k in kinds:
            return k.value
    return "settled"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0, 10.0, 30.0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--train", type=int, default=8000)
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--out", default="")
    ap.add_argument("--schedules", nargs="+", default=["constant", "linear"], choices=["constant", "linear"])
    a = ap.parse_args()
    data = load_dataset(None, device="cpu", train_size=a.train, test_size=2000)
    models = {"LeNet-BN": preset("lenet-bn"), "LeNet, no BN": preset("lenet-bn", norm="none")}
    verdicts, t0 = {}, time.perf_counter()
    for sched in a.schedules:
        base = Config(model=preset("lenet-bn"), dataset=data.name, batch_size=128, lr=1.0, epochs=a.epochs,
                      snapshot_every=25, device="cpu", lr_schedule=sched)
        sweep = lr_sweep(base, a.lrs, models, seeds=range(a.seeds), data=data, progress=False)
        if a.out:
            save_histories([r.history for r in sweep], a.out)
        far = 0
        print(f"\n== {sched} lr ({data.label}; {a.train} × {a.epochs} epochs of batch 128; {a.seeds} seeds; "
              f"{time.perf_counter() - t0:.0f} s so far, load {os.getloadavg()[0]:.1f})")
        for m in models:
            for lr in a.lrs:
                c = sweep.cell(model=m, lr=lr)
                g = grade(c)
                far += g == CauseKind.STILL_IMPROVING.value
                vals = " ".join("div" if v is None else f"{v:.3f}" for v in c.values())
                print(f"  {m:13s} lr {lr:<5g} acc {vals:24s} {g}")
        print(f"  cells far from converged: {far} of {2 * len(a.lrs)}")
        for lr in a.lrs:
            v = sweep.cell(model="LeNet-BN", lr=lr).vs(sweep.cell(model="LeNet, no BN", lr=lr))
            verdicts.setdefault(lr, {})[sched] = v
            print(f"  lr {lr:<5g} BN vs no BN: {v}")
    if len(a.schedules) == 2:
        changed = [lr for lr, d in verdicts.items() if d["constant"].decided != d["linear"].decided
                   or d["constant"].decided and (d["constant"].delta > 0) != (d["linear"].delta > 0)]
        print(f"\nverdicts whose decision changed with the schedule: {changed or 'none'}")
    print(f"total {time.perf_counter() - t0:.0f} s, load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
