"""Marching cubes on sparse (or dense) scalar grids, vectorised in torch (CUDA and CPU alike).

Conventions (chosen to agree with ``skimage.measure.marching_cubes(volume, level, method="lewiner")``
on a volume indexed ``[x, y, z]``):

* a grid corner is "above" when ``value > level`` (a value equal to the level counts as below);
* a vertex sits on a cell edge where the linear interpolation of the two end values crosses the level;
* triangles are wound so that ``cross(v1 - v0, v2 - v0)`` points towards increasing values
  (outwards for an SDF that is positive outside);
* vertices on an edge shared by several cells are emitted once (merged through a global edge id).

The case table is generated here from first principles: for every sign configuration of the 8
corners and every choice on the ambiguous cube faces, each face contributes oriented iso-segments,
the segments are chained into closed loops on the cube surface and every loop is triangulated.
Ambiguous faces (diagonal corners on the same side) are resolved with the asymptotic decider, which
uses only the four values of that face, so the two cells sharing a face always agree and the mesh
is watertight. ``face_rule="separate"`` instead always separates the above corners (a fixed,
sign-only rule). Loops that cannot be triangulated without a diagonal lying in a cube face (which
the neighbouring cell could share, making a non-manifold edge) get an extra vertex at the mean of
their crossings, as Lewiner's tables do for some cases.

Interior ambiguities follow the trilinear interpolant too (``resolve_interior=True``): where the
interpolant joins two same-side surface regions through the cell (MC33 tunnels), the two loops
between them are joined by a tube instead of two caps (through a ring of extra vertices when a
direct strip would need an edge inside a cube face). The test sweeps z-sections: regions meet
inside the cell only across a section diagonal, decided per section by the bilinear saddle, which
is a quadratic in z maximised exactly. The result has the topology of the trilinear interpolant
(checked against dense sampling and against a finely refined grid in the tests). skimage's Lewiner
implementation differs from it in some cells (e.g. it puts a tunnel between two opposite corners
where the interpolant has none), so on noisy fields the two can differ; on smooth fields they agree.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence, Union

import numpy as np
import torch

__all__ = [
    "sparse_marching_cubes",
    "dense_marching_cubes",
    "grid_to_unit",
    "upsampled_background",
    "sign_change_cells",
    "case_table",
]

Background = Union[float, Callable[[torch.Tensor], torch.Tensor]]

# Corner c of a unit cell sits at offset (c & 1, (c >> 1) & 1, (c >> 2) & 1).
CORNER_OFFSETS = np.array([[c & 1, (c >> 1) & 1, (c >> 2) & 1] for c in range(8)], dtype=np.int64)


def _corner_index(offset: Sequence[int]) -> int:
    return int(offset[0]) + 2 * int(offset[1]) + 4 * int(offset[2])


def _build_edges() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """12 cell edges as (start corner, end corner, axis); the start is the lower end along the axis."""
    starts, ends, axes = [], [], []
    for axis in range(3):
        for c in range(8):
            if CORNER_OFFSETS[c, axis] == 0:
                end = c + (1 << axis)
                starts.append(c)
                ends.append(end)
                axes.append(axis)
    return np.array(starts), np.array(ends), np.array(axes)


EDGE_START, EDGE_END, EDGE_AXIS = _build_edges()
_EDGE_OF_PAIR = {}
for _e, (_a, _b) in enumerate(zip(EDGE_START, EDGE_END)):
    _EDGE_OF_PAIR[(int(_a), int(_b))] = _e
    _EDGE_OF_PAIR[(int(_b), int(_a))] = _e


def _build_faces() -> np.ndarray:
    """6 cube faces, each as its 4 corners in counter-clockwise order seen from outside the cube."""
    faces = []
    for axis in range(3):
        u_axis, v_axis = (axis + 1) % 3, (axis + 2) % 3  # e_u x e_v = e_axis
        for side in (0, 1):
            # CCW about +e_axis when side == 1, about -e_axis (reversed) when side == 0.
            uv = [(0, 0), (1, 0), (1, 1), (0, 1)] if side == 1 else [(0, 0), (0, 1), (1, 1), (1, 0)]
            corners = []
            for u, v in uv:
                offset = [0, 0, 0]
                offset[axis], offset[u_axis], offset[v_axis] = side, u, v
                corners.append(_corner_index(offset))
            faces.append(corners)
    return np.array(faces, dtype=np.int64)


FACE_CORNERS = _build_faces()  # [6, 4]


def _face_segments(case: int, face: int, connect_above: bool) -> list[tuple[int, int]]:
    """Directed iso-segments (edge -> edge) on one face.

    Walking the face boundary counter-clockwise from outside, an "exit" edge goes above -> below and
    an "entry" edge below -> above. Each segment runs from an exit to an entry, which keeps the above
    region on its left; on an ambiguous face the exit at edge k pairs with the entry at edge k-1
    (cutting off the above corner between them) or k+1 (cutting off the below corner instead).
    """
    corners = FACE_CORNERS[face]
    above = [(case >> int(c)) & 1 for c in corners]
    exits, entries = [], []
    for k in range(4):
        a, b = above[k], above[(k + 1) % 4]
        if a and not b:
            exits.append(k)
        elif b and not a:
            entries.append(k)
    cube_edge = lambda k: _EDGE_OF_PAIR[(int(corners[k]), int(corners[(k + 1) % 4]))]
    if len(exits) == 1:
        return [(cube_edge(exits[0]), cube_edge(entries[0]))]
    segments = []
    for k in exits:  # ambiguous face: two exits, two entries
        partner = (k + 1) % 4 if connect_above else (k - 1) % 4
        assert partner in entries
        segments.append((cube_edge(k), cube_edge(partner)))
    return segments


def _is_face_ambiguous(case: int, face: int) -> bool:
    above = [(case >> int(c)) & 1 for c in FACE_CORNERS[face]]
    return above[0] == above[2] and above[1] == above[3] and above[0] != above[1]


def _build_edge_faces() -> list[frozenset]:
    """For each cell edge, the set of cube faces it bounds (two faces per edge)."""
    edge_faces = [set() for _ in range(12)]
    for face in range(6):
        corners = FACE_CORNERS[face]
        for k in range(4):
            edge_faces[_EDGE_OF_PAIR[(int(corners[k]), int(corners[(k + 1) % 4]))]].add(face)
    return [frozenset(f) for f in edge_faces]


EDGE_FACES = _build_edge_faces()


def _on_common_face(edge_a: int, edge_b: int) -> bool:
    """Whether two cell-edge vertices lie in one cube face (extra vertices, ids >= 12, never do)."""
    if edge_a >= 12 or edge_b >= 12:
        return False
    return bool(EDGE_FACES[edge_a] & EDGE_FACES[edge_b])


@functools.lru_cache(maxsize=None)
def _triangulate_polygon(polygon: tuple[int, ...]):
    """Triangulate a loop of crossing edges without any diagonal lying in a cube face, or None.

    A diagonal joining two crossings of the same face would lie in that face; the neighbouring cell
    may use the same diagonal, which would make the edge non-manifold. Searches over all
    triangulations (ear at the closing edge, then recurse), keeping the loop's winding.
    """
    n = len(polygon)
    if n < 3:
        return ()
    for k in range(1, n - 1):
        if k > 1 and _on_common_face(polygon[0], polygon[k]):
            continue
        if k < n - 2 and _on_common_face(polygon[k], polygon[-1]):
            continue
        left = _triangulate_polygon(polygon[: k + 1])
        right = _triangulate_polygon(polygon[k:])
        if left is None or right is None:
            continue
        return left + right + ((polygon[0], polygon[k], polygon[-1]),)
    return None


def _loops(case: int, face_bits: int) -> list[list[int]]:
    """Closed loops of crossing edges on the cube surface, each following the segment directions."""
    next_edge: dict[int, int] = {}
    for face in range(6):
        for start, end in _face_segments(case, face, bool((face_bits >> face) & 1)):
            assert start not in next_edge, "segment chaining is not one-to-one"
            next_edge[start] = end
    loops = []
    remaining = set(next_edge)
    while remaining:
        first = min(remaining)
        loop = [first]
        remaining.discard(first)
        edge = next_edge[first]
        while edge != first:
            loop.append(edge)
            remaining.discard(edge)
            edge = next_edge[edge]
        loops.append(loop)
    return loops


def _triangulate(case: int, face_bits: int) -> tuple[list[tuple[int, int, int]], list[list[int]]]:
    """Triangles for one corner configuration and ambiguous-face choice.

    Vertex ids 0..11 are the cell edges; ids 12, 13, ... are extra vertices at the mean of a loop's
    crossings, used (as a triangle fan centre) for loops that cannot be triangulated without a
    diagonal inside a cube face. Returns (triangles, member edges of each extra vertex).
    """
    return _cap_loops(_loops(case, face_bits))


def _loop_orientation_flip() -> bool:
    """Whether the loop winding must be reversed so normals point towards increasing values.

    Checked on the configuration with only corner 0 above: the value increases towards corner 0,
    so the normal of its single triangle must point towards that corner.
    """
    (tri,), _ = _triangulate(1, 0)
    mids = [(CORNER_OFFSETS[EDGE_START[e]] + CORNER_OFFSETS[EDGE_END[e]]) / 2.0 for e in tri]
    normal = np.cross(mids[1] - mids[0], mids[2] - mids[0])
    towards_corner0 = CORNER_OFFSETS[0] - np.mean(mids, axis=0)
    return float(np.dot(normal, towards_corner0)) < 0


def _surface_regions(case: int, face_bits: int) -> list[int]:
    """Label (smallest corner index) of each corner's region on the cube surface: corners joined by
    a cube edge on one side of the level, or by the connected diagonal of an ambiguous face."""
    label = list(range(8))

    def find(c):
        while label[c] != c:
            c = label[c]
        return c

    def union(i, j):
        ri, rj = find(i), find(j)
        if ri != rj:
            label[max(ri, rj)] = min(ri, rj)

    for start, end in zip(EDGE_START, EDGE_END):
        if ((case >> int(start)) & 1) == ((case >> int(end)) & 1):
            union(int(start), int(end))
    for face in range(6):
        if _is_face_ambiguous(case, face):
            c0, c1, c2, c3 = (int(c) for c in FACE_CORNERS[face])
            above_first = (case >> c0) & 1
            connect_above = bool((face_bits >> face) & 1)
            if connect_above == bool(above_first):
                union(c0, c2)
            else:
                union(c1, c3)
    return [find(c) for c in range(8)]


@functools.lru_cache(maxsize=None)
def _tube(loop_a: tuple[int, ...], loop_b: tuple[int, ...]):
    """Triangle strip joining two loops into a tube, or None.

    Each loop edge keeps the direction it has in a cap (so the neighbours still agree); the strip
    therefore walks loop_a forwards and loop_b backwards. A state (i, j) counts the steps taken on
    each loop; its rung joins a[i0 + i] and b[j0 - j]. The walk starts with a step on loop_a and
    ends with a step on loop_b so that every rung occurs once (the start rung closes the strip).
    Rungs must not lie in a cube face. Among valid walks the most evenly interleaved one is taken.
    """
    m, n = len(loop_a), len(loop_b)
    for i0 in range(m):
        for j0 in range(n):
            def rung_ok(i, j):
                return not _on_common_face(loop_a[(i0 + i) % m], loop_b[(j0 - j) % n])

            if not rung_ok(0, 0):
                continue
            # came_from[(i, j)]: the previous state on a valid walk from (1, 0)
            came_from = {(1, 0): (0, 0)} if rung_ok(1, 0) else {}
            for total in range(2, m + n):
                for i in range(max(1, total - (n - 1)), min(m, total) + 1):
                    j = total - i
                    if (i, j) == (m, 0) or not rung_ok(i, j):
                        continue
                    options = [prev for prev in ((i - 1, j), (i, j - 1)) if prev in came_from]
                    if options:
                        # prefer the predecessor closest to the even interleaving i / m = j / n
                        came_from[(i, j)] = min(options, key=lambda st: abs(st[0] / m - st[1] / n))
            if (m, n - 1) not in came_from:
                continue
            came_from[(m, n)] = (m, n - 1)
            triangles = []
            state = (m, n)
            while state != (0, 0):
                pi, pj = came_from[state]
                a_i, b_j = loop_a[(i0 + pi) % m], loop_b[(j0 - pj) % n]
                if state[0] > pi:  # a step on loop_a
                    triangles.append((a_i, loop_a[(i0 + pi + 1) % m], b_j))
                else:  # a (backwards) step on loop_b
                    triangles.append((loop_b[(j0 - pj - 1) % n], b_j, a_i))
                state = (pi, pj)
            return tuple(triangles[::-1])
    return None


def _cap_loops(loops: list[list[int]], skip: tuple[int, ...] = ()) -> tuple[list, list]:
    """Cap every loop not in ``skip`` (face-diagonal-free triangulation, else a centre fan)."""
    triangles: list[tuple[int, int, int]] = []
    centres: list[list[int]] = []
    for k, loop in enumerate(loops):
        if k in skip:
            continue
        tris = _triangulate_polygon(tuple(loop))
        if tris is None:
            centre = 12 + len(centres)
            centres.append(loop)
            tris = tuple((centre, loop[i], loop[(i + 1) % len(loop)]) for i in range(len(loop)))
        triangles.extend(tris)
    return triangles, centres


def _tunnel_options(case: int, face_bits: int) -> dict[tuple[int, int], tuple]:
    """Alternative triangulations where two same-side surface regions are joined through the cell.

    For regions P and Q separated by exactly two loops (P -L1- M -L2- Q on the cube surface), the
    caps of L1 and L2 are replaced by a tube; keyed by the (P, Q) region labels, P < Q.
    """
    loops = _loops(case, face_bits)
    if len(loops) < 2:
        return {}
    regions = _surface_regions(case, face_bits)
    loop_sides = []  # (above region, below region) of each loop
    for loop in loops:
        s, t = int(EDGE_START[loop[0]]), int(EDGE_END[loop[0]])
        above, below = (s, t) if (case >> s) & 1 else (t, s)
        loop_sides.append((regions[above], regions[below]))
    options = {}
    for i in range(len(loops)):
        for j in range(i + 1, len(loops)):
            (above_i, below_i), (above_j, below_j) = loop_sides[i], loop_sides[j]
            for middle_i, outer_i, middle_j, outer_j in (
                (below_i, above_i, below_j, above_j),  # two above regions around one below region
                (above_i, below_i, above_j, below_j),  # two below regions around one above region
            ):
                if middle_i != middle_j or outer_i == outer_j:
                    continue
                triangles, centres = _cap_loops(loops, skip=(i, j))
                tube = _tube(tuple(loops[i]), tuple(loops[j]))
                if tube is None:
                    # Every direct strip needs a rung inside a cube face; go through a ring of extra
                    # vertices instead, r_k at the mean of a_k and all of loop j (inside the cell).
                    ring = [12 + len(centres) + k for k in range(len(loops[i]))]
                    centres = centres + [[a] + loops[j] for a in loops[i]]
                    ring_as_far_end = [ring[0]] + ring[:0:-1]  # oriented like loop j, r_0 first
                    tube = (_tube(tuple(loops[i]), tuple(ring_as_far_end)) or ()) + (_tube(tuple(ring), tuple(loops[j])) or ())
                options[(min(outer_i, outer_j), max(outer_i, outer_j))] = (triangles + list(tube), centres)
    return options


@functools.lru_cache(maxsize=None)
def _build_tables() -> dict[str, np.ndarray]:
    """All generated tables.

    Base rows ``case * 64 + bits`` (see ``case_table``) cap every loop. ``region_label[row]`` gives
    each corner's surface region (smallest corner of the region). ``tunnel_map[row, 8 * P + Q]`` is
    the row to use when the trilinear interpolant joins regions P < Q through the cell interior
    (the base row itself when no such triangulation exists); tunnel rows follow the base rows.
    """
    flip = _loop_orientation_flip()
    ambiguous_mask = np.zeros(256, dtype=np.int64)
    region_label = np.tile(np.arange(8, dtype=np.int64), (256 * 64, 1))
    tunnel_map = np.tile(np.arange(256 * 64, dtype=np.int64)[:, None], (1, 64))
    entries: dict[int, tuple] = {}
    tunnel_rows = []
    for case in range(256):
        amb_faces = [f for f in range(6) if _is_face_ambiguous(case, f)]
        ambiguous_mask[case] = sum(1 << f for f in amb_faces)
        for choice in range(1 << len(amb_faces)):
            bits = sum(1 << f for i, f in enumerate(amb_faces) if (choice >> i) & 1)
            row = case * 64 + bits
            entries[row] = _triangulate(case, bits)
            region_label[row] = _surface_regions(case, bits)
            for (p, q), option in _tunnel_options(case, bits).items():
                tunnel_map[row, p * 8 + q] = 256 * 64 + len(tunnel_rows)
                tunnel_rows.append(option)
    for k, option in enumerate(tunnel_rows):
        entries[256 * 64 + k] = option
    num_rows = 256 * 64 + len(tunnel_rows)
    max_tris = max(len(t) for t, _ in entries.values())
    max_centres = max(1, max(len(c) for _, c in entries.values()))
    table = np.full((num_rows, max_tris, 3), -1, dtype=np.int8)
    centre_members = np.zeros((num_rows, max_centres, 12), dtype=bool)
    for row, (tris, centres) in entries.items():
        if flip:
            tris = [(a, c, b) for a, b, c in tris]
        if tris:
            table[row, : len(tris)] = np.array(tris, dtype=np.int8)
        for slot, loop in enumerate(centres):
            centre_members[row, slot, loop] = True
    return {
        "table": table,
        "centre_members": centre_members,
        "ambiguous_mask": ambiguous_mask,
        "region_label": region_label,
        "tunnel_map": tunnel_map,
    }


def case_table() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generated case tables without interior tunnels.

    Returns (triangles [256*64, T, 3] int8 local vertex ids padded with -1,
    centre_members [256*64, S, 12] bool (cell edges averaged into extra vertex 12 + s),
    ambiguous_faces [256] int64 bit mask). Row ``case * 64 + bits`` is the configuration ``case``
    (bit c set when corner c is above the level) with ``bits`` (masked to the case's ambiguous
    faces) telling which ambiguous faces connect their above corners.
    """
    tables = _build_tables()
    return tables["table"][: 256 * 64], tables["centre_members"][: 256 * 64], tables["ambiguous_mask"]


@functools.lru_cache(maxsize=None)
def _device_tables(device: torch.device) -> dict[str, torch.Tensor]:
    out = {name: torch.from_numpy(array).to(device) for name, array in _build_tables().items()}
    out["table"] = out["table"].long()
    return out


class _GridKeys:
    """Linear keys ``(x * Y + y) * Z + z`` of integer grid coordinates for a grid of shape (X, Y, Z)."""

    def __init__(self, shape: Sequence[int]):
        self.shape = tuple(int(s) for s in shape)
        self.num_points = self.shape[0] * self.shape[1] * self.shape[2]

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        coords = coords.long()
        return (coords[..., 0] * self.shape[1] + coords[..., 1]) * self.shape[2] + coords[..., 2]

    def decode(self, keys: torch.Tensor) -> torch.Tensor:
        z = keys % self.shape[2]
        xy = keys // self.shape[2]
        return torch.stack([xy // self.shape[1], xy % self.shape[1], z], dim=-1)


class _SparseLookup:
    """Value at any grid point: the given value, else the background (constant or callable)."""

    def __init__(self, keys: _GridKeys, points: torch.Tensor, values: torch.Tensor, background: Background):
        point_keys = keys.encode(points)
        sorted_keys, order = torch.sort(point_keys, stable=True)
        # Duplicate coordinates: the last occurrence in input order wins (like a scatter assignment).
        unique_keys, counts = torch.unique_consecutive(sorted_keys, return_counts=True)
        last = torch.cumsum(counts, 0) - 1
        self.keys = keys
        self.sorted_keys = unique_keys
        self.sorted_values = values[order[last]]
        self.background = background

    def __call__(self, query_keys: torch.Tensor) -> torch.Tensor:
        n = self.sorted_keys.numel()
        if n == 0:
            found = torch.zeros_like(query_keys, dtype=torch.bool)
            pos = torch.zeros_like(query_keys)
        else:
            pos = torch.searchsorted(self.sorted_keys, query_keys).clamp_(max=n - 1)
            found = self.sorted_keys[pos] == query_keys
        if n == 0:
            out = torch.empty(query_keys.shape, dtype=self.sorted_values.dtype, device=query_keys.device)
        else:
            out = self.sorted_values[pos]
        if callable(self.background):
            missing = ~found
            if bool(missing.any()):
                coords = self.keys.decode(query_keys[missing])
                out[missing] = torch.as_tensor(self.background(coords), dtype=out.dtype, device=out.device)
        else:
            out = torch.where(found, out, torch.full_like(out, float(self.background)))
        return out


class _DenseLookup:
    def __init__(self, volume: torch.Tensor):
        self.flat = volume.reshape(-1)

    def __call__(self, query_keys: torch.Tensor) -> torch.Tensor:
        return self.flat[query_keys]


# Bottom corners of the cell in (x, y) section order; corner + 4 is the one above it.
_SECTION_DIAGONALS = ((0, 3, 1, 2), (1, 2, 0, 3))  # (a, c) diagonal, (b, d) the other diagonal


def _interior_rows(values: torch.Tensor, level: float, row: torch.Tensor, region_label: torch.Tensor, tunnel_map: torch.Tensor) -> torch.Tensor:
    """Table rows with a tunnel where the trilinear interpolant joins two surface regions inside the cell.

    Sweeping planes z = t through the cell, each section is bilinear with corner values linear in t.
    Within a section, regions of one side only meet across the section interior through a diagonal
    (a, c) when that diagonal's corners are on the side and A*C > B*D (the section's asymptotic
    decider); all other connections run over the cell surface. So two surface regions are joined
    inside the cell iff, for some t in (0, 1), A(t) > 0, C(t) > 0 and g(t) = A*C - B*D > 0 (values
    taken positive on the side considered) - a quadratic over an interval, maximised exactly.
    """
    q = values.to(torch.float64) - level  # [C, 8]
    labels = region_label[row].clone()  # [C, 8] surface region of each corner
    surface = labels.clone()
    rows = torch.arange(q.shape[0], device=q.device)
    for side in (1.0, -1.0):
        h = side * q
        for a, c, b, d in _SECTION_DIAGONALS:
            a0, a1, c0, c1 = h[:, a], h[:, a + 4], h[:, c], h[:, c + 4]
            b0, b1, d0, d1 = h[:, b], h[:, b + 4], h[:, d], h[:, d + 4]
            da, dc, db, dd = a1 - a0, c1 - c0, b1 - b0, d1 - d0
            lo = torch.zeros_like(a0)
            hi = torch.ones_like(a0)
            empty = torch.zeros_like(a0, dtype=torch.bool)
            for x0, dx in ((a0, da), (c0, dc)):  # interval where both diagonal corners are on the side
                root = -x0 / torch.where(dx == 0, torch.ones_like(dx), dx)
                lo = torch.where(dx > 0, torch.maximum(lo, root), lo)
                hi = torch.where(dx < 0, torch.minimum(hi, root), hi)
                empty |= (dx == 0) & (x0 <= 0)
            alpha = da * dc - db * dd
            beta = a0 * dc + c0 * da - b0 * dd - d0 * db
            gamma = a0 * c0 - b0 * d0
            g = lambda t: (alpha * t + beta) * t + gamma
            t_star = -beta / torch.where(alpha == 0, torch.ones_like(alpha), 2 * alpha)  # vertex of g
            interior_max = (alpha < 0) & (t_star > lo) & (t_star < hi)
            g_max = torch.maximum(g(lo), g(hi))
            g_max = torch.where(interior_max, torch.maximum(g_max, g(t_star)), g_max)
            joined = ~empty & (lo < hi) & (g_max > 0)
            if not bool(joined.any()):
                continue
            end_a = torch.where(a0 > 0, a, a + 4)  # the corner of edge a (resp. c) on the side
            end_c = torch.where(c0 > 0, c, c + 4)
            for _ in range(2):  # relabel the larger label of the pair, twice for transitivity
                la, lc = labels[rows, end_a], labels[rows, end_c]
                low, high = torch.minimum(la, lc), torch.maximum(la, lc)
                labels = torch.where(joined[:, None] & (labels == high[:, None]), low[:, None], labels)
    merged = labels != surface  # corner's region was joined to the region labelled `labels`
    pair = torch.where(merged, labels * 8 + surface, torch.full_like(labels, -1))
    first = pair.max(1).values
    single = (first >= 0) & ((pair == first[:, None]) | (pair < 0)).all(1)  # exactly one joined pair
    return torch.where(single, tunnel_map[row, first.clamp_min(0)], row)


def _march_cells(
    cell_origins: torch.Tensor,
    lookup: Callable[[torch.Tensor], torch.Tensor],
    keys: _GridKeys,
    level: float,
    face_rule: str,
    chunk_cells: int,
    resolve_interior: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triangles of the given cells as global vertex ids.

    Global ids: ``3 * key(start point) + axis`` for a vertex on a grid edge, and
    ``3 * num_grid_points + cell_key * S + slot`` for a loop-centre vertex inside a cell.
    Returns (triangle ids [F, 3], centre ids [Nc], centre member edge ids [Nc, 12] padded with -1).
    """
    if face_rule not in ("decider", "separate"):
        raise ValueError(f"face_rule must be 'decider' or 'separate', got {face_rule!r}")
    device = cell_origins.device
    tables = _device_tables(device)
    table, centre_members, ambiguous_mask = tables["table"], tables["centre_members"], tables["ambiguous_mask"]
    tunnel_map, region_label = tables["tunnel_map"], tables["region_label"]
    may_tunnel = (tunnel_map != torch.arange(tunnel_map.shape[0], device=device)[:, None]).any(1)
    tri_counts = (table[:, :, 0] >= 0).sum(1)
    num_slots = centre_members.shape[1]
    centre_id_base = 3 * keys.num_points
    corner_offsets = torch.from_numpy(CORNER_OFFSETS).to(device)
    face_corners = torch.from_numpy(FACE_CORNERS).to(device)
    corner_key_offsets = keys.encode(corner_offsets)  # [8]
    edge_key_offsets = corner_key_offsets[torch.from_numpy(EDGE_START).to(device)] * 3 + torch.from_numpy(EDGE_AXIS).to(device)
    powers = 1 << torch.arange(8, device=device)
    face_powers = 1 << torch.arange(6, device=device)
    slots = torch.arange(num_slots, device=device)
    tri_chunks, centre_chunks, member_chunks = [], [], []
    for begin in range(0, cell_origins.shape[0], chunk_cells):
        base = keys.encode(cell_origins[begin : begin + chunk_cells])  # [C] cell keys
        values = lookup(base[:, None] + corner_key_offsets[None, :])  # [C, 8]
        above = values > level
        case = (above.long() * powers).sum(1)
        active = (case != 0) & (case != 255)
        if not bool(active.any()):
            continue
        base, values, above, case = base[active], values[active], above[active], case[active]
        amb = ambiguous_mask[case]
        bits = torch.zeros_like(case)
        if face_rule == "decider" and bool((amb != 0).any()):
            # Asymptotic decider: on an ambiguous face with diagonals (q0, q2) and (q1, q3) (values
            # minus level), the bilinear saddle lies above the level iff the above diagonal's product
            # exceeds the below diagonal's; then the above corners are connected across the face.
            # Products commute exactly, so both cells sharing the face take the same decision.
            q = values.to(torch.float64) - level
            qf = q[:, face_corners]  # [C, 6, 4]
            prod_02 = qf[..., 0] * qf[..., 2]
            prod_13 = qf[..., 1] * qf[..., 3]
            first_diag_above = above[:, face_corners[:, 0]]  # [C, 6]
            connect = torch.where(first_diag_above, prod_02 > prod_13, prod_13 > prod_02)
            bits = (connect.long() * face_powers).sum(1) & amb
        row = case * 64 + bits
        if face_rule == "decider" and resolve_interior:
            candidates = torch.nonzero(may_tunnel[row]).squeeze(1)
            if candidates.numel():
                row[candidates] = _interior_rows(values[candidates], level, row[candidates], region_label, tunnel_map)
        cell_edges = base[:, None] * 3 + edge_key_offsets[None, :]  # [C, 12]
        cell_centres = centre_id_base + base[:, None] * num_slots + slots[None, :]  # [C, S]
        local_to_global = torch.cat([cell_edges, cell_centres], dim=1)
        # one entry per emitted triangle (memory follows the output, not cells x table width)
        tris_per_cell = tri_counts[row]
        tri_cell = torch.repeat_interleave(torch.arange(base.shape[0], device=device), tris_per_cell)
        first_tri = torch.cumsum(tris_per_cell, 0) - tris_per_cell
        tri_slot = torch.arange(tri_cell.shape[0], device=device) - first_tri[tri_cell]
        local = table[row[tri_cell], tri_slot]  # [F, 3] local vertex ids
        tri_chunks.append(torch.gather(local_to_global[tri_cell], 1, local))
        members = centre_members[row]  # [C, S, 12]
        used = members.any(-1)
        if bool(used.any()):
            centre_chunks.append(cell_centres[used])
            member_chunks.append(torch.where(members, cell_edges[:, None, :], -1)[used])
    if not tri_chunks:
        empty = torch.zeros((0, 3), dtype=torch.long, device=device)
        return empty, torch.zeros(0, dtype=torch.long, device=device), torch.zeros((0, 12), dtype=torch.long, device=device)
    centres = torch.cat(centre_chunks) if centre_chunks else torch.zeros(0, dtype=torch.long, device=device)
    members = torch.cat(member_chunks) if member_chunks else torch.zeros((0, 12), dtype=torch.long, device=device)
    return torch.cat(tri_chunks), centres, members


def _edges_to_mesh(
    tri_ids: torch.Tensor,
    centre_ids: torch.Tensor,
    centre_members: torch.Tensor,
    lookup: Callable[[torch.Tensor], torch.Tensor],
    keys: _GridKeys,
    level: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge triangle corners by global id, place edge vertices by linear interpolation along their
    edge and loop-centre vertices at the mean of their loop's crossings."""
    device = tri_ids.device
    if tri_ids.shape[0] == 0:
        return torch.zeros((0, 3), dtype=out_dtype, device=device), torch.zeros((0, 3), dtype=torch.long, device=device)
    vertex_ids, inverse = torch.unique(tri_ids.reshape(-1), return_inverse=True)
    faces = inverse.reshape(-1, 3)
    num_edge_vertices = int(torch.searchsorted(vertex_ids, torch.tensor(3 * keys.num_points, device=device)))
    edge_ids = vertex_ids[:num_edge_vertices]
    axis = edge_ids % 3
    start_key = edge_ids // 3
    step = torch.tensor([keys.shape[1] * keys.shape[2], keys.shape[2], 1], device=device)[axis]
    value_start = lookup(start_key).to(torch.float64)
    value_end = lookup(start_key + step).to(torch.float64)
    t = (level - value_start) / (value_end - value_start)
    vertices = torch.zeros((vertex_ids.shape[0], 3), dtype=torch.float64, device=device)
    vertices[:num_edge_vertices] = keys.decode(start_key).to(torch.float64)
    vertices[torch.arange(num_edge_vertices, device=device), axis] += t
    if centre_ids.numel():
        centre_rows = torch.searchsorted(vertex_ids, centre_ids)
        present = centre_members >= 0
        member_rows = torch.searchsorted(edge_ids, centre_members.clamp(min=0))
        member_pos = vertices[member_rows] * present[..., None]
        vertices[centre_rows] = member_pos.sum(1) / present.sum(1, keepdim=True)
    return vertices.to(out_dtype), faces


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def sparse_marching_cubes(
    points: torch.Tensor,
    values: torch.Tensor,
    level: float,
    resolution: Union[int, Sequence[int]],
    background: Background = 1.0,
    candidate_cells: torch.Tensor | None = None,
    *,
    face_rule: str = "decider",
    resolve_interior: bool = True,
    chunk_points: int = 1 << 20,
    chunk_cells: int = 1 << 19,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Marching cubes over a sparse grid without allocating the dense volume.

    Args:
        points: int [M, 3] grid coordinates (x, y, z) in ``[0, resolution)``.
        values: [M] scalar values at those points (duplicates: last one wins).
        level: iso level.
        resolution: grid points per axis (int, or (X, Y, Z)); cells span ``[0, resolution - 1)``.
        background: value of every grid point not in ``points``; a float, or a callable taking int64
            coordinates [K, 3] and returning [K] values (evaluated only where needed).
        candidate_cells: optional int [C, 3] extra cell origins to examine (needed with a callable
            background wherever the background itself crosses the level away from the points).
        face_rule: "decider" (asymptotic decider on ambiguous faces) or "separate".
        resolve_interior: with the decider, join loops by tubes where the trilinear interpolant
            connects regions through a cell (see the module notes).

    Returns:
        (vertices float [V, 3] in grid units, faces int64 [F, 3]) — the same surface as skimage's
        Lewiner marching cubes of the equivalent dense volume, up to ambiguous-case choices.
    """
    shape = (int(resolution),) * 3 if isinstance(resolution, (int, np.integer)) else tuple(int(r) for r in resolution)
    points = torch.as_tensor(points)
    values = torch.as_tensor(values, device=points.device)
    device = points.device
    if points.ndim != 2 or points.shape[1] != 3 or values.shape != (points.shape[0],):
        raise ValueError(f"points must be [M, 3] and values [M]; got {tuple(points.shape)} and {tuple(values.shape)}")
    points = points.long()
    dims = torch.tensor(shape, device=device)
    if points.numel() and (bool((points < 0).any()) or bool((points >= dims).any())):
        raise ValueError(f"points must lie in [0, {shape}) per axis")
    keys = _GridKeys(shape)
    values = values.to(_float_dtype(values.dtype))
    lookup = _SparseLookup(keys, points, values, background)

    # With a constant background, a cell can only cross the level if one of its corners is a given
    # point on the other side of the level than the background; with a callable background every
    # cell touching a point may cross.
    if callable(background):
        seeds = points
    else:
        background_above = float(background) > level
        seeds = points[(values > level) != background_above]
    cell_limit = dims - 2
    cell_key_chunks = []
    corner_offsets = torch.from_numpy(CORNER_OFFSETS).to(device)
    for begin in range(0, seeds.shape[0], chunk_points):
        origins = (seeds[begin : begin + chunk_points, None, :] - corner_offsets[None]).reshape(-1, 3)
        inside = ((origins >= 0) & (origins <= cell_limit)).all(1)
        cell_key_chunks.append(torch.unique(keys.encode(origins[inside])))
    if candidate_cells is not None:
        extra = torch.as_tensor(candidate_cells, device=device).long().reshape(-1, 3)
        inside = ((extra >= 0) & (extra <= cell_limit)).all(1)
        cell_key_chunks.append(torch.unique(keys.encode(extra[inside])))
    if cell_key_chunks:
        cell_keys = torch.unique(torch.cat(cell_key_chunks))
    else:
        cell_keys = torch.zeros(0, dtype=torch.long, device=device)
    tri_ids, centre_ids, centre_members = _march_cells(keys.decode(cell_keys), lookup, keys, level, face_rule, chunk_cells, resolve_interior)
    return _edges_to_mesh(tri_ids, centre_ids, centre_members, lookup, keys, level, values.dtype)


def dense_marching_cubes(
    volume: torch.Tensor,
    level: float,
    *,
    face_rule: str = "decider",
    resolve_interior: bool = True,
    chunk_cells: int = 1 << 19,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Marching cubes of a dense [X, Y, Z] volume (on its own device), same tables as the sparse path."""
    volume = torch.as_tensor(volume)
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3-D [X, Y, Z], got shape {tuple(volume.shape)}")
    volume = volume.to(_float_dtype(volume.dtype)).contiguous()
    keys = _GridKeys(volume.shape)
    origin_chunks = []
    # Cells whose 8 corners are not all on one side, found one x-slab at a time to bound memory.
    slab = max(1, (1 << 24) // max(1, volume.shape[1] * volume.shape[2]))
    for x0 in range(0, volume.shape[0] - 1, slab):
        above = volume[x0 : min(x0 + slab + 1, volume.shape[0])] > level
        any_above = torch.zeros_like(above[:-1, :-1, :-1])
        all_above = torch.ones_like(any_above)
        for dx, dy, dz in CORNER_OFFSETS.tolist():
            corner = above[dx : above.shape[0] - 1 + dx, dy : above.shape[1] - 1 + dy, dz : above.shape[2] - 1 + dz]
            any_above |= corner
            all_above &= corner
        mixed = torch.nonzero(any_above & ~all_above)
        mixed[:, 0] += x0
        origin_chunks.append(mixed)
    if origin_chunks:
        origins = torch.cat(origin_chunks)
    else:
        origins = torch.zeros((0, 3), dtype=torch.long, device=volume.device)
    lookup = _DenseLookup(volume)
    tri_ids, centre_ids, centre_members = _march_cells(origins, lookup, keys, level, face_rule, chunk_cells, resolve_interior)
    return _edges_to_mesh(tri_ids, centre_ids, centre_members, lookup, keys, level, volume.dtype)


def upsampled_background(coarse: torch.Tensor, factor: int = 2) -> Callable[[torch.Tensor], torch.Tensor]:
    """Background callable reading a coarse grid with nearest (``repeat_interleave``) upsampling:
    fine point p takes ``coarse[p // factor]`` (e.g. the 1024 sign refiner's +-1 field at 512^3)."""
    coarse = torch.as_tensor(coarse)
    last = torch.tensor(coarse.shape, device=coarse.device) - 1

    def lookup(coords: torch.Tensor) -> torch.Tensor:
        index = torch.minimum(coords.to(coarse.device).long() // factor, last)
        return coarse[index[:, 0], index[:, 1], index[:, 2]]

    return lookup


def sign_change_cells(coarse: torch.Tensor, level: float, factor: int = 2) -> torch.Tensor:
    """Origins (int64 [C, 3]) of the fine cells whose corners straddle ``level`` in the nearest-upsampled
    ``coarse`` grid, found on the coarse grid (the fine grid is never built).

    Along one axis, fine cell origin o has corners o and o + 1, which fall in coarse cells o // factor
    and (o + 1) // factor: the same one unless o = factor * i + factor - 1, where they are i and i + 1.
    A fine cell therefore sees a block of 1 or 2 coarse values per axis; it can only cross the level
    when that block is mixed, which needs at least one axis of the second kind.
    """
    coarse = torch.as_tensor(coarse)
    if coarse.ndim != 3:
        raise ValueError(f"coarse must be a 3-D grid, got shape {tuple(coarse.shape)}")
    device = coarse.device
    above = coarse > level
    fine_limit = torch.tensor([n * factor - 2 for n in coarse.shape], device=device)
    found = []
    for pair_mask in range(1, 8):
        pair_axes = [(pair_mask >> axis) & 1 for axis in range(3)]
        # block corners: for pair axes offsets {0, 1}, for single axes offset 0 only
        block_shape = [n - p for n, p in zip(coarse.shape, pair_axes)]
        any_above = torch.zeros(block_shape, dtype=torch.bool, device=device)
        all_above = torch.ones(block_shape, dtype=torch.bool, device=device)
        for dx in range(pair_axes[0] + 1):
            for dy in range(pair_axes[1] + 1):
                for dz in range(pair_axes[2] + 1):
                    corner = above[dx : dx + block_shape[0], dy : dy + block_shape[1], dz : dz + block_shape[2]]
                    any_above |= corner
                    all_above &= corner
        coarse_index = torch.nonzero(any_above & ~all_above)  # [K, 3]
        if coarse_index.shape[0] == 0:
            continue
        # fine origins: pair axis -> factor * i + factor - 1; single axis -> factor * i + (0 .. factor - 2)
        choices = []
        for axis in range(3):
            if pair_axes[axis]:
                choices.append(torch.tensor([factor - 1], device=device))
            else:
                choices.append(torch.arange(max(factor - 1, 0), device=device))
        if any(c.numel() == 0 for c in choices):
            continue
        offsets = torch.cartesian_prod(*choices).reshape(-1, 3)
        origins = (coarse_index[:, None, :] * factor + offsets[None]).reshape(-1, 3)
        found.append(origins[(origins <= fine_limit).all(1)])
    if not found:
        return torch.zeros((0, 3), dtype=torch.long, device=device)
    return torch.cat(found)


def grid_to_unit(vertices: torch.Tensor, resolution: int) -> torch.Tensor:
    """Official output convention: grid coordinates ``v`` -> ``v / resolution * 2 - 1``."""
    return vertices / resolution * 2 - 1
