"""The in-guest suite: `python -m scripts.vm.guest --mode short --out DIR [--only TEXT]`.

Runs inside the VM (root, systemd as PID 1, cgroup v2, CAP_SYS_RESOURCE) from the checkout
on the work disk; writes DIR/summary.json. Exit 0 when every check passed.
"""

from __future__ import annotations

import argparse
import sys

from scripts.vm.guest import checks, groupkill, guard  # noqa: F401 - registers the checks
from scripts.vm.guest.registry import MODES, Context, run_checks


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.vm.guest")
    parser.add_argument("--mode", choices=MODES, default="short")
    parser.add_argument("--out", required=True)
    parser.add_argument("--src", default=".")
    parser.add_argument("--only", help="comma-separated: checks whose name contains one")
    args = parser.parse_args()
    only = [o.strip() for o in (args.only or "").split(",") if o.strip()]
    results = run_checks(Context(src=args.src, out=args.out, mode=args.mode), only or None)
    failed = [r.name for r in results if not r.passed]
    print(f"vm-suite: {len(results) - len(failed)}/{len(results)} passed", flush=True)
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
