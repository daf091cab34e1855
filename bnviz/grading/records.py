"""Records: the result of grading one submission (``Result``), the gradebook's rows and CSV cells,
atomic writes, and the resume key (``fingerprint``, ``previous_result``). Imports nothing that
handles student work.

Each student's ``<out>/<student>.json`` is ``Result.to_dict()``; a later run keeps it (resumes)
when it is final, made from the same file (SHA-256) under the same fingerprint.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .text import natural_key, visible

FORMAT = 2  # of the per-student JSON; part of the resume fingerprint
MAX_JSON_BYTES = 8 << 20  # a stored result larger than this is not read back


@dataclasses.dataclass
class Result:
    """One submission's grade. Fields in the order of its JSON file. Read and set like a dict too
    (``r["total"]``, ``r.get("resumed")``), for callers that handle stored JSON and results alike."""

    student: str
    submission: str
    scores: dict[str, float]
    possible: dict[str, float]
    total: float = 0.0
    possible_total: float = 0.0
    error: str = ""
    flags: str = ""
    failed_tests: list[dict] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    elapsed_s: float = 0.0
    final: bool = True
    seed: Any = None
    submission_sha256: str | None = None
    config: str | None = None
    row: dict[str, str] | None = None
    resumed: bool = dataclasses.field(default=False, metadata={"stored": False})  # kept from an earlier run
    log: bytes = dataclasses.field(default=b"", repr=False, metadata={"stored": False})  # what it printed
    # the code cells as ingest read them (what ran, what similarity compares); None: not readable
    cells: list | None = dataclasses.field(default=None, repr=False, metadata={"stored": False})

    @classmethod
    def empty(cls, name: str, submission: str, questions: dict[str, float]) -> "Result":
        return cls(student=name, submission=submission, scores={q: 0.0 for q in questions},
                   possible=dict(questions), possible_total=float(sum(questions.values())))

    @classmethod
    def from_dict(cls, data: dict) -> "Result":
        names = {f.name for f in dataclasses.fields(cls) if f.metadata.get("stored", True)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """What its JSON file holds (not ``log``, written to its own file, nor ``resumed``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("stored", True)}

    # dict-style access, for code that handles stored JSON dicts and results alike
    def keys(self):
        return self.to_dict().keys()

    def __iter__(self):
        return iter(self.keys())

    def __contains__(self, key) -> bool:
        return key in self.keys() or key == "resumed"

    def __getitem__(self, key: str):
        if key not in self:
            raise KeyError(key)
        return getattr(self, key)

    def __setitem__(self, key: str, value) -> None:
        if key not in self:
            raise KeyError(key)
        setattr(self, key, value)

    def get(self, key: str, default=None):
        return getattr(self, key) if key in self else default


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write via a short temporary name in the same folder (the name may be as long as the
    file system allows: the temporary one must not be longer), then ``os.replace``."""
    fd, tmp = tempfile.mkstemp(prefix=".w", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def csv_cell(value: Any) -> str:
    """Text for a CSV cell that no spreadsheet reads as a formula (``= + - @``, tab, CR first) and
    that holds no control character."""
    text = visible(value)  # no control character reaches a spreadsheet (escape codes written as \\x1b)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def gradebook_columns(questions: dict[str, float], manual: dict[str, float]) -> list[str]:
    qs = sorted(set(questions) | set(manual), key=natural_key)
    return ["student", *qs, "total", "possible", "error", "flags"]


def gradebook_row(result: Result, columns: list[str], manual: dict[str, float]) -> dict[str, str]:
    row = {"student": result.student, "total": f"{result.total:g}", "possible": f"{result.possible_total:g}",
           "error": result.error, "flags": result.flags}
    for q in columns[1:-4]:
        row[q] = "" if q in manual else f"{result.scores.get(q, 0.0):g}"
    return {c: csv_cell(row[c]) for c in columns}


def write_student(out: Path, result: Result, columns: list[str], manual: dict[str, float]) -> None:
    """``<out>/<student>.json`` and ``<out>/logs/<student>.log``, each atomically; a failure is
    recorded in the result's error (and the gradebook), never raised."""
    log, result.log = result.log, b""
    result.row = gradebook_row(result, columns, manual)
    try:
        (out / "logs").mkdir(exist_ok=True)
        atomic_write(out / "logs" / f"{result.student}.log", log)
        atomic_write(out / f"{result.student}.json", json.dumps(result.to_dict(), indent=2))
    except (OSError, ValueError) as e:
        result.error = "; ".join(filter(None, [result.error, f"could not write its result file ({type(e).__name__})"]))
        result.final = False
        result.row = gradebook_row(result, columns, manual)


def write_table(path: Path, header: list[str], rows: list[list[str]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows([[csv_cell(c) for c in r] for r in rows])
    atomic_write(path, buf.getvalue())


def write_gradebook(out: Path, results: list[Result], columns: list[str]) -> None:
    write_table(out / "gradebook.csv", columns, [[r.row[c] for c in columns] for r in results])


# --------------------------------------------------------------------------- resume


def sha256(path: Path) -> str | None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


def fingerprint(questions: dict, forbidden: dict, manual: dict, variant, limits: dict | None = None) -> str:
    """What a stored result depends on besides the file: a result made under other questions,
    points, rules, variant or limits (``limits``: the sandbox's time, memory, process... limits and
    the number of jobs, which sets the threads and CPU share of each sandbox) is graded again, so a
    time-out is not kept when the folder is graded again with a longer ``--timeout``."""
    data = {"format": FORMAT, "questions": questions, "manual": manual,
            "rules": {q: sorted(f) for q, f in forbidden.items()},
            "variant": variant.to_dict() if variant is not None else None, "limits": limits or {}}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def previous_result(out: Path, name: str, digest: str | None, config: str, columns: list[str]) -> Result | None:
    """The stored result for this student if it can be reused as is, else None."""
    path = out / f"{name}.json"
    try:
        if digest is None or not path.is_file() or path.stat().st_size > MAX_JSON_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = (isinstance(data, dict) and data.get("final") is True and data.get("submission_sha256") == digest
          and data.get("config") == config and data.get("student") == name
          and isinstance(data.get("row"), dict) and list(data["row"]) == columns)
    try:
        return Result.from_dict(data) if ok else None
    except TypeError:  # a field missing
        return None
