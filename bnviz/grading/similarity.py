"""Similarity flags: each submission's answer code against the public solution and every other one.

Two public texts are compared with every submission: the public solution's answer code, and the
reference forward pass and module of ``variants.py``, which a variant's visible tests show.

Trusted side, source text only (nothing is executed). For each submission:

1. its code cells are the ones grading read and ran (``ingest.read_submission``, passed in as
   ``codes``: one reader for both, all of the code; ``read_code`` only where none is given), and
   the template handed out is stripped:
   every line that also appears in the built student notebook's code cells (setup cell, check
   cells, signatures, docstrings, the q4 experiment), comment lines and blank lines;
2. ``copydetect`` (winnowing fingerprints, as MOSS does) tokenises what is left with pygments and
   replaces names by placeholders, so renaming variables does not hide a copy; fingerprints of the
   template are discarded as boilerplate;
3. a pair's score is the larger of the two shares of copied code (``compare_files``: the tokens
   in shared fingerprints over each file's tokens), so padding a copy with extra code lowers only
   the padder's share; a pair is flagged when the score reaches ``THRESHOLD`` and at least
   ``MIN_OVERLAP`` filtered characters are shared: both students when each holds most of the
   other's answer, only the one that holds the other's when it is one way (``_flags``), so one
   large submission cannot get its classmates flagged. A student that could not be compared is
   flagged too.

``THRESHOLD`` (0.5) was tuned on planted data (``tests/test_grading_variants.py``): two honest
solutions written independently of the public one score 0.16-0.27 against it and 0.04-0.16
against each other; a copy of the public solution with its variables renamed scores 0.94-0.99, a
renamed copy of another student's 0.99, the public solution adapted to a variant (the
variant's answer key) 0.69; the honest ones score 0.04-0.09 against the tests' reference, a
renamed copy of it 1.00.

``flag_results`` is what ``grade.grade_folder`` calls: the comparison runs in a child process with
a time and memory limit, the flags go into each student's ``flags``, and ``similarity.html`` (the
pairs, scores and the code side by side, every byte of student text HTML-escaped) is written next
to the gradebook. It never raises: a failure becomes a note and the grades are kept.
"""

from __future__ import annotations

import dataclasses
import html
import io
import itertools
import json
import os
import re
import resource
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

THRESHOLD = 0.5
MIN_OVERLAP = 60  # filtered characters shared, so that two tiny answers are never a "copy"
NOISE_T, GUARANTEE_T = 25, 30  # copydetect's defaults: k-grams of 25 filtered characters, window 6
MAX_FILE = 64 * 1024 * 1024  # read_code only (grading passes the cells ingest read; they are capped there)
PUBLIC = "the public solution"
TESTS_REF = "the tests' reference"  # variants.batch_norm_reference / ReferenceBatchNorm, shown in the visible tests
MAX_FLAGS = 3  # similarity flags per student in the gradebook; similarity.html lists every pair
TIMEOUT_S, MEMORY = 300.0, 4 << 30
# written answers (markdown, manual questions): shingles of WORDS_K words; tuned on planted answers
# (tests/test_similarity_written.py, which prints the scores)
WORDS_K = 4
WRITTEN_THRESHOLD = 0.5
MODEL = "the public model answer"


@dataclasses.dataclass
class Pair:
    a: str
    b: str
    score: float  # max(share_a, share_b)
    share_a: float  # share of a's tokens found in b
    share_b: float
    overlap: int  # filtered characters in shared fingerprints
    slices_a: list  # [[start, end], ...] copied stretches of a's (stripped) code
    slices_b: list

    def flagged(self, threshold: float) -> bool:
        return self.score >= threshold and self.overlap >= MIN_OVERLAP


# --------------------------------------------------------------------------- reading


def _cells_code(nb: Any) -> str:
    """The code cells of a notebook dict (nbformat 4, or v3's worksheets), joined."""
    if not isinstance(nb, dict):
        return ""
    cells = nb.get("cells")
    if cells is None and isinstance(nb.get("worksheets"), list) and nb["worksheets"]:
        cells = (nb["worksheets"][0] or {}).get("cells")
    out = []
    for cell in cells if isinstance(cells, list) else []:
        if isinstance(cell, dict) and cell.get("cell_type") == "code":
            src = cell.get("source", cell.get("input", ""))
            out.append("".join(s for s in src if isinstance(s, str)) if isinstance(src, list) else str(src))
    return "\n".join(out)


def answer_code(nb: Any) -> str:
    """The code cells of a solution source notebook without its test cells (otter's
    ``# BEGIN TEST CONFIG`` cells): the answer code a student could copy."""
    if not isinstance(nb, dict):
        return ""
    cells = [c for c in nb.get("cells") or [] if isinstance(c, dict)]
    keep = [c for c in cells if not _cells_code({"cells": [c]}).startswith('""" # BEGIN TEST CONFIG')]
    return _cells_code({"cells": keep})


def read_code(path: Path) -> str:
    """The code cells of a submission (.ipynb, or a zip with one notebook anywhere in it)."""
    return _cells_code(read_notebook(path))


def read_notebook(path: Path) -> Any:
    """A submission's notebook as data (.ipynb, or a zip with one notebook anywhere in it; {} when
    there is none or it is too large)."""
    path = Path(path)
    if path.suffix.lower() == ".zip":
        with zipfile.ZipFile(path) as zf:
            nbs = [i for i in zf.infolist() if i.filename.lower().endswith(".ipynb")
                   and "__MACOSX" not in i.filename and "checkpoint" not in i.filename]
            if len(nbs) != 1 or nbs[0].file_size > MAX_FILE:
                return {}
            raw = zf.read(nbs[0])
    else:
        if path.stat().st_size > MAX_FILE:
            return {}
        raw = path.read_bytes()
    return json.loads(raw.decode("utf-8-sig", errors="replace"))


_TRIPLE = re.compile(r'(?s)""".*?"""|\'\'\'.*?\'\'\'')


def strip_template(code: str, template: str) -> str:
    """``code`` without triple-quoted strings (docstrings: removing a template's closing quotes
    alone would turn the rest into one string), the lines handed out in ``template``, comment
    lines and blank lines."""
    given = {ln.strip() for ln in _TRIPLE.sub("", template).splitlines()}
    kept = [ln for ln in _TRIPLE.sub("", code).splitlines()
            if ln.strip() and not ln.strip().startswith("#") and ln.strip() not in given]
    return "\n".join(kept)  # all of it: ingest caps the code of a notebook (256 KB)


# --------------------------------------------------------------------------- comparing


def _fingerprint(code: str, boilerplate=None):
    from copydetect import CodeFingerprint

    return CodeFingerprint("answer.py", NOISE_T, GUARANTEE_T - NOISE_T + 1, boilerplate=boilerplate,
                           fp=io.StringIO(code))


def compare(codes: dict[str, str], template: str = "") -> list[Pair]:
    """Every pair of ``codes`` (already stripped), highest score first."""
    import logging

    import numpy as np
    from copydetect import compare_files

    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))  # copydetect warns on empty code
    boiler = np.array(sorted(_fingerprint(template).hashes)) if template.strip() else None
    fps = {name: _fingerprint(code, boiler) for name, code in codes.items() if len(code) > NOISE_T}
    pairs = []
    for a, b in itertools.combinations(sorted(fps), 2):
        overlap, (sa, sb), (sla, slb) = compare_files(fps[a], fps[b])
        slices = [[[int(s), int(e)] for s, e in zip(*sl)] if np.ndim(sl) == 2 else [] for sl in (sla, slb)]
        pairs.append(Pair(a, b, float(max(sa, sb)), float(sa), float(sb), int(overlap), *slices))
    return sorted(pairs, key=lambda p: (-p.score, p.a, p.b))


def flag_pairs(sources: dict[str, str], public: str, threshold: float = THRESHOLD,
               template: str = "") -> dict[str, list[str]]:
    """Student -> reasons, for every student whose answer code (template stripped) scores at least
    ``threshold`` against the public solution's or another student's. Both students of a pair get
    a flag. Students with no flag are absent."""
    _check_args(sources, public, threshold)
    return _flags(_pairs(sources, _publics(public), template), threshold)


def _check_args(sources: Any, public: Any, threshold: Any) -> None:
    if not isinstance(sources, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in sources.items()):
        raise TypeError("sources must be a dict of student name -> answer code (str)")
    if {PUBLIC, TESTS_REF} & set(sources):
        raise ValueError(f"{PUBLIC!r} and {TESTS_REF!r} are reserved names; rename that student")
    if not isinstance(public, str):
        raise TypeError(f"public must be the public solution's code (str), got {type(public).__name__}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}")


def reference_code() -> str:
    """The reference forward pass and module of ``variants.py``: a variant's visible tests show
    it to students, so copying it into an answer is flagged like copying the public solution."""
    import inspect

    from . import variants

    return inspect.getsource(variants.batch_norm_reference) + "\n\n" + inspect.getsource(variants.ReferenceBatchNorm)


def _publics(public: str) -> dict[str, str]:
    return {PUBLIC: public, TESTS_REF: reference_code()}


def _pairs(sources: dict[str, str], publics: dict[str, str], template: str) -> list[Pair]:
    """Every pair among the students and the public texts (no pair of two public texts)."""
    codes = {name: strip_template(code, template) for name, code in sources.items()}
    codes.update({name: strip_template(code, template) for name, code in publics.items() if code.strip()})
    return [p for p in compare(codes, template) if not (p.a in publics and p.b in publics)]


def _flags(pairs: list[Pair], threshold: float, unread: dict[str, str] | None = None,
           publics: tuple[str, ...] = (PUBLIC, TESTS_REF), where: str = "") -> dict[str, list[str]]:
    """Student -> reasons. A pair of students is flagged both ways when each holds most of the
    other's answer (containment both ways: the smaller share reaches ``threshold``); when only
    one holds most of the other's (the larger share reaches it), only that one is flagged (one
    way), so a submission that carries every public snippet cannot get its honest classmates
    flagged, and a copy padded with other code is still caught. Against a public text, the student
    is flagged whichever way. Students that could not be compared are flagged too."""
    flags: dict[str, list[str]] = {}
    for me, why in (unread or {}).items():
        flags.setdefault(me, []).append(f"similarity: not compared ({why}), check by hand")
    for p in pairs:
        if not p.flagged(threshold):
            continue
        both = min(p.share_a, p.share_b) >= threshold or p.a in publics or p.b in publics
        for me, other, mine in ((p.a, p.b, p.share_a), (p.b, p.a, p.share_b)):
            if me in publics:
                continue
            if both:
                flags.setdefault(me, []).append(f"similar to {other}{where} (score {p.score:.2f}, check by hand)")
            elif mine < threshold:  # little of mine is in the other, most of the other is in mine
                flags.setdefault(me, []).append(f"similar to {other}{where}, one way: holds most of its "
                                                f"{'answer code' if not where else 'answer'} (score {p.score:.2f}, check by hand)")
    for me, reasons in flags.items():  # highest scores first (pairs are sorted); the rest in the report
        if len(reasons) > MAX_FLAGS:
            flags[me] = reasons[:MAX_FLAGS] + [f"similar to {len(reasons) - MAX_FLAGS} more (similarity.html)"]
    return flags


# --------------------------------------------------------------------------- written answers
# The markdown answers of the hand-graded questions: word shingles (no pygments: prose), with the
# question's own text (the hand-out's markdown) discarded as boilerplate, compared with every other
# student's answer and with the public model answer (the source notebook's solution text).


def _cells(nb: Any) -> list[dict]:
    if not isinstance(nb, dict):
        return []
    cells = nb.get("cells")
    if cells is None and isinstance(nb.get("worksheets"), list) and nb["worksheets"]:
        cells = (nb["worksheets"][0] or {}).get("cells")
    return [c for c in cells if isinstance(c, dict)] if isinstance(cells, list) else []


def _text(cell: dict) -> str:
    src = cell.get("source", cell.get("input", ""))
    return "".join(s for s in src if isinstance(s, str)) if isinstance(src, list) else str(src or "")


def _region(cells: list[dict], question: str) -> list[dict]:
    """The cells of one question (``manual.answer_cells``' rule): from the markdown cell headed
    ``Question <n>`` to the next heading of level 1 or 2; none found: no cells."""
    n = re.sub(r"\D", "", question)
    head = re.compile(rf"^\s*#{{1,6}}\s*Question\s*{n}\b", re.I | re.M)
    start = next((i for i, c in enumerate(cells) if c.get("cell_type") == "markdown" and head.search(_text(c))), None)
    if start is None:
        return []
    end = next((j for j in range(start + 1, len(cells)) if cells[j].get("cell_type") == "markdown"
                and re.search(r"^\s*#{1,2}\s", _text(cells[j]), re.M)), len(cells))
    return cells[start:end]


def written_answer(nb: Any, question: str, handout: str = "") -> str:
    """A submission's written answer to ``question``: the markdown cells of its region that are not
    hand-out cells (the question text, the "type your answer here" placeholder)."""
    given = {_text(c).strip() for c in _cells(json.loads(handout))} if handout else set()
    return "\n\n".join(_text(c) for c in _region(_cells(nb), question)
                       if c.get("cell_type") == "markdown" and _text(c).strip() not in given)


def model_answer(nb: Any, question: str) -> str:
    """The public model answer to ``question``: in the source notebook (otter's assign format) the
    markdown between the question's ``# BEGIN SOLUTION`` and ``# END SOLUTION`` raw cells; in
    otter's autograder notebook the cells tagged ``otter_assign_solution_cell``."""
    cells, out, inside, solution = _cells(nb), [], False, False
    for c in cells:
        text = _text(c)
        if c.get("cell_type") == "raw" and re.match(r"#\s*BEGIN\s+QUESTION", text, re.I):
            inside = bool(re.search(rf"^name:\s*{re.escape(question)}\s*$", text, re.M))
        elif c.get("cell_type") == "raw" and re.match(r"#\s*(BEGIN|END)\s+SOLUTION", text, re.I):
            solution = "BEGIN" in text.upper()
        elif c.get("cell_type") == "markdown" and inside and solution:
            out.append(text)
    if not out:  # the autograder notebook
        out = [_text(c) for c in _region(cells, question) if c.get("cell_type") == "markdown"
               and "otter_assign_solution_cell" in ((c.get("metadata") or {}).get("tags") or [])]
    return "\n\n".join(out)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _shingles(words: list[str]) -> set[tuple]:
    return {tuple(words[i:i + WORDS_K]) for i in range(len(words) - WORDS_K + 1)}


def compare_written(answers: dict[str, str], boilerplate: str = "") -> list[Pair]:
    """Every pair of ``answers`` (name -> text): the share of each one's word ``WORDS_K``-grams
    (shingles; the boilerplate's discarded) found in the other; ``overlap`` counts the characters
    of the words those shared shingles cover in the shorter answer. Highest score first."""
    boiler = _shingles(_words(boilerplate))
    words = {n: _words(t) for n, t in answers.items()}
    sets = {n: _shingles(w) - boiler for n, w in words.items()}
    pairs = []
    for a, b in itertools.combinations(sorted(n for n in sets if sets[n]), 2):
        shared = sets[a] & sets[b]
        if not shared:
            continue
        short = a if len(sets[a]) <= len(sets[b]) else b
        covered = {i + j for i in range(len(words[short]) - WORDS_K + 1)
                   if tuple(words[short][i:i + WORDS_K]) in shared for j in range(WORDS_K)}
        pairs.append(Pair(a, b, max(len(shared) / len(sets[a]), len(shared) / len(sets[b])), len(shared) / len(sets[a]),
                          len(shared) / len(sets[b]), sum(len(words[short][i]) + 1 for i in covered), [], []))
    return sorted(pairs, key=lambda p: (-p.score, p.a, p.b))


def flag_written(answers: dict[str, dict[str, str]], models: dict[str, str], boilerplate: str = "",
                 threshold: float = WRITTEN_THRESHOLD) -> tuple[dict[str, list[str]], list[Pair]]:
    """(student -> reasons, every pair) for the written answers: ``answers`` is question ->
    {student: text}, ``models`` question -> the public model answer."""
    flags: dict[str, list[str]] = {}
    every = []
    for q in sorted(answers):
        texts = {n: t for n, t in answers[q].items() if t.strip()}
        if models.get(q, "").strip():
            texts[MODEL] = models[q]
        pairs = compare_written(texts, boilerplate)
        every += [dataclasses.replace(p, a=f"{p.a} ({q})", b=f"{p.b} ({q})") for p in pairs]
        for me, reasons in _flags(pairs, threshold, publics=(MODEL,), where=f" in the written answer to {q}").items():
            flags.setdefault(me, []).extend(reasons)
    return flags, every


# --------------------------------------------------------------------------- the report


def _marked(code: str, slices: list) -> str:
    """HTML-escaped code with the copied stretches in <mark>."""
    out, pos = [], 0
    for start, end in sorted(slices):
        start, end = max(start, pos), min(end, len(code))
        if start >= end:
            continue
        out += [html.escape(code[pos:start]), "<mark>", html.escape(code[start:end]), "</mark>"]
        pos = end
    out.append(html.escape(code[pos:]))
    return "".join(out)


def write_report(path: str | os.PathLike, pairs: list[Pair], codes: dict[str, str], threshold: float = THRESHOLD,
                 note: str = "", shown: int = 10, written: tuple[list[Pair], dict[str, str]] | None = None) -> None:
    """``similarity.html``: every flagged pair, then the ``shown`` highest-scoring others, each with
    both answers side by side (copied stretches highlighted). All student text is escaped."""
    esc = html.escape
    flagged = [p for p in pairs if p.flagged(threshold)]
    rest = [p for p in pairs if not p.flagged(threshold)][:shown]
    parts = ["<!doctype html><meta charset='utf-8'><title>Similarity report</title>",
             "<style>body{font-family:sans-serif} pre{white-space:pre-wrap;font-size:12px;background:#f6f6f6;"
             "padding:6px} td{vertical-align:top;width:50%} mark{background:#fd7} .flag{color:#b00}</style>",
             "<h1>Similarity of the answer code</h1>",
             f"<p>copydetect winnowing (k={NOISE_T}, window {GUARANTEE_T - NOISE_T + 1}) on the code cells, "
             f"with the handed-out template, comments and blank lines removed and names normalised. "
             f"Score = the larger share of either answer found in the other; two students are both flagged "
             f"when each holds most of the other's answer, only the one that holds the other's when it is one way. Flagged: score &ge; {threshold:g} "
             f"and at least {MIN_OVERLAP} shared characters. {len(pairs)} pairs compared, {len(flagged)} flagged. "
             "A flag is a reason to look, not a verdict.</p>"]
    if note:
        parts.append(f"<p class='flag'>{esc(note)}</p>")
    for title, group in (("Flagged pairs", flagged), ("Highest-scoring pairs not flagged", rest)):
        parts.append(f"<h2>{title}</h2>" + ("" if group else "<p>none</p>"))
        for p in group:
            parts.append(f"<h3>{esc(p.a)} &harr; {esc(p.b)}: score {p.score:.2f} "
                         f"(shares {p.share_a:.2f} / {p.share_b:.2f}, {p.overlap} characters)</h3>"
                         f"<table><tr><th>{esc(p.a)}</th><th>{esc(p.b)}</th></tr><tr>"
                         f"<td><pre>{_marked(codes.get(p.a, ''), p.slices_a)}</pre></td>"
                         f"<td><pre>{_marked(codes.get(p.b, ''), p.slices_b)}</pre></td></tr></table>")
    wpairs, texts = written or ([], {})
    parts.append(f"<h2>Written answers (word {WORDS_K}-grams, the question's text removed; flagged: score &ge; "
                 f"{WRITTEN_THRESHOLD:g})</h2>" + ("" if wpairs else "<p>none flagged</p>"))
    for p in wpairs:
        parts.append(f"<h3>{esc(p.a)} &harr; {esc(p.b)}: score {p.score:.2f} (shares {p.share_a:.2f} / {p.share_b:.2f})</h3>"
                     f"<table><tr><td><pre>{esc(texts.get(p.a, ''))}</pre></td><td><pre>{esc(texts.get(p.b, ''))}</pre></td>"
                     "</tr></table>")
    Path(path).write_text("\n".join(parts), encoding="utf-8")


# --------------------------------------------------------------------------- grading hook


def _limit_child() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))
    os.nice(5)


def run_isolated(paths: dict[str, str], publics: dict[str, str], template: str,
                 timeout_s: float = TIMEOUT_S, codes: dict[str, str | None] | None = None,
                 written: dict | None = None) -> tuple[list[Pair], dict[str, str], dict[str, str], dict]:
    """Strip and compare the submissions in a child process with a time and memory limit
    (pygments on hostile code): (pairs, stripped codes, not compared: name -> why).
    ``codes``: student -> the code of the cells grading read (``ingest``), or None where it could
    not read the notebook; students not in ``codes`` are read from ``paths`` (``read_code``).
    ``written``: {questions, models, handout} for the written answers (``_written_request``); the
    4th value is then {flags: student -> reasons, pairs: [Pair]} (empty without)."""
    # this file run as a script (-I: isolated), so the child imports neither bnviz nor torch
    proc = subprocess.run([sys.executable, "-I", os.path.abspath(__file__)], preexec_fn=_limit_child,
                          input=json.dumps({"paths": paths, "publics": publics, "template": template,
                                            "codes": codes or {}, "written": written or {}}),
                          capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"comparison process failed (exit status {proc.returncode}): {proc.stderr[-300:]}")
    reply = json.loads(proc.stdout)
    got = reply.get("written") or {}
    return ([Pair(**p) for p in reply["pairs"]], reply["codes"], reply["unread"],
            {"flags": got.get("flags") or {}, "pairs": [Pair(**p) for p in got.get("pairs") or []], "texts": got.get("texts") or {}})


def _written_request(nb_path: Path | None) -> dict:
    """The hand-graded questions (``assignment.json`` of the build), their public model answers (the
    build's autograder notebook, else the checkout's source notebook) and the hand-out notebook
    (its markdown is boilerplate). {} when there is no build to read them from."""
    if nb_path is None:
        return {}
    dist = Path(nb_path).resolve().parent.parent
    manifest = json.loads((dist / "assignment.json").read_text(encoding="utf-8")) if (dist / "assignment.json").is_file() else {}
    questions = sorted(q for q, c in (manifest.get("questions") or {}).items() if isinstance(c, dict) and c.get("manual"))
    if not questions:
        return {}
    solution = dist / "autograder" / Path(nb_path).name
    if solution.is_file():
        key = json.loads(solution.read_text(encoding="utf-8"))
    else:
        from .layout import default_source

        key = json.loads(default_source().read_text(encoding="utf-8"))
    return {"questions": questions, "models": {q: model_answer(key, q) for q in questions},
            "handout": Path(nb_path).read_text(encoding="utf-8")}


def _public_code(student_notebook: Path | None) -> str:
    """The public solution's code: ``public_answers.py`` of the build, else the checkout's notebook."""
    if student_notebook is not None:
        built = Path(student_notebook).resolve().parent.parent / "public_answers.py"
        if built.is_file():
            return built.read_text(encoding="utf-8")
    from .layout import default_source  # here: this file also runs as a script (run_isolated)

    return answer_code(json.loads(default_source().read_text(encoding="utf-8")))


def _apply(results: list[dict], flags: dict[str, list[str]], note: str) -> list[dict]:
    """Put this run's similarity flags (and note) into the results, replacing a previous run's
    (a resumed grading run keeps results); return the results that changed."""
    changed = []
    for r in results:
        kept = [f for f in str(r.get("flags") or "").split("; ") if f and not f.startswith(("similar to ", "similarity: "))]
        flags_ = "; ".join(kept + flags.get(r["student"], []))
        notes = [n for n in r.get("notes") or [] if not str(n).startswith("similarity")] + ([note] if note else [])
        if flags_ != (r.get("flags") or "") or notes != (r.get("notes") or []):
            r["flags"], r["notes"] = flags_, notes
            changed.append(r)
    return changed


def flag_results(results: list[dict], submissions_dir: str | os.PathLike, out_dir: str | os.PathLike,
                 student_notebook: str | os.PathLike | None = None, threshold: float = THRESHOLD,
                 row=None, log=print, paths: dict[str, str] | None = None,
                 codes: dict[str, str | None] | None = None) -> str:
    """Add similarity flags to ``results`` (their ``flags``; ``row(result)`` rebuilds a gradebook
    row, and each changed ``<out>/<student>.json`` is rewritten) and write
    ``<out>/similarity.html``. ``codes``: student -> the code grading read (all of its cells, as
    ``ingest`` read them; None: not readable), so that grading and similarity compare exactly
    the same code; students without one are read from ``paths`` (student -> file; default:
    ``submission`` in ``submissions_dir``). A student whose code could not be compared gets a
    flag saying so. Never raises: a failure becomes the returned note, which is also logged, put
    in every student's ``notes`` and flags, and in the report ("" when all went well)."""
    note, out = "", Path(out_dir)
    try:
        nb_path = Path(student_notebook) if student_notebook else None
        template = _cells_code(json.loads(nb_path.read_text(encoding="utf-8"))) if nb_path else ""
        if paths is None:  # the file of each student (the names shown in ``submission`` may be escaped)
            paths = {r["student"]: str(Path(submissions_dir) / r["submission"]) for r in results}
        pairs, stripped, unread, written = run_isolated(paths, _publics(_public_code(nb_path)), template, codes=codes,
                                                        written=_written_request(nb_path))
        flags = _flags(pairs, threshold, unread)
        for student, reasons in written["flags"].items():
            flags.setdefault(student, []).extend(reasons)
        write_report(out / "similarity.html", pairs, stripped, threshold,
                     "not compared: " + ", ".join(f"{n} ({w})" for n, w in unread.items())[:2000] if unread else "",
                     written=(written["pairs"], written["texts"]))
    except Exception as e:  # never lose the grades for this
        note = f"similarity check failed, no similarity flags: {type(e).__name__}: {str(e)[:200]}"
        flags = {r["student"]: ["similarity: not compared (the comparison failed, see notes), check by hand"]
                 for r in results}
        try:
            write_report(out / "similarity.html", [], {}, threshold, note)
        except Exception:
            pass
    if note:
        log(note)
    for r in _apply(results, flags, note):
        try:
            if row is not None:
                r["row"] = row(r)
            tmp = out / f".{r['student']}.json.similarity.tmp"
            tmp.write_text(json.dumps(dict(r), indent=2), encoding="utf-8")  # a Result or a stored dict
            os.replace(tmp, out / f"{r['student']}.json")
        except Exception:  # the gradebook still carries the flag
            pass
    return note


def _written_main(paths: dict[str, str], req: dict) -> dict:
    """The child's written-answer comparison: {flags, pairs, texts} (texts: "student (q)" -> answer)."""
    if not req.get("questions"):
        return {}
    answers: dict[str, dict[str, str]] = {q: {} for q in req["questions"]}
    for name, path in paths.items():
        try:
            nb = read_notebook(Path(path))
        except Exception:  # unreadable: listed with the code comparison's "not compared"
            continue
        for q in req["questions"]:
            answers[q][name] = written_answer(nb, q, req.get("handout", ""))
    boiler = "\n".join(_text(c) for c in _cells(json.loads(req["handout"])) if c.get("cell_type") == "markdown") \
        if req.get("handout") else ""
    flags, pairs = flag_written(answers, req.get("models") or {}, boiler)
    texts = {f"{n} ({q})": t for q, by in answers.items() for n, t in by.items()}
    texts.update({f"{MODEL} ({q})": t for q, t in (req.get("models") or {}).items()})
    return {"flags": flags, "pairs": [dataclasses.asdict(p) for p in pairs if p.flagged(WRITTEN_THRESHOLD)], "texts": texts}


def main() -> int:
    """Child process: JSON {paths, publics, template, codes} on stdin -> JSON {pairs, codes
    (stripped), unread (name -> why)} on stdout."""
    request = json.loads(sys.stdin.read())
    sources, unread = {}, {}
    given = request.get("codes") or {}
    for name, path in request["paths"].items():
        if name in given:
            if given[name] is None:
                unread[name] = "grading could not read the notebook"
            else:
                sources[name] = given[name]
            continue
        try:
            sources[name] = read_code(Path(path))
        except Exception as e:  # graded (0) with its error elsewhere; flagged and listed in the report
            unread[name] = f"unreadable: {type(e).__name__}"
    template, publics = request["template"], request["publics"]
    pairs = _pairs(sources, publics, template)
    codes = {name: strip_template(code, template) for name, code in sources.items()}
    codes.update({name: strip_template(code, template) for name, code in publics.items()})
    sys.stdout.write(json.dumps({"pairs": [dataclasses.asdict(p) for p in pairs], "codes": codes, "unread": unread,
                                 "written": _written_main(request["paths"], request.get("written") or {})}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
