"""Issue 24 item 7: students can check themselves.

The notebook's visible tests (fixed tiny inputs, run by ``grader.check``) cover each behaviour:
evaluation mode, 4-D reduction, momentum, the module's buffers and ``state_dict``, the backward
pass on 4-D inputs; they carry at least half of the autograded points. Each one is run here, in
this process, on our own answer code with a bug planted for its behaviour (the solution's answer
cells and the notebook's test cells: no student code): the solution passes every visible test and
each planted bug fails the visible test of its behaviour. Under a variant the visible tests follow
the variant's conventions. The checker's visible cases use the same shapes (with fresh inputs).
"""

from __future__ import annotations

import inspect
import json
import textwrap
from pathlib import Path

import pytest

from bnviz.grading import build, checker, variants
from bnviz.grading.variants import Variant

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "notebooks" / "assignments" / "batch_norm" / "batch_norm.ipynb"
BEHAVIOURS = {"eval mode", "output 4-D", "running stats 4-D", "momentum", "buffers", "state_dict", "backward 4-D",
              "module eval"}
# behaviour -> (a bug planted in the solution, the visible tests (checker names) that must fail)
PLANTED = {
    "eval mode": (("    if training:\n        mean = x.mean", "    if True:\n        mean = x.mean"), {"q1 - 9"}),
    "output 4-D": (("dims = [0] + list(range(2, x.dim()))", "dims = [0]"), {"q1 - 10"}),
    "momentum": (("running_mean.mul_(1 - momentum).add_(momentum * mean)",
                  "running_mean.mul_(momentum).add_((1 - momentum) * mean)"), {"q1 - 2", "q1 - 10", "q1 - 11"}),
    "buffers": (('self.register_buffer("running_var", torch.ones(num_features))',
                 "self.running_var = torch.ones(num_features)"), {"q3 - 1", "q3 - 6"}),
    "num_batches_tracked": (("            self.num_batches_tracked.add_(1)", "            pass"), {"q3 - 6"}),
    "module eval": (("self.momentum, self.eps, self.training)", "self.momentum, self.eps, True)"), {"q3 - 6"}),
    "backward 4-D": (("m = dy.numel() // dy.shape[1]", "m = dy.shape[0]"), {"q2 - 4"}),
}


def _src(cell) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _visible_cells(nb: dict) -> list[tuple[str, str]]:
    """(checker name, source) of the notebook's visible test cells, numbered as otter numbers them."""
    out, counts, question = [], {}, None
    for cell in nb["cells"]:
        src = _src(cell)
        if cell["cell_type"] == "raw" and src.startswith("# BEGIN QUESTION"):
            question = next(ln.split(":", 1)[1].strip() for ln in src.splitlines() if ln.startswith("name:"))
        if cell["cell_type"] == "code" and src.startswith('""" # BEGIN TEST CONFIG'):
            counts[question] = counts.get(question, 0) + 1
            if "hidden: true" not in src.split("# END TEST CONFIG")[0]:
                out.append((f"{question} - {counts[question]}", src))
    return out


def _failing(nb: dict, old: str = "", new: str = "") -> set[str]:
    """The visible tests that fail on the answer cells (``old`` replaced by ``new``)."""
    ns: dict = {}
    for cell in nb["cells"]:
        src = _src(cell)
        if cell["cell_type"] == "code" and src.startswith(("import torch", "def batch_norm_", "class BatchNorm")):
            exec(compile(src.replace(old, new) if old else src, "<answer>", "exec"), ns)
    failed = set()
    for name, src in _visible_cells(nb):
        try:
            exec(compile(src, f"<{name}>", "exec"), ns)
        except Exception:
            failed.add(name)
    return failed


@pytest.fixture(scope="module")
def source_nb():
    return json.loads(SOURCE.read_text(encoding="utf-8"))


def test_at_least_half_of_the_points_have_a_visible_test():
    cov = checker.visible_coverage()
    print(f"visible tests: {cov['visible']:g} of {cov['total']:g} points; "
          f"points whose behaviour a visible test checks: {cov['covered']:g} of {cov['total']:g}")
    assert cov["total"] == 19
    assert cov["visible"] >= cov["total"] / 2 and cov["covered"] >= cov["total"] / 2
    visible = set().union(*(checker._behaviours(t.name) for t in checker.make_tests(0) if not t.hidden))
    assert BEHAVIOURS <= visible, BEHAVIOURS - visible


def test_the_notebook_and_the_checker_have_the_same_visible_tests(source_nb):
    assert [n for n, _ in _visible_cells(source_nb)] == [t.name for t in checker.make_tests(0) if not t.hidden]
    cov = checker.visible_coverage()  # the number the notebook's introduction states
    intro = " ".join(_src(source_nb["cells"][1]).split())
    assert f"They carry {cov['visible']:g} of the {cov['total']:g} autograded points" in intro


def test_the_solution_passes_every_visible_test(source_nb):
    assert _failing(source_nb) == set()


@pytest.mark.parametrize("behaviour", sorted(PLANTED))
def test_a_visible_test_catches_each_behaviours_bug(source_nb, behaviour):
    (old, new), must_fail = PLANTED[behaviour]
    assert old in "".join(_src(c) for c in source_nb["cells"]), old
    failed = _failing(source_nb, old, new)
    assert must_fail <= failed, (behaviour, failed)


def test_visible_tests_follow_the_variant(source_nb):
    """Under a variant the visible tests compare with the variant's reference: its answer key
    passes them, the public (PyTorch-convention) solution fails them."""
    v = variants.derive("test-class-0")
    nb = build.variant_notebook(source_nb, v)
    assert _failing(nb) == set()
    public_on_variant = set()
    ns: dict = {}
    for cell in source_nb["cells"]:  # the public answers with the variant's visible tests
        src = _src(cell)
        if cell["cell_type"] == "code" and src.startswith(("import torch", "def batch_norm_", "class BatchNorm")):
            exec(compile(src, "<answer>", "exec"), ns)
    for name, src in _visible_cells(nb):
        try:
            exec(compile(src, f"<{name}>", "exec"), ns)
        except Exception:
            public_on_variant.add(name)
    assert {"q1 - 9", "q1 - 10", "q1 - 11", "q2 - 4"} <= public_on_variant, public_on_variant


def test_the_checkers_visible_cases_use_the_notebooks_tiny_shapes():
    shapes = {}
    for t in checker.make_tests(0):
        if t.name in ("q1 - 9", "q1 - 10", "q1 - 11"):
            shapes[t.name] = tuple(t.probes[0]["xs"][0].shape)
        elif t.name == "q2 - 4":
            shapes[t.name] = tuple(t.probes[0]["x"].shape)
        elif t.name == "q3 - 6":
            shapes[t.name] = tuple(t.probes[0]["steps"][0]["x"].shape)
    assert shapes == {"q1 - 9": (3, 2), "q1 - 10": (2, 2, 2, 2), "q1 - 11": (4, 2), "q2 - 4": (2, 2, 2, 2),
                      "q3 - 6": (2, 2, 2, 2)}
    a, b = checker.make_tests(1), checker.make_tests(2)  # fresh inputs for the visible cases too
    assert not checker.torch.equal(a[8].probes[0]["xs"][0], b[8].probes[0]["xs"][0])


def test_the_notebooks_cache_code_is_the_checkers(source_nb):
    """Every test cell that builds the cache pastes ``variants.reference_cache`` verbatim."""
    code = textwrap.indent(inspect.getsource(variants.reference_cache), "    ")
    cells = [_src(c) for c in source_nb["cells"] if "def reference_cache(" in _src(c)]
    assert len(cells) == 9  # q2: four tests; q3: the five that run the module
    assert all(code in c for c in cells)
    assert variants.conventions_markdown(Variant()) in "".join(_src(c) for c in source_nb["cells"])
