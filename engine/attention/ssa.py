"""Spatial Sparse Attention (SSA, Direct3D-S2 §4): exact PyTorch reference and the attention module.

The three kernels of the sparse DiT's self-attention are written here as plain PyTorch, computed in
fp32 whatever the input dtype, chunked over queries so that no `[heads, N, N]` matrix is ever built:

* `compressed_attention`: every query attends to all compressed (block-pooled) keys; also returns
  the natural-log softmax normaliser (lse) per query head.
* `select_blocks`: the compressed-attention probabilities, summed over the query heads sharing a KV
  head and summed per 8^3 selection block, give each query's top-k selection blocks.
* `selection_attention`: exact softmax attention of each query over the union of its selected
  blocks' tokens (tokens are block-sorted, so a block is a contiguous row range); computed per
  selected block with an online softmax.

They are the oracle for the Triton kernels in `engine.attention.triton`, which expose the same
signatures. `SpatialSparseAttention` is the `self_attn` module of a sparse DiT block (official keys)
and dispatches to Triton on CUDA when that module imports (`backend="auto"`).

Grouped-query attention: with Hq query heads and Hkv KV heads, query heads
`g*(Hq/Hkv) .. (g+1)*(Hq/Hkv)-1` use KV head g in every branch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.sparse import (SparseConv3d, SparseGroupNorm32, SparseVoxels, window_partition,
                           windowed_attention)

# Upper bound on the number of fp32 elements of one chunk's score tensor (~256 MiB).
_SCORE_BUDGET = 1 << 26


def _query_chunk(per_query_elements: int) -> int:
    """Queries per chunk so that a chunk's largest fp32 temporary stays within `_SCORE_BUDGET`."""
    return max(1, _SCORE_BUDGET // max(1, per_query_elements))


def _group_queries(q: Tensor, num_kv_heads: int) -> Tensor:
    """[n, Hq, D] -> fp32 [Hkv, G, n, D] with G = Hq / Hkv consecutive query heads per KV head."""
    n, hq, d = q.shape
    return q.float().reshape(n, num_kv_heads, hq // num_kv_heads, d).permute(1, 2, 0, 3)


def _check_heads(q: Tensor, k: Tensor) -> None:
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"head dims differ: q {q.shape[2]}, k {k.shape[2]}")


# ============================================================================ reference kernels
def compressed_attention(q: Tensor, ck: Tensor, cv: Tensor) -> tuple[Tensor, Tensor]:
    """Full attention of every query over the compressed keys/values.

    q [N, Hq, D], ck/cv [Nc, Hkv, D] -> (out [N, Hq, D] in q's dtype, lse [Hq, N] fp32, natural log).
    """
    _check_heads(q, ck)
    n_tokens, hq, d = q.shape
    hkv = ck.shape[1]
    scale = 1.0 / math.sqrt(d)
    keys = ck.float().permute(1, 0, 2).unsqueeze(1)      # [Hkv, 1, Nc, D]
    values = cv.float().permute(1, 0, 2).unsqueeze(1)
    out = q.new_empty(n_tokens, hq, d)
    lse = torch.empty(hq, n_tokens, dtype=torch.float32, device=q.device)
    step = _query_chunk(hq * max(1, ck.shape[0]))
    for start in range(0, n_tokens, step):
        stop = min(start + step, n_tokens)
        qg = _group_queries(q[start:stop], hkv)           # [Hkv, G, n, D]
        scores = (qg @ keys.transpose(-1, -2)) * scale    # [Hkv, G, n, Nc]
        chunk_lse = torch.logsumexp(scores, dim=-1)       # [Hkv, G, n]
        probs = torch.exp(scores - chunk_lse.unsqueeze(-1))
        chunk_out = probs @ values                        # [Hkv, G, n, D]
        out[start:stop] = chunk_out.permute(2, 0, 1, 3).reshape(stop - start, hq, d).to(q.dtype)
        lse[:, start:stop] = chunk_lse.reshape(hq, stop - start)
    return out, lse


@torch.no_grad()
def block_scores(q: Tensor, ck: Tensor, lse: Tensor, comp_block_ids: Tensor, num_blocks: int) -> Tensor:
    """Per-query importance of every selection block, fp32 [Hkv, N, num_blocks] (small inputs only).

    score[h, i, b] = sum over the query heads of group h and over the compressed tokens j of block b
    of exp(q_i . ck_j / sqrt(D) - lse_i), i.e. the compressed-attention probabilities.
    """
    return _block_scores_chunk(q, ck.float().permute(1, 0, 2).unsqueeze(1), lse,
                               comp_block_ids.long(), num_blocks)


def _block_scores_chunk(q: Tensor, keys: Tensor, lse: Tensor, comp_block_ids: Tensor,
                        num_blocks: int) -> Tensor:
    hkv, n, d = keys.shape[0], q.shape[0], q.shape[2]
    qg = _group_queries(q, hkv)                                         # [Hkv, G, n, D]
    logits = (qg @ keys.transpose(-1, -2)) * (1.0 / math.sqrt(d))       # [Hkv, G, n, Nc]
    probs = torch.exp(logits - lse.float().reshape(hkv, -1, n).unsqueeze(-1))
    group_probs = probs.sum(dim=1)                                      # [Hkv, n, Nc]
    scores = group_probs.new_zeros(hkv, n, num_blocks)
    scores.index_add_(2, comp_block_ids, group_probs)                   # sum into selection blocks
    return scores


@torch.no_grad()
def select_blocks(q: Tensor, ck: Tensor, lse: Tensor, comp_block_ids: Tensor, num_blocks: int,
                  topk: int) -> Tensor:
    """Top-k selection blocks per (KV head, query): int32 [Hkv, N, topk].

    Indices point into the ascending list of non-empty selection blocks; each row holds the
    `min(topk, num_blocks)` best blocks sorted ascending, then -1 padding.
    """
    _check_heads(q, ck)
    n_tokens, hq, _ = q.shape
    hkv = ck.shape[1]
    real_topk = min(topk, num_blocks)
    keys = ck.float().permute(1, 0, 2).unsqueeze(1)
    ids = comp_block_ids.to(device=q.device, dtype=torch.long)
    lse_grouped = lse.reshape(hq, n_tokens)
    result = torch.full((hkv, n_tokens, topk), -1, dtype=torch.int32, device=q.device)
    step = _query_chunk(hq * max(1, ck.shape[0]) + hkv * num_blocks)
    for start in range(0, n_tokens, step):
        stop = min(start + step, n_tokens)
        scores = _block_scores_chunk(q[start:stop], keys, lse_grouped[:, start:stop], ids, num_blocks)
        best = torch.topk(scores, real_topk, dim=-1, sorted=False).indices
        result[:, start:stop, :real_topk] = torch.sort(best, dim=-1).values.to(torch.int32)
    return result


def selection_attention(q: Tensor, k: Tensor, v: Tensor, block_topk: Tensor, block_offsets: Tensor) -> Tensor:
    """Softmax attention of each query over the tokens of its selected blocks.

    q [N, Hq, D]; k/v [N, Hkv, D] block-sorted; block_topk int [Hkv, N, topk] (-1 = unused slot);
    block_offsets int [num_blocks + 1]: block b holds rows block_offsets[b] .. block_offsets[b+1]-1.
    The query heads of KV group h all use the selection of row h. Returns [N, Hq, D] in q's dtype.

    Computed block by block with an online softmax (exact up to fp32 rounding): for every (KV head,
    block) the queries that selected it attend to the block's contiguous keys, and each query's
    running max / sum / weighted values are updated. No key is copied per query.
    """
    _check_heads(q, k)
    n_tokens, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    offsets = block_offsets.tolist()
    num_blocks = len(offsets) - 1
    queries = (q.float() * (1.0 / math.sqrt(d))).reshape(n_tokens, hkv, group, d)
    run_max = q.new_full((hkv, n_tokens, group), float("-inf"), dtype=torch.float32)
    run_sum = torch.zeros_like(run_max)
    acc = q.new_zeros((hkv, n_tokens, group, d), dtype=torch.float32)

    # (KV head, query) pairs sorted by (KV head, selected block): one contiguous run per block
    selection = block_topk.long()
    head_of, query_of, slot_of = torch.nonzero(selection >= 0, as_tuple=True)
    group_key = head_of * num_blocks + selection[head_of, query_of, slot_of]
    order = torch.argsort(group_key, stable=True)
    query_sorted = query_of[order]
    run_lengths = torch.bincount(group_key, minlength=hkv * num_blocks).tolist()

    position = 0
    for head in range(hkv):
        keys, values = k[:, head].float(), v[:, head].float()
        for block in range(num_blocks):
            count = run_lengths[head * num_blocks + block]
            if count == 0:
                continue
            block_keys = keys[offsets[block]:offsets[block + 1]]          # [L, D]
            block_values = values[offsets[block]:offsets[block + 1]]
            step = _query_chunk(group * (block_keys.shape[0] + d))
            for first in range(position, position + count, step):
                rows = query_sorted[first:min(first + step, position + count)]
                logits = queries[rows, head] @ block_keys.T                   # [P, G, L]
                old_max = run_max[head, rows]
                new_max = torch.maximum(old_max, logits.amax(dim=-1))         # finite: blocks are non-empty
                rescale = torch.exp(old_max - new_max)
                probs = torch.exp(logits - new_max.unsqueeze(-1))
                run_sum[head, rows] = run_sum[head, rows] * rescale + probs.sum(dim=-1)
                acc[head, rows] = acc[head, rows] * rescale.unsqueeze(-1) + probs @ block_values
                run_max[head, rows] = new_max
            position += count
    out = acc / run_sum.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(-1)   # [Hkv, N, G, D]
    return out.permute(1, 0, 2, 3).reshape(n_tokens, hq, d).to(q.dtype)


# ============================================================================ block bookkeeping
@dataclass
class BlockLayout:
    """Selection-block bookkeeping of one batch element; depends only on its coordinates."""

    block_offsets: Tensor    # int32 [num_blocks + 1]: cumulative token counts per non-empty block
    comp_block_ids: Tensor   # int32 [Nc_b]: selection-block index of each compressed token
    block_keys: Tensor       # int64 [num_blocks]: linearised block coordinates, ascending
    num_blocks: int
    max_block_len: int
    max_comp_per_block: int = 1          # most compressed tokens in one selection block
    kernel_aux: dict = field(default_factory=dict, repr=False)   # per-backend precomputed tensors


@dataclass
class ElementLayout:
    token_rows: slice        # rows of this batch element among the tokens
    comp_rows: slice         # rows of this batch element among the compressed tokens
    blocks: BlockLayout      # shared between elements with identical coordinates


@dataclass
class SSALayout:
    """Everything SSA needs that depends only on the coordinates of a (block-sorted) token set."""

    compression_block_size: int
    selection_block_size: int
    token_to_comp: Tensor    # int64 [N]: compressed token of each token
    comp_counts: Tensor      # int64 [Nc]: tokens per compressed token
    comp_coords: Tensor      # int32 [Nc, 4]: (batch, x//c, y//c, z//c), sorted lexicographically
    pe_index: Tensor         # int64 [N]: flat index of (x%c, y%c, z%c) into intra_block_pe
    elements: list[ElementLayout]
    pooled_template: object = None   # SparseVoxels of the compressed tokens (v2 convs), made lazily
    pool_rows: Optional[tuple] = None   # (token order sorted by compressed token, start offsets), lazily


def _linear_key(columns: Tensor, extent: int) -> Tensor:
    key = torch.zeros(columns.shape[0], dtype=torch.long, device=columns.device)
    for axis in range(columns.shape[1]):
        key = key * extent + columns[:, axis]
    return key


def _unlinear_key(key: Tensor, extent: int, num_columns: int) -> Tensor:
    columns = []
    for _ in range(num_columns):
        columns.append(key % extent)
        key = key // extent
    return torch.stack(columns[::-1], dim=1)


def compute_ssa_layout(coords: Tensor, compression_block_size: int, selection_block_size: int) -> SSALayout:
    """Block bookkeeping for tokens `coords` [N, 4] (rows grouped by batch, each element sorted by
    8^3 selection block in ascending block id, i.e. `sort_block` order)."""
    if selection_block_size % compression_block_size != 0:
        raise ValueError("selection_block_size must be a multiple of compression_block_size")
    cbs, sbs = compression_block_size, selection_block_size
    c = coords.long()
    device = c.device
    extent = int(c.max()) + 1 if c.numel() else 1
    xyz = c[:, 1:]

    # compression blocks over the whole batch, ordered by (batch, cx, cy, cz) like sparse_downsample
    comp_key = _linear_key(torch.cat([c[:, :1], xyz // cbs], dim=1), extent)
    comp_key_sorted, token_to_comp, comp_counts = torch.unique(
        comp_key, sorted=True, return_inverse=True, return_counts=True)
    comp_coords = _unlinear_key(comp_key_sorted, extent, 4)
    within = xyz % cbs
    pe_index = (within[:, 0] * cbs + within[:, 1]) * cbs + within[:, 2]

    batch_ids = c[:, 0]
    num_batches = int(batch_ids.max()) + 1 if c.numel() else 0
    token_counts = torch.bincount(batch_ids, minlength=num_batches).tolist()
    comp_batch_counts = torch.bincount(comp_coords[:, 0], minlength=num_batches).tolist()
    ratio = sbs // cbs
    elements: list[ElementLayout] = []
    token_start = comp_start = 0
    for b in range(num_batches):
        rows = slice(token_start, token_start + token_counts[b])
        comp_rows = slice(comp_start, comp_start + comp_batch_counts[b])
        token_start, comp_start = rows.stop, comp_rows.stop
        shared = None
        for previous in elements:  # reuse the bookkeeping of an element with the same coordinates
            prev_xyz = xyz[previous.token_rows]
            if prev_xyz.shape == xyz[rows].shape and torch.equal(prev_xyz, xyz[rows]):
                shared = previous.blocks
                break
        if shared is None:
            shared = _block_layout(xyz[rows], comp_coords[comp_rows, 1:] // ratio, sbs, extent, device)
        elements.append(ElementLayout(rows, comp_rows, shared))
    return SSALayout(cbs, sbs, token_to_comp, comp_counts, comp_coords.to(torch.int32), pe_index, elements)


def _block_layout(xyz: Tensor, comp_block_xyz: Tensor, sbs: int, extent: int, device) -> BlockLayout:
    if xyz.shape[0] == 0:
        return BlockLayout(torch.zeros(1, dtype=torch.int32, device=device),
                           torch.zeros(0, dtype=torch.int32, device=device),
                           torch.zeros(0, dtype=torch.long, device=device), 0, 0)
    token_key = _linear_key(xyz // sbs, extent)
    block_keys, token_block, counts = torch.unique(token_key, sorted=True, return_inverse=True,
                                                   return_counts=True)
    if bool((token_block[1:] < token_block[:-1]).any()):
        raise ValueError("SSA needs tokens grouped by selection block in ascending block id "
                         "(sort_block order)")
    offsets = torch.zeros(block_keys.shape[0] + 1, dtype=torch.int32, device=device)
    offsets[1:] = torch.cumsum(counts, dim=0).to(torch.int32)
    comp_block_ids = torch.searchsorted(block_keys, _linear_key(comp_block_xyz, extent))
    comp_per_block = torch.bincount(comp_block_ids, minlength=block_keys.shape[0])
    return BlockLayout(offsets, comp_block_ids.to(torch.int32), block_keys, int(block_keys.shape[0]),
                       int(counts.max()), max(1, int(comp_per_block.max())))


def ssa_layout(voxels, compression_block_size: int, selection_block_size: int) -> SSALayout:
    """`compute_ssa_layout` of a SparseVoxels, cached in `voxels.cache` (shared by all blocks/steps)."""
    key = ("ssa_layout", compression_block_size, selection_block_size)
    layout = voxels.cache.get(key)
    if layout is None:
        layout = compute_ssa_layout(voxels.coords, compression_block_size, selection_block_size)
        voxels.cache[key] = layout
    return layout


# ============================================================================ batch packing
@dataclass
class RowPacking:
    """How the rows of a batch of sparse tokens map to a padded `[B, L, C]` tensor.

    When every batch element has the same number of tokens (the cond/uncond batch of guidance)
    packing is a free reshape; otherwise rows are scattered into zero padding."""

    batch_size: int
    length: int
    flat_index: Tensor | None   # int64 [N]: position of each row in the flattened [B*L]; None = reshape


def row_packing(voxels) -> RowPacking:
    packing = voxels.cache.get("row_packing")
    if packing is None:
        counts = voxels.batch_counts()
        batch_size, length = len(counts), max(counts, default=0)
        flat_index = None
        if any(count != length for count in counts):
            batch = voxels.coords[:, 0].long()
            starts = torch.tensor([s.start for s in voxels.batch_slices()], device=voxels.device)
            position = torch.arange(voxels.num_voxels, device=voxels.device) - starts[batch]
            flat_index = batch * length + position
        packing = RowPacking(batch_size, length, flat_index)
        voxels.cache["row_packing"] = packing
    return packing


def pack_rows(feats: Tensor, packing: RowPacking) -> Tensor:
    """[N, C] -> [B, L, C]."""
    if packing.flat_index is None:
        return feats.reshape(packing.batch_size, packing.length, feats.shape[-1])
    packed = feats.new_zeros(packing.batch_size * packing.length, feats.shape[-1])
    packed[packing.flat_index] = feats
    return packed.view(packing.batch_size, packing.length, feats.shape[-1])


def unpack_rows(packed: Tensor, packing: RowPacking) -> Tensor:
    """[B, L, C] -> [N, C]."""
    flat = packed.reshape(-1, packed.shape[-1])
    return flat if packing.flat_index is None else flat[packing.flat_index]


# ============================================================================ kernel dispatch
_TRITON_OPS: list = []  # memo: [module or None]


def _triton_module():
    if not _TRITON_OPS:
        try:
            import engine.attention.triton as triton_ops
        except Exception:  # no Triton, no GPU build, or the kernels are not there yet
            triton_ops = None
        _TRITON_OPS.append(triton_ops)
    return _TRITON_OPS[0]


_GATED_SUM: list = []  # memo: [engine.kernels.modulation.gated_branch_sum or None]


def _gated_sum_kernel():
    """The one-pass Triton gated sum of the three branches, or None without Triton."""
    if not _GATED_SUM:
        try:
            from engine.kernels.modulation import gated_branch_sum
        except Exception:  # no Triton
            gated_branch_sum = None
        _GATED_SUM.append(gated_branch_sum)
    return _GATED_SUM[0]


class _TorchOps:
    compressed_attention = staticmethod(compressed_attention)
    select_blocks = staticmethod(select_blocks)
    selection_attention = staticmethod(selection_attention)


def ssa_ops(backend: str, device: torch.device):
    """The object providing the three SSA kernels for `backend` ("auto" | "torch" | "triton")."""
    if backend == "torch":
        return _TorchOps
    if backend not in ("auto", "triton"):
        raise ValueError(f"unknown SSA backend {backend!r}; expected 'auto', 'torch' or 'triton'")
    triton_ops = _triton_module() if device.type == "cuda" or backend == "triton" else None
    if triton_ops is None:
        if backend == "triton":
            raise RuntimeError("SSA backend 'triton' requested but engine.attention.triton is unavailable")
        return _TorchOps
    return triton_ops


def _elements_by_layout(layout: SSALayout) -> list[list[int]]:
    """Indices of the non-empty batch elements, grouped by shared block bookkeeping (same coordinates)."""
    groups: dict[int, list[int]] = {}
    for index, element in enumerate(layout.elements):
        if element.token_rows.stop > element.token_rows.start:
            groups.setdefault(id(element.blocks), []).append(index)
    return list(groups.values())


def _side_by_side(tensor: Tensor, row_ranges: list[slice]) -> Tensor:
    """Rows of several batch elements placed next to each other along the head dim ([n, m*H, D])."""
    if len(row_ranges) == 1:
        return tensor[row_ranges[0]]
    return torch.cat([tensor[rows] for rows in row_ranges], dim=1)


def _rows_in_equal_parts(layout: SSALayout, members: list[int], n_tokens: int) -> bool:
    """Whether the elements `members` hold the token rows [j * n, (j + 1) * n), j = 0.., and nothing else."""
    n = n_tokens // max(1, len(members))
    return n * len(members) == n_tokens and all(
        layout.elements[e].token_rows == slice(j * n, (j + 1) * n) for j, e in enumerate(members))


def _element_view(tensor: Tensor, row_ranges: list[slice]) -> Tensor | None:
    """The rows of m batch elements with as many rows each and evenly spaced starts as one strided
    view [n, m, H, D] of `tensor` [N, H, D] (no copy; the Triton kernels' element layout); None if
    the starts are not evenly spaced or a stride is not a multiple of 16 elements (the kernels'
    loads would not vectorise: slower than copying)."""
    first, n = row_ranges[0].start, row_ranges[0].stop - row_ranges[0].start
    step = row_ranges[1].start - first if len(row_ranges) > 1 else n
    if any(r.start != first + j * step or r.stop - r.start != n for j, r in enumerate(row_ranges)):
        return None
    if tensor.stride(-1) != 1 or any(st % 16 for st in tensor.stride()[:-1]):
        return None
    size = (n, len(row_ranges)) + tuple(tensor.shape[1:])
    stride = (tensor.stride(0), step * tensor.stride(0)) + tuple(tensor.stride()[1:])
    return tensor.as_strided(size, stride, tensor.storage_offset() + first * tensor.stride(0))


# ============================================================================ modules
def _block_pool(feats: Tensor, layout: SSALayout, ops=None, silu: bool = False) -> Tensor:
    """Pooling of the token rows of each compression block as the official SparseDownsample does it:
    `scatter_reduce(zeros, reduce="mean")` with the default include_self=True, so the zero it starts
    from is averaged in too: sum / (count + 1). Accumulated in float64 (verified against the parity
    fixtures: a plain mean changes most top-k selections). `silu`: pool `F.silu(feats)`.
    With SSA kernels `ops` that pool (CUDA, no autograd), one kernel pass (`block_pool`)."""
    if ops is not None and hasattr(ops, "block_pool") and feats.is_cuda \
            and not (torch.is_grad_enabled() and feats.requires_grad):
        if layout.pool_rows is None:
            counts = layout.comp_counts.to(feats.device)
            layout.pool_rows = (torch.argsort(layout.token_to_comp.to(feats.device), stable=True),
                                F.pad(torch.cumsum(counts, 0), (1, 0)))
        return ops.block_pool(feats, *layout.pool_rows, silu=silu)
    if silu:
        feats = F.silu(feats)
    sums = feats.new_zeros(layout.comp_counts.shape[0], feats.shape[1], dtype=torch.float64)
    sums.index_add_(0, layout.token_to_comp, feats.double())
    return (sums / (layout.comp_counts + 1).unsqueeze(1)).to(feats.dtype)


def _pooled_voxels(layout: SSALayout, feats: Tensor):
    """The compressed tokens as SparseVoxels; the object (and its neighbour-map cache) is kept."""
    if layout.pooled_template is None:
        layout.pooled_template = SparseVoxels(feats.new_zeros(feats.shape[0], 0), layout.comp_coords)
    return layout.pooled_template.replace(feats)


class CompressionV1(nn.Module):
    """v1.1 compression: 1^3 sparse conv (+bias) -> SiLU -> pool each compression block (`_block_pool`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.act_layers = nn.Sequential(SparseConv3d(channels, channels, kernel_size=1), nn.SiLU())

    def forward(self, tokens: SparseVoxels, layout: SSALayout, ops=None) -> Tensor:
        return _block_pool(self.act_layers[0](tokens).feats, layout, ops, silu=True)


class CompressionV2(nn.Module):
    """v1.0 compression: GroupNorm32 + SiLU -> pool per compression block (`_block_pool`) -> conv3 ->
    GroupNorm32 -> SiLU -> conv3 (submanifold on the pooled voxels), plus the pooled raw input as skip."""

    def __init__(self, channels: int, num_groups: int = 32):
        super().__init__()
        self.act_layers = nn.Sequential(SparseGroupNorm32(num_groups, channels), nn.SiLU())
        self.out_layers = nn.Sequential(SparseConv3d(channels, channels, 3), SparseGroupNorm32(num_groups, channels),
                                        nn.SiLU(), SparseConv3d(channels, channels, 3))

    def forward(self, tokens: SparseVoxels, layout: SSALayout, ops=None) -> Tensor:
        skip = _block_pool(tokens.feats, layout, ops)
        pooled = _pooled_voxels(layout, _block_pool(self.act_layers[0](tokens).feats, layout, ops, silu=True))
        pooled = self.out_layers[0](pooled)
        pooled = pooled.replace(F.silu(self.out_layers[1](pooled).feats))
        return self.out_layers[3](pooled).feats + skip


class SpatialSparseAttention(nn.Module):
    """Gated sum of the compressed, selected and sliding-window attention branches (§4).

    Keys: `proj_q/k/v/o.weight` (no bias), `intra_block_pe` [c, c, c, Hkv*D], `gate.0.weight` [3, C],
    `compression_key.*`, `compression_value.*`. Tokens must be in sort_block order per batch element.
    """

    def __init__(self, channels: int, num_heads: int, num_kv_heads: int, compression_block_size: int,
                 selection_block_size: int, topk: int, window_size: int = 8, shift_window: int = 0,
                 compression_version: str = "v1", backend: str = "auto"):
        super().__init__()
        if channels % num_heads or num_heads % num_kv_heads:
            raise ValueError("channels must divide into num_heads, num_heads into num_kv_heads")
        self.channels, self.num_heads, self.num_kv_heads = channels, num_heads, num_kv_heads
        self.head_dim = channels // num_heads
        kv_channels = num_kv_heads * self.head_dim
        self.compression_block_size = compression_block_size
        self.selection_block_size = selection_block_size
        self.topk = topk
        self.window_size, self.shift_window = window_size, shift_window
        self.backend = backend
        self.proj_q = nn.Linear(channels, channels, bias=False)
        self.proj_k = nn.Linear(channels, kv_channels, bias=False)
        self.proj_v = nn.Linear(channels, kv_channels, bias=False)
        self.proj_o = nn.Linear(channels, channels, bias=False)
        c = compression_block_size
        self.intra_block_pe = nn.Parameter(torch.zeros(c, c, c, kv_channels))
        if compression_version == "v1":
            self.compression_key, self.compression_value = CompressionV1(kv_channels), CompressionV1(kv_channels)
        elif compression_version == "v2":
            self.compression_key, self.compression_value = CompressionV2(kv_channels), CompressionV2(kv_channels)
        else:
            raise ValueError(f"unknown compression_version {compression_version!r}")
        self.gate = nn.Sequential(nn.Linear(channels, 3, bias=False), nn.Sigmoid())
        self.record_selection = False        # when True, `last_block_topk` keeps the selections used
        self.last_block_topk: list[Tensor] = []

    def forward(self, x, voxels: SparseVoxels | None = None, block_topk=None):
        """x: SparseVoxels, or features `[N, C]` / packed `[B, L, C]` (see `pack_rows`) on the
        coordinates of `voxels`. block_topk: optional injected selection, a tensor (batch of one) or
        one entry per batch element (int [Hkv, N_b, k] or None for the natural selection).
        Returns the same kind of input it was given."""
        if isinstance(x, SparseVoxels):
            voxels, feats = x, x.feats
        else:
            if voxels is None:
                raise ValueError("SpatialSparseAttention needs `voxels` for plain feature tensors")
            feats = unpack_rows(x, row_packing(voxels)) if x.dim() == 3 else x
        out = self._attend(feats, voxels, block_topk)
        if isinstance(x, SparseVoxels):
            return x.replace(out)
        return pack_rows(out, row_packing(voxels)) if x.dim() == 3 else out

    def _qkv_weight(self, dtype: torch.dtype) -> Tensor:
        """proj_q/k/v and gate weights stacked for one GEMM (zero rows pad the output width to a
        multiple of 16: half-precision rows stay 16-byte aligned and the Triton kernels, which read
        q/k/v in place, see row strides divisible by 16 and vectorise their loads); rebuilt only
        when a weight changes."""
        weights = (self.proj_q.weight, self.proj_k.weight, self.proj_v.weight, self.gate[0].weight)
        # Inference tensors (weights created or moved under torch.inference_mode) have no version
        # counter; they cannot change outside inference mode, so their storage identifies them.
        key = (dtype,) + tuple((w.data_ptr(), 0 if w.is_inference() else w._version, w.device) for w in weights)
        cached = getattr(self, "_qkv_cache", None)
        if cached is None or cached[0] != key or torch.is_grad_enabled():
            rows = sum(w.shape[0] for w in weights)
            padding = weights[0].new_zeros(-rows % 16, weights[0].shape[1])
            stacked = torch.cat([w.to(dtype) for w in weights] + [padding.to(dtype)])
            if torch.is_grad_enabled() or (stacked.is_cuda and torch.cuda.is_current_stream_capturing()):
                return stacked   # autograd needs the graph; a capture must not leave its memory in a cache
            cached = (key, stacked)
            self._qkv_cache = cached
        return cached[1]

    def _attend(self, x: Tensor, voxels: SparseVoxels, block_topk) -> Tensor:
        """The three branches and their gated sum. Nothing here reads tensor values on the host: the
        coordinate bookkeeping is cached in `voxels.cache`, so a forward over cached coordinates is
        free of host-device synchronisation (and can be captured in a CUDA graph)."""
        n_tokens = x.shape[0]
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        layout = ssa_layout(voxels, self.compression_block_size, self.selection_block_size)
        projected = F.linear(x, self._qkv_weight(x.dtype))
        q, k, v, gate_logits = projected.split([hq * d, hkv * d, hkv * d, projected.shape[-1] - (hq + 2 * hkv) * d],
                                              dim=-1)

        # compressed keys/values (keys carry the learned position inside their compression block);
        # the fp32 position table promotes the sum to fp32, rounded once to the compute dtype
        # (without autograd, the Triton kernels do gather, add and rounding in one pass)
        ops = ssa_ops(self.backend, x.device)
        pe_table = self.intra_block_pe.reshape(-1, hkv * d)
        pe_grad = torch.is_grad_enabled() and (k.requires_grad or pe_table.requires_grad)
        if hasattr(ops, "add_table_rows") and not pe_grad:
            keys_with_pe = ops.add_table_rows(k, pe_table, layout.pe_index)
        else:
            keys_with_pe = torch.add(k, pe_table.index_select(0, layout.pe_index)).to(x.dtype)
        ck = self.compression_key(voxels.replace(keys_with_pe), layout, ops).view(-1, hkv, d)
        cv = self.compression_value(voxels.replace(v.contiguous()), layout, ops).view(-1, hkv, d)
        q, k, v = q.reshape(n_tokens, hq, d), k.reshape(n_tokens, hkv, d), v.reshape(n_tokens, hkv, d)

        triton_ops = ops is not _TorchOps
        partition = window_partition(voxels, self.window_size, self.shift_window)
        window_attention = getattr(ops, "windowed_attention", windowed_attention)
        differentiable = torch.is_grad_enabled() and (x.requires_grad or self.gate[0].weight.requires_grad)
        groups = _elements_by_layout(layout)
        # One group of elements holding rows [j * n, (j + 1) * n) (a guidance pair, or one element): the
        # Triton window kernel, run last, writes the gated sum of the three branches itself
        gated_window = getattr(ops, "GATED_WINDOW", False) and not differentiable and len(groups) == 1 and \
            _rows_in_equal_parts(layout, groups[0], n_tokens)
        # otherwise the gated sum is written per batch-element group straight from the kernels' outputs
        # (no copies back); with autograd on, the same sum out of place, per element, in row order
        windowed = mixed = gated_branch_sum = None
        if not gated_window:
            windowed = window_attention(q, k, v, partition)
            mixed = torch.empty_like(q)
            gated_branch_sum = _gated_sum_kernel() if x.is_cuda and not differentiable else None
            if gated_branch_sum is None:
                gates = self.gate[1](gate_logits[:, :3]).unsqueeze(-1).unsqueeze(-1)  # sigmoid: [N, 3, 1, 1]
        pieces: dict[int, Tensor] = {}

        injected = [block_topk] if isinstance(block_topk, Tensor) else block_topk
        if injected is not None and len(injected) != len(layout.elements):
            raise ValueError(f"block_topk has {len(injected)} entries for {len(layout.elements)} batch elements")
        selections: list = [None] * len(layout.elements)
        covered = 0
        for members in groups:
            blocks = layout.elements[members[0]].blocks
            # Elements with identical coordinates run as one call with their heads side by side:
            # element j owns query heads j*Hq.. and KV heads j*Hkv.., and the consecutive GQA grouping
            # keeps every query head on its own element's KV head, so this is exact. The Triton kernels
            # read the elements' rows in place ([n, m, H, D] strided views); the reference gets copies.
            token_rows = [layout.elements[e].token_rows for e in members]
            comp_rows = [layout.elements[e].comp_rows for e in members]
            views = None
            if len(members) > 1 and getattr(ops, "ELEMENT_VIEWS", False):   # kernels read the rows in place
                views = [_element_view(t, token_rows) for t in (q, k, v)] + \
                        [_element_view(t, comp_rows) for t in (ck, cv)]
                views = None if any(t is None for t in views) else views
            if views is None:
                views = [_side_by_side(t, token_rows) for t in (q, k, v)] + \
                        [_side_by_side(t, comp_rows) for t in (ck, cv)]
            q_m, k_m, v_m, ck_m, cv_m = views
            out_m, lse_m = ops.compressed_attention(q_m, ck_m, cv_m)
            given = [None if injected is None else injected[e] for e in members]
            if any(g is None for g in given):
                extra = {}
                if triton_ops and hasattr(ops, "block_members"):
                    member_table = blocks.kernel_aux.get(("members", x.device))
                    if member_table is None:
                        member_table = ops.block_members(blocks.comp_block_ids.to(x.device), blocks.num_blocks,
                                                         blocks.max_comp_per_block)
                        blocks.kernel_aux[("members", x.device)] = member_table
                    extra["members"] = member_table
                natural = ops.select_blocks(q_m, ck_m, lse_m, blocks.comp_block_ids, blocks.num_blocks, self.topk,
                                            **extra)
                combined = natural if all(g is None for g in given) else None
                natural = natural.split(hkv, dim=0)
                given = [natural[j] if g is None else g for j, g in enumerate(given)]
            else:
                combined = None
            given = [g.to(device=x.device, dtype=torch.int32) for g in given]
            if combined is None:
                combined = given[0] if len(given) == 1 else torch.cat(given, dim=0)
            sel_m = ops.selection_attention(q_m, k_m, v_m, combined, blocks.block_offsets)
            for j, (element, rows) in enumerate(zip(members, token_rows)):
                covered += rows.stop - rows.start
                selections[element] = given[j]
                if gated_window:   # summed by the window kernel below
                    continue
                heads = slice(j * hq, (j + 1) * hq)
                if differentiable:
                    g = gates[rows]
                    pieces[rows.start] = (out_m[:, heads] * g[:, 0] + sel_m[:, heads] * g[:, 1]
                                          + windowed[rows] * g[:, 2])
                elif gated_branch_sum is not None:   # one pass, same roundings as below
                    gated_branch_sum(out_m[:, heads], sel_m[:, heads], windowed[rows], gate_logits[rows],
                                     out=mixed[rows])
                else:
                    g = gates[rows]
                    target = mixed[rows]
                    torch.mul(out_m[:, heads], g[:, 0], out=target)
                    target.addcmul_(sel_m[:, heads], g[:, 1])
                    target.addcmul_(windowed[rows], g[:, 2])
        if gated_window:
            mixed = window_attention(q, k, v, partition,
                                     gated_sum=(out_m, sel_m, gate_logits, n_tokens // len(groups[0])))
        if covered != n_tokens:   # only empty batch elements are skipped; their rows are empty too
            raise RuntimeError("SSA: token rows not covered by the batch elements")
        if differentiable:
            mixed = torch.cat([pieces[start] for start in sorted(pieces)]) if pieces else mixed
        self.last_block_topk = [s for s in selections if s is not None] if self.record_selection else []
        return self.proj_o(mixed.reshape(n_tokens, hq * d))
