"""Triton kernels of the refiners and the DiT blocks (imported lazily by the models on CUDA).

* :mod:`engine.kernels.adaptive_filter`: one pass of the 512 refiner's per-voxel 3x3x3 filter.
* :mod:`engine.kernels.group_norm`: GroupNorm (+ SiLU) on low-precision activations with fp32 statistics.
* :mod:`engine.kernels.conv3d`: narrow 3x3x3 convolutions (per layer shape, where faster than cuDNN).
* :mod:`engine.kernels.modulation`: fused LayerNorm / adaLN modulation / gated residuals.
* :mod:`engine.kernels.context_attention`: the DiTs' cross-attention to the image tokens (narrow heads).

:class:`BackendChoice` is the process-wide switch each model uses to pick PyTorch or Triton.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterator, Optional, TypeVar

_Result = TypeVar("_Result")


class BackendChoice:
    """A named process-wide implementation setting with a fixed set of choices.

    ``failure`` is set when a Triton kernel could not run (no compiler, unsupported GPU) while the
    setting did not force Triton: from then on the process uses the PyTorch path, after one warning
    (see :meth:`attempt`)."""

    def __init__(self, what: str, choices: tuple, default: str):
        self.what, self.choices, self.value = what, choices, default
        self.failure: Optional[str] = None

    def attempt(self, kernel: Callable[[], _Result], fallback: Callable[[], _Result]) -> _Result:
        """``kernel()``. Unless the setting is ``"triton"`` (then errors propagate), a failure is
        recorded in ``failure`` and reported once, and this call and every later one return
        ``fallback()`` (the PyTorch path) instead."""
        if self.failure is not None and self.value != "triton":
            return fallback()
        try:
            return kernel()
        except Exception as error:
            if self.value == "triton":
                raise
            self.failure = f"{type(error).__name__}: {error}"
            warnings.warn(f"{self.what}: Triton kernels unavailable ({self.failure}); using the PyTorch path",
                          RuntimeWarning, stacklevel=3)
            return fallback()

    def load_kernels(self, auto_takes: bool, load: Callable[[], _Result]) -> Optional[_Result]:
        """``load()`` (which imports the Triton kernel modules: done per call, as tests reload them
        under Triton's interpreter) when the call takes the Triton path: always under ``"triton"``,
        under ``"auto"`` when ``auto_takes``; None (the PyTorch path) otherwise, and under ``"auto"``
        when Triton cannot be imported."""
        if self.value == "torch" or (self.value == "auto" and not auto_takes):
            return None
        try:
            return load()
        except ImportError:
            if self.value == "triton":
                raise
            return None

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


def fix_interpreter_scalar_index() -> None:
    """Triton 3.6's interpreter (TRITON_INTERPRET=1, the CPU test path) turns a scalar kernel argument
    used as a loop bound into an int with ``int(array_of_shape_1)``, which numpy >= 2.4 rejects;
    re-patch the interpreter's ``tensor.__index__`` to take the single element. Idempotent; no effect
    on compiled kernels."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_takes_first_element", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._takes_first_element = True
    interpreter._patch_lang_tensor = patched


def fix_interpreter_bf16_dot() -> None:
    """Triton 3.6's interpreter keeps bf16 values as their uint16 bit patterns and multiplies those
    in ``tl.dot``; re-patch its dot to widen bf16 operands to fp32 first (exact). Idempotent; no
    effect on compiled kernels."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = interpreter.InterpreterBuilder
    original = builder.create_dot
    if getattr(original, "_widens_bf16", False):
        return

    def widened(handle):
        if handle.dtype != tl.bfloat16:
            return handle
        bits = handle.data.astype(np.uint32) << 16
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widened(a), widened(b), d, input_precision, max_num_imprecise_acc)

    create_dot._widens_bf16 = True
    builder.create_dot = create_dot
