"""Regrades keep each student's inputs (issue 24 item 5, part): the seed recorded in a student's
JSON is reused when the same file is graded again, so a regrade (``--regrade``, ``--only``, a new
limit) cannot flip a borderline test; ``--new-seed`` draws fresh ones. A changed file (a new
submission) always gets a fresh seed: after hidden messages are released, the old inputs are
known to the student."""

from __future__ import annotations

import json
from pathlib import Path

from .records import MAX_JSON_BYTES


def recorded_seeds(out: Path, digests: dict[str, str | None]) -> dict[str, int]:
    """student -> the seed in ``<out>/<student>.json``, for students whose JSON was made from the
    file with this SHA-256 (``digests``: student -> SHA-256 of the file graded now)."""
    seeds = {}
    for name, digest in digests.items():
        path = out / f"{name}.json"
        try:
            if digest is None or not path.is_file() or path.stat().st_size > MAX_JSON_BYTES:
                continue
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if (isinstance(data, dict) and data.get("student") == name and data.get("submission_sha256") == digest
                and isinstance(data.get("seed"), int) and not isinstance(data.get("seed"), bool) and data["seed"] >= 0):
            seeds[name] = data["seed"]
    return seeds
