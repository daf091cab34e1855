"""Compile and capture the training step (the technique measured in shared/gpu/README.md).

A LeNet step is tiny: on a GPU its ~50-200 kernels take ~0.4-0.6 ms while Python needs ~3 ms
to launch them, so an eager trainer is CPU-bound. Two tools remove the launch cost:

* **compile** (:func:`compile_loss`): ``torch.compile`` (inductor, default mode) of the loss
  function (forward + cross-entropy + the correct count). It fuses the elementwise work of BN
  and the sigmoid into a few kernels (a scratch BN layer's ~10 small kernels become ~2).
* **capture** (:class:`CapturedStep`): the whole step -- gather the batch from the resident
  data set, zero the grads, forward, backward, SGD update, metric sums, per-layer batch
  statistics -- recorded once as a CUDA graph per batch size and replayed with one launch.
  The batch is chosen by copying its indices into a static buffer before the replay.

Rules that keep the numbers identical to the eager step:

* warm-up and capture run before the timed run, and the model, its buffers and the metric
  sums are restored afterwards, so they leave no trace;
* the learning rate is a 0-d device tensor read by the graph at each replay: a live change
  is a ``fill_`` (no re-capture); BN momentum/eps are Python numbers baked into the graph, so
  a change re-captures before the next step (:meth:`CapturedStep.invalidate`);
* every batch size has its own graph (the last partial batch of an epoch too), all captured
  up front;
* the test evaluation (the whole test set in eval mode) is one more graph
  (:class:`CapturedEval`), replayed at each epoch end.

What cannot be captured falls back to the eager step with a note in ``History.message``:
no CUDA device, the d2l-book layer (it replaces its statistics tensors in Python),
``nn.BatchNorm`` with ``momentum=None`` (its factor ``1/num_batches_tracked`` is read on the
host), or any error during capture.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Callable

import torch
from torch import nn

__all__ = ["plan", "compile_loss", "CapturedStep", "CapturedEval", "compile_unavailable",
           "capture_unavailable"]


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

    if device.type != "cuda":
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
    want_compile = fast in ("compile", "graph+compile") or (fast == "auto" and device.type == "cuda")
    want_capture = fast in ("graph", "graph+compile") or (fast == "auto" and device.type == "cuda")
    notes = []
    if want_compile and (why := compile_unavailable(device)):
        want_compile = False
        notes.append(f"not compiled: {why}")
    if want_capture and (why := capture_unavailable(model, device)):
        want_capture = False
        notes.append(f"not captured: {why}")
    note = f"fast={fast!r}: " + "; ".join(notes) + "." if notes else ""
    return want_compile, want_capture, note


def compile_loss(fn: Callable) -> Callable:
    """``fn`` compiled by inductor (default mode, one graph per batch shape)."""
    return torch.compile(fn, dynamic=False)


class CapturedStep:
    """``step(idx)`` of a trainer recorded as one CUDA graph per batch size.

    ``state``: the tensors the step changes (parameters, buffers, gradients, metric sums);
    they are restored after warm-up so that capturing leaves no trace. ``info``: capture
    seconds per batch size and the number of re-captures.
    """

    WARMUP = 3

    def __init__(self, step: Callable[[torch.Tensor], None], state: Callable[[], list[torch.Tensor]],
                 device: torch.device):
        self.step, self.state, self.device = step, state, device
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.info = {"capture_s": {}, "recaptures": 0}
        torch.autograd.graph.set_warn_on_accumulate_grad_stream_mismatch(False)

    def capture(self, batch_sizes, sample_idx: torch.Tensor) -> None:
        """Record a graph for each batch size (warm-up on a side stream first)."""
        for bs in sorted(set(batch_sizes), reverse=True):
            if bs in self.graphs:
                continue
            t = time.perf_counter()
            static = sample_idx[:bs].clone()
            saved = [s.detach().clone() for s in self.state()]
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(self.WARMUP):
                    self.step(static)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.step(static)
            with torch.no_grad():
                for s, v in zip(self.state(), saved):
                    s.copy_(v)
            torch.cuda.synchronize(self.device)
            self.graphs[bs] = (graph, static)
            self.info["capture_s"][bs] = time.perf_counter() - t

    def __call__(self, idx: torch.Tensor) -> None:
        graph, static = self.graphs[len(idx)]
        static.copy_(idx)
        graph.replay()

    def invalidate(self, sample_idx: torch.Tensor) -> None:
        """Re-capture every graph (after a change that is baked into them: BN momentum/eps)."""
        sizes = list(self.graphs)
        self.graphs.clear()
        self.info["recaptures"] += 1
        self.capture(sizes, sample_idx)


class CapturedEval:
    """The test accuracy of ``model`` (eval mode, running statistics) on the uint8 images ``x``
    and labels ``y``, recorded once as a CUDA graph over the whole test set; ``evaluator()``
    replays it and returns the accuracy as a 0-d device tensor. It reads the parameters and
    buffers where the training step writes them, so it always sees the current model."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, forward: Callable):
        self.model, self.x, self.y, self.forward = model, x, y, forward
        self.correct = torch.zeros((), dtype=torch.long, device=x.device)
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            self._count()
        torch.cuda.current_stream(x.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._count()

    def _count(self) -> None:
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            self.correct.copy_((self.forward(self.x).argmax(1) == self.y).sum())
        self.model.train(was_training)

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        return self.correct.float() / max(len(self.y), 1)
