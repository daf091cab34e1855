"""Run the worker (``python -m bnviz.grading.worker``) for one submission in a sandbox.

Backends, in order of preference (``choose_backend``):

* ``bwrap`` (bubblewrap), never as root: a grader running as root starts bwrap as an unprivileged
  user (``users.py``: ``bnviz-grader``, created if missing, or ``Limits.user``) through
  ``setpriv``. New user (nested, ``--disable-userns``), mount, PID, network, IPC, UTS and cgroup
  namespaces, no capabilities, ``--die-with-parent``, ``--new-session``, and a seccomp filter
  (``seccomp.py``). The file system is an allow-list, read-only: ``/usr`` (and the ``/bin``,
  ``/lib`` links), a few files of ``/etc``, the Python installation and its virtual environment,
  a copy of ``worker.py`` at ``/opt/bnviz-worker``, ``/proc`` of its own PID namespace with
  ``/proc/sys`` read-only; ``/sys`` is not mounted. Writable: a private ``/tmp``, ``/scratch`` (the
  working folder) and ``/dev/shm``, size-limited tmpfs that vanish with the sandbox. Nothing of the
  host's work folders is visible: the submissions, the grades, the built assignment, the rest of
  ``bnviz`` (the checker) and the rest of ``/root`` / ``/home`` are not mounted, and any of them
  that lies under a mounted folder is covered by an empty tmpfs. ``prepare`` checks all this
  works (one test sandbox) before the first submission and says why not.
* ``docker``: the same worker in a container (``--network none``, read-only root, tmpfs
  ``/tmp`` and ``/scratch``, ``--pids-limit``, ``--memory``, ``--cap-drop ALL``, user 65534); needs
  an image with Python and torch (``--docker-image``).
* ``none``: no isolation at all; only with ``--no-sandbox``.

Limits (``Limits``): wall clock (the whole sandbox is killed), address space on top of what
Python + torch reserve (``RLIMIT_AS``, set by the worker before any student code runs), CPU time
per process (``RLIMIT_CPU``) and for the whole sandbox (its cgroup's usage, polled), file size,
bytes printed (read by us from a pipe; over the limit the sandbox is killed), size of the report.
Where the host lets us create cgroups (v1 or v2), each sandbox also gets its own ``pids``
(process count), ``memory`` and ``cpu`` cgroup (a quota of ``Limits.cpus`` cores and an equal
weight: a sandbox's hundred processes get one sandbox's share); without a ``cpu`` cgroup each
sandbox is pinned to its own cores (``CpuSlots``). ``RLIMIT_NPROC`` binds too: the sandbox user
is not root.

The request goes in on stdin; the report comes back on stdout; what the student prints comes back
on stderr (the worker redirects it). No host path is writable from inside.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from pathlib import Path

from . import seccomp, users

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
    shm_bytes: int = 64 * MiB  # /dev/shm
    cpus: float | None = None  # CPU cores one sandbox may use (cgroup cpu.max); default: threads
    user: str | None = None  # who sandboxes run as when the grader is root (default users.DEFAULT_USER)

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
    """None if bwrap can create the namespaces we use when started unprivileged, as every
    sandbox is (as root: as uid 65534 through setpriv), else its complaint and the likely cause
    (user namespaces disabled by the kernel, AppArmor, or a container's seccomp policy)."""
    cmd = ["bwrap", "--unshare-all", "--unshare-user", "--die-with-parent", "--cap-drop", "ALL", "--ro-bind", "/", "/",
           "--proc", "/proc", "--dev", "/dev", "--", "/bin/true"]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            return "`setpriv` (util-linux) is missing: the grader runs as root and needs it to start bwrap unprivileged"
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", *cmd]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd="/")
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    if proc.returncode == 0:
        return None
    why = users.userns_problem() or ("bwrap started by an unprivileged user could not create its namespaces: "
                                     "unprivileged user namespaces may be disabled, or a container's seccomp policy "
                                     "forbids them")
    return f"{(proc.stderr.strip() or f'exit status {proc.returncode}')[:300]} ({why})"


def bwrap_version() -> tuple[int, ...]:
    try:
        out = subprocess.run(["bwrap", "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ()
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(g or 0) for g in m.groups()) if m else ()


def make_worker_root(folder: Path) -> Path:
    """A minimal package tree holding only worker.py: what the sandbox may see of bnviz. World-
    readable whatever the umask: the sandbox user must read it (the folders above need not be
    open to it; see users.py)."""
    pkg = folder / "bnviz" / "grading"
    pkg.mkdir(parents=True, exist_ok=True)
    (folder / "bnviz" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    shutil.copyfile(Path(__file__).with_name("worker.py"), pkg / "worker.py")
    for d in (folder, folder / "bnviz", pkg):
        d.chmod(0o755)
    for f in (folder / "bnviz" / "__init__.py", pkg / "__init__.py", pkg / "worker.py"):
        f.chmod(0o644)
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


# What the sandbox's Python needs, found once per grading process by importing it on the host
# (``python_binds``): the worker's own imports, torch's lazily imported parts the strict pass uses,
# and matplotlib (a student's plot cell), each only if installed.
PROBE_CODE = r"""
import json, sys
import ast, builtins, ctypes, hashlib, importlib, io, math, os, re, resource, signal, struct, threading, time, types, warnings
for name in ("numpy", "torch", "torch._decomp", "torch._decomp.decompositions", "torch.autograd.forward_ad",
             "torch.func", "torch.utils._python_dispatch", "torch.nn.functional", "matplotlib", "matplotlib.pyplot"):
    try:
        importlib.import_module(name)
    except Exception:
        pass
try:  # what the worker does with them: a dispatch mode, backward, forward-mode AD, torch.save
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    with Mode():
        torch.nn.functional.batch_norm(x, None, None, training=True).sum().backward()
    torch.func.jvp(torch.sin, (x.detach(),), (x.detach(),))
    torch.save({"x": x.detach()}, io.BytesIO())
except Exception:
    pass
files = {getattr(m, "__file__", None) for m in list(sys.modules.values())}
with open("/proc/self/maps") as f:
    files |= {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}
print(json.dumps(sorted(f for f in files if f and f.startswith("/"))))
"""
_BINDS: list | None = None
_BINDS_LOCK = threading.Lock()


def python_binds() -> list[tuple[str, ...]]:
    """The parts of the Python installation the sandbox gets, instead of its folders whole (issue
    23: a file an instructor leaves in the prefix or the venv was readable). ``("bind", path)``
    (read-only, at the same path) or ``("symlink", target, path)``: the interpreter (and the chain
    of links ``sys.executable`` is), ``pyvenv.cfg``, the standard library folder (with its own
    ``site-packages`` emptied), the ``.pth`` files that only add folders to the path (not those
    that run an import), and in each ``site-packages`` only the top-level entries a probe
    import of what the worker and the strict pass import touched (torch, numpy and their
    dependencies, matplotlib where installed), with every ``*.dist-info``. Computed once per
    process by a probe run of the same interpreter; raises SandboxUnavailable if the probe fails."""
    global _BINDS
    with _BINDS_LOCK:
        if _BINDS is None:
            _BINDS = _compute_binds()
        return list(_BINDS)


def _probe_files() -> list[str]:
    import json

    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "MPLBACKEND": "Agg", "LANG": "C.UTF-8",
           "OMP_NUM_THREADS": "1", "HOME": tempfile.gettempdir()}
    try:
        proc = subprocess.run([sys.executable, "-s", "-B", "-c", PROBE_CODE], capture_output=True, text=True,
                              timeout=900, env=env, cwd="/")
        if proc.returncode != 0:
            raise ValueError(f"exit status {proc.returncode}: {proc.stderr.strip()[-300:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as e:
        raise SandboxUnavailable(f"could not list the files Python needs ({sys.executable} -c ...): {e}") from None


def _site_dir(path: Path) -> Path | None:
    for parent in path.parents:
        if parent.name in ("site-packages", "dist-packages"):
            return parent
    return None


def _top_level(info: Path) -> set[str]:
    """The top-level entries a ``*.dist-info`` folder's distribution installed (its RECORD)."""
    try:
        lines = (info / "RECORD").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return set()
    return {line.split(",", 1)[0].split("/", 1)[0] for line in lines if line and not line.startswith("..")}


def _dist_name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[\s;<>=!~\[(]", text.strip(), maxsplit=1)[0]).lower()


def _required_entries(site: Path, used: set[str]) -> set[str]:
    """The top-level entries of ``site`` that the distributions owning ``used`` install, with those
    of every distribution they require (``Requires-Dist`` without an ``extra`` marker),
    transitively, and their ``*.dist-info`` folders."""
    dists = {}
    for info in site.glob("*.dist-info"):
        try:
            meta = (info / "METADATA").read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        name = next((_dist_name(ln[5:]) for ln in meta.splitlines() if ln.startswith("Name:")), None)
        needs = {_dist_name(ln[14:]) for ln in meta.splitlines()
                 if ln.startswith("Requires-Dist:") and "extra ==" not in ln and "extra==" not in ln}
        if name:
            dists[name] = (info, _top_level(info), needs)
    todo = [n for n, (_, top, _) in dists.items() if top & used]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or name not in dists:
            continue
        seen.add(name)
        todo += list(dists[name][2])
    out = set()
    for name in seen:
        info, top, _ = dists[name]
        out |= {t for t in top if (site / t).exists() and not t.endswith(".pth") and t != "__pycache__"} | {info.name}
    return out


def _compute_binds() -> list[tuple[str, ...]]:
    roots = [Path(r) for r in _python_roots()]
    inside = lambda p: any(p == r or r in p.parents for r in roots)  # noqa: E731
    binds: dict[str, tuple[str, ...]] = {}
    site_dirs: set[Path] = set()
    exe = Path(sys.executable)  # the chain of links, each kept a link (Python finds pyvenv.cfg by it)
    for _ in range(40):
        if not inside(exe):
            break
        if exe.is_symlink():
            target = os.readlink(exe)
            binds[str(exe)] = ("symlink", target, str(exe))
            exe = (exe.parent / target) if not os.path.isabs(target) else Path(target)
            continue
        binds[str(exe)] = ("bind", str(exe))
        break
    for cfg in {Path(sys.prefix) / "pyvenv.cfg"}:
        if cfg.is_file():
            binds[str(cfg)] = ("bind", str(cfg))
    stdlib = Path(os.__file__).resolve().parent
    if inside(stdlib):
        binds[str(stdlib)] = ("bind", str(stdlib))
    for name in _probe_files():
        path = Path(name)
        if not inside(path) or not path.exists():
            continue
        site = _site_dir(path)
        if site is not None:
            entry = site / path.relative_to(site).parts[0]
            if entry.name.startswith("__editable__"):  # a pointer into a checkout (masked anyway)
                continue
            site_dirs.add(site)
            binds.setdefault(str(entry), ("bind", str(entry)))
        elif stdlib not in path.parents:
            binds.setdefault(str(path), ("bind", str(path)))  # e.g. libpython3.11.so.1.0
    import site as site_module

    for site in map(Path, site_module.getsitepackages()):  # .pth files that only add folders to the path
        for pth in site.glob("*.pth") if inside(site) else ():
            try:
                lines = pth.read_text(encoding="utf-8", errors="replace").splitlines()
            except OSError:
                continue
            if not any(line.startswith(("import ", "import\t")) for line in lines):
                binds.setdefault(str(pth), ("bind", str(pth)))
    for site in site_dirs:  # the distributions bound, what they require (lazy imports: sympy), their metadata
        for entry in _required_entries(site, {Path(b).name for b in binds if Path(b).parent == site}):
            binds.setdefault(str(site / entry), ("bind", str(site / entry)))
    own_site = stdlib / "site-packages"  # not on a venv's path; where no venv, refilled with what was bound
    masks = [("tmpfs", str(own_site))] if own_site.is_dir() else []
    ordered = sorted(binds.values(), key=lambda b: b[-1])
    return [b for b in ordered if b[0] == "bind" and Path(b[-1]) == stdlib] + masks + \
        [b for b in ordered if not (b[0] == "bind" and Path(b[-1]) == stdlib)]


ETC_FILES = ["/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/passwd",
             "/etc/group", "/etc/nsswitch.conf", "/etc/hosts", "/etc/alternatives"]


WORKER_FILES = ("bnviz/__init__.py", "bnviz/grading/__init__.py", "bnviz/grading/worker.py")


def bwrap_command(worker_root: Path, limits: Limits, masks: list[Path], env: dict[str, str],
                  sources: dict[str, str] | None = None, disable_userns: bool = True,
                  program: list[str] | None = None, worker_fds: dict[str, int] | None = None) -> list[str]:
    """bwrap's command line. ``sources`` maps a host folder (a Python root, the worker root) to
    the path bwrap binds it from (a staging mount, see users.py); by default the folder itself.
    ``worker_fds`` (``WORKER_FILES`` -> a readable fd): the worker's files are copied into the
    sandbox's own read-only root instead of bound, so no mount (``/proc/self/mountinfo``) names
    the grading run's temporary folder."""
    src = (sources or {}).get
    cmd = ["bwrap", "--unshare-all", "--unshare-user", *(["--disable-userns"] if disable_userns else []),
           "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--hostname", "sandbox",
           # the worker is the sandbox's PID 1: no bwrap reaper inside, whose memory (no seccomp filter, dumpable)
           # the student's process could rewrite through /proc/1/mem (issue 23); the worker makes itself non-dumpable
           "--as-pid-1", "--ro-bind", "/usr", "/usr"]
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
    binds, bound = [], []
    for bind in python_binds():  # the interpreter's parts, not its folders whole
        if bind[0] == "symlink":
            binds += ["--symlink", bind[1], bind[2]]
        elif bind[0] == "tmpfs":
            binds += ["--tmpfs", bind[1]]
        else:
            binds += ["--ro-bind", _source(src, bind[1]), bind[1]]
            bound.append(bind[1])
    # secret folders that happen to lie inside the Python installation: an empty tmpfs, under the
    # parts bound into it (if any), over them otherwise
    under = lambda m, paths: any(m == r or m.startswith(r.rstrip("/") + "/") for r in paths)  # noqa: E731
    hide = [str(m) for m in masks if under(str(m), _python_roots() + ["/usr"]) and os.path.isdir(m)]
    first = [m for m in hide if any(b.startswith(m.rstrip("/") + "/") for b in bound)]
    cmd += [a for m in first for a in ("--tmpfs", m)] + binds + [a for m in hide if m not in first for a in ("--tmpfs", m)]
    # /proc/sys read-only after --proc (bwrap leaves it writable where its own write test fails);
    # /sys is not mounted at all; /dev/shm is a sized tmpfs (bwrap's --dev leaves it unbounded)
    if worker_fds:
        cmd += ["--dir", WORKER_ROOT, "--dir", f"{WORKER_ROOT}/bnviz", "--dir", f"{WORKER_ROOT}/bnviz/grading"]
        for rel in WORKER_FILES:
            cmd += ["--file", str(worker_fds[rel]), f"{WORKER_ROOT}/{rel}"]
    else:
        cmd += ["--ro-bind", src(str(worker_root), str(worker_root)), WORKER_ROOT]
    cmd += ["--proc", "/proc",
            "--ro-bind", "/proc/sys", "/proc/sys", "--dev", "/dev",
            # no pseudo-terminal at all (bwrap's private devpts has no maximum; issue 23's submission held
            # 3,071 and starved its neighbours): /dev/ptmx is a link to pts/ptmx, which becomes /dev/null
            "--ro-bind", "/dev/null", "/dev/pts/ptmx", "--size", str(limits.shm_bytes), "--tmpfs", "/dev/shm",
            "--size", size, "--tmpfs", "/scratch", "--remount-ro", "/dev", "--remount-ro", "/",
            "--chdir", "/scratch", "--clearenv"]  # the root and /dev: bwrap's own tmpfs, unbounded: read-only
    for k, v in env.items():
        cmd += ["--setenv", k, v]
    return cmd + ["--", *(program or [sys.executable, "-s", "-B", "-m", "bnviz.grading.worker"])]


def _source(src, path: str) -> str:
    """Where bwrap binds ``path`` from: under its Python root's staging mount where there is one."""
    for root in _python_roots():
        if path == root or path.startswith(root.rstrip("/") + "/"):
            staged = src(root, root)
            return staged + path[len(root):]
    return path


def worker_env(limits: Limits, root: str = WORKER_ROOT, home: str = "/scratch") -> dict[str, str]:
    n = str(limits.threads)
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": "/tmp", "PYTHONPATH": root,
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", "LANG": "C.UTF-8",
            "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n,
            "BNVIZ_GRADING": "1"}  # a notebook's own switch: assignment 2 skips its experiments under grading


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


# --------------------------------------------------------------------------- who runs it, and how


@dataclasses.dataclass(frozen=True)
class Plan:
    """How bwrap sandboxes start on this host (``prepare``): as which user, through a staging
    mount or not, with which seccomp program."""
    user: users.SandboxUser | None  # None: the grader is unprivileged and bwrap runs as it
    stage: bool  # bind the Python roots and the worker root through a private staging mount
    seccomp: bytes
    disable_userns: bool  # bwrap >= 0.8


_PLANS: dict[str | None, Plan] = {}
_PLANS_LOCK = threading.Lock()


def prepare(limits: Limits) -> Plan:
    """Resolve (or create) the sandbox user, compile the seccomp filter and start one sandbox
    that imports Python's standard library as that user; once per user name. Raises
    SandboxUnavailable, with the reason and the fix, before any student code runs."""
    with _PLANS_LOCK:
        if limits.user not in _PLANS:
            _PLANS[limits.user] = _make_plan(limits)
        return _PLANS[limits.user]


def _make_plan(limits: Limits) -> Plan:
    try:
        user = users.resolve(limits.user)
        program = seccomp.program()
    except (users.NoSandboxUser, seccomp.SeccompUnavailable) as e:
        raise SandboxUnavailable(str(e)) from None
    version = bwrap_version()
    if version and version < (0, 8):
        warnings.warn(f"bwrap {'.'.join(map(str, version))} is older than 0.8 and has no --disable-userns: the "
                      "seccomp filter alone stops new user namespaces in the sandbox; upgrade bubblewrap", stacklevel=3)
    plan = Plan(user, user is not None, program, not version or version >= (0, 8))
    with tempfile.TemporaryDirectory(prefix="bnviz-probe-") as tmp:
        root = make_worker_root(Path(tmp) / "w")
        code = "import json, os, encodings.idna; print(os.getuid())"
        launch = _launch(plan, root, limits, [], None, [], [sys.executable, "-s", "-B", "-c", code])
        try:
            proc = subprocess.run(launch.cmd, capture_output=True, text=True, timeout=60, pass_fds=launch.fds, cwd="/",
                                  env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        except (OSError, subprocess.TimeoutExpired) as e:
            proc = subprocess.CompletedProcess(launch.cmd, -1, "", str(e))
        finally:
            launch.close()
    if proc.returncode != 0 or proc.stdout.strip() != str(user.uid if user else os.geteuid()):
        raise SandboxUnavailable(_probe_failure(plan, proc))
    return plan


def _probe_failure(plan: Plan, proc: subprocess.CompletedProcess) -> str:
    who = f"user {plan.user.name} (uid {plan.user.uid})" if plan.user else "this user"
    text = f"a test sandbox as {who} failed (exit status {proc.returncode}): {proc.stderr.strip()[-400:]}"
    bad = [f for r in _python_roots() for f in users.unreadable(r, plan.user)][:3]
    if bad:
        text += (f". {who} cannot read {', '.join(bad)}: make the Python installation world-readable "
                 "(`chmod -R o+rX` on it), or install Python where every user can read it (/usr/local, /opt), "
                 "or pass --sandbox-user with an account that can read it")
    elif "Permission denied" in proc.stderr and not plan.stage:
        text += (f". {who} cannot reach the Python installation ({sys.base_prefix}, {sys.prefix}): a folder above "
                 "it is closed to others; install Python where every user can read it (/usr/local, /opt)")
    elif plan.stage and "mount" in proc.stderr:
        text += (". Root could not make its private staging mount (`unshare --mount`): does this container "
                 "lack CAP_SYS_ADMIN? Run the grader as an unprivileged user instead")
    hint = users.userns_problem()
    return text + (f" ({hint})" if hint else "")


@dataclasses.dataclass
class Launch:
    cmd: list[str]
    fds: tuple[int, ...]
    stage_dir: Path | None

    def close(self) -> None:
        """Close our copies of the fds passed on; remove the (host-side empty) staging folder."""
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        if self.stage_dir:
            try:
                self.stage_dir.rmdir()
            except OSError:
                pass


def _launch(plan: Plan, worker_root: Path, limits: Limits, masks: list[Path], groups: "Cgroups | None",
            pin: list[int], program: list[str] | None = None) -> Launch:
    """The command that starts one bwrap sandbox: a shell (root, if the grader is) that makes
    the staging mount, joins the cgroups and execs ``[taskset] [setpriv] bwrap --args FD``.
    bwrap gets its options through a pipe, so the sandbox's PID 1 shows no host path."""
    sources, script, stage = {}, [], None
    if plan.stage:
        stage = Path(tempfile.mkdtemp(prefix="bnviz-stage-", dir="/tmp"))
        script.append(f"mount -t tmpfs -o size=64k,mode=0755 bnviz-stage {shlex.quote(str(stage))}")
        for i, root in enumerate(_python_roots()):
            sources[root] = f"{stage}/{i}"
            script.append(f"mkdir {shlex.quote(sources[root])} && mount --bind {shlex.quote(root)} {shlex.quote(sources[root])}")
    worker_fds = {rel: seccomp.pipe_fd((worker_root / rel).read_bytes()) for rel in WORKER_FILES}
    cmd = bwrap_command(worker_root, limits, masks, worker_env(limits), sources, plan.disable_userns, program,
                        worker_fds)
    options, tail = cmd[1:cmd.index("--")], cmd[cmd.index("--"):]
    filter_fd = seccomp.pipe_fd(plan.seccomp)
    args_fd = seccomp.pipe_fd(b"".join(a.encode() + b"\0" for a in options + ["--seccomp", str(filter_fd)]))
    for f in groups.procs() if groups else []:
        script.append(f"echo $$ > {shlex.quote(f)} || exit 97")
    prefix = (["taskset", "-c", ",".join(map(str, pin))] if pin else []) + (plan.user.setpriv() if plan.user else [])
    script.append("exec " + shlex.join([*prefix, "bwrap", "--args", str(args_fd), *tail]))
    shell = ["/bin/sh", "-c", "set -e\n" + "\n".join(script)]
    if stage:
        shell = ["unshare", "--mount", "--propagation", "private", *shell]
    return Launch(shell, (args_fd, filter_fd, *worker_fds.values()), stage)


# --------------------------------------------------------------------------- cgroups


CPU_PERIOD_US = 100_000


class Cgroups:
    """Per-sandbox ``pids``, ``memory`` and ``cpu`` cgroups where the host lets us create them
    (cgroup v1 controllers, or a v2 hierarchy with the controllers enabled); silently nothing
    otherwise. ``cpu``: a quota of ``Limits.cpus`` cores (``cpu.max`` / ``cpu.cfs_quota_us``) and
    the same weight for every sandbox, so one sandbox's processes, however many, get no more CPU
    than one other sandbox; its CPU time, all processes together, is read from ``cpuacct.usage``
    (v1) or ``cpu.stat`` (v2)."""

    def __init__(self, token: str, limits: Limits):
        self.dirs: dict[str, Path] = {}
        quota = int(CPU_PERIOD_US * (limits.cpus or limits.threads))
        settings = {"pids": {"pids.max": limits.processes},
                    "memory": {"memory.limit_in_bytes": limits.memory_bytes + GiB, "memory.max": limits.memory_bytes + GiB},
                    "cpu": {"cpu.cfs_period_us": CPU_PERIOD_US, "cpu.cfs_quota_us": quota, "cpu.shares": 1024,
                            "cpu.max": f"{quota} {CPU_PERIOD_US}", "cpu.weight": 100},
                    "cpuacct": {}}  # v1 only: nothing to set, the usage is what we want
        for controller, files in settings.items():
            base = self._base(controller)
            if base is not None:
                self._make(controller, base / f"{self.prefix()}{token}", files)

    @staticmethod
    def prefix() -> str:
        """Sandbox cgroups are named ``bnviz-<grader pid>-<token>``: what one grader made (or
        left behind) can be told from another grader's on the same host."""
        return f"bnviz-{os.getpid()}-"

    def _make(self, controller: str, d: Path, files: dict) -> None:
        shared = next((p for p in self.dirs.values() if p.resolve() == d.resolve()), None)  # v2, or v1 cpu,cpuacct
        try:
            if shared is None:
                d.mkdir()
            wrote = 0
            for name, value in files.items():
                if (d / name).exists():
                    (d / name).write_text(str(value))
                    wrote += 1
            if wrote or (controller == "cpuacct" and (d / "cpuacct.usage").exists()):
                self.dirs[controller] = d
            elif shared is None:
                d.rmdir()
        except OSError:
            if shared is None:
                try:
                    d.rmdir()
                except OSError:
                    pass

    def unique_dirs(self) -> list[Path]:
        out: list[Path] = []
        for d in self.dirs.values():
            if all(d.resolve() != o.resolve() for o in out):
                out.append(d)
        return out

    def procs(self) -> list[str]:
        """The ``cgroup.procs`` files a new sandbox joins."""
        return [str(d / "cgroup.procs") for d in self.unique_dirs()]

    def cpu_seconds(self) -> float | None:
        """CPU time used by every process of the sandbox so far (None: not measured here)."""
        for d in self.unique_dirs():
            try:
                if (d / "cpuacct.usage").exists():
                    return int((d / "cpuacct.usage").read_text()) / 1e9
                for line in (d / "cpu.stat").read_text().splitlines():
                    if line.startswith("usage_usec "):
                        return int(line.split()[1]) / 1e6
            except (OSError, ValueError):
                continue
        return None

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
        procs = self.procs()
        if not procs:
            return cmd
        script = 'for f in "$@"; do [ "$f" = -- ] && break; echo $$ > "$f" || exit 97; shift; done; shift; exec "$@"'
        return ["/bin/sh", "-c", script, "sh", *procs, "--", *cmd]

    def pids(self) -> list[int]:
        out = set()
        for d in self.unique_dirs():
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
        for d in self.unique_dirs():
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


class CpuSlots:
    """Where no ``cpu`` cgroup can be made: pin each sandbox to its own cores (``taskset``), the
    cores least used by the sandboxes running now. The seccomp filter forbids
    ``sched_setaffinity``, so a sandbox cannot leave them."""

    def __init__(self):
        self.lock, self.use = threading.Lock(), {c: 0 for c in sorted(os.sched_getaffinity(0))}

    def take(self, n: int) -> list[int]:
        with self.lock:
            if n >= len(self.use):
                return []  # the whole machine: nothing to pin
            cores = sorted(self.use, key=lambda c: (self.use[c], c))[:n]
            for c in cores:
                self.use[c] += 1
            return cores

    def give(self, cores: list[int]) -> None:
        with self.lock:
            for c in cores:
                self.use[c] -= 1


CPU_SLOTS = CpuSlots()


def run_worker(request: bytes, backend: str, limits: Limits, worker_root: Path, masks: list[Path],
               docker_image: str | None = None) -> Run:
    """Run the worker on one request in a fresh sandbox; return when it and every process it
    started are gone."""
    token = uuid.uuid4().hex[:16]
    plan = prepare(limits) if backend == "bwrap" else None
    groups = Cgroups(token, limits) if backend != "docker" else None
    pin = CPU_SLOTS.take(max(1, round(limits.cpus or limits.threads))) if backend == "bwrap" and "cpu" not in groups.dirs else []
    launch = Launch([], (), None)
    if backend == "bwrap":
        launch = _launch(plan, worker_root, limits, masks, groups, pin)
        cmd, env, cwd = launch.cmd, {"PATH": os.environ.get("PATH", "")}, "/"
    elif backend == "docker":
        cmd, env, cwd = docker_command(f"bnviz-{token}", worker_root, limits, docker_image or ""), dict(os.environ), "/"
    else:
        scratch = worker_root.parent / f"scratch-{token}"
        scratch.mkdir()
        cmd = groups.wrap(_none_user(limits, worker_root, scratch) + [sys.executable, "-s", "-B", "-m", "bnviz.grading.worker"])
        env, cwd = worker_env(limits, str(worker_root), str(scratch)), str(scratch)
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, cwd=cwd, start_new_session=True, pass_fds=launch.fds)
    finally:
        for fd in launch.fds:
            os.close(fd)
        launch.fds = ()
    state: dict = {}
    kill = lambda: _kill(proc, groups, backend, token)  # noqa: E731
    threads = [threading.Thread(target=_feed, args=(proc.stdin, request), daemon=True),
               threading.Thread(target=_read_capped, args=(proc.stdout, limits.report_bytes, 0, state, "report", kill), daemon=True),
               threading.Thread(target=_read_capped, args=(proc.stderr, limits.output_bytes, 64 * 1024, state, "log", kill), daemon=True)]
    for t in threads:
        t.start()
    over = _wait(proc, limits, groups, t0, backend)
    kill()  # also catches anything the worker left behind after a normal exit
    proc.wait()
    for t in threads:
        t.join(timeout=30)
    events = groups.events() if groups else {}
    if groups:
        groups.close()
    launch.close()
    CPU_SLOTS.give(pin)
    if backend == "none":
        shutil.rmtree(cwd, ignore_errors=True)
    problem = _problem(state, limits, over, proc.returncode, events)
    return Run(report=None if problem else state.get("report"), log_tail=state.get("log", b""),
               printed=state.get("log_total", 0), returncode=proc.returncode,
               elapsed_s=round(time.monotonic() - t0, 2), problem=problem)


def _none_user(limits: Limits, worker_root: Path, scratch: Path) -> list[str]:
    """``none`` as root with ``Limits.user`` named (the Gradescope autograder, gradescope.py): the
    worker still drops to that unprivileged user (setpriv), in a scratch folder it owns; nothing
    else is isolated. Otherwise no prefix (the worker runs as the grader)."""
    if os.geteuid() != 0 or not limits.user:
        return []
    user = users.resolve(limits.user)
    os.chown(scratch, user.uid, user.gid)
    worker_root.parent.chmod(0o711)  # the user reaches the worker's files and its scratch, lists nothing
    return user.setpriv()


def _wait(proc: subprocess.Popen, limits: Limits, groups: Cgroups | None, t0: float, backend: str) -> str | None:
    """Wait for the sandbox to end; "wall" or "cpu" if a time limit ran out first. The CPU time
    is the sandbox's, all its processes together: its cgroup's usage, checked four times a
    second, or without a cpu cgroup the processes of its PID namespace (bwrap), once a second."""
    cpu_limit, namespace, polls = limits.for_worker()["cpu_seconds"], None, 0
    while True:
        left = limits.timeout_s - (time.monotonic() - t0)
        if left <= 0:
            return "wall"
        try:
            proc.wait(timeout=min(0.25, left))
            return None
        except subprocess.TimeoutExpired:
            polls += 1
            used = groups.cpu_seconds() if groups else None
            if used is None and backend == "bwrap" and polls % 4 == 0:
                namespace = namespace or _pid_namespace(proc.pid)
                used = _namespace_cpu_seconds(namespace) if namespace else None
            if used is not None and used > cpu_limit:
                return "cpu"


def _pid_namespace(pid: int) -> int | None:
    """The PID namespace (inode) of bwrap's child: the sandbox's."""
    try:
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            ns = os.stat(f"/proc/{child}/ns/pid").st_ino
            if ns != os.stat("/proc/self/ns/pid").st_ino:
                return ns
    except OSError:
        pass
    return None


def _namespace_cpu_seconds(namespace: int) -> float:
    """CPU time of the live processes in a PID namespace, with what each has reaped (the
    namespace's init reaps the orphans, so the dead count too)."""
    ticks = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if os.stat(f"/proc/{entry.name}/ns/pid").st_ino == namespace:
                    fields = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
                    ticks += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
            except (OSError, ValueError):
                pass
    return ticks / os.sysconf("SC_CLK_TCK")


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


def _problem(state: dict, limits: Limits, over: str | None, rc: int | None, events: dict) -> str | None:
    mb = lambda n: f"{n / MiB:g} MB"  # noqa: E731
    if state.get("log_over"):
        return f"printed more than {mb(limits.output_bytes)} (output limit; killed, no score)"
    if state.get("report_over"):
        return f"report larger than {mb(limits.report_bytes)} (ignored; no score)"
    if over == "wall":
        return f"timed out after {limits.timeout_s:g} s (killed; no score)"
    if over == "cpu":
        return (f"CPU time limit ({limits.for_worker()['cpu_seconds']} s, all its processes together) exceeded "
                "(killed; no score)")
    if rc in (-signal.SIGXCPU, 128 + signal.SIGXCPU, 128 + signal.SIGKILL, -signal.SIGKILL) and events.get("memory"):
        return f"memory limit ({mb(limits.memory_bytes + GiB)} resident) exceeded (killed; no score)"
    if rc in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
        return f"CPU time limit ({limits.for_worker()['cpu_seconds']} s) exceeded (killed; no score)"
    return None
