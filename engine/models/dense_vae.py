"""Dense occupancy VAE of Direct3D-S2 (`DenseShapeVAE`, architecture notes 3.2 and 2.2).

Encoder: occupancy volume (values occupancy*2-1) [B, 1, 64, 64, 64] -> moments [B, 2*embed_dim, 16, 16, 16]
(mean then logvar). Decoder: latents [B, embed_dim, 16, 16, 16] -> occupancy logits [B, 1, 64, 64, 64].
Parameter names follow the official checkpoint (`encoder.*`, `decoder.*`), so it loads with strict=True.

Precision: `engine.models.build(dtype=float16)` casts the convolutions (the compute layers) and leaves the
ChannelLayerNorms in fp32, as the official `use_fp16` does. Each network runs in the dtype of its
convolutions; norms compute in fp32 and return that dtype. Unlike the official encoder (whose first and
last layers stay fp32 while its blocks go fp16, so it raises a dtype error), both networks here run in one
consistent dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.configs import DenseVAEConfig

CHANNEL_NORM_EPS = 1e-5


class ChannelLayerNorm32(nn.LayerNorm):
    """LayerNorm over the channel axis of [B, C, X, Y, Z], computed in fp32, cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_last = x.float().movedim(1, -1)
        normed = F.layer_norm(channels_last, self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return normed.movedim(-1, 1).to(x.dtype)


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv3d:
    return nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)


class ResBlock3d(nn.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus the identity skip (widths never change here)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = ChannelLayerNorm32(channels, eps=CHANNEL_NORM_EPS)
        self.conv1 = conv3x3(channels, channels)
        self.norm2 = ChannelLayerNorm32(channels, eps=CHANNEL_NORM_EPS)
        self.conv2 = conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + x


class DownsampleBlock3d(nn.Module):
    """Halve the grid with a 2x2x2 stride-2 convolution (key `conv`)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def pixel_shuffle_3d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """[B, C*f^3, X, Y, Z] -> [B, C, f*X, f*Y, f*Z]; channel c*f^3 + i*f^2 + j*f + k lands at (f*x+i, f*y+j, f*z+k)."""
    batch, channels, sx, sy, sz = x.shape
    out_channels = channels // factor ** 3
    x = x.reshape(batch, out_channels, factor, factor, factor, sx, sy, sz)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)  # interleave each sub-voxel offset with its grid axis
    return x.reshape(batch, out_channels, sx * factor, sy * factor, sz * factor)


class UpsampleBlock3d(nn.Module):
    """Double the grid: 3x3x3 conv to out_channels*8, then a 3-D pixel shuffle (key `conv`)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = conv3x3(in_channels, out_channels * 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shuffled = pixel_shuffle_3d(self.conv(x), 2)
        if x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
            shuffled = shuffled.contiguous(memory_format=torch.channels_last_3d)  # keep cuDNN's preferred layout
        return shuffled


def output_head(channels: int, out_channels: int) -> nn.Sequential:
    """ChannelLayerNorm -> SiLU -> 3x3x3 conv (keys `0.*`, `2.*`)."""
    return nn.Sequential(ChannelLayerNorm32(channels, eps=CHANNEL_NORM_EPS), nn.SiLU(), conv3x3(channels, out_channels))


def _to_layout(x: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last_3d) if channels_last else x


class DenseEncoder(nn.Module):
    """[B, in, R, R, R] -> moments [B, 2*embed_dim, R/4, R/4, R/4] (mean channels first, then logvar)."""

    def __init__(self, config: DenseVAEConfig):
        super().__init__()
        widths = list(config.model_channels_encoder)
        self.input_layer = conv3x3(config.in_channels, widths[0])
        blocks: list[nn.Module] = []
        for level, width in enumerate(widths):
            blocks += [ResBlock3d(width) for _ in range(config.num_res_blocks_encoder)]
            if level + 1 < len(widths):
                blocks.append(DownsampleBlock3d(width, widths[level + 1]))
        self.blocks = nn.ModuleList(blocks)
        self.middle_block = nn.Sequential(*(ResBlock3d(widths[-1]) for _ in range(config.num_res_blocks_middle_encoder)))
        self.out_layer = output_head(widths[-1], 2 * config.embed_dim)

    def forward(self, x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        h = self.input_layer(_to_layout(x, self.input_layer.weight.dtype, channels_last))
        for block in self.blocks:
            h = block(h)
        return self.out_layer(self.middle_block(h))


class DenseDecoder(nn.Module):
    """latents [B, embed_dim, r, r, r] -> logits [B, out, 4r, 4r, 4r]."""

    def __init__(self, config: DenseVAEConfig):
        super().__init__()
        widths = list(config.model_channels_decoder)
        self.input_layer = conv3x3(config.embed_dim, widths[0])
        self.middle_block = nn.Sequential(*(ResBlock3d(widths[0]) for _ in range(config.num_res_blocks_middle_decoder)))
        blocks: list[nn.Module] = []
        for level, width in enumerate(widths):
            blocks += [ResBlock3d(width) for _ in range(config.num_res_blocks_decoder)]
            if level + 1 < len(widths):
                blocks.append(UpsampleBlock3d(width, widths[level + 1]))
        self.blocks = nn.ModuleList(blocks)
        self.out_layer = output_head(widths[-1], config.out_channels)

    def forward(self, latents: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        h = self.input_layer(_to_layout(latents, self.input_layer.weight.dtype, channels_last))
        h = self.middle_block(h)
        for block in self.blocks:
            h = block(h)
        return self.out_layer(h).contiguous()


def occupied_voxels_from_logits(logits: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """Rows (0, x, y, z) int64 of the voxels of logits[0, 0] with sigmoid >= threshold, in lexicographic order."""
    occupied = torch.sigmoid(logits[0, 0]) >= threshold
    return occupied.unsqueeze(0).nonzero()


class DenseShapeVAE(nn.Module):
    """The dense stage's VAE: `decode` latents to occupancy logits, `occupied_voxels` for the sparse hand-off."""

    def __init__(self, config: DenseVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = DenseEncoder(config)
        self.decoder = DenseDecoder(config)

    def _channels_last(self, x: torch.Tensor) -> bool:
        # cuDNN runs 3-D convolutions fastest on NDHWC tensors; on CPU the default layout is kept.
        return x.is_cuda

    def encode(self, occupancy: torch.Tensor, sample_posterior: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Occupancy in {0, 1} [B, 1, R, R, R] -> scaled latents [B, embed_dim, R/4, R/4, R/4].

        The network sees occupancy*2-1. Returns the posterior mean, or a sample with logvar clamped to
        [-30, 20] when `sample_posterior`; then applies the latent scaling `(z - shift) * scale`.
        """
        moments = self.encoder(occupancy.float() * 2 - 1, channels_last=self._channels_last(occupancy))
        mean, logvar = moments.float().chunk(2, dim=1)
        latents = mean
        if sample_posterior:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            latents = mean + std * noise
        latents = (latents - self.config.latents_shift) * self.config.latents_scale
        return latents.to(moments.dtype)

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Sampler latents -> decoder input: `latents / scale + shift` (identity for the releases)."""
        return latents / self.config.latents_scale + self.config.latents_shift

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decoder input latents [B, embed_dim, r, r, r] -> occupancy logits [B, out, 4r, 4r, 4r]."""
        return self.decoder(latents, channels_last=self._channels_last(latents))

    @torch.no_grad()
    def occupied_voxels(self, latents: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
        """Indices [N, 4] int64 rows (0, x, y, z) of voxels with sigmoid(logit) >= threshold, batch element 0.

        As the official decode_mesh(return_index=True), the sigmoid is taken in the logits' dtype (fp16 in
        the pipeline), so a voxel at the threshold is decided exactly as there. Rows are in lexicographic order.
        """
        return occupied_voxels_from_logits(self.decode(latents[:1]), threshold)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decode(latents)
