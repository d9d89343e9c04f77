"""Triton kernels of the refiners (engine.kernels) against the PyTorch paths of engine.models.refiners.

On CPU the kernels run through Triton's interpreter (TRITON_INTERPRET=1, set below before the kernel
modules are imported or reloaded); on a CUDA machine the same tests run the compiled kernels.
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

from engine.models import refiners  # noqa: E402
from engine.models.refiners import Refiner512, SignRefiner1024, conv_backend, kernel_backend  # noqa: E402
from engine.kernels import fix_interpreter_scalar_index  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CL = torch.channels_last_3d


def _kernel_modules():
    """engine.kernels.{group_norm, adaptive_filter, conv3d}, (re)loaded under the interpreter on CPU."""
    import engine.kernels.adaptive_filter as adaptive
    import engine.kernels.conv3d as conv
    import engine.kernels.group_norm as norm
    import engine.kernels.tiles as tiles
    if os.environ.get("TRITON_INTERPRET") == "1":
        fix_interpreter_scalar_index()
        from triton.runtime.interpreter import InterpretedFunction
        if not isinstance(norm._apply, InterpretedFunction):
            norm = importlib.reload(norm)
        if not isinstance(tiles.box_voxels, InterpretedFunction):
            tiles = importlib.reload(tiles)
        # the box kernels import the shared helper by name: reload them after it
        if adaptive.box_voxels is not tiles.box_voxels or not isinstance(adaptive._filter_step_kernel,
                                                                          InterpretedFunction):
            adaptive = importlib.reload(adaptive)
        if conv.box_voxels is not tiles.box_voxels or not isinstance(conv._conv3_kernel, InterpretedFunction):
            conv = importlib.reload(conv)
    return norm, adaptive, conv


gn_kernels, af_kernels, conv_kernels = _kernel_modules()


def _layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=CL) if channels_last else x.contiguous()


def _reference_group_norm(x, groups, weight, bias):
    """GroupNorm evaluated in fp64 and rounded once to ``x``'s dtype."""
    return F.group_norm(x.double(), groups, weight.double(), bias.double(), 1e-5).to(x.dtype)


def _assert_one_rounding(out: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5):
    """Within one rounding step of ``expected`` (relative eps of the dtype), plus a small absolute
    slack for fp32 differences that cross a rounding boundary of values near zero."""
    rtol = torch.finfo(out.dtype).eps
    torch.testing.assert_close(out.float(), expected.float(), rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------------ group norm
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_kernel_matches_fp64_norm(dtype, channels_last):
    gen = torch.Generator().manual_seed(0)
    # offset channels (a large common mean tests the centred statistics), 3 channels per group
    x = torch.randn(2, 12, 7, 6, 9, generator=gen) * 2 + 40 + torch.arange(12).view(1, 12, 1, 1, 1)
    x = _layout(x.to(dtype), channels_last).to(DEVICE)
    weight, bias = torch.randn(12, generator=gen).to(DEVICE), torch.randn(12, generator=gen).to(DEVICE)
    fmt = CL if channels_last else torch.contiguous_format
    # small tiles: several partial tiles (the last one short) and several finalize chunks
    normed = gn_kernels.group_norm_silu(x, 4, weight, bias, 1e-5, silu=False, block_voxels=64, block_tiles=2)
    assert normed.dtype == dtype and normed.is_contiguous(memory_format=fmt)
    # fp32 statistics and affine: at most one rounding step away from the exact norm (fp32 itself
    # loses about 50 x 2^-24 to the cancellation of the common offset 40..51 in x * scale + shift)
    _assert_one_rounding(normed, _reference_group_norm(x, 4, weight, bias), atol=5e-5)
    # the fused SiLU is F.silu on the rounded normalised value
    fused = gn_kernels.group_norm_silu(x, 4, weight, bias, 1e-5, silu=True, block_voxels=64, block_tiles=2)
    assert fused.is_contiguous(memory_format=fmt)
    _assert_one_rounding(fused, F.silu(normed.float()).to(dtype))


@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_kernel_in_place_and_wide_channels(channels_last):
    gen = torch.Generator().manual_seed(1)
    # 80 channels: two channel blocks of 64 per program row, 20 channels per group (padded to 32)
    x = _layout(torch.randn(1, 80, 4, 5, 6, generator=gen).half(), channels_last).to(DEVICE)
    weight, bias = torch.randn(80, generator=gen).to(DEVICE), torch.randn(80, generator=gen).to(DEVICE)
    expected = _reference_group_norm(x, 4, weight, bias)
    source = x.clone()
    out = gn_kernels.group_norm_silu(source, 4, weight, bias, 1e-5, silu=False, out=source)
    assert out.data_ptr() == source.data_ptr()
    _assert_one_rounding(out, expected)


def test_group_norm_kernel_on_a_channel_slice_and_bad_layouts():
    gen = torch.Generator().manual_seed(2)
    # a channel slice of a channels_last buffer (voxel stride 9, as the 512 refiner's latent patch)
    buffer = torch.randn(1, 9, 5, 4, 3, generator=gen).half().contiguous(memory_format=CL).to(DEVICE)
    part = buffer[:, 1:]
    assert gn_kernels.voxel_stride(part) == 9
    weight, bias = torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE)
    out = gn_kernels.group_norm_silu(part, 4, weight, bias, 1e-5, silu=False)
    _assert_one_rounding(out, _reference_group_norm(part, 4, weight, bias))
    # spatial dims that do not flatten to one stride are refused (the caller falls back to PyTorch)
    strided = torch.randn(1, 4, 6, 6, 6, device=DEVICE)[:, :, :, ::2]
    assert gn_kernels.voxel_stride(strided) is None
    with pytest.raises(ValueError):
        gn_kernels.group_norm_silu(strided, 2, weight[:4], bias[:4], 1e-5, silu=False)
    with pytest.raises(ValueError):
        gn_kernels.group_norm_silu(part, 3, weight, bias, 1e-5, silu=False)


def test_group_norm_dispatch_matches_the_chunked_torch_path():
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(1, 16, 6, 6, 6, generator=gen) * 3).half().to(DEVICE)
    weight, bias = torch.randn(16, generator=gen).to(DEVICE), torch.randn(16, generator=gen).to(DEVICE)
    with kernel_backend("torch"):
        expected = refiners.group_norm_silu(x, 4, weight, bias, 1e-5, silu=True)
    with kernel_backend("triton"):
        source = x.clone()
        out = refiners.group_norm_silu(source, 4, weight, bias, 1e-5, silu=True, inplace=True)
    assert out.data_ptr() == source.data_ptr()
    torch.testing.assert_close(out.float(), expected.float(), rtol=2 * torch.finfo(torch.float16).eps, atol=1e-4)


@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_kernel_pre_bias_is_the_rounded_separate_add(channels_last):
    gen = torch.Generator().manual_seed(6)
    x = _layout((torch.randn(1, 8, 9, 7, 5, generator=gen) * 3).half(), channels_last).to(DEVICE)
    conv_bias = (torch.randn(8, generator=gen) * 5).half().to(DEVICE)
    weight, bias = torch.randn(8, generator=gen).to(DEVICE), torch.randn(8, generator=gen).to(DEVICE)
    biased = x + conv_bias.view(1, 8, 1, 1, 1)  # what ATen's add_ after cuDNN gives
    for steps in (1, 3):  # one tile per statistics program, or several merged in one program
        expected = gn_kernels.group_norm_silu(biased, 4, weight, bias, 1e-5, silu=True, block_voxels=16,
                                              tile_steps=steps)
        out = gn_kernels.group_norm_silu(x.clone(), 4, weight, bias, 1e-5, silu=True, pre_bias=conv_bias,
                                         block_voxels=16, tile_steps=steps)
        assert torch.equal(out, expected)
        _assert_one_rounding(out, F.silu(_reference_group_norm(biased, 4, weight, bias).float()).half(), atol=1e-3)
    source = x.clone()
    with kernel_backend("triton"):
        fused = refiners.group_norm_silu(source, 4, weight, bias, 1e-5, silu=False, inplace=True, pre_bias=conv_bias)
    with kernel_backend("torch"):
        reference = refiners.group_norm_silu(x.clone(), 4, weight, bias, 1e-5, silu=False, inplace=True,
                                             pre_bias=conv_bias)
    assert fused.data_ptr() == source.data_ptr()
    torch.testing.assert_close(fused.float(), reference.float(), rtol=2 * torch.finfo(torch.float16).eps, atol=1e-4)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_bias_residual_kernel_equals_the_separate_adds(channels_last, dtype):
    gen = torch.Generator().manual_seed(7)
    shape = (2, 6, 5, 4, 7)
    out = _layout((torch.randn(shape, generator=gen) * 4).to(dtype), channels_last).to(DEVICE)
    residual = _layout((torch.randn(shape, generator=gen) * 4).to(dtype), channels_last).to(DEVICE)
    bias, residual_bias = (torch.randn(6, generator=gen) * 4).to(dtype).to(DEVICE), \
        (torch.randn(6, generator=gen) * 4).to(dtype).to(DEVICE)
    view = (1, 6, 1, 1, 1)
    cases = [(bias, None, None), (bias, residual, None), (None, residual, None), (bias, residual, residual_bias)]
    for b, r, rb in cases:
        expected = out.clone()
        if b is not None:
            expected.add_(b.view(view))
        if r is not None:
            expected.add_(r if rb is None else r + rb.view(view))
        got = gn_kernels.bias_residual_(out.clone(), b, r, rb)
        assert torch.equal(got, expected)
        with kernel_backend("triton"):
            assert torch.equal(refiners.add_bias_residual_(out.clone(), b, r, rb), expected)
    with pytest.raises(ValueError):
        gn_kernels.bias_residual_(out.clone(), bias, residual.contiguous(memory_format=torch.contiguous_format
                                                                        if channels_last else CL))
    # a residual of another layout: the dispatcher falls back to the ATen adds
    other = residual.contiguous(memory_format=torch.contiguous_format if channels_last else CL)
    expected = out.clone().add_(bias.view(view)).add_(other)
    with kernel_backend("triton"):
        assert torch.equal(refiners.add_bias_residual_(out.clone(), bias, other), expected)


def test_resnet_block_with_deferred_biases_matches_torch_path():
    gen = torch.Generator().manual_seed(8)
    for cin, cout in ((8, 8), (16, 8)):
        block = refiners.ResnetBlock3D(cin, cout, 4, 1e-5).eval()
        with torch.no_grad():
            for p in block.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        block = block.to(DEVICE)
        x = torch.randn(1, cin, 6, 5, 4, generator=gen).to(DEVICE).contiguous(memory_format=CL)
        with torch.inference_mode():
            with kernel_backend("torch"):
                expected = block(x.clone())
            with kernel_backend("triton"):
                out = block(x.clone(), consume_input=True)
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("channels_last", [False, True])
def test_channel_copies_and_upsample_join_match_aten(channels_last):
    gen = torch.Generator().manual_seed(11)
    first = _layout(torch.randn(1, 6, 4, 6, 5, generator=gen).half(), channels_last).to(DEVICE)
    second = _layout(torch.randn(1, 3, 4, 6, 5, generator=gen).half(), channels_last).to(DEVICE)
    bias = torch.randn(6, generator=gen).half().to(DEVICE)
    buffer = torch.zeros(1, 9, 4, 6, 5, dtype=torch.half, device=DEVICE)
    buffer = _layout(buffer, channels_last)
    gn_kernels.copy_channels_(buffer[:, :6], first, bias)
    gn_kernels.copy_channels_(buffer[:, 6:], second)
    assert torch.equal(buffer, torch.cat([first + bias.view(1, 6, 1, 1, 1), second], 1))
    with kernel_backend("triton"):
        joined = refiners.join_channels(first, second)
    assert torch.equal(joined, torch.cat([first, second], 1))
    assert joined.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)
    up = refiners.Upsample3D(4).to(DEVICE)
    with torch.no_grad():
        up.conv.weight.copy_(torch.randn(up.conv.weight.shape, generator=gen))
        up.conv.bias.copy_(torch.randn(4, generator=gen))
    low = _layout(torch.randn(1, 4, 2, 3, 3, generator=gen), channels_last).to(DEVICE)
    skip = _layout(torch.randn(1, 2, 4, 6, 6, generator=gen), channels_last).to(DEVICE)
    with torch.inference_mode():
        with kernel_backend("torch"):
            expected = up.upsample_and_join(low, skip, slab_elements=1)
        with kernel_backend("triton"):
            out = up.upsample_and_join(low, skip, slab_elements=1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------- adaptive filter
@pytest.mark.parametrize("dtype, channels, channels_last", [
    (torch.float32, 8, False), (torch.float16, 8, True), (torch.float16, 1, True), (torch.float32, 3, True)])
def test_adaptive_filter_kernel_matches_torch_path(dtype, channels, channels_last):
    gen = torch.Generator().manual_seed(3)
    shape = (2, channels, 6, 5, 7)
    x = _layout(torch.randn(shape, generator=gen).to(dtype), channels_last).to(DEVICE)
    # positive-leaning raw weights as the trained nets give, so filtered values stay O(1)
    raw = _layout((torch.randn(2, 27, 6, 5, 7, generator=gen) + 1.0).to(dtype), channels_last).to(DEVICE)
    raw_before = raw.clone()
    with kernel_backend("torch"):
        expected = refiners.adaptive_filter(x, raw.clone())
    out = af_kernels.adaptive_filter(x, raw)
    assert torch.equal(raw, raw_before), "the kernel must not normalise the weights in place"
    assert out.dtype == dtype and out.shape == x.shape
    assert out.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    else:  # same fp16 taps, fp32 sums in the same order: equal but for rare final-rounding ties
        _assert_one_rounding(out, expected)
        assert (out != expected).float().mean() < 0.01


def test_normalised_taps_are_the_torch_path_weights():
    gen = torch.Generator().manual_seed(10)
    raw = _layout(torch.randn(2, 27, 4, 5, 3, generator=gen).half(), True).to(DEVICE)
    taps = af_kernels.normalise_taps(raw, torch.float16)
    assert taps.shape == (2, 27, 60) and taps.dtype == torch.float16
    norm = raw.float().abs().sum(1, keepdim=True).clamp_min(1e-12)
    expected = (raw.float() / norm).half().reshape(2, 27, 60)
    # the fp32 norm may differ from this one in its last bit (summation order): rare one-step ties
    _assert_one_rounding(taps, expected, atol=1e-6)
    assert (taps != expected).float().mean() < 0.01


def test_adaptive_filter_kernel_small_programs_and_one_step():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 8, 5, 7, 6, generator=gen).to(DEVICE)
    raw = torch.randn(1, 27, 5, 7, 6, generator=gen).to(DEVICE)
    # one iteration against the zero-padded unfold definition, boxes of 2 x 2 x 4 voxels (ragged last)
    weights = raw / raw.abs().sum(1, keepdim=True)
    cols = F.pad(x, (1, 1, 1, 1, 1, 1)).unfold(2, 3, 1).unfold(3, 3, 1).unfold(4, 3, 1)
    expected = (cols.flatten(-3) * weights.permute(0, 2, 3, 4, 1).unsqueeze(1)).sum(-1)
    out = af_kernels.adaptive_filter_step(x, raw, tile=(2, 2, 4))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        af_kernels.adaptive_filter_step(x, raw, out=x)
    with pytest.raises(ValueError):
        af_kernels.adaptive_filter_step(x, raw[:, :26])


def test_torch_backend_dispatch():
    x = torch.randn(1, 4, 3, 3, 3)
    with kernel_backend("torch"):
        assert refiners._triton_kernels(x) is None
    with kernel_backend("triton"):
        assert refiners._triton_kernels(x) is not None
    with pytest.raises(ValueError):
        refiners.set_kernel_backend("cuda")
    assert refiners._REFINER_KERNELS.value == "auto"


def test_auto_backend_falls_back_to_torch_when_triton_cannot_run(monkeypatch):
    monkeypatch.setattr(refiners._REFINER_KERNELS, "failure", None)
    # behave as for CUDA tensors under "auto"
    monkeypatch.setattr(refiners, "_auto_uses_triton", lambda x: refiners._REFINER_KERNELS.failure is None)

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(gn_kernels, "group_norm_silu", broken)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(1, 8, 3, 4, 5, generator=gen)
    weight, bias = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    with kernel_backend("torch"):
        expected = refiners.group_norm_silu(x, 4, weight, bias, 1e-5, silu=True)
    with kernel_backend("triton"), pytest.raises(RuntimeError):
        refiners.group_norm_silu(x, 4, weight, bias, 1e-5, silu=True)
    assert refiners._REFINER_KERNELS.failure is None
    with pytest.warns(RuntimeWarning, match="no compiler"):
        out = refiners.group_norm_silu(x, 4, weight, bias, 1e-5, silu=True)
    assert torch.equal(out, expected)
    assert refiners._triton_kernels(x) is None  # not tried again in this process


# ------------------------------------------------------------------------------------- convolution
# fp16 only: Triton's interpreter has no bf16 dot (the compiled kernel takes bf16 like fp16)
@pytest.mark.parametrize("cin, cout, channels_last, bias", [
    (8, 8, True, True), (40, 8, True, True), (1, 8, False, True), (8, 27, True, False), (3, 1, False, True)])
def test_conv_kernel_matches_conv3d(cin, cout, channels_last, bias):
    dtype = torch.float16
    gen = torch.Generator().manual_seed(6)
    x = _layout(torch.randn(2, cin, 5, 6, 7, generator=gen).to(dtype), channels_last).to(DEVICE)
    weight = (torch.randn(cout, cin, 3, 3, 3, generator=gen) / (3 * cin ** 0.5)).to(dtype)
    weight = _layout(weight, channels_last).to(DEVICE)
    b = torch.randn(cout, generator=gen).to(dtype).to(DEVICE) if bias else None
    out = conv_kernels.conv3d_3x3x3(x, weight, b, block_voxels=64)  # ragged last program
    assert out.dtype == dtype and out.shape == (2, cout, 5, 6, 7)
    if channels_last and cout > 1:
        assert out.is_contiguous(memory_format=CL)
    # fp32 sums of the exact products, one final rounding
    expected = F.conv3d(x.double(), weight.double(), b.double() if bias else None, padding=1).to(dtype)
    _assert_one_rounding(out, expected, atol=1e-4)


# the refiners' channel pairs (1->8, 16->8, 8->8, 8->27, 8->1) and a few other powers of two; both
# segment widths for 8->8; boxes with ragged edges; a row shorter than one segment's span (W = 3)
@pytest.mark.parametrize("cin, cout, group, tile", [
    (8, 8, 4, (1, 2, 2)), (8, 8, 2, (2, 2, 4)), (16, 8, 2, (1, 4, 4)), (1, 8, 8, (1, 2, 2)), (8, 27, 2, (2, 2, 8)),
    (8, 1, 4, (1, 2, 2)), (2, 3, 4, (1, 2, 2)), (4, 5, 2, (2, 1, 2)), (32, 16, 2, (1, 2, 4))])
@pytest.mark.parametrize("size", [(5, 6, 7), (3, 4, 3)])
def test_row_conv_kernel_matches_conv3d(cin, cout, group, tile, size):
    dtype = torch.float16
    gen = torch.Generator().manual_seed(12)
    # restrided to channels_last_3d as the refiners do (also one-channel tensors, whose layout is ambiguous)
    x = torch.randn(2, cin, *size, generator=gen).to(dtype).to(DEVICE, memory_format=CL)
    weight = (torch.randn(cout, cin, 3, 3, 3, generator=gen) / (3 * cin ** 0.5)).to(dtype)
    weight = weight.to(DEVICE, memory_format=CL)
    b = torch.randn(cout, generator=gen).to(dtype).to(DEVICE)
    assert conv_kernels.rounds_bias_separately(x, weight)
    plan = conv_kernels.RowPlan(group, 2 * group, tile)
    out = conv_kernels.conv3d_3x3x3(x, weight, None, plan=plan)
    assert out.shape == (2, cout, *size) and out.is_contiguous(memory_format=CL)
    exact = F.conv3d(x.double(), weight.double(), None, padding=1)
    _assert_one_rounding(out, exact.to(dtype), atol=2e-3)
    # with a bias: the convolution rounded, then the bias add rounded (cuDNN + ATen's add_); the ReLU after
    biased = out + b.view(1, cout, 1, 1, 1)
    assert torch.equal(conv_kernels.conv3d_3x3x3(x, weight, b, plan=plan), biased)
    assert torch.equal(conv_kernels.conv3d_3x3x3(x, weight, b, relu=True, plan=plan), biased.clamp_min(0))
    # the default plan of this channel pair
    _assert_one_rounding(conv_kernels.conv3d_3x3x3(x, weight, None), exact.to(dtype), atol=2e-3)


def test_row_conv_kernel_takes_only_dense_channels_inner_layouts():
    x = torch.randn(1, 8, 4, 4, 4, device=DEVICE).half()
    weight = torch.randn(8, 8, 3, 3, 3, device=DEVICE).half()
    assert conv_kernels.rounds_bias_separately(x.contiguous(memory_format=CL), weight)
    assert not conv_kernels.rounds_bias_separately(x, weight)  # channels outermost
    assert not conv_kernels.rounds_bias_separately(x.contiguous(memory_format=CL).float(), weight.float())
    assert not conv_kernels.rounds_bias_separately(x[:, :6].contiguous(memory_format=CL), weight[:, :6])
    sliced = x.contiguous(memory_format=CL)[:, :, :, :, :3]  # rows with a gap
    assert not conv_kernels.rounds_bias_separately(sliced, weight)
    # one input channel: the output follows the weight's layout; a contiguous 8-channel output is out
    sdf = torch.rand(1, 1, 4, 4, 4, device=DEVICE).half()
    assert conv_kernels.rounds_bias_separately(sdf, weight[:, :1].contiguous(memory_format=CL))
    assert not conv_kernels.rounds_bias_separately(sdf, weight[:, :1].contiguous())
    assert conv_kernels.rounds_bias_separately(sdf, weight[:1, :1].contiguous())  # one channel in and out


def test_conv_kernel_output_layout_follows_cudnn_rule():
    """channels_last_3d out when the input or the weight is channels_last_3d by its strides, also for
    one-channel tensors (which are plain contiguous as well), so the layout survives a 1-channel conv_in."""
    sdf = torch.rand(1, 1, 4, 4, 4).half().to(DEVICE).to(memory_format=CL)
    weight = torch.randn(8, 1, 3, 3, 3).half().to(DEVICE)
    assert conv_kernels.channels_last_strides(sdf) and not conv_kernels.channels_last_strides(weight)
    assert conv_kernels.conv3d_3x3x3(sdf, weight).is_contiguous(memory_format=CL)
    plain = sdf.clone(memory_format=torch.contiguous_format)
    assert not conv_kernels.channels_last_strides(plain)
    assert not conv_kernels.conv3d_3x3x3(plain, weight).is_contiguous(memory_format=CL)
    assert conv_kernels.conv3d_3x3x3(plain, weight.to(memory_format=CL)).is_contiguous(memory_format=CL)


def test_conv_kernel_rejects_what_it_does_not_cover():
    x = torch.randn(1, 8, 4, 4, 4, device=DEVICE).half()
    with pytest.raises(ValueError):
        conv_kernels.conv3d_3x3x3(x, torch.randn(8, 8, 2, 2, 2, device=DEVICE).half())
    with pytest.raises(ValueError):
        conv_kernels.conv3d_3x3x3(x, torch.randn(64, 8, 3, 3, 3, device=DEVICE).half())
    with pytest.raises(ValueError):
        conv_kernels.conv3d_3x3x3(x, torch.randn(8, 8, 3, 3, 3, device=DEVICE))
    with pytest.raises(ValueError):
        refiners.set_conv_backend("cudnn")


def test_conv_module_dispatch():
    from engine.models.refiners import Conv3x3x3
    gen = torch.Generator().manual_seed(7)
    wide = Conv3x3x3(8, 64).half().to(DEVICE)  # more than 32 outputs: stays on torch
    narrow = Conv3x3x3(8, 8).half().to(DEVICE)
    assert list(narrow.state_dict()) == ["weight", "bias"] and isinstance(narrow, torch.nn.Conv3d)
    x = torch.randn(1, 8, 4, 5, 6, generator=gen).half().to(DEVICE)
    with torch.no_grad():
        with conv_backend("torch"):
            expected_wide, expected_narrow = wide(x), narrow(x)
        with conv_backend("triton"):
            assert torch.equal(wide(x), expected_wide)
            _assert_one_rounding(narrow(x), expected_narrow, atol=1e-3)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_conv_module_fuses_bias_and_relu_as_separate_ops(kernels):
    """Conv3x3x3(x, relu=True) on the row kernel: the convolution, ATen's bias add_ and the ReLU, each
    rounded; the adaptive-weight nets use it for their first convolution."""
    gen = torch.Generator().manual_seed(9)
    net = refiners._adaptive_weight_net(8).half().to(DEVICE)
    assert list(net.state_dict()) == ["0.weight", "0.bias", "2.weight"]
    x = torch.randn(1, 8, 5, 4, 6, generator=gen).half().to(DEVICE).contiguous(memory_format=CL)
    first = net[0]
    with torch.no_grad(), kernel_backend(kernels), conv_backend("triton"):
        unbiased = conv_kernels.conv3d_3x3x3(x, first.weight, None)
        expected = (unbiased + first.bias.view(1, 8, 1, 1, 1)).clamp_min(0)
        assert torch.equal(first(x, relu=True), expected)
        assert torch.equal(first(x), unbiased + first.bias.view(1, 8, 1, 1, 1))
        assert torch.equal(net(x), conv_kernels.conv3d_3x3x3(expected, net[2].weight, None))
        with conv_backend("torch"):
            reference = torch.nn.Sequential(*net)(x)  # nn.ReLU, cuDNN / ATen convolutions
    _assert_one_rounding(net(x), reference, atol=2e-3)


def test_tuned_conv_backend_times_each_shape_once_and_falls_back(monkeypatch):
    from engine.models.refiners import Conv3x3x3
    monkeypatch.setattr(refiners, "_tuned_conv_choices", {})
    gen = torch.Generator().manual_seed(8)
    conv = Conv3x3x3(4, 8).half().to(DEVICE)
    x = torch.randn(1, 4, 3, 4, 5, generator=gen).half().to(DEVICE)
    with torch.no_grad():
        with conv_backend("torch"):
            expected = conv(x)
        with conv_backend("tuned"):
            out = conv(x)
            choices = refiners._tuned_conv_choices
            assert len(choices) == 1 and set(choices.values()) <= {"torch", "triton"}
            conv(x)
            assert len(choices) == 1  # timed once per shape
            _assert_one_rounding(out, expected, atol=1e-3)
            # a Triton kernel that cannot run leaves the layer on torch
            choices.clear()

            def broken(*args, **kwargs):
                raise RuntimeError("no compiler")

            monkeypatch.setattr(conv_kernels, "conv3d_3x3x3", broken)
            assert torch.equal(conv(x), expected) and list(choices.values()) == ["torch"]


# ----------------------------------------------------------------------------- whole refiner patches
# The interpreter's fp16 dot products are slow (tens of seconds per patch): on CPU the whole-patch runs
# keep torch convolutions, the conv kernel being covered above.
FULL_PATCH_CONVS = "triton" if torch.cuda.is_available() else "torch"

def _fixture_model(fx, cls, sign, dtype):
    from engine.configs import RefinerConfig
    from engine.models import cast_compute_layers
    params = fx["constructor_params"]
    widths = tuple(params["unet3d1_replaced_by"]["params"]["block_out_channels"])
    config = RefinerConfig(sign=sign, block_out_channels=widths,
                           patch_size=params["official_constructor"]["patch_size"])
    model = cls(config).eval()
    model.load_state_dict(fx["state_dict"], strict=True)
    return cast_compute_layers(model, dtype).to(DEVICE)


def _within(ours, ref, tol):
    d = ours.double().cpu().flatten() - ref.double().cpu().flatten()
    rel = (d.norm() / ref.double().norm().clamp_min(1e-30)).item()
    return rel <= tol["rel_l2"] and d.abs().max().item() <= tol["max_abs"], rel


def test_refiner512_patch_with_kernels_and_channels_last(parity_fixture):
    """The whole patch with the Triton kernels (norms, adaptive filters; narrow convs on CUDA) in channels_last."""
    fx = parity_fixture("refiner512_patch.pt")
    model = _fixture_model(fx, Refiner512, False, torch.float16)
    sdf, feat = fx["inputs"]["sdf_patch"].to(DEVICE), fx["inputs"]["feat_patch"].to(DEVICE)
    with torch.inference_mode():
        with kernel_backend("torch"):
            reference = model.refine_patch(sdf, feat)
        model.channels_last = True
        stages = {}
        with kernel_backend("triton"), conv_backend(FULL_PATCH_CONVS):
            out = model.refine_patch(sdf, feat, stages)
    assert model.unet3d1.conv_in.weight.is_contiguous(memory_format=CL)
    tol = fx["tolerance_per_output"]
    ok, rel = _within(out, fx["outputs"]["out"], tol["out"])
    assert ok, f"out rel_l2 {rel:.3g}"
    for name in ("unet_out", "adaptive1", "adaptive3"):
        ok, rel = _within(stages[name], fx["intermediates"][name], tol[name])
        assert ok, f"{name} rel_l2 {rel:.3g}"
    # and close to the PyTorch path (fp16 rounding differences only)
    assert (out.float() - reference.float()).abs().max() < 2e-2


def test_sign_refiner_patch_with_kernels_and_channels_last(parity_fixture):
    fx = parity_fixture("refiner1024_patch.pt")
    model = _fixture_model(fx, SignRefiner1024, True, torch.float16)
    model.channels_last = True
    with torch.inference_mode(), kernel_backend("triton"), conv_backend(FULL_PATCH_CONVS):
        logits = model.sign_logits_patch(fx["inputs"]["sdf_patch"].to(DEVICE))
    tol = fx["tolerance_per_output"]["logits"]
    ok, rel = _within(logits, fx["outputs"]["logits"], tol)
    assert ok, f"logits rel_l2 {rel:.3g}"
    decided = fx["outputs"]["logits"].float().abs() > tol["max_abs"]
    assert torch.equal(model.positive_sign(logits).cpu()[decided], (fx["outputs"]["sign"] > 0)[decided])


# ------------------------------------------------------------------------ compiled for the H100
_SM90_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from engine.kernels import adaptive_filter, conv3d, group_norm


def build(fn, types, constants, warps):
    signature = {name: types.get(name, "i32") if name not in constants else "constexpr" for name in fn.arg_names}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    print(fn.__name__, "mma" in kernel.asm["ptx"], "compiled")


half, single = "*fp16", "*fp32"
build(adaptive_filter._filter_step_kernel, dict(x_ptr=half, taps_ptr=half, out_ptr=half),
      dict(C=8, BLOCK_C=8, PACKED_X=True, PACKED_OUT=True, TD=4, TH=4, TW=32), 8)
build(adaptive_filter._normalise_taps_kernel, dict(w_ptr=half, taps_ptr=half), dict(BLOCK_V=512), 4)
build(group_norm._partial_stats, dict(x_ptr=half, bias_ptr=half, mean_ptr=single, m2_ptr=single),
      dict(VSTRIDE=8, HAS_BIAS=True, BLOCK_V=512, BLOCK_C=8), 8)
build(group_norm._finalize, dict(mean_ptr=single, m2_ptr=single, weight_ptr=single, bias_ptr=single,
                                 scale_ptr=single, shift_ptr=single, samples="fp32", eps="fp32"),
      dict(PER_GROUP=2, BLOCK_G=2, BLOCK_T=2048), 4)
build(group_norm._apply, dict(x_ptr=half, bias_ptr=half, out_ptr=half, scale_ptr=single, shift_ptr=single),
      dict(SILU=True, HAS_BIAS=True, XSTRIDE=8, OSTRIDE=8, BLOCK_V=512, BLOCK_C=8), 8)
build(group_norm._bias_residual, dict(out_ptr=half, bias_ptr=half, res_ptr=half, res_bias_ptr=half),
      dict(C=8, CHANNELS_INNER=True, HAS_BIAS=True, HAS_RES=True, HAS_RES_BIAS=True, WIDE=False, BLOCK=2048), 4)
for cin, cout in ((8, 8), (16, 8), (8, 27), (1, 8), (8, 1)):
    plan = conv3d.row_plan(cin, cout)
    build(conv3d._conv3_rows_kernel, dict(x_ptr=half, w_ptr=half, b_ptr=half, out_ptr=half),
          dict(CIN=cin, COUT=cout, G=plan.group, SPAN=plan.span, NP=max(16, triton.next_power_of_2(plan.group * cout)),
               HAS_BIAS=True, RELU=cin == cout, TD=plan.tile[0], TH=plan.tile[1], TS=plan.tile[2],
               STAGES=plan.stages), plan.warps)
build(conv3d._conv3_kernel, dict(x_ptr=half, w_ptr=half, b_ptr=half, out_ptr=half),
      dict(CIN=40, COUT=8, KP=64, NP=16, HAS_BIAS=True, IEEE=False, BLOCK_V=128), 4)
"""


def test_kernels_compile_for_sm90():
    """The interpreter accepts some programs the compiler rejects: lower the full-size fp16
    configurations to sm_90 machine code (Triton's bundled ptxas; no GPU needed)."""
    from helpers.sm90 import compile_for_sm90

    stdout = compile_for_sm90(_SM90_SCRIPT)
    assert stdout.count("compiled") == 12
    assert stdout.count("_conv3_rows_kernel True compiled") == 5
    assert "_conv3_kernel True compiled" in stdout  # the conv runs on tensor cores
