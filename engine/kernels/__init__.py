"""Triton kernels of the dense refiners (imported lazily by ``engine.models.refiners`` on CUDA).

* :mod:`engine.kernels.adaptive_filter`: one pass of the 512 refiner's per-voxel 3x3x3 filter.
* :mod:`engine.kernels.group_norm`: GroupNorm (+ SiLU) on low-precision activations with fp32 statistics.
"""
