"""Token sets for the sparse-model tests."""
from __future__ import annotations

import torch


def shell_coords(radius: float, centre, size: int, batch: int = 0) -> torch.Tensor:
    """int32 [N, 4] (batch, x, y, z): the voxels of a spherical shell (about 2.4 voxels thick) in a
    size^3 grid, in sort_block order (8^3 block id, then the position inside the block)."""
    axis = torch.arange(size)
    cells = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    dist = ((cells.double() - torch.tensor(centre)) ** 2).sum(-1).sqrt()
    cells = cells[(dist - radius).abs() < 1.2]
    blocks, within = cells // 8, cells % 8
    span = size // 8 + 1
    key = ((blocks[:, 0] * span + blocks[:, 1]) * span + blocks[:, 2]) * 512 + \
        (within[:, 0] * 8 + within[:, 1]) * 8 + within[:, 2]
    cells = cells[torch.argsort(key)]
    return torch.cat([torch.full((cells.shape[0], 1), batch), cells], dim=1).to(torch.int32)
