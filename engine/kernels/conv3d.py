"""Triton 3x3x3 convolution (stride 1, zero padding 1) for the refiners' narrow full-resolution layers.

The refiners run many convolutions with few channels (1..40 in, 1..32 out) on 192^3 / 256^3
patches. Each is memory-bound: a program takes ``BLOCK_V`` consecutive voxels, and for each of the
27 taps loads the neighbour tile [BLOCK_V, Cin] (zero outside the volume; neighbours mostly come
from cache) and multiplies it by that tap's [Cin, Cout] weight slice with ``tl.dot`` (channel
counts padded to the dot's minimum of 16 inside registers only), accumulating in fp32. The bias
is added in fp32 and the result rounded once to the input dtype.

Works on any 5D layout (plain contiguous or ``channels_last_3d``; the output is channels_last_3d
when the input or the weight is, as cuDNN decides),
weights in the ``nn.Conv3d`` layout [Cout, Cin, 3, 3, 3] read through their strides. fp32 inputs
use IEEE fp32 dot products (no TF32).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["conv3d_3x3x3", "channels_last_strides", "MAX_IN_CHANNELS", "MAX_OUT_CHANNELS"]

MAX_IN_CHANNELS = 64
MAX_OUT_CHANNELS = 32


@triton.jit
def _conv3_kernel(x_ptr, w_ptr, b_ptr, out_ptr, D, H, W,
                  sxb, sxc, sxd, sxh, sxw,
                  swo, swi, swd, swh, sww,
                  sob, soc, sod, soh, sow,
                  CIN: tl.constexpr, COUT: tl.constexpr, KP: tl.constexpr, NP: tl.constexpr,
                  HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_V: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    valid = offs < D * H * W
    wi = offs % W
    rest = offs // W
    hi = rest % H
    di = rest // H
    k_in = tl.arange(0, KP)
    k_ok = k_in < CIN
    n_out = tl.arange(0, NP)
    n_ok = n_out < COUT
    x_base = x_ptr + b * sxb
    in_offset = k_in.to(tl.int64)[None, :] * sxc
    w_tile = w_ptr + k_in[:, None] * swi + n_out[None, :] * swo
    w_mask = k_ok[:, None] & n_ok[None, :]
    acc = tl.zeros([BLOCK_V, NP], dtype=tl.float32)
    for tap in tl.static_range(27):
        nd = di + (tap // 9 - 1)
        nh = hi + ((tap // 3) % 3 - 1)
        nw = wi + (tap % 3 - 1)
        inside = valid & (nd >= 0) & (nd < D) & (nh >= 0) & (nh < H) & (nw >= 0) & (nw < W)
        offset = nd.to(tl.int64) * sxd + nh.to(tl.int64) * sxh + nw.to(tl.int64) * sxw
        x = tl.load(x_base + offset[:, None] + in_offset, mask=inside[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_tile + ((tap // 9) * swd + ((tap // 3) % 3) * swh + (tap % 3) * sww), mask=w_mask, other=0.0)
        if IEEE:
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n_out, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_offset = b * sob + di.to(tl.int64) * sod + hi.to(tl.int64) * soh + wi.to(tl.int64) * sow
    tl.store(out_ptr + out_offset[:, None] + n_out.to(tl.int64)[None, :] * soc, acc.to(out_ptr.dtype.element_ty),
             mask=valid[:, None] & n_ok[None, :])


def channels_last_strides(t: Tensor) -> bool:
    """Whether a 5D tensor's strides order its dims as channels_last_3d (N, D, H, W, C from outer to
    inner), judged as PyTorch's suggest_memory_format does, so one-channel tensors converted to
    channels_last_3d count as such although they are also plain contiguous."""
    if t.dim() != 5:
        return False
    smallest = 0
    for d in (1, 4, 3, 2, 0):
        size, stride = t.shape[d], t.stride(d)
        if size == 0 or stride < smallest or (d == 0 and smallest == t.stride(1)):
            return False
        smallest = stride * size if size > 1 else stride
    return True


def _output_layout(x: Tensor, weight: Tensor) -> torch.memory_format:
    """channels_last_3d when the input or the weight is laid out that way (cuDNN's rule)."""
    if channels_last_strides(x) or channels_last_strides(weight):
        return torch.channels_last_3d
    return torch.contiguous_format


def conv3d_3x3x3(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                 block_voxels: Optional[int] = None) -> Tensor:
    """``F.conv3d(x, weight, bias, padding=1)`` for ``weight`` [Cout, Cin, 3, 3, 3] with
    Cin <= 64 and Cout <= 32; ``x`` [B, Cin, D, H, W] of the weight's dtype."""
    if x.dim() != 5 or weight.dim() != 5 or tuple(weight.shape[2:]) != (3, 3, 3):
        raise ValueError(f"expected x [B, C, D, H, W] and weight [Cout, Cin, 3, 3, 3], got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    out_channels, in_channels = weight.shape[:2]
    if x.shape[1] != in_channels or in_channels > MAX_IN_CHANNELS or out_channels > MAX_OUT_CHANNELS:
        raise ValueError(f"{x.shape[1]} -> {out_channels} channels with a weight for {in_channels} "
                         f"(at most {MAX_IN_CHANNELS} in, {MAX_OUT_CHANNELS} out)")
    if x.dtype != weight.dtype:
        raise ValueError(f"input {x.dtype} and weight {weight.dtype} differ")
    batch, _, depth, height, width = x.shape
    out = torch.empty((batch, out_channels, depth, height, width), dtype=x.dtype, device=x.device,
                      memory_format=_output_layout(x, weight))
    if out.numel() == 0:
        return out
    k_pad = max(16, triton.next_power_of_2(in_channels))
    n_pad = max(16, triton.next_power_of_2(out_channels))
    if block_voxels is None:
        # Triton's interpreter (CPU tests) pays per program, not per element: few large programs there
        block_voxels = 4096 if os.environ.get("TRITON_INTERPRET") == "1" else 128
    grid = (triton.cdiv(depth * height * width, block_voxels), batch)
    _conv3_kernel[grid](x, weight, bias if bias is not None else weight, out, depth, height, width,
                        *x.stride(), *weight.stride(), *out.stride(),
                        CIN=in_channels, COUT=out_channels, KP=k_pad, NP=n_pad, HAS_BIAS=bias is not None,
                        IEEE=x.dtype == torch.float32, BLOCK_V=block_voxels, num_warps=4)
    return out
