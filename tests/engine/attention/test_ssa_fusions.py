"""SSA fusions against the unfused paths: the gated branch sum written by the selection kernel's
epilogue (both selection passes, side-by-side elements) and the keys plus intra-block position in one
pass, each bitwise equal to the unfused Triton path and close to the PyTorch reference.

On CPU the kernels run through Triton's interpreter (TRITON_INTERPRET=1, set before the kernel
modules are imported, see test_ssa_triton.py); on a CUDA machine the compiled kernels.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

from engine.attention import ssa as ref  # noqa: E402
from engine.kernels import fix_interpreter_bf16_dot  # noqa: E402
from test_ssa_triton import DEVICE, close, shell_tokens, tk  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRETED:
    fix_interpreter_bf16_dot()   # the selection kernel multiplies bf16 tiles


def _gated_branch_sum():
    """engine.kernels.modulation.gated_branch_sum, the unfused pass (interpreted on CPU)."""
    import engine.kernels.modulation as mk
    if INTERPRETED:
        from triton.runtime.interpreter import InterpretedFunction
        if not isinstance(mk._gated_sum_kernel, InterpretedFunction):
            mk = importlib.reload(mk)
    return mk.gated_branch_sum


gated_branch_sum = _gated_branch_sum()


def _blocks(seed: int, keep: float = 0.03):
    """(tokens, block offsets, number of blocks) of a thinned, block-sorted shell."""
    blocks = ref.compute_ssa_layout(shell_tokens(32, 11.0, keep, seed), 8, 8).elements[0].blocks
    return int(blocks.block_offsets[-1]), blocks.block_offsets.to(DEVICE), blocks.num_blocks


def _randn(gen, *shape, dtype=torch.float16, spread=1.0):
    return (torch.randn(*shape, generator=gen) * spread).to(dtype).to(DEVICE)


def _selection(gen, heads: int, n: int, num_blocks: int, topk: int = 8):
    """First half of the tokens on the same blocks (shared tiles), second half random (per-token
    pass), one short selection."""
    sel = torch.rand(heads, n, num_blocks, generator=gen).argsort(-1)[..., :topk].sort(-1).values
    sel[:, : n // 2] = torch.randperm(num_blocks, generator=gen)[:topk].sort().values
    sel[-1, 5, 3:] = -1
    return sel.to(torch.int32).to(DEVICE)


def _near(got, want) -> bool:
    """`close` for fp16; for bf16 (8-bit mantissa, and the interpreter's casts truncate) looser."""
    if got.dtype != torch.bfloat16:
        return close(got, want)
    a, b = got.float().cpu(), want.float().cpu()
    return bool((a - b).norm() / b.norm() < 1.2e-2) and torch.allclose(a, b, rtol=4e-2, atol=2e-2)


def _reference_sum(compressed, selected, windowed, logits):
    """The gated sum in fp32 (PyTorch oracle)."""
    g = torch.sigmoid(logits[..., :3].float()).unsqueeze(-1).unsqueeze(-1)
    return g[:, 0] * compressed.float() + g[:, 1] * selected.float() + g[:, 2] * windowed.float()


PASSES = [  # (tokens per program, split): which selection passes compute the tiles; dtype
    pytest.param(4, None, torch.float16, id="one-pass"),
    pytest.param(4, 0.45, torch.float16, id="shared+per-token"),
    pytest.param(4, float("inf"), torch.float16, id="shared"),
    pytest.param(4, 0.45, torch.bfloat16, id="shared+per-token-bf16"),
]


@pytest.mark.parametrize("tokens,split,dtype", PASSES)
def test_gated_sum_in_selection_epilogue(tokens, split, dtype):
    """One element whose window output, gate logits and output are rows 3.. of larger tensors."""
    n, offsets, nb = _blocks(seed=31)
    gen = torch.Generator().manual_seed(5)
    hq, hkv, d, pad = 32, 2, 16, 3
    q, k, v = _randn(gen, n, hq, d, dtype=dtype, spread=1.5), _randn(gen, n, hkv, d, dtype=dtype, spread=1.5), \
        _randn(gen, n, hkv, d, dtype=dtype)
    compressed = _randn(gen, n, hq, d, dtype=dtype)
    windowed = _randn(gen, n + pad + 2, hq, d, dtype=dtype)
    projected = _randn(gen, n + pad + 2, 24, dtype=dtype, spread=2.0)    # gate logits: columns 9..
    rows = slice(pad, pad + n)
    sel = _selection(gen, hkv, n, nb)
    selected = tk.selection_attention(q, k, v, sel, offsets, tokens_per_program=tokens, split=split)
    want = gated_branch_sum(compressed, selected, windowed[rows], projected[rows, 9:])
    buffer = torch.full((n + pad + 2, hq, d), float("nan"), dtype=dtype, device=DEVICE)
    got = tk.selection_attention(q, k, v, sel, offsets, tokens_per_program=tokens, split=split,
                                 gated_sum=(compressed, windowed[rows], projected[rows, 9:]), out=buffer[rows])
    assert got.data_ptr() == buffer[rows].data_ptr() and got.dtype == dtype
    assert torch.equal(got, want)                              # the unfused Triton path, bit for bit
    assert buffer[:pad].isnan().all() and buffer[rows.stop:].isnan().all()
    oracle = _reference_sum(compressed, ref.selection_attention(q, k, v, sel, offsets), windowed[rows],
                            projected[rows, 9:])
    assert _near(got, oracle)


def test_gated_sum_in_selection_epilogue_side_by_side():
    """Two elements on the same blocks, read and written in place: their rows start 2 and 2 + n + 3
    of the full tensors (element stride n + 3 rows); both selection passes."""
    n, offsets, nb = _blocks(seed=33)
    gen = torch.Generator().manual_seed(6)
    hq, hkv, d, total = 32, 2, 16, 2 * n + 7
    element_rows = [slice(2, 2 + n), slice(5 + n, 5 + 2 * n)]
    q, k, v = _randn(gen, total, hq, d, spread=1.5), _randn(gen, total, hkv, d, spread=1.5), _randn(gen, total, hkv, d)
    windowed, projected = _randn(gen, total, hq, d), _randn(gen, total, 24, spread=2.0)
    logits = projected[:, 9:]
    compressed = _randn(gen, n, 2 * hq, d)             # combined heads, as compressed_attention returns
    sel = _selection(gen, 2 * hkv, n, nb)
    q_m, k_m, v_m = (ref._element_view(t, element_rows) for t in (q, k, v))
    assert q_m.data_ptr() == q[2:].data_ptr()
    out = torch.full_like(windowed, float("nan"))
    views = [ref._element_rows(t, element_rows) for t in (windowed, logits, out)]
    got = tk.selection_attention(q_m, k_m, v_m, sel, offsets, tokens_per_program=4, split=0.45,
                                 gated_sum=(compressed, views[0], views[1]), out=views[2])
    assert got.shape == (n, 2, hq, d) and got.data_ptr() == out[2:].data_ptr()
    selected = tk.selection_attention(q_m, k_m, v_m, sel, offsets, tokens_per_program=4, split=0.45)
    for j, rows in enumerate(element_rows):
        heads = slice(j * hq, (j + 1) * hq)
        want = gated_branch_sum(compressed[:, heads], selected[:, heads], windowed[rows], logits[rows])
        assert torch.equal(out[rows], want), j
        oracle = ref.selection_attention(q[rows], k[rows], v[rows], sel[j * hkv:(j + 1) * hkv], offsets)
        assert close(out[rows], _reference_sum(compressed[:, heads], oracle, windowed[rows], logits[rows]))
    assert out[:2].isnan().all() and out[2 + n:5 + n].isnan().all() and out[-2:].isnan().all()
    with pytest.raises(ValueError):   # two elements need [N, E, ...] window / gate / output views
        tk.selection_attention(q_m, k_m, v_m, sel, offsets, gated_sum=(compressed, windowed[:n], logits[:n]),
                               out=out[:n])


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


@pytest.mark.parametrize("pattern", ["aab", "aaba"])
def test_module_fused_paths_match_unfused_and_torch_backend(monkeypatch, pattern):
    """SpatialSparseAttention with the fusions (epilogue gated sum, one-pass keys + position) against
    the same module without them and against backend="torch". "aab": elements 0, 1 side by side and 2
    alone, all summed in the selection epilogue; "aaba": the a-elements' starts are unevenly spaced,
    so their gated sum stays a separate pass."""
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
    calls = {"gated": 0, "selection": 0, "pe": 0}
    selection_attention, add_table_rows = tk.selection_attention, tk.add_table_rows

    def counted_selection(*args, **kwargs):
        calls["gated" if "gated_sum" in kwargs else "selection"] += 1
        return selection_attention(*args, **kwargs)

    def counted_pe(*args):
        calls["pe"] += 1
        return add_table_rows(*args)
    with torch.no_grad(), monkeypatch.context() as patch:
        patch.setattr(tk, "selection_attention", counted_selection)
        patch.setattr(tk, "add_table_rows", counted_pe)
        fused = module(SparseVoxels(x, coords)).feats
    assert calls == ({"gated": 2, "selection": 0, "pe": 1} if pattern == "aab" else {"gated": 1, "selection": 1, "pe": 1})
    fused_selection = module.last_block_topk
    with torch.no_grad(), monkeypatch.context() as patch:
        patch.setattr(tk, "GATED_SELECTION", False)
        patch.delattr(tk, "add_table_rows")
        unfused = module(SparseVoxels(x, coords), block_topk=fused_selection).feats
        module.backend = "torch"
        oracle = module(SparseVoxels(x, coords), block_topk=fused_selection).feats
    if DEVICE == "cuda":   # the unfused Triton path (one gated-sum pass per element), bit for bit
        assert torch.equal(fused, unfused)
    else:                  # the PyTorch gated sum (fp32 here): same up to fused multiply-adds
        torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-6)
    assert close(fused, oracle, rtol=5e-2, atol=5e-3)


_COMPILE_SCRIPT = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import engine.attention.triton.pool as P
import engine.attention.triton.selection as SL

def compile_sm90(fn, sig, consts, mma, **options):
    names = list(sig)
    # like the JIT: pointers and strides specialised as divisible by 16
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if sig[n].startswith("*") or (n.startswith("s") and sig[n] == "i32")}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, **options)).asm["ptx"]
    assert not mma or "wgmma" in ptx or "mma.sync" in ptx, fn.__name__ + ": no tensor-core instructions"
    print(fn.__name__, consts, "ok")

i32, f32, h = "i32", "fp32", "*fp16"
SL_SIG = dict(q_ptr=h, k_ptr=h, v_ptr=h, o_ptr=h, sel_ptr="*i32", offsets_ptr="*i32", tab_ptr="*i32", flag_ptr="*i8",
              c_ptr=h, w_ptr=h, g_ptr=h, n_tokens=i32, topk=i32, n_tiles=i32, n_flag_tiles=i32, hkv_e=i32,
              **{s: i32 for s in ("sq_n sq_h sq_b sk_n sk_h sk_b sv_n sv_h sv_b so_n so_h so_b ss_h ss_n "
                                  "sc_n sc_h sc_b sw_n sw_h sw_b sg_n sg_b").split()},
              scale_log2=f32, split=f32,
              **{c: "constexpr" for c in "G TOKENS D U KP BLOCK_N CH MODE PARENT GATED".split()})
for tokens, mode, gated in ((4, 0, True), (4, 1, True), (1, 2, True), (4, 1, False), (1, 2, False)):
    compile_sm90(SL._selection_fwd, SL_SIG, dict(G=16, TOKENS=tokens, D=64, U=8 * tokens, KP=8, BLOCK_N=32,
                                                 CH=8 * tokens, MODE=mode, PARENT=4, GATED=gated), True,
                 num_stages=3)
P_SIG = dict(x_ptr=h, table_ptr="*fp32", index_ptr="*i64", out_ptr=h, n_rows=i32, channels=i32, sx=i32, st=i32,
             so=i32, BLOCK_R="constexpr", BLOCK_C="constexpr")
compile_sm90(P._add_table_rows_fwd, P_SIG, dict(BLOCK_R=32, BLOCK_C=128), False)
'''


def test_kernels_compile_for_hopper():
    """The fused selection epilogue (every pass, gated or not) and the keys + position kernel lower to
    sm_90 (the interpreter does not catch everything the compiler rejects)."""
    from helpers.sm90 import compile_for_sm90

    assert compile_for_sm90(_COMPILE_SCRIPT, timeout=300).count(" ok") == 6
