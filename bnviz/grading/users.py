"""Who student code runs as: never the host's root.

bwrap started by root runs the sandbox as host uid 0 (``--unshare-all`` maps 0 to 0, and the
kernel's checks on ``/proc/sys`` and the keyring look at that uid). So a grader that runs as root
starts bwrap as an unprivileged account instead (``setpriv --reuid --regid --clear-groups``):

* ``--sandbox-user NAME``: an account the instructor names (not uid 0, not group 0);
* by default ``bnviz-grader``, a system account with no home and no login shell, created with
  ``useradd --system`` the first time the grader runs as root.

A grader that already runs as a normal user starts bwrap as itself. bwrap started unprivileged
needs the kernel to allow unprivileged user namespaces; ``userns_problem`` says why it does not.

The sandbox user must be able to read the Python installation it runs. When some folder above it
is closed to that user (``/root`` is mode 700, and ``/root/.pyenv`` is where this project's CI
keeps Python), root binds each folder the sandbox needs onto a private staging folder first, in
a mount namespace of its own (``unshare --mount``), and bwrap binds from there; nothing of that
is visible on the host. The files themselves must still be readable by the user.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import shutil
import subprocess
from pathlib import Path

DEFAULT_USER = "bnviz-grader"


class NoSandboxUser(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class SandboxUser:
    name: str
    uid: int
    gid: int

    def setpriv(self) -> list[str]:
        """Command prefix that drops root for this user, with no supplementary groups and no
        inheritable capabilities."""
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "--inh-caps=-all", "--"]


def resolve(name: str | None) -> SandboxUser | None:
    """The account sandboxes run as; None when the grader is unprivileged (bwrap runs as it)."""
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid()).pw_name if _has_uid(os.geteuid()) else str(os.geteuid())
        if name and name != me:
            raise NoSandboxUser(f"--sandbox-user {name}: only root can run sandboxes as another user; "
                                f"this grader runs as {me}, and its sandboxes run as {me} too (leave the option out)")
        return None
    name = name or DEFAULT_USER
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        if name != DEFAULT_USER:
            raise NoSandboxUser(f"--sandbox-user {name}: no such user. Create it (`useradd --system --user-group "
                                f"--no-create-home --shell /usr/sbin/nologin {name}`) or leave the option out to "
                                f"use {DEFAULT_USER}, which the grader creates") from None
        pw = _create(name)
    if pw.pw_uid == 0 or pw.pw_gid == 0:
        raise NoSandboxUser(f"--sandbox-user {name}: uid {pw.pw_uid} / gid {pw.pw_gid} is root's: student code "
                            "must not run as root; name an unprivileged account")
    if not shutil.which("setpriv"):
        raise NoSandboxUser("the grader runs as root and needs `setpriv` (util-linux) to start sandboxes as "
                            f"{name}: install util-linux")
    return SandboxUser(name, pw.pw_uid, pw.pw_gid)


def _has_uid(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


def _create(name: str) -> pwd.struct_passwd:
    if not shutil.which("useradd"):
        raise NoSandboxUser(f"no user {name} and no `useradd` to create it: create an unprivileged system account "
                            "and pass it as --sandbox-user NAME")
    cmd = ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
           "--shell", "/usr/sbin/nologin", "--comment", "bnviz grading sandbox (runs student code)", name]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    try:
        return pwd.getpwnam(name)  # also fine if a parallel grader created it first
    except KeyError:
        raise NoSandboxUser(f"could not create the sandbox user {name} (`{' '.join(cmd)}`: "
                            f"{proc.stderr.strip()[:200] or proc.returncode}); create an unprivileged account "
                            "yourself and pass --sandbox-user NAME") from None


def userns_problem() -> str:
    """Why the kernel may refuse unprivileged user namespaces, from its settings (empty if none
    of the known switches is off)."""
    checks = [("/proc/sys/kernel/unprivileged_userns_clone", "0", "sysctl -w kernel.unprivileged_userns_clone=1"),
              ("/proc/sys/user/max_user_namespaces", "0", "sysctl -w user.max_user_namespaces=10000"),
              ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "1",
               "an AppArmor profile for bwrap (Ubuntu 24.04: see /etc/apparmor.d/bwrap-userns-restrict), or "
               "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0")]
    found = []
    for path, bad, fix in checks:
        try:
            if Path(path).read_text().strip() == bad:
                found.append(f"{path} is {bad} (unprivileged user namespaces are off; as root: {fix})")
        except OSError:
            pass
    return "; ".join(found)


def unreachable(paths: list[str], user: SandboxUser | None) -> list[str]:
    """The paths whose parent folders ``user`` cannot traverse (going by mode bits and owners)."""
    if user is None:
        return []
    bad = []
    for p in paths:
        for parent in list(Path(p).parents)[:-1]:  # not "/" itself
            try:
                st = parent.stat()
            except OSError:
                continue
            ok = st.st_mode & 0o001 or (st.st_uid == user.uid and st.st_mode & 0o100) or \
                (st.st_gid == user.gid and st.st_mode & 0o010)
            if not ok:
                bad.append(p)
                break
    return bad


def unreadable(root: str, user: SandboxUser | None, limit: int = 200_000) -> list[str]:
    """Files and folders under ``root`` that ``user`` cannot read (others' bits; the first few)."""
    if user is None:
        return []
    bad = []
    for n, (folder, dirs, files) in enumerate(os.walk(root)):
        for name in [folder] + [os.path.join(folder, f) for f in files]:
            try:
                st = os.lstat(name)
            except OSError:
                continue
            need = 0o005 if os.path.isdir(name) and not os.path.islink(name) else 0o004
            if not os.path.islink(name) and st.st_uid != user.uid and st.st_mode & need != need:
                bad.append(name)
        if len(bad) >= 3 or n > limit:
            break
    return bad[:3]
