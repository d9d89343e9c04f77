#!/usr/bin/env bash
# Sets up the engine and generates a mesh from the project's own example image (a render of
# Blender's Suzanne). Needs an NVIDIA GPU with a recent driver; downloads the official v1.1 weights
# and DINOv2 into the Hugging Face cache on first use (set HF_HOME to move the cache).
#
#   bash scripts/generate_example.sh [extra `python -m engine generate` options, e.g. --resolution 512]
#
# Output: out/suzanne.png (input) and out/suzanne.glb (the generated mesh), plus a summary table.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ENGINE_VENV=${ENGINE_VENV:-.venv-engine}
BLENDER_VENV=${BLENDER_VENV:-.venv-blender}
mkdir -p out

# 1. The engine's own environment (CUDA torch from PyPI, triton; spconv when a wheel exists).
if [ ! -x "$ENGINE_VENV/bin/python" ]; then
  "$PY" -m venv "$ENGINE_VENV"
fi
"$ENGINE_VENV/bin/python" -m pip install -q --upgrade pip
"$ENGINE_VENV/bin/python" -m pip install -q -e . triton
"$ENGINE_VENV/bin/python" -m pip install -q "spconv-cu126>=2.3.6" \
  || echo "note: no spconv wheel for this Python; the engine uses its built-in sparse convolution"

# 2. The example image: Suzanne rendered by the bpy wheel (Python 3.11) on a transparent background.
if [ ! -f out/suzanne.png ]; then
  BPY_PY=${BPY_PYTHON:-python3.11}
  if [ ! -x "$BLENDER_VENV/bin/python" ]; then
    "$BPY_PY" -m venv "$BLENDER_VENV"
    "$BLENDER_VENV/bin/python" -m pip install -q "bpy==5.0.1"
  fi
  "$BLENDER_VENV/bin/python" examples/make_suzanne_image.py out/suzanne.png
fi

# 3. Weights (official release, verified) and the generation itself.
"$ENGINE_VENV/bin/python" -m engine weights download --version v1.1
"$ENGINE_VENV/bin/python" -m engine generate out/suzanne.png -o out/suzanne.glb --resolution 1024 "$@"
