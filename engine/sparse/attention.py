"""Exact attention over variable-length segments of a flat token list.

`varlen_attention` takes q [Tq, Hq, D], k/v [Tk, Hkv, D] and cumulative segment offsets
(flash-attn's "varlen" convention) and attends every query segment to the matching key segment.
Hq must be a multiple of Hkv (grouped-query attention: query head h uses key/value head
h // (Hq // Hkv)). Softmax scale defaults to 1/sqrt(D).

Implementation: segments are cut into work items (long query segments are split along the queries,
which is exact because query rows are independent), grouped by similar padded length, gathered into
padded batches and run through `torch.nn.functional.scaled_dot_product_attention` with a key-padding
mask (omitted when no key padding is needed). Batches are sized so that their memory stays bounded.
Self-attention plans (identical query and key segments, e.g. windows) use few groups: the padded
lengths are chosen to minimise the padded work with at most `_MAX_SELF_GROUPS` groups.
Grouped-query attention folds the query heads of a KV head into the query sequence, so no key is
repeated. Everything data-dependent is decided when the plan is built; running a plan performs no
host-device synchronisation (only gathers, SDPA and an `index_copy_` with precomputed indices).

`window_partition` / `windowed_attention` implement the (shifted) window attention of the sparse VAE
and the sparse DiT window branch: voxel (x, y, z) belongs to window ((x, y, z) + shift) // window of its
batch element, and attention is full inside each window.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .tensor import SparseVoxels, linearize_coords

# Upper bound on the elements of one padded batch's score matrix (S * Hq * Pq * Pk) and of its gathered
# q/k/v tensors; keeps CPU runs (which materialise scores) and GPU runs memory-bounded.
_BATCH_ELEMENT_BUDGET = 1 << 26
# Same bound for CUDA, where the fused SDPA kernels never materialise scores: it only counts the gathered
# q/k/v/output elements of one call.
_CUDA_GATHER_BUDGET = 1 << 28
# Longest query piece a segment is split into.
_MAX_QUERY_PIECE = 8192
# Most padded groups of a self-attention plan (fewer, larger SDPA calls).
_MAX_SELF_GROUPS = 4


def _round_up_length(lengths: Tensor) -> Tensor:
    """Bucket id for grouping: lengths rounded up to a step of 1/4 of their power of two (<= 25% padding)."""
    lengths = lengths.clamp(min=1)
    exponent = torch.floor(torch.log2(lengths.double())).long()
    step = torch.clamp(2 ** (exponent - 2), min=1)
    return ((lengths + step - 1) // step) * step


@dataclass
class PaddedGroup:
    """Work items padded to common lengths (Pq, Pk); every index tensor already points at token rows."""

    q_rows: Tensor             # int64 [S, Pq]: query row of each padded position (padding repeats a row)
    k_rows: Tensor             # int64 [S, Pk]
    q_valid: Tensor            # bool [S, Pq]: real (not padding) query positions
    k_valid: Tensor | None     # bool [S, Pk], or None when no item needs key padding
    # output row of each padded query position for a given output row count T: the query row, or the
    # scratch row T for padding (memoised per T; built without host synchronisation)
    _destinations: dict = field(default_factory=dict, repr=False)

    @property
    def num_items(self) -> int:
        return self.q_rows.shape[0]

    def destinations(self, num_rows: int) -> Tensor:
        dest = self._destinations.get(num_rows)
        if dest is None:
            dest = torch.where(self.q_valid, self.q_rows, torch.full_like(self.q_rows, num_rows))
            self._destinations[num_rows] = dest
        return dest


@dataclass
class AttentionPlan:
    """Work items of a varlen attention call grouped into padded batches."""

    groups: list[PaddedGroup] = field(default_factory=list)


def build_attention_plan(cu_q: Tensor, cu_k: Tensor, max_query_piece: int | None = None,
                         row_map: Tensor | None = None) -> AttentionPlan:
    """Group the (query segment, key segment) pairs given by cumulative offsets into padded batches.

    With `row_map`, segment position i stands for token row row_map[i] (for queries and keys alike);
    windows use it so that tokens never have to be copied into window order.
    """
    if max_query_piece is None:
        max_query_piece = _MAX_QUERY_PIECE
    cu_q = cu_q.long()
    cu_k = cu_k.long()
    q_start, q_len = cu_q[:-1], cu_q[1:] - cu_q[:-1]
    k_start, k_len = cu_k[:-1], cu_k[1:] - cu_k[:-1]
    # segments without queries contribute nothing; segments without keys give zero output
    keep = (q_len > 0) & (k_len > 0)
    q_start, q_len, k_start, k_len = q_start[keep], q_len[keep], k_start[keep], k_len[keep]
    plan = AttentionPlan()
    if q_start.numel() == 0:
        return plan
    # split long query segments into pieces of at most max_query_piece rows
    pieces = (q_len + max_query_piece - 1) // max_query_piece
    if int(pieces.max()) > 1:
        seg = torch.repeat_interleave(torch.arange(q_len.numel(), device=q_len.device), pieces)
        first_piece = torch.cumsum(pieces, 0) - pieces
        piece_idx = torch.arange(seg.numel(), device=seg.device) - first_piece[seg]
        piece_start = q_start[seg] + piece_idx * max_query_piece
        piece_len = torch.minimum(q_len[seg] - piece_idx * max_query_piece,
                                  torch.full_like(piece_idx, max_query_piece))
        q_start, q_len, k_start, k_len = piece_start, piece_len, k_start[seg], k_len[seg]
    if torch.equal(q_start, k_start) and torch.equal(q_len, k_len):
        # self-attention (windows): few groups, padded lengths chosen to minimise the padded work
        bucket_key = _self_attention_buckets(q_len, _MAX_SELF_GROUPS)
    else:
        q_bucket = _round_up_length(q_len)
        k_bucket = _round_up_length(k_len)
        bucket_key = q_bucket * (int(k_bucket.max()) + 1) + k_bucket
    unique_keys, group_of_item = torch.unique(bucket_key, return_inverse=True)
    order = torch.argsort(group_of_item, stable=True)
    sizes = torch.bincount(group_of_item, minlength=unique_keys.numel()).tolist()
    first = 0
    for size in sizes:
        items = order[first:first + size]
        first += size
        plan.groups.append(_pad_items(q_start[items], q_len[items], k_start[items], k_len[items], row_map))
    return plan


def _self_attention_buckets(lengths: Tensor, max_groups: int) -> Tensor:
    """Group id (ascending with length) of each item so that at most `max_groups` groups minimise the
    padded attention work sum(items * padded_length^2) (exact dynamic programme over distinct lengths)."""
    lengths_cpu = lengths.cpu()
    if torch.unique(lengths_cpu).numel() > 512:   # keep the O(distinct^2) tables small
        lengths_cpu = _round_up_length(lengths_cpu)
    values, inverse, counts = torch.unique(lengths_cpu, return_inverse=True, return_counts=True)
    lens = values.double()
    num = lens.numel()
    groups = min(max_groups, num)
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(counts.double(), 0)])
    # cost[i, j]: items with the distinct lengths i..j padded to lens[j] (inf where i > j)
    items = prefix[1:][None, :] - prefix[:-1][:, None]
    cost = torch.where(items > 0, items * lens[None, :] ** 2, torch.full_like(items, float("inf")))
    best = cost[0].clone()                         # best[j]: lengths 0..j in one group
    choice = [torch.zeros(num, dtype=torch.long)]  # start index of the last group, per group count
    for _ in range(1, groups):
        # best over splits: lengths 0..i-1 in g groups, i..j in one more
        candidate = torch.cat([torch.full((1, num), float("inf"), dtype=torch.float64),
                               best[:-1, None] + cost[1:]], dim=0)
        candidate = torch.minimum(candidate, torch.cat([cost[:1], torch.full((num - 1, num), float("inf"),
                                                                             dtype=torch.float64)]))
        best, start = candidate.min(dim=0)
        choice.append(start)
    # walk back from the last distinct length with the full number of groups
    boundaries, j = [], num - 1
    for level in range(groups - 1, -1, -1):
        start = int(choice[level][j])
        boundaries.append(start)
        j = start - 1
        if j < 0:
            break
    group_of_length = torch.zeros(num, dtype=torch.long)
    for start in sorted(boundaries)[1:]:
        group_of_length[start:] += 1
    return group_of_length[inverse].to(lengths.device)


def _pad_items(q_start: Tensor, q_len: Tensor, k_start: Tensor, k_len: Tensor,
               row_map: Tensor | None) -> PaddedGroup:
    device = q_start.device
    pq, pk = int(q_len.max()), int(k_len.max())
    q_arange = torch.arange(pq, device=device)
    k_arange = torch.arange(pk, device=device)
    q_valid = q_arange[None, :] < q_len[:, None]
    k_valid = k_arange[None, :] < k_len[:, None]
    # padded positions read the segment's first row (any valid row would do: results are dropped/masked)
    q_rows = torch.where(q_valid, q_start[:, None] + q_arange[None, :], q_start[:, None])
    k_rows = torch.where(k_valid, k_start[:, None] + k_arange[None, :], k_start[:, None])
    if row_map is not None:
        q_rows, k_rows = row_map[q_rows], row_map[k_rows]
    needs_key_mask = bool((k_len != pk).any())
    return PaddedGroup(q_rows, k_rows, q_valid, k_valid if needs_key_mask else None)


def _attend_group(q: Tensor, k: Tensor, v: Tensor, out: Tensor, group: PaddedGroup,
                  scale: float | None) -> None:
    """Attend one padded group and write its query rows of `out` ([T+1, Hq, D], row T is scratch)."""
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k.shape[1]
    heads_per_kv = num_q_heads // num_kv_heads
    pq, pk = group.q_rows.shape[1], group.k_rows.shape[1]
    if q.is_cuda:   # fused kernels: only the gathered tensors take memory
        per_item = 2 * num_q_heads * pq * head_dim + 2 * pk * num_kv_heads * head_dim
        items_per_batch = max(1, _CUDA_GATHER_BUDGET // per_item)
    else:
        per_item = num_q_heads * pq * max(pk, head_dim) + 3 * pk * num_q_heads * head_dim
        items_per_batch = max(1, _BATCH_ELEMENT_BUDGET // per_item)
    dest = group.destinations(out.shape[0] - 1)
    for first in range(0, group.num_items, items_per_batch):
        sl = slice(first, first + items_per_batch)
        q_rows, k_rows = group.q_rows[sl], group.k_rows[sl]
        items = q_rows.shape[0]
        # [S, Pq, Hkv, G, D] -> [S, Hkv, Pq*G, D]: the G query heads of a KV head are extra query rows
        qb = q[q_rows].view(items, pq, num_kv_heads, heads_per_kv, head_dim).transpose(1, 2)
        qb = qb.reshape(items, num_kv_heads, pq * heads_per_kv, head_dim)
        kb = k[k_rows].transpose(1, 2)                                 # [S, Hkv, Pk, D]
        vb = v[k_rows].transpose(1, 2)
        mask = None if group.k_valid is None else group.k_valid[sl][:, None, None, :]
        ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale)
        ob = ob.view(items, num_kv_heads, pq, num_q_heads // num_kv_heads, head_dim).transpose(1, 2)
        out.index_copy_(0, dest[sl].reshape(-1), ob.reshape(items * pq, num_q_heads, head_dim))


def run_attention_plan(q: Tensor, k: Tensor, v: Tensor, plan: AttentionPlan,
                       scale: float | None = None) -> Tensor:
    """Execute a plan built by `build_attention_plan` (rows not covered by any segment get zeros)."""
    _check_heads(q, k, v)
    out = q.new_zeros(q.shape[0] + 1, *q.shape[1:])   # last row: scratch for padded query positions
    for group in plan.groups:
        _attend_group(q, k, v, out, group, scale=scale)
    return out[:q.shape[0]]


def _check_heads(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError("attention expects q [T, Hq, D], k/v [T, Hkv, D]")
    if k.shape != v.shape or q.shape[2] != k.shape[2]:
        raise ValueError(f"shape mismatch q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{q.shape[1]} query heads is not a multiple of {k.shape[1]} key/value heads")


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor,
                     max_q: int | None = None, max_k: int | None = None,
                     scale: float | None = None) -> Tensor:
    """Full attention of each query segment [cu_q[i], cu_q[i+1]) to key segment [cu_k[i], cu_k[i+1]).

    `max_q`/`max_k` are accepted for flash-attn API compatibility; the lengths come from cu_*.
    """
    return run_attention_plan(q, k, v, build_attention_plan(cu_q, cu_k), scale=scale)


# ====================================================================== windows
@dataclass
class WindowPartition:
    """Tokens grouped by window: `order` lists token rows window by window."""

    order: Tensor          # int64 [N]: rows of the tokens in window order
    cu_seqlens: Tensor     # int32 [W+1]: window boundaries within `order`
    max_len: int           # largest window population
    plan: AttentionPlan    # padded-batch plan over the windows (self-attention: same q/k segments)

    @property
    def num_windows(self) -> int:
        return self.cu_seqlens.numel() - 1


def _as_triple(value: int | tuple[int, int, int] | list[int]) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    triple = tuple(int(x) for x in value)
    if len(triple) != 3:
        raise ValueError(f"expected an int or 3 ints, got {value!r}")
    return triple  # type: ignore[return-value]


def window_partition(voxels: SparseVoxels | Tensor, window: int | tuple[int, int, int],
                     shift: int | tuple[int, int, int] = 0) -> WindowPartition:
    """Group voxels by window ((x, y, z) + shift) // window within each batch element.

    Pass a SparseVoxels to cache the result in its cache (per window and shift), or a coordinate
    tensor [N, 4] for an uncached computation.
    """
    window_t, shift_t = _as_triple(window), _as_triple(shift)
    cache = None
    if isinstance(voxels, SparseVoxels):
        cache = voxels.cache
        cache_key = ("window_partition", window_t, shift_t)
        cached = cache.get(cache_key)
        if cached is not None:
            return cached
        coords = voxels.coords
    else:
        coords = voxels
    device = coords.device
    c = coords.long()
    if c.shape[0] == 0:
        empty = torch.zeros(1, dtype=torch.int32, device=device)
        partition = WindowPartition(torch.zeros(0, dtype=torch.long, device=device), empty, 0,
                                    AttentionPlan())
    else:
        win = torch.empty_like(c)
        win[:, 0] = c[:, 0]
        for axis in range(3):
            win[:, axis + 1] = torch.div(c[:, axis + 1] + shift_t[axis], window_t[axis], rounding_mode="floor")
        extent = int(win.max()) + 1
        keys = linearize_coords(win, extent)
        sorted_keys, order = torch.sort(keys, stable=True)
        _, counts = torch.unique_consecutive(sorted_keys, return_counts=True)
        cu = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=device)
        cu[1:] = torch.cumsum(counts, 0)
        partition = WindowPartition(order, cu, int(counts.max()), build_attention_plan(cu, cu, row_map=order))
    if cache is not None:
        cache[cache_key] = partition
    return partition


def windowed_attention(q: Tensor, k: Tensor, v: Tensor, partition: WindowPartition,
                       scale: float | None = None) -> Tensor:
    """Full attention inside each window. q [N, Hq, D], k/v [N, Hkv, D] in the voxels' row order."""
    return run_attention_plan(q, k, v, partition.plan, scale=scale)
