"""The extension builds and validates, installs from its zip into a clean bpy, registers its
operators, panels and menu, never imports torch, and unregisters cleanly."""

from __future__ import annotations

import tomllib
import zipfile

from addon_fixtures import addon_zip, bpy_python  # noqa: F401 - pytest fixtures
from bpy_harness import run_scenario
from engine_setup import REPO
from helpers.paths import SHARED

OPERATORS = ("generate", "cancel_generation", "import_last_result", "restart_engine", "check_engine")


def test_zip_has_manifest_and_sources_only(addon_zip):
    with zipfile.ZipFile(addon_zip) as archive:
        names = set(archive.namelist())
        manifest = tomllib.loads(archive.read("blender_manifest.toml").decode())
    assert {"blender_manifest.toml", "__init__.py", "engine_client.py", "mesh_import.py",
            "operators.py", "preferences.py", "properties.py", "ui.py", "session.py"} <= names
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]
    assert manifest["schema_version"] == "1.0.0"
    assert manifest["blender_version_min"] == "4.2.0"
    assert addon_zip.name == f"{manifest['id']}-{manifest['version']}.zip"


def test_no_torch_import_anywhere_in_the_addon():
    for source in (REPO / "blender_addon").glob("*.py"):
        text = source.read_text()
        assert "import torch" not in text and "from torch" not in text, source.name


def test_installs_from_zip_registers_and_unregisters(bpy_python, addon_zip, tmp_path):
    facts = run_scenario(bpy_python, "install", {"zip": str(addon_zip)}, tmp_path / "home")
    assert facts["install"] == ["FINISHED"]
    assert facts["enabled"] is True
    assert facts["operators"] == {name: True for name in OPERATORS}
    assert facts["panels"] == ["D3D_PT_main", "D3D_PT_placement", "D3D_PT_advanced"]
    assert facts["menu_operators"] == [f"d3d.{name}" for name in OPERATORS]
    assert facts["object_menu_entries"] == ["D3D_MT_image_to_3d"]
    assert facts["scene_settings"] is True and facts["preferences"] is True
    assert facts["torch_imported"] is False
    assert facts["after_disable_generate"] is False
    assert facts["after_disable_scene_settings"] is False


def test_up_axis_rotations_are_proper_and_point_up(bpy_python, addon_zip, tmp_path):
    facts = run_scenario(bpy_python, "orient", {"zip": str(addon_zip)}, tmp_path / "home")
    expected_up = {"Z": [0, 0, 1], "Y": [0, 1, 0], "X": [1, 0, 0],
                   "-Z": [0, 0, -1], "-Y": [0, -1, 0], "-X": [-1, 0, 0]}
    for axis, up in expected_up.items():
        assert facts[axis]["up"] == up, axis
        assert facts[axis]["det"] == 1.0, axis  # a rotation, never a mirror
    # With Blender's +Z up, the model's front (+Z in the engine frame) faces the -Y front view.
    assert facts["Z"]["front"] == [0, -1, 0]
    assert "Unknown up axis" in facts["bad_axis"]


def test_panels_and_preferences_draw_existing_properties_and_operators(bpy_python, addon_zip, tmp_path):
    image = SHARED / "images" / "0.png"
    facts = run_scenario(bpy_python, "draw", {"zip": str(addon_zip), "image": str(image)}, tmp_path / "home")
    drawn = facts["drawn"]
    assert "op:d3d.generate" in drawn["idle_file"] and "prop:image_path" in drawn["idle_file"]
    if image.is_file():
        assert drawn["file_preview_size"][0] > 0 and drawn["file_preview_size"][1] > 0
    assert "preview:datablock" in drawn["idle_datablock_error"]
    assert any(line.startswith("label:The GPU ran out") for line in drawn["idle_datablock_error"])
    assert "progress:0.40:Coarse shape: step 20/50" in drawn["running"]
    assert "op:d3d.cancel_generation" in drawn["running"] and "op:d3d.generate" not in drawn["running"]
    assert "prop:voxel_size" in drawn["placement_VOXEL"] and "prop:quad_faces" in drawn["placement_QUADRIFLOW"]
    assert "prop:voxel_size" not in drawn["placement_NONE"]
    assert {"prop:dense_steps", "prop:sparse_1024_guidance"} <= set(drawn["advanced"])
    assert {"prop:engine_python", "prop:weights_dir", "prop:device", "prop:memory_mode",
            "op:d3d.check_engine"} <= set(drawn["preferences"])
    assert "label:Weights not ready: missing: config.yaml" in drawn["preferences"]
