"""pgoom: keeps the PostgreSQL postmaster from being chosen by the kernel's OOM killer."""

__version__ = "0.1.0"
