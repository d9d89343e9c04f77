"""Direct3D-S2 image-to-mesh pipeline (architecture notes section 2), the library entry point.

    pipeline = Direct3DS2Pipeline.from_pretrained("/path/to/direct3d-s2-v-1-1", device="cuda")
    result = pipeline.generate("chair.png", GenerationSettings(resolution=1024, seed=7))
    result.mesh.export("chair.glb")

Stages (names used in :class:`Progress` and in ``stats["seconds"]``):

``preprocess``   image checks, background removal when needed, crop/pad/resize to 518 (engine.image)
``condition``    DINOv2 tokens, computed once and shared by every DiT (the official code runs two
                 identical encoders)
``dense``        dense DiT on the 16^3 latent (50 steps, CFG 7, shift 6), dense VAE decode,
                 occupied voxels at sigmoid >= 0.1, sorted into 8^3 selection blocks
``sparse_512``   sparse DiT 512 (30 steps, shift 6) on those tokens, sparse VAE decode with features
``refine_512``   512 refiner patch by patch, marching cubes at 0.4 (always, as officially)
``sparse_1024``  (1024 only) normalise the 512 mesh to 0.95, narrow-band tokens at 128^3, sparse
                 DiT 1024 (15 steps, shift 8), chunked sparse VAE decode
``refine_1024``  (1024 only) ``remove_interior``: sign refiner + sparse marching cubes at 0.2 over the
                 decoded band and the cells where the refined sign changes; otherwise sparse marching
                 cubes over the band with background 1.0. No dense 1024^3 volume is built.
``postprocess``  vertices to the unit frame (``v / res * 2 - 1``), optional decimation, component
                 filtering and smoothing (engine.mesh.postprocess)

Memory modes: ``"resident"`` keeps every model on the device; ``"sequential"`` keeps them on the CPU
and moves each stage's models to the device only while that stage runs.
"""
from __future__ import annotations

import contextlib
import gc
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from PIL import Image

from engine.image import ImageError, ImageSource, has_useful_alpha, load_image, preprocess_image
from engine.sampling import GenerationCancelled, flow_match_schedule, initial_noise, make_generator, sample
from engine.weights import (LoadedModels, WeightsError, load_models, resolve_background_removal,
                            resolve_weights)

__all__ = ["Direct3DS2Pipeline", "GenerationSettings", "GenerationResult", "Progress", "GenerationCancelled",
           "GenerationError", "ImageError", "WeightsError", "MEMORY_MODES", "STAGES"]

MEMORY_MODES = ("resident", "sequential")
STAGES = ("preprocess", "condition", "dense", "sparse_512", "refine_512", "sparse_1024", "refine_1024", "postprocess")
DENSE_OCCUPANCY_THRESHOLD = 0.1
MC_LEVEL_512 = 0.4        # 2 x the pipeline's mc_threshold 0.2 (the 512 stage always uses the refiner)
MC_LEVEL_1024 = 0.2
RENORMALIZE_SCALE = 0.95  # normalize_mesh before the 512 -> 1024 hand-off
BAND_THRESHOLD = 4.0      # narrow-band half-width in fine voxels
LATENT_FACTOR = 8         # fine voxels per latent voxel along an axis
MAX_STEPS = 1000
MAX_GUIDANCE = 100.0


class GenerationError(RuntimeError):
    """A stage produced nothing usable (for example no occupied voxel); the message names the stage."""


@dataclass
class GenerationSettings:
    resolution: int = 1024
    seed: int = 0
    dense_steps: int = 50
    dense_guidance: float = 7.0
    sparse_512_steps: int = 30
    sparse_512_guidance: float = 7.0
    sparse_1024_steps: int = 15
    sparse_1024_guidance: float = 7.0
    remove_interior: bool = True
    target_faces: Optional[int] = None
    keep_largest_components: Optional[int] = None
    min_component_faces: int = 0
    smooth_iterations: int = 0

    def validate(self) -> "GenerationSettings":
        """Raise ValueError with a clear message for any out-of-range setting; returns self."""
        def integer(name, low, high=None, optional=False):
            value = getattr(self, name)
            if value is None and optional:
                return
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            if value < low or (high is not None and value > high):
                raise ValueError(f"{name} must be in [{low}, {high if high is not None else 'inf'}], got {value}")

        if self.resolution not in (512, 1024) or isinstance(self.resolution, bool):
            raise ValueError(f"resolution must be 512 or 1024, got {self.resolution!r}")
        integer("seed", 0, 2 ** 63 - 1)
        for stage in ("dense", "sparse_512", "sparse_1024"):
            integer(f"{stage}_steps", 1, MAX_STEPS)
            guidance = getattr(self, f"{stage}_guidance")
            if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) \
                    or not 0 <= guidance <= MAX_GUIDANCE:
                raise ValueError(f"{stage}_guidance must be a number in [0, {MAX_GUIDANCE}], got {guidance!r}")
        if not isinstance(self.remove_interior, bool):
            raise ValueError(f"remove_interior must be true or false, got {self.remove_interior!r}")
        integer("target_faces", 4, None, optional=True)
        integer("keep_largest_components", 1, None, optional=True)
        integer("min_component_faces", 0)
        integer("smooth_iterations", 0, 1000)
        return self


@dataclass
class Progress:
    stage: str
    step: int
    total: int
    elapsed_s: float          # seconds since this stage started
    eta_s: Optional[float]    # estimated seconds left in this stage (None before the first step)


@dataclass
class GenerationResult:
    mesh: Any                 # trimesh.Trimesh
    stats: dict = field(default_factory=dict)


class _StageClock:
    """Progress reporting, cancel checks and per-stage timing for one generation."""

    def __init__(self, device: torch.device, on_progress, should_cancel):
        self.device = device
        self.on_progress = on_progress
        self.should_cancel = should_cancel
        self.seconds: dict[str, float] = {}
        self.stage: Optional[str] = None
        self.stage_start = 0.0
        self.last = (0, 1)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def check_cancel(self):
        if self.should_cancel is not None and self.should_cancel():
            raise GenerationCancelled(f"cancelled during {self.stage}")

    @contextlib.contextmanager
    def stage_scope(self, name: str):
        self.check_cancel()
        self.stage, self.stage_start = name, time.perf_counter()
        self.report(0, 1)
        try:
            yield
            step, total = self.last
            if step < total:  # stages without steps of their own end at 1/1
                self.report(total, total)
        finally:
            self._sync()
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - self.stage_start, 4)

    def report(self, step: int, total: int):
        self.last = (step, total)
        if self.on_progress is None:
            return
        elapsed = time.perf_counter() - self.stage_start
        eta = elapsed / step * (total - step) if step > 0 else None
        self.on_progress(Progress(stage=self.stage, step=int(step), total=int(total), elapsed_s=elapsed, eta_s=eta))

    def step_callback(self, done: int, total: int):
        """For loops outside the sampler (refiner patches): report, then honour a cancel request."""
        self.report(done, total)
        self.check_cancel()


def check_grid_consistency(configs: dict) -> None:
    """The stages hand grids to each other; a config whose grids do not chain is refused up front.

    dense latent r -> occupancy 4r = 512-stage token grid R; its SDF grid 8R = the 512 refiner volume;
    1024-stage SDF grid 8R' = twice the sign refiner's volume."""
    dense = configs["dense_dit"].resolution
    tokens_512 = configs["sparse_dit_512"].resolution
    tokens_1024 = configs["sparse_dit_1024"].resolution
    problems = []
    if 4 * dense != tokens_512:
        problems.append(f"dense occupancy grid {4 * dense} != sparse_dit_512.resolution {tokens_512}")
    if configs["refiner"].volume_resolution != LATENT_FACTOR * tokens_512:
        problems.append(f"refiner.volume_resolution {configs['refiner'].volume_resolution} != "
                        f"{LATENT_FACTOR} x sparse_dit_512.resolution ({LATENT_FACTOR * tokens_512})")
    if 2 * configs["refiner_1024"].volume_resolution != LATENT_FACTOR * tokens_1024:
        problems.append(f"2 x refiner_1024.volume_resolution ({2 * configs['refiner_1024'].volume_resolution}) != "
                        f"{LATENT_FACTOR} x sparse_dit_1024.resolution ({LATENT_FACTOR * tokens_1024})")
    if problems:
        raise ValueError("inconsistent model configuration: " + "; ".join(problems))


def move_models(models, device: torch.device) -> None:
    """``model.to(device)`` outside inference mode: moved inside it, parameters would become inference
    tensors (no version counter), which breaks caches keyed on parameter versions in later calls."""
    with torch.inference_mode(False), torch.no_grad():
        for model in models:
            model.to(device)


class Direct3DS2Pipeline:
    """Image -> mesh with the Direct3D-S2 models (see the module docstring for the stages)."""

    def __init__(self, loaded: LoadedModels, device: Union[str, torch.device] = "cuda",
                 dtype: torch.dtype = torch.float16, memory_mode: str = "resident",
                 background_removal_dir: Optional[Union[str, Path]] = None, offline: Optional[bool] = None):
        if memory_mode not in MEMORY_MODES:
            raise ValueError(f"memory_mode must be one of {MEMORY_MODES}, got {memory_mode!r}")
        self.loaded = loaded
        self.models = dict(loaded.models)
        self.configs = loaded.configs
        self.version = loaded.version
        self.device = torch.device(device)
        self.dtype = dtype
        self.memory_mode = memory_mode
        self.background_removal_dir = Path(background_removal_dir) if background_removal_dir else None
        self.offline = offline
        self._background_remover = None
        self.storage_device = torch.device("cpu") if memory_mode == "sequential" else self.device
        check_grid_consistency(self.configs)
        move_models(self.models.values(), self.storage_device)

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, weights_dir: Optional[Union[str, Path]] = None, device: Union[str, torch.device] = "cuda",
                        dtype: torch.dtype = torch.float16, memory_mode: str = "resident",
                        version: Optional[str] = None, *, offline: Optional[bool] = None,
                        cache_dir: Optional[Union[str, Path]] = None,
                        background_removal_dir: Optional[Union[str, Path]] = None) -> "Direct3DS2Pipeline":
        """Load every model strictly from ``weights_dir`` (or the cached/downloaded release ``version``).

        ``dtype``: compute dtype of the diffusion models and refiners (float16, bfloat16 or float32);
        DINOv2 runs in float32 as officially. ``version=None`` detects v1.0/v1.1 from the tensors.
        """
        if memory_mode not in MEMORY_MODES:
            raise ValueError(f"memory_mode must be one of {MEMORY_MODES}, got {memory_mode!r}")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"dtype must be torch.float16, torch.bfloat16 or torch.float32, got {dtype}")
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {device} was requested but CUDA is not available")
        location = resolve_weights(weights_dir, version, cache_dir=cache_dir, offline=offline)
        load_device = torch.device("cpu") if memory_mode == "sequential" else device
        loaded = load_models(location, version=version, device=load_device, dtype=dtype)
        return cls(loaded, device=device, dtype=dtype, memory_mode=memory_mode,
                   background_removal_dir=background_removal_dir, offline=offline)

    def release(self) -> None:
        """Drop every model and free the device memory; the pipeline cannot generate afterwards."""
        self.models.clear()
        self.loaded = None
        self._background_remover = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @contextlib.contextmanager
    def _models_on_device(self, *names: str):
        """Yield the named models on the compute device; in sequential mode move them back afterwards."""
        missing = [n for n in names if n not in self.models]
        if missing:
            raise RuntimeError(f"models {missing} are not loaded (was release() called?)")
        models = [self.models[n] for n in names]
        if self.storage_device != self.device:
            move_models(models, self.device)
        try:
            yield models if len(models) > 1 else models[0]
        finally:
            if self.storage_device != self.device:
                move_models(models, self.storage_device)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def _remover(self):
        if self._background_remover is None:
            from engine.image import BiRefNetBackgroundRemover
            folder = self.background_removal_dir
            if folder is None:
                try:
                    folder = resolve_background_removal(self.loaded.location.folder, offline=self.offline)
                except WeightsError as error:
                    raise ImageError(f"The image has no transparent background and background removal is not "
                                     f"available: {error}") from None
            self._background_remover = BiRefNetBackgroundRemover(folder, device=self.device)
        return self._background_remover

    # ------------------------------------------------------------------------------------------ stages
    def _condition(self, image: torch.Tensor) -> torch.Tensor:
        with self._models_on_device("image_encoder") as encoder:
            return encoder(image[None].to(self.device))  # [1, L, C] fp32

    def _dense_stage(self, context: torch.Tensor, settings: GenerationSettings, generator, clock) -> torch.Tensor:
        config = self.configs["dense_dit"]
        schedule = flow_match_schedule(settings.dense_steps, self.configs["dense_scheduler"].shift)
        with self._models_on_device("dense_dit", "dense_vae") as (dit, vae):
            noise = initial_noise((1, *config.latent_shape), generator, self.dtype)
            guided_context = torch.cat([context, torch.zeros_like(context)])
            # one CUDA-graph runner per batch size (eager on CPU or with pipeline.use_cuda_graphs = False)
            from engine.sampling import CUDAGraphRunner
            use_graphs = getattr(self, "use_cuda_graphs", True)

            def runner(batch_context, uniform, identical):
                return CUDAGraphRunner(lambda x, t: dit(x, t, batch_context, uniform_context=uniform,
                                                        identical_elements=identical), enabled=use_graphs)

            # the unconditional context is all zeros: its cross-attention output is exact without attending;
            # both elements of the pair hold the same latents, so the first block's self-attention runs once
            runners = {1: runner(context, None, False), 2: runner(guided_context, (False, True), True)}

            def velocity(x, t):  # x [b, 1, C, R, R, R]
                batch = x.shape[0]
                out = runners[batch](x.reshape(batch, *x.shape[2:]), t)
                return out.reshape(x.shape)

            latents = sample(velocity, noise, schedule, settings.dense_guidance,
                             on_step=clock.report, should_cancel=clock.should_cancel)
            occupied = vae.occupied_voxels(vae.unscale_latents(latents), threshold=DENSE_OCCUPANCY_THRESHOLD)
        return occupied  # [N, 4] int64 (0, x, y, z)

    def _sparse_stage(self, name: str, coords: torch.Tensor, context: torch.Tensor, condition_mask: torch.Tensor,
                      steps: int, guidance: float, generator, clock):
        """Sample latents for the (block-sorted) tokens ``coords`` [N, 4] with the sparse DiT ``name``."""
        from engine.models.sparse_dit import sparse_condition_tokens
        from engine.sparse import SparseVoxels

        resolution_tag = name.rsplit("_", 1)[1]
        config = self.configs[f"sparse_dit_{resolution_tag}"]
        schedule = flow_match_schedule(steps, self.configs[f"sparse_scheduler_{resolution_tag}"].shift)
        count = coords.shape[0]
        with self._models_on_device(f"sparse_dit_{resolution_tag}") as dit:
            noise = initial_noise((count, config.out_channels), generator, self.dtype)
            coords = coords.to(self.device, torch.int32)
            # one coordinate set per batch size, built once so its caches (windows, blocks) are reused
            single = SparseVoxels(noise, coords)
            second = coords.clone()
            second[:, 0] = 1
            pair = SparseVoxels(torch.cat([noise, noise]), torch.cat([coords, second]))
            if config.sparse_conditions:
                tokens = sparse_condition_tokens(context, condition_mask)
                cond_single = tokens
                uncond_coords = tokens.coords.clone()
                uncond_coords[:, 0] = 1
                cond_pair = SparseVoxels(torch.cat([tokens.feats, torch.zeros_like(tokens.feats)]),
                                         torch.cat([tokens.coords, uncond_coords]))
            else:
                cond_single = context
                cond_pair = torch.cat([context, torch.zeros_like(context)])

            # per batch size: the forward over the fixed token set, a CUDA graph replayed every step on
            # CUDA after two eager warm-up steps (eager on CPU or with pipeline.use_cuda_graphs = False)
            use_graphs = getattr(self, "use_cuda_graphs", True)
            # the unconditional dense context is all zeros: its cross-attention output is exact without
            # attending (SparseDiT.forward's uniform_context); the sampler feeds both elements of the pair
            # the same latents, so the first block's self-attention runs once (identical_elements)
            uniform = None if config.sparse_conditions else (False, True)
            steppers = {1: dit.step_function(single, cond_single, use_cuda_graphs=use_graphs),
                        2: dit.step_function(pair, cond_pair, use_cuda_graphs=use_graphs, uniform_context=uniform,
                                             identical_elements=True)}

            def velocity(x, t):  # x [b, N, C]
                batch = x.shape[0]
                out = steppers[batch](x.reshape(batch * count, -1), t)
                return out.reshape(x.shape)

            latents = sample(velocity, noise, schedule, guidance, on_step=clock.report,
                             should_cancel=clock.should_cancel)
        return latents

    def _decode_512(self, coords: torch.Tensor, latents: torch.Tensor, clock):
        from engine.mesh.marching_cubes import dense_marching_cubes
        from engine.sparse import SparseVoxels

        with self._models_on_device("sparse_vae_512") as vae:
            sdf, feats = vae.decode(SparseVoxels(vae.unscale_latents(latents), coords.to(self.device)), return_feat=True)
        clock.check_cancel()
        with self._models_on_device("refiner") as refiner:
            resolution = refiner.config.volume_resolution
            volume = refiner.refine_volume(sdf.coords, sdf.feats, feats.feats, progress=clock.step_callback)
        voxels = sdf.num_voxels
        del sdf, feats
        vertices, faces = dense_marching_cubes(volume, MC_LEVEL_512)
        del volume
        return vertices, faces, resolution, voxels

    def _decode_1024(self, coords: torch.Tensor, latents: torch.Tensor, remove_interior: bool, clock):
        from engine.mesh.marching_cubes import sparse_marching_cubes
        from engine.sparse import SparseVoxels

        with self._models_on_device("sparse_vae_1024") as vae:
            sdf = vae.decode(SparseVoxels(vae.unscale_latents(latents), coords.to(self.device)))
        resolution = LATENT_FACTOR * self.configs["sparse_dit_1024"].resolution
        clock.check_cancel()
        voxels = sdf.num_voxels
        if remove_interior:
            with self._models_on_device("refiner_1024") as refiner:
                field = refiner.sign_field(sdf.coords, sdf.feats, resolution=resolution,
                                           progress=clock.step_callback)
            del sdf
            band_points, band_values = field.band_points()
            cells = field.sign_change_cells()
            vertices, faces = sparse_marching_cubes(band_points, band_values, MC_LEVEL_1024, resolution,
                                                    background=field, candidate_cells=cells)
        else:
            # official sparse2mesh: decoded values over a background of 1.0 (duplicates: last write wins)
            points, values = sdf.coords[:, 1:], sdf.feats.reshape(-1)
            del sdf
            vertices, faces = sparse_marching_cubes(points, values, MC_LEVEL_1024, resolution, background=1.0)
        return vertices, faces, resolution, voxels

    # ------------------------------------------------------------------------------------------ generate
    @torch.inference_mode()
    def generate(self, image: Union[ImageSource, torch.Tensor], settings: Optional[GenerationSettings] = None,
                 on_progress: Optional[Callable[[Progress], None]] = None,
                 should_cancel: Optional[Callable[[], bool]] = None) -> GenerationResult:
        """Run every stage. ``image``: a path, a PIL image, or an already preprocessed tensor [4, 518, 518].

        ``on_progress`` receives a :class:`Progress` at every stage start and every step;
        ``should_cancel`` is polled every sampler step and refiner patch (GenerationCancelled).
        """
        import trimesh
        from engine.mesh.marching_cubes import grid_to_unit
        from engine.mesh.voxelize import narrow_band_tokens, normalize_mesh
        from engine.sparse import sort_block_order

        settings = (settings or GenerationSettings()).validate()
        if not self.models:
            raise RuntimeError("this pipeline was released; build a new one with from_pretrained")
        clock = _StageClock(self.device, on_progress, should_cancel)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        tokens: dict[str, int] = {}
        started = time.perf_counter()

        with clock.stage_scope("preprocess"):
            if isinstance(image, torch.Tensor):
                if image.shape != (4, 518, 518):
                    raise ImageError(f"a preprocessed image tensor must be [4, 518, 518], got {tuple(image.shape)}")
                image_tensor = image.float()
            else:
                image_tensor = self._preprocess(image)
        with clock.stage_scope("condition"):
            context = self._condition(image_tensor)
            condition_mask = image_tensor[None, 3:4].to(self.device)
        generator = make_generator(settings.seed, self.device)

        with clock.stage_scope("dense"):
            occupied = self._dense_stage(context, settings, generator, clock)
            if occupied.shape[0] == 0:
                raise GenerationError("The dense stage found no occupied voxel; try another seed or image.")
            block = self.configs["sparse_dit_512"].selection_block_size
            coords_512 = occupied[sort_block_order(occupied, block)]
            tokens["dense"] = int(np.prod(self.configs["dense_dit"].latent_shape[1:]))
            tokens["sparse_512"] = int(coords_512.shape[0])

        with clock.stage_scope("sparse_512"):
            latents_512 = self._sparse_stage("sparse_512", coords_512, context, condition_mask,
                                             settings.sparse_512_steps, settings.sparse_512_guidance, generator, clock)
        with clock.stage_scope("refine_512"):
            vertices, faces, resolution, voxels_512 = self._decode_512(coords_512, latents_512, clock)
            del latents_512
            if faces.shape[0] == 0:
                raise GenerationError("The 512 stage produced an empty surface; try another seed or image.")
            vertices = grid_to_unit(vertices.float(), resolution)

        stats: dict[str, Any] = {"version": self.version, "resolution": settings.resolution, "seed": settings.seed,
                                 "sdf_voxels_512": int(voxels_512)}
        if settings.resolution == 1024:
            with clock.stage_scope("sparse_1024"):
                fine = LATENT_FACTOR * self.configs["sparse_dit_1024"].resolution
                band = narrow_band_tokens(normalize_mesh(vertices, RENORMALIZE_SCALE), faces, resolution=fine,
                                          factor=LATENT_FACTOR, threshold=BAND_THRESHOLD)
                if band.shape[0] == 0:
                    raise GenerationError("The 512 mesh gave no 1024 tokens.")
                coords_1024 = torch.cat([torch.zeros_like(band[:, :1]), band], dim=1)
                block = self.configs["sparse_dit_1024"].selection_block_size
                coords_1024 = coords_1024[sort_block_order(coords_1024, block)]
                tokens["sparse_1024"] = int(coords_1024.shape[0])
                latents_1024 = self._sparse_stage("sparse_1024", coords_1024, context, condition_mask,
                                                  settings.sparse_1024_steps, settings.sparse_1024_guidance,
                                                  generator, clock)
            with clock.stage_scope("refine_1024"):
                vertices, faces, resolution, voxels_1024 = self._decode_1024(coords_1024, latents_1024,
                                                                             settings.remove_interior, clock)
                del latents_1024
                if faces.shape[0] == 0:
                    raise GenerationError("The 1024 stage produced an empty surface; try another seed or image.")
                vertices = grid_to_unit(vertices.float(), resolution)
                stats["sdf_voxels_1024"] = int(voxels_1024)

        with clock.stage_scope("postprocess"):
            mesh = trimesh.Trimesh(vertices.cpu().numpy().astype(np.float64), faces.cpu().numpy(), process=True)
            mesh = self._postprocess(mesh, settings)

        stats.update({
            "tokens": tokens,
            "seconds": dict(clock.seconds),
            "total_seconds": round(time.perf_counter() - started, 4),
            "peak_gpu_memory_bytes": int(torch.cuda.max_memory_allocated(self.device))
            if self.device.type == "cuda" else None,
            "vertices": int(len(mesh.vertices)),
            "faces": int(len(mesh.faces)),
        })
        return GenerationResult(mesh=mesh, stats=stats)

    def _preprocess(self, image) -> torch.Tensor:
        loaded = load_image(image)
        remover = None if has_useful_alpha(loaded) else self._remover()
        name = image if not isinstance(image, Image.Image) else None
        return preprocess_image(loaded, background_remover=remover, name=name)

    @staticmethod
    def _postprocess(mesh, settings: GenerationSettings):
        if (settings.target_faces is None and settings.keep_largest_components is None
                and settings.min_component_faces == 0 and settings.smooth_iterations == 0):
            return mesh
        from engine.mesh.postprocess import postprocess
        return postprocess(mesh, target_faces=settings.target_faces, keep_largest=settings.keep_largest_components,
                           min_component_faces=settings.min_component_faces,
                           smooth_iterations=settings.smooth_iterations)


def settings_dict(settings: GenerationSettings) -> dict:
    return asdict(settings)
