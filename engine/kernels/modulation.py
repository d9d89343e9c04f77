"""Triton kernels for the elementwise work around the adaLN-modulated DiT blocks (fp32 math inside).

One row kernel (``_row_kernel``) covers every step of ``ModulatedCrossBlock.forward`` that is not a
GEMM or an attention, each as ONE pass over the ``[B*L, C]`` tokens:

* ``layer_norm_modulate``: ``LN(x) * (1 + scale) + shift`` (LayerNorm without affine, per batch
  element shift/scale rows ``[B, C]`` broadcast over its ``L`` tokens);
* ``gated_residual``: ``x + gate * y`` (or ``x + y``), in place or out of place;
* ``residual_layer_norm``: the residual followed by the next sub-block's norm, writing both the new
  residual stream and the normalised (optionally affine, optionally modulated) tokens;
* ``layer_norm``: plain or affine LayerNorm.

The roundings are those of the PyTorch path of ``engine.models.blocks`` on half tensors, so the two
paths agree up to the fp32 summation order of the statistics:
``F.layer_norm`` on fp16/bf16 (fp32 statistics and affine map, rounded once), ``1 + scale`` rounded
to the input dtype, ``torch.addcmul`` (fp32 multiply-add, rounded once). The residual stream is
rounded before it is normalised, as the PyTorch path normalises the stored tensor.

``gated_branch_sum`` is the gated sum of the three Spatial Sparse Attention branches
(``sigmoid(gate logits)``, then ``torch.mul`` and two ``addcmul_`` as ``engine.attention.ssa`` writes it,
with the same roundings) in one pass; it is offered to the SSA code, which does not call it yet.

``multi_head_rms_norm`` is the per-head q/k RMS norm of ``MultiHeadRMSNorm``
(``F.normalize(x.float(), dim=-1) * gamma * sqrt(D)``, rounded once) in one pass that also reads
q/k straight out of the strided views of the fused qkv projection.

Tokens are ``[B, L, C]`` (or ``[N, C]``, one batch element) with unit channel stride; the rows of a
tensor must have one stride (any contiguous tensor), otherwise it is copied once.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["layer_norm_modulate", "gated_residual", "residual_layer_norm", "layer_norm", "multi_head_rms_norm",
           "gated_branch_sum"]

# Elements per program of the row kernels and warps per program: 4 rows of 1024 channels with
# 8 warps keeps 16 values of each operand per thread (two 16-byte fp16 vectors).
ROW_TILE_ELEMENTS = 4096
MAX_BLOCK_ROWS = 64
_INTERPRETER_TILE_ELEMENTS = 1 << 15   # the interpreter pays per program: few large ones on CPU


@triton.jit(do_not_specialize=["rows", "tokens"])
def _row_kernel(x_ptr, y_ptr, gate_ptr, res_ptr, weight_ptr, bias_ptr, shift_ptr, scale_ptr, out_ptr,
                rows, tokens, C, eps,
                sx, sy, sres, sout, sgate, sshift, sscale,
                RESIDUAL: tl.constexpr, GATED: tl.constexpr, NORM: tl.constexpr, AFFINE: tl.constexpr,
                MODULATE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = row < rows
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mask = row_ok[:, None] & col_ok[None, :]
    row64 = row.to(tl.int64)[:, None]
    cols2 = cols[None, :]
    batch = (row // tokens).to(tl.int64)[:, None]   # batch element of each row (for gate/shift/scale)

    x = tl.load(x_ptr + row64 * sx + cols2, mask=mask, other=0.0).to(tl.float32)
    if RESIDUAL:
        y = tl.load(y_ptr + row64 * sy + cols2, mask=mask, other=0.0).to(tl.float32)
        if GATED:
            gate = tl.load(gate_ptr + batch * sgate + cols2, mask=mask, other=0.0).to(tl.float32)
            x = x + gate * y                           # torch.addcmul: fp32 multiply-add, one rounding
        else:
            x = x + y
        stream = x.to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + row64 * sres + cols2, stream, mask=mask)
        x = stream.to(tl.float32)                      # the norm reads the stored (rounded) stream
    if NORM:
        mean = tl.sum(x, axis=1) / C
        centred = tl.where(mask, x - mean[:, None], 0.0)
        variance = tl.sum(centred * centred, axis=1) / C
        rstd = 1.0 / tl.sqrt_rn(variance + eps)
        normed = centred * rstd[:, None]
        if AFFINE:
            weight = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            normed = normed * weight[None, :] + bias[None, :]
        if MODULATE:
            # LN output rounded (the norm's own output), 1 + scale rounded (a half tensor op), then
            # the addcmul shift + normed * (1 + scale) in fp32 with one final rounding
            normed = normed.to(out_ptr.dtype.element_ty).to(tl.float32)
            scale = tl.load(scale_ptr + batch * sscale + cols2, mask=mask, other=0.0).to(tl.float32)
            scale = (1.0 + scale).to(out_ptr.dtype.element_ty).to(tl.float32)
            shift = tl.load(shift_ptr + batch * sshift + cols2, mask=mask, other=0.0).to(tl.float32)
            normed = shift + normed * scale
        tl.store(out_ptr + row64 * sout + cols2, normed.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["rows", "heads", "tokens"])
def _rms_norm_kernel(x_ptr, gamma_ptr, out_ptr, rows, heads, tokens, D, sxb, sxl, sxh, factor, eps,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)   # row = (b * tokens + l) * heads + h
    row_ok = row < rows
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    head = row % heads
    token = row // heads
    offset = (token // tokens).to(tl.int64) * sxb + (token % tokens).to(tl.int64) * sxl + head.to(tl.int64) * sxh
    x = tl.load(x_ptr + offset[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    norm = tl.sqrt_rn(tl.sum(x * x, axis=1))
    denom = tl.maximum(norm, eps)                                # F.normalize: x / max(||x||, eps)
    gamma = tl.load(gamma_ptr + head[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.div_rn(x, denom[:, None]) * gamma
    y = y * factor
    tl.store(out_ptr + row.to(tl.int64)[:, None] * D + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rounded_gate(logit, dtype):
    """sigmoid in fp32, rounded to the branches' dtype (the PyTorch path's gate tensor)."""
    return (1.0 / (1.0 + tl.exp(-logit.to(tl.float32)))).to(dtype).to(tl.float32)


@triton.jit
def gated_sum_values(compressed, selected, windowed, logit0, logit1, logit2, dtype):
    """The SSA gated sum of fp32 branch values with each step rounded to ``dtype`` as PyTorch does:
    ``out = c * g0; out += s * g1; out += w * g2`` (mul, then two ``addcmul_``), g = sigmoid(logits).
    Shared by `_gated_sum_kernel` and the window kernel's epilogue, so both round identically."""
    acc = (compressed * _rounded_gate(logit0, dtype)).to(dtype).to(tl.float32)
    acc = (acc + selected * _rounded_gate(logit1, dtype)).to(dtype).to(tl.float32)
    return (acc + windowed * _rounded_gate(logit2, dtype)).to(dtype)


@triton.jit(do_not_specialize=["tokens"])
def _gated_sum_kernel(a_ptr, b_ptr, c_ptr, logit_ptr, out_ptr, tokens, width,
                      san, sah, sbn, sbh, scn, sch, sln, son, soh,
                      HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    token = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    token_ok = token < tokens
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < width
    mask = token_ok[:, None] & col_ok[None, :]
    head = (cols // HEAD_DIM).to(tl.int64)
    dim = cols % HEAD_DIM
    n = token.to(tl.int64)
    dtype = out_ptr.dtype.element_ty
    logits = logit_ptr + n * sln
    a = tl.load(a_ptr + n[:, None] * san + (head * sah + dim)[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + n[:, None] * sbn + (head * sbh + dim)[None, :], mask=mask, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + n[:, None] * scn + (head * sch + dim)[None, :], mask=mask, other=0.0).to(tl.float32)
    acc = gated_sum_values(a, b, c, tl.load(logits, mask=token_ok, other=0.0)[:, None],
                           tl.load(logits + 1, mask=token_ok, other=0.0)[:, None],
                           tl.load(logits + 2, mask=token_ok, other=0.0)[:, None], dtype)
    tl.store(out_ptr + n[:, None] * son + (head * soh + dim)[None, :], acc, mask=mask)


# ------------------------------------------------------------------------------------------ helpers
def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _tile_rows(width: int, block_rows: Optional[int]) -> tuple[int, int, int]:
    """(rows per program, padded width, warps) for rows of ``width`` elements."""
    block_c = triton.next_power_of_2(max(width, 1))
    if block_rows is None:
        elements = _INTERPRETER_TILE_ELEMENTS if _interpreted() else ROW_TILE_ELEMENTS
        block_rows = max(1, min(MAX_BLOCK_ROWS, elements // block_c))
    elif block_rows & (block_rows - 1):
        raise ValueError(f"block_rows must be a power of two, got {block_rows}")
    warps = max(1, min(8, block_rows * block_c // 512))
    return block_rows, block_c, warps


def _as_rows(t: Tensor, channels: int) -> tuple[Tensor, int]:
    """``t`` as ``[rows, channels]`` with unit channel stride and one row stride (a view when possible)."""
    if t.shape[-1] != channels:
        raise ValueError(f"expected {channels} channels, got shape {tuple(t.shape)}")
    rows = t.numel() // channels if channels else 0
    if t.stride(-1) != 1 and channels > 1:
        t = t.contiguous()
    try:
        flat = t.view(rows, channels)
    except RuntimeError:
        flat = t.contiguous().view(rows, channels)
    return flat, (flat.stride(0) if rows > 1 else channels)


def _batch_geometry(x: Tensor) -> tuple[int, int]:
    """(batch elements, tokens per element) of tokens ``[B, L, C]`` or ``[N, C]`` (one element)."""
    if x.dim() == 3:
        return x.shape[0], x.shape[1]
    if x.dim() == 2:
        return 1, x.shape[0]
    raise ValueError(f"tokens must be [B, L, C] or [N, C], got shape {tuple(x.shape)}")


def _per_batch(t: Optional[Tensor], batch: int, channels: int, name: str) -> tuple[Optional[Tensor], int]:
    """A modulation tensor (``[B, C]``, ``[B, 1, C]``, ``[C]``, a batch of one broadcasts) as rows
    ``[B, C]`` with unit channel stride, and its batch stride (0 when broadcast)."""
    if t is None:
        return None, 0
    if t.dim() == 3:
        if t.shape[1] != 1:
            raise ValueError(f"{name} must be [B, 1, C] (one row per batch element), got {tuple(t.shape)}")
        t = t[:, 0]
    elif t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[-1] != channels or t.shape[0] not in (1, batch):
        raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast over [{batch}, L, {channels}]")
    if t.stride(-1) != 1 and channels > 1:
        t = t.contiguous()
    stride = 0 if t.shape[0] == 1 else t.stride(0)
    return t, stride


def _check_out(out: Optional[Tensor], like: Tensor, name: str) -> Tensor:
    if out is None:
        return torch.empty_like(like, memory_format=torch.contiguous_format)
    if out.shape != like.shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(f"{name} must match the tokens' shape, dtype and device")
    return out


def _launch(x: Tensor, *, y=None, gate=None, residual_out=None, weight=None, bias=None, shift=None, scale=None,
            out=None, eps: float = 1e-6, norm: bool = True, block_rows: Optional[int] = None):
    """The shared launcher: checks the operands and runs ``_row_kernel`` once over all rows."""
    channels = x.shape[-1]
    batch, tokens = _batch_geometry(x)
    if (shift is None) != (scale is None):
        raise ValueError("shift and scale come together")
    if weight is not None and bias is None:      # LayerNorm(bias=False)
        bias = torch.zeros(channels, dtype=torch.float32, device=x.device)
    elif bias is not None and weight is None:
        weight = torch.ones(channels, dtype=torch.float32, device=x.device)
    for t in (y, gate, shift, scale):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError("the tokens and their operands must share dtype and device")
    if y is not None and y.shape != x.shape:
        raise ValueError(f"residual branch {tuple(y.shape)} does not match the tokens {tuple(x.shape)}")
    gate_rows, gate_stride = _per_batch(gate, batch, channels, "gate")
    shift_rows, shift_stride = _per_batch(shift, batch, channels, "shift")
    scale_rows, scale_stride = _per_batch(scale, batch, channels, "scale")
    if weight is not None and (weight.numel() != channels or bias.numel() != channels):
        raise ValueError(f"weight/bias must have {channels} elements")
    residual = y is not None
    if residual:
        residual_out = _check_out(residual_out, x, "residual_out")
    if norm:
        out = _check_out(out, x, "out")
    if x.numel() == 0:
        return residual_out, out

    x_rows, sx = _as_rows(x, channels)
    y_rows, sy = _as_rows(y, channels) if residual else (x_rows, sx)
    res_rows, sres = _as_rows(residual_out, channels) if residual else (x_rows, sx)
    out_rows, sout = _as_rows(out, channels) if norm else (x_rows, sx)
    for given, flat in ((residual_out, res_rows), (out, out_rows)):
        if given is not None and flat.data_ptr() != given.data_ptr():
            raise ValueError("output tensors must be viewable as rows [N, C] with unit channel stride")
    if weight is not None:
        weight, bias = weight.reshape(-1).contiguous(), bias.reshape(-1).contiguous()
    rows = x_rows.shape[0]
    block_r, block_c, warps = _tile_rows(channels, block_rows)
    dummy = x_rows
    _row_kernel[(triton.cdiv(rows, block_r),)](
        x_rows, y_rows, dummy if gate_rows is None else gate_rows, res_rows,
        dummy if weight is None else weight, dummy if bias is None else bias,
        dummy if shift_rows is None else shift_rows, dummy if scale_rows is None else scale_rows, out_rows,
        rows, tokens, channels, float(eps),
        sx, sy, sres, sout, gate_stride, shift_stride, scale_stride,
        RESIDUAL=residual, GATED=gate is not None, NORM=norm, AFFINE=weight is not None,
        MODULATE=shift is not None, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)
    return residual_out, out


# ------------------------------------------------------------------------------------------ public API
def layer_norm_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float, *, weight: Optional[Tensor] = None,
                        bias: Optional[Tensor] = None, out: Optional[Tensor] = None,
                        block_rows: Optional[int] = None) -> Tensor:
    """``addcmul(shift, layer_norm(x), 1 + scale)`` in one pass (LayerNorm without affine unless
    weight/bias are given).

    x: tokens ``[B, L, C]`` (or ``[N, C]``); shift/scale: ``[B, C]`` or ``[B, 1, C]`` (a batch of one
    broadcasts), the dtype of x. ``block_rows`` (a power of two) overrides the rows per program (tests).
    """
    return _launch(x, shift=shift, scale=scale, weight=weight, bias=bias, out=out, eps=eps,
                   block_rows=block_rows)[1]


def layer_norm(x: Tensor, eps: float, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, *,
               out: Optional[Tensor] = None, block_rows: Optional[int] = None) -> Tensor:
    """LayerNorm over the last dim with fp32 statistics and affine map (fp32 or low-precision
    parameters), rounded once to x's dtype."""
    return _launch(x, weight=weight, bias=bias, out=out, eps=eps, block_rows=block_rows)[1]


def gated_residual(x: Tensor, gate: Optional[Tensor], y: Tensor, *, out: Optional[Tensor] = None,
                   inplace: bool = False, block_rows: Optional[int] = None) -> Tensor:
    """``torch.addcmul(x, gate, y)`` (``x + y`` without a gate): gate ``[B, C]`` / ``[B, 1, C]`` per
    batch element. ``inplace`` writes into x (same as ``out=x``)."""
    if inplace:
        out = x
    return _launch(x, y=y, gate=gate, residual_out=out, norm=False, block_rows=block_rows)[0]


def residual_layer_norm(x: Tensor, y: Tensor, gate: Optional[Tensor] = None, *, eps: float,
                        weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                        shift: Optional[Tensor] = None, scale: Optional[Tensor] = None,
                        residual_out: Optional[Tensor] = None, out: Optional[Tensor] = None,
                        block_rows: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """The residual ``r = x + gate * y`` (``x + y`` without a gate) and the next sub-block's input
    ``h = LN(r)`` (``* weight + bias`` when given, then ``* (1 + scale) + shift`` when given), both in
    one pass: returns ``(r, h)``. ``residual_out`` may be x (in place)."""
    return _launch(x, y=y, gate=gate, residual_out=residual_out, weight=weight, bias=bias, shift=shift,
                   scale=scale, out=out, eps=eps, block_rows=block_rows)


def multi_head_rms_norm(x: Tensor, gamma: Tensor, factor: float, eps: float = 1e-12, *,
                        block_rows: Optional[int] = None) -> Tensor:
    """``(F.normalize(x.float(), dim=-1) * gamma.float() * factor).to(x.dtype)`` for x ``[..., H, D]``
    (e.g. the q/k views of a fused qkv projection, any strides with unit stride along D); gamma
    ``[H, D]``. Returns a new contiguous tensor of x's shape."""
    if x.dim() < 2 or gamma.shape != x.shape[-2:]:
        raise ValueError(f"gamma {tuple(gamma.shape)} must be [H, D] of x {tuple(x.shape)}")
    heads, width = x.shape[-2:]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    if x.stride(-1) != 1 and width > 1:
        x = x.contiguous()
    # as [B, L, H, D]: leading dims folded into (B, L) where their strides allow, else copied once
    lead = x.shape[:-2]
    if len(lead) == 0:
        x4 = x.unsqueeze(0).unsqueeze(0)
    elif len(lead) == 1:
        x4 = x.unsqueeze(0)
    elif len(lead) == 2:
        x4 = x
    else:
        try:
            x4 = x.view(-1, lead[-1], heads, width)
        except RuntimeError:
            x4 = x.contiguous().view(-1, lead[-1], heads, width)
    batch, tokens = x4.shape[:2]
    rows = batch * tokens * heads
    block_r, block_d, warps = _tile_rows(width, block_rows)
    gamma = gamma.contiguous()
    _rms_norm_kernel[(triton.cdiv(rows, block_r),)](
        x4, gamma, out, rows, heads, tokens, width, x4.stride(0), x4.stride(1), x4.stride(2),
        float(factor), float(eps), BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)
    return out


def gated_branch_sum(compressed: Tensor, selected: Tensor, windowed: Tensor, gate_logits: Tensor, *,
                     out: Optional[Tensor] = None, block_tokens: Optional[int] = None) -> Tensor:
    """The gated sum of the three SSA branches, as ``engine.attention.ssa`` computes it per element::

        g = sigmoid(gate_logits[:, :3])            # rounded to the branches' dtype
        out = compressed * g0;  out += selected * g1;  out += windowed * g2   (each step rounded)

    Branches ``[N, H, D]`` with any token and head strides (e.g. the per-element head slices of the
    side-by-side kernel outputs) and unit stride along D; gate_logits ``[N, >= 3]`` (unit column
    stride, e.g. a slice of the fused projection); ``out`` ``[N, H, D]`` (default: new, contiguous).
    One pass: three reads and one write, instead of the eight of a multiply and two ``addcmul_``.
    """
    tokens, heads, width = compressed.shape
    for t in (selected, windowed):
        if t.shape != compressed.shape or t.dtype != compressed.dtype or t.device != compressed.device:
            raise ValueError("the three branches must share shape, dtype and device")
    if gate_logits.dim() != 2 or gate_logits.shape[0] != tokens or gate_logits.shape[1] < 3:
        raise ValueError(f"gate_logits must be [N, >=3], got {tuple(gate_logits.shape)}")
    if out is None:
        out = torch.empty(compressed.shape, dtype=compressed.dtype, device=compressed.device)
    elif out.shape != compressed.shape or out.dtype != compressed.dtype:
        raise ValueError("out must match the branches' shape and dtype")
    if compressed.numel() == 0:
        return out
    branches = [t if t.stride(-1) == 1 or width == 1 else t.contiguous() for t in (compressed, selected, windowed)]
    if gate_logits.stride(-1) != 1:
        gate_logits = gate_logits.contiguous()
    if out.stride(-1) != 1 and width > 1:
        raise ValueError("out needs unit stride along D")
    block_c = triton.next_power_of_2(heads * width)
    if block_tokens is None:
        elements = _INTERPRETER_TILE_ELEMENTS if _interpreted() else ROW_TILE_ELEMENTS
        block_tokens = max(1, min(MAX_BLOCK_ROWS, elements // block_c))
    warps = max(1, min(8, block_tokens * block_c // 512))
    a, b, c = branches
    _gated_sum_kernel[(triton.cdiv(tokens, block_tokens),)](
        a, b, c, gate_logits, out, tokens, heads * width,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1), gate_logits.stride(0),
        out.stride(0), out.stride(1), HEAD_DIM=width, BLOCK_N=block_tokens, BLOCK_C=block_c, num_warps=warps)
    return out
