"""Google Colab: running the course inside Colab's own runtime without disturbing it.

Colab's kernel is built on its own IPython (7.34), ipykernel (6.17) and ipywidgets (7.7); the
setup cell of every chapter installs bnviz into that runtime with pip. bnviz's requirements admit
those versions, so pip adds what is missing and upgrades nothing (``tests/test_colab.py`` checks
this against Colab's published package list). This module holds the three things the course
does differently there:

* :func:`check_runtime`: run by the setup cell after pip. A package that the running kernel has
  already imported must not have changed on disk, or the kernel runs half old, half new code
  until a restart. If one did, it names them, says how to restart, and stops the cell
  (``SystemExit``: "Run all" stops there; nothing else runs on a half-updated runtime).
* :func:`default_drawing`: how the lab draws its live charts. ``"display"`` (plain plotly figures
  re-sent through display handles) in Colab and VS Code, where plotly's FigureWidget has a
  history of not drawing (plotly.py #2202, colab-cdn-widget-manager #19/#51, plotly.py #5027);
  ``"widget"`` (FigureWidgets updated in place) elsewhere.
* :func:`enable_custom_widgets`: Colab shows third-party widgets (plotly's FigureWidget) only
  after ``google.colab.output.enable_custom_widget_manager()``; the lab calls it when it shows a
  FigureWidget in Colab, never otherwise (core ipywidgets need no manager).
"""
from __future__ import annotations

import os
import sys
from importlib import metadata

__all__ = ["in_colab", "check_runtime", "changed_packages", "default_drawing", "enable_custom_widgets",
           "WATCHED"]

# (module, distribution): what a pip install into a running kernel could replace under it
WATCHED = (("IPython", "ipython"), ("ipykernel", "ipykernel"), ("jupyter_client", "jupyter_client"),
           ("traitlets", "traitlets"), ("ipywidgets", "ipywidgets"), ("notebook", "notebook"),
           ("plotly", "plotly"), ("anywidget", "anywidget"), ("numpy", "numpy"), ("pandas", "pandas"),
           ("scipy", "scipy"), ("matplotlib", "matplotlib"), ("torch", "torch"), ("torchvision", "torchvision"),
           ("tqdm", "tqdm"), ("requests", "requests"))


def in_colab() -> bool:
    """True in a Google Colab kernel (Colab imports ``google.colab`` at start)."""
    return "google.colab" in sys.modules


def _same(loaded: str, installed: str) -> bool:
    """Whether a module's ``__version__`` and its distribution's version name the same release.
    A local label on one side only (torch's ``2.14.1+cu130`` against ``2.14.1`` in its metadata)
    is not a change."""
    if loaded == installed:
        return True
    try:
        from packaging.version import Version

        a, b = Version(loaded), Version(installed)
        return a == b or (a.public == b.public and not (a.local and b.local))
    except Exception:  # noqa: BLE001 - an unparsable version string: compare the public parts as text
        return loaded.split("+")[0] == installed.split("+")[0]


def changed_packages(watched=WATCHED) -> list[tuple[str, str, str]]:
    """``(distribution, version loaded in this kernel, version now on disk)`` for every watched
    package that this process has imported and whose installed version differs."""
    changed = []
    for module, dist in watched:
        mod = sys.modules.get(module)
        loaded = getattr(mod, "__version__", None) if mod is not None else None
        if not isinstance(loaded, str):
            continue
        try:
            installed = metadata.version(dist)
        except metadata.PackageNotFoundError:
            installed = "(removed)"
        if not _same(loaded, installed):
            changed.append((dist, loaded, installed))
    return changed


def check_runtime(watched=WATCHED) -> None:
    """After the setup cell's ``pip install``: stop with instructions if a package that this
    kernel had already imported changed version (a restart is then unavoidable); otherwise say
    nothing was changed."""
    changed = changed_packages(watched)
    if not changed:
        print("bnviz is installed; this runtime's own packages were left as they were (no restart needed).")
        return
    what = ", ".join(f"{d} {old} -> {new}" for d, old, new in changed)
    raise SystemExit(
        f"Installing the course changed packages this runtime had already loaded: {what}. "
        "The kernel must restart to use them: Runtime -> Restart session, then run the notebook again "
        "from the top (the installed packages are kept). Stopped here so that nothing runs on a "
        "half-updated runtime.")


def default_drawing() -> str:
    """``"display"`` in Colab and VS Code (plotly FigureWidgets are unreliable there), else
    ``"widget"``. ``BNVIZ_LAB_DRAWING`` (``widget`` or ``display``) overrides it."""
    chosen = os.environ.get("BNVIZ_LAB_DRAWING", "").strip().lower()
    if chosen in ("widget", "display"):
        return chosen
    if chosen:
        raise ValueError(f"BNVIZ_LAB_DRAWING={os.environ['BNVIZ_LAB_DRAWING']!r} is not valid; valid: "
                         "'widget', 'display', or unset (display in Colab and VS Code, widget elsewhere)")
    return "display" if in_colab() or "VSCODE_PID" in os.environ else "widget"


def enable_custom_widgets() -> bool:
    """In Colab, let the page show third-party widgets (FigureWidget); elsewhere do nothing.
    Returns True if Colab's custom widget manager was enabled."""
    if not in_colab():
        return False
    from google.colab import output

    output.enable_custom_widget_manager()
    return True
