"""Scaled-down Direct3D-S2 weights in the official folder layout, for CPU tests of the whole pipeline.

``make_tiny_weights(folder, version)`` writes::

    config.yaml              official node layout ({node: {target, params}}) with tiny params,
                             plus an ``image_encoder`` node for the tiny DINOv2
    model_dense.ckpt         {"vae", "dit"}          model_sparse_512.ckpt   {"vae", "dit"}
    model_sparse_1024.ckpt   {"vae", "dit"}          model_refiner.ckpt      {"refiner"}
    model_refiner_1024.ckpt  {"refiner"}             dinov2_vitl14_reg4_pretrain.pth (original layout)

Grids (release values in brackets): dense latent 1^3 [16^3] -> occupancy 4^3 [64^3]; sparse 512 stage
on 4^3 tokens -> SDF 32^3 [512^3]; sparse 1024 stage on 8^3 tokens -> SDF 64^3 [1024^3]; refiner and
sign-refiner patches 16 every 16 [192/160 and 256/128]. Widths are small except the 512 sparse VAE
decoder, whose width 512 is pinned by the 32 feature channels the 512 refiner reads (width / 16).
Two deliberate departures: the 1024 VAE decodes unchunked (chunk_size 1; with the 4-voxel halo every
chunk of an 8^3 grid would be the whole grid), and v1.0 compresses 2^3 blocks (its group norm needs
more than one compressed block per image, and the 4^3 grid holds a single 4^3 block).

The weights are random (seeded), then adjusted deterministically so a run is fast and yields a
bounded, non-empty mesh: zero-initialised parameters (adaLN, output layers) get small random values;
the dense VAE's output bias is set so ~30 % of the occupancy grid is occupied; the 1024 VAE's SDF head,
the 512 refiner's output (its last adaptive block made a plain average) and the sign refiner's logits
are shifted so ~15 % of a synthetic input lies inside the iso-level.
Use: ``from helpers.tiny_weights import make_tiny_weights`` (``tests/`` is on ``sys.path`` under pytest).
"""
from __future__ import annotations

import dataclasses
import math
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
DENSE_LATENT = 1       # dense latent grid (release 16) -> occupancy and 512-stage tokens on a 4^3 grid
TOKENS_512 = 4 * DENSE_LATENT
FINE_512 = 8 * TOKENS_512      # 512-stage SDF grid (release 512)
TOKENS_1024 = 8                # 1024-stage token grid (release 128) -> SDF 64^3
PATCH = 16                     # refiner patches: 16 every 16 (release 192/160 and 256/128)
REFINER_INSIDE = 0.15
SIGN_INSIDE = 0.15
SDF_INSIDE = 0.15


def tiny_configs(version: str = "v1.1") -> dict:
    """The tiny configuration of every model, derived from release ``version``."""
    release = C.OFFICIAL_CONFIGS[version]
    replace = dataclasses.replace
    # the 512 VAE decoder must emit the 32 feature channels the 512 refiner reads (width / 16)
    sparse_vae_512 = dict(model_channels_encoder=64, num_blocks_encoder=0, num_heads_encoder=2,
                          num_head_channels_encoder=32, model_channels_decoder=512, num_blocks_decoder=1,
                          num_heads_decoder=8, num_head_channels_decoder=64)
    sparse_vae_1024 = dict(model_channels_encoder=64, num_blocks_encoder=0, num_heads_encoder=2,
                           num_head_channels_encoder=32, model_channels_decoder=64, num_blocks_decoder=1,
                           num_heads_decoder=2, num_head_channels_decoder=32,
                           chunk_size=1)  # halo 4 makes every chunk of a tiny grid the whole grid
    sparse_dit = dict(model_channels=CONTEXT_CHANNELS, cond_channels=CONTEXT_CHANNELS, num_blocks=2, num_heads=4,
                      num_head_channels=16, num_kv_heads=2)
    if release["sparse_dit_512"].compression_version == "v2":
        # v1.0 compression group-normalises the pooled blocks, which needs more than one block per
        # image: 2^3 compression blocks on the tiny 4^3 grid (release 4^3 on 64^3)
        sparse_dit["compression_block_size"] = 2
    refiner = dict(block_out_channels=(4, 8, 8, 8), norm_num_groups=4, layers_per_block=1, layers_mid_block=1,
                   patch_size=PATCH, patch_stride=PATCH, volume_resolution=FINE_512)
    return {
        "dense_vae": replace(release["dense_vae"], model_channels_encoder=(8, 8, 16), num_res_blocks_encoder=1,
                             num_res_blocks_middle_encoder=1, model_channels_decoder=(16, 8, 8),
                             num_res_blocks_decoder=1, num_res_blocks_middle_decoder=1),
        "dense_dit": replace(release["dense_dit"], resolution=DENSE_LATENT, model_channels=64,
                             cond_channels=CONTEXT_CHANNELS, num_blocks=1, num_heads=2, num_head_channels=32,
                             latent_shape=(8, DENSE_LATENT, DENSE_LATENT, DENSE_LATENT)),
        "sparse_vae_512": replace(release["sparse_vae_512"], resolution=TOKENS_512, **sparse_vae_512),
        "sparse_dit_512": replace(release["sparse_dit_512"], resolution=TOKENS_512, **sparse_dit),
        "sparse_vae_1024": replace(release["sparse_vae_1024"], resolution=TOKENS_1024, **sparse_vae_1024),
        "sparse_dit_1024": replace(release["sparse_dit_1024"], resolution=TOKENS_1024, **sparse_dit),
        "refiner": replace(release["refiner"], **refiner),
        "refiner_1024": replace(release["refiner_1024"], **refiner),  # sign grid at half of 8*TOKENS_1024
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


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _calibrate_dense_occupancy(dense_vae, generator: torch.Generator, latent_shape) -> None:
    """Shift the dense decoder's output bias so ~DENSE_OCCUPANCY of the voxels pass the threshold."""
    with torch.no_grad():
        logits = dense_vae.decode(torch.randn((8, *latent_shape), generator=generator)).flatten()
        dense_vae.decoder.out_layer[-1].bias += _logit(DENSE_THRESHOLD) - torch.quantile(logits, 1 - DENSE_OCCUPANCY)


def _ball_patch(size: int, generator: torch.Generator, channels: int):
    """A synthetic refiner input: SDF 1.0 outside a centred ball, decoded-like values and features inside."""
    axis = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    radius = torch.sqrt(axis.view(-1, 1, 1) ** 2 + axis.view(1, -1, 1) ** 2 + axis.view(1, 1, -1) ** 2)
    inside = radius < size / 3
    sdf = torch.where(inside, torch.tanh((radius - size / 4) / 3), torch.ones(()))[None, None]
    feats = torch.randn((1, channels, size, size, size), generator=generator) * inside
    return sdf, feats


def _calibrate_refiner_512(refiner, generator: torch.Generator) -> None:
    """Make the last adaptive block a plain average (positive uniform taps) and shift conv_out's bias so
    that about REFINER_INSIDE of a synthetic patch is below the 0.4 iso-level: a bounded, non-empty surface."""
    with torch.no_grad():
        net = refiner.adaptive_conv3
        net[0].weight.zero_()
        net[0].bias.fill_(1.0)
        net[2].weight.fill_(1.0)
        sdf, feats = _ball_patch(PATCH, generator, 32)
        intermediates: dict = {}
        refiner.refine_patch(sdf, feats, intermediates)
        before = intermediates["adaptive3"].flatten()
        refiner.conv_out.bias += math.atanh(0.4) - torch.quantile(before, REFINER_INSIDE)


def _calibrate_sign_refiner(refiner, generator: torch.Generator) -> None:
    """Shift the sign logits so about SIGN_INSIDE of a synthetic patch is inside (-1)."""
    with torch.no_grad():
        sdf, _ = _ball_patch(PATCH, generator, 1)
        logits = refiner.sign_logits_patch(sdf).flatten()
        refiner.conv_out.bias -= torch.quantile(logits, SIGN_INSIDE)


def _calibrate_sparse_sdf(vae, generator: torch.Generator, resolution: int) -> None:
    """Shift the SDF head so about SDF_INSIDE of the decoded voxels are below the 0.2 iso-level."""
    from engine.sparse import SparseVoxels
    with torch.no_grad():
        xyz = torch.nonzero(torch.rand((resolution,) * 3, generator=generator) < 0.3)
        coords = torch.cat([torch.zeros_like(xyz[:, :1]), xyz], dim=1).int()
        latents = torch.randn((coords.shape[0], vae.config.embed_dim), generator=generator)
        sdf = vae.decode(SparseVoxels(latents, coords), chunked=False).feats.flatten()
        pre_tanh = torch.atanh(sdf.clamp(-0.999999, 0.999999))
        vae.decoder.out_layer.bias += math.atanh(0.2) - torch.quantile(pre_tanh, SDF_INSIDE)


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
    _calibrate_sparse_sdf(models["sparse_vae_1024"], generator, TOKENS_1024)
    _calibrate_refiner_512(models["refiner"], generator)
    _calibrate_sign_refiner(models["refiner_1024"], generator)

    for filename, entries in FILES.items():
        torch.save({key: _state(models[name]) for key, name in entries.items()}, folder / filename)
    torch.save(_state(models["image_encoder"]), folder / DINOV2_FILE)
    (folder / "config.yaml").write_text(yaml.safe_dump(_yaml_document(configs), sort_keys=False))
    return folder


_CACHE: dict = {}


def cached_tiny_weights(version: str = "v1.1") -> Path:
    """A tiny weights folder made once per test process (read-only by convention: copy it to modify)."""
    import tempfile
    if version not in _CACHE:
        _CACHE[version] = make_tiny_weights(Path(tempfile.mkdtemp(prefix=f"tiny-d3ds2-{version}-")), version)
    return _CACHE[version]
