"""DINOv2 ViT-L/14 with register tokens: the image encoder of Direct3D-S2 (architecture notes section 2.1).

The module keeps the parameter names of the original `dinov2_vitl14_reg4_pretrain.pth` state dict, so that
file loads with `load_state_dict(strict=True)`. `load_dinov2_state_dict` also accepts the Hugging Face
`Dinov2WithRegistersModel` layout (hub files and the renamed in-memory names of newer transformers
releases) and converts it on the fly.

`forward` returns what Direct3D-S2 conditions on: the tokens after the last block (DINO's `x_prenorm`,
before its own final `norm`), followed by a LayerNorm without affine parameters (eps 1e-5).
Token order: [cls, registers..., patches in row-major order].
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from engine.configs import ImageEncoderConfig
from engine.models.blocks import LayerNorm32

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# eps of DINO's own LayerNorms (norm1/norm2/norm); the conditioning LayerNorm uses torch's default 1e-5.
DINO_NORM_EPS = 1e-6
CONDITION_NORM_EPS = 1e-5


class PatchEmbed(nn.Module):
    """Non-overlapping patch x patch convolution; keys `proj.weight` / `proj.bias`."""

    def __init__(self, patch_size: int, in_channels: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.proj(pixels.to(self.proj.weight.dtype))
        return patches.flatten(2).transpose(1, 2)  # [B, rows*cols, C], row-major


class ViTSelfAttention(nn.Module):
    """Fused qkv projection + softmax attention (scale 1/sqrt(head_dim)) + output projection."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=True)
        self.proj = nn.Linear(embed_dim, embed_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, channels = x.shape
        head_dim = channels // self.num_heads
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [B, H, L, D]
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, channels))


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.to(x.dtype)


class ViTMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as nn.GELU()


class ViTBlock(nn.Module):
    """Pre-norm transformer block with LayerScale on both residual branches."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, layerscale: bool = True):
        super().__init__()
        self.norm1 = LayerNorm32(dim, eps=DINO_NORM_EPS)
        self.attn = ViTSelfAttention(dim, num_heads)
        self.ls1 = LayerScale(dim) if layerscale else nn.Identity()
        self.norm2 = LayerNorm32(dim, eps=DINO_NORM_EPS)
        self.mlp = ViTMlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim) if layerscale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DINOv2Encoder(nn.Module):
    """DINOv2 ViT with registers, returning layer-normalised pre-norm tokens [B, 1 + R + N, C]."""

    def __init__(self, config: ImageEncoderConfig):
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.patch_size = config.patch_size
        self.image_size = config.image_size
        self.num_register_tokens = config.num_register_tokens
        grid = config.image_size // config.patch_size

        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, config.num_register_tokens, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))  # cls + grid x grid patches
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # only used in DINO training; kept for strict loads
        self.patch_embed = PatchEmbed(config.patch_size, 3, dim)
        self.blocks = nn.ModuleList(
            ViTBlock(dim, config.num_heads, config.mlp_ratio, config.layerscale) for _ in range(config.depth)
        )
        self.norm = LayerNorm32(dim, eps=DINO_NORM_EPS)  # DINO's final norm: loaded, not used by Direct3D-S2

        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def compute_dtype(self) -> torch.dtype:
        """dtype of the token stream: that of the linear layers (fp32 unless `build` cast them)."""
        return self.blocks[0].attn.qkv.weight.dtype if len(self.blocks) else self.pos_embed.dtype

    # ----------------------------------------------------------------------------------------- input
    def resize_and_normalize(self, image: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] -> ImageNet-normalised pixels at image_size x image_size.

        Matches torchvision's Resize(image_size, bilinear, antialias) (shorter side to image_size) followed
        by CenterCrop(image_size); both are no-ops for an image_size^2 input, the pipeline's case.
        """
        image = image[:, :3]
        height, width = image.shape[-2:]
        size = self.image_size
        if (height, width) != (size, size):
            if min(height, width) != size:
                short, long = min(height, width), max(height, width)
                new_long = int(size * long / short)
                new_hw = (size, new_long) if height <= width else (new_long, size)
                image = F.interpolate(image, size=new_hw, mode="bilinear", align_corners=False, antialias=True)
                height, width = new_hw
            top = int(round((height - size) / 2.0))
            left = int(round((width - size) / 2.0))
            image = image[..., top:top + size, left:left + size]
        mean = self.pixel_mean.to(image.dtype)
        std = self.pixel_std.to(image.dtype)
        return (image - mean) / std

    def patch_position_embedding(self, rows: int, cols: int) -> torch.Tensor:
        """pos_embed for a rows x cols patch grid: bicubic (antialiased, fp32) resampling when it differs."""
        stored_grid = int(math.isqrt(self.pos_embed.shape[1] - 1))
        if rows == stored_grid and cols == stored_grid:
            return self.pos_embed
        cls_pos = self.pos_embed[:, :1]
        grid_pos = self.pos_embed[:, 1:].reshape(1, stored_grid, stored_grid, -1).permute(0, 3, 1, 2)
        grid_pos = F.interpolate(
            grid_pos.float(), size=(rows, cols), mode="bicubic", align_corners=False, antialias=True
        ).to(self.pos_embed.dtype)
        grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
        return torch.cat([cls_pos, grid_pos], dim=1)

    # --------------------------------------------------------------------------------------- forward
    def forward_prenorm(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [B, 3, H, W] -> output of the last block (`x_prenorm`) [B, 1 + R + N, C]."""
        batch = pixels.shape[0]
        rows, cols = pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size
        patches = self.patch_embed(pixels).to(self.compute_dtype)
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1).to(patches.dtype), patches], dim=1)
        tokens = tokens + self.patch_position_embedding(rows, cols).to(tokens.dtype)
        # registers carry no position embedding and sit between cls and the patches
        registers = self.register_tokens.expand(batch, -1, -1).to(tokens.dtype)
        tokens = torch.cat([tokens[:, :1], registers, tokens[:, 1:]], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        return tokens

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """RGB image [B, 3(+), H, W] in [0, 1] -> conditioning tokens [B, 1 + R + N, C]."""
        pixels = self.resize_and_normalize(image.float())
        prenorm = self.forward_prenorm(pixels)
        normed = F.layer_norm(prenorm.float(), prenorm.shape[-1:], eps=CONDITION_NORM_EPS)
        return normed.to(prenorm.dtype)


# ------------------------------------------------------------------------------------ state-dict layouts
# Hugging Face Dinov2WithRegistersModel names -> original DINOv2 names (per-block suffixes).
_HF_BLOCK_RENAMES = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",  # transformers >= 5 in-memory name
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_HF_TOP_RENAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
# separate q/k/v projections in the HF layout (hub files, then transformers >= 5 names)
_HF_QKV_NAMES = (
    ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
    ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
)
_HF_PREFIXES = ("dinov2_with_registers.", "model.", "backbone.")
_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")


def is_hf_dinov2_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """The HF layout nests the tokens under `embeddings.`; the original has a top-level `cls_token`."""
    return any(key.endswith("embeddings.cls_token") for key in state_dict)


def hf_to_original_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face Dinov2WithRegistersModel keys -> original DINOv2 keys (q/k/v fused into qkv)."""
    stripped = {}
    for key, value in state_dict.items():
        for prefix in _HF_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        stripped[key] = value

    converted: dict[str, torch.Tensor] = {}
    pending_qkv: dict[tuple[int, str, int], torch.Tensor] = {}  # (layer, weight|bias, q/k/v index)
    unknown = []
    for key, value in stripped.items():
        if key in _HF_TOP_RENAMES:
            converted[_HF_TOP_RENAMES[key]] = value
            continue
        match = _HF_LAYER.match(key)
        if match is None:
            unknown.append(key)
            continue
        layer, rest = int(match.group(1)), match.group(2)
        module, _, param = rest.rpartition(".")
        qkv_index = next((names.index(module) for names in _HF_QKV_NAMES if module in names), None)
        if qkv_index is not None:
            pending_qkv[(layer, param, qkv_index)] = value
        elif module in _HF_BLOCK_RENAMES:
            converted[f"blocks.{layer}.{_HF_BLOCK_RENAMES[module]}.{param}"] = value
        elif rest in _HF_BLOCK_RENAMES:  # layer-scale parameters have no separate module part
            converted[f"blocks.{layer}.{_HF_BLOCK_RENAMES[rest]}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"unexpected keys in the Hugging Face DINOv2 state dict: {unknown[:8]}")

    for layer, param in sorted({(layer, param) for layer, param, _ in pending_qkv}):
        parts = [pending_qkv.get((layer, param, index)) for index in range(3)]
        if any(part is None for part in parts):
            raise KeyError(f"encoder.layer.{layer}: incomplete query/key/value {param}")
        converted[f"blocks.{layer}.attn.qkv.{param}"] = torch.cat(parts, dim=0)
    return converted


def original_to_hf_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `hf_to_original_state_dict`, producing the hub-file names (query/key/value, output.dense)."""
    top = {original: hf for hf, original in _HF_TOP_RENAMES.items()}
    block = {
        "norm1": "norm1",
        "norm2": "norm2",
        "attn.proj": "attention.output.dense",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in top:
            converted[top[key]] = value
            continue
        match = re.match(r"^blocks\.(\d+)\.(.+)$", key)
        if match is None:
            raise KeyError(f"unexpected key in the original DINOv2 state dict: {key}")
        layer, rest = match.group(1), match.group(2)
        prefix = f"encoder.layer.{layer}."
        module, _, param = rest.rpartition(".")
        if module == "attn.qkv":
            for name, part in zip(_HF_QKV_NAMES[0], value.chunk(3, dim=0)):
                converted[f"{prefix}{name}.{param}"] = part
        elif rest in ("ls1.gamma", "ls2.gamma"):
            converted[f"{prefix}layer_scale{rest[2]}.lambda1"] = value
        elif module in block:
            converted[f"{prefix}{block[module]}.{param}"] = value
        else:
            raise KeyError(f"unexpected key in the original DINOv2 state dict: {key}")
    return converted


def load_dinov2_state_dict(model: DINOv2Encoder, state_dict: Mapping[str, torch.Tensor]):
    """Strictly load either the original DINOv2 layout or the Hugging Face layout (detected from the keys).

    The one tolerated absence is `mask_token` (used only by DINO's masked-image training, never at
    inference): a file without it keeps the model's current value. Every other key must be present.
    """
    state_dict = hf_to_original_state_dict(state_dict) if is_hf_dinov2_layout(state_dict) else dict(state_dict)
    state_dict.setdefault("mask_token", model.mask_token.detach())
    return model.load_state_dict(state_dict, strict=True)
