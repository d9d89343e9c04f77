"""Triton 3x3x3 convolution (stride 1, zero padding 1) for the refiners' narrow full-resolution layers.

The refiners run many convolutions with few channels (1..40 in, 1..32 out) on 192^3 / 256^3
patches, each memory-bound. Two kernels:

* ``_conv3_rows_kernel`` (fp16 / bf16, channels innermost, 1, 2, 4, .., 32 input channels): in
  channels_last_3d a W-row of voxels is one contiguous run of W * Cin values, so the input of a
  segment of a few voxels plus a halo on each side is one vector load, and the three W taps of
  all the segment's voxels are one banded weight matrix. A program makes 9 ``tl.dot`` calls, one
  per (D, H) row offset, software-pipelined (the loads go straight to shared memory). The
  epilogue rounds the convolution, then adds the bias and rounds again (cuDNN plus ATen's
  separate ``add_``) and optionally applies a ReLU.
* ``_conv3_kernel`` (any layout and channel count, also fp32): a program takes ``BLOCK_V``
  consecutive voxels, and for each of the 27 taps multiplies the neighbour tile [BLOCK_V, Cin]
  (zero outside the volume) by that tap's [Cin, Cout] weight slice, accumulating in fp32 (IEEE
  fp32 dot products for fp32 inputs, no TF32); the bias is added in fp32 and the result rounded once.

The output is channels_last_3d when the input or the weight is (cuDNN's rule); weights are in
the ``nn.Conv3d`` layout [Cout, Cin, 3, 3, 3].
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .tiles import box_voxels

__all__ = ["conv3d_3x3x3", "rounds_bias_separately", "row_plan", "RowPlan", "channels_last_strides",
           "MAX_IN_CHANNELS", "MAX_OUT_CHANNELS"]

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
def _conv3_rows_kernel(x_ptr, w_ptr, b_ptr, out_ptr, D, H, W, S, tiles_h, tiles_s, sxb, sob,
                       CIN: tl.constexpr, COUT: tl.constexpr, G: tl.constexpr, SPAN: tl.constexpr,
                       NP: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
                       TD: tl.constexpr, TH: tl.constexpr, TS: tl.constexpr, STAGES: tl.constexpr):
    """Channels-innermost input and output (voxel strides CIN and COUT, 32-bit offsets).

    Each W-row is cut into S segments of G voxels. One dot row is a segment: its input is the
    SPAN = G + 2 * HALO voxels around it (SPAN * CIN contiguous values, one vector load), its output
    the G * COUT contiguous values of its G voxels. A program takes a TD x TH x TS box of segments and
    makes one tl.dot per (dd, dh) row offset with that offset's banded weight [SPAN * CIN, NP]
    (row j * CIN + ci, column g * COUT + co holds w[co, ci, dd, dh, dw] where j = g + dw - 1 + HALO):
    the three W taps come from the band, the W halo from the wider span."""
    HALO: tl.constexpr = (SPAN - G) // 2
    K: tl.constexpr = SPAN * CIN
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    _, _, _, di, hi, si, valid, _ = box_voxels(pid, D, H, S, tiles_h, tiles_s, TD, TH, TS)
    column = tl.arange(0, K)
    first = si * G - HALO  # first voxel of the span
    span_w = first[:, None] + (column // CIN)[None, :]
    in_row = (span_w >= 0) & (span_w < W)  # zero padding along W (and no reads past a row's end)
    start = ((di * H + hi) * W + first) * CIN
    x_base = x_ptr + b * sxb
    outputs = tl.arange(0, NP)
    acc = tl.zeros([TD * TH * TS, NP], dtype=tl.float32)
    for pair in tl.range(0, 9, num_stages=STAGES):
        dd = pair // 3 - 1
        dh = pair % 3 - 1
        nd = di + dd
        nh = hi + dh
        row_ok = valid & (nd >= 0) & (nd < D) & (nh >= 0) & (nh < H)
        x = tl.load(x_base + (start + (dd * H + dh) * W * CIN)[:, None] + column[None, :],
                    mask=row_ok[:, None] & in_row, other=0.0)
        w = tl.load(w_ptr + (pair * K + column)[:, None] * NP + outputs[None, :])
        acc = tl.dot(x, w, acc)
    y = acc.to(out_ptr.dtype.element_ty)
    voxel_w = (si * G)[:, None] + (outputs // COUT)[None, :]
    out_mask = valid[:, None] & (outputs < G * COUT)[None, :] & (voxel_w < W)
    if HAS_BIAS:  # rounded as cuDNN's convolution followed by ATen's separate add_
        bias = tl.load(b_ptr + outputs % COUT, mask=outputs < G * COUT, other=0.0).to(tl.float32)
        y = (y.to(tl.float32) + bias[None, :]).to(out_ptr.dtype.element_ty)
    if RELU:
        y = tl.maximum(y, 0.0)
    out_start = ((di * H + hi) * W + si * G) * COUT
    tl.store(out_ptr + b * sob + out_start[:, None] + outputs[None, :], y, mask=out_mask)


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


class RowPlan(NamedTuple):
    """Launch choices of the row kernel: ``group`` voxels per segment, ``span`` voxels read per
    segment (the group plus an equal halo each side; ``span * Cin`` a power of two >= 16), the
    (depth, height, segments) box of a program, warps and software-pipelining stages."""
    group: int
    span: int
    tile: tuple
    warps: int = 4
    stages: int = 3


def row_plan(cin: int, cout: int) -> RowPlan:
    """The row kernel's launch choices for ``cin -> cout`` channels (timed on an H100 at 192^3:
    segments of 4 voxels for 8 input channels, 2 from 16 on, 8 / Cin below; 1 x 8 x 16 boxes)."""
    group = 4 if cin == 8 else 2 if cin > 8 else max(2, 8 // cin)
    tile = (2, 4, 8) if os.environ.get("TRITON_INTERPRET") == "1" else (1, 8, 16)  # the interpreter pays per program
    return RowPlan(group, 2 * group, tile, warps=4 if cin == 1 or cout > 16 else 8)


def rounds_bias_separately(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`conv3d_3x3x3` runs this convolution on the row kernel, which rounds the
    convolution and then the bias add (cuDNN plus ATen's separate ``add_``): fp16 / bf16, channels
    innermost in input and output, 1, 2, 4, .., 32 input channels, at most 32 outputs, 32-bit offsets."""
    cout, cin = weight.shape[:2]
    if x.dim() != 5 or x.dtype not in (torch.float16, torch.bfloat16) or cin & (cin - 1) or cin > 32 \
            or cout > 32 or x.shape[1] != cin:
        return False
    _, _, depth, height, width = x.shape
    dense_in = (cin == 1 or x.stride(1) == 1) and x.stride(2) == cin * height * width \
        and x.stride(3) == cin * width and x.stride(4) == cin
    # the largest offset formed: a span past the end of the last row of a box past the volume
    small = (depth * height * width + 2 * height * width + 64) * max(cin, cout) < 2 ** 31 - 1
    return dense_in and small and (cout == 1 or _output_layout(x, weight) == torch.channels_last_3d)


@functools.lru_cache(maxsize=None)
def _band_index(device: torch.device, cin: int, cout: int, group: int, span: int, n_pad: int) -> Tensor:
    """Gather index of the banded weights [9, span * cin, n_pad] (see ``_conv3_rows_kernel``) into
    the flattened taps ``weight.permute(2, 3, 4, 1, 0)`` [(dd, dh, dw, ci, co)] followed by one zero."""
    halo = (span - group) // 2
    index = torch.full((9, span, cin, n_pad), 27 * cin * cout, dtype=torch.long)
    ci = torch.arange(cin).view(cin, 1)
    co = torch.arange(cout).view(1, cout)
    for pair in range(9):
        for g in range(group):
            for dw in range(3):
                index[pair, g + dw - 1 + halo, :, g * cout:(g + 1) * cout] = ((pair * 3 + dw) * cin + ci) * cout + co
    return index.reshape(-1).to(device)


def _conv_by_rows(x: Tensor, weight: Tensor, bias: Optional[Tensor], relu: bool, out: Tensor,
                  plan: RowPlan) -> None:
    batch, cin, depth, height, width = x.shape
    cout = weight.shape[0]
    n_pad = max(16, triton.next_power_of_2(plan.group * cout))
    taps = torch.cat([weight.permute(2, 3, 4, 1, 0).reshape(-1), weight.new_zeros(1)])
    banded = taps[_band_index(x.device, cin, cout, plan.group, plan.span, n_pad)]
    segments = triton.cdiv(width, plan.group)
    td, th, ts = plan.tile
    tiles_d, tiles_h, tiles_s = triton.cdiv(depth, td), triton.cdiv(height, th), triton.cdiv(segments, ts)
    _conv3_rows_kernel[(tiles_d * tiles_h * tiles_s, batch)](
        x, banded, bias if bias is not None else banded, out, depth, height, width, segments, tiles_h, tiles_s,
        x.stride(0), out.stride(0), CIN=cin, COUT=cout, G=plan.group, SPAN=plan.span, NP=n_pad,
        HAS_BIAS=bias is not None, RELU=relu, TD=td, TH=th, TS=ts, STAGES=plan.stages, num_warps=plan.warps)


def conv3d_3x3x3(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, relu: bool = False,
                 block_voxels: Optional[int] = None, plan: Optional[RowPlan] = None) -> Tensor:
    """``F.conv3d(x, weight, bias, padding=1)``, then ``clamp_min(0)`` with ``relu``, for ``weight``
    [Cout, Cin, 3, 3, 3] with Cin <= 64 and Cout <= 32; ``x`` [B, Cin, D, H, W] of the weight's dtype.

    Low-precision channels_last_3d inputs with 1, 2, 4, .., 32 channels go to the row kernel
    (``plan``: its launch choices, default :func:`row_plan`); the rest (and any call with
    ``block_voxels``) to the per-tap kernel. With a bias, the row kernel rounds the convolution first
    and then the bias add, as cuDNN plus ATen's separate ``add_`` do; the per-tap kernel rounds once.
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
    if rounds_bias_separately(x, weight) and (plan is not None or block_voxels is None):
        _conv_by_rows(x, weight, bias, relu, out, plan or row_plan(in_channels, out_channels))
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
    return out.clamp_min_(0) if relu else out
