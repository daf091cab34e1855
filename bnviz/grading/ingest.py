"""Reading a folder of submissions on the trusted side: which files, which names, which code.

Conventions:

* ``list_folder``: every entry of the folder (not recursive) is either a submission (a regular file
  whose name ends in ``.ipynb`` or ``.zip``, in any case) or goes in the ``skipped`` list with the
  reason; nothing is silently left out. Symbolic links are never followed.
* ``student_names``: the file's stem, characters other than letters, digits, ``_ . -`` replaced by
  ``_``, never starting with ``-`` or ``.``, at most ``MAX_NAME_BYTES`` bytes of UTF-8 (cut at a
  character boundary, plus a short hash of the full name when cut), unique.
* ``read_submission``: a notebook (or the notebook found in a zip) is parsed as data. nbformat 3 is
  converted to 4; outputs and attachments are dropped before anything is measured; only the code
  counts against ``MAX_CODE_BYTES``. The one exception: the plain text a code cell printed
  (``stream`` and ``text/plain`` outputs, at most ``MAX_OUTPUT_CHARS`` per cell) is kept apart in
  ``Submission.outputs``, never run or scored, for the trusted side's seed check
  (``student_seeds.check_outputs``: were the experiments run with this student's seeds?); a
  missing ``execution_count`` or ``id`` is fine. IPython syntax
  is turned into Python here (``to_python``), so the code the rules scan is the code the sandbox runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import stat
import textwrap
import zipfile
from pathlib import Path, PurePosixPath

from .text import visible

MiB = 1 << 20
MAX_FILE_BYTES = 256 * MiB  # a notebook file (or the notebook inside a zip), outputs included
MAX_CODE_BYTES = 256 * 1024  # the code cells together (the solution with its tests: ~35 KB)
MAX_NAME_BYTES = 100
MAX_OUTPUT_CHARS = 20_000  # printed text kept per code cell (Submission.outputs), the start of it
EXTENSIONS = (".ipynb", ".zip")
BODY_MAGICS = ("time", "timeit", "capture", "prun")  # cell / line magics whose body is run as is
_TIMEIT_OPTS = r"(?:-[nr]\s*\d+\s+|-[qopt]\s+|-c\s+)*"
_PRUN_OPTS = r"(?:-[lsTD]\s+\S+\s+|-[rq]\s+)*"
_LINE_MAGIC = re.compile(r"^(?P<indent>[ \t]*)(?P<assign>[\w.\[\]()*][\w \t,.\[\]()*]*=[ \t]*)?%(?P<name>time|timeit|prun|capture)"
                         r"(?![\w%])[ \t]*(?P<rest>.*)$")


@dataclasses.dataclass
class Submission:
    cells: list[tuple[int, str]]  # (cell index, Python code), code cells only
    sources: list[tuple[str, str]]  # (cell_type, original source) of every cell, for the tamper notes
    otter_tests: bool  # the notebook's metadata carries its own tests
    notes: list[str]
    error: str | None = None  # nothing can be graded
    problems: list[str] = dataclasses.field(default_factory=list)  # cells not run, for the error column
    outputs: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # (cell index, printed text): never run


def printed_text(cell: dict) -> str:
    """What a code cell printed, as plain text: its ``stream`` outputs and the ``text/plain`` of its
    results and displays, in order, at most ``MAX_OUTPUT_CHARS`` characters (images and HTML are
    left out). Anything malformed is skipped, never raised."""
    parts, size = [], 0
    outputs = cell.get("outputs") if isinstance(cell, dict) else None
    for out in outputs if isinstance(outputs, list) else []:
        if not isinstance(out, dict):
            continue
        data = out.get("data")
        text = _text(out.get("text")) if out.get("output_type") == "stream" else (
            _text(data.get("text/plain")) if isinstance(data, dict) else None)
        if text:
            parts.append(text[:MAX_OUTPUT_CHARS - size])
            size += len(parts[-1])
            if size >= MAX_OUTPUT_CHARS:
                break
    return "".join(parts)


def _decoded(name: str) -> str:
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def printable(name: str) -> str:
    """A file name as text that can be written anywhere: undecodable bytes become U+FFFD, control
    and format characters (escape codes, bidi overrides) are written as ``\\x1b`` / ``\\u202e``."""
    return visible(_decoded(name))


def list_folder(folder: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """(submission files, [(entry name, why it is skipped)]), both sorted by name."""
    files, skipped = [], []
    for p in sorted(folder.iterdir(), key=lambda q: q.name):
        try:
            mode = p.lstat().st_mode
        except OSError as e:
            skipped.append((printable(p.name), f"unreadable ({type(e).__name__})"))
            continue
        if p.name.startswith("."):
            why = "a hidden file or folder (name starts with '.')"
        elif stat.S_ISLNK(mode):
            why = "a symbolic link (not followed)"
        elif stat.S_ISDIR(mode):
            why = "a folder (submissions are the files directly in the folder)"
        elif not stat.S_ISREG(mode):
            why = "not a regular file"
        elif p.suffix.lower() not in EXTENSIONS:
            why = "not a notebook (.ipynb) or a zip (.zip)"
        else:
            files.append(p)
            continue
        skipped.append((printable(p.name), why))
    return files, skipped


def _cap_utf8(text: str, limit: int) -> str:
    data = text.encode("utf-8")
    return text if len(data) <= limit else data[:limit].decode("utf-8", "ignore")


def student_names(files: list[Path]) -> dict[Path, str]:
    names: dict[Path, str] = {}
    used: set[str] = set()
    for p in files:
        stem = _decoded(p.name[:-len(p.suffix)] if p.suffix else p.name)
        name = re.sub(r"[^\w.-]", "_", stem)
        name = re.sub(r"^[-.]", "_", name) or "submission"
        if len(name.encode("utf-8")) > MAX_NAME_BYTES:
            digest = hashlib.sha1(stem.encode("utf-8")).hexdigest()[:8]
            name = _cap_utf8(name, MAX_NAME_BYTES - 9) + "~" + digest
        base, k = name, 1
        while name.lower() in used:  # unique even on a case-insensitive file system
            k += 1
            name = f"{_cap_utf8(base, MAX_NAME_BYTES - 6)}_{k}"
        used.add(name.lower())
        names[p] = name
    return names


# --------------------------------------------------------------------------- IPython syntax


def _strip_line_magic(line: str) -> str:
    m = _LINE_MAGIC.match(line) if "%" in line else None
    if not m:
        return line
    rest = m["rest"]
    if m["name"] == "timeit":
        rest = re.sub("^" + _TIMEIT_OPTS, "", rest + " ").rstrip()
    elif m["name"] == "prun":
        rest = re.sub("^" + _PRUN_OPTS, "", rest + " ").rstrip()
    elif m["name"] == "capture":
        rest = ""
    return f"{m['indent']}{m['assign'] or ''}{rest}" if rest or m["assign"] else f"{m['indent']}pass"


def _ipython_cleanup(source: str) -> str:
    """What IPython does to a cell before it looks for a cell magic (``TransformerManager``'s
    ``leading_empty_lines`` and ``leading_indent``): leading lines that are empty or only
    whitespace go, then the common indentation of all lines (so ``"  \\n  %%time"`` is a ``%%time``
    cell, as in Jupyter)."""
    lines = source.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line and not line.isspace():
            lines = lines[i:]
            break
    return textwrap.dedent("".join(lines))


def to_python(source: str) -> tuple[str, str | None]:
    """(Python code, why the cell is not run or None). ``%%time`` / ``%%timeit`` / ``%%capture`` /
    ``%%prun`` cells and ``%time`` / ``%timeit`` / ``%prun`` lines become their body (run once);
    another cell magic (``%%bash``, ``%%writefile``...) is not run, with the reason; the rest of
    IPython's syntax (``%matplotlib``, ``!pip``) goes through IPython's own transformer."""
    lines = _ipython_cleanup(source).split("\n")
    while lines and lines[0].startswith("%%"):
        magic = (lines[0][2:].split() or [""])[0]
        if magic not in BODY_MAGICS:
            shown = re.sub(r"[^\w.-]", "", magic)[:30]
            return "", (f"cell magic %%{shown} is not run by the grader (only "
                        + ", ".join("%%" + m for m in BODY_MAGICS) + " run their body)")
        head = lines[0][2 + len(magic):].strip()
        lines = lines[1:]
        if magic == "timeit":
            head = re.sub("^" + _TIMEIT_OPTS, "", head + " ").strip()
            if head:
                lines.insert(0, head)  # %%timeit's setup statement
    code = "\n".join(_strip_line_magic(ln) for ln in lines)
    try:
        from IPython.core.inputtransformer2 import TransformerManager

        code = TransformerManager().transform_cell(code)
    except Exception:  # IPython missing, or text it cannot transform: compiled (and reported) as is
        pass
    return code, None


# --------------------------------------------------------------------------- reading


def _untouched(raw: bytes, given: set[str]) -> bool:
    """Whether a notebook's code cells are all handed-out cells (the hand-out as downloaded)."""
    try:
        nb = _as_v4(json.loads(raw.decode("utf-8-sig")), [])
        code = [_text(c.get("source", "")) for c in nb["cells"] if c.get("cell_type") == "code"]
    except Exception:  # not a notebook we can read: not the hand-out either
        return False
    return bool(code) and all(isinstance(c, str) and (not c.strip() or c.strip() in given) for c in code)


MAX_ZIP_CANDIDATES = 8  # notebooks of one zip read to tell the worked copy from an untouched hand-out


def _from_zip(path: Path, preferred: str, notes: list[str], handed_out: list[str] | None = None) -> bytes:
    with zipfile.ZipFile(path) as zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        found = [i for i in infos if i.filename.lower().endswith(".ipynb")
                 and not any(part.startswith((".", "__MACOSX")) for part in PurePosixPath(i.filename).parts)]
        if any("tests" in PurePosixPath(i.filename).parts[:-1] for i in infos):
            notes.append("zip contains a tests/ folder (ignored; graded with the official tests)")
        if not found:
            raise ValueError("invalid submission zip: it holds no notebook (.ipynb)")
        found.sort(key=lambda i: (PurePosixPath(i.filename).name.lower() != preferred.lower(),
                                  i.filename.count("/"), i.filename))
        untouched: set[str] = set()
        given = {c.strip() for c in handed_out or [] if c.strip()}
        if len(found) > 1 and given:  # an untouched hand-out next to the worked copy: grade the worked one
            for info in found[:MAX_ZIP_CANDIDATES]:
                if info.file_size <= MAX_FILE_BYTES:
                    with zf.open(info) as f:
                        if _untouched(f.read(MAX_FILE_BYTES + 1), given):
                            untouched.add(info.filename)
            if len(untouched) < len(found):
                found.sort(key=lambda i: i.filename in untouched)  # stable: the order above otherwise
        chosen = found[0]
        if len(found) > 1:
            shown = ", ".join(printable(i.filename)[:60] for i in found[:5])
            why = (" (the others are the untouched hand-out)" if chosen.filename not in untouched and untouched
                   else " (the assignment's name)" if PurePosixPath(chosen.filename).name.lower() == preferred.lower()
                   else " (the least deep)")
            notes.append(f"zip holds {len(found)} notebooks ({shown}): graded {printable(chosen.filename)[:80]}{why}")
        if chosen.file_size > MAX_FILE_BYTES:
            raise ValueError(f"invalid submission: the notebook in the zip is larger than {MAX_FILE_BYTES // MiB} MB")
        with zf.open(chosen) as f:
            raw = f.read(MAX_FILE_BYTES + 1)
        if len(raw) > MAX_FILE_BYTES:
            raise ValueError(f"invalid submission: the notebook in the zip is larger than {MAX_FILE_BYTES // MiB} MB")
        return raw


def _read_bytes(path: Path, preferred: str, notes: list[str], handed_out: list[str] | None = None) -> bytes:
    if path.suffix.lower() == ".zip":
        return _from_zip(path, preferred, notes, handed_out)
    with open(path, "rb") as f:
        raw = f.read(MAX_FILE_BYTES + 1)
    if len(raw) > MAX_FILE_BYTES:
        raise ValueError(f"invalid submission: notebook file larger than {MAX_FILE_BYTES // MiB} MB")
    return raw


def _text(src) -> str | None:
    if isinstance(src, str):
        return src
    if isinstance(src, list) and all(isinstance(s, str) for s in src):
        return "".join(src)
    return None


def _as_v4(nb: dict, notes: list[str]) -> dict:
    """nbformat 3 (cells in ``worksheets``, code in ``input``) converted by nbformat itself."""
    if nb.get("nbformat") == 3 or ("worksheets" in nb and "cells" not in nb):
        import nbformat

        import nbformat.v4.convert

        for ws in nb.get("worksheets") or []:  # outputs first: they are never graded
            for cell in (ws.get("cells") or []) if isinstance(ws, dict) else []:
                if isinstance(cell, dict) and cell.get("cell_type") == "code":
                    cell["outputs"] = []
        try:
            nb = nbformat.convert(nbformat.from_dict(nb), 4)
        except Exception:  # it validates first; an honest notebook may lack a field: convert as is
            nb = nbformat.v4.convert.upgrade(nbformat.from_dict(nb), from_version=3, from_minor=0)
        notes.append("nbformat 3 notebook, converted to nbformat 4")
    return nb


def read_submission(path: Path, preferred: str = "batch_norm.ipynb", handed_out: list[str] | None = None) -> Submission:
    """Read one submission as data (never raises for anything the file contains). ``handed_out``:
    the student notebook's code cells; a zip's notebook that holds only those (the untouched
    hand-out) is graded only when the zip holds no other notebook."""
    notes: list[str] = []
    bad = lambda why: Submission([], [], False, notes, why)  # noqa: E731
    try:
        raw = _read_bytes(path, preferred, notes, handed_out)
    except ValueError as e:
        return bad(str(e))
    except (OSError, zipfile.BadZipFile, RuntimeError, NotImplementedError, EOFError) as e:
        return bad(f"unreadable submission: {type(e).__name__}")
    try:
        nb = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        return bad("invalid notebook: not UTF-8 text")
    except json.JSONDecodeError as e:
        return bad(f"invalid notebook: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})")
    except (RecursionError, ValueError) as e:
        return bad(f"invalid notebook: not valid JSON ({type(e).__name__})")
    del raw
    if not isinstance(nb, dict):
        return bad("invalid notebook: not a JSON object")
    try:
        nb = _as_v4(nb, notes)
    except Exception as e:  # nbformat raises several types
        return bad(f"invalid notebook: nbformat 3 conversion failed ({type(e).__name__})")
    cells = nb.get("cells")
    if not isinstance(cells, list):
        return bad("invalid notebook: no list of cells (is this a Jupyter notebook?)")
    sources: list[tuple[str, str]] = []
    outputs: list[tuple[int, str]] = []
    for i, cell in enumerate(cells):
        text = _text(cell.get("source", "")) if isinstance(cell, dict) else None
        if text is None or not isinstance(cell.get("cell_type"), str):
            return bad(f"invalid notebook: cell {i} has no cell_type or no text source")
        sources.append((cell["cell_type"], text))
        printed = printed_text(cell) if cell["cell_type"] == "code" else ""
        if printed:
            outputs.append((i, printed))
    meta = nb.get("metadata")
    otter = meta.get("otter") if isinstance(meta, dict) else None
    otter_tests = bool(otter.get("tests")) if isinstance(otter, dict) else False
    del nb, cells  # outputs and attachments go with it: only the code is measured and graded (the
    # printed text in `outputs` is never run or scored: the seed check reads it)
    code = [(i, s) for i, (kind, s) in enumerate(sources) if kind == "code"]
    size = sum(len(s.encode("utf-8", "surrogatepass")) for _, s in code)
    if size > MAX_CODE_BYTES:
        return bad(f"invalid submission: {size // 1024} KB of code (at most {MAX_CODE_BYTES // 1024} KB; "
                   "outputs do not count)")
    python, problems = [], []
    for i, s in code:
        text, problem = to_python(s)
        if problem:
            problems.append(f"cell {i} not run: {problem}")
        python.append((i, text))
    return Submission(python, sources, otter_tests, notes, None, problems, outputs)
