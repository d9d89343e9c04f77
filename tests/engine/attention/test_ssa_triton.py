"""Triton SSA kernels against the PyTorch reference (engine.attention.ssa).

On CPU the kernels run through Triton's interpreter (TRITON_INTERPRET=1, set below before the kernel
modules are imported or reloaded); on a CUDA machine the same tests run the compiled kernels.
Token sets: spherical-shell voxels on a 32^3 grid, thinned to a few hundred, block-sorted.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

from engine.attention import ssa as ref  # noqa: E402
from engine.sparse.ordering import sort_block_order  # noqa: E402


def _load_kernels():
    """Import engine.attention.triton; reload its modules if they were built without the interpreter."""
    import engine.attention.triton as tk
    from engine.kernels import fix_interpreter_scalar_index
    if os.environ.get("TRITON_INTERPRET") == "1":
        fix_interpreter_scalar_index()   # (also applied on import when the variable is set)
        from triton.runtime.interpreter import InterpretedFunction
        from engine.attention.triton import compressed
        if not isinstance(compressed._compressed_fwd, InterpretedFunction):
            for name in sorted(n for n in sys.modules if n.startswith("engine.attention.triton.")):
                importlib.reload(sys.modules[name])
            tk = importlib.reload(tk)
    return tk


tk = _load_kernels()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def shell_tokens(grid: int, radius: float, keep: float, seed: int, centre=None) -> torch.Tensor:
    """Block-sorted coords [N, 4] (batch 0) of a thinned spherical shell of thickness ~1 voxel."""
    g = torch.Generator().manual_seed(seed)
    axis = torch.arange(grid, dtype=torch.float32)
    x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")
    c = torch.tensor(centre if centre is not None else [grid / 2 - 0.5] * 3)
    dist = ((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2).sqrt()
    on = (dist - radius).abs() < 0.75
    pts = torch.stack([x[on], y[on], z[on]], dim=1).long()
    pts = pts[torch.rand(pts.shape[0], generator=g) < keep]
    coords = torch.cat([torch.zeros(pts.shape[0], 1, dtype=torch.long), pts], dim=1).int()
    return coords[sort_block_order(coords, 8)]


def make_case(cbs: int, hq: int, hkv: int, seed: int, radius=11.0, keep=0.06, dtype=torch.float16, d=32,
              grid=32):
    coords = shell_tokens(grid, radius, keep, seed)
    layout = ref.compute_ssa_layout(coords, cbs, 8)
    blocks = layout.elements[0].blocks
    n, nc = coords.shape[0], layout.comp_coords.shape[0]
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(n, hq, d, generator=g) * 1.5
    k = torch.randn(n, hkv, d, generator=g) * 1.5
    v = torch.randn(n, hkv, d, generator=g)
    ck = torch.randn(nc, hkv, d, generator=g) * 1.5
    cv = torch.randn(nc, hkv, d, generator=g)
    cast = lambda t: t.to(dtype).to(DEVICE)  # noqa: E731
    return dict(q=cast(q), k=cast(k), v=cast(v), ck=cast(ck), cv=cast(cv),
                comp_block_ids=blocks.comp_block_ids.to(DEVICE), num_blocks=blocks.num_blocks,
                block_offsets=blocks.block_offsets.to(DEVICE))


def close(a, b, rtol=2e-2, atol=2e-3):
    a, b = a.float().cpu(), b.float().cpu()
    err = (a - b).norm() / b.norm()
    return bool(torch.isfinite(a).all()) and err < 3e-3 and torch.allclose(a, b, rtol=rtol, atol=atol)


def topk_agrees(got: torch.Tensor, case: dict, lse: torch.Tensor, topk: int, rel: float = 1e-6) -> None:
    """Rows identical to the reference except where its k-th and (k+1)-th scores are within `rel`."""
    want = ref.select_blocks(case["q"], case["ck"], lse, case["comp_block_ids"], case["num_blocks"], topk)
    assert got.shape == want.shape and got.dtype == torch.int32
    differ = (got != want).any(dim=-1)                                   # [Hkv, N]
    if differ.any():
        scores = ref.block_scores(case["q"], case["ck"], lse, case["comp_block_ids"], case["num_blocks"])
        k = min(topk, case["num_blocks"])
        assert k < case["num_blocks"], "every block is selected: rows must match exactly"
        top = torch.topk(scores, k + 1, dim=-1).values
        near_tie = (top[..., k - 1] - top[..., k]).abs() <= rel * top[..., k - 1].abs()
        assert not (differ & ~near_tie).any(), f"{int((differ & ~near_tie).sum())} rows differ"
        assert differ.float().mean() < 0.02


# Larger query tiles on CPU: the interpreter's cost is per program, the kernel logic is the same.
TILE = None if DEVICE == "cuda" else 16

# Triton 3.6's interpreter misreads bf16 tensors (garbage loads), so bf16 runs on CUDA only.
BF16_OR_FP32 = torch.bfloat16 if DEVICE == "cuda" else torch.float32

CASES = [  # (compression block, Hq, Hkv, topk, dtype)
    pytest.param(8, 32, 2, 8, torch.float16, id="v1.1-cbs8-top8-fp16"),
    pytest.param(4, 32, 2, 8, torch.float16, id="v1.0-cbs4-top8-fp16"),
    pytest.param(4, 16, 2, 32, BF16_OR_FP32, id="v1.0-cbs4-top32-bf16|fp32"),
    pytest.param(8, 8, 2, 4, torch.float16, id="gqa4-cbs8-top4-fp16"),
]


@pytest.mark.parametrize("cbs,hq,hkv,topk,dtype", CASES)
def test_ssa_kernels_match_reference(cbs, hq, hkv, topk, dtype):
    big = dict(grid=48, radius=17.0, keep=0.012) if topk > 16 else {}   # > 32 blocks for top-32
    case = make_case(cbs, hq, hkv, seed=cbs + hq + topk, dtype=dtype, **big)
    assert case["num_blocks"] > topk      # more blocks than the selection keeps
    q, ck, cv = case["q"], case["ck"], case["cv"]
    # compressed attention and its lse
    out, lse = tk.compressed_attention(q, ck, cv, tokens_per_program=TILE)
    ref_out, ref_lse = ref.compressed_attention(q, ck, cv)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    assert close(out, ref_out) if dtype != torch.bfloat16 else close(out, ref_out, rtol=4e-2, atol=1e-2)
    assert torch.allclose(lse.cpu(), ref_lse.cpu(), rtol=1e-5, atol=1e-5)
    # top-k blocks from the same lse
    got = tk.select_blocks(q, ck, ref_lse, case["comp_block_ids"], case["num_blocks"], topk,
                           tokens_per_program=TILE)
    topk_agrees(got, case, ref_lse, topk)
    # the other scoring layout and merges (top-32 "extract" is slow to interpret: CUDA only)
    if topk <= 8:
        got = tk.select_blocks(q, ck, ref_lse, case["comp_block_ids"], case["num_blocks"], topk,
                               variant="rows", tokens_per_program=TILE, merge="replace")
        topk_agrees(got, case, ref_lse, topk)
        if cbs == 4 or DEVICE == "cuda":
            got = tk.select_blocks(q, ck, ref_lse, case["comp_block_ids"], case["num_blocks"], topk,
                                   variant="heads", tokens_per_program=TILE, merge="replace")
            topk_agrees(got, case, ref_lse, topk)
    elif DEVICE == "cuda":
        got = tk.select_blocks(q, ck, ref_lse, case["comp_block_ids"], case["num_blocks"], topk,
                               merge="extract")
        topk_agrees(got, case, ref_lse, topk)
    if hq == 8:                           # the bitonic "sort" merge (small top-k: cheap to interpret)
        got = tk.select_blocks(q, ck, ref_lse, case["comp_block_ids"], case["num_blocks"], topk,
                               tokens_per_program=TILE, merge="sort")
        topk_agrees(got, case, ref_lse, topk)
    # selection attention on the reference selection
    sel = ref.select_blocks(q, ck, ref_lse, case["comp_block_ids"], case["num_blocks"], topk)
    want = ref.selection_attention(q, case["k"], case["v"], sel, case["block_offsets"])
    got = tk.selection_attention(q, case["k"], case["v"], sel, case["block_offsets"],
                                 tokens_per_program=TILE)
    assert got.dtype == dtype
    assert close(got, want) if dtype != torch.bfloat16 else close(got, want, rtol=4e-2, atol=1e-2)
    if cbs == 8 and hq == 32:             # other key tiles, 4-token tiles
        got = tk.selection_attention(q, case["k"], case["v"], sel, case["block_offsets"],
                                     tokens_per_program=4, block_n=64)
        assert close(got, want)
        # a block repeated within one token's selection counts once
        repeated = sel.clone()
        repeated[..., 1] = repeated[..., 0]
        once = torch.where(torch.arange(topk, device=sel.device) == 1, -1, repeated)
        want = ref.selection_attention(q, case["k"], case["v"], once, case["block_offsets"])
        got = tk.selection_attention(q, case["k"], case["v"], repeated, case["block_offsets"],
                                     tokens_per_program=TILE)
        assert close(got, want)


def test_fewer_blocks_than_topk_and_default_tiles():
    # a small shell: fewer non-empty blocks than topk -> all blocks, ascending, then -1 padding;
    # default (GPU) tile sizes, per-token selection tiles, N not a multiple of any tile
    case = make_case(4, 32, 2, seed=5, radius=3.0, keep=0.22)
    nb, n = case["num_blocks"], case["q"].shape[0]
    assert nb < 32 and n % 4 != 0
    q, ck, cv = case["q"], case["ck"], case["cv"]
    out, lse = tk.compressed_attention(q, ck, cv)
    ref_out, ref_lse = ref.compressed_attention(q, ck, cv)
    assert close(out, ref_out) and torch.allclose(lse.cpu(), ref_lse.cpu(), rtol=1e-5, atol=1e-5)
    got = tk.select_blocks(q, ck, lse, case["comp_block_ids"], nb, 32)
    expect = torch.full_like(got, -1)
    expect[..., :nb] = torch.arange(nb, dtype=torch.int32, device=got.device)
    assert torch.equal(got, expect)
    want = ref.selection_attention(q, case["k"], case["v"], got, case["block_offsets"])
    for tokens in (None, 1):
        out = tk.selection_attention(q, case["k"], case["v"], got, case["block_offsets"],
                                     tokens_per_program=tokens)
        assert close(out, want)


def test_selection_split_between_shared_tiles_and_per_token_pass():
    """Tiles whose tokens chose unrelated blocks go to the per-token pass: with every tile there
    (split 0), none (split inf) or some (coherent first half, random second half), exact per-token
    top-k attention; on two side-by-side elements too."""
    case = make_case(8, 32, 2, seed=31, keep=0.05)
    n, nb, topk = case["q"].shape[0], case["num_blocks"], 8
    g = torch.Generator().manual_seed(3)
    shared = torch.randperm(nb, generator=g)[:topk].sort().values
    sel = torch.rand(2, n, nb, generator=g).argsort(-1)[..., :topk].sort(-1).values
    sel[:, : n // 2] = shared          # first half: the same blocks for every token
    sel[1, 5, 3:] = -1                 # a short selection
    sel = sel.to(torch.int32).to(DEVICE)
    want = ref.selection_attention(case["q"], case["k"], case["v"], sel, case["block_offsets"])
    for split in (0.0, float("inf"), 0.45):
        got = tk.selection_attention(case["q"], case["k"], case["v"], sel, case["block_offsets"],
                                     tokens_per_program=4, split=split)
        assert close(got, want), split
    pair, rows, _ = _side_by_side_case(seed=33)
    q, k, v = (ref._element_view(pair[name], rows) for name in ("q", "k", "v"))
    m = rows[0].stop
    sel2 = torch.rand(4, m, pair["num_blocks"], generator=g).argsort(-1)[..., :topk].sort(-1).values
    sel2 = sel2.to(torch.int32).to(DEVICE)
    want = tk.selection_attention(q, k, v, sel2, pair["block_offsets"], tokens_per_program=4)
    got = tk.selection_attention(q, k, v, sel2, pair["block_offsets"], tokens_per_program=4, split=0.45)
    assert close(got, want)


@pytest.mark.parametrize("silu", [False, True])
def test_block_pool_matches_the_float64_index_add(silu):
    """The compression's pooling kernel: sum / (count + 1) per compressed token in float64, rows found
    through the sorted token order (any order of the tokens), optionally of SiLU(rows)."""
    coords = shell_tokens(32, 11.0, 0.06, 41)
    layout = ref.compute_ssa_layout(coords, 4, 8)
    g = torch.Generator().manual_seed(2)
    feats = (torch.randn(coords.shape[0], 48, generator=g) * 3).half()
    want = ref._block_pool(feats, layout, silu=silu)
    order = torch.argsort(layout.token_to_comp, stable=True)
    offsets = torch.nn.functional.pad(torch.cumsum(layout.comp_counts, 0), (1, 0))
    got = tk.block_pool(feats.to(DEVICE), order.to(DEVICE), offsets.to(DEVICE), silu=silu).cpu()
    assert got.dtype == torch.float16 and got.shape == want.shape
    assert (got.float() - want.float()).abs().max() <= 1e-3 * want.float().abs().max()
    assert (got != want).float().mean() < 0.01      # float64 sums in another order; exp of another libm


def _side_by_side_case(seed: int, m: int = 2):
    """A case whose q/k/v/ck/cv hold m batch elements' rows one after the other (same coordinates)."""
    case = make_case(8, 32, 2, seed=seed, keep=0.03)
    n, nc = case["q"].shape[0], case["ck"].shape[0]
    g = torch.Generator().manual_seed(seed + 7)
    for name in ("q", "k", "v", "ck", "cv"):
        extra = torch.randn((m - 1) * case[name].shape[0], *case[name].shape[1:], generator=g)
        case[name] = torch.cat([case[name], extra.to(case[name].dtype).to(DEVICE)])
    return case, [slice(j * n, (j + 1) * n) for j in range(m)], [slice(j * nc, (j + 1) * nc) for j in range(m)]


def test_kernels_read_batch_elements_in_place():
    """[N, E, H, D] strided views of each element's rows give exactly the side-by-side (copied) result."""
    case, rows, comp_rows = _side_by_side_case(seed=21)
    views = {name: ref._element_view(case[name], comp_rows if name in ("ck", "cv") else rows)
             for name in ("q", "k", "v", "ck", "cv")}
    copies = {name: ref._side_by_side(case[name], comp_rows if name in ("ck", "cv") else rows)
              for name in ("q", "k", "v", "ck", "cv")}
    assert views["q"].shape == (rows[0].stop, 2, 32, 32) and views["q"].data_ptr() == case["q"].data_ptr()
    out_v, lse_v = tk.compressed_attention(views["q"], views["ck"], views["cv"], tokens_per_program=TILE)
    out_c, lse_c = tk.compressed_attention(copies["q"], copies["ck"], copies["cv"], tokens_per_program=TILE)
    assert torch.equal(out_v, out_c) and torch.equal(lse_v, lse_c)
    sel_v = tk.select_blocks(views["q"], views["ck"], lse_c, case["comp_block_ids"], case["num_blocks"], 8,
                             tokens_per_program=TILE)
    sel_c = tk.select_blocks(copies["q"], copies["ck"], lse_c, case["comp_block_ids"], case["num_blocks"], 8,
                             tokens_per_program=TILE)
    assert sel_v.shape == (4, rows[0].stop, 8) and torch.equal(sel_v, sel_c)
    got = tk.selection_attention(views["q"], views["k"], views["v"], sel_c, case["block_offsets"],
                                 tokens_per_program=TILE)
    want = tk.selection_attention(copies["q"], copies["k"], copies["v"], sel_c, case["block_offsets"],
                                  tokens_per_program=TILE)
    assert torch.equal(got, want)
    # uneven starts: no single view
    assert ref._element_view(case["q"], [slice(0, 3), slice(5, 8), slice(9, 12)]) is None


def test_module_triton_backend_matches_torch_backend(monkeypatch):
    """SpatialSparseAttention on two elements with the same coordinates (read in place by the
    kernels; on CUDA also the one-pass gated sum) and a third with others, against backend="torch"."""
    from engine.sparse import SparseVoxels
    a = shell_tokens(32, 11.0, 0.05, seed=3)
    b = shell_tokens(32, 9.0, 0.06, seed=4)
    coords = torch.cat([a, a.clone(), b])
    coords[:, 0] = torch.repeat_interleave(torch.tensor([0, 1, 2]), torch.tensor([len(a), len(a), len(b)]))
    torch.manual_seed(2)
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    modules = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(2)
        module = ref.SpatialSparseAttention(256, 16, 2, 8, 8, topk=4, window_size=8, shift_window=4,
                                            backend=backend)
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0, 0.1)
        modules[backend] = module.to(DEVICE, dtype).eval()
        module.record_selection = True
    x = torch.randn(coords.shape[0], 256).to(DEVICE, dtype)
    copy = ref._side_by_side

    def no_copies(tensor, row_ranges):
        assert len(row_ranges) == 1, "elements copied side by side"
        return copy(tensor, row_ranges)
    outs = {}
    with torch.no_grad():
        for backend, module in modules.items():
            if backend == "triton":
                monkeypatch.setattr(ref, "_side_by_side", no_copies)
            outs[backend] = module(SparseVoxels(x, coords.to(DEVICE))).feats
    for got, want in zip(modules["triton"].last_block_topk, modules["torch"].last_block_topk):
        assert (got != want).any(-1).float().mean() < 0.02       # near-ties may differ
    assert close(outs["triton"], outs["torch"], rtol=5e-2, atol=5e-3)


def test_block_members_layout():
    ids = torch.tensor([0, 2, 1, 0, 2, 2], dtype=torch.int32)
    members = tk.block_members(ids, 3)
    assert members.shape == (3, 4)
    assert members.tolist() == [[0, 3, -1, -1], [2, -1, -1, -1], [1, 4, 5, -1]]
    assert tk.block_members(torch.arange(5, dtype=torch.int32), 5).tolist() == [[i] for i in range(5)]


@pytest.mark.parametrize("shift", [0, 4])
def test_windowed_attention(shift):
    from engine.sparse.attention import window_partition, windowed_attention
    case = make_case(8, 32, 2, seed=13 + shift, keep=0.08)
    coords = shell_tokens(32, 11.0, 0.08, 13 + shift).to(DEVICE)
    assert coords.shape[0] == case["q"].shape[0]
    part = window_partition(coords, 8, shift)
    want = windowed_attention(case["q"], case["k"], case["v"], part)
    got = tk.windowed_attention(case["q"], case["k"], case["v"], part, tokens_per_program=TILE)
    assert got.dtype == case["q"].dtype
    assert close(got, want)


_COMPILE_SCRIPT = r'''
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import engine.attention.triton.compressed as C
import engine.attention.triton.pool as P
import engine.attention.triton.select as S
import engine.attention.triton.selection as SL

def compile_sm90(fn, sig, consts, mma=True, **options):
    names = list(sig)
    # like the JIT: pointers and strides specialised as divisible by 16
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if sig[n].startswith("*") or (n.startswith("s") and sig[n] == "i32")}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, **options))
    ptx = kernel.asm["ptx"]
    assert not mma or "wgmma" in ptx or "mma.sync" in ptx, fn.__name__ + ": no tensor-core instructions"
    print(fn.__name__, consts, "ok")

i32, f32, h = "i32", "fp32", "*fp16"
C_SIG = dict(q_ptr=h, k_ptr=h, v_ptr=h, o_ptr=h, lse_ptr="*fp32", n_tokens=i32, n_comp=i32, hkv_e=i32, sq_n=i32,
             sq_h=i32, sq_b=i32, sk_n=i32, sk_h=i32, sk_b=i32, sv_n=i32, sv_h=i32, sv_b=i32, so_n=i32, so_h=i32,
             scale_log2=f32,
             G="constexpr", TOKENS="constexpr", D="constexpr", BLOCK_N="constexpr")
compile_sm90(C._compressed_fwd, C_SIG, dict(G=16, TOKENS=4, D=32, BLOCK_N=64))
S_SIG = dict(q_ptr=h, k_ptr=h, lse_ptr="*fp32", members_ptr="*i32", out_ptr="*i32", n_tokens=i32, num_blocks=i32,
             topk=i32, hkv_e=i32, sq_n=i32, sq_h=i32, sq_b=i32, sk_n=i32, sk_h=i32, sk_b=i32, so_h=i32, so_n=i32,
             scale_log2=f32,
             G="constexpr", TOKENS="constexpr", D="constexpr", R="constexpr", BLOCK_B="constexpr", W="constexpr",
             REPLACE="constexpr", SORT="constexpr")
for r in (1, 8):
    compile_sm90(S._select_heads_fwd, S_SIG, dict(G=16, TOKENS=64, D=32, R=r, BLOCK_B=32, W=8, REPLACE=False, SORT=False))
compile_sm90(S._select_rows_fwd, S_SIG, dict(G=16, TOKENS=4, D=32, R=8, BLOCK_B=8, W=32, REPLACE=True, SORT=False))
compile_sm90(S._select_rows_fwd, S_SIG, dict(G=16, TOKENS=4, D=32, R=1, BLOCK_B=64, W=8, REPLACE=False, SORT=True))
SL_SIG = dict(q_ptr=h, k_ptr=h, v_ptr=h, o_ptr=h, sel_ptr="*i32", offsets_ptr="*i32", tab_ptr="*i32", n_tokens=i32,
              topk=i32, n_tiles=i32, hkv_e=i32, sq_n=i32, sq_h=i32, sq_b=i32, sk_n=i32, sk_h=i32, sk_b=i32, sv_n=i32,
              sv_h=i32, sv_b=i32, so_n=i32, so_h=i32, ss_h=i32, ss_n=i32, scale_log2=f32,
              G="constexpr", TOKENS="constexpr", D="constexpr", U="constexpr", KP="constexpr", BLOCK_N="constexpr",
              CH="constexpr")
for block_n, kp, ch in ((32, 8, 32), (64, 32, 32)):
    compile_sm90(SL._selection_fwd, SL_SIG, dict(G=16, TOKENS=4, D=32, U=4 * kp, KP=kp, BLOCK_N=block_n, CH=ch),
                 num_stages=3)
P_SIG = dict(x_ptr=h, table_ptr="*fp32", index_ptr="*i64", out_ptr=h, n_rows=i32, channels=i32, sx=i32, st=i32,
             so=i32, BLOCK_R="constexpr", BLOCK_C="constexpr")
compile_sm90(P._add_table_rows_fwd, P_SIG, dict(BLOCK_R=32, BLOCK_C=128), mma=False)
'''


def test_kernels_compile_for_hopper():
    """The interpreter does not catch everything the compiler rejects (e.g. a tensor changing shape
    inside a runtime `if`): compile the GPU configurations for sm_90 ahead of time, no GPU needed
    (the window kernel: test_window_kernel.py)."""
    from helpers.sm90 import compile_for_sm90

    assert compile_for_sm90(_COMPILE_SCRIPT, timeout=300).count(" ok") == 8
