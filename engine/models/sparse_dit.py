"""Sparse DiT of the 512 and 1024 stages (architecture notes §3.5, §4; v1.0 sparse conditions §2.1).

Tokens `[N, in_channels]` on block-sorted latent coordinates -> `input_layer` -> + APE(coords * factor)
-> `num_blocks` modulated cross blocks (self-attention: Spatial Sparse Attention with window shift 0
on even and window/2 on odd blocks; cross-attention: full attention to the image context) ->
LayerNorm (no affine, eps 1e-5) -> `out_layer`.

Batches: rows of each batch element are contiguous; elements may share coordinates (the cond and
uncond halves of a guidance batch), and then share every coordinate-dependent cache. Linear layers
run on a packed `[B, L, C]` tensor (a reshape when the elements have equal sizes); SSA runs per
element. Everything that depends only on the coordinates (APE, SSA block bookkeeping, window
partitions, pooling maps, neighbour maps) is cached in the input's `SparseVoxels.cache`, so a
sampler that keeps feeding `x.replace(new_feats)` computes it once.

Guidance pairs feed the same tokens twice (`identical_elements`): the first block's self-attention
half then runs on element 0 alone (`ModulatedCrossBlock.forward`'s `shared_self_attention`), over
element 0's own voxel set, which is kept in the batch's cache (`first_element_voxels`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.attention.ssa import SpatialSparseAttention, pack_rows, row_packing, unpack_rows
from engine.configs import SparseDiTConfig
from engine.models.blocks import (ContextCrossAttention, ModulatedCrossBlock, TimestepEmbedder,
                                  absolute_position_embedding)
from engine.sparse import SparseVoxels

# number of non-patch tokens at the start of the DINOv2 output: cls + 4 registers
NUM_PREFIX_TOKENS = 5


class SparseDiT(nn.Module):
    """The official `SparseDiT` with identical parameter keys (v1.0 and v1.1 layouts)."""

    def __init__(self, config: SparseDiTConfig, ssa_backend: str = "auto"):
        super().__init__()
        self.config = config
        channels = config.model_channels
        if config.sparse_conditions and config.cond_channels != channels:
            # the condition APE has model_channels channels and is added to cond_proj's output
            raise ValueError("sparse_conditions needs cond_channels == model_channels")
        self.t_embedder = TimestepEmbedder(channels)
        if config.share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 6 * channels))
        if config.sparse_conditions:
            self.cond_proj = nn.Linear(config.cond_channels, config.cond_channels)
        self.input_layer = nn.Linear(config.in_channels, channels)
        blocks = []
        for index in range(config.num_blocks):
            # as the official constructor: alternate 0 / window/2 with use_shift, else window/2 everywhere
            shift = config.window_size // 2 * (index % 2) if config.use_shift else config.window_size // 2
            self_attn = SpatialSparseAttention(
                channels, config.heads, config.num_kv_heads, config.compression_block_size,
                config.selection_block_size, config.topk, window_size=config.window_size,
                shift_window=shift, compression_version=config.compression_version, backend=ssa_backend)
            cross_attn = ContextCrossAttention(channels, config.heads, config.cond_channels,
                                               qk_rms_norm=config.qk_rms_norm_cross)
            blocks.append(ModulatedCrossBlock(channels, self_attn, cross_attn, config.mlp_ratio,
                                              share_mod=config.share_mod))
        self.blocks = nn.ModuleList(blocks)
        self.out_layer = nn.Linear(channels, config.out_channels)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.input_layer.weight.dtype

    def set_ssa_backend(self, backend: str) -> None:
        for block in self.blocks:
            block.self_attn.backend = backend

    # ------------------------------------------------------------------ inputs
    def position_embedding(self, x: SparseVoxels) -> Tensor:
        """APE of `coords * factor` in the compute dtype, cached per coordinate set."""
        key = ("sparse_dit_ape", self.config.model_channels, self.config.factor, self.compute_dtype)
        embedding = x.cache.get(key)
        if embedding is None:
            positions = x.coords[:, 1:].float() * self.config.factor
            embedding = absolute_position_embedding(positions, self.config.model_channels).to(self.compute_dtype)
            x.cache[key] = embedding
        return embedding

    def prepare_context(self, cond, batch_size: int):
        """Dense context `[B, L, C]`, or `(context, key_mask)` for sparse conditions of unequal sizes."""
        dtype = self.compute_dtype
        if isinstance(cond, SparseVoxels):
            if not self.config.sparse_conditions:
                raise ValueError("this model (sparse_conditions=False) takes a dense context [B, L, C]")
            feats = self.cond_proj(cond.feats.to(dtype))
            ape = absolute_position_embedding(cond.coords[:, 1:], self.config.model_channels)
            feats = feats + ape.to(dtype)
            packing = row_packing(cond)
            if packing.batch_size != batch_size:
                raise ValueError(f"{packing.batch_size} condition batch elements for {batch_size} token batches")
            context = pack_rows(feats, packing)
            if packing.flat_index is None:
                return context
            key_mask = cond.cache.get("context_key_mask")
            if key_mask is None:
                key_mask = torch.zeros(batch_size * packing.length, dtype=torch.bool, device=feats.device)
                key_mask.index_fill_(0, packing.flat_index, True)
                key_mask = key_mask.view(batch_size, packing.length)
                cond.cache["context_key_mask"] = key_mask
            return context, key_mask
        if self.config.sparse_conditions:
            raise ValueError("this model (sparse_conditions=True) takes the condition tokens as SparseVoxels "
                             "(see sparse_condition_tokens)")
        if cond.dim() != 3:
            raise ValueError(f"dense context must be [B, L, C], got {tuple(cond.shape)}")
        if cond.shape[0] != batch_size:
            if cond.shape[0] != 1:
                raise ValueError(f"context batch {cond.shape[0]} for {batch_size} token batches")
            cond = cond.expand(batch_size, -1, -1)
        return cond.to(dtype)

    def timestep_embedding(self, t: Tensor, batch_size: int, device) -> Tensor:
        t = torch.as_tensor(t, device=device).reshape(-1)
        if t.numel() not in (1, batch_size):
            raise ValueError(f"{t.numel()} timesteps for batch size {batch_size}")
        t_emb = self.t_embedder(t.expand(batch_size) if t.numel() == 1 else t)
        if self.config.share_mod:
            t_emb = self.adaLN_modulation(t_emb)
        return t_emb.to(self.compute_dtype)

    # ------------------------------------------------------------------ forward
    def forward(self, x: SparseVoxels, t: Tensor, cond, block_topk: Sequence | None = None,
                uniform_context: Sequence[bool] | None = None, identical_elements: bool = False) -> SparseVoxels:
        """Velocity for tokens `x` at timestep(s) `t` given `cond`.

        cond: dense context `[B, L, cond_channels]` (v1.1; a batch of 1 is broadcast) or the
        condition tokens as SparseVoxels (v1.0, from `sparse_condition_tokens`).
        block_topk: optional injected SSA selection, one entry per DiT block (see
        `SpatialSparseAttention.forward`).
        uniform_context: optional caller's promise, per batch element of a dense `cond`, that all its
        context tokens are the same vector (True for the all-zero unconditional context); the
        cross-attention of those elements then skips the attention (exact, see
        `ContextCrossAttention.forward`). Ignored for SparseVoxels conditions.
        identical_elements: optional caller's promise that all batch elements of `x` have the same
        features and the same (x, y, z) coordinates, and `t` the same value for all of them (the
        [cond, uncond] pair of guidance, where only `cond` differs). The first block then computes
        everything before its cross-attention once, on element 0 (exact: those steps are row-wise or
        per element). Only the element sizes are checked (nothing is read from the device); a first
        block with an injected `block_topk` selection runs in full.
        Returns SparseVoxels on x's coordinates in x's dtype.
        """
        if block_topk is not None and len(block_topk) != len(self.blocks):
            raise ValueError(f"block_topk has {len(block_topk)} entries for {len(self.blocks)} blocks")
        dtype = self.compute_dtype
        packing = row_packing(x)
        batch_size = packing.batch_size
        if identical_elements and packing.flat_index is not None:
            raise ValueError(f"identical_elements: the batch elements have different sizes {x.batch_counts()}")
        h = self.input_layer(x.feats.to(dtype)) + self.position_embedding(x)
        t_emb = self.timestep_embedding(t, batch_size, x.device)
        context = self.prepare_context(cond, batch_size)
        if uniform_context is not None and not isinstance(cond, SparseVoxels):
            if len(uniform_context) != batch_size:
                raise ValueError(f"{len(uniform_context)} uniform_context flags for {batch_size} batch elements")
            context = (context, None, tuple(bool(flag) for flag in uniform_context))
        h = pack_rows(h, packing)
        for index, block in enumerate(self.blocks):
            selection = None if block_topk is None else block_topk[index]
            if identical_elements and index == 0 and selection is None and batch_size > 1:
                # the first block's self-attention half runs once, on element 0's voxels alone
                h = block(h, t_emb, context, shared_self_attention=True, voxels=first_element_voxels(x))
            else:
                h = block(h, t_emb, context, voxels=x, block_topk=selection)
        h = unpack_rows(h, packing)
        # half inputs: the kernel accumulates in fp32 and rounds once (the fp32 round trip, in one pass)
        h = (F.layer_norm(h, (h.shape[-1],), eps=1e-5) if h.dtype in (torch.float16, torch.bfloat16)
             else F.layer_norm(h.float(), (h.shape[-1],), eps=1e-5).to(dtype))
        return x.replace(self.out_layer(h).to(x.dtype))

    def step_function(self, template: SparseVoxels, cond, use_cuda_graphs: bool = True,
                      uniform_context: Sequence[bool] | None = None, identical_elements: bool = False):
        """The network call of a sampler over the fixed token set `template` and condition `cond`:
        `fn(feats [N, in_channels], t [1] or [B]) -> velocity feats [N, out_channels]`.
        `uniform_context` and `identical_elements` are passed to `forward` (e.g. `(False, True)` and
        True for a guidance pair [cond, zeros] whose sampler feeds both elements the same latents).

        Every call reuses `template`'s coordinate caches. On CUDA (and with `use_cuda_graphs`) the
        forward is captured once as a CUDA graph after two eager warm-up calls and replayed for the
        remaining steps (`engine.sampling.CUDAGraphRunner`); elsewhere it is a plain call.
        """
        from engine.sampling import CUDAGraphRunner

        def forward(feats: Tensor, t: Tensor) -> Tensor:
            return self(template.replace(feats), t, cond, uniform_context=uniform_context,
                        identical_elements=identical_elements).feats

        return CUDAGraphRunner(forward, enabled=use_cuda_graphs)

    def forward_with_guidance(self, x: SparseVoxels, t: Tensor, cond, uncond,
                              block_topk: Sequence | None = None) -> tuple[Tensor, Tensor]:
        """Conditional and unconditional velocities of a batch-1 `x` in ONE batched forward.

        cond/uncond: dense contexts `[1, L, C]` or batch-1 condition SparseVoxels. The two-element
        token batch is built once per coordinate set and kept in `x.cache`, so its own caches (SSA
        bookkeeping, windows, APE) survive across sampler steps that pass `x.replace(new_feats)`.
        block_topk: optional injected selections, per DiT block `[cond_selection, uncond_selection]`.
        Returns (cond_feats, uncond_feats), each `[N, out_channels]` in x's dtype.
        """
        if x.batch_size != 1:
            raise ValueError("forward_with_guidance takes a batch of one")
        doubled = x.cache.get("guidance_batch")
        if doubled is None:
            second = x.coords.clone()
            second[:, 0] = 1
            doubled = SparseVoxels(x.feats.new_zeros(2 * x.num_voxels, 0), torch.cat([x.coords, second]))
            x.cache["guidance_batch"] = doubled
        batch = doubled.replace(torch.cat([x.feats, x.feats]))
        if isinstance(cond, SparseVoxels):
            # the two-element condition token set, kept with the pair of condition caches it joins
            key = ("guidance_context", id(uncond.cache))
            entry = cond.cache.get(key)
            if entry is None or entry[0] is not uncond.cache:
                uncond_coords = uncond.coords.clone()
                uncond_coords[:, 0] = 1
                template = SparseVoxels(cond.feats.new_zeros(cond.num_voxels + uncond.num_voxels, 0),
                                        torch.cat([cond.coords, uncond_coords]))
                entry = (uncond.cache, template)
                cond.cache[key] = entry
            context = entry[1].replace(torch.cat([cond.feats, uncond.feats.to(cond.feats.dtype)]))
        else:
            context = torch.cat([cond, uncond.to(cond.dtype)])
        # both elements hold x's tokens; with one timestep for both, the first self-attention runs once
        one_timestep = torch.as_tensor(t).numel() == 1
        out = self(batch, t, context, block_topk=block_topk, identical_elements=one_timestep).feats
        return out[:x.num_voxels], out[x.num_voxels:]


def first_element_voxels(x: SparseVoxels) -> SparseVoxels:
    """Batch element 0 of `x` as its own SparseVoxels (no feature columns: a coordinate template),
    kept in `x.cache`, so that its coordinate caches (SSA layout, windows) are built on the first
    call and shared by every later `x.replace(...)`; `x` itself for a batch of one."""
    if x.batch_size == 1:
        return x
    first = x.cache.get("first_element_voxels")
    if first is None:
        rows = x.batch_slices()[0]
        first = SparseVoxels(x.feats.new_zeros(rows.stop - rows.start, 0), x.coords[rows])
        x.cache["first_element_voxels"] = first
    return first


def sparse_condition_tokens(dense_context: Tensor, mask: Tensor, patch_size: int = 14) -> SparseVoxels:
    """v1.0 sparse image conditions (architecture notes §2.1).

    dense_context: DINOv2 tokens `[B, 5 + P*P, C]` (cls, 4 registers, P x P patches row-major).
    mask: foreground, either per patch `[B, P, P]` or per pixel `[B, P*patch, P*patch]` (or with a
    channel dim of 1), which is max-pooled with kernel = stride = `patch_size`.
    Per image: the 5 prefix tokens at (x, y, z) = (0, 0, 1), then every patch containing foreground,
    in row-major order, at (x = column, y = row, z = 0). Coordinates are int32 (batch, x, y, z).
    """
    batch_size, length, _ = dense_context.shape
    grid = math.isqrt(length - NUM_PREFIX_TOKENS)
    if grid * grid != length - NUM_PREFIX_TOKENS:
        raise ValueError(f"{length} tokens is not {NUM_PREFIX_TOKENS} + a square patch grid")
    if mask.dim() == 4:
        if mask.shape[1] != 1:
            raise ValueError(f"mask must have one channel, got {tuple(mask.shape)}")
        mask = mask[:, 0]
    if mask.shape[-2:] != (grid, grid):
        if mask.shape[-2:] != (grid * patch_size, grid * patch_size):
            raise ValueError(f"mask {tuple(mask.shape)} matches neither the {grid}x{grid} patch grid "
                             f"nor its {grid * patch_size}^2 pixels")
        mask = F.max_pool2d(mask.float().unsqueeze(1), patch_size, patch_size).squeeze(1)
    foreground = (mask > 0).reshape(batch_size, grid * grid).to(dense_context.device)
    feats, coords = [], []
    for b in range(batch_size):
        patch_index = torch.nonzero(foreground[b]).squeeze(1)
        prefix = torch.tensor([[b, 0, 0, 1]] * NUM_PREFIX_TOKENS, dtype=torch.int32, device=dense_context.device)
        patches = torch.stack([torch.full_like(patch_index, b), patch_index % grid, patch_index // grid,
                               torch.zeros_like(patch_index)], dim=1).to(torch.int32)
        feats.append(torch.cat([dense_context[b, :NUM_PREFIX_TOKENS], dense_context[b, NUM_PREFIX_TOKENS + patch_index]]))
        coords.append(torch.cat([prefix, patches]))
    return SparseVoxels(torch.cat(feats), torch.cat(coords))
