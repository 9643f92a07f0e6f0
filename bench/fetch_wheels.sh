#!/usr/bin/env bash
# Download the wheels of bench/device-wheels.txt for the device machine (CPython 3.12, x86-64 Linux)
# into ./wheels (git-ignored), then check that they and the device's own packages cover every import.
#   bench/fetch_wheels.sh [PYTHON]      (PYTHON: a python with pip; default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
mkdir -p wheels
grep -v '^#' bench/device-wheels.txt | grep . | while read -r req; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d wheels "$req"
done
"$PY" bench/check_wheels.py wheels
