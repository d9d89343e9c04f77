"""Profile one sparse-DiT forward (batched CFG) and one refiner patch of each kind on the GPU.

Prints the top CUDA kernels by total time for each, to see where a sampler step or a refiner run
spends its time.  python bench/profile_stages.py [--tokens-shape blobs] [--version v1.1]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate import SHAPES, block_sorted, randomise, shape_mesh_512  # noqa: E402
from engine.mesh.voxelize import narrow_band_tokens, normalize_mesh  # noqa: E402
from engine.models import build  # noqa: E402
from engine.sparse import SparseVoxels  # noqa: E402


ROWS = 25


def show(title, fn, repeat=2, rows=None):
    rows = rows or ROWS
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeat):
            fn()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: e.self_device_time_total, reverse=True)
    total = sum(e.self_device_time_total for e in events) / 1e3 / repeat
    print(f"\n### {title}: {total:.1f} ms of GPU time per call\n")
    print("| self GPU ms/call | calls/call | kernel or op |")
    print("| ---: | ---: | --- |")
    for e in events[:rows]:
        print(f"| {e.self_device_time_total / 1e3 / repeat:.2f} | {e.count / repeat:.0f} | {e.key[:90]} |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="blobs", choices=list(SHAPES))
    parser.add_argument("--version", default="v1.1")
    parser.add_argument("--only", nargs="*", default=["dense", "dit1024", "dit512", "refiner", "sign"])
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    global ROWS
    ROWS = args.rows
    torch.backends.cudnn.benchmark = True
    g = torch.Generator().manual_seed(0)
    dev, dt = "cuda", torch.float16
    with torch.inference_mode():
        _, vertices, faces = shape_mesh_512(SHAPES[args.shape], dev)
        if "dense" in args.only:
            dit = randomise(build("dense_dit", args.version, dtype=dt), g).to(dev)
            x = torch.randn(2, 8, 16, 16, 16, device=dev, dtype=dt)
            ctx = torch.randn(2, 1374, 1024, device=dev)
            t = torch.tensor([500.0], device=dev)
            show("dense DiT, 4096 tokens, CFG batch 2", lambda: dit(x, t, ctx))
            del dit
        for tag, res in (("dit512", 512), ("dit1024", 1024)):
            if tag not in args.only:
                continue
            verts = vertices if res == 512 else normalize_mesh(vertices, 0.95)
            coords = block_sorted(narrow_band_tokens(verts, faces, resolution=res, factor=8, threshold=4.0))
            n = coords.shape[0]
            dit = randomise(build(f"sparse_dit_{res}", args.version, dtype=dt), g).to(dev)
            second = coords.clone(); second[:, 0] = 1
            x = SparseVoxels(torch.randn(2 * n, 16, device=dev, dtype=dt), torch.cat([coords, second]))
            ctx = torch.randn(2, 1374, 1024, device=dev)
            t = torch.tensor([500.0], device=dev)
            show(f"sparse DiT {res}, {n} tokens, CFG batch 2", lambda: dit(x, t, ctx))
            del dit
        if "refiner" in args.only:
            ref = randomise(build("refiner", args.version, dtype=dt), g).to(dev)
            sdf = torch.rand(1, 1, 192, 192, 192, device=dev, dtype=dt)
            feat = torch.randn(1, 32, 192, 192, 192, device=dev, dtype=dt)
            show("refiner 512, one 192^3 patch", lambda: ref.refine_patch(sdf, feat))
            del ref, sdf, feat
        if "sign" in args.only:
            ref = randomise(build("refiner_1024", args.version, dtype=dt), g).to(dev)
            sdf = torch.rand(1, 1, 256, 256, 256, device=dev, dtype=dt)
            show("sign refiner, one 256^3 patch", lambda: ref.sign_logits_patch(sdf))


if __name__ == "__main__":
    main()
