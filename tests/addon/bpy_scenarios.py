"""Scenarios run inside a Python that has the ``bpy`` wheel (one fresh process per call).

Usage: ``<bpy python> bpy_scenarios.py <scenario> <config.json>``. The last stdout line is
``RESULT: {...}`` with what the test asserts on. bpy state is global and cannot be reloaded, so
every scenario starts from a new process with HOME pointing at a temporary folder.
"""

from __future__ import annotations

import json
import sys
import traceback

import bpy

ADDON_ID = "direct3d_s2"
MODULE = f"bl_ext.user_default.{ADDON_ID}"
OPERATORS = ("generate", "cancel_generation", "import_last_result", "restart_engine", "check_engine")


def install(zip_path: str) -> dict:
    outcome = bpy.ops.extensions.package_install_files(
        filepath=zip_path, repo="user_default", enable_on_install=True)
    return {"install": sorted(outcome)}


class RecordingLayout:
    """Stands in for UILayout so a menu's draw() can be run without a window."""

    def __init__(self):
        self.entries = []

    def operator(self, idname, **_):
        self.entries.append(idname)

    def menu(self, idname, **_):
        self.entries.append(idname)

    def separator(self, **_):
        pass


def record_layout(draw) -> list:
    holder = type("Holder", (), {})()
    holder.layout = RecordingLayout()
    draw(holder, bpy.context)
    return holder.layout.entries


def registration_facts() -> dict:
    import addon_utils

    enabled = [module.__name__ for module in addon_utils.modules() if addon_utils.check(module.__name__)[1]]
    ops = {name: hasattr(bpy.ops.d3d, name) and bpy.ops.d3d.__getattr__(name).idname() == f"D3D_OT_{name}"
           for name in OPERATORS}
    menu = getattr(bpy.types, "D3D_MT_image_to_3d", None)
    menu_operators = record_layout(menu.draw) if menu is not None else []
    # The hooks appended to View3D > Object: one of them must open our menu.
    object_menu_entries = []
    for hook in bpy.types.VIEW3D_MT_object._dyn_ui_initialize():
        if getattr(hook, "__module__", "").startswith(MODULE):
            object_menu_entries += record_layout(hook)
    return {
        "enabled": MODULE in enabled,
        "operators": ops,
        "panels": [name for name in ("D3D_PT_main", "D3D_PT_placement", "D3D_PT_advanced")
                   if hasattr(bpy.types, name)],
        "menu_operators": menu_operators,
        "object_menu_entries": object_menu_entries,
        "scene_settings": hasattr(bpy.context.scene, "d3d_settings"),
        "preferences": MODULE in bpy.context.preferences.addons,
        "torch_imported": "torch" in sys.modules,
    }


def scenario_install(config: dict) -> dict:
    facts = install(config["zip"])
    facts.update(registration_facts())
    import addon_utils

    addon_utils.disable(MODULE, default_set=True)
    facts["after_disable_generate"] = hasattr(bpy.types, "D3D_OT_generate")
    facts["after_disable_scene_settings"] = hasattr(bpy.types.Scene, "d3d_settings")
    return facts


def configure(config: dict) -> None:
    import os

    for key, value in config.get("env", {}).items():
        os.environ[key] = value
    prefs = bpy.context.preferences.addons[MODULE].preferences
    prefs.engine_python = config["engine_python"]
    prefs.engine_path = config["engine_path"]
    prefs.weights_dir = config.get("weights", "")
    prefs.device = "cpu"
    prefs.dtype = "float32"


def object_facts(obj) -> dict:
    corners = [obj.matrix_world @ __import__("mathutils").Vector(c) for c in obj.bound_box]
    low = [min(c[i] for c in corners) for i in range(3)]
    high = [max(c[i] for c in corners) for i in range(3)]
    return {
        "name": obj.name,
        "type": obj.type,
        "faces": len(obj.data.polygons),
        "vertices": len(obj.data.vertices),
        "location": list(obj.location),
        "low": low,
        "high": high,
        "source_image": obj.get("d3d_source_image"),
        "settings": json.loads(obj.get("d3d_settings_json", "{}")),
        "has_settings_group": "d3d_settings" in obj.keys(),
        "quads": sum(1 for p in obj.data.polygons if p.loop_total == 4),
        "smooth": all(p.use_smooth for p in obj.data.polygons[:50]),
    }


def run_generate(case: dict) -> dict:
    scene = bpy.context.scene
    settings = scene.d3d_settings
    for key, value in case.get("scene_settings", {}).items():
        setattr(settings, key, value)
    scene.cursor.location = case.get("cursor", (0.0, 0.0, 0.0))
    if case.get("packed_image"):
        image = bpy.data.images.load(case["packed_image"])
        image.pack()
        settings.image_source = "DATABLOCK"
        settings.image = image
    if case.get("select"):
        for obj in bpy.context.view_layer.objects:
            obj.select_set(obj.name == case["select"])
        bpy.context.view_layer.objects.active = bpy.data.objects[case["select"]]
    before = set(bpy.data.objects.keys())
    meshes_before = len(bpy.data.meshes)
    error_raised = ""
    try:
        outcome = bpy.ops.d3d.generate("INVOKE_DEFAULT")
    except RuntimeError as exc:  # an operator that reports an ERROR raises when called from Python
        outcome, error_raised = {"CANCELLED"}, str(exc)
    new = sorted(set(bpy.data.objects.keys()) - before)
    facts = {"outcome": sorted(outcome), "new_objects": new, "meshes_delta": len(bpy.data.meshes) - meshes_before,
             "error_raised": error_raised,
             "last_error": bpy.context.window_manager.d3d_job.last_error}
    if len(new) == 1:
        facts["object"] = object_facts(bpy.data.objects[new[0]])
    return facts


def scenario_generate(config: dict) -> dict:
    facts = install(config["zip"])
    configure(config)
    bpy.ops.mesh.primitive_cube_add(size=1.0, location=(5.0, 0.0, 1.0))
    target = bpy.context.active_object
    target.name = "FitTarget"
    target.scale = (2.0, 1.0, 3.0)
    bpy.context.view_layer.update()
    facts["cases"] = [run_generate(case) for case in config["cases"]]
    if config.get("import_again"):
        before = set(bpy.data.objects.keys())
        bpy.context.scene.d3d_settings.placement = "CURSOR"
        bpy.context.scene.d3d_settings.height = 0.5
        bpy.context.scene.d3d_settings.remesh = "NONE"
        outcome = bpy.ops.d3d.import_last_result()
        new = sorted(set(bpy.data.objects.keys()) - before)
        facts["import_again"] = {"outcome": sorted(outcome), "new_objects": new,
                                 "object": object_facts(bpy.data.objects[new[0]]) if len(new) == 1 else None}
    check = bpy.ops.d3d.check_engine()
    facts["check"] = {"outcome": sorted(check), "report": bpy.context.window_manager.d3d_job.engine_report}
    facts["torch_imported"] = "torch" in sys.modules
    from importlib import import_module

    session = import_module(f"{MODULE}.session").session
    client = session.client
    facts["engine_running"] = bool(client and client.running)
    session.stop()
    facts["engine_exit_code"] = client.process.returncode if client else None
    return facts


class FakeEvent:
    def __init__(self, kind: str, value: str = "NOTHING"):
        self.type, self.value = kind, value


def modal_harness():
    """An object that runs D3D_OT_generate's modal code: modal operators cannot start in
    background mode, so the test calls its methods the way the window manager would."""
    operator = bpy.types.D3D_OT_generate
    reports = []

    class Harness:
        _timer = None
        _cancel_sent_at = None

        def report(self, kinds, message):
            reports.append([sorted(kinds)[0], message])

    for name in ("_start", "_begin_job", "_finish", "modal", "_request_cancel", "cancel", "_cleanup"):
        setattr(Harness, name, getattr(operator, name))
    harness = Harness()
    harness.reports = reports
    return harness


def drive_modal(harness, events_before_esc=None, use_cancel_operator=False, timeout=300.0):
    """Feed TIMER events (and one Esc, or the cancel operator) until modal() ends."""
    import time

    context = bpy.context
    statuses, timers = [], 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if events_before_esc is not None and timers == events_before_esc:
            if use_cancel_operator:
                statuses.append("cancel operator: " + str(sorted(bpy.ops.d3d.cancel_generation())))
            else:
                assert harness.modal(context, FakeEvent("ESC", "PRESS")) == {"RUNNING_MODAL"}
        outcome = harness.modal(context, FakeEvent("TIMER"))
        timers += 1
        # Events that are not ours pass through to Blender while the job runs.
        if outcome == {"PASS_THROUGH"}:
            state = context.window_manager.d3d_job
            statuses.append(f"{state.progress:.3f} {state.status}")
            passthrough = harness.modal(context, FakeEvent("MOUSEMOVE"))
            assert passthrough == {"PASS_THROUGH"}, passthrough
            continue
        return sorted(outcome), statuses
    raise AssertionError("modal() did not finish in time")


def scenario_modal(config: dict) -> dict:
    facts = install(config["zip"])
    configure(config)
    from importlib import import_module

    session = import_module(f"{MODULE}.session").session
    settings = bpy.context.scene.d3d_settings
    for key, value in config["scene_settings"].items():
        setattr(settings, key, value)
    runs = {}
    for name, slow, esc_after, use_operator in (("complete", False, None, False), ("esc", True, 3, False),
                                                ("cancel_button", True, 3, True)):
        settings.dense_steps = config["slow_steps"] if slow else config["quick_steps"]
        harness = modal_harness()
        before = set(bpy.data.objects.keys())
        started = harness._begin_job(bpy.context)
        busy_poll = bpy.types.D3D_OT_generate.poll(bpy.context)
        outcome, statuses = drive_modal(harness, esc_after, use_operator)
        new = sorted(set(bpy.data.objects.keys()) - before)
        runs[name] = {"started": started, "outcome": outcome, "statuses": statuses, "new_objects": new,
                      "reports": harness.reports, "busy_poll": busy_poll,
                      "running_after": bpy.context.window_manager.d3d_job.running,
                      "session_busy_after": session.busy}
    facts["runs"] = runs
    session.stop()
    return facts


def scenario_orient(config: dict) -> dict:
    """Where the engine's up (+Y) and front (+Z) end up for every up-axis choice, and the
    determinant of each rotation (a mirror would turn the mesh inside out)."""
    import numpy as np

    install(config["zip"])
    from importlib import import_module

    mesh_import = import_module(f"{MODULE}.mesh_import")
    facts = {}
    for axis in ("Z", "Y", "X", "-Z", "-Y", "-X"):
        up, front = mesh_import.orient(np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), axis)
        rotation = mesh_import.UP_AXIS_ROTATIONS[axis] @ mesh_import.ENGINE_TO_BLENDER
        facts[axis] = {"up": up.round(6).tolist(), "front": front.round(6).tolist(),
                       "det": float(np.linalg.det(rotation))}
    try:
        mesh_import.orient(np.zeros((1, 3)), "W")
    except mesh_import.ImportFailed as exc:
        facts["bad_axis"] = str(exc)
    return facts


class CheckingLayout:
    """Stands in for UILayout in panel draw(): records what is drawn and checks that every
    property and operator it names exists."""

    def __init__(self, log):
        self.log = log

    def _sub(self, *args, **kwargs):
        return CheckingLayout(self.log)

    row = column = box = split = _sub

    def prop(self, data, name, **_):
        if not hasattr(data, name) or name not in data.bl_rna.properties:
            raise AssertionError(f"draw() shows missing property {name!r}")
        self.log.append(f"prop:{name}")

    def operator(self, idname, **_):
        category, name = idname.split(".")
        if not hasattr(getattr(bpy.ops, category), name):
            raise AssertionError(f"draw() shows missing operator {idname!r}")
        self.log.append(f"op:{idname}")

    def label(self, text="", **_):
        self.log.append(f"label:{text}")

    def progress(self, factor=0.0, type="BAR", text=""):
        self.log.append(f"progress:{factor:.2f}:{text}")

    def template_ID_preview(self, data, name, **_):
        self.prop(data, name)
        self.log.append("preview:datablock")

    def template_icon(self, icon_value=0, **_):
        self.log.append("preview:file")

    def menu(self, idname, **_):
        self.log.append(f"menu:{idname}")

    def separator(self, **_):
        pass

    def __setattr__(self, name, value):  # use_property_split, active, alert, ...
        object.__setattr__(self, name, value)


def scenario_draw(config: dict) -> dict:
    install(config["zip"])
    context = bpy.context
    settings = context.scene.d3d_settings
    state = context.window_manager.d3d_job
    drawn = {}

    def draw(panel_name, key):
        log = []
        holder = type("Holder", (), {})()
        holder.layout = CheckingLayout(log)
        getattr(bpy.types, panel_name).draw(holder, context)
        drawn[key] = log

    settings.image_path = config["image"]
    draw("D3D_PT_main", "idle_file")
    # Without a UI icons get no id, so check the preview itself was loaded from the file.
    from importlib import import_module

    preview = import_module(f"{MODULE}.ui").load_preview(config["image"])
    drawn["file_preview_size"] = list(preview.image_size) if preview is not None else None
    settings.image_source = "DATABLOCK"
    state.last_error = "The GPU ran out of memory. Try memory mode 'sequential', resolution 512, or close other programs."
    draw("D3D_PT_main", "idle_datablock_error")
    state.running, state.progress, state.status = True, 0.4, "Coarse shape: step 20/50"
    draw("D3D_PT_main", "running")
    for mode in ("NONE", "VOXEL", "QUADRIFLOW"):
        settings.remesh = mode
        draw("D3D_PT_placement", f"placement_{mode}")
    draw("D3D_PT_advanced", "advanced")
    prefs = context.preferences.addons[MODULE].preferences
    log = []
    holder = type("Holder", (), {})()
    holder.layout = CheckingLayout(log)
    state.engine_report = "torch 2.13 (no CUDA build); GPU available: no\nWeights not ready: missing: config.yaml"
    type(prefs).draw(_PrefsProxy(prefs, holder.layout), context)
    drawn["preferences"] = log
    return {"drawn": drawn}


class _PrefsProxy:
    """The preferences object with a recording layout (the real one has no layout headless)."""

    def __init__(self, prefs, layout):
        object.__setattr__(self, "_prefs", prefs)
        object.__setattr__(self, "layout", layout)

    def __getattr__(self, name):
        return getattr(self._prefs, name)


SCENARIOS = {"draw": scenario_draw, "install": scenario_install, "generate": scenario_generate, "modal": scenario_modal,
             "orient": scenario_orient}


def main() -> int:
    name, config_path = sys.argv[-2], sys.argv[-1]
    with open(config_path, encoding="utf-8") as file:
        config = json.load(file)
    try:
        facts = SCENARIOS[name](config)
    except Exception:  # noqa: BLE001 - reported to the test
        facts = {"exception": traceback.format_exc()}
    print("RESULT: " + json.dumps(facts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
