"""``build``: run ``otter assign`` on the solution notebook (student version, autograder zip).

Leaves in ``out_dir``::

    student/batch_norm.ipynb, student/tests/   what students get (no solutions, no hidden tests)
    batch_norm-student.zip                     the same as one zip (upload it to Colab)
    autograder/…zip, batch_norm-autograder.zip otter's autograder, with the hidden tests
    autograder/batch_norm.ipynb                the solution notebook without tests
    assignment.json                            questions, points, manual questions, rules, paths

Grading (``grade``) no longer runs otter: it uses ``assignment.json``, the student notebook and
``checker.py``. otter stays on the students' side (``grader.check``) and checks, at build time,
that the solution passes every test.
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

from . import rules

SOURCE_ENV = "BNVIZ_ASSIGNMENT_SOURCE"
DEFAULT_DIST = Path("dist") / "batch_norm"  # relative to the current folder


def default_source() -> Path:
    """The solution notebook: $BNVIZ_ASSIGNMENT_SOURCE, else the source checkout's copy."""
    if os.environ.get(SOURCE_ENV):
        return Path(os.environ[SOURCE_ENV])
    checkout = Path(__file__).resolve().parents[2] / "notebooks" / "assignments" / "batch_norm" / "batch_norm.ipynb"
    if checkout.is_file():
        return checkout
    raise FileNotFoundError(
        "no assignment source notebook: pass --source path/to/batch_norm.ipynb or set "
        f"{SOURCE_ENV} (it lives in notebooks/assignments/batch_norm/ of the bnviz repository)")


def natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


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


def _otter_assign(source: Path, out: Path, timeout_s: float) -> None:
    """otter assign in a scratch copy of the source folder; copy student/ and autograder/ out."""
    with tempfile.TemporaryDirectory(prefix="bnviz-assign-") as scratch:
        scratch = Path(scratch)
        src_copy = scratch / "src"
        shutil.copytree(source.parent, src_copy,
                        ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__", "dist"))
        env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
        env.pop("PYTHONPATH", None)
        cmd = [sys.executable, "-m", "otter", "assign", str(src_copy / source.name), str(scratch / "dist")]
        proc = subprocess.run(cmd, env=env, cwd=scratch, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0 or "Test case failed" in proc.stdout + proc.stderr:
            raise RuntimeError(f"otter assign failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        shutil.copytree(scratch / "dist" / "student", out / "student")
        shutil.copytree(scratch / "dist" / "autograder", out / "autograder")


def build_assignment(out_dir: str | os.PathLike = DEFAULT_DIST, source: str | os.PathLike | None = None,
                     timeout_s: float = 600.0) -> dict[str, Any]:
    """Run ``otter assign`` on the solution notebook into ``out_dir``; return the manifest.

    ``otter assign`` runs every test (visible and hidden) against the solution and fails the build
    if one fails. Nothing is written next to the source notebook.
    """
    out = Path(out_dir).resolve()
    source = Path(source).resolve() if source else default_source().resolve()
    if not source.is_file():
        raise FileNotFoundError(f"assignment source notebook not found: {source}")
    for sub in ("student", "autograder"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    _otter_assign(source, out, timeout_s)
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
        "source": str(source), "notebook": source.name, "autograder_zip": stable_zip.name,
        "student_notebook": f"student/{source.name}", "student_zip": student_zip.name,
        "questions": questions,
        "autograded_points": sum(q["points"] or 0 for q in questions.values() if not q["manual"]),
        "manual_points": sum(q["points"] or 0 for q in questions.values() if q["manual"]),
        # question -> forbidden features; edit (or set to {}) to change the rules for this assignment
        "forbidden": {q: sorted(f) for q, f in rules.DEFAULT_RULES.items()},
    }
    (out / "assignment.json").write_text(json.dumps(manifest, indent=2))
    return manifest
