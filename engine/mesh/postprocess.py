"""Mesh clean-up options (components, smoothing, decimation to a face count) and file export."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import trimesh

from engine.mesh.frame import model_to_export

__all__ = [
    "EXPORT_FORMATS",
    "component_labels",
    "keep_largest_components",
    "remove_small_components",
    "smooth",
    "decimate_to_faces",
    "postprocess",
    "export_mesh",
    "export",
]

EXPORT_FORMATS = {".glb": "glb", ".obj": "obj", ".ply": "ply"}


def _rebuild(mesh: trimesh.Trimesh, faces: np.ndarray) -> trimesh.Trimesh:
    """A mesh made of the given faces, without unreferenced vertices."""
    used, new_faces = np.unique(faces.reshape(-1), return_inverse=True)
    return trimesh.Trimesh(mesh.vertices[used], new_faces.reshape(-1, 3), process=False)


def component_labels(mesh: trimesh.Trimesh) -> np.ndarray:
    """Connected-component label per face; faces are connected when they share an edge."""
    return trimesh.graph.connected_component_labels(mesh.face_adjacency, node_count=len(mesh.faces))


def keep_largest_components(mesh: trimesh.Trimesh, n: int) -> trimesh.Trimesh:
    """Keep the ``n`` components with the most faces (ties: lower label first)."""
    if n < 1:
        raise ValueError(f"keep_largest_components needs n >= 1, got {n}")
    if len(mesh.faces) == 0:
        return mesh.copy()
    labels = component_labels(mesh)
    sizes = np.bincount(labels)
    if len(sizes) <= n:
        return mesh.copy()
    keep = np.argsort(-sizes, kind="stable")[:n]
    return _rebuild(mesh, mesh.faces[np.isin(labels, keep)])


def remove_small_components(mesh: trimesh.Trimesh, min_faces: int) -> trimesh.Trimesh:
    """Drop components with fewer than ``min_faces`` faces (floaters)."""
    if min_faces <= 1 or len(mesh.faces) == 0:
        return mesh.copy()
    labels = component_labels(mesh)
    sizes = np.bincount(labels)
    return _rebuild(mesh, mesh.faces[sizes[labels] >= min_faces])


def smooth(mesh: trimesh.Trimesh, iterations: int, lamb: float = 0.5, nu: float = 0.53) -> trimesh.Trimesh:
    """Taubin smoothing (shrink-free low-pass: alternating +lamb / -nu Laplacian steps)."""
    out = mesh.copy()
    if iterations > 0 and len(out.faces):
        trimesh.smoothing.filter_taubin(out, lamb=lamb, nu=nu, iterations=int(iterations))
    return out


def decimate_to_faces(mesh: trimesh.Trimesh, target_faces: int, aggressiveness: float = 7.0) -> trimesh.Trimesh:
    """Quadric-error decimation (fast-simplification) down to about ``target_faces`` faces.

    A mesh that already has no more faces than the target is returned unchanged (copied).
    """
    if target_faces < 4:
        raise ValueError(f"target_faces must be at least 4, got {target_faces}")
    if len(mesh.faces) <= target_faces:
        return mesh.copy()
    import fast_simplification

    points, faces = fast_simplification.simplify(
        np.ascontiguousarray(mesh.vertices, dtype=np.float64),
        np.ascontiguousarray(mesh.faces, dtype=np.int64),
        target_count=int(target_faces),
        agg=aggressiveness,
    )
    return trimesh.Trimesh(points, faces, process=False)


def postprocess(
    mesh: trimesh.Trimesh,
    target_faces: int | None = None,
    keep_largest: int | None = None,
    min_component_faces: int = 0,
    smooth_iterations: int = 0,
) -> trimesh.Trimesh:
    """Component filtering, then smoothing, then decimation (each optional)."""
    if keep_largest is not None:
        mesh = keep_largest_components(mesh, keep_largest)
    if min_component_faces > 1:
        mesh = remove_small_components(mesh, min_component_faces)
    if smooth_iterations > 0:
        mesh = smooth(mesh, smooth_iterations)
    if target_faces is not None:
        mesh = decimate_to_faces(mesh, target_faces)
    return mesh


def export_mesh(mesh: trimesh.Trimesh, path: str | os.PathLike) -> Path:
    """Write ``mesh`` (model frame) as .glb, .obj or .ply in the export frame of docs/output-frame.md.

    The file is written to a temporary name in the same folder and renamed into place, so readers
    never see a partial file. Returns the path.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in EXPORT_FORMATS:
        raise ValueError(
            f"unsupported mesh file extension {path.suffix!r} for {str(path)!r}; use one of {sorted(EXPORT_FORMATS)}"
        )
    if not path.parent.is_dir():
        raise ValueError(f"output folder {str(path.parent)!r} does not exist")
    out = trimesh.Trimesh(model_to_export(mesh.vertices), np.asarray(mesh.faces), process=False)
    data = out.export(file_type=EXPORT_FORMATS[suffix])
    if isinstance(data, str):
        data = data.encode("utf-8")
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return path


export = export_mesh
