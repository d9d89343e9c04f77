"""Post-processing options and export frame."""
from __future__ import annotations

import numpy as np
import pytest
import trimesh

from engine.mesh.frame import MODEL_TO_EXPORT, UP_AXIS, Z_UP_FROM_Y_UP
from engine.mesh.postprocess import (
    decimate_to_faces,
    export_mesh,
    keep_largest_components,
    postprocess,
    remove_small_components,
    smooth,
)


def sphere(subdivisions: int, radius: float, centre) -> trimesh.Trimesh:
    mesh = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    mesh.apply_translation(centre)
    return mesh


def three_spheres() -> trimesh.Trimesh:
    # 1280, 320 and 80 faces
    return trimesh.util.concatenate(
        [sphere(3, 0.4, (0, 0, 0)), sphere(2, 0.2, (0.7, 0, 0)), sphere(1, 0.1, (0, 0.7, 0))]
    )


def test_keep_largest_components():
    mesh = three_spheres()
    kept = keep_largest_components(mesh, 2)
    assert len(kept.faces) == 1280 + 320
    assert kept.is_watertight
    assert len(kept.vertices) == len(np.unique(kept.faces))  # no unreferenced vertices
    assert kept.bounds[1, 1] < 0.5  # the small sphere at y = 0.7 is gone
    assert len(keep_largest_components(mesh, 5).faces) == len(mesh.faces)
    with pytest.raises(ValueError):
        keep_largest_components(mesh, 0)


def test_remove_small_components():
    mesh = three_spheres()
    assert len(remove_small_components(mesh, 100).faces) == 1280 + 320
    assert len(remove_small_components(mesh, 321).faces) == 1280
    assert len(remove_small_components(mesh, 0).faces) == len(mesh.faces)


def test_decimate_to_face_count():
    mesh = sphere(5, 1.0, (0, 0, 0))  # 20480 faces
    for target in (5000, 800):
        out = decimate_to_faces(mesh, target)
        assert abs(len(out.faces) - target) <= 0.05 * target
        radii = np.linalg.norm(out.vertices, axis=1)
        assert np.abs(radii - 1.0).max() < 0.02  # still the unit sphere
    small = sphere(1, 1.0, (0, 0, 0))
    assert len(decimate_to_faces(small, 1000).faces) == 80
    with pytest.raises(ValueError):
        decimate_to_faces(mesh, 2)


def test_taubin_smoothing_reduces_noise_without_shrinking():
    rng = np.random.default_rng(0)
    mesh = sphere(4, 1.0, (0, 0, 0))
    noisy = mesh.copy()
    noisy.vertices = noisy.vertices * (1 + rng.normal(scale=0.02, size=(len(noisy.vertices), 1)))
    out = smooth(noisy, 10)
    noise_before = np.std(np.linalg.norm(noisy.vertices, axis=1))
    noise_after = np.std(np.linalg.norm(out.vertices, axis=1))
    assert noise_after < 0.5 * noise_before
    assert abs(out.volume / mesh.volume - 1) < 0.03
    np.testing.assert_array_equal(smooth(noisy, 0).vertices, noisy.vertices)


def test_postprocess_combines_options():
    mesh = trimesh.util.concatenate([sphere(4, 0.5, (0, 0, 0)), sphere(1, 0.05, (0.8, 0.8, 0.8))])
    out = postprocess(mesh, target_faces=1000, keep_largest=1, min_component_faces=10, smooth_iterations=2)
    assert abs(len(out.faces) - 1000) <= 50
    assert out.bounds[1].max() < 0.6
    untouched = postprocess(mesh)
    assert len(untouched.faces) == len(mesh.faces)


@pytest.mark.parametrize("suffix", [".glb", ".obj", ".ply"])
def test_export_round_trip_keeps_model_frame(tmp_path, suffix):
    # an asymmetric shape: a box elongated along +Y (the up axis), shifted off-centre
    mesh = trimesh.creation.box(extents=(0.2, 1.0, 0.4))
    mesh.apply_translation((0.1, 0.3, -0.2))
    path = export_mesh(mesh, tmp_path / f"out{suffix}")
    assert path.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    loaded = trimesh.load(path, force="mesh", process=False)
    assert len(loaded.faces) == len(mesh.faces)
    np.testing.assert_allclose(loaded.bounds, mesh.bounds, atol=1e-6)
    extents = loaded.bounds[1] - loaded.bounds[0]
    assert int(np.argmax(extents)) == int(np.argmax(UP_AXIS))  # tall along Y after loading
    np.testing.assert_allclose(MODEL_TO_EXPORT, np.eye(4))


def test_export_rejects_unknown_extension_and_missing_folder(tmp_path):
    mesh = trimesh.creation.box()
    with pytest.raises(ValueError, match="extension"):
        export_mesh(mesh, tmp_path / "out.stl")
    with pytest.raises(ValueError, match="extension"):
        export_mesh(mesh, tmp_path / "out")
    with pytest.raises(ValueError, match="does not exist"):
        export_mesh(mesh, tmp_path / "missing" / "out.glb")
    export_mesh(mesh, tmp_path / "UPPER.GLB")  # extension check is case-insensitive
    assert (tmp_path / "UPPER.GLB").is_file()


def test_z_up_conversion_maps_up_and_front():
    up = Z_UP_FROM_Y_UP[:3, :3] @ UP_AXIS
    np.testing.assert_allclose(up, [0, 0, 1])
    np.testing.assert_allclose(Z_UP_FROM_Y_UP[:3, :3] @ np.array([0, 0, 1.0]), [0, -1, 0])
    assert np.isclose(np.linalg.det(Z_UP_FROM_Y_UP[:3, :3]), 1.0)
