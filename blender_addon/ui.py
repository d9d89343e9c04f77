"""Sidebar panels (View3D > Sidebar > Image to 3D) and the menu that makes the operators
searchable with F3."""

from pathlib import Path

import bpy
import bpy.utils.previews

from .session import session

TAB = "Image to 3D"
_previews = None


def load_preview(path: str):
    """The ImagePreview of an image file (cached per file version), or None."""
    global _previews
    if not path:
        return None
    absolute = Path(bpy.path.abspath(path))
    try:
        modified = absolute.stat().st_mtime_ns
    except OSError:
        return None
    if not absolute.is_file():
        return None
    if _previews is None:
        _previews = bpy.utils.previews.new()
    key = f"{absolute}|{modified}"  # a file replaced on disk gets a fresh preview
    if key not in _previews:
        try:
            _previews.load(key, str(absolute), "IMAGE")
        except Exception:  # noqa: BLE001 - a preview must never break the panel
            return None
    return _previews[key]


def _preview_icon(path: str) -> int:
    """Icon id of a file preview; 0 when there is none (also always 0 without a UI)."""
    preview = load_preview(path)
    return preview.icon_id if preview is not None else 0


class D3D_PT_main(bpy.types.Panel):
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = TAB
    bl_label = "Direct3D-S2"

    def draw(self, context):
        layout = self.layout
        settings = context.scene.d3d_settings
        state = context.window_manager.d3d_job

        layout.row().prop(settings, "image_source", expand=True)
        if settings.image_source == "FILE":
            layout.prop(settings, "image_path", text="")
            icon = _preview_icon(settings.image_path)
            if icon:
                layout.template_icon(icon_value=icon, scale=6.0)
        else:
            layout.template_ID_preview(settings, "image", open="image.open", rows=3, cols=6)

        column = layout.column(align=True)
        column.row().prop(settings, "resolution", expand=True)
        column.prop(settings, "seed")
        layout.prop(settings, "remove_interior")
        row = layout.row(align=True)
        row.prop(settings, "use_target_faces", text="")
        sub = row.row(align=True)
        sub.active = settings.use_target_faces
        sub.prop(settings, "target_faces")

        if state.running or session.busy:
            layout.progress(factor=state.progress, type="BAR", text=state.status or "Working…")
            layout.operator("d3d.cancel_generation", icon="CANCEL")
        else:
            layout.operator("d3d.generate", icon="MESH_MONKEY")
            if state.status:
                layout.label(text=state.status)
        if state.last_error:
            box = layout.box()
            box.alert = True
            for line in _wrap(state.last_error, 48):
                box.label(text=line)


class D3D_PT_placement(bpy.types.Panel):
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = TAB
    bl_parent_id = "D3D_PT_main"
    bl_label = "Placement and Shading"

    def draw(self, context):
        layout = self.layout
        layout.use_property_split = True
        settings = context.scene.d3d_settings
        layout.prop(settings, "placement")
        row = layout.row()
        row.active = settings.placement == "CURSOR"
        row.prop(settings, "height")
        layout.prop(settings, "up_axis")
        layout.prop(settings, "smooth_shading")
        layout.prop(settings, "remesh")
        if settings.remesh == "VOXEL":
            layout.prop(settings, "voxel_size")
        elif settings.remesh == "QUADRIFLOW":
            layout.prop(settings, "quad_faces")
        layout.operator("d3d.import_last_result", icon="IMPORT")


class D3D_PT_advanced(bpy.types.Panel):
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = TAB
    bl_parent_id = "D3D_PT_main"
    bl_label = "Advanced"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        layout = self.layout
        layout.use_property_split = True
        settings = context.scene.d3d_settings
        for name in ("dense_steps", "dense_guidance", "sparse_512_steps", "sparse_512_guidance"):
            layout.prop(settings, name)
        column = layout.column()
        column.active = settings.resolution == "1024"
        column.prop(settings, "sparse_1024_steps")
        column.prop(settings, "sparse_1024_guidance")
        layout.operator("d3d.restart_engine", icon="FILE_REFRESH")


class D3D_MT_image_to_3d(bpy.types.Menu):
    bl_label = "Image to 3D"
    bl_idname = "D3D_MT_image_to_3d"

    def draw(self, context):
        layout = self.layout
        layout.operator("d3d.generate", icon="MESH_MONKEY")
        layout.operator("d3d.cancel_generation", icon="CANCEL")
        layout.operator("d3d.import_last_result", icon="IMPORT")
        layout.separator()
        layout.operator("d3d.restart_engine", icon="FILE_REFRESH")
        layout.operator("d3d.check_engine", icon="CHECKMARK")


def _draw_object_menu(self, context):
    self.layout.separator()
    self.layout.menu(D3D_MT_image_to_3d.bl_idname, icon="MESH_MONKEY")


def _wrap(text: str, width: int) -> list[str]:
    lines, current = [], ""
    for word in text.split():
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}".strip()
    if current:
        lines.append(current)
    return lines


classes = (D3D_PT_main, D3D_PT_placement, D3D_PT_advanced, D3D_MT_image_to_3d)


def register():
    for cls in classes:
        bpy.utils.register_class(cls)
    bpy.types.VIEW3D_MT_object.append(_draw_object_menu)


def unregister():
    global _previews
    bpy.types.VIEW3D_MT_object.remove(_draw_object_menu)
    for cls in reversed(classes):
        bpy.utils.unregister_class(cls)
    if _previews is not None:
        bpy.utils.previews.remove(_previews)
        _previews = None
