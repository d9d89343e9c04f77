"""Attention operators of the sparse DiT: the Spatial Sparse Attention reference (`ssa`) and, on CUDA,
its Triton kernels (`engine.attention.triton`, same function signatures)."""

from engine.attention.ssa import (SpatialSparseAttention, compressed_attention, select_blocks,
                                  selection_attention, ssa_layout, ssa_ops)

__all__ = ["SpatialSparseAttention", "compressed_attention", "select_blocks", "selection_attention",
           "ssa_layout", "ssa_ops"]
