"""Attention operators of the sparse DiT: the Spatial Sparse Attention reference (`ssa`) and, on CUDA,
its Triton kernels (`engine.attention.triton`, same function signatures)."""

from engine.attention.ssa import compressed_attention, select_blocks, selection_attention, ssa_layout

__all__ = ["compressed_attention", "select_blocks", "selection_attention", "ssa_layout"]
