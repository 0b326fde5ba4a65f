"""Who to become and what to keep: user resolution and the switch to it, done with the
standard library alone (the Percona base has no runuser, su or setpriv), and capability
narrowing for the monitor through prctl(2) and capset(2) via ctypes.

Only the standard library: `pgoom exec` imports this module on the database's start path.
ctypes is imported lazily, by the monitor's processes only.
"""

from __future__ import annotations

import grp
import os
import pwd

from watcher.limits import CAP_DAC_OVERRIDE, CAP_SYS_RESOURCE

# typing and dataclasses cost ~10 ms of imports (inspect, ast) on the start path; mypy
# treats a TYPE_CHECKING name as true without them.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Optional

CAP_NAMES = {CAP_DAC_OVERRIDE: "CAP_DAC_OVERRIDE", CAP_SYS_RESOURCE: "CAP_SYS_RESOURCE"}
# linux/prctl.h
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# What the monitor keeps. CAP_SYS_RESOURCE: lower oom_score_adj below the floor the runtime
# set (kubelet's, Docker's --oom-score-adj). CAP_DAC_OVERRIDE: /proc/<pid>/oom_score_adj of
# the uid-26 postmaster is 0644 and owned by uid 26, and the data directory is 0700: root
# without it can neither write the one nor read postmaster.pid or watch the other.
# Not CAP_SYS_PTRACE: it would let the monitor read /proc/<pid>/exe, cwd, root and environ of
# other users' processes -- and any process's memory. In `pgoom exec` the monitor shares the
# postmaster's mount namespace, so those links add nothing that the command line and
# postmaster.pid (readable with CAP_DAC_OVERRIDE) do not tell: watcher.identity falls back to
# them, and a postmaster is confirmed once its postmaster.pid names it.
MONITOR_CAPS = (CAP_DAC_OVERRIDE, CAP_SYS_RESOURCE)


class PrivilegeError(Exception):
    """The switch or the narrowing failed; str() says what to fix."""


class Account:
    """Who CMD runs as; `name` is None for a uid without a passwd entry."""

    __slots__ = ("gid", "groups", "home", "name", "uid")

    def __init__(
        self, uid: int, gid: int, name: Optional[str], home: str, groups: tuple[int, ...]
    ) -> None:
        self.uid = uid
        self.gid = gid
        self.name = name
        self.home = home
        self.groups = groups

    def __repr__(self) -> str:
        return f"Account(uid={self.uid}, gid={self.gid}, name={self.name!r}, groups={self.groups})"


def resolve_user(spec: str) -> Account:
    """`name`, `uid`, `name:group` or `uid:gid`, as Docker's --user reads them: a uid without
    a passwd entry gets gid 0, HOME=/ and no supplementary groups (what `docker run --user
    4242` gives), so the command sees the same identity with pgoom as without it."""
    user, _, group = spec.partition(":")
    if not user:
        raise PrivilegeError(f"--user {spec!r}: give a user name or number, e.g. 26 or postgres")
    entry: Optional[pwd.struct_passwd]
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        if not user.isdigit():
            raise PrivilegeError(
                f"--user {user}: no such user in /etc/passwd; give its number instead"
            ) from None
        entry = None
    uid = entry.pw_uid if entry else int(user)
    gid = entry.pw_gid if entry else 0
    if group:
        gid = _resolve_group(group)
    if entry is not None:
        groups = tuple(sorted(set(os.getgrouplist(entry.pw_name, gid))))
        return Account(uid, gid, entry.pw_name, entry.pw_dir or "/", groups)
    return Account(uid, gid, None, "/", (gid,) if group else ())


def _resolve_group(group: str) -> int:
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise PrivilegeError(
            f"--user group {group}: no such group in /etc/group; give its number instead"
        ) from None


def switch_user(account: Account) -> None:
    """Groups, then gid, then uid (after setuid nothing else could be changed), all three
    ids of each (real, effective, saved) so that nothing can switch back."""
    try:
        os.setgroups(list(account.groups))
        os.setresgid(account.gid, account.gid, account.gid)
        os.setresuid(account.uid, account.uid, account.uid)
    except OSError as err:
        raise PrivilegeError(
            f"cannot switch to uid {account.uid} gid {account.gid}: {err.strerror} "
            "(the container needs CAP_SETUID and CAP_SETGID to drop from root; or run it "
            "as that user and pgoom skips the switch)"
        ) from None
    if os.getresuid() != (account.uid,) * 3 or os.getresgid() != (account.gid,) * 3:
        raise PrivilegeError(f"switch to uid {account.uid} did not take effect")


def user_environment(account: Account, env: dict[str, str]) -> dict[str, str]:
    """What runuser sets for a non-root target: HOME, USER and LOGNAME of the new user.
    Without a passwd entry there is no name: USER and LOGNAME are removed rather than left
    saying root."""
    changed = dict(env)
    changed["HOME"] = account.home
    if account.name is not None:
        changed["USER"] = account.name
        changed["LOGNAME"] = account.name
    else:
        changed.pop("USER", None)
        changed.pop("LOGNAME", None)
    return changed


# ---------------------------------------------------------------- capabilities (ctypes)


def _libc() -> Any:
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        import ctypes

        errno = ctypes.get_errno()
        raise PrivilegeError(f"{what}: {os.strerror(errno)}")


def prctl(option: int, arg2: int = 0, arg3: int = 0) -> int:
    import ctypes

    libc = _libc()
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    libc.prctl.restype = ctypes.c_int
    result = int(libc.prctl(option, arg2, arg3, 0, 0))
    if result < 0:
        _check(result, f"prctl({option})")
    return result


def set_parent_death_signal(signo: int) -> None:
    prctl(PR_SET_PDEATHSIG, signo)


def set_process_name(name: str) -> None:
    """The comm shown by ps and top (15 bytes); argv stays as it was."""
    import ctypes

    buf = ctypes.create_string_buffer(name.encode()[:15])
    libc = _libc()
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_ulong]
    libc.prctl(PR_SET_NAME, buf, 0, 0, 0)


def last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40  # CAP_CHECKPOINT_RESTORE, the last one as of Linux 6.x


def _capset(effective: int, permitted: int, inheritable: int) -> None:
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))

    class Data(ctypes.Structure):
        _fields_ = (
            ("effective", ctypes.c_uint32),
            ("permitted", ctypes.c_uint32),
            ("inheritable", ctypes.c_uint32),
        )

    header = Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (Data * 2)()
    for index in range(2):
        shift = 32 * index
        data[index].effective = (effective >> shift) & 0xFFFFFFFF
        data[index].permitted = (permitted >> shift) & 0xFFFFFFFF
        data[index].inheritable = (inheritable >> shift) & 0xFFFFFFFF
    _check(_libc().capset(ctypes.byref(header), data), "capset")


def current_caps(name: str = "CapEff") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1], 16)
    return 0


def keep_only(caps: tuple[int, ...]) -> int:
    """Narrow this process to `caps` for good: the bounding set first (so that an exec as
    root cannot bring the rest back: root's permitted set after exec is the bounding set),
    then no ambient or inheritable capabilities, no_new_privs, and permitted = effective =
    `caps` (only those this process has). Returns the mask kept. Without CAP_SETPCAP the
    bounding set cannot shrink: PrivilegeError says so after the rest is done -- the rest
    suffices, as no_new_privs limits root's exec to the permitted set it had."""
    wanted = 0
    for cap in caps:
        wanted |= 1 << cap
    have = current_caps("CapPrm")
    bounding_error: Optional[str] = None
    for cap in range(last_cap() + 1):
        if wanted & (1 << cap) or not prctl(PR_CAPBSET_READ, cap):
            continue
        try:
            prctl(PR_CAPBSET_DROP, cap)
        except PrivilegeError as err:
            bounding_error = (
                f"cannot narrow the bounding set ({err}: no CAP_SETPCAP); no_new_privs still "
                "holds the monitor to the permitted set across exec"
            )
            break
    try:
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    except PrivilegeError:
        pass  # kernels before 4.3 have no ambient set: nothing to clear
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    kept = wanted & have
    _capset(kept, kept, 0)
    if bounding_error:
        raise PrivilegeError(bounding_error)
    return kept


def describe_caps(mask: int) -> str:
    names = [name for cap, name in sorted(CAP_NAMES.items()) if mask & (1 << cap)]
    other = mask & ~sum(1 << cap for cap in CAP_NAMES)
    if other:
        names.append(f"0x{other:x}")
    return ", ".join(names) or "none"
