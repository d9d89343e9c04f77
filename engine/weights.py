"""Weights: find or download the official Direct3D-S2 checkpoints (and DINOv2, BiRefNet), check them,
and load them strictly into our models.

Folder layout (the official Hugging Face subfolders ``direct3d-s2-v-1-0`` / ``direct3d-s2-v-1-1`` of
``wushuang98/Direct3D-S2``)::

    model_dense.ckpt         {"vae": dense VAE, "dit": dense DiT}
    model_sparse_512.ckpt    {"vae": sparse VAE (res 64), "dit": sparse DiT 512}
    model_sparse_1024.ckpt   {"vae": sparse VAE (res 128), "dit": sparse DiT 1024}
    model_refiner.ckpt       {"refiner": 512 refiner}
    model_refiner_1024.ckpt  {"refiner": 1024 sign refiner}
    config.yaml              optional, official format (read through engine.configs)

The DINOv2 image encoder is found, in this order, as ``dinov2_vitl14_reg4_pretrain.pth`` (original
layout) or ``dinov2/model.safetensors`` (Hugging Face layout) inside that folder, else as
``model.safetensors`` of ``facebook/dinov2-with-registers-large`` in the Hugging Face cache.

Every checkpoint is read with ``torch.load(..., weights_only=True, mmap=True)`` (tensors and plain
containers only; nothing else is unpickled) or with safetensors.

Offline mode (``offline=True`` or the environment variable ``HF_HUB_OFFLINE=1``) never touches the
network: files are looked up in the local folder or the cache only, and a missing one is named.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from engine import configs as configs_module

REPO_ID = "wushuang98/Direct3D-S2"
SUBFOLDERS = {"v1.0": "direct3d-s2-v-1-0", "v1.1": "direct3d-s2-v-1-1"}
DEFAULT_VERSION = "v1.1"
DINOV2_REPO_ID = "facebook/dinov2-with-registers-large"
DINOV2_HF_FILE = "model.safetensors"
DINOV2_ORIGINAL_FILE = "dinov2_vitl14_reg4_pretrain.pth"
DINOV2_LOCAL_HF_FILE = "dinov2/model.safetensors"
BIREFNET_REPO_ID = "ZhengPeng7/BiRefNet"
CONFIG_FILE = "config.yaml"

# checkpoint file -> top-level keys it must hold
CHECKPOINT_KEYS = {
    "model_dense.ckpt": ("vae", "dit"),
    "model_sparse_512.ckpt": ("vae", "dit"),
    "model_sparse_1024.ckpt": ("vae", "dit"),
    "model_refiner.ckpt": ("refiner",),
    "model_refiner_1024.ckpt": ("refiner",),
}
CHECKPOINT_FILES = tuple(CHECKPOINT_KEYS)
# model name -> (file, top-level key)
MODEL_SOURCES = {
    "dense_vae": ("model_dense.ckpt", "vae"),
    "dense_dit": ("model_dense.ckpt", "dit"),
    "sparse_vae_512": ("model_sparse_512.ckpt", "vae"),
    "sparse_dit_512": ("model_sparse_512.ckpt", "dit"),
    "sparse_vae_1024": ("model_sparse_1024.ckpt", "vae"),
    "sparse_dit_1024": ("model_sparse_1024.ckpt", "dit"),
    "refiner": ("model_refiner.ckpt", "refiner"),
    "refiner_1024": ("model_refiner_1024.ckpt", "refiner"),
}
MODEL_OF_SOURCE = {source: name for name, source in MODEL_SOURCES.items()}
ALL_MODELS = tuple(MODEL_SOURCES) + ("image_encoder",)
# Which checkpoint files each output resolution needs.
FILES_FOR_RESOLUTION = {
    512: ("model_dense.ckpt", "model_sparse_512.ckpt", "model_refiner.ckpt"),
    1024: CHECKPOINT_FILES,
}


class WeightsError(RuntimeError):
    """A weights file is missing, truncated or not what was expected; the message names it."""


def offline_requested(offline: Optional[bool] = None) -> bool:
    """``offline`` if given, else the ``HF_HUB_OFFLINE`` environment variable."""
    if offline is not None:
        return bool(offline)
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def check_version(version: Optional[str]) -> Optional[str]:
    if version is not None and version not in SUBFOLDERS:
        raise WeightsError(f"Unknown Direct3D-S2 version {version!r}; expected one of {sorted(SUBFOLDERS)}.")
    return version


# ------------------------------------------------------------------------------------------------
# Reading files
# ------------------------------------------------------------------------------------------------
def read_checkpoint(path: Union[str, Path], expected_keys: Sequence[str] = ()) -> dict:
    """``torch.load(path, map_location='cpu', weights_only=True, mmap=True)`` with clear errors.

    Checks that the file is a dict holding ``expected_keys``, each a non-empty mapping of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"Missing weights file: {path}")
    size = path.stat().st_size
    if size == 0:
        raise WeightsError(f"{path} is empty (0 bytes); delete it and download it again.")
    if not zipfile.is_zipfile(path):
        # torch.save writes zip archives; a truncated download loses the central directory at the end
        raise WeightsError(f"{path} is not a complete PyTorch checkpoint ({size} bytes; truncated or not a "
                           f"torch.save file); delete it and download it again.")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # weights_only refusals and corrupt archives
        raise WeightsError(f"{path} could not be read as a tensors-only checkpoint: {error}") from None
    if not isinstance(data, Mapping):
        raise WeightsError(f"{path} holds a {type(data).__name__}, expected a dict with keys {list(expected_keys)}.")
    missing = [key for key in expected_keys if key not in data]
    if missing:
        raise WeightsError(f"{path} lacks the top-level key(s) {missing}; it has {sorted(map(str, data))}. "
                           f"Expected {list(expected_keys)} (is this the right file?).")
    payload_bytes = 0
    for key in expected_keys:
        state = data[key]
        if not isinstance(state, Mapping) or not state:
            raise WeightsError(f"{path}: entry {key!r} is not a non-empty state dict.")
        bad = [name for name, value in state.items() if not isinstance(value, torch.Tensor)]
        if bad:
            raise WeightsError(f"{path}: entry {key!r} holds non-tensor values at {bad[:5]}.")
        payload_bytes += sum(t.numel() * t.element_size() for t in state.values())
    if payload_bytes > size:
        raise WeightsError(f"{path}: its tensors need {payload_bytes} bytes but the file has {size}; it is damaged.")
    return dict(data)


def read_image_encoder_state(path: Union[str, Path]) -> dict:
    """DINOv2 weights: safetensors (Hugging Face layout) or a torch state dict (original layout)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"Missing DINOv2 weights file: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except Exception as error:
            raise WeightsError(f"{path} is not a readable safetensors file ({error}); download it again.") from None
    if not zipfile.is_zipfile(path):
        raise WeightsError(f"{path} is not a complete PyTorch state dict (truncated?); download it again.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise WeightsError(f"{path} could not be read as a tensors-only state dict: {error}") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} is not a DINOv2 state dict (expected a mapping of tensors).")
    return dict(state)


def detect_version_from_state(sparse_dit_state: Mapping[str, torch.Tensor]) -> str:
    """v1.0 vs v1.1 from a sparse DiT state dict: v1.0 has ``cond_proj`` (sparse image conditions)
    and the "v2" compression (``...compression_key.out_layers...``); v1.1 has neither."""
    has_cond_proj = "cond_proj.weight" in sparse_dit_state
    has_v2_compression = any(".compression_key.out_layers." in key for key in sparse_dit_state)
    if has_cond_proj and has_v2_compression:
        return "v1.0"
    if not has_cond_proj and not has_v2_compression:
        return "v1.1"
    raise WeightsError("The sparse DiT weights mix v1.0 and v1.1 features (cond_proj present: "
                       f"{has_cond_proj}, v2 compression present: {has_v2_compression}).")


# ------------------------------------------------------------------------------------------------
# Locating a weights folder
# ------------------------------------------------------------------------------------------------
@dataclass
class WeightsLocation:
    """Where the files of one Direct3D-S2 release are."""
    folder: Path
    image_encoder: Optional[Path] = None
    background_removal: Optional[Path] = None
    version: Optional[str] = None  # requested or found; None = detect from the tensors

    @property
    def config_path(self) -> Optional[Path]:
        path = self.folder / CONFIG_FILE
        return path if path.is_file() else None

    def checkpoint(self, filename: str) -> Path:
        return self.folder / filename


def _local_image_encoder(folder: Path) -> Optional[Path]:
    for relative in (DINOV2_ORIGINAL_FILE, DINOV2_LOCAL_HF_FILE):
        if (folder / relative).is_file():
            return folder / relative
    return None


def _local_birefnet(folder: Path) -> Optional[Path]:
    candidate = folder / "birefnet"
    return candidate if (candidate / "config.json").is_file() else None


def _cached_file(repo_id: str, filename: str, cache_dir) -> Optional[Path]:
    """A file of the Hugging Face cache, looked up without any network access."""
    from huggingface_hub import try_to_load_from_cache
    found = try_to_load_from_cache(repo_id, filename, cache_dir=str(cache_dir) if cache_dir else None)
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def _cache_description(cache_dir) -> str:
    if cache_dir:
        return str(cache_dir)
    from huggingface_hub import constants
    return str(constants.HF_HUB_CACHE)


def missing_files(folder: Union[str, Path], files: Iterable[str] = CHECKPOINT_FILES) -> list[str]:
    folder = Path(folder)
    return [name for name in files if not (folder / name).is_file()]


def _download_progress_class():
    from tqdm.auto import tqdm
    return tqdm


def resolve_weights(weights_dir: Optional[Union[str, Path]] = None, version: Optional[str] = None, *,
                    cache_dir: Optional[Union[str, Path]] = None, offline: Optional[bool] = None,
                    download: bool = True, files: Sequence[str] = CHECKPOINT_FILES,
                    need_image_encoder: bool = True, need_background_removal: bool = False) -> WeightsLocation:
    """Find the weights, downloading what is missing unless offline (or ``download=False``).

    ``weights_dir`` given: that folder must hold the checkpoint ``files``; the image encoder is taken
    from it when present there, else from the cache. Otherwise the release ``version`` (default v1.1)
    is looked up in the Hugging Face cache (``cache_dir`` or the default hub cache) and downloaded
    there when missing.
    """
    check_version(version)
    offline = offline_requested(offline)
    allow_network = download and not offline
    why_no_network = "offline mode is on" if offline else "downloading is disabled"

    if weights_dir is not None:
        folder = Path(weights_dir).expanduser()
        if not folder.is_dir():
            raise WeightsError(f"Weights folder not found: {folder}")
        absent = missing_files(folder, files)
        if absent:
            raise WeightsError(f"{folder} is missing {', '.join(absent)} (the official Direct3D-S2 folder holds "
                               f"{', '.join(CHECKPOINT_FILES)}).")
        location = WeightsLocation(folder=folder, version=version)
    else:
        release = version or DEFAULT_VERSION
        subfolder = SUBFOLDERS[release]
        wanted = [f"{subfolder}/{name}" for name in files]
        cached = {name: _cached_file(REPO_ID, name, cache_dir) for name in wanted}
        absent = [name for name, path in cached.items() if path is None]
        if absent and not allow_network:
            raise WeightsError(f"{why_no_network} and {REPO_ID}/{absent[0]} is not in the Hugging Face cache "
                               f"({_cache_description(cache_dir)})" +
                               (f" (also missing: {', '.join(absent[1:])})" if len(absent) > 1 else "") +
                               f". Run `python -m engine weights download --version {release}` with network access "
                               f"or pass --weights DIR.")
        if absent:
            snapshot = _snapshot_download(REPO_ID, [f"{subfolder}/*"], cache_dir)
            folder = Path(snapshot) / subfolder
            still_missing = missing_files(folder, files)
            if still_missing:
                raise WeightsError(f"The download of {REPO_ID}/{subfolder} did not provide {', '.join(still_missing)}.")
        else:
            folder = Path(next(iter(cached.values()))).parent
        location = WeightsLocation(folder=folder, version=release)

    if need_image_encoder:
        location.image_encoder = _local_image_encoder(location.folder) or _cached_file(
            DINOV2_REPO_ID, DINOV2_HF_FILE, cache_dir)
        if location.image_encoder is None:
            if not allow_network:
                raise WeightsError(
                    f"{why_no_network} and the DINOv2 image encoder was not found: looked for "
                    f"{location.folder / DINOV2_ORIGINAL_FILE}, {location.folder / DINOV2_LOCAL_HF_FILE} and "
                    f"{DINOV2_REPO_ID}/{DINOV2_HF_FILE} in the Hugging Face cache ({_cache_description(cache_dir)}). "
                    f"Run `python -m engine weights download` with network access.")
            snapshot = _snapshot_download(DINOV2_REPO_ID, [DINOV2_HF_FILE, "config.json"], cache_dir)
            location.image_encoder = Path(snapshot) / DINOV2_HF_FILE
    if need_background_removal:
        location.background_removal = resolve_background_removal(location.folder, cache_dir=cache_dir,
                                                                 offline=offline, download=download)
    return location


def resolve_background_removal(folder: Optional[Path] = None, *, cache_dir=None, offline: Optional[bool] = None,
                               download: bool = True) -> Path:
    """The BiRefNet folder: ``<weights>/birefnet`` or a ``ZhengPeng7/BiRefNet`` snapshot in the cache."""
    if folder is not None and _local_birefnet(Path(folder)) is not None:
        return _local_birefnet(Path(folder))
    config = _cached_file(BIREFNET_REPO_ID, "config.json", cache_dir)
    if config is not None:
        return config.parent
    if offline_requested(offline) or not download:
        raise WeightsError(f"BiRefNet (background removal) is not in the Hugging Face cache "
                           f"({_cache_description(cache_dir)}) and downloading is off. Run "
                           f"`python -m engine weights download --background-removal` with network access.")
    return Path(_snapshot_download(BIREFNET_REPO_ID, ["*.json", "*.py", "*.safetensors"], cache_dir))


def _snapshot_download(repo_id: str, patterns: list[str], cache_dir) -> str:
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(repo_id, allow_patterns=patterns,
                                 cache_dir=str(cache_dir) if cache_dir else None,
                                 tqdm_class=_download_progress_class())
    except Exception as error:
        raise WeightsError(f"Downloading {repo_id} ({', '.join(patterns)}) failed: {error}") from None


def download_weights(version: str = DEFAULT_VERSION, *, cache_dir=None, image_encoder: bool = True,
                     background_removal: bool = False) -> WeightsLocation:
    """Download (or resume) one release into the cache and return where it is."""
    return resolve_weights(None, version, cache_dir=cache_dir, offline=False, download=True,
                           need_image_encoder=image_encoder, need_background_removal=background_removal)


# ------------------------------------------------------------------------------------------------
# Configs, checking and loading
# ------------------------------------------------------------------------------------------------
def read_folder_configs(location: WeightsLocation, detected_version: str) -> tuple[dict, Optional[str]]:
    """Configs for every model: from ``config.yaml`` when present (checked against the tensors'
    version), else the release configs of ``detected_version``. Returns (configs, release or None)."""
    path = location.config_path
    if path is None:
        return dict(configs_module.OFFICIAL_CONFIGS[detected_version]), detected_version
    try:
        configs = configs_module.read_official_yaml(path, detected_version)
    except ValueError as error:
        raise WeightsError(f"{path} is not a valid Direct3D-S2 config: {error}") from None
    release = configs_module.detect_release(configs)
    if release is not None and release != detected_version:
        raise WeightsError(f"{path} describes release {release} but the sparse DiT weights are {detected_version}.")
    sparse_dit = configs["sparse_dit_512"]
    if sparse_dit.sparse_conditions != (detected_version == "v1.0"):
        raise WeightsError(f"{path}: sparse_dit_512.sparse_conditions={sparse_dit.sparse_conditions} does not match "
                           f"the {detected_version} weights.")
    return configs, release


def compare_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Strict key/shape comparison with a readable message (before ``load_state_dict``)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                   for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (e.g. {unexpected[:3]})")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} shape mismatch(es) (e.g. {wrong_shape[:3]})")
        raise WeightsError(f"{source} does not match the model it should hold: " + "; ".join(parts) + ".")


@dataclass
class LoadedModels:
    models: dict
    version: str
    release: Optional[str]        # None for a custom (e.g. scaled-down) config.yaml
    configs: dict
    location: WeightsLocation
    seconds: float = 0.0


def _sparse_dit_state_for_detection(location: WeightsLocation, cache: dict) -> Mapping[str, torch.Tensor]:
    for filename in ("model_sparse_512.ckpt", "model_sparse_1024.ckpt"):
        if location.checkpoint(filename).is_file():
            if filename not in cache:
                cache[filename] = read_checkpoint(location.checkpoint(filename), CHECKPOINT_KEYS[filename])
            return cache[filename]["dit"]
    raise WeightsError(f"{location.folder} has neither model_sparse_512.ckpt nor model_sparse_1024.ckpt; "
                       f"the release version cannot be determined.")


def inspect_folder(location: WeightsLocation, version: Optional[str] = None, cache: Optional[dict] = None
                   ) -> tuple[str, dict, Optional[str]]:
    """(version, configs, release) of a folder: version from the tensors, checked against ``version``
    and ``config.yaml``."""
    cache = cache if cache is not None else {}
    detected = detect_version_from_state(_sparse_dit_state_for_detection(location, cache))
    for wanted in (version, location.version):
        if wanted is not None and wanted != detected:
            raise WeightsError(f"{location.folder} holds Direct3D-S2 {detected} weights, but {wanted} was requested.")
    configs, release = read_folder_configs(location, detected)
    return detected, configs, release


def load_models(location: Union[WeightsLocation, str, Path], names: Sequence[str] = ALL_MODELS,
                version: Optional[str] = None, device: Union[str, torch.device] = "cpu",
                dtype: Optional[torch.dtype] = torch.float16,
                image_encoder_dtype: Optional[torch.dtype] = None) -> LoadedModels:
    """Build the named models (via ``engine.models.build``) and load their weights with ``strict=True``.

    ``dtype`` is the compute dtype of the diffusion models (fp16/bf16, or None/fp32); the image
    encoder uses ``image_encoder_dtype`` (default fp32, as the official DINO). Models are built
    directly on ``device`` and filled from the memory-mapped checkpoint.
    """
    import time

    start = time.perf_counter()
    if not isinstance(location, WeightsLocation):
        folder = Path(location)
        location = WeightsLocation(folder=folder, image_encoder=_local_image_encoder(folder))
    unknown = [n for n in names if n not in ALL_MODELS]
    if unknown:
        raise WeightsError(f"Unknown model name(s) {unknown}; expected some of {list(ALL_MODELS)}.")
    cache: dict = {}
    detected, configs, release = inspect_folder(location, check_version(version), cache)
    # ordinary parameters even when called under torch.inference_mode (inference tensors have no
    # version counter, which caches keyed on parameter versions rely on)
    with torch.inference_mode(False):
        models = _build_and_load(location, names, detected, configs, cache, device, dtype, image_encoder_dtype)
    return LoadedModels(models=models, version=detected, release=release, configs=configs, location=location,
                        seconds=time.perf_counter() - start)


def _build_and_load(location: WeightsLocation, names, detected: str, configs: dict, cache: dict, device, dtype,
                    image_encoder_dtype) -> dict:
    from engine.models import build
    from engine.models.dinov2 import hf_to_original_state_dict, is_hf_dinov2_layout, load_dinov2_state_dict

    models = {}
    for name in names:
        if name == "image_encoder":
            if location.image_encoder is None:
                raise WeightsError(f"No DINOv2 weights were found for {location.folder} (looked for "
                                   f"{DINOV2_ORIGINAL_FILE} and {DINOV2_LOCAL_HF_FILE} there).")
            state = read_image_encoder_state(location.image_encoder)
            if is_hf_dinov2_layout(state):
                state = hf_to_original_state_dict(state)
            compare_state_dict(build("image_encoder", detected, device="meta", config=configs["image_encoder"]),
                               state, str(location.image_encoder))
            model = build("image_encoder", detected, device=device, dtype=image_encoder_dtype,
                          config=configs["image_encoder"])
            try:
                load_dinov2_state_dict(model, state)
            except (KeyError, RuntimeError) as error:
                raise WeightsError(f"{location.image_encoder} does not match the DINOv2 encoder: {error}") from None
            models[name] = model
            continue
        filename, key = MODEL_SOURCES[name]
        if filename not in cache:
            cache[filename] = read_checkpoint(location.checkpoint(filename), CHECKPOINT_KEYS[filename])
        state = cache[filename][key]
        # keys and shapes first, on the meta device (no memory), so a wrong file fails fast and clearly
        compare_state_dict(build(name, detected, device="meta", config=configs[name]), state,
                           f"{location.checkpoint(filename)} [{key!r}] ({name})")
        model = build(name, detected, device=device, dtype=dtype, config=configs[name])
        model.load_state_dict(state, strict=True)
        models[name] = model.eval()
    return models


@dataclass
class FileReport:
    path: Path
    ok: bool
    detail: str
    size_bytes: int = 0


def check_folder(location: Union[WeightsLocation, str, Path], version: Optional[str] = None) -> list[FileReport]:
    """Integrity check without building real models: every file loads tensors-only, has the expected
    top-level keys, and its keys/shapes match the models of its release (built on the meta device)."""
    from engine.models import build
    from engine.models.dinov2 import hf_to_original_state_dict, is_hf_dinov2_layout

    if not isinstance(location, WeightsLocation):
        folder = Path(location)
        location = WeightsLocation(folder=folder, image_encoder=_local_image_encoder(folder))
    reports: list[FileReport] = []
    cache: dict = {}
    try:
        detected, configs, _release = inspect_folder(location, version, cache)
    except WeightsError as error:
        return [FileReport(location.folder, False, str(error))]
    for filename, keys in CHECKPOINT_KEYS.items():
        path = location.checkpoint(filename)
        size = path.stat().st_size if path.is_file() else 0
        try:
            data = cache.get(filename) or read_checkpoint(path, keys)
            for key in keys:
                name = MODEL_OF_SOURCE[(filename, key)]
                meta_model = build(name, detected, device="meta", config=configs[name])
                compare_state_dict(meta_model, data[key], f"{path} [{key!r}]")
            count = sum(len(data[key]) for key in keys)
            reports.append(FileReport(path, True, f"{count} tensors, keys {list(keys)}, {detected}", size))
        except WeightsError as error:
            reports.append(FileReport(path, False, str(error), size))
        cache.pop(filename, None)
    if location.image_encoder is not None:
        path = location.image_encoder
        try:
            state = read_image_encoder_state(path)
            if is_hf_dinov2_layout(state):
                state = hf_to_original_state_dict(state)
            compare_state_dict(build("image_encoder", detected, device="meta", config=configs["image_encoder"]),
                               state, str(path))
            reports.append(FileReport(path, True, f"DINOv2, {len(state)} tensors", path.stat().st_size))
        except (WeightsError, KeyError) as error:
            reports.append(FileReport(path, False, str(error), path.stat().st_size if path.is_file() else 0))
    return reports
