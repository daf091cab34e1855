"""The trusted side's per-submission work, in a child process with its own memory and time limits.

Reading a notebook (``ingest``), scanning its source (``rules``), parsing the sandbox's report
(``report``) and judging it (``checker``) all handle what a student made, so none of it runs in
the process that holds every student's results. ``Judge`` (used by ``grade.py``; the scoring itself is ``scoring.py``) keeps one child
(``child_main``) per grading thread: the child caps its address space
(``RLIMIT_AS``: what it had after start-up plus ``memory_bytes``), each call has a wall-clock
limit, and a child that dies or runs over is killed and replaced; the submission it was working on
gets an error in its row, every other result is untouched.

Messages both ways: an 8-byte little-endian length, a JSON header, an 8-byte length, raw bytes (the
report). The child's replies are built here from validated data only.
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

GiB = 1 << 30


class JudgeError(RuntimeError):
    """The child died, ran out of memory or time; the message says which, in words."""


# --------------------------------------------------------------------------- framing


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes:
    chunks, left = [], n
    while left:
        if deadline is not None:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([fd], [], [], wait)[0]:
                raise TimeoutError
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int, deadline: float | None = None) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", _read_exact(fd, 8, deadline))
    header = json.loads(_read_exact(fd, n, deadline))
    (m,) = struct.unpack("<Q", _read_exact(fd, 8, deadline))
    return header, _read_exact(fd, m, deadline)


def write_frame(fd: int, header: dict, blob: bytes = b"") -> None:
    head = json.dumps(header).encode()
    data = struct.pack("<Q", len(head)) + head + struct.pack("<Q", len(blob))
    for piece in (data, blob):
        view = memoryview(piece)
        while view:
            view = view[os.write(fd, view):]


# --------------------------------------------------------------------------- the child


class Work:
    """What the child knows for the whole run (sent once, as the first message)."""

    def __init__(self, config: dict):
        self.variant = None
        self.assignment = str(config.get("assignment") or "batch_norm")
        if config.get("variant") is not None:  # either assignment's conventions (variants / variants_norms)
            from .variants_norms_nb import from_dict_any

            self.variant = from_dict_any(config["variant"])
        self._tests: tuple[int, list] | None = None  # (seed, tests): the last student's
        self.rules = {q: set(f) for q, f in (config.get("rules") or {}).items()}
        self.handed_out = list(config.get("handed_out") or [])
        self.preferred = str(config.get("preferred") or "batch_norm.ipynb")
        self.memory_gib = float(config.get("memory_bytes", 0)) / GiB
        self.seed_salt = config.get("seed_salt")  # assignment 2's class salt (student_seeds), or None

    def ingest(self, msg: dict) -> dict:
        from . import assignments, ingest, rules, scoring, student_seeds

        sub = ingest.read_submission(Path(msg["path"]), self.preferred, self.handed_out)
        if sub.error:
            return {"error": sub.error, "notes": sub.notes}
        notes = sub.notes + scoring.tamper_notes(sub.sources, sub.otter_tests, self.handed_out)
        skip = {s.strip() for s in self.handed_out}
        seed_flags = student_seeds.check_outputs(sub.sources, sub.outputs, self.seed_salt) if self.seed_salt else []
        return {"error": None, "notes": notes, "problems": sub.problems, "cells": sub.cells, "seed_flags": seed_flags,
                "scanned": rules.scan(sub.cells, assignments.answers_of(self.assignment)), "hand": rules.look_by_hand(sub.cells, skip)}

    def judge(self, msg: dict, blob: bytes) -> dict:
        from . import scoring

        return scoring.judge_report(self.tests(int(msg["seed"])), self.rules, blob, msg["scanned"], msg["memory_text"])

    def tests(self, seed: int) -> list:
        """The tests (inputs and references) of one student's seed."""
        from . import assignments

        if self._tests is None or self._tests[0] != seed:
            tests = assignments.make_tests(self.assignment, seed, self.variant)
            self._tests = (seed, tests)
        return self._tests[1]


def child_main() -> int:
    out = os.dup(1)
    os.dup2(2, 1)  # anything printed by accident goes to stderr, not into the replies
    header, _ = read_frame(0)
    work = Work(header)
    if header.get("memory_bytes"):
        with open("/proc/self/status") as f:
            vm = next((int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmSize:")), 0)
        limit = vm + int(header["memory_bytes"])
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    write_frame(out, {"ready": True})
    while True:
        try:
            msg, blob = read_frame(0)
        except EOFError:
            return 0
        fatal = False
        try:
            reply = work.ingest(msg) if msg.get("op") == "ingest" else work.judge(msg, blob)
        except MemoryError:
            reply, fatal = {"failed": f"ran out of its memory limit ({work.memory_gib:g} GiB)"}, True
        except RecursionError:
            reply = {"failed": "nesting too deep to process"}
        except Exception as e:  # a grader bug: this submission only
            reply = {"failed": f"grader error ({type(e).__name__})"}
        del blob
        write_frame(out, reply)
        if fatal:  # the heap may be in a bad state: the parent starts a fresh child
            return 3


# --------------------------------------------------------------------------- the parent's handle


class Judge:
    """One child, started on first use and again after it dies; ``call`` never hangs past the
    time limit."""

    def __init__(self, config: dict, memory_bytes: int = 3 * GiB, timeout_s: float = 120.0):
        self.config = {**config, "memory_bytes": int(memory_bytes)}
        self.timeout_s = float(timeout_s)
        self.proc: subprocess.Popen | None = None

    def _start(self) -> None:
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        entry = "from bnviz.grading.judge import child_main; raise SystemExit(child_main())"
        self.proc = subprocess.Popen([sys.executable, "-s", "-c", entry], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, start_new_session=True)
        write_frame(self.proc.stdin.fileno(), self.config)
        read_frame(self.proc.stdout.fileno(), time.monotonic() + max(self.timeout_s, 300.0))

    def warm(self) -> None:
        """Start the child now (its start-up, importing torch, then counts against no submission);
        a failure here shows again, with its reason, on the first call."""
        try:
            self._start()
        except Exception:
            self.close()

    def call(self, op: str, msg: dict, blob: bytes = b"") -> dict:
        deadline = time.monotonic() + self.timeout_s
        try:
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            write_frame(self.proc.stdin.fileno(), {"op": op, **msg}, blob)
            reply, _ = read_frame(self.proc.stdout.fileno(), deadline)
        except TimeoutError:
            self.close()
            raise JudgeError(f"the trusted side's {op} step took longer than {self.timeout_s:g} s (stopped)") from None
        except (EOFError, OSError, ValueError, struct.error):
            rc = self.close()
            why = f"killed by signal {-rc}" if rc is not None and rc < 0 else f"exit status {rc}"
            raise JudgeError(f"the trusted side's {op} step died ({why})") from None
        if reply.get("failed"):
            raise JudgeError(f"the trusted side's {op} step {reply['failed']}")
        return reply

    def close(self) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
        rc = proc.wait()
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        return rc


if __name__ == "__main__":
    sys.exit(child_main())
