"""Triton helpers shared by several kernels: the 3D voxel boxes of the refiner kernels and the
flash-attention update of the attention kernels (SSA branches, cross-attention)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def box_voxels(pid, D, H, W, tiles_h, tiles_w, TD: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr):
    """Box `pid` of a D x H x W volume cut into TD x TH x TW boxes (W fastest): its box indices, the
    (d, h, w) of its TD*TH*TW voxels, which of them lie inside the volume, and their flat voxel index
    (32-bit: the callers check that every offset fits)."""
    tile_w = pid % tiles_w
    rest = pid // tiles_w
    tile_h = rest % tiles_h
    tile_d = rest // tiles_h
    r = tl.arange(0, TD * TH * TW)
    wi = tile_w * TW + r % TW
    hi = tile_h * TH + (r // TW) % TH
    di = tile_d * TD + r // (TW * TH)
    valid = (di < D) & (hi < H) & (wi < W)
    voxel = (di * H + hi) * W + wi
    return tile_d, tile_h, tile_w, di, hi, wi, valid, voxel


@triton.jit
def softmax_tile_update(s, v, m_i, l_i, acc, scale_log2):
    """One key tile of flash-style attention from its raw logits ``s`` [M, N] (-inf where masked):
    running max ``m_i`` (raw-logit units), normaliser ``l_i`` and fp32 accumulator ``acc`` updated,
    the softmax scale (log2 units) folded into one FMA per element. ``m_i`` must start finite
    (e.g. -1e30): a row with no valid key yet then gets p = exp2(-inf) = 0 and alpha = 1."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2((m_i - m_new) * scale_log2)
    p = tl.exp2(s * scale_log2 - (m_new * scale_log2)[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc
