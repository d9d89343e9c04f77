"""Triton kernel of the 512 refiner's adaptive filter (architecture notes 3.6).

One launch is one filter iteration: for every voxel ``v`` and channel ``c``

    out[b, c, v] = sum_{tap = 9i + 3j + k} x[b, c, v + (i-1, j-1, k-1)] * w[b, tap, v]

with zero padding outside the volume and ``w`` the L1-normalised raw weights. The normalisation is
done in the kernel from the raw 27 weights of the voxel (no normalised copy in memory), rounded to
the raw weights' dtype and then to ``x``'s dtype exactly as the PyTorch path
(``engine.models.refiners.adaptive_filter``) does with its in-place division. Products and the sum
over the 27 taps are fp32 (tap order 0..26); the result is rounded once to ``x``'s dtype.

Any 5D layout whose spatial dims flatten (plain contiguous or ``channels_last_3d``) works; the output
has ``x``'s layout. The iterations need the previous iteration's neighbours, so they are separate
launches (see :func:`adaptive_filter`).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["adaptive_filter_step", "adaptive_filter"]


@triton.jit
def _adaptive_filter_step_kernel(x_ptr, w_ptr, out_ptr, D, H, W,
                                 sxb, sxc, sxd, sxh, sxw,
                                 swb, swc, swd, swh, sww,
                                 sob, soc, sod, soh, sow,
                                 C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    voxels = D * H * W
    offs = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    valid = offs < voxels
    wi = offs % W
    rest = offs // W
    hi = rest % H
    di = rest // H
    channels = tl.arange(0, BLOCK_C)
    channel_ok = channels < C

    # L1 norm of the 27 raw weights of each voxel (fp32, as torch.linalg.vector_norm(dtype=float32))
    w_base = w_ptr + b * swb + di.to(tl.int64) * swd + hi.to(tl.int64) * swh + wi.to(tl.int64) * sww
    norm = tl.zeros([BLOCK_V], dtype=tl.float32)
    for tap in tl.static_range(27):
        norm += tl.abs(tl.load(w_base + tap * swc, mask=valid, other=0.0).to(tl.float32))
    norm = tl.maximum(norm, 1e-12)

    x_base = x_ptr + b * sxb
    channel_offset = channels[None, :] * sxc
    acc = tl.zeros([BLOCK_V, BLOCK_C], dtype=tl.float32)
    for tap in tl.static_range(27):
        nd = di + (tap // 9 - 1)
        nh = hi + ((tap // 3) % 3 - 1)
        nw = wi + (tap % 3 - 1)
        inside = valid & (nd >= 0) & (nd < D) & (nh >= 0) & (nh < H) & (nw >= 0) & (nw < W)
        weight = tl.load(w_base + tap * swc, mask=valid, other=0.0).to(tl.float32)
        weight = tl.div_rn(weight, norm)
        # the PyTorch path divides in place (rounding to the raw dtype), then casts to x's dtype
        weight = weight.to(w_ptr.dtype.element_ty).to(x_ptr.dtype.element_ty).to(tl.float32)
        offset = nd.to(tl.int64) * sxd + nh.to(tl.int64) * sxh + nw.to(tl.int64) * sxw
        neighbour = tl.load(x_base + offset[:, None] + channel_offset,
                            mask=inside[:, None] & channel_ok[None, :], other=0.0)
        acc += neighbour.to(tl.float32) * weight[:, None]

    out_offset = b * sob + di.to(tl.int64) * sod + hi.to(tl.int64) * soh + wi.to(tl.int64) * sow
    tl.store(out_ptr + out_offset[:, None] + channels[None, :] * soc, acc.to(out_ptr.dtype.element_ty),
             mask=valid[:, None] & channel_ok[None, :])


def adaptive_filter_step(x: Tensor, raw_weights: Tensor, out: Tensor | None = None,
                         block_voxels: int | None = None) -> Tensor:
    """One filter iteration: ``x`` [B, C, D, H, W], ``raw_weights`` [B, 27, D, H, W] (not normalised).

    Returns a new tensor (or fills ``out``, which must not alias ``x``) of ``x``'s dtype and layout.
    """
    if x.dim() != 5 or raw_weights.dim() != 5 or raw_weights.shape[1] != 27:
        raise ValueError(f"expected x [B, C, D, H, W] and weights [B, 27, D, H, W], got "
                         f"{tuple(x.shape)} and {tuple(raw_weights.shape)}")
    if raw_weights.shape[0] != x.shape[0] or raw_weights.shape[2:] != x.shape[2:]:
        raise ValueError(f"weights {tuple(raw_weights.shape)} do not match x {tuple(x.shape)}")
    if out is None:
        out = torch.empty_like(x)
    elif out.shape != x.shape or out.dtype != x.dtype or out.data_ptr() == x.data_ptr():
        raise ValueError("out must be a separate tensor of x's shape and dtype")
    batch, channels, depth, height, width = x.shape
    if out.numel() == 0:
        return out
    block_c = triton.next_power_of_2(channels)
    if block_voxels is None:
        # 256 voxels x 8 channels with 8 warps: about 80 registers on sm_90, no spills (the 27 unrolled
        # taps keep many loads in flight). Triton's interpreter (CPU tests) pays per program, not per
        # element: few large programs there.
        budget = 1 << 15 if os.environ.get("TRITON_INTERPRET") == "1" else 2048
        block_voxels = max(32, min(budget // 8, budget // block_c))
    grid = (triton.cdiv(depth * height * width, block_voxels), batch)
    _adaptive_filter_step_kernel[grid](x, raw_weights, out, depth, height, width,
                                       *x.stride(), *raw_weights.stride(), *out.stride(),
                                       C=channels, BLOCK_C=block_c, BLOCK_V=block_voxels, num_warps=8)
    return out


def adaptive_filter(x: Tensor, raw_weights: Tensor, iterations: int = 3) -> Tensor:
    """``iterations`` filter passes (one launch each, two ping-pong buffers); ``raw_weights`` untouched."""
    if iterations <= 0:
        return x
    current = adaptive_filter_step(x, raw_weights)
    if iterations == 1:
        return current
    spare = torch.empty_like(current)
    for _ in range(iterations - 1):
        adaptive_filter_step(current, raw_weights, out=spare)
        current, spare = spare, current
    return current
