"""One way to build any model of the family: :func:`build`.

Names are the official config-node names (``dense_vae``, ``dense_dit``, ``sparse_vae_512``,
``sparse_dit_512``, ``sparse_vae_1024``, ``sparse_dit_1024``, ``refiner``, ``refiner_1024``) plus
``image_encoder`` (DINOv2 ViT-L/14 with registers).
"""
from __future__ import annotations

import importlib
from contextlib import nullcontext
from typing import Optional

import torch
from torch import nn

from engine.configs import MODEL_NAMES, release_config

# name -> (module, class). Classes take their config dataclass as the only argument.
_MODEL_CLASSES = {
    "dense_vae": ("engine.models.dense_vae", "DenseShapeVAE"),
    "dense_dit": ("engine.models.dense_dit", "DenseDiT"),
    "sparse_vae_512": ("engine.models.sparse_vae", "SparseSDFVAE"),
    "sparse_vae_1024": ("engine.models.sparse_vae", "SparseSDFVAE"),
    "sparse_dit_512": ("engine.models.sparse_dit", "SparseDiT"),
    "sparse_dit_1024": ("engine.models.sparse_dit", "SparseDiT"),
    "refiner": ("engine.models.refiners", "Refiner512"),
    "refiner_1024": ("engine.models.refiners", "SignRefiner1024"),
    "image_encoder": ("engine.models.dinov2", "DINOv2Encoder"),
}
assert set(_MODEL_CLASSES) == set(MODEL_NAMES)


def model_class(name: str) -> type:
    if name not in _MODEL_CLASSES:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(_MODEL_CLASSES)}")
    module, cls = _MODEL_CLASSES[name]
    return getattr(importlib.import_module(module), cls)


def is_compute_layer(module: nn.Module) -> bool:
    """Layers whose weights run in the low-precision compute dtype (as the official ``use_fp16``):
    linear and convolution layers. Norms, RMS gammas and positional tables stay fp32."""
    return isinstance(module, (nn.Linear, nn.Conv3d, nn.ConvTranspose3d)) or getattr(module, "casts_with_compute", False)


def cast_compute_layers(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the parameters of compute layers (see :func:`is_compute_layer`) to ``dtype`` in place."""
    for module in model.modules():
        if is_compute_layer(module):
            for p in module.parameters(recurse=False):
                p.data = p.data.to(dtype)
    return model


def build(name: str, version: str = "v1.1", device=None, dtype: Optional[torch.dtype] = None,
          config=None) -> nn.Module:
    """Build model ``name`` of release ``version`` (or of an explicit ``config``).

    ``device="meta"`` allocates nothing. ``dtype`` (fp16/bf16) casts the compute layers only, as the
    official ``use_fp16`` does; ``None`` keeps everything fp32. The model is in eval mode.
    """
    cfg = config if config is not None else release_config(name, version)
    cls = model_class(name)
    with (torch.device(device) if device is not None else nullcontext()):
        model = cls(cfg)
    if dtype is not None and dtype != torch.float32:
        cast_compute_layers(model, dtype)
    return model.eval()


def parameter_count(model: nn.Module) -> int:
    """Parameters plus persistent buffers: the number of elements a checkpoint of it holds."""
    return sum(t.numel() for t in model.state_dict().values())
