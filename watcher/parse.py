"""Pure parsers over the text of /proc files and PostgreSQL's postmaster.pid. No I/O here."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional

POSTGRES_BINARIES = frozenset({"postgres", "postmaster"})


@dataclass(frozen=True)
class Stat:
    pid: int
    comm: str
    state: str
    ppid: int
    starttime_ticks: int  # field 22: clock ticks after boot; (pid, starttime) names one process


def parse_stat(text: str) -> Stat:
    """Parse /proc/<pid>/stat.

    comm may hold spaces and parentheses (a process can name itself `foo) Z 1`), so it is
    everything between the first '(' and the *last* ')'.
    """
    open_paren = text.index("(")
    close_paren = text.rindex(")")
    pid = int(text[:open_paren].strip())
    comm = text[open_paren + 1 : close_paren]
    rest = text[close_paren + 2 :].split()
    # rest[0] is field 3 (state); field N is rest[N - 3].
    return Stat(
        pid=pid,
        comm=comm,
        state=rest[0],
        ppid=int(rest[1]),
        starttime_ticks=int(rest[19]),
    )


def parse_cmdline(raw: bytes) -> list[str]:
    """Split /proc/<pid>/cmdline. Empty for kernel threads and zombies.

    A process that rewrote its title (PostgreSQL backends do) may leave one NUL-free string
    padded with spaces or NULs; trailing empties are dropped.
    """
    parts = raw.split(b"\0")
    while parts and parts[-1] == b"":
        parts.pop()
    return [p.decode("utf-8", "surrogateescape") for p in parts]


def parse_status(text: str) -> dict[str, str]:
    """/proc/<pid>/status as a dict of its `Key:\tvalue` lines."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key] = value.strip()
    return fields


def status_fields(text: str, *keys: str) -> dict[str, str]:
    """Only `keys` from /proc/<pid>/status: parse_status builds all ~55 lines, which costs
    more than the read itself on the exec -> protected path."""
    fields: dict[str, str] = {}
    for key in keys:
        start = text.find(f"\n{key}:")
        if start == -1:
            if not text.startswith(f"{key}:"):
                continue
            start = -1
        start += len(key) + 2
        end = text.find("\n", start)
        fields[key] = text[start : end if end != -1 else len(text)].strip()
    return fields


def status_uids(fields: dict[str, str]) -> tuple[int, int]:
    """(real uid, effective uid) from parsed status."""
    uids = fields["Uid"].split()
    return int(uids[0]), int(uids[1])


def capability_set(fields: dict[str, str], name: str) -> int:
    """A capability mask (CapEff, CapBnd, ...) from parsed status as an int."""
    return int(fields[name], 16)


def kernel_version(release: str) -> Optional[tuple[int, int]]:
    """(major, minor) of a release as `uname -r` prints it; None when it does not start so."""
    found = re.match(r"(\d+)\.(\d+)", release)
    return (int(found[1]), int(found[2])) if found else None


def has_capability(mask: int, cap: int) -> bool:
    return bool(mask >> cap & 1)


@dataclass(frozen=True)
class PidFile:
    """The first lines of <data dir>/postmaster.pid (PostgreSQL's lock file)."""

    pid: int
    data_dir: Optional[str]
    start_epoch: Optional[int]
    port: Optional[int]


def parse_postmaster_pid(text: str) -> Optional[PidFile]:
    """Parse postmaster.pid; None while the file is empty or half-written.

    Line 1 is the postmaster's PID (negative in single-user mode, which is no postmaster),
    line 2 the data directory, line 3 the start time (epoch seconds), line 4 the port.
    """
    lines = text.split("\n")
    if len(lines) < 2:  # line 1 must be complete (newline-terminated)
        return None
    try:
        pid = int(lines[0])
    except ValueError:
        return None
    if pid <= 0:
        return None

    def _int(index: int) -> Optional[int]:
        try:
            return int(lines[index])
        except (IndexError, ValueError):
            return None

    data_dir = lines[1] if len(lines) > 2 and lines[1] else None
    return PidFile(pid=pid, data_dir=data_dir, start_epoch=_int(2), port=_int(3))


def parse_oom_score_adj(text: str) -> int:
    return int(text.strip())


def binary_name(exe: str) -> str:
    """Basename of a /proc/<pid>/exe target, without the ' (deleted)' the kernel appends
    when the binary was replaced on disk (a package upgrade under a running server)."""
    if exe.endswith(" (deleted)"):
        exe = exe[: -len(" (deleted)")]
    return os.path.basename(exe)


# Options after which postgres does not become a postmaster: it prints and exits, or runs a
# single-user backend or bootstrap. pg_ctl and Patroni run `postgres -C ... -D <dir>`.
_NOT_POSTMASTER_OPTIONS = frozenset(
    {"-C", "--describe-config", "--single", "--boot", "--check", "-V", "--version", "-?", "--help"}
)


def is_server_invocation(argv: list[str]) -> bool:
    """False for argv that runs postgres as a one-shot tool rather than a server."""
    return not any(arg in _NOT_POSTMASTER_OPTIONS or arg.startswith("-C") for arg in argv[1:])


def data_dir_from_argv(argv: list[str]) -> Optional[str]:
    """The data directory given on the command line: `-D dir`, `-Ddir`, `--data-directory`
    (not a postgres option, but `-c data_directory=` and `--data_directory=` are)."""
    for i, arg in enumerate(argv):
        if arg == "-D" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("-D") and len(arg) > 2:
            return arg[2:]
        for prefix in ("--data_directory=", "--data-directory="):
            if arg.startswith(prefix):
                return arg[len(prefix) :]
        if arg == "-c" and i + 1 < len(argv) and argv[i + 1].startswith("data_directory="):
            return argv[i + 1].split("=", 1)[1]
    return None


def environ_value(raw: bytes, name: str) -> Optional[str]:
    """A variable from /proc/<pid>/environ (NUL-separated NAME=value)."""
    key = name.encode() + b"="
    for entry in raw.split(b"\0"):
        if entry.startswith(key):
            return entry[len(key) :].decode("utf-8", "surrogateescape")
    return None


def conf_data_directory(text: str) -> Optional[str]:
    """`data_directory` from a postgresql.conf (the last setting wins, as in PostgreSQL);
    None if unset. Handles `name = 'value'`, `name 'value'`, unquoted values and trailing
    comments; include directives are not followed."""
    found: Optional[str] = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line.startswith("data_directory"):
            continue
        rest = line[len("data_directory") :].lstrip()
        if rest.startswith("="):
            rest = rest[1:].lstrip()
        elif rest[:1] not in ("'", '"'):
            continue  # another parameter that merely starts with the same letters
        if rest.startswith("'"):
            end = rest.find("'", 1)
            while end != -1 and rest[end + 1 : end + 2] == "'":  # '' is an escaped quote
                end = rest.find("'", end + 2)
            if end == -1:
                continue
            found = rest[1:end].replace("''", "'")
        else:
            value = rest.split("#", 1)[0].strip()
            if value:
                found = value
    return found


def parse_address(text: str) -> tuple[str, int]:
    """'HOST:PORT', '[IPv6]:PORT' or ':PORT' (every interface) -> (host, port). ValueError
    says what is wrong, starting with the text."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"{text!r} must be HOST:PORT, such as 127.0.0.1:9187 or [::1]:9187")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, [::1]:9187")
    return host or "0.0.0.0", int(port_text)


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo values in kB."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if sep and rest.split():
            try:
                values[key] = int(rest.split()[0])
            except ValueError:
                continue
    return values
