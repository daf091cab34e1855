"""Text helpers shared by the trusted side: one line of printable text, and the natural order of
question names (``q2`` before ``q10``). A leaf: imports nothing of the package."""

from __future__ import annotations

import re
import unicodedata
from typing import Any

MAX_TEXT = 120


def clean(text: Any, limit: int = MAX_TEXT) -> str:
    """One line of printable text, at most ``limit`` characters. Only for text that is bounded
    already (validated report fields, our own messages): never for an unvalidated object."""
    text = str(text)[:max(4 * limit, 1000)]
    text = "".join(ch if unicodedata.category(ch)[0] not in "CZ" or ch == " " else " " for ch in text)
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[:limit - 1] + "…"


def natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]
