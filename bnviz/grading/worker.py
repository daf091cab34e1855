"""The sandboxed half of grading: runs ONE submission's code and reports what it computed.

Run by the trusted side inside the sandbox as ``python -m bnviz.grading.worker`` (see
``sandbox.py``). This module is self-contained on purpose (standard library and torch only): the
sandbox sees a copy of this one file, not the rest of ``bnviz``.

Protocol:

* stdin: a ``torch.save``'d dict ``{"cells": [source, ...], "probes": [spec, ...],
  "limits": {...}}`` written by the trusted side. The probes carry only test *inputs*; expected
  values and tolerances never come here.
* stdout: the worker first moves the process's stdout to stderr, so whatever the student prints
  goes to stderr, then writes one ``torch.save``'d dict of plain tensors / lists / strings to the
  original stdout at the end. The trusted side loads it with ``weights_only=True`` and treats it
  as untrusted data: nothing here can raise a score except outputs that match references the
  trusted side computes itself.

Order: import torch, apply the resource limits (they cannot be raised again without
CAP_SYS_RESOURCE, which the sandbox drops), install the tripwires, run the answer cells with a
harmless ``otter`` stub, run the probes, write the report.
"""

from __future__ import annotations

import io
import os
import re
import resource
import sys
import types

PROTOCOL = 1
MAX_MESSAGE = 120


def short_error(exc: BaseException) -> str:
    """``Type: first line`` of an exception, at most MAX_MESSAGE characters."""
    name = re.sub(r"[^A-Za-z0-9_.]", "", type(exc).__name__)[:60] or "Exception"
    try:
        text = str(exc)
    except Exception:  # a hostile __str__
        text = ""
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return f"{name}: {first}"[:MAX_MESSAGE] if first else name


# --------------------------------------------------------------------------- limits


def apply_limits(limits: dict) -> None:
    """Address space (on top of what Python + torch already reserved), CPU, file size, core dumps,
    open files; RLIMIT_NPROC too when not root (it does not bind uid 0 even in a user namespace)."""
    def cap(which, value):
        value = int(value)
        soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, value))

    if limits.get("memory_bytes"):
        with open("/proc/self/status") as f:
            vm = next((int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmSize:")), 0)
        cap(resource.RLIMIT_AS, vm + int(limits["memory_bytes"]))
    if limits.get("cpu_seconds"):
        soft = int(limits["cpu_seconds"])
        resource.setrlimit(resource.RLIMIT_CPU, (soft, soft + 2))
    if limits.get("file_bytes"):
        cap(resource.RLIMIT_FSIZE, limits["file_bytes"])
    cap(resource.RLIMIT_CORE, 0)
    cap(resource.RLIMIT_NOFILE, 256)
    if limits.get("processes") and os.getuid() != 0:
        cap(resource.RLIMIT_NPROC, limits["processes"])


# --------------------------------------------------------------------------- tripwires


class Tripwires:
    """Records forbidden calls (batch norm kernels, nn.BatchNorm constructors, autograd) per phase.

    Two layers: Python wrappers around the public entry points, and a TorchDispatchMode entered
    around every probe call, which sees every aten op however it was reached (``torch.ops``,
    aliases, ``getattr`` tricks). A student can undo both from inside this process; the report
    says whether they were still in place, and the trusted side also scans the source itself.
    """

    def __init__(self, torch):
        from torch.utils._python_dispatch import TorchDispatchMode

        self.torch, self.phase, self.hits, self.ops, self.seen = torch, None, [], {}, {}
        self.wrapped: dict = {}
        tw = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
                tw._op(str(func))
                return func(*args, **(kwargs or {}))

        self.mode_cls = Mode
        self._install()

    def _hit(self, what: str, via: str) -> None:
        """Record the first few ways each (phase, feature) was reached."""
        if not self.phase:
            return
        key = (self.phase, what)
        self.seen[key] = self.seen.get(key, 0) + 1
        if self.seen[key] <= 3:
            self.hits.append({"phase": self.phase, "what": what, "via": via[:80]})

    def _op(self, name: str) -> None:
        if self.phase:
            self.ops[self.phase] = self.ops.get(self.phase, 0) + 1
            if "batch_norm" in name:
                self._hit("batch_norm", name)
            if self.torch._C._current_autograd_node() is not None:
                self._hit("autograd", "autograd engine ran " + name)

    def _wrap(self, owner, attr: str, what: str) -> None:
        original = getattr(owner, attr)
        label = f"{getattr(owner, '__name__', owner)}.{attr}"

        def wrapper(*args, **kwargs):
            self._hit(what, label)
            return original(*args, **kwargs)

        wrapper.__wrapped__ = original
        setattr(owner, attr, wrapper)
        self.wrapped[(owner, attr)] = wrapper

    def _install(self) -> None:
        t = self.torch
        from torch.nn.modules import batchnorm

        self._wrap(t.nn.functional, "batch_norm", "batch_norm")
        self._wrap(t, "batch_norm", "batch_norm")
        self._wrap(batchnorm._NormBase, "__init__", "batch_norm")
        self._wrap(t.autograd, "grad", "autograd")
        self._wrap(t.autograd, "backward", "autograd")
        self._wrap(t.Tensor, "backward", "autograd")

    def intact(self) -> bool:
        return all(getattr(owner, attr) is w for (owner, attr), w in self.wrapped.items())

    def run(self, phase: str, fn, *args, **kwargs):
        """Call fn under the dispatch-mode tripwire, attributing what it does to phase."""
        previous, self.phase = self.phase, phase
        self.ops.setdefault(phase, 0)
        try:
            with self.mode_cls():
                return fn(*args, **kwargs)
        finally:
            self.phase = previous

    def report(self) -> dict:
        return {"installed": True, "intact": self.intact(), "hits": list(self.hits),
                "ops": {k: int(v) for k, v in self.ops.items()}}


# --------------------------------------------------------------------------- running the cells


def _otter_stub() -> types.ModuleType:
    """``import otter; grader = otter.Notebook(...); grader.check(...)`` work and do nothing: the
    sandbox has no tests to run, and the real otter is not needed to grade."""
    mod = types.ModuleType("otter")

    class Notebook:
        def __init__(self, *args, **kwargs):
            pass

        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    mod.Notebook = Notebook
    return mod


def _to_python(source: str) -> str:
    """IPython syntax (``%magic``, ``!shell``) to Python, when IPython is importable."""
    try:
        from IPython.core.inputtransformer2 import TransformerManager
    except Exception:
        return source
    try:
        return TransformerManager().transform_cell(source)
    except Exception:
        return source


def run_cells(cells: list, namespace: dict) -> list:
    """Execute each code cell in order in one namespace; a cell that raises does not stop the
    others (as in a notebook run with errors allowed). Returns [{"cell", "error"}]."""
    sys.modules["otter"] = _otter_stub()
    namespace.setdefault("get_ipython", lambda: types.SimpleNamespace(
        system=lambda *a, **k: None, run_line_magic=lambda *a, **k: None, run_cell_magic=lambda *a, **k: None))
    errors = []
    for index, source in cells:
        try:
            code = compile(_to_python(source), f"<cell {index}>", "exec")
            exec(code, namespace)
        except BaseException as exc:  # SystemExit and KeyboardInterrupt included
            errors.append({"cell": int(index), "error": short_error(exc)})
    return errors


# --------------------------------------------------------------------------- probes


def plain(torch, value, what: str):
    """A detached, contiguous, plain CPU tensor copy, or raise TypeError naming what it is."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{what} is a {type(value).__name__[:40]}, not a tensor")
    out = value.detach().to("cpu").clone().contiguous()
    return torch.Tensor._make_subclass(torch.Tensor, out) if type(out) is not torch.Tensor else out


def probe_forward(ns, tw, torch, spec):
    fn = ns.get("batch_norm_forward")
    if not callable(fn):
        return {"steps": [], "error": "batch_norm_forward is not defined"}
    rm, rv = spec["rm"].clone(), spec["rv"].clone()
    steps = []
    for x in spec["xs"]:
        kwargs = {"eps": spec["eps"], "training": spec["training"]}
        if spec["momentum"] is not None:
            kwargs["momentum"] = spec["momentum"]
        out = tw.run("q1", fn, x.clone(), spec["gamma"].clone(), spec["beta"].clone(), rm, rv, **kwargs)
        if not (isinstance(out, tuple) and len(out) == 2):
            return {"steps": steps, "error": "batch_norm_forward must return a pair (y, cache)"}
        steps.append({"y": plain(torch, out[0], "y"), "rm": plain(torch, rm, "running_mean"),
                      "rv": plain(torch, rv, "running_var")})
    return {"steps": steps, "error": None}


def probe_backward(ns, tw, torch, spec):
    fwd, bwd = ns.get("batch_norm_forward"), ns.get("batch_norm_backward")
    if not callable(fwd) or not callable(bwd):
        return {"out": None, "error": "batch_norm_forward / batch_norm_backward is not defined"}
    C = spec["gamma"].shape[0]
    with torch.no_grad():
        rm, rv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
        _, cache = tw.run("q1", fwd, spec["x"].clone(), spec["gamma"].clone(), spec["beta"].clone(),
                          rm, rv, 0.1, 1e-5, True)
        out = tw.run("q2", bwd, spec["dy"].clone(), cache)
    if not (isinstance(out, tuple) and len(out) == 3):
        return {"out": None, "error": "batch_norm_backward must return (dx, dgamma, dbeta)"}
    return {"out": [plain(torch, v, n) for v, n in zip(out, ("dx", "dgamma", "dbeta"))], "error": None}


def _state(torch, module) -> dict:
    sd = module.state_dict()
    return {"keys": [str(k) for k in sd.keys()], "values": [plain(torch, v, str(k)) for k, v in sd.items()]}


def probe_module_init(ns, tw, torch, spec):
    cls = ns.get("BatchNorm")
    if not isinstance(cls, type):
        return {"error": "BatchNorm is not defined"}
    m = tw.run("q3", cls, spec["C"])
    return {"params": [str(n) for n, _ in m.named_parameters()],
            "buffers": [str(n) for n, _ in m.named_buffers()], "state": _state(torch, m), "error": None}


def _module_step(torch, tw, m, step):
    (m.train if step["mode"] == "train" else m.eval)()
    x = step["x"].clone()
    if step.get("requires_grad"):
        x.requires_grad_()
    grad_ctx = torch.no_grad() if step.get("no_grad") else torch.enable_grad()
    with grad_ctx:
        y = tw.run("q3", m, x)
    out = {"y": plain(torch, y, "forward output")}
    if step.get("grad_weights") is not None:
        tw.run("q3", lambda: (y * step["grad_weights"]).sum().backward())
        grads = [x.grad, getattr(m.weight, "grad", None), getattr(m.bias, "grad", None)]
        out["grads"] = [None if g is None else plain(torch, g, "gradient") for g in grads]
    if step.get("record_state", True):
        out["state"] = _state(torch, m)
    return out


def probe_module(ns, tw, torch, spec):
    cls = ns.get("BatchNorm")
    if not isinstance(cls, type):
        return {"steps": [], "error": "BatchNorm is not defined"}
    m = tw.run("q3", cls, spec["C"])
    if spec.get("load_state") is not None:
        tw.run("q3", m.load_state_dict, dict(zip(spec["load_state"]["keys"], spec["load_state"]["values"])))
    m = tw.run("q3", m.double)
    if spec.get("wb") is not None:
        with torch.no_grad():
            m.weight.copy_(spec["wb"][0])
            m.bias.copy_(spec["wb"][1])
    dtypes = [str(getattr(getattr(m, n, None), "dtype", None)) for n in ("running_mean", "running_var")]
    steps = []
    for step in spec["steps"]:
        steps.append(_module_step(torch, tw, m, step))
    return {"steps": steps, "dtypes": dtypes, "error": None}


PROBES = {"forward": probe_forward, "backward": probe_backward,
          "module_init": probe_module_init, "module": probe_module}


def run_probes(ns, tw, torch, probes: list) -> dict:
    results = {}
    for spec in probes:
        try:
            res = PROBES[spec["kind"]](ns, tw, torch, spec)
        except BaseException as exc:
            res = {"error": "student code raised " + short_error(exc)}
        results[str(spec["id"])] = res
    return results


# --------------------------------------------------------------------------- main


def main() -> int:
    result_fd = os.dup(1)  # the report goes here; everything printed goes to stderr
    os.dup2(2, 1)
    sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", buffering=0), write_through=True)
    import torch

    request = torch.load(io.BytesIO(sys.stdin.buffer.read()), weights_only=True)
    torch.set_num_threads(int(request["limits"].get("threads") or 1))
    apply_limits(request["limits"])
    tw = Tripwires(torch)
    namespace: dict = {"__name__": "__main__", "__builtins__": __builtins__}
    cell_errors = run_cells(request["cells"], namespace)
    probes = run_probes(namespace, tw, torch, request["probes"])
    report = {"protocol": PROTOCOL, "cell_errors": cell_errors, "probes": probes, "tripwire": tw.report()}
    buf = io.BytesIO()
    torch.save(report, buf)
    data = buf.getvalue()
    view = memoryview(data)
    while view:
        view = view[os.write(result_fd, view):]
    os.close(result_fd)
    sys.stdout.flush()
    os._exit(0)  # no atexit handlers or threads the submission left behind


if __name__ == "__main__":
    sys.exit(main())
