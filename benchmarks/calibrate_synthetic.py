"""Calibrate the SYNTHETIC stand-in (bnviz.data.make_synthetic) against the d2l recipes.

Prints, for the synthetic data set (not Fashion-MNIST):
  * pixel mean / std after /255 (Fashion-MNIST train: 0.2860 / 0.3530),
  * the test accuracy of a nearest-class-mean classifier on raw pixels,
  * per epoch, train loss, train accuracy and test accuracy of
      - d2l's plain LeNet (preset 'lenet': sigmoid, avg pool, padding 2) at lr 0.9,
      - d2l's LeNet-BN (preset 'lenet-bn': nn.BatchNorm, avg pool, padding 0) at lr 1.0,
    both with d2l's init (xavier uniform, ``init_weights(model, 'd2l')``), plain SGD, batch 256,
    a random permutation per epoch, cross-entropy, evaluation in ``model.eval()``.

A self-contained loop (not bnviz.train), so its numbers depend only on the data and the model.
It is a benchmark, not a test. Full size (60k/10k, 10 epochs) takes minutes on a CPU:

    python benchmarks/calibrate_synthetic.py                       # both models, full size
    python benchmarks/calibrate_synthetic.py --models lenet        # one model
    python benchmarks/calibrate_synthetic.py --train-size 20000 --epochs 5   # a quick look
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from bnviz.data import make_synthetic
from bnviz.models import build_lenet, init_weights

RECIPES = {"lenet": 0.9, "lenet-bn": 1.0}  # d2l's learning rates


def data_summary(ds) -> dict:
    x = ds.train_x.float() / 255
    flat = ds.train_x.flatten(1).float()
    means = torch.stack([flat[ds.train_y == c].mean(0) for c in range(10)])
    pred = torch.cdist(ds.test_x.flatten(1).float(), means).argmin(1)
    return {"mean": x.mean().item(), "std": x.std().item(),
            "zero_fraction": (ds.train_x == 0).float().mean().item(),
            "ncm_test_acc": (pred == ds.test_y).float().mean().item(),
            "class_counts": torch.bincount(ds.train_y, minlength=10).tolist()}


def train(ds, preset: str, lr: float, epochs: int, batch_size: int = 256, seed: int = 0, log=print) -> list[dict]:
    torch.manual_seed(seed)
    model = init_weights(build_lenet(preset), "d2l")
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    x, y = ds.train_x.float() / 255, ds.train_y
    xt, yt = ds.test_x.float() / 255, ds.test_y
    rows = []
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(len(x))
        total_loss = correct = 0.0
        for s in range(0, len(x), batch_size):
            idx = perm[s:s + batch_size]
            out = model(x[idx])
            loss = loss_fn(out, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total_loss += loss.item() * len(idx)
            correct += (out.argmax(1) == y[idx]).sum().item()
        model.eval()
        with torch.no_grad():
            test_correct = sum((model(xt[s:s + 2000]).argmax(1) == yt[s:s + 2000]).sum().item()
                               for s in range(0, len(xt), 2000))
        row = {"model": preset, "lr": lr, "epoch": epoch, "loss": total_loss / len(x),
               "train_acc": correct / len(x), "test_acc": test_correct / len(xt),
               "seconds": time.perf_counter() - start}
        rows.append(row)
        log(f"  {preset:9s} lr {lr:<4g} epoch {epoch:2d}  loss {row['loss']:.3f}  train acc {row['train_acc']:.3f}"
            f"  test acc {row['test_acc']:.3f}  ({row['seconds']:.0f} s)", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-size", type=int, default=60000)
    p.add_argument("--test-size", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="data seed and training seed")
    p.add_argument("--models", default="lenet,lenet-bn", help="comma-separated: lenet, lenet-bn")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    ds = make_synthetic(a.train_size, a.test_size, seed=a.seed)
    gen = time.perf_counter() - t0
    info = data_summary(ds)
    print(f"SYNTHETIC stand-in (not Fashion-MNIST): {a.train_size} train / {a.test_size} test, seed {a.seed},"
          f" generated in {gen:.1f} s, {a.threads} threads")
    print(f"pixel mean {info['mean']:.4f}  std {info['std']:.4f}  (Fashion-MNIST train: 0.2860 / 0.3530)")
    print(f"zero pixels {info['zero_fraction']:.3f};  train examples per class {info['class_counts']}")
    print(f"nearest-class-mean test accuracy {info['ncm_test_acc']:.4f}")
    results = {}
    for preset in a.models.split(","):
        print(f"training {preset} (d2l init, SGD lr {RECIPES[preset]}, batch 256, {a.epochs} epochs)")
        results[preset] = train(ds, preset, RECIPES[preset], a.epochs, seed=a.seed)
    print("\n| epoch | " + " | ".join(f"{m} test acc (loss)" for m in results) + " |")
    print("|---|" + "---|" * len(results))
    for e in range(a.epochs):
        print(f"| {e + 1} | " + " | ".join(f"{results[m][e]['test_acc']:.3f} ({results[m][e]['loss']:.3f})"
                                           for m in results) + " |")


if __name__ == "__main__":
    main()
