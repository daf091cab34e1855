"""``python -m bnviz``: what this machine runs the course on, and where the notebooks are.

``python -m bnviz``                      prints the environment report and the notebooks' folder
``python -m bnviz copy-notebooks DIR``   copies the chapters into DIR (created if needed); it never
                                          overwrites: if a file is already there, nothing is copied
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

CHAPTER_GLOB = "[0-9][0-9]_*.ipynb"


def notebooks_dir() -> Path:
    """The chapters' folder: ``notebooks/`` of a source checkout (an editable install), else the
    copy inside the installed package (``bnviz/notebooks`` in the wheel)."""
    here = Path(__file__).resolve().parent
    for folder in (here.parent / "notebooks", here / "notebooks"):
        if any(folder.glob(CHAPTER_GLOB)):
            return folder
    raise FileNotFoundError(f"no notebooks found next to the bnviz package ({here}); "
                            "reinstall bnviz (pip install bnviz) or clone the repository")


def chapter_files() -> list[Path]:
    return sorted(notebooks_dir().glob(CHAPTER_GLOB))


def copy_notebooks(dest) -> list[Path]:
    """Copy the chapters into ``dest``; refuses (FileExistsError, nothing copied) if any of them
    is already there, and if ``dest`` is a file."""
    dest = Path(dest).expanduser()
    if dest.exists() and not dest.is_dir():
        raise NotADirectoryError(f"{dest} is a file; give a folder (new or existing) to copy the notebooks into")
    files = chapter_files()
    clash = [dest / f.name for f in files if (dest / f.name).exists()]
    if clash:
        raise FileExistsError(f"not copying: {len(clash)} file(s) already in {dest} "
                              f"({', '.join(p.name for p in clash)}); move them or choose another folder")
    dest.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy2(f, dest / f.name)) for f in files]


def report() -> str:
    from .course import environment_report

    rep = environment_report()
    notes = rep.pop("notes")
    width = max(map(len, rep))
    lines = ["bnviz: the course's environment"] + [f"  {k:<{width}}  {v}" for k, v in rep.items()]
    lines += [f"  note: {n}" for n in notes]
    folder = notebooks_dir()
    lines += ["", f"notebooks: {folder}", *(f"  {p.name}" for p in chapter_files()),
              "", "copy them into a folder of your own and open the first:",
              "  python -m bnviz copy-notebooks bnviz-course",
              "  jupyter lab bnviz-course/00_start_here.ipynb"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bnviz", description="The bnviz course: environment report "
                                "and notebooks (without a command: the report).")
    sub = p.add_subparsers(dest="cmd")
    c = sub.add_parser("copy-notebooks", help="copy the chapters into DIR (never overwrites)")
    c.add_argument("dir", help="folder to copy the notebooks into (created if missing)")
    args = p.parse_args(argv)
    try:
        if args.cmd == "copy-notebooks":
            copied = copy_notebooks(args.dir)
            print(f"copied {len(copied)} notebooks into {Path(args.dir).resolve()}; start with:\n"
                  f"  jupyter lab {Path(args.dir) / copied[0].name}")
        else:
            print(report())
    except (FileExistsError, FileNotFoundError, NotADirectoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
