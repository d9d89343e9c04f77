"""Dense DiT of Direct3D-S2 (`DenseDiT`, architecture notes 3.3): the coarse-occupancy flow model.

x [B, 8, 16, 16, 16] -> tokens [B, 4096, 8] (x-major: index x*256 + y*16 + z) -> input_layer -> + pos_emb
-> modulated cross blocks (full self-attention with per-head q/k RMS norm, cross-attention to the image
tokens) -> LayerNorm (no affine, eps 1e-5) -> out_layer -> [B, 8, 16, 16, 16].

`pos_emb` is a persistent buffer (the official checkpoint carries it), recomputed by the constructor as the
3-axis sinusoidal embedding of the grid coordinates. Batches of any size work, so classifier-free guidance
can run cond and uncond in one B=2 call; a timestep of shape [1] is shared by the whole batch. Such a
call may promise `identical_elements` (same latents and timestep, only the context differs): the first
block then runs its self-attention half once, on element 0 (`ModulatedCrossBlock.forward`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine.configs import DenseDiTConfig
from engine.models.blocks import (ContextCrossAttention, ModulatedCrossBlock, MultiHeadAttention, TimestepEmbedder,
                                  absolute_position_embedding)

FINAL_NORM_EPS = 1e-5


def grid_coordinates(resolution: int, device=None) -> torch.Tensor:
    """All (x, y, z) of a resolution^3 grid, x-major (meshgrid 'ij' order), [resolution^3, 3] int64."""
    axis = torch.arange(resolution, device=device)
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)


class DenseDiT(nn.Module):
    def __init__(self, config: DenseDiTConfig):
        super().__init__()
        if config.patch_size != 1:
            raise NotImplementedError("DenseDiT: only patch_size 1 (the released value) is implemented")
        self.config = config
        width = config.model_channels
        self.resolution = config.resolution
        self.t_embedder = TimestepEmbedder(width)
        self.input_layer = nn.Linear(config.in_channels, width)
        self.register_buffer(
            "pos_emb", absolute_position_embedding(grid_coordinates(config.resolution), width), persistent=True
        )
        self.blocks = nn.ModuleList(
            ModulatedCrossBlock(
                width,
                self_attn=MultiHeadAttention(width, config.heads, attn_type="self", qk_rms_norm=config.qk_rms_norm),
                cross_attn=ContextCrossAttention(width, config.heads, config.cond_channels,
                                                 qk_rms_norm=config.qk_rms_norm_cross),
                mlp_ratio=config.mlp_ratio,
                share_mod=config.share_mod,
            )
            for _ in range(config.num_blocks)
        )
        if config.share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        self.out_layer = nn.Linear(width, config.out_channels)

    @property
    def compute_dtype(self) -> torch.dtype:
        """dtype of the token stream: that of the linear layers (fp16 after `build(dtype=float16)`)."""
        return self.input_layer.weight.dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                uniform_context: Sequence[bool] | None = None, identical_elements: bool = False) -> torch.Tensor:
        """x [B, C_in, R, R, R], t [B] or [1] (timesteps in [0, 1000]), cond [B, L, C_cond] -> [B, C_out, R, R, R].

        uniform_context: optional caller's promise, per batch element, that all its context tokens are
        the same vector (the zero context of unconditional guidance, e.g. `(False, True)`); those
        elements skip the cross-attention itself (`ContextCrossAttention`), with the same result.
        identical_elements: optional caller's promise that all batch elements of `x` are the same
        latents and `t` the same timestep for all of them (a guidance pair); the first block then
        computes everything before its cross-attention once, on element 0, with the same result.
        Nothing is read from the device to check it."""
        batch, _, rx, ry, rz = x.shape
        if (rx, ry, rz) != (self.resolution,) * 3:
            raise ValueError(f"DenseDiT expects a {self.resolution}^3 grid, got {tuple(x.shape[2:])}")
        if cond.shape[0] != batch:
            raise ValueError(f"batch of cond ({cond.shape[0]}) differs from that of x ({batch})")
        dtype = self.compute_dtype

        tokens = x.flatten(2).transpose(1, 2)  # [B, R^3, C_in], x-major
        # the official adds the fp32 table to the projected tokens, then casts to the compute dtype
        h = (self.input_layer(tokens.to(dtype)) + self.pos_emb).to(dtype)

        t = t.reshape(-1)
        t_emb = self.t_embedder(t.expand(batch) if t.shape[0] == 1 else t).to(dtype)
        if self.config.share_mod:
            t_emb = self.adaLN_modulation(t_emb)
        context = cond.to(dtype)
        if uniform_context is not None:
            if len(uniform_context) != batch:
                raise ValueError(f"{len(uniform_context)} uniform_context flags for {batch} batch elements")
            context = (context, None, tuple(bool(flag) for flag in uniform_context))
        for index, block in enumerate(self.blocks):
            if index == 0 and identical_elements:   # the first block's self-attention half runs once
                h = block(h, t_emb, context, shared_self_attention=True)
            else:
                h = block(h, t_emb, context)

        h = F.layer_norm(h.float(), h.shape[-1:], eps=FINAL_NORM_EPS).to(dtype)
        out = self.out_layer(h)  # [B, R^3, C_out]
        return out.transpose(1, 2).reshape(batch, -1, rx, ry, rz)
