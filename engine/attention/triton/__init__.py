"""Triton kernels of Spatial Sparse Attention (forward), same signatures as `engine.attention.ssa`.

* `compressed_attention(q, ck, cv) -> (out, lse)`      (compressed.py)
* `select_blocks(q, ck, lse, comp_block_ids, num_blocks, topk) -> block_topk`   (select.py)
* `selection_attention(q, k, v, block_topk, block_offsets) -> out`             (selection.py)
* `windowed_attention(q, k, v, partition) -> out`      (window.py; signature of engine.sparse)

Inputs fp16/bf16 (fp32 accepted), head dim a power of two; accumulation in fp32.
"""

from .compressed import compressed_attention
from .select import block_members, select_blocks
from .selection import selection_attention
from .window import windowed_attention

__all__ = ["compressed_attention", "select_blocks", "selection_attention", "block_members",
           "windowed_attention"]
