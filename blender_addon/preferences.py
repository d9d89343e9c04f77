"""Add-on preferences: where the engine lives and how it runs."""

import os
from pathlib import Path

import bpy
from bpy.props import BoolProperty, EnumProperty, StringProperty

from .engine_client import EngineConfig

# Environment variables that fill in empty preferences (handy for headless scripts and CI).
ENV_ENGINE_PYTHON = "D3D_ENGINE_PYTHON"
ENV_ENGINE_PATH = "D3D_ENGINE_PATH"
ENV_WEIGHTS = "D3D_WEIGHTS"


class D3D_AddonPreferences(bpy.types.AddonPreferences):
    bl_idname = __package__

    engine_python: StringProperty(
        name="Engine Python",
        description="Python interpreter of the environment where the engine (torch, engine package) "
                    "is installed, e.g. .../venv/bin/python or ...\\venv\\Scripts\\python.exe",
        subtype="FILE_PATH",
    )
    engine_path: StringProperty(
        name="Engine Folder",
        description="Optional: the project checkout that contains the 'engine' folder, when the "
                    "engine is not installed into the environment with pip",
        subtype="DIR_PATH",
    )
    weights_dir: StringProperty(
        name="Weights Folder",
        description="Folder with the Direct3D-S2 checkpoints (config.yaml, model_dense.ckpt, ...)",
        subtype="DIR_PATH",
    )
    allow_download: BoolProperty(
        name="Allow Weights Download",
        description="Let the engine download missing weights (needs Blender's online access)",
        default=False,
    )
    device: StringProperty(
        name="Device",
        description="Torch device for generation: cuda, cuda:1 for the second GPU, or cpu (very slow)",
        default="cuda",
    )
    dtype: EnumProperty(
        name="Precision",
        items=[
            ("float16", "Half (float16)", "Fastest, least memory"),
            ("bfloat16", "BFloat16", "For GPUs with bfloat16 support"),
            ("float32", "Full (float32)", "Most memory; needed on CPU"),
        ],
        default="float16",
    )
    memory_mode: EnumProperty(
        name="Memory Mode",
        items=[
            ("resident", "Resident", "Keep every model on the GPU: fastest, needs the most memory"),
            ("sequential", "Sequential", "Move each stage's models to the GPU only while they run: "
                                         "fits smaller GPUs, a little slower"),
        ],
        default="resident",
    )
    keep_engine_running: BoolProperty(
        name="Keep Engine Loaded",
        description="Keep the engine and its models loaded between generations (faster repeat "
                    "generations, holds GPU memory)",
        default=True,
    )

    def draw(self, context):
        layout = self.layout
        layout.use_property_split = True
        column = layout.column()
        column.prop(self, "engine_python")
        column.prop(self, "engine_path")
        column.prop(self, "weights_dir")
        row = column.row()
        row.prop(self, "allow_download")
        if self.allow_download and not bpy.app.online_access:
            column.label(text="Online access is off in Blender's preferences: downloads are blocked",
                         icon="ERROR")
        column.prop(self, "device")
        column.prop(self, "dtype")
        column.prop(self, "memory_mode")
        column.prop(self, "keep_engine_running")
        row = layout.row()
        row.operator("d3d.check_engine", icon="CHECKMARK")
        row.operator("d3d.restart_engine", icon="FILE_REFRESH")
        report = context.window_manager.d3d_job.engine_report
        if report:
            box = layout.box()
            for line in report.splitlines():
                box.label(text=line)


def get_preferences(context=None):
    context = context or bpy.context
    addon = context.preferences.addons.get(__package__)
    return addon.preferences if addon is not None else None


def log_path() -> str:
    return str(user_folder("logs") / "engine.log")


def user_folder(name: str) -> Path:
    """A writable folder of the add-on (never inside the add-on's own directory)."""
    try:
        folder = Path(bpy.utils.extension_path_user(__package__, path=name, create=True))
    except (ValueError, AttributeError):
        # Loaded as a legacy add-on (not an extension): fall back to Blender's user config.
        folder = Path(bpy.utils.user_resource("CONFIG", path="direct3d_s2")) / name
        folder.mkdir(parents=True, exist_ok=True)
    return folder


def engine_config(context=None) -> EngineConfig:
    """Build the engine launch configuration from preferences (env vars fill empty fields)."""
    prefs = get_preferences(context)

    def pick(value, env_name):
        value = bpy.path.abspath(value) if value else ""
        return value or os.environ.get(env_name, "")

    python = pick(prefs.engine_python if prefs else "", ENV_ENGINE_PYTHON)
    engine_path = pick(prefs.engine_path if prefs else "", ENV_ENGINE_PATH).rstrip("/\\")
    weights = pick(prefs.weights_dir if prefs else "", ENV_WEIGHTS).rstrip("/\\")
    extra = {}
    if prefs is not None and prefs.allow_download and bpy.app.online_access:
        extra["D3D_ALLOW_DOWNLOAD"] = "1"
    return EngineConfig(
        python=python,
        engine_path=engine_path,
        weights_dir=weights,
        device=(prefs.device.strip() if prefs else "") or "cuda",
        dtype=prefs.dtype if prefs else "float16",
        memory_mode=prefs.memory_mode if prefs else "resident",
        log_path=log_path(),
        extra_env=extra,
    )


classes = (D3D_AddonPreferences,)


def register():
    for cls in classes:
        bpy.utils.register_class(cls)


def unregister():
    for cls in reversed(classes):
        bpy.utils.unregister_class(cls)
