"""An emulation of Google Colab's runtime for tests/test_colab.py.

Colab cannot be reached from CI, but Google publishes its runtime's package list
(``tests/colab/pip-freeze.txt``, a copy of googlecolab/backend-info's file; see
``tests/colab/README.md``). :func:`colab_venv` builds, once, a venv that holds Colab's exact
versions of everything the course touches (the Jupyter stack — IPython 7.34, ipykernel 6.17,
jupyter_client 7.4, traitlets, notebook 6.5 —, ipywidgets 7.7, plotly 5.24, anywidget, numpy,
pandas, scipy, matplotlib, tqdm, ...), every other package they pull in pinned to Colab's
version too (the whole list is a constraints file), and the torch this machine has (Colab's
own torch build is not installable here). It is cached under ``.cache/colab-venv-<key>``.

Three deviations from Colab, all because of this machine: Python is the one running the tests
(CI: 3.11; Colab: 3.13), torch is 2.14.1 (Colab: 2.11), and setuptools is what that torch
requires (>= 77.0.3; Colab's torch lives with its setuptools 75.2.0: pinning it here would make
pip "repair" torch's requirement during the course's install and blame the course for it). The kernel it starts imports a
stand-in ``google.colab`` (:data:`STANDIN`) so that the chapters' setup cells take their Colab
branch; its ``output.enable_custom_widget_manager()`` only records that it was called.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FREEZE = ROOT / "tests" / "colab" / "pip-freeze.txt"
# Colab's packages the course imports, or that a pip install into Colab could replace under its kernel
STACK = ("ipython", "ipykernel", "jupyter_client", "jupyter_core", "traitlets", "tornado", "pyzmq", "notebook",
         "jupyter_server", "ipywidgets", "widgetsnbextension", "jupyterlab_widgets", "plotly", "anywidget",
         "numpy", "pandas", "scipy", "matplotlib", "matplotlib-inline", "tqdm", "requests", "packaging",
         "nbformat", "psutil", "debugpy", "prompt_toolkit", "pexpect", "nest-asyncio")
TORCH = ("torch==2.14.1", "torchvision==0.29.1")  # what this machine's pip has on disk (CI's torch)
NOT_PINNED = ("torch", "nvidia", "triton", "setuptools")  # this machine's torch and what it requires

STANDIN = {
    "google/colab/__init__.py": '"""Stand-in for google.colab in tests (bnviz tests/colab_env.py)."""\n'
                                "from . import output  # noqa: F401\n",
    "google/colab/output.py": (
        "import os\n\n\n"
        "def enable_custom_widget_manager():\n"
        "    with open(os.environ['BNVIZ_COLAB_STANDIN_LOG'], 'a') as f:\n"
        "        f.write('enable_custom_widget_manager\\n')\n"),
}


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def colab_pins(path: Path = FREEZE) -> dict[str, str]:
    """{normalised name: version} for every ``name==version`` line of Colab's freeze."""
    pins = {}
    for line in path.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[_norm(name.strip())] = version.strip()
    return pins


def installed(python: Path) -> dict[str, str]:
    out = subprocess.run([str(python), "-m", "pip", "list", "--format=json"], check=True, capture_output=True,
                         text=True).stdout
    return {_norm(p["name"]): p["version"] for p in json.loads(out)}


BUILD = 3  # bump when colab_venv() builds differently


def _key() -> str:
    h = hashlib.sha256(FREEZE.read_bytes())
    h.update(json.dumps([STACK, TORCH, NOT_PINNED, sys.version_info[:3], BUILD]).encode())
    return h.hexdigest()[:12]


def colab_venv(cache: Path = ROOT / ".cache") -> Path:
    """The emulated runtime's venv (built once, then reused); returns its python."""
    venv = cache / f"colab-venv-{_key()}"
    python = venv / "bin" / "python"
    if (venv / ".complete").exists():
        return python
    if venv.exists():
        shutil.rmtree(venv)
    cache.mkdir(parents=True, exist_ok=True)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    pins = colab_pins()
    constraints = venv / "colab-constraints.txt"
    # Colab's versions of everything (torch and what only this machine has aside)
    constraints.write_text("".join(f"{n}=={v}\n" for n, v in pins.items()
                                   if not n.startswith(NOT_PINNED)))
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile"]
    subprocess.run(pip + ["--upgrade", f"pip=={pins.get('pip', '24.1.2')}"], check=False)
    subprocess.run(pip + ["-c", str(constraints)] + list(TORCH), check=True)  # its requirements at Colab's versions
    missing = [p for p in STACK if _norm(p) not in pins]
    assert not missing, f"not in Colab's freeze: {missing}"
    subprocess.run(pip + ["-c", str(constraints)] + [f"{p}=={pins[_norm(p)]}" for p in STACK], check=True)
    for rel, text in STANDIN.items():
        (venv / "standin" / rel).parent.mkdir(parents=True, exist_ok=True)
        (venv / "standin" / rel).write_text(text)
    (venv / ".complete").write_text("ok\n")
    return python


def kernel_spec(python: Path, where: Path, name: str = "colab-emu") -> str:
    """Write a kernelspec for the emulated runtime under ``where/kernels`` (put ``where`` on
    JUPYTER_PATH); its kernel imports the stand-in google.colab before it starts, as Colab's does."""
    start = ("import sys; sys.path.insert(0, %r); import google.colab; "
             "from ipykernel.kernelapp import launch_new_instance; "
             "sys.argv = ['ipykernel_launcher'] + sys.argv[1:]; launch_new_instance()"
             % str(python.parent.parent / "standin"))
    spec = {"argv": [str(python), "-c", start, "-f", "{connection_file}"], "display_name": "Colab (emulated)",
            "language": "python"}
    d = where / "kernels" / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "kernel.json").write_text(json.dumps(spec))
    return name


def snapshot_repo(dest: Path) -> Path:
    """A git repository holding this checkout's working tree (tracked files and untracked ones
    git does not ignore), committed: what ``pip install git+URL`` clones in Colab."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "snapshot"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env)
    return dest
