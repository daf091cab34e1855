"""Where the assignment's files are: the solution notebook (``default_source``) and the default
build folder. A leaf: imports nothing of the package (``build`` and ``similarity`` both use it)."""

from __future__ import annotations

import os
from pathlib import Path

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
