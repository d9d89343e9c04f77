"""The whole pipeline on CPU with scaled-down random weights in the official layout."""

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from helpers.tiny_weights import cached_tiny_weights
from engine.image import ImageError, preprocess_image
from engine.mesh import export_mesh
from engine.pipeline import (Direct3DS2Pipeline, GenerationCancelled, GenerationSettings, Progress)
from helpers.paths import SHARED

IMAGES = SHARED / "images"
FAST = dict(dense_steps=2, sparse_512_steps=2, sparse_1024_steps=2)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    if (IMAGES / "0.png").is_file():
        return IMAGES / "0.png"
    # fallback when the shared images are absent: a red disc with transparency
    yy, xx = np.mgrid[0:96, 0:96]
    rgba = np.zeros((96, 96, 4), np.uint8)
    rgba[..., 0] = 220
    rgba[..., 3] = np.where((xx - 48) ** 2 + (yy - 48) ** 2 < 900, 255, 0)
    path = tmp_path_factory.mktemp("img") / "disc.png"
    Image.fromarray(rgba, "RGBA").save(path)
    return path


@pytest.fixture(scope="module")
def pipeline_v11():
    return Direct3DS2Pipeline.from_pretrained(cached_tiny_weights("v1.1"), device="cpu", dtype=torch.float32,
                                              offline=True)


def _check_mesh(mesh, limit=1.0):
    assert isinstance(mesh, trimesh.Trimesh)
    assert len(mesh.faces) > 0 and len(mesh.vertices) > 0
    assert np.isfinite(mesh.vertices).all()
    assert np.abs(mesh.vertices).max() <= limit + 1e-6


def test_512_image_file_to_obj(pipeline_v11, image_path, tmp_path):
    events: list[Progress] = []
    result = pipeline_v11.generate(image_path, GenerationSettings(resolution=512, seed=3, **FAST),
                                   on_progress=events.append)
    _check_mesh(result.mesh)
    stats = result.stats
    assert stats["version"] == "v1.1" and stats["resolution"] == 512
    assert stats["tokens"]["sparse_512"] > 0 and "sparse_1024" not in stats["tokens"]
    assert set(stats["seconds"]) == {"preprocess", "condition", "dense", "sparse_512", "refine_512", "postprocess"}
    assert stats["faces"] == len(result.mesh.faces) and stats["peak_gpu_memory_bytes"] is None
    # progress: every stage starts at 0 and ends complete; sampler stages report each step
    stages = [e.stage for e in events]
    assert stages[0] == "preprocess" and stages[-1] == "postprocess"
    dense_steps = [e.step for e in events if e.stage == "dense" and e.total == 2]
    assert dense_steps == [1, 2]
    assert all(e.eta_s is None or e.eta_s >= 0 for e in events)
    out = export_mesh(result.mesh, tmp_path / "mesh.obj")
    reloaded = trimesh.load(out, force="mesh")
    assert len(reloaded.faces) == len(result.mesh.faces)


def test_1024_remove_interior_to_glb(pipeline_v11, image_path, tmp_path):
    result = pipeline_v11.generate(image_path, GenerationSettings(resolution=1024, seed=1, **FAST))
    _check_mesh(result.mesh)  # random sign-refiner weights can put surface anywhere in [-1, 1)
    stats = result.stats
    assert stats["tokens"]["sparse_1024"] > 0 and stats["sdf_voxels_1024"] > 0
    assert {"sparse_1024", "refine_1024"} <= set(stats["seconds"])
    out = export_mesh(result.mesh, tmp_path / "mesh.glb")
    assert len(trimesh.load(out, force="mesh").faces) == len(result.mesh.faces)


def test_seed_repeatable(pipeline_v11):
    image = preprocess_image(IMAGES / "1.png") if (IMAGES / "1.png").is_file() else None
    if image is None:
        pytest.skip("shared images absent")
    settings = GenerationSettings(resolution=512, seed=11, dense_steps=1, sparse_512_steps=1)
    first = pipeline_v11.generate(image, settings).mesh
    second = pipeline_v11.generate(image, settings).mesh
    assert np.array_equal(first.vertices, second.vertices) and np.array_equal(first.faces, second.faces)
    other = pipeline_v11.generate(image, GenerationSettings(resolution=512, seed=12, dense_steps=1,
                                                            sparse_512_steps=1)).mesh
    assert len(other.vertices) != len(first.vertices) or not np.allclose(other.vertices, first.vertices)


def test_cancel_during_sampling_and_reuse(pipeline_v11, image_path):
    calls = {"n": 0}

    def should_cancel():
        calls["n"] += 1
        return calls["n"] > 4

    events = []
    with pytest.raises(GenerationCancelled):
        pipeline_v11.generate(image_path, GenerationSettings(resolution=512, dense_steps=5, sparse_512_steps=5),
                              on_progress=events.append, should_cancel=should_cancel)
    assert events[-1].stage == "dense" and events[-1].step < 5
    # the pipeline still works after a cancel
    assert pipeline_v11.generate(image_path, GenerationSettings(resolution=512, dense_steps=1,
                                                                sparse_512_steps=1)).mesh.faces.shape[0] > 0


def test_v10_sparse_conditions_plain_1024_sequential(image_path):
    pipeline = Direct3DS2Pipeline.from_pretrained(cached_tiny_weights("v1.0"), device="cpu", dtype=torch.float32,
                                                  memory_mode="sequential", offline=True)
    assert pipeline.version == "v1.0"
    result = pipeline.generate(image_path, GenerationSettings(resolution=1024, remove_interior=False, seed=2,
                                                              target_faces=500, **FAST))
    # quadric decimation places merged vertices at their error-optimal points, which may lie a
    # fraction of a voxel outside the undecimated mesh
    _check_mesh(result.mesh, limit=1.0 + 2 / 1024)
    assert result.stats["faces"] <= 600
    pipeline.release()
    with pytest.raises(RuntimeError, match="released"):
        pipeline.generate(image_path, GenerationSettings(resolution=512))


@pytest.mark.parametrize("change, message", [
    (dict(resolution=768), "resolution"),
    (dict(dense_steps=0), "dense_steps"),
    (dict(sparse_512_guidance=-1.0), "sparse_512_guidance"),
    (dict(seed=-5), "seed"),
    (dict(target_faces=2), "target_faces"),
    (dict(remove_interior="yes"), "remove_interior"),
])
def test_settings_validation(change, message):
    with pytest.raises(ValueError, match=message):
        GenerationSettings(**change).validate()


def test_rgb_image_without_background_removal_is_explained(pipeline_v11, tmp_path):
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(path)
    with pytest.raises(ImageError, match="background removal"):
        pipeline_v11.generate(path, GenerationSettings(resolution=512, dense_steps=1, sparse_512_steps=1))


def test_bad_arguments_to_from_pretrained(tmp_path):
    with pytest.raises(ValueError, match="memory_mode"):
        Direct3DS2Pipeline.from_pretrained(cached_tiny_weights("v1.1"), device="cpu", memory_mode="lazy")
    with pytest.raises(ValueError, match="dtype"):
        Direct3DS2Pipeline.from_pretrained(cached_tiny_weights("v1.1"), device="cpu", dtype=torch.int8)


@pytest.mark.parametrize("version", ["v1.0", "v1.1"])
@torch.inference_mode()  # from_pretrained inside inference mode must still give ordinary parameters
def test_batched_guidance_equals_two_official_passes(version, image_path):
    """The sampler's single batch-of-2 forward gives the official cond and uncond velocities."""
    from engine.sparse import SparseVoxels, sort_block_order
    pipeline = Direct3DS2Pipeline.from_pretrained(cached_tiny_weights(version), device="cpu", dtype=torch.float32,
                                                  offline=True)
    image = preprocess_image(image_path)
    context = pipeline._condition(image)
    mask = image[None, 3:4]
    t = torch.tensor([996.5])
    generator = torch.Generator().manual_seed(0)

    dit = pipeline.models["dense_dit"]
    x = torch.randn((1, *dit.config.latent_shape), generator=generator)
    pair = dit(torch.cat([x, x]), t, torch.cat([context, torch.zeros_like(context)]))
    torch.testing.assert_close(pair[0:1], dit(x, t, context), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pair[1:2], dit(x, t, torch.zeros_like(context)), rtol=1e-4, atol=1e-5)

    xyz = torch.nonzero(torch.rand((4, 4, 4), generator=generator) < 0.5)
    coords = torch.cat([torch.zeros_like(xyz[:, :1]), xyz], 1)
    coords = coords[sort_block_order(coords)]
    calls = []
    sparse_dit = pipeline.models["sparse_dit_512"]
    original_forward = sparse_dit.forward

    def recording_forward(x, t, cond, *args, **kwargs):
        out = original_forward(x, t, cond, *args, **kwargs)
        calls.append((x.batch_size, out.feats.clone()))
        return out
    sparse_dit.forward = recording_forward
    clock = type("Clock", (), {"report": staticmethod(lambda *a: None), "should_cancel": None})()
    from engine.sampling import make_generator
    pipeline._sparse_stage("sparse_512", coords, context, mask, 1, 7.0, make_generator(0), clock)
    sparse_dit.forward = original_forward
    assert [batch for batch, _ in calls] == [2]
    # recompute the official separate passes on the same noise
    first_noise = torch.randn((coords.shape[0], 16), dtype=torch.float16,
                              generator=torch.Generator().manual_seed(0)).float()
    voxels = SparseVoxels(first_noise, coords.int())
    if sparse_dit.config.sparse_conditions:
        from engine.models.sparse_dit import sparse_condition_tokens
        cond = sparse_condition_tokens(context, mask)
        uncond = cond.replace(torch.zeros_like(cond.feats))
    else:
        cond, uncond = context, torch.zeros_like(context)
    t_first = torch.tensor([1000.0])
    v_cond = sparse_dit(voxels, t_first, cond).feats
    v_uncond = sparse_dit(voxels, t_first, uncond).feats
    batched = calls[0][1]
    torch.testing.assert_close(batched[: coords.shape[0]], v_cond, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batched[coords.shape[0]:], v_uncond, rtol=1e-4, atol=1e-5)


def test_sequential_moves_keep_ordinary_parameters():
    """Stage moves happen inside generate's inference mode; parameters must not become inference tensors."""
    from engine.pipeline import move_models
    model = torch.nn.Linear(3, 3)
    with torch.inference_mode():
        move_models([model], torch.device("meta"))  # a real device change, available without a GPU
    assert model.weight.device.type == "meta" and not model.weight.is_inference()


def test_grid_consistency_check():
    import dataclasses
    from engine.configs import OFFICIAL_CONFIGS
    from engine.pipeline import check_grid_consistency
    for version in ("v1.0", "v1.1"):
        check_grid_consistency(OFFICIAL_CONFIGS[version])
    from helpers.tiny_weights import tiny_configs
    configs = tiny_configs("v1.1")
    check_grid_consistency(configs)
    configs["refiner"] = dataclasses.replace(configs["refiner"], volume_resolution=64)
    with pytest.raises(ValueError, match="refiner.volume_resolution 64"):
        check_grid_consistency(configs)
