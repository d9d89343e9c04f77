"""Narrow-band voxelisation against brute force on tiny grids, and the point-triangle distance."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from engine.mesh.voxelize import (
    closest_point_on_triangle,
    narrow_band_tokens,
    normalize_mesh,
    point_triangle_distance_squared,
)


def sampled_triangle_distance(points: np.ndarray, tri: np.ndarray, steps: int = 300) -> np.ndarray:
    """Min distance from each point to a dense barycentric sampling of the triangle."""
    u, v = np.meshgrid(np.linspace(0, 1, steps), np.linspace(0, 1, steps), indexing="ij")
    keep = u + v <= 1
    u, v = u[keep], v[keep]
    samples = tri[0] + u[:, None] * (tri[1] - tri[0]) + v[:, None] * (tri[2] - tri[0])
    return np.sqrt(((points[:, None, :] - samples[None]) ** 2).sum(-1)).min(1)


def test_point_triangle_distance_matches_dense_sampling():
    rng = np.random.default_rng(0)
    triangles = [
        rng.normal(size=(3, 3)),
        np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]]),
        np.array([[0.0, 0, 0], [4, 0, 0], [2, 0.05, 0]]),  # sliver with an obtuse corner
        np.array([[0.0, 0, 0], [1, 1, 1], [2, 2, 2]]),  # degenerate (collinear)
    ]
    for tri in triangles:
        points = rng.normal(size=(40, 3)) * 1.5 + tri.mean(0)
        points = np.concatenate([points, tri, (tri[0] + tri[1])[None] / 2])  # on the triangle too
        t = torch.from_numpy(tri)
        dist = point_triangle_distance_squared(
            torch.from_numpy(points), t[0].expand(len(points), 3), t[1].expand(len(points), 3), t[2].expand(len(points), 3)
        ).sqrt().numpy()
        reference = sampled_triangle_distance(points, tri)
        spacing = np.linalg.norm(tri[1] - tri[0]) + np.linalg.norm(tri[2] - tri[0])
        # the exact distance never exceeds the sampled one and is within the sampling resolution
        assert (dist <= reference + 1e-9).all()
        assert (reference - dist <= 2 * spacing / 299).all()
        # the closest point lies on the triangle (inside its plane region) at that distance
        closest = closest_point_on_triangle(torch.from_numpy(points), t[0], t[1], t[2]).numpy()
        np.testing.assert_allclose(np.linalg.norm(closest - points, axis=1), dist, atol=1e-9)
        np.testing.assert_allclose(sampled_triangle_distance(closest, tri), 0.0, atol=2 * spacing / 299)


def brute_force_tokens(vertices: np.ndarray, faces: np.ndarray, size: int, factor: int, threshold: float) -> set:
    """All grid points against all triangles in world units, as in the official voxeliser."""
    axis = np.arange(size) / (size - 1) - 0.5
    points = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    indices = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1).reshape(-1, 3)
    tri = torch.from_numpy(vertices[faces] * 0.5)
    best = torch.full((len(points),), np.inf, dtype=torch.float64)
    p = torch.from_numpy(points)
    for k in range(len(faces)):
        best = torch.minimum(best, point_triangle_distance_squared(p, tri[k, 0], tri[k, 1], tri[k, 2]))
    band = best.sqrt().numpy() < threshold / size
    return {tuple(t) for t in (indices[band] // factor).tolist()}


def rotated(mesh: trimesh.Trimesh, seed: int) -> trimesh.Trimesh:
    mesh = mesh.copy()
    mesh.apply_transform(trimesh.transformations.random_rotation_matrix(np.random.default_rng(seed).random(3)))
    return mesh


MESHES = {
    "sphere": lambda: trimesh.creation.icosphere(subdivisions=1),
    "box": lambda: rotated(trimesh.creation.box(extents=(1.0, 0.7, 0.5)), 1),
    "thin_plate": lambda: rotated(trimesh.creation.box(extents=(1.0, 0.8, 0.01)), 2),
}


@pytest.mark.parametrize("name", sorted(MESHES))
@pytest.mark.parametrize("size,factor", [(32, 1), (40, 8)])
def test_tokens_match_brute_force(name, size, factor):
    mesh = MESHES[name]()
    vertices = normalize_mesh(torch.from_numpy(mesh.vertices))
    expected = brute_force_tokens(vertices.numpy(), mesh.faces, size, factor, 4.0)
    tokens = narrow_band_tokens(vertices, torch.from_numpy(mesh.faces), resolution=size, factor=factor, dtype=torch.float64)
    assert tokens.dtype == torch.int64
    assert {tuple(t) for t in tokens.tolist()} == expected
    assert len(expected) > 0
    # sorted by linear key, no duplicates
    grid = -(-size // factor)
    keys = (tokens[:, 0] * grid + tokens[:, 1]) * grid + tokens[:, 2]
    assert bool((keys[1:] > keys[:-1]).all())


def test_float32_and_chunking_and_splitting_agree():
    mesh = trimesh.creation.icosphere(subdivisions=2)
    vertices = normalize_mesh(torch.from_numpy(mesh.vertices))
    faces = torch.from_numpy(mesh.faces)
    reference = narrow_band_tokens(vertices, faces, resolution=64, factor=8, dtype=torch.float64)
    assert torch.equal(narrow_band_tokens(vertices, faces, resolution=64, factor=8), reference)
    small = narrow_band_tokens(vertices, faces, resolution=64, factor=8, chunk_items=300, max_points_per_triangle=1500)
    assert torch.equal(small, reference)
    # a thinner band (threshold 1) gives a strict subset here
    thin = narrow_band_tokens(vertices, faces, resolution=64, factor=8, threshold=1.0)
    thin_set, ref_set = {tuple(t) for t in thin.tolist()}, {tuple(t) for t in reference.tolist()}
    assert thin_set <= ref_set and len(thin_set) < len(ref_set)


def test_normalize_mesh():
    rng = np.random.default_rng(3)
    vertices = torch.from_numpy(rng.normal(size=(50, 3)) * np.array([3.0, 1.0, 0.5]) + 7.0)
    out = normalize_mesh(vertices)
    lo, hi = out.min(0).values, out.max(0).values
    torch.testing.assert_close((lo + hi) / 2, torch.zeros(3, dtype=torch.float64))
    assert abs(float((hi - lo).max()) - 1.9) < 1e-12
    with pytest.raises(ValueError):
        normalize_mesh(torch.zeros(4, 3))


def test_empty_and_invalid_inputs():
    vertices = torch.zeros((3, 3))
    assert narrow_band_tokens(vertices, torch.zeros((0, 3), dtype=torch.long), resolution=32).shape == (0, 3)
    with pytest.raises(ValueError):
        narrow_band_tokens(vertices, torch.zeros((2, 2), dtype=torch.long))
