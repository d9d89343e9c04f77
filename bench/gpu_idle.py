"""GPU idle time between kernels in the 512 path's stages (H100 diagnostic).

Runs each stage twice (the first builds caches, compiles and captures), profiles the second with
the CUDA timeline, and prints per stage: wall time, the sum of kernel times, the idle time between
kernels and the largest idle stretches with their neighbouring kernels.

    python bench/gpu_idle.py [--shape figurine_wide]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate import SHAPES, _StageClock, block_sorted, build_pipeline, shape_mesh_512  # noqa: E402
from engine.mesh.voxelize import narrow_band_tokens  # noqa: E402
from engine.pipeline import GenerationSettings, make_generator  # noqa: E402
from engine.sparse import SparseVoxels  # noqa: E402


def idle_report(name: str, fn) -> None:
    fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    busy, last_end, gaps = 0.0, None, []
    for i, e in enumerate(events):
        busy += e.time_range.end - e.time_range.start
        if last_end is not None and e.time_range.start > last_end:
            gaps.append((e.time_range.start - last_end, events[i - 1].name[:50], e.name[:50]))
        last_end = e.time_range.end if last_end is None else max(last_end, e.time_range.end)
    gaps.sort()
    idle = sum(g for g, _, _ in gaps)
    print(f"{name}: wall {start.elapsed_time(stop):.1f} ms, kernels {busy / 1e3:.1f} ms, idle {idle / 1e3:.1f} ms "
          f"({len(gaps)} gaps, median {statistics.median(g for g, _, _ in gaps) if gaps else 0:.2f} us)")
    for g, before, after in gaps[-3:]:
        print(f"    {g / 1e3:.2f} ms idle after {before} | before {after}")
    sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="figurine_wide", choices=list(SHAPES))
    args = parser.parse_args()
    pipe = build_pipeline("v1.1", "cuda", torch.float16, False)
    image = torch.rand(4, 518, 518)
    settings = GenerationSettings(dense_steps=50, sparse_512_steps=30, sparse_1024_steps=15)
    clock = _StageClock(torch.device("cuda"), None, None)
    with torch.inference_mode():
        _, vertices, faces = shape_mesh_512(SHAPES[args.shape], "cuda")
        coords = block_sorted(narrow_band_tokens(vertices, faces, resolution=512, factor=8, threshold=4.0))
        context = pipe._condition(image)
        mask = image[None, 3:4].to("cuda")
        idle_report("dense DiT, 50 steps", lambda: pipe._dense_stage(context, settings, make_generator(0, "cuda"), clock))
        latents = []
        idle_report(f"sparse DiT 512, 30 steps, {coords.shape[0]} tokens", lambda: latents.append(pipe._sparse_stage(
            "sparse_512", coords, context, mask, 30, 7.0, make_generator(0, "cuda"), clock)))
        with pipe._models_on_device("sparse_vae_512") as vae:
            sdf, feats = vae.decode(SparseVoxels(latents[-1], coords), return_feat=True)
        with pipe._models_on_device("refiner") as refiner:
            idle_report("refiner 512", lambda: refiner.refine_volume(sdf.coords, sdf.feats, feats.feats))


if __name__ == "__main__":
    main()
