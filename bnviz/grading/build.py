"""``build``: run ``otter assign`` on the solution notebook (student version, autograder zip).

Leaves in ``out_dir``::

    student/batch_norm.ipynb, student/tests/   what students get (no solutions, no hidden tests)
    batch_norm-student.zip                     the same as one zip (upload it to Colab)
    autograder/…zip, batch_norm-autograder.zip otter's autograder, with the hidden tests
    autograder/batch_norm.ipynb                the solution notebook without tests
    public_answers.py                          the public solution's answer code (similarity flags)
    assignment.json                            the assignment's name (the source's stem: which checker
                                               grades it), questions, points, manual questions, rules, paths,
                                               the variant's conventions (never its secret); a
                                               rebuild keeps the keys build does not write (``late``,
                                               an instructor's own: ``instructor_keys``)

Grading (``grade``) no longer runs otter: it uses ``assignment.json``, the student notebook and
``checker.py``. otter stays on the students' side (``grader.check``) and checks, at build time,
that the solution passes every test.

``build_assignment(..., variant=SECRET)`` builds a class's variant (``variants.py``): the
conventions text, the tests, the answer key and the signatures' default momentum of the source
notebook are rewritten for it before ``otter assign`` runs (``variant_notebook``), so otter also
checks that the rewritten answer key passes the rewritten tests.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from . import assignments, similarity, student_seeds, variants, variants_norms_nb
from .layout import DEFAULT_DIST, SOURCE_ENV, default_source  # noqa: F401 (re-exported)
from .text import natural_key
from .variants import Variant


def read_question_points(autograder_zip: str | os.PathLike) -> dict[str, float]:
    """Points per autograded question, read from the OK-format test files in the autograder zip
    (without executing them)."""
    points: dict[str, float] = {}
    with zipfile.ZipFile(autograder_zip) as zf:
        for name in sorted(n for n in zf.namelist() if re.fullmatch(r"tests/[^/]+\.py", n)):
            for node in ast.parse(zf.read(name).decode("utf-8")).body:
                if (isinstance(node, ast.Assign) and len(node.targets) == 1
                        and getattr(node.targets[0], "id", None) == "test"):
                    spec = ast.literal_eval(node.value)
                    cases = [c for suite in spec.get("suites", []) for c in suite.get("cases", [])]
                    total = spec.get("points")
                    points[spec["name"]] = float(total if isinstance(total, (int, float))
                                                 else sum(c.get("points") or 0 for c in cases))
    return dict(sorted(points.items(), key=lambda kv: natural_key(kv[0])))


def question_configs(source: Path) -> dict[str, dict[str, Any]]:
    """Question name -> {points, manual} from the ``# BEGIN QUESTION`` cells of a source notebook."""
    import yaml  # a dependency of otter-grader

    nb = json.loads(source.read_text(encoding="utf-8"))
    questions = {}
    for cell in nb["cells"]:
        src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        if cell["cell_type"] == "raw" and re.match(r"#\s*BEGIN\s+QUESTION", src, re.I):
            cfg = yaml.safe_load("\n".join(src.splitlines()[1:])) or {}
            questions[cfg["name"]] = {"points": cfg.get("points"), "manual": bool(cfg.get("manual", False))}
    return questions


# --------------------------------------------------------------------------- variants

_CONVENTIONS_RE = re.compile(r"(<!-- BEGIN CONVENTIONS[^\n]*-->\n).*?(\n<!-- END CONVENTIONS -->)", re.S)
_BLOCK_RE = re.compile(r"    # BEGIN VARIANT[^\n]*\n.*?    # END VARIANT\n", re.S)
VARIANT_META = variants.VARIANT_META


def _solution_replacements(v: Variant) -> list[tuple[str, str]]:
    """The answer key's lines that carry a convention, rewritten for ``v``."""
    out = []
    if v.channel_axis != 1:
        a = v.channel_axis
        two, four = variants.layout_text(v)
        out += [("for (N, C) and (N, C, H, W) inputs.", f"for {two} and {four} inputs."),
                ("dims = [0] + list(range(2, x.dim()))  # every axis except the channel axis 1",
                 "dims = list(range(x.dim() - 1))  # every axis except the last (channel) axis" if a == -1
                 else "dims = list(range(1, x.dim()))  # every axis except the channel axis 0"),
                ("shape = [1, -1] + [1] * (x.dim() - 2)",
                 "shape = [1] * (x.dim() - 1) + [-1]" if a == -1 else "shape = [-1] + [1] * (x.dim() - 1)"),
                ("n = x.numel() // x.shape[1]", f"n = x.numel() // x.shape[{a}]"),
                ("m = dy.numel() // dy.shape[1]", f"m = dy.numel() // dy.shape[{a}]")]
    keep, new = ("1 - momentum", "momentum") if v.momentum_rule == "new" else ("momentum", "(1 - momentum)")
    stat = "var * n / (n - 1))  # unbiased" if v.running_var == "unbiased" else "var)  # biased"
    out += [("running_mean.mul_(1 - momentum).add_(momentum * mean)", f"running_mean.mul_({keep}).add_({new} * mean)"),
            ("running_var.mul_(1 - momentum).add_(momentum * var * n / (n - 1))  # unbiased",
             f"running_var.mul_({keep}).add_({new} * {stat}")]
    if v.eps == "outside":
        out += [("inv_std = 1.0 / torch.sqrt(var + eps)",
                 "std = torch.sqrt(var)\n    inv_std = 1.0 / (std + eps)  # eps added to the standard deviation"),
                ("cache = (x_hat, inv_std, gamma, dims, shape)", "cache = (x_hat, inv_std, gamma, dims, shape, std)"),
                ("x_hat, inv_std, gamma, dims, shape = cache", "x_hat, inv_std, gamma, dims, shape, std = cache"),
                ("- x_hat * (dx_hat * x_hat).sum(dim=dims, keepdim=True)",
                 "- x_hat * (dx_hat * x_hat).sum(dim=dims, keepdim=True) / (inv_std * std).reshape(shape)")]
    return out


def _text_replacements(v: Variant) -> list[tuple[str, str]]:
    """Question text, signatures and experiments that name a convention."""
    out = [("with the same conventions as\nPyTorch's `torch.nn.BatchNorm1d` / `torch.nn.BatchNorm2d`, and compare it against PyTorch.",
            "with **your class's own\nconventions** (stated in question 1: they differ from PyTorch's on purpose)."),
           ("You can compare against `F.batch_norm(x, running_mean, running_var, gamma, beta, training, momentum, eps)`\n"
            "while you work, but your function must not call it.",
            "`F.batch_norm` follows PyTorch's conventions, not these, and your function must not call it."),
           ("that can replace\n`nn.BatchNorm1d` (for `(N, C)` inputs) and `nn.BatchNorm2d` (for `(N, C, H, W)` inputs):",
            "with question 1's conventions\n(layout `%s` / `%s`, default momentum `%g`) and the parameters, buffers and "
            "`state_dict` of\n`nn.BatchNorm2d`:" % (*variants.layout_text(v), v.momentum))]
    out.append(("The tests compare your gradients with autograd through `F.batch_norm` in float64",
                "The tests compare your gradients with autograd through a reference forward pass with\n"
                "question 1's conventions, in float64"))
    if v.eps == "outside":  # the gradient changes: d(sqrt(var) + eps) / d var = 1 / (2 sqrt(var))
        out.append((r"$$\frac{\partial L}{\partial x_i} = \frac{1}{m\sqrt{\sigma^2+\epsilon}}\Big(m\,\widehat{dx}_i"
                    r" - \sum_j \widehat{dx}_j - \hat x_i \sum_j \widehat{dx}_j\,\hat x_j\Big)",
                    r"$$\frac{\partial L}{\partial x_i} = \frac{1}{m(\sigma+\epsilon)}\Big(m\,\widehat{dx}_i"
                    r" - \sum_j \widehat{dx}_j - \frac{\sigma+\epsilon}{\sigma}\,\hat x_i \sum_j \widehat{dx}_j\,"
                    r"\hat x_j\Big),\qquad \sigma = \sqrt{\sigma^2}"))
    if v.momentum != 0.1:
        out.append(("momentum=0.1", f"momentum={v.momentum:g}"))
    if v.channel_axis == 0:
        out.append(("for _x1 in (torch.randn(1, 4), 100 * torch.randn(1, 4)):",
                    "for _x1 in (torch.randn(4, 1), 100 * torch.randn(4, 1)):  # (C, N): a batch of one"))
    if v.running_var == "biased":
        out.append(("so `running_var` becomes NaN (0/0) and evaluation\nmode is broken from then on.",
                    "so `running_var` becomes NaN (0/0) and evaluation\nmode is broken from then on (with this "
                    "class's **biased** running variance it does not become NaN: it decays towards 0 by the "
                    "momentum's factor each step, so evaluation divides by a shrinking variance)."))
    return out


def _variant_block(v: Variant) -> str:
    """The tests' reference for ``v``: the checker's own code (variants.py), inside ``_test()``."""
    import inspect
    import textwrap

    body = "\n".join([
        "# BEGIN VARIANT: this class's conventions (generated by `python -m bnviz.grading build --variant`)",
        "import types as _types",
        f"_V = _types.SimpleNamespace(**{v.to_dict()!r})",
        inspect.getsource(variants.batch_norm_reference),
        inspect.getsource(variants.ReferenceBatchNorm),
        "_bn_ref = lambda *args, **kwargs: batch_norm_reference(_V, *args, **kwargs)",
        "_BN1d = _BN2d = lambda C: ReferenceBatchNorm(C, _V)",
        "_layout = lambda t: t.movedim(1, _V.channel_axis).contiguous()",
        "# END VARIANT"])
    return textwrap.indent(body, "    ", lambda line: line.strip() != "") + "\n"


def variant_notebook(nb: dict, v: Variant) -> dict:
    """A copy of the source notebook rewritten for variant ``v``: conventions block, question text,
    answer key, tests (reference, layout, messages). Every rewrite must apply, or ValueError (the
    source notebook changed and this function was not updated with it)."""
    import copy

    nb = copy.deepcopy(nb)
    cells = nb["cells"]
    texts = ["".join(c["source"]) if isinstance(c["source"], list) else c["source"] for c in cells]
    is_test = [c["cell_type"] == "code" and t.startswith('""" # BEGIN TEST CONFIG') for c, t in zip(cells, texts)]
    counts = {"conventions": 0, "blocks": 0}
    block = _variant_block(v)
    for i, text in enumerate(texts):
        text, n = _CONVENTIONS_RE.subn(lambda m: m.group(1) + variants.conventions_markdown(v) + m.group(2), text)
        counts["conventions"] += n
        if is_test[i]:
            text, n = _BLOCK_RE.subn(lambda m: block, text)
            counts["blocks"] += n
            text = variants.apply_messages(v, text)
        texts[i] = text
    if counts["conventions"] != 1 or counts["blocks"] != sum(is_test):
        raise ValueError(f"variant_notebook: expected 1 conventions block and a VARIANT block in each of the "
                         f"{sum(is_test)} test cells, found {counts}")
    for old, new in _solution_replacements(v) + _text_replacements(v):
        hits = sum(t.count(old) for t in texts)
        if not hits:
            raise ValueError(f"variant_notebook: {old[:60]!r} not found in the source notebook")
        texts = [t.replace(old, new) for t in texts]
    for cell, text in zip(cells, texts):
        cell["source"] = text
    return nb


def _record_variant(student_notebook: Path, v: Variant) -> None:
    """The conventions in the built student notebook's metadata (``grade`` reads them there)."""
    nb = json.loads(student_notebook.read_text(encoding="utf-8"))
    nb.setdefault("metadata", {})[variants_norms_nb.meta_key(v, VARIANT_META)] = v.to_dict()
    student_notebook.write_text(json.dumps(nb, indent=1, ensure_ascii=False), encoding="utf-8")


def _otter_assign(source: Path, out: Path, timeout_s: float, variant: Variant) -> None:
    """otter assign in a scratch copy of the source folder (the notebook rewritten for the
    variant); copy student/ and autograder/ out."""
    with tempfile.TemporaryDirectory(prefix="bnviz-assign-") as scratch:
        scratch = Path(scratch)
        src_copy = scratch / "src"
        shutil.copytree(source.parent, src_copy,
                        ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__", "dist"))
        if not variant.is_default:
            rewrite = variants_norms_nb.variant_notebook if variants_norms_nb.is_norms(variant) else variant_notebook
            nb = rewrite(json.loads(source.read_text(encoding="utf-8")), variant)
            (src_copy / source.name).write_text(json.dumps(nb, indent=1, ensure_ascii=False), encoding="utf-8")
        env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
        env.pop("PYTHONPATH", None)
        cmd = [sys.executable, "-m", "otter", "assign", str(src_copy / source.name), str(scratch / "dist")]
        proc = subprocess.run(cmd, env=env, cwd=scratch, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0 or "Test case failed" in proc.stdout + proc.stderr:
            raise RuntimeError(f"otter assign failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        shutil.copytree(scratch / "dist" / "student", out / "student")
        shutil.copytree(scratch / "dist" / "autograder", out / "autograder")


# the keys build writes; any other key of an existing assignment.json (``late``, an instructor's own) is
# the instructor's and is carried over by a rebuild
GENERATED_KEYS = ("source", "assignment", "notebook", "autograder_zip", "student_notebook", "student_zip", "questions",
                  "autograded_points", "manual_points", "forbidden", "variant", "seed_salt")


def instructor_keys(out: Path) -> dict[str, Any]:
    """The keys of ``<out>/assignment.json`` that build did not write (``late`` and any an instructor
    added), to carry over a rebuild. ValueError, before anything is changed, if the file is there
    but unreadable (rebuilding would lose what it holds)."""
    path = Path(out) / "assignment.json"
    if not path.exists():
        return {}
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} exists but cannot be read as JSON ({e}); a rebuild would lose its late policy "
                         "and other keys you added: fix it, or move it away to start from a fresh one") from None
    if not isinstance(old, dict):
        raise ValueError(f"{path} holds {type(old).__name__}, not a JSON object: fix it, or move it away")
    return {k: v for k, v in old.items() if k not in GENERATED_KEYS}


def build_assignment(out_dir: str | os.PathLike = DEFAULT_DIST, source: str | os.PathLike | None = None,
                     timeout_s: float = 600.0, variant: str | Variant | None = None) -> dict[str, Any]:
    """Run ``otter assign`` on the solution notebook into ``out_dir``; return the manifest.

    ``otter assign`` runs every test (visible and hidden) against the solution and fails the build
    if one fails. Nothing is written next to the source notebook. ``variant``: None for PyTorch's
    conventions, a secret string (``variants.derive``) or a ``Variant``.
    """
    out = Path(out_dir).resolve()
    source = Path(source).resolve() if source else default_source().resolve()
    if not source.is_file():
        raise FileNotFoundError(f"assignment source notebook not found: {source}")
    forbidden = assignments.rules_of(source.stem)  # ValueError for a notebook grading does not know
    assignments.check_variant(source.stem, variant)
    seed_salt = student_seeds.class_salt(variant if isinstance(variant, str) else None)  # never the secret itself
    if variants_norms_nb.is_norms_source(source):  # assignment 2's own conventions (variants_norms.py)
        variant = variants_norms_nb.resolve(variant)
    else:
        variant = variant if isinstance(variant, Variant) else Variant() if variant is None else variants.derive(variant)
    kept = instructor_keys(out)  # read (and checked) before anything is removed
    for sub in ("student", "autograder"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    _otter_assign(source, out, timeout_s, variant)
    _record_variant(out / "student" / source.name, variant)
    stamped = student_seeds.stamp_notebook(out / "student" / source.name, seed_salt)  # norms: the experiments' seeds
    # the public solution's answer code (the source notebook, never the variant's): similarity.py compares with it
    (out / "public_answers.py").write_text(similarity.answer_code(json.loads(source.read_text(encoding="utf-8"))),
                                           encoding="utf-8")
    zips = sorted((out / "autograder").glob("*-autograder_*.zip"))
    if len(zips) != 1:
        raise RuntimeError(f"expected one autograder zip in {out / 'autograder'}, found {zips}")
    stable_zip = out / f"{source.stem}-autograder.zip"
    shutil.copyfile(zips[0], stable_zip)
    student_zip = out / f"{source.stem}-student.zip"
    with zipfile.ZipFile(student_zip, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted((out / "student").rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(out / "student").as_posix())
    questions = question_configs(source)
    for name, pts in read_question_points(stable_zip).items():
        questions.setdefault(name, {"manual": False})["points"] = pts
    manifest = {
        "source": str(source), "assignment": source.stem, "notebook": source.name, "autograder_zip": stable_zip.name,
        "student_notebook": f"student/{source.name}", "student_zip": student_zip.name,
        "questions": questions,
        "autograded_points": sum(q["points"] or 0 for q in questions.values() if not q["manual"]),
        "manual_points": sum(q["points"] or 0 for q in questions.values() if q["manual"]),
        # question -> forbidden features; edit (or set to {}) to change the rules for this assignment
        "forbidden": {q: sorted(f) for q, f in sorted(forbidden.items())},
        # the conventions the tests and `grade` follow (variants.py); the secret is not stored
        "variant": variant.to_dict(),
        **({"seed_salt": seed_salt} if stamped else {}),  # student_seeds.py: each student's experiment seeds
        **kept,  # the late policy and the instructor's own keys of the previous assignment.json
    }
    (out / "assignment.json").write_text(json.dumps(manifest, indent=2))
    return manifest
