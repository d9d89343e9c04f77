"""Bring an engine result into the scene: fast mesh build, placement, remesh, shading.

The engine writes ``<name>.npz`` with ``vertices`` (float32 [V,3]) and ``faces`` (int32 [F,3])
in its output frame (+Y up, front towards +Z, centred; see docs/output-frame.md). The mesh is
built with the generic attribute API (``position`` and ``.corner_vert``), which is an order of
magnitude faster than ``from_pydata`` on million-triangle meshes.
"""

from __future__ import annotations

import json
from pathlib import Path

import bmesh
import bpy
import numpy as np
from mathutils import Matrix, Vector

# Engine frame (+Y up, front +Z) to Blender (+Z up, front -Y): the glTF convention.
ENGINE_TO_BLENDER = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
# Rotations taking Blender's +Z (the model's up after conversion) to the chosen up axis.
UP_AXIS_ROTATIONS = {
    "Z": np.eye(3),
    "Y": np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]]),
    "X": np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]]),
    "-Z": np.array([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]]),
    "-Y": np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]),
    "-X": np.array([[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]),
}
QUADRIFLOW_MAX_INPUT_FACES = 100_000


class ImportFailed(Exception):
    """The result could not be imported; the message is meant for the user."""


def load_arrays(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Read and check the engine's ``.npz`` result."""
    file = Path(path)
    if not file.is_file():
        raise ImportFailed(f"The result file is missing: {file}")
    try:
        with np.load(file, allow_pickle=False) as data:
            vertices = np.ascontiguousarray(data["vertices"], dtype=np.float32)
            faces = np.ascontiguousarray(data["faces"], dtype=np.int32)
    except (OSError, KeyError, ValueError) as exc:
        raise ImportFailed(f"The result file {file.name} could not be read: {exc}") from exc
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise ImportFailed(f"Result vertices have shape {vertices.shape}, expected (V, 3)")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ImportFailed(f"Result faces have shape {faces.shape}, expected (F, 3)")
    if len(faces) == 0:
        raise ImportFailed("The engine returned an empty mesh (no faces). Try another seed or image.")
    if faces.min() < 0 or faces.max() >= len(vertices):
        raise ImportFailed("The result mesh refers to vertices that do not exist")
    if not np.isfinite(vertices).all():
        raise ImportFailed("The result mesh has invalid (NaN or infinite) vertex positions")
    return vertices, faces


def orient(vertices: np.ndarray, up_axis: str) -> np.ndarray:
    """Engine frame to Blender frame, then turn the model's up to ``up_axis``."""
    if up_axis not in UP_AXIS_ROTATIONS:
        raise ImportFailed(f"Unknown up axis {up_axis!r}")
    rotation = UP_AXIS_ROTATIONS[up_axis] @ ENGINE_TO_BLENDER
    return vertices.astype(np.float64) @ rotation.T


def placement_transform(points: np.ndarray, up_axis: str, placement: str, height: float,
                        cursor, fit_bounds) -> tuple[float, np.ndarray, np.ndarray]:
    """Scale, local anchor (bottom centre of the mesh) and world location for the object."""
    axis = "XYZ".index(up_axis[-1])
    upward = not up_axis.startswith("-")
    low, high = points.min(axis=0), points.max(axis=0)
    extent = high - low
    if extent[axis] <= 0:
        raise ImportFailed("The generated mesh is flat along its up axis; nothing to scale")
    anchor = (low + high) / 2.0
    anchor[axis] = low[axis] if upward else high[axis]
    if placement == "CURSOR":
        if height <= 0:
            raise ImportFailed("Height must be greater than zero")
        scale = height / extent[axis]
        location = np.array(cursor, dtype=np.float64)
    elif placement == "FIT_SELECTED":
        if fit_bounds is None:
            raise ImportFailed("Placement 'Fit Selected' needs a selected object")
        target_low, target_high = (np.array(b, dtype=np.float64) for b in fit_bounds)
        target_extent = target_high - target_low
        usable = (target_extent > 1e-9) & (extent > 1e-9)
        if not usable.any():
            raise ImportFailed("The selected object has no size to fit the result into")
        scale = float(np.min(target_extent[usable] / extent[usable]))
        location = (target_low + target_high) / 2.0
        location[axis] = target_low[axis] if upward else target_high[axis]
    else:
        raise ImportFailed(f"Unknown placement {placement!r}")
    return float(scale), anchor, location


def world_bounds(obj) -> tuple[tuple, tuple]:
    corners = np.array([tuple(obj.matrix_world @ Vector(c)) for c in obj.bound_box])
    return tuple(corners.min(axis=0)), tuple(corners.max(axis=0))


def build_mesh(name: str, vertices: np.ndarray, faces: np.ndarray):
    """Create a mesh datablock from triangle arrays through the attribute API."""
    mesh = bpy.data.meshes.new(name)
    try:
        mesh.vertices.add(len(vertices))
        mesh.attributes["position"].data.foreach_set(
            "vector", np.ascontiguousarray(vertices, dtype=np.float32).ravel())
        corner_count = faces.size
        mesh.loops.add(corner_count)
        mesh.attributes[".corner_vert"].data.foreach_set(
            "value", np.ascontiguousarray(faces, dtype=np.int32).ravel())
        mesh.polygons.add(len(faces))
        mesh.polygons.foreach_set("loop_start", np.arange(0, corner_count, 3, dtype=np.int32))
        mesh.update(calc_edges=True)
    except Exception:
        bpy.data.meshes.remove(mesh)
        raise
    return mesh


def _swap_mesh(obj, new_mesh) -> None:
    old = obj.data
    obj.data = new_mesh
    if old.users == 0:
        bpy.data.meshes.remove(old)


def _evaluate_with_modifier(context, obj, modifier) -> None:
    """Apply one modifier by evaluating once (cheaper than bpy.ops.object.modifier_apply)."""
    try:
        depsgraph = context.evaluated_depsgraph_get()
        evaluated = obj.evaluated_get(depsgraph)
        new_mesh = bpy.data.meshes.new_from_object(evaluated)
    finally:
        obj.modifiers.remove(modifier)
    new_mesh.name = obj.data.name
    _swap_mesh(obj, new_mesh)


def enforce_face_budget(context, obj, max_faces: int) -> bool:
    """Decimate in Blender when the engine's mesh is over budget; True when it had to."""
    if len(obj.data.polygons) <= max_faces:
        return False
    for _ in range(3):  # collapse decimation can land a little above its ratio
        decimate_to(context, obj, max_faces)
        if len(obj.data.polygons) <= max_faces:
            break
    return True


def voxel_remesh(context, obj, voxel_size: float) -> None:
    if voxel_size <= 0:
        raise ImportFailed("Voxel size must be greater than zero")
    dims = np.array(obj.dimensions)
    cells = np.prod(np.maximum(dims / voxel_size, 1.0))
    if cells > 2.0e9:
        raise ImportFailed(
            f"Voxel size {voxel_size:g} is too small for an object of {dims.max():g} units; "
            "use a larger voxel size")
    modifier = obj.modifiers.new("D3D Voxel Remesh", "REMESH")
    modifier.mode = "VOXEL"
    modifier.voxel_size = voxel_size
    _evaluate_with_modifier(context, obj, modifier)


def decimate_to(context, obj, max_faces: int) -> None:
    faces = len(obj.data.polygons)
    if faces <= max_faces:
        return
    modifier = obj.modifiers.new("D3D Decimate", "DECIMATE")
    modifier.decimate_type = "COLLAPSE"
    modifier.ratio = max_faces / faces
    _evaluate_with_modifier(context, obj, modifier)


def quadriflow_remesh(context, obj, quad_faces: int) -> str:
    """QuadriFlow with its preconditions met; returns a warning text ('' when it worked).

    QuadriFlow rejects meshes with an edge shorter than 1e-4 on every axis and is slow on
    dense input, so the mesh is decimated, scaled up temporarily and welded first.
    """
    decimate_to(context, obj, QUADRIFLOW_MAX_INPUT_FACES)
    mesh = obj.data
    size = max(obj.dimensions) / max(max(obj.scale), 1e-12)
    if size <= 0:
        return "QuadriFlow skipped: the mesh has no size"
    working_scale = 10.0 / size
    mesh.transform(Matrix.Scale(working_scale, 4))
    try:
        work = bmesh.new()
        work.from_mesh(mesh)
        bmesh.ops.remove_doubles(work, verts=work.verts, dist=1e-3)
        work.to_mesh(mesh)
        work.free()
        before = len(mesh.polygons)
        with context.temp_override(object=obj, active_object=obj, selected_objects=[obj],
                                   selected_editable_objects=[obj]):
            try:
                outcome = bpy.ops.object.quadriflow_remesh(
                    "EXEC_DEFAULT", mode="FACES", target_faces=int(quad_faces), seed=0,
                    use_mesh_symmetry=False, use_preserve_sharp=False, use_preserve_boundary=False)
            except RuntimeError as exc:
                return f"QuadriFlow failed ({exc}); kept the triangle mesh"
        mesh = obj.data
        sizes = np.empty(len(mesh.polygons), dtype=np.int32)
        mesh.polygons.foreach_get("loop_total", sizes)
        quads = int((sizes == 4).sum())
        if "FINISHED" not in outcome or len(mesh.polygons) == before or quads == 0:
            return "QuadriFlow could not remesh this shape; kept the triangle mesh"
        return ""
    finally:
        obj.data.transform(Matrix.Scale(1.0 / working_scale, 4))
        obj.data.update()


def _clean_for_idprops(values: dict) -> dict:
    return {key: value for key, value in values.items() if value is not None}


def import_result(context, arrays_path: str, name: str, options: dict, fit_bounds=None,
                  source_image: str = "", settings: dict | None = None) -> tuple[object, list[str]]:
    """Create one new object from an engine result. On failure nothing is left behind.

    Returns the object and a list of warnings (e.g. a remesh that was skipped).
    """
    vertices, faces = load_arrays(arrays_path)
    up_axis = options.get("up_axis", "Z")
    points = orient(vertices, up_axis)
    cursor = tuple(context.scene.cursor.location)
    scale, anchor, location = placement_transform(
        points, up_axis, options.get("placement", "CURSOR"), float(options.get("height", 2.0)),
        cursor, fit_bounds)
    local = (points - anchor) * scale

    warnings: list[str] = []
    obj = None
    mesh = build_mesh(name, local, faces)
    mesh_name = mesh.name
    try:
        obj = bpy.data.objects.new(name, mesh)
        obj.location = tuple(location)
        collection = context.collection or context.scene.collection
        collection.objects.link(obj)
        max_faces = options.get("max_faces")
        if max_faces:
            enforce_face_budget(context, obj, int(max_faces))
        remesh = options.get("remesh", "NONE")
        if remesh == "VOXEL":
            voxel_remesh(context, obj, float(options.get("voxel_size", 0.02)))
        elif remesh == "QUADRIFLOW":
            warning = quadriflow_remesh(context, obj, int(options.get("quad_faces", 5000)))
            if warning:
                warnings.append(warning)
        elif remesh != "NONE":
            raise ImportFailed(f"Unknown remesh mode {remesh!r}")
        if options.get("smooth_shading", True):
            obj.data.shade_smooth()
        else:
            obj.data.shade_flat()
        obj["d3d_source_image"] = source_image
        obj["d3d_settings"] = _clean_for_idprops(settings or {})
        obj["d3d_import"] = _clean_for_idprops(options)
        obj["d3d_result"] = str(arrays_path)
        obj["d3d_settings_json"] = json.dumps(settings or {}, sort_keys=True)
    except Exception:
        # Leave the scene as it was: drop the object and every mesh this import made.
        current_mesh_name = obj.data.name if obj is not None else mesh_name
        if obj is not None:
            bpy.data.objects.remove(obj)
        for leftover_name in {mesh_name, current_mesh_name}:
            leftover = bpy.data.meshes.get(leftover_name)
            if leftover is not None and leftover.users == 0:
                bpy.data.meshes.remove(leftover)
        raise
    for other in context.view_layer.objects:
        if other.select_get():
            other.select_set(False)
    obj.select_set(True)
    context.view_layer.objects.active = obj
    return obj, warnings
