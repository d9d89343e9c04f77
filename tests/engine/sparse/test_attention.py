import math

import pytest
import torch

import engine.sparse.attention as attention_module
from engine.sparse import SparseVoxels, varlen_attention, window_partition, windowed_attention


def reference_attention(q, k, v):
    """Plain softmax attention for one segment, float64, GQA by repeating kv heads."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1).double()
    v = v.repeat_interleave(group, dim=1).double()
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) / math.sqrt(q.shape[-1])
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def random_voxels(grid, num, batch_size, seed):
    gen = torch.Generator().manual_seed(seed)
    coords = []
    for b in range(batch_size):
        flat = torch.randperm(grid ** 3, generator=gen)[:num]
        flat = flat[torch.randperm(flat.numel(), generator=gen)]
        xyz = torch.stack([flat // (grid * grid), (flat // grid) % grid, flat % grid], 1)
        coords.append(torch.cat([torch.full((num, 1), b), xyz], 1))
    return torch.cat(coords).int()


@pytest.mark.parametrize("shift", [0, 4, (1, 2, 3)])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])
def test_windowed_attention_matches_bruteforce(shift, heads):
    hq, hkv = heads
    coords = random_voxels(grid=13, num=400, batch_size=2, seed=7)
    n = coords.shape[0]
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(n, hq, 16, generator=gen)
    k = torch.randn(n, hkv, 16, generator=gen)
    v = torch.randn(n, hkv, 16, generator=gen)
    voxels = SparseVoxels(torch.zeros(n, 1), coords)
    partition = window_partition(voxels, 8, shift)
    assert window_partition(voxels, 8, shift) is partition  # cached
    out = windowed_attention(q, k, v, partition)

    shift_t = (shift,) * 3 if isinstance(shift, int) else shift
    window_id = {}
    ids = []
    for row in coords.tolist():
        key = (row[0],) + tuple((row[1 + a] + shift_t[a]) // 8 for a in range(3))
        ids.append(window_id.setdefault(key, len(window_id)))
    ids = torch.tensor(ids)
    assert partition.num_windows == len(window_id)
    assert partition.max_len == int(torch.bincount(ids).max())
    for w in range(len(window_id)):
        rows = (ids == w).nonzero().squeeze(1)
        ref = reference_attention(q[rows], k[rows], v[rows])
        torch.testing.assert_close(out[rows].double(), ref, rtol=1e-5, atol=1e-5)


def test_varlen_attention_cross_segments_with_query_splitting(monkeypatch):
    # small piece size forces the split of long query segments into several work items
    monkeypatch.setattr(attention_module, "_MAX_QUERY_PIECE", 5)
    monkeypatch.setattr(attention_module, "_BATCH_ELEMENT_BUDGET", 2000)
    gen = torch.Generator().manual_seed(0)
    q_lens, k_lens = [12, 0, 3, 40], [7, 4, 0, 9]
    cu_q = torch.tensor([0] + q_lens).cumsum(0).int()
    cu_k = torch.tensor([0] + k_lens).cumsum(0).int()
    q = torch.randn(sum(q_lens), 6, 8, generator=gen)
    k = torch.randn(sum(k_lens), 3, 8, generator=gen)
    v = torch.randn(sum(k_lens), 3, 8, generator=gen)
    plan = attention_module.build_attention_plan(cu_q, cu_k, max_query_piece=5)
    assert sum(g.num_items for g in plan.groups) == 3 + 8  # 12 -> 3 pieces, 40 -> 8 pieces
    out = varlen_attention(q, k, v, cu_q, cu_k, max(q_lens), max(k_lens))
    for i in range(4):
        qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        if k_lens[i] == 0:
            assert torch.all(out[qs] == 0)
        elif q_lens[i]:
            torch.testing.assert_close(out[qs].double(), reference_attention(q[qs], k[ks], v[ks]),
                                       rtol=1e-5, atol=1e-5)


def test_varlen_attention_rejects_bad_head_counts():
    q = torch.randn(4, 3, 8)
    k = torch.randn(4, 2, 8)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError):
        varlen_attention(q, k, k, cu, cu, 4, 4)
