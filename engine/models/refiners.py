"""The two dense refiners of Direct3D-S2 (architecture notes 3.6 and 3.7).

* :class:`Refiner512` (official ``Voxel_RefinerXL``, ``model_refiner.ckpt``): refines the decoded
  512^3 SDF with the 32-d decoder features; 27 overlapping patches blended with linear ramps.
* :class:`SignRefiner1024` (official ``Voxel_RefinerXL_sign``, ``model_refiner_1024.ckpt``): predicts
  an inside/outside sign at 512^3 for the voxels of the 1024^3 field outside the decoded band;
  27 patches that overwrite each other.

Both share :class:`UNet3D`, a 3D UNet with the parameter layout of the official ``UNet3DModel``
(diffusers-style names) so the checkpoints load with an identity key map.

Whole-volume runs never build the official dense giant tensors: patches are densified on the fly
from the sparse decoder output, the 512 refiner applies its per-voxel feature MLP on the sparse rows
(no 32-channel volume), and the 1024 result is a compact 512^3 sign grid plus the sparse band
(:class:`SignField`), from which the field value of any 1024^3 point and every off-band cell that
can contain the surface are computed on demand. Patches without any decoded voxel are all
background, so their result is computed once and reused.

On CUDA the activations stay in ``channels_last_3d`` (see ``channels_last`` on the models), group
norms (+ SiLU) and adaptive filters run on the Triton kernels of :mod:`engine.kernels`
(:func:`set_kernel_backend`), and each narrow 3x3x3 convolution shape runs on a Triton kernel when
that is faster than cuDNN (:func:`set_conv_backend`, timed once per shape). Conv biases are added
by the pass that follows (norm, residual, copy) with the rounding of ATen's separate ``add_``. The PyTorch code here is the CPU path and the kernels' test oracle.
"""
from __future__ import annotations

import contextlib
import importlib
import itertools
import time
from types import SimpleNamespace
from typing import Callable, ContextManager, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.configs import RefinerConfig
from engine.kernels import BackendChoice

# Upper bound on the number of elements converted to fp32 at once by the group norm (64 MiB of fp32).
_NORM_CHUNK_ELEMENTS = 1 << 24


def _memory_format_of(x: Tensor) -> torch.memory_format:
    """channels_last_3d when ``x`` is laid out that way (and not also plain contiguous), else contiguous."""
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


# ----------------------------------------------------------------------------------------------------
# Kernel backend: Triton on CUDA (engine.kernels), PyTorch elsewhere and as the test oracle
# ----------------------------------------------------------------------------------------------------
_REFINER_KERNELS = BackendChoice("refiner kernel backend", ("auto", "torch", "triton"), "auto")


def set_kernel_backend(name: str) -> str:
    """Select the group norm / adaptive filter implementation; returns the previous setting.

    ``"auto"``: the Triton kernels of :mod:`engine.kernels` for CUDA tensors, PyTorch otherwise;
    ``"torch"``: always PyTorch; ``"triton"``: always Triton (on CPU only through ``TRITON_INTERPRET=1``).
    """
    return _REFINER_KERNELS.set(name)


def kernel_backend(name: str) -> ContextManager[None]:
    """Context manager form of :func:`set_kernel_backend`."""
    return _REFINER_KERNELS.use(name)


def _auto_uses_triton(x: Tensor) -> bool:
    return x.is_cuda and _REFINER_KERNELS.failure is None


def _triton_kernels(x: Tensor) -> Optional[SimpleNamespace]:
    """The Triton kernel modules to use for ``x`` under the current backend, or None for PyTorch."""
    return _REFINER_KERNELS.load_kernels(_auto_uses_triton(x), lambda: SimpleNamespace(
        adaptive=importlib.import_module("engine.kernels.adaptive_filter"),
        norm=importlib.import_module("engine.kernels.group_norm")))


def _run_triton(fn: Callable[..., Tensor], *args, **kwargs) -> Optional[Tensor]:
    """``fn(*args, **kwargs)``, or None (use PyTorch) when the kernels cannot run under "auto"
    (:meth:`BackendChoice.attempt`)."""
    return _REFINER_KERNELS.attempt(lambda: fn(*args, **kwargs), lambda: None)


_REFINER_CONVS = BackendChoice("refiner conv backend", ("auto", "torch", "triton", "tuned"), "auto")
# "tuned": per (layer width, input shape, dtype, layout, device) the faster of torch and Triton
_tuned_conv_choices: dict = {}


def set_conv_backend(name: str) -> str:
    """Select how the narrow 3x3x3 convolutions run; returns the previous setting.

    ``"auto"`` (default): ``"tuned"`` where the refiner Triton kernels are in use (CUDA, see
    :func:`set_kernel_backend`), else ``"torch"``.
    ``"torch"``: ``F.conv3d`` (cuDNN on CUDA). ``"triton"``: the fp16/bf16 convolutions with
    at most 64 input and 32 output channels (the full-resolution layers) run on the Triton kernel of
    :mod:`engine.kernels.conv3d` (on CPU only through ``TRITON_INTERPRET=1``); others stay on torch.
    ``"tuned"``: like ``"triton"``, but the first call of each layer shape times both implementations
    and keeps the faster one for the process (as ``cudnn.benchmark`` does for its algorithms).
    """
    return _REFINER_CONVS.set(name)


def conv_backend(name: str) -> ContextManager[None]:
    """Context manager form of :func:`set_conv_backend`."""
    return _REFINER_CONVS.use(name)


def _seconds_per_call(fn: Callable[[], Tensor], device: torch.device, repeats: int = 3) -> float:
    """Mean time of ``fn`` after one untimed call (CUDA events on CUDA, wall clock elsewhere)."""
    fn()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / repeats
    began = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - began) / repeats


class Conv3x3x3(nn.Conv3d):
    """``nn.Conv3d(in, out, 3, padding=1)`` (same parameters and keys) with the Triton path of
    :func:`set_conv_backend` for narrow low-precision layers."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, 3, padding=1, bias=bias)

    def forward(self, x: Tensor, relu: bool = False) -> Tensor:
        """The convolution with its bias, then ``clamp_min(0)`` with ``relu`` (``nn.ReLU``'s values);
        both run in the Triton row kernel's epilogue where that kernel takes the layer."""
        kernel = self._triton_kernel(x)
        if kernel is not None and kernel.rounds_bias_separately(x, self.weight):
            return kernel.conv3d_3x3x3(x, self.weight, self.bias, relu=relu)
        out, pending_bias = self.forward_unbiased(x)
        out = add_bias_residual_(out, pending_bias)
        return out.clamp_min_(0) if relu else out

    def forward_unbiased(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """(output, bias still to add): with the Triton kernels and cuDNN convolutions the bias is left
        to the consumer (a norm's ``pre_bias`` or :func:`add_bias_residual_`), which adds it with the
        rounding of ATen's separate ``add_`` after cuDNN, without a pass of its own."""
        kernel = self._triton_kernel(x)
        if kernel is not None:
            if self.bias is not None and _triton_kernels(x) is not None:
                return kernel.conv3d_3x3x3(x, self.weight, None), self.bias
            return kernel.conv3d_3x3x3(x, self.weight, self.bias), None
        if self.bias is not None and x.dim() == 5 and _triton_kernels(x) is not None:
            return F.conv3d(x, self.weight, None, self.stride, self.padding, self.dilation, self.groups), self.bias
        return super().forward(x), None

    def _triton_kernel(self, x: Tensor):
        """:mod:`engine.kernels.conv3d` when this call runs there (see :func:`set_conv_backend`), else None."""
        mode = _REFINER_CONVS.value
        if mode == "auto":
            mode = "tuned" if x.is_cuda and _triton_kernels(x) is not None else "torch"
        if mode != "torch" and x.dim() == 5 and x.dtype in (torch.float16, torch.bfloat16) \
                and x.dtype == self.weight.dtype:
            import engine.kernels.conv3d as kernel  # imported here: tests reload it under the interpreter
            if self.in_channels <= kernel.MAX_IN_CHANNELS and self.out_channels <= kernel.MAX_OUT_CHANNELS:
                if mode == "triton" or self._tuned_choice(x, kernel) == "triton":
                    return kernel
        return None

    def _tuned_choice(self, x: Tensor, kernel) -> str:
        key = (self.in_channels, self.out_channels, self.bias is None, tuple(x.shape), x.dtype, x.device,
               kernel.channels_last_strides(x), kernel.channels_last_strides(self.weight))
        choice = _tuned_conv_choices.get(key)
        if choice is None:
            # both without the bias, which the fast path leaves to the next pass in either case
            torch_time = _seconds_per_call(lambda: F.conv3d(x, self.weight, None, 1, 1), x.device)
            try:
                triton_time = _seconds_per_call(lambda: kernel.conv3d_3x3x3(x, self.weight, None), x.device)
            except Exception:  # no usable Triton here (compiler, architecture): keep torch for this shape
                triton_time = float("inf")
            choice = "triton" if triton_time < torch_time else "torch"
            _tuned_conv_choices[key] = choice
        return choice


# ----------------------------------------------------------------------------------------------------
# Group norm in fp32 without a full fp32 copy of the activation
# ----------------------------------------------------------------------------------------------------
def group_norm_silu(x: Tensor, num_groups: int, weight: Tensor, bias: Tensor, eps: float, *,
                    silu: bool, inplace: bool = False, pre_bias: Optional[Tensor] = None,
                    chunk_elements: int = _NORM_CHUNK_ELEMENTS) -> Tensor:
    """GroupNorm computed in fp32 and cast back to ``x.dtype``, optionally followed by SiLU.

    Equivalent to ``silu(group_norm(x.float(), ...).to(x.dtype))`` (the official fp32 norm, then the
    activation on the low-precision result), but the fp32 copies are made a few channels at a time:
    per-channel mean and variance are combined exactly into group statistics
    (var_g = mean_c(var_c) + mean_c((mean_c - mean_g)^2), all channels of a group having equal counts).
    On CUDA (see :func:`set_kernel_backend`) 5D inputs go to the Triton kernels of
    :mod:`engine.kernels.group_norm` (one read for the statistics, one fused normalise + affine + SiLU
    pass), which evaluate the same expression.

    ``pre_bias`` [C] (the bias of the convolution that produced ``x``, see
    :meth:`Conv3x3x3.forward_unbiased`) is first added to ``x`` with the low-precision rounding of an
    in-place ``add_``; the Triton kernels do that on the fly in both passes.
    """
    batch, channels = x.shape[:2]
    if channels % num_groups:
        raise ValueError(f"{channels} channels do not split into {num_groups} groups")
    kernels = _triton_kernels(x)
    if kernels is not None and kernels.norm.voxel_stride(x) is not None:
        # a kernel that cannot compile fails before writing anything, so x is intact for the fallback
        out = _run_triton(kernels.norm.group_norm_silu, x, num_groups, weight, bias, eps, silu=silu,
                          out=x if inplace else None, pre_bias=pre_bias)
        if out is not None:
            return out
    if pre_bias is not None:
        bias_view = pre_bias.view(1, channels, *([1] * (x.dim() - 2)))
        x = x.add_(bias_view) if inplace else x + bias_view
    per_group = channels // num_groups
    spatial_dims = tuple(range(2, x.dim()))
    voxels = x[0, 0].numel() if x.numel() else 0
    step = max(1, min(channels, chunk_elements // max(1, batch * voxels)))

    channel_mean = torch.empty(batch, channels, dtype=torch.float32, device=x.device)
    channel_var = torch.empty_like(channel_mean)
    for c0 in range(0, channels, step):
        part = x[:, c0:c0 + step].float()
        var, mean = torch.var_mean(part, dim=spatial_dims, correction=0)
        channel_mean[:, c0:c0 + step] = mean
        channel_var[:, c0:c0 + step] = var
        del part
    grouped_mean = channel_mean.view(batch, num_groups, per_group)
    group_mean = grouped_mean.mean(-1, keepdim=True)
    group_var = (channel_var.view(batch, num_groups, per_group)
                 + (grouped_mean - group_mean).square()).mean(-1, keepdim=True)
    rstd = torch.rsqrt(group_var + eps)
    # y = x * scale + shift with per-(batch, channel) scale = gamma * rstd, shift = beta - mean * scale
    scale = (rstd * weight.float().view(1, num_groups, per_group)).view(batch, channels)
    shift = bias.float().view(1, channels) - group_mean.expand(-1, -1, per_group).reshape(batch, channels) * scale
    bcast = (batch, -1) + (1,) * len(spatial_dims)

    out = x if inplace else torch.empty_like(x)
    for c0 in range(0, channels, step):
        part = x[:, c0:c0 + step].to(torch.float32, copy=True)  # never an alias of x (fp32 input)
        part.mul_(scale[:, c0:c0 + step].reshape(bcast)).add_(shift[:, c0:c0 + step].reshape(bcast))
        target = out[:, c0:c0 + step]
        target.copy_(part)
        del part
        if silu:
            F.silu(target, inplace=True)
    return out


class GroupNorm32(nn.GroupNorm):
    """``nn.GroupNorm`` (keys ``weight``/``bias``, kept fp32) evaluated by :func:`group_norm_silu`."""

    def forward(self, x: Tensor, silu: bool = False, inplace: bool = False,
                pre_bias: Optional[Tensor] = None) -> Tensor:
        return group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps, silu=silu, inplace=inplace,
                               pre_bias=pre_bias)


def add_bias_residual_(out: Tensor, bias: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                       residual_bias: Optional[Tensor] = None) -> Tensor:
    """``out.add_(bias)``, then ``out.add_(residual + residual_bias)`` (each optional), in place with
    the rounding of those low-precision ATen ops; one Triton pass on CUDA (see
    :func:`engine.kernels.group_norm.bias_residual_`) when the layouts allow it."""
    if bias is None and residual is None:
        return out
    kernels = _triton_kernels(out)
    if kernels is not None and kernels.norm._dense_channels_inner(out) is not None and (
            residual is None or (residual.stride() == out.stride() and residual.dtype == out.dtype
                                 and residual.shape == out.shape)):
        if _run_triton(kernels.norm.bias_residual_, out, bias, residual, residual_bias) is not None:
            return out
    shape = (1, out.shape[1]) + (1,) * (out.dim() - 2)
    if bias is not None:
        out.add_(bias.view(shape))
    if residual is not None:
        out.add_(residual if residual_bias is None else residual + residual_bias.view(shape))
    return out


# ----------------------------------------------------------------------------------------------------
# UNet3D (official UNet3DModel layout)
# ----------------------------------------------------------------------------------------------------
class ResnetBlock3D(nn.Module):
    """GN -> SiLU -> conv3 -> GN -> SiLU -> conv3, plus the input (1^3 conv when widths differ)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = GroupNorm32(groups, in_channels, eps=eps)
        self.conv1 = Conv3x3x3(in_channels, out_channels)
        self.norm2 = GroupNorm32(groups, out_channels, eps=eps)
        self.conv2 = Conv3x3x3(out_channels, out_channels)
        self.conv_shortcut = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor, consume_input: bool = False) -> Tensor:
        """``consume_input=True`` lets the block overwrite ``x`` (the caller must not use it again),
        which saves one activation-sized buffer on the wide concatenated inputs of the up path."""
        shortcut, shortcut_bias = x, None
        if self.conv_shortcut is not None:
            if _triton_kernels(x) is not None and self.conv_shortcut.bias is not None:
                # its bias is added in the residual pass below (same rounding as a separate add_)
                sc = self.conv_shortcut
                shortcut = F.conv3d(x, sc.weight, None, sc.stride, sc.padding, sc.dilation, sc.groups)
                shortcut_bias = sc.bias
            else:
                shortcut = self.conv_shortcut(x)
        h = self.norm1(x, silu=True, inplace=consume_input and self.conv_shortcut is not None)
        del x
        h, bias = self.conv1.forward_unbiased(h)
        self.norm2(h, silu=True, inplace=True, pre_bias=bias)
        h, bias = self.conv2.forward_unbiased(h)
        return add_bias_residual_(h, bias, shortcut, shortcut_bias)


class Downsample3D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample3D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.ConvTranspose3d(channels, channels, 2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)

    def upsample_and_join(self, x: Tensor, skip: Tensor, slab_elements: int = 1 << 26) -> Tensor:
        """``cat([conv(x), skip], 1)`` written into one buffer, without a separate upsampled tensor.

        A k2 s2 transposed conv maps each input voxel to its own 2x2x2 output block, so x-slabs of the
        input give exactly the matching output slabs.
        """
        batch = x.shape[0]
        out_channels = self.conv.out_channels
        out_size = [2 * s for s in x.shape[2:]]
        if list(skip.shape[2:]) != out_size:
            raise ValueError(f"skip of size {tuple(skip.shape[2:])} does not match the upsampled {out_size}")
        joined = torch.empty(batch, out_channels + skip.shape[1], *out_size, dtype=x.dtype, device=x.device,
                             memory_format=_memory_format_of(x))
        per_slice = batch * out_channels * 2 * out_size[1] * out_size[2]
        step = max(1, slab_elements // per_slice)
        conv = self.conv
        kernels = _triton_kernels(x)
        for x0 in range(0, x.shape[2], step):
            rows = slice(2 * x0, 2 * (x0 + step))
            if kernels is not None and skip.dtype == joined.dtype:
                # the bias is added while the slab and its skip rows are written in place (one pass)
                slab = F.conv_transpose3d(x[:, :, x0:x0 + step], conv.weight, None, conv.stride, conv.padding,
                                          conv.output_padding, conv.groups, conv.dilation)
                if _run_triton(kernels.norm.join_channels_, joined[:, :, rows], slab, skip[:, :, rows],
                               conv.bias) is not None:
                    continue
                joined[:, :out_channels, rows] = slab if conv.bias is None else slab.add_(
                    conv.bias.view(1, -1, 1, 1, 1))
            else:
                joined[:, :out_channels, rows] = conv(x[:, :, x0:x0 + step])
            joined[:, out_channels:, rows] = skip[:, :, rows]
        return joined


def copy_channels_(dst: Tensor, src: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``dst.copy_(src)`` after ``src.add_(bias)`` (optional), as one Triton pass when the kernels are
    in use (see :func:`engine.kernels.group_norm.copy_channels_`), else with ATen."""
    kernels = _triton_kernels(dst)
    if kernels is not None and kernels.norm.voxel_stride(dst) is not None \
            and kernels.norm.voxel_stride(src) is not None and dst.dtype == src.dtype:
        if _run_triton(kernels.norm.copy_channels_, dst, src, bias) is not None:
            return dst
    if bias is not None:
        src = src + bias.view(1, -1, *([1] * (src.dim() - 2)))
    return dst.copy_(src)


def join_channels(first: Tensor, second: Tensor) -> Tensor:
    """``torch.cat([first, second], 1)`` in ``first``'s memory format (the copies on the Triton kernels)."""
    kernels = _triton_kernels(first)
    if kernels is None or first.dim() != 5:
        return torch.cat([first, second], dim=1)
    joined = torch.empty(first.shape[0], first.shape[1] + second.shape[1], *first.shape[2:], dtype=first.dtype,
                         device=first.device, memory_format=_memory_format_of(first))
    if second.dtype == first.dtype and _run_triton(kernels.norm.join_channels_, joined, first, second) is not None:
        return joined
    copy_channels_(joined[:, :first.shape[1]], first)
    copy_channels_(joined[:, first.shape[1]:], second)
    return joined


class DownBlock3D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, downsample: bool,
                 groups: int, eps: float):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock3D(in_channels if i == 0 else out_channels, out_channels, groups, eps)
            for i in range(num_layers))
        self.downsamplers = nn.ModuleList([Downsample3D(out_channels)]) if downsample else None


class MidBlock3D(nn.Module):
    def __init__(self, channels: int, num_layers: int, groups: int, eps: float):
        super().__init__()
        # one leading resnet plus one per layer, as diffusers' mid blocks (without attention)
        self.resnets = nn.ModuleList(ResnetBlock3D(channels, channels, groups, eps) for _ in range(num_layers + 1))


class UpBlock3D(nn.Module):
    def __init__(self, in_channels: int, prev_channels: int, out_channels: int, num_layers: int,
                 upsample: bool, groups: int, eps: float):
        super().__init__()
        resnets = []
        for i in range(num_layers):
            skip = in_channels if i == num_layers - 1 else out_channels
            current = prev_channels if i == 0 else out_channels
            resnets.append(ResnetBlock3D(current + skip, out_channels, groups, eps))
        self.resnets = nn.ModuleList(resnets)
        self.upsamplers = nn.ModuleList([Upsample3D(out_channels)]) if upsample else None


class UNet3D(nn.Module):
    """3D UNet in the layout of the official ``UNet3DModel`` with ``use_conv_out=False``.

    Down path: ``conv_in`` then ``len(block_out_channels)`` blocks of ``layers_per_block`` resnets,
    all but the last followed by a k2 s2 conv. Every conv_in / resnet / downsampler output is kept as
    a skip. Mid: ``layers_mid_block + 1`` resnets. Up path: blocks of ``layers_per_block + 1`` resnets,
    each eating one skip (``cat([h, skip])``), all but the last followed by a k2 s2 transposed conv.
    Output: GN + SiLU, ``block_out_channels[0]`` channels. Spatial size must divide by
    ``2 ** (len(block_out_channels) - 1)``.
    """

    def __init__(self, in_channels: int, block_out_channels: Sequence[int] = (8, 32, 128, 512),
                 layers_per_block: int = 2, layers_mid_block: int = 2, norm_num_groups: int = 4,
                 norm_eps: float = 1e-5):
        super().__init__()
        widths = list(block_out_channels)
        self.block_out_channels = tuple(widths)
        self.conv_in = Conv3x3x3(in_channels, widths[0])
        self.down_blocks = nn.ModuleList()
        previous = widths[0]
        for i, width in enumerate(widths):
            last = i == len(widths) - 1
            self.down_blocks.append(DownBlock3D(previous, width, layers_per_block, not last, norm_num_groups, norm_eps))
            previous = width
        self.mid_block = MidBlock3D(widths[-1], layers_mid_block, norm_num_groups, norm_eps)
        self.up_blocks = nn.ModuleList()
        reversed_widths = widths[::-1]
        previous = reversed_widths[0]
        for i, width in enumerate(reversed_widths):
            last = i == len(widths) - 1
            skip_width = reversed_widths[min(i + 1, len(widths) - 1)]
            self.up_blocks.append(UpBlock3D(skip_width, previous, width, layers_per_block + 1, not last,
                                            norm_num_groups, norm_eps))
            previous = width
        self.conv_norm_out = GroupNorm32(norm_num_groups, widths[0], eps=norm_eps)

    @property
    def size_multiple(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def forward(self, x: Tensor) -> Tensor:
        if any(s % self.size_multiple for s in x.shape[2:]):
            raise ValueError(f"UNet3D input size {tuple(x.shape[2:])} must divide by {self.size_multiple}")
        h = self.conv_in(x)
        del x
        skips = [h]
        for block in self.down_blocks:
            for resnet in block.resnets:
                h = resnet(h)
                skips.append(h)
            if block.downsamplers is not None:
                h = block.downsamplers[0](h)
                skips.append(h)
        for resnet in self.mid_block.resnets:
            h = resnet(h)
        pending_upsample = None  # the previous block's upsampler, fused into the next concatenation
        for block in self.up_blocks:
            for resnet in block.resnets:
                if pending_upsample is not None:
                    joined = pending_upsample.upsample_and_join(h, skips.pop())
                    pending_upsample = None
                else:
                    joined = join_channels(h, skips.pop())
                del h
                h = resnet(joined, consume_input=True)
                del joined
            if block.upsamplers is not None:
                pending_upsample = block.upsamplers[0]
        if pending_upsample is not None:
            h = pending_upsample(h)
        return self.conv_norm_out(h, silu=True, inplace=True)


# ----------------------------------------------------------------------------------------------------
# Adaptive filtering (512 refiner)
# ----------------------------------------------------------------------------------------------------
def adaptive_filter(x: Tensor, raw_weights: Tensor, iterations: int = 3) -> Tensor:
    """Per-voxel 3x3x3 filtering shared across channels, repeated ``iterations`` times.

    ``raw_weights`` [B, 27, D, H, W] is L1-normalised over its 27 channels; tap ``9i + 3j + k`` weighs
    the neighbour at offset (i-1, j-1, k-1) along (D, H, W), with zeros outside the volume. The sum
    of 27 shifted views (no unfold) accumulates in fp32; each iteration's result is rounded to the
    input dtype as the official low-precision evaluation does. ``raw_weights`` is normalised in place.

    On CUDA (see :func:`set_kernel_backend`) each iteration is one launch of the Triton kernel of
    :mod:`engine.kernels.adaptive_filter`, which normalises the weights on the fly (with the same
    roundings) and leaves ``raw_weights`` untouched.
    """
    kernels = _triton_kernels(x)
    if kernels is not None and x.dim() == 5:
        out = _run_triton(kernels.adaptive.adaptive_filter, x, raw_weights, iterations)
        if out is not None:
            return out
    dims = x.shape[2:]
    norm = torch.linalg.vector_norm(raw_weights, ord=1, dim=1, keepdim=True, dtype=torch.float32)
    taps = raw_weights.div_(norm.clamp_min_(1e-12)).to(x.dtype)  # in place: no fp32 copy of 27 channels
    del norm
    for _ in range(iterations):
        padded = F.pad(x, (1, 1, 1, 1, 1, 1))
        acc = torch.zeros_like(x, dtype=torch.float32, memory_format=_memory_format_of(x))
        for tap, (i, j, k) in enumerate(itertools.product(range(3), repeat=3)):
            shifted = padded[:, :, i:i + dims[0], j:j + dims[1], k:k + dims[2]]
            acc.addcmul_(shifted, taps[:, tap:tap + 1])
        del padded
        x = acc.to(x.dtype)
        del acc
    return x


class _AdaptiveWeightNet(nn.Sequential):
    """conv(8->8, 3) + ReLU + conv(8->27, 3, no bias): keys ``.0`` and ``.2``; the ReLU runs in the
    first convolution's epilogue where the Triton row kernel takes it."""

    def forward(self, x: Tensor) -> Tensor:
        return self[2](self[0](x, relu=True))


def _adaptive_weight_net(channels: int = 8) -> nn.Sequential:
    return _AdaptiveWeightNet(Conv3x3x3(channels, channels), nn.ReLU(), Conv3x3x3(channels, 27, bias=False))


class GeoDecoder(nn.Module):
    """Per-voxel MLP on the 32-d decoder features: 32 -> 32 -> 32 -> 32 -> 8 with ReLUs (``net.{0,2,4,6}``)."""

    def __init__(self, in_channels: int = 32, hidden: int = 32, out_channels: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out_channels))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


# ----------------------------------------------------------------------------------------------------
# Patch tiling helpers
# ----------------------------------------------------------------------------------------------------
def patch_origins(resolution: int, patch_size: int, stride: int) -> list[int]:
    """Origins along one axis; the official tilings cover the volume exactly ({0,160,320} / {0,128,256})."""
    if patch_size > resolution or stride <= 0:
        raise ValueError(f"patch {patch_size} / stride {stride} do not tile a volume of {resolution}")
    count = (resolution - patch_size) // stride + 1
    if (count - 1) * stride + patch_size != resolution:
        raise ValueError(f"patches of {patch_size} at stride {stride} do not end at {resolution}")
    return [i * stride for i in range(count)]


def blend_weights(resolution: int, patch_size: int, stride: int, device=None) -> list[Tensor]:
    """1D weight of each patch along one axis for the official linear blending.

    The official run blends neighbouring patches with ``ramp = linspace(0, 1, overlap)`` as
    ``old * (1 - ramp) + new * ramp`` along z, then y, then x. Each pass is linear and the ramps of two
    neighbours sum to one, so the blended volume is ``sum_p w_x(p) w_y(p) w_z(p) patch_p`` with these
    per-axis weights (1 inside a patch, ramping over the overlaps it shares).
    """
    origins = patch_origins(resolution, patch_size, stride)
    overlap = patch_size - stride
    if overlap > stride:
        raise ValueError("blending assumes each voxel lies in at most two patches per axis")
    ramp = torch.linspace(0, 1, overlap, dtype=torch.float32, device=device) if overlap > 0 else None
    weights = []
    for index in range(len(origins)):
        w = torch.ones(patch_size, dtype=torch.float32, device=device)
        if overlap > 0 and index > 0:
            w[:overlap] = ramp
        if overlap > 0 and index < len(origins) - 1:
            w[patch_size - overlap:] = 1 - ramp
        weights.append(w)
    return weights


def _spatial_coords(coords: Tensor) -> Tensor:
    """[N, 3] (x, y, z) from [N, 4] (batch, x, y, z) or [N, 3] coordinates."""
    if coords.dim() != 2 or coords.shape[1] not in (3, 4):
        raise ValueError(f"coords must be [N, 3] or [N, 4], got {tuple(coords.shape)}")
    return coords[:, -3:]


def _linear_keys(xyz: Tensor, resolution: int) -> Tensor:
    xyz = xyz.long()
    return (xyz[:, 0] * resolution + xyz[:, 1]) * resolution + xyz[:, 2]


def last_occurrence_unique(keys: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted unique ``keys`` and, for each, the row of its last occurrence (last write wins)."""
    order = torch.sort(keys, stable=True).indices
    sorted_keys = keys[order]
    is_last = torch.ones_like(sorted_keys, dtype=torch.bool)
    if sorted_keys.numel() > 1:
        is_last[:-1] = sorted_keys[1:] != sorted_keys[:-1]
    return sorted_keys[is_last], order[is_last]


class _PatchSource:
    """Sparse rows that are densified one patch box at a time (default value outside the rows)."""

    def __init__(self, xyz: Tensor, values: Tensor, resolution: int):
        # duplicates: keep the last row per coordinate, as the official dense scatter does
        keys, rows = last_occurrence_unique(_linear_keys(xyz, resolution))
        self.xyz = xyz[rows].to(torch.int32)
        self.values = values[rows]

    def _inside(self, origin: Sequence[int], size: int) -> tuple[Tensor, Tensor]:
        lo = torch.tensor(origin, dtype=torch.int32, device=self.xyz.device)
        local = self.xyz - lo
        return local, ((local >= 0) & (local < size)).all(dim=1)

    def box_rows(self, origins: Sequence[Sequence[int]], size: int) -> list[tuple[Tensor, Tensor]]:
        """Per box: the voxel offsets inside it ((x * size + y) * size + z) of the rows it holds and
        their row ids (int64, the index type of ``index_copy_``). Built for all boxes before any patch
        runs: these are the whole run's host synchronisations, so the patch loop then enqueues its
        work without waiting for the GPU (a wait per patch left the GPU idle while the host launched
        the next patch's kernels)."""
        boxes = []
        for origin in origins:
            local, inside = self._inside(origin, size)
            rows = torch.nonzero(inside).squeeze(1)
            local = local[rows]
            boxes.append(((local[:, 0].long() * size + local[:, 1]) * size + local[:, 2], rows))
        return boxes

    def densify(self, box: tuple[Tensor, Tensor], size: int, background: Tensor, out_dtype,
                memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
        """[1, C, size, size, size] with ``background`` [C] where no row lies, in ``memory_format``
        (contiguous or channels_last_3d); ``box`` from :meth:`box_rows`."""
        offsets, rows = box
        channels = background.numel()
        patch = torch.empty((1, channels, size, size, size), dtype=out_dtype, device=self.xyz.device,
                            memory_format=memory_format)
        patch.copy_(background.to(out_dtype).view(1, channels, 1, 1, 1))
        values = self.values.index_select(0, rows).to(out_dtype)
        if memory_format == torch.channels_last_3d:
            patch.permute(0, 2, 3, 4, 1).view(-1, channels).index_copy_(0, offsets, values)
        else:
            patch.view(channels, -1).index_copy_(1, offsets, values.T)
        return patch


@contextlib.contextmanager
def _cudnn_autotuning(device: torch.device) -> Iterator[None]:
    """``torch.backends.cudnn.benchmark`` on for a whole-volume run on CUDA (restored afterwards):
    the 27 patches share their layer shapes, so cuDNN's one-off algorithm search pays back."""
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


class _DenseLayout:
    """Memory layout of a dense refiner's activations.

    ``channels_last`` None (default) means ``channels_last_3d`` on CUDA (cuDNN then runs its NDHWC
    kernels without layout transposes) and plain contiguous elsewhere; True / False force it. The
    conv weights are converted once, on the first patch that needs them in the other layout.
    """

    channels_last: Optional[bool] = None

    def activation_format(self) -> torch.memory_format:
        wanted = self.channels_last if self.channels_last is not None else self.conv_in.weight.is_cuda
        return torch.channels_last_3d if wanted else torch.contiguous_format

    def _prepare_layout(self) -> torch.memory_format:
        fmt = self.activation_format()
        probe = self.unet3d1.conv_in.weight  # more than one input channel: its layout is unambiguous
        if not probe.is_contiguous(memory_format=fmt):
            # keep the kind of the parameters: ordinary ones stay ordinary (in-place loads and training
            # still work), inference tensors (a model built under inference_mode) stay inference tensors
            with torch.inference_mode(probe.is_inference()), torch.no_grad():
                self.to(memory_format=fmt)
        return fmt


# ----------------------------------------------------------------------------------------------------
# 512 refiner
# ----------------------------------------------------------------------------------------------------
class Refiner512(_DenseLayout, nn.Module):
    """Official ``Voxel_RefinerXL``: per patch, SDF conv + feature MLP -> UNet3D -> 3 adaptive blocks -> tanh."""

    def __init__(self, config: RefinerConfig = RefinerConfig()):
        super().__init__()
        if config.sign:
            raise ValueError("Refiner512 needs a config with sign=False")
        self.config = config
        width = config.block_out_channels[0]
        self.conv_in = Conv3x3x3(config.in_channels, 8)
        self.latent_mlp = GeoDecoder(config.feature_channels, 32, 8)
        self.unet3d1 = UNet3D(16, config.block_out_channels, config.layers_per_block, config.layers_mid_block,
                              config.norm_num_groups, 1e-5)
        self.adaptive_conv1 = _adaptive_weight_net(width)
        self.adaptive_conv2 = _adaptive_weight_net(8)
        self.adaptive_conv3 = _adaptive_weight_net(8)
        self.mid_conv = Conv3x3x3(width, 8)
        self.conv_out = Conv3x3x3(8, config.out_channels)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def embed_features(self, feats: Tensor) -> Tensor:
        """``latent_mlp`` on feature rows [..., 32] -> [..., 8] (per voxel, so it commutes with densifying)."""
        return self.latent_mlp(feats.to(self.compute_dtype))

    def refine_embedded_patch(self, sdf_patch: Tensor, latent_patch: Tensor,
                              intermediates: Optional[dict] = None) -> Tensor:
        """Patch body after the feature MLP: ``latent_patch`` is the [B, 8, ...] MLP output."""
        fmt = self._prepare_layout()
        h = self.conv_in(sdf_patch.to(self.compute_dtype).contiguous(memory_format=fmt))
        if intermediates is not None:
            intermediates["conv_in"] = h
        x = join_channels(h, latent_patch.to(self.compute_dtype))
        if not x.is_contiguous(memory_format=fmt):
            x = x.contiguous(memory_format=fmt)
        del h
        unet_out = self.unet3d1(x)
        del x
        a1 = adaptive_filter(unet_out, self.adaptive_conv1(unet_out))
        if intermediates is not None:
            intermediates["unet_out"] = unet_out
            intermediates["adaptive1"] = a1
        del unet_out
        m = self.mid_conv(a1)
        del a1
        a2 = adaptive_filter(m, self.adaptive_conv2(m))
        if intermediates is not None:
            intermediates["mid_conv"] = m
            intermediates["adaptive2"] = a2
        del m
        c = self.conv_out(a2)
        # the third block filters the 1-channel output with weights predicted from a2 (8 channels)
        a3 = adaptive_filter(c, self.adaptive_conv3(a2))
        if intermediates is not None:
            intermediates["conv_out"] = c
            intermediates["adaptive3"] = a3
        del a2, c
        return torch.tanh(a3)

    def refine_patch(self, sdf_patch: Tensor, feat_patch: Tensor, intermediates: Optional[dict] = None) -> Tensor:
        """One dense patch: ``sdf_patch`` [B, 1, D, H, W], ``feat_patch`` [B, 32, D, H, W] -> tanh [B, 1, D, H, W]."""
        latent = self.embed_features(feat_patch.movedim(1, -1)).movedim(-1, 1)
        if intermediates is not None:
            intermediates["latent_mlp"] = latent
        return self.refine_embedded_patch(sdf_patch, latent, intermediates)

    @torch.inference_mode()
    def refine_volume(self, coords: Tensor, sdf: Tensor, feats: Tensor, *, resolution: Optional[int] = None,
                      patch_size: Optional[int] = None, stride: Optional[int] = None,
                      progress: Optional[Callable[[int, int], None]] = None) -> Tensor:
        """The official whole-volume refinement, patch by patch, from the sparse decoder output.

        ``coords`` [N, 4] (batch, x, y, z) or [N, 3] at ``resolution`` (512), ``sdf`` [N] / [N, 1],
        ``feats`` [N, 32]. Returns the blended refined SDF as a dense fp32 volume [R, R, R] indexed
        [x, y, z] on the model's device. Background: SDF 1.0, features 0 (so the MLP input is 0).
        """
        resolution = resolution or self.config.volume_resolution
        patch_size = patch_size or self.config.patch_size
        stride = stride or self.config.patch_stride
        device = self.conv_in.weight.device
        dtype = self.compute_dtype
        origins = patch_origins(resolution, patch_size, stride)
        weights = blend_weights(resolution, patch_size, stride, device=device)

        xyz = _spatial_coords(coords).to(device)
        # MLP on the sparse rows once; the background's MLP output fills the rest of each patch.
        # One source holds [sdf, 8 latent channels] per row, so each patch is densified in one pass.
        latent_rows = self.embed_features(feats.to(device).reshape(xyz.shape[0], -1))
        rows = torch.cat([sdf.to(device=device, dtype=dtype).reshape(-1, 1), latent_rows], dim=1)
        del latent_rows
        source = _PatchSource(xyz, rows, resolution)
        del rows
        background = torch.cat([torch.ones(1, device=device, dtype=dtype),
                                self.embed_features(torch.zeros(1, feats.shape[-1], device=device))[0]])

        volume = torch.zeros((resolution,) * 3, dtype=torch.float32, device=device)
        boxes = list(itertools.product(range(len(origins)), repeat=3))
        box_origins = [(origins[i], origins[j], origins[k]) for i, j, k in boxes]
        box_rows = source.box_rows(box_origins, patch_size)
        fmt = self.activation_format()
        empty_result = None  # a patch without rows is all background: its output is computed once
        with _cudnn_autotuning(device):
            for n, ((i, j, k), origin) in enumerate(zip(boxes, box_origins)):
                occupied = box_rows[n][1].numel() > 0
                if not occupied and empty_result is not None:
                    refined = empty_result
                else:
                    patch = source.densify(box_rows[n], patch_size, background, dtype, fmt)
                    refined = self.refine_embedded_patch(patch[:, :1], patch[:, 1:])[0, 0]
                    del patch
                    if not occupied:
                        empty_result = refined
                blend = weights[i].view(-1, 1, 1) * weights[j].view(1, -1, 1) * weights[k].view(1, 1, -1)
                region = volume[origin[0]:origin[0] + patch_size, origin[1]:origin[1] + patch_size,
                                origin[2]:origin[2] + patch_size]
                region.addcmul_(refined, blend)
                del refined, blend
                if progress is not None:
                    progress(n + 1, len(boxes))
        return volume


# ----------------------------------------------------------------------------------------------------
# 1024 sign refiner
# ----------------------------------------------------------------------------------------------------
class SignField:
    """The official 1024^3 refined field without the dense volume.

    Official: ``vol = ones(1024^3); vol[band] = sdf; vol = |vol| * sign512.repeat_interleave(2)^3;
    vol[band] = sdf``. So a point p is the decoded SDF where decoded (last write wins), else
    ``+1 / -1`` from ``sign512[p // 2]``. Holds the deduplicated band and a bool 512^3 grid
    (True = +1).
    """

    def __init__(self, coords: Tensor, sdf: Tensor, sign_grid: Tensor, resolution: int = 1024):
        if sign_grid.dtype != torch.bool or sign_grid.dim() != 3 or any(s * 2 != resolution for s in sign_grid.shape):
            raise ValueError(f"sign grid must be bool [{resolution // 2}]^3, got {sign_grid.dtype} {tuple(sign_grid.shape)}")
        self.resolution = resolution
        self.sign_grid = sign_grid
        xyz = _spatial_coords(coords).to(sign_grid.device)
        values = sdf.reshape(-1).to(sign_grid.device)
        # only sorted linear keys and values are kept (8 + 4 bytes per decoded voxel)
        self.band_keys, rows = last_occurrence_unique(_linear_keys(xyz, resolution))
        self.band_values = values[rows].float()

    def band_points(self) -> tuple[Tensor, Tensor]:
        """The decoded voxels, deduplicated and sorted by (x, y, z): (points int64 [M, 3], values fp32 [M])."""
        r = self.resolution
        keys = self.band_keys
        return torch.stack([keys // (r * r), (keys // r) % r, keys % r], dim=1), self.band_values

    def sign_values_at(self, points: Tensor) -> Tensor:
        """``+1 / -1`` (fp32) of the sign grid at 1024^3 points [K, 3]."""
        p = points.to(self.sign_grid.device).long() // 2
        return torch.where(self.sign_grid[p[:, 0], p[:, 1], p[:, 2]], 1.0, -1.0)

    def values_at(self, points: Tensor) -> Tensor:
        """Field value (fp32) at integer 1024^3 points [K, 3]."""
        points = points.to(self.sign_grid.device).long()
        if points.numel() and (points.min() < 0 or points.max() >= self.resolution):
            raise ValueError(f"points outside the {self.resolution}^3 grid")
        out = self.sign_values_at(points)
        if self.band_keys.numel() and points.shape[0]:
            keys = _linear_keys(points, self.resolution)
            index = torch.searchsorted(self.band_keys, keys).clamp_max(self.band_keys.numel() - 1)
            hit = self.band_keys[index] == keys
            out[hit] = self.band_values[index[hit]]
        return out

    def __call__(self, points: Tensor) -> Tensor:
        return self.values_at(points)

    def sign_change_cells(self) -> Tensor:
        """Lower corners int64 [C, 3] of the 1024-cells whose 8 sign-field corner values differ.

        These are the only cells without decoded corners that can hold the surface. Along an axis,
        cell c touches the 512 voxel c//2 only (c even) or both (c-1)//2 and (c+1)//2 (c odd), so a
        cell's sign set is a box of 1 or 2 voxels per axis; the cells of each parity pattern come from
        one mixed-box test on the 512 grid (no per-cell work, no duplicates).
        """
        grid = self.sign_grid
        size = grid.shape[0]
        found = []
        for parity in itertools.product((0, 1), repeat=3):
            if not any(parity):
                continue  # a single 512 voxel has one sign
            extent = [size - p for p in parity]
            any_positive = torch.zeros(extent, dtype=torch.bool, device=grid.device)
            all_positive = torch.ones(extent, dtype=torch.bool, device=grid.device)
            for shift in itertools.product(*[range(p + 1) for p in parity]):
                view = grid[shift[0]:shift[0] + extent[0], shift[1]:shift[1] + extent[1],
                            shift[2]:shift[2] + extent[2]]
                any_positive |= view
                all_positive &= view
            lower = (any_positive & ~all_positive).nonzero()
            del any_positive, all_positive
            found.append(lower * 2 + torch.tensor(parity, device=grid.device))
        return torch.cat(found) if found else torch.zeros(0, 3, dtype=torch.long, device=grid.device)


class SignRefiner1024(_DenseLayout, nn.Module):
    """Official ``Voxel_RefinerXL_sign``: conv_in -> UNet3D -> conv_out = logits; sign = sigmoid >= 0.5."""

    def __init__(self, config: RefinerConfig = RefinerConfig(sign=True, patch_size=256, patch_stride=128)):
        super().__init__()
        if not config.sign:
            raise ValueError("SignRefiner1024 needs a config with sign=True")
        self.config = config
        width = config.block_out_channels[0]
        self.conv_in = Conv3x3x3(config.in_channels, 8)
        self.unet3d1 = UNet3D(8, config.block_out_channels, config.layers_per_block, config.layers_mid_block,
                              config.norm_num_groups, 1e-5)
        self.conv_out = Conv3x3x3(width, config.out_channels)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def sign_logits_patch(self, sdf_patch: Tensor, intermediates: Optional[dict] = None) -> Tensor:
        """[B, 1, D, H, W] SDF at 512^3 -> logits [B, 1, D, H, W]."""
        fmt = self._prepare_layout()
        h = self.conv_in(sdf_patch.to(self.compute_dtype).contiguous(memory_format=fmt))
        if intermediates is not None:
            intermediates["conv_in"] = h
        u = self.unet3d1(h)
        del h
        if intermediates is not None:
            intermediates["unet_out"] = u
        return self.conv_out(u)

    @staticmethod
    def positive_sign(logits: Tensor) -> Tensor:
        """True (+1) where ``sigmoid(logits) >= 0.5`` evaluated in the logits' dtype (fp16 rounding
        makes logits down to about -4.9e-4 positive, as in the official run)."""
        return torch.sigmoid(logits) >= 0.5

    @staticmethod
    def pool_band(coords: Tensor, sdf: Tensor) -> tuple[Tensor, Tensor]:
        """The official first step, ``SparseDownsample(2)`` of the decoded rows, quirks included.

        The official pooling is ``scatter_reduce(zeros, ..., reduce="mean")`` with the default
        ``include_self=True``, so the zero it starts from counts as one more sample:
        value = sum(children) / (count + 1) (8 children -> sum / 9; checked bitwise against the
        ``refiner1024_patch`` fixture). Every row counts, so a duplicated voxel weighs twice (chunked
        decoding duplicates 7-voxel slabs). Sums in fp64, result in the input dtype. Returns int32
        [M, 3] parent coordinates sorted by (x, y, z) and [M, 1] values.
        """
        xyz = _spatial_coords(coords).long()
        values = sdf.reshape(xyz.shape[0], -1)
        parents = xyz // 2
        extent = int(parents.max()) + 1 if parents.numel() else 1
        keys, inverse = torch.unique(_linear_keys(parents, extent), sorted=True, return_inverse=True)
        sums = torch.zeros(keys.numel(), values.shape[1], dtype=torch.float64, device=values.device)
        sums.index_add_(0, inverse, values.double())
        counts = torch.bincount(inverse, minlength=keys.numel()).double()
        pooled = (sums / (counts + 1)[:, None]).to(values.dtype)
        pooled_xyz = torch.stack([keys // (extent * extent), (keys // extent) % extent, keys % extent], dim=1)
        return pooled_xyz.to(torch.int32), pooled

    @torch.inference_mode()
    def sign_grid(self, coords: Tensor, sdf: Tensor, *, resolution: Optional[int] = None,
                  patch_size: Optional[int] = None,
                  stride: Optional[int] = None, progress: Optional[Callable[[int, int], None]] = None) -> Tensor:
        """Bool sign grid [R/2]^3 (True = +1) from the decoded band at ``resolution`` (1024).

        ``coords`` [N, 4] / [N, 3], ``sdf`` [N] / [N, 1]; duplicate rows allowed (each counts in the 2x
        mean pool, as officially). Patches are densified from the pooled rows (background 1.0) and
        overwrite each other in loop order.
        """
        resolution = resolution or 2 * self.config.volume_resolution
        half = resolution // 2
        patch_size = patch_size or self.config.patch_size
        stride = stride or self.config.patch_stride
        device = self.conv_in.weight.device
        dtype = self.compute_dtype
        origins = patch_origins(half, patch_size, stride)

        pooled_xyz, pooled_sdf = self.pool_band(coords.to(device), sdf.to(device))
        source = _PatchSource(pooled_xyz, pooled_sdf, half)
        del pooled_xyz, pooled_sdf
        background = torch.ones(1, device=device)

        grid = torch.zeros((half,) * 3, dtype=torch.bool, device=device)
        boxes = list(itertools.product(range(len(origins)), repeat=3))
        box_origins = [(origins[i], origins[j], origins[k]) for i, j, k in boxes]
        box_rows = source.box_rows(box_origins, patch_size)
        fmt = self.activation_format()
        empty_sign = None  # a patch without rows is all background: its signs are computed once
        with _cudnn_autotuning(device):
            for n, (x0, y0, z0) in enumerate(box_origins):
                occupied = box_rows[n][1].numel() > 0
                if not occupied and empty_sign is not None:
                    positive = empty_sign
                else:
                    patch = source.densify(box_rows[n], patch_size, background, dtype, fmt)
                    logits = self.sign_logits_patch(patch)
                    del patch
                    positive = self.positive_sign(logits)[0, 0]
                    del logits
                    if not occupied:
                        empty_sign = positive
                grid[x0:x0 + patch_size, y0:y0 + patch_size, z0:z0 + patch_size] = positive
                if progress is not None:
                    progress(n + 1, len(boxes))
        return grid

    def sign_field(self, coords: Tensor, sdf: Tensor, *, resolution: Optional[int] = None,
                   patch_size: Optional[int] = None,
                   stride: Optional[int] = None, progress: Optional[Callable[[int, int], None]] = None) -> SignField:
        """:class:`SignField` of the decoded band and the predicted sign grid."""
        grid = self.sign_grid(coords, sdf, resolution=resolution, patch_size=patch_size, stride=stride,
                              progress=progress)
        return SignField(coords, sdf, grid, 2 * grid.shape[0])
