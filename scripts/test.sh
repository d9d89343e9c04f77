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
# The Blender extension tests run inside the bpy wheel (Python 3.11 only; it pins numpy<2, so it
# gets an environment of its own, separate from torch's).
BLENDER_VENV=${BLENDER_VENV:-.venv-blender}
BPY_PY=${BPY_PYTHON:-python3.11}
command -v "$BPY_PY" >/dev/null 2>&1 || BPY_PY=$PY
if [ ! -x "$BLENDER_VENV/bin/python" ]; then
  "$BPY_PY" -m venv "$BLENDER_VENV"
fi
"$BLENDER_VENV/bin/python" -c "import bpy" >/dev/null 2>&1 \
  || "$BLENDER_VENV/bin/python" -m pip install -q "bpy==5.0.1"
exec "$VENV/bin/python" -m pytest -q "$@"
