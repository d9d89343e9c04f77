"""Sliding-window branch of SSA: full attention inside each (shifted) 8^3 window.

Signature of `engine.sparse.windowed_attention(q, k, v, partition)`: the partition lists token rows
window by window (`order`, `cu_seqlens`). Work is cut into chunks of at most TOKENS consecutive
positions of one window; program (chunk, head block) stacks the chunk's tokens times HEADS query
heads of one KV head as TOKENS * HEADS rows and runs an online softmax over the window's keys, which
it gathers through `order`. Tokens are never copied into window order. The chunk table depends only
on the partition: it is built without host synchronisation and cached on the partition object.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from engine.kernels.modulation import gated_sum_values

from .compressed import LOG2E, _last_dim_contiguous, online_softmax_tile


@triton.jit
def _gated_branch_rows(out, tok, head, dims, row_ok, c_ptr, s_ptr, l_ptr, sc_n, sc_h, ss_n, ss_h, sl_n,
                       element_rows, element_heads, dtype):
    """The SSA gated sum of rows (token `tok`, query head `head`) whose window-branch result is
    `out` (fp32): compressed and selection outputs read from their side-by-side layout [n, E * Hq, D]
    (element tok // element_rows, its token tok % element_rows), the three gates from the logits
    rows; `engine.kernels.modulation.gated_sum_values`, as `gated_branch_sum` computes it."""
    elem = tok // element_rows
    local = tok - elem * element_rows
    side_head = elem * element_heads + head
    c = tl.load(c_ptr + local * sc_n + side_head * sc_h + dims, mask=row_ok, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + local * ss_n + side_head * ss_h + dims, mask=row_ok, other=0.0).to(tl.float32)
    logits = l_ptr + tok * sl_n
    return gated_sum_values(c, s, out.to(dtype).to(tl.float32), tl.load(logits, mask=row_ok, other=0.0),
                            tl.load(logits + 1, mask=row_ok, other=0.0), tl.load(logits + 2, mask=row_ok, other=0.0),
                            dtype)


@triton.jit
def _window_fwd(q_ptr, k_ptr, v_ptr, o_ptr, order_ptr, chunk_ptr,
                sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, so_n, so_h,
                scale_log2,
                c_ptr, s_ptr, l_ptr, sc_n, sc_h, ss_n, ss_h, sl_n, element_rows, element_heads,
                G: tl.constexpr, HEADS: tl.constexpr, TOKENS: tl.constexpr, D: tl.constexpr,
                BLOCK_N: tl.constexpr, GATED: tl.constexpr):
    chunk = tl.program_id(0)
    head0 = tl.program_id(1) * HEADS        # first query head of this program
    kv_head = head0 // G
    # chunk: query positions [q_start, min(q_start + TOKENS, k_end)) of the window [k_start, k_end)
    q_start = tl.load(chunk_ptr + 3 * chunk)
    k_start = tl.load(chunk_ptr + 3 * chunk + 1)
    k_end = tl.load(chunk_ptr + 3 * chunk + 2)

    # rows: token r // HEADS of the chunk, query head head0 + r % HEADS (a token's heads are adjacent
    # in memory); indices are [rows, 1] columns of the tiles they address
    M: tl.constexpr = TOKENS * HEADS
    rows = tl.arange(0, M)[:, None]
    pos = q_start + rows // HEADS
    row_ok = pos < tl.minimum(q_start + TOKENS, k_end)
    tok = tl.load(order_ptr + pos, mask=row_ok, other=0)
    head = head0 + rows % HEADS
    dims = tl.arange(0, D)[None, :]
    q = tl.load(q_ptr + tok * sq_n + head * sq_h + dims, mask=row_ok, other=0.0)
    k_ptr += kv_head * sk_h
    v_ptr += kv_head * sv_h

    # keys: one masked tile with the first (n_keys - 1) % BLOCK_N + 1 keys, then full tiles; the
    # masked tile is loaded before the loop and used after it, so its loads overlap the loop's
    full = tl.maximum(k_end - k_start - 1, 0) // BLOCK_N * BLOCK_N
    head_end = k_end - full
    cols = k_start + tl.arange(0, BLOCK_N)[:, None]
    col_ok = cols < head_end
    krow = tl.load(order_ptr + cols, mask=col_ok, other=0)
    k_head = tl.load(k_ptr + krow * sk_n + dims, mask=col_ok, other=0.0)
    v_head = tl.load(v_ptr + krow * sv_n + dims, mask=col_ok, other=0.0)

    m_i = tl.full([M], -1.0e30, tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)
    for k0 in range(head_end, k_end, BLOCK_N):
        krow = tl.load(order_ptr + k0 + tl.arange(0, BLOCK_N)[:, None])
        k = tl.load(k_ptr + krow * sk_n + dims)
        v = tl.load(v_ptr + krow * sv_n + dims)
        m_i, l_i, acc = online_softmax_tile(q, k, v, True, m_i, l_i, acc, scale_log2)
    m_i, l_i, acc = online_softmax_tile(q, k_head, v_head, tl.trans(col_ok), m_i, l_i, acc, scale_log2)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if GATED:   # o_ptr: the gated sum of the three SSA branches
        mixed = _gated_branch_rows(out, tok, head, dims, row_ok, c_ptr, s_ptr, l_ptr, sc_n, sc_h, ss_n, ss_h,
                                   sl_n, element_rows, element_heads, o_ptr.dtype.element_ty)
        tl.store(o_ptr + tok * so_n + head * so_h + dims, mixed, mask=row_ok)
    else:
        tl.store(o_ptr + tok * so_n + head * so_h + dims, out.to(o_ptr.dtype.element_ty), mask=row_ok)


def chunk_table(cu_seqlens: Tensor, n_tokens: int, tokens: int) -> Tensor:
    """int32 [U, 3] rows (q_start, k_start, k_end): the windows [k_start, k_end) of `cu_seqlens` cut
    into query chunks of at most `tokens` positions starting at q_start, longest windows first (their
    programs start first). U = cdiv(n_tokens, tokens) + windows is a host-side upper bound on the
    chunk count; rows past the last chunk are (0, 0, 0): no query, no key. No host synchronisation."""
    cu = cu_seqlens.long()
    n_windows = cu.numel() - 1
    lengths = cu[1:] - cu[:-1]
    by_length = torch.argsort(lengths, descending=True, stable=True)
    counts = (lengths[by_length] + tokens - 1) // tokens             # chunks per window, longest first
    ends = torch.cumsum(counts, 0)
    chunk = torch.arange(triton.cdiv(n_tokens, tokens) + n_windows, device=cu.device)
    slot = torch.searchsorted(ends, chunk, right=True)               # n_windows past the last chunk
    live = slot < n_windows
    slot = slot.clamp(max=max(n_windows - 1, 0))
    window = by_length[slot]
    start, end = cu[window], cu[window + 1]
    q_start = start + (chunk - (ends[slot] - counts[slot])) * tokens
    table = torch.stack([q_start, start, end], dim=1)
    return torch.where(live[:, None], table, torch.zeros_like(table)).to(torch.int32).contiguous()


def _partition_tables(partition, device: torch.device, tokens: int) -> tuple[Tensor, Tensor]:
    """(order int32, chunk table) on `device`, cached on the partition (not while a CUDA graph is
    being captured: captured kernels only run at replay, so their outputs cannot be cached)."""
    key = (str(device), tokens)
    cache = partition.__dict__.setdefault("_window_kernel_tables", {})
    tables = cache.get(key)
    if tables is None:
        order = partition.order.to(device=device, dtype=torch.int32).contiguous()
        chunks = chunk_table(partition.cu_seqlens.to(device), order.numel(), tokens)
        tables = (order, chunks)
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            cache[key] = tables
    return tables


def _largest_power_of_two_divisor(n: int) -> int:
    return n & -n


def windowed_attention(q: Tensor, k: Tensor, v: Tensor, partition, scale: float | None = None, *,
                       gated_sum: tuple[Tensor, Tensor, Tensor, int] | None = None,
                       tokens_per_program: int | None = None, heads_per_program: int | None = None,
                       block_n: int = 32, num_warps: int = 4, num_stages: int = 2) -> Tensor:
    """Full attention inside each window of `partition` (engine.sparse.WindowPartition).

    q [N, Hq, D], k/v [N, Hkv, D] in the tokens' row order (any token/head strides) -> out [N, Hq, D]
    in q's dtype. A program handles `tokens_per_program` positions of one window times
    `heads_per_program` query heads of one KV head (both powers of two; heads a divisor of the group).

    gated_sum = (compressed, selected, gate_logits, element_rows): return the SSA gated sum of the
    three branches instead (`engine.kernels.modulation.gated_branch_sum`'s roundings). compressed /
    selected [n, E * Hq, D] are the other branches' outputs with the batch elements side by side
    (row i of element e is token e * element_rows + i of q), gate_logits [N, >= 3].
    """
    n_tokens, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    out = torch.empty_like(q)
    if n_tokens == 0:
        return out
    if gated_sum is None:
        gated = (q, q, q, 0, 0, 0, 0, 0, 1, 0)
    else:
        compressed, selected, logits, element_rows = gated_sum
        compressed, selected = _last_dim_contiguous(compressed), _last_dim_contiguous(selected)
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        if compressed.shape != selected.shape or compressed.shape[-1] != d or compressed.shape[1] % hq \
                or element_rows * (compressed.shape[1] // hq) != n_tokens or compressed.shape[0] != element_rows \
                or logits.shape[0] != n_tokens or logits.shape[1] < 3:
            raise ValueError("gated_sum: compressed / selected must be [element_rows, E * Hq, D] with "
                             "E * element_rows = N tokens, gate_logits [N, >= 3]")
        gated = (compressed, selected, logits, compressed.stride(0), compressed.stride(1), selected.stride(0),
                 selected.stride(1), logits.stride(0), element_rows, hq)
    if heads_per_program is None:
        heads_per_program = _largest_power_of_two_divisor(group)
    if tokens_per_program is None:
        # 64 rows: H100, figurine_wide at 512 (36k tokens, windows of ~130 tokens token-weighted):
        # 3.43 ms a forward (24 calls) against 3.64 for 128 rows and 4.19 for the previous kernel
        tokens_per_program = max(1, 64 // heads_per_program)
    if group % heads_per_program or heads_per_program & (heads_per_program - 1) \
            or tokens_per_program & (tokens_per_program - 1) or tokens_per_program * heads_per_program < 16 \
            or block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"heads_per_program {heads_per_program} must be a power of two dividing the group "
                         f"{group}, tokens_per_program {tokens_per_program} a power of two, their product "
                         f"and block_n {block_n} powers of two >= 16")
    order, chunks = _partition_tables(partition, q.device, tokens_per_program)
    scale_log2 = LOG2E * (scale if scale is not None else 1.0 / math.sqrt(d))
    grid = (chunks.shape[0], hq // heads_per_program)
    _window_fwd[grid](q, k, v, out, order, chunks,
                      q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                      out.stride(0), out.stride(1), scale_log2, *gated,
                      G=group, HEADS=heads_per_program, TOKENS=tokens_per_program, D=d, BLOCK_N=block_n,
                      GATED=gated_sum is not None, num_warps=num_warps, num_stages=num_stages)
    return out
