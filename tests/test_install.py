"""The install story: d2l imports next to modern numpy, and conda's file names pyproject's deps."""
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_d2l_imports_with_the_old_api():
    from d2l import torch as d2l

    assert callable(d2l.train_ch6) and callable(d2l.load_data_fashion_mnist)
    assert callable(d2l.evaluate_accuracy_gpu)


def _requirement_names(reqs):
    return {re.split(r"[<>=!~ \[]", r.strip(), maxsplit=1)[0].lower() for r in reqs}


def test_environment_yml_names_the_same_dependencies_as_pyproject():
    tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")
    yaml = pytest.importorskip("yaml")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "conda-forge" in env["channels"]
    assert any(str(d).startswith("python") for d in env["dependencies"] if isinstance(d, str))
    (pip_section,) = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    runtime = [r.split("#")[0].strip() for r in pip_section if not r.startswith(("-e", "--"))]
    assert sorted(runtime) == sorted(project["dependencies"])  # same names and same ranges
    assert "-e .[lab]" in pip_section and "--no-deps d2l==1.0.3" in pip_section


def test_makefile_installs_d2l_without_its_pins():
    text = (ROOT / "Makefile").read_text()
    assert '--no-deps "d2l==1.0.3"' in text
    assert re.search(r"^lab:", text, re.M) and re.search(r"^test:", text, re.M)


def test_pyproject_ranges_admit_this_machines_torch():
    from importlib.metadata import version

    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = next(d for d in deps if d.startswith("torch>"))
    assert "<" not in torch_req  # newer releases admitted
    from packaging.version import Version

    assert Version(version("torch").split("+")[0]) >= Version(torch_req.split(">=")[1])


def test_runtime_requirements_leave_colabs_runtime_alone():
    """A library must not replace the IPython, kernel or front end of the runtime it is installed
    into (Colab's IPython 7.34, ipykernel 6.17, notebook 6.5, ipywidgets 7.7, plotly 5.24): the
    front ends are in the `lab` extra, and every floor admits Colab's version
    (tests/test_colab.py installs into Colab's published versions)."""
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {Requirement(r).name.lower(): Requirement(r) for r in project["dependencies"]}
    assert not {"jupyterlab", "notebook", "ipykernel", "voila", "jupyter-client"} & set(runtime)
    for freeze in ("pip-freeze.txt", "pip-freeze.gpu.txt"):  # Colab's CPU and GPU runtimes
        colab = {}
        for line in (ROOT / "tests" / "colab" / freeze).read_text().splitlines():
            if " @ " in line and "/torch" in line:  # torch @ https://.../torch-2.11.0%2Bcpu-cp313-...
                name = line.split(" @ ")[0].strip().lower()
                m = re.search(rf"/{name}-([0-9][^-/]*?)(%2B|\+|-)", line)
                if m:
                    colab[name] = m.group(1)
            elif "==" in line and not line.startswith("#"):
                name, version = line.split("==", 1)
                colab[name.strip().lower().replace("_", "-")] = version.strip()
        assert {"torch", "torchvision", "ipython", "plotly", "ipywidgets"} <= set(colab), freeze
        for name, req in runtime.items():
            if name in colab:
                assert req.specifier.contains(colab[name], prereleases=True), \
                    f"{req} refuses Colab's {name} {colab[name]} ({freeze})"
    lab = {Requirement(r).name.lower() for r in project["optional-dependencies"]["lab"]}
    assert {"jupyterlab", "notebook", "voila", "ipykernel"} <= lab
