"""Triton GroupNorm (+ SiLU) for the refiners' 5D activations, fp32 statistics without fp32 copies,
and the conv epilogue (bias, residual) that the norms do not absorb.

Three launches per norm:

1. ``_partial_stats``: each program walks ``steps`` consecutive tiles of voxels x channels (any
   dtype) and accumulates, per element slot in registers, ``x - s`` and ``(x - s)^2`` in fp32 with
   ``s`` the per-channel mean of its first tile (so a large common offset does not cancel digits);
   one reduction at the end gives the program's per-channel mean and centred sum of squares.
   Programs cover long voxel ranges: at most a few thousand rows of partial statistics per channel.
2. ``_finalize``: one program per (batch, group) combines those rows exactly,
   ``M2 = sum_r,c M2[r, c] + n_r (mean[r, c] - mean_g)^2``, and writes the per-channel affine
   ``scale = gamma * rsqrt(var + eps)``, ``shift = beta - mean_g * scale`` (fp32).
3. ``_apply``: ``y = x * scale + shift`` in fp32, rounded to the output dtype (as the fp32 norm cast
   back), then optionally SiLU computed in fp32 from that rounded value and rounded again (as
   ``F.silu`` on the low-precision tensor). ``out`` may be ``x`` (in place).

``pre_bias`` (a per-channel vector, the bias of the convolution that produced ``x``) is added to
every loaded value in fp32 and rounded to ``x``'s dtype before anything else, exactly as the
separate ``x.add_(bias)`` it replaces would have; the statistics and the output are those of the
biased tensor.

Works on plain contiguous and ``channels_last_3d`` tensors (any layout whose spatial dims flatten
to one stride); the output keeps the layout. When the channels are the innermost dim (channels_last
and its channel slices) the voxel stride is a compile-time constant and offsets are 32-bit, so the
loads of a tile are wide vector loads.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["group_norm_silu", "voxel_stride", "bias_residual_", "copy_channels_", "join_channels_"]

# tiles of 4096 elements with 8 warps: 60-105 registers on sm_90 (no spills)
_TILE_ELEMENTS = 4096
_WARPS = 8
# about this many programs per (channel block, batch) in the statistics pass: enough to fill the GPU,
# few enough that the finalize pass reads one small block of partial statistics
_STAT_PROGRAMS = 2048
_INT32_LIMIT = 2 ** 31 - 1


@triton.jit
def _tile_offsets(voxels, channels, sxc, sxv, VSTRIDE: tl.constexpr):
    """Element offsets of a [voxels, channels] tile within one batch entry: 32-bit with a constant
    voxel stride when the channels are innermost (VSTRIDE > 0), else 64-bit through the strides."""
    if VSTRIDE > 0:
        return voxels[:, None] * VSTRIDE + channels[None, :]
    else:
        return voxels.to(tl.int64)[:, None] * sxv + channels.to(tl.int64)[None, :] * sxc


@triton.jit
def _voxel_channel_tile(BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr, CHANNEL_BLOCKS: tl.constexpr):
    """Tile of a one-dimensional grid of (voxel tile, channel block) programs, channel blocks fastest
    (a voxel range's channel blocks run together and share L2 sectors): batch entry, the tile's
    voxel and channel indices (BLOCK_C divides C: no channel mask)."""
    channel_block = tl.program_id(0) % CHANNEL_BLOCKS
    tile = tl.program_id(0) // CHANNEL_BLOCKS
    b = tl.program_id(2).to(tl.int64)
    voxels = tile * BLOCK_V + tl.arange(0, BLOCK_V)
    channels = channel_block * BLOCK_C + tl.arange(0, BLOCK_C)
    return b, voxels, channels


@triton.jit
def _partial_stats(x_ptr, bias_ptr, mean_ptr, m2_ptr, V, C, P, steps, sxb, sxc, sxv,
                   VSTRIDE: tl.constexpr, HAS_BIAS: tl.constexpr, CHANNEL_BLOCKS: tl.constexpr,
                   BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr):
    # channel block fastest: a voxel range's channel blocks run together (they share L2 sectors); one
    # grid dimension (the second is limited to 65535)
    channel_block = tl.program_id(0) % CHANNEL_BLOCKS
    program = tl.program_id(0) // CHANNEL_BLOCKS
    b = tl.program_id(2).to(tl.int64)
    channels = channel_block * BLOCK_C + tl.arange(0, BLOCK_C)  # BLOCK_C divides C: no channel mask
    x_base = x_ptr + b * sxb
    if HAS_BIAS:
        bias = tl.load(bias_ptr + channels).to(tl.float32)
    first = program * steps * BLOCK_V
    # shift: the mean of the program's first tile (sums of x - shift keep fp32 accurate under a large
    # common offset); then per-element running sums in registers, reduced once at the end
    voxels = first + tl.arange(0, BLOCK_V)
    valid = (voxels < V)[:, None]
    x = tl.load(x_base + _tile_offsets(voxels, channels, sxc, sxv, VSTRIDE), mask=valid, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x = tl.where(valid, (x + bias[None, :]).to(x_ptr.dtype.element_ty).to(tl.float32), 0.0)
    shift = tl.sum(x, axis=0) / tl.minimum(tl.maximum(V - first, 1), BLOCK_V).to(tl.float32)
    sums = tl.zeros([BLOCK_V, BLOCK_C], dtype=tl.float32)
    squares = tl.zeros([BLOCK_V, BLOCK_C], dtype=tl.float32)
    for step in range(steps):
        voxels = first + step * BLOCK_V + tl.arange(0, BLOCK_V)
        valid = (voxels < V)[:, None]
        x = tl.load(x_base + _tile_offsets(voxels, channels, sxc, sxv, VSTRIDE), mask=valid, other=0.0)
        x = x.to(tl.float32)
        if HAS_BIAS:
            # the conv's bias add, rounded to x's dtype as the separate in-place add was
            x = (x + bias[None, :]).to(x_ptr.dtype.element_ty).to(tl.float32)
        centred = tl.where(valid, x - shift[None, :], 0.0)
        sums += centred
        squares += centred * centred
    count = tl.minimum(tl.maximum(V - first, 0), steps * BLOCK_V).to(tl.float32)
    total = tl.sum(sums, axis=0)
    mean = shift + total / count
    m2 = tl.maximum(tl.sum(squares, axis=0) - total * (total / count), 0.0)
    row = (b * P + program) * C
    tl.store(mean_ptr + row + channels, mean)
    tl.store(m2_ptr + row + channels, m2)


@triton.jit
def _finalize(mean_ptr, m2_ptr, weight_ptr, bias_ptr, scale_ptr, shift_ptr, V, C, P, span, samples, eps,
              PER_GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    lanes = tl.arange(0, BLOCK_G)
    lane_ok = lanes < PER_GROUP
    channels = group * PER_GROUP + lanes
    base = b * P * C
    total = tl.zeros([BLOCK_T, BLOCK_G], dtype=tl.float32)
    for t0 in range(0, P, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        row_ok = rows < P
        # voxels of row r: those of program r of the statistics pass (span voxels, the last one short)
        count = tl.where(row_ok, tl.minimum(tl.maximum(V - rows * span, 0), span), 0).to(tl.float32)
        mask = row_ok[:, None] & lane_ok[None, :]
        mean = tl.load(mean_ptr + base + rows.to(tl.int64)[:, None] * C + channels[None, :], mask=mask, other=0.0)
        total += count[:, None] * mean
    group_mean = tl.sum(tl.sum(total, axis=1), axis=0) / samples
    squares = tl.zeros([BLOCK_T, BLOCK_G], dtype=tl.float32)
    for t0 in range(0, P, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        row_ok = rows < P
        count = tl.where(row_ok, tl.minimum(tl.maximum(V - rows * span, 0), span), 0).to(tl.float32)
        mask = row_ok[:, None] & lane_ok[None, :]
        offsets = base + rows.to(tl.int64)[:, None] * C + channels[None, :]
        mean = tl.load(mean_ptr + offsets, mask=mask, other=0.0)
        m2 = tl.load(m2_ptr + offsets, mask=mask, other=0.0)
        delta = tl.where(mask, mean - group_mean, 0.0)
        squares += m2 + count[:, None] * delta * delta
    variance = tl.sum(tl.sum(squares, axis=1), axis=0) / samples
    rstd = 1.0 / tl.sqrt_rn(variance + eps)
    gamma = tl.load(weight_ptr + channels, mask=lane_ok, other=0.0).to(tl.float32)
    beta = tl.load(bias_ptr + channels, mask=lane_ok, other=0.0).to(tl.float32)
    scale = gamma * rstd
    shift = beta - group_mean * scale
    tl.store(scale_ptr + b * C + channels, scale, mask=lane_ok)
    tl.store(shift_ptr + b * C + channels, shift, mask=lane_ok)


@triton.jit
def _apply(x_ptr, bias_ptr, out_ptr, scale_ptr, shift_ptr, V, C, sxb, sxc, sxv, sob, soc, sov,
           SILU: tl.constexpr, HAS_BIAS: tl.constexpr, XSTRIDE: tl.constexpr, OSTRIDE: tl.constexpr,
           CHANNEL_BLOCKS: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr):
    b, voxels, channels = _voxel_channel_tile(BLOCK_V, BLOCK_C, CHANNEL_BLOCKS)
    mask = (voxels < V)[:, None]
    x = tl.load(x_ptr + b * sxb + _tile_offsets(voxels, channels, sxc, sxv, XSTRIDE), mask=mask, other=0.0)
    x = x.to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + channels).to(tl.float32)
        x = (x + bias[None, :]).to(x_ptr.dtype.element_ty).to(tl.float32)
    scale = tl.load(scale_ptr + b * C + channels)
    shift = tl.load(shift_ptr + b * C + channels)
    y = (x * scale[None, :] + shift[None, :]).to(out_ptr.dtype.element_ty)
    if SILU:
        yf = y.to(tl.float32)
        y = tl.div_rn(yf, 1.0 + tl.exp(-yf)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + b * sob + _tile_offsets(voxels, channels, soc, sov, OSTRIDE), y, mask=mask)


def voxel_stride(x: Tensor) -> Optional[int]:
    """The stride of the flattened spatial index of a 5D tensor, or None when D, H, W do not flatten."""
    if x.dim() != 5:
        return None
    _, _, depth, height, width = x.shape
    sd, sh, sw = x.stride()[2:]
    step = None
    expected = None
    for size, stride in ((width, sw), (height, sh), (depth, sd)):
        if size == 1:
            continue
        if step is None:
            step, expected = stride, stride * size
        elif stride != expected:
            return None
        else:
            expected = stride * size
    return 1 if step is None else step


def _packed_stride(x: Tensor, spatial_stride: int) -> int:
    """``spatial_stride`` when the channels are innermost and one batch entry's offsets fit in 32 bits
    (the kernels then use it as a compile-time constant), else 0 (64-bit strided offsets)."""
    channels, voxels = x.shape[1], x[0, 0].numel()
    if (channels == 1 or x.stride(1) == 1) and spatial_stride >= channels \
            and (voxels + (1 << 16)) * spatial_stride < _INT32_LIMIT:  # tail tiles' masked offsets too
        return spatial_stride
    return 0


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _tiles(channels: int) -> tuple[int, int]:
    """(voxels, channels) per tile of the statistics, apply and copy kernels. The channel block is a
    power of two that divides ``channels`` (40 -> 8): the kernels then need no channel mask, and the
    loads and stores of a voxel's channels are whole vectors."""
    block_c = min(channels & -channels, 64)
    # Triton's interpreter (CPU tests) pays per program, not per element: few large programs there
    elements = 1 << 16 if _interpreted() else _TILE_ELEMENTS
    return max(16, elements // block_c), block_c


def group_norm_silu(x: Tensor, num_groups: int, weight: Tensor, bias: Tensor, eps: float, *, silu: bool,
                    out: Optional[Tensor] = None, pre_bias: Optional[Tensor] = None,
                    block_voxels: Optional[int] = None, block_tiles: Optional[int] = None,
                    tile_steps: Optional[int] = None, stat_programs: Optional[int] = None) -> Tensor:
    """GroupNorm of ``x`` [B, C, D, H, W] (plus ``pre_bias`` [C], see the module notes) with fp32
    statistics, then SiLU when ``silu``.

    ``out`` (default: a new tensor of ``x``'s layout) may be ``x`` itself. ``block_voxels`` /
    ``block_tiles`` (powers of two) and ``tile_steps`` (tiles per statistics program) override the
    tile sizes (tests).
    """
    batch, channels = x.shape[:2]
    if channels % num_groups:
        raise ValueError(f"{channels} channels do not split into {num_groups} groups")
    if pre_bias is not None and pre_bias.numel() != channels:
        raise ValueError(f"pre_bias of {pre_bias.numel()} values for {channels} channels")
    if out is None:
        out = torch.empty_like(x)
    in_stride, out_stride = voxel_stride(x), voxel_stride(out)
    if in_stride is None or out_stride is None or out.shape != x.shape:
        raise ValueError("group_norm_silu needs 5D tensors whose spatial dims flatten (contiguous or channels_last_3d)")
    if x.numel() == 0:
        return out
    voxels = x[0, 0].numel()
    block_v, block_c = _tiles(channels)
    block_v = block_voxels or block_v
    tiles = triton.cdiv(voxels, block_v)
    steps = tile_steps or triton.cdiv(tiles, 4 if _interpreted() else stat_programs or _STAT_PROGRAMS)
    programs = triton.cdiv(tiles, steps)
    channel_blocks = triton.cdiv(channels, block_c)
    x_packed, out_packed = _packed_stride(x, in_stride), _packed_stride(out, out_stride)
    has_bias = pre_bias is not None
    bias_arg = pre_bias if has_bias else weight  # any pointer when unused
    means = torch.empty(batch, programs, channels, dtype=torch.float32, device=x.device)
    m2 = torch.empty_like(means)
    _partial_stats[(channel_blocks * programs, 1, batch)](x, bias_arg, means, m2, voxels, channels, programs, steps,
                                                      x.stride(0), x.stride(1), in_stride,
                                                      VSTRIDE=x_packed, HAS_BIAS=has_bias,
                                                      CHANNEL_BLOCKS=channel_blocks,
                                                      BLOCK_V=block_v, BLOCK_C=block_c, num_warps=_WARPS)
    per_group = channels // num_groups
    scale = torch.empty(batch, channels, dtype=torch.float32, device=x.device)
    shift = torch.empty_like(scale)
    block_g = triton.next_power_of_2(per_group)
    # fixed per group width (not per volume size): fewer kernel variants to compile
    block_t = block_tiles or max(1, 4096 // block_g)
    # the sample count is passed as a float: an integer argument equal to 1 would become a constexpr
    _finalize[(batch, num_groups)](means, m2, weight, bias, scale, shift, voxels, channels, programs,
                                   steps * block_v, float(voxels * per_group), float(eps),
                                   PER_GROUP=per_group, BLOCK_G=block_g, BLOCK_T=block_t)
    _apply[(channel_blocks * tiles, 1, batch)](x, bias_arg, out, scale, shift, voxels, channels,
                                           x.stride(0), x.stride(1), in_stride,
                                           out.stride(0), out.stride(1), out_stride,
                                           SILU=silu, HAS_BIAS=has_bias, XSTRIDE=x_packed, OSTRIDE=out_packed,
                                           CHANNEL_BLOCKS=channel_blocks,
                                           BLOCK_V=block_v, BLOCK_C=block_c, num_warps=_WARPS)
    return out


# ----------------------------------------------------------------------------------------------------
# Conv epilogue: bias and residual in one pass
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _bias_residual(out_ptr, bias_ptr, res_ptr, res_bias_ptr, N, V,
                   C: tl.constexpr, CHANNELS_INNER: tl.constexpr, HAS_BIAS: tl.constexpr,
                   HAS_RES: tl.constexpr, HAS_RES_BIAS: tl.constexpr, WIDE: tl.constexpr,
                   BLOCK: tl.constexpr):
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if WIDE:
        index = index.to(tl.int64)
    valid = index < N
    if CHANNELS_INNER:
        channel = index % C
    else:
        channel = (index // V) % C
    y = tl.load(out_ptr + index, mask=valid, other=0.0).to(tl.float32)
    if HAS_BIAS:
        # each separate in-place add rounded to the tensor's dtype: kept
        y = (y + tl.load(bias_ptr + channel, mask=valid, other=0.0).to(tl.float32)).to(out_ptr.dtype.element_ty)
        y = y.to(tl.float32)
    if HAS_RES:
        r = tl.load(res_ptr + index, mask=valid, other=0.0).to(tl.float32)
        if HAS_RES_BIAS:
            r = (r + tl.load(res_bias_ptr + channel, mask=valid, other=0.0).to(tl.float32)).to(res_ptr.dtype.element_ty)
            r = r.to(tl.float32)
        y = y + r
    tl.store(out_ptr + index, y.to(out_ptr.dtype.element_ty), mask=valid)


def _dense_channels_inner(x: Tensor) -> Optional[bool]:
    """True for a dense channels_last_3d tensor, False for a dense contiguous one, else None."""
    if x.dim() != 5:
        return None
    if x.is_contiguous(memory_format=torch.channels_last_3d):
        return True
    if x.is_contiguous():
        return False
    return None


def bias_residual_(out: Tensor, bias: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                   residual_bias: Optional[Tensor] = None) -> Tensor:
    """In place, one pass: ``out = rnd(rnd(out + bias) + rnd(residual + residual_bias))`` with
    ``rnd`` the rounding to the dtype (each term optional), i.e. exactly ``out.add_(bias)``,
    ``residual + residual_bias`` and ``out.add_(residual)`` on the low-precision tensors.

    ``out`` [B, C, D, H, W] dense contiguous or channels_last_3d; ``residual`` of the same shape,
    dtype and strides; biases [C].
    """
    inner = _dense_channels_inner(out)
    if inner is None:
        raise ValueError("bias_residual_ needs a dense contiguous or channels_last_3d tensor")
    if residual is not None and (residual.shape != out.shape or residual.stride() != out.stride()
                                 or residual.dtype != out.dtype):
        raise ValueError("residual must have out's shape, dtype and strides")
    if residual is None and residual_bias is not None:
        raise ValueError("residual_bias without a residual")
    channels = out.shape[1]
    for vector in (bias, residual_bias):
        if vector is not None and vector.numel() != channels:
            raise ValueError(f"bias of {vector.numel()} values for {channels} channels")
    n = out.numel()
    if n == 0 or (bias is None and residual is None):
        return out
    block = 1 << 14 if _interpreted() else 2048
    _bias_residual[(triton.cdiv(n, block),)](
        out, bias if bias is not None else out, residual if residual is not None else out,
        residual_bias if residual_bias is not None else out, n, out[0, 0].numel(),
        C=channels, CHANNELS_INNER=inner or channels == 1, HAS_BIAS=bias is not None,
        HAS_RES=residual is not None, HAS_RES_BIAS=residual_bias is not None, WIDE=n >= _INT32_LIMIT - block,
        BLOCK=block, num_warps=4)
    return out


# ----------------------------------------------------------------------------------------------------
# Channel-slice copies (the UNet's skip concatenations), with an optional bias
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _copy_channels(src_ptr, bias_ptr, dst_ptr, V, C, ssb, ssc, ssv, sdb, sdc, sdv,
                   HAS_BIAS: tl.constexpr, SSTRIDE: tl.constexpr, DSTRIDE: tl.constexpr,
                   CHANNEL_BLOCKS: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr):
    b, voxels, channels = _voxel_channel_tile(BLOCK_V, BLOCK_C, CHANNEL_BLOCKS)
    mask = (voxels < V)[:, None]
    x = tl.load(src_ptr + b * ssb + _tile_offsets(voxels, channels, ssc, ssv, SSTRIDE), mask=mask, other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + channels).to(tl.float32)
        x = x.to(tl.float32) + bias[None, :]
    tl.store(dst_ptr + b * sdb + _tile_offsets(voxels, channels, sdc, sdv, DSTRIDE),
             x.to(dst_ptr.dtype.element_ty), mask=mask)


def copy_channels_(dst: Tensor, src: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``dst.copy_(src + bias)`` (``src.add_(bias)`` rounded to ``src``'s dtype when it equals
    ``dst``'s) for 5D tensors whose spatial dims flatten, e.g. a channel slice of a channels_last_3d
    concatenation buffer; one pass."""
    if dst.shape != src.shape:
        raise ValueError(f"copy of {tuple(src.shape)} into {tuple(dst.shape)}")
    if bias is not None and (bias.numel() != src.shape[1] or src.dtype != dst.dtype):
        raise ValueError("bias needs one value per channel and src of dst's dtype")
    src_stride, dst_stride = voxel_stride(src), voxel_stride(dst)
    if src_stride is None or dst_stride is None:
        raise ValueError("copy_channels_ needs 5D tensors whose spatial dims flatten")
    if dst.numel() == 0:
        return dst
    batch, channels = src.shape[:2]
    voxels = src[0, 0].numel()
    block_v, block_c = _tiles(channels)
    channel_blocks = triton.cdiv(channels, block_c)
    _copy_channels[(channel_blocks * triton.cdiv(voxels, block_v), 1, batch)](
        src, bias if bias is not None else src, dst, voxels, channels,
        src.stride(0), src.stride(1), src_stride, dst.stride(0), dst.stride(1), dst_stride,
        HAS_BIAS=bias is not None, SSTRIDE=_packed_stride(src, src_stride), DSTRIDE=_packed_stride(dst, dst_stride),
        CHANNEL_BLOCKS=channel_blocks,
        BLOCK_V=block_v, BLOCK_C=block_c, num_warps=_WARPS)
    return dst


@triton.jit
def _join_channels(a_ptr, bias_ptr, b_ptr, out_ptr, V, sab, sav, sbb, sbv, sob, sov,
                   CA: tl.constexpr, CB: tl.constexpr, HAS_BIAS: tl.constexpr,
                   CHUNK: tl.constexpr, BLOCK_V: tl.constexpr):
    tile = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    voxels = tile * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = (voxels < V)[:, None]
    lanes = tl.arange(0, CHUNK)
    a_base = a_ptr + batch * sab + voxels[:, None] * sav
    b_base = b_ptr + batch * sbb + voxels[:, None] * sbv
    out_base = out_ptr + batch * sob + voxels[:, None] * sov
    # one program writes whole voxel rows of the output (full L2 sectors), chunk by chunk
    for k in tl.static_range(CA // CHUNK):
        channels = k * CHUNK + lanes
        x = tl.load(a_base + channels[None, :], mask=mask, other=0.0)
        if HAS_BIAS:
            x = x.to(tl.float32) + tl.load(bias_ptr + channels).to(tl.float32)[None, :]
        tl.store(out_base + channels[None, :], x.to(out_ptr.dtype.element_ty), mask=mask)
    for k in tl.static_range(CB // CHUNK):
        channels = k * CHUNK + lanes
        x = tl.load(b_base + channels[None, :], mask=mask, other=0.0)
        tl.store(out_base + CA + channels[None, :], x.to(out_ptr.dtype.element_ty), mask=mask)


def _channels_inner_stride(x: Tensor) -> int:
    """The voxel stride of a 5D tensor whose channels are innermost (channel stride 1) and whose
    batch-entry offsets fit in 32 bits, else 0."""
    stride = voxel_stride(x)
    if stride is None or (x.shape[1] > 1 and x.stride(1) != 1):
        return 0
    return _packed_stride(x, stride)


def join_channels_(out: Tensor, first: Tensor, second: Tensor, first_bias: Optional[Tensor] = None) -> Tensor:
    """``out = cat([first + first_bias, second], 1)`` (the bias add rounded to ``first``'s dtype, as
    ``first.add_(bias)``) in one pass, for tensors whose channels are innermost (channels_last_3d and
    their spatial slices); else two :func:`copy_channels_` passes."""
    ca, cb = first.shape[1], second.shape[1]
    if out.shape[1] != ca + cb or out.shape[2:] != first.shape[2:] or first.shape[2:] != second.shape[2:] \
            or out.shape[0] != first.shape[0] or first.shape[0] != second.shape[0]:
        raise ValueError(f"cannot join {tuple(first.shape)} and {tuple(second.shape)} into {tuple(out.shape)}")
    if first_bias is not None and first.dtype != out.dtype:
        raise ValueError("a biased first part needs out's dtype")
    strides = [_channels_inner_stride(t) for t in (first, second, out)]
    chunk = min(64, ca & -ca, cb & -cb)
    if 0 in strides or out.numel() == 0:
        copy_channels_(out[:, :ca], first, first_bias)
        copy_channels_(out[:, ca:], second)
        return out
    voxels = first[0, 0].numel()
    block_v = max(16, (1 << 14 if _interpreted() else _TILE_ELEMENTS) // chunk)
    _join_channels[(triton.cdiv(voxels, block_v), first.shape[0])](
        first, first_bias if first_bias is not None else first, second, out, voxels,
        first.stride(0), strides[0], second.stride(0), strides[1], out.stride(0), strides[2],
        CA=ca, CB=cb, HAS_BIAS=first_bias is not None, CHUNK=chunk, BLOCK_V=block_v, num_warps=_WARPS)
    return out
