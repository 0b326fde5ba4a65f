"""Error types, each named after what the operator must fix, each with its exit code.

The exit codes are documented in docs/exit-codes.md; keep the two in step.
"""

from __future__ import annotations

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


class PgoomError(Exception):
    """Base class: carries the exit code; str() is the one line shown to the user."""

    exit_code = 1


class UsageError(PgoomError):
    exit_code = EXIT_USAGE


class SourceUnavailable(PgoomError):
    exit_code = EXIT_SOURCE_UNAVAILABLE


class ProcessGone(PgoomError):
    """The process exited (ENOENT/ESRCH), is a zombie, or its PID now names another process."""

    exit_code = EXIT_NOT_FOUND


class AccessDenied(PgoomError):
    """EACCES/EPERM from /proc: a missing capability or a floor the kernel enforces."""

    exit_code = EXIT_DENIED


class NotPostmaster(PgoomError):
    exit_code = EXIT_NOT_POSTMASTER
