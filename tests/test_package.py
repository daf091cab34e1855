"""bnviz as a package a learner installs: ``python -m build`` makes a wheel and an sdist; the wheel
holds the chapters (not the assignment's solutions); installed into a fresh venv it runs
``python -m bnviz``, copies the notebooks without overwriting anything, and runs chapter 00 in
fast mode from that copy, importing bnviz from the wheel (not from this checkout).

The fresh venv is made with ``--without-pip`` and sees this project's venv's site-packages
through a ``.pth`` file for the heavy dependencies (torch, plotly, jupyter...); ``.pth`` files
*inside* that folder (the editable install of this checkout) are not processed, so the only
bnviz it can import is the wheel's. Marker ``package`` (deselect with ``-m "not package"``).
"""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted(p.name for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))

pytestmark = [pytest.mark.package, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: build with this venv's setuptools (CI installs it; no download at test time)
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = out.glob("bnviz-*.whl")
    (sdist,) = out.glob("bnviz-*.tar.gz")
    return wheel, sdist


def test_wheel_and_sdist_hold_the_course(dists):
    wheel, sdist = dists
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("bnviz/notebooks/")) == CHAPTERS
    assert {"bnviz/__main__.py", "bnviz/lab_charts.py", "bnviz/colab.py", "bnviz/grading/__init__.py"} <= set(names)
    # the site builder is a tool of the checkout (site/build.py), not runtime code
    assert "bnviz/site.py" not in names and not [n for n in names if n.startswith("site/")], names
    # no assignment notebook (bnviz/grading/assignments.py, the grader's registry, is code and ships)
    assert not [n for n in names if "/assignments/" in n or n.endswith(("/batch_norm.ipynb", "/norms.ipynb"))], \
        "the assignment's source holds the solutions: it must not ship in the wheel"
    # the full-size reference runs the chapters show, so that an install from the wheel (Colab) shows them
    refs = sorted(p.name for p in (ROOT / "data" / "reference").glob("*.json"))
    assert refs and sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("bnviz/reference_data/")) == refs
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "Project-URL: Repository, https://github.com/" in meta
    with tarfile.open(sdist) as tf:
        members = {m.split("/", 1)[1] for m in tf.getnames() if "/" in m}
    assert {"pyproject.toml", "README.md", *(f"notebooks/{c}" for c in CHAPTERS)} <= members


@pytest.fixture(scope="module")
def fresh(dists, tmp_path_factory):
    """A new venv with the wheel installed (--no-deps) and this venv's packages visible."""
    wheel, _ = dists
    venv = tmp_path_factory.mktemp("venv") / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site_dir = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    (Path(site_dir) / "project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = _env()
    proc = subprocess.run([py, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    where = subprocess.run([py, "-c", "import bnviz; print(bnviz.__file__)"], capture_output=True, text=True,
                           env=env, cwd=venv, check=True).stdout.strip()
    assert where.startswith(site_dir), f"bnviz imported from {where}, not from the installed wheel"
    return py


def test_the_installed_wheel_reads_its_reference_runs(fresh):
    """Away from the checkout (cwd = the venv), bnviz finds the reference runs in its package data
    and reads the same accuracy as the checkout's file."""
    from bnviz import references as rf

    code = ("from bnviz import references as rf; t = rf.reference_table('07'); "
            "print(rf.REFERENCE_DIR); print(len(t.attrs['missing'])); print(t.to_json())")
    proc = subprocess.run([fresh, "-c", code], capture_output=True, text=True, env=_env(),
                          cwd=Path(str(fresh)).parent, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    where, missing, table = proc.stdout.strip().splitlines()[:3]
    assert where.endswith("bnviz/reference_data") and str(ROOT) not in where, where
    here = rf.reference_table("07")
    assert int(missing) == len(here.attrs["missing"])
    assert table == here.to_json()


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(BNVIZ_FAST="1", BNVIZ_DATASET="synthetic", MPLBACKEND="Agg", JUPYTER_PREFER_ENV_PATH="1")
    return env


def test_python_m_bnviz_reports_and_copies(fresh, tmp_path):
    env = _env()
    rep = subprocess.run([fresh, "-m", "bnviz"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert rep.returncode == 0, rep.stderr
    assert "SYNTHETIC" in rep.stdout and "torch" in rep.stdout
    assert f"notebooks: {Path(str(fresh)).parent.parent}" in rep.stdout  # the wheel's copy, in the venv
    dest = tmp_path / "course"
    cp = subprocess.run([fresh, "-m", "bnviz", "copy-notebooks", str(dest)], capture_output=True, text=True,
                        env=env, cwd=tmp_path, timeout=120)
    assert cp.returncode == 0, cp.stderr
    assert sorted(p.name for p in dest.iterdir()) == CHAPTERS
    (dest / CHAPTERS[3]).write_text("my edits")
    again = subprocess.run([fresh, "-m", "bnviz", "copy-notebooks", str(dest)], capture_output=True, text=True,
                           env=env, cwd=tmp_path, timeout=120)
    assert again.returncode == 2 and "already in" in again.stderr and CHAPTERS[3] in again.stderr
    assert (dest / CHAPTERS[3]).read_text() == "my edits", "copy-notebooks overwrote a learner's file"


RUN_00 = """
import sys, nbformat
from nbclient import NotebookClient
nb = nbformat.read(sys.argv[1], as_version=4)
nb.cells.append(nbformat.v4.new_code_cell("import bnviz, sys; print('BNVIZ_FROM', bnviz.__file__, sys.executable)"))
NotebookClient(nb, timeout=600, kernel_name="python3").execute()
print([o.get("text", "") for o in nb.cells[-1].outputs][0])
"""


def test_the_wheel_runs_chapter_00_in_fast_mode(fresh, tmp_path):
    env = _env()
    subprocess.run([fresh, "-m", "bnviz", "copy-notebooks", str(tmp_path)], check=True, env=env, timeout=120)
    venv = Path(str(fresh)).parent.parent
    # the kernel Jupyter starts must be this venv's Python
    subprocess.run([fresh, "-m", "ipykernel", "install", "--prefix", str(venv), "--name", "python3"],
                   check=True, env=env, capture_output=True, timeout=120)
    proc = subprocess.run([fresh, "-c", RUN_00, str(tmp_path / "00_start_here.ipynb")], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("BNVIZ_FROM " + str(venv)) and str(ROOT) not in line, line
