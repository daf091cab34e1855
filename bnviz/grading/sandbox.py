"""Run the worker (``python -m bnviz.grading.worker``) for one submission in a sandbox.

Backends, in order of preference (``choose_backend``):

* ``bwrap`` (bubblewrap): new user, mount, PID, network, IPC, UTS and cgroup namespaces, all
  capabilities dropped, ``--die-with-parent``, ``--new-session``. The file system is an allow-list,
  read-only: ``/usr`` (and the ``/bin``, ``/lib`` links), a few files of ``/etc``, the Python
  installation and its virtual environment, and a copy of ``worker.py`` at ``/opt/bnviz-worker``.
  Writable: a private ``/tmp`` and ``/scratch`` (the working folder), both size-limited tmpfs that
  vanish with the sandbox. Nothing of the host's work folders is visible: the submissions, the
  grades, the built assignment, the rest of ``bnviz`` (the checker) and ``/root`` / ``/home`` are
  not mounted, and any of them that lies under a mounted folder is covered by an empty tmpfs.
* ``docker``: the same worker in a container (``--network none``, read-only root, tmpfs
  ``/tmp`` and ``/scratch``, ``--pids-limit``, ``--memory``, ``--cap-drop ALL``, user 65534); needs
  an image with Python and torch (``--docker-image``).
* ``none``: no isolation at all; only with ``--no-sandbox``.

Limits (``Limits``): wall clock (the whole sandbox is killed), address space on top of what
Python + torch reserve (``RLIMIT_AS``, set by the worker before any student code runs), CPU time
(``RLIMIT_CPU``), file size, bytes printed (read by us from a pipe; over the limit the sandbox is
killed), size of the report. Where the host lets us create cgroups (v1 or v2), each sandbox also
gets its own ``pids`` (process count) and ``memory`` cgroup; ``RLIMIT_NPROC`` does not bind root,
so as root without cgroups the process count is bounded only by the time limit and the PID
namespace (every process dies with the sandbox).

The request goes in on stdin; the report comes back on stdout; what the student prints comes back
on stderr (the worker redirects it). No host path is writable from inside.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

GiB, MiB = 1 << 30, 1 << 20
WORKER_ROOT = "/opt/bnviz-worker"
INSTALL_HINT = ("bubblewrap (bwrap) is not installed. Install it (Debian/Ubuntu: `sudo apt-get install "
                "bubblewrap`; Fedora: `sudo dnf install bubblewrap`), or grade with Docker "
                "(`--sandbox docker --docker-image IMAGE`), or, knowing what it gives up, pass --no-sandbox.")
NO_SANDBOX_WARNING = ("WARNING: --no-sandbox: student code runs as you, with your files, network and "
                      "processes. It can read and overwrite other submissions, the grades and this "
                      "program, keep running after grading and use all memory. Scores are still computed "
                      "outside student code, but nothing else is protected. Use only for your own tests.")


class SandboxUnavailable(RuntimeError):
    pass


@dataclasses.dataclass
class Limits:
    timeout_s: float = 300.0
    memory_bytes: int = 4 * GiB
    cpu_seconds: int | None = None  # default: the wall-clock limit
    processes: int = 128
    output_bytes: int = 100 * MiB  # what the submission prints
    report_bytes: int = 32 * MiB
    tmpfs_bytes: int = 256 * MiB  # each of /tmp and /scratch
    threads: int = 1

    def for_worker(self) -> dict:
        return {"memory_bytes": self.memory_bytes, "cpu_seconds": self.cpu_seconds or int(self.timeout_s) + 1,
                "file_bytes": self.tmpfs_bytes, "processes": self.processes, "threads": self.threads}


@dataclasses.dataclass
class Run:
    report: bytes | None
    log_tail: bytes
    printed: int
    returncode: int | None
    elapsed_s: float
    problem: str | None  # a limit that was hit, in words


def docker_available() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def choose_backend(requested: str = "auto", docker_image: str | None = None) -> str:
    """``bwrap``, ``docker`` or ``none``; raises SandboxUnavailable with install instructions."""
    if requested == "none":
        return "none"
    if requested in ("auto", "bwrap") and shutil.which("bwrap"):
        problem = bwrap_problem()
        if problem is None:
            return "bwrap"
        if requested == "bwrap" or not docker_available():
            raise SandboxUnavailable(f"bwrap is installed but cannot create a sandbox here: {problem}")
    if requested == "bwrap":
        raise SandboxUnavailable(INSTALL_HINT)
    docker = requested in ("auto", "docker") and docker_available()
    if requested == "docker" and not docker:
        raise SandboxUnavailable("--sandbox docker: Docker is not available here (`docker info` failed); "
                                 "start the Docker daemon, or install bubblewrap and use --sandbox bwrap")
    if docker:
        if not docker_image:
            raise SandboxUnavailable("bwrap is missing and Docker needs an image with Python and torch: pass "
                                     "--docker-image IMAGE (see notebooks/assignments/batch_norm/README.md)")
        return "docker"
    raise SandboxUnavailable(INSTALL_HINT)


def bwrap_problem() -> str | None:
    """None if bwrap can create the namespaces we use, else its complaint (e.g. user namespaces
    disabled by the kernel or a container's seccomp policy)."""
    try:
        proc = subprocess.run(["bwrap", "--unshare-all", "--die-with-parent", "--cap-drop", "ALL", "--ro-bind", "/", "/",
                               "--proc", "/proc", "--dev", "/dev", "--", "/bin/true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return None if proc.returncode == 0 else (proc.stderr.strip() or f"exit status {proc.returncode}")[:300]


def make_worker_root(folder: Path) -> Path:
    """A minimal package tree holding only worker.py: what the sandbox may see of bnviz."""
    pkg = folder / "bnviz" / "grading"
    pkg.mkdir(parents=True, exist_ok=True)
    (folder / "bnviz" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    shutil.copyfile(Path(__file__).with_name("worker.py"), pkg / "worker.py")
    return folder


# --------------------------------------------------------------------------- bubblewrap


def _python_roots() -> list[str]:
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             str(Path(os.path.realpath(sys.executable)).parent.parent)}
    try:
        import torch
        roots.add(str(Path(torch.__file__).resolve().parent.parent))
    except ImportError:
        pass
    roots = sorted(r for r in roots if r and not r.startswith("/usr/") and r != "/usr")
    return [r for r in roots if not any(r != o and r.startswith(o.rstrip("/") + "/") for o in roots)]


ETC_FILES = ["/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/passwd",
             "/etc/group", "/etc/nsswitch.conf", "/etc/hosts", "/etc/alternatives"]


def bwrap_command(worker_root: Path, limits: Limits, masks: list[Path], env: dict[str, str]) -> list[str]:
    cmd = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
           "--hostname", "sandbox", "--ro-bind", "/usr", "/usr"]
    for link in ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"):
        if os.path.islink(link):
            cmd += ["--symlink", os.readlink(link), link]
        elif os.path.isdir(link):
            cmd += ["--ro-bind", link, link]
    for path in ETC_FILES:
        cmd += ["--ro-bind-try", path, path]
    # The private /tmp first: a Python or venv that lives under /tmp (a checkout in /tmp, as CI
    # may use) is bound on top of it below; the other way round the tmpfs would hide it.
    size = str(limits.tmpfs_bytes)
    cmd += ["--size", size, "--tmpfs", "/tmp"]
    roots = _python_roots()
    for root in roots:
        cmd += ["--ro-bind", root, root]
    for mask in masks:  # secret folders that happen to lie inside a mounted one
        m = str(mask)
        if any(m == r or m.startswith(r.rstrip("/") + "/") for r in roots + ["/usr"]) and os.path.isdir(m):
            cmd += ["--tmpfs", m]
    cmd += ["--ro-bind", str(worker_root), WORKER_ROOT, "--proc", "/proc", "--dev", "/dev",
            "--size", size, "--tmpfs", "/scratch", "--chdir", "/scratch", "--clearenv"]
    for k, v in env.items():
        cmd += ["--setenv", k, v]
    return cmd + ["--", sys.executable, "-s", "-B", "-m", "bnviz.grading.worker"]


def worker_env(limits: Limits, root: str = WORKER_ROOT, home: str = "/scratch") -> dict[str, str]:
    n = str(limits.threads)
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": "/tmp", "PYTHONPATH": root,
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", "LANG": "C.UTF-8",
            "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n}


def docker_command(name: str, worker_root: Path, limits: Limits, image: str) -> list[str]:
    tmp = f"size={limits.tmpfs_bytes}"
    cmd = ["docker", "run", "--rm", "-i", "--name", name, "--network", "none", "--cap-drop", "ALL",
           "--security-opt", "no-new-privileges", "--pids-limit", str(limits.processes),
           "--memory", str(limits.memory_bytes + GiB), "--memory-swap", str(limits.memory_bytes + GiB),
           "--cpus", str(limits.threads), "--read-only", "--tmpfs", f"/tmp:{tmp}", "--tmpfs", f"/scratch:{tmp},mode=1777",
           "-w", "/scratch", "--user", "65534:65534", "-v", f"{worker_root}:{WORKER_ROOT}:ro"]
    for k, v in worker_env(limits).items():
        if k != "PATH":
            cmd += ["-e", f"{k}={v}"]
    return cmd + [image, "python", "-s", "-B", "-m", "bnviz.grading.worker"]


# --------------------------------------------------------------------------- cgroups


class Cgroups:
    """Per-sandbox ``pids`` and ``memory`` cgroups where the host lets us create them (cgroup v1
    controllers, or a v2 hierarchy with the controllers enabled); silently nothing otherwise."""

    def __init__(self, token: str, limits: Limits):
        self.dirs: dict[str, Path] = {}
        settings = {"pids": {"pids.max": limits.processes},
                    "memory": {"memory.limit_in_bytes": limits.memory_bytes + GiB, "memory.max": limits.memory_bytes + GiB}}
        for controller, files in settings.items():
            base = self._base(controller)
            if base is None:
                continue
            d = base / f"bnviz-{token}"
            try:
                d.mkdir()
                wrote = 0
                for name, value in files.items():
                    if (d / name).exists():
                        (d / name).write_text(str(value))
                        wrote += 1
                if wrote:
                    self.dirs[controller] = d
                else:
                    d.rmdir()
            except OSError:
                try:
                    d.rmdir()
                except OSError:
                    pass

    @staticmethod
    def _base(controller: str) -> Path | None:
        try:
            lines = Path("/proc/self/cgroup").read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            _, ctrls, path = line.split(":", 2)
            if controller in ctrls.split(","):
                base = Path("/sys/fs/cgroup") / controller / path.lstrip("/")
                return base if base.is_dir() and os.access(base, os.W_OK) else None
        for line in lines:  # cgroup v2
            if line.startswith("0::"):
                base = Path("/sys/fs/cgroup") / line[3:].lstrip("/")
                ctl = base / "cgroup.subtree_control"
                if ctl.is_file() and controller in ctl.read_text().split() and os.access(base, os.W_OK):
                    return base
        return None

    def wrap(self, cmd: list[str]) -> list[str]:
        """Prefix cmd with a shell that joins the cgroups, then execs it (no race: nothing has
        forked yet)."""
        procs = [str(d / "cgroup.procs") for d in self.dirs.values()]
        if not procs:
            return cmd
        script = 'for f in "$@"; do [ "$f" = -- ] && break; echo $$ > "$f" || exit 97; shift; done; shift; exec "$@"'
        return ["/bin/sh", "-c", script, "sh", *procs, "--", *cmd]

    def pids(self) -> list[int]:
        out = set()
        for d in self.dirs.values():
            try:
                out |= {int(p) for p in (d / "cgroup.procs").read_text().split()}
            except OSError:
                pass
        return sorted(out)

    def events(self) -> dict[str, int]:
        """How often the pids limit refused a fork and the memory limit fired."""
        got = {}
        for name, path, key in (("pids", "pids.events", "max"), ("memory", "memory.failcnt", None),
                                ("memory", "memory.events", "max")):
            d = self.dirs.get(name)
            try:
                text = (d / path).read_text() if d else ""
            except OSError:
                continue
            for line in text.splitlines():
                parts = line.split()
                if key is None and len(parts) == 1:
                    got[name] = got.get(name, 0) + int(parts[0])
                elif len(parts) == 2 and parts[0] == key:
                    got[name] = got.get(name, 0) + int(parts[1])
        return got

    def close(self) -> None:
        for _ in range(50):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.05)
        for d in self.dirs.values():
            for _ in range(20):
                try:
                    d.rmdir()
                    break
                except OSError:
                    time.sleep(0.05)


# --------------------------------------------------------------------------- running


def _read_capped(stream, limit: int, keep_tail: int, state: dict, key: str, on_over) -> None:
    """Read a pipe to its end: keep at most ``limit`` bytes (or only the last ``keep_tail``), call
    on_over() once the total passes ``limit``."""
    chunks, total, tail = [], 0, b""
    while True:
        data = stream.read1(1 << 16) if hasattr(stream, "read1") else stream.read(1 << 16)
        if not data:
            break
        total += len(data)
        if keep_tail:
            tail = (tail + data)[-keep_tail:]
        elif total <= limit:
            chunks.append(data)
        if total > limit and not state.get(key + "_over"):
            state[key + "_over"] = True
            on_over()
    state[key] = tail if keep_tail else b"".join(chunks)
    state[key + "_total"] = total


def _write_fd(fd: int, data: bytes) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        pass
    finally:
        os.close(fd)


def _feed(stream, data: bytes) -> None:
    try:
        stream.write(data)
    except OSError:  # the worker died before reading everything
        pass
    finally:
        try:
            stream.close()
        except OSError:
            pass


def run_worker(request: bytes, backend: str, limits: Limits, worker_root: Path, masks: list[Path],
               docker_image: str | None = None) -> Run:
    """Run the worker on one request in a fresh sandbox; return when it and every process it
    started are gone."""
    token = uuid.uuid4().hex[:16]
    groups = Cgroups(token, limits) if backend != "docker" else None
    if backend == "bwrap":
        cmd, env, cwd = bwrap_command(worker_root, limits, masks, worker_env(limits)), {"PATH": os.environ.get("PATH", "")}, "/"
    elif backend == "docker":
        cmd, env, cwd = docker_command(f"bnviz-{token}", worker_root, limits, docker_image or ""), dict(os.environ), "/"
    else:
        scratch = worker_root.parent / f"scratch-{token}"
        scratch.mkdir()
        cmd = [sys.executable, "-s", "-B", "-m", "bnviz.grading.worker"]
        env, cwd = worker_env(limits, str(worker_root), str(scratch)), str(scratch)
    pass_fds: tuple[int, ...] = ()
    if backend == "bwrap":  # options through a pipe: the sandbox's PID 1 shows no host paths in its cmdline
        options, tail = cmd[1:cmd.index("--")], cmd[cmd.index("--"):]
        read_end, write_end = os.pipe()
        data = b"".join(a.encode() + b"\0" for a in options)
        threading.Thread(target=_write_fd, args=(write_end, data), daemon=True).start()
        cmd, pass_fds = ["bwrap", "--args", str(read_end), *tail], (read_end,)
    if groups:
        cmd = groups.wrap(cmd)
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, cwd=cwd, start_new_session=True, pass_fds=pass_fds)
    finally:
        for fd in pass_fds:
            os.close(fd)
    state: dict = {}
    kill = lambda: _kill(proc, groups, backend, token)  # noqa: E731
    threads = [threading.Thread(target=_feed, args=(proc.stdin, request), daemon=True),
               threading.Thread(target=_read_capped, args=(proc.stdout, limits.report_bytes, 0, state, "report", kill), daemon=True),
               threading.Thread(target=_read_capped, args=(proc.stderr, limits.output_bytes, 64 * 1024, state, "log", kill), daemon=True)]
    for t in threads:
        t.start()
    timed_out = False
    try:
        proc.wait(timeout=limits.timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    kill()  # also catches anything the worker left behind after a normal exit
    proc.wait()
    for t in threads:
        t.join(timeout=30)
    events = groups.events() if groups else {}
    if groups:
        groups.close()
    if backend == "none":
        shutil.rmtree(cwd, ignore_errors=True)
    problem = _problem(state, limits, timed_out, proc.returncode, events)
    return Run(report=None if problem else state.get("report"), log_tail=state.get("log", b""),
               printed=state.get("log_total", 0), returncode=proc.returncode,
               elapsed_s=round(time.monotonic() - t0, 2), problem=problem)


def _kill(proc: subprocess.Popen, groups: Cgroups | None, backend: str, token: str) -> None:
    if backend == "docker":
        subprocess.run(["docker", "kill", f"bnviz-{token}"], capture_output=True, timeout=60)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    for pid in groups.pids() if groups else []:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _problem(state: dict, limits: Limits, timed_out: bool, rc: int | None, events: dict) -> str | None:
    mb = lambda n: f"{n / MiB:g} MB"  # noqa: E731
    if state.get("log_over"):
        return f"printed more than {mb(limits.output_bytes)} (output limit; killed, no score)"
    if state.get("report_over"):
        return f"report larger than {mb(limits.report_bytes)} (ignored; no score)"
    if timed_out:
        return f"timed out after {limits.timeout_s:g} s (killed; no score)"
    if rc in (-signal.SIGXCPU, 128 + signal.SIGXCPU, 128 + signal.SIGKILL, -signal.SIGKILL) and events.get("memory"):
        return f"memory limit ({mb(limits.memory_bytes + GiB)} resident) exceeded (killed; no score)"
    if rc in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
        return f"CPU time limit ({limits.for_worker()['cpu_seconds']} s) exceeded (killed; no score)"
    return None
