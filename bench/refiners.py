"""Time the two dense refiners at full size on the GPU (random weights, a sphere-shell band).

* 512 refiner: ``Refiner512.refine_volume`` over 27 patches of 192^3 on a 512^3 band with 32-d features.
* 1024 sign refiner: ``SignRefiner1024.sign_grid`` over 27 patches of 256^3 from a 1024^3 band.

Each configuration is warmed up on one patch (cuDNN autotuning, Triton compilation), then timed
over whole volumes; per-patch times come from a synchronising progress callback. With ``--compare``
the PyTorch kernels in the contiguous layout (the CPU path) run too, and the table gives how far the
fast path's output is from theirs. Prints one markdown table.

    python bench/refiners.py [--version v1.1] [--repeats 2] [--compare] [--only refiner sign] [--profile]
                             [--rows 12] [--default-only] [--save outputs.pt] [--kernels]

``--profile`` also prints, per configuration, the GPU kernels of one patch by total time.
``--save`` keeps the first configuration's outputs (random weights seeded) to compare checkouts.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.models import build  # noqa: E402
from engine.models.refiners import _seconds_per_call, conv_backend, kernel_backend  # noqa: E402


def shell_band(resolution: int, radius: float, half_width: float, device, slab: int = 64):
    """Integer voxels within ``half_width`` of a sphere of ``radius`` (fractions of the grid) centred
    slightly off the middle, and tanh SDF values; built slab by slab (no dense distance volume)."""
    axis = torch.arange(resolution, device=device, dtype=torch.float32)
    centre = torch.tensor([0.49, 0.51, 0.5], device=device) * resolution
    r = radius * resolution
    points, values = [], []
    for x0 in range(0, resolution, slab):
        x = axis[x0:x0 + slab].view(-1, 1, 1)
        distance = ((x - centre[0]) ** 2 + (axis.view(1, -1, 1) - centre[1]) ** 2
                    + (axis.view(1, 1, -1) - centre[2]) ** 2).sqrt() - r
        band = distance.abs() < half_width
        found = band.nonzero()
        found[:, 0] += x0
        points.append(found)
        values.append(torch.tanh(-distance[band] / 4))
    return torch.cat(points).int(), torch.cat(values)


PROFILE_ROWS = 12


def kernel_profile(title: str, fn, rows: int = 0):
    """Print the ``rows`` CUDA kernels of one ``fn()`` call with the most self GPU time."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: e.self_device_time_total, reverse=True)
    total = sum(e.self_device_time_total for e in events) / 1e3
    print(f"\n#### {title}: {total:.1f} GPU ms per patch\n")
    print("| self GPU ms | calls | kernel or op |")
    print("| ---: | ---: | --- |")
    for e in events[:rows or PROFILE_ROWS]:
        print(f"| {e.self_device_time_total / 1e3:.2f} | {e.count} | {e.key[:100]} |")


def timed_run(run, patches: int, repeats: int):
    """(seconds per whole run (best), per-patch ms (median over patches of the best run), peak GiB, output)."""
    best, best_patch, output = math.inf, [], None
    torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        marks = []

        def progress(done, total):
            torch.cuda.synchronize()
            marks.append(time.perf_counter())

        torch.cuda.synchronize()
        start = time.perf_counter()
        output = run(progress)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if elapsed < best:
            best = elapsed
            best_patch = [1e3 * (b - a) for a, b in zip([start] + marks[:-1], marks)]
    assert len(best_patch) == patches
    peak = torch.cuda.max_memory_allocated() / 2 ** 30
    return best, best_patch, peak, output


def compare_configurations(args, rows, model, label, saved_key, warm_patch, run_volume, difference):
    """Time ``run_volume(progress)`` (a whole 27-patch volume) under every configuration and append
    one table row each. ``warm_patch()`` runs one patch first (Triton compilation, cuDNN autotuning,
    the per-shape conv choice) and is what ``--profile`` records; ``difference(output, first)`` says
    how far a configuration's output is from the first one's, which ``--save`` keeps under
    ``saved_key``."""
    reference = None
    for name, backend, convs, channels_last in configurations(args):
        model.channels_last = channels_last
        try:
            with kernel_backend(backend), conv_backend(convs), torch.inference_mode():
                warm_patch()
                if args.profile:
                    kernel_profile(f"{label.split(',')[0]} patch, {name}", warm_patch)
                total, per_patch, peak, output = timed_run(run_volume, 27, args.repeats)
        except Exception as error:  # report and go on with the other configurations
            rows.append((label, name, math.nan, [math.nan], math.nan, f"failed: {type(error).__name__}: {error}"[:120]))
            continue
        if reference is None:
            SAVED[saved_key] = output.cpu()
            reference = output
            compared = "-"
        else:
            compared = difference(output, reference)
        rows.append((label, name, total, per_patch, peak, compared))
        del output


def bench_refiner512(args, generator, rows, device, dtype):
    model = build("refiner", args.version, dtype=dtype).to(device)
    coords, sdf = shell_band(512, 0.4, 2.5, device)
    feats = torch.randn(coords.shape[0], 32, generator=generator).to(device=device, dtype=dtype)
    sdf = sdf.to(dtype)

    def warm_patch():
        warm = torch.rand(1, 9, 192, 192, 192, generator=generator).to(device=device, dtype=dtype)
        model.refine_embedded_patch(warm[:, :1], warm[:, 1:])

    compare_configurations(args, rows, model, f"512 refiner, 27 x 192^3, {coords.shape[0] / 1e6:.2f} M band voxels",
                           "refiner", warm_patch,
                           lambda progress: model.refine_volume(coords, sdf, feats, progress=progress),
                           lambda volume, first: f"max abs {float((volume - first).abs().max()):.2e}")


def bench_sign(args, generator, rows, device, dtype):
    model = build("refiner_1024", args.version, dtype=dtype).to(device)
    coords, sdf = shell_band(1024, 0.4, 2.5, device)
    sdf = sdf.to(dtype)

    def warm_patch():
        model.sign_logits_patch(torch.rand(1, 1, 256, 256, 256, generator=generator).to(device=device, dtype=dtype))

    compare_configurations(args, rows, model,
                           f"sign refiner, 27 x 256^3, {coords.shape[0] / 1e6:.2f} M band voxels at 1024",
                           "sign", warm_patch, lambda progress: model.sign_grid(coords, sdf, progress=progress),
                           lambda grid, first: f"{float((grid != first).float().mean()) * 100:.4f} % signs differ")


def kernel_sweep():
    """Time the refiner kernels alone at full size with a few tile choices (GB/s of their traffic)."""
    import engine.kernels.adaptive_filter as af
    import engine.kernels.group_norm as gn

    device, half, cl = "cuda", torch.float16, torch.channels_last_3d

    def report(name, fn, nbytes):
        t = 1e3 * _seconds_per_call(fn, torch.device(device), repeats=10)
        print(f"| {name} | {t:.3f} | {nbytes / t / 1e6:.0f} |")

    print("\n| kernel (tile) | ms | GB/s |\n| --- | ---: | ---: |")
    import torch.nn.functional as F

    import engine.kernels.conv3d as conv
    for size, cin, cout in ((192, 8, 8), (192, 16, 8), (192, 8, 27), (192, 1, 8), (192, 8, 1), (256, 8, 8),
                            (256, 1, 8), (256, 8, 1)):
        voxels = size ** 3
        x = torch.randn(1, cin, size, size, size, device=device, dtype=half).to(memory_format=cl)
        w = (torch.randn(cout, cin, 3, 3, 3, device=device, dtype=half) / 10).to(memory_format=cl)
        nbytes = 2 * voxels * (cin + cout)
        report(f"cuDNN conv {cin}->{cout} at {size}^3", lambda: F.conv3d(x, w, None, 1, 1), nbytes)
        reference = F.conv3d(x, w, None, 1, 1)
        default = conv.row_plan(cin, cout)
        for tile in (default.tile, (2, 4, 16), (1, 16, 16)):
            for warps in (4, 8):
                plan = default._replace(tile=tile, warps=warps)
                out = conv.conv3d_3x3x3(x, w, None, plan=plan)
                error = float((out.float() - reference.float()).abs().max())
                report(f"row conv {cin}->{cout} at {size}^3 ({tile}, {warps} warps, max diff {error:.1e})",
                       lambda: conv.conv3d_3x3x3(x, w, None, plan=plan), nbytes)
        del x, w, out, reference
    size = 192
    voxels = size ** 3
    x = torch.randn(1, 8, size, size, size, device=device, dtype=half).contiguous(memory_format=cl)
    raw = (torch.rand(1, 27, size, size, size, device=device, dtype=half) + 0.1).contiguous(memory_format=cl)
    out = torch.empty_like(x)
    for block in (64, 128, 256, 512):
        report(f"normalise taps 192^3 (block {block})", lambda: af.normalise_taps(raw, half, block), 4 * 27 * voxels)
    taps = af.normalise_taps(raw, half)
    for tile in ((2, 4, 32), (4, 4, 32), (1, 8, 32), (2, 8, 16), (1, 4, 64), (4, 8, 8), (1, 2, 64)):
        for warps in (4, 8):
            report(f"filter step 192^3 x 8 ({tile}, {warps} warps)", lambda: af._step(x, taps, out, tile, warps),
                   2 * voxels * (27 + 16))
    x1 = torch.randn(1, 1, size, size, size, device=device, dtype=half)
    report("filter step 192^3 x 1 (default)", lambda: af._step(x1, taps, torch.empty_like(x1), None), 2 * voxels * 29)
    del x, raw, out, taps, x1
    size = 256
    voxels = size ** 3
    for channels in (8, 40):
        y = torch.randn(1, channels, size, size, size, device=device, dtype=half).contiguous(memory_format=cl)
        weight, bias = torch.ones(channels, device=device), torch.zeros(channels, device=device)
        for programs in (1024, 2048, 4096, 8192):
            report(f"group norm + SiLU 256^3 x {channels} in place ({programs} stat programs)",
                   lambda: gn.group_norm_silu(y, 4, weight, bias, 1e-5, silu=True, out=y, stat_programs=programs),
                   3 * 2 * channels * voxels)
        report(f"torch clone 256^3 x {channels} (copy roofline)", lambda: y.clone(), 4 * channels * voxels)
        del y
    joined = torch.empty(1, 40, size, size, size, device=device, dtype=half, memory_format=cl)
    up = torch.randn(1, 32, size, size, size, device=device, dtype=half).contiguous(memory_format=cl)
    skip = torch.randn(1, 8, size, size, size, device=device, dtype=half).contiguous(memory_format=cl)
    up_bias = torch.randn(32, device=device, dtype=half)
    report("copy 32 ch + bias into 40 ch 256^3", lambda: gn.copy_channels_(joined[:, :32], up, up_bias), 4 * 32 * voxels)
    report("copy 8 ch into 40 ch 256^3", lambda: gn.copy_channels_(joined[:, 32:], skip), 4 * 8 * voxels)
    report("torch copy 8 ch into 40 ch 256^3", lambda: joined[:, 32:].copy_(skip), 4 * 8 * voxels)
    del joined, up
    h = torch.randn(1, 8, size, size, size, device=device, dtype=half).contiguous(memory_format=cl)
    b8 = torch.randn(8, device=device, dtype=half)
    report("bias + residual 256^3 x 8", lambda: gn.bias_residual_(h, b8, skip, b8), 6 * 8 * voxels)
    report("torch bias add_ 256^3 x 8", lambda: h.add_(b8.view(1, 8, 1, 1, 1)), 4 * 8 * voxels)
    report("torch residual add_ 256^3 x 8", lambda: h.add_(skip), 6 * 8 * voxels)


def configurations(args):
    """(name, kernel backend, conv backend, channels_last) of each timed configuration; the first is
    the default CUDA path and the reference of the last column."""
    configs = [("default: Triton norms + filters, per-shape faster of cuDNN / Triton narrow convs, "
                "channels_last_3d", "auto", "auto", True),
               ("cuDNN for every conv (set_conv_backend('torch'))", "auto", "torch", True),
               ("Triton for every narrow 3x3x3 conv (set_conv_backend('triton'))", "auto", "triton", True)]
    if args.default_only:
        configs = configs[:1]
    elif args.configs:
        configs = [c for c, key in zip(configs, ("default", "cudnn", "triton")) if key in args.configs]
    if args.compare:
        configs.append(("PyTorch norms + filters, cuDNN convs, contiguous (before)", "torch", "torch", False))
    return configs


SAVED = {}  # the first configuration's outputs, for --save


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", default="v1.1")
    parser.add_argument("--repeats", type=int, default=2, help="timed whole-volume runs per configuration (best kept)")
    parser.add_argument("--compare", action="store_true", help="also time the PyTorch kernels, contiguous layout")
    parser.add_argument("--only", nargs="*", default=["refiner", "sign"], choices=["refiner", "sign"])
    parser.add_argument("--profile", action="store_true",
                        help="print the top GPU kernels of one patch per configuration")
    parser.add_argument("--rows", type=int, default=12, help="kernels listed per --profile table")
    parser.add_argument("--kernels", action="store_true",
                        help="only time the Triton kernels alone at full size, with a few tile choices")
    parser.add_argument("--configs", nargs="*", choices=["default", "cudnn", "triton"],
                        help="which of the fast-path configurations to time (default: all)")
    parser.add_argument("--default-only", action="store_true",
                        help="time only the default configuration (and --compare's)")
    parser.add_argument("--save", metavar="PATH",
                        help="torch.save the first configuration's outputs ({'refiner': volume, 'sign': grid}) "
                             "to compare two checkouts (the random weights come from torch.manual_seed(0))")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/refiners.py needs a CUDA GPU")
    if args.kernels:
        torch.backends.cudnn.benchmark = True  # cuDNN's times with its algorithm search, as in the refiners
        kernel_sweep()
        return
    global PROFILE_ROWS
    PROFILE_ROWS = args.rows
    torch.manual_seed(0)  # the same random weights in every run
    torch.backends.cudnn.benchmark = True
    device, dtype = torch.device("cuda"), torch.float16
    generator = torch.Generator().manual_seed(0)
    rows = []
    if "refiner" in args.only:
        bench_refiner512(args, generator, rows, device, dtype)
        torch.cuda.empty_cache()
    if "sign" in args.only:
        bench_sign(args, generator, rows, device, dtype)
    if args.save:
        torch.save(SAVED, args.save)
    print(f"\n{torch.cuda.get_device_name()}, fp16, cudnn.benchmark, release {args.version} shapes, random weights\n")
    print("| stage | configuration | total s | ms / patch (median, min-max) | peak GiB | vs first row |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for label, name, total, per_patch, peak, difference in rows:
        ordered = sorted(per_patch)
        median = ordered[len(ordered) // 2]
        print(f"| {label} | {name} | {total:.2f} | {median:.0f} ({ordered[0]:.0f}-{ordered[-1]:.0f}) "
              f"| {peak:.1f} | {difference} |")


if __name__ == "__main__":
    main()
