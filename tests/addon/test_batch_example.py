"""examples/batch_generate.py runs headless over a folder: one object per good image, a clear
failure line for a bad one, exit status 1, and a saved .blend."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from addon_fixtures import addon_zip, bpy_python, engine  # noqa: F401 - pytest fixtures
from engine_setup import ENGINE_PYTHON, REPO
from helpers.paths import SHARED

IMAGES = SHARED / "images"


def test_batch_over_a_folder(bpy_python, addon_zip, engine, tmp_path):
    if not (IMAGES / "2.png").is_file():
        pytest.skip("shared images not present")
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(IMAGES / "2.png", folder / "a_vase.png")
    shutil.copy(IMAGES / "3.png", folder / "b_chair.png")
    (folder / "c_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (folder / "notes.txt").write_text("not an image")
    quick = engine.settings()
    blend = tmp_path / "batch.blend"
    env = {key: value for key, value in os.environ.items() if not key.startswith("D3D_")}
    env.update(engine.env)
    env["HOME"] = str(tmp_path / "home")
    env.pop("PYTHONPATH", None)
    command = [bpy_python, str(REPO / "examples" / "batch_generate.py"), "--images", str(folder),
               "--addon-zip", str(addon_zip), "--engine-python", ENGINE_PYTHON, "--engine-path", str(REPO),
               "--device", "cpu", "--dtype", "float32", "--resolution", str(quick["resolution"]),
               "--steps", "2", "--target-faces", "0", "--height", "1.0", "--save", str(blend),
               "--export-dir", str(tmp_path / "meshes")]
    if engine.weights_dir:
        command += ["--weights", engine.weights_dir]
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 1, output
    assert "2 of 3 images generated" in output
    assert "failed: c_broken.png:" in output
    assert "a_vase:" in output and "b_chair:" in output
    assert blend.is_file() and blend.stat().st_size > 0
    exported = sorted(p.name for p in (tmp_path / "meshes").glob("*.glb"))
    assert exported == ["a_vase.glb", "b_chair.glb"]


def test_batch_rejects_a_missing_folder(bpy_python, tmp_path):
    completed = subprocess.run([bpy_python, str(REPO / "examples" / "batch_generate.py"), "--images",
                                str(tmp_path / "nowhere")], capture_output=True, text=True,
                               env={**os.environ, "HOME": str(tmp_path)}, timeout=300)
    assert completed.returncode == 2
    assert "image folder not found" in completed.stderr
