"""The sandboxed half of grading: runs ONE submission's code and reports what it computed.

Run by the trusted side inside the sandbox as ``python -m bnviz.grading.worker`` (see
``sandbox.py``). This module is self-contained on purpose (standard library and torch only): the
sandbox sees a copy of this one file, not the rest of ``bnviz``.

Protocol:

* stdin: a ``torch.save``'d dict ``{"cells": [(index, source), ...], "probes": [spec, ...],
  "limits": {...}, "strict": {...}, "pass": "normal" | "strict"}`` written by the trusted side.
  The cells are plain Python (the trusted side already turned IPython syntax into Python, so the
  code it scanned is the code that runs). The probes carry only test *inputs*; expected values and
  tolerances never come here.
* ONE pass per worker, so per sandbox: the trusted side starts the *normal* pass (tripwires in
  place, forbidden APIs work) and the *strict* pass in two separate sandboxes that share no file,
  folder or process (issue 23: a submission replayed in the strict pass what it had computed in
  the normal one through the shared ``/scratch``). In the strict pass every batch-norm kernel
  raises at the dispatcher, registered before the student's code runs through a handle no Python
  object refers to (``register_for_good``), and, during the probes of the questions that forbid
  autograd, autograd raises too. The pass runs in a child forked from this process, which stays
  non-dumpable (``no_dumping``): the child cannot read or rewrite it through ``/proc``.
* Nothing of the worker is reachable from the student's globals: the cells run in a fresh
  ``__main__`` module, ``bnviz`` is dropped from ``sys.modules``, and ``get_ipython`` / ``otter``
  and the strict pass's raising functions are built by exec in dicts of their own. (Frames above
  the student's own, reached through ``sys._getframe``, still lead to the child's own runner: the
  child's report is the student's to rewrite, which is why it is only data to the trusted side.)
* stdout: the worker first moves the process's stdout to stderr, so whatever the student prints
  goes to stderr. At the end it writes ``MAGIC_PAIR`` + an 8-byte length and the pass's report
  (``encode``: ``MAGIC`` + 8-byte header length + a JSON header + raw tensor bytes). JSON cannot
  express shared references or objects; the trusted side (``report.py``) parses it itself, checks
  it against a strict schema, and treats it as untrusted data: nothing here can raise a score
  except outputs that match references the trusted side computes itself.

Order: import torch, apply the resource limits (they cannot be raised again without
CAP_SYS_RESOURCE, which the sandbox drops), fork the pass, install the tripwires (normal) or the
raising kernels (strict), run the answer cells with a harmless ``otter`` stub, run the probes,
write the pass's report.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import resource
import signal
import struct
import sys
import time
import types

PROTOCOL = 2
MAX_MESSAGE = 120
MAX_NAME = 200  # state_dict keys and other names the student chooses
MAGIC, MAGIC_PAIR = b"BNVZREP2", b"BNVZPAIR"
# a kernel feature (rules.KERNELS) -> the parts of the aten op names it covers ("norm_legit": the
# batch norm ops named _native_batch_norm_legit*; instance norm runs batch norm's kernels)
KERNEL_PATTERNS = {"batch_norm": ("batch_norm", "norm_legit"), "layer_norm": ("layer_norm",),
                   "group_norm": ("group_norm", "instance_norm")}
TENSOR_KEY = "\x00tensor"  # {TENSOR_KEY: index}: a tensor in the JSON header


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

    ADVISORY: two layers, Python wrappers around the public entry points and a TorchDispatchMode
    entered around every probe call (it sees ops reached through ``torch.ops``, aliases and
    ``getattr`` tricks on the calling thread). Code in this process can get past both (disable the
    mode, call ``__wrapped__``, use another thread, patch this object or its class); the report
    says whether they were still in place. The strict pass (``install_strict``) is the stronger
    check, and the trusted side also scans the source itself.
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
            for feature, patterns in KERNEL_PATTERNS.items():
                if any(p in name for p in patterns):
                    self._hit(feature, name)
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

        from torch.nn.modules import normalization

        for owner, attr, what in ((t.nn.functional, "batch_norm", "batch_norm"), (t, "batch_norm", "batch_norm"),
                                  (batchnorm._NormBase, "__init__", "batch_norm"),
                                  (t.nn.functional, "layer_norm", "layer_norm"), (t, "layer_norm", "layer_norm"),
                                  (normalization.LayerNorm, "__init__", "layer_norm"),
                                  (t.nn.functional, "group_norm", "group_norm"), (t, "group_norm", "group_norm"),
                                  (t.nn.functional, "instance_norm", "group_norm"),
                                  (normalization.GroupNorm, "__init__", "group_norm")):
            self._wrap(owner, attr, what)
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


# Built by exec in a dict of their own: ``get_ipython.__globals__`` and ``otter.Notebook.__init__.__globals__``
# are that dict, which holds nothing of this module.
_STUBS = """
class Notebook:
    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


_shell = Notebook()


def get_ipython():
    return _shell
"""


def _stubs() -> tuple[types.ModuleType, object]:
    """(an ``otter`` module whose ``Notebook(...)`` and ``grader.check(...)`` do nothing, a
    ``get_ipython`` whose ``system`` / ``run_line_magic`` / ... do nothing): the sandbox has no
    tests to run and no IPython. Neither reaches this module (see ``_STUBS``)."""
    import builtins

    scope = {"__builtins__": builtins, "__name__": "otter"}
    exec(compile(_STUBS, "<otter>", "exec"), scope)
    mod = types.ModuleType("otter")
    mod.Notebook = scope["Notebook"]
    return mod, scope["get_ipython"]


def student_namespace() -> dict:
    """The namespace the cells run in: a fresh ``__main__`` module (``import __main__`` gives it,
    not this worker, which runs as ``__main__``). Nothing of the worker stays reachable by name:
    ``bnviz`` is dropped from ``sys.modules`` (importing it again gives fresh copies that know
    nothing of this run) and the stubs live in their own dict."""
    import builtins

    main = types.ModuleType("__main__")
    otter, get_ipython = _stubs()
    main.__dict__.update({"__builtins__": builtins, "get_ipython": get_ipython})
    sys.modules["__main__"], sys.modules["otter"] = main, otter
    for name in [n for n in sys.modules if n == "bnviz" or n.startswith("bnviz.")]:
        del sys.modules[name]
    return main.__dict__


def run_cells(cells: list, namespace: dict, strict: bool = False) -> list:
    """Execute each code cell in order in one namespace (``student_namespace``); a cell that raises
    does not stop the others (as in a notebook run with errors allowed). Returns [{"cell", "error"}].
    The cells are plain Python already; a ``get_ipython()`` the trusted side left in (``%matplotlib``,
    ``!pip``) does nothing.

    ``strict`` (the strict pass): a top-level statement that a raising kernel stopped is skipped and
    the cell goes on with its next statement, so a comparison with ``F.batch_norm`` above the
    ``def`` (allowed while working) does not keep the answer from being defined; the kernels still
    raise there, so nothing forbidden is computed before the tests. Any other exception stops the
    cell, as in the normal pass."""
    errors = []
    for index, source in cells:
        try:
            if not strict:
                exec(compile(source, f"<cell {index}>", "exec"), namespace)
                continue
            skipped = False
            for stmt in ast.parse(source, f"<cell {index}>").body:
                before = REFUSED[0]
                try:
                    exec(compile(ast.Module([stmt], []), f"<cell {index}>", "exec"), namespace)
                except Exception as exc:
                    if not (_forbidden_in(exc) or REFUSED[0] > before):
                        raise
                    if not skipped:  # one entry per cell (the report's lists are bounded)
                        errors.append({"cell": int(index), "error": "(statement skipped) " + short_error(exc)})
                    skipped = True
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


def reference_forward(spec):
    """The trusted side's reference ``batch_norm_forward`` (``spec["reference_forward"]``, source
    text; issue 24: a q1 bug costs q1 only), defined in a namespace of its own; None without one."""
    source = spec.get("reference_forward")
    if not isinstance(source, str):
        return None
    namespace = {"__name__": "bnviz_reference_forward"}
    exec(compile(source, "<reference batch_norm_forward>", "exec"), namespace)
    return namespace["batch_norm_forward"]


def with_reference_forward(probe):
    """``probe`` with the spec's reference forward put in place of the student's
    ``batch_norm_forward`` in the namespace while it runs (question 3's module calls it by name)."""
    def run(ns, tw, torch, spec):
        ref = reference_forward(spec)
        if ref is None:
            return probe(ns, tw, torch, spec)
        had, own = "batch_norm_forward" in ns, ns.get("batch_norm_forward")
        ns["batch_norm_forward"] = ref
        try:
            return probe(ns, tw, torch, spec)
        finally:
            if had:
                ns["batch_norm_forward"] = own
            else:
                ns.pop("batch_norm_forward", None)
    return run


def probe_backward(ns, tw, torch, spec):
    fwd, bwd = reference_forward(spec) or ns.get("batch_norm_forward"), ns.get("batch_norm_backward")
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
    return {"keys": [str(k)[:MAX_NAME] for k in sd.keys()], "values": [plain(torch, v, str(k)[:MAX_NAME]) for k, v in sd.items()]}


def probe_module_init(ns, tw, torch, spec):
    cls = ns.get("BatchNorm")
    if not isinstance(cls, type):
        return {"error": "BatchNorm is not defined"}
    m = tw.run("q3", cls, spec["C"])
    return {"params": [str(n)[:MAX_NAME] for n, _ in m.named_parameters()][:256],
            "buffers": [str(n)[:MAX_NAME] for n, _ in m.named_buffers()][:256], "state": _state(torch, m), "error": None}


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


# the generic probe (assignment 2 and later): trusted stand-ins a probe may pass as arguments
MODEL_LAYERS = {"linear": "Linear", "conv": "Conv2d", "bn1d": "BatchNorm1d", "bn2d": "BatchNorm2d",
                "relu": "ReLU", "flatten": "Flatten"}


def _call_arg(torch, value, outs):
    """A ``call`` probe's argument: a tensor (a fresh copy), a plain value, a list / dict of them,
    or one of three trusted stand-ins: ``{"__out__": [k, j]}`` output j of call k (all of it when
    j is None); ``{"__fn__": [c, a, b, d]}`` the scalar function x -> c + sum(a x + b x^2 + d sin x)
    (a 0-d tensor of x's dtype); ``{"__model__": {"layers": [["linear", 4, 8], ...], "state":
    {"keys", "values"}, "train": bool}}`` a float64 ``nn.Sequential`` built here."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, list):
        return [_call_arg(torch, v, outs) for v in value]
    if isinstance(value, dict) and "__out__" in value:
        k, j = value["__out__"]
        return outs[k] if j is None else outs[k][j]
    if isinstance(value, dict) and "__fn__" in value:
        c, a, b, d = value["__fn__"]
        return lambda x: c + (a.to(x.dtype) * x + b.to(x.dtype) * x ** 2 + d.to(x.dtype) * torch.sin(x)).sum()
    if isinstance(value, dict) and "__model__" in value:
        spec = value["__model__"]
        layers = [getattr(torch.nn, MODEL_LAYERS[name])(*sizes) for name, *sizes in spec["layers"]]
        model = torch.nn.Sequential(*layers).double()
        model.load_state_dict(dict(zip(spec["state"]["keys"], spec["state"]["values"])))
        return model.train(bool(spec["train"]))
    if isinstance(value, dict):
        return {str(k): _call_arg(torch, v, outs) for k, v in value.items()}
    return value


def _plain_tree(torch, value, depth=0):
    """What a student function returned, as plain tensors, numbers, strings, lists and dicts (at
    most 64 entries each, 4 deep); a module as its state and every submodule's ``training`` flag."""
    if isinstance(value, torch.Tensor):
        return plain(torch, value, "output")
    if value is None or isinstance(value, bool):
        return None if value is None else value is True
    if isinstance(value, (int, float)):  # a subclass's overrides are not run
        return int.__index__(value) if isinstance(value, int) else float.__float__(value)
    if isinstance(value, str):
        return str.__str__(value)[:MAX_NAME]
    if isinstance(value, torch.nn.Module):
        norms = [m for m in value.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)][:256]
        return {"state": _state(torch, value), "training": [m.training is True for m in value.modules()][:256],
                "momentum": [_plain_tree(torch, m.momentum, 4) for m in norms]}
    if depth >= 4:
        return "too deep"
    if isinstance(value, (list, tuple, set, frozenset)):  # a set's order is arbitrary: judges compare sets
        return [_plain_tree(torch, v, depth + 1) for v in list(value)[:64]]
    if isinstance(value, dict):
        return {str(k)[:MAX_NAME]: _plain_tree(torch, v, depth + 1) for k, v in list(value.items())[:64]}
    return type(value).__name__[:MAX_NAME]


def probe_call(ns, tw, torch, spec):
    """``{"kind": "call", "phase": "q4", "calls": [{"fn": name, "args": [...], "kwargs": {...},
    "expect_error": bool, "return_args": bool}, ...]}``: calls the student's functions in order
    (arguments as in ``_call_arg``); each result is ``{"out": _plain_tree(output)}``, plus
    ``"args"`` (the arguments after the call) with return_args, or ``{"raised": "Type: message"}``
    when expect_error and the call raised an Exception (a strict-pass refusal is re-raised)."""
    outs, results = [], []
    for call in spec["calls"]:
        fn = ns.get(call["fn"])
        if not callable(fn):
            return {"calls": results, "error": f"{call['fn']} is not defined"}
        args = [_call_arg(torch, a, outs) for a in call.get("args", [])]
        kwargs = {str(k): _call_arg(torch, v, outs) for k, v in call.get("kwargs", {}).items()}
        try:
            out = tw.run(spec["phase"], fn, *args, **kwargs)
        except Exception as exc:
            if not call.get("expect_error") or _forbidden_in(exc):
                raise
            results.append({"raised": short_error(exc)})
            outs.append(None)
            continue
        outs.append(out)
        results.append({"out": _plain_tree(torch, out)})
        if call.get("return_args"):
            results[-1]["args"] = _plain_tree(torch, args)
    return {"calls": results, "error": None}


def phase_of(spec) -> str:
    """The question a probe's student code belongs to (a ``call`` probe names it)."""
    return str(spec.get("phase")) if spec["kind"] == "call" else PHASE[spec["kind"]]


PROBES = {"forward": probe_forward, "backward": probe_backward,
          "module_init": probe_module_init, "module": with_reference_forward(probe_module), "call": probe_call}
PHASE = {"forward": "q1", "backward": "q2", "module_init": "q3", "module": "q3"}


def run_probes(ns, tw, torch, probes: list, last: set = frozenset(), before_last=None) -> dict:
    """Run each probe; those of the phases in ``last`` go last, after ``before_last()``."""
    results = {}
    ordered = [p for p in probes if phase_of(p) not in last] + [p for p in probes if phase_of(p) in last]
    switched = False
    for spec in ordered:
        if before_last is not None and not switched and phase_of(spec) in last:
            before_last()
            switched = True
        tw.raised_in = None
        try:
            res = PROBES[spec["kind"]](ns, tw, torch, spec)
        except BaseException as exc:
            res = {"error": "student code raised " + short_error(exc)}
            if tw.raised_in not in (None, phase_of(spec)):  # e.g. q2's test failed in the q1 function
                res["skipped"] = tw.raised_in
        results[str(spec["id"])] = res
    return results


# --------------------------------------------------------------------------- the strict pass

# The strict pass's raising functions and its autograd engine stand-in, built by exec in a dict of
# their own (as the stubs): a traceback through them reaches that dict, not this module.
_REFUSERS = """
class Forbidden(RuntimeError):
    pass


count = [0]  # how often they raised, on any thread
blocked = [False]  # autograd refused (set for the questions that forbid it)
real = [None]  # the autograd engine


def refuse(*args, **kwargs):
    count[0] += 1
    raise Forbidden("forbidden here: a normalization kernel (batch / layer / group norm; strict re-run)")


def refuse_dual(*args, **kwargs):
    count[0] += 1
    raise Forbidden("forbidden in this question: forward-mode autograd (strict re-run)")


def pack(tensor):
    raise Forbidden("forbidden in this question: autograd (strict re-run)")


class Engine:
    def run_backward(self, *args, **kwargs):
        if blocked[0]:
            count[0] += 1
            raise Forbidden("forbidden in this question: autograd (strict re-run)")
        return real[0].run_backward(*args, **kwargs)

    def queue_callback(self, *args, **kwargs):
        return real[0].queue_callback(*args, **kwargs)

    def is_checkpoint_valid(self, *args, **kwargs):
        return real[0].is_checkpoint_valid(*args, **kwargs)
"""


def _refusers() -> dict:
    import builtins

    scope = {"__builtins__": builtins, "__name__": "strict"}
    exec(compile(_REFUSERS, "<strict>", "exec"), scope)
    return scope


_R = _refusers()
Forbidden, REFUSED = _R["Forbidden"], _R["count"]


class Direct:
    """The strict pass's stand-in for Tripwires: calls fn, and remembers in which question's
    function the first exception of a probe was raised (``raised_in``)."""

    def __init__(self):
        self.raised_in = None

    def run(self, phase, fn, *args, **kwargs):
        before = REFUSED[0]
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:
            if _forbidden_in(exc) or REFUSED[0] > before:  # a raising kernel, on any thread
                self.raised_in = self.raised_in or phase
            raise


def _forbidden_in(exc: BaseException) -> bool:
    """Whether a raising kernel of the strict pass is behind exc (itself, a cause or a context)."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, Forbidden):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def register_for_good(torch, namespace: str, ops: list, fn, keys: tuple) -> int:
    """Register fn as the kernel of each op (``namespace::op``) under every key of ``keys`` it can
    take; return how many registrations took. The registrations belong to a dispatcher handle
    (``torch._C._dispatch_library``, not ``torch.library.Library``, which keeps its handle in a
    Python object and in ``weakref.finalize``'s registry) whose reference count is raised once by
    hand and to which no Python object refers afterwards (the handle is not tracked by ``gc``):
    no frame, global, ``gc.get_objects()`` or finalizer leads to it, so nothing in Python can
    ``reset()`` it. It lives until the process ends. (Native memory writes through ``ctypes`` can
    still undo it: advisory, and ``ctypes`` is flagged by the scan.)"""
    import ctypes
    import warnings

    handle, done = torch._C._dispatch_library("IMPL", namespace, ""), 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        for op in ops:
            for key in keys:
                try:
                    handle.impl(op, key, fn, False)
                    done += 1
                except Exception:  # a key this operator cannot take
                    pass
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(handle))
    del handle
    return done


BN_KEYS = ("CompositeImplicitAutograd", "CompositeExplicitAutograd", "CPU", "AutogradCPU", "Autograd", "QuantizedCPU")


def install_strict(torch, features=("batch_norm",)) -> int:
    """Make every kernel of ``features`` (``KERNEL_PATTERNS``; batch norm: ``F.batch_norm``,
    ``torch.batch_norm``, ``nn.BatchNorm*``, ``torch.ops.aten.*batch_norm*``, ``instance_norm``,
    cudnn / miopen variants; layer norm; group norm) raise at the dispatcher, for every overload
    and dispatch key a CPU tensor can take, for good (``register_for_good``), and PyTorch's
    Python versions of them (``_refuse_decompositions``). Returns how many registrations took."""
    patterns = [p for f in features for p in KERNEL_PATTERNS[f]]
    if not patterns:
        return 0
    ops: dict[str, list] = {}
    for full in torch._C._dispatch_get_all_op_names():
        namespace, _, op = full.partition("::")
        if any(p in op for p in patterns) and namespace in ("aten", "quantized", "onednn"):
            ops.setdefault(namespace, []).append(op)
    done = sum(register_for_good(torch, ns, names, _R["refuse"], BN_KEYS) for ns, names in ops.items())
    _refuse_decompositions(patterns, _R["refuse"])
    return done


def sentinels(torch) -> dict:
    """One call per feature that must raise once it is refused (``still_raises``), its operator and
    inputs resolved now, before student code runs (which could rebind ``torch.ops.aten.*``)."""
    aten, one, two, three = torch.ops.aten, torch.ones(2, 1), torch.ones(2, 2), torch.ones(2, 2, 1)
    bn, ln, gn = aten.native_batch_norm.default, aten.native_layer_norm.default, aten.native_group_norm.default
    return {"batch_norm": lambda: bn(one, None, None, None, None, True, 0.1, 1e-5),
            "layer_norm": lambda: ln(two, [2], None, None, 1e-5),
            "group_norm": lambda: gn(three, None, None, 2, 2, 1, 1, 1e-5)}


def still_raises(calls: dict, features) -> bool:
    """Whether each refused feature's kernel still raises (advisory: it runs in the student's process)."""
    for feature in features:
        try:
            calls[feature]()
        except Forbidden:
            continue
        except BaseException:
            return False
        return False
    return True


def _refuse_decompositions(patterns, refuse) -> None:
    """PyTorch's own norms written in Python (``torch._decomp``: the decompositions and the tables
    that hand them out) raise too: they never reach a kernel. (``torch._refs`` and ``torch._prims``
    hold none of batch norm.) Advisory: a module can be imported afresh (the scan flags
    ``importlib`` and ``_decomp``)."""
    import importlib

    for name in ("torch._decomp", "torch._decomp.decompositions", "torch._decomp.decompositions_for_jvp"):
        try:
            module = importlib.import_module(name)
        except Exception:  # another torch version: nothing of that name to refuse
            continue
        for attr, value in list(vars(module).items()):
            if callable(value) and any(p in attr for p in patterns):
                setattr(module, attr, refuse)
    decomp = sys.modules.get("torch._decomp")
    tables = [getattr(decomp, "decomposition_table", None), *(getattr(decomp, "global_decomposition_table", {}) or {}).values()]
    for table in tables:
        if isinstance(table, dict):
            for op in list(table):
                if any(p in str(op) for p in patterns):
                    table[op] = refuse


def autograd_blocker(torch):
    """Installed before student code runs; returns a function that, once called, makes autograd
    raise: recording any tensor for backward on this thread (a saved-tensor hook; every
    differentiable formula a batch-norm backward needs saves tensors), running the autograd engine
    on any thread (the engine object ``torch.autograd`` calls is replaced by one that refuses
    while blocked), and forward-mode AD (``aten::_make_dual``, behind ``torch.autograd.forward_ad``
    and ``torch.func.jvp`` / ``jacfwd``, raises at the dispatcher, for good). The hook and the
    engine are Python-level: code that puts PyTorch's own back (``torch._C``, flagged by the scan)
    gets past them, so this check is advisory beyond ``_make_dual``."""
    from torch.autograd import variable

    push = torch._C._autograd._push_saved_tensors_default_hooks
    _R["real"][0] = variable.Variable._execution_engine
    variable.Variable._execution_engine = _R["Engine"]()

    def block():
        _R["blocked"][0] = True
        push(_R["pack"], lambda t: t)
        register_for_good(torch, "aten", ["_make_dual"], _R["refuse_dual"],
                          ("CompositeExplicitAutograd", "CompositeImplicitAutograd", "Autograd", "AutogradCPU", "CPU"))

    return block


# --------------------------------------------------------------------------- the report


def encode(torch, report: dict) -> bytes:
    """``MAGIC`` + 8-byte header length + JSON header + the tensors' raw bytes, in order. A tensor
    is ``{TENSOR_KEY: i}`` in the header; ``header["tensors"][i] = [dtype, shape, offset, nbytes]``."""
    table, chunks, offset = [], [], 0

    def walk(value):
        nonlocal offset
        if isinstance(value, torch.Tensor):
            t = value.detach().to("cpu").contiguous()
            data = t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            table.append([str(t.dtype).replace("torch.", ""), list(t.shape), offset, len(data)])
            chunks.append(data)
            offset += len(data)
            return {TENSOR_KEY: len(table) - 1}
        if isinstance(value, dict):
            return {str(k): walk(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v) for v in value]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        return str(type(value).__name__)[:MAX_NAME]

    body = walk(report)
    header = json.dumps({"report": body, "tensors": table}).encode("utf-8")
    return MAGIC + struct.pack("<Q", len(header)) + header + b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def run_pass(torch, request: dict, strict: bool) -> dict:
    """One pass over the cells and probes, in this (forked) process."""
    plan = request.get("strict") or {}
    if not strict:
        tw = Tripwires(torch)
        tw.raised_in = None
        namespace = student_namespace()
        cell_errors = run_cells(request["cells"], namespace)
        probes = run_probes(namespace, tw, torch, request["probes"])
        return {"protocol": PROTOCOL, "pass": "normal", "cell_errors": cell_errors, "probes": probes,
                "tripwire": tw.report()}
    quiet = os.open(os.devnull, os.O_WRONLY)  # what it prints was shown by the normal pass
    os.dup2(quiet, 1)
    os.dup2(quiet, 2)
    # the plan read (into immutable values) before student code runs: the cells can reach this frame
    refused = list(plan.get("kernels") or (["batch_norm"] if plan.get("batch_norm") else []))
    late = tuple(f for f in plan.get("late_kernels") or () if f not in refused)
    last = frozenset(plan.get("autograd_phases") or ())
    checks, kernels = sentinels(torch), [install_strict(torch, refused)]
    block_autograd = autograd_blocker(torch)

    def block():  # the autograd phases run last: autograd and the late kernels raise from here on
        block_autograd()
        kernels.append(install_strict(torch, late))
        refused.extend(late)

    namespace = student_namespace()
    cell_errors = run_cells(request["cells"], namespace, strict=True)
    probes = run_probes(namespace, Direct(), torch, request["probes"], last, block)
    return {"protocol": PROTOCOL, "pass": "strict", "cell_errors": cell_errors, "probes": probes,
            "intact": bool(still_raises(checks, refused)), "kernels": int(sum(kernels))}


def no_dumping() -> None:
    """Make this process non-dumpable (``prctl(PR_SET_DUMPABLE, 0)``): its ``/proc/<pid>/mem``,
    ``fd``, ``environ``... then need CAP_SYS_PTRACE, which nothing in the sandbox has, so the
    pass's child (the same user) can neither read nor rewrite this process. Inherited by the child
    (harmless: a process may always read its own). Raises OSError if the kernel refuses."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0)")


TIMED_OUT = {False: 124, True: 125}  # the worker's exit status when a pass ran past pass_seconds


def _wait(pid: int, deadline: float | None) -> int | None:
    """The child's wait status, or None after killing its process group at the deadline. Reaps
    every other child on the way: the worker is the sandbox's PID 1, so the orphans of the
    student's processes become its children."""
    delay = 0.005
    while True:
        done, status = os.waitpid(-1, os.WNOHANG if deadline else 0)
        if done == pid:
            return status
        if done:
            continue
        if time.monotonic() > deadline:
            for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
                try:
                    kill()
                except OSError:
                    pass
            os.waitpid(pid, 0)
            return None
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def fork_pass(torch, request: dict, strict: bool, result_fd: int, started: float) -> bytes:
    """Run the pass in a forked child (its own process group) that writes its encoded report to a
    private file; return it. The child never holds the channel to the trusted side, and this
    parent, which runs no student code, is non-dumpable (``no_dumping``). A pass that runs past
    ``limits["pass_seconds"]`` (counted from ``started``; the trusted side leaves it to the
    sandbox's own wall clock) ends the worker with ``TIMED_OUT[strict]``."""
    seconds = request["limits"].get("pass_seconds")
    deadline = started + float(seconds) if seconds else None
    # an unnamed file on the sandbox's sized /tmp (the seccomp filter refuses memfd_create: its
    # pages would escape the memory limit where there is no memory cgroup)
    fd = os.open("/tmp", os.O_TMPFILE | os.O_RDWR, 0o600)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setpgid(0, 0)
            os.close(result_fd)  # the child never sees the channel to the trusted side
            _write_all(fd, encode(torch, run_pass(torch, request, strict)))
            code = 0
        finally:
            os._exit(code)  # no atexit handlers or threads the submission left behind
    status = _wait(pid, deadline)
    if status is None:
        os._exit(TIMED_OUT[strict])
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) in (signal.SIGXCPU, signal.SIGKILL):
        os._exit(128 + os.WTERMSIG(status))  # a limit killed the pass: the sandbox reports it (as PID 1 a
        # signal to itself would be ignored)
    size = os.lseek(fd, 0, os.SEEK_END)
    os.lseek(fd, 0, os.SEEK_SET)
    limit = int(request["limits"].get("report_bytes") or 32 << 20)
    chunks, left = [], min(size, limit + 1)
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 24))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    os.close(fd)
    return b"".join(chunks)


# --------------------------------------------------------------------------- main


def main() -> int:
    started = time.monotonic()  # the normal pass's time limit counts from here, torch's import included
    result_fd = os.dup(1)  # the report goes here; everything printed goes to stderr
    os.dup2(2, 1)
    sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", buffering=0), write_through=True)
    import torch

    request = torch.load(io.BytesIO(sys.stdin.buffer.read()), weights_only=True)
    torch.set_num_threads(int(request["limits"].get("threads") or 1))
    apply_limits(request["limits"])
    no_dumping()
    part = fork_pass(torch, request, request.get("pass") == "strict", result_fd, started)
    _write_all(result_fd, MAGIC_PAIR + struct.pack("<Q", len(part)) + part)
    os.close(result_fd)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
