"""The training loop behind every grid run, written out in plain PyTorch (chapter 05 shows it).

:func:`plain_train` does what :class:`bnviz.Trainer` and :func:`bnviz.grid.train_grid` do for
one LeNet config, without their machinery (snapshots, live changes, fast paths, divergence
checks): the same seeding, the same batches, the same SGD step, the same evaluations. A test
(tests/test_plain_loop.py) checks that its numbers equal a grid member's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import Config
from .data import Dataset, to_float
from .models import build_lenet, init_weights
from .precise import precise_bn_accuracy
from .stats import bn_layers

__all__ = ["plain_train"]


def plain_train(cfg: Config, data: Dataset, precise_bn: int | None = None) -> dict:
    """Train ``cfg``'s LeNet on ``data`` with plain SGD; returns ``{'model', 'loss', 'test_acc',
    'precise_test_acc'}``: per epoch, the mean training loss, the eval-mode test accuracy (moving
    averages) and, with ``precise_bn=N`` and a BN model, the test accuracy with BN statistics
    recomputed on the first N training images."""
    torch.manual_seed(cfg.seed)  # the seed decides the initial weights ...
    model = init_weights(build_lenet(cfg.model), cfg.init).to(data.device)
    for m in bn_layers(model).values():
        m.momentum, m.eps = cfg.bn_momentum, cfg.eps
    gen = torch.Generator(device=data.device).manual_seed(cfg.seed)  # ... and the batch order
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n, bs = len(data.train_x), cfg.batch_size
    stop = n - n % bs if cfg.drop_last or (bs > 1 and n % bs == 1) else n  # no batch of one for BN
    out = {"loss": [], "test_acc": [], "precise_test_acc": []}
    for _ in range(cfg.epochs):
        model.train()
        order = torch.randperm(n, device=data.device, generator=gen)
        total, seen = 0.0, 0
        for start in range(0, stop, bs):
            idx = order[start:start + bs]
            loss = F.cross_entropy(model(to_float(data.train_x[idx])), data.train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, seen = total + loss.item() * len(idx), seen + len(idx)
        out["loss"].append(total / seen)
        model.eval()
        with torch.no_grad():
            pred = model(to_float(data.test_x)).argmax(1)
        out["test_acc"].append(float((pred == data.test_y).float().mean()))
        if precise_bn and bn_layers(model):
            out["precise_test_acc"].append(precise_bn_accuracy(model, data, precise_bn))
    out["model"] = model
    return out
