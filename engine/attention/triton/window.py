"""Sliding-window branch of SSA: full attention inside each (shifted) 8^3 window.

Signature of `engine.sparse.windowed_attention(q, k, v, partition)`: the partition lists token rows
window by window (`order`, `cu_seqlens`). One program handles `TOKENS` consecutive positions of that
window order (so almost always one window) x the G query heads of one KV head; it loops over the
windows its positions touch (consecutive ids), gathers their keys through `order`, and masks rows of
other windows. Tokens are never copied into window order.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .compressed import LOG2E, _last_dim_contiguous, online_softmax_tile


@triton.jit
def _window_fwd(q_ptr, k_ptr, v_ptr, o_ptr, order_ptr, win_ptr, cu_ptr,
                n_tokens,
                sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, so_n, so_h,
                scale_log2,
                G: tl.constexpr, TOKENS: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    M: tl.constexpr = TOKENS * G
    rows = tl.arange(0, M)
    pos = pid * TOKENS + rows // G
    head = kv_head * G + rows % G
    row_ok = pos < n_tokens
    tok = tl.load(order_ptr + pos, mask=row_ok, other=0)
    row_win = tl.load(win_ptr + pos, mask=row_ok, other=-1)
    dims = tl.arange(0, D)
    q = tl.load(q_ptr + tok[:, None] * sq_n + head[:, None] * sq_h + dims[None, :],
                mask=row_ok[:, None], other=0.0)
    first = tl.load(win_ptr + pid * TOKENS)
    last = tl.load(win_ptr + tl.minimum(pid * TOKENS + TOKENS, n_tokens) - 1)

    m_i = tl.full([M], -1.0e30, tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)
    for w in range(first, last + 1):
        in_win = row_win == w
        start = tl.load(cu_ptr + w)
        end = tl.load(cu_ptr + w + 1)
        for k0 in range(start, end, BLOCK_N):
            cols = k0 + tl.arange(0, BLOCK_N)
            col_ok = cols < end
            krow = tl.load(order_ptr + cols, mask=col_ok, other=0)
            k = tl.load(k_ptr + krow[:, None] * sk_n + kv_head * sk_h + dims[None, :],
                        mask=col_ok[:, None], other=0.0)
            v = tl.load(v_ptr + krow[:, None] * sv_n + kv_head * sv_h + dims[None, :],
                        mask=col_ok[:, None], other=0.0)
            m_i, l_i, acc = online_softmax_tile(q, k, v, in_win[:, None] & col_ok[None, :],
                                                m_i, l_i, acc, scale_log2)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + tok[:, None] * so_n + head[:, None] * so_h + dims[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


def windowed_attention(q: Tensor, k: Tensor, v: Tensor, partition, scale: float | None = None, *,
                       tokens_per_program: int | None = None, block_n: int = 32,
                       num_warps: int = 4) -> Tensor:
    """Full attention inside each window of `partition` (engine.sparse.WindowPartition).

    q [N, Hq, D], k/v [N, Hkv, D] in the tokens' row order -> out [N, Hq, D] in q's dtype.
    """
    n_tokens, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    out = torch.empty_like(q)
    if n_tokens == 0:
        return out
    if tokens_per_program is None:
        tokens_per_program = max(1, 64 // group)
    order = partition.order.to(device=q.device, dtype=torch.int32).contiguous()
    cu = partition.cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    counts = (cu[1:] - cu[:-1]).long()
    # window id of every position of the window order
    win = torch.repeat_interleave(torch.arange(counts.numel(), device=q.device, dtype=torch.int32),
                                  counts, output_size=n_tokens)
    scale_log2 = LOG2E * (scale if scale is not None else 1.0 / math.sqrt(d))
    grid = (triton.cdiv(n_tokens, tokens_per_program), hkv)
    _window_fwd[grid](q, k, v, out, order, win, cu, n_tokens,
                      q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                      out.stride(0), out.stride(1), scale_log2,
                      G=group, TOKENS=tokens_per_program, D=d, BLOCK_N=block_n, num_warps=num_warps)
    return out
