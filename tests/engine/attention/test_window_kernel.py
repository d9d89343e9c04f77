"""The Triton sliding-window kernel (engine.attention.triton.window) against the PyTorch reference
(engine.sparse.windowed_attention).

On CPU the kernel runs through Triton's interpreter (TRITON_INTERPRET=1, set below before the kernel
modules are imported or reloaded); on a CUDA machine the same tests run the compiled kernel. Token
sets are small: a dense window (more tokens than one query chunk or key tile), a sparse spread,
isolated single-token windows, and a second batch element.
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

from engine.sparse.attention import window_partition, windowed_attention  # noqa: E402


def _load_window_module():
    """engine.attention.triton.window, reloaded (with its package) if built without the interpreter."""
    import engine.attention.triton.window as window
    if os.environ.get("TRITON_INTERPRET") == "1":
        from engine.kernels import fix_interpreter_bf16_dot, fix_interpreter_scalar_index
        fix_interpreter_scalar_index()
        fix_interpreter_bf16_dot()
        from triton.runtime.interpreter import InterpretedFunction
        if not isinstance(window._window_fwd, InterpretedFunction):
            for name in sorted(n for n in sys.modules if n.startswith("engine.attention.triton.")):
                importlib.reload(sys.modules[name])
            importlib.reload(sys.modules["engine.attention.triton"])
            window = sys.modules["engine.attention.triton.window"]
    return window


W = _load_window_module()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def token_coords(seed: int) -> torch.Tensor:
    """Coords [N, 4] (two batch elements, a few hundred tokens, unique): two dense 7^3 boxes (one
    window each, unshifted / shifted by 4), a sparse spread over 24^3, and isolated voxels far from the rest (windows of
    one token under both shifts)."""
    g = torch.Generator().manual_seed(seed)
    dense = torch.cat([torch.randint(0, 7, (100, 3), generator=g),          # one window unshifted
                       torch.randint(12, 19, (100, 3), generator=g)])       # one window shifted by 4
    spread = torch.randint(0, 24, (120, 3), generator=g)
    lone = torch.tensor([[60, 60, 60], [60, 3, 44], [44, 60, 3]])
    first = torch.unique(torch.cat([dense, spread, lone]), dim=0)
    second = torch.unique(torch.randint(8, 20, (60, 3), generator=g), dim=0)
    coords = torch.cat([torch.cat([torch.zeros(len(first), 1, dtype=torch.long), first], 1),
                        torch.cat([torch.ones(len(second), 1, dtype=torch.long), second], 1)])
    return coords[torch.randperm(len(coords), generator=g)].int()   # rows in no particular order


def make_qkv(n: int, hq: int, hkv: int, d: int, dtype, seed: int, strided: bool = False):
    """q [n, hq, d], k/v [n, hkv, d]; with `strided`, views into one projection-like buffer (token
    stride = its padded width, k/v interleaved per token)."""
    g = torch.Generator().manual_seed(seed)
    width = (hq + 2 * hkv) * d + 16 if strided else None
    if strided:
        buf = (torch.randn(n, width, generator=g) * 1.5).to(dtype).to(DEVICE)
        q = buf[:, :hq * d].view(n, hq, d)
        kv = buf[:, hq * d:(hq + 2 * hkv) * d].view(n, hkv, 2, d)
        k, v = kv[:, :, 0], kv[:, :, 1]
        return q, k, v
    q = (torch.randn(n, hq, d, generator=g) * 1.5).to(dtype).to(DEVICE)
    k = (torch.randn(n, hkv, d, generator=g) * 1.5).to(dtype).to(DEVICE)
    v = torch.randn(n, hkv, d, generator=g).to(dtype).to(DEVICE)
    return q, k, v


def reference(q, k, v, part):
    return windowed_attention(q.float(), k.float(), v.float(), part)


def close(got, want, dtype):
    got, want = got.float().cpu(), want.float().cpu()
    rtol, atol, rel = (4e-2, 1e-2, 1e-2) if dtype == torch.bfloat16 else (2e-2, 2e-3, 3e-3)
    err = (got - want).norm() / want.norm()
    return bool(torch.isfinite(got).all()) and err < rel and torch.allclose(got, want, rtol=rtol, atol=atol)


@pytest.fixture(scope="module", params=[0, 4], ids=["unshifted", "shifted"])
def partition(request):
    coords = token_coords(seed=7).to(DEVICE)
    part = window_partition(coords, 8, request.param)
    lengths = (part.cu_seqlens[1:] - part.cu_seqlens[:-1]).cpu()
    assert int(lengths.min()) == 1 and int(lengths.max()) > 64   # single-token and multi-tile windows
    return part


@pytest.mark.parametrize("hq,hkv,options", [
    pytest.param(32, 2, dict(tokens_per_program=4, block_n=16), id="gqa16-t4-n16"),
    pytest.param(32, 2, dict(), id="gqa16-default"),
    pytest.param(32, 2, dict(tokens_per_program=8, heads_per_program=4, block_n=32), id="gqa16-h4"),
    pytest.param(4, 2, dict(tokens_per_program=8, block_n=16), id="gqa2-t8-n16"),
])
def test_matches_reference_fp16(partition, hq, hkv, options):
    n = partition.order.numel()
    q, k, v = make_qkv(n, hq, hkv, 32, torch.float16, seed=hq + hkv)
    got = W.windowed_attention(q, k, v, partition, **options)
    assert got.shape == q.shape and got.dtype == torch.float16
    assert close(got, reference(q, k, v, partition), torch.float16)


def test_bf16_strided_views(partition):
    n = partition.order.numel()
    q, k, v = make_qkv(n, 32, 2, 32, torch.bfloat16, seed=3, strided=True)
    assert not q.is_contiguous() and not k.is_contiguous()
    got = W.windowed_attention(q, k, v, partition, tokens_per_program=4, block_n=16)
    assert got.dtype == torch.bfloat16
    assert close(got, reference(q, k, v, partition), torch.bfloat16)


def test_fp16_strided_views_scale(partition):
    n = partition.order.numel()
    q, k, v = make_qkv(n, 16, 2, 32, torch.float16, seed=5, strided=True)
    got = W.windowed_attention(q, k, v, partition, scale=0.3, tokens_per_program=2, block_n=16)
    want = windowed_attention(q.float(), k.float(), v.float(), partition, scale=0.3)
    assert close(got, want, torch.float16)


def _interpreted_gated_branch_sum():
    """engine.kernels.modulation.gated_branch_sum, reloaded for the interpreter if needed."""
    import engine.kernels.modulation as modulation
    if os.environ.get("TRITON_INTERPRET") == "1":
        from triton.runtime.interpreter import InterpretedFunction
        if not isinstance(modulation._gated_sum_kernel, InterpretedFunction):
            modulation = importlib.reload(modulation)
    return modulation.gated_branch_sum


@pytest.mark.parametrize("elements", [1, 2])
def test_gated_sum_is_window_then_gated_branch_sum(elements):
    """With gated_sum=, the kernel returns exactly (bit for bit) what the window kernel followed by
    gated_branch_sum per element gives; the other branches come side by side [n, E * Hq, D] and the
    elements hold rows [e * n, (e + 1) * n)."""
    base = token_coords(seed=9)
    base = torch.unique(base[base[:, 0] == 0][:, 1:], dim=0)
    n = base.shape[0]
    coords = torch.cat([torch.cat([torch.full((n, 1), e), base], 1) for e in range(elements)]).int().to(DEVICE)
    part = window_partition(coords, 8, 4)
    hq, d = 32, 32
    q, k, v = make_qkv(n * elements, hq, 2, d, torch.float16, seed=11)
    g = torch.Generator().manual_seed(12)
    branches = (torch.randn(2, n, elements * hq, d, generator=g) * 1.5).half().to(DEVICE)
    logits = (torch.randn(n * elements, 3 + 7, generator=g) * 2).half().to(DEVICE)[:, 7:]   # strided rows
    got = W.windowed_attention(q, k, v, part, gated_sum=(branches[0], branches[1], logits, n))
    windowed = W.windowed_attention(q, k, v, part)
    gated_branch_sum = _interpreted_gated_branch_sum()
    want = torch.empty_like(q)
    for e in range(elements):
        rows, heads = slice(e * n, (e + 1) * n), slice(e * hq, (e + 1) * hq)
        gated_branch_sum(branches[0][:, heads], branches[1][:, heads], windowed[rows], logits[rows], out=want[rows])
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="gated_sum"):
        W.windowed_attention(q, k, v, part, gated_sum=(branches[0], branches[1], logits, n + 1))


def test_empty_input():
    part = window_partition(torch.zeros(0, 4, dtype=torch.int32, device=DEVICE), 8, 4)
    q = torch.zeros(0, 32, 32, dtype=torch.float16, device=DEVICE)
    k = torch.zeros(0, 2, 32, dtype=torch.float16, device=DEVICE)
    out = W.windowed_attention(q, k, k, part)
    assert out.shape == q.shape and out.dtype == q.dtype


def test_rejects_bad_tiles(partition):
    n = partition.order.numel()
    q, k, v = make_qkv(n, 32, 2, 32, torch.float16, seed=1)
    with pytest.raises(ValueError):
        W.windowed_attention(q, k, v, partition, heads_per_program=3)
    with pytest.raises(ValueError):
        W.windowed_attention(q, k, v, partition, tokens_per_program=6)


@pytest.mark.parametrize("tokens", [1, 4, 16])
def test_chunk_table_covers_every_position_once(tokens):
    lengths = torch.tensor([5, 1, 40, 16, 17, 3, 1, 64])
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    n = int(cu[-1])
    table = W.chunk_table(cu, n, tokens)
    assert table.dtype == torch.int32 and table.shape == (triton.cdiv(n, tokens) + len(lengths), 3)
    q_start, k_start, k_end = table.long().unbind(1)
    live = k_end > k_start
    assert (table[~live] == 0).all()
    assert live[:int(live.sum())].all()                        # padding rows at the end only
    seen = torch.zeros(n, dtype=torch.long)
    for qs, ks, ke in zip(q_start[live].tolist(), k_start[live].tolist(), k_end[live].tolist()):
        assert ks <= qs < ke and (ks, ke) in zip(cu[:-1].tolist(), cu[1:].tolist())
        seen[qs:min(qs + tokens, ke)] += 1
    assert (seen == 1).all()
    window_length = (k_end - k_start)[live]
    assert (window_length[1:] <= window_length[:-1]).all()     # longest windows first


def test_tables_cached_on_partition(partition):
    n = partition.order.numel()
    q, k, v = make_qkv(n, 4, 2, 32, torch.float16, seed=2)
    partition.__dict__.pop("_window_kernel_tables", None)
    W.windowed_attention(q, k, v, partition, tokens_per_program=8, block_n=16)
    tables = partition._window_kernel_tables
    assert len(tables) == 1
    first = next(iter(tables.values()))
    W.windowed_attention(q, k, v, partition, tokens_per_program=8, block_n=32)
    assert len(tables) == 1 and next(iter(tables.values()))[1] is first[1]


_COMPILE_SCRIPT = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import engine.attention.triton.window as WN

i32, f32 = "i32", "fp32"
for dtype in ("*fp16", "*bf16"):
    sig = dict(q_ptr=dtype, k_ptr=dtype, v_ptr=dtype, o_ptr=dtype, order_ptr="*i32", chunk_ptr="*i32",
               sq_n=i32, sq_h=i32, sk_n=i32, sk_h=i32, sv_n=i32, sv_h=i32, so_n=i32, so_h=i32, scale_log2=f32,
               c_ptr=dtype, s_ptr=dtype, l_ptr=dtype, sc_n=i32, sc_h=i32, ss_n=i32, ss_h=i32, sl_n=i32,
               element_rows=i32, element_heads=i32,
               G="constexpr", HEADS="constexpr", TOKENS="constexpr", D="constexpr", BLOCK_N="constexpr",
               GATED="constexpr")
    names = list(sig)
    # like the JIT: pointers and strides specialised as divisible by 16
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if sig[n].startswith("*") or (n.startswith("s") and sig[n] == i32)}
    for heads, tokens, block_n, warps, stages, gated in (
            (16, 8, 32, 4, 2, False), (16, 4, 32, 4, 2, False), (16, 4, 32, 4, 2, True), (16, 8, 64, 4, 3, False),
            (8, 16, 32, 8, 2, False), (2, 64, 32, 4, 2, False)):
        consts = dict(G=16 if heads > 2 else 2, HEADS=heads, TOKENS=tokens, D=32, BLOCK_N=block_n, GATED=gated)
        src = ASTSource(fn=WN._window_fwd, signature=sig, constexprs=consts, attrs=attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                options=dict(num_warps=warps, num_stages=stages))
        ptx = kernel.asm["ptx"]
        assert "wgmma" in ptx or "mma.sync" in ptx, "no tensor-core instructions"
        print(dtype, consts, warps, stages, "ok")
'''


def test_window_kernel_compiles_for_hopper():
    """The interpreter does not catch everything the compiler rejects: compile the GPU configurations
    for sm_90 ahead of time, no GPU needed."""
    from helpers.sm90 import compile_for_sm90

    assert compile_for_sm90(_COMPILE_SCRIPT, timeout=600).count(" ok") == 12
