"""Train K runs at once on one device: ``train_grid(configs) -> [History]``.

A grid (several seeds, learning rates, inits...) of LeNets is K small, independent training
runs. Here the K models' parameters and buffers are stacked (``torch.func.stack_module_state``)
and one ``torch.vmap``'d ``functional_call`` runs all of them: vmap turns each convolution into
one grouped convolution and each linear layer into one batched matmul, so K models cost about
one kernel launch per op. Each model still gets its own batch, gathered from its own
permutation (an index tensor of shape (K, B)); the loss is the sum of the K mean losses (the
models share nothing, so each one's gradients are exactly its own); plain SGD uses a
per-model lr (and weight decay) vector.

Conventions:

* **Same numbers as solo.** Each History equals ``Trainer(cfg, data).fit()`` with
  ``fast='eager'`` up to float rounding (a grouped convolution sums in another order than a
  single one): same seeding (``torch.manual_seed(seed)`` before building the model, a
  ``torch.Generator(device).manual_seed(seed)`` for the batch order), the same batches and
  drop rule, the same snapshots (kinds, steps, epochs, examples), losses, accuracies, test
  accuracies, per-layer γ/β/running statistics and batch_mean/batch_var (the statistics of
  each norm layer's input in the last training batch, recorded at every step as the trainer
  does), status and message (a diverged run gets ``diagnose``'s message and
  is frozen, lr 0, while the others go on; a run that ends at chance gets the same note).
* **Grouping.** Runs share one vmap when :func:`group_key` agrees: model spec, batch size,
  epochs, drop_last, data set and sizes, device, snapshot_every, bn_momentum, eps, score_at and
  whether the step is captured. lr, lr_schedule, seed, weight_decay, init, divergence_factor and
  label may differ (the scheduled lr is a per-run vector, set before each step).
* **Where.** By default groups are vmapped on CUDA only (``train_grid(vectorize=...)``): on a
  CPU the vmapped grid was measured slower (0.59x) than the same runs one after another, so
  there the runs train as solo Trainers in parallel threads, one per core (:func:`_solo_runs`),
  with exactly the solo numbers.
* **Solo runs.** What vmap cannot reproduce runs alone with the normal
  :class:`~bnviz.train.Trainer`, one after another (:func:`solo_reason` says why): dropout
  (vmap draws other random masks), the d2l-book norm (its moving statistics are plain
  attributes, not stackable buffers), ``nn.BatchNorm`` with ``bn_momentum=None`` (it reads
  ``num_batches_tracked`` on the host), and a group of one.
* **Times.** ``train_time_s``/``wall_time_s``/``setup_time_s`` and each snapshot's ``time_s``
  are the group's (K runs trained in that time); ``examples_per_s`` counts one run's examples.
* **CUDA.** The vmapped step is captured as one CUDA graph per batch size
  (:class:`bnviz.fastpath.CapturedStep`) unless every config says ``fast='eager'``; on any
  failure the group goes on eagerly with a note in each History's ``message``. The grid never
  compiles. Metric sums stay on the device: one host copy per snapshot for the whole group.
"""
from __future__ import annotations

import copy
import time
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state

from . import fastpath
from .callbacks import Divergence, at_chance_note, input_stats_hook
from .config import Config, LiveParams, check_batch_size, lr_factor, resolve_dataset, score_steps
from .data import Dataset, accuracy, batch_sizes, batch_slices, drops_last, resolve_device, to_float
from .history import History, Snapshot
from .models import norm_layers
from .history import SATURATED_PREFIX
from .precise import PreciseBNEval, precise_bn_stacked, sigmoid_layers
from .stats import num_channels
from .train import DROP_NOTE, Meter, Trainer, build_model, cached_dataset

__all__ = ["train_grid", "group_key", "solo_reason", "VmapGroup"]


# ----------------------------------------------------------------------------- planning


def solo_reason(config: Config) -> str | None:
    """Why ``config`` cannot share a vmapped group (None: it can)."""
    m = config.model
    if m.dropout:
        return f"dropout {m.dropout:g}: vmap would draw other random masks than the solo run"
    if config.weight_decay and config.weight_decay_on != "all":
        return f"weight decay on {config.weight_decay_on!r} only: the grid's decay acts on every parameter"
    if m.uses_norm and m.norm == "d2l":
        return "the d2l-book norm keeps its moving statistics as plain attributes (not stackable buffers)"
    if m.uses_norm and m.norm == "torch" and config.bn_momentum is None:
        return "nn.BatchNorm with bn_momentum=None reads num_batches_tracked on the host"
    return None


def _captures(config: Config, device: torch.device) -> bool:
    return fastpath.on_cuda(device) and config.fast != "eager"


def group_key(config: Config, device: torch.device) -> tuple:
    """Runs with equal keys (on the same data) train in one vmapped group."""
    c = config
    return (c.model, c.batch_size, c.epochs, c.drop_last, resolve_dataset(c.dataset), c.train_size,
            c.test_size, str(device), c.snapshot_every, c.bn_momentum, c.eps, _captures(c, device), c.score_at)


def _check(configs, data, progress) -> list[Config]:
    valid = "a non-empty list of bnviz Config objects, e.g. [Config(lr=0.1), Config(lr=1.0)]"
    if isinstance(configs, (str, bytes, Config)) or not hasattr(configs, "__iter__"):
        raise ValueError(f"configs={configs!r} is not valid; valid: {valid}")
    configs = list(configs)
    if not configs:
        raise ValueError(f"configs is empty; valid: {valid}")
    for i, c in enumerate(configs):
        if not isinstance(c, Config):
            raise ValueError(f"configs[{i}] is a {type(c).__name__} ({c!r}); valid: {valid}")
        if c.epochs is None:
            raise ValueError(f"configs[{i}].epochs=None (until stopped) is not valid in a grid; "
                             "valid: a positive integer")
        try:
            check_batch_size(c.model, c.batch_size)
        except ValueError as err:
            raise ValueError(f"configs[{i}]: {err}") from None
    if data is not None and not isinstance(data, Dataset):
        raise ValueError(f"data must be a bnviz Dataset or None, got {type(data).__name__}")
    if not isinstance(progress, bool):
        raise ValueError(f"progress={progress!r} is not valid; valid: True or False")
    return configs


def train_grid(configs: list[Config], data: Dataset | None = None, progress: bool = True,
               vectorize: bool | None = None, precise_bn: int | None = None) -> list[History]:
    """Train every config and return their Histories in the order of ``configs``.

    Runs that agree on :func:`group_key` train at once (one vmapped model, see the module
    docstring); the others (:func:`solo_reason`, or alone in their group) train one after
    another with :class:`~bnviz.train.Trainer`. ``data``: one data set for every run (else each
    config's own, as ``Trainer`` loads it). ``progress``: one tqdm bar over all runs' epochs.
    ``vectorize``: True: vmap groups on any device; False: every run alone; None (default):
    vmap on CUDA only (on the 2-core CPU of benchmarks/grid_speed.py the vmapped grid was
    measured at about 0.6x the speed of the same runs one after another: a CPU is busy computing,
    not launching kernels, and vmap's grouped ops cost more per model there). Runs that train
    alone on a CPU train in parallel threads, one per core.
    ``precise_bn``: N (e.g. 2000) also evaluates every BN run at each epoch end with its BN
    statistics recomputed on the first N training images (:mod:`bnviz.precise`, PreciseBN):
    ``Snapshot.precise_test_acc`` (and ``Snapshot.saturated`` for sigmoid nets); None: off.
    Raises ValueError for bad input (before anything trains) and whatever a run raises.
    """
    configs = _check(configs, data, progress)
    if precise_bn is not None and (not isinstance(precise_bn, int) or isinstance(precise_bn, bool)
                                   or precise_bn < 1):
        raise ValueError(f"precise_bn={precise_bn!r} is not valid; valid: None (off) or a positive number "
                         "of training images, e.g. 2000")
    if not (vectorize is None or isinstance(vectorize, bool)):
        raise ValueError(f"vectorize={vectorize!r} is not valid; valid: None (vmap on CUDA only), True, False")
    devices = [data.device if data is not None else resolve_device(c.device) for c in configs]
    groups: dict[tuple, list[int]] = {}
    for i, (c, dev) in enumerate(zip(configs, devices)):
        vmap = vectorize if vectorize is not None else dev.type == "cuda"
        key = ("solo", i) if solo_reason(c) or not vmap else group_key(c, dev)
        groups.setdefault(key, []).append(i)
    bar = _Bar(sum(c.epochs for c in configs), len(configs)) if progress else None
    results: list[History | None] = [None] * len(configs)
    solo = [members[0] for members in groups.values() if len(members) == 1]
    try:
        for i, h in _solo_runs([configs[i] for i in solo], [devices[i] for i in solo], data, bar,
                               precise_bn):
            results[solo[i]] = h
        for members in groups.values():
            if len(members) > 1:
                cfgs = [configs[i] for i in members]
                ds = data if data is not None else cached_dataset(cfgs[0], devices[members[0]])
                for i, h in zip(members, VmapGroup(cfgs, ds, bar, precise_bn).fit()):
                    results[i] = h
    finally:
        if bar is not None:
            bar.close()
    return results


def _solo_runs(configs: list[Config], devices: list[torch.device], data: Dataset | None, bar,
               precise_bn: int | None = None):
    """Yield ``(index, History)`` of runs that train alone. On a multi-core CPU they train in
    parallel threads, one per core, each with ``cores // threads`` torch threads: a LeNet step
    does not keep two cores busy by itself, two runs side by side do (measured by
    benchmarks/grid_speed.py). The numbers are the solo runs' exactly: every run is its own
    Trainer (models are built one at a time under the trainer's seeding lock). Dropout draws
    from torch's global RNG during training, so a dropout run trains alone, in this thread."""
    import os

    callbacks = ([bar] if bar else []) + ([PreciseBNEval(precise_bn)] if precise_bn else [])
    cores = os.cpu_count() or 1
    parallel = [i for i, (c, d) in enumerate(zip(configs, devices)) if d.type == "cpu" and not c.model.dropout]
    if cores < 2 or len(parallel) < 2:
        parallel = []
    for i, c in enumerate(configs):
        if i not in parallel:
            yield i, Trainer(c, data=data, callbacks=callbacks).fit()
    if parallel:
        yield from fit_in_threads({i: Trainer(configs[i], data=data, callbacks=callbacks) for i in parallel})


def fit_in_threads(trainers: dict) -> Iterator[tuple[Any, History]]:
    """Yield ``(key, History)`` of each CPU ``Trainer`` of ``trainers``, trained in parallel
    threads, one per core, each with ``cores // threads`` torch threads (restored after)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    cores = os.cpu_count() or 1
    workers = min(cores, len(trainers))
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, cores // workers))
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bnviz-grid") as pool:
            futures = {k: pool.submit(t.fit) for k, t in trainers.items()}
            for k, f in futures.items():
                yield k, f.result()
    finally:
        torch.set_num_threads(threads)


class _Bar:
    """One tqdm bar over the epochs of all runs (a group's epoch counts K); also a Trainer
    callback for the solo runs."""

    def __init__(self, total: int, runs: int):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=f"grid of {runs} runs", unit="epoch", leave=True)

    def on_snapshot(self, trainer, s) -> None:
        if s.kind == "epoch":
            self.update(1, s.test_acc)

    def update(self, n: int, test_acc: float | None = None) -> None:
        self.bar.update(n)
        if test_acc is not None:
            self.bar.set_postfix(test=f"{test_acc:.3f}")

    def close(self) -> None:
        self.bar.close()


# ----------------------------------------------------------------------------- one group


class VmapGroup:
    """K runs with one :func:`group_key`, trained as one vmapped model. The run's pieces are the
    Trainer's: models from :func:`~bnviz.train.build_model`, batches from
    :func:`~bnviz.data.batch_slices`, the input statistics of
    :func:`~bnviz.callbacks.input_stats_hook`, a :class:`~bnviz.fastpath.FastPath`, the
    evaluation of :func:`~bnviz.data.accuracy`, :func:`~bnviz.precise.precise_bn_stacked` and
    one :class:`~bnviz.history.SnapshotLayout` host copy for all K runs. What is its own is what
    vmap needs: stacked parameters and buffers, a functional forward, per-run lr and weight decay
    vectors, per-run batch orders, and a diverged member frozen (lr 0) while the others go on.
    ``fit()`` returns the K Histories."""

    def __init__(self, configs: list[Config], data: Dataset, bar: "_Bar | None" = None,
                 precise_bn: int | None = None):
        self.configs, self.data, self.bar, self.precise = configs, data, bar, precise_bn
        self.cfg, self.K, self.device = configs[0], len(configs), data.device
        self.histories = [History(config=c) for c in configs]
        self.active = [True] * self.K
        self.fast: fastpath.FastPath | None = None
        self.step_count = self.epoch = self.examples = 0

    @property
    def captured(self) -> fastpath.CapturedStep | None:
        return self.fast.captured if self.fast is not None else None

    def note(self, text: str, first: bool = False) -> None:
        for h in self.histories:
            h.note(text, first)

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        cfg, n, dev, K = self.cfg, len(self.data.train_x), self.device, self.K
        for h in self.histories:
            h.dataset_label, h.device = self.data.label, str(dev)
        models = [build_model(c, dev) for c in self.configs]
        self.params, self.buffers = stack_module_state(models)
        self.plist = list(self.params.values())
        self.skeleton = copy.deepcopy(models[0]).to("meta").train()
        norms = norm_layers(self.skeleton)
        zeros = lambda m: torch.zeros(K, num_channels(m), device=dev)  # noqa: E731
        self.batch_stats = {s: (zeros(m), zeros(m)) for s, m in norms.items()}  # input mean, var
        self._recorded: dict[str, tuple] = {}
        for short, m in norms.items():
            m.register_forward_pre_hook(input_stats_hook(
                lambda mean, var, s=short: self._recorded.__setitem__(s, (mean, var))))
        self.lr = torch.tensor([float(c.lr) for c in self.configs], device=dev)
        self.lr0 = self.lr.clone()  # Config.lr; self.lr is the lr of the next step (Config.lr_schedule)
        self.scheduled = any(c.lr_schedule != "constant" for c in self.configs)
        self.wd = torch.tensor([float(c.weight_decay) for c in self.configs], device=dev)
        self.any_wd = any(c.weight_decay for c in self.configs)
        self.gens = [torch.Generator(device=dev).manual_seed(c.seed) for c in self.configs]
        self.sums = torch.zeros(6, K, device=dev)  # loss, correct, n: since snapshot | epoch; per run
        self.train_fn = torch.vmap(self._loss)
        self.predict_fn = torch.vmap(self._predict, in_dims=(0, 0, None))
        drop = drops_last(n, cfg.batch_size, cfg.drop_last)
        self.slices = batch_slices(n, cfg.batch_size, drop)
        self.total_steps = cfg.epochs * len(self.slices)
        self.score_steps = frozenset(score_steps(cfg.score_at, self.total_steps)) if cfg.score_at else frozenset()
        if drops_last(n, cfg.batch_size):
            self.note(DROP_NOTE)
        if any(c.fast in ("compile", "graph+compile") for c in self.configs):
            self.note("train_grid does not compile: the grid's step runs vmapped, captured on CUDA.")
        self.fast = fastpath.FastPath(
            "graph" if _captures(cfg, dev) else "eager", self.skeleton, dev, step=self.step, state=self._state,
            evaluate=self._evaluate, note=self.note,
            sample=lambda b: torch.arange(b, device=dev)[:, None].expand(-1, K).contiguous())
        self.fast.prepare(batch_sizes(n, cfg.batch_size, drop))

    def _state(self) -> list[torch.Tensor]:
        return self.plist + list(self.buffers.values()) + [self.sums] + \
            [t for pair in self.batch_stats.values() for t in pair]

    # ------------------------------------------------------------------ the step
    def _loss(self, params, buffers, x, y):
        """One model's mean cross-entropy, correct count and recorded batch statistics (vmapped)."""
        self._recorded = {}
        out = functional_call(self.skeleton, (params, buffers), (x,))
        stats = tuple(t for s in self.batch_stats for t in self._recorded[s])
        return (F.cross_entropy(out, y), (out.detach().argmax(1) == y).sum()) + stats

    def _predict(self, params, buffers, x):
        return functional_call(self.skeleton, (params, buffers), (x,))

    def step(self, idx_t: torch.Tensor) -> None:
        """One SGD step of all K models; ``idx_t`` (B, K): column k is model k's batch
        (transposed so that ``len(idx_t)`` is the batch size, as CapturedStep keys its graphs)."""
        idx = idx_t.t()
        x, y = to_float(self.data.train_x[idx]), self.data.train_y[idx]
        n = idx.shape[1]
        loss, correct, *stats = self.train_fn(self.params, self.buffers, x, y)
        grads = torch.autograd.grad(loss.sum(), self.plist)
        with torch.no_grad():
            for p, g in zip(self.plist, grads):
                shape = (-1,) + (1,) * (p.dim() - 1)
                if self.any_wd:  # as torch.optim.SGD: g + wd * p only where wd != 0
                    g = torch.where(self.wd.view(shape) != 0, g + self.wd.view(shape) * p, g)
                p.sub_(self.lr.view(shape) * g)
            ld = loss.detach() * n
            self.sums.view(2, 3, self.K).add_(torch.stack([ld, correct.float(), torch.full_like(ld, n)]))
            for (mean_buf, var_buf), mean, var in zip(self.batch_stats.values(), stats[0::2], stats[1::2]):
                mean_buf.copy_(mean)
                var_buf.copy_(var)

    def _evaluate(self) -> torch.Tensor:
        """Test accuracy of each model in eval mode (running statistics): (K,) on the device."""
        self.skeleton.eval()
        try:
            return accuracy(lambda x: self.predict_fn(self.params, self.buffers, x), self.data.test_x,
                            self.data.test_y, chunk=max(1, 10000 // self.K))
        finally:
            self.skeleton.train()

    # ------------------------------------------------------------------ the run
    def fit(self) -> list[History]:
        t0 = time.perf_counter()
        for h in self.histories:
            h.status = "running"
        try:
            self._setup()
            setup = time.perf_counter() - t0
            self._loop()
        except Exception as err:
            for h in self.histories:
                if h.status == "running":
                    h.status = "error"
                    h.note(f"{type(err).__name__}: {err}", first=True)
            raise
        finally:
            for h in self.histories:
                h.wall_time_s = time.perf_counter() - t0
            if self.fast is not None:  # free the graphs and their pools now (see fastpath)
                self.fast.release()
                self._recorded = {}
        for h, c in zip(self.histories, self.configs):
            h.setup_time_s, h.train_time_s = setup, self.meter.train_time
            if h.status == "running":
                h.status = "finished"
                h.note(at_chance_note(h, c, self.step_count), first=True)
        return self.histories

    def _loop(self) -> None:
        cfg, n = self.cfg, len(self.data.train_x)
        self.divergence = [Divergence(c.divergence_factor) for c in self.configs]
        self.meter = Meter(self.sums)
        for self.epoch in range(1, cfg.epochs + 1):
            orders = torch.stack([torch.randperm(n, device=self.device, generator=g) for g in self.gens])
            for i, batch in enumerate(self.slices):
                score = i < len(self.slices) - 1 and self.step_count + 1 in self.score_steps
                due = (self.step_count + 1) % cfg.snapshot_every == 0 or score
                if self.scheduled:
                    self._schedule_lr()
                self.fast(orders[:, batch].t())
                self.step_count += 1
                self.examples += batch.stop - batch.start
                self.meter.since_snapshot += 1
                if due:
                    self._snapshot("step", score)
            if self.meter.since_snapshot:
                self._snapshot("step")
            self._snapshot("epoch")
            if self.bar is not None:
                self.bar.update(self.K)
            if not any(self.active):
                break

    def _lr_factors(self, step: int) -> list[float]:
        return [lr_factor(c.lr_schedule, step, self.total_steps) for c in self.configs]

    def _schedule_lr(self) -> None:
        """The lr vector of the next step: each run's Config.lr times its schedule's factor (in
        place: a captured step reads this tensor); a frozen (diverged) run keeps lr 0."""
        factors = torch.tensor(self._lr_factors(self.step_count), device=self.device)
        self.lr.copy_(self.lr0 * factors)

    # ------------------------------------------------------------------ snapshots
    def _snapshot(self, kind: str, score: bool = False) -> None:
        """Read every run's sums, test accuracy and layer statistics in one host copy (the test
        accuracy at an epoch end or a ``score`` step, see ``Config.score_at``)."""
        started = time.perf_counter()
        epoch_values = {}
        if kind == "epoch" or score:
            epoch_values["test_acc"] = self.fast.evaluate()
            if self.precise:
                precise = precise_bn_stacked(self.skeleton, self.params, self.buffers, self.data, self.precise,
                                             chunk=max(1, 10000 // self.K))
                epoch_values["precise_test_acc"], epoch_values["saturated"] = precise[:, 0], precise[:, 1]
                for name, col in zip(sigmoid_layers(self.skeleton), precise[:, 2:].unbind(1)):
                    epoch_values[f"{SATURATED_PREFIX}{name}"] = col
        layers = {s: self._layer_state(s) for s in self.batch_stats}
        rows, layout, now = self.meter.read(kind, self.examples, started, epoch_values, layers)
        for k, row in enumerate(rows):
            if self.active[k]:
                self._add_snapshot(k, kind, layout.unpack(row, kind), now)

    def _layer_state(self, short: str) -> dict[str, torch.Tensor | None]:
        """Stacked (K, C) per-channel tensors, as :func:`bnviz.stats.layer_state` per model."""
        path, (mean, var) = f"norm_{short}", self.batch_stats[short]
        shape = (self.K, mean.shape[1], -1)
        per_channel = lambda t: None if t is None else t.detach().reshape(shape).mean(2)  # noqa: E731
        return {"gamma": per_channel(self.params.get(f"{path}.weight")),
                "beta": per_channel(self.params.get(f"{path}.bias")),
                "running_mean": per_channel(self.buffers.get(f"{path}.running_mean")),
                "running_var": per_channel(self.buffers.get(f"{path}.running_var")),
                "batch_mean": mean, "batch_var": var}

    def _add_snapshot(self, k: int, kind: str, values: dict, now: float) -> None:
        h, c = self.histories[k], self.configs[k]
        live = {name: getattr(c, name) for name in LiveParams.NAMES}
        if c.lr_schedule != "constant":  # the lr of the last step, as the Trainer records it
            live["lr"] = c.lr * lr_factor(c.lr_schedule, self.step_count - 1, self.total_steps)
        s = Snapshot(kind=kind, step=self.step_count, epoch=self.epoch, examples=self.examples,
                     time_s=now - self.meter.t0, examples_per_s=self.meter.rate, **live, **values)
        h.snapshots.append(s)
        why = self.divergence[k].reason(s)
        if why:  # freeze the run: lr 0, no more snapshots
            end = Divergence.stop(why, c)
            h.status = end.status
            h.note(end.message, first=True)
            self.active[k] = False
            self.lr[k] = 0.0
            self.lr0[k] = 0.0
            self.wd[k] = 0.0
