"""Sparse/dense marching cubes against skimage's Lewiner marching cubes on small analytic fields."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh
from scipy.spatial import cKDTree

from engine.mesh.marching_cubes import EDGE_END as EDGE_END_
from engine.mesh.marching_cubes import EDGE_START as EDGE_START_
from engine.mesh.marching_cubes import (
    case_table,
    dense_marching_cubes,
    grid_to_unit,
    sparse_marching_cubes,
)

skimage_measure = pytest.importorskip("skimage.measure")

LEVEL = 0.2  # the 1024 stage's iso level on a tanh-SDF that is positive outside


def grid(n):
    return np.meshgrid(*[np.arange(n, dtype=np.float64)] * 3, indexing="ij")


def sphere_sdf(n, centre, radius):
    x, y, z = grid(n)
    return np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) - radius


def torus_sdf(n, centre, major, minor):
    x, y, z = grid(n)
    ring = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2) - major
    return np.sqrt(ring**2 + (z - centre[2]) ** 2) - minor


def two_blobs_sdf(n):
    return np.minimum(sphere_sdf(n, (8.3, 9.1, 10.2), 5.4), sphere_sdf(n, (21.6, 20.2, 19.7), 6.1))


def as_tanh(sdf):
    return np.tanh(sdf / 3.0).astype(np.float32)


FIELDS = {
    "sphere": lambda: as_tanh(sphere_sdf(30, (14.3, 15.2, 14.6), 9.7)),
    "torus": lambda: as_tanh(torus_sdf(34, (16.4, 16.9, 16.2), 9.5, 3.6)),
    "two_blobs": lambda: as_tanh(two_blobs_sdf(30)),
    # a sphere cut by the grid border: open surface on both sides
    "border": lambda: as_tanh(sphere_sdf(24, (3.2, 12.4, 11.7), 8.3)),
}


def edge_use(faces: np.ndarray):
    """(undirected edge -> use count, directed edge -> use count) of a triangle list."""
    directed = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    undirected = np.sort(directed, axis=1)
    _, undirected_counts = np.unique(undirected, axis=0, return_counts=True)
    _, directed_counts = np.unique(directed, axis=0, return_counts=True)
    return undirected_counts, directed_counts


def is_closed_manifold(faces: np.ndarray) -> bool:
    undirected_counts, directed_counts = edge_use(faces)
    return bool((undirected_counts == 2).all() and (directed_counts == 1).all())


def topology(vertices: np.ndarray, faces: np.ndarray):
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    components = len(mesh.split(only_watertight=False))
    return mesh.euler_number, components, mesh.is_watertight


def hausdorff(a: trimesh.Trimesh, b: trimesh.Trimesh) -> float:
    # dense surface samples of each mesh against the other's vertices and face centres
    def samples(m):
        return np.concatenate([m.vertices, m.triangles_center])

    pa, pb = samples(a), samples(b)
    return max(cKDTree(pb).query(pa)[0].max(), cKDTree(pa).query(pb)[0].max())


def skimage_mesh(volume: np.ndarray, level: float):
    v, f, _, _ = skimage_measure.marching_cubes(volume, level, method="lewiner")
    return v, f


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_dense_matches_skimage(name):
    volume = FIELDS[name]()
    ref_v, ref_f = skimage_mesh(volume, LEVEL)
    v, f = dense_marching_cubes(torch.from_numpy(volume), LEVEL)
    v, f = v.numpy(), f.numpy()
    assert topology(v, f) == topology(ref_v, ref_f)
    ours, ref = trimesh.Trimesh(v, f, process=False), trimesh.Trimesh(ref_v, ref_f, process=False)
    assert hausdorff(ours, ref) < 0.5
    # vertices are interpolated along the same edges as skimage's
    dist, _ = cKDTree(ref_v).query(v)
    assert np.quantile(dist, 0.99) < 1e-4
    if name != "border":
        assert is_closed_manifold(f)
        # same winding as skimage: both enclose a positive volume, normals towards increasing value
        assert ours.volume > 0 and ref.volume > 0
        assert abs(ours.volume - ref.volume) < 0.01 * ref.volume


def test_normals_point_towards_increasing_values():
    centre = np.array([10.4, 9.7, 10.1])
    volume = as_tanh(sphere_sdf(22, centre, 6.3))
    v, f = dense_marching_cubes(torch.from_numpy(volume), LEVEL)
    v, f = v.numpy(), f.numpy()
    tri = v[f]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    outward = tri.mean(1) - centre
    assert (np.einsum("ij,ij->i", normals, outward) > 0).all()


def narrow_band(volume: np.ndarray, width: float):
    mask = np.abs(volume) < width
    return torch.from_numpy(np.argwhere(mask)), torch.from_numpy(volume[mask])


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_sparse_band_equals_dense_equivalent(name):
    volume = FIELDS[name]()
    points, values = narrow_band(volume, 0.8)
    equivalent = np.ones_like(volume)  # background 1.0 everywhere else, as the official densification
    equivalent[tuple(points.T.numpy())] = values.numpy()
    dense_v, dense_f = dense_marching_cubes(torch.from_numpy(equivalent), LEVEL)
    v, f = sparse_marching_cubes(points, values, LEVEL, volume.shape[0], background=1.0)
    assert torch.equal(f, dense_f)
    torch.testing.assert_close(v, dense_v)
    ref_v, ref_f = skimage_mesh(equivalent, LEVEL)
    assert topology(v.numpy(), f.numpy()) == topology(ref_v, ref_f)
    ours = trimesh.Trimesh(v.numpy(), f.numpy(), process=False)
    assert hausdorff(ours, trimesh.Trimesh(ref_v, ref_f, process=False)) < 0.5


def test_sparse_chunking_does_not_change_result():
    volume = FIELDS["torus"]()
    points, values = narrow_band(volume, 0.9)
    v1, f1 = sparse_marching_cubes(points, values, LEVEL, volume.shape[0])
    v2, f2 = sparse_marching_cubes(points, values, LEVEL, volume.shape[0], chunk_points=997, chunk_cells=1013)
    assert torch.equal(f1, f2)
    torch.testing.assert_close(v1, v2)


def test_callable_background_with_candidate_cells():
    # Band values come from a tanh-SDF; elsewhere a callable gives +-1 from a coarser "sign field"
    # (like the 1024 sign refiner). A sphere of the sign field lies away from the band, so its
    # cells must be passed as candidates.
    n = 28
    band_field = as_tanh(sphere_sdf(n, (9.2, 9.6, 9.9), 5.2))  # same sphere as band_centre below
    points, values = narrow_band(band_field, 0.7)
    sign_centre = torch.tensor([20.0, 19.0, 19.5])
    band_centre = torch.tensor([9.2, 9.6, 9.9])

    def sign_background(coords: torch.Tensor) -> torch.Tensor:
        inside = ((coords.double() - sign_centre) ** 2).sum(-1) < 4.5**2
        inside |= ((coords.double() - band_centre) ** 2).sum(-1) < 5.2**2  # no inner shell in the band sphere
        return torch.where(inside, -1.0, 1.0).float()

    all_coords = torch.from_numpy(np.argwhere(np.ones((n, n, n), dtype=bool)))
    equivalent = sign_background(all_coords).reshape(n, n, n).numpy()
    equivalent[tuple(points.T.numpy())] = values.numpy()
    ref_v, ref_f = skimage_mesh(equivalent, LEVEL)
    cells = torch.from_numpy(np.argwhere(np.ones((n - 1,) * 3, dtype=bool)))
    near_sign_sphere = ((cells.double() + 0.5 - sign_centre) ** 2).sum(-1).sqrt()
    candidates = cells[(near_sign_sphere - 4.5).abs() < 2.0]
    v, f = sparse_marching_cubes(points, values, LEVEL, n, background=sign_background, candidate_cells=candidates)
    assert topology(v.numpy(), f.numpy()) == topology(ref_v, ref_f)
    assert topology(ref_v, ref_f)[1] == 2  # both the band sphere and the sign sphere
    dense_v, dense_f = dense_marching_cubes(torch.from_numpy(equivalent), LEVEL)
    assert torch.equal(f, dense_f)
    torch.testing.assert_close(v, dense_v)
    # without the candidates only the band surface is found
    v_band, f_band = sparse_marching_cubes(points, values, LEVEL, n, background=sign_background)
    assert topology(v_band.numpy(), f_band.numpy())[1] == 1


def test_value_equal_to_level_counts_as_below():
    volume = np.zeros((3, 3, 3), np.float32)
    volume[1, 1, 1] = 2.0
    volume[0, 1, 1] = 1.0
    ref_v, ref_f = skimage_mesh(volume, 1.0)
    v, f = dense_marching_cubes(torch.from_numpy(volume), 1.0)
    assert len(v) == len(ref_v) and len(f) == len(ref_f)
    assert cKDTree(ref_v).query(v.numpy())[0].max() < 1e-5
    # a single point exactly at the level on a background below it gives no surface
    v, f = sparse_marching_cubes(torch.tensor([[1, 1, 1]]), torch.tensor([1.0]), 1.0, 3, background=0.0)
    assert v.shape == (0, 3) and f.shape == (0, 3)


@pytest.mark.parametrize("face_rule,resolve_interior", [("decider", True), ("decider", False), ("separate", False)])
def test_random_fields_give_closed_oriented_manifolds(face_rule, resolve_interior):
    generator = np.random.default_rng(1)
    for _ in range(8):
        volume = np.ones((12, 12, 12), np.float32)
        volume[1:-1, 1:-1, 1:-1] = generator.uniform(-1.0, 1.0, (10, 10, 10))
        v, f = dense_marching_cubes(
            torch.from_numpy(volume), 0.0, face_rule=face_rule, resolve_interior=resolve_interior
        )
        f = f.numpy()
        assert len(f) > 100
        assert is_closed_manifold(f)
        # no degenerate index triples
        assert (f[:, 0] != f[:, 1]).all() and (f[:, 1] != f[:, 2]).all() and (f[:, 0] != f[:, 2]).all()


def _row_patch(table, row):
    """Directed boundary edges of one table row's triangle patch, and its interior edge use."""
    tris = [tuple(t) for t in table[row].tolist() if t[0] >= 0]
    directed = [(t[i], t[(i + 1) % 3]) for t in tris for i in range(3)]
    undirected = {}
    for a, b in directed:
        undirected.setdefault(frozenset((a, b)), []).append((a, b))
    boundary = {uses[0] for uses in undirected.values() if len(uses) == 1}
    interior_ok = all(len(uses) == 1 or (len(uses) == 2 and uses[0] == uses[1][::-1]) for uses in undirected.values())
    return boundary, interior_ok


def test_case_table_patches_and_complements():
    # Every row's triangles form an oriented patch whose boundary runs along cube faces; swapping
    # above/below (case -> 255 - case, with the opposite choice on ambiguous faces) gives the same
    # boundary traversed the other way.
    from engine.mesh.marching_cubes import EDGE_FACES

    table, _, ambiguous = case_table()
    assert table.shape[0] == 256 * 64
    for case in range(1, 255):
        amb = int(ambiguous[case])
        assert amb == int(ambiguous[255 - case])
        bits = 0
        while True:  # every subset of the ambiguous faces
            boundary, interior_ok = _row_patch(table, case * 64 + bits)
            assert interior_ok and boundary
            for a, b in boundary:  # boundary segments lie on a cube face, between two crossings
                assert a < 12 and b < 12 and EDGE_FACES[a] & EDGE_FACES[b]
            boundary_c, _ = _row_patch(table, (255 - case) * 64 + (amb ^ bits))
            assert boundary_c == {(b, a) for a, b in boundary}
            # the crossing edges are exactly those whose end corners differ
            crossing = {e for seg in boundary for e in seg}
            expected = {
                e for e in range(12)
                if ((case >> int(EDGE_START_[e])) & 1) != ((case >> int(EDGE_END_[e])) & 1)
            }
            assert crossing == expected
            if bits == amb:
                break
            bits = (bits - amb) & amb  # next subset of amb


def test_empty_and_validation():
    v, f = sparse_marching_cubes(torch.zeros((0, 3), dtype=torch.long), torch.zeros(0), 0.2, 8)
    assert v.shape == (0, 3) and f.shape == (0, 3)
    with pytest.raises(ValueError):
        sparse_marching_cubes(torch.tensor([[8, 0, 0]]), torch.tensor([0.0]), 0.2, 8)
    with pytest.raises(ValueError):
        sparse_marching_cubes(torch.tensor([[1, 0, 0]]), torch.tensor([0.0, 1.0]), 0.2, 8)
    with pytest.raises(ValueError):
        dense_marching_cubes(torch.zeros(4, 4), 0.0)
    with pytest.raises(ValueError):
        dense_marching_cubes(torch.zeros(4, 4, 4), 0.0, face_rule="nearest")


def test_duplicate_points_last_value_wins():
    points = torch.tensor([[2, 2, 2], [2, 2, 2]])
    v_last_below, f = sparse_marching_cubes(points, torch.tensor([1.0, -1.0]), 0.2, 5)
    assert len(f) == 8  # a closed octahedron-like cell surface around the point
    v_last_above, f2 = sparse_marching_cubes(points, torch.tensor([-1.0, 1.0]), 0.2, 5)
    assert len(f2) == 0


def test_grid_to_unit():
    v = torch.tensor([[0.0, 512.0, 1024.0]])
    torch.testing.assert_close(grid_to_unit(v, 1024), torch.tensor([[-1.0, 0.0, 1.0]]))


def trilinear_components(corner_values: np.ndarray, steps: int = 61, side: float = -1.0) -> int:
    """Connected components of {side * f > 0} of the trilinear interpolant in one cell (dense sampling)."""
    from scipy import ndimage

    s = np.linspace(0.0, 1.0, steps)
    x, y, z = np.meshgrid(s, s, s, indexing="ij")
    f = np.zeros_like(x)
    for c in range(8):
        dx, dy, dz = c & 1, (c >> 1) & 1, (c >> 2) & 1
        f += corner_values[c] * (x if dx else 1 - x) * (y if dy else 1 - y) * (z if dz else 1 - z)
    return ndimage.label(side * f > 0)[1]


def single_cell_mesh(values: np.ndarray, **kwargs) -> trimesh.Trimesh:
    volume = np.zeros((2, 2, 2))
    for c in range(8):
        volume[c & 1, (c >> 1) & 1, (c >> 2) & 1] = values[c]
    v, f = dense_marching_cubes(torch.from_numpy(volume), 0.0, **kwargs)
    return trimesh.Trimesh(v.numpy(), f.numpy(), process=False)


def test_random_cells_follow_trilinear_topology():
    # Inside one cell the surface pieces (discs or tubes) split the cube into regions, one per
    # component of {f > 0} and of {f < 0}: pieces = above components + below components - 1.
    # cells whose interior joins two surface regions (tunnels: two opposite corners, two opposite
    # edges, the six-ambiguous-face case, and a 4-corner case), then random cells
    tunnel_cells = [
        [1.0, -0.2, -0.2, -0.2, -0.2, -0.2, -0.2, 1.0],
        [-0.718, 0.537, 0.628, -0.427, -0.341, 0.438, 0.524, -0.631],
        [-0.931, 0.974, 0.635, -0.753, 0.696, -0.484, -0.505, 0.545],
        [0.802, -0.439, -0.665, 0.367, 0.746, -0.894, 0.655, -0.225],
    ]
    generator = np.random.default_rng(11)
    cells = [np.array(v) for v in tunnel_cells] + [generator.uniform(-1.0, 1.0, 8) for _ in range(120)]
    for index, values in enumerate(cells):
        if (values > 0).all() or (values <= 0).all():
            continue
        mesh = single_cell_mesh(values)
        pieces = len(mesh.split(only_watertight=False))
        steps = 101 if index < len(tunnel_cells) else 41  # the tunnels are thin
        regions = trilinear_components(values, steps, 1.0) + trilinear_components(values, steps, -1.0)
        assert pieces == regions - 1, values
        if index < len(tunnel_cells):
            capped = single_cell_mesh(values, resolve_interior=False)
            assert len(capped.split(only_watertight=False)) == pieces + 1  # the caps miss the tunnel


def test_random_volume_topology_matches_refined_trilinear_field():
    # Marching cubes of a 6x trilinearly refined copy resolves the same interpolant far from
    # ambiguity; its topology must equal ours on the coarse grid (skimage's Lewiner does not).
    from scipy import ndimage

    generator = np.random.default_rng(2)
    volume = np.ones((9, 9, 9))
    volume[1:-1, 1:-1, 1:-1] = generator.uniform(-1.0, 1.0, (7, 7, 7))
    fine_axis = np.linspace(0, 8, 8 * 6 + 1)
    fine = ndimage.map_coordinates(volume, np.meshgrid(fine_axis, fine_axis, fine_axis, indexing="ij"), order=1)
    fine_v, fine_f = dense_marching_cubes(torch.from_numpy(fine), 0.0)
    v, f = dense_marching_cubes(torch.from_numpy(volume), 0.0)
    assert topology(v.numpy(), f.numpy()) == topology(fine_v.numpy(), fine_f.numpy())
    assert is_closed_manifold(f.numpy())


@pytest.mark.parametrize(
    "corner_values",
    [
        # two opposite below corners (2 and 5) that the trilinear interpolant keeps apart
        [0.785, 0.01, -0.082, 0.063, 0.363, -0.049, 0.151, 0.108],
        [0.091, 0.255, 0.008, -0.139, -0.022, 0.096, 0.209, 0.298],
        # an ambiguous face whose decider connects the below corners, and one that separates them
        [0.5, -0.4, -0.3, 0.6, 0.7, 0.8, 0.9, 0.6],
        [0.1, -0.4, -0.3, 0.1, 0.7, 0.8, 0.9, 0.6],
    ],
)
def test_single_cell_topology_follows_trilinear_interpolant(corner_values):
    # One cell: the number of surface pieces must equal the number of below regions of the
    # trilinear interpolant. (skimage's Lewiner tables put a tunnel into the first two cells.)
    values = np.array(corner_values)
    mesh = single_cell_mesh(values)
    assert len(mesh.split(only_watertight=False)) == trilinear_components(values)


@pytest.mark.parametrize("factor", [2, 3])
def test_sign_change_cells_match_dense_upsampling(factor):
    from engine.mesh.marching_cubes import sign_change_cells, upsampled_background

    generator = np.random.default_rng(4)
    coarse = torch.from_numpy(np.where(generator.random((6, 5, 7)) < 0.4, -1.0, 1.0))
    fine = coarse.repeat_interleave(factor, 0).repeat_interleave(factor, 1).repeat_interleave(factor, 2)
    above = (fine > 0.2).numpy()
    corners = [above[dx : above.shape[0] - 1 + dx, dy : above.shape[1] - 1 + dy, dz : above.shape[2] - 1 + dz]
               for dx in (0, 1) for dy in (0, 1) for dz in (0, 1)]
    mixed = np.logical_or.reduce(corners) & ~np.logical_and.reduce(corners)
    expected = {tuple(c) for c in np.argwhere(mixed).tolist()}
    cells = sign_change_cells(coarse, 0.2, factor)
    assert {tuple(c) for c in cells.tolist()} == expected
    assert len(cells) == len(expected)  # no duplicates
    coords = torch.from_numpy(np.argwhere(np.ones(fine.shape, dtype=bool)))
    np.testing.assert_array_equal(upsampled_background(coarse, factor)(coords).numpy(), fine.reshape(-1).numpy())


def test_sign_refined_extraction_matches_dense_volume():
    # The 1024 refiner layout in miniature: decoded band values at fine resolution, a +-1 sign
    # field at half resolution elsewhere; sparse extraction with the upsampled sign as background
    # and its sign-change cells as candidates equals marching cubes of the assembled dense volume.
    from engine.mesh.marching_cubes import sign_change_cells, upsampled_background

    n = 32
    band_field = as_tanh(sphere_sdf(n, (15.3, 16.1, 15.7), 9.4))
    points, values = narrow_band(band_field, 0.6)
    c = np.arange(n // 2) * 2.0 + 0.5
    cx, cy, cz = np.meshgrid(c, c, c, indexing="ij")
    inside = np.sqrt((cx - 15.3) ** 2 + (cy - 16.1) ** 2 + (cz - 15.7) ** 2) < 9.4
    inside |= np.sqrt((cx - 26.0) ** 2 + (cy - 26.0) ** 2 + (cz - 6.0) ** 2) < 3.0  # a sign-only blob
    sign = torch.from_numpy(np.where(inside, -1.0, 1.0).astype(np.float32))
    dense = sign.repeat_interleave(2, 0).repeat_interleave(2, 1).repeat_interleave(2, 2).numpy().copy()
    dense[tuple(points.T.numpy())] = values.numpy()
    v, f = sparse_marching_cubes(
        points, values, LEVEL, n, background=upsampled_background(sign), candidate_cells=sign_change_cells(sign, LEVEL)
    )
    dense_v, dense_f = dense_marching_cubes(torch.from_numpy(dense), LEVEL)
    assert torch.equal(f, dense_f)
    torch.testing.assert_close(v, dense_v)
    assert topology(v.numpy(), f.numpy())[1] >= 2


def test_decoder_dtypes_int32_points_and_half_values():
    # the decoders hand over int32 coordinates and fp16 values; results equal the fp32 ones
    volume = FIELDS["sphere"]()
    points, values = narrow_band(volume, 0.8)
    v32, f32 = sparse_marching_cubes(points.int(), values.half().float(), LEVEL, volume.shape[0])
    v16, f16 = sparse_marching_cubes(points.int(), values.half(), LEVEL, volume.shape[0])
    assert v16.dtype == torch.float32
    assert torch.equal(f16, f32)
    torch.testing.assert_close(v16, v32)
