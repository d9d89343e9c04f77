"""Triton kernels of the 512 refiner's adaptive filter (architecture notes 3.6).

One filter iteration computes, for every voxel ``v`` and channel ``c``,

    out[b, c, v] = sum_{tap = 9i + 3j + k} x[b, c, v + (i-1, j-1, k-1)] * w[b, tap, v]

with zero padding outside the volume and ``w`` the L1-normalised raw weights. The iterations need
the previous iteration's neighbours, so each is one launch (see :func:`adaptive_filter`).

* ``_normalise_taps_kernel`` runs once per filter (not once per iteration): it L1-normalises the 27
  raw weights of each voxel (fp32 norm summed in tap order 0..26, then the division rounded to the
  raw weights' dtype and then to ``x``'s dtype, exactly as the PyTorch path
  ``engine.models.refiners.adaptive_filter`` does with its in-place division) and writes them
  tap-major ([B, 27, voxels], ``x``'s dtype), so that the iterations read each tap coalesced.
  ``raw_weights`` is left untouched.
* ``_filter_step_kernel``: a program takes a TD x TH x TW box of voxels (the neighbours of a box
  mostly come from cache) and all channels; products and the sum over the 27 taps are fp32 in tap
  order 0..26, the result is rounded once to ``x``'s dtype. In ``channels_last_3d`` the channels of a
  voxel are read and written as one vector.

Any 5D layout whose spatial dims flatten (plain contiguous or ``channels_last_3d``) works; the output
has ``x``'s layout.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .tiles import box_voxels

__all__ = ["normalise_taps", "adaptive_filter_step", "adaptive_filter"]

_INT32_LIMIT = 2 ** 31 - 1
# voxels per program of the filter step (depth, height, width): 256 voxels x 8 channels with 8 warps
# (one voxel per thread: the 27 unrolled taps keep many loads in flight without spilling)
_TILE = (2, 4, 32)
_WARPS = 8
# voxels per program of the normalisation: small, so that the 54-byte weight rows of a program stay
# in L1 between its strided tap loads
_NORMALISE_BLOCK = 128
_INTERPRETER_TILE = (4, 8, 8)


@triton.jit
def _normalise_taps_kernel(w_ptr, taps_ptr, V, swb, swc, swv, BLOCK_V: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    voxels = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    valid = voxels < V
    w_base = w_ptr + b * swb + voxels.to(tl.int64) * swv
    # L1 norm of the 27 raw weights of each voxel (fp32, as torch.linalg.vector_norm(dtype=float32))
    norm = tl.zeros([BLOCK_V], dtype=tl.float32)
    for tap in tl.static_range(27):
        norm += tl.abs(tl.load(w_base + tap * swc, mask=valid, other=0.0).to(tl.float32))
    norm = tl.maximum(norm, 1e-12)
    taps_base = taps_ptr + b * 27 * V + voxels
    for tap in tl.static_range(27):
        weight = tl.div_rn(tl.load(w_base + tap * swc, mask=valid, other=0.0).to(tl.float32), norm)
        # the PyTorch path divides in place (rounding to the raw dtype), then casts to x's dtype
        weight = weight.to(w_ptr.dtype.element_ty).to(taps_ptr.dtype.element_ty)
        tl.store(taps_base + tap * V, weight, mask=valid)


@triton.jit
def _filter_step_kernel(x_ptr, taps_ptr, out_ptr, D, H, W, tiles_h, tiles_w,
                        sxb, sxc, sxv, sob, soc, sov,
                        C: tl.constexpr, BLOCK_C: tl.constexpr, PACKED_X: tl.constexpr, PACKED_OUT: tl.constexpr,
                        TD: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    tile_d, tile_h, tile_w, di, hi, wi, valid, voxel = box_voxels(pid, D, H, W, tiles_h, tiles_w, TD, TH, TW)
    plane = H * W
    # per-axis "has a neighbour below / above"
    d_lo, d_hi = di > 0, di < D - 1
    h_lo, h_hi = hi > 0, hi < H - 1
    w_lo, w_hi = wi > 0, wi < W - 1

    channels = tl.arange(0, BLOCK_C)
    if PACKED_X:
        x_channel = channels[None, :]
    else:
        x_channel = channels[None, :] * sxc
    x_base = x_ptr + b * sxb
    taps_base = taps_ptr + b * 27 * D * plane + voxel
    acc = tl.zeros([TD * TH * TW, BLOCK_C], dtype=tl.float32)
    for tap in tl.static_range(27):
        inside = valid
        if tap // 9 == 0:
            inside = inside & d_lo
        if tap // 9 == 2:
            inside = inside & d_hi
        if (tap // 3) % 3 == 0:
            inside = inside & h_lo
        if (tap // 3) % 3 == 2:
            inside = inside & h_hi
        if tap % 3 == 0:
            inside = inside & w_lo
        if tap % 3 == 2:
            inside = inside & w_hi
        neighbour = voxel + ((tap // 9 - 1) * plane + ((tap // 3) % 3 - 1) * W + (tap % 3 - 1))
        weight = tl.load(taps_base + tap * D * plane, mask=valid, other=0.0).to(tl.float32)
        if PACKED_X:
            x_offset = neighbour[:, None] * C + x_channel
        else:
            x_offset = neighbour[:, None] * sxv + x_channel
        if BLOCK_C == C:
            mask = inside[:, None]
        else:
            mask = inside[:, None] & (channels < C)[None, :]
        values = tl.load(x_base + x_offset, mask=mask, other=0.0)
        acc += values.to(tl.float32) * weight[:, None]

    if PACKED_OUT:
        out_offset = voxel[:, None] * C + channels[None, :]
    else:
        out_offset = voxel[:, None] * sov + channels[None, :] * soc
    if BLOCK_C == C:
        out_mask = valid[:, None]
    else:
        out_mask = valid[:, None] & (channels < C)[None, :]
    tl.store(out_ptr + b * sob + out_offset, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def _voxel_stride(x: Tensor) -> Optional[int]:
    from engine.kernels.group_norm import voxel_stride
    return voxel_stride(x)


def _check(x: Tensor, raw_weights: Tensor) -> None:
    if x.dim() != 5 or raw_weights.dim() != 5 or raw_weights.shape[1] != 27:
        raise ValueError(f"expected x [B, C, D, H, W] and weights [B, 27, D, H, W], got "
                         f"{tuple(x.shape)} and {tuple(raw_weights.shape)}")
    if raw_weights.shape[0] != x.shape[0] or raw_weights.shape[2:] != x.shape[2:]:
        raise ValueError(f"weights {tuple(raw_weights.shape)} do not match x {tuple(x.shape)}")


def normalise_taps(raw_weights: Tensor, dtype: torch.dtype, block_voxels: Optional[int] = None) -> Tensor:
    """L1-normalised weights, tap-major [B, 27, voxels] in ``dtype`` (see the module notes)."""
    if raw_weights.dim() != 5 or raw_weights.shape[1] != 27:
        raise ValueError(f"expected weights [B, 27, D, H, W], got {tuple(raw_weights.shape)}")
    stride = _voxel_stride(raw_weights)
    if stride is None:
        raw_weights = raw_weights.contiguous()
        stride = 1
    batch, voxels = raw_weights.shape[0], raw_weights[0, 0].numel()
    taps = torch.empty(batch, 27, voxels, dtype=dtype, device=raw_weights.device)
    if taps.numel() == 0:
        return taps
    block = block_voxels or (1 << 14 if os.environ.get("TRITON_INTERPRET") == "1" else _NORMALISE_BLOCK)
    _normalise_taps_kernel[(triton.cdiv(voxels, block), batch)](
        raw_weights, taps, voxels, raw_weights.stride(0), raw_weights.stride(1), stride,
        BLOCK_V=block, num_warps=4)
    return taps


def _step(x: Tensor, taps: Tensor, out: Tensor, tile: Optional[Tuple[int, int, int]],
          warps: Optional[int] = None) -> Tensor:
    batch, channels, depth, height, width = x.shape
    if out.numel() == 0:
        return out
    x_stride, out_stride = _voxel_stride(x), _voxel_stride(out)
    if x_stride is None:
        x = x.contiguous()
        x_stride = 1
    if out_stride is None:
        raise ValueError("out's spatial dims must flatten to one stride")
    voxels = depth * height * width
    # per-batch offsets in 32 bits (a box's masked neighbours reach at most one plane further)
    extent = (voxels + height * width + width + 1) * max(x_stride, out_stride, 1) + channels * max(
        x.stride(1), out.stride(1))
    if extent >= _INT32_LIMIT or 27 * voxels >= _INT32_LIMIT:
        raise ValueError("volume too large for the 32-bit offsets of the adaptive filter kernel")
    td, th, tw = tile or (_INTERPRETER_TILE if os.environ.get("TRITON_INTERPRET") == "1" else _TILE)
    tiles_d, tiles_h, tiles_w = triton.cdiv(depth, td), triton.cdiv(height, th), triton.cdiv(width, tw)
    packed_x = x_stride == channels and (channels == 1 or x.stride(1) == 1)
    packed_out = out_stride == channels and (channels == 1 or out.stride(1) == 1)
    _filter_step_kernel[(tiles_d * tiles_h * tiles_w, batch)](
        x, taps, out, depth, height, width, tiles_h, tiles_w,
        x.stride(0), x.stride(1), x_stride, out.stride(0), out.stride(1), out_stride,
        C=channels, BLOCK_C=triton.next_power_of_2(channels), PACKED_X=packed_x, PACKED_OUT=packed_out,
        TD=td, TH=th, TW=tw, num_warps=warps or _WARPS)
    return out


def adaptive_filter_step(x: Tensor, raw_weights: Tensor, out: Tensor | None = None,
                         tile: Optional[Tuple[int, int, int]] = None) -> Tensor:
    """One filter iteration: ``x`` [B, C, D, H, W], ``raw_weights`` [B, 27, D, H, W] (not normalised).

    Returns a new tensor (or fills ``out``, which must not alias ``x``) of ``x``'s dtype and layout.
    ``tile`` (powers of two) overrides the (depth, height, width) box of a program (tests).
    """
    _check(x, raw_weights)
    if out is None:
        out = torch.empty_like(x)
    elif out.shape != x.shape or out.dtype != x.dtype or out.data_ptr() == x.data_ptr():
        raise ValueError("out must be a separate tensor of x's shape and dtype")
    if out.numel() == 0:
        return out
    return _step(x, normalise_taps(raw_weights, x.dtype), out, tile)


def adaptive_filter(x: Tensor, raw_weights: Tensor, iterations: int = 3,
                    tile: Optional[Tuple[int, int, int]] = None) -> Tensor:
    """``iterations`` filter passes (weights normalised once, one launch per pass, two ping-pong
    buffers); ``raw_weights`` untouched."""
    _check(x, raw_weights)
    if iterations <= 0:
        return x
    if x.numel() == 0:
        return torch.empty_like(x)
    taps = normalise_taps(raw_weights, x.dtype)
    current = _step(x, taps, torch.empty_like(x), tile)
    if iterations == 1:
        return current
    spare = torch.empty_like(current)
    for _ in range(iterations - 1):
        _step(current, taps, spare, tile)
        current, spare = spare, current
    return current
