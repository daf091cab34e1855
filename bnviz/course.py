"""Course-wide settings the notebooks share: fast mode and sizes.

``BNVIZ_FAST=1`` (set by ``make test`` / CI) makes every notebook run top to bottom in
seconds: small data, few steps. Without it a notebook runs its full experiment (what a learner
runs). Notebooks pick sizes with :func:`pick`, so the fast and full settings sit side by side.
"""
from __future__ import annotations

import os

REPO_URL = "https://github.com/bnviz-course/bnviz"


def fast_mode() -> bool:
    """True when ``BNVIZ_FAST`` is set to 1/true/yes."""
    return os.environ.get("BNVIZ_FAST", "").strip().lower() in ("1", "true", "yes")


def pick(full, fast):
    """``fast`` in fast mode, else ``full``: ``epochs = pick(10, 1)``."""
    return fast if fast_mode() else full
