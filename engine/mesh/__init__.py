"""Mesh extraction (sparse marching cubes), narrow-band voxelisation, post-processing and export."""
from engine.mesh.marching_cubes import (
    dense_marching_cubes,
    grid_to_unit,
    sign_change_cells,
    sparse_marching_cubes,
    upsampled_background,
)
from engine.mesh.postprocess import (
    decimate_to_faces,
    export,
    export_mesh,
    keep_largest_components,
    postprocess,
    remove_small_components,
    smooth,
)
from engine.mesh.voxelize import narrow_band_tokens, normalize_mesh, point_triangle_distance_squared

__all__ = [
    "sparse_marching_cubes",
    "dense_marching_cubes",
    "grid_to_unit",
    "sign_change_cells",
    "upsampled_background",
    "narrow_band_tokens",
    "normalize_mesh",
    "point_triangle_distance_squared",
    "decimate_to_faces",
    "keep_largest_components",
    "remove_small_components",
    "smooth",
    "postprocess",
    "export_mesh",
    "export",
]
