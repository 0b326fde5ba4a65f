#!/bin/sh
# Wheels stage of the Dockerfile, on the build machine's own architecture (never emulated):
# fetch pgoom and its dependencies as wheels for the *target* platform and Python.
#   fetch-wheels.sh SRC DEST TARGETARCH PYTHON_VERSION
# --only-binary: nothing is compiled, so nothing needs the target's compiler or headers.
# psutil is the one compiled dependency; it ships abi3 manylinux2014 wheels for x86_64 and
# aarch64 (glibc 2.17+: UBI 9 has 2.34, Debian bullseye 2.31).
set -eu
src=$1
dest=$2
arch=$3
python_version=$4
case $arch in
  amd64) machine=x86_64 ;;
  arm64) machine=aarch64 ;;
  *)
    echo "fetch-wheels: no wheels for TARGETARCH=$arch: build for linux/amd64 or linux/arm64" >&2
    exit 1
    ;;
esac
# BuildKit secret "ca": a CA bundle for networks that intercept TLS (the test machines).
if [ -s /run/secrets/ca ]; then
  export PIP_CERT=/run/secrets/ca
fi
pip="python3 -m pip --disable-pip-version-check --no-cache-dir"
# pgoom itself is pure Python: a wheel built here runs anywhere.
$pip wheel --quiet --no-deps --wheel-dir "$dest" "$src"
$pip download --quiet --dest "$dest" --only-binary=:all: \
  --implementation cp --python-version "$python_version" \
  --platform "manylinux2014_$machine" --platform "manylinux_2_17_$machine" \
  "$(ls "$dest"/pgoom-*.whl)"
ls "$dest"
