"""Resolution changes and normalisation layers on SparseVoxels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tensor import SparseVoxels, linearize_coords

# child c of a voxel sits at 2*coord + CHILD_OFFSETS[c]; z varies fastest: (0,0,0), (0,0,1), (0,1,0), ...
CHILD_OFFSETS = torch.tensor([[(c >> 2) & 1, (c >> 1) & 1, c & 1] for c in range(8)], dtype=torch.int32)


def sparse_downsample(v: SparseVoxels, factor: int) -> SparseVoxels:
    """Mean of the features of all rows sharing `coord // factor` (per batch element).

    Accumulates in float64, returns the input dtype. Output rows are sorted by (batch, x, y, z).
    Rows with duplicate coordinates each count once (so a duplicated voxel weighs twice), as in the
    official pooling.
    """
    if v.num_voxels == 0:
        return SparseVoxels(v.feats[:0], v.coords[:0])
    coarse = v.coords.clone()
    coarse[:, 1:] = torch.div(coarse[:, 1:], factor, rounding_mode="floor")
    extent = max(int(coarse[:, 1:].max()) + 1, int(coarse[:, 0].max()) + 1)
    keys = linearize_coords(coarse, extent)
    unique_keys, parent = torch.unique(keys, sorted=True, return_inverse=True)
    num_out = unique_keys.numel()
    sums = torch.zeros(num_out, v.channels, dtype=torch.float64, device=v.device)
    sums.index_add_(0, parent, v.feats.to(torch.float64))
    counts = torch.bincount(parent, minlength=num_out).to(torch.float64)
    feats = (sums / counts[:, None]).to(v.dtype)
    z = unique_keys % extent
    y = (unique_keys // extent) % extent
    x = (unique_keys // (extent * extent)) % extent
    b = unique_keys // (extent ** 3)
    coords = torch.stack([b, x, y, z], dim=1).to(torch.int32)
    return SparseVoxels(feats, coords)


def subdivide_coords(coords: Tensor) -> Tensor:
    """[N*8, 4] children coordinates: row 8*i + c is child c of input row i."""
    offsets = CHILD_OFFSETS.to(coords.device)
    children = coords.repeat_interleave(8, dim=0)
    children[:, 1:] = children[:, 1:] * 2 + offsets.repeat(coords.shape[0], 1)
    return children


def sparse_subdivide(v: SparseVoxels) -> SparseVoxels:
    """Each voxel becomes its 8 children at 2*coord + {0,1}^3 carrying a copy of its features.

    Row order: every input voxel is followed by its children (0,0,0), (0,0,1), (0,1,0), ... (z fastest),
    i.e. output row 8*i + c is child c of input row i (rows stay grouped by batch).
    """
    return SparseVoxels(v.feats.repeat_interleave(8, dim=0), subdivide_coords(v.coords))


class SparseGroupNorm32(nn.GroupNorm):
    """GroupNorm over all voxels of each batch element, computed in float32 (keys `weight`, `bias`)."""

    takes_sparse_voxels = True

    def forward(self, v: SparseVoxels) -> SparseVoxels:  # type: ignore[override]
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        out = torch.empty_like(v.feats)
        for rows in v.batch_slices():
            if rows.stop == rows.start:
                continue
            x = v.feats[rows].float().t().unsqueeze(0)  # [1, C, n]: channels first, voxels as length
            y = F.group_norm(x, self.num_groups, weight, bias, self.eps)
            out[rows] = y.squeeze(0).t().to(v.dtype)
        return v.replace(out)


def sparse_layer_norm(v: SparseVoxels, eps: float = 1e-5, weight: Tensor | None = None,
                      bias: Tensor | None = None) -> SparseVoxels:
    """LayerNorm over the channels of every voxel, computed in float32, cast back."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    out = F.layer_norm(v.feats.float(), (v.channels,), w, b, eps)
    return v.replace(out.to(v.dtype))


class SparseSequential(nn.ModuleList):
    """Applies its modules in turn to a SparseVoxels.

    Sparse-aware modules (those whose forward takes SparseVoxels, e.g. SparseConv3d, SparseGroupNorm32)
    get the voxels; plain feature-wise modules (nn.SiLU, nn.Linear, ...) get the feature rows. Keys are
    `<index>.<param>` like nn.Sequential, so official layer lists load unchanged.
    """

    def forward(self, v: SparseVoxels) -> SparseVoxels:  # type: ignore[override]
        for module in self:
            if getattr(module, "takes_sparse_voxels", False):
                v = module(v)
            else:
                v = v.replace(module(v.feats))
        return v
