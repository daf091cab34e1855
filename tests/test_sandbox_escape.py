"""Escapes tried from inside a real sandbox, the way a submission would (notebook code cells), and
fair CPU between two sandboxes (issue 17, items 1 and 4).

The grader runs as root here and in CI, as on most instructors' servers: every test below checks
that student code does NOT run as host root and that each way out the issue found (or that a
careful attacker would try next) fails. The submissions are the assignment's solution notebook
(it grades 19/19 as it is) with hostile cells inserted after its ``import torch`` cell, with the
helpers of test_grading.py; they are graded with ``grade_folder`` in bubblewrap sandboxes. Without
bwrap the tests are skipped, or fail when ``BNVIZ_REQUIRE_SANDBOX=1`` (CI). About 1 minute.
"""

from __future__ import annotations

import copy
import json
import os
import pwd
import re
import threading
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("otter", reason="otter-grader is not installed (pip install -e .[grading])")
pytest.importorskip("torch")

from bnviz import grading  # noqa: E402
from bnviz.grading import sandbox, seccomp, users  # noqa: E402
from test_grading import _hostile, _write  # noqa: E402

pytestmark = pytest.mark.grading

REPO = Path(__file__).resolve().parent.parent
SOLUTION = REPO / "notebooks" / "assignments" / "batch_norm" / "batch_norm.ipynb"
MARK = uuid.uuid4().hex[:12]
SHM_BYTES = 16 << 20


@pytest.fixture(scope="module")
def solution() -> dict:
    return json.loads(SOLUTION.read_text(encoding="utf-8"))


# ------------------------------------------------------------------ the hostile cells
# Each prints "ESC <name> <result>" lines; the tests read them back from the student's log.
SYSCALLS = r'''
import ctypes, errno, os, struct
_libc = ctypes.CDLL(None, use_errno=True)
_NR = %(numbers)r
def _esc(name, rc):
    print("ESC", name, rc, errno.errorcode.get(ctypes.get_errno(), "OK") if rc == -1 else "OK", flush=True)
def _sys(name, *args):
    ctypes.set_errno(0)
    _esc(name, _libc.syscall(_NR[name], *args))
# each would succeed in an ordinary process (the keyring, ptrace, io_uring, perf, process_vm_readv)
_esc("keyctl", _libc.syscall(_NR["keyctl"], 0, -3, 1))  # KEYCTL_GET_KEYRING_ID of the session keyring
_sys("add_key", b"user", b"bnviz-%(mark)s", b"planted", 7, -4)  # into the user keyring
_sys("request_key", b"user", b"bnviz-%(mark)s", None, 0)
_sys("unshare", 0x10000000)  # CLONE_NEWUSER
_sys("setns", 0, 0)
_sys("mount", b"none", b"/tmp", b"tmpfs", 0, None)
_sys("umount2", b"/tmp", 2)
_sys("pivot_root", b"/tmp", b"/tmp")
_sys("bpf", 0, ctypes.c_char_p(struct.pack("IIII", 2, 4, 4, 1)), 16)  # BPF_MAP_CREATE, an array
_params = ctypes.create_string_buffer(120)
_sys("io_uring_setup", 1, _params)
_attr = ctypes.create_string_buffer(struct.pack("IIQ", 1, 128, 0) + bytes(8) + struct.pack("Q", 0b1100000) + bytes(96))
_sys("perf_event_open", _attr, 0, -1, -1, 0)  # a software clock on itself, user space only
_sys("userfaultfd", 0)
_sys("kexec_load", 0, 0, None, 0)
_sys("init_module", None, 0, b"")
_sys("open_by_handle_at", -100, None, 0)
_buf = ctypes.create_string_buffer(8)
_iov = struct.pack("PN", ctypes.addressof(_buf), 8)
_sys("process_vm_readv", os.getpid(), _iov, 1, _iov, 1, 0)
_sys("sched_setaffinity", 0, 8, ctypes.byref(ctypes.c_ulong(1)))
_pid = os.fork()
if _pid == 0:  # ptrace and a raw clone in a child, so a surprise cannot disturb this process
    ctypes.set_errno(0)
    _esc("ptrace", _libc.syscall(_NR["ptrace"], 0, 0, 0, 0))  # PTRACE_TRACEME
    ctypes.set_errno(0)
    _rc = _libc.syscall(_NR["clone"], 0x10000000 | 17, 0, 0, 0, 0)  # CLONE_NEWUSER | SIGCHLD
    if _rc == 0:
        os._exit(0)
    _esc("clone_newuser", _rc)
    ctypes.set_errno(0)
    _esc("clone3", _libc.syscall(_NR["clone3"], None, 0))
    os._exit(0)
os.waitpid(_pid, 0)
'''
FILES = r'''
import os
def _try(name, fn):
    try:
        print("ESC", name, "SUCCEEDED", repr(fn())[:80], flush=True)
    except OSError as e:
        print("ESC", name, "blocked", type(e).__name__, e.errno, flush=True)
_try("core_pattern", lambda: open("/proc/sys/kernel/core_pattern", "w").write(%(core_pattern)r))
_try("proc_sys_other", lambda: open("/proc/sys/kernel/hostname", "w").write("sandbox"))
_try("sys_write", lambda: open("/sys/kernel/uevent_helper", "w").write("/tmp/x"))
_try("canary", lambda: open(%(canary)r).read())
_try("root_write", lambda: open("/root/pwned-%(mark)s", "w").write("x"))
_try("rootfs_write", lambda: open("/pwned-%(mark)s", "w").write("x"))
_try("dev_write", lambda: open("/dev/pwned-%(mark)s", "w").write("x"))
print("ESC proc_keys", len(open("/proc/keys").read().splitlines()), flush=True)
for _d in %(homes)r:
    try:
        print("ESC listdir", _d, sorted(os.listdir(_d)), flush=True)
    except OSError as e:
        print("ESC listdir", _d, "blocked", e.errno, flush=True)
_found = []
for _dir, _subs, _files in os.walk("/"):
    if _dir.startswith(("/proc", "/sys", "/dev", "/usr")) or "site-packages" in _dir:
        _subs[:] = []
        continue
    _found += [os.path.join(_dir, f) for f in _files if "bnviz-canary" in f]
print("ESC canary_search", _found, flush=True)
_n = 0
try:
    with open("/dev/shm/fill", "wb") as _f:
        for _ in range(4 * %(shm)d >> 20):
            _f.write(b"x" * (1 << 20))
            _n += 1
except OSError as e:
    print("ESC shm_full", _n, e.errno, flush=True)
print("ESC shm_written", _n, flush=True)
print("ESC ids", os.getuid(), os.geteuid(), os.getgid(), len(os.getgroups()), flush=True)
print("ESC status", *[l.split()[1] for l in open("/proc/self/status") if l.startswith(("CapEff", "NoNewPrivs", "Seccomp:"))], flush=True)
import subprocess, sys
_sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "uid-probe-%(mark)s"])
import time
time.sleep(4)  # the host looks at it now
'''
TORCH_WORKS = r'''
import threading, torch
_t = threading.Thread(target=lambda: print("ESC thread", float(torch.ones(64, 64).matmul(torch.ones(64, 64)).sum()), flush=True))
_t.start(); _t.join()
'''


def _syscall_numbers() -> dict[str, int]:
    import pyseccomp as sc

    names = ["keyctl", "add_key", "request_key", "unshare", "setns", "mount", "umount2", "pivot_root", "bpf",
             "io_uring_setup", "perf_event_open", "userfaultfd", "kexec_load", "init_module", "open_by_handle_at",
             "process_vm_readv", "sched_setaffinity", "ptrace", "clone", "clone3"]
    return {n: sc.resolve_syscall(sc.Arch.NATIVE, n) for n in names}


def _host_uids(marker: str, seconds: float, out: list) -> None:
    """Real and effective uid (host view) of the sandboxed process whose command line holds marker."""
    end = time.monotonic() + seconds
    while time.monotonic() < end and not out:
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                    status = (entry / "status").read_text()
                    out.append([int(x) for x in re.search(r"^Uid:\s+(.*)$", status, re.M).group(1).split()])
            except (OSError, AttributeError):
                pass
        time.sleep(0.2)


@pytest.fixture(scope="module")
def escaped(bwrap, solution, tmp_path_factory):
    """One hostile submission graded as root would grade it; what it printed, and the host's view."""
    canary = Path("/root") / f"bnviz-canary-{MARK}"
    homes = sorted({"/root", str(Path.home()), "/home"})
    core_pattern = Path("/proc/sys/kernel/core_pattern").read_text().rstrip("\n")  # written back unchanged
    fmt = {"mark": MARK, "numbers": _syscall_numbers(), "core_pattern": core_pattern, "canary": str(canary),
           "homes": homes, "shm": SHM_BYTES}
    subs, out = tmp_path_factory.mktemp("esc-subs"), tmp_path_factory.mktemp("esc-grades")
    _write(subs / "escaper.ipynb", _hostile(solution, SYSCALLS % fmt, FILES % fmt, TORCH_WORKS))
    canary.write_text(f"secret {MARK}")
    uids: list = []
    sandbox.python_binds()  # the interpreter probe (once per run, a minute under load) before the watch starts
    watcher = threading.Thread(target=_host_uids, args=(f"uid-probe-{MARK}", 120, uids), daemon=True)
    watcher.start()
    try:
        limits = sandbox.Limits(timeout_s=120, threads=1, shm_bytes=SHM_BYTES)
        res = grading.grade_folder(subs, out, limits=limits, log=lambda *a: None)[0]
    finally:
        canary.unlink()
    watcher.join(timeout=5)
    log = (out / "logs" / "escaper.log").read_text(errors="replace")
    lines = {}
    for line in log.splitlines():
        if line.startswith("ESC "):
            parts = line.split()
            key = " ".join(parts[1:3]) if parts[1] == "listdir" else parts[1]
            lines[key] = parts[2:] if parts[1] != "listdir" else parts[3:]
    return {"res": res, "log": log, "esc": lines, "uids": uids, "core_pattern": core_pattern, "homes": homes}


def _sandbox_uid() -> int:
    if os.geteuid() != 0:
        return os.geteuid()
    return pwd.getpwnam(users.DEFAULT_USER).pw_uid


# ------------------------------------------------------------------ the tests


def test_student_code_runs_as_the_unprivileged_host_user(escaped):
    uid = _sandbox_uid()
    assert uid != 0
    assert escaped["uids"], "the host never saw the sandbox's probe process: " + escaped["log"][-1500:]
    assert set(escaped["uids"][0]) == {uid}, escaped["uids"]  # real, effective, saved, fs uid on the HOST
    ids = escaped["esc"]["ids"]
    assert ids[0] == ids[1] == str(uid) and ids[3] == "0", ids  # inside too; no supplementary groups
    cap_eff, no_new_privs, seccomp_mode = escaped["esc"]["status"]
    assert int(cap_eff, 16) == 0 and no_new_privs == "1" and seccomp_mode == "2", escaped["esc"]["status"]


@pytest.mark.parametrize("call", ["keyctl", "add_key", "request_key", "unshare", "setns", "mount", "umount2",
                                  "pivot_root", "bpf", "io_uring_setup", "perf_event_open", "userfaultfd",
                                  "kexec_load", "init_module", "open_by_handle_at", "process_vm_readv",
                                  "sched_setaffinity", "ptrace", "clone_newuser"])
def test_dangerous_system_calls_fail_inside(escaped, call):
    rc, err = escaped["esc"].get(call, [None, None])
    assert rc == "-1", (call, rc, err, escaped["log"][-1500:])
    assert err == "EPERM", (call, err)  # the seccomp filter's answer


def test_clone3_says_enosys_so_threads_fall_back_to_clone(escaped):
    assert escaped["esc"]["clone3"][:2] == ["-1", "ENOSYS"]
    assert escaped["esc"]["thread"] == [str(64.0 ** 3)]  # torch and a thread still work under the filter


def test_core_pattern_and_sys_are_read_only(escaped):
    for name in ("core_pattern", "proc_sys_other", "sys_write"):
        assert escaped["esc"][name][0] == "blocked", (name, escaped["esc"][name])
    assert Path("/proc/sys/kernel/core_pattern").read_text().rstrip("\n") == escaped["core_pattern"]


def test_root_home_and_canary_are_unreachable(escaped):
    esc = escaped["esc"]
    assert esc["canary"][0] == "blocked" and esc["canary_search"] == ["[]"], esc["canary"]
    for name in ("root_write", "rootfs_write", "dev_write"):
        assert esc[name][0] == "blocked", (name, esc[name])
    # a home folder shows at most the path to a bound Python root (e.g. /root/.pyenv), nothing else
    for home in escaped["homes"]:
        seen = " ".join(esc[f"listdir {home}"])
        allowed = {r[len(home) + 1:].split("/")[0] for r in sandbox._python_roots() if r.startswith(home + "/")}
        listed = set(re.findall(r"'([^']*)'", seen))
        assert listed <= allowed, (home, listed, allowed)
    assert f"secret {MARK}" not in escaped["log"]


def test_keyring_is_closed(escaped):
    assert escaped["esc"]["proc_keys"] == ["0"]  # no key of the host's (or of anyone) is visible
    assert f"bnviz-{MARK}" not in Path("/proc/keys").read_text()  # nothing planted


def test_dev_shm_is_bounded(escaped):
    written = int(escaped["esc"]["shm_written"][0])
    assert escaped["esc"]["shm_full"][1] == "28"  # ENOSPC
    assert written <= SHM_BYTES >> 20


def test_escaper_is_still_graded(escaped):
    assert escaped["res"]["total"] == escaped["res"]["possible_total"] == 19, escaped["res"]["error"]


# ------------------------------------------------------------------ fair CPU

CPU_HOG = r'''
import os, time
if not os.path.exists("/tmp/hog-until"):  # one deadline for the normal and the strict pass
    open("/tmp/hog-until", "w").write(str(time.time() + %(seconds)d))
_until = float(open("/tmp/hog-until").read())
for _ in range(%(processes)d):  # busy processes, each in its own session, as in issue 17
    try:
        if os.fork() == 0:
            os.setsid()
            while time.time() < _until:
                pass
            os._exit(0)
    except OSError:  # the pids limit
        break
while time.time() < _until:
    pass
'''
SLOW_BUT_HONEST = r'''
import time
_t = time.process_time()
while time.process_time() - _t < 2.0:  # an honest but slow experiment: 2 CPU-seconds, run while the hog runs
    pass
'''


def test_honest_submission_keeps_its_marks_beside_a_cpu_hog(bwrap, solution, tmp_path):
    """GRADE_JOBS=2 and GRADE_TIMEOUT=60, as in issue 17: the hog's 121 processes share one
    sandbox's CPU share (cgroup cpu.max and weight, or one pinned core) for the whole minute.
    The honest notebook ends with 2 CPU-seconds of work of its own (run twice: the normal and the
    strict pass), done while the hog runs. Without a share it gets 2 cores / 122 processes, about
    1 CPU-s in 60 s: it timed out at 0/19 (checked with the share and the CPU-time limit taken
    out of sandbox.py)."""
    probe = sandbox.Cgroups("probe-" + MARK, sandbox.Limits())
    has_cpu_cgroup = "cpu" in probe.dirs
    probe.close()
    if not has_cpu_cgroup and len(os.sched_getaffinity(0)) < 2:
        pytest.skip("no cpu cgroup and a single core: nothing can give each sandbox its own share")
    subs = tmp_path / "subs"
    subs.mkdir()
    _write(subs / "a_hog.ipynb", _hostile(solution, CPU_HOG % {"seconds": 60, "processes": 120}))
    honest_nb = copy.deepcopy(solution)
    honest_nb["cells"].append({"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
                               "source": SLOW_BUT_HONEST})
    _write(subs / "b_honest.ipynb", honest_nb)
    limits = sandbox.Limits(timeout_s=60, threads=1)
    res = {r["student"]: r for r in grading.grade_folder(subs, tmp_path / "grades", jobs=2, limits=limits,
                                                         log=lambda *a: None)}
    honest = res["b_honest"]
    assert honest["total"] == honest["possible_total"] == 19 and honest["error"] == "", honest


@pytest.mark.parametrize("accounting", ["cgroup", "pid namespace"])
def test_cpu_time_counts_every_process_of_the_sandbox(bwrap, solution, tmp_path, monkeypatch, accounting):
    """8 busy processes in one sandbox: each stays far below the per-process RLIMIT_CPU (they
    share one core), so only the sandbox's total CPU time can stop them before the wall clock
    does: read from its cgroup, or, on a host without cgroups, summed over its PID namespace."""
    if accounting == "cgroup":
        probe = sandbox.Cgroups("probe-" + MARK, sandbox.Limits())
        measured = probe.cpu_seconds() is not None
        probe.close()
        if not measured:
            pytest.skip("no cgroup to read a sandbox's CPU time from on this host")
    else:
        monkeypatch.setattr(sandbox.Cgroups, "_base", staticmethod(lambda controller: None))
    subs = tmp_path / "subs"
    subs.mkdir()
    _write(subs / "busy.ipynb", _hostile(solution, CPU_HOG % {"seconds": 600, "processes": 8}))
    limits = sandbox.Limits(timeout_s=120, cpu_seconds=5, threads=1)
    r = grading.grade_folder(subs, tmp_path / "grades", limits=limits, log=lambda *a: None)[0]
    # the limit is 5 s per pass; the sandbox runs the notebook twice (normal and strict pass)
    assert re.search(r"CPU time limit \((5|10) s, all its processes together\) exceeded", r["error"]), r["error"]
    assert r["total"] == 0


# ------------------------------------------------------------------ refusals and the command line


def test_root_and_missing_users_are_refused():
    if os.geteuid() != 0:
        with pytest.raises(users.NoSandboxUser, match="only root"):
            users.resolve("root")
        return
    with pytest.raises(users.NoSandboxUser, match="must not run as root"):
        users.resolve("root")
    with pytest.raises(users.NoSandboxUser, match="no such user"):
        users.resolve(f"no-such-user-{MARK[:8]}")
    user = users.resolve(None)
    assert user.name == users.DEFAULT_USER and user.uid != 0 and user.gid != 0


def test_unreachable_python_is_detected(tmp_path):
    closed = tmp_path / "closed"
    (closed / "python" / "lib").mkdir(parents=True)
    (closed / "python" / "lib" / "secret.py").write_text("x = 1")
    closed.chmod(0o700)
    (closed / "python" / "lib" / "secret.py").chmod(0o600)
    someone = users.SandboxUser("someone", 64000, 64000)
    assert users.unreachable([str(closed / "python")], someone) == [str(closed / "python")]
    assert users.unreadable(str(closed / "python"), someone) == [str(closed / "python" / "lib" / "secret.py")]
    assert users.unreachable([str(closed / "python")], None) == []


def test_bwrap_command_hardening(tmp_path):
    limits = sandbox.Limits(shm_bytes=SHM_BYTES)
    cmd = sandbox.bwrap_command(tmp_path, limits, [], sandbox.worker_env(limits))
    assert "--disable-userns" in cmd and "--unshare-user" in cmd
    proc_at = cmd.index("--proc")
    ro = [i for i in range(len(cmd) - 2) if cmd[i:i + 3] == ["--ro-bind", "/proc/sys", "/proc/sys"]]
    assert ro and ro[0] > proc_at  # after --proc, or the fresh /proc would cover it
    shm = [i for i in range(len(cmd) - 1) if cmd[i:i + 2] == ["--tmpfs", "/dev/shm"]]
    assert shm and cmd[shm[0] - 2:shm[0]] == ["--size", str(SHM_BYTES)] and shm[0] > cmd.index("--dev")
    assert cmd.index("--remount-ro") > shm[0]
    assert "/sys" not in cmd and "/root" not in cmd and "/home" not in cmd
    assert len(seccomp.program()) > 100
