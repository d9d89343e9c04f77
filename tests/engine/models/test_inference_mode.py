"""Models built and run entirely under torch.inference_mode (as a script or a server would)."""
import dataclasses

import torch

from engine.configs import release_config
from engine.models import build
from engine.sparse import SparseVoxels, sort_block_order


def test_sparse_dit_built_and_run_in_inference_mode_matches_normal_build():
    cfg = dataclasses.replace(release_config("sparse_dit_512", "v1.1"), num_blocks=1, model_channels=128,
                              num_heads=4, cond_channels=64, resolution=16)
    torch.manual_seed(0)
    reference = build("sparse_dit_512", config=cfg)
    grid = torch.stack(torch.meshgrid(*[torch.arange(8)] * 3, indexing="ij"), -1).reshape(-1, 3)
    coords = torch.cat([torch.zeros(len(grid), 1, dtype=torch.long), grid], 1).int()
    coords = coords[sort_block_order(coords, 8)]
    feats, context, t = torch.randn(len(grid), 16), torch.randn(1, 10, 64), torch.tensor([500.0])
    with torch.no_grad():
        expected = reference(SparseVoxels(feats, coords), t, context).feats
    with torch.inference_mode():
        model = build("sparse_dit_512", config=cfg)
        model.load_state_dict(reference.state_dict())
        got = model(SparseVoxels(feats, coords), t, context).feats
        again = model(SparseVoxels(feats, coords), t, context).feats
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(again, expected)
