"""The assignment's rules, checked on the trusted side by reading the source (never running it).

The notebook forbids ``F.batch_norm`` / ``torch.batch_norm`` / ``nn.BatchNorm*`` in the answers and
autograd in question 2's backward pass. ``scan(cells)`` parses every code cell and finds, for each
answer (``batch_norm_forward`` -> q1, ``batch_norm_backward`` -> q2, ``BatchNorm`` -> q3), the
forbidden features its code reaches: directly, through names it uses that are bound at the top
level (helper functions, aliases such as ``bn = F.batch_norm``, ``from torch.nn.functional import
batch_norm``), transitively. Module-level statements that bind nothing (comparing with
``F.batch_norm`` while working, the q4 experiment) are allowed. A string constant that names a
forbidden attribute (``getattr(F, "batch_norm")``) counts too. Obfuscation (building names at run
time) can defeat a source scan; the sandbox's tripwires are the second line.
"""

from __future__ import annotations

import ast

ANSWERS = {"batch_norm_forward": "q1", "batch_norm_backward": "q2", "BatchNorm": "q3"}
BN_NAMES = {"batch_norm", "native_batch_norm", "_native_batch_norm_legit", "_batch_norm_impl_index",
            "cudnn_batch_norm", "miopen_batch_norm", "batch_norm_elemt", "BatchNorm1d", "BatchNorm2d",
            "BatchNorm3d", "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d", "SyncBatchNorm",
            "_BatchNorm", "_NormBase", "batchnorm"}
AUTOGRAD_NAMES = {"backward", "autograd", "vjp", "jvp", "jacrev", "jacfwd", "hessian", "functorch",
                  "functional_call", "grad_and_value"}
# question -> forbidden features (the default rules of the assignment)
DEFAULT_RULES = {"q1": {"batch_norm"}, "q2": {"batch_norm", "autograd"}, "q3": {"batch_norm"}}
DESCRIBE = {"batch_norm": "F.batch_norm / torch.batch_norm / nn.BatchNorm*",
            "autograd": "autograd (.backward(), torch.autograd, torch.func)"}


def _feature(name: str) -> str | None:
    if name in BN_NAMES:
        return "batch_norm"
    if name in AUTOGRAD_NAMES:
        return "autograd"
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
        if isinstance(node.value, str) and node.value.strip() in BN_NAMES | AUTOGRAD_NAMES - {"backward"}:
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


def _top_level(tree: ast.Module):
    """Top-level statements, looking inside module-level if/try/for/with blocks."""
    for node in tree.body:
        yield node
        if isinstance(node, (ast.If, ast.Try, ast.For, ast.While, ast.With)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, field, []) or []:
                    body = child.body if isinstance(child, ast.ExceptHandler) else [child]
                    yield from _top_level(ast.Module(body=body, type_ignores=[]))


def scan(cells: list[tuple[int, str]]) -> dict[str, dict[str, str]]:
    """{question: {feature: "cell C line L"}} for the forbidden features each answer reaches."""
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
            where = {f: f"cell {index} line {line}" for f, line in uses.features.items()}
            for name in names:
                bindings.setdefault(name, []).append((where, uses.names))
    found: dict[str, dict[str, str]] = {}
    for answer, question in ANSWERS.items():
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
        if features:
            found[question] = features
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
                reasons.append(f"{DESCRIBE[feature]} called at run time")
        if reasons:
            out[question] = reasons
    return out
