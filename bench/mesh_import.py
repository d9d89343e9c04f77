"""Time the add-on's mesh import path on a 1 million-triangle mesh (CPU, bpy wheel).

Run with a Python that has the bpy wheel:

    .venv-blender/bin/python bench/mesh_import.py [--triangles 1000000] [--repeats 3]

It writes the mesh the way the engine worker does (``.npz`` with float32 vertices and int32
faces), then times, best of ``--repeats``:
  read      np.load of the .npz and the checks of ``mesh_import.load_arrays``
  build     ``mesh_import.build_mesh`` (attribute API: position, .corner_vert, loop_start)
  import    the whole ``mesh_import.import_result`` (read, orient, place, build, link, shade)
  pydata    ``Mesh.from_pydata`` with the same arrays, for comparison
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "blender_addon"))


def sphere(triangles: int) -> tuple[np.ndarray, np.ndarray]:
    """A closed latitude/longitude sphere with about ``triangles`` triangles."""
    rings = max(3, int(round(np.sqrt(triangles / 4))))
    segments = 2 * rings
    theta = np.linspace(0, np.pi, rings + 1)[1:-1]
    phi = np.linspace(0, 2 * np.pi, segments, endpoint=False)
    t, p = np.meshgrid(theta, phi, indexing="ij")
    body = np.stack([np.sin(t) * np.cos(p), np.cos(t), np.sin(t) * np.sin(p)], axis=-1).reshape(-1, 3)
    vertices = np.concatenate([[[0, 1, 0]], body, [[0, -1, 0]]]).astype(np.float32) * 0.5
    south = len(vertices) - 1

    def ring(index):
        return 1 + index * segments + np.arange(segments)

    faces = []
    first = ring(0)
    faces.append(np.stack([np.zeros(segments, int), np.roll(first, -1), first], axis=1))
    for index in range(rings - 2):
        upper, lower = ring(index), ring(index + 1)
        upper_next, lower_next = np.roll(upper, -1), np.roll(lower, -1)
        faces.append(np.stack([upper, upper_next, lower], axis=1))
        faces.append(np.stack([upper_next, lower_next, lower], axis=1))
    last = ring(rings - 2)
    faces.append(np.stack([np.full(segments, south), last, np.roll(last, -1)], axis=1))
    return vertices, np.concatenate(faces).astype(np.int32)


def best(times: list[float]) -> str:
    return f"best {min(times):.3f} s, median {statistics.median(times):.3f} s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--triangles", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()

    import bpy
    import mesh_import

    vertices, faces = sphere(options.triangles)
    folder = Path(tempfile.mkdtemp(prefix="d3d-bench-"))
    arrays = folder / "mesh.npz"
    np.savez(arrays, vertices=vertices, faces=faces)
    print(f"Blender {bpy.app.version_string}; mesh: {len(vertices):,} vertices, {len(faces):,} triangles, "
          f"{arrays.stat().st_size / 2**20:.1f} MiB npz")

    timings: dict[str, list[float]] = {"read": [], "build": [], "import": [], "pydata": []}
    options_import = {"placement": "CURSOR", "height": 2.0, "up_axis": "Z", "smooth_shading": True,
                      "remesh": "NONE"}
    for _ in range(options.repeats):
        start = time.perf_counter()
        loaded_vertices, loaded_faces = mesh_import.load_arrays(str(arrays))
        timings["read"].append(time.perf_counter() - start)

        start = time.perf_counter()
        mesh = mesh_import.build_mesh("bench", loaded_vertices, loaded_faces)
        timings["build"].append(time.perf_counter() - start)
        assert len(mesh.polygons) == len(faces)
        bpy.data.meshes.remove(mesh)

        start = time.perf_counter()
        obj, _ = mesh_import.import_result(bpy.context, str(arrays), "bench", options_import)
        timings["import"].append(time.perf_counter() - start)
        assert len(obj.data.polygons) == len(faces)
        old_mesh = obj.data
        bpy.data.objects.remove(obj)
        bpy.data.meshes.remove(old_mesh)

        start = time.perf_counter()
        mesh = bpy.data.meshes.new("pydata")
        mesh.from_pydata(loaded_vertices, [], loaded_faces)
        mesh.update()
        timings["pydata"].append(time.perf_counter() - start)
        bpy.data.meshes.remove(mesh)

    for name, values in timings.items():
        print(f"{name:7s} {best(values)}")
    print(f"speed-up of the import path over from_pydata (build only): "
          f"{min(timings['pydata']) / min(timings['build']):.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
