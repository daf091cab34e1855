"""The norms notebook rewritten for a class variant (``variants_norms.py``): what ``build`` hands to
``otter assign`` instead of the source notebook, as ``build.variant_notebook`` does for assignment 1.

``variant_notebook(nb, v)`` rewrites questions 4 and 5: their conventions text, the answer cells
(``variants_norms.answer_key``), every test cell (generated here, one per case of
``checker_norms``, with the same points and visibility, checking against the variant's reference
functions, whose source they carry) and the "Check." cells (which compared with ``F.layer_norm`` /
``F.group_norm``: they now compare the backward with ``numerical_gradient`` of question 3). Every
rewrite must apply, or ValueError (the source notebook changed and this module was not updated).
"""

from __future__ import annotations

import copy
import inspect
import textwrap

from . import variants_norms
from .variants_norms import NormsVariant

# ---------------------------------------------------------------------------- question text

_Q4_OLD = ("for `x` of shape `(N, D)` each row is normalised by its own\nmean and (biased) variance; for `(N, C, H, W)` "
           "each example is normalised over all of its\n$C \\cdot H \\cdot W$ values. Then $y = \\gamma \\hat x + \\beta$ "
           "with `gamma`, `beta` of shape\n`x.shape[1:]` (elementwise, as `F.layer_norm(x, x.shape[1:], gamma, beta, eps)`), "
           "and $\\epsilon$\ninside the square root.")
_Q5_OLD = ("for `x` of shape `(N, C, H, W)` the `C` channels are split into\n`G` groups of `C // G` **consecutive** channels "
           "(channels `0 .. C/G - 1` form group 0, as in\nPyTorch), and each (example, group) pair is normalised over its "
           "$C/G \\cdot H \\cdot W$ values with\nthe biased variance; then a **per-channel** $\\gamma, \\beta$ of shape `(C,)`.")
_TABLE_OLD = "`layer_norm_forward` / `layer_norm_backward`, for (N, D) and (N, C, H, W)"
_CHECK_OLD = ("**Check.** Both errors should be below about `1e-10` in float64.",
              "**Check.** Errors below about `1e-10`; the last line should print the `ValueError`.")
CLASS = "**This class's conventions** (they differ from PyTorch's on purpose, so `F.{fn}` will not match):"


def _four(v) -> str:
    return "(N, C, H, W)" if v.layout == "channels_first" else "(N, H, W, C)"


def _eps_text(v) -> str:
    return ("$\\epsilon$ inside the square root, $\\hat x = (x - \\mu)/\\sqrt{\\sigma^2 + \\epsilon}$" if v.eps == "inside"
            else "$\\epsilon$ **added to the standard deviation**, outside the square root, "
                 "$\\hat x = (x - \\mu)/(\\sqrt{\\sigma^2} + \\epsilon)$")


def q4_text(v: NormsVariant) -> str:
    if v.ln_axes == "all":
        how = (f"for `{_four(v)}` each example is normalised over all of its values, then\n"
               "$y = \\gamma \\hat x + \\beta$ with `gamma`, `beta` of shape `x.shape[1:]` (elementwise)")
    else:
        how = (f"for `{_four(v)}` each example is normalised **at every position separately, over its `C` "
               "channels only**\n(as ConvNeXt's LayerNorm: each pixel is a token), then $y = \\gamma \\hat x + \\beta$ "
               "with `gamma`, `beta` of shape\n`(C,)`, one per channel")
    return (f"for `x` of shape `(N, D)` each row is normalised by its own\nmean and (biased) variance; {how}; "
            f"{_eps_text(v)}.\n\n" + CLASS.format(fn="layer_norm") + " layout `" + _four(v) + "`, "
            + ("statistics over all of an example's values" if v.ln_axes == "all" else "statistics over the channels")
            + ", eps " + v.eps + ".")


def q5_text(v: NormsVariant) -> str:
    where = "the last axis" if v.layout == "channels_last" else "axis 1"
    groups = ("`G` groups of `C // G` **consecutive** channels (channels `0 .. C/G - 1` form group 0)"
              if v.groups == "contiguous" else
              "`G` **strided** groups: channel `c` belongs to group `c % G` (group 0 holds channels\n"
              "`0, G, 2G, ...`)")
    return (f"for `x` of shape `{_four(v)}` (channels on {where}) the `C` channels are split into\n{groups}, and each "
            "(example, group) pair is normalised over its $C/G \\cdot H \\cdot W$ values with\nthe biased variance and "
            f"{_eps_text(v)}; then a **per-channel** $\\gamma, \\beta$ of shape `(C,)`.\n\n"
            + CLASS.format(fn="group_norm") + f" layout `{_four(v)}`, {v.groups} groups, eps {v.eps}.")


# ---------------------------------------------------------------------------- tests

_CHECKS = '''
def _layout(t):
    return t.movedim(1, -1).contiguous() if t.dim() == 4 and _V.layout == "channels_last" else t

def _params(q, shape, g):
    p = (shape[1],) if q == "q5" or (len(shape) == 4 and _V.ln_axes == "channel") else tuple(_layout(torch.empty(shape)).shape[1:])
    return torch.randn(p, dtype=torch.float64, generator=g), torch.randn(p, dtype=torch.float64, generator=g)

def _ref(x, gamma, beta, G):
    return layer_norm_reference(_V, x, gamma, beta) if G is None else group_norm_reference(_V, x, gamma, beta, G)

def _forward(fns, setups, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    for shape, G in setups:
        x = _layout(0.5 + scale * torch.randn(shape, dtype=torch.float64, generator=g))
        gamma, beta = _params("q4" if G is None else "q5", shape, g)
        out = fns[0](x, gamma, beta, *([] if G is None else [G]))
        assert isinstance(out, tuple) and len(out) == 2, "the forward pass must return (y, cache)"
        assert torch.allclose(out[0], _ref(x, gamma, beta, G), rtol=1e-8, atol=1e-10), \\
            f"output for {tuple(x.shape)}{'' if G is None else f', G={G}'} differs from the reference (this class's conventions)"

def _backward(fns, setups, seed):
    g = torch.Generator().manual_seed(seed)
    for shape, G in setups:
        x = _layout(0.5 + 2 * torch.randn(shape, dtype=torch.float64, generator=g))
        gamma, beta = _params("q4" if G is None else "q5", shape, g)
        dy = torch.randn(x.shape, dtype=torch.float64, generator=g)
        extra = [] if G is None else [G]
        out = fns[1](dy, fns[0](x, gamma, beta, *extra)[1])
        assert isinstance(out, (tuple, list)) and len(out) == 3, "the backward pass must return (dx, dgamma, dbeta)"
        xr, gr, br = (t.clone().requires_grad_() for t in (x, gamma, beta))
        ref = torch.autograd.grad(_ref(xr, gr, br, G), (xr, gr, br), dy)
        for name, a, b in zip(["dx", "dgamma", "dbeta"], out, ref):
            assert a.shape == b.shape and (a - b).norm() / b.norm() < 1e-8, f"{name} differs from autograd's for {tuple(x.shape)}"

def _independent(fns, shape, G, j, seed):
    g = torch.Generator().manual_seed(seed)
    x = _layout(torch.randn(shape, dtype=torch.float64, generator=g))
    gamma, beta = _params("q4" if G is None else "q5", shape, g)
    x2 = x.clone()
    x2[j] = 5 + 10 * torch.randn(x.shape[1:], dtype=torch.float64, generator=g)
    extra = [] if G is None else [G]
    y1, y2 = fns[0](x, gamma, beta, *extra)[0], fns[0](x2, gamma, beta, *extra)[0]
    keep = [i for i in range(shape[0]) if i != j]
    assert torch.allclose(y1[keep], y2[keep], rtol=1e-12, atol=1e-12), f"changing example {j} changed the other examples' outputs"

def _identities(fns, seed):
    g = torch.Generator().manual_seed(seed)
    x = _layout(1 + 3 * torch.randn(3, 4, 2, 3, dtype=torch.float64, generator=g))
    ones, zeros = torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    spatial = (2, 3) if _V.layout == "channels_first" else (1, 2)
    assert torch.allclose(fns[0](x, ones, zeros, 1)[0], normalise(_V, x, (1, 2, 3), 1e-5), rtol=1e-8, atol=1e-10), \\
        "G = 1 must equal LayerNorm over (C, H, W)"
    assert torch.allclose(fns[0](x, ones, zeros, 4)[0], normalise(_V, x, spatial, 1e-5), rtol=1e-8, atol=1e-10), \\
        "G = C must equal instance norm"

def _bad_groups(fns):
    try:
        fns[0](_layout(torch.randn(2, 6, 2, 2, dtype=torch.float64)), torch.ones(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64), 4)
        raised = None
    except ValueError as e:
        raised = str(e)
    assert raised is not None, "C=6, G=4 must raise a ValueError"
    assert "6" in raised and "4" in raised, "the error must name C and G"
'''

LN, GN = "(layer_norm_forward, layer_norm_backward)", "(group_norm_forward, group_norm_backward)"
# question -> case number -> the checks of that case (the checker's cases, with seeds of their own)
CALLS = {
    "q4": {1: [f"_forward({LN}, [((4, 5), None)], 9)"], 2: [f"_backward({LN}, [((4, 5), None)], 9)"],
           3: [f"_forward({LN}, [((3, 4, 5, 2), None), ((2, 3, 1, 1), None), ((1, 6), None)], 10)"],
           4: [f"_backward({LN}, [((3, 4, 5, 2), None), ((1, 6), None), ((8, 2, 3, 3), None)], 11)"],
           5: [f"_independent({LN}, (4, 3, 2, 2), None, 1, 12)"],
           6: [f"_forward({LN}, [((6, 5), None), ((2, 3, 2, 2), None)], 13, scale=1e-3)"]},
    "q5": {1: [f"_forward({GN}, [((2, 4, 3, 3), 2)], 14)"], 2: [f"_backward({GN}, [((2, 4, 2, 2), 2)], 15)"],
           3: [f"_forward({GN}, [((3, 6, 4, 5), 3), ((2, 8, 1, 1), 4), ((1, 6, 2, 3), 2)], 16)"],
           4: [f"_backward({GN}, [((3, 6, 4, 5), 3), ((2, 4, 3, 3), 1), ((2, 4, 3, 3), 4), ((1, 6, 2, 3), 2)], 17)"],
           5: [f"_identities({GN}, 18)"], 6: [f"_bad_groups({GN})", f"_independent({GN}, (3, 6, 2, 2), 3, 2, 19)"]},
}


def test_cell(v: NormsVariant, question: str, number: int, points: float, hidden: bool) -> str:
    """One otter test cell of the variant (the reference functions' source inside ``_test()``)."""
    refs = [inspect.getsource(f) for f in (variants_norms.normalise, variants_norms.layer_norm_reference,
                                           variants_norms.group_order, variants_norms.group_norm_reference)]
    body = "\n".join(["import types as _types", f"_V = _types.SimpleNamespace(**{v.to_dict()!r})", *refs,
                      _CHECKS.strip("\n"), "", *CALLS[question][number]])
    config = f'""" # BEGIN TEST CONFIG\npoints: {points:g}\n' + ("hidden: true\n" if hidden else "") + '""" # END TEST CONFIG\n'
    return (config + "import contextlib, io, torch\n\ndef _test():\n"
            + textwrap.indent(body, "    ", lambda line: line.strip() != "")
            + "\n\nwith contextlib.redirect_stdout(io.StringIO()):\n    _test()\n")


def check_cell(v: NormsVariant, question: str) -> str:
    """The scratch check after question 4 / 5: the backward against ``numerical_gradient`` of the
    forward (question 3), since ``F.layer_norm`` / ``F.group_norm`` follow PyTorch's conventions."""
    shape = "3, 4, 2, 2" if v.layout == "channels_first" else "3, 2, 2, 4"
    if question == "q4":
        p = "4" if v.ln_axes == "channel" else shape[3:]
        fwd, extra = "layer_norm_forward", ""
    else:
        p, fwd, extra = "4", "group_norm_forward", ", 2"
    lines = [f"_x = torch.randn({shape}, dtype=torch.float64, generator=torch.Generator().manual_seed(3))",
             f"_gamma, _beta = torch.randn({p}, dtype=torch.float64), torch.randn({p}, dtype=torch.float64)",
             f"_dy = torch.randn_like(_x)",
             f"_y, _cache = {fwd}(_x, _gamma, _beta{extra})",
             f"_num = numerical_gradient(lambda x: ({fwd}(x, _gamma, _beta{extra})[0] * _dy).sum(), _x.clone())",
             f"print(\"backward vs numerical_gradient\", rel_error_check({fwd.replace('forward', 'backward')}(_dy, _cache)[0], _num))"]
    if question == "q5":
        lines += ["try:", f"    group_norm_forward(_x, _gamma, _beta, 3)", "except ValueError as _e:",
                  "    print(\"ValueError:\", _e)"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the notebook


def _source(cell) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _question_of(texts: list[str]) -> list[str | None]:
    out, current = [], None
    for text in texts:
        if text.startswith("# BEGIN QUESTION"):
            current = text.split("name:")[1].split()[0]
        out.append(current)
    return out


def variant_notebook(nb: dict, v: NormsVariant) -> dict:
    """A copy of the source notebook rewritten for ``v`` (one test cell per case of the checker's
    questions 4 and 5, in order, with its points and visibility)."""
    from .checker_norms import make_tests

    cases: dict[str, list] = {"q4": [], "q5": []}
    for t in make_tests(0, v):
        if t.question in cases:
            cases[t.question].append((t.number, t.points, t.hidden))
    nb = copy.deepcopy(nb)
    cells = nb["cells"]
    texts = [_source(c) for c in cells]
    question = _question_of(texts)
    ln_key, gn_key = variants_norms.answer_key(v)
    done = {"ln": 0, "gn": 0, "q4": 0, "q5": 0, "check4": 0, "check5": 0}
    for i, (cell, text) in enumerate(zip(cells, texts)):
        q = question[i]
        if cell["cell_type"] == "code" and text.startswith("def layer_norm_forward"):
            texts[i], done["ln"] = ln_key, done["ln"] + 1
        elif cell["cell_type"] == "code" and text.startswith("def group_norm_forward"):
            texts[i], done["gn"] = gn_key, done["gn"] + 1
        elif q in ("q4", "q5") and cell["cell_type"] == "code" and text.startswith('""" # BEGIN TEST CONFIG'):
            if done[q] >= len(cases[q]):
                raise ValueError(f"variant_notebook: more {q} test cells than the checker's {len(cases[q])} cases")
            number, points, hidden = cases[q][done[q]]
            texts[i], done[q] = test_cell(v, q, number, points, hidden), done[q] + 1
        elif cell["cell_type"] == "code" and "F.layer_norm(_x, _x.shape[1:], _gamma, _beta)" in text:
            texts[i], done["check4"] = check_cell(v, "q4"), done["check4"] + 1
        elif cell["cell_type"] == "code" and "F.group_norm(_x, 3, _gamma, _beta)" in text:
            texts[i], done["check5"] = check_cell(v, "q5"), done["check5"] + 1
    want = {"ln": 1, "gn": 1, "q4": len(cases["q4"]), "q5": len(cases["q5"]), "check4": 1, "check5": 1}
    if done != want:
        raise ValueError(f"variant_notebook: expected {want} cells to rewrite, found {done}")
    check = "**Check.** `backward vs numerical_gradient` (your question 3) should be below about `1e-5` (a wrong backward gives 1e-2 or more)."
    for old, new in [(_Q4_OLD, q4_text(v)), (_Q5_OLD, q5_text(v)), (_TABLE_OLD, _TABLE_OLD.replace("(N, C, H, W)", _four(v))),
                     (_CHECK_OLD[0], check), (_CHECK_OLD[1], check + " The last line should print the `ValueError`.")]:
        if not any(old in t for t in texts):
            raise ValueError(f"variant_notebook: {old[:60]!r} not found in the source notebook")
        texts = [t.replace(old, new) for t in texts]
    for cell, text in zip(cells, texts):
        cell["source"] = text
    nb.setdefault("metadata", {})[variants_norms.VARIANT_META] = v.to_dict()
    return nb


# ---------------------------------------------------------------------------- build's hooks


def is_norms_source(source) -> bool:
    """The source notebook is assignment 2's (``notebooks/assignments/norms/norms.ipynb``)."""
    from pathlib import Path

    return Path(source).stem == "norms"


def is_norms(v) -> bool:
    return isinstance(v, NormsVariant)


def resolve(variant) -> NormsVariant:
    """build's ``variant`` argument for assignment 2: None (PyTorch's), a ``NormsVariant``, or the
    class secret (``variants_norms.derive``). Assignment 1's ``Variant`` is refused (TypeError)."""
    if variant is None:
        return NormsVariant()
    if isinstance(variant, NormsVariant):
        return variant
    if isinstance(variant, str):
        return variants_norms.derive(variant)
    raise TypeError(f"assignment 'norms' takes a secret string, a variants_norms.NormsVariant or None as its variant, "
                    f"got {type(variant).__name__}")


def meta_key(v, default: str) -> str:
    """The student notebook's metadata key for ``v`` (``default``: assignment 1's)."""
    return variants_norms.VARIANT_META if is_norms(v) else default


def from_dict_any(data: dict | None):
    """``assignment.json``'s (or a grading run's) ``"variant"`` as either assignment's variant: a
    ``NormsVariant`` when it holds exactly the norms conventions' keys, else ``variants.Variant``."""
    from . import variants

    if isinstance(data, dict) and set(data) == set(variants_norms.CHOICES):
        return NormsVariant.from_dict(data)
    return variants.Variant.from_dict(data)


def describe_any(data: dict | None) -> list[str]:
    """The same ``"variant"`` in words, for either assignment (cli's build summary)."""
    from . import variants

    v = from_dict_any(data)
    return variants_norms.describe(v) if is_norms(v) else variants.describe(v)
