"""Fixtures for the Blender extension tests: the bpy interpreter, the built zip, the engine.

Test modules import them by name (a conftest.py here would shadow other folders' ``conftest``
imports, since the test folders are not packages).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bpy_harness import bpy_root, find_bpy_python  # noqa: E402
from engine_setup import REPO, prepare_engine, real_pipeline_available  # noqa: E402


@pytest.fixture(scope="session")
def bpy_python() -> str:
    found = find_bpy_python()
    if found is None:
        pytest.skip("no Python with the bpy wheel (create .venv-blender with bpy==5.0.1, "
                    "or set D3D_BLENDER_PYTHON)")
    return found


@pytest.fixture(scope="session")
def addon_zip(tmp_path_factory, bpy_python) -> Path:
    out = tmp_path_factory.mktemp("dist")
    completed = subprocess.run(
        [sys.executable, str(REPO / "build_addon.py"), "--output-dir", str(out)],
        capture_output=True, text=True,
        env={**os.environ, "D3D_BPY_ROOT": bpy_root(bpy_python)})
    assert completed.returncode == 0, completed.stdout + completed.stderr
    zips = list(out.glob("*.zip"))
    assert len(zips) == 1
    return zips[0]


@pytest.fixture(scope="session")
def engine(tmp_path_factory):
    """The real pipeline on tiny random weights when present, else the fake-pipeline seam."""
    kind = "tiny" if real_pipeline_available() else "fake"
    return prepare_engine(tmp_path_factory.mktemp("engine"), kind)
