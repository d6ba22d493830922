#!/usr/bin/env bash
# Install the benchmark peers into the venv whose python is $1 (default .venv/bin/python):
# torchopt 0.7.3 (a wheel; its compiled ops do not load on torch 2.14, its pure-Python path is
# what the benchmark times) and learn2learn 0.2.0, which exists only as a source archive whose
# generated C files do not build on Python 3.11 (longintrepr.h is gone): regenerate them with
# Cython 3 and build the wheel without build isolation.
set -euo pipefail
PY=${1:-.venv/bin/python}
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
"$PY" -m pip install --quiet torchopt==0.7.3 optree gym cython
if "$PY" -c "import learn2learn" >/dev/null 2>&1; then exit 0; fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
"$PY" -m pip download --quiet --no-deps --no-build-isolation learn2learn==0.2.0 -d .
tar xzf learn2learn-0.2.0.tar.gz
cd learn2learn-0.2.0
"$(dirname "$PY")/cython" -3 learn2learn/data/*.pyx
"$PY" -m pip wheel --quiet --no-build-isolation --no-deps -w "$WORK/wheels" .
"$PY" -m pip install --quiet --no-deps "$WORK"/wheels/learn2learn-*.whl
