"""The seccomp filter every bubblewrap sandbox runs under (bwrap ``--seccomp FD``).

Default: allow. The calls below fail with ``EPERM`` (the student's code sees an ordinary
``PermissionError``); ``clone3`` fails with ``ENOSYS`` because seccomp cannot read its flags (they
sit in a struct in memory), and glibc then falls back to ``clone``, whose flags it can check.
System calls of another architecture (32-bit ``int 0x80`` on x86-64) kill the process
(libseccomp's default for a foreign architecture). The filter is compiled once per grading run
with libseccomp through ``pyseccomp`` (a ctypes binding) and handed to bwrap as BPF bytes.
"""

from __future__ import annotations

import errno
import functools
import os
import tempfile
import threading

# Blocked outright, grouped by what they would give a submission.
BLOCKED = (
    # the kernel keyring (root's was readable and writable from inside, issue 17)
    "keyctl", "add_key", "request_key",
    # new namespaces: with a user namespace every other namespace and mount become possible
    "unshare", "setns",
    # the mount table and the root
    "mount", "umount2", "pivot_root", "chroot", "mount_setattr", "move_mount", "open_tree",
    "fsopen", "fsconfig", "fsmount", "fspick",
    # large kernel attack surfaces a batch norm does not need
    "bpf", "io_uring_setup", "io_uring_enter", "io_uring_register", "perf_event_open",
    "userfaultfd", "fanotify_init", "open_by_handle_at", "name_to_handle_at", "lookup_dcookie",
    # other processes' memory
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    # the machine itself (these need capabilities anyway; a second wall)
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot",
    "swapon", "swapoff", "acct", "quotactl", "syslog", "settimeofday", "clock_settime",
    "clock_adjtime", "adjtimex", "vhangup", "iopl", "ioperm", "personality",
    # leaving the CPU the sandbox was pinned to (where no cpu cgroup exists)
    "sched_setaffinity",
    # memory outside RLIMIT_AS (where no memory cgroup exists): memfd pages written with write()
    # are never mapped, and SysV segments outlive their mapping; /tmp, /scratch and /dev/shm are
    # sized tmpfs mounts instead (issue 23 item 6)
    "memfd_create", "memfd_secret", "shmget",
)
NAMESPACE_FLAGS = (0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000
                   | 0x40000000)  # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
TIOCSTI, TIOCLINUX = 0x5412, 0x541C  # typing into the terminal of the grader


class SeccompUnavailable(RuntimeError):
    pass


@functools.lru_cache(maxsize=1)
def program() -> bytes:
    """The compiled BPF program (for this machine's architecture)."""
    try:
        import pyseccomp as sc
    except (ImportError, OSError) as e:  # OSError: libseccomp.so.2 missing
        raise SeccompUnavailable(
            f"the seccomp filter needs libseccomp and its Python binding ({type(e).__name__}: {e}); "
            "install them: `apt-get install libseccomp2` and `pip install pyseccomp` "
            "(`pip install -e .[grading]` installs the binding)") from e
    f = sc.SyscallFilter(defaction=sc.ALLOW)
    for name in BLOCKED:
        _rule(sc, f, sc.ERRNO(errno.EPERM), name)
    _rule(sc, f, sc.ERRNO(errno.ENOSYS), "clone3")
    for bit in _bits(NAMESPACE_FLAGS):  # one rule per flag: MASKED_EQ tests all bits of the mask
        _rule(sc, f, sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, bit, bit))
    for request in (TIOCSTI, TIOCLINUX):
        _rule(sc, f, sc.ERRNO(errno.EPERM), "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, request))
    with tempfile.TemporaryFile() as tmp:
        f.export_bpf(tmp)
        tmp.seek(0)
        return tmp.read()


def _rule(sc, f, action, name: str, *args) -> None:
    """Add a rule; a call this architecture does not have is skipped (nothing to block)."""
    try:
        known = sc.resolve_syscall(sc.Arch.NATIVE, name) >= 0
    except (ValueError, RuntimeError, OSError):
        known = False
    if known:
        f.add_rule(action, name, *args)


def _bits(mask: int) -> list[int]:
    return [1 << i for i in range(mask.bit_length()) if mask >> i & 1]


def pipe_fd(data: bytes) -> int:
    """A pipe's read end that yields ``data`` and then end-of-file, for bwrap's ``--seccomp FD``
    and ``--args FD`` (a pipe, not a file: what bwrap has read cannot be read again). The caller
    passes it on and closes it."""
    read_end, write_end = os.pipe()
    if len(data) < 32768:  # fits the pipe's buffer: write it now
        _write_all(write_end, data)
    else:
        threading.Thread(target=_write_all, args=(write_end, data), daemon=True).start()
    return read_end


def _write_all(fd: int, data: bytes) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        pass
    finally:
        os.close(fd)
