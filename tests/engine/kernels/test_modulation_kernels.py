"""Triton kernels of the adaLN-modulated blocks (engine.kernels.modulation) against the PyTorch
expressions of engine.models.blocks, and the block's kernel path against its PyTorch path.

On CPU the kernels run through Triton's interpreter (TRITON_INTERPRET=1, set below before the kernel
module is imported or reloaded); on a CUDA machine the same tests run the compiled kernels.
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

from engine.kernels import fix_interpreter_bf16_dot  # noqa: E402
from engine.models import blocks  # noqa: E402
from engine.models.blocks import (ModulatedCrossBlock, MultiHeadAttention, MultiHeadRMSNorm,  # noqa: E402
                                  block_kernel_backend)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _fix_interpreter():
    """Shortcomings of Triton 3.6's interpreter, patched for these tests only (and bf16 dots, see
    `engine.kernels.fix_interpreter_bf16_dot`):

    * a scalar kernel argument used as an index is converted with ``int(array)`` on a shape-[1]
      array, which numpy >= 2.4 rejects: take its single element instead;
    * fp32 -> bf16 casts truncate the mantissa (the compiled kernels round to nearest even): round
      them to nearest even as the GPU does, so bf16 results can be compared rounding for rounding.
    """
    from triton.runtime import interpreter
    current = interpreter._patch_lang_tensor
    if not getattr(current, "_takes_first_element", False):
        def patch(tensor, scope):
            current(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        patch._takes_first_element = True
        interpreter._patch_lang_tensor = patch

    builder = interpreter.InterpreterBuilder
    cast = builder.cast_impl
    if getattr(cast, "_rounds_bf16", False):
        return

    def cast_impl(self, src, dst_type):
        import triton.language as tl
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            values = torch.from_numpy(src.data.astype("float32", copy=True))
            bits = values.to(torch.bfloat16).view(torch.int16).numpy().view("uint16")
            return interpreter.TensorHandle(bits, dst_type.scalar)
        return cast(self, src, dst_type)

    cast_impl._rounds_bf16 = True
    builder.cast_impl = cast_impl
    fix_interpreter_bf16_dot()   # the blocks' cross-attention kernel multiplies bf16 tiles


def _kernel_module():
    import engine.kernels.modulation as kernels
    if INTERPRETED:
        _fix_interpreter()
        from triton.runtime.interpreter import InterpretedFunction
        if not isinstance(kernels._row_kernel, InterpretedFunction):
            kernels = importlib.reload(kernels)
    return kernels


mk = _kernel_module()


def _ulp_close(out: torch.Tensor, expected: torch.Tensor, ulps: float = 1.0, atol: float = 1e-5):
    """Within ``ulps`` rounding steps (relative eps of the dtype) of ``expected``, plus a small absolute
    slack for values near zero whose fp32 statistics differ in the last bits."""
    assert out.dtype == expected.dtype and out.shape == expected.shape
    rtol = ulps * torch.finfo(out.dtype).eps
    torch.testing.assert_close(out.float(), expected.float(), rtol=rtol, atol=atol)


def _mostly_equal(out: torch.Tensor, expected: torch.Tensor, fraction: float = 0.02):
    """Half-precision results equal to the PyTorch expression but for rare rounding ties (fp32
    statistics summed in another order)."""
    if out.dtype != torch.float32:
        assert (out != expected).float().mean().item() <= fraction


def _modulation(batch: int, channels: int, dtype, gen):
    """shift, scale, gate as the views ``ModulatedCrossBlock.modulation`` gives ([B, 1, C], batch
    stride 6C)."""
    mod = (torch.randn(batch, 6 * channels, generator=gen) * 0.5).to(dtype).to(DEVICE)
    return tuple(m.unsqueeze(1) for m in mod.chunk(6, dim=-1))


def _tokens(shape, dtype, gen, offset=0.0, spread=3.0):
    return (torch.randn(shape, generator=gen) * spread + offset).to(dtype).to(DEVICE)


def _torch_norm(x, eps, weight=None, bias=None):
    """The PyTorch path's norm: LayerNorm32 (fp32 statistics and affine map, rounded once)."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), x.shape[-1:], w, b, eps).to(x.dtype)


# ------------------------------------------------------------------------------------ row kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, tokens, channels, block_rows", [(1, 29, 40, 8), (2, 37, 24, 4), (2, 13, 64, None)])
def test_layer_norm_modulate_matches_addcmul_of_the_norm(dtype, batch, tokens, channels, block_rows):
    gen = torch.Generator().manual_seed(0)
    # a common offset tests the centred variance; odd token counts put batch boundaries inside programs
    x = _tokens((batch, tokens, channels), dtype, gen, offset=4.0)
    shift, scale, *_ = _modulation(batch, channels, dtype, gen)
    expected = torch.addcmul(shift, _torch_norm(x, 1e-6), 1 + scale)
    out = mk.layer_norm_modulate(x, shift, scale, 1e-6, block_rows=block_rows)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    _ulp_close(out, expected, ulps=2)
    _mostly_equal(out, expected)
    # [B, C] rows and a broadcast batch of one give the same
    torch.testing.assert_close(mk.layer_norm_modulate(x, shift[:, 0], scale[:, 0], 1e-6, block_rows=block_rows),
                               out, rtol=0, atol=0)
    if batch == 2:
        one = mk.layer_norm_modulate(x, shift[:1], scale[:1], 1e-6, block_rows=block_rows)
        _ulp_close(one, torch.addcmul(shift[:1], _torch_norm(x, 1e-6), 1 + scale[:1]), ulps=2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 2])
def test_gated_residual_matches_addcmul(dtype, batch):
    gen = torch.Generator().manual_seed(1)
    x = _tokens((batch, 21, 48), dtype, gen)
    y = _tokens((batch, 21, 48), dtype, gen)
    _, _, gate, *_ = _modulation(batch, 48, dtype, gen)
    expected = torch.addcmul(x, gate, y)
    out = mk.gated_residual(x, gate, y, block_rows=8)
    assert out.data_ptr() != x.data_ptr()
    _ulp_close(out, expected)
    _mostly_equal(out, expected, fraction=0.0 if dtype != torch.float32 else 1.0)
    _ulp_close(mk.gated_residual(x, None, y, block_rows=8), x + y)
    # in place
    target = x.clone()
    result = mk.gated_residual(target, gate, y, inplace=True, block_rows=8)
    assert result.data_ptr() == target.data_ptr()
    torch.testing.assert_close(target, out, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 2])
def test_residual_then_affine_norm(dtype, batch):
    """x + gate * y and the affine LN of the new stream (fp32 or half parameters) in one pass."""
    gen = torch.Generator().manual_seed(2)
    channels = 40
    x = _tokens((batch, 19, channels), dtype, gen, offset=1.0)
    y = _tokens((batch, 19, channels), dtype, gen)
    _, _, gate, *_ = _modulation(batch, channels, dtype, gen)
    weight = (torch.randn(channels, generator=gen) + 1).to(DEVICE)
    bias = torch.randn(channels, generator=gen).to(DEVICE)
    stream = torch.addcmul(x, gate, y)
    for w, b in ((weight, bias), (weight.to(dtype), bias.to(dtype))):
        expected = _torch_norm(stream, 1e-6, w, b)
        residual, normed = mk.residual_layer_norm(x, y, gate, eps=1e-6, weight=w, bias=b, block_rows=4)
        _ulp_close(residual, stream)
        _ulp_close(normed, expected, ulps=2, atol=1e-4)
        _mostly_equal(normed, expected)
    # the affine norm followed by a modulation
    shift, scale, *_ = _modulation(batch, channels, dtype, gen)
    expected = torch.addcmul(shift, _torch_norm(x, 1e-6, weight, bias), 1 + scale)
    out = mk.layer_norm_modulate(x, shift, scale, 1e-6, weight=weight, bias=bias, block_rows=8)
    _ulp_close(out, expected, ulps=2, atol=1e-4)
    _mostly_equal(out, expected)
    # the affine norm alone
    expected = _torch_norm(x, 1e-5, weight, bias)
    normed = mk.layer_norm(x, 1e-5, weight, bias, block_rows=16)
    _ulp_close(normed, expected, ulps=2, atol=1e-4)
    _ulp_close(mk.layer_norm(x, 1e-5), _torch_norm(x, 1e-5), ulps=2)
    _ulp_close(mk.layer_norm(x, 1e-5, weight, None), _torch_norm(x, 1e-5, weight), ulps=2, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 2])
def test_residual_then_modulated_norm_in_place(dtype, batch):
    """x + y (ungated, the cross-attention residual) and LN(x) * (1 + scale) + shift in one pass,
    the stream written back into x."""
    gen = torch.Generator().manual_seed(3)
    channels = 56
    x = _tokens((batch, 23, channels), dtype, gen, offset=-2.0)
    y = _tokens((batch, 23, channels), dtype, gen)
    *_, shift, scale, _ = _modulation(batch, channels, dtype, gen)
    stream = x + y
    expected = torch.addcmul(shift, _torch_norm(stream, 1e-6), 1 + scale)
    target = x.clone()
    residual, h = mk.residual_layer_norm(target, y, eps=1e-6, shift=shift, scale=scale, residual_out=target,
                                         block_rows=8)
    assert residual.data_ptr() == target.data_ptr()
    _ulp_close(residual, stream)
    _ulp_close(h, expected, ulps=2)
    _mostly_equal(h, expected)


def test_row_kernels_on_flat_tokens_strided_rows_and_bad_operands():
    gen = torch.Generator().manual_seed(4)
    # [N, C] tokens (one batch element), and rows with a stride larger than C (a slice of a buffer)
    buffer = _tokens((30, 80), torch.float16, gen)
    x = buffer[:, 8:48]
    shift, scale = (torch.randn(1, 40, generator=gen).half().to(DEVICE) for _ in range(2))
    expected = torch.addcmul(shift, _torch_norm(x, 1e-6), 1 + scale)
    _ulp_close(mk.layer_norm_modulate(x, shift, scale, 1e-6, block_rows=8), expected, ulps=2)
    y = _tokens((30, 40), torch.float16, gen)
    _ulp_close(mk.gated_residual(x, shift, y, block_rows=8), torch.addcmul(x, shift, y))
    empty = torch.empty(2, 0, 40, dtype=torch.float16, device=DEVICE)
    assert mk.layer_norm_modulate(empty, shift, scale, 1e-6).shape == empty.shape
    with pytest.raises(ValueError):   # dtypes must agree
        mk.gated_residual(x, shift.float(), y)
    with pytest.raises(ValueError):   # one shift row per batch element (or one for all)
        mk.layer_norm_modulate(_tokens((2, 5, 40), torch.float16, gen), torch.zeros(3, 40).half().to(DEVICE),
                               torch.zeros(3, 40).half().to(DEVICE), 1e-6)
    # in place on rows with a stride: the buffer around them is untouched
    before = buffer.clone()
    mk.gated_residual(x, None, y, inplace=True, block_rows=8)
    _ulp_close(x, before[:, 8:48] + y)
    assert torch.equal(buffer[:, :8], before[:, :8]) and torch.equal(buffer[:, 48:], before[:, 48:])
    with pytest.raises(ValueError):   # an output whose rows do not have one stride
        part = _tokens((2, 7, 40), torch.float16, gen)[:, :5]
        mk.gated_residual(part, None, part.clone(), inplace=True)


# ------------------------------------------------------------------------------------ RMS norm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 2])
def test_multi_head_rms_norm_matches_the_module(dtype, batch):
    gen = torch.Generator().manual_seed(5)
    heads, width = 3, 24
    norm = MultiHeadRMSNorm(width, heads)
    with torch.no_grad():
        norm.gamma.normal_(1.0, 0.3)
    norm = norm.to(DEVICE)
    # q and k as the strided views of a fused qkv projection [B, L, 3, H, D]
    qkv = _tokens((batch, 17, 3 * heads * width), dtype, gen, offset=0.5)
    q, k, _ = qkv.unflatten(-1, (3, heads, width)).unbind(dim=-3)
    for t in (q, k, q.contiguous(), q[0]):
        with block_kernel_backend("torch"):
            expected = norm(t)
        out = mk.multi_head_rms_norm(t, norm.gamma, norm.scale, block_rows=16)
        assert out.shape == t.shape and out.dtype == dtype and out.is_contiguous()
        _ulp_close(out, expected, atol=1e-4)
        _mostly_equal(out, expected)
    zero = torch.zeros(1, 2, heads, width, dtype=dtype, device=DEVICE)   # F.normalize's eps: zeros stay zeros
    assert torch.equal(mk.multi_head_rms_norm(zero, norm.gamma, norm.scale), zero)


# ------------------------------------------------------------------------------------ SSA gated sum
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, width", [(4, 8), (3, 12)])
def test_gated_branch_sum_matches_the_ssa_formula(dtype, heads, width):
    gen = torch.Generator().manual_seed(10)
    tokens = 37
    # the SSA layout: compressed/selected outputs of two elements side by side ([N, 2H, D], one
    # element's head slice), the window output [N, H, D], gate logits a column slice of a projection
    side = _tokens((tokens, 2 * heads, width), dtype, gen, spread=1.0)
    selected_side = _tokens((tokens, 2 * heads, width), dtype, gen, spread=1.0)
    windowed = _tokens((tokens, heads, width), dtype, gen, spread=1.0)
    projected = _tokens((tokens, 16), dtype, gen, spread=2.0)
    compressed, selected = side[:, heads:], selected_side[:, :heads]
    logits = projected[:, 11:14]
    gates = torch.sigmoid(logits).unsqueeze(-1).unsqueeze(-1)          # as SpatialSparseAttention
    expected = torch.empty_like(windowed)
    torch.mul(compressed, gates[:, 0], out=expected)
    expected.addcmul_(selected, gates[:, 1])
    expected.addcmul_(windowed, gates[:, 2])
    buffer = torch.zeros(tokens + 3, heads, width, dtype=dtype, device=DEVICE)
    out = mk.gated_branch_sum(compressed, selected, windowed, logits, out=buffer[2:2 + tokens], block_tokens=8)
    assert out.data_ptr() == buffer[2:].data_ptr()
    assert not buffer[:2].any() and not buffer[-1].any()
    _ulp_close(out, expected, ulps=2)
    _mostly_equal(out, expected)
    fresh = mk.gated_branch_sum(compressed, selected, windowed, logits)
    assert fresh.is_contiguous() and torch.equal(fresh, out)
    with pytest.raises(ValueError):
        mk.gated_branch_sum(compressed, selected, windowed[:-1], logits)
    with pytest.raises(ValueError):
        mk.gated_branch_sum(compressed, selected, windowed, logits[:, :2])


# ------------------------------------------------------------------------------------ the block
def _tiny_block(dtype, channels=40, heads=4, qk_rms_norm=True):
    torch.manual_seed(7)
    block = ModulatedCrossBlock(channels, MultiHeadAttention(channels, heads, qk_rms_norm=qk_rms_norm),
                                MultiHeadAttention(channels, heads, ctx_channels=24, attn_type="cross"))
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
        block.norm2.weight.add_(1.0)
    block = block.to(DEVICE)
    for module in block.modules():   # compute layers in dtype, norms keep fp32 parameters
        if isinstance(module, torch.nn.Linear):
            module.to(dtype)
    return block


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch", [1, 2])
def test_block_kernel_path_matches_torch_path(dtype, batch):
    block = _tiny_block(dtype)
    gen = torch.Generator().manual_seed(8)
    x = _tokens((batch, 33, 40), dtype, gen, spread=1.0)
    t_emb = _tokens((batch, 40), dtype, gen, spread=1.0)
    context = _tokens((batch, 9, 24), dtype, gen, spread=1.0)
    x_before = x.clone()
    with torch.no_grad():
        with block_kernel_backend("torch"):
            expected = block(x, t_emb, context)
        with block_kernel_backend("triton"):
            calls = []
            with _count_kernel_calls(calls):
                out = block(x, t_emb, context)
    assert torch.equal(x, x_before), "the block must not write into its input"
    assert calls == ["layer_norm_modulate", "residual_layer_norm", "residual_layer_norm", "gated_residual"]
    assert out.dtype == dtype and out.shape == x.shape
    # the same roundings step by step; differences come from fp32 summation order in the statistics
    # and attention inputs that differ in a rare last bit (one rounding step, relative to the output)
    eps = torch.finfo(dtype).eps if dtype != torch.float32 else 4e-6
    err = (out.float() - expected.float()).abs().max().item()
    assert err <= 4 * eps * expected.float().abs().max().item(), err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dense_dit_kernel_path_matches_torch_path(dtype):
    from engine.configs import DenseDiTConfig
    from engine.models import cast_compute_layers
    from engine.models.dense_dit import DenseDiT

    config = DenseDiTConfig(resolution=4, in_channels=4, out_channels=4, model_channels=64, cond_channels=32,
                            num_blocks=2, num_heads=4, num_head_channels=16)
    torch.manual_seed(0)
    model = DenseDiT(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith(("norm2.weight", "gamma")) else 0.0, 0.2)
    model = cast_compute_layers(model, dtype).to(DEVICE)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 4, 4, 4, generator=gen).to(dtype).to(DEVICE)
    cond = torch.randn(2, 5, 32, generator=gen).to(dtype).to(DEVICE)
    t = torch.tensor([600.0], device=DEVICE)
    with torch.inference_mode():
        with block_kernel_backend("torch"):
            expected = model(x, t, cond)
        with block_kernel_backend("triton"):
            calls = []
            with _count_kernel_calls(calls, rms=True):
                out = model(x, t, cond)
    assert calls.count("multi_head_rms_norm") == 4 and calls.count("residual_layer_norm") == 4
    err = (out.float() - expected.float()).norm() / expected.float().norm()
    assert err <= 4 * torch.finfo(dtype).eps, err.item()


def test_sparse_dit_kernel_path_matches_torch_path():
    """The tiny v1.1 sparse DiT, cond + uncond batch, with the torch path's SSA selection injected
    so that a near-tied top-k cannot flip between the two paths."""
    from engine.configs import SparseDiTConfig
    from engine.models import cast_compute_layers
    from engine.models.sparse_dit import SparseDiT
    from engine.sparse import SparseVoxels

    config = SparseDiTConfig(resolution=32, in_channels=4, out_channels=4, model_channels=64, cond_channels=48,
                             num_blocks=2, num_heads=4, num_head_channels=16, num_kv_heads=2,
                             compression_block_size=8, selection_block_size=8, topk=3)
    torch.manual_seed(2)
    model = SparseDiT(config, ssa_backend="torch").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model = cast_compute_layers(model, torch.float16).to(DEVICE)
    for block in model.blocks:
        block.self_attn.record_selection = True
    axis = torch.arange(12)
    cells = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    cells = cells[((cells.float() - 5.5).norm(dim=-1) - 4.0).abs() < 1.0]
    key = ((cells // 8) * torch.tensor([4096, 64, 1])).sum(-1) * 512 + ((cells % 8) * torch.tensor([64, 8, 1])).sum(-1)
    cells = cells[torch.argsort(key)]
    coords = torch.cat([torch.cat([torch.full((len(cells), 1), b), cells], 1) for b in (0, 1)]).to(torch.int32)
    gen = torch.Generator().manual_seed(3)
    x = SparseVoxels(torch.randn(len(coords), 4, generator=gen).half(), coords).to(DEVICE)
    cond = torch.randn(2, 7, 48, generator=gen).half().to(DEVICE)
    t = torch.tensor([500.0], device=DEVICE)
    with torch.no_grad():
        with block_kernel_backend("torch"):
            expected = model(x, t, cond).feats
        selection = [block.self_attn.last_block_topk for block in model.blocks]
        with block_kernel_backend("triton"):
            calls = []
            with _count_kernel_calls(calls):
                out = model(x, t, cond, block_topk=selection).feats
    assert len(calls) == 4 * len(model.blocks)
    err = (out.float() - expected.float()).norm() / expected.float().norm()
    assert err <= 4 * torch.finfo(torch.float16).eps, err.item()


class _count_kernel_calls:
    """Records the names of the engine.kernels.modulation functions the block calls."""

    NAMES = ("layer_norm_modulate", "residual_layer_norm", "gated_residual", "layer_norm", "multi_head_rms_norm")

    def __init__(self, calls, rms=False):
        self.calls, self.saved, self.rms = calls, {}, rms

    def __enter__(self):
        for name in self.NAMES:
            original = getattr(mk, name)
            self.saved[name] = original

            def wrapper(*args, _name=name, _original=original, **kwargs):
                if self.rms or _name != "multi_head_rms_norm":
                    self.calls.append(_name)
                return _original(*args, **kwargs)

            setattr(mk, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(mk, name, original)


def test_rms_norm_module_kernel_path():
    norm = MultiHeadRMSNorm(16, 2).to(DEVICE)
    with torch.no_grad():
        norm.gamma.normal_(1.0, 0.2)
    x = torch.randn(2, 5, 2, 16).half().to(DEVICE)
    with block_kernel_backend("torch"):
        expected = norm(x)
    with block_kernel_backend("triton"):
        out = norm(x)
    _ulp_close(out, expected, atol=1e-4)


def test_dispatch_rules(monkeypatch):
    x = torch.randn(2, 3, 8)
    with block_kernel_backend("torch"):
        assert blocks._modulation_kernels(x) is None
    with block_kernel_backend("triton"):
        assert blocks._modulation_kernels(x) is not None
        assert blocks._modulation_kernels(x, x.half()) is None           # mixed dtypes: PyTorch
        weight = torch.nn.Parameter(torch.ones(8))
        with torch.enable_grad():                                        # autograd needs the PyTorch path
            assert blocks._modulation_kernels(x, weight) is None
        with torch.no_grad():
            assert blocks._modulation_kernels(x, weight) is not None
    # "auto": CPU tensors and fp32 stay on PyTorch
    assert blocks._BLOCK_KERNELS.value == "auto"
    assert blocks._modulation_kernels(x.half()) is None
    with pytest.raises(ValueError):
        blocks.set_block_kernel_backend("cuda")


def test_cross_attention_kernel_dispatch_and_result():
    """ContextCrossAttention: the Triton kernel under "triton" (and under "auto" for CUDA fp16 tensors
    of a head width in CONTEXT_KERNEL_HEAD_DIMS), SDPA under "torch"; same result, with a key mask
    and with a uniform (all-zero) context element."""
    q = torch.randn(1, 4, 2, 32)
    with block_kernel_backend("torch"):
        assert blocks._context_attention_kernel(q, q, q) is None
    with block_kernel_backend("triton"):
        assert blocks._context_attention_kernel(q, q, q) is not None
    assert blocks._context_attention_kernel(q, q, q) is None                     # auto: CPU fp32
    expected_auto = DEVICE == "cuda" and 32 in blocks.CONTEXT_KERNEL_HEAD_DIMS
    half = q.half().to(DEVICE)
    assert (blocks._context_attention_kernel(half, half, half) is not None) == expected_auto
    torch.manual_seed(3)
    module = blocks.ContextCrossAttention(64, 2, 24).to(DEVICE).half().eval()
    x = torch.randn(3, 20, 64, device=DEVICE).half()
    context = torch.randn(3, 9, 24, device=DEVICE).half()
    context[2] = 0
    key_mask = torch.ones(3, 9, dtype=torch.bool, device=DEVICE)
    key_mask[1, 5:] = False
    with torch.inference_mode():
        for arg in ((context, key_mask), (context, None, (False, False, True))):
            with block_kernel_backend("torch"):
                want = module(x, arg)
            with block_kernel_backend("triton"):
                got = module(x, arg)
            assert torch.allclose(got.float(), want.float(), atol=2e-3, rtol=2e-3)


def test_auto_backend_falls_back_to_torch_when_triton_cannot_run(monkeypatch):
    block = _tiny_block(torch.float16)
    gen = torch.Generator().manual_seed(9)
    x = _tokens((2, 11, 40), torch.float16, gen, spread=1.0)
    t_emb = _tokens((2, 40), torch.float16, gen, spread=1.0)
    context = _tokens((2, 9, 24), torch.float16, gen, spread=1.0)
    with torch.no_grad(), block_kernel_backend("torch"):
        expected = block(x, t_emb, context)
    monkeypatch.setattr(blocks._BLOCK_KERNELS, "failure", None)
    # behave as for CUDA tensors under "auto"
    monkeypatch.setattr(blocks, "_auto_uses_kernels", lambda t: blocks._BLOCK_KERNELS.failure is None)

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(mk, "residual_layer_norm", broken)
    with torch.no_grad(), block_kernel_backend("triton"), pytest.raises(RuntimeError):
        block(x, t_emb, context)
    assert blocks._BLOCK_KERNELS.failure is None
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="no compiler") as caught:
        out = block(x, t_emb, context)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1   # reported once
    _ulp_close(out, expected, ulps=4, atol=1e-3)
    assert blocks._modulation_kernels(x) is None          # not tried again in this process


# ------------------------------------------------------------------------------------ sm_90 lowering
_SM90_SCRIPT = r"""
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from engine.kernels import modulation


def build(fn, types, constants, aligned, warps, scalar_loads=0):
    names = fn.arg_names
    signature = {name: "constexpr" if name in constants else types.get(name, "i32") for name in names}
    # the launcher's specialisation on a GPU: 16-byte aligned pointers, strides and widths divisible by 16
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    ptx = kernel.asm["ptx"]
    accesses = re.findall(r"\b(?:ld|st)\.global[\w.:]*", ptx)
    narrow = [access for access in accesses if not access.endswith(".v4.b32")]
    # scalar_loads: per-token scalars (the SSA gate logits), read once per row
    vector = len(narrow) < len(accesses) and all(a.startswith("ld.") for a in narrow) and len(narrow) <= scalar_loads
    print(fn.__name__, "vector" if vector else "scalar", "compiled")


half = "*fp16"
pointers = ["x_ptr", "y_ptr", "gate_ptr", "res_ptr", "weight_ptr", "bias_ptr", "shift_ptr", "scale_ptr", "out_ptr"]
types = {name: half for name in pointers}
types.update(weight_ptr="*fp32", bias_ptr="*fp32", eps="fp32")
aligned = pointers + ["C", "sx", "sy", "sres", "sout", "sgate", "sshift", "sscale"]
rows, width, warps = modulation._tile_rows(1024, None)
for flags in [dict(RESIDUAL=False, GATED=False, NORM=True, AFFINE=False, MODULATE=True),
              dict(RESIDUAL=True, GATED=True, NORM=True, AFFINE=True, MODULATE=False),
              dict(RESIDUAL=True, GATED=False, NORM=True, AFFINE=False, MODULATE=True),
              dict(RESIDUAL=True, GATED=True, NORM=False, AFFINE=False, MODULATE=False)]:
    build(modulation._row_kernel, types, dict(flags, BLOCK_R=rows, BLOCK_C=width), aligned, warps)
rows, width, warps = modulation._tile_rows(64, None)
build(modulation._gated_sum_kernel, dict(a_ptr=half, b_ptr=half, c_ptr=half, logit_ptr=half, out_ptr=half),
      dict(HEAD_DIM=32, BLOCK_N=4, BLOCK_C=1024),
      ["a_ptr", "b_ptr", "c_ptr", "logit_ptr", "out_ptr", "width", "san", "sah", "sbn", "sbh", "scn", "sch", "sln",
       "son", "soh"], 8, scalar_loads=6)
build(modulation._rms_norm_kernel, dict(x_ptr=half, gamma_ptr="*fp32", out_ptr=half, factor="fp32", eps="fp32"),
      dict(BLOCK_R=rows, BLOCK_D=width), ["x_ptr", "gamma_ptr", "out_ptr", "D", "sxb", "sxl", "sxh"], warps)
"""


def test_kernels_compile_for_sm90_with_16_byte_accesses():
    """The interpreter accepts some programs the compiler rejects: lower the full-size fp16
    configurations (1024 channels, head width 64) to sm_90 machine code (Triton's bundled ptxas; no
    GPU needed), and check that every global access is a 16-byte vector (memory-bound kernels)."""
    from helpers.sm90 import compile_for_sm90

    stdout = compile_for_sm90(_SM90_SCRIPT)
    assert stdout.count("vector compiled") == 6, stdout
