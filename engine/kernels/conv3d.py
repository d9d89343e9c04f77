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

from .tiles import box_voxels

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


@triton.jit
def _conv3_taps_kernel(x_ptr, w_ptr, out_ptr, D, H, W, tiles_h, tiles_w, sxb, sob,
                       CIN: tl.constexpr, COUT: tl.constexpr, NP: tl.constexpr, KG: tl.constexpr,
                       GROUPS: tl.constexpr, TD: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr):
    """Channels-innermost input and output (voxel strides CIN and COUT, 32-bit offsets). A program
    takes a TD x TH x TW box of voxels; the 27 x CIN im2col columns are taken KG at a time (KG / CIN
    whole taps, zero beyond tap 26), each group one tl.dot with its [KG, NP] slice of the packed weight
    (rows tap * CIN + ci). Each tap's CIN channels are one vector load."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    tile_d, tile_h, tile_w, di, hi, wi, valid, voxel = box_voxels(pid, D, H, W, tiles_h, tiles_w, TD, TH, TW)
    plane = H * W
    column = tl.arange(0, KG)
    channel = column % CIN
    outputs = tl.arange(0, NP)
    x_base = x_ptr + b * sxb
    # a box whose neighbours all lie inside the volume needs no per-element bounds test (most boxes)
    interior = (tile_d * TD >= 1) & ((tile_d + 1) * TD <= D - 1) & (tile_h * TH >= 1) \
        & ((tile_h + 1) * TH <= H - 1) & (tile_w * TW >= 1) & ((tile_w + 1) * TW <= W - 1)
    acc = tl.zeros([TD * TH * TW, NP], dtype=tl.float32)
    for group in tl.static_range(GROUPS):
        tap = group * (KG // CIN) + column // CIN
        dd = tap // 9 - 1
        dh = (tap // 3) % 3 - 1
        dw = tap % 3 - 1
        shift = (dd * plane + dh * W + dw) * CIN + channel
        pointers = x_base + voxel[:, None] * CIN + shift[None, :]
        if interior:
            if (group + 1) * (KG // CIN) > 27:  # the last group's columns past tap 26 are zero
                x = tl.load(pointers, mask=tl.broadcast_to((tap < 27)[None, :], [TD * TH * TW, KG]), other=0.0)
            else:
                x = tl.load(pointers)
        else:
            nd = di[:, None] + dd[None, :]
            nh = hi[:, None] + dh[None, :]
            nw = wi[:, None] + dw[None, :]
            inside = valid[:, None] & (tap < 27)[None, :] & (nd >= 0) & (nd < D) & (nh >= 0) & (nh < H) \
                & (nw >= 0) & (nw < W)
            x = tl.load(pointers, mask=inside, other=0.0)
        w = tl.load(w_ptr + (group * KG + column)[:, None] * NP + outputs[None, :])
        acc = tl.dot(x, w, acc)
    out_mask = valid[:, None] & (outputs < COUT)[None, :]
    tl.store(out_ptr + b * sob + voxel[:, None] * COUT + outputs[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=out_mask)


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


_TAPS_TILE = (2, 4, 32)
_TAPS_WARPS = 4


def _taps_kernel_fits(x: Tensor, out: Tensor) -> bool:
    """Whether the tap-group kernel takes this convolution: fp16 / bf16, channels innermost in input
    and output, 1..32 input channels in a power of two, 32-bit offsets."""
    cin, cout = x.shape[1], out.shape[1]
    if x.dtype not in (torch.float16, torch.bfloat16) or cin & (cin - 1) or cin > 32 or cout > 32:
        return False
    voxels = x[0, 0].numel()
    dense = all((t.shape[1] == 1 or t.stride(1) == 1) and t.stride(2) == t.shape[1] * t.shape[3] * t.shape[4]
                and t.stride(3) == t.shape[1] * t.shape[4] and t.stride(4) == t.shape[1] for t in (x, out))
    return dense and (voxels + 2 * x.shape[3] * x.shape[4]) * max(cin, cout) < 2 ** 31 - 1


def _conv_by_tap_groups(x: Tensor, weight: Tensor, out: Tensor, tile: Optional[tuple]) -> None:
    batch, cin, depth, height, width = x.shape
    cout = weight.shape[0]
    # columns per dot: whole taps, at least 16 (the dot's minimum) and at most 64
    group = max(16, min(64, triton.next_power_of_2(27 * cin) // 2 if cin == 1 else 64 // cin * cin))
    groups = triton.cdiv(27 * cin, group)
    n_pad = max(16, triton.next_power_of_2(cout))
    # packed weight: row tap * cin + ci, column co (zero rows past tap 26, zero columns past cout)
    packed = torch.zeros(groups * group, n_pad, dtype=x.dtype, device=x.device)
    packed[:27 * cin, :cout] = weight.permute(2, 3, 4, 1, 0).reshape(27 * cin, cout)
    td, th, tw = tile or ((2, 4, 8) if os.environ.get("TRITON_INTERPRET") == "1" else _TAPS_TILE)
    tiles_d, tiles_h, tiles_w = triton.cdiv(depth, td), triton.cdiv(height, th), triton.cdiv(width, tw)
    _conv3_taps_kernel[(tiles_d * tiles_h * tiles_w, batch)](
        x, packed, out, depth, height, width, tiles_h, tiles_w, x.stride(0), out.stride(0),
        CIN=cin, COUT=cout, NP=n_pad, KG=group, GROUPS=groups, TD=td, TH=th, TW=tw, num_warps=_TAPS_WARPS)


def conv3d_3x3x3(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                 block_voxels: Optional[int] = None, tile: Optional[tuple] = None) -> Tensor:
    """``F.conv3d(x, weight, bias, padding=1)`` for ``weight`` [Cout, Cin, 3, 3, 3] with
    Cin <= 64 and Cout <= 32; ``x`` [B, Cin, D, H, W] of the weight's dtype.

    Low-precision channels_last_3d inputs with 1, 2, 4, .., 32 channels go to the tap-group kernel
    (``tile``: its (depth, height, width) box); the rest (and any call with ``block_voxels``) to the
    per-tap kernel. With a bias, the tap-group path rounds the convolution first and then the bias
    add, as cuDNN plus ATen's separate ``add_`` do.
    """
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
    if _taps_kernel_fits(x, out) and (tile is not None or block_voxels is None):
        _conv_by_tap_groups(x, weight, out, tile)
        if bias is not None:
            from engine.kernels.group_norm import bias_residual_
            bias_residual_(out, bias)  # rounded as ATen's add_ after cuDNN
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
