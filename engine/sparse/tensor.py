"""The sparse voxel tensor used by every sparse model.

A `SparseVoxels` is a set of active voxels (integer coordinates `(batch, x, y, z)`) with one feature
row per voxel. Rows belonging to one batch element are contiguous. Everything that depends only on
the coordinates (neighbour maps for convolution, window partitions for attention, per-batch
slices) is stored in `cache`, a dict that feature-only updates (`replace`) share, so a stack of
layers over the same voxels computes each map once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class SparseVoxels:
    """Features `[N, C]` on integer coordinates `[N, 4]` = (batch, x, y, z)."""

    __slots__ = ("feats", "coords", "cache")

    def __init__(self, feats: Tensor, coords: Tensor, cache: dict | None = None):
        if feats.dim() != 2:
            raise ValueError(f"feats must be [N, C], got shape {tuple(feats.shape)}")
        if coords.dim() != 2 or coords.shape[1] != 4:
            raise ValueError(f"coords must be [N, 4] (batch, x, y, z), got shape {tuple(coords.shape)}")
        if coords.shape[0] != feats.shape[0]:
            raise ValueError(f"{coords.shape[0]} coordinates for {feats.shape[0]} feature rows")
        if coords.dtype != torch.int32:
            coords = coords.to(torch.int32)
        if coords.device != feats.device:
            coords = coords.to(feats.device)
        self.feats = feats
        self.coords = coords
        self.cache = {} if cache is None else cache

    # ------------------------------------------------------------------ properties
    @property
    def num_voxels(self) -> int:
        return self.feats.shape[0]

    @property
    def channels(self) -> int:
        return self.feats.shape[1]

    @property
    def device(self) -> torch.device:
        return self.feats.device

    @property
    def dtype(self) -> torch.dtype:
        return self.feats.dtype

    @property
    def shape(self) -> torch.Size:
        return self.feats.shape

    @property
    def batch_size(self) -> int:
        return len(self.batch_counts())

    # ------------------------------------------------------------------ layout helpers
    def batch_counts(self) -> list[int]:
        """Number of rows of each batch element 0..B-1 (B = max batch index + 1)."""
        counts = self.cache.get("batch_counts")
        if counts is None:
            if self.num_voxels == 0:
                counts = []
            else:
                counts = torch.bincount(self.coords[:, 0].long()).tolist()
            self.cache["batch_counts"] = counts
        return counts

    def batch_slices(self) -> list[slice]:
        """Row range of each batch element (rows are grouped by batch)."""
        slices = self.cache.get("batch_slices")
        if slices is None:
            batch = self.coords[:, 0]
            if batch.numel() > 1 and not bool((batch[1:] >= batch[:-1]).all()):
                raise ValueError("SparseVoxels rows must be grouped by batch index in increasing order")
            slices, start = [], 0
            for count in self.batch_counts():
                slices.append(slice(start, start + count))
                start += count
            self.cache["batch_slices"] = slices
        return slices

    def spatial_extent(self) -> list[int]:
        """Smallest grid `[X, Y, Z]` (max coordinate + 1 per axis) containing every voxel."""
        extent = self.cache.get("spatial_extent")
        if extent is None:
            if self.num_voxels == 0:
                extent = [1, 1, 1]
            else:
                extent = (self.coords[:, 1:].amax(dim=0).long() + 1).tolist()
            self.cache["spatial_extent"] = extent
        return extent

    # ------------------------------------------------------------------ construction
    def replace(self, feats: Tensor) -> "SparseVoxels":
        """Same voxels (and the same cache object) with new features."""
        if feats.shape[0] != self.num_voxels:
            raise ValueError(f"replace: {feats.shape[0]} rows for {self.num_voxels} voxels")
        out = SparseVoxels.__new__(SparseVoxels)
        out.feats = feats
        out.coords = self.coords
        out.cache = self.cache
        return out

    def to(self, *args: Any, **kwargs: Any) -> "SparseVoxels":
        """Like `Tensor.to` on the features; coordinates follow the device and stay int32.

        The cache is kept when the device is unchanged (it only depends on the coordinates).
        """
        feats = self.feats.to(*args, **kwargs)
        if feats.device == self.device:
            return self.replace(feats)
        return SparseVoxels(feats, self.coords.to(feats.device))

    def __repr__(self) -> str:
        return (f"SparseVoxels(num_voxels={self.num_voxels}, channels={self.channels}, "
                f"dtype={self.dtype}, device={self.device})")


def linearize_coords(coords: Tensor, extent: int) -> Tensor:
    """int64 key `((b*E + x)*E + y)*E + z` of each row of `coords` [N, 4] (all values in [0, E)).

    Sorting by this key sorts lexicographically by (batch, x, y, z).
    """
    c = coords.long()
    return ((c[:, 0] * extent + c[:, 1]) * extent + c[:, 2]) * extent + c[:, 3]
