"""Last step of the image build, run by the *base's own* python3 (under emulation for the
other architecture): write pgoom's launcher for this interpreter, compile the packages for
it, and check that they import here -- psutil's compiled module included.

    python3 -I /opt/pgoom/finish.py /opt/pgoom

Only the standard library: the base has no pip and needs none.
"""

from __future__ import annotations

import compileall
import os
import subprocess
import sys

LAUNCHER = """\
#!{python} -I
# pgoom's launcher. -I: PYTHONPATH and the user site of the container (Patroni's) must not
# change what pgoom imports; pgoom's own packages go first instead. Nothing here leaks into
# the environment of the command `pgoom exec` starts.
import sys
sys.path.insert(0, "{lib}")
from watcher.main import main
main()
"""

CHECK = """\
import sys
sys.path.insert(0, sys.argv[1])
import psutil, pyroute2, typer, loguru, watcher.cli
assert psutil.__file__.startswith(sys.argv[1]), psutil.__file__
print("finish: psutil", psutil.__version__, "from", psutil.__file__, "on python", sys.version.split()[0])
"""


def main() -> None:
    home = sys.argv[1]
    lib = os.path.join(home, "lib")
    os.makedirs(os.path.join(home, "bin"), exist_ok=True)
    launcher = os.path.join(home, "bin", "pgoom")
    with open(launcher, "w") as f:
        f.write(LAUNCHER.format(python=sys.executable, lib=lib))
    os.chmod(launcher, 0o755)
    # The root filesystem may be read-only at run time: compile now, with this interpreter.
    if not compileall.compile_dir(lib, quiet=1, workers=1):
        raise SystemExit("finish: some modules do not compile for this python3")
    subprocess.run([sys.executable, "-I", "-c", CHECK, lib], check=True)
    subprocess.run([launcher, "--version"], check=True)
    os.remove(os.path.abspath(__file__))


if __name__ == "__main__":
    main()
