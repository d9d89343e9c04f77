"""Refiners: per-patch parity with the official code, manifests, and the whole-volume runs against
straightforward dense implementations of the official algorithms (architecture notes 3.6 / 3.7)."""
from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from engine.configs import RefinerConfig, release_config
from engine.models import cast_compute_layers
from engine.models.refiners import (Refiner512, SignField, SignRefiner1024, UNet3D, adaptive_filter,
                                    blend_weights, group_norm_silu)
from tests.conftest import within_tolerance

TINY_WIDTHS = (8, 12, 16, 20)
# two-level UNet for the whole-volume runs (patches of 8^3 keep 3 x 27 CPU patch runs fast)
VOLUME_TEST_WIDTHS = (8, 12)


def _reinit_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights of the parity fixtures' scale (He convs, small biases), so tiny random models give O(1)
    outputs instead of the near-zero ones of PyTorch's default initialisation."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                std = (2.0 / (p[0].numel() if "upsamplers" not in name else p.shape[0] * p[0, 0].numel())) ** 0.5
                # the filter-weight convs get a positive mean, as in the fixtures, so filters are not all noise
                mean = 2 * std if name.startswith("adaptive_conv") and name.endswith(".2.weight") else 0.0
                p.copy_(mean + std * torch.randn(p.shape, generator=gen))
            elif "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return model


def _fixture_model(fx, cls, sign: bool, dtype):
    params = fx["constructor_params"]
    widths = tuple(params["unet3d1_replaced_by"]["params"]["block_out_channels"])
    config = RefinerConfig(sign=sign, block_out_channels=widths,
                           patch_size=params["official_constructor"]["patch_size"])
    model = cls(config).eval()
    model.load_state_dict(fx["state_dict"], strict=True)
    return cast_compute_layers(model, dtype)


def _assert_close(name, ours, ref, tol):
    ok, rel, mx = within_tolerance(ours, ref, tol)
    assert ok, f"{name}: rel_l2 {rel:.3g} max_abs {mx:.3g} vs {tol}"


# ------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_refiner512_patch_parity(parity_fixture, dtype):
    fx = parity_fixture("refiner512_patch.pt")
    model = _fixture_model(fx, Refiner512, False, dtype)
    stages = {}
    with torch.inference_mode():
        out = model.refine_patch(fx["inputs"]["sdf_patch"], fx["inputs"]["feat_patch"], stages)
    assert out.dtype == dtype and out.shape == fx["outputs"]["out"].shape
    tol = fx["tolerance_per_output"]
    _assert_close("out", out, fx["outputs"]["out"], tol["out"])
    assert set(fx["intermediates"]) <= set(stages)
    for name, ref in fx["intermediates"].items():
        _assert_close(name, stages[name], ref, tol[name])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_refiner1024_patch_parity(parity_fixture, dtype):
    fx = parity_fixture("refiner1024_patch.pt")
    model = _fixture_model(fx, SignRefiner1024, True, dtype)
    stages = {}
    with torch.inference_mode():
        logits = model.sign_logits_patch(fx["inputs"]["sdf_patch"], stages)
        positive = model.positive_sign(logits)
    tol = fx["tolerance_per_output"]
    _assert_close("logits", logits, fx["outputs"]["logits"], tol["logits"])
    _assert_close("conv_in", stages["conv_in"], fx["intermediates"]["conv_in"], tol["conv_in"])
    _assert_close("unet_out", stages["unet_out"], fx["intermediates"]["unet_out"], tol["unet_out"])
    _assert_close("sigmoid", torch.sigmoid(logits), fx["intermediates"]["sigmoid"], tol["sigmoid"])
    # signs only where the reference logit is clear of the logits tolerance
    decided = fx["outputs"]["logits"].float().abs() > tol["logits"]["max_abs"]
    ref_positive = fx["outputs"]["sign"] > 0
    assert decided.sum() > 0.9 * decided.numel()
    assert torch.equal(positive[decided], ref_positive[decided])

    pooled_xyz, pooled_sdf = SignRefiner1024.pool_band(fx["inputs"]["sparse_coords"], fx["inputs"]["sparse_sdf"])
    assert torch.equal(pooled_xyz, fx["outputs"]["down_coords"][:, 1:])
    assert pooled_sdf.dtype == torch.float16
    _assert_close("down_sdf", pooled_sdf, fx["outputs"]["down_sdf"], tol["down_sdf"])


@pytest.mark.parametrize("version", ["v1.0", "v1.1"])
@pytest.mark.parametrize("name, cls", [("refiner", Refiner512), ("refiner_1024", SignRefiner1024)])
def test_full_size_keys_and_shapes_on_meta(manifest_dir, version, name, cls):
    tag = version.replace(".", "")
    manifest = json.loads((manifest_dir / f"{tag}_{name}.json").read_text())
    with torch.device("meta"):
        model = cls(release_config(name, version))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert all(v.is_meta for v in model.state_dict().values())
    assert ours == {k: shape for k, (shape, _) in manifest["state_dict"].items()}
    assert sum(v.numel() for v in model.state_dict().values()) == manifest["meta"]["num_elements"]


# ------------------------------------------------------------------------------- building blocks
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("inplace", [False, True])
def test_chunked_group_norm_matches_fp32_group_norm(dtype, inplace):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 12, 5, 6, 7, generator=gen) * 3 + torch.arange(12).view(1, 12, 1, 1, 1)).to(dtype)
    weight, bias = torch.randn(12, generator=gen), torch.randn(12, generator=gen)
    expected = F.silu(F.group_norm(x.float(), 4, weight, bias, 1e-5).to(dtype))
    source = x.clone()
    # a chunk of 2 channels' worth of elements forces the per-chunk statistics combination
    out = group_norm_silu(source, 4, weight, bias, 1e-5, silu=True, inplace=inplace, chunk_elements=2 * 2 * 210)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)
    assert (out.data_ptr() == source.data_ptr()) == inplace
    if not inplace:
        assert torch.equal(source, x)


def test_adaptive_filter_matches_unfold_definition():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 5, 6, 4, generator=gen, dtype=torch.float64)
    raw = torch.randn(1, 27, 5, 6, 4, generator=gen, dtype=torch.float64)
    weights = raw / raw.abs().sum(1, keepdim=True)
    expected = x
    for _ in range(3):  # out[v] = sum over the 27 neighbours (zero padded) of x * w[tap], tap = 9i + 3j + k
        padded = F.pad(expected, (1, 1, 1, 1, 1, 1))
        cols = padded.unfold(2, 3, 1).unfold(3, 3, 1).unfold(4, 3, 1)  # [B, C, D, H, W, 3, 3, 3]
        expected = (cols.flatten(-3) * weights.permute(0, 2, 3, 4, 1).unsqueeze(1)).sum(-1)
    torch.testing.assert_close(adaptive_filter(x.float(), raw.float()).double(), expected, atol=1e-5, rtol=1e-5)


def test_fused_upsample_concatenation_equals_cat():
    gen = torch.Generator().manual_seed(7)
    unet = UNet3D(4, (8, 12, 16))
    up = unet.up_blocks[0].upsamplers[0]
    x, skip = torch.randn(1, 16, 5, 3, 4, generator=gen), torch.randn(1, 12, 10, 6, 8, generator=gen)
    with torch.no_grad():
        expected = torch.cat([up(x), skip], 1)
        fused = up.upsample_and_join(x, skip, slab_elements=16 * 2 * 6 * 8 * 2)  # 2 input slices per step
    assert torch.equal(fused, expected)


def test_unet3d_layout_and_size_check():
    unet = UNet3D(16, TINY_WIDTHS)
    in_widths = [r.norm1.num_channels for b in unet.up_blocks for r in b.resnets]
    assert in_widths == [40, 40, 36, 36, 32, 28, 28, 24, 20, 20, 16, 16]
    out = unet(torch.randn(1, 16, 8, 8, 16))
    assert out.shape == (1, 8, 8, 8, 16) and (out >= -0.2785).all()  # SiLU lower bound
    with pytest.raises(ValueError):
        unet(torch.randn(1, 16, 8, 8, 12))


def test_blend_weights_partition_unity():
    weights = blend_weights(512, 192, 160)
    total = torch.zeros(512)
    for origin, w in zip((0, 160, 320), weights):
        total[origin:origin + 192] += w
    torch.testing.assert_close(total, torch.ones(512))
    assert weights[1][0] == 0 and weights[0][191] == 0 and weights[1][31] == 1


# ----------------------------------------------------------------------------- whole-volume 512
def _ellipsoid_band(resolution: int, half_width: float, gen):
    """Voxels near an off-centre ellipsoid with tanh SDF values (a stand-in decoded band)."""
    axis = torch.arange(resolution, dtype=torch.float32)
    x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")
    centre = torch.tensor([0.47, 0.52, 0.5]) * resolution
    radii = torch.tensor([0.33, 0.27, 0.22]) * resolution
    r = (((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
         + ((z - centre[2]) / radii[2]) ** 2).sqrt()
    distance = (r - 1) * radii.min()
    band = distance.abs() < half_width
    xyz = band.nonzero()
    values = torch.tanh(distance[band] / 4) + 0.05 * torch.randn(int(band.sum()), generator=gen)
    return xyz, values


def _blend_sequence(pieces, axis, overlap):
    """Official blending of consecutive patches along one axis: old * (1 - ramp) + new * ramp."""
    shape = [1, 1, 1]
    shape[axis] = overlap
    ramp = torch.linspace(0, 1, overlap).view(shape)
    out = pieces[0]
    for piece in pieces[1:]:
        keep = out.shape[axis] - overlap
        mixed = out.narrow(axis, keep, overlap) * (1 - ramp) + piece.narrow(axis, 0, overlap) * ramp
        out = torch.cat([out.narrow(axis, 0, keep), mixed, piece.narrow(axis, overlap, piece.shape[axis] - overlap)],
                        dim=axis)
    return out


def _official_patches(model, xyz, sdf, feats, resolution, patch, stride):
    """Dense reference patches: full SDF and 32-channel feature volumes, patches in loop order."""
    sdf_volume = torch.ones(1, 1, resolution, resolution, resolution)
    sdf_volume[0, 0, xyz[:, 0], xyz[:, 1], xyz[:, 2]] = sdf
    feat_volume = torch.zeros(1, feats.shape[1], resolution, resolution, resolution)
    feat_volume[0, :, xyz[:, 0], xyz[:, 1], xyz[:, 2]] = feats.T
    origins = range(0, resolution - patch + 1, stride)
    patches = {}
    for ox, oy, oz in itertools.product(origins, repeat=3):
        box = (slice(None), slice(None), slice(ox, ox + patch), slice(oy, oy + patch), slice(oz, oz + patch))
        patches[ox, oy, oz] = model.refine_patch(sdf_volume[box], feat_volume[box])[0, 0]
    return patches


def _blend_official(patches, resolution, patch, stride, blend=_blend_sequence):
    """Blend along z, then y, then x, as the official run does."""
    origins = range(0, resolution - patch + 1, stride)
    slabs = []
    for ox in origins:
        rows = [blend([patches[ox, oy, oz] for oz in origins], 2, patch - stride) for oy in origins]
        slabs.append(blend(rows, 1, patch - stride))
    return blend(slabs, 0, patch - stride)


def _average_sequence(pieces, axis, overlap):
    """A wrong blending (plain averaging of the overlaps), to show the test tells them apart."""
    out = pieces[0]
    for piece in pieces[1:]:
        keep = out.shape[axis] - overlap
        mixed = (out.narrow(axis, keep, overlap) + piece.narrow(axis, 0, overlap)) / 2
        out = torch.cat([out.narrow(axis, 0, keep), mixed, piece.narrow(axis, overlap, piece.shape[axis] - overlap)],
                        dim=axis)
    return out


def test_refiner512_streaming_equals_official_dense_algorithm():
    gen = torch.Generator().manual_seed(2)
    resolution, patch, stride = 18, 8, 5
    model = _reinit_(Refiner512(RefinerConfig(block_out_channels=VOLUME_TEST_WIDTHS)).eval(), seed=5)
    xyz, sdf = _ellipsoid_band(resolution, 2.0, gen)
    feats = torch.randn(xyz.shape[0], 32, generator=gen)
    coords = torch.cat([torch.zeros_like(xyz[:, :1]), xyz], 1).int()
    calls = []
    streamed = model.refine_volume(coords, sdf[:, None], feats, resolution=resolution, patch_size=patch,
                                   stride=stride, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (27, 27) and streamed.shape == (resolution,) * 3 and streamed.dtype == torch.float32
    with torch.inference_mode():
        patches = _official_patches(model, xyz, sdf, feats, resolution, patch, stride)
    reference = _blend_official(patches, resolution, patch, stride)
    torch.testing.assert_close(streamed, reference, atol=2e-6, rtol=1e-5)
    averaged = _blend_official(patches, resolution, patch, stride, blend=_average_sequence)
    assert (averaged - reference).abs().max() > 1e-3


# ---------------------------------------------------------------------------- whole-volume 1024
def _official_sign_volume(model, xyz, sdf, resolution, patch, stride):
    """Dense reference of the official 1024 run: returns (final field, sign grid at R/2 as +-1)."""
    half = resolution // 2
    volume = torch.ones(resolution, resolution, resolution)
    volume[xyz[:, 0], xyz[:, 1], xyz[:, 2]] = sdf
    parent = tuple((xyz // 2).T)
    sums = torch.zeros(half, half, half, dtype=torch.float64).index_put_(parent, sdf.double(), accumulate=True)
    counts = torch.zeros(half, half, half, dtype=torch.float64).index_put_(
        parent, torch.ones_like(sdf, dtype=torch.float64), accumulate=True)
    pooled = torch.ones(half, half, half)
    # official SparseDownsample: scatter_reduce mean including the zero start value -> sum / (count + 1)
    pooled[counts > 0] = (sums[counts > 0] / (counts[counts > 0] + 1)).float()
    sign = torch.zeros(half, half, half)
    for ox, oy, oz in itertools.product(range(0, half - patch + 1, stride), repeat=3):
        box = (slice(ox, ox + patch), slice(oy, oy + patch), slice(oz, oz + patch))
        logits = model.sign_logits_patch(pooled[box][None, None])[0, 0]
        sign[box] = torch.where(torch.sigmoid(logits) >= 0.5, 1.0, -1.0)
    upsampled = sign.repeat_interleave(2, 0).repeat_interleave(2, 1).repeat_interleave(2, 2)
    field = volume.abs() * upsampled
    field[xyz[:, 0], xyz[:, 1], xyz[:, 2]] = sdf
    return field, sign, upsampled


def _mixed_cells(volume, mask_fn):
    """Lower corners of the cells whose 8 corner values are not all on one side."""
    n = volume.shape[0] - 1
    corners = torch.stack([volume[i:i + n, j:j + n, k:k + n] for i, j, k in itertools.product((0, 1), repeat=3)])
    above = mask_fn(corners)
    return (above.any(0) & ~above.all(0))


def _calibrated_sign_refiner(xyz, sdf, resolution, patch, stride):
    """Tiny sign refiner whose output bias is centred so that both signs occur."""
    model = _reinit_(SignRefiner1024(RefinerConfig(sign=True, block_out_channels=VOLUME_TEST_WIDTHS, patch_size=patch,
                                                   patch_stride=stride, volume_resolution=resolution // 2)), 6).eval()
    with torch.no_grad():
        pooled_xyz, pooled_sdf = model.pool_band(xyz, sdf)
        dense = torch.ones(1, 1, resolution // 2, resolution // 2, resolution // 2)
        dense[0, 0, pooled_xyz[:, 0], pooled_xyz[:, 1], pooled_xyz[:, 2]] = pooled_sdf[:, 0]
        logits = model.sign_logits_patch(dense[..., :patch, :patch, :patch])
        model.conv_out.bias -= logits.median()
    return model


def test_sign_refiner_streaming_equals_official_dense_algorithm():
    gen = torch.Generator().manual_seed(4)
    resolution, patch, stride = 24, 8, 2
    xyz, sdf = _ellipsoid_band(resolution, 1.5, gen)
    # duplicated slab of odd width as chunked decoding makes (identical values, counted twice in the pool)
    slab = (xyz[:, 0] >= 11) & (xyz[:, 0] < 14)
    xyz_dup = torch.cat([xyz, xyz[slab]])
    sdf_dup = torch.cat([sdf, sdf[slab]])
    model = _calibrated_sign_refiner(xyz_dup, sdf_dup, resolution, patch, stride)

    field = model.sign_field(xyz_dup, sdf_dup, resolution=resolution, patch_size=patch, stride=stride)
    with torch.inference_mode():
        ref_field, ref_sign, ref_upsampled = _official_sign_volume(model, xyz_dup, sdf_dup, resolution, patch, stride)
    assert 0.05 < (ref_sign > 0).float().mean() < 0.95, "both signs must occur for a meaningful test"
    assert torch.equal(field.sign_grid, ref_sign > 0)

    # the overwrite order matters: first-write-wins would give another grid here
    with torch.inference_mode():
        pooled_xyz, pooled_sdf = model.pool_band(xyz_dup, sdf_dup)
        dense = torch.ones(resolution // 2, resolution // 2, resolution // 2)
        dense[tuple(pooled_xyz.long().T)] = pooled_sdf[:, 0]
        first_wins = torch.zeros_like(ref_sign)
        for ox, oy, oz in itertools.product(range(0, resolution // 2 - patch + 1, stride), repeat=3):
            box = (slice(ox, ox + patch), slice(oy, oy + patch), slice(oz, oz + patch))
            logits = model.sign_logits_patch(dense[box][None, None])[0, 0]
            first_wins[box] = torch.where(first_wins[box] == 0, torch.where(logits >= 0, 1.0, -1.0), first_wins[box])
    assert not torch.equal(first_wins, ref_sign)

    every_point = torch.stack(torch.meshgrid(*[torch.arange(resolution)] * 3, indexing="ij"), -1).reshape(-1, 3)
    assert torch.equal(field.values_at(every_point), ref_field.reshape(-1))
    points, values = field.band_points()
    assert torch.equal(points, torch.unique(xyz, dim=0)) and torch.equal(field.values_at(points), values)

    # off-band candidate cells: exactly the cells whose upsampled sign corners differ
    cells = field.sign_change_cells()
    expected = _mixed_cells(ref_upsampled, lambda c: c > 0).nonzero()
    assert cells.shape[0] > 0
    assert torch.equal(torch.unique(cells, dim=0), torch.unique(expected, dim=0))
    assert torch.unique(cells, dim=0).shape[0] == cells.shape[0]
    # every cell of the official field that crosses the MC level has a band corner or is a candidate
    crossing = _mixed_cells(ref_field, lambda c: c > 0.2)
    in_band = torch.zeros(resolution, resolution, resolution, dtype=torch.bool)
    in_band[xyz[:, 0], xyz[:, 1], xyz[:, 2]] = True
    n = resolution - 1
    touches_band = torch.stack([in_band[i:i + n, j:j + n, k:k + n]
                                for i, j, k in itertools.product((0, 1), repeat=3)]).any(0)
    candidate = torch.zeros_like(crossing)
    candidate[tuple(cells.T)] = True
    assert (crossing & ~touches_band & ~candidate).sum() == 0
    assert (crossing & ~touches_band).any(), "the sign field must add surface cells in this test"


def test_sign_pool_counts_duplicates_and_the_zero_start():
    # a voxel, its duplicate and one neighbour in the same parent: (2a + b) / (3 + 1)
    coords = torch.tensor([[0, 2, 2, 2], [0, 3, 2, 2], [0, 2, 2, 2], [0, 7, 0, 1]], dtype=torch.int32)
    sdf = torch.tensor([[0.3], [0.9], [0.3], [0.8]])
    pooled_xyz, pooled_sdf = SignRefiner1024.pool_band(coords, sdf)
    assert pooled_xyz.tolist() == [[1, 1, 1], [3, 0, 0]]
    torch.testing.assert_close(pooled_sdf, torch.tensor([[0.375], [0.4]]))


def test_sign_field_rejects_bad_inputs():
    grid = torch.zeros(4, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError):
        SignField(torch.zeros(1, 3, dtype=torch.int32), torch.zeros(1), grid, resolution=16)
    field = SignField(torch.tensor([[1, 2, 3]]), torch.tensor([0.25]), grid, resolution=8)
    assert field.values_at(torch.tensor([[1, 2, 3], [0, 0, 0]])).tolist() == [0.25, -1.0]
    with pytest.raises(ValueError):
        field.values_at(torch.tensor([[8, 0, 0]]))


def _triangle_set(vertices, faces):
    """Faces as sets of rounded vertex positions (independent of vertex numbering and face order)."""
    corners = (vertices[faces] * 1e4).round().long().tolist()
    return sorted(tuple(sorted(map(tuple, triangle))) for triangle in corners)


def test_sign_field_gives_the_mesh_of_the_dense_official_volume():
    from engine.mesh.marching_cubes import dense_marching_cubes, sparse_marching_cubes

    gen = torch.Generator().manual_seed(8)
    resolution, patch, stride = 24, 8, 2
    xyz, sdf = _ellipsoid_band(resolution, 1.5, gen)
    model = _calibrated_sign_refiner(xyz, sdf, resolution, patch, stride)
    field = model.sign_field(xyz, sdf, resolution=resolution, patch_size=patch, stride=stride)
    with torch.inference_mode():
        ref_field, _, _ = _official_sign_volume(model, xyz, sdf, resolution, patch, stride)
    dense_vertices, dense_faces = dense_marching_cubes(ref_field, 0.2)
    points, values = field.band_points()
    vertices, faces = sparse_marching_cubes(points, values, 0.2, resolution, background=field,
                                            candidate_cells=field.sign_change_cells())
    assert faces.shape[0] > 0 and _triangle_set(vertices, faces) == _triangle_set(dense_vertices, dense_faces)
    # without the sign-change cells the band alone misses the sign field's surfaces
    _, band_only_faces = sparse_marching_cubes(points, values, 0.2, resolution, background=field)
    assert band_only_faces.shape[0] < faces.shape[0]


# ----------------------------------------------------------------------- layouts and empty patches
def _corner_band(resolution: int, gen):
    """A small shell near the low corner: most patches of the volume hold no decoded voxel."""
    axis = torch.arange(resolution, dtype=torch.float32)
    x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")
    distance = ((x - 3.2) ** 2 + (y - 2.7) ** 2 + (z - 3.5) ** 2).sqrt() - 2.2
    band = distance.abs() < 1.2
    return band.nonzero(), torch.tanh(distance[band] / 2) + 0.05 * torch.randn(int(band.sum()), generator=gen)


def test_refiner512_empty_patches_run_once_and_layouts_agree(monkeypatch):
    gen = torch.Generator().manual_seed(9)
    resolution, patch, stride = 18, 8, 5
    model = _reinit_(Refiner512(RefinerConfig(block_out_channels=VOLUME_TEST_WIDTHS)).eval(), seed=5)
    xyz, sdf = _corner_band(resolution, gen)
    feats = torch.randn(xyz.shape[0], 32, generator=gen)
    calls = []
    body = model.refine_embedded_patch
    monkeypatch.setattr(model, "refine_embedded_patch", lambda *a, **k: calls.append(1) or body(*a, **k))
    streamed = model.refine_volume(xyz, sdf, feats, resolution=resolution, patch_size=patch, stride=stride)
    occupied = sum(((xyz >= o) & (xyz < o + patch)).all(1).any().item()
                   for o in (torch.tensor(c) for c in itertools.product(range(0, 11, 5), repeat=3)))
    assert 0 < occupied < 26 and len(calls) == occupied + 1  # occupied patches + one shared empty one
    with torch.inference_mode():
        patches = _official_patches(model, xyz, sdf, feats, resolution, patch, stride)
    torch.testing.assert_close(streamed, _blend_official(patches, resolution, patch, stride), atol=2e-6, rtol=1e-5)
    # channels_last_3d patches (the CUDA layout) give the same volume
    model.channels_last = True
    assert model.activation_format() == torch.channels_last_3d
    channels_last = model.refine_volume(xyz, sdf, feats, resolution=resolution, patch_size=patch, stride=stride)
    torch.testing.assert_close(channels_last, streamed, atol=1e-6, rtol=1e-5)
    assert model.unet3d1.conv_in.weight.is_contiguous(memory_format=torch.channels_last_3d)


def test_sign_refiner_empty_patches_run_once_and_layouts_agree(monkeypatch):
    gen = torch.Generator().manual_seed(10)
    resolution, patch, stride = 24, 8, 2
    xyz, sdf = _corner_band(resolution, gen)
    model = _calibrated_sign_refiner(xyz, sdf, resolution, patch, stride)
    calls = []
    body = model.sign_logits_patch
    monkeypatch.setattr(model, "sign_logits_patch", lambda *a, **k: calls.append(1) or body(*a, **k))
    grid = model.sign_grid(xyz, sdf, resolution=resolution, patch_size=patch, stride=stride)
    parents = torch.unique(xyz // 2, dim=0)
    occupied = sum(((parents >= o) & (parents < o + patch)).all(1).any().item()
                   for o in (torch.tensor(c) for c in itertools.product(range(0, 5, 2), repeat=3)))
    assert 0 < occupied < 26 and len(calls) == occupied + 1
    with torch.inference_mode():
        _, ref_sign, _ = _official_sign_volume(model, xyz, sdf, resolution, patch, stride)
    assert torch.equal(grid, ref_sign > 0)
    model.channels_last = True
    assert torch.equal(model.sign_grid(xyz, sdf, resolution=resolution, patch_size=patch, stride=stride), grid)


def test_cudnn_autotuning_only_around_cuda_runs():
    from engine.models.refiners import _cudnn_autotuning
    previous = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        with _cudnn_autotuning(torch.device("cpu")):
            assert torch.backends.cudnn.benchmark is False
        with _cudnn_autotuning(torch.device("cuda")):  # only the flag: nothing runs on the device
            assert torch.backends.cudnn.benchmark is True
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = previous


@pytest.mark.parametrize("built_in_inference_mode", [False, True])
def test_layout_conversion_keeps_the_parameter_kind(built_in_inference_mode):
    config = RefinerConfig(sign=True, block_out_channels=VOLUME_TEST_WIDTHS, patch_size=8, patch_stride=4,
                           volume_resolution=8)
    if built_in_inference_mode:
        with torch.inference_mode():
            model = SignRefiner1024(config).eval()
    else:
        model = SignRefiner1024(config).eval()
    model.channels_last = True
    patch = torch.rand(1, 1, 8, 8, 8)
    with torch.inference_mode():
        fast = model.sign_logits_patch(patch)
    weight = model.unet3d1.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert weight.is_inference() == built_in_inference_mode
    if not built_in_inference_mode:
        model.load_state_dict(model.state_dict())  # in-place copies into ordinary parameters
    model.channels_last = False
    with torch.inference_mode():
        torch.testing.assert_close(model.sign_logits_patch(patch), fast)
    assert model.unet3d1.conv_in.weight.is_contiguous()
