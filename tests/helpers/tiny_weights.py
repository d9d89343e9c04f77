"""Scaled-down Direct3D-S2 weights in the official folder layout, for CPU tests of the whole pipeline.

``make_tiny_weights(folder, version)`` writes::

    config.yaml              official node layout ({node: {target, params}}) with tiny params,
                             plus an ``image_encoder`` node for the tiny DINOv2
    model_dense.ckpt         {"vae", "dit"}          model_sparse_512.ckpt   {"vae", "dit"}
    model_sparse_1024.ckpt   {"vae", "dit"}          model_refiner.ckpt      {"refiner"}
    model_refiner_1024.ckpt  {"refiner"}             dinov2_vitl14_reg4_pretrain.pth (original layout)

Grids (the release values in brackets): dense latent 2^3 [16^3] -> occupancy 8^3 [64^3]; sparse 512
stage on 8^3 tokens -> SDF 64^3 [512^3]; sparse 1024 stage on 16^3 tokens -> SDF 128^3 [1024^3];
refiner patches 24 every 20 [192 every 160], sign refiner 32 every 16 [256 every 128]. Widths are
small except the sparse VAEs, whose width 512 is pinned by the 32 feature channels the 512 refiner
reads (C/16) and by the 32-group norms of their encoder.

The weights are random (seeded) with two deterministic adjustments so a run is meaningful and fast:
zero-initialised parameters (adaLN, output layers) get small random values, and the dense VAE's
output bias is set so that about ``DENSE_OCCUPANCY`` of the 8^3 voxels are occupied for N(0,1) latents.
Use: ``from helpers.tiny_weights import make_tiny_weights`` (``tests/`` is on ``sys.path`` under pytest).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Union

import torch
import yaml

from engine import configs as C
from engine.models import build

DENSE_OCCUPANCY = 0.3
DENSE_THRESHOLD = 0.1          # the pipeline's occupancy threshold (sigmoid >= 0.1)

OFFICIAL_TARGETS = {
    "dense_vae": "direct3d_s2.models.autoencoders.dense_vae.DenseShapeVAE",
    "dense_dit": "direct3d_s2.models.transformers.dense_dit.DenseDiT",
    "sparse_vae_512": "direct3d_s2.models.autoencoders.ss_vae.SparseSDFVAE",
    "sparse_dit_512": "direct3d_s2.models.transformers.sparse_dit.SparseDiT",
    "sparse_vae_1024": "direct3d_s2.models.autoencoders.ss_vae.SparseSDFVAE",
    "sparse_dit_1024": "direct3d_s2.models.transformers.sparse_dit.SparseDiT",
    "refiner": "direct3d_s2.models.refiner.unet_refiner.Voxel_RefinerXL",
    "refiner_1024": "direct3d_s2.models.refiner.unet_refiner.Voxel_RefinerXL_sign",
    "dense_scheduler": "diffusers.schedulers.FlowMatchEulerDiscreteScheduler",
    "sparse_scheduler_512": "diffusers.schedulers.FlowMatchEulerDiscreteScheduler",
    "sparse_scheduler_1024": "diffusers.schedulers.FlowMatchEulerDiscreteScheduler",
    "image_encoder": "engine.models.dinov2.DINOv2Encoder",
}
FILES = {
    "model_dense.ckpt": {"vae": "dense_vae", "dit": "dense_dit"},
    "model_sparse_512.ckpt": {"vae": "sparse_vae_512", "dit": "sparse_dit_512"},
    "model_sparse_1024.ckpt": {"vae": "sparse_vae_1024", "dit": "sparse_dit_1024"},
    "model_refiner.ckpt": {"refiner": "refiner"},
    "model_refiner_1024.ckpt": {"refiner": "refiner_1024"},
}
DINOV2_FILE = "dinov2_vitl14_reg4_pretrain.pth"

CONTEXT_CHANNELS = 64  # tiny DINOv2 width = the DiTs' cond_channels (v1.0 sparse DiTs need = model width)


def tiny_configs(version: str = "v1.1") -> dict:
    """The tiny configuration of every model, derived from release ``version``."""
    release = C.OFFICIAL_CONFIGS[version]
    replace = dataclasses.replace
    sparse_vae = dict(model_channels_encoder=512, num_blocks_encoder=0, num_heads_encoder=8,
                      num_head_channels_encoder=64, model_channels_decoder=512, num_blocks_decoder=1,
                      num_heads_decoder=8, num_head_channels_decoder=64)
    sparse_dit = dict(model_channels=CONTEXT_CHANNELS, cond_channels=CONTEXT_CHANNELS, num_blocks=2, num_heads=4,
                      num_head_channels=16, num_kv_heads=2)
    refiner = dict(block_out_channels=(4, 8, 8, 8), norm_num_groups=4, layers_per_block=1, layers_mid_block=1)
    return {
        "dense_vae": replace(release["dense_vae"], model_channels_encoder=(8, 8, 16), num_res_blocks_encoder=1,
                             num_res_blocks_middle_encoder=1, model_channels_decoder=(16, 8, 8),
                             num_res_blocks_decoder=1, num_res_blocks_middle_decoder=1),
        "dense_dit": replace(release["dense_dit"], resolution=2, model_channels=64, cond_channels=CONTEXT_CHANNELS,
                             num_blocks=1, num_heads=2, num_head_channels=32, latent_shape=(8, 2, 2, 2)),
        "sparse_vae_512": replace(release["sparse_vae_512"], resolution=8, **sparse_vae),
        "sparse_dit_512": replace(release["sparse_dit_512"], resolution=8, **sparse_dit),
        "sparse_vae_1024": replace(release["sparse_vae_1024"], resolution=16, **sparse_vae),
        "sparse_dit_1024": replace(release["sparse_dit_1024"], resolution=16, **sparse_dit),
        "refiner": replace(release["refiner"], patch_size=24, patch_stride=20, volume_resolution=64, **refiner),
        "refiner_1024": replace(release["refiner_1024"], patch_size=32, patch_stride=16, volume_resolution=64,
                                **refiner),
        "image_encoder": replace(release["image_encoder"], embed_dim=CONTEXT_CHANNELS, depth=1, num_heads=2),
        "dense_scheduler": release["dense_scheduler"],
        "sparse_scheduler_512": release["sparse_scheduler_512"],
        "sparse_scheduler_1024": release["sparse_scheduler_1024"],
    }


def _randomise_zero_parameters(model: torch.nn.Module, generator: torch.Generator, scale: float = 0.02) -> None:
    """Give parameters that the constructor zero-initialises (adaLN, output layers) small random values."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.numel() > 1 and not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def _calibrate_dense_occupancy(dense_vae: torch.nn.Module, generator: torch.Generator, latent_shape) -> None:
    """Shift the dense decoder's output bias so ~DENSE_OCCUPANCY of the voxels pass the threshold."""
    with torch.no_grad():
        latents = torch.randn((4, *latent_shape), generator=generator)
        logits = dense_vae.decode(latents).flatten()
        threshold_logit = torch.log(torch.tensor(DENSE_THRESHOLD / (1 - DENSE_THRESHOLD)))
        current = torch.quantile(logits, 1 - DENSE_OCCUPANCY)
        output_conv = dense_vae.decoder.out_layer[-1]
        output_conv.bias += threshold_logit - current


def _state(model: torch.nn.Module) -> dict:
    # fp16 on disk halves the files; strict loading copies into whatever dtype the model has
    return {k: (v.half() if v.is_floating_point() and k != "pos_emb" else v).contiguous().clone()
            for k, v in model.state_dict().items()}


def _yaml_document(configs: dict) -> dict:
    document = {}
    for name, config in configs.items():
        document[name] = {"target": OFFICIAL_TARGETS[name], "params": C.config_to_params(config)}
    # the official file also names the DINO hub model twice; we read our tiny one from `image_encoder`
    for node in ("dense_image_encoder", "sparse_image_encoder"):
        document[node] = {"target": "direct3d_s2.models.conditioner.DinoEncoder",
                          "params": {"model": "facebookresearch/dinov2", "version": "dinov2_vitl14_reg", "size": 518}}
    return document


def make_tiny_weights(folder: Union[str, Path], version: str = "v1.1", seed: int = 0) -> Path:
    """Write a tiny official-layout weights folder for ``version`` ("v1.0" or "v1.1") and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    configs = tiny_configs(version)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        models = {name: build(name, version, device="cpu", config=configs[name])
                  for name in C.MODEL_NAMES}
    for name, model in models.items():
        _randomise_zero_parameters(model, generator)
    _calibrate_dense_occupancy(models["dense_vae"], generator, configs["dense_dit"].latent_shape)

    for filename, entries in FILES.items():
        torch.save({key: _state(models[name]) for key, name in entries.items()}, folder / filename)
    torch.save(_state(models["image_encoder"]), folder / DINOV2_FILE)
    (folder / "config.yaml").write_text(yaml.safe_dump(_yaml_document(configs), sort_keys=False))
    return folder
