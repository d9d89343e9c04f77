"""Token orderings over sparse coordinates."""

from __future__ import annotations

import torch
from torch import Tensor


def sort_block_order(coords: Tensor, block: int = 8) -> Tensor:
    """Permutation (int64) that puts tokens in the official `sort_block` order.

    Stable lexicographic sort with keys, from most to least significant:
    x//block, y//block, z//block, x%block, y%block, z%block (the batch column is ignored).
    Tokens of one block become contiguous and blocks appear by increasing id bx*R^2 + by*R + bz.
    `coords` is [N, 4] (batch, x, y, z) or [N, 3] (x, y, z).
    """
    xyz = coords[:, -3:].long()
    if xyz.numel() and int(xyz.min()) < 0:
        raise ValueError("sort_block_order expects non-negative coordinates")
    blocks = torch.div(xyz, block, rounding_mode="floor")
    inner = xyz - blocks * block
    span = int(blocks.max()) + 1 if xyz.numel() else 1
    block_id = (blocks[:, 0] * span + blocks[:, 1]) * span + blocks[:, 2]
    inner_id = (inner[:, 0] * block + inner[:, 1]) * block + inner[:, 2]
    # one combined int64 key; stable sort keeps input order among equal coordinates
    key = block_id * (block ** 3) + inner_id
    return torch.sort(key, stable=True).indices
