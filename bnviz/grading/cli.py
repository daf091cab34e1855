"""Command line: ``python -m bnviz.grading build|grade`` (what ``make assignment`` / ``make grade`` run).

    python -m bnviz.grading build [--source NOTEBOOK] [--out dist/batch_norm] [--variant SECRET]
    python -m bnviz.grading grade SUBMISSIONS_DIR [--dist dist/batch_norm] [--out grades]
                                  [--timeout 300] [--jobs 1] [--memory-gb 4] [--allow-forbidden]
                                  [--sandbox auto|bwrap|docker] [--docker-image IMAGE] [--no-sandbox]
                                  [--regrade] [--only STUDENT]... [--new-seed]
                                  [--roster CSV] [--canvas-assignment COLUMN]
                                  [--sandbox-user USER]
    python -m bnviz.grading feedback GRADES [--dist dist/batch_norm] [--release-hidden]
    python -m bnviz.grading gradescope [--dist dist/batch_norm] [--out ZIP]   (the Gradescope autograder zip)
    python -m bnviz.grading gradescope-run [--root /autograder]             (inside Gradescope: run_autograder)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import build, sandbox
from .grade import grade_folder


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bnviz.grading",
                                     description="Build and grade the batch normalization assignment.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="otter assign the solution notebook")
    b.add_argument("--source", default=None, help=f"solution notebook (default: ${build.SOURCE_ENV} or the checkout's)")
    b.add_argument("--out", default=str(build.DEFAULT_DIST))
    b.add_argument("--variant", default=None, metavar="SECRET",
                   help="build the class variant derived from SECRET (variants.py; the secret is not stored); "
                        "default: PyTorch's conventions")
    g = sub.add_parser("grade", help="grade a folder of submissions, each in a sandbox")
    g.add_argument("submissions")
    g.add_argument("--dist", default=str(build.DEFAULT_DIST), help="output folder of `build` (assignment.json)")
    g.add_argument("--out", default="grades")
    g.add_argument("--timeout", type=float, default=300.0, help="wall-clock seconds per submission")
    g.add_argument("--jobs", type=int, default=1, help="submissions graded at the same time")
    g.add_argument("--memory-gb", type=float, default=4.0, help="memory a submission may allocate")
    g.add_argument("--output-mb", type=float, default=100.0, help="what a submission may print")
    g.add_argument("--processes", type=int, default=128, help="process/thread limit (needs cgroups)")
    g.add_argument("--allow-forbidden", action="store_true",
                   help="do not withhold points for F.batch_norm / nn.BatchNorm / autograd where the rules forbid them")
    g.add_argument("--sandbox", choices=["auto", "bwrap", "docker"], default="auto")
    g.add_argument("--docker-image", default=None, help="image with python + torch for --sandbox docker")
    g.add_argument("--no-sandbox", action="store_true", help="run student code unsandboxed (prints what it gives up)")
    g.add_argument("--sandbox-user", default=None, metavar="USER",
                   help="unprivileged account sandboxes run as when grading as root "
                        f"(default: {sandbox.users.DEFAULT_USER}, created if missing)")
    g.add_argument("--seed", type=int, default=None,
                   help="reproduce one student's run: the seed in their grades/<student>.json (default: a secret "
                        "drawn per run, never shown, and a seed per student derived from it)")
    g.add_argument("--regrade", action="store_true",
                   help="grade every submission again (default: resume, keeping results of unchanged files)")
    g.add_argument("--only", action="append", default=[], metavar="STUDENT",
                   help="grade this student again (repeatable; the name in the gradebook); the others resume as usual")
    g.add_argument("--new-seed", action="store_true",
                   help="fresh test inputs for everyone (default: an unchanged file keeps the seed in its JSON)")
    g.add_argument("--roster", default=None, metavar="CSV",
                   help="roster (id/user_id, file, name, email, sis_id, login_id, section) for canvas.csv and gradescope.csv")
    g.add_argument("--canvas-assignment", default=None, metavar="COLUMN",
                   help="the assignment's column in canvas.csv, as in a Canvas gradebook export: 'Batch norm (12345)' "
                        "(default: the notebook's name)")
    f = sub.add_parser("feedback", help="one HTML page per student (and a zip of them) that students can be given")
    f.add_argument("grades", help="the grades folder `grade` wrote")
    f.add_argument("--dist", default=str(build.DEFAULT_DIST), help="output folder of `build` (assignment.json)")
    f.add_argument("--release-hidden", action="store_true",
                   help="show the hidden tests' messages (default: only passed/failed and points)")
    z = sub.add_parser("gradescope", help="a Gradescope autograder zip that runs this grader (gradescope.py)")
    z.add_argument("--dist", default=str(build.DEFAULT_DIST), help="output folder of `build` (assignment.json)")
    z.add_argument("--out", default=None, help="the zip to write (default: <dist>/gradescope_autograder.zip)")
    r = sub.add_parser("gradescope-run", help="grade <root>/submission into <root>/results/results.json (run_autograder)")
    r.add_argument("--root", default=None, help="Gradescope's folder (default: $AUTOGRADER_ROOT or /autograder)")
    return parser


def _gradescope(args, parser) -> int:
    from . import gradescope

    if args.cmd == "gradescope-run":
        return gradescope.run(args.root)
    try:
        path = gradescope.build_zip(args.dist, args.out)
    except (FileNotFoundError, ValueError) as e:  # ValueError: assignment.json names an unknown assignment
        parser.error(str(e))
    print(f"Gradescope autograder: {path} (upload it as the assignment's autograder; see "
          "notebooks/assignments/batch_norm/README.md, 'Grading on Gradescope', shared by every assignment)")
    return 0


def _feedback(args, parser) -> int:
    from . import feedback

    manifest_path = Path(args.dist) / "assignment.json"
    if not manifest_path.is_file():
        parser.error(f"{manifest_path} not found: pass the --dist the class was graded with")
    if not Path(args.grades).is_dir():
        parser.error(f"{args.grades}: not a grades folder")
    pages = feedback.write_feedback(Path(args.grades), json.loads(manifest_path.read_text()), args.release_hidden)
    print(f"feedback for {len(pages)} student(s) -> {Path(args.grades) / 'feedback'} (feedback.zip)"
          + ("" if args.release_hidden else "; hidden tests' messages not shown (--release-hidden)"))
    return 0


def _grade(args, parser) -> int:
    dist = Path(args.dist)
    manifest_path = dist / "assignment.json"
    if not manifest_path.is_file():
        parser.error(f"{manifest_path} not found: run `python -m bnviz.grading build --out {dist}` first")
    manifest = json.loads(manifest_path.read_text())
    student_nb = dist / manifest["student_notebook"]
    from . import assignments, late

    try:
        assignment = assignments.name_of(manifest)  # no name: batch_norm (built before assignment 2)
    except ValueError as e:
        parser.error(f"{manifest_path}: {e}")

    if args.roster and not Path(args.roster).is_file():
        parser.error(f"--roster {args.roster}: no such file")
    try:
        late.parse_policy(manifest)  # a wrong late policy stops before grading
    except (late.PolicyError, KeyError, TypeError) as e:
        parser.error(f"{manifest_path}: late policy: {e}")
    manual = {q: c["points"] for q, c in manifest.get("questions", {}).items() if c.get("manual")}
    limits = sandbox.Limits(timeout_s=args.timeout, memory_bytes=int(args.memory_gb * sandbox.GiB),
                            output_bytes=int(args.output_mb * sandbox.MiB), processes=args.processes,
                            threads=1 if args.jobs > 1 else 2, user=args.sandbox_user)
    try:
        if not args.no_sandbox and (args.sandbox == "bwrap" or (args.sandbox == "auto" and sandbox.shutil.which("bwrap"))):
            sandbox.prepare(limits)  # the sandbox user, seccomp and a test sandbox: refuse before grading
        results = grade_folder(args.submissions, args.out, jobs=args.jobs, limits=limits,
                               student_notebook=student_nb if student_nb.is_file() else None,
                               manual_questions=manual, forbidden=manifest.get("forbidden"),
                               allow_forbidden=args.allow_forbidden, seed=args.seed,
                               sandbox_backend="none" if args.no_sandbox else args.sandbox,
                               docker_image=args.docker_image, extra_masks=[dist.resolve()],
                               regrade=args.regrade, only=set(args.only), new_seed=args.new_seed,
                               assignment=assignment)
    except sandbox.SandboxUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    unknown = sorted(set(args.only) - {r.student for r in results})
    if unknown:
        print(f"warning: --only {', '.join(unknown)}: no such student in {args.submissions}", file=sys.stderr)
    after_grade(Path(args.submissions), Path(args.out), manifest, results, student_nb,
                roster=Path(args.roster) if args.roster else None, canvas_assignment=args.canvas_assignment)
    print(f"graded {len(results)} submission(s) -> {Path(args.out) / 'gradebook.csv'}")
    return 0


def after_grade(submissions: Path, out: Path, manifest: dict, results: list, student_nb: Path,
                roster: Path | None = None, canvas_assignment: str | None = None) -> None:
    """What `grade` writes after judging (issue 24): manual.csv gets the missing rows (typed ones
    are never changed), gradebook.csv merges the manual points, the written-answer pages, the LMS
    CSVs (canvas.csv, gradescope.csv, submissions.csv), the class pass rate per test (items.csv);
    overrides.csv first."""
    import csv

    from . import feedback, items, late, lms, manual as manual_mod, overrides

    out = out.resolve()
    manual = {q: float(c["points"] or 0) for q, c in manifest.get("questions", {}).items() if c.get("manual")}
    overrides.apply_overrides(out, results, feedback._all_tests(), manual)
    manual_mod.sync_manual_csv(out, [r.student for r in results], manual)
    files, names, _, infos = lms.collect(submissions.resolve(), student_nb.name)
    policy = late.parse_policy(manifest)
    assessed = None if policy is None else {
        r.student: late.assess(policy, r.student, infos[r.student].submitted_at if r.student in infos else "",
                               r.student in infos and infos[r.student].late) for r in results}
    header = manual_mod.merge_gradebook(out, results, manual, assessed)
    graded = {r.student for r in results}
    handout = json.loads(student_nb.read_text(encoding="utf-8")) if student_nb.is_file() else None
    manual_mod.write_written_pages(out, {n: p for p, n in names.items() if n in graded}, manual,
                                   manual_mod.rubrics(manifest), handout, student_nb.name)
    with open(out / "gradebook.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    questions = [c for c in header[1:header.index("total")]]
    possible = sum(float(c["points"] or 0) for c in manifest.get("questions", {}).values())
    items.write_items(out, results, feedback._all_tests())
    items.write_histogram(out, results, {q: float(c["points"] or 0) for q, c in manifest.get("questions", {}).items()
                                         if not c.get("manual")})
    lms.write_lms_csvs(out, rows, infos, {n: str(p.relative_to(submissions.resolve())) for p, n in names.items()},
                       questions, possible, lms.read_roster(roster), canvas_assignment or Path(student_nb.name).stem)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.cmd == "build":
        try:
            manifest = build.build_assignment(args.out, args.source, variant=args.variant)
        except (FileNotFoundError, ValueError) as e:  # ValueError: an empty --variant secret
            parser.error(str(e))
        kept = sorted(k for k in manifest if k not in build.GENERATED_KEYS)
        if kept:
            print("kept from the previous assignment.json: " + ", ".join(kept))
        print("conventions: " + "; ".join(build.variants_norms_nb.describe_any(manifest["variant"])))
        print(f"built {args.out}: student notebook {manifest['student_notebook']}, "
              f"autograder {manifest['autograder_zip']}, student zip {manifest['student_zip']}; "
              f"{manifest['autograded_points']:g} autograded + {manifest['manual_points']:g} manual points")
        return 0
    if args.cmd == "feedback":
        return _feedback(args, parser)
    if args.cmd in ("gradescope", "gradescope-run"):
        return _gradescope(args, parser)
    return _grade(args, parser)
