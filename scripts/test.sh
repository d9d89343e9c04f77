#!/usr/bin/env bash
# Sets up a virtual environment with everything the tests need (CPU only) and runs the suite.
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
# torch first, pinned, so nothing else pulls a CUDA build.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[test]"
if [ -f requirements-addon-test.txt ]; then
  "$VENV/bin/python" -m pip install -q -r requirements-addon-test.txt
fi
exec "$VENV/bin/python" -m pytest -q "$@"
