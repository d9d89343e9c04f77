"""Model configurations: one dataclass per model, with the values of the v1.0 and v1.1 releases.

Field names are the official constructor argument names (the ``params`` of each node in the
official ``config.yaml``), so an official file maps onto these classes without renaming.
Arguments that do not change what a model computes (``use_checkpoint``) are accepted and dropped.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

VERSIONS = ("v1.0", "v1.1")

# Official constructor arguments that do not influence the computation.
_IGNORED_PARAMS = {"use_checkpoint", "attn_mode", "pe_mode"}


@dataclass(frozen=True)
class DenseVAEConfig:
    """Dense occupancy VAE (architecture notes 3.2): 64^3 occupancy <-> 8 x 16^3 latent."""
    embed_dim: int = 8
    in_channels: int = 1
    out_channels: int = 1
    model_channels_encoder: tuple = (32, 128, 512)
    num_res_blocks_encoder: int = 2
    num_res_blocks_middle_encoder: int = 2
    model_channels_decoder: tuple = (512, 128, 64)
    num_res_blocks_decoder: int = 4
    num_res_blocks_middle_decoder: int = 4
    latents_scale: float = 1.0
    latents_shift: float = 0.0
    use_fp16: bool = True


class _TransformerHeads:
    """Attention heads of a DiT config: ``num_heads`` when given, else width / head width."""

    @property
    def heads(self) -> int:
        return self.num_heads or self.model_channels // self.num_head_channels

    @property
    def head_dim(self) -> int:
        return self.model_channels // self.heads


@dataclass(frozen=True)
class DenseDiTConfig(_TransformerHeads):
    """Dense DiT over the 16^3 latent grid (architecture notes 3.3)."""
    resolution: int = 16
    in_channels: int = 8
    out_channels: int = 8
    model_channels: int = 1024
    cond_channels: int = 1024
    num_blocks: int = 24
    num_heads: Optional[int] = 16
    num_head_channels: int = 64
    mlp_ratio: float = 4.0
    patch_size: int = 1
    qk_rms_norm: bool = True
    qk_rms_norm_cross: bool = False
    share_mod: bool = False
    latent_shape: tuple = (8, 16, 16, 16)
    use_fp16: bool = True


@dataclass(frozen=True)
class SparseVAEConfig:
    """Sparse SDF VAE (architecture notes 3.4); resolution 64 for the 512 stage, 128 for 1024."""
    embed_dim: int = 16
    model_channels_encoder: int = 512
    num_blocks_encoder: int = 4
    num_heads_encoder: int = 8
    num_head_channels_encoder: int = 64
    model_channels_decoder: int = 512
    num_blocks_decoder: int = 4
    num_heads_decoder: int = 8
    num_head_channels_decoder: int = 64
    resolution: int = 64
    out_channels: int = 1
    chunk_size: int = 1
    window_size: int = 8
    mlp_ratio: float = 4.0
    latents_scale: float = 1.0
    latents_shift: float = 0.0
    use_fp16: bool = True


@dataclass(frozen=True)
class SparseDiTConfig(_TransformerHeads):
    """Sparse DiT with Spatial Sparse Attention (architecture notes 3.5 and 4)."""
    resolution: int = 64
    in_channels: int = 16
    out_channels: int = 16
    model_channels: int = 1024
    cond_channels: int = 1024
    num_blocks: int = 24
    num_heads: Optional[int] = 32
    num_head_channels: int = 32
    num_kv_heads: int = 2
    compression_block_size: int = 8
    selection_block_size: int = 8
    topk: int = 8
    compression_version: str = "v1"
    window_size: int = 8
    use_shift: bool = True
    factor: float = 1.0
    sparse_conditions: bool = False
    mlp_ratio: float = 4.0
    qk_rms_norm: bool = True
    qk_rms_norm_cross: bool = False
    share_mod: bool = False
    use_fp16: bool = True


@dataclass(frozen=True)
class RefinerConfig:
    """Dense UNet refiners (architecture notes 3.6 / 3.7).

    ``sign=False``: the 512 refiner (SDF + 32-d features -> refined SDF, blended patches).
    ``sign=True``: the 1024 sign refiner (SDF at 512^3 -> inside/outside sign, overwritten patches).
    ``block_out_channels`` and ``norm_num_groups`` are hard-coded in the official constructor; they
    are fields here so scaled-down refiners can be built for tests.
    """
    sign: bool = False
    in_channels: int = 1
    out_channels: int = 1
    layers_per_block: int = 2
    layers_mid_block: int = 2
    patch_size: int = 192
    patch_stride: int = 160
    volume_resolution: int = 512
    block_out_channels: tuple = (8, 32, 128, 512)
    norm_num_groups: int = 4
    feature_channels: int = 32      # width of the sparse-VAE decoder features fed to the 512 refiner
    use_fp16: bool = True


@dataclass(frozen=True)
class ImageEncoderConfig:
    """DINOv2 ViT-L/14 with 4 register tokens (architecture notes 2.1)."""
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 518
    num_register_tokens: int = 4
    mlp_ratio: float = 4.0
    layerscale: bool = True


@dataclass(frozen=True)
class FlowSchedulerConfig:
    """Rectified-flow Euler sampler settings (architecture notes 2.8)."""
    num_train_timesteps: int = 1000
    shift: float = 6.0


CONFIG_CLASSES: dict[str, type] = {
    "dense_vae": DenseVAEConfig,
    "dense_dit": DenseDiTConfig,
    "sparse_vae_512": SparseVAEConfig,
    "sparse_dit_512": SparseDiTConfig,
    "sparse_vae_1024": SparseVAEConfig,
    "sparse_dit_1024": SparseDiTConfig,
    "refiner": RefinerConfig,
    "refiner_1024": RefinerConfig,
    "image_encoder": ImageEncoderConfig,
    "dense_scheduler": FlowSchedulerConfig,
    "sparse_scheduler_512": FlowSchedulerConfig,
    "sparse_scheduler_1024": FlowSchedulerConfig,
}

MODEL_NAMES = ("dense_vae", "dense_dit", "sparse_vae_512", "sparse_dit_512", "sparse_vae_1024",
               "sparse_dit_1024", "refiner", "refiner_1024", "image_encoder")


def _release_configs(version: str) -> dict[str, Any]:
    v10 = version == "v1.0"
    dit_ssa = dict(compression_block_size=4, compression_version="v2", sparse_conditions=True) if v10 \
        else dict(compression_block_size=8, compression_version="v1", sparse_conditions=False)
    return {
        "dense_vae": DenseVAEConfig(),
        "dense_dit": DenseDiTConfig(),
        "sparse_vae_512": SparseVAEConfig(resolution=64),
        "sparse_dit_512": SparseDiTConfig(resolution=64, factor=1.0, topk=32 if v10 else 8, **dit_ssa),
        "sparse_vae_1024": SparseVAEConfig(resolution=128, chunk_size=4),
        "sparse_dit_1024": SparseDiTConfig(resolution=128, factor=0.5, topk=8, **dit_ssa),
        "refiner": RefinerConfig(sign=False, patch_size=192, patch_stride=160, volume_resolution=512),
        "refiner_1024": RefinerConfig(sign=True, patch_size=256, patch_stride=128, volume_resolution=512),
        "image_encoder": ImageEncoderConfig(),
        "dense_scheduler": FlowSchedulerConfig(shift=6.0),
        "sparse_scheduler_512": FlowSchedulerConfig(shift=6.0),
        "sparse_scheduler_1024": FlowSchedulerConfig(shift=8.0),
    }


OFFICIAL_CONFIGS: dict[str, dict[str, Any]] = {v: _release_configs(v) for v in VERSIONS}


def release_config(name: str, version: str):
    """The configuration of model ``name`` in release ``version`` ("v1.0" or "v1.1")."""
    if version not in OFFICIAL_CONFIGS:
        raise ValueError(f"unknown release {version!r}; expected one of {VERSIONS}")
    if name not in OFFICIAL_CONFIGS[version]:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(OFFICIAL_CONFIGS[version])}")
    return OFFICIAL_CONFIGS[version][name]


def config_from_params(name: str, params: dict, base=None):
    """Build the config of ``name`` from official constructor ``params``.

    Missing fields take the value of ``base`` (default: the v1.1 release config of that model);
    unknown parameters raise, so a changed file format is noticed rather than ignored.
    """
    base = base if base is not None else OFFICIAL_CONFIGS["v1.1"][name]
    names = {f.name for f in dataclasses.fields(base)}
    updates, unknown = {}, []
    for key, value in (params or {}).items():
        if key in _IGNORED_PARAMS:
            continue
        if key not in names:
            unknown.append(key)
            continue
        updates[key] = tuple(value) if isinstance(value, list) else value
    if unknown:
        raise ValueError(f"{name}: unknown parameters {sorted(unknown)} for {type(base).__name__}")
    return dataclasses.replace(base, **updates)


def config_to_params(config) -> dict:
    """The inverse of :func:`config_from_params`: plain YAML-serialisable constructor arguments."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


# Official config.yaml node name -> our model name. Both image-encoder nodes describe the same DINOv2.
_YAML_NODES = {
    "dense_vae": "dense_vae", "dense_dit": "dense_dit",
    "sparse_vae_512": "sparse_vae_512", "sparse_dit_512": "sparse_dit_512",
    "sparse_vae_1024": "sparse_vae_1024", "sparse_dit_1024": "sparse_dit_1024",
    "refiner": "refiner", "refiner_1024": "refiner_1024",
    "dense_scheduler": "dense_scheduler", "sparse_scheduler_512": "sparse_scheduler_512",
    "sparse_scheduler_1024": "sparse_scheduler_1024", "image_encoder": "image_encoder",
}
# Nodes of the official file whose params we do not model (the DINO hub name and the like).
_YAML_SKIPPED = {"dense_image_encoder", "sparse_image_encoder"}


def read_official_yaml(path: str | Path, version: Optional[str] = None) -> dict[str, Any]:
    """Read an official-format ``config.yaml`` (``{node: {target, params}}``) into our configs.

    Nodes absent from the file keep the release values of ``version`` (v1.1 when not given).
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config nodes, got {type(data).__name__}")
    configs = dict(OFFICIAL_CONFIGS[version or "v1.1"])
    for node, body in data.items():
        if node in _YAML_SKIPPED:
            continue
        if node not in _YAML_NODES:
            raise ValueError(f"{path}: unknown config node {node!r}")
        params = (body or {}).get("params", {}) if isinstance(body, dict) else {}
        name = _YAML_NODES[node]
        configs[name] = config_from_params(name, params, base=configs[name])
    return configs


def write_official_yaml(path: str | Path, configs: dict[str, Any]) -> None:
    """Write configs in the official node layout (used to build scaled-down test folders)."""
    data = {name: {"target": type(cfg).__name__, "params": config_to_params(cfg)} for name, cfg in configs.items()}
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


def detect_release(configs: dict[str, Any]) -> Optional[str]:
    """The release whose sparse-DiT settings match ``configs``, or None for a custom configuration."""
    for version in VERSIONS:
        ref = OFFICIAL_CONFIGS[version]
        if all(configs.get(n) == ref[n] for n in ("sparse_dit_512", "sparse_dit_1024")):
            return version
    return None


def differences(configs: dict[str, Any], version: str) -> list[str]:
    """Human-readable list of fields where ``configs`` differ from release ``version``."""
    out = []
    for name, ref in OFFICIAL_CONFIGS[version].items():
        cfg = configs.get(name)
        if cfg is None or cfg == ref:
            continue
        for f in dataclasses.fields(ref):
            a, b = getattr(cfg, f.name), getattr(ref, f.name)
            if a != b:
                out.append(f"{name}.{f.name}: {a!r} (release {version}: {b!r})")
    return out
