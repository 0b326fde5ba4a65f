"""The host's side of the VM test's results: DIR/summary.json (written by the guest, one
object per check: name, passed, figures) -> DIR/summary.md and the last line
`vm-test: PASS|FAIL (...)`. Exit 0 only when the guest reported and every check passed.

    python3 scripts/vm/report.py DIR --mode short --accel tcg --build-s N --boot-s N ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def load(path: str) -> list[dict[str, object]]:
    """The guest's checks, or one failed check saying why there are none."""
    try:
        with open(path) as f:
            checks = json.load(f)
        if isinstance(checks, list) and checks:
            return checks
        problem = "the guest reported no checks"
    except FileNotFoundError:
        problem = "no summary.json came back (see console.log)"
    except ValueError as err:
        problem = f"summary.json is not JSON: {err}"
    return [{"name": "guest: the suite ran and reported", "passed": False,
             "figures": {"error": problem}}]  # fmt: skip


def figures_text(figures: object) -> str:
    if not isinstance(figures, dict):
        return str(figures)
    parts = []
    for key, value in figures.items():
        text = json.dumps(value, default=str) if not isinstance(value, str) else value
        parts.append(f"{key}: {text}")
    return "; ".join(parts).replace("|", "\\|").replace("\n", " ")


def markdown(checks: list[dict[str, object]], args: argparse.Namespace) -> str:
    passed = sum(1 for c in checks if c.get("passed"))
    lines = [
        f"# VM test, {args.mode} mode: {passed}/{len(checks)} passed",
        "",
        f"Accelerator {args.accel}; image build {args.build_s} s, boot to suite {args.boot_s} s, "
        f"guest run {args.guest_s} s, total {args.total_s} s.",
        "",
        "| check | result | figures |",
        "|---|---|---|",
    ]
    for c in checks:
        result = "pass" if c.get("passed") else "**FAIL**"
        lines.append(f"| {c.get('name')} | {result} | {figures_text(c.get('figures'))} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/vm/report.py")
    parser.add_argument("out")
    parser.add_argument("--mode", default="short")
    parser.add_argument("--accel", default="?")
    for name in ("build-s", "boot-s", "guest-s", "total-s"):
        parser.add_argument(f"--{name}", type=int, default=0)
    args = parser.parse_args()
    summary = os.path.join(args.out, "summary.json")
    checks = load(summary)
    with open(summary, "w") as f:
        json.dump(checks, f, indent=2)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(markdown(checks, args))
    failed = [str(c.get("name")) for c in checks if not c.get("passed")]
    for c in checks:
        print(f"  {'pass' if c.get('passed') else 'FAIL'}  {c.get('name')}")
    verdict = "FAIL" if failed else "PASS"
    detail = f"{len(checks) - len(failed)}/{len(checks)} checks passed, {args.mode} mode, "
    detail += f"{args.accel}, {args.total_s} s (image {args.build_s} s, guest {args.guest_s} s)"
    if failed:
        detail += "; failed: " + "; ".join(failed)
    print(f"vm-test: {verdict} ({detail}); {args.out}/summary.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
