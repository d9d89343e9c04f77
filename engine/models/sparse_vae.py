"""Sparse SDF VAE (architecture notes 3.4): fine SDF voxels <-> 16-channel latents at 1/8 resolution.

Official keys (`encoder.*`, `decoder.*`) load unchanged. Submodules:

* encoder: `input_layer1` Linear(1 -> C/16) on per-voxel SDF values; `downsample.{0,1,2}`
  (SparseDownBlock3d, C/16 -> C/8 -> C/4 -> C, each halving the resolution); transformer trunk
  (`input_layer` + APE, `blocks.*` with 8^3 windows shifted by 0/4 alternately); LayerNorm without
  affine; `out_layer` -> mean and log-variance (clamped to [-30, 20]).
* decoder: `input_layer` Linear(16 -> C) + APE; `blocks.*` (same swin blocks, no final norm);
  `upsample.{0,1,2}` (SparseSubdivideBlock3d, C -> C/4 -> C/8 -> C/16, each doubling the resolution);
  `out_layer` Linear(C/16 -> 1); tanh.

Chunked decoding (official eval path when chunk_size > 1, the 1024 stage): the transformer runs on all
tokens, then the latent grid is cut into chunk_size^3 cubes of resolution/chunk_size latent voxels; each
cube plus a halo of 4 latent voxels goes through the subdivision blocks, and the fine voxels with
coordinates in [start*8, end*8 + 7) per axis are kept. That range overlaps the next cube by 7 fine
voxels, so those voxels are emitted twice; because the halo covers the receptive field, every copy
equals the unchunked value. `deduplicate=True` keeps [start*8, end*8) instead, giving each fine voxel
exactly once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.configs import SparseVAEConfig
from engine.models.blocks import FeedForward, LayerNorm32, absolute_position_embedding
from engine.sparse import (SparseConv3d, SparseGroupNorm32, SparseSequential, SparseVoxels,
                           sparse_downsample, sparse_subdivide, window_partition, windowed_attention)

SUBDIVISION_LEVELS = 3                  # three x2 subdivisions: latent -> 8x resolution
FINE_PER_LATENT = 2 ** SUBDIVISION_LEVELS
CHUNK_HALO = 4                          # latent voxels of context around each decoding chunk
ENCODER_NORM_GROUPS = 32                # GroupNorm groups in the encoder down blocks (official value)


def encoder_norm_groups(channels: int, max_groups: int = ENCODER_NORM_GROUPS) -> int:
    """32 groups, as official, for widths divisible by 32 (all released sizes); for the narrow widths of
    scaled-down test configs the largest divisor of the width below 32 (official code cannot build those)."""
    return math.gcd(max_groups, channels)


# ====================================================================== transformer trunk
class SparseWindowSelfAttention(nn.Module):
    """Multi-head self-attention inside (shifted) cubic windows; keys `to_qkv`, `to_out`."""

    def __init__(self, channels: int, num_heads: int, window_size: int, shift: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        self.window_size = window_size
        self.shift = shift
        self.to_qkv = nn.Linear(channels, 3 * channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: SparseVoxels, feats: Tensor) -> Tensor:
        q, k, v = self.to_qkv(feats).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(dim=1)
        partition = window_partition(x, self.window_size, self.shift)
        out = windowed_attention(q, k, v, partition)
        return self.to_out(out.flatten(1))


class SparseTransformerBlock(nn.Module):
    """Pre-norm block: x += attn(LN(x)); x += mlp(LN(x)). LayerNorms without affine, eps 1e-6."""

    def __init__(self, channels: int, num_heads: int, window_size: int, shift: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.attn = SparseWindowSelfAttention(channels, num_heads, window_size, shift)
        self.norm2 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.mlp = FeedForward(channels, mlp_ratio)

    def forward(self, x: SparseVoxels) -> SparseVoxels:
        h = x.feats + self.attn(x, self.norm1(x.feats))
        h = h + self.mlp(self.norm2(h))
        return x.replace(h)


class SparseTransformerBase(nn.Module):
    """Trunk shared by encoder and decoder: `input_layer` + absolute position embedding, then swin
    blocks with window shifts 0, w/2, 0, w/2, ... (keys `input_layer.*`, `blocks.*`)."""

    def __init__(self, in_channels: int, channels: int, num_blocks: int, num_heads: int,
                 window_size: int, mlp_ratio: float):
        super().__init__()
        self.channels = channels
        self.input_layer = nn.Linear(in_channels, channels)
        self.blocks = nn.ModuleList(
            SparseTransformerBlock(channels, num_heads, window_size, shift=(window_size // 2) * (i % 2),
                                   mlp_ratio=mlp_ratio)
            for i in range(num_blocks))

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.input_layer.weight.dtype

    def run_trunk(self, x: SparseVoxels, factor: float = 1.0) -> SparseVoxels:
        h = self.input_layer(x.feats.to(self.compute_dtype))
        # APE is fp32; the sum is rounded to the compute dtype once (as the official code does)
        if x.num_voxels:
            ape = absolute_position_embedding(x.coords[:, 1:].float() * factor, self.channels)
        else:  # (the shared helper cannot reshape an empty position list)
            ape = h.new_zeros(0, self.channels, dtype=torch.float32)
        h = x.replace((h.float() + ape).to(self.compute_dtype))
        for block in self.blocks:
            h = block(h)
        return h


# ====================================================================== resolution-changing blocks
class SparseDownBlock3d(nn.Module):
    """[GN, SiLU] -> mean-pool x2 -> conv3 -> GN -> SiLU -> conv3, plus mean-pool x2 -> 1x1 conv skip."""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int = ENCODER_NORM_GROUPS):
        super().__init__()
        self.act_layers = SparseSequential([
            SparseGroupNorm32(encoder_norm_groups(in_channels, norm_groups), in_channels), nn.SiLU()])
        self.out_layers = SparseSequential([
            SparseConv3d(in_channels, out_channels, 3),
            SparseGroupNorm32(encoder_norm_groups(out_channels, norm_groups), out_channels),
            nn.SiLU(),
            SparseConv3d(out_channels, out_channels, 3),
        ])
        self.skip_connection = (SparseConv3d(in_channels, out_channels, 1)
                                if in_channels != out_channels else None)

    def forward(self, x: SparseVoxels) -> SparseVoxels:
        h = sparse_downsample(self.act_layers(x), 2)
        skip = sparse_downsample(x, 2)
        # both pooled tensors have identical (sorted) coordinates; share one cache for the convs
        skip = h.replace(skip.feats)
        h = self.out_layers(h)
        if self.skip_connection is not None:
            skip = self.skip_connection(skip)
        return h.replace(h.feats + skip.feats)


class SparseSubdivideBlock3d(nn.Module):
    """conv3 (C -> C') + SiLU -> subdivide x2 -> conv3 (C' -> C') + SiLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.act_layers = SparseSequential([SparseConv3d(in_channels, out_channels, 3), nn.SiLU()])
        self.out_layers = SparseSequential([SparseConv3d(out_channels, out_channels, 3), nn.SiLU()])

    def forward(self, x: SparseVoxels) -> SparseVoxels:
        return self.out_layers(sparse_subdivide(self.act_layers(x)))


def subdivision_widths(model_channels: int) -> list[int]:
    """Channel widths of the three subdivision levels: C/4, C/8, C/16."""
    return [model_channels // 4, model_channels // 8, model_channels // 16]


# ====================================================================== encoder
class SparseSDFEncoder(SparseTransformerBase):
    """Fine SDF voxels [N, 1] -> (mean, logvar) SparseVoxels at 1/8 resolution."""

    def __init__(self, config: SparseVAEConfig, norm_groups: int = ENCODER_NORM_GROUPS):
        channels = config.model_channels_encoder
        heads = config.num_heads_encoder or channels // config.num_head_channels_encoder
        super().__init__(channels, channels, config.num_blocks_encoder, heads, config.window_size,
                         config.mlp_ratio)
        widths = [channels // 16, channels // 8, channels // 4, channels]
        self.input_layer1 = nn.Linear(1, widths[0])
        self.downsample = nn.ModuleList(
            SparseDownBlock3d(widths[i], widths[i + 1], norm_groups) for i in range(3))
        self.out_layer = nn.Linear(channels, 2 * config.embed_dim)

    def forward(self, x: SparseVoxels, factor: float = 1.0) -> tuple[SparseVoxels, SparseVoxels]:
        dtype = self.input_layer1.weight.dtype
        h = x.replace(self.input_layer1(x.feats.to(dtype)))
        for block in self.downsample:
            h = block(h)
        h = self.run_trunk(h, factor)
        normed = F.layer_norm(h.feats.float(), (h.channels,)).to(h.dtype)
        moments = self.out_layer(normed)
        mean, logvar = moments.chunk(2, dim=1)
        return h.replace(mean), h.replace(logvar.clamp(-30.0, 20.0))


# ====================================================================== decoder
class SparseSDFDecoder(SparseTransformerBase):
    """Latents [N, embed_dim] at latent coordinates -> tanh SDF [M, 1] at 8x the coordinates."""

    def __init__(self, config: SparseVAEConfig, chunk_halo: int = CHUNK_HALO):
        channels = config.model_channels_decoder
        heads = config.num_heads_decoder or channels // config.num_head_channels_decoder
        super().__init__(config.embed_dim, channels, config.num_blocks_decoder, heads, config.window_size,
                         config.mlp_ratio)
        self.resolution = config.resolution
        self.chunk_size = config.chunk_size
        self.chunk_halo = chunk_halo
        widths = [channels] + subdivision_widths(channels)
        self.upsample = nn.ModuleList(
            SparseSubdivideBlock3d(widths[i], widths[i + 1]) for i in range(SUBDIVISION_LEVELS))
        self.out_layer = nn.Linear(widths[-1], config.out_channels)

    def _head(self, h: SparseVoxels) -> SparseVoxels:
        return h.replace(torch.tanh(self.out_layer(h.feats)))

    def forward(self, latents: SparseVoxels, return_feat: bool = False, factor: float = 1.0,
                chunked: bool | None = None, deduplicate: bool = False, chunk_size: int | None = None):
        """Decode latents.

        `chunked=None` follows the official rule: chunked when chunk_size > 1 and in eval mode.
        `chunk_size` overrides the configured number of chunks per axis (e.g. to decode the 512 stage
        in pieces to save memory; use `deduplicate=True` then for an output equal to the unchunked one).
        Returns the SDF voxels, or (sdf, features before `out_layer`) with `return_feat` (also in the
        chunked path, where the official code ignores return_feat).
        """
        chunk_size = self.chunk_size if chunk_size is None else chunk_size
        if chunked is None:
            chunked = chunk_size > 1 and not self.training
        h = self.run_trunk(latents, factor)
        if not chunked:
            for block in self.upsample:
                h = block(h)
            sdf = self._head(h)
            return (sdf, h) if return_feat else sdf
        return self._decode_chunks(h, return_feat, deduplicate, chunk_size)

    def chunk_bounds(self, chunk_size: int | None = None) -> list[tuple[int, int]]:
        """[start, end) latent range of each chunk along one axis: steps of resolution / chunk_size
        (rounded up when it does not divide; the official configs divide)."""
        chunk_size = self.chunk_size if chunk_size is None else chunk_size
        step = -(-self.resolution // chunk_size)
        return [(i * step, (i + 1) * step) for i in range(chunk_size)]

    def _chunk_boxes(self, chunk_size: int, device: torch.device):
        """(lo, hi) latent corners of every chunk, in the official loop order i, j, k (z fastest)."""
        bounds = self.chunk_bounds(chunk_size)
        for bx in bounds:
            for by in bounds:
                for bz in bounds:
                    yield (torch.tensor([bx[0], by[0], bz[0]], device=device),
                           torch.tensor([bx[1], by[1], bz[1]], device=device))

    def _decode_chunks(self, h: SparseVoxels, return_feat: bool, deduplicate: bool, chunk_size: int):
        coords = h.coords[:, 1:].long()
        device = coords.device
        end = self.chunk_bounds(chunk_size)[-1][1]
        if h.num_voxels and (int(coords.max()) >= end or int(coords.min()) < 0):
            raise ValueError(f"latent coordinates outside the decoder grid [0, {self.resolution})")
        # fine voxels kept per chunk: official [start*8, end*8 + 7) (duplicates), or [start*8, end*8)
        keep_extra = 0 if deduplicate else FINE_PER_LATENT - 1

        # Every latent voxel has all 8^3 fine descendants, so the rows each chunk keeps can be counted
        # from the latent coordinates alone; the outputs are allocated once and filled chunk by chunk
        # (no concatenation peak).
        counts = []
        for lo, hi in self._chunk_boxes(chunk_size, device):
            first = torch.maximum(coords * FINE_PER_LATENT, lo * FINE_PER_LATENT)
            last = torch.minimum(coords * FINE_PER_LATENT + FINE_PER_LATENT, hi * FINE_PER_LATENT + keep_extra)
            counts.append(int((last - first).clamp(min=0).prod(dim=1).sum()))
        total = sum(counts)
        dtype = h.feats.dtype
        sdf_out = h.feats.new_empty(total, self.out_layer.out_features)
        coords_out = h.coords.new_empty(total, 4)
        feat_out = h.feats.new_empty(total, self.out_layer.in_features) if return_feat else None

        row = 0
        for (lo, hi), count in zip(self._chunk_boxes(chunk_size, device), counts):
            if count == 0:
                continue
            in_halo = ((coords >= lo - self.chunk_halo) & (coords < hi + self.chunk_halo)).all(dim=1)
            rows = in_halo.nonzero().squeeze(1)
            chunk = SparseVoxels(h.feats[rows], h.coords[rows])
            for block in self.upsample:
                chunk = block(chunk)
            fine = chunk.coords[:, 1:]
            keep = ((fine >= lo * FINE_PER_LATENT) & (fine < hi * FINE_PER_LATENT + keep_extra)).all(dim=1)
            kept = keep.nonzero().squeeze(1)
            if kept.numel() != count:
                raise RuntimeError(f"chunk kept {kept.numel()} fine voxels, expected {count}")
            feats = chunk.feats[kept]
            coords_out[row:row + count] = chunk.coords[kept]
            sdf_out[row:row + count] = torch.tanh(self.out_layer(feats)).to(dtype)
            if feat_out is not None:
                feat_out[row:row + count] = feats
            row += count
            del chunk, fine, keep, kept, feats  # free this chunk's fine-level tensors now
        sdf = SparseVoxels(sdf_out, coords_out)
        if return_feat:
            return sdf, sdf.replace(feat_out)
        return sdf


# ====================================================================== VAE
class SparseSDFVAE(nn.Module):
    """The official `SparseSDFVAE` (`encoder`, `decoder`); 512 stage: resolution 64, 1024: 128 chunked."""

    def __init__(self, config: SparseVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = SparseSDFEncoder(config)
        self.decoder = SparseSDFDecoder(config)

    def encode(self, sdf_voxels: SparseVoxels) -> tuple[SparseVoxels, SparseVoxels]:
        """(mean, logvar) latents of fine SDF voxels [N, 1]."""
        return self.encoder(sdf_voxels)

    def decode(self, latents: SparseVoxels, **kwargs):
        """Decoder forward on latents already un-scaled (see `unscale_latents`)."""
        return self.decoder(latents, **kwargs)

    def unscale_latents(self, feats: Tensor) -> Tensor:
        """Sampler output -> decoder input: latents / latents_scale + latents_shift (identity in releases)."""
        return feats / self.config.latents_scale + self.config.latents_shift
