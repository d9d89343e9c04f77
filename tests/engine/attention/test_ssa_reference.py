"""The SSA reference kernels against brute-force dense attention with explicit masks (float64)."""

import math

import pytest
import torch

from engine.attention import ssa
from engine.sparse import SparseVoxels


def block_sorted_shell(size: int, radius: float, centre: float, block: int = 8) -> torch.Tensor:
    """Grid cells near a sphere, in sort_block order (lexsort x//b, y//b, z//b, x%b, y%b, z%b)."""
    axis = torch.arange(size)
    cells = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    dist = ((cells.double() - centre) ** 2).sum(-1).sqrt()
    cells = cells[(dist - radius).abs() < 0.9]
    sort_key = torch.cat([cells // block, cells % block], dim=1)
    order = torch.arange(cells.shape[0])
    for column in reversed(range(6)):  # stable sorts from the last key to the first = lexsort
        order = order[torch.sort(sort_key[order, column], stable=True).indices]
    cells = cells[order]
    return torch.cat([torch.zeros(cells.shape[0], 1, dtype=torch.long), cells], dim=1).to(torch.int32)


def dense_attention(q, k, v, allowed=None):
    """float64 softmax attention per query head; KV head of query head i is i // (Hq/Hkv).

    allowed: bool [Hq, N, M] or None. Returns (out [N, Hq, D], lse [Hq, N])."""
    n, hq, d = q.shape
    group = hq // k.shape[1]
    outs, lses = [], []
    for head in range(hq):
        kv_head = head // group
        logits = q[:, head].double() @ k[:, kv_head].double().T / math.sqrt(d)
        if allowed is not None:
            logits = logits.masked_fill(~allowed[head], float("-inf"))
        lses.append(torch.logsumexp(logits, dim=-1))
        outs.append(torch.softmax(logits, dim=-1) @ v[:, kv_head].double())
    return torch.stack(outs, dim=1), torch.stack(lses, dim=0)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def shell():
    coords = block_sorted_shell(24, 8.0, 11.3)
    layout = ssa.compute_ssa_layout(coords, 4, 8)
    return coords, layout


def random_qkv(n, hq, hkv, d, nc, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, hq, d, generator=g).to(dtype)
    k = torch.randn(n, hkv, d, generator=g).to(dtype)
    v = torch.randn(n, hkv, d, generator=g).to(dtype)
    ck = torch.randn(nc, hkv, d, generator=g).to(dtype)
    cv = torch.randn(nc, hkv, d, generator=g).to(dtype)
    return q, k, v, ck, cv


def test_layout_matches_explicit_counting(shell):
    coords, layout = shell
    xyz = coords[:, 1:].long()
    blocks = sorted({tuple(c) for c in (xyz // 8).tolist()})
    elem = layout.elements[0]
    assert elem.blocks.num_blocks == len(blocks)
    counts = [sum(1 for c in (xyz // 8).tolist() if tuple(c) == b) for b in blocks]
    expected_offsets = [0]
    for count in counts:
        expected_offsets.append(expected_offsets[-1] + count)
    assert elem.blocks.block_offsets.tolist() == expected_offsets
    assert elem.blocks.max_block_len == max(counts)
    # compressed tokens: 4^3 blocks in lexicographic order, each mapped to its 8^3 block's index
    comp = sorted({tuple(c) for c in (xyz // 4).tolist()})
    assert layout.comp_coords[:, 1:].tolist() == [list(c) for c in comp]
    expected_ids = [blocks.index(tuple(x // 2 for x in c)) for c in comp]
    assert elem.blocks.comp_block_ids.tolist() == expected_ids
    assert layout.token_to_comp.tolist() == [comp.index(tuple(c)) for c in (xyz // 4).tolist()]
    assert layout.comp_counts.sum().item() == coords.shape[0]
    within = xyz % 4
    assert torch.equal(layout.pe_index, within[:, 0] * 16 + within[:, 1] * 4 + within[:, 2])


def test_layout_rejects_unsorted_tokens(shell):
    coords, _ = shell
    swapped = coords.clone()
    swapped[[0, -1]] = swapped[[-1, 0]]
    with pytest.raises(ValueError):
        ssa.compute_ssa_layout(swapped, 8, 8)


def test_layout_shares_bookkeeping_of_identical_batch_elements(shell):
    coords, _ = shell
    second = coords.clone()
    second[:, 0] = 1
    layout = ssa.compute_ssa_layout(torch.cat([coords, second]), 8, 8)
    first_elem, second_elem = layout.elements
    assert second_elem.blocks is first_elem.blocks
    assert second_elem.token_rows == slice(coords.shape[0], 2 * coords.shape[0])
    assert second_elem.comp_rows.start == first_elem.comp_rows.stop
    assert torch.equal(layout.comp_coords[second_elem.comp_rows, 1:], layout.comp_coords[first_elem.comp_rows, 1:])


@pytest.mark.parametrize("hq,hkv", [(4, 2), (8, 2), (3, 3)])
def test_compressed_attention_matches_dense(hq, hkv):
    q, _, _, ck, cv = random_qkv(150, hq, hkv, 16, 23, seed=hq)
    out, lse = ssa.compressed_attention(q, ck, cv)
    ref_out, ref_lse = dense_attention(q, ck, cv)
    assert out.shape == (150, hq, 16) and lse.shape == (hq, 150) and lse.dtype == torch.float32
    assert (out.double() - ref_out).abs().max() < 1e-5
    assert (lse.double() - ref_lse).abs().max() < 1e-5


def test_compressed_attention_half_inputs_and_chunking(monkeypatch):
    q, _, _, ck, cv = random_qkv(97, 4, 2, 32, 11, seed=3, dtype=torch.float16)
    full_out, full_lse = ssa.compressed_attention(q, ck, cv)
    assert full_out.dtype == torch.float16
    ref_out, ref_lse = dense_attention(q, ck, cv)
    assert rel_err(full_out, ref_out) < 1e-3
    monkeypatch.setattr(ssa, "_SCORE_BUDGET", 4 * 11 * 7)  # 7 queries per chunk
    chunk_out, chunk_lse = ssa.compressed_attention(q, ck, cv)
    assert torch.allclose(chunk_out.float(), full_out.float(), atol=2e-3) and torch.allclose(chunk_lse, full_lse, atol=1e-5)


def explicit_topk(q, ck, comp_block_ids, num_blocks, topk):
    """float64 per (KV head, query) top-k over block-summed, group-summed compressed probabilities."""
    hq, hkv = q.shape[1], ck.shape[1]
    group = hq // hkv
    n = q.shape[0]
    probs = []
    for head in range(hq):
        logits = q[:, head].double() @ ck[:, head // group].double().T / math.sqrt(q.shape[2])
        probs.append(torch.softmax(logits, dim=-1))
    selections, margins = [], []
    for kv_head in range(hkv):
        group_probs = sum(probs[kv_head * group + g] for g in range(group))  # [N, Nc]
        per_block = torch.zeros(n, num_blocks, dtype=torch.float64)
        for j, b in enumerate(comp_block_ids.tolist()):
            per_block[:, b] += group_probs[:, j]
        ranked = torch.sort(per_block, dim=-1, descending=True)
        k = min(topk, num_blocks)
        chosen = torch.sort(ranked.indices[:, :k], dim=-1).values
        row = torch.full((n, topk), -1, dtype=torch.long)
        row[:, :k] = chosen
        selections.append(row)
        if k < num_blocks:
            margins.append((ranked.values[:, k - 1] - ranked.values[:, k]) / ranked.values[:, k - 1])
        else:
            margins.append(torch.ones(n, dtype=torch.float64))
    return torch.stack(selections), torch.stack(margins)


@pytest.mark.parametrize("cbs,topk", [(4, 5), (8, 5), (8, 100)])
def test_select_blocks_matches_explicit_topk(shell, cbs, topk):
    coords, _ = shell
    layout = ssa.compute_ssa_layout(coords, cbs, 8)
    elem = layout.elements[0]
    nc = layout.comp_coords.shape[0]
    q, _, _, ck, _ = random_qkv(coords.shape[0], 8, 2, 16, nc, seed=cbs + topk)
    _, lse = ssa.compressed_attention(q, ck, ck)
    got = ssa.select_blocks(q, ck, lse, elem.blocks.comp_block_ids, elem.blocks.num_blocks, topk)
    assert got.dtype == torch.int32 and got.shape == (2, coords.shape[0], topk)
    want, margin = explicit_topk(q, ck, elem.blocks.comp_block_ids, elem.blocks.num_blocks, topk)
    real_topk = min(topk, elem.blocks.num_blocks)
    assert (got[..., real_topk:] == -1).all()
    if topk >= elem.blocks.num_blocks:  # everything selected, ascending
        assert torch.equal(got[..., :real_topk].long(),
                           torch.arange(real_topk).expand(2, coords.shape[0], real_topk))
    clear = margin > 1e-4  # rows whose k-th and (k+1)-th blocks are not near-tied
    assert clear.float().mean() > 0.9
    assert torch.equal(got.long()[clear], want[clear])


def selection_mask(block_topk, block_offsets, n, hq):
    """bool [Hq, N, N]: key j allowed for query i and query head h when j lies in a selected block."""
    hkv = block_topk.shape[0]
    sizes = (block_offsets[1:] - block_offsets[:-1]).long()
    key_block = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)           # [N]
    allowed = (block_topk.long()[..., None] == key_block).any(dim=2)                   # [Hkv, N, N]
    return allowed.repeat_interleave(hq // hkv, dim=0)


def test_selection_attention_matches_masked_dense(shell):
    coords, layout = shell
    elem = layout.elements[0]
    n = coords.shape[0]
    q, k, v, ck, _ = random_qkv(n, 4, 2, 16, layout.comp_coords.shape[0], seed=11)
    _, lse = ssa.compressed_attention(q, ck, ck)
    selection = ssa.select_blocks(q, ck, lse, elem.blocks.comp_block_ids, elem.blocks.num_blocks, 3)
    out = ssa.selection_attention(q, k, v, selection, elem.blocks.block_offsets)
    ref, _ = dense_attention(q, k, v, selection_mask(selection, elem.blocks.block_offsets, n, 4))
    assert (out.double() - ref).abs().max() < 1e-5


def test_selection_attention_random_selection_padding_and_chunks(monkeypatch):
    # uneven blocks (sizes 1..9), random distinct selections with a random number of -1 slots
    g = torch.Generator().manual_seed(5)
    sizes = torch.randint(1, 10, (7,), generator=g)
    offsets = torch.zeros(8, dtype=torch.int32)
    offsets[1:] = torch.cumsum(sizes, 0)
    n = int(offsets[-1])
    q, k, v, _, _ = random_qkv(n, 6, 3, 8, 1, seed=7)
    selection = torch.full((3, n, 4), -1, dtype=torch.int32)
    for h in range(3):
        for i in range(n):
            used = int(torch.randint(1, 5, (1,), generator=g))
            blocks = torch.sort(torch.randperm(7, generator=g)[:used]).values
            selection[h, i, :used] = blocks.to(torch.int32)
    ref, _ = dense_attention(q, k, v, selection_mask(selection, offsets, n, 6))
    out = ssa.selection_attention(q, k, v, selection, offsets)
    assert (out.double() - ref).abs().max() < 1e-5
    monkeypatch.setattr(ssa, "_SCORE_BUDGET", 1)  # one query per chunk
    assert torch.allclose(ssa.selection_attention(q, k, v, selection, offsets), out, atol=1e-6)


def test_gqa_groups_are_consecutive_query_heads():
    # Hq=32, Hkv=2: heads 0..15 must see only KV head 0 and heads 16..31 only KV head 1.
    q, k, v, ck, cv = random_qkv(40, 32, 2, 8, 6, seed=2)
    offsets = torch.tensor([0, 10, 25, 40], dtype=torch.int32)
    out, lse = ssa.compressed_attention(q, ck, cv)
    selection = ssa.select_blocks(q, ck, lse, torch.tensor([0, 0, 1, 1, 2, 2]), 3, 2)
    sel_out = ssa.selection_attention(q, k, v, selection, offsets)
    for h in range(2):
        heads = slice(16 * h, 16 * h + 16)
        kv = slice(h, h + 1)
        sub_out, sub_lse = ssa.compressed_attention(q[:, heads], ck[:, kv], cv[:, kv])
        assert torch.allclose(out[:, heads], sub_out, atol=1e-6)
        assert torch.allclose(lse[heads], sub_lse, atol=1e-6)
        sub_sel = ssa.select_blocks(q[:, heads], ck[:, kv], sub_lse, torch.tensor([0, 0, 1, 1, 2, 2]), 3, 2)
        assert torch.equal(sub_sel[0], selection[h])
        sub_sel_out = ssa.selection_attention(q[:, heads], k[:, kv], v[:, kv], selection[h:h + 1], offsets)
        assert torch.allclose(sel_out[:, heads], sub_sel_out, atol=1e-6)
    # a different KV head 1 must not change the outputs of heads 0..15
    ck2, k2 = ck.clone(), k.clone()
    ck2[:, 1] += 1.0
    k2[:, 1] += 1.0
    out2, _ = ssa.compressed_attention(q, ck2, cv)
    assert torch.equal(out2[:, :16], out[:, :16]) and not torch.allclose(out2[:, 16:], out[:, 16:])


def test_real_topk_is_capped_by_block_count():
    q, _, _, ck, _ = random_qkv(30, 4, 2, 8, 5, seed=9)
    _, lse = ssa.compressed_attention(q, ck, ck)
    got = ssa.select_blocks(q, ck, lse, torch.tensor([0, 1, 1, 2, 0]), 3, 8)
    assert got.shape == (2, 30, 8)
    assert torch.equal(got[..., :3], torch.tensor([0, 1, 2], dtype=torch.int32).expand(2, 30, 3))
    assert (got[..., 3:] == -1).all()


@pytest.mark.parametrize("version,cbs,shift", [("v1", 8, 4), ("v2", 4, 0)])
def test_module_matches_brute_force_composition(shell, version, cbs, shift):
    coords, _ = shell
    n = coords.shape[0]
    torch.manual_seed(1)
    module = ssa.SpatialSparseAttention(64, 4, 2, cbs, 8, topk=4, window_size=8, shift_window=shift,
                                        compression_version=version, backend="torch").double()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(n, 64, dtype=torch.float64)
    voxels = SparseVoxels(x, coords)
    module.record_selection = True
    with torch.no_grad():
        out = module(voxels).feats
        selection = module.last_block_topk[0]
        layout = ssa.ssa_layout(voxels, cbs, 8)
        q = module.proj_q(x).view(n, 4, 16)
        k = module.proj_k(x).view(n, 2, 16)
        v = module.proj_v(x).view(n, 2, 16)
        within = coords[:, 1:].long() % cbs
        pe = module.intra_block_pe[within[:, 0], within[:, 1], within[:, 2]]
        ck = module.compression_key(voxels.replace(k.reshape(n, 32) + pe), layout).view(-1, 2, 16)
        cv = module.compression_value(voxels.replace(v.reshape(n, 32)), layout).view(-1, 2, 16)
        compressed, _ = dense_attention(q, ck, cv)
        blocks = layout.elements[0].blocks
        want_sel, margin = explicit_topk(q, ck, blocks.comp_block_ids, blocks.num_blocks, 4)
        clear = margin > 1e-6
        assert torch.equal(selection.long()[clear], want_sel[clear])
        selected, _ = dense_attention(q, k, v, selection_mask(selection, blocks.block_offsets, n, 4))
        window_id = (coords[:, 1:].long() + shift) // 8
        same_window = (window_id[:, None, :] == window_id[None, :, :]).all(-1)
        windowed, _ = dense_attention(q, k, v, same_window.expand(4, n, n))
        gates = torch.sigmoid(x @ module.gate[0].weight.T)
        mixed = gates[:, 0, None, None] * compressed + gates[:, 1, None, None] * selected + gates[:, 2, None, None] * windowed
        expected = mixed.reshape(n, 64) @ module.proj_o.weight.T
    assert (out - expected).abs().max() < 1e-5 * expected.abs().max()  # fp32 kernels on fp64 inputs
