"""The input side of SSA's K/V compression: keys plus their intra-block position, and the mean
pooling of the token rows of each compression block.

`add_table_rows` is `torch.add(x, table.index_select(0, index)).to(x.dtype)` (the keys plus the rows
of the fp32 position table) in one pass: fp32 sum, rounded once, instead of a gather, a promoted add
and a cast.

Matches `engine.attention.ssa._block_pool`: the official `scatter_reduce(zeros, "mean")` averages
the zero it starts from too (sum / (count + 1)), summed in float64, rounded once to the input dtype.
One program per compressed token sums its rows (found through the token order sorted by compressed
token) instead of float64 atomics into a zeroed buffer; with `silu` the rows are first passed
through SiLU and rounded to the input dtype, as `F.silu` would store them.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

try:   # the precise expf of CUDA's libm (what F.silu uses); the interpreter takes tl.exp
    from triton.language.extra.cuda import libdevice as _libdevice
except ImportError:  # pragma: no cover - other Triton builds
    _libdevice = None


@triton.jit
def _add_table_rows_fwd(x_ptr, table_ptr, index_ptr, out_ptr, n_rows, channels, sx, st, so,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < channels)[None, :]
    entry = tl.load(index_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    rows = rows.to(tl.int64)
    x = tl.load(x_ptr + rows[:, None] * sx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    t = tl.load(table_ptr + entry[:, None] * st + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * so + cols[None, :], (x + t).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _block_pool_fwd(x_ptr, order_ptr, offsets_ptr, out_ptr, channels, sx, so,
                    SILU: tl.constexpr, PRECISE_EXP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    comp = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < channels
    start = tl.load(offsets_ptr + comp)
    end = tl.load(offsets_ptr + comp + 1)
    acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float64)
    for r0 in range(start, end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        ok = r < end
        rows = tl.load(order_ptr + r, mask=ok, other=0)
        x = tl.load(x_ptr + rows[:, None] * sx + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.0)
        if SILU:
            xf = x.to(tl.float32)
            if PRECISE_EXP:
                e = _libdevice.exp(-xf)
            else:
                e = tl.exp(-xf)
            x = (xf / (1.0 + e)).to(x.dtype)
        acc += x.to(tl.float64)
    total = tl.sum(acc, axis=0)
    mean = total / (end - start + 1).to(tl.float64)
    tl.store(out_ptr + comp * so + cols, mean.to(out_ptr.dtype.element_ty), mask=col_ok)


def block_pool(feats: Tensor, order: Tensor, offsets: Tensor, silu: bool = False) -> Tensor:
    """feats [N, C]; order [N] token rows sorted by compressed token; offsets [Nc + 1] int64 start of
    each compressed token's rows in `order` -> [Nc, C] in feats' dtype: sum / (count + 1) of
    (silu of) each group, summed in float64."""
    if feats.dim() != 2 or feats.stride(-1) != 1:
        feats = feats.reshape(feats.shape[0], -1).contiguous()
    n_comp, channels = offsets.shape[0] - 1, feats.shape[1]
    out = feats.new_empty(n_comp, channels)
    if out.numel() == 0:
        return out
    block_c = min(64, triton.next_power_of_2(channels))
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    grid = (n_comp, triton.cdiv(channels, block_c))
    _block_pool_fwd[grid](feats, order, offsets, out, channels, feats.stride(0), out.stride(0),
                          SILU=silu, PRECISE_EXP=_libdevice is not None and not interpreted,
                          BLOCK_R=32, BLOCK_C=block_c, num_warps=4)
    return out


def add_table_rows(x: Tensor, table: Tensor, index: Tensor) -> Tensor:
    """x [N, C] (unit column stride, any row stride: e.g. the keys' slice of a fused projection),
    table [T, C], index int [N] -> contiguous [N, C] in x's dtype: x[i] + table[index[i]] summed in
    fp32 and rounded once (`torch.add(x, table[index]).to(x.dtype)` for a half x and an fp32 or
    half table)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    table = table.contiguous()
    if x.dim() != 2 or table.dim() != 2 or table.shape[1] != x.shape[1] or index.shape != x.shape[:1]:
        raise ValueError(f"x {tuple(x.shape)}, table {tuple(table.shape)}, index {tuple(index.shape)}")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    n_rows, channels = x.shape
    block_c = min(256, triton.next_power_of_2(channels))
    block_r = max(1, 4096 // block_c)
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(channels, block_c))
    _add_table_rows_fwd[grid](x, table, index, out, n_rows, channels, x.stride(0), table.stride(0), out.stride(0),
                              BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    return out
