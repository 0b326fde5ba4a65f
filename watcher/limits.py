"""Limits, defaults and exit codes: plain constants, one declaration each.

Standard library only, and not even typing or dataclasses: `pgoom exec` (watcher.exec)
imports this on the database's start path, where every millisecond of import is paid
before PostgreSQL starts. The exit codes are documented in docs/exit-codes.md and
man/pgoom.1 (tests/unit/test_man_page.py keeps them in step).
"""

# The kernel's range for /proc/<pid>/oom_score_adj (include/uapi/linux/oom.h).
OOM_SCORE_ADJ_MIN = -1000
OOM_SCORE_ADJ_MAX = 1000
DEFAULT_SCORE = -900  # the target of the script pgoom replaces; `watch` and `exec` agree
DEFAULT_CHILDREN_SCORE = 0  # PostgreSQL's documented PG_OOM_ADJUST_VALUE
DEFAULT_PATTERN = r"postgres -D /pgdata/pg"
# --group-kill: what pgoom does where a postmaster's memory cgroup kills as a group
# (watcher.groupkill); the first is the default.
GROUP_KILL_POLICIES = ("auto", "ungroup", "keep")

# linux/capability.h
CAP_DAC_OVERRIDE = 1
CAP_SYS_RESOURCE = 24

# The proc connector filters by event type (struct proc_input) and lets an unprivileged
# process LISTEN since Linux 6.6.
PROC_INPUT_KERNEL = (6, 6)

EXIT_OK = 0
EXIT_CHECK_FAILED = 1  # verify: not protected in time; doctor: a check failed
EXIT_USAGE = 2  # bad option or configuration: the message says what to fix
EXIT_NOT_FOUND = 3  # adjust/verify: no such process / no postmaster found
EXIT_DENIED = 4  # the kernel refused the write (floor, missing capability)
EXIT_NOT_POSTMASTER = 5  # adjust: the process failed the identity check (use --force)
EXIT_SOURCE_UNAVAILABLE = 6  # the requested event source cannot work here
EXIT_GROUP_KILL = 7  # verify: at its score, but would die in a group kill (memory.oom.group)
EXIT_CANNOT_EXECUTE = 126  # exec: CMD found but not executable
EXIT_COMMAND_NOT_FOUND = 127  # exec: CMD not found


def score_problem(value: int) -> str:
    """Why `value` is not an oom_score_adj, or '' when it is one: one wording for the
    command line, the environment, the config file and `pgoom exec`."""
    if OOM_SCORE_ADJ_MIN <= value <= OOM_SCORE_ADJ_MAX:
        return ""
    return f"{value} is out of range: use a value from {OOM_SCORE_ADJ_MIN} to {OOM_SCORE_ADJ_MAX}"


def data_dir_problem(path: str) -> str:
    """Why `path` cannot name a data directory, or ''. The path is the operator's own input
    (an option, PGOOM_DATA_DIR, PGDATA, the config file), not another user's."""
    if not path or not path.startswith("/"):
        return f"{path!r} must be an absolute path, such as /pgdata/pg16"
    return ""
