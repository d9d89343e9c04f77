"""End to end in background mode: the generate operator starts the real worker, receives a mesh
and leaves exactly one new object with the requested height, placement and face budget."""

from __future__ import annotations

import shutil

import pytest
from addon_fixtures import addon_zip, bpy_python, engine  # noqa: F401 - pytest fixtures
from bpy_harness import run_scenario
from engine_setup import ENGINE_PYTHON, REPO
from helpers.paths import SHARED

IMAGE = SHARED / "images" / "0.png"
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def generated(bpy_python, addon_zip, engine, tmp_path_factory):
    if not IMAGE.is_file():
        pytest.skip(f"{IMAGE} not present")
    work = tmp_path_factory.mktemp("e2e")
    broken = work / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    copy = work / "statue.png"
    shutil.copy(IMAGE, copy)
    quick = engine.settings()
    base = {"image_source": "FILE", "image_path": str(copy), "resolution": str(quick["resolution"]),
            "seed": 3, "dense_steps": quick["dense_steps"],
            "sparse_512_steps": quick.get("sparse_512_steps", 2),
            "sparse_1024_steps": quick.get("sparse_1024_steps", 2)}
    cases = [
        # 0: at the 3D cursor, given height, face budget
        {"scene_settings": {**base, "use_target_faces": True, "target_faces": 600, "placement": "CURSOR",
                            "height": 1.5, "up_axis": "Z", "smooth_shading": True},
         "cursor": (1.0, 2.0, 3.0)},
        # 1: fitted into the selected object's bounding box, flat shading
        {"scene_settings": {**base, "use_target_faces": False, "placement": "FIT_SELECTED",
                            "smooth_shading": False},
         "select": "FitTarget"},
        # 2: up axis +Y
        {"scene_settings": {**base, "placement": "CURSOR", "height": 1.0, "up_axis": "Y"},
         "cursor": (0.0, -1.0, 0.0)},
        # 3: a job that fails leaves the scene unchanged
        {"scene_settings": {**base, "image_path": str(broken), "up_axis": "Z"}},
        # 4: image packed in the blend file, quad remesh
        {"scene_settings": {**base, "use_target_faces": False, "placement": "CURSOR", "height": 2.0,
                            "remesh": "QUADRIFLOW", "quad_faces": 300},
         "packed_image": str(copy)},
    ]
    config = {"zip": str(addon_zip), "engine_python": ENGINE_PYTHON, "engine_path": str(REPO),
              "weights": engine.weights_dir, "env": engine.env, "cases": cases, "import_again": True}
    return run_scenario(bpy_python, "generate", config, work / "home", timeout=900)


def test_cursor_placement_height_and_face_budget(generated):
    case = generated["cases"][0]
    assert case["outcome"] == ["FINISHED"], case
    assert len(case["new_objects"]) == 1 and case["meshes_delta"] == 1
    obj = case["object"]
    assert obj["name"] == "statue"
    assert 0 < obj["faces"] <= 600
    assert abs((obj["high"][2] - obj["low"][2]) - 1.5) < TOLERANCE
    assert abs(obj["low"][2] - 3.0) < TOLERANCE  # stands on the cursor
    assert abs((obj["low"][0] + obj["high"][0]) / 2 - 1.0) < TOLERANCE
    assert abs((obj["low"][1] + obj["high"][1]) / 2 - 2.0) < TOLERANCE
    assert obj["location"] == pytest.approx([1.0, 2.0, 3.0])
    assert obj["source_image"].endswith("statue.png")
    assert obj["settings"]["seed"] == 3 and obj["settings"]["target_faces"] == 600
    assert obj["has_settings_group"] and obj["smooth"] is True
    assert "Direct3D-S2:" in generated["_stdout"]  # progress printed in background mode


def test_fit_to_selected_bounding_box(generated):
    case = generated["cases"][1]
    assert case["outcome"] == ["FINISHED"] and len(case["new_objects"]) == 1, case
    obj = case["object"]
    target_low, target_high = [4.0, -0.5, -0.5], [6.0, 0.5, 2.5]
    for axis in range(3):
        assert obj["low"][axis] >= target_low[axis] - TOLERANCE
        assert obj["high"][axis] <= target_high[axis] + TOLERANCE
    touching = [axis for axis in range(3)
                if abs((obj["high"][axis] - obj["low"][axis]) - (target_high[axis] - target_low[axis])) < TOLERANCE]
    assert touching, "the result should fill the box along its tightest axis"
    assert abs(obj["low"][2] - target_low[2]) < TOLERANCE
    assert abs((obj["low"][0] + obj["high"][0]) / 2 - 5.0) < TOLERANCE
    assert obj["smooth"] is False


def test_up_axis_y(generated):
    case = generated["cases"][2]
    assert case["outcome"] == ["FINISHED"], case
    obj = case["object"]
    assert abs((obj["high"][1] - obj["low"][1]) - 1.0) < TOLERANCE
    assert abs(obj["low"][1] - (-1.0)) < TOLERANCE


def test_failed_job_leaves_scene_unchanged(generated):
    case = generated["cases"][3]
    assert case["outcome"] == ["CANCELLED"]
    assert case["new_objects"] == [] and case["meshes_delta"] == 0
    assert case["last_error"]


def test_packed_image_and_quadriflow(generated):
    case = generated["cases"][4]
    assert case["outcome"] == ["FINISHED"], case
    obj = case["object"]
    assert obj["name"] == "statue.001" or obj["name"].startswith("statue")
    assert obj["source_image"].endswith(".png") and "inputs" in obj["source_image"]
    assert obj["quads"] > 0.5 * obj["faces"]
    assert abs((obj["high"][2] - obj["low"][2]) - 2.0) < 0.05 * 2.0  # remesh moves the surface a little


def test_import_last_result_again_and_engine_check(generated):
    again = generated["import_again"]
    assert again["outcome"] == ["FINISHED"] and len(again["new_objects"]) == 1
    assert abs((again["object"]["high"][2] - again["object"]["low"][2]) - 0.5) < TOLERANCE
    assert generated["check"]["outcome"] == ["FINISHED"]
    assert "torch" in generated["check"]["report"]
    assert generated["torch_imported"] is False
    assert generated["engine_running"] is True and generated["engine_exit_code"] == 0
