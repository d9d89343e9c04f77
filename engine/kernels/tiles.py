"""Index helpers shared by the refiner kernels that tile a 5D volume into 3D boxes of voxels."""
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
