"""Manual grading that cannot lose a grade (issue 24 item 1). Imports nothing that runs student code.

* ``grades/manual.csv`` (``MANUAL_COLUMNS``: student, question, points, rubric_items, comment,
  grader) is the instructor's file. ``sync_manual_csv`` only **appends** the rows that are missing
  (one per student and manual question, points blank): the bytes already in the file are written
  back unchanged, so no run can change or drop a typed grade, a row of a student whose file is
  gone, or a column the instructor added.
* ``merge_gradebook`` writes ``gradebook.csv`` with the manual points in their question's column,
  ``total`` and ``possible`` counting them, and ``manual_ungraded`` naming the manual questions
  still without valid points (``q4``, or ``q4 (points 'x' not a number from 0 to 2)``).
* ``write_written_pages``: ``grades/written/<question>.html`` (every student's answer cells with
  their outputs, PNG/JPEG plots as images, everything else HTML-escaped, the rubric at the top) and
  ``grades/written/<question>-anonymous.html`` (the same with numbers from
  ``written/anonymous-key.csv``, stable across runs, for blind grading).
* ``rubrics``: the rubric of each manual question, from the ``rubric:`` list of its
  ``# BEGIN QUESTION`` cell in the assignment source (``{id, points, item}`` per line).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import re
import secrets
from pathlib import Path

from .records import atomic_write, csv_cell
from .text import natural_key, visible

MANUAL_COLUMNS = ["student", "question", "points", "rubric_items", "comment", "grader"]
UNGRADED = "manual_ungraded"
MAX_NOTEBOOK_BYTES = 64 << 20  # a notebook larger than this gets no written-answer entry (shown why)
MAX_OUTPUT_CHARS = 20_000  # of one text output on the written page
MAX_IMAGE_BYTES = 2 << 20


# --------------------------------------------------------------------------- rubrics


def rubrics(manifest: dict) -> dict[str, list[dict]]:
    """Manual question -> [{id, points, item}], from the manifest's questions (a ``rubric`` key) or
    else the ``rubric:`` list of the ``# BEGIN QUESTION`` cell of the source notebook it names."""
    manual = [q for q, c in manifest.get("questions", {}).items() if c.get("manual")]
    out = {q: list(manifest["questions"][q].get("rubric") or []) for q in manual}
    if all(out.values()) or not manifest.get("source"):
        return out
    try:
        import yaml

        nb = json.loads(Path(manifest["source"]).read_text(encoding="utf-8"))
        for cell in nb["cells"]:
            src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            if cell["cell_type"] == "raw" and re.match(r"#\s*BEGIN\s+QUESTION", src, re.I):
                cfg = yaml.safe_load("\n".join(src.splitlines()[1:])) or {}
                if cfg.get("name") in out and not out[cfg["name"]]:
                    out[cfg["name"]] = [{"id": str(r.get("id", i + 1)), "points": float(r.get("points", 0)),
                                         "item": str(r.get("item", ""))} for i, r in enumerate(cfg.get("rubric") or [])]
    except (OSError, ValueError, KeyError, TypeError, ImportError):
        pass
    return out


# --------------------------------------------------------------------------- manual.csv


def read_manual(path: Path) -> list[dict[str, str]]:
    """The rows of manual.csv as dicts (a leading ``'`` that guards a formula is dropped)."""
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    return [{k: (v or "") for k, v in r.items() if k is not None} for r in rows]


def sync_manual_csv(out: Path, students: list[str], manual: dict[str, float]) -> list[tuple[str, str]]:
    """Append a blank row for every (student, manual question) not in ``<out>/manual.csv``; the
    file's existing bytes are kept exactly. Returns the rows added."""
    path = out / "manual.csv"
    have = {(r.get("student", ""), r.get("question", "")) for r in read_manual(path)}
    missing = [(s, q) for s in students for q in sorted(manual, key=natural_key) if (s, q) not in have]
    if not missing and path.is_file():
        return []
    old = path.read_bytes() if path.is_file() else b""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if not old.strip():
        old = b""
        w.writerow(MANUAL_COLUMNS)
    elif not old.endswith((b"\n", b"\r")):
        buf.write("\r\n" if b"\r\n" in old else "\n")
    header = next(csv.reader(io.StringIO(old.decode("utf-8-sig")))) if old else MANUAL_COLUMNS
    for s, q in missing:
        row = {"student": csv_cell(s), "question": q}
        w.writerow([row.get(c, "") for c in header])
    atomic_write(path, old + buf.getvalue().encode("utf-8"))
    return missing


def _number(text: str) -> float | None:
    text = text.strip().lstrip("'").strip()
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value == value and abs(value) != float("inf") else None


def manual_points(rows: list[dict[str, str]], manual: dict[str, float]) -> dict[str, dict[str, tuple]]:
    """student -> question -> (points or None, why not graded or "", row). A filled row whose
    points are not a number from 0 to the question's points counts as ungraded, with the reason."""
    got: dict[str, dict[str, tuple]] = {}
    for r in rows:
        s, q, text = r.get("student", "").lstrip("'"), r.get("question", ""), r.get("points", "")
        if q not in manual:
            continue
        if not text.strip():
            entry = (None, "", r)
        else:
            v = _number(text)
            entry = (v, "", r) if v is not None and 0 <= v <= manual[q] else \
                (None, f"points {visible(text)[:20]!r} not a number from 0 to {manual[q]:g}", r)
        prev = got.setdefault(s, {}).get(q)
        if prev is None or (prev[0] is None and entry[0] is not None):  # a filled row wins over a blank one
            got[s][q] = entry
    return got


LATE_COLUMNS = ["late_days", "penalty", "final"]


def merge_gradebook(out: Path, results: list, manual: dict[str, float],
                    late: dict[str, tuple[float, float, str]] | None = None) -> list[str]:
    """Write ``<out>/gradebook.csv`` from each result's autograded ``row`` plus ``manual.csv``;
    with a late policy (``late``: student -> (days late, share taken, why), ``late.assess``) also
    ``late_days, penalty, final`` (``total`` is then the raw score). Returns the header."""
    points = manual_points(read_manual(out / "manual.csv"), manual)
    header = None
    rows = []
    for r in results:
        row = dict(r.row)
        mine = points.get(r.student, {})
        total, possible, ungraded = float(r.total), float(r.possible_total) + sum(manual.values()), []
        for q in sorted(manual, key=natural_key):
            v, why, _ = mine.get(q, (None, "", None))
            if v is None:
                row[q] = ""
                ungraded.append(f"{q} ({why})" if why else q)
            else:
                row[q] = f"{v:g}"
                total += v
        row["total"], row["possible"] = f"{total:g}", f"{possible:g}"
        row[UNGRADED] = "; ".join(ungraded)
        if late is not None:
            days, share, _why = late.get(r.student, (0.0, 0.0, ""))
            penalty = round(total * share, 4)
            row.update(late_days=f"{days:g}", penalty=f"{penalty:g}", final=f"{total - penalty:g}")
        if header is None:
            header = list(r.row) + [UNGRADED] + (LATE_COLUMNS if late is not None else [])
        rows.append([csv_cell(row.get(c, "")) if c in (UNGRADED, "total", "possible", *LATE_COLUMNS) or c in manual
                     else row.get(c, "") for c in header])
    header = header or ["student", *sorted(manual, key=natural_key), "total", "possible", "error", "flags", UNGRADED]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    atomic_write(out / "gradebook.csv", buf.getvalue())
    return header


# --------------------------------------------------------------------------- written answers


def _cells_of(path: Path, preferred: str) -> list[dict]:
    """The cells of a submission (a notebook or the notebook in a zip), read as data."""
    from . import ingest

    if path.stat().st_size > MAX_NOTEBOOK_BYTES and path.suffix.lower() != ".zip":
        raise ValueError(f"larger than {MAX_NOTEBOOK_BYTES >> 20} MB: open the file")
    raw = ingest._read_bytes(path, preferred, [], None)
    if len(raw) > MAX_NOTEBOOK_BYTES:
        raise ValueError(f"larger than {MAX_NOTEBOOK_BYTES >> 20} MB: open the file")
    nb = ingest._as_v4(json.loads(raw.decode("utf-8-sig")), [])
    cells = nb.get("cells")
    if not isinstance(cells, list):
        raise ValueError("no list of cells")
    return [c for c in cells if isinstance(c, dict)]


def _src(cell: dict) -> str:
    s = cell.get("source", "")
    return "".join(x for x in s if isinstance(x, str)) if isinstance(s, list) else s if isinstance(s, str) else ""


def answer_cells(cells: list[dict], question: str) -> list[dict]:
    """The cells of one question: from the markdown cell headed ``Question <n>`` to the next
    heading of level 1 or 2 (the hand-out's layout); none found: every markdown cell."""
    n = re.sub(r"\D", "", question)
    head = re.compile(rf"^\s*#{{1,6}}\s*Question\s*{n}\b", re.I | re.M)
    start = next((i for i, c in enumerate(cells) if c.get("cell_type") == "markdown" and head.search(_src(c))), None)
    if start is None:
        return [c for c in cells if c.get("cell_type") == "markdown"]
    end = next((j for j in range(start + 1, len(cells)) if cells[j].get("cell_type") == "markdown"
                and re.search(r"^\s*#{1,2}\s", _src(cells[j]), re.M)), len(cells))
    return cells[start:end]


_B64 = re.compile(r"^[A-Za-z0-9+/=\s]*$")


def _text_of(value) -> str:
    return "".join(x for x in value if isinstance(x, str)) if isinstance(value, list) else value if isinstance(value, str) else ""


def _outputs_html(cell: dict) -> str:
    parts = []
    for o in cell.get("outputs") or []:
        if not isinstance(o, dict):
            continue
        data = o.get("data") if isinstance(o.get("data"), dict) else {}
        shown = False
        for mime in ("image/png", "image/jpeg"):
            b64 = _text_of(data.get(mime, ""))
            if b64 and _B64.match(b64) and len(b64) <= MAX_IMAGE_BYTES * 4 // 3 + 4:
                try:
                    base64.b64decode("".join(b64.split()), validate=True)
                except ValueError:
                    continue
                parts.append(f'<img alt="plot" src="data:{mime};base64,{"".join(b64.split())}">')
                shown = True
                break
        if shown:
            continue
        text = _text_of(o.get("text")) or _text_of(data.get("text/plain"))
        if o.get("output_type") == "error":
            text = f"{_text_of(o.get('ename'))}: {_text_of(o.get('evalue'))}"
        if text:
            text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)[:MAX_OUTPUT_CHARS]
            parts.append(f"<pre class=out>{html.escape(visible_multiline(text))}</pre>")
        elif data:
            parts.append(f"<p class=note>output not shown ({html.escape(', '.join(sorted(map(str, data)))[:100])})</p>")
    return "".join(parts)


def visible_multiline(text: str) -> str:
    return "\n".join(visible(line) for line in text.split("\n"))


def _cell_html(cell: dict, given: set[str]) -> str:
    kind = cell.get("cell_type")
    src = _src(cell)
    cls = "given" if src.strip() in given else "own"
    body = f"<pre class='{kind} {cls}'>{html.escape(visible_multiline(src))}</pre>"
    return body + (_outputs_html(cell) if kind == "code" else "")


def anonymous_key(out: Path, students: list[str]) -> dict[str, int]:
    """student -> number, kept in ``<out>/written/anonymous-key.csv`` (new students get new
    numbers, drawn at random among the unused ones; existing numbers never change)."""
    path = out / "written" / "anonymous-key.csv"
    key: dict[str, int] = {}
    if path.is_file():
        with open(path, newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                if r.get("number", "").isdigit():
                    key[r["student"]] = int(r["number"])
    new = [s for s in students if s not in key]
    if new:
        used = set(key.values())
        free = [n for n in range(1, len(key) + len(new) + 1 + len(used)) if n not in used][:len(new)]
        secrets.SystemRandom().shuffle(free)
        key.update(zip(new, free))
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["number", "student"])
        w.writerows(sorted(([n, s] for s, n in key.items())))
        atomic_write(path, buf.getvalue())
    return key


STYLE = ("body{font-family:sans-serif;max-width:60em;margin:auto}pre{white-space:pre-wrap;background:#f6f6f6;"
         "padding:.4em}pre.given{color:#777}pre.out{background:#fff;border-left:3px solid #ccc}"
         "section{border-top:2px solid #333;margin-top:2em}img{max-width:100%}.note{color:#a00}")


def rubric_html(question: str, rubric: list[dict], possible: float) -> str:
    items = "".join(f"<li><b>{html.escape(str(r.get('id', '')))}</b> ({float(r.get('points', 0)):g} pt): "
                    f"{html.escape(str(r.get('item', '')))}</li>" for r in rubric)
    return (f"<h2>Rubric for {html.escape(question)} ({possible:g} points)</h2>"
            + (f"<ul>{items}</ul>" if items else "<p>No rubric in the assignment source.</p>"))


def write_written_pages(out: Path, submissions: dict[str, Path], manual: dict[str, float],
                        rubric: dict[str, list[dict]], handout: dict | None, preferred: str) -> list[Path]:
    """``<out>/written/<q>.html`` and ``<q>-anonymous.html`` for every manual question. Never
    raises for what a submission holds (an unreadable one gets a line saying so)."""
    (out / "written").mkdir(exist_ok=True)
    given = {_src(c).strip() for c in (handout or {}).get("cells", []) if _src(c).strip()}
    students = sorted(submissions, key=natural_key)
    key = anonymous_key(out, students)
    cells: dict[str, list[dict] | str] = {}
    for s in students:
        try:
            cells[s] = _cells_of(submissions[s], preferred)
        except Exception as e:  # anything a submission holds: said on the page, never raised
            cells[s] = f"could not read this submission ({type(e).__name__}{': ' + str(e)[:80] if isinstance(e, ValueError) else ''})"
    written = []
    for q in sorted(manual, key=natural_key):
        for anonymous in (False, True):
            blocks = []
            order = sorted(students, key=lambda s: key[s]) if anonymous else students
            for s in order:
                title = f"Submission {key[s]}" if anonymous else visible(s)
                got = cells[s]
                body = (f"<p class=note>{html.escape(got)}</p>" if isinstance(got, str)
                        else "".join(_cell_html(c, given) for c in answer_cells(got, q)) or "<p class=note>no cells</p>")
                blocks.append(f"<section><h3>{html.escape(title)}</h3>{body}</section>")
            page = (f"<!doctype html><meta charset=utf-8><title>{html.escape(q)}: written answers</title>"
                    f"<style>{STYLE}</style><h1>{html.escape(q)}: written answers ({len(order)})</h1>"
                    + rubric_html(q, rubric.get(q, []), manual[q])
                    + "<p>Type the points in <code>manual.csv</code> (student, question, points, rubric_items, comment, "
                      "grader); grey cells are the hand-out's." + (" Numbers: <code>anonymous-key.csv</code>." if anonymous else "")
                    + "</p>" + "".join(blocks))
            path = out / "written" / f"{q}{'-anonymous' if anonymous else ''}.html"
            atomic_write(path, page)
            written.append(path)
    return written
