"""The in-guest suite's registry: a check is one function, registered with `@check(name)`.

A check receives the run's Context, does the real thing (real kernel, real PostgreSQL, real
systemd) and returns its figures (a dict that goes into summary.json). It fails by raising
Failed (or any exception: that is recorded too, never fatal to the suite). Checks run in the
order they are registered; each leaves the guest as it found it, so any subset can run.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

Figures = dict[str, object]
MODES = ("short", "full")


class Failed(Exception):
    """A check's verdict: what went wrong, with the figures measured up to then."""

    def __init__(self, message: str, **figures: object) -> None:
        super().__init__(message)
        self.figures = figures


def expect(condition: object, message: str, **figures: object) -> None:
    if not condition:
        raise Failed(message, **figures)


@dataclass
class Context:
    src: str  # the checkout, as copied onto the work disk
    out: str  # results directory (summary.json, logs/)
    mode: str
    logs: str = ""

    def __post_init__(self) -> None:
        self.logs = os.path.join(self.out, "logs")
        os.makedirs(self.logs, exist_ok=True)

    def log_path(self, check_name: str, suffix: str) -> str:
        stem = "".join(c if c.isalnum() else "-" for c in check_name.lower()).strip("-")
        return os.path.join(self.logs, f"{stem[:60]}.{suffix}")


@dataclass
class Check:
    name: str
    run: Callable[[Context], Optional[Figures]]
    modes: tuple[str, ...]


CHECKS: list[Check] = []


def check(name: str, modes: tuple[str, ...] = MODES) -> Callable[..., object]:
    """Register a check. `modes`: ("full",) for the slow ones that short mode leaves out."""

    def register(func: Callable[[Context], Optional[Figures]]) -> Callable[[Context], object]:
        if any(c.name == name for c in CHECKS):
            raise ValueError(f"two checks named {name!r}")
        CHECKS.append(Check(name, func, modes))
        return func

    return register


@dataclass
class Result:
    name: str
    passed: bool
    figures: Figures = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "passed": self.passed, "figures": self.figures}


def run_checks(ctx: Context, only: Optional[list[str]] = None) -> list[Result]:
    results: list[Result] = []
    summary = os.path.join(ctx.out, "summary.json")
    for item in CHECKS:
        if ctx.mode not in item.modes or (only and not any(o in item.name for o in only)):
            continue
        print(f"vm-suite: >>> {item.name}", flush=True)
        started = time.monotonic()
        try:
            figures = dict(item.run(ctx) or {})
            passed = True
        except Failed as err:
            figures = {"error": str(err), **err.figures}
            passed = False
        except Exception as err:  # one broken check must not end the suite
            figures = {"error": f"{type(err).__name__}: {err}"}
            with open(ctx.log_path(item.name, "traceback"), "w") as f:
                f.write(traceback.format_exc())
            passed = False
        figures["elapsed_s"] = round(time.monotonic() - started, 1)
        results.append(Result(item.name, passed, figures))
        print(
            f"vm-suite: <<< {'PASS' if passed else 'FAIL'} {item.name} "
            f"{json.dumps(figures, default=str)}",
            flush=True,
        )
        # Written after every check: a guest that dies mid-suite still returns the rest.
        with open(summary, "w") as f:
            json.dump([r.as_dict() for r in results], f, indent=2, default=str)
        os.sync()
    return results
