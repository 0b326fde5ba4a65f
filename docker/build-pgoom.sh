#!/bin/sh
# Build stage of the Dockerfile, as root on the base image itself: install pgoom and its
# dependencies for the base's own python3 into an isolated directory.
#   build-pgoom.sh SRC DEST   ->  DEST/lib (packages), DEST/bin/pgoom (launcher)
# The base's python3 is used so that compiled dependencies (psutil) match its version, libc
# and architecture (under QEMU for the other platform). --target keeps everything out of the
# OS site-packages that Patroni imports (its own psutil stays as it is). pip, if this script
# had to install it, stays in this stage: the final stage copies DEST only.
set -eu
src=$1
dest=$2
python=$(command -v python3)

# BuildKit secret "ca": a CA bundle for networks that intercept TLS (the test machines).
if [ -s /run/secrets/ca ]; then
  export PIP_CERT=/run/secrets/ca
fi

if ! "$python" -m pip --version >/dev/null 2>&1; then
  if "$python" -m ensurepip >/dev/null 2>&1; then
    :
  elif command -v microdnf >/dev/null 2>&1; then # UBI minimal (the Percona base)
    microdnf -y --nodocs install python3-pip >/dev/null
  elif command -v dnf >/dev/null 2>&1; then
    dnf -y --nodocs install python3-pip >/dev/null
  elif command -v apt-get >/dev/null 2>&1; then # Debian (the test stand-in)
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
  else
    echo "build-pgoom: no pip for $python and no package manager to install it" >&2
    exit 1
  fi
fi

"$python" -m pip install --no-cache-dir --disable-pip-version-check --no-warn-script-location \
  --target "$dest/lib" "$src"
# Console scripts written by pip point at this stage's paths; the launcher below replaces them.
rm -rf "$dest/lib/bin"
# The root filesystem may be read-only at run time: compile now, with the same interpreter.
"$python" -m compileall -q "$dest/lib" >/dev/null || true

mkdir -p "$dest/bin"
cat >"$dest/bin/pgoom" <<LAUNCHER
#!$python -I
# pgoom's launcher. -I: PYTHONPATH and the user site of the container (Patroni's) must not
# change what pgoom imports; pgoom's isolated packages go first instead. Nothing here leaks
# into the environment of the command \`pgoom exec\` starts.
import sys
sys.path.insert(0, "$dest/lib")
from watcher.main import main
main()
LAUNCHER
chmod 755 "$dest/bin/pgoom"
"$dest/bin/pgoom" --version
