"""Building blocks shared by the dense and sparse transformers (architecture notes 3.1)."""
from __future__ import annotations

import importlib
import math
from typing import ContextManager, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.kernels import BackendChoice


_HALF_DTYPES = (torch.float16, torch.bfloat16)
# device type -> whether F.layer_norm takes a half input with fp32 weight/bias there (learnt on first use)
_MIXED_LAYER_NORM: dict = {}


def half_layer_norm(x: torch.Tensor, shape, weight, bias, eps: float) -> torch.Tensor:
    """LayerNorm of a half tensor with fp32 statistics and fp32 affine parameters, rounded once.

    Without affine parameters `F.layer_norm` on the half tensor is exactly that (its kernels
    accumulate in fp32). With fp32 parameters it is used where the backend accepts the mixed dtypes
    (CPU does; a backend that rejects them raises before launching anything, which is remembered);
    otherwise the parameters are cast to the input dtype (statistics and affine map still in fp32,
    one rounding; the parameters' own rounding adds at most about one half-precision ulp).
    """
    if weight is None and bias is None:
        return F.layer_norm(x, shape, None, None, eps)
    key = x.device.type
    if _MIXED_LAYER_NORM.get(key, True):
        try:
            out = F.layer_norm(x, shape, weight, bias, eps)
        except RuntimeError:
            _MIXED_LAYER_NORM[key] = False
        else:
            _MIXED_LAYER_NORM[key] = True
            return out
    return F.layer_norm(x, shape, None if weight is None else weight.to(x.dtype),
                        None if bias is None else bias.to(x.dtype), eps)


# ----------------------------------------------------------------------------------------------------
# Fused elementwise kernels of the modulated blocks: Triton on CUDA (engine.kernels.modulation),
# PyTorch elsewhere and as the test oracle
# ----------------------------------------------------------------------------------------------------
_BLOCK_KERNELS = BackendChoice("block kernel backend", ("auto", "torch", "triton"), "auto")


def set_block_kernel_backend(name: str) -> str:
    """Select how the norms, adaLN modulations and residuals of the DiT blocks run; returns the
    previous setting.

    ``"auto"``: the Triton kernels of :mod:`engine.kernels.modulation` for fp16/bf16 CUDA tensors,
    PyTorch otherwise; ``"torch"``: always PyTorch; ``"triton"``: always Triton (any float dtype; on
    CPU only through ``TRITON_INTERPRET=1``). Under autograd the PyTorch path runs regardless.
    """
    return _BLOCK_KERNELS.set(name)


def block_kernel_backend(name: str) -> ContextManager[None]:
    """Context manager form of :func:`set_block_kernel_backend`."""
    return _BLOCK_KERNELS.use(name)


def _auto_uses_kernels(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype in _HALF_DTYPES and _BLOCK_KERNELS.failure is None


def _modulation_kernels(x: torch.Tensor, *operands: torch.Tensor, parameters=()):
    """The kernel module to use for ``x`` under the current backend, or None for PyTorch.

    ``operands`` must share x's dtype and device (shift/scale/gate rows); ``parameters`` (norm
    weights, any float dtype) its device. With autograd recording, PyTorch.
    """
    if not x.is_floating_point() or any(t.dtype != x.dtype or t.device != x.device for t in operands) \
            or any(p.device != x.device for p in parameters):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *operands, *parameters)):
        return None
    return _BLOCK_KERNELS.load_kernels(_auto_uses_kernels(x), lambda: importlib.import_module("engine.kernels.modulation"))


# Head widths whose cross-attention runs on `engine.kernels.context_attention` under the "auto"
# backend: at width 32 (sparse DiTs) it beats every SDPA backend on an H100; at 64 (dense DiT) cuDNN
# stays (bench/attention_backends.py, docs/benchmarks.md).
CONTEXT_KERNEL_HEAD_DIMS = (32,)


def _context_attention_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """`engine.kernels.context_attention.context_attention` where the block kernel backend takes it
    for these tensors, else None (SDPA). With autograd recording, SDPA."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return None
    return _BLOCK_KERNELS.load_kernels(
        _auto_uses_kernels(q) and q.shape[-1] in CONTEXT_KERNEL_HEAD_DIMS,
        lambda: importlib.import_module("engine.kernels.context_attention").context_attention)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back to the input dtype.

    For fp16/bf16 inputs the statistics and the affine map are still evaluated in fp32 and rounded
    once, but without the full-size fp32 copies of the input and output (`half_layer_norm`).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        if x.dtype in _HALF_DTYPES:
            return half_layer_norm(x, self.normalized_shape, weight, bias, self.eps)
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 and cast back to the input dtype (dense [B, C, ...] tensors)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep features ``[cos(t f), sin(t f)]`` (cos first), f_i = max_period^(-i/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float().reshape(-1, 1) * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Timestep t in [0, 1000] -> C-dim embedding (keys ``mlp.0``, ``mlp.2``)."""

    def __init__(self, channels: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, channels), nn.SiLU(), nn.Linear(channels, channels))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        feats = timestep_features(t, self.frequency_dim)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


def absolute_position_embedding(positions: torch.Tensor, channels: int) -> torch.Tensor:
    """Parameter-free sinusoidal embedding of 3-D positions, fp32 ``[N, channels]``.

    Per axis (x, y, z in turn): ``[sin(p f_j), cos(p f_j)]`` with ``f_j = 10000^(-j / F)``,
    ``F = channels // 3 // 2``; zero-padded to ``channels``.
    """
    num_axes = positions.shape[-1]
    freq_dim = channels // num_axes // 2
    freqs = 1.0 / (10000.0 ** (torch.arange(freq_dim, dtype=torch.float32, device=positions.device) / freq_dim))
    args = positions.float().reshape(-1, 1) * freqs[None]                      # [N*axes, F]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1).reshape(positions.shape[0], num_axes * 2 * freq_dim)
    if emb.shape[1] < channels:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], channels - emb.shape[1])], dim=-1)
    return emb


# (device, dtype) -> whether torch._addmm_activation(..., use_gelu=True) computes the tanh GELU there
_FUSED_GELU_OK: dict = {}


def fused_gelu_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the first MLP layer may use cuBLASLt's bias+GELU epilogue (`torch._addmm_activation`).

    Only on CUDA, and only after a one-time check on this device and dtype that the epilogue is the
    tanh approximation of the official `nn.GELU(approximate="tanh")` (CPU builds use the erf GELU
    there). The check reads a result back, so it is skipped (answer False, not memoised) while a CUDA
    graph is being captured; eager warm-up calls run it first.
    """
    if device.type != "cuda":
        return False
    key = (device.index if device.index is not None else torch.cuda.current_device(), dtype)
    answer = _FUSED_GELU_OK.get(key)
    if answer is None:
        if torch.cuda.is_current_stream_capturing():
            return False
        previous_mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)   # this one-time check reads its result on purpose
        try:
            answer = _check_fused_gelu(device, dtype)
        finally:
            torch.cuda.set_sync_debug_mode(previous_mode)
        _FUSED_GELU_OK[key] = answer
    return answer


@torch.no_grad()
def _check_fused_gelu(device: torch.device, dtype: torch.dtype) -> bool:
    """True when the bias+GELU epilogue is the tanh GELU (fp32, exact inputs) and sane in `dtype`.

    The GEMM is an identity times values on a 1/64 grid in [-4, 4), so every precision (fp16, TF32,
    fp32) computes the pre-activations exactly; in fp32 the tanh and erf GELUs then differ by up to
    4.7e-4, far above the rounding of the epilogue.
    """
    values = torch.arange(-256, 256, dtype=torch.float32) / 64
    eye = torch.eye(values.numel())
    weight = values.repeat(16, 1)                      # out[i, j] = values[i] + bias[j]
    bias = torch.zeros(16)
    a, w, b = eye.to(device), weight.to(device), bias.to(device)
    fused = torch._addmm_activation(b, a, w.t(), use_gelu=True)
    pre = values[:, None].expand(-1, 16).to(device)
    tanh_err = (fused - F.gelu(pre, approximate="tanh")).abs().max()
    erf_err = (fused - F.gelu(pre)).abs().max()
    if not (bool(tanh_err <= 2e-5) and bool(erf_err > 1e-4)):
        return False
    fused_dtype = torch._addmm_activation(b.to(dtype), a.to(dtype), w.to(dtype).t(), use_gelu=True).float()
    return bool((fused_dtype - F.gelu(pre, approximate="tanh")).abs().max() <= 2e-2)


class FeedForward(nn.Module):
    """Linear(C, rC) -> GELU(tanh) -> Linear(rC, C); keys ``mlp.0`` and ``mlp.2``.

    On CUDA the first linear layer and the GELU run as one GEMM with a bias+GELU epilogue when that
    epilogue is verified to be the tanh GELU (`fused_gelu_available`); elsewhere the modules run as is.
    """

    def __init__(self, channels: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, activation, second = self.mlp
        if (first.bias is not None and x.dtype == first.weight.dtype and x.shape[-1] > 1 and x.numel() > x.shape[-1]
                and fused_gelu_available(x.device, x.dtype)):
            flat = x.reshape(-1, x.shape[-1])
            hidden = torch._addmm_activation(first.bias, flat, first.weight.t(), use_gelu=True)
            return second(hidden.view(*x.shape[:-1], hidden.shape[-1]))
        return second(activation(first(x)))


class MultiHeadRMSNorm(nn.Module):
    """Per-head RMS norm: ``normalize(x) * gamma * sqrt(D)`` in fp32 (key ``gamma`` [H, D])."""

    def __init__(self, head_dim: int, heads: int):
        super().__init__()
        self.scale = head_dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., H, D]
        kernels = _modulation_kernels(x, parameters=(self.gamma,)) if x.dim() >= 2 else None
        if kernels is not None:   # one pass, reading strided q/k views in place (engine.kernels.modulation)
            return _BLOCK_KERNELS.attempt(lambda: kernels.multi_head_rms_norm(x, self.gamma, self.scale),
                               lambda: self._torch_forward(x))
        return self._torch_forward(x)

    def _torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.normalize(x.float(), dim=-1) * self.gamma.float() * self.scale).to(x.dtype)


class MultiHeadAttention(nn.Module):
    """Dense multi-head attention: ``self`` (fused ``to_qkv``) or ``cross`` (``to_q`` + ``to_kv``).

    Inputs are ``[B, L, C]``; the context of cross-attention is ``[B, Lc, C_ctx]``. Softmax scale
    1/sqrt(D). Optional per-head RMS norm of q and k (keys ``q_rms_norm``/``k_rms_norm``).
    """

    def __init__(self, channels: int, num_heads: int, ctx_channels: Optional[int] = None,
                 attn_type: str = "self", qk_rms_norm: bool = False, qkv_bias: bool = True):
        super().__init__()
        if attn_type not in ("self", "cross"):
            raise ValueError(f"attn_type must be 'self' or 'cross', got {attn_type!r}")
        self.channels, self.num_heads, self.attn_type = channels, num_heads, attn_type
        self.head_dim = channels // num_heads
        if attn_type == "self":
            self.to_qkv = nn.Linear(channels, channels * 3, bias=qkv_bias)
        else:
            self.to_q = nn.Linear(channels, channels, bias=qkv_bias)
            self.to_kv = nn.Linear(ctx_channels or channels, channels * 2, bias=qkv_bias)
        self.qk_rms_norm = qk_rms_norm
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(self.head_dim, num_heads)
            self.k_rms_norm = MultiHeadRMSNorm(self.head_dim, num_heads)
        self.to_out = nn.Linear(channels, channels)

    def project(self, x: torch.Tensor, context: Optional[torch.Tensor] = None):
        """q ``[B, L, H, D]``, k and v ``[B, Lk, H, D]`` (RMS-normalised when configured)."""
        H, D = self.num_heads, self.head_dim
        if self.attn_type == "self":
            q, k, v = self.to_qkv(x).unflatten(-1, (3, H, D)).unbind(dim=-3)
        else:
            q = self.to_q(x).unflatten(-1, (H, D))
            k, v = self.to_kv(context.to(self.to_kv.weight.dtype)).unflatten(-1, (2, H, D)).unbind(dim=-3)
        if self.qk_rms_norm:
            q, k = self.q_rms_norm(q), self.k_rms_norm(k)
        return q, k, v

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        q, k, v = self.project(x, context)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.to_out(out.transpose(1, 2).flatten(-2))


class ContextCrossAttention(MultiHeadAttention):
    """Cross-attention of tokens `[B, L, C]` to a context `[B, Lc, C_ctx]`, optionally with a
    key padding mask `[B, Lc]` (sparse conditions of unequal size per batch element). Keys
    `to_q`, `to_kv`, `to_out` (with bias) and the optional q/k RMS norms, as
    `MultiHeadAttention(attn_type="cross")`; used by both DiTs."""

    def __init__(self, channels: int, num_heads: int, ctx_channels: int, qk_rms_norm: bool = False):
        super().__init__(channels, num_heads, ctx_channels=ctx_channels, attn_type="cross",
                         qk_rms_norm=qk_rms_norm)

    def forward(self, x: Tensor, context) -> Tensor:  # type: ignore[override]
        """context: `[B, Lc, C_ctx]`, `(context, key_mask)` or `(context, key_mask, uniform)`.

        uniform: optional per-element flags, True where every context token of that element is the
        same vector (the zero context of unconditional guidance). There all keys are equal, so the
        softmax is uniform and the attention output is exactly that token's value vector: the
        element's output is `to_out(v)` broadcast over its tokens, without the attention itself.
        """
        if not isinstance(context, tuple):
            context = (context,)
        context, key_mask, uniform = (tuple(context) + (None, None))[:3]
        if uniform is None or not any(uniform):
            return self._attend(x, context, key_mask)
        if len(uniform) != x.shape[0]:
            raise ValueError(f"{len(uniform)} uniform-context flags for {x.shape[0]} batch elements")
        out = x.new_empty(*x.shape[:-1], self.channels)
        start = 0
        while start < len(uniform):   # runs of consecutive elements with the same flag
            stop = start + 1
            while stop < len(uniform) and uniform[stop] == uniform[start]:
                stop += 1
            rows = slice(start, stop)
            if uniform[start]:
                first_token = context[rows, :1].to(self.to_kv.weight.dtype)
                value = self.to_kv(first_token).unflatten(-1, (2, self.channels))[..., 1, :]   # [b, 1, C]
                out[rows] = self.to_out(value)
            else:
                out[rows] = self._attend(x[rows], context[rows], None if key_mask is None else key_mask[rows])
            start = stop
        return out

    def _attend(self, x: Tensor, context: Tensor, key_mask) -> Tensor:
        q, k, v = self.project(x, context)

        def sdpa() -> Tensor:
            mask = None if key_mask is None else key_mask[:, None, None, :]
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=mask)
            return out.transpose(1, 2)

        kernel = _context_attention_kernel(q, k, v)
        out = sdpa() if kernel is None else _BLOCK_KERNELS.attempt(lambda: kernel(q, k, v, key_mask), sdpa)
        return self.to_out(out.flatten(-2))


class ModulatedCrossBlock(nn.Module):
    """adaLN-modulated transformer block with cross-attention (architecture notes 3.1).

    ``x += gate_msa * self_attn(LN1(x) * (1 + scale_msa) + shift_msa)``;
    ``x += cross_attn(LN2(x), context)`` (LN2 affine, no modulation);
    ``x += gate_mlp * mlp(LN3(x) * (1 + scale_mlp) + shift_mlp)``.
    ``self_attn`` and ``cross_attn`` are given by the model (dense attention or SSA). Tokens are
    ``[B, L, C]``; the modulation ``[B, 6C]`` is broadcast over L.
    """

    def __init__(self, channels: int, self_attn: nn.Module, cross_attn: nn.Module,
                 mlp_ratio: float = 4.0, share_mod: bool = False):
        super().__init__()
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm3 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.self_attn = self_attn
        self.cross_attn = cross_attn
        self.mlp = FeedForward(channels, mlp_ratio)
        self.share_mod = share_mod
        if not share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 6 * channels))

    def modulation(self, t_emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Six ``[B, 1, C]`` tensors: shift/scale/gate for attention, then for the MLP."""
        mod = t_emb if self.share_mod else self.adaLN_modulation(t_emb)
        return tuple(m.unsqueeze(1) for m in mod.chunk(6, dim=-1))

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor, context, shared_self_attention: bool = False,
                **self_attn_kwargs) -> torch.Tensor:
        """shared_self_attention: the caller's promise that every batch element of ``x`` holds the same
        tokens and every row of ``t_emb`` the same embedding (the [cond, uncond] pair of classifier-free
        guidance entering a DiT's first block; only the contexts differ). Everything before the
        cross-attention (norm1 + modulation, the self-attention, its gated residual and norm2) then
        runs on element 0 alone and its rows are copied to the other elements; ``self_attn_kwargs``
        must then describe element 0 alone (e.g. its voxels). Exact: that part is row-wise or per
        batch element (no kernel mixes elements), so each element would compute these same rows. The
        adaLN modulation still runs on all rows: the rest of the block needs them, and a GEMM of
        another row count could take another cuBLAS kernel."""
        mods = self.modulation(t_emb)
        _, _, _, shift_mlp, scale_mlp, gate_mlp = mods
        kernels = None
        if x.dim() == 3 and not self._records_autograd(x, t_emb, context):
            kernels = _modulation_kernels(x, *mods, parameters=self._norm_parameters())
        if kernels is not None:
            return self._fused_forward(kernels, x, mods, context, shared_self_attention, self_attn_kwargs)
        # each modulation / gated residual is one fused multiply-add pass over the tokens
        x, h = self._attention_half(None, x, mods[:3], shared_self_attention, self_attn_kwargs)
        x = x + self.cross_attn(h, context)
        h = torch.addcmul(shift_mlp, self.norm3(x), 1 + scale_mlp)
        return torch.addcmul(x, gate_mlp, self.mlp(h))

    def _attention_half(self, kernels, x: torch.Tensor, msa, shared: bool, self_attn_kwargs):
        """``(stream, norm2(stream))`` with ``stream = x + gate_msa * self_attn(LN1(x) * (1 + scale_msa)
        + shift_msa)``: the part of the block before the cross-attention. ``msa``: (shift, scale, gate)
        ``[B, 1, C]``. ``kernels``: the fused passes (None: PyTorch). With ``shared`` (see `forward`)
        it runs on element 0 and both results are broadcast into new tensors; the kernels write
        element 0's rows there directly, so the copies cost no more than the passes they replace."""
        batch = x.shape[0]
        if not shared or batch == 1:
            return self._attention_residual(kernels, x, msa, self_attn_kwargs)
        stream, normed = (torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(2))
        first_rows = (stream[:1], normed[:1])
        results = self._attention_residual(kernels, x[:1], tuple(m[:1] for m in msa), self_attn_kwargs,
                                           out=first_rows)
        for full, first, result in zip((stream, normed), first_rows, results):
            if result is not first:   # a PyTorch path returned its own tensor
                first.copy_(result)
            full[1:].copy_(first.expand_as(full[1:]))
        return stream, normed

    def _attention_residual(self, kernels, x: torch.Tensor, msa, self_attn_kwargs, out=None):
        """`_attention_half` over all of ``x``. ``out``: optional (stream, normed) tensors of x's shape
        that the kernel path writes into (the results are then these tensors)."""
        shift_msa, scale_msa, gate_msa = msa
        n1, n2 = self.norm1, self.norm2
        if kernels is None:
            h = torch.addcmul(shift_msa, n1(x), 1 + scale_msa)
            stream = torch.addcmul(x, gate_msa, self.self_attn(h, **self_attn_kwargs))
            return stream, n2(stream)
        h = _BLOCK_KERNELS.attempt(lambda: kernels.layer_norm_modulate(x, shift_msa, scale_msa, n1.eps, weight=n1.weight,
                                                                       bias=n1.bias),
                                   lambda: torch.addcmul(shift_msa, n1(x), 1 + scale_msa))
        y = self.self_attn(h, **self_attn_kwargs)

        def torch_attention_residual():
            stream = torch.addcmul(x, gate_msa, y)
            return stream, n2(stream)

        if not _fits(y, x):
            return torch_attention_residual()
        # a new stream: the caller's x is never written
        stream_out, normed_out = (None, None) if out is None else out
        return _BLOCK_KERNELS.attempt(lambda: kernels.residual_layer_norm(
            x, y, gate_msa, eps=n2.eps, weight=n2.weight, bias=n2.bias, residual_out=stream_out, out=normed_out),
            torch_attention_residual)

    def _norm_parameters(self) -> tuple:
        return tuple(p for norm in (self.norm1, self.norm2, self.norm3) for p in (norm.weight, norm.bias)
                     if p is not None)

    def _records_autograd(self, x: torch.Tensor, t_emb: torch.Tensor, context) -> bool:
        """Whether autograd records this forward (then the PyTorch path runs: the kernels have no
        backward)."""
        if not torch.is_grad_enabled():
            return False
        tensors = [x, t_emb] + [t for t in (context if isinstance(context, tuple) else (context,))
                                if isinstance(t, torch.Tensor)]
        return any(t.requires_grad for t in tensors) or any(p.requires_grad for p in self.parameters())

    def _fused_forward(self, kernels, x: torch.Tensor, mods, context, shared: bool, self_attn_kwargs) -> torch.Tensor:
        """The same formulas with the elementwise work in four passes (engine.kernels.modulation):
        LN1 + modulation; gated residual + LN2 (affine); residual + LN3 + modulation; gated residual.
        Each step has the PyTorch formula as its fallback; a branch output of another dtype or shape
        than the tokens (never in the released models) takes it too."""
        _, _, _, shift_mlp, scale_mlp, gate_mlp = mods
        n3 = self.norm3
        x, h = self._attention_half(kernels, x, mods[:3], shared, self_attn_kwargs)
        y = self.cross_attn(h, context)

        def torch_cross_residual():
            stream = x + y
            return stream, torch.addcmul(shift_mlp, n3(stream), 1 + scale_mlp)

        if _fits(y, x):   # x is this block's own stream from here on: updated in place
            x, h = _BLOCK_KERNELS.attempt(lambda: kernels.residual_layer_norm(
                x, y, eps=n3.eps, weight=n3.weight, bias=n3.bias, shift=shift_mlp, scale=scale_mlp,
                residual_out=x if x.is_contiguous() else None), torch_cross_residual)
        else:
            x, h = torch_cross_residual()
        y = self.mlp(h)
        if _fits(y, x):
            return _BLOCK_KERNELS.attempt(lambda: kernels.gated_residual(x, gate_mlp, y, inplace=x.is_contiguous()),
                                          lambda: torch.addcmul(x, gate_mlp, y))
        return torch.addcmul(x, gate_mlp, y)


def _fits(y: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether a branch output can go through the fused residual passes with the tokens ``x``."""
    return y.dtype == x.dtype and y.shape == x.shape and y.device == x.device
