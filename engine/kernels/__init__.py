"""Triton kernels of the refiners and the DiT blocks (imported lazily by the models on CUDA).

* :mod:`engine.kernels.adaptive_filter`: one pass of the 512 refiner's per-voxel 3x3x3 filter.
* :mod:`engine.kernels.group_norm`: GroupNorm (+ SiLU) on low-precision activations with fp32 statistics.
* :mod:`engine.kernels.conv3d`: narrow 3x3x3 convolutions (per layer shape, where faster than cuDNN).
* :mod:`engine.kernels.modulation`: fused LayerNorm / adaLN modulation / gated residuals.

:class:`BackendChoice` is the process-wide switch each model uses to pick PyTorch or Triton.
"""
from __future__ import annotations

import contextlib
from typing import Iterator


class BackendChoice:
    """A named process-wide implementation setting with a fixed set of choices."""

    def __init__(self, what: str, choices: tuple, default: str):
        self.what, self.choices, self.value = what, choices, default

    def set(self, name: str) -> str:
        """Select ``name``; returns the previous setting."""
        if name not in self.choices:
            raise ValueError(f"unknown {self.what} {name!r}; expected one of {self.choices}")
        previous, self.value = self.value, name
        return previous

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[None]:
        """Select ``name`` for the duration of a ``with`` block."""
        previous = self.set(name)
        try:
            yield
        finally:
            self.set(previous)
