"""Grading throughput: N honest submissions graded by ``python -m bnviz.grading grade``.

Builds the assignment (not timed), writes N copies of the solution notebook (each with its own
comment line, so no two files are identical), grades the folder with ``--jobs`` workers through
the command line (exactly what ``make grade`` runs) and prints, as its last line::

    submissions/min: X

It also checks that every submission got full marks (a faster grader that grades wrongly does not
count). ``--pythonpath`` grades with another copy of the ``bnviz`` package, e.g. the code before a
change (``git archive HEAD bnviz | tar -x -C /tmp/bnviz-old``), so before/after runs use the same
script. ``--baseline DIR`` measures both in the same run, alternating (baseline, code, baseline,
code ... ``--rounds`` times, on the same submissions and the same built assignment) and ends with
``ratio code/baseline: X`` (the sandbox hardening of issue 17 must keep it >= 0.8). Each line
says the load average it was measured under. Extra arguments after ``--`` go to ``grade`` (e.g.
``-- --no-sandbox``).

``--assignment norms batch_norm`` measures several assignments (each built from
``notebooks/assignments/<name>/<name>.ipynb``, its answer key copied N times), alternating in the
same run (``--rounds`` times), and ends with each one's seconds per submission and
``ratio <first>/<second> (s per submission): X``.

    .venv/bin/python benchmarks/grading_speed.py [--n 40] [--jobs 2] [--pythonpath DIR]
                                                [--baseline DIR [--rounds 2]] [--assignment NAME ...] [-- ...]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def source_of(name: str) -> Path:
    return REPO / "notebooks" / "assignments" / name / f"{name}.ipynb"


def _run(cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def make_submissions(solution: Path, folder: Path, n: int) -> None:
    nb = json.loads(solution.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        copy = json.loads(json.dumps(nb))
        copy["cells"].append({"cell_type": "code", "execution_count": None, "metadata": {},
                              "outputs": [], "source": f"# submission {i}\n"})
        (folder / f"student{i:03d}.ipynb").write_text(json.dumps(copy))


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _full_marks(record: Path) -> bool:
    """Every automatically graded question at its maximum (the gradebook's ``possible`` also counts
    the hand-graded q4, which nobody has graded here)."""
    r = json.loads(record.read_text())
    return r["total"] == r["possible_total"] and all(r["scores"][q] == r["possible"][q] for q in r["possible"])


def grade_once(code: str, work: Path, name: str, args, extra: list[str]) -> float | None:
    """Grade assignment ``name``'s submissions with the ``bnviz`` at ``code``; submissions/min, or
    None if any honest submission lost points."""
    env = dict(os.environ, PYTHONPATH=str(Path(code).resolve()))
    grades = work / f"grades-{time.monotonic_ns()}"
    print(f"grading {args.n} honest submissions of {name}, jobs={args.jobs}, cpus={os.cpu_count()}, "
          f"load average before: {_load()}, code: {code}", flush=True)
    t0 = time.perf_counter()
    _run([sys.executable, "-m", "bnviz.grading", "grade", str(work / f"subs-{name}"), "--dist", str(work / f"dist-{name}"),
          "--out", str(grades),
          "--jobs", str(args.jobs), "--timeout", str(args.timeout), *extra], env, work)
    seconds = time.perf_counter() - t0
    with open(grades / "gradebook.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    wrong = [r["student"] for r in rows if r["error"] or not _full_marks(grades / f"{r['student']}.json")]
    print(f"{len(rows)} graded in {seconds:.1f} s ({seconds / max(1, len(rows)):.2f} s each), "
          f"not full marks: {len(wrong)} {wrong[:5]}; load average after: {_load()}", flush=True)
    if wrong or len(rows) != args.n:
        return None
    return 60.0 * len(rows) / seconds


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=40, help="number of submissions")
    p.add_argument("--jobs", type=int, default=int(os.environ.get("GRADE_JOBS", 2)))
    p.add_argument("--timeout", type=float, default=600.0, help="per-submission limit (s)")
    p.add_argument("--pythonpath", default=str(REPO), help="where `bnviz` is imported from")
    p.add_argument("--baseline", default=None, help="another `bnviz` copy, measured in the same run")
    p.add_argument("--rounds", type=int, default=2, help="with --baseline: alternations")
    p.add_argument("--source", default=None, help="the solution notebook (one --assignment only)")
    p.add_argument("--assignment", nargs="+", default=["batch_norm"], help="which assignments (alternated)")
    p.add_argument("--workdir", default=None, help="keep the files here (default: a temp folder)")
    args = p.parse_args(argv)
    if args.source and len(args.assignment) > 1:
        p.error("--source goes with one --assignment")
    env = dict(os.environ, PYTHONPATH=str(Path(args.pythonpath).resolve()))
    with tempfile.TemporaryDirectory(prefix="bnviz-gradebench-") as tmp:
        work = Path(args.workdir or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        for name in args.assignment:
            source = Path(args.source) if args.source else source_of(name)
            dist = work / f"dist-{name}"
            _run([sys.executable, "-m", "bnviz.grading", "build", "--source", str(source), "--out", str(dist)], env, work)
            make_submissions(dist / "autograder" / source.name, work / f"subs-{name}", args.n)
        codes = [args.baseline, args.pythonpath] if args.baseline else [args.pythonpath]
        rounds = args.rounds if args.baseline or len(args.assignment) > 1 else 1
        rates: dict[tuple[str, str], list[float]] = {}
        for _ in range(rounds):
            for name in args.assignment:
                for code in codes:
                    rate = grade_once(code, work, name, args, extra)
                    if rate is None:
                        print("ERROR: some honest submissions did not get full marks", file=sys.stderr)
                        return 1
                    rates.setdefault((code, name), []).append(rate)
                    print(f"submissions/min: {rate:.1f}", flush=True)
    mean = {k: sum(v) / len(v) for k, v in rates.items()}
    if args.baseline:
        for name in args.assignment:
            base, new = mean[(args.baseline, name)], mean[(args.pythonpath, name)]
            print(f"{name}: baseline {base:.1f}/min, code {new:.1f}/min (means of {rounds})")
            print(f"ratio code/baseline: {new / base:.2f}")
    if len(args.assignment) > 1:
        per = {n: 60.0 / mean[(args.pythonpath, n)] for n in args.assignment}
        print("s per submission (means of %d): %s" % (rounds, ", ".join(f"{n} {v:.2f}" for n, v in per.items())))
        first, second = args.assignment[:2]
        print(f"ratio {first}/{second} (s per submission): {per[first] / per[second]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
