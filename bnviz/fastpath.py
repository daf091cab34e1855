"""Compile and capture the training step (the technique measured in shared/gpu/README.md).

A LeNet step is tiny: on a GPU its ~50-200 kernels take ~0.4-0.6 ms while Python needs ~3 ms
to launch them, so an eager trainer is CPU-bound. Two tools remove the launch cost:

* **compile** (:func:`compile_fn`): ``torch.compile`` (inductor, default mode) of the step's
  forward: gather the batch from the resident data set, uint8 -> float, forward,
  cross-entropy, correct count and the metric sums, as one function. It fuses the elementwise
  work of BN and the sigmoid into a few kernels. Each call gets its own code object, so every
  Trainer has its own dynamo cache and recompile limit (dynamo keeps both per code object).
* **capture** (:class:`CapturedStep`): the whole step -- the forward above, zero the grads,
  backward, SGD update, per-layer batch statistics -- recorded once as a CUDA graph per batch
  size and replayed with one launch. The batch is chosen by copying its indices into a static
  buffer before the replay.

Rules that keep the numbers identical to the eager step:

* warm-up and capture run before the timed run (:func:`preserved`): afterwards, whatever
  happened, the side stream is waited on, the device synchronised, the model, its buffers,
  the metric sums and the RNG states (CPU and CUDA: dropout) are restored, so they leave no
  trace;
* the learning rate is a 0-d float32 device tensor read by the graph at each replay
  (:func:`sgd`): a live change is a ``fill_`` (no re-capture); BN momentum/eps are Python
  numbers baked into the graphs, so a change re-captures once, after every pending live value
  was applied (:meth:`FastPath.norms_changed`). With compile on, a change does not recompile
  (seconds): from then on the eager forward runs inside the re-captured graph (noted);
* every batch size has its own graph (the last partial batch of an epoch too), all captured
  up front;
* the test evaluation (the whole test set in eval mode) is one more graph
  (:class:`CapturedEval`), replayed at each epoch end;
* at the end of ``fit()`` every graph and its memory pool is released (:meth:`CapturedStep.release`).

:class:`FastPath` holds all of it for one run (a Trainer) or one vmapped grid: the plan, the
compiled forward, the captured step and evaluation, the fallbacks and their notes.

What cannot be captured falls back to the eager step with a note in ``History.message``:
no CUDA device, the d2l-book layer (it replaces its statistics tensors in Python),
``nn.BatchNorm`` with ``momentum=None`` (its factor ``1/num_batches_tracked`` is read on the
host), or any error while compiling or capturing, at the start or mid-run (same numbers as an
eager run).

Supported torch: 2.9 or newer (2.9.1 and 2.14.1 verified on a CPU, with the capture SIMULATION of
tests/test_capture_sim.py; the CUDA path itself has not yet run on a GPU: benchmarks/README.md).
"""
from __future__ import annotations

import functools
import os
import shutil
import sys
import time
import types
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

__all__ = ["FastPath", "plan", "compile_fn", "sgd", "set_lr", "CapturedStep", "CapturedEval", "compile_unavailable",
           "capture_unavailable", "on_cuda", "preserved", "record", "warm_up"]

COMPILE_BACKEND = "inductor"  # tests use "eager" (dynamo without inductor) to stay fast on a CPU


def on_cuda(device: torch.device) -> bool:
    """Whether ``device`` takes the CUDA fast path (device-tensor lr, fused SGD, capture).
    The capture SIMULATION of tests/test_capture_sim.py makes this True on a CPU."""
    return device.type == "cuda"


def quiet_stream_warning() -> None:
    """Silence autograd's AccumulateGrad stream-mismatch warning (harmless here: the warm-up runs
    on a side stream). The switch exists from torch 2.10 only; on 2.9 there is nothing to do."""
    switch = getattr(torch.autograd.graph, "set_warn_on_accumulate_grad_stream_mismatch", None)
    if switch is not None:
        switch(False)


def compile_unavailable(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot be used on ``device`` (None: it can)."""
    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile does not support this Python ({sys.version.split()[0]})"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (7, 0):
            return f"the GPU has compute capability {major}.{minor}; torch.compile (triton) needs 7.0+"
        from torch.utils._triton import has_triton

        if not has_triton():
            return "triton is not installed (pip install triton; Linux only)"
        return None
    if device.type != "cpu":
        return f"torch.compile is not used by bnviz on {device.type}"
    if not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")):
        return "no C++ compiler found (torch.compile on a CPU needs g++ or clang++)"
    return None


def capture_unavailable(model: nn.Module, device: torch.device) -> str | None:
    """Why the step of ``model`` cannot be captured as a CUDA graph (None: it can)."""
    from .norms import D2LBatchNorm

    if not on_cuda(device):
        return f"CUDA graphs need a CUDA device (this run is on {device.type})"
    for m in model.modules():
        if isinstance(m, D2LBatchNorm):
            return "the d2l-book BN layer replaces its moving statistics in Python at every step"
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.momentum is None \
                and m.track_running_stats:
            return ("nn.BatchNorm with momentum=None reads num_batches_tracked on the host "
                    "(bnviz's scratch layer does not)")
    return None


def plan(fast: str, model: nn.Module, device: torch.device) -> tuple[bool, bool, str]:
    """``(compile, capture, note)`` for ``Config.fast`` on this model and device."""
    want_compile = fast in ("compile", "graph+compile") or (fast == "auto" and on_cuda(device))
    want_capture = fast in ("graph", "graph+compile") or (fast == "auto" and on_cuda(device))
    notes = []
    if want_compile and (why := compile_unavailable(device)):
        want_compile = False
        notes.append(f"not compiled: {why}")
    if want_capture and (why := capture_unavailable(model, device)):
        want_capture = False
        notes.append(f"not captured: {why}")
    note = f"fast={fast!r}: " + "; ".join(notes) + "." if notes else ""
    return want_compile, want_capture, note


# ----------------------------------------------------------------------------- compile


@contextmanager
def _fail_on_recompile_limit():
    """Inside: dynamo raises at its recompile limit instead of silently running uncompiled
    (the caller falls back to eager with a note). Without the switch (older torch): nothing."""
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            yield
    else:
        yield


def compile_fn(method: Callable) -> Callable:
    """The bound ``method`` compiled by dynamo + inductor (default mode, one graph per batch
    shape), on a fresh copy of its code object. Dynamo keeps its cache and its recompile limit
    (8) per code object: with one shared code object every Trainer of a process (a sweep of
    eps or momentum) filled the same cache, and after about 4 configs each new one ran
    uncompiled without a word. Reaching the limit now raises (the trainer notes it)."""
    func = method.__func__
    fresh = types.FunctionType(func.__code__.replace(), func.__globals__, func.__name__,
                               func.__defaults__, func.__closure__)
    compiled = torch.compile(types.MethodType(fresh, method.__self__), dynamic=False, backend=COMPILE_BACKEND)

    def call(*args):
        with _fail_on_recompile_limit():
            return compiled(*args)
    return call


def sgd(params, lr: float, weight_decay: float, device: torch.device) -> torch.optim.SGD:
    """Plain SGD. On the CUDA path: fused, and every param group's lr is one shared 0-d float32
    device tensor (a captured graph reads it at each replay; a live change is a ``fill_``).
    SGD is built with a float first: ``SGD(lr=<device tensor>)`` checks ``lr < 0`` on the
    device, a host read."""
    if not on_cuda(device):
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    opt = torch.optim.SGD(params, lr=float(lr), weight_decay=weight_decay, fused=True)
    lr_t = torch.tensor(float(lr), dtype=torch.float32, device=device)
    for group in opt.param_groups:
        group["lr"] = lr_t
    return opt


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """A live lr change: a ``fill_`` of the device tensor a captured graph reads at its next
    replay (the CUDA path of :func:`sgd`), else the number."""
    for group in opt.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


# ----------------------------------------------------------------------------- capture helpers


def _rng_state(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if on_cuda(device) else None)


def _set_rng_state(state, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


@contextmanager
def preserved(state: Callable[[], list[torch.Tensor]], device: torch.device, stream=None):
    """Run a warm-up or a capture and leave no trace, whatever happens inside: on exit the
    current stream waits for ``stream`` (the side stream), the device is synchronised, and the
    tensors of ``state()`` and the RNG states (CPU and, on CUDA, the device's) are restored."""
    saved = [t.detach().clone() for t in state()]
    rng = _rng_state(device)
    try:
        yield
    finally:
        if stream is not None:
            torch.cuda.current_stream(device).wait_stream(stream)
            torch.cuda.synchronize(device)
        with torch.no_grad():
            for t, v in zip(state(), saved):
                t.copy_(v)
        _set_rng_state(rng, device)


def warm_up(fn: Callable[[], object], stream, times: int, device: torch.device) -> None:
    """Run ``fn()`` ``times`` times on the side ``stream`` (as a capture needs: cuDNN/cuBLAS
    workspaces and autograd's buffers exist before it starts)."""
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(times):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)


def record(graph, fn: Callable[[], object], stream, device: torch.device) -> None:
    """Capture ``fn()`` into ``graph`` on ``stream``. Unlike ``torch.cuda.graph``'s exit, this
    always ends the capture and leaves the capture stream, and an error inside ``fn`` is raised
    as itself (not as "operation failed due to a previous error during capture").
    ``capture_error_mode='thread_local'``: the lab captures from a background thread while the
    main thread keeps working."""
    torch.cuda.synchronize(device)
    with torch.cuda.stream(stream):
        graph.capture_begin(capture_error_mode="thread_local")
        try:
            fn()
        except BaseException:
            try:
                graph.capture_end()
            except Exception:  # the capture is invalid anyway; the first error is the real one
                pass
            raise
        graph.capture_end()


# ----------------------------------------------------------------------------- captured step and eval


class CapturedStep:
    """``step(idx)`` of a trainer recorded as one CUDA graph per batch size.

    ``state``: the tensors the step changes (parameters, buffers, metric sums, recorded
    statistics); they are restored after warm-up and capture. ``info``: capture seconds per
    batch size, the captured batch sizes and the number of re-captures; it stays after
    :meth:`release` (the end of ``fit()``), which frees the graphs and their memory pools.
    """

    WARMUP = 3

    def __init__(self, step: Callable[[torch.Tensor], object], state: Callable[[], list[torch.Tensor]],
                 device: torch.device):
        self.step, self.state, self.device = step, state, device
        self.graphs: dict[int, tuple[object, torch.Tensor]] = {}
        self.info = {"capture_s": {}, "recaptures": 0, "batch_sizes": [], "eval_captures": 0}
        self.stream = torch.cuda.Stream(device)
        quiet_stream_warning()

    def capture(self, batch_sizes, sample_idx: torch.Tensor) -> None:
        """Record a graph for each new batch size (warm-up on the side stream first)."""
        for bs in sorted(set(batch_sizes), reverse=True):
            if bs in self.graphs:
                continue
            t = time.perf_counter()
            static = sample_idx[:bs].clone()
            graph = torch.cuda.CUDAGraph()
            step = functools.partial(self.step, static)
            with preserved(self.state, self.device, self.stream):
                warm_up(step, self.stream, self.WARMUP, self.device)
                record(graph, step, self.stream, self.device)
            self.graphs[bs] = (graph, static)
            self.info["capture_s"][bs] = time.perf_counter() - t
            self.info["batch_sizes"] = sorted(set(self.info["batch_sizes"]) | {bs})

    def __call__(self, idx: torch.Tensor) -> None:
        graph, static = self.graphs[len(idx)]
        static.copy_(idx)
        graph.replay()

    def invalidate(self, sample_idx: torch.Tensor) -> None:
        """Re-capture every graph once (after a change baked into them: BN momentum/eps)."""
        sizes = list(self.graphs)
        self._drop_graphs()
        self.info["recaptures"] += 1
        self.capture(sizes, sample_idx)

    def _drop_graphs(self) -> None:
        for graph, _ in self.graphs.values():
            graph.reset()
        self.graphs.clear()

    def release(self) -> None:
        """Free the graphs and their memory pools now, and drop the references to the trainer
        (its bound step: a reference cycle that kept every finished run's pools until the
        cyclic garbage collector ran). ``info`` stays."""
        self._drop_graphs()
        self.step = self.state = None


class CapturedEval:
    """The test accuracy of ``model`` (eval mode, running statistics) on the uint8 images ``x``
    and labels ``y``, recorded once as a CUDA graph over the whole test set; ``captured_eval()``
    replays it and returns the accuracy as a 0-d device tensor. It reads the parameters and
    buffers where the training step writes them, so it always sees the current model.
    ``forward(x)``: the model's logits for float images (default: ``model``)."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, forward: Callable | None = None):
        self.model, self.x, self.y = model, x, y
        self.forward = forward or model
        self.correct = torch.zeros((), dtype=torch.long, device=x.device)
        self.stream = torch.cuda.Stream(x.device)
        quiet_stream_warning()
        self.graph = torch.cuda.CUDAGraph()
        with preserved(lambda: [self.correct], x.device, self.stream):
            warm_up(self._count, self.stream, 1, x.device)
            record(self.graph, self._count, self.stream, x.device)

    def _count(self) -> None:
        from .data import count_correct

        was_training = self.model.training
        self.model.eval()
        try:
            self.correct.copy_(count_correct(self.forward, self.x, self.y, chunk=max(len(self.x), 1)))
        finally:
            self.model.train(was_training)

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        return self.correct.float() / max(len(self.y), 1)

    def release(self) -> None:
        """Free the graph and its memory pool (it holds activations for the whole test set)."""
        if self.graph is not None:
            self.graph.reset()
        self.graph = self.forward = self.model = None


# ----------------------------------------------------------------------------- the fast path of a run


class FastPath:
    """How the step of a run (a Trainer) or of K vmapped runs (the grid) executes: eagerly,
    with a compiled forward, or captured as one CUDA graph per batch size, and how its test
    evaluation runs (eagerly, or captured). Both callers use it the same way:
    :meth:`prepare` the batch sizes before the timed run, call the object for each step,
    :meth:`add_sizes` for a new live batch size, :meth:`norms_changed` after a BN
    momentum/eps change, :meth:`evaluate` at an epoch end, :meth:`release` at the end.

    ``step(idx)``: the eager step. ``state()``: every tensor a step writes (restored after
    warm-up and capture). ``evaluate()``: the eager evaluation. ``note(text)``: adds a note to
    the run's History (a plan's reason, a fallback). ``forward``: the function the step calls
    that :func:`compile_fn` compiles (None: never compiled; the step calls :attr:`forward`).
    ``capture_eval()``: makes a :class:`CapturedEval` (None: the evaluation is never captured).
    ``sample(n)``: an index tensor for a step of ``n`` examples (default ``arange(n)``).
    Any failure while compiling or capturing, at the start or mid-run, leaves the state as it
    was and goes on eagerly with a note (the numbers of an eager run).
    """

    def __init__(self, fast: str, model: nn.Module, device: torch.device, *, step: Callable, state: Callable,
                 evaluate: Callable, note: Callable[[str], None], forward: Callable | None = None,
                 capture_eval: Callable | None = None, sample: Callable | None = None):
        self.model, self.device, self.step, self.state, self.note = model, device, step, state, note
        self.eager_forward = self.forward = forward
        self.eager_evaluate = self.evaluate = evaluate
        self.capture_eval = capture_eval
        self.sample = sample or (lambda n: torch.arange(n, device=device))
        self.want_compile, self.want_capture, why = plan(fast, model, device)
        self.want_compile = self.want_compile and forward is not None
        if why:
            note(why)
        self.compiled = False  # the forward runs compiled
        self.captured: CapturedStep | None = None  # stays after release(): its info
        self._warmed: set[int] = set()  # batch sizes the compiled forward has seen

    @property
    def record_always(self) -> bool:
        """Whether every step must record the layer statistics: a per-step switch cannot enter a
        compiled or captured step."""
        return self.compiled or self.captured is not None

    def __call__(self, idx: torch.Tensor) -> None:
        if self.captured is not None:
            self.captured(idx)
        else:
            self.step(idx)

    def prepare(self, sizes: list[int]) -> None:
        """Compile (each batch size) and capture now, before the timed run; neither leaves a
        trace (:func:`preserved`)."""
        if not (self.want_compile or self.want_capture):
            return
        try:
            if self.want_compile:
                self.forward, self.compiled = compile_fn(self.eager_forward), True
            if self.want_capture:
                self.captured = CapturedStep(self.step, self.state, self.device)
            self._prepare(sizes)
            self._capture_eval()
        except Exception as err:
            self._fail(err)

    def add_sizes(self, sizes: list[int], at: int) -> None:
        """Capture (or compile) the step for batch sizes not prepared yet (a live batch size)."""
        if self.record_always:
            self._mid_run(lambda: self._prepare(sizes), at)

    def _prepare(self, sizes: list[int]) -> None:
        sample = self.sample(max(sizes))
        if self.captured is not None:
            self.captured.capture(sizes, sample)
        elif self.compiled:
            for bs in sorted(set(sizes) - self._warmed, reverse=True):
                with preserved(self.state, self.device):
                    self.step(sample[:bs])
                self._warmed.add(bs)

    def norms_changed(self, at: int) -> None:
        """BN momentum/eps are baked into the compiled forward and the graphs. Compiled: the
        eager forward runs from step ``at`` (a recompile takes seconds; the target for a live
        change is 0.2 s), noted. Captured: every graph is re-captured once, or the step goes
        eager if the new value cannot be captured."""
        if self.compiled:
            self.forward, self.compiled = self.eager_forward, False
            self.note(f"From step {at} the forward runs uncompiled (a live BN momentum/eps change; "
                      "recompiling would take seconds).")
        if self.captured is None:
            return
        why = capture_unavailable(self.model, self.device)
        if why:
            self.release()
            self.captured = None
            self.note(f"From step {at} the step runs eagerly: {why}.")
            return
        sample = self.sample(max(self.captured.info["batch_sizes"]))
        self._mid_run(lambda: (self.captured.invalidate(sample), self._capture_eval()), at)

    def _capture_eval(self) -> None:
        if self.captured is None or self.capture_eval is None:
            return
        self._release_eval()
        self.evaluate = self.capture_eval()
        self.captured.info["eval_captures"] += 1

    def _mid_run(self, fn: Callable[[], object], at: int) -> None:
        try:
            fn()
        except Exception as err:
            self._fail(err, at)

    def _fail(self, err: Exception, at: int | None = None) -> None:
        """Go on eagerly with a note (warm-up and capture restored the state themselves)."""
        self.release()
        self.captured, self.forward, self.compiled = None, self.eager_forward, False
        for p in self.model.parameters():
            p.grad = None
        reason = f"{type(err).__name__}: " + (str(err).strip().splitlines() or [""])[0][:300]
        where = f" at step {at}" if at is not None else ""
        self.note(f"The fast path failed{where} ({reason}); {'from then on ' if at is not None else ''}"
                  "the run continues eagerly.")

    def _release_eval(self) -> None:
        if isinstance(self.evaluate, CapturedEval):
            self.evaluate.release()
            self.evaluate = self.eager_evaluate

    def release(self) -> None:
        """Free the CUDA graphs and their memory pools now (the end of a run, or a fallback):
        the graphs' references to the trainer are cycles that kept them until the cyclic
        garbage collector ran."""
        if self.captured is not None:
            self.captured.release()
        self._release_eval()
