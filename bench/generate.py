"""Whole-pipeline benchmark at full model size with random weights (issues 3 and 5).

Every model of a release is built at its real size with random weights. So that timings do not
depend on what random weights produce, the data flowing between stages comes from real shapes:
the 512-stage tokens and the 1024-stage tokens are voxelised from a mesh, and marching cubes runs on
that shape's signed distance (the diffusion models, the VAE decoders and the refiners still run on
their real-size inputs). Prints one table per shape; copy it into docs/benchmarks.md.

    python bench/generate.py                      # both paths, all shapes, v1.1, fp16
    python bench/generate.py --resolution 512 --shapes blobs
    python bench/generate.py --device cpu --tiny  # smoke test of this script with tiny models
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.configs import OFFICIAL_CONFIGS  # noqa: E402
from engine.mesh.marching_cubes import dense_marching_cubes, grid_to_unit, sparse_marching_cubes  # noqa: E402
from engine.mesh.voxelize import narrow_band_tokens, normalize_mesh  # noqa: E402
from engine.models import build  # noqa: E402
from engine.pipeline import Direct3DS2Pipeline, GenerationSettings, _StageClock  # noqa: E402
from engine.sampling import make_generator  # noqa: E402
from engine.sparse import SparseVoxels, sort_block_order  # noqa: E402
from engine.weights import LoadedModels  # noqa: E402


# ------------------------------------------------------------------------------------------ shapes
def _sphere(p, centre, radius):
    return (p - p.new_tensor(centre)).norm(dim=-1) - radius


def _torus(p, centre, major, minor):
    q = p - p.new_tensor(centre)
    ring = torch.stack([q[..., [0, 2]].norm(dim=-1) - major, q[..., 1]], dim=-1)
    return ring.norm(dim=-1) - minor


def _capsule(p, a, b, radius):
    """Distance to the segment a-b minus radius (a rounded cylinder)."""
    a, b = p.new_tensor(a), p.new_tensor(b)
    pa, ba = p - a, b - a
    h = ((pa * ba).sum(-1) / (ba * ba).sum()).clamp(0, 1)
    return (pa - h[..., None] * ba).norm(dim=-1) - radius


def _figurine(p):
    """A chubby standing figure (head, torso, legs, arms): about 16k tokens at 512 and 60k at 1024,
    the token counts of the official timings (18k at 512, 46k-60k at 1024)."""
    parts = [_sphere(p, (0.0, 0.62, 0.0), 0.46),
             _capsule(p, (0.0, -0.15, 0.0), (0.0, 0.3, 0.0), 0.62),
             _capsule(p, (-0.14, -0.3, 0.0), (-0.16, -0.85, 0.05), 0.25),
             _capsule(p, (0.14, -0.3, 0.0), (0.16, -0.85, 0.05), 0.25),
             _capsule(p, (-0.3, 0.25, 0.0), (-0.55, -0.2, 0.1), 0.18),
             _capsule(p, (0.3, 0.25, 0.0), (0.55, -0.2, 0.1), 0.18)]
    return torch.stack(parts).min(dim=0).values


def _box(p, centre, half):
    q = (p - p.new_tensor(centre)).abs() - p.new_tensor(half)
    return q.clamp_min(0).norm(dim=-1) + q.max(dim=-1).values.clamp_max(0)


# Signed distance (negative inside) of each benchmark shape, for points in [-1, 1]^3.
SHAPES = {
    "blobs": lambda p: torch.minimum(torch.minimum(_sphere(p, (0.0, -0.25, 0.0), 0.5), _sphere(p, (0.0, 0.45, 0.0), 0.33)),
                                     torch.minimum(_sphere(p, (0.42, 0.1, 0.2), 0.22), _sphere(p, (-0.42, 0.1, -0.2), 0.22))),
    "torus_box": lambda p: torch.minimum(_torus(p, (0.0, 0.2, 0.0), 0.55, 0.16), _box(p, (0.0, -0.45, 0.0), (0.55, 0.2, 0.4))),
    "shell_large": lambda p: _sphere(p, (0.0, 0.0, 0.0), 0.9).abs() - 0.03,
    "figurine": _figurine,
    # the figurine 7 % wider and deeper: 18,022 tokens at 512, the official 512 timing's count
    "figurine_wide": lambda p: _figurine(p * p.new_tensor([1 / 1.07, 1.0, 1 / 1.07])),
}


def grid_points(ids: torch.Tensor, resolution: int) -> torch.Tensor:
    """Voxel indices -> positions in [-1, 1) (the official ``v / res * 2 - 1`` frame)."""
    return ids.float() / resolution * 2 - 1


def shape_mesh_512(sdf_fn, device):
    """The shape's surface at 512^3 (stand-in for the 512 stage's refined mesh), in the unit frame."""
    r = 512
    axis = torch.arange(r, device=device)
    volume = torch.empty((r, r, r), device=device)
    for x0 in range(0, r, 64):  # slabs keep the point tensor small
        ids = torch.stack(torch.meshgrid(axis[x0:x0 + 64], axis, axis, indexing="ij"), dim=-1)
        volume[x0:x0 + 64] = sdf_fn(grid_points(ids, r))
    vertices, faces = dense_marching_cubes(volume, 0.0)
    return volume, grid_to_unit(vertices.float(), r), faces


def block_sorted(coords3: torch.Tensor) -> torch.Tensor:
    coords = torch.cat([torch.zeros_like(coords3[:, :1]), coords3], dim=1).int()
    return coords[sort_block_order(coords, 8)]


# ------------------------------------------------------------------------------------------ timing
class Timer:
    """Wall time and peak memory of each stage. With `step_times`, the sampler's progress callback
    synchronises after every step and the note gives the first three steps (eager warm-up, the
    checked eager call, the CUDA-graph capture) and the median of the replayed ones."""

    def __init__(self, device, step_times=False):
        self.device, self.rows = torch.device(device), []
        self.step_times = step_times
        self.marks: list[float] = []

    def on_step(self, progress):
        if progress.step > 0:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.marks.append(time.perf_counter())

    def __call__(self, name, fn, *, steps=None, note=""):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.marks = []
        start = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        if self.step_times and len(self.marks) > 3:
            durations = [1e3 * (b - a) for a, b in zip([start] + self.marks, self.marks)]
            rest = sorted(durations[3:])
            note += (f"; step ms: first {durations[0]:.0f} (with setup), {durations[1]:.0f}, "
                     f"{durations[2]:.0f}, then median {rest[len(rest) // 2]:.1f}")
        self.rows.append((name, seconds, steps, peak, note))
        return out


def randomise(model: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Give zero-initialised layers (adaLN, output layers) small random values so nothing is trivial."""
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and not p.is_meta and float(p.abs().max()) == 0.0:
                p.copy_(torch.randn(p.shape, generator=generator, device="cpu").to(p) * 0.02)
    return model


def build_pipeline(version, device, dtype, tiny, memory_mode="resident"):
    if tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from helpers.tiny_weights import tiny_configs
        configs = tiny_configs(version)
    else:
        configs = dict(OFFICIAL_CONFIGS[version])
    generator = torch.Generator().manual_seed(0)
    models = {}
    for name in ("image_encoder", "dense_vae", "dense_dit", "sparse_vae_512", "sparse_dit_512",
                 "sparse_vae_1024", "sparse_dit_1024", "refiner", "refiner_1024"):
        model = build(name, version, dtype=None if name == "image_encoder" else dtype, config=configs[name])
        models[name] = randomise(model, generator).to(device if memory_mode == "resident" else "cpu")
    loaded = LoadedModels(models=models, version=version, release=None if tiny else version, configs=configs,
                          location=None)
    return Direct3DS2Pipeline(loaded, device=device, dtype=dtype, memory_mode=memory_mode)


def run_shape(pipe: Direct3DS2Pipeline, shape: str, resolutions, steps, device, step_times=False):
    timer = Timer(device, step_times)
    sdf_fn = SHAPES[shape]
    clock = _StageClock(torch.device(device), timer.on_step if step_times else None, None)
    settings = GenerationSettings(dense_steps=steps[0], sparse_512_steps=steps[1], sparse_1024_steps=steps[2])
    generator = make_generator(0, device)
    image = torch.rand(4, 518, 518)
    with torch.inference_mode():
        volume_512, vertices_512, faces_512 = shape_mesh_512(sdf_fn, device)
        # 512-stage tokens: the shape's 64^3 band (what the dense stage hands over for a real shape)
        coords_512 = block_sorted(narrow_band_tokens(vertices_512, faces_512,
                                                     resolution=512, factor=8, threshold=4.0))
        context = timer("condition (DINOv2)", lambda: pipe._condition(image))
        mask = image[None, 3:4].to(device)
        timer("dense DiT + VAE", lambda: pipe._dense_stage(context, settings, generator, clock),
              steps=settings.dense_steps, note="CFG batched")
        latents = timer("sparse DiT 512", lambda: pipe._sparse_stage(
            "sparse_512", coords_512, context, mask, settings.sparse_512_steps, 7.0, generator, clock),
            steps=settings.sparse_512_steps, note=f"{coords_512.shape[0]} tokens")
        def decode_512():
            with pipe._models_on_device("sparse_vae_512") as vae:
                return vae.decode(SparseVoxels(latents, coords_512), return_feat=True)

        def refine_512():
            with pipe._models_on_device("refiner") as refiner:
                return refiner.refine_volume(sdf.coords, sdf.feats, feats.feats)

        sdf, feats = timer("sparse VAE 512 decode", decode_512)
        timer("refiner 512 (27 patches)", refine_512, note=f"{sdf.num_voxels} voxels")
        del sdf, feats
        # marching cubes on the shape's tanh-SDF at 512^3 (level 0.4 in tanh units as the pipeline)
        v, f = timer("marching cubes 512 (GPU)", lambda: dense_marching_cubes(torch.tanh(volume_512 * 64), 0.4))
        timer.rows[-1] = timer.rows[-1][:4] + (f"{f.shape[0]} faces",)
        del volume_512
        if 1024 in resolutions:
            band = timer("voxelise 512 mesh -> 128^3 tokens", lambda: narrow_band_tokens(
                normalize_mesh(vertices_512, 0.95), faces_512, resolution=1024, factor=8, threshold=4.0))
            coords_1024 = block_sorted(band)
            latents = timer("sparse DiT 1024", lambda: pipe._sparse_stage(
                "sparse_1024", coords_1024, context, mask, settings.sparse_1024_steps, 7.0, generator, clock),
                steps=settings.sparse_1024_steps, note=f"{coords_1024.shape[0]} tokens")
            def decode_1024():
                with pipe._models_on_device("sparse_vae_1024") as vae:
                    return vae.decode(SparseVoxels(latents, coords_1024))

            def sign_1024():
                with pipe._models_on_device("refiner_1024") as sign_refiner:
                    return sign_refiner.sign_field(sdf.coords, sdf.feats, resolution=1024)

            sdf = timer("sparse VAE 1024 decode (chunked)", decode_1024)
            timer("sign refiner 1024 (27 patches)", sign_1024, note=f"{sdf.num_voxels} voxels")
            # marching cubes over the decoded band with the shape's own distances (normalised frame)
            points = torch.unique(sdf.coords[:, 1:].long(), dim=0)
            del sdf
            centre, scale = _normalisation(vertices_512)
            def shape_values(ids):
                return torch.tanh(sdf_fn(grid_points(ids, 1024) / scale + centre) * scale * 256)
            values = shape_values(points)
            v, f = timer("sparse marching cubes 1024 (GPU)", lambda: sparse_marching_cubes(
                points, values, 0.2, 1024, background=lambda ids: torch.sign(shape_values(ids)) + (shape_values(ids) == 0)))
            timer.rows[-1] = timer.rows[-1][:4] + (f"{f.shape[0]} faces",)
    return timer.rows


def _normalisation(vertices):
    """centre and scale of normalize_mesh(vertices, 0.95): unit = (p - centre) * scale."""
    lo, hi = vertices.min(0).values, vertices.max(0).values
    centre = (lo + hi) / 2
    return centre, 1.9 / float((hi - lo).max())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, nargs="+", default=[512, 1024], choices=[512, 1024])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--version", default="v1.1", choices=["v1.0", "v1.1"])
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    parser.add_argument("--steps", type=int, nargs=3, default=[50, 30, 15], metavar=("DENSE", "S512", "S1024"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny models (smoke test of this script)")
    parser.add_argument("--memory-mode", default="resident", choices=["resident", "sequential"])
    parser.add_argument("--no-cuda-graphs", action="store_true", help="run the sampler steps eagerly")
    parser.add_argument("--step-times", action="store_true",
                        help="synchronise after every sampler step and report per-step times")
    args = parser.parse_args(argv)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    pipe = build_pipeline(args.version, args.device, dtype, args.tiny, args.memory_mode)
    pipe.use_cuda_graphs = not args.no_cuda_graphs
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"# bench/generate.py  version={args.version} dtype={args.dtype} steps={args.steps} "
          f"memory_mode={args.memory_mode} cuda_graphs={not args.no_cuda_graphs} device={device_name}")
    weights = torch.cuda.memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
    print(f"# resident weights: {weights:.2f} GiB")
    for shape in args.shapes:
        run_shape(pipe, shape, args.resolution, args.steps, args.device)  # warm-up (compilation, autotune)
        rows = run_shape(pipe, shape, args.resolution, args.steps, args.device, args.step_times)
        print(f"\n## shape: {shape}\n")
        print("| stage | seconds | steps/s | peak GiB | note |")
        print("| --- | ---: | ---: | ---: | --- |")
        totals = {512: 0.0, 1024: 0.0}
        in_1024 = False
        for name, seconds, steps, peak, note in rows:
            in_1024 = in_1024 or name.startswith("voxelise")
            totals[1024] += seconds
            if not in_1024:
                totals[512] += seconds
            rate = f"{steps / seconds:.2f}" if steps else ""
            print(f"| {name} | {seconds:.3f} | {rate} | {peak:.2f} | {note} |")
        print(f"| **512 path total** | **{totals[512]:.2f}** | | | |")
        if 1024 in args.resolution:
            print(f"| **1024 path total** | **{totals[1024]:.2f}** | | | |")
        peak_all = max(r[3] for r in rows)
        print(f"\npeak GPU memory over all stages: {peak_all:.2f} GiB")


if __name__ == "__main__":
    main()
