"""Error types, each named after what the operator must fix, each with its exit code.

The exit codes themselves are declared in watcher.limits (the exec path needs them too).
"""

from __future__ import annotations

from watcher.limits import (
    EXIT_DENIED,
    EXIT_NOT_FOUND,
    EXIT_NOT_POSTMASTER,
    EXIT_SOURCE_UNAVAILABLE,
    EXIT_USAGE,
)


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
