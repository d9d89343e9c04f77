"""Selection-attention branch of SSA: each query attends to the tokens of its own top-k blocks.

One program handles `TOKENS` consecutive (block-sorted, hence mostly same-block) query tokens and
the G query heads of one KV head: `TOKENS * G` rows per matrix product (64 rows for TOKENS = 4,
G = 16, a full Hopper tensor-core tile). It walks the union of the selected blocks of its tokens
(ascending, built by one segmented sort; duplicates are skipped), key tiles of `BLOCK_N` tokens per
block, and masks each (row, block) pair whose token did not select that block, so the result is
exact per-token top-k attention. TOKENS = 1 is the per-token layout of the official kernel.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .compressed import LOG2E, _last_dim_contiguous, online_softmax_tile


@triton.jit
def _attend_block(q, k_ptr, v_ptr, sel, block, start, end, kv_head, m_i, l_i, acc,
                  sk_n, sk_h, sv_n, sv_h, scale_log2, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online-softmax update of all rows with the keys [start, end) of `block`; rows whose token
    did not select the block are masked out."""
    dims = tl.arange(0, D)
    in_block = tl.max(tl.where(sel == block, 1, 0), axis=1) > 0                   # [M]
    for k0 in range(start, end, BLOCK_N):
        cols = k0 + tl.arange(0, BLOCK_N)
        col_ok = cols < end
        k = tl.load(k_ptr + cols[:, None] * sk_n + kv_head * sk_h + dims[None, :],
                    mask=col_ok[:, None], other=0.0)
        v = tl.load(v_ptr + cols[:, None] * sv_n + kv_head * sv_h + dims[None, :],
                    mask=col_ok[:, None], other=0.0)
        m_i, l_i, acc = online_softmax_tile(q, k, v, in_block[:, None] & col_ok[None, :],
                                            m_i, l_i, acc, scale_log2)
    return m_i, l_i, acc


@triton.jit
def _selection_fwd(q_ptr, k_ptr, v_ptr, o_ptr, sel_ptr, union_ptr, offsets_ptr, perm_ptr, ustart_ptr, uend_ptr,
                   n_tokens, topk, n_tiles,
                   sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, so_n, so_h, ss_h, ss_n,
                   scale_log2,
                   G: tl.constexpr, TOKENS: tl.constexpr, D: tl.constexpr, KP: tl.constexpr,
                   UNION: tl.constexpr, BLOCK_N: tl.constexpr, REORDER: tl.constexpr,
                   PREFETCH: tl.constexpr):
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    M: tl.constexpr = TOKENS * G
    rows = tl.arange(0, M)
    pos = pid * TOKENS + rows // G
    row_ok = pos < n_tokens
    if REORDER:   # tiles take tokens in the per-head order `perm` (grouping equal selections)
        tok = tl.load(perm_ptr + kv_head * n_tokens + pos, mask=row_ok, other=0)
    else:
        tok = pos
    head = kv_head * G + rows % G
    dims = tl.arange(0, D)
    q = tl.load(q_ptr + tok[:, None] * sq_n + head[:, None] * sq_h + dims[None, :],
                mask=row_ok[:, None], other=0.0)
    # each row's own selection (its token's top-k), used to mask blocks it did not select
    slots = tl.arange(0, KP)
    sel = tl.load(sel_ptr + kv_head * ss_h + tok[:, None] * ss_n + slots[None, :],
                  mask=row_ok[:, None] & (slots < topk)[None, :], other=-1)

    # running max of the raw logits; finite start (see _attend_block)
    m_i = tl.full([M], -1.0e30, tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)
    union_row = union_ptr + (kv_head * n_tiles + pid) * UNION
    if PREFETCH:
        # key ranges of the union entries precomputed on the host (duplicates and -1 padding are
        # empty ranges), so the next entry's three loads are independent of this entry's and are
        # issued one iteration ahead, overlapping this block's work
        start_row = ustart_ptr + (kv_head * n_tiles + pid) * UNION
        end_row = uend_ptr + (kv_head * n_tiles + pid) * UNION
        nxt_block = tl.load(union_row)
        nxt_start = tl.load(start_row)
        nxt_end = tl.load(end_row)
        for u in range(0, UNION):
            block = nxt_block
            start = nxt_start
            end = nxt_end
            ahead = tl.minimum(u + 1, UNION - 1)
            nxt_block = tl.load(union_row + ahead)
            nxt_start = tl.load(start_row + ahead)
            nxt_end = tl.load(end_row + ahead)
            if end > start:
                m_i, l_i, acc = _attend_block(q, k_ptr, v_ptr, sel, block, start, end, kv_head, m_i, l_i, acc,
                                              sk_n, sk_h, sv_n, sv_h, scale_log2, D, BLOCK_N)
    else:
        prev = tl.full([], -1, tl.int32)
        for u in range(0, UNION):
            block = tl.load(union_row + u)
            if (block >= 0) & (block != prev):
                start = tl.load(offsets_ptr + block)
                end = tl.load(offsets_ptr + block + 1)
                m_i, l_i, acc = _attend_block(q, k_ptr, v_ptr, sel, block, start, end, kv_head, m_i, l_i, acc,
                                              sk_n, sk_h, sv_n, sv_h, scale_log2, D, BLOCK_N)
            prev = block
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + tok[:, None] * so_n + head[:, None] * so_h + dims[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


def tile_union(block_topk: Tensor, tokens_per_program: int) -> Tensor:
    """int32 [Hkv, n_tiles, TOKENS * topk]: the selections of each tile's tokens, sorted ascending
    (-1 first, duplicates kept; the kernel skips both)."""
    hkv, n_tokens, topk = block_topk.shape
    n_tiles = triton.cdiv(n_tokens, tokens_per_program)
    pad = n_tiles * tokens_per_program - n_tokens
    sel = block_topk.to(torch.int32)
    if pad:
        sel = torch.cat([sel, sel.new_full((hkv, pad, topk), -1)], dim=1)
    if tokens_per_program == 1:
        return sel.contiguous()       # rows are already ascending with -1 padding at the end
    return torch.sort(sel.reshape(hkv, n_tiles, tokens_per_program * topk), dim=-1).values.contiguous()


def union_ranges(union: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
    """int32 key ranges [start, end) of the union entries; -1 padding and repeats get empty ranges."""
    blocks = union.long().clamp(min=0)
    start, end = offsets[blocks], offsets[blocks + 1]
    skip = union < 0
    skip[..., 1:] |= union[..., 1:] == union[..., :-1]
    end = torch.where(skip, start, end)
    return start.contiguous(), end.contiguous()


def selection_order(block_topk: Tensor, num_blocks: int | None = None) -> Tensor:
    """int32 [Hkv, N]: per KV head, the tokens sorted (stably) by their ascending selection read as
    a number (the first slots that fit in 62 bits), so tokens with equal selections are adjacent."""
    hkv, n_tokens, topk = block_topk.shape
    sel = block_topk.long()
    bits = max(1, int(num_blocks if num_blocks is not None else 1 << 16).bit_length())
    key = torch.zeros(hkv, n_tokens, dtype=torch.long, device=sel.device)
    for slot in range(min(topk, 62 // bits)):
        key = (key << bits) | (sel[..., slot] + 1)        # -1 padding -> 0
    return torch.sort(key, dim=1, stable=True).indices.to(torch.int32)


def selection_attention(q: Tensor, k: Tensor, v: Tensor, block_topk: Tensor, block_offsets: Tensor,
                        max_block_len: int | None = None, *, tokens_per_program: int | None = None,
                        block_n: int = 32, num_warps: int = 4, num_stages: int = 2,
                        reorder: bool = False, prefetch: bool = False) -> Tensor:
    """q [N, Hq, D]; k/v [N, Hkv, D] block-sorted; block_topk [Hkv, N, topk]; block_offsets
    [num_blocks + 1] -> out [N, Hq, D] in q's dtype. `max_block_len` is accepted for signature parity.

    reorder: tile tokens in `selection_order` instead of row order, so a tile's tokens share more
    of their blocks (less masked work; one sort per call; not yet timed on a GPU).
    prefetch: key ranges of the union entries computed on the host and loaded one entry ahead in
    the kernel (hides the dependent index -> offset -> key load chain; not yet timed on a GPU)."""
    n_tokens, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    topk = block_topk.shape[-1]
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    out = torch.empty_like(q)
    if n_tokens == 0:
        return out
    if tokens_per_program is None:
        tokens_per_program = max(1, 64 // group)
    sel = block_topk.to(torch.int32).contiguous()
    offsets = block_offsets.to(device=q.device, dtype=torch.int32).contiguous()
    if reorder and tokens_per_program > 1:
        perm = selection_order(sel, offsets.numel() - 1)
        union = tile_union(torch.gather(sel, 1, perm.long().unsqueeze(-1).expand_as(sel)), tokens_per_program)
    else:
        reorder, perm = False, sel              # perm unused
        union = tile_union(sel, tokens_per_program)
    n_tiles = union.shape[1]
    if prefetch:
        ustart, uend = union_ranges(union, offsets)
    else:
        ustart = uend = union                   # unused
    grid = (n_tiles, hkv)
    _selection_fwd[grid](q, k, v, out, sel, union, offsets, perm, ustart, uend, n_tokens, topk, n_tiles,
                         q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                         out.stride(0), out.stride(1), sel.stride(0), sel.stride(1),
                         LOG2E / math.sqrt(d),
                         G=group, TOKENS=tokens_per_program, D=d, KP=triton.next_power_of_2(topk),
                         UNION=union.shape[2], BLOCK_N=block_n, REORDER=reorder, PREFETCH=prefetch,
                         num_warps=num_warps, num_stages=num_stages)
    return out
