#!/usr/bin/env bash
# The guest has no network: everything pip installs there comes from here.
#   wheelhouse.sh CACHE SRC DEST
# DEST gets the pgoom wheel of SRC (a copy of this checkout, built every run, so the guest
# tests what is checked out, and built in the copy, so the checkout gets no build/ files) and its dependencies plus pytest, downloaded once per pyproject.toml into
# CACHE/wheels-<hash> for the guest's Python (bookworm: CPython 3.11, glibc 2.36).
set -euo pipefail
usage="usage: wheelhouse.sh CACHE SRC DEST"
cache=${1:?$usage}
src=${2:?$usage}
dest=${3:?$usage}
pip=.venv/bin/pip
# Quiet unless it fails: setuptools' deprecation notices are not ours to act on here.
quietly() { local log; log=$("$@" 2>&1) || { echo "$log" >&2; return 1; }; }
quietly "$pip" wheel -q --no-deps -w "$dest" "$src"
deps="$cache/wheels-$(cat pyproject.toml scripts/vm/wheelhouse.sh | sha256sum | cut -c1-16)"
if [ ! -d "$deps" ]; then
  tmp=$(mktemp -d "$cache/.wheels.XXXXXX")
  quietly "$pip" download -q -d "$tmp" --only-binary=:all: --implementation cp --python-version 3.11 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 --platform any "$dest"/pgoom-*.whl pytest
  rm -f "$tmp"/pgoom-*.whl
  mv "$tmp" "$deps"
fi
cp "$deps"/*.whl "$dest/"
