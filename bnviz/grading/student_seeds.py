"""Per-student seeds for assignment 2's experiments (issue 26): a pasted classmate's result shows.

Convention (the student notebook's setup cell computes exactly this, with ``hmac`` / ``hashlib``):

    digest = HMAC-SHA256(key=salt, msg="norms/" + student_id.strip())
    seeds  = [int.from_bytes(digest[4*i : 4*i+4], "big") % 1_000_000 for i in range(N_SEEDS)]

The ``salt`` is a per-class value written into the student notebook (the line ``SEED_SALT = "..."``)
and into ``assignment.json`` (``seed_salt``). It is derived from the instructor's class secret,
``HMAC-SHA256(secret, "norms/seeds")``, so the secret itself never reaches a student; without a
secret (``BNVIZ_CLASS_SECRET`` unset) the fixed ``PUBLIC_SALT`` is used, and anyone can compute
anyone's seeds (fine for self-study, weak for a graded class). Seeds are reproducible, not
secret: they only make each student's runs differ, so a figure made with another id's seeds shows.

``python -m bnviz.grading.student_seeds dist/norms/assignment.json ID...`` prints the seeds each
student's figures must show (the by-hand rubric of questions 7 and 8 asks the grader to compare).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import sys
from pathlib import Path

PUBLIC_SALT = "bnviz-norms-public-salt"
SECRET_ENV = "BNVIZ_CLASS_SECRET"
N_SEEDS = 3
_SALT_LINE = re.compile(r'^SEED_SALT = "[^"\n]*"', re.M)


def class_salt(secret: str | bytes | None = None) -> str:
    """The salt of a class: hex HMAC-SHA256(secret, "norms/seeds")[:32]; the public salt without one."""
    secret = secret if secret is not None else os.environ.get(SECRET_ENV) or None
    if secret is None:
        return PUBLIC_SALT
    key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    return hmac.new(key, b"norms/seeds", hashlib.sha256).hexdigest()[:32]


def seeds_for(salt: str, student_id: str, n: int = N_SEEDS) -> list[int]:
    """The n experiment seeds of one student (the notebook's ``student_seeds``), each in [0, 10^6)."""
    if not isinstance(student_id, str):
        raise TypeError(f"student_id must be a str, got {type(student_id).__name__}")
    if not 1 <= n <= 8:
        raise ValueError(f"n={n} seeds: valid is 1 to 8 (one SHA-256 digest gives 8)")
    digest = hmac.new(salt.encode("utf-8"), ("norms/" + student_id.strip()).encode("utf-8"), hashlib.sha256).digest()
    return [int.from_bytes(digest[4 * i:4 * i + 4], "big") % 1_000_000 for i in range(n)]


def stamp_notebook(path: str | os.PathLike, salt: str) -> bool:
    """Write ``salt`` into the notebook's ``SEED_SALT = "..."`` line (in place). False when the
    notebook has no such line (assignment 1), True when stamped."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", salt):
        raise ValueError(f"salt {salt!r}: valid is 1 to 64 letters, digits, '-' or '_'")
    path = Path(path)
    nb = json.loads(path.read_text(encoding="utf-8"))
    found = False
    for cell in nb["cells"]:
        src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        if cell["cell_type"] == "code" and _SALT_LINE.search(src):
            cell["source"] = _SALT_LINE.sub(f'SEED_SALT = "{salt}"', src).splitlines(keepends=True)
            found = True
    if found:
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return found


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m bnviz.grading.student_seeds ASSIGNMENT_JSON STUDENT_ID...", file=sys.stderr)
        return 2
    salt = json.loads(Path(argv[0]).read_text(encoding="utf-8")).get("seed_salt") or PUBLIC_SALT
    for sid in argv[1:]:
        print(sid, *seeds_for(salt, sid))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
