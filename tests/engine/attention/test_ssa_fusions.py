"""SSA fusions: the keys plus the intra-block position table gathered, added and rounded in one pass
(`add_table_rows`), bitwise equal to the unfused PyTorch expression, and SpatialSparseAttention with
it and with the window kernel's gated sum in use, against the unfused path and the PyTorch backend.

(The gated branch sum in the selection kernel's epilogue was removed again: on the H100 it slowed the
selection kernel from 25.4 to 28.6 ms a sparse-DiT forward to save a 2.5 ms pass.)

On CPU the kernels run through Triton's interpreter (TRITON_INTERPRET=1, set before the kernel
modules are imported, see test_ssa_triton.py); on a CUDA machine the compiled kernels.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

from engine.attention import ssa as ref  # noqa: E402
from test_ssa_triton import DEVICE, close, shell_tokens, tk  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _randn(gen, *shape, dtype=torch.float16, spread=1.0):
    return (torch.randn(*shape, generator=gen) * spread).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype,table_dtype", [(torch.float16, torch.float32), (torch.float16, torch.float16),
                                               (torch.bfloat16, torch.float32), (torch.float32, torch.float32)])
def test_add_table_rows_is_the_promoted_add_rounded_once(dtype, table_dtype):
    """Keys (a column slice of a projection) plus the rows of the position table picked by the index:
    torch.add(k, table.index_select(0, index)).to(k.dtype)."""
    gen = torch.Generator().manual_seed(7)
    n = 300
    projected = _randn(gen, n, 96, dtype=dtype, spread=3.0)
    keys = projected[:, 32:64]
    table = _randn(gen, 64, 32, dtype=table_dtype)
    index = torch.randint(0, 64, (n,), generator=gen).to(DEVICE)
    got = tk.add_table_rows(keys, table, index)
    want = torch.add(keys, table.index_select(0, index)).to(dtype)
    assert got.dtype == dtype and got.is_contiguous()
    if dtype == torch.bfloat16 and INTERPRETED:   # the interpreter truncates fp32 -> bf16
        torch.testing.assert_close(got.float(), want.float(), rtol=2 * torch.finfo(dtype).eps, atol=0)
    else:
        assert torch.equal(got, want)


def _coords(pattern: str) -> torch.Tensor:
    """Batch elements on shell `a` or `b`, in the order of `pattern` (e.g. "aab")."""
    shells = {"a": shell_tokens(32, 11.0, 0.025, seed=3), "b": shell_tokens(32, 9.0, 0.03, seed=4)}
    coords = torch.cat([shells[s].clone() for s in pattern])
    coords[:, 0] = torch.repeat_interleave(torch.arange(len(pattern)),
                                           torch.tensor([len(shells[s]) for s in pattern]))
    return coords


@pytest.mark.parametrize("pattern", ["aab", "aaba", "aa", "a"])
def test_module_fused_paths_match_unfused_and_torch_backend(monkeypatch, pattern):
    """SpatialSparseAttention with the one-pass keys + position (add_table_rows) and, where one group
    of elements holds equal row ranges ("aa", "a"), the gated sum written by the window kernel,
    against the same module without either and against backend="torch". "aab": elements 0, 1 side by
    side (strided views) and 2 alone; "aaba": the a-elements' starts are unevenly spaced, so their
    rows are copied side by side; both sum per element in a separate pass."""
    from engine.sparse import SparseVoxels
    coords = _coords(pattern).to(DEVICE)
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    torch.manual_seed(2)
    module = ref.SpatialSparseAttention(256, 16, 2, 8, 8, topk=4, window_size=8, shift_window=4, backend="triton")
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.1)
    module = module.to(DEVICE, dtype).eval()
    module.intra_block_pe.data = module.intra_block_pe.float()   # the released layout: fp32 positions
    module.record_selection = True
    x = torch.randn(coords.shape[0], 256).to(DEVICE, dtype)
    calls = {"selection": 0, "pe": 0, "gated window": 0}
    selection_attention, add_table_rows, windowed_attention = tk.selection_attention, tk.add_table_rows, \
        tk.windowed_attention

    def counted_selection(*args, **kwargs):
        calls["selection"] += 1
        return selection_attention(*args, **kwargs)

    def counted_pe(*args):
        calls["pe"] += 1
        return add_table_rows(*args)

    def counted_window(*args, **kwargs):
        calls["gated window"] += "gated_sum" in kwargs
        return windowed_attention(*args, **kwargs)
    with torch.no_grad(), monkeypatch.context() as patch:
        patch.setattr(tk, "selection_attention", counted_selection)
        patch.setattr(tk, "add_table_rows", counted_pe)
        patch.setattr(tk, "windowed_attention", counted_window)
        fused = module(SparseVoxels(x, coords)).feats
    groups = len(set(pattern))
    # one selection call per group of identical elements; the window sums when there is one group
    assert calls == {"selection": groups, "pe": 1, "gated window": int(groups == 1)}
    fused_selection = module.last_block_topk
    with torch.no_grad(), monkeypatch.context() as patch:
        patch.delattr(tk, "add_table_rows")
        patch.setattr(tk, "GATED_WINDOW", False)
        unfused = module(SparseVoxels(x, coords), block_topk=fused_selection).feats
        module.backend = "torch"
        oracle = module(SparseVoxels(x, coords), block_topk=fused_selection).feats
    if DEVICE == "cuda" or groups > 1:
        # bit for bit: keys + position rounded once either way, the window kernel's sum has the
        # separate pass's roundings (on CPU without a CUDA device the separate sum is PyTorch's)
        assert torch.equal(fused, unfused)
    assert close(fused, oracle, rtol=5e-2, atol=5e-3)
