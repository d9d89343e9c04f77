"""Sparse voxel tensors and the operations the sparse models need."""

from .attention import (AttentionPlan, PaddedGroup, WindowPartition, build_attention_plan, run_attention_plan,
                        varlen_attention, window_partition, windowed_attention)
from .conv import (SparseConv3d, get_conv_backend, resolve_conv_backend, set_conv_backend,
                   spconv_available, submanifold_conv3x3x3)
from .ops import (SparseGroupNorm32, SparseSequential, sparse_downsample, sparse_layer_norm,
                  sparse_subdivide, subdivide_coords)
from .ordering import sort_block_order
from .tensor import SparseVoxels, linearize_coords

__all__ = [
    "AttentionPlan", "PaddedGroup", "SparseConv3d", "SparseGroupNorm32", "SparseSequential", "SparseVoxels",
    "WindowPartition", "build_attention_plan", "get_conv_backend", "linearize_coords",
    "resolve_conv_backend", "run_attention_plan", "set_conv_backend", "sort_block_order",
    "spconv_available", "sparse_downsample", "sparse_layer_norm", "sparse_subdivide",
    "submanifold_conv3x3x3", "subdivide_coords", "varlen_attention", "window_partition",
    "windowed_attention",
]
