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

Grading checks the printed text automatically (``check_outputs``): the seeds cell and both
experiment cells print ``student '<id>': experiment seeds [a, b, c]``; a line whose seeds are not
those of the submission's own ``STUDENT_ID`` (with this class's salt), an experiment handed in
without its output, or an experiment output with no seeds line becomes a flag for the instructor
(``flags`` in the gradebook; never shown to the student, never a change of score). What it cannot
see: a figure pasted as an image, or printed text edited by hand; the rubric's look at the
figure titles stays.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import sys
from pathlib import Path

from .ingest import _text  # a notebook cell's source as text (None where it is not text)

PUBLIC_SALT = "bnviz-norms-public-salt"
SECRET_ENV = "BNVIZ_CLASS_SECRET"
N_SEEDS = 3
_SALT_LINE = re.compile(r'^SEED_SALT = "[^"\n]*"', re.M)
_SALT_VALUE = re.compile(r'^SEED_SALT = "([A-Za-z0-9_-]{1,64})"', re.M)
_ID_LINE = re.compile(r"""^STUDENT_ID[ \t]*=[ \t]*[rRuU]?(["'])([^"'\n]{0,200})\1""", re.M)
_PRINTED = re.compile(r"""student (["'])(.{0,200}?)\1: experiment seeds \[([0-9, ]{1,80})\]""")
# the experiment cells, by the first line of their source (notebooks/assignments/norms/norms.ipynb)
EXPERIMENTS = {"experiment A (question 7)": "# Experiment A (question 7)",
               "experiment B (question 8)": "# Experiment B (question 8)"}


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


def salt_of(notebook: dict | None) -> str | None:
    """The ``SEED_SALT`` a built student notebook carries (``stamp_notebook``), or None: assignment 1,
    no notebook, or a line that is not a valid salt."""
    for cell in (notebook or {}).get("cells") or []:
        src = _text(cell.get("source", "")) if isinstance(cell, dict) else None
        if src is not None and cell.get("cell_type") == "code" and (m := _SALT_VALUE.search(src)):
            return m.group(1)
    return None


def check_outputs(sources: list[tuple[str, str]], outputs: list[tuple[int, str]], salt: str) -> list[str]:
    """Flags for the instructor (empty: nothing to look at) from a submission's cells as handed in:
    ``sources`` (cell_type, source) of every cell, ``outputs`` (cell index, printed text) of the code
    cells that printed (``ingest.Submission``). The submission's id is the last ``STUDENT_ID = "..."``
    line of a code cell; its seeds are ``seeds_for(salt, id)``. Flagged: a printed seeds line
    (any cell) with other seeds; an experiment cell (``EXPERIMENTS``) without output, or whose
    output has no seeds line; no id at all. Never raises for what a submission contains."""
    ids = [m.group(2) for kind, src in sources if kind == "code" for m in _ID_LINE.finditer(src)]
    sid = ids[-1].strip() if ids else ""
    if not sid:
        return ["seed check: STUDENT_ID is empty or missing, so the experiments ran on the seeds of the "
                "empty id (everyone's): compare the figures' titles by hand"]
    want = seeds_for(salt, sid)
    printed = dict(outputs)
    flags = []
    for i, text in outputs:
        for m in _PRINTED.finditer(text):
            got = [int(x) for x in m.group(3).replace(" ", "").split(",") if x]
            if got != want:
                flags.append(f"seed check: cell {i} printed seeds {got} for student {m.group(2)!r}, but "
                             f"STUDENT_ID {sid!r} gives {want} in this class: output made with another id's "
                             "seeds, or in another class's notebook? look by hand")
    for what, first_line in EXPERIMENTS.items():
        cells = [i for i, (kind, src) in enumerate(sources) if kind == "code" and src.lstrip().startswith(first_line)]
        if not cells:
            flags.append(f"seed check: no cell starts with {first_line!r} ({what}): the cell was changed; "
                         "compare the figure's title by hand")
        elif not any(i in printed for i in cells):
            flags.append(f"seed check: {what} was handed in without its output (cell {cells[-1]}): "
                         "nothing of it to grade by hand")
        elif not any(_PRINTED.search(printed.get(i, "")) for i in cells):
            flags.append(f"seed check: the output of {what} (cell {cells[-1]}) has no seeds line: "
                         "compare the figure's title by hand")
    return flags


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
