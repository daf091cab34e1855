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


_HIDDEN = ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")  # controls, format (bidi overrides), surrogates, unassigned, line breaks


def visible(text: Any) -> str:
    """``text`` with every character a terminal, a spreadsheet or an editor could act on or hide
    (escape codes, carriage returns, bidi overrides, line and paragraph separators) written as
    ``\\x1b`` / ``\\u202e``; nothing else changes. For names and lines that reach the gradebook,
    the CSVs or the terminal."""
    text = str(text)
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch != " " and unicodedata.category(ch) in _HIDDEN:
            o = ord(ch)
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}")
        else:
            out.append(ch)
    return "".join(out)


def natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]
