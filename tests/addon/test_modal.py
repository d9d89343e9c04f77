"""The UI path of the generate operator: modal() polled by timer events, Esc and the cancel
button. Modal operators cannot start in background mode, so the scenario calls the operator's
methods the way Blender's window manager does (see bpy_scenarios.modal_harness)."""

from __future__ import annotations

import shutil

import pytest
from addon_fixtures import addon_zip, bpy_python  # noqa: F401 - pytest fixtures
from bpy_harness import run_scenario
from engine_setup import ENGINE_PYTHON, REPO
from helpers.paths import SHARED

IMAGE = SHARED / "images" / "4.png"


@pytest.fixture(scope="module")
def modal_runs(bpy_python, addon_zip, tmp_path_factory):
    from engine_setup import prepare_engine

    if not IMAGE.is_file():
        pytest.skip(f"{IMAGE} not present")
    work = tmp_path_factory.mktemp("modal")
    engine = prepare_engine(work, "fake")  # exact step timing for Esc after a few timer ticks
    image = work / "lamp.png"
    shutil.copy(IMAGE, image)
    config = {"zip": str(addon_zip), "engine_python": ENGINE_PYTHON, "engine_path": str(REPO),
              "weights": engine.weights_dir, "env": {**engine.env, "D3D_FAKE_STEP_SECONDS": "0.1"},
              "scene_settings": {"image_source": "FILE", "image_path": str(image), "resolution": "512",
                                 "use_target_faces": False, "height": 1.0},
              "quick_steps": 4, "slow_steps": 300}
    return run_scenario(bpy_python, "modal", config, work / "home")["runs"]


def test_modal_job_runs_to_an_imported_object(modal_runs):
    run = modal_runs["complete"]
    assert run["started"] is True and run["busy_poll"] is False  # generate greyed out while busy
    assert run["outcome"] == ["FINISHED"]
    assert run["new_objects"] == ["lamp"]
    progress = [float(line.split(" ", 1)[0]) for line in run["statuses"]]
    assert 0 < max(progress) <= 1  # the panel's progress bar moved
    assert any("Coarse shape: step" in line for line in run["statuses"])
    assert run["reports"][-1][0] == "INFO" and "Created lamp" in run["reports"][-1][1]
    assert run["running_after"] is False and run["session_busy_after"] is False


@pytest.mark.parametrize("name", ["esc", "cancel_button"])
def test_cancel_from_the_ui_stops_the_job_and_adds_nothing(modal_runs, name):
    run = modal_runs[name]
    assert run["outcome"] == ["CANCELLED"]
    assert run["new_objects"] == []
    assert ["WARNING", "Generation cancelled"] in run["reports"]
    assert any("Cancelling" in line for line in run["statuses"])
    steps = [line for line in run["statuses"] if "Coarse shape: step" in line]
    assert len(steps) < 50, "the job should stop long before its 300 steps"
    assert run["running_after"] is False and run["session_busy_after"] is False
