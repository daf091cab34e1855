"""The assignments' rules, checked on the trusted side by reading the source (never running it).

Assignment 2 (``norms``) uses the same scan with its own answer names (``checker_norms.ANSWERS``,
passed as ``answers``) and two more features, ``layer_norm`` and ``group_norm`` (``F.layer_norm``,
``nn.LayerNorm``, ``F.group_norm``, ``F.instance_norm``, ``nn.GroupNorm``, their aten kernels).
What follows describes assignment 1.

The notebook forbids ``F.batch_norm`` / ``torch.batch_norm`` / ``nn.BatchNorm*`` in the answers and
autograd in question 2's backward pass. ``scan(cells)`` parses every code cell and finds, for each
answer (``batch_norm_forward`` -> q1, ``batch_norm_backward`` -> q2, ``BatchNorm`` -> q3), the
forbidden features its code reaches: directly, through names it uses that are bound at the top
level (helper functions, aliases such as ``bn = F.batch_norm``, ``from torch.nn.functional import
batch_norm``), transitively. Module-level statements that bind nothing (comparing with
``F.batch_norm`` while working, the q4 experiment) are allowed. A string constant that names a
forbidden attribute (``getattr(F, "batch_norm")``) counts too. Obfuscation (building names at run
time) can defeat a source scan; the sandbox's strict re-run (forbidden kernels raise at the
dispatcher) is the second line, its tripwires a third, advisory one.

``look_by_hand(cells)`` lists the features that can get past in-process checks (frame and module
introspection, threads, the dispatcher, ``ctypes``, ``__wrapped__``): not forbidden, but never needed
by this assignment's answers, so the gradebook flags them for a look by hand.
"""

from __future__ import annotations

import ast

ANSWERS = {"batch_norm_forward": "q1", "batch_norm_backward": "q2", "BatchNorm": "q3"}
BN_NAMES = {"batch_norm", "native_batch_norm", "_native_batch_norm_legit", "_batch_norm_impl_index",
            "cudnn_batch_norm", "miopen_batch_norm", "batch_norm_elemt", "BatchNorm1d", "BatchNorm2d",
            "BatchNorm3d", "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d", "SyncBatchNorm",
            "_BatchNorm", "_NormBase", "batchnorm",
            # PyTorch's batch norm written in Python (torch._decomp), which never reaches a kernel
            "_decomp", "decompositions", "decompositions_for_jvp", "decomposition_table", "get_decompositions",
            "core_aten_decompositions", "native_batch_norm_helper", "native_batch_norm_decomposition",
            "_native_batch_norm_legit_no_training", "_native_batch_norm_legit_functional",
            "_native_batch_norm_legit_no_stats", "_batch_norm_with_update", "_batch_norm_with_update_functional",
            "_batch_norm_no_update", "batch_norm_backward", "native_batch_norm_backward"}
LN_NAMES = {"layer_norm", "native_layer_norm", "native_layer_norm_backward", "LayerNorm", "_native_layer_norm",
            "native_layer_norm_decomposition"}
GN_NAMES = {"group_norm", "native_group_norm", "native_group_norm_backward", "GroupNorm", "instance_norm",
            "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "LazyInstanceNorm1d", "LazyInstanceNorm2d",
            "LazyInstanceNorm3d", "_InstanceNorm", "native_group_norm_decomposition"}
AUTOGRAD_NAMES = {"backward", "autograd", "vjp", "jvp", "jacrev", "jacfwd", "hessian", "functorch",
                  "functional_call", "grad_and_value", "forward_ad", "make_dual", "unpack_dual", "dual_level",
                  "_make_dual", "linearize"}
# question -> forbidden features (the default rules of the assignment)
DEFAULT_RULES = {"q1": {"batch_norm"}, "q2": {"batch_norm", "autograd"}, "q3": {"batch_norm"}}
# the features the strict pass refuses at the dispatcher (worker.KERNEL_PATTERNS: which aten ops each is)
KERNELS = {"batch_norm", "layer_norm", "group_norm"}
DESCRIBE = {"batch_norm": "F.batch_norm / torch.batch_norm / nn.BatchNorm*",
            "layer_norm": "F.layer_norm / torch.layer_norm / nn.LayerNorm",
            "group_norm": "F.group_norm / F.instance_norm / nn.GroupNorm / nn.InstanceNorm*",
            "autograd": "autograd (.backward(), torch.autograd, torch.func)"}


def _feature(name: str) -> str | None:
    if name in BN_NAMES:
        return "batch_norm"
    if name in AUTOGRAD_NAMES:
        return "autograd"
    if name in LN_NAMES:
        return "layer_norm"
    if name in GN_NAMES:
        return "group_norm"
    return None


class _Uses(ast.NodeVisitor):
    """Forbidden features used directly in a subtree (with a line) and the names it loads."""

    def __init__(self):
        self.features: dict[str, int] = {}
        self.names: set[str] = set()

    def _add(self, feature, node):
        if feature:
            self.features.setdefault(feature, getattr(node, "lineno", 0))

    def visit_Attribute(self, node):
        self._add(_feature(node.attr), node)
        if node.attr == "func" and isinstance(node.value, ast.Name) and node.value.id == "torch":
            self._add("autograd", node)
        self.generic_visit(node)

    def visit_Name(self, node):
        if isinstance(node.ctx, ast.Load):
            self.names.add(node.id)

    def visit_Constant(self, node):
        if isinstance(node.value, str) and node.value.strip() in STRING_NAMES:
            self._add(_feature(node.value.strip()), node)

    def visit_Import(self, node):
        for alias in node.names:
            for part in alias.name.split("."):
                self._add(_feature(part), node)
        self.generic_visit(node)

    def visit_ImportFrom(self, node):
        for part in (node.module or "").split("."):
            self._add(_feature(part), node)
        for alias in node.names:
            self._add(_feature(alias.name), node)


STRING_NAMES = BN_NAMES | LN_NAMES | GN_NAMES | AUTOGRAD_NAMES - {"backward"}


def _bound_names(node: ast.AST) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    targets = []
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, (ast.AnnAssign, ast.AugAssign, ast.For, ast.AsyncFor)):
        targets = [node.target]
    elif isinstance(node, (ast.With, ast.AsyncWith)):
        targets = [i.optional_vars for i in node.items if i.optional_vars is not None]
    return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}


_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef, ast.ListComp, ast.SetComp,
           ast.DictComp, ast.GeneratorExp)


def _local_names(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    """The names a function binds in its own scope (parameters, assignments, loop targets, imports,
    nested definitions), less those it declares ``global`` / ``nonlocal``: its loads of them never
    reach a top-level binding (a scratch cell's ``y = F.layer_norm(...)`` is not the ``y`` inside
    an answer). Nested scopes are not entered (their names stay loads: the safe side)."""
    a = fn.args
    names = {p.arg for p in a.posonlyargs + a.args + a.kwonlyargs} | {p.arg for p in (a.vararg, a.kwarg) if p}
    declared, todo = set(), list(fn.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            declared.update(node.names)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(al.asname or al.name).split(".")[0] for al in node.names}
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        if not isinstance(node, _SCOPES):
            todo.extend(ast.iter_child_nodes(node))
    return (names | _comprehension_locals(fn)) - declared


_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)


def _comprehension_locals(fn: ast.AST) -> set[str]:
    """Names a function (or any top-level statement) loads only inside comprehensions that bind them (``[nodes[k] for k in
    keys]``: that ``k`` never reaches a top-level ``k``). A name also loaded elsewhere in the
    function stays a load. The first generator's iterable is evaluated outside the comprehension."""
    inside, outside = set(), set()

    def walk(node: ast.AST, bound: frozenset) -> None:
        if isinstance(node, _COMPREHENSIONS):
            inner = bound
            for k, gen in enumerate(node.generators):
                walk(gen.iter, bound if k == 0 else inner)
                inner = inner | {n.id for n in ast.walk(gen.target) if isinstance(n, ast.Name)}
                for cond in gen.ifs:
                    walk(cond, inner)
            for part in ((node.key, node.value) if isinstance(node, ast.DictComp) else (node.elt,)):
                walk(part, inner)
            return
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            (inside if node.id in bound else outside).add(node.id)
        for child in ast.iter_child_nodes(node):
            walk(child, bound)

    walk(fn, frozenset())
    return inside - outside


def _outer_loads(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    """Names a ``def`` statement evaluates outside the function's scope: defaults, decorators,
    annotations (``def f(x, ln=ln)``: the default is the top-level ``ln``, the parameter local)."""
    a = fn.args
    params = a.posonlyargs + a.args + a.kwonlyargs + [p for p in (a.vararg, a.kwarg) if p]
    outer = [*a.defaults, *(d for d in a.kw_defaults if d), *fn.decorator_list, fn.returns,
             *(p.annotation for p in params)]
    return {n.id for e in outer if e is not None for n in ast.walk(e) if isinstance(n, ast.Name)}


def _top_level(tree: ast.Module):
    """Top-level statements, looking inside module-level if/try/for/with blocks."""
    for node in tree.body:
        yield node
        if isinstance(node, (ast.If, ast.Try, ast.For, ast.While, ast.With)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, field, []) or []:
                    body = child.body if isinstance(child, ast.ExceptHandler) else [child]
                    yield from _top_level(ast.Module(body=body, type_ignores=[]))


def scan(cells: list[tuple[int, str]], answers: dict[str, str] | None = None) -> dict[str, dict[str, str]]:
    """{question: {feature: "cell C line L"}} for the forbidden features each answer reaches;
    ``answers``: answer name -> question (default ``ANSWERS``, assignment 1's; assignment 2's is
    ``checker_norms.ANSWERS``: ``assignments.answers_of``). Several answers of one question merge."""
    bindings: dict[str, list[tuple[dict[str, str], set[str]]]] = {}
    for index, source in cells:
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue  # IPython magics etc.; the sandbox reports cells that do not run
        for node in _top_level(tree):
            names = _bound_names(node)
            if not names:
                continue
            uses = _Uses()
            uses.visit(node.value if isinstance(node, ast.Assign) else node)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                uses.names = (uses.names - _local_names(node)) | _outer_loads(node)
            else:  # a top-level loop's all(isinstance(a, T) for a in ...) is not the top-level a
                uses.names -= _comprehension_locals(node)
            where = {f: f"cell {index} line {line}" for f, line in uses.features.items()}
            for name in names:
                bindings.setdefault(name, []).append((where, uses.names))
    found: dict[str, dict[str, str]] = {}
    for answer, question in (ANSWERS if answers is None else answers).items():
        features, seen, todo = {}, set(), [answer]
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            for where, names in bindings.get(name, []):
                for f, w in where.items():
                    features.setdefault(f, w)
                todo.extend(names - seen)
        for f, w in features.items():
            found.setdefault(question, {}).setdefault(f, w)
    return found


def violations(scanned: dict, tripwire_hits: list[dict], rules: dict[str, set[str]]) -> dict[str, list[str]]:
    """{question: [reasons]} where a forbidden feature was found by the scan or at run time."""
    out: dict[str, list[str]] = {}
    for question, forbidden in rules.items():
        reasons = []
        for feature in sorted(forbidden):
            if feature in scanned.get(question, {}):
                reasons.append(f"{DESCRIBE[feature]} in the source ({scanned[question][feature]})")
            if any(h.get("phase") == question and h.get("what") == feature for h in tripwire_hits):
                reasons.append(f"{DESCRIBE[feature]} called at run time (advisory tripwire)")
        if reasons:
            out[question] = reasons
    return out


# feature -> (what the flag says); found by ``look_by_hand``
HAND = {
    "dispatch": "torch.utils._python_dispatch / dispatch modes",
    "wrapped": "__wrapped__ (reaching past a wrapper)",
    "frames": "frame access (sys._getframe / inspect / f_back / f_locals)",
    "modules": "sys.modules / importlib (reaching or patching modules by name)",
    "threads": "threads or processes (threading / asyncio / concurrent.futures / multiprocessing)",
    "ctypes": "ctypes / cffi (native memory)",
    "library": "torch.library (registering kernels)",
    "ops": "torch.ops (raw operators)",
    "torch_C": "torch._C (PyTorch internals)",
    "gc": "gc.get_objects / get_referrers (finding live objects)",
    "internals": "torch._decomp / _refs / _prims (PyTorch's operators written in Python)",
    "function": "a function's or traceback's internals (__globals__ / __closure__ / __code__ / tb_next)",
    "proc": "/proc files of a process (/proc/<pid>/mem, fd, maps)",
}
_HAND_MODULES = {"threading": "threads", "_thread": "threads", "concurrent": "threads", "multiprocessing": "threads",
                 "asyncio": "threads", "importlib": "modules", "_decomp": "internals", "_refs": "internals",
                 "_prims": "internals",
                 "ctypes": "ctypes", "cffi": "ctypes", "inspect": "frames", "gc": "gc", "_python_dispatch": "dispatch"}
_HAND_ATTRS = {"_python_dispatch": "dispatch", "_disable_current_modes": "dispatch", "TorchDispatchMode": "dispatch",
               "__wrapped__": "wrapped", "_getframe": "frames", "currentframe": "frames", "f_back": "frames",
               "f_locals": "frames", "f_globals": "frames", "tb_frame": "frames", "gi_frame": "frames",
               "stack": None, "get_objects": "gc", "get_referrers": "gc", "_C": None, "ops": None,
               "library": None, "modules": None, "_decomp": "internals", "_refs": "internals", "_prims": "internals",
               "__globals__": "function", "__closure__": "function", "__code__": "function", "tb_next": "function",
               "__traceback__": "function", "getppid": "proc"}
_HAND_DOTTED = {"torch._C": "torch_C", "torch.ops": "ops", "torch.library": "library", "sys.modules": "modules",
                "inspect.stack": "frames"}
_HAND_STRINGS = {"__wrapped__": "wrapped", "_getframe": "frames", "f_back": "frames", "f_locals": "frames",
                 "_python_dispatch": "dispatch", "_disable_current_modes": "dispatch", "modules": "modules",
                 "_C": "torch_C", "get_objects": "gc", "ctypes": "ctypes", "threading": "threads",
                 "asyncio": "threads", "importlib": "modules", "__globals__": "function", "__closure__": "function",
                 "__code__": "function"}


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _membership_only(tree: ast.AST) -> set[int]:
    """ids of ``sys.modules`` nodes used only as ``x in sys.modules`` (the setup cell's Colab test)."""
    return {id(c) for n in ast.walk(tree) if isinstance(n, ast.Compare)
            for op, c in zip(n.ops, n.comparators) if isinstance(op, (ast.In, ast.NotIn)) and _dotted(c) == "sys.modules"}


def _hand_features(tree: ast.AST):
    """(feature, line) for each look-by-hand feature in a parsed cell."""
    allowed = _membership_only(tree)
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            for alias in node.names:
                for part in alias.name.split("."):
                    if part in _HAND_MODULES:
                        yield _HAND_MODULES[part], line
                if alias.name.startswith(("torch._C", "torch.library", "torch.ops")):
                    yield _HAND_DOTTED[".".join(alias.name.split(".")[:2])], line
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            for part in module.split("."):
                if part in _HAND_MODULES:
                    yield _HAND_MODULES[part], line
            for alias in node.names:
                full = f"{module}.{alias.name}"
                for dotted, feature in _HAND_DOTTED.items():
                    if full == dotted or full.startswith(dotted + ".") or module.startswith(dotted):
                        yield feature, line
                if _HAND_ATTRS.get(alias.name):
                    yield _HAND_ATTRS[alias.name], line
        elif isinstance(node, ast.Attribute) and id(node) not in allowed:
            dotted = _dotted(node)
            if dotted in _HAND_DOTTED:
                yield _HAND_DOTTED[dotted], line
            elif _HAND_ATTRS.get(node.attr):
                yield _HAND_ATTRS[node.attr], line
        elif isinstance(node, ast.Name) and node.id == "__import__":
            yield "modules", line
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.strip() in _HAND_STRINGS:
            yield _HAND_STRINGS[node.value.strip()], line
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("/proc/"):
            yield "proc", line


def look_by_hand(cells: list[tuple[int, str]], skip: set[str] = frozenset()) -> list[str]:
    """What in the code (cells whose stripped source is in ``skip``, the handed-out ones, aside)
    an instructor should look at by hand: one "<what> (cell C line L)" per feature, in HAND order."""
    first: dict[str, str] = {}
    for index, source in cells:
        if source.strip() in skip:
            continue
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue
        for feature, line in _hand_features(tree):
            first.setdefault(feature, f"cell {index} line {line}")
    return [f"{HAND[f]} ({first[f]})" for f in HAND if f in first]
