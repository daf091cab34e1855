"""Class variants of the assignment (``bnviz/grading/variants.py``) and similarity flags
(``bnviz/grading/similarity.py``).

Most checks run in this process on the trusted side: the derivation, the checker's references
against an independent numpy formula, and the answer key of every variant against the checker
(the answer cells are our own code, run here through the worker's probe functions). One variant
assignment is built with otter (which runs its tests against its answer key) and graded for real
through the sandbox: its answer key gets full marks, the public solution does not.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bnviz.grading import build, checker, similarity, variants, worker
from bnviz.grading.variants import Variant

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "notebooks" / "assignments" / "batch_norm" / "batch_norm.ipynb"
SECRET = "test-class-0"  # derives biased / old-average momentum 0.95 / eps outside / channels on axis 0
HAVE_BWRAP = shutil.which("bwrap") is not None
REQUIRE_SANDBOX = os.environ.get("BNVIZ_REQUIRE_SANDBOX") == "1"


# ------------------------------------------------------------------ derivation


def test_derivation_is_deterministic_and_covers_every_convention():
    secrets_ = [f"class-{i}" for i in range(60)]
    derived = [variants.derive(s) for s in secrets_]
    assert derived == [variants.derive(s) for s in secrets_]
    assert variants.derive("class-0") != variants.derive("class-0 ")  # the whole secret counts
    for name, allowed in variants.CHOICES.items():
        assert {getattr(v, name) for v in derived} == set(allowed), name
    assert {v.momentum for v in derived} == {m for ms in variants.MOMENTA.values() for m in ms}
    assert all(v.changes() >= variants.MIN_CHANGES and not v.is_default for v in derived)
    assert len(variants.candidates()) == 54
    assert variants.derive(SECRET) == Variant("biased", "old", "outside", 0, 0.95)


@pytest.mark.parametrize("bad, error", [("", ValueError), ("   ", ValueError), (None, TypeError),
                                        (123, TypeError), (b"bytes", TypeError)])
@pytest.mark.parametrize("assignment", ["batch_norm", "norms"])
def test_bad_secret_is_refused(bad, error, assignment):
    """Both assignments' derive (assignment 1's variants, the norms assignment's) refuse a bad secret."""
    from bnviz.grading import variants_norms

    derive = {"batch_norm": variants.derive, "norms": variants_norms.derive}[assignment]
    with pytest.raises(error, match="secret"):
        derive(bad)


def test_bad_variant_records_are_refused():
    with pytest.raises(ValueError, match="running_var"):
        Variant(running_var="sample")
    with pytest.raises(ValueError, match="momentum"):
        Variant(momentum_rule="old", momentum=0.1)  # 0.1 as the weight of the old average: not offered
    with pytest.raises(ValueError, match="keys"):
        Variant.from_dict({"layout": "NHWC"})
    with pytest.raises(ValueError):
        Variant.from_dict("biased")
    assert Variant.from_dict(None) == Variant() and Variant().is_default
    with pytest.raises(TypeError, match="variant"):
        checker.make_tests(0, {"running_var": "biased"})


def test_cli_refuses_an_empty_secret_before_building(tmp_path, capsys):
    from bnviz.grading import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["build", "--out", str(tmp_path / "dist"), "--variant", ""])
    assert exc.value.code == 2
    assert "secret is empty" in capsys.readouterr().err
    assert not (tmp_path / "dist").exists()


# ------------------------------------------------------------------ references


def _np_forward(v: Variant, x, rm, rv, w, b, training, momentum, eps):
    """An independent float64 formula (numpy, channels moved to axis 0)."""
    xc = np.moveaxis(x, v.channel_axis, 0).reshape(x.shape[v.channel_axis], -1)
    m = xc.shape[1]
    if training:
        mean, var = xc.mean(1), xc.var(1)
        stat = var * m / (m - 1) if v.running_var == "unbiased" else var
        keep = 1 - momentum if v.momentum_rule == "new" else momentum
        rm, rv = keep * rm + (1 - keep) * mean, keep * rv + (1 - keep) * stat
    else:
        mean, var = rm, rv
    std = np.sqrt(var + eps) if v.eps == "inside" else np.sqrt(var) + eps
    yc = w[:, None] * (xc - mean[:, None]) / std[:, None] + b[:, None]
    y = np.moveaxis(yc.reshape(np.moveaxis(x, v.channel_axis, 0).shape), 0, v.channel_axis)
    return y, rm, rv


def _np_backward(v: Variant, x, w, dy, eps):
    """d(sum(y * dy)) / d(x, w, b) derived by hand, for eps inside or outside the square root."""
    xc = np.moveaxis(x, v.channel_axis, 0).reshape(x.shape[v.channel_axis], -1)
    gc = np.moveaxis(dy, v.channel_axis, 0).reshape(xc.shape)
    m = xc.shape[1]
    mean, s = xc.mean(1, keepdims=True), np.sqrt(xc.var(1, keepdims=True))
    d = np.sqrt(s ** 2 + eps) if v.eps == "inside" else s + eps
    xh = (xc - mean) / d
    g = gc * w[:, None]
    ratio = 1.0 if v.eps == "inside" else d / s  # d(d)/d(sigma^2) relative to the eps-inside case
    dx = (m * g - g.sum(1, keepdims=True) - xh * (g * xh).sum(1, keepdims=True) * ratio) / (m * d)
    dx = np.moveaxis(dx.reshape(np.moveaxis(x, v.channel_axis, 0).shape), 0, v.channel_axis)
    return dx, (gc * xh).sum(1), gc.sum(1)


COVERING = [Variant(), Variant("biased", "old", "outside", -1, 0.8), Variant("unbiased", "old", "inside", 0, 0.9),
            Variant("biased", "new", "outside", 0, 0.2), Variant("unbiased", "new", "outside", -1, 0.05)]


@pytest.mark.parametrize("v", COVERING, ids=lambda v: "-".join(str(x) for x in v.to_dict().values()))
def test_checker_reference_matches_an_independent_formula(v):
    r = checker.Ref(v)
    g = torch.Generator().manual_seed(3)
    for shape in [(6, 3), (4, 3, 2, 5)]:
        x = r.x(0.5 + 2 * torch.randn(shape, dtype=torch.float64, generator=g))
        w, b = torch.rand(3, dtype=torch.float64, generator=g) + 0.5, torch.randn(3, dtype=torch.float64, generator=g)
        rm, rv = torch.randn(3, dtype=torch.float64, generator=g), torch.rand(3, dtype=torch.float64, generator=g) + 0.5
        expect_rm, expect_rv = rm.numpy().copy(), rv.numpy().copy()
        for training in (True, True, False):
            y = r.bn(x, rm, rv, w, b, training=training, momentum=0.3, eps=1e-3)
            ey, expect_rm, expect_rv = _np_forward(v, x.numpy(), expect_rm, expect_rv, w.numpy(), b.numpy(), training, 0.3, 1e-3)
            np.testing.assert_allclose(y.numpy(), ey, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(rm.numpy(), expect_rm, rtol=1e-12)
            np.testing.assert_allclose(rv.numpy(), expect_rv, rtol=1e-12)
        dy = r.x(torch.randn(shape, dtype=torch.float64, generator=g))
        xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
        grads = torch.autograd.grad(r.bn(xr, None, None, wr, br, training=True, eps=1e-3), (xr, wr, br), dy)
        for got, want in zip(grads, _np_backward(v, x.numpy(), w.numpy(), dy.numpy(), 1e-3)):
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12)
    module = r.module(3)
    assert list(module.state_dict()) == list(torch.nn.BatchNorm2d(3).state_dict())
    assert (module.momentum == v.momentum) if not v.is_default else module.momentum == 0.1


# ------------------------------------------------------------------ every variant, in process


class _NoTripwire:
    def run(self, phase, fn, *args, **kwargs):
        return fn(*args, **kwargs)


def _answers(nb: dict) -> dict:
    """Run the answer cells of a (solution) notebook here: our own code, never a student's."""
    ns: dict = {}
    for cell in nb["cells"]:
        src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        if cell["cell_type"] == "code" and src.startswith(("import torch", "def batch_norm_", "class BatchNorm")):
            exec(compile(src, "<answer>", "exec"), ns)
    return ns


def _score(ns: dict, v: Variant, seed: int = 0) -> tuple[float, list[str]]:
    tests = checker.make_tests(seed, v)
    outputs = {}
    for t in tests:
        for spec in t.probes:
            try:
                outputs[spec["id"]] = worker.PROBES[spec["kind"]](ns, _NoTripwire(), torch, spec)
            except Exception as e:  # the public solution on another layout raises
                outputs[spec["id"]] = {"error": f"{type(e).__name__}: {e}"}
    judged = checker.judge_all(tests, outputs)
    return sum(j["points"] for j in judged if j["passed"]), [j["reason"] for j in judged if not j["passed"]]


@pytest.fixture(scope="module")
def source_nb():
    return json.loads(SOURCE.read_text(encoding="utf-8"))


def test_every_variant_answer_key_gets_full_marks_and_the_public_solution_does_not(source_nb):
    """All 54 variants: the generated answer key passes the checker; PyTorch's solution loses
    at least 5 of the 19 points on each (the smallest loss is printed)."""
    public = _answers(source_nb)
    assert _score(public, Variant()) == (19.0, [])
    public_scores = {}
    for v in variants.candidates():
        total, reasons = _score(_answers(build.variant_notebook(source_nb, v)), v, seed=len(public_scores))
        assert total == 19.0, (v, reasons)
        public_scores[v] = _score(public, v)[0]
    worst = max(public_scores.values())
    print(f"public solution on the 54 variants: {min(public_scores.values()):g}..{worst:g} of 19")
    assert worst <= 14.0


def test_variant_notebook_states_the_conventions(source_nb):
    v = variants.derive(SECRET)
    nb = build.variant_notebook(source_nb, v)
    q1 = next(c["source"] for c in nb["cells"] if c["source"].startswith("## Question 1"))
    for phrase in ["`(C, N)`", "`(C, N, H, W)`", "axis **0**", "**outside** the square root",
                   "running = momentum * running + (1 - momentum) * batch_statistic", "**biased** batch variance",
                   "**Default momentum:** `0.95`", "momentum=0.95"]:
        assert phrase in q1, phrase
    q2 = next(c["source"] for c in nb["cells"] if c["source"].startswith("## Question 2"))
    assert r"\frac{\sigma+\epsilon}{\sigma}" in q2  # the gradient stated for eps outside the square root
    default_q1 = next(c for c in source_nb["cells"] if "".join(c["source"]).startswith("## Question 1"))
    # the source's block is exactly what variants.py generates for PyTorch's conventions
    assert variants.conventions_markdown(Variant()) in "".join(default_q1["source"])
    broken = json.loads(json.dumps(source_nb).replace("running_mean.mul_(1 - momentum)", "running_mean.mul_(1.0 - momentum)"))
    with pytest.raises(ValueError, match="not found"):
        build.variant_notebook(broken, v)


# ------------------------------------------------------------------ similarity: planted answers
# Two honest solutions written independently of the public one (different decompositions), each
# as three answer cells; the public solution's answer cells come from the source notebook.
HONEST_A = '''
def batch_norm_forward(x, gamma, beta, running_mean, running_var, momentum=0.1, eps=1e-5, training=True):
    """Batch normalization forward pass for (N, C) and (N, C, H, W) inputs.

    Returns (y, cache). In training mode running_mean / running_var are updated in place.
    """
    # move channels last and flatten everything else: statistics over rows
    c = x.shape[1]
    perm = [0] + list(range(2, x.dim())) + [1]
    xt = x.permute(*perm)
    flat = xt.reshape(-1, c)
    if training:
        count = flat.shape[0]
        mu = flat.sum(0) / count
        centered = flat - mu
        sigma2 = (centered * centered).sum(0) / count
        with torch.no_grad():
            running_mean.copy_(running_mean * (1 - momentum) + mu * momentum)
            running_var.copy_(running_var * (1 - momentum) + sigma2 * count / (count - 1) * momentum)
    else:
        mu, sigma2 = running_mean, running_var
        centered = flat - mu
    denom = (sigma2 + eps).sqrt()
    normed = centered / denom
    out = normed * gamma + beta
    inv = list(range(x.dim()))
    back = [0, x.dim() - 1] + list(range(1, x.dim() - 1))
    y = out.reshape(xt.shape).permute(*back)
    axes, bshape = [0] + list(range(2, x.dim())), [1, c] + [1] * (x.dim() - 2)  # the cache question 1 specifies
    return y, (normed.reshape(xt.shape).permute(*back), 1 / denom, gamma, axes, bshape)
'''
HONEST_A_BWD = '''
def batch_norm_backward(dy, cache):
    """Gradients (dx, dgamma, dbeta) of the training-mode batch_norm_forward, without autograd."""
    normed, rstd, gamma, axes, bshape = cache
    dbeta = dy.sum(axes)
    dgamma = (dy * normed).sum(axes)
    gn = dy * gamma.view(bshape)
    centred = gn - gn.mean(axes, keepdim=True) - normed * (gn * normed).mean(axes, keepdim=True)
    dx = centred * rstd.view(bshape)
    return dx, dgamma, dbeta
'''
HONEST_A_MOD = '''
class BatchNorm(nn.Module):
    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        for name, value in (("running_mean", torch.zeros(num_features)), ("running_var", torch.ones(num_features)),
                            ("num_batches_tracked", torch.tensor(0, dtype=torch.long))):
            self.register_buffer(name, value)

    def forward(self, x):
        if self.training:
            self.num_batches_tracked += 1
        return batch_norm_forward(x, self.weight, self.bias, self.running_mean, self.running_var,
                                  momentum=self.momentum, eps=self.eps, training=self.training)[0]
'''
HONEST_B = '''
def batch_norm_forward(x, gamma, beta, running_mean, running_var, momentum=0.1, eps=1e-5, training=True):
    """Batch normalization forward pass for (N, C) and (N, C, H, W) inputs.

    Returns (y, cache). In training mode running_mean / running_var are updated in place.
    """
    if x.dim() == 2:
        axes, view = (0,), (1, x.shape[1])
    else:
        axes, view = (0, 2, 3), (1, x.shape[1], 1, 1)
    if not training:
        xhat = (x - running_mean.view(view)) / torch.sqrt(running_var.view(view) + eps)
        return gamma.view(view) * xhat + beta.view(view), None
    m = 1
    for a in axes:
        m *= x.shape[a]
    mean = torch.mean(x, dim=axes, keepdim=True)
    var = torch.mean((x - mean) ** 2, dim=axes, keepdim=True)
    std = torch.sqrt(var + eps)
    xhat = (x - mean) / std
    y = gamma.view(view) * xhat + beta.view(view)
    running_mean.data = (1.0 - momentum) * running_mean + momentum * mean.reshape(-1).detach()
    running_var.data = (1.0 - momentum) * running_var + momentum * (var.reshape(-1) * m / (m - 1)).detach()
    return y, (xhat, 1.0 / std.reshape(-1), gamma, list(axes), list(view))  # the cache question 1 specifies
'''
HONEST_B_BWD = '''
def batch_norm_backward(dy, cache):
    """Gradients (dx, dgamma, dbeta) of the training-mode batch_norm_forward, without autograd."""
    xhat, rstd, gamma, axes, view = cache
    m = xhat.numel() // rstd.numel()
    std, gamma = 1.0 / rstd.view(view), gamma.view(view)
    dbeta = torch.sum(dy, dim=axes)
    dgamma = torch.sum(dy * xhat, dim=axes)
    dxhat = dy * gamma
    dvar = torch.sum(dxhat * xhat, dim=axes, keepdim=True) * (-0.5) / (std ** 2)
    dmean = -torch.sum(dxhat, dim=axes, keepdim=True) / std
    dx = dxhat / std + dvar * 2.0 * xhat * std / m + dmean / m
    return dx, dgamma, dbeta
'''
HONEST_B_MOD = '''
class BatchNorm(nn.Module):
    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.register_parameter("weight", nn.Parameter(torch.full((num_features,), 1.0)))
        self.register_parameter("bias", nn.Parameter(torch.full((num_features,), 0.0)))
        self.register_buffer("running_mean", torch.full((num_features,), 0.0))
        self.register_buffer("running_var", torch.full((num_features,), 1.0))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            self.num_batches_tracked.add_(1)
        out, _unused = batch_norm_forward(x, self.weight, self.bias, self.running_mean, self.running_var,
                                          self.momentum, self.eps, self.training)
        return out
'''

RENAMES = {"dims": "axes", "shape": "bshape", "mean": "mu", "var": "sig2", "inv_std": "rstd", "x_hat": "xn",
           "cache": "saved", "dx_hat": "gxn", "dbeta": "grad_b", "dgamma": "grad_g", "dx": "grad_x", "n": "cnt",
           "m": "cnt2", "y": "out", "perm": "order", "back": "undo", "normed": "z", "denom": "sd", "centered": "dev",
           "flat": "rows", "mu": "avg", "sigma2": "v2", "count": "k", "gn": "gz", "dflat": "grows", "tshape": "ts"}
REF_COPY = ("def batch_norm_forward(x, gamma, beta, running_mean, running_var, momentum=0.1, eps=1e-5, training=True):\n"
            "    return batch_norm_reference(V, x, running_mean, running_var, gamma, beta, training, momentum, eps), None\n")
HOSTILE = "_note = '</pre><script>alert(\"owned\")</script><img src=x onerror=alert(1)>'\n"


def _rename(code: str) -> str:
    """A light edit: every variable renamed (whole words, one pass)."""
    import re

    return re.sub(r"\b(" + "|".join(RENAMES) + r")\b", lambda m: RENAMES[m.group(1)], code)


def _public_cells(source_nb: dict) -> list[str]:
    return ["".join(c["source"]) for c in source_nb["cells"] if c["cell_type"] == "code"
            and "".join(c["source"]).startswith(("def batch_norm_", "class BatchNorm"))]


def _template(source_nb: dict) -> str:
    """The student template's code, as otter makes it (solutions replaced by ``...``)."""
    import re

    code = similarity.answer_code(source_nb)
    return re.sub(r"( *)# BEGIN SOLUTION\n.*?# END SOLUTION\n?", r"\1...\n", code, flags=re.S)


PLANTED = {"honest_a": [HONEST_A, HONEST_A_BWD, HONEST_A_MOD], "honest_b": [HONEST_B, HONEST_B_BWD, HONEST_B_MOD]}


def test_planted_honest_solutions_are_correct(source_nb):
    """The honest planted answers are real solutions (full marks on PyTorch's conventions)."""
    for name, cells in PLANTED.items():
        ns: dict = {}
        exec("import torch\nimport torch.nn as nn\n" + "\n".join(cells), ns)
        assert _score(ns, Variant()) == (19.0, []), name


def test_similarity_flags_copies_and_not_honest_work(source_nb):
    public = similarity.answer_code(source_nb)
    template = _template(source_nb)
    pub = "\n".join(_public_cells(source_nb))
    sources = {"honest_a": "\n".join(PLANTED["honest_a"]), "honest_b": "\n".join(PLANTED["honest_b"]),
               "renamed": _rename(pub), "copier": HOSTILE + _rename("\n".join(PLANTED["honest_a"])),
               "ref_copy": REF_COPY + _rename(similarity.reference_code())}
    assert sources["renamed"] != pub and "rstd" in sources["renamed"]
    flags = similarity.flag_pairs(sources, public, template=template)
    assert set(flags) == {"renamed", "honest_a", "copier", "ref_copy"}, flags
    assert any("the tests' reference" in f for f in flags["ref_copy"])  # what a variant's visible tests show
    assert any("the public solution" in f for f in flags["renamed"])
    assert any("copier" in f for f in flags["honest_a"]) and any("honest_a" in f for f in flags["copier"])
    assert not any("honest_b" in f for fs in flags.values() for f in fs)
    scores = {(p.a, p.b): p.score for p in similarity._pairs(sources, similarity._publics(public), template)}
    print("similarity scores:", {f"{a}~{b}": round(s, 2) for (a, b), s in scores.items()})
    honest = [k for k in scores if not {"renamed", "copier", "ref_copy"} & set(k)]
    assert max(scores[k] for k in honest) < similarity.THRESHOLD - 0.15
    # the template alone is not similar to anything: every student starts from it
    assert similarity.flag_pairs({"blank": template, "honest_b": sources["honest_b"]}, public, template=template) == {}
    with pytest.raises(ValueError, match="threshold"):
        similarity.flag_pairs(sources, public, threshold=0)
    with pytest.raises(TypeError, match="sources"):
        similarity.flag_pairs({"a": 1}, public)


def test_one_large_submission_cannot_get_honest_classmates_flagged(source_nb, monkeypatch):
    """Issue 23: one submission carrying many public batch-norm snippets (here the public solution,
    the tests' reference and code like each honest classmate's) holds most of any honest answer.
    Only that submission is flagged (one way); its classmates are not. A padded copy is still
    caught: the copier holds the other's answer."""
    monkeypatch.setattr(similarity, "MAX_FLAGS", 10)  # every flag listed (the gradebook shows 3, by score)
    public, template = similarity.answer_code(source_nb), _template(source_nb)
    pub = "\n".join(_public_cells(source_nb))
    honest_a, honest_b = "\n".join(PLANTED["honest_a"]), "\n".join(PLANTED["honest_b"])
    flood = "\n".join([pub, similarity.reference_code(), _rename(honest_a), _rename(honest_b)])
    padded = _rename(honest_a) + "\n" + _rename(pub) + "\n" + _rename(similarity.reference_code())
    flags = similarity.flag_pairs({"honest_a": honest_a, "honest_b": honest_b, "flood": flood}, public, template=template)
    assert set(flags) == {"flood"}, flags
    assert any("one way" in f and "honest_a" in f for f in flags["flood"]), flags
    flags = similarity.flag_pairs({"honest_b": honest_b, "padded": padded, "honest_a": honest_a}, public, template=template)
    assert any("honest_a" in f for f in flags["padded"]) and "honest_b" not in flags, flags


def test_similarity_report_escapes_student_code(tmp_path, source_nb):
    pub = "\n".join(_public_cells(source_nb))
    codes = {"<b>evil</b>": HOSTILE + _rename(pub), similarity.PUBLIC: pub}
    pairs = similarity.compare(codes)
    similarity.write_report(tmp_path / "similarity.html", pairs, codes)
    text = (tmp_path / "similarity.html").read_text()
    assert "<script" not in text and "<img" not in text and "<b>evil" not in text
    assert "&lt;script&gt;alert(" in text and "&lt;b&gt;evil&lt;/b&gt;" in text
    assert "<mark>" in text  # the copied stretches are highlighted


def test_similarity_failure_keeps_the_grades(tmp_path, monkeypatch):
    results = [{"student": "a", "submission": "a.ipynb", "flags": "q1: forbidden x", "notes": [], "total": 7.0}]
    monkeypatch.setattr(similarity, "run_isolated", lambda *a, **k: (_ for _ in ()).throw(MemoryError("boom")))
    note = similarity.flag_results(results, tmp_path, tmp_path, None, log=lambda *a: None)
    assert "similarity check failed" in note and "MemoryError" in note
    assert results[0]["total"] == 7.0  # the grade is kept, and the student is flagged: not compared
    assert results[0]["flags"] == "q1: forbidden x; similarity: not compared (the comparison failed, see notes), check by hand"
    assert results[0]["notes"] == [note] and "failed" in (tmp_path / "similarity.html").read_text()


# ------------------------------------------------------------------ a variant built and graded for real


@pytest.fixture(scope="module")
def variant_dist(tmp_path_factory):
    """One variant assignment built with otter (which runs its tests against its answer key)."""
    root = tmp_path_factory.mktemp("variant")
    shutil.copytree(SOURCE.parent, root / "batch_norm", ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    out = root / "dist"
    manifest = build.build_assignment(out, root / "batch_norm" / "batch_norm.ipynb", variant=SECRET)
    return out, manifest


def test_variant_build_records_conventions_not_the_secret(variant_dist):
    out, manifest = variant_dist
    assert manifest["variant"] == variants.derive(SECRET).to_dict()
    student = json.loads((out / "student" / "batch_norm.ipynb").read_text())
    assert variants.variant_of(student) == variants.derive(SECRET)
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    text = json.dumps(student)
    assert "`(C, N, H, W)`" in text and "**outside** the square root" in text and "momentum=0.95" in text
    assert "it must store the BIASED batch variance" not in text  # hidden tests stay hidden
    q1 = (out / "student" / "tests" / "q1.py").read_text()
    assert "batch_norm_reference" in q1 and "momentum=0.95" in q1  # students check against the variant


def _student_with(student_nb: dict, cells: list[str]) -> dict:
    """The handed-out notebook with its three answer cells replaced."""
    import copy

    nb = copy.deepcopy(student_nb)
    starts = ("def batch_norm_forward", "def batch_norm_backward", "class BatchNorm")
    for cell in nb["cells"]:
        src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        for start, new in zip(starts, cells):
            if cell["cell_type"] == "code" and src.startswith(start):
                cell["source"] = new
    return nb


@pytest.fixture(scope="module")
def variant_graded(variant_dist, tmp_path_factory, source_nb):
    if not HAVE_BWRAP:
        if REQUIRE_SANDBOX:
            pytest.fail("bwrap (bubblewrap) is not installed and BNVIZ_REQUIRE_SANDBOX=1")
        pytest.skip("bwrap (bubblewrap) is not installed: apt-get install bubblewrap")
    from bnviz import grading

    out, manifest = variant_dist
    student = json.loads((out / manifest["student_notebook"]).read_text())
    key = json.loads((out / "autograder" / "batch_norm.ipynb").read_text())
    key_cells = [c for c in _public_cells(key)]
    public = _public_cells(source_nb)
    subs, grades = tmp_path_factory.mktemp("variant_subs"), tmp_path_factory.mktemp("variant_grades")
    planted = {"answer_key": key_cells, "public": public, "renamed_public": [HOSTILE + _rename(c) for c in public],
               "honest_a": PLANTED["honest_a"], "honest_b": PLANTED["honest_b"],
               "copier": [_rename(c) for c in PLANTED["honest_a"]]}
    for name, cells in planted.items():
        (subs / f"{name}.ipynb").write_text(json.dumps(_student_with(student, cells)))
    results = grading.grade_folder(subs, grades, timeout_s=60, jobs=2, student_notebook=out / manifest["student_notebook"],
                                   manual_questions={"q4": 2}, forbidden=manifest["forbidden"], log=lambda *a: None)
    return {r["student"]: r for r in results}, grades


def test_variant_answer_key_full_marks_public_solution_clearly_not(variant_graded):
    res, _ = variant_graded
    assert res["answer_key"]["total"] == 19 and res["answer_key"]["failed_tests"] == []
    print(f"public solution on variant {SECRET!r}: {res['public']['total']:g}/19")
    assert res["public"]["total"] <= 10
    assert res["honest_b"]["total"] < 19  # written for PyTorch's conventions too


def test_variant_gradebook_has_similarity_flags(variant_graded):
    import csv

    res, grades = variant_graded
    rows = {r["student"]: r for r in csv.DictReader((grades / "gradebook.csv").open())}
    assert "similar to the public solution" in rows["renamed_public"]["flags"]
    assert "similar to the public solution" in rows["public"]["flags"]
    assert "similar to copier" in rows["honest_a"]["flags"] and "similar to honest_a" in rows["copier"]["flags"]
    assert "similar" not in rows["honest_b"]["flags"]
    # the variant's answer key is the public solution with its convention lines rewritten: adapting
    # the public solution to the variant is flagged too
    assert "similar to the public solution" in rows["answer_key"]["flags"]
    assert json.loads((grades / "honest_a.json").read_text())["row"]["flags"] == rows["honest_a"]["flags"]
    report = (grades / "similarity.html").read_text()
    assert "renamed_public" in report and "<script" not in report and "&lt;script&gt;" in report
