"""Train the chapters' key arms at full size and save their Histories under data/reference/.

The arms are the table ``bnviz.references.ARMS`` (name, chapter, Config changes, seeds). Each
(arm, seed) is one run at full size on the SYNTHETIC stand-in (60,000 training images, 10 epochs
of batch 256; 07's arms: 2,000 steps at their batch size), evaluated at each epoch end with
PreciseBN, and saved as ``data/reference/<arm>__seed<s>.json`` with the machine, date, data set
and git revision. Resumable: a saved (arm, seed) is skipped; nothing is overwritten without
``--force``.

    python benchmarks/reference_runs.py --list
    nice -n 10 python benchmarks/reference_runs.py                 # every arm, in priority order
    python benchmarks/reference_runs.py --only base --only no-bn   # just these arms
    python benchmarks/reference_runs.py --only base --force        # remake base's files
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bnviz import references as rf  # noqa: E402


def run_one(a, seed, data, root, force):
    """Train (a, seed) and save it; returns (path, wall seconds)."""
    from bnviz.precise import PreciseBNEval
    from bnviz.train import Trainer

    from bnviz.runs import _data_for

    cfg = rf.arm_config(a, seed)
    t0 = time.perf_counter()
    h = Trainer(cfg, data=_data_for(cfg, data), callbacks=(PreciseBNEval(),)).fit()
    wall = time.perf_counter() - t0
    return rf.save_reference(h, a, seed, root=root, force=force, wall_s=round(wall, 1)), wall, h


def _state(a, seed, root) -> str:
    """'missing', 'saved', or 'STALE' (corrupt, or made with another Config than the arm's)."""
    if not rf.reference_path(a.name, seed, root).exists():
        return "missing"
    try:
        rf.load_reference(a.name, seed, root)
        return "saved"
    except rf.ReferenceError:
        return "STALE"


def main(argv=None, data=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", action="append", default=[], metavar="NAME", help="run only this arm (repeatable)")
    p.add_argument("--list", action="store_true", help="list the arms and which files are saved, then stop")
    p.add_argument("--force", action="store_true", help="replace saved files (otherwise they are skipped)")
    p.add_argument("--seeds", type=int, nargs="+", help="only these seeds (default: each arm's own)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    p.add_argument("--root", default=None, help=f"folder for the files (default {rf.REFERENCE_DIR})")
    args = p.parse_args(argv)
    arms = [rf.arm(n) for n in args.only] if args.only else list(rf.ARMS)  # unknown names: ValueError first
    todo = [(a, s) for a in arms for s in (args.seeds or a.seeds)]
    if args.list:
        for a, s in todo:
            print(f"{a.name:18s} seed {s}  chapters {','.join(a.chapters):14s} {_state(a, s, args.root):8s} "
                  f"{a.label} | {a.changes} | {a.note}")
        return 0
    import torch

    torch.set_num_threads(args.threads)
    if data is None:
        from bnviz.data import load_dataset

        data = load_dataset("synthetic", device="cpu")
    print(f"{len(todo)} runs; data: {data.label}; machine: {rf.machine_info()}", flush=True)
    done = 0
    for i, (a, s) in enumerate(todo, 1):
        if rf.reference_path(a.name, s, args.root).exists() and not args.force:
            try:
                rf.load_reference(a.name, s, args.root)
                print(f"[{i}/{len(todo)}] {a.name} seed {s}: saved already, skipped", flush=True)
            except rf.ReferenceError as err:  # stale or corrupt: kept, said, not retrained without --force
                print(f"[{i}/{len(todo)}] {a.name} seed {s}: NOT retrained: {err}", flush=True)
            continue
        print(f"[{i}/{len(todo)}] {a.name} seed {s}: training ({a.note}) ...", flush=True)
        path, wall, h = run_one(a, s, data, args.root, args.force)
        done += 1
        print(f"[{i}/{len(todo)}] {a.name} seed {s}: {wall:.1f} s, {h.summary()} -> {path}", flush=True)
    print(f"done: {done} trained, {len(todo) - done} skipped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
