"""One module per CLI command: each is a plain function that does the work and returns data
or an exit code; watcher.cli only parses options and maps errors to exit codes.

COMMANDS is the one list of commands: the CLI's help for each, and the command tables of
README.md, docs/index.md and man/pgoom.1 (tests/unit/test_command_table.py holds them to it).
"""

# (name, usage as the tables show it, what it does)
COMMANDS = (
    ("watch", "pgoom watch", "Protect postmasters as they start, and keep them protected."),
    (
        "exec",
        "pgoom exec -- CMD",
        "Container entrypoint: lower its own score, export PG_OOM_ADJUST_FILE/VALUE, start "
        "the watcher, switch to the database user and exec CMD.",
    ),
    (
        "status",
        "pgoom status",
        "Show postgres processes, their roles and scores, and whether each postmaster is "
        "protected.",
    ),
    (
        "doctor",
        "pgoom doctor",
        "Check this host or container (kernel, namespaces, capabilities, floors, cgroups, "
        "overcommit): each finding names its fix.",
    ),
    (
        "adjust",
        "pgoom adjust PID",
        "Set one process's oom_score_adj once (like choom), after the identity checks.",
    ),
    (
        "verify",
        "pgoom verify",
        "Exit 0 when every postmaster is at or below --score within --timeout.",
    ),
)
SUMMARY = {name: summary for name, _, summary in COMMANDS}
