"""Selection-attention branch of SSA: each query attends to the tokens of its own top-k blocks.

One program handles `TOKENS` consecutive (block-sorted, hence mostly same-block) query tokens and
the G query heads of one KV head: `TOKENS * G` rows per matrix product (64 rows for TOKENS = 4,
G = 16, a full Hopper tensor-core tile). TOKENS = 1 is the per-token layout of the official kernel.

The program first builds its tile's entry table from the tile's `TOKENS * topk` selections,
deduplicated: per live slot the key range of its block, a token bitmask (bit j: the tile's token j
selected it) and the cumulative count of `BLOCK_N`-key tiles (repeats and -1 padding get none).
Then one flat loop over the tile's key tiles (slot found from the cumulative counts held in
registers, so no load feeds the next iteration's addresses and Triton pipelines the K/V loads).
Rows whose token did not select the block are masked per row (their max is kept and their exponent
offset is +inf, so p = 0 and alpha = 1); only a block's last, partial key tile also masks columns.
The result is exact per-token top-k attention.

Where a tile's tokens selected mostly different blocks (random weights do that; trained ones mostly
do not), the union wastes most rows of every iteration. By default the shared-tile pass (MODE 1)
leaves such tiles, flagged, to a second launch of the same kernel with one token and one warp per
program (MODE 2: G rows, only the token's own blocks), which skips the tiles not flagged.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .compressed import LOG2E, _by_element, _group, grouped_query_rows


@triton.jit
def _selection_fwd(q_ptr, k_ptr, v_ptr, o_ptr, sel_ptr, offsets_ptr, tab_ptr, flag_ptr, n_tokens, topk, n_tiles,
                   n_flag_tiles, hkv_e,
                   sq_n, sq_h, sq_b, sk_n, sk_h, sk_b, sv_n, sv_h, sv_b, so_n, so_h, ss_h, ss_n,
                   scale_log2, split,
                   G: tl.constexpr, TOKENS: tl.constexpr, D: tl.constexpr, U: tl.constexpr,
                   KP: tl.constexpr, BLOCK_N: tl.constexpr, CH: tl.constexpr, MODE: tl.constexpr,
                   PARENT: tl.constexpr):
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    if MODE == 2:   # per-token pass: only the tokens of tiles that the shared pass left
        if tl.load(flag_ptr + kv_head * n_flag_tiles + pid // PARENT) == 0:
            return
    M: tl.constexpr = TOKENS * G
    j = tl.arange(0, M) // G                                # each row's token within the tile
    dims = tl.arange(0, D)
    # inputs of batch element `elem` (its KV head `local`); selections and output: combined heads
    q, tok, head, row_ok, elem, local = grouped_query_rows(q_ptr, n_tokens, hkv_e, sq_n, sq_h, sq_b, G, TOKENS, D)

    # ---- entry table of the tile: its TOKENS * topk selections, deduplicated, in U slots (slot a:
    # token a // KP, position a % KP); built in chunks of CH slots ([CH, U] comparisons keep the
    # registers small for large TOKENS * topk)
    a = tl.arange(0, U)
    ja = a // KP                                            # token of slot a within the tile
    sel_row = sel_ptr + kv_head * ss_h
    blk = tl.load(sel_row + (pid * TOKENS + ja) * ss_n + a % KP,
                  mask=(ja < TOKENS) & (pid * TOKENS + ja < n_tokens) & (a % KP < topk), other=-1)
    # per-slot scratch, read back by the loop: key tile i (slot e) starts at kbase[e] + i * BLOCK_N
    row = tab_ptr + (kv_head * n_tiles + pid) * (4 * U)
    total = tl.full([], 0, tl.int32)
    own = tl.full([], 0, tl.int32)    # key tiles of the tokens' own selections (repeats included)
    for c in tl.static_range(U // CH):
        r = c * CH + tl.arange(0, CH)
        jr = r // KP
        blk_r = tl.load(sel_row + (pid * TOKENS + jr) * ss_n + r % KP,
                        mask=(jr < TOKENS) & (pid * TOKENS + jr < n_tokens) & (r % KP < topk), other=-1)
        same = blk_r[:, None] == blk[None, :]               # [CH, U]
        # bit j: token j selected the block (in any of its slots)
        hit = tl.max(tl.reshape(same.to(tl.int32), [CH, U // KP, KP]), axis=2)       # [CH, U // KP]
        bits = tl.sum(hit << tl.arange(0, U // KP)[None, :], axis=1)
        repeat = tl.sum(tl.where(same & (a[None, :] < r[:, None]), 1, 0), axis=1) > 0
        first = (blk_r >= 0) & ~repeat                      # one live slot per selected block
        start = tl.load(offsets_ptr + blk_r, mask=blk_r >= 0, other=0)
        end = tl.load(offsets_ptr + blk_r + 1, mask=blk_r >= 0, other=0)
        own += tl.sum((end - start + BLOCK_N - 1) // BLOCK_N, axis=0)
        n_key_tiles = tl.where(first, (end - start + BLOCK_N - 1) // BLOCK_N, 0)
        cum = total + tl.cumsum(n_key_tiles, axis=0)        # key tiles through slot r
        total += tl.sum(n_key_tiles, axis=0)
        tl.store(row + r, start - (cum - n_key_tiles) * BLOCK_N)
        tl.store(row + U + r, end)
        tl.store(row + 2 * U + r, bits)
        if U > CH:
            tl.store(row + 3 * U + r, cum)
    tl.debug_barrier()                                      # the stores are visible to the whole program
    if U > CH:   # else the one chunk's cum is already the whole [U]
        cum = tl.load(row + 3 * U + a)

    # ---- whether this pass computes the tile (MODE 0 and 2: yes)
    active = total >= 0
    if MODE == 1:   # shared-tile pass: tiles whose union costs more than `split` x their own selections
        # are left to the per-token pass (MODE 2), which reads the flag
        active = total.to(tl.float32) <= split * own.to(tl.float32)
        tl.store(flag_ptr + kv_head * n_flag_tiles + pid, tl.where(active, 0, 1).to(tl.int8))
    run = tl.where(active, 1, 0)        # (an int: the interpreter mistypes the comparison)
    total = total * run

    # ---- attention over the key tiles, one flat loop
    k_head = k_ptr + elem * sk_b + local * sk_h
    v_head = v_ptr + elem * sv_b + local * sv_h
    # running max of the raw logits; finite start, so rows masked so far keep alpha = 1
    m_i = tl.full([M], -1.0e30, tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)
    for i in range(0, total):
        # slot of key tile i: the first with cum > i (slots without key tiles are skipped);
        # computed from registers, so the loads below do not wait on the previous iteration
        e = tl.sum((cum <= i).to(tl.int32), axis=0)
        k0 = tl.load(row + e) + i * BLOCK_N
        k_end = tl.load(row + U + e)
        e_bits = tl.load(row + 2 * U + e)
        cols = k0 + tl.arange(0, BLOCK_N)
        col_ok = cols < k_end
        k = tl.load(k_head + cols[:, None] * sk_n + dims[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(v_head + cols[:, None] * sv_n + dims[None, :], mask=col_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k))
        if k0 + BLOCK_N > k_end:   # only a block's last key tile can be partial (masking every
            s = tl.where(col_ok[None, :], s, float("-inf"))   # tile measured 7-12 % slower)
        on = ((e_bits >> j) & 1) != 0                       # the row's token selected this block
        m_new = tl.where(on, tl.maximum(m_i, tl.max(s, axis=1)), m_i)
        alpha = tl.exp2((m_i - m_new) * scale_log2)
        offset = tl.where(on, m_new * scale_log2, float("inf"))     # rows masked: p = exp2(-inf) = 0
        p = tl.exp2(s * scale_log2 - offset[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + tok[:, None] * so_n + head[:, None] * so_h + dims[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & (run > 0))


# Shared tiles cost a key-tile iteration for every block of their union, per-token programs (one
# warp, G rows) one iteration per own block at about 0.44x the cost (H100, v1.1: 0.68 vs 1.43 ms on
# 18k tokens with unrelated selections, 0.65 vs 0.56 ms with spatially coherent ones). A shared tile
# whose union needs more than this many times its tokens' own key tiles goes to the per-token pass.
DEFAULT_SPLIT = 0.45


def selection_attention(q: Tensor, k: Tensor, v: Tensor, block_topk: Tensor, block_offsets: Tensor,
                        max_block_len: int | None = None, *, tokens_per_program: int | None = None,
                        block_n: int = 32, num_warps: int = 4, num_stages: int = 3,
                        split: float | None = None) -> Tensor:
    """q [N, Hq, D]; k/v [N, Hkv, D] block-sorted; block_topk [Hkv, N, topk]; block_offsets
    [num_blocks + 1] -> out [N, Hq, D] in q's dtype. `max_block_len` is accepted for signature parity.
    Also q [N, E, Hq, D], k/v [N, E, Hkv, D] (E elements on the same blocks side by side, read in
    place) with block_topk [E * Hkv, N, topk] -> out [N, E * Hq, D].

    Tiles of `tokens_per_program` tokens (default: 64 rows). `split`: tiles whose tokens select
    mostly different blocks (union > split x own key tiles) are computed by a second, per-token
    pass instead (default `DEFAULT_SPLIT` when `tokens_per_program` is not given, else none)."""
    q, hq, hq_e, sq_b = _by_element(q)
    k, hkv, hkv_e, sk_b = _by_element(k)
    v, _, _, sv_b = _by_element(v)
    n_tokens, d = q.shape[0], q.shape[-1]
    group = _group(hq, hkv, hq_e, hkv_e)
    out = q.new_empty(n_tokens, hq, d)
    if n_tokens == 0:
        return out
    if tokens_per_program is None:
        tokens_per_program = max(1, min(16, 64 // group))
        split = DEFAULT_SPLIT if split is None else split
    if tokens_per_program > 31:
        raise ValueError("tokens_per_program must be below 32 (int32 token bitmask)")
    if tokens_per_program == 1 or group < 16:   # per-token programs need G >= 16 rows (tl.dot)
        split = None
    sel = block_topk.to(torch.int32).contiguous()
    offsets = block_offsets.to(device=q.device, dtype=torch.int32).contiguous()
    common = (q, k, v, out, sel, offsets)
    strides = (q.stride(0), q.stride(-2), sq_b, k.stride(0), k.stride(-2), sk_b, v.stride(0), v.stride(-2), sv_b,
               out.stride(0), out.stride(1), sel.stride(0), sel.stride(1), LOG2E / math.sqrt(d))
    topk = sel.shape[-1]

    def launch(tokens: int, mode: int, flags: Tensor, n_flag_tiles: int, warps: int):
        n_tiles = triton.cdiv(n_tokens, tokens)
        kp = triton.next_power_of_2(max(1, topk))
        u = triton.next_power_of_2(tokens * kp)
        scratch = torch.empty(hkv * n_tiles * 4 * u, dtype=torch.int32, device=q.device)
        _selection_fwd[(n_tiles, hkv)](*common, scratch, flags, n_tokens, topk, n_tiles, n_flag_tiles, hkv_e,
                                       *strides, 0.0 if split is None else float(split),
                                       G=group, TOKENS=tokens, D=d, U=u, KP=kp, BLOCK_N=block_n,
                                       CH=min(u, max(1, 4096 // u)), MODE=mode, PARENT=tokens_per_program,
                                       num_warps=warps, num_stages=num_stages)

    if split is None:
        launch(tokens_per_program, 0, sel, 0, num_warps)
        return out
    n_shared = triton.cdiv(n_tokens, tokens_per_program)
    flags = torch.empty(hkv, n_shared, dtype=torch.int8, device=q.device)
    launch(tokens_per_program, 1, flags, n_shared, num_warps)
    launch(1, 2, flags, n_shared, 1)
    return out
