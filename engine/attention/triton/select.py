"""Block scoring and top-k selection without materialising the [Hkv, N, num_blocks] score matrix.

The selection blocks are visited in chunks of `BLOCK_B`; for each chunk the compressed keys of its
blocks are gathered through a padded table `members[num_blocks, R]` (the compressed tokens of each
selection block, -1 padded; R = 1 when compression block == selection block), the probabilities
exp(q.k/sqrt(D) - lse) are recomputed, summed over the G query heads of the KV head and over each
block's R compressed tokens, and merged into a running top list per token kept in registers.

Two scoring layouts (same merge and output code):
* "rows": TOKENS tokens x G heads are the rows of one product per chunk (64 rows for TOKENS = 4,
  G = 16), then regrouped per token by reshape + sum (regrouping and the merge dominate its
  instruction count).
* "heads" (default up to top-8): TOKENS >= 16 tokens are the rows; one product per (head, member
  slot) accumulates directly into the [TOKENS, BLOCK_B] block scores (no regrouping), and the
  merge cost is shared by 32-64 tokens x BLOCK_B blocks.
Two merges: "extract" rebuilds the sorted top-W list (W = next power of two >= topk) from list +
chunk, only when the chunk beats some token's W-th best; "replace" inserts only the chunk's winners,
each over the current minimum of an unsorted list of topk live slots; "sort" merges by bitonic
networks (tl.topk) instead of W dependent reductions.

Ordering key: score (fp32, >= 0, so its bit pattern orders like the value) in the high 32 bits and
`2^31 - 1 - block` in the low 32 bits, so equal scores prefer the lower block index; empty slots
hold -1, below every real key.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .compressed import LOG2E, _by_element, _group, grouped_query_rows


@triton.jit
def _chunk_keys(score, b0, num_blocks, BLOCK_B: tl.constexpr):
    """Ordering keys [T, BLOCK_B] of a chunk of block scores (see the module docstring)."""
    blocks = b0 + tl.arange(0, BLOCK_B)
    key = (score.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (2147483647 - blocks).to(tl.int64)[None, :]
    return tl.where((blocks < num_blocks)[None, :], key, -1)


@triton.jit
def _init_best(topk, T: tl.constexpr, W: tl.constexpr, REPLACE: tl.constexpr):
    slot = tl.arange(0, W)
    if REPLACE:
        # unsorted list of exactly `topk` live slots; slots >= topk are frozen above every key
        best = tl.where((slot < topk)[None, :], tl.full([T, W], -1, tl.int64),
                        tl.full([T, W], 9223372036854775807, tl.int64))
    else:
        best = tl.full([T, W], -1, tl.int64)
    return best


@triton.jit
def _merge(best, key, topk, T: tl.constexpr, W: tl.constexpr, REPLACE: tl.constexpr,
           SORT: tl.constexpr):
    """Running top list `best` [T, W] merged with a chunk's keys [T, B]."""
    slot = tl.arange(0, W)
    # a token can only gain from keys above its W-th (REPLACE: topk-th) best
    bar = tl.min(best, axis=1)
    if REPLACE:
        # insert the chunk's winners largest first, each replacing the current minimum; the loop
        # runs as often as the busiest token of the tile needs (<= topk)
        cand = tl.where(key > bar[:, None], key, -1)
        n_ins = tl.minimum(tl.max(tl.sum((cand >= 0).to(tl.int32), axis=1)), topk)
        for _ in range(0, n_ins):
            x = tl.max(cand, axis=1)
            low = tl.min(best, axis=1)
            pos = tl.argmin(best, axis=1)
            put = (slot[None, :] == pos[:, None]) & (x > low)[:, None]
            best = tl.where(put, x[:, None], best)
            cand = tl.where(cand == x[:, None], -1, cand)
    elif SORT:
        if tl.max((key > bar[:, None]).to(tl.int32)) > 0:
            # sorting networks only (no dependent reductions): the chunk's top W, then the top W
            # of (running W, chunk W); both lists come out sorted descending
            top = tl.topk(key, W, dim=1)
            both = tl.reshape(tl.join(best, top), [T, 2 * W])
            best = tl.topk(both, W, dim=1)
    else:
        if tl.max((key > bar[:, None]).to(tl.int32)) > 0:
            # extract the W largest keys of (running list, chunk) one by one; keys are unique
            merged = tl.full([T, W], -1, tl.int64)
            for j in tl.static_range(W):
                top = tl.maximum(tl.max(best, axis=1), tl.max(key, axis=1))
                merged = tl.where(slot[None, :] == j, top[:, None], merged)
                best = tl.where(best == top[:, None], -1, best)
                key = tl.where(key == top[:, None], -1, key)
            best = merged
    return best


@triton.jit
def _store_selection(best, out_ptr, toks, n_tokens, topk, W: tl.constexpr):
    """Keep the `topk` best real entries (sorted list: the first topk slots; REPLACE: the live
    slots, frozen ones sit at slot >= topk) and write each at its rank among them, i.e. in
    ascending block order; the output is pre-filled with -1 padding."""
    slot = tl.arange(0, W)
    block = (2147483647 - (best & 0xFFFFFFFF)).to(tl.int32)
    keep = (best >= 0) & (slot < topk)[None, :]
    block = tl.where(keep, block, 2147483647)
    rank = tl.sum((block[:, None, :] < block[:, :, None]).to(tl.int32), axis=2)
    tl.store(out_ptr + toks[:, None] + rank, block, mask=(toks < n_tokens)[:, None] & keep)


@triton.jit
def _select_rows_fwd(q_ptr, k_ptr, lse_ptr, members_ptr, out_ptr,
                     n_tokens, num_blocks, topk, hkv_e,
                     sq_n, sq_h, sq_b, sk_n, sk_h, sk_b, so_h, so_n,
                     scale_log2,
                     G: tl.constexpr, TOKENS: tl.constexpr, D: tl.constexpr, R: tl.constexpr,
                     BLOCK_B: tl.constexpr, W: tl.constexpr, REPLACE: tl.constexpr,
                     SORT: tl.constexpr):
    """"rows" scoring: the TOKENS x G (token, head) pairs are the rows of one product per chunk."""
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    dims = tl.arange(0, D)
    # inputs of batch element `elem` (its KV head `local`); lse and outputs use the combined heads
    q, tok, head, row_ok, elem, local = grouped_query_rows(q_ptr, n_tokens, hkv_e, sq_n, sq_h, sq_b, G, TOKENS, D)
    k_ptr += elem * sk_b + local * sk_h
    lse2 = tl.load(lse_ptr + head * n_tokens + tok, mask=row_ok, other=0.0) * 1.4426950408889634

    cols = tl.arange(0, BLOCK_B * R)
    best = _init_best(topk, TOKENS, W, REPLACE)
    for b0 in range(0, num_blocks, BLOCK_B):
        col_block = b0 + cols // R
        member = tl.load(members_ptr + col_block * R + cols % R, mask=col_block < num_blocks, other=-1)
        col_ok = member >= 0
        k = tl.load(k_ptr + member[:, None] * sk_n + dims[None, :],
                    mask=col_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale_log2 - lse2[:, None]
        p = tl.where(col_ok[None, :], tl.exp2(s), 0.0)                          # [M, B*R]
        p = tl.sum(tl.reshape(p, [TOKENS, G, BLOCK_B * R]), axis=1)            # sum over heads
        score = tl.sum(tl.reshape(p, [TOKENS, BLOCK_B, R]), axis=2)            # sum per block
        best = _merge(best, _chunk_keys(score, b0, num_blocks, BLOCK_B), topk, TOKENS, W, REPLACE,
                      SORT)
    toks = pid * TOKENS + tl.arange(0, TOKENS)
    _store_selection(best, out_ptr + kv_head * so_h, toks * so_n, n_tokens * so_n, topk, W)


@triton.jit
def _select_heads_fwd(q_ptr, k_ptr, lse_ptr, members_ptr, out_ptr,
                      n_tokens, num_blocks, topk, hkv_e,
                      sq_n, sq_h, sq_b, sk_n, sk_h, sk_b, so_h, so_n,
                      scale_log2,
                      G: tl.constexpr, TOKENS: tl.constexpr, D: tl.constexpr, R: tl.constexpr,
                      BLOCK_B: tl.constexpr, W: tl.constexpr, REPLACE: tl.constexpr,
                     SORT: tl.constexpr):
    """"heads" scoring: rows are tokens only (TOKENS >= 16); one product per (head, member slot)
    accumulates straight into the [TOKENS, BLOCK_B] block scores, so no reshape/regrouping."""
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    toks = pid * TOKENS + tl.arange(0, TOKENS)
    tok_ok = toks < n_tokens
    dims = tl.arange(0, D)
    blocks = tl.arange(0, BLOCK_B)
    elem = kv_head // hkv_e            # inputs of batch element `elem`, its KV head `local`
    local = kv_head - elem * hkv_e
    q_ptr += elem * sq_b
    k_ptr += elem * sk_b + local * sk_h
    best = _init_best(topk, TOKENS, W, REPLACE)
    for b0 in range(0, num_blocks, BLOCK_B):
        block_ok = b0 + blocks < num_blocks
        score = tl.zeros([TOKENS, BLOCK_B], tl.float32)
        for r in range(0, R):
            member = tl.load(members_ptr + (b0 + blocks) * R + r, mask=block_ok, other=-1)
            col_ok = member >= 0
            k = tl.load(k_ptr + member[:, None] * sk_n + dims[None, :],
                        mask=col_ok[:, None], other=0.0)
            part = tl.zeros([TOKENS, BLOCK_B], tl.float32)
            for g in range(0, G):
                head = kv_head * G + g
                q = tl.load(q_ptr + toks[:, None] * sq_n + (local * G + g) * sq_h + dims[None, :],
                            mask=tok_ok[:, None], other=0.0)
                lse2 = tl.load(lse_ptr + head * n_tokens + toks, mask=tok_ok, other=0.0) * 1.4426950408889634
                part += tl.exp2(tl.dot(q, tl.trans(k)) * scale_log2 - lse2[:, None])
            # absent members (zero keys) gave finite junk: drop it once per slot, not per head
            score += tl.where(col_ok[None, :], part, 0.0)
        best = _merge(best, _chunk_keys(score, b0, num_blocks, BLOCK_B), topk, TOKENS, W, REPLACE,
                      SORT)
    _store_selection(best, out_ptr + kv_head * so_h, toks * so_n, n_tokens * so_n, topk, W)


def block_members(comp_block_ids: Tensor, num_blocks: int, max_members: int | None = None) -> Tensor:
    """int32 [num_blocks, R]: the compressed tokens of each selection block, -1 padded.

    R is a power of two >= the largest member count; pass `max_members` to avoid a host sync when the
    compressed tokens outnumber the blocks (v1.0: at most (8/4)^3 = 8).
    """
    ids = comp_block_ids.to(torch.long)
    n_comp = ids.numel()
    device = ids.device
    if n_comp == num_blocks and max_members is None:
        max_members = 1          # one compressed token per block (compression block == selection block)
    counts = torch.zeros(num_blocks, dtype=torch.long, device=device)
    counts.scatter_add_(0, ids, torch.ones_like(ids))
    if max_members is None:
        max_members = int(counts.max()) if num_blocks else 1
    r = triton.next_power_of_2(max(1, max_members))
    order = torch.argsort(ids, stable=True)
    sorted_ids = ids[order]
    first = torch.cumsum(counts, 0) - counts
    position = torch.arange(n_comp, device=device) - first[sorted_ids]
    members = torch.full((num_blocks, r), -1, dtype=torch.int32, device=device)
    members[sorted_ids, position] = order.to(torch.int32)
    return members


@torch.no_grad()
def select_blocks(q: Tensor, ck: Tensor, lse: Tensor, comp_block_ids: Tensor, num_blocks: int, topk: int,
                  *, members: Tensor | None = None, variant: str | None = None,
                  tokens_per_program: int | None = None, block_b: int | None = None, num_warps: int = 4,
                  merge: str | None = None) -> Tensor:
    """Top-k selection blocks per (KV head, query): int32 [Hkv, N, topk], ascending, -1 padded.
    q [N, E, Hq, D] and ck [Nc, E, Hkv, D] (E elements side by side, read in place, lse [E * Hq, N])
    give [E * Hkv, N, topk].

    variant: "rows" (the (token, head) pairs of 4 tokens as product rows, regrouped per token) or
    "heads" (one product per head and member slot; by default 64 tokens a program and chunks of 64
    blocks up to 576 blocks, 32 above). Default: "heads" for topk <= 8 (compiled for sm_90 it issues
    ~3x fewer instructions per (token, block) than "rows", which the H100 timing of "rows" showed to
    be issue-bound), "rows" for larger topk ("heads" spills registers at top-32).
    merge: "extract" (rebuild the sorted top-W list from list + chunk), "replace" (insert only the
    chunk's winners over the current minimum; "extract" measured 3x slower than the PyTorch
    reference at top-32) or "sort" (bitonic networks; needs BLOCK_B >= W).
    Defaults: "extract" up to top-8, "replace" above.
    """
    q, hq, hq_e, sq_b = _by_element(q)
    ck, hkv, hkv_e, sk_b = _by_element(ck)
    n_tokens, d = q.shape[0], q.shape[-1]
    group = _group(hq, hkv, hq_e, hkv_e)
    lse = lse.reshape(hq, n_tokens).float().contiguous()
    out = torch.full((hkv, n_tokens, topk), -1, dtype=torch.int32, device=q.device)
    if n_tokens == 0 or num_blocks == 0 or topk == 0:
        return out
    if members is None:
        members = block_members(comp_block_ids, num_blocks)
    r = members.shape[1]
    w = triton.next_power_of_2(topk)
    if merge is None:
        merge = "extract" if w <= 8 else "replace"
    if merge not in ("extract", "replace", "sort"):
        raise ValueError(f"merge must be 'extract', 'replace' or 'sort', not {merge!r}")
    if variant is None:
        variant = "heads" if w <= 8 else "rows"
    if variant == "rows":
        kernel = _select_rows_fwd
        if block_b is None:
            block_b = max(1, 64 // r, w if merge == "sort" else 1)
        if tokens_per_program is None:
            tokens_per_program = max(1, 64 // group)
    elif variant == "heads":
        kernel = _select_heads_fwd
        if block_b is None:
            # H100, 18k-63k tokens x 2 elements (docs/benchmarks.md, SSA "Fifth H100 run"): 64-block chunks
            # win up to ~512 blocks (0.27 vs 0.29-0.33 ms at 224 blocks), 32 above (1.75 vs 1.90 ms at 664)
            block_b = max(64 if num_blocks <= 576 else 32, w)
        if tokens_per_program is None:
            # 64 token rows fill a Hopper tensor-core tile: 0.27-0.29 ms against 0.36-0.39 ms for 32 tokens
            # at 18k tokens x 2 elements (where 32 had been the default below 80k (token, head) pairs)
            tokens_per_program = 64
        tokens_per_program = max(16, tokens_per_program)
    else:
        raise ValueError(f"variant must be 'rows' or 'heads', not {variant!r}")
    if merge == "sort" and block_b < w:
        raise ValueError("merge='sort' needs block_b >= the padded topk")
    grid = (triton.cdiv(n_tokens, tokens_per_program), hkv)
    kernel[grid](q, ck, lse, members, out, n_tokens, num_blocks, topk, hkv_e,
                 q.stride(0), q.stride(-2), sq_b, ck.stride(0), ck.stride(-2), sk_b, out.stride(0), out.stride(1),
                 LOG2E / math.sqrt(d),
                 G=group, TOKENS=tokens_per_program, D=d, R=r, BLOCK_B=block_b, W=w,
                 REPLACE=merge == "replace", SORT=merge == "sort", num_warps=num_warps)
    return out
