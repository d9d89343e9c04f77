"""Triton kernels of Spatial Sparse Attention (forward), same signatures as `engine.attention.ssa`.

* `compressed_attention(q, ck, cv) -> (out, lse)`      (compressed.py)
* `select_blocks(q, ck, lse, comp_block_ids, num_blocks, topk) -> block_topk`   (select.py)
* `selection_attention(q, k, v, block_topk, block_offsets) -> out`             (selection.py)
* `windowed_attention(q, k, v, partition) -> out`      (window.py; signature of engine.sparse)

Inputs fp16/bf16 (fp32 accepted), head dim a power of two; accumulation in fp32. The first three
also take batch elements side by side as strided views [N, E, H, D] (`ELEMENT_VIEWS`): no copies.
"""

import os as _os


def _interpreter_numpy_fix() -> None:
    """Triton 3.6's interpreter (TRITON_INTERPRET=1, the CPU test path) turns scalar tensors into ints
    with `int(array_of_shape_1)`, which numpy >= 2.4 rejects, so runtime loop bounds fail; re-patch
    the interpreter's `tensor.__index__` to take the single element. No effect on compiled kernels."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_ssa_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._ssa_fixed = True
    interpreter._patch_lang_tensor = patched


if _os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_numpy_fix()

from .compressed import compressed_attention  # noqa: E402
from .select import block_members, select_blocks  # noqa: E402
from .selection import selection_attention  # noqa: E402
from .window import windowed_attention  # noqa: E402

ELEMENT_VIEWS = True   # compressed_attention / select_blocks / selection_attention accept [N, E, H, D]

__all__ = ["ELEMENT_VIEWS", "compressed_attention", "select_blocks", "selection_attention", "block_members",
           "windowed_attention"]
