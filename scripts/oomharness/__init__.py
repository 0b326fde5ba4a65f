"""The OOM harness: real memory-cgroup OOM kills against PostgreSQL, without and with pgoom.
Run `python -m scripts.oomharness --help` (as root, from the repository root)."""
