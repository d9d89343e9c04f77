import pytest
import torch

from engine.sparse import (SparseGroupNorm32, SparseVoxels, sort_block_order, sparse_downsample,
                           sparse_layer_norm, sparse_subdivide)


def test_voxels_replace_shares_cache_and_batch_slices():
    coords = torch.tensor([[0, 1, 2, 3], [0, 0, 0, 0], [1, 5, 5, 5]], dtype=torch.int64)
    v = SparseVoxels(torch.randn(3, 2), coords)
    assert v.coords.dtype == torch.int32
    assert v.batch_size == 2 and v.num_voxels == 3 and v.channels == 2
    assert v.batch_slices() == [slice(0, 2), slice(2, 3)]
    w = v.replace(torch.zeros(3, 5))
    assert w.cache is v.cache and w.coords is v.coords and w.channels == 5
    assert v.to(torch.float64).cache is v.cache
    assert v.spatial_extent() == [6, 6, 6]
    with pytest.raises(ValueError):
        v.replace(torch.zeros(4, 2))
    shuffled = SparseVoxels(torch.randn(3, 2), coords[[2, 0, 1]])
    with pytest.raises(ValueError):
        shuffled.batch_slices()


def test_downsample_is_mean_with_duplicates_counted_and_sorted_output():
    coords = torch.tensor([
        [0, 3, 1, 0],   # -> (1, 0, 0)
        [0, 0, 0, 1],   # -> (0, 0, 0)
        [0, 2, 0, 0],   # -> (1, 0, 0)
        [0, 2, 0, 0],   # duplicate row, counted again
        [1, 0, 0, 0],   # other batch element -> (0, 0, 0) of batch 1
    ], dtype=torch.int32)
    feats = torch.tensor([[1.0], [10.0], [4.0], [4.0], [7.0]])
    down = sparse_downsample(SparseVoxels(feats, coords), 2)
    assert down.coords.tolist() == [[0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]]
    assert down.feats[:, 0].tolist() == [10.0, 3.0, 7.0]


def test_downsample_matches_bruteforce_on_random_voxels():
    gen = torch.Generator().manual_seed(0)
    coords = torch.randint(0, 12, (300, 3), generator=gen)
    coords = torch.cat([torch.zeros(300, 1, dtype=torch.long), coords], 1).int()
    feats = torch.randn(300, 3, generator=gen, dtype=torch.float64)
    down = sparse_downsample(SparseVoxels(feats, coords), 4)
    groups = {}
    for c, f in zip((coords[:, 1:] // 4).tolist(), feats):
        groups.setdefault(tuple(c), []).append(f)
    assert [tuple(c) for c in down.coords[:, 1:].tolist()] == sorted(groups)
    for c, f in zip(down.coords[:, 1:].tolist(), down.feats):
        torch.testing.assert_close(f, torch.stack(groups[tuple(c)]).mean(0))


def test_subdivide_children_order_z_fastest():
    coords = torch.tensor([[0, 1, 2, 3], [0, 0, 0, 0]], dtype=torch.int32)
    feats = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    up = sparse_subdivide(SparseVoxels(feats, coords))
    assert up.num_voxels == 16
    expected_first = [[0, 2 + i, 4 + j, 6 + k] for i in (0, 1) for j in (0, 1) for k in (0, 1)]
    assert up.coords[:8].tolist() == expected_first
    assert up.coords[8:].tolist() == [[0, i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)]
    assert torch.equal(up.feats[:8], feats[0].expand(8, 2))
    assert torch.equal(up.feats[8:], feats[1].expand(8, 2))
    # subdividing then pooling by 2 gives back the input (sorted)
    back = sparse_downsample(up, 2)
    assert back.coords.tolist() == [[0, 0, 0, 0], [0, 1, 2, 3]]
    assert torch.equal(back.feats, feats.flip(0))


def test_group_norm_per_batch_element_matches_nn_groupnorm():
    gen = torch.Generator().manual_seed(1)
    counts = [7, 11]
    coords = torch.cat([torch.cat([torch.full((n, 1), b), torch.randint(0, 9, (n, 3), generator=gen)], 1)
                        for b, n in enumerate(counts)]).int()
    feats = torch.randn(sum(counts), 8, generator=gen)
    norm = SparseGroupNorm32(4, 8)
    with torch.no_grad():
        norm.weight.normal_(generator=gen)
        norm.bias.normal_(generator=gen)
    out = norm(SparseVoxels(feats, coords))
    ref_norm = torch.nn.GroupNorm(4, 8)
    ref_norm.load_state_dict(norm.state_dict())
    assert set(norm.state_dict()) == {"weight", "bias"}
    start = 0
    for n in counts:
        chunk = feats[start:start + n].t().unsqueeze(0)
        torch.testing.assert_close(out.feats[start:start + n], ref_norm(chunk).squeeze(0).t())
        start += n
    half = norm(SparseVoxels(feats.half(), coords))
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.feats.float(), out.feats, atol=5e-3, rtol=5e-3)


def test_layer_norm_in_fp32():
    feats = torch.randn(5, 6).half()
    out = sparse_layer_norm(SparseVoxels(feats, torch.zeros(5, 4, dtype=torch.int32)), eps=1e-6)
    ref = torch.nn.functional.layer_norm(feats.float(), (6,), eps=1e-6).half()
    assert out.dtype == torch.float16 and torch.equal(out.feats, ref)


def test_sort_block_order_matches_lexsort():
    gen = torch.Generator().manual_seed(2)
    xyz = torch.randint(0, 32, (500, 3), generator=gen)
    xyz = torch.cat([xyz, xyz[:20]])  # duplicates must keep input order (stable)
    coords = torch.cat([torch.zeros(xyz.shape[0], 1, dtype=torch.long), xyz], 1)
    order = sort_block_order(coords, 8)
    keys = [(x // 8, y // 8, z // 8, x % 8, y % 8, z % 8, i) for i, (x, y, z) in enumerate(xyz.tolist())]
    expected = [k[-1] for k in sorted(keys)]
    assert order.tolist() == expected
    assert torch.equal(sort_block_order(xyz, 8), order)
