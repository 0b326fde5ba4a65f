"""Unpack wheels into one directory with the standard library alone (no pip in the base).

    python3 -I unpack-wheels.py WHEELS DEST

A wheel is a zip file whose top level is the import tree (purelib and platlib alike, since
DEST is only ever put on sys.path); `<name>.data/purelib|platlib/` goes to the top as well,
`.data/scripts` and headers are dropped (pgoom has its own launcher). A member that would
land outside DEST is an error, not a file.
"""

from __future__ import annotations

import os
import sys
import zipfile


def target(dest: str, member: str) -> str | None:
    parts = member.split("/")
    if parts[0].endswith(".data"):
        if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
            return None
        parts = parts[2:]
    path = os.path.normpath(os.path.join(dest, *parts))
    if os.path.isabs(member) or not path.startswith(dest + os.sep):
        raise SystemExit(f"unpack-wheels: {member!r} leaves {dest}")
    return path


def unpack(wheel: str, dest: str) -> int:
    count = 0
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            path = target(dest, info.filename)
            if path is None:
                continue
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with archive.open(info) as src, open(path, "wb") as out:
                out.write(src.read())
            # Keep the executable bit (compiled extensions need none, but be faithful).
            mode = (info.external_attr >> 16) & 0o777
            os.chmod(path, 0o755 if mode & 0o100 else 0o644)
            count += 1
    return count


def main() -> None:
    wheels, dest = sys.argv[1], os.path.abspath(sys.argv[2])
    os.makedirs(dest, exist_ok=True)
    for name in sorted(os.listdir(wheels)):
        if name.endswith(".whl"):
            print(f"unpack-wheels: {name}: {unpack(os.path.join(wheels, name), dest)} files")


if __name__ == "__main__":
    main()
