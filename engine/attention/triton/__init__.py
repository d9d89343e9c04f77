"""Triton kernels of Spatial Sparse Attention (forward), same signatures as `engine.attention.ssa`.

* `compressed_attention(q, ck, cv) -> (out, lse)`      (compressed.py)
* `select_blocks(q, ck, lse, comp_block_ids, num_blocks, topk) -> block_topk`   (select.py)
* `selection_attention(q, k, v, block_topk, block_offsets) -> out`             (selection.py)
* `windowed_attention(q, k, v, partition) -> out`      (window.py; signature of engine.sparse; with
  `gated_sum=(compressed, selected, gate_logits, element_rows)` it returns the branches' gated sum)
* `block_pool(feats, order, offsets, silu) -> pooled`  (pool.py; the K/V compression's pooling)
* `add_table_rows(x, table, index) -> x + table[index]` (pool.py; keys plus intra-block position)

Inputs fp16/bf16 (fp32 accepted), head dim a power of two; accumulation in fp32. The first three
also take batch elements side by side as strided views [N, E, H, D] (`ELEMENT_VIEWS`): no copies.
"""

import os as _os


if _os.environ.get("TRITON_INTERPRET") == "1":
    from engine.kernels import fix_interpreter_scalar_index
    fix_interpreter_scalar_index()

from .compressed import compressed_attention  # noqa: E402
from .pool import add_table_rows, block_pool  # noqa: E402
from .select import block_members, select_blocks  # noqa: E402
from .selection import selection_attention  # noqa: E402
from .window import windowed_attention  # noqa: E402

ELEMENT_VIEWS = True   # compressed_attention / select_blocks / selection_attention accept [N, E, H, D]
GATED_WINDOW = True    # windowed_attention can write the gated sum of the three branches (gated_sum=)

__all__ = ["ELEMENT_VIEWS", "GATED_WINDOW", "add_table_rows", "block_pool", "compressed_attention", "select_blocks",
           "selection_attention", "block_members", "windowed_attention"]
