"""Compressed-attention branch of SSA: every query attends to all compressed keys.

One program handles `TOKENS` consecutive query tokens and the `G = Hq / Hkv` query heads of one KV
head, stacked as `TOKENS * G` rows of the matrix products (row r = token r // G, head r % G), so the
16 heads of a GQA group share every loaded key tile. Online softmax in the base-2 domain; the
natural-log LSE `[Hq, N]` is written for the block-scoring pass.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from engine.kernels.tiles import softmax_tile_update

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def online_softmax_tile(q, k, v, valid, m_i, l_i, acc, scale_log2):
    """One key tile of flash-style attention: raw logits q.k^T, masked to -inf where not ``valid``,
    then `softmax_tile_update`."""
    s = tl.where(valid, tl.dot(q, tl.trans(k)), float("-inf"))
    return softmax_tile_update(s, v, m_i, l_i, acc, scale_log2)


@triton.jit
def grouped_query_rows(q_ptr, n_tokens, hkv_e, sq_n, sq_h, sq_b,
                       G: tl.constexpr, TOKENS: tl.constexpr, D: tl.constexpr):
    """The row layout of the SSA kernels: program (pid, kv_head) owns TOKENS consecutive tokens times
    the G query heads of KV head `kv_head`, stacked as TOKENS * G rows (row r: token r // G, head
    r % G), so the heads of a GQA group share every loaded key tile. `kv_head` counts the combined
    heads of side-by-side batch elements: inputs come from element `elem`, its KV head `local`.
    Returns q [TOKENS * G, D] (zeros past n_tokens), each row's token, combined query head and
    validity, and (elem, local)."""
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    rows = tl.arange(0, TOKENS * G)
    tok = pid * TOKENS + rows // G
    row_ok = tok < n_tokens
    elem = kv_head // hkv_e
    local = kv_head - elem * hkv_e
    dims = tl.arange(0, D)
    q = tl.load(q_ptr + elem * sq_b + tok[:, None] * sq_n + (local * G + rows % G)[:, None] * sq_h + dims[None, :],
                mask=row_ok[:, None], other=0.0)
    return q, tok, kv_head * G + rows % G, row_ok, elem, local


@triton.jit
def _compressed_fwd(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
                    n_tokens, n_comp, hkv_e,
                    sq_n, sq_h, sq_b, sk_n, sk_h, sk_b, sv_n, sv_h, sv_b, so_n, so_h,
                    scale_log2,
                    G: tl.constexpr, TOKENS: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    M: tl.constexpr = TOKENS * G
    dims = tl.arange(0, D)
    # inputs of batch element `elem` (KV head `local` of it); outputs use the combined heads
    q, tok, head, row_ok, elem, local = grouped_query_rows(q_ptr, n_tokens, hkv_e, sq_n, sq_h, sq_b, G, TOKENS, D)
    k_ptr += elem * sk_b + local * sk_h
    v_ptr += elem * sv_b + local * sv_h
    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)
    for start in range(0, n_comp, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < n_comp
        k = tl.load(k_ptr + cols[:, None] * sk_n + dims[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(v_ptr + cols[:, None] * sv_n + dims[None, :], mask=col_ok[:, None], other=0.0)
        # the first tile always holds a valid key, so m_i is finite from then on
        m_i, l_i, acc = online_softmax_tile(q, k, v, col_ok[None, :], m_i, l_i, acc, scale_log2)
    out = acc / l_i[:, None]
    tl.store(o_ptr + tok[:, None] * so_n + head[:, None] * so_h + dims[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    # lse (natural log) = (m * scale * log2(e) + log2 l) * ln 2, m the raw-logit max
    tl.store(lse_ptr + head * n_tokens + tok, (m_i * scale_log2 + tl.log2(l_i)) * 0.6931471805599453,
             mask=row_ok)


def _last_dim_contiguous(x: Tensor) -> Tensor:
    """Unit stride on the head dim (other strides are passed to the kernels); offsets are 32-bit
    in the kernels, so the addressed extent must stay below 2^31 elements."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    if x.numel() and sum((n - 1) * st for n, st in zip(x.shape, x.stride())) + 1 >= 2**31:
        raise ValueError(f"tensor of shape {tuple(x.shape)} is too large for the SSA kernels' 32-bit offsets")
    return x


def _by_element(x: Tensor) -> tuple[Tensor, int, int, int]:
    """x [N, H, D], or [N, E, H, D] for E batch elements side by side (any strides: e.g. a strided
    view of each element's rows, no copy), as the kernels read it: (x, E * H, H per element, element
    stride). Combined head c is head c % H of element c // H."""
    x = _last_dim_contiguous(x)
    if x.dim() == 3:
        return x, x.shape[1], x.shape[1], 0
    return x, x.shape[1] * x.shape[2], x.shape[2], x.stride(1)


def _group(hq: int, hkv: int, hq_e: int, hkv_e: int) -> int:
    """Query heads per KV head; every element must have the same grouping."""
    if hq % hkv or hq_e * hkv != hq * hkv_e:
        raise ValueError(f"{hq} query heads ({hq_e} per element) do not group onto {hkv} KV heads ({hkv_e} per element)")
    return hq // hkv


def compressed_attention(q: Tensor, ck: Tensor, cv: Tensor, *, tokens_per_program: int | None = None,
                         block_n: int = 64, num_warps: int = 4) -> tuple[Tensor, Tensor]:
    """q [N, Hq, D], ck/cv [Nc, Hkv, D] -> (out [N, Hq, D] in q's dtype, lse fp32 [Hq, N], natural log).

    Also q [N, E, Hq, D], ck/cv [Nc, E, Hkv, D]: E batch elements (same token layout) side by side,
    read in place -> out [N, E * Hq, D], lse [E * Hq, N] (element e's heads at e * Hq..)."""
    q, hq, hq_e, sq_b = _by_element(q)
    ck, hkv, hkv_e, sk_b = _by_element(ck)
    cv, _, _, sv_b = _by_element(cv)
    n_tokens, n_comp, d = q.shape[0], ck.shape[0], q.shape[-1]
    group = _group(hq, hkv, hq_e, hkv_e)
    out = q.new_empty(n_tokens, hq, d)
    lse = torch.empty(hq, n_tokens, dtype=torch.float32, device=q.device)
    if n_tokens == 0:
        return out, lse
    if tokens_per_program is None:
        tokens_per_program = max(1, 64 // group)          # 64 rows per program
    grid = (triton.cdiv(n_tokens, tokens_per_program), hkv)
    _compressed_fwd[grid](q, ck, cv, out, lse, n_tokens, n_comp, hkv_e,
                          q.stride(0), q.stride(-2), sq_b, ck.stride(0), ck.stride(-2), sk_b,
                          cv.stride(0), cv.stride(-2), sv_b, out.stride(0), out.stride(1),
                          LOG2E / math.sqrt(d),
                          G=group, TOKENS=tokens_per_program, D=d, BLOCK_N=block_n, num_warps=num_warps)
    return out, lse
