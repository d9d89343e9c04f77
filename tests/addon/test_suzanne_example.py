"""examples/make_suzanne_image.py renders an RGBA PNG with a transparent background."""

from __future__ import annotations

import os
import subprocess

import numpy as np
from addon_fixtures import bpy_python  # noqa: F401 - pytest fixture
from engine_setup import REPO
from PIL import Image


def test_renders_suzanne_on_a_transparent_background(bpy_python, tmp_path):
    output = tmp_path / "suzanne.png"
    completed = subprocess.run([bpy_python, str(REPO / "examples" / "make_suzanne_image.py"), str(output),
                                "--size", "128"], capture_output=True, text=True, timeout=600,
                               env={**os.environ, "HOME": str(tmp_path)})
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    picture = Image.open(output)
    assert picture.mode == "RGBA" and picture.size == (128, 128)
    alpha = np.asarray(picture)[..., 3]
    assert alpha[0, 0] == alpha[0, -1] == alpha[-1, 0] == alpha[-1, -1] == 0
    covered = (alpha > 0).mean()
    assert 0.05 < covered < 0.6, covered  # the head fills part of the frame, not all of it
    rows, cols = np.nonzero(alpha > 0)
    assert abs(cols.mean() - 64) < 20 and abs(rows.mean() - 64) < 25  # roughly centred


def test_rejects_a_silly_size(bpy_python, tmp_path):
    completed = subprocess.run([bpy_python, str(REPO / "examples" / "make_suzanne_image.py"),
                                str(tmp_path / "x.png"), "--size", "10"], capture_output=True, text=True,
                               timeout=300, env={**os.environ, "HOME": str(tmp_path)})
    assert completed.returncode != 0 and "--size must be between" in completed.stderr
