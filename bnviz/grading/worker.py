"""The sandboxed half of grading: runs ONE submission's code and reports what it computed.

Run by the trusted side inside the sandbox as ``python -m bnviz.grading.worker`` (see
``sandbox.py``). This module is self-contained on purpose (standard library and torch only): the
sandbox sees a copy of this one file, not the rest of ``bnviz``.

Protocol:

* stdin: a ``torch.save``'d dict ``{"cells": [(index, source), ...], "probes": [spec, ...],
  "limits": {...}, "strict": {...}}`` written by the trusted side. The cells are plain Python
  (the trusted side already turned IPython syntax into Python, so the code it scanned is the code
  that runs). The probes carry only test *inputs*; expected values and tolerances never come here.
* Two passes, each in a process forked from this one before any student code is imported: the
  *normal* pass (tripwires in place, forbidden APIs work) and the *strict* pass, in which every
  batch-norm kernel raises at the dispatcher (registered before the student's code runs, so no
  Python wrapper, mode, thread or frame trick reaches the real kernel) and, during the probes of
  the questions that forbid autograd, recording a graph for backward raises too.
* stdout: the worker first moves the process's stdout to stderr, so whatever the student prints
  goes to stderr. At the end it writes ``MAGIC_PAIR`` + for each pass an 8-byte length and the
  pass's report (``encode``: ``MAGIC`` + 8-byte header length + a JSON header + raw tensor bytes).
  JSON cannot express shared references or objects; the trusted side (``report.py``) parses it
  itself, checks it against a strict schema, and treats it as untrusted data: nothing here can
  raise a score except outputs that match references the trusted side computes itself.

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


def run_cells(cells: list, namespace: dict, strict: bool = False) -> list:
    """Execute each code cell in order in one namespace; a cell that raises does not stop the
    others (as in a notebook run with errors allowed). Returns [{"cell", "error"}]. The cells are
    plain Python already; a ``get_ipython()`` the trusted side left in (``%matplotlib``, ``!pip``)
    does nothing.

    ``strict`` (the strict pass): a top-level statement that a raising kernel stopped is skipped and
    the cell goes on with its next statement, so a comparison with ``F.batch_norm`` above the
    ``def`` (allowed while working) does not keep the answer from being defined; the kernels still
    raise there, so nothing forbidden is computed before the tests. Any other exception stops the
    cell, as in the normal pass."""
    sys.modules["otter"] = _otter_stub()
    namespace.setdefault("get_ipython", lambda: types.SimpleNamespace(
        system=lambda *a, **k: None, run_line_magic=lambda *a, **k: None, run_cell_magic=lambda *a, **k: None))
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


PROBES = {"forward": probe_forward, "backward": probe_backward,
          "module_init": probe_module_init, "module": with_reference_forward(probe_module)}
PHASE = {"forward": "q1", "backward": "q2", "module_init": "q3", "module": "q3"}


def run_probes(ns, tw, torch, probes: list, last: set = frozenset(), before_last=None) -> dict:
    """Run each probe; those of the phases in ``last`` go last, after ``before_last()``."""
    results = {}
    ordered = [p for p in probes if PHASE[p["kind"]] not in last] + [p for p in probes if PHASE[p["kind"]] in last]
    switched = False
    for spec in ordered:
        if before_last is not None and not switched and PHASE[spec["kind"]] in last:
            before_last()
            switched = True
        tw.raised_in = None
        try:
            res = PROBES[spec["kind"]](ns, tw, torch, spec)
        except BaseException as exc:
            res = {"error": "student code raised " + short_error(exc)}
            if tw.raised_in not in (None, PHASE[spec["kind"]]):  # e.g. q2's test failed in the q1 function
                res["skipped"] = tw.raised_in
        results[str(spec["id"])] = res
    return results


# --------------------------------------------------------------------------- the strict pass


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


REFUSED = [0]  # how often the strict pass's kernels raised (any thread)


def _forbidden_in(exc: BaseException) -> bool:
    """Whether a raising kernel of the strict pass is behind exc (itself, a cause or a context)."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, Forbidden):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


class Forbidden(RuntimeError):
    pass


def install_strict(torch):
    """Make every batch-norm kernel raise at the dispatcher, for every overload and dispatch key
    a CPU tensor can take (``F.batch_norm``, ``torch.batch_norm``, ``nn.BatchNorm*``,
    ``torch.ops.aten.*batch_norm*``, ``instance_norm``, cudnn / miopen variants). Returns
    (the libraries, which must stay alive, a probe that returns True while they still raise)."""
    import warnings

    def refuse(*args, **kwargs):
        REFUSED[0] += 1
        raise Forbidden("forbidden in this assignment: a batch-norm kernel (strict re-run)")

    libs = {}
    keys = ("CompositeImplicitAutograd", "CompositeExplicitAutograd", "CPU", "AutogradCPU", "Autograd",
            "QuantizedCPU")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        for full in torch._C._dispatch_get_all_op_names():
            namespace, _, op = full.partition("::")
            if "batch_norm" not in op or namespace not in ("aten", "quantized", "onednn"):
                continue
            lib = libs.get(namespace) or libs.setdefault(namespace, torch.library.Library(namespace, "IMPL"))
            for key in keys:
                try:
                    lib.impl(op, refuse, key)
                except Exception:  # a key this operator cannot take
                    pass
    _refuse_decompositions(torch, refuse)
    native = torch.ops.aten.native_batch_norm.default

    def still_raises() -> bool:
        try:
            native(torch.ones(2, 1), None, None, None, None, True, 0.1, 1e-5)
        except Forbidden:
            return True
        except BaseException:
            return False
        return False

    return libs, still_raises


def _refuse_decompositions(torch, refuse) -> None:
    """PyTorch's own batch norm written in Python (``torch._decomp``: the decompositions and the
    tables that hand them out) raises too: it never reaches a batch-norm kernel. (``torch._refs``
    and ``torch._prims`` hold none.)"""
    import importlib

    for name in ("torch._decomp", "torch._decomp.decompositions", "torch._decomp.decompositions_for_jvp"):
        try:
            module = importlib.import_module(name)
        except Exception:  # another torch version: nothing of that name to refuse
            continue
        for attr, value in list(vars(module).items()):
            if callable(value) and ("batch_norm" in attr or "norm_legit" in attr):
                setattr(module, attr, refuse)
    decomp = sys.modules.get("torch._decomp")
    tables = [getattr(decomp, "decomposition_table", None), *(getattr(decomp, "global_decomposition_table", {}) or {}).values()]
    for table in tables:
        if isinstance(table, dict):
            for op in list(table):
                if "batch_norm" in str(op) or "norm_legit" in str(op):
                    table[op] = refuse


AUTOGRAD_BLOCKED = [False]  # set for the questions that forbid autograd; read on every thread


def autograd_blocker(torch):
    """Installed before student code runs; returns a function that, once called, makes autograd
    raise: recording any tensor for backward on this thread (a saved-tensor hook; every
    differentiable formula a batch-norm backward needs saves tensors), running the autograd engine
    on any thread (the engine object ``torch.autograd`` calls is replaced by one that refuses
    while blocked), and forward-mode AD (``aten::_make_dual``, behind ``torch.autograd.forward_ad``
    and ``torch.func.jvp`` / ``jacfwd``, raises at the dispatcher)."""
    import warnings

    from torch.autograd import variable

    push = torch._C._autograd._push_saved_tensors_default_hooks
    real = variable.Variable._execution_engine

    def pack(tensor):
        raise Forbidden("forbidden in this question: autograd (strict re-run)")

    class Engine:
        def run_backward(self, *args, **kwargs):
            if AUTOGRAD_BLOCKED[0]:
                REFUSED[0] += 1
                raise Forbidden("forbidden in this question: autograd (strict re-run)")
            return real.run_backward(*args, **kwargs)

        def queue_callback(self, *args, **kwargs):
            return real.queue_callback(*args, **kwargs)

        def is_checkpoint_valid(self, *args, **kwargs):
            return real.is_checkpoint_valid(*args, **kwargs)

    variable.Variable._execution_engine = Engine()
    libs = []

    def dual(*args, **kwargs):
        REFUSED[0] += 1
        raise Forbidden("forbidden in this question: forward-mode autograd (strict re-run)")

    def block():
        AUTOGRAD_BLOCKED[0] = True
        push(pack, lambda t: t)
        lib = torch.library.Library("aten", "IMPL")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for key in ("CompositeExplicitAutograd", "CompositeImplicitAutograd", "Autograd", "AutogradCPU", "CPU"):
                try:
                    lib.impl("_make_dual", dual, key)
                except Exception:  # a key this operator cannot take
                    pass
        libs.append(lib)

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
    namespace: dict = {"__name__": "__main__", "__builtins__": __builtins__}
    if not strict:
        tw = Tripwires(torch)
        tw.raised_in = None
        cell_errors = run_cells(request["cells"], namespace)
        probes = run_probes(namespace, tw, torch, request["probes"])
        return {"protocol": PROTOCOL, "pass": "normal", "cell_errors": cell_errors, "probes": probes,
                "tripwire": tw.report()}
    quiet = os.open(os.devnull, os.O_WRONLY)  # what it prints was shown by the normal pass
    os.dup2(quiet, 1)
    os.dup2(quiet, 2)
    libs, still_raises = install_strict(torch) if plan.get("batch_norm") else ({}, lambda: True)
    block = autograd_blocker(torch)
    cell_errors = run_cells(request["cells"], namespace, strict=True)
    probes = run_probes(namespace, Direct(), torch, request["probes"], set(plan.get("autograd_phases") or ()), block)
    return {"protocol": PROTOCOL, "pass": "strict", "cell_errors": cell_errors, "probes": probes,
            "intact": bool(still_raises()), "kernels": len(libs)}


TIMED_OUT = {False: 124, True: 125}  # the worker's exit status when a pass ran past pass_seconds


def _wait(pid: int, deadline: float | None) -> int | None:
    """The child's wait status, or None after killing its process group at the deadline."""
    delay = 0.005
    while True:
        done, status = os.waitpid(pid, os.WNOHANG if deadline else 0)
        if done:
            return status
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
    """Run a pass in a forked child (its own process group) that writes its encoded report to a
    private file; return it. A pass that runs past ``limits["pass_seconds"]`` (counted from
    ``started``) ends the worker with ``TIMED_OUT[strict]``."""
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
        os.kill(os.getpid(), os.WTERMSIG(status))  # a limit killed the pass: the sandbox reports it
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
    passes = [False, True] if request.get("strict") else [False]
    parts = [fork_pass(torch, request, strict, result_fd, started if not strict else time.monotonic())
             for strict in passes]
    _write_all(result_fd, MAGIC_PAIR + b"".join(struct.pack("<Q", len(p)) + p for p in parts))
    os.close(result_fd)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
