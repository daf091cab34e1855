"""The assignments ``build`` and ``grade`` know, by name (the source notebook's stem, recorded by
``build`` as ``"assignment"`` in ``assignment.json``): each one's trusted checker, its rules
(question -> forbidden features, ``rules.py``'s names) and its answer names (for the source scan).

An ``assignment.json`` without a name was built before assignment 2 existed: it is ``batch_norm``.
``strict_plan`` turns a set of rules into what the worker's strict pass refuses, and when.
"""

from __future__ import annotations

from types import ModuleType

from . import checker, checker_norms, rules

DEFAULT = "batch_norm"
CHECKERS: dict[str, ModuleType] = {"batch_norm": checker, "norms": checker_norms}
# The kernel features (rules.KERNELS) some question's probes need although another question
# forbids them: assignment 2's q9 runs nn.BatchNorm. Those are refused only from the probes of the
# autograd questions on (``strict_plan``); every other forbidden kernel raises for the whole strict
# pass, its cells included (so no cell can compute a forbidden answer ahead of the probes).
NEEDS = {"batch_norm": set(), "norms": {"batch_norm"}}
# The assignments whose class variants build and grade support (variants.py; variants_norms.py with
# checker_norms.make_tests's `variant` hook and build's rewrite of its notebook, variants_norms_nb.py).
VARIANTS = {"batch_norm", "norms"}


def name_of(manifest: dict | None) -> str:
    """The assignment an ``assignment.json`` was built for (``batch_norm`` when it names none)."""
    name = (manifest or {}).get("assignment") or DEFAULT
    checker_of(name)  # a clear error for an unknown name
    return name


def checker_of(name: str) -> ModuleType:
    """The trusted checker of assignment ``name``; ValueError naming the valid ones otherwise."""
    if name not in CHECKERS:
        raise ValueError(f"unknown assignment {name!r}: grading knows {', '.join(sorted(CHECKERS))} "
                         "(the source notebook's file name without .ipynb)")
    return CHECKERS[name]


def rules_of(name: str) -> dict[str, set[str]]:
    """Question -> forbidden features: the checker's ``RULES``, else ``rules.DEFAULT_RULES``."""
    return {q: set(f) for q, f in getattr(checker_of(name), "RULES", rules.DEFAULT_RULES).items()}


def answers_of(name: str) -> dict[str, str]:
    """Answer name -> question, for ``rules.scan``: the checker's ``ANSWERS``, else ``rules.ANSWERS``."""
    return dict(getattr(checker_of(name), "ANSWERS", rules.ANSWERS))


def check_variant(name: str, variant) -> None:
    """ValueError if ``variant`` (a secret or a ``Variant``; None or the default: none) is asked
    for an assignment without variants."""
    if variant is None or getattr(variant, "is_default", False) or name in VARIANTS:
        return
    raise ValueError(f"assignment {name!r} has no class variants yet (variants exist for "
                     f"{', '.join(sorted(VARIANTS))}): build it without --variant")


def make_tests(name: str, seed: int, variant=None) -> list:
    """The tests of one seed (``variant``: None for PyTorch's conventions)."""
    mod = checker_of(name)
    if variant is None:
        return mod.make_tests(seed)
    check_variant(name, variant)
    return mod.make_tests(seed, variant)


def strict_plan(forbidden: dict[str, set[str]], needs: set[str] = frozenset()) -> dict | None:
    """What the strict pass refuses: ``{"kernels": [...], "late_kernels": [...], "autograd_phases":
    [...]}``. Autograd raises from the first probe of an ``autograd_phases`` question on (those
    probes run last). A forbidden kernel feature (``rules.KERNELS``) raises for the whole pass
    (``kernels``, as batch norm in assignment 1), unless ``needs`` (``NEEDS``) holds it: then from
    that same first probe on (``late_kernels``), which needs every question that forbids it to
    forbid autograd too (ValueError otherwise). None without rules."""
    if not forbidden:
        return None
    autograd = {q for q, f in forbidden.items() if "autograd" in f}
    kernels, late = [], []
    for feature in sorted(rules.KERNELS):
        where = {q for q, f in forbidden.items() if feature in f}
        if where and feature in needs and not where <= autograd:
            raise ValueError(f"{feature} is needed by a question and forbidden in {', '.join(sorted(where - autograd))}, "
                             "which allow autograd: the strict pass cannot refuse it there only")
        if where:
            (late if feature in needs else kernels).append(feature)
    return {"batch_norm": "batch_norm" in kernels, "kernels": kernels, "late_kernels": late,
            "autograd_phases": sorted(autograd)}
