"""Submanifold sparse convolution against a dense conv3d on the densified tensor.

This pins down the kernel-offset order k = (dz+1)*9 + (dy+1)*3 + (dx+1) of the official
(torchsparse) layout and the permutation to spconv's layout.
"""

import pytest
import torch
import torch.nn.functional as F

from engine.sparse import SparseConv3d, SparseVoxels
from engine.sparse.conv import get_conv_backend, resolve_conv_backend, set_conv_backend, spconv_available

BACKENDS = ["torch"] + (["spconv"] if spconv_available() else [])


def random_voxels(grid, num, channels, batch_size=2, seed=0):
    """Unique random voxels, rows grouped by batch, always including the grid corners."""
    gen = torch.Generator().manual_seed(seed)
    coords = []
    for b in range(batch_size):
        flat = torch.randperm(grid ** 3, generator=gen)[:num]
        corners = torch.tensor([0, grid - 1, grid ** 3 - 1, (grid - 1) * grid * grid])
        flat = torch.unique(torch.cat([flat, corners]))
        flat = flat[torch.randperm(flat.numel(), generator=gen)]  # unsorted rows
        xyz = torch.stack([flat // (grid * grid), (flat // grid) % grid, flat % grid], dim=1)
        coords.append(torch.cat([torch.full((xyz.shape[0], 1), b), xyz], dim=1))
    coords = torch.cat(coords).int()
    feats = torch.randn(coords.shape[0], channels, generator=gen, dtype=torch.float64).float()
    return SparseVoxels(feats, coords)


def densify(v, grid, batch_size):
    dense = torch.zeros(batch_size, v.channels, grid, grid, grid, dtype=torch.float64)
    c = v.coords.long()
    dense[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]] = v.feats.double()
    return dense


def dense_reference(v, conv, grid, batch_size):
    """Dense conv3d with W[co, ci, dx+1, dy+1, dz+1] = kernel[k, ci, co], read at the active voxels."""
    kernel = conv.conv.kernel.detach().double()
    if conv.kernel_size == 3:
        cin, cout = kernel.shape[1:]
        weight = kernel.view(3, 3, 3, cin, cout).permute(4, 3, 2, 1, 0)
        padding = 1
    else:
        weight = kernel.t()[:, :, None, None, None]
        padding = 0
    out = F.conv3d(densify(v, grid, batch_size), weight, conv.conv.bias.detach().double(), padding=padding)
    c = v.coords.long()
    return out[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]]


@pytest.fixture
def backend_guard():
    yield
    set_conv_backend(None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cin,cout,kernel_size", [(3, 5, 3), (8, 4, 3), (16, 16, 3), (6, 7, 1)])
def test_submanifold_conv_matches_dense(backend, cin, cout, kernel_size, backend_guard):
    set_conv_backend(backend)
    assert get_conv_backend() == backend
    grid, batch_size = 7, 2
    torch.manual_seed(cin * 100 + cout)
    v = random_voxels(grid, num=150, channels=cin, batch_size=batch_size, seed=cin + cout)
    assert resolve_conv_backend(v.feats) == backend
    conv = SparseConv3d(cin, cout, kernel_size)
    with torch.no_grad():
        conv.conv.bias.normal_()
        out = conv(v)
    assert out.coords is v.coords and out.cache is v.cache
    ref = dense_reference(v, conv, grid, batch_size)
    torch.testing.assert_close(out.feats.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_offset_kernel_reads_the_stated_neighbour(backend, backend_guard):
    """A kernel that is non-zero only at offset k copies the input at o + d(k)."""
    set_conv_backend(backend)
    coords = torch.tensor([[0, 2, 2, 2], [0, 3, 2, 2], [0, 2, 3, 2], [0, 2, 2, 3]], dtype=torch.int32)
    feats = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    v = SparseVoxels(feats, coords)
    conv = SparseConv3d(1, 1, 3)
    expectations = {  # k -> value at voxel (2,2,2)
        (0 + 1) * 9 + (0 + 1) * 3 + (1 + 1): 2.0,  # dx = +1
        (0 + 1) * 9 + (1 + 1) * 3 + (0 + 1): 3.0,  # dy = +1
        (1 + 1) * 9 + (0 + 1) * 3 + (0 + 1): 4.0,  # dz = +1
        13: 1.0,
    }
    for k, expected in expectations.items():
        with torch.no_grad():
            conv.conv.kernel.zero_()
            conv.conv.kernel[k] = 1.0
            conv.conv.bias.zero_()
            out = conv(v)
        assert out.feats[0, 0].item() == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_neighbour_map_is_cached_and_reused(backend, backend_guard):
    set_conv_backend(backend)
    v = random_voxels(6, num=60, channels=4, batch_size=1, seed=3)
    a, b = SparseConv3d(4, 4), SparseConv3d(4, 2)
    with torch.no_grad():
        h = a(v)
        keys_after_first = set(v.cache)
        out = b(h)
    assert keys_after_first == set(v.cache)  # the second conv built nothing new
    ref = dense_reference(h, b, 6, 1)
    torch.testing.assert_close(out.feats.double(), ref, rtol=1e-5, atol=1e-5)


def test_torch_backend_fp16_accumulates_close_to_fp32(backend_guard):
    set_conv_backend("torch")
    v = random_voxels(6, num=100, channels=8, batch_size=1, seed=5)
    conv = SparseConv3d(8, 8)
    with torch.no_grad():
        ref = conv(v).feats
        half = conv.half()(v.to(torch.float16).replace(v.feats.half())).feats
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), ref, rtol=2e-2, atol=2e-2)


def test_auto_backend_uses_torch_on_cpu(backend_guard):
    set_conv_backend("auto")
    assert resolve_conv_backend(torch.zeros(1, 1)) == "torch"
    set_conv_backend("spconv" if spconv_available() else "torch")
    assert resolve_conv_backend(torch.zeros(1, 1, dtype=torch.float16)) == "torch"


def test_backend_selection_rejects_unknown_names(backend_guard, monkeypatch):
    with pytest.raises(ValueError):
        set_conv_backend("cuda-magic")
    monkeypatch.setenv("D3D_SPARSE_CONV", "torch")
    assert get_conv_backend() == "torch"
    monkeypatch.setenv("D3D_SPARSE_CONV", "bogus")
    with pytest.raises(ValueError):
        get_conv_backend()


def test_torch_backend_binary_search_path_matches_dense(backend_guard, monkeypatch):
    """Large grids use binary search instead of the dense lookup table; force it on a small one."""
    import engine.sparse.conv as conv_module
    monkeypatch.setattr(conv_module, "_DENSE_TABLE_CELLS", 0)
    set_conv_backend("torch")
    v = random_voxels(9, num=20, channels=3, batch_size=2, seed=11)  # 16*n < cells -> binary search
    assert 16 * v.num_voxels < 2 * 11 ** 3
    conv = SparseConv3d(3, 4)
    with torch.no_grad():
        out = conv(v)
    torch.testing.assert_close(out.feats.double(), dense_reference(v, conv, 9, 2), rtol=1e-5, atol=1e-5)


def test_translated_voxels_give_the_same_result(backend_guard):
    """Neighbour search works on the bounding box; far-away coordinates must not matter."""
    set_conv_backend("torch")
    v = random_voxels(6, num=80, channels=3, batch_size=1, seed=12)
    moved = v.coords.clone()
    moved[:, 1:] += torch.tensor([1000, 3, 517], dtype=torch.int32)
    conv = SparseConv3d(3, 2)
    with torch.no_grad():
        a = conv(v).feats
        b = conv(SparseVoxels(v.feats, moved)).feats
    torch.testing.assert_close(a, b)
