"""Mean pooling of the token rows of each compression block (SSA's K/V compression).

Matches `engine.attention.ssa._block_pool`: the official `scatter_reduce(zeros, "mean")` averages
the zero it starts from too (sum / (count + 1)), summed in float64, rounded once to the input dtype.
One program per compressed token sums its rows (found through the token order sorted by compressed
token) instead of float64 atomics into a zeroed buffer; with `silu` the rows are first passed
through SiLU and rounded to the input dtype, as `F.silu` would store them.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl
from torch import Tensor

try:   # the precise expf of CUDA's libm (what F.silu uses); the interpreter takes tl.exp
    from triton.language.extra.cuda import libdevice as _libdevice
except ImportError:  # pragma: no cover - other Triton builds
    _libdevice = None


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
