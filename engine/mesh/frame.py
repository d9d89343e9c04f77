"""The output frame of generated meshes (see docs/output-frame.md).

Model frame: x, y, z are the voxel axes (sparse coordinate columns 1..3), vertices in [-1, 1]
(``v / resolution * 2 - 1``). The 1024 path re-normalises the 512 mesh to a bounding box centred at
the origin with longest side 1.9 before voxelising, so its output fits about [-0.95, 0.95].

Exported files use the model frame unchanged: +Y is up, +Z is the front (the glTF convention),
right-handed, one unit = half the width of the generation grid. glTF is Y-up by specification,
OBJ is Y-up by common convention, and PLY is written in the same frame for consistency.
"""
from __future__ import annotations

import numpy as np

__all__ = ["UP_AXIS", "FRONT_AXIS", "MODEL_TO_EXPORT", "model_to_export", "Z_UP_FROM_Y_UP"]

UP_AXIS = np.array([0.0, 1.0, 0.0])
FRONT_AXIS = np.array([0.0, 0.0, 1.0])

# 4x4 transform from the model frame to the exported files' frame: identity, because the model
# already produces Y-up geometry (the official demo shows the raw OBJ unrotated in a Y-up viewer).
MODEL_TO_EXPORT = np.eye(4)

# For consumers that want Z-up (e.g. Blender's PLY importer, which does not convert axes):
# rotation by +90 degrees about X maps +Y (up) to +Z and +Z (front) to -Y (Blender's front view
# looks along +Y, so the object's front faces the -Y viewer).
Z_UP_FROM_Y_UP = np.array(
    [
        [1.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, -1.0, 0.0],
        [0.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def model_to_export(vertices: np.ndarray) -> np.ndarray:
    """Vertices [V, 3] of the model frame expressed in the export frame."""
    vertices = np.asarray(vertices, dtype=np.float64)
    return vertices @ MODEL_TO_EXPORT[:3, :3].T + MODEL_TO_EXPORT[:3, 3]
