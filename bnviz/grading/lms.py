"""LMS in and out (issue 24 item 3). Reads names and metadata only; never opens a notebook.

In (``collect``, used by ``grade_folder`` in place of ``ingest.list_folder`` + ``student_names``):

* A Canvas bulk download: ``<lastfirst>[_LATE]_<user id>_<submission id>_<original name>``. The
  student is the Canvas user id (``CANVAS_RE``); ``LATE`` is kept as data (``submissions.csv``).
  A folder is read as a Canvas download when at least half of its submissions are named so (a
  plain ``hw_1_2_x.ipynb`` among other names stays a plain file).
* A Gradescope export: ``submission_<id>/`` folders next to ``submission_metadata.yml`` (a map from
  folder name to ``:submitters: [{:name, :sid, :email}]``, ``:created_at``). The student is the
  first submitter's email (its SID, else the folder, when there is none); the notebook (or zip) is
  looked for in the folder and below (links never followed, the assignment's name first).
* Any other file: the student is its name, as before (``ingest.student_names``).
* Two submissions for one student: the newest (the submission time: Gradescope's ``:created_at``,
  else Canvas's submission id, else the file's time) is graded, the other goes to ``skipped.csv``
  with the reason.

Out (``write_lms_csvs``, after every ``grade`` run, from the merged gradebook):

* ``grades/canvas.csv``: ``Student, ID, SIS User ID, SIS Login ID, Section, <assignment>`` (Canvas's
  gradebook import layout; ``ID`` is the Canvas user id; the assignment column is
  ``--canvas-assignment``, e.g. ``Batch norm (12345)`` as in a Canvas gradebook export).
* ``grades/gradescope.csv``: ``Name, SID, Email, <one per question>, Total Score, Max Points``
  (the column names of Gradescope's own grade export; Gradescope matches rows by Email or SID).
* ``grades/submissions.csv``: ``student, file, source, lms_user_id, submission_id, name, email,
  sid, submitted_at, late`` for every graded submission.

A roster CSV (``--roster``; columns, any case: ``id`` / ``user_id`` / ``canvas_id``, ``file``,
``name``, ``email``, ``sis_id`` / ``sid``, ``login_id``, ``section``) fills names, emails and SIS
ids, matched by Canvas user id, email or file.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import re
import stat
from datetime import datetime, timezone
from pathlib import Path

from . import ingest
from .records import atomic_write, csv_cell
from .text import natural_key

CANVAS_RE = re.compile(r"^(?P<login>[a-z]+)(?P<late>_LATE)?_(?P<uid>\d+)_(?P<sid>\d+)_(?P<orig>.+)$")
GRADESCOPE_META = "submission_metadata.yml"
MAX_META_BYTES = 32 << 20
MAX_DEPTH = 4


@dataclasses.dataclass
class Info:
    """Where one submission came from."""

    source: str = "folder"  # folder | canvas | gradescope
    lms_user_id: str = ""
    submission_id: str = ""
    name: str = ""
    email: str = ""
    sid: str = ""
    submitted_at: str = ""  # ISO 8601 (Gradescope) or the file's time
    late: bool = False
    order: tuple = ()  # what "newest" compares


def _safe(key: str) -> str:
    name = re.sub(r"[^\w.-]", "_", key)
    return re.sub(r"^[-.]", "_", name)[:ingest.MAX_NAME_BYTES] or "submission"


def _mtime(p: Path) -> float:
    try:
        return p.lstat().st_mtime
    except OSError:
        return 0.0


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _gradescope_meta(folder: Path) -> dict:
    path = folder / GRADESCOPE_META
    try:
        if not path.is_file() or path.stat().st_size > MAX_META_BYTES:
            return {}
        import yaml

        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception:  # an unreadable metadata file: its folders are skipped with the reason
        return {}
    return data if isinstance(data, dict) else {}


def _find_notebooks(folder: Path, depth: int = 0) -> list[Path]:
    found = []
    try:
        entries = sorted(folder.iterdir(), key=lambda q: q.name)
    except OSError:
        return []
    for p in entries:
        try:
            mode = p.lstat().st_mode
        except OSError:
            continue
        if p.name.startswith((".", "__MACOSX")) or stat.S_ISLNK(mode):
            continue
        if stat.S_ISDIR(mode) and depth < MAX_DEPTH:
            found += _find_notebooks(p, depth + 1)
        elif stat.S_ISREG(mode) and p.suffix.lower() in ingest.EXTENSIONS:
            found.append(p)
    return found


def _gradescope_info(key: str, meta: dict) -> Info:
    entry = meta.get(key) if isinstance(meta.get(key), dict) else {}
    subs = entry.get(":submitters") or entry.get("submitters") or []
    first = subs[0] if isinstance(subs, list) and subs and isinstance(subs[0], dict) else {}
    get = lambda d, k: str(d.get(":" + k, d.get(k, "")) or "")  # noqa: E731
    created = entry.get(":created_at", entry.get("created_at", ""))
    created = created.isoformat() if isinstance(created, datetime) else str(created or "")
    return Info("gradescope", "", key.removeprefix("submission_"), get(first, "name"), get(first, "email"),
                get(first, "sid"), created, False, (created, key))


def _canvas_split(files: list[Path]) -> tuple[list[tuple[str, Path, Info]], list[Path]]:
    """Canvas bulk-download files keyed by user id, and the plain files. A folder is read as a
    Canvas download when at least half its files are named the Canvas way."""
    canvas = sum(1 for p in files if CANVAS_RE.match(p.name))
    canvas = canvas > 0 and 2 * canvas >= len(files)
    keyed, plain = [], []
    for p in files:
        m = CANVAS_RE.match(p.name) if canvas else None
        if m:
            keyed.append((m["uid"], p, Info("canvas", m["uid"], m["sid"], "", "", "", _iso(_mtime(p)), bool(m["late"]),
                                            ("", int(m["sid"]), _mtime(p), p.name))))
        else:
            plain.append(p)
    return keyed, plain


def _gradescope_entries(folder: Path, skipped, meta, preferred: str):
    """Gradescope ``submission_<id>/`` folders among ``list_folder``'s skipped entries:
    ([(student key, notebook, Info)], [(entry, why skipped)])."""
    keyed, rest = [], []
    for name, why in skipped:
        path = folder / name
        if meta and name == GRADESCOPE_META:
            continue  # read, not a submission
        if meta and re.match(r"^submission_\d+$", name) and path.is_dir() and not path.is_symlink():
            found = _find_notebooks(path)
            if not found:
                rest.append((name, "a Gradescope submission folder with no notebook (.ipynb) or zip"))
                continue
            found.sort(key=lambda q: (q.name.lower() != preferred.lower(), len(q.relative_to(path).parts), str(q)))
            info = _gradescope_info(name, meta)
            keyed.append((info.email or info.sid or name, found[0], info))
            for other in found[1:]:
                rest.append((ingest.printable(str(other.relative_to(folder))),
                             f"another notebook of {name} ({ingest.printable(found[0].name)} is graded)"))
            continue
        rest.append((name, why))
    return keyed, rest


def _newest_per_student(folder: Path, keyed) -> tuple[list[tuple[str, Path, Info]], list[tuple[str, str]]]:
    """One submission per student key (case-insensitive): the newest; the older ones are skipped."""
    by_key: dict[str, list[tuple[Path, Info, str]]] = {}
    for key, p, info in keyed:
        by_key.setdefault(_safe(key).lower(), []).append((p, info, key))
    chosen, rest = [], []
    for group in by_key.values():
        group.sort(key=lambda t: t[1].order)
        p, info, key = group[-1]
        chosen.append((_safe(key), p, info))
        for q, _, _ in group[:-1]:
            rest.append((ingest.printable(str(q.relative_to(folder))),
                         f"an older submission of {ingest.printable(_safe(key))} ({ingest.printable(str(p.relative_to(folder)))} is graded)"))
    return chosen, rest


def collect(folder: Path, preferred: str = "batch_norm.ipynb") -> tuple[list[Path], dict[Path, str], list[tuple[str, str]], dict[str, Info]]:
    """(files to grade, file -> student, [(entry, why skipped)], student -> Info)."""
    files, skipped = ingest.list_folder(folder)
    keyed, plain = _canvas_split(files)
    more, rest = _gradescope_entries(folder, skipped, _gradescope_meta(folder), preferred)
    chosen, older = _newest_per_student(folder, keyed + more)
    rest += older
    names = ingest.student_names(plain)
    used = {n.lower() for n in names.values()}
    infos: dict[str, Info] = {}
    for key, p, info in chosen:
        name, k = key, 1
        while name.lower() in used:
            k += 1
            name = f"{key}_{k}"
        used.add(name.lower())
        names[p] = name
        infos[name] = info
    for p in plain:
        infos[names[p]] = Info("folder", submitted_at=_iso(_mtime(p)))
    graded = sorted(names, key=str)  # a plain folder: the order of ingest.list_folder
    return graded, names, rest, infos  # skipped: list_folder's order, then older duplicates


# --------------------------------------------------------------------------- out


def read_roster(path: Path | None) -> list[dict[str, str]]:
    if not path:
        return []
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    alias = {"user_id": "id", "canvas_id": "id", "canvas_user_id": "id", "sis_id": "sid", "sis_user_id": "sid",
             "student_id": "sid", "sis_login_id": "login_id", "login": "login_id", "full_name": "name"}
    out = []
    for r in rows:
        row = {}
        for k, v in r.items():
            if k is None:
                continue
            k = re.sub(r"[\s_]+", "_", k.strip().lower())
            row[alias.get(k, k)] = (v or "").strip()
        out.append(row)
    return out


def _roster_match(roster: list[dict], student: str, info: Info, file: str) -> dict:
    for r in roster:
        if ((info.lms_user_id and r.get("id") == info.lms_user_id) or (info.email and r.get("email", "").lower() == info.email.lower())
                or (r.get("file") and r.get("file") in (file, Path(file).stem)) or r.get("id") == student):
            return r
    return {}


def write_lms_csvs(out: Path, gradebook_rows: list[dict], infos: dict[str, Info], files: dict[str, str],
                   questions: list[str], possible: float, roster: list[dict], canvas_assignment: str) -> None:
    """``canvas.csv``, ``gradescope.csv`` and ``submissions.csv`` in ``out`` (atomically)."""
    canvas, gs, subs = [], [], []
    for row in gradebook_rows:
        s = row["student"].lstrip("'")
        info = infos.get(s, Info())
        r = _roster_match(roster, s, info, files.get(s, ""))
        name = r.get("name") or info.name or ""
        email = r.get("email") or info.email
        sid = r.get("sid") or info.sid
        total = row.get("final") or row["total"]  # with a late policy: the score after the penalty
        canvas.append([name or s, r.get("id") or info.lms_user_id, sid, r.get("login_id", ""), r.get("section", ""), total])
        gs.append([name, sid, email, *[row.get(q, "") for q in questions], total, f"{possible:g}"])
        subs.append([s, files.get(s, ""), info.source, info.lms_user_id, info.submission_id, name, email, sid,
                     info.submitted_at, "yes" if info.late else ""])

    def write(name, header, rows):
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\r\n")
        w.writerow(header)
        w.writerows([[csv_cell(c) for c in r] for r in rows])
        atomic_write(out / name, buf.getvalue())

    write("canvas.csv", ["Student", "ID", "SIS User ID", "SIS Login ID", "Section", canvas_assignment], canvas)
    write("gradescope.csv", ["Name", "SID", "Email", *questions, "Total Score", "Max Points"], gs)
    write("submissions.csv", ["student", "file", "source", "lms_user_id", "submission_id", "name", "email", "sid",
                              "submitted_at", "late"], sorted(subs, key=lambda r: natural_key(r[0])))
