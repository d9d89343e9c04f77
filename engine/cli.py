"""Command line: ``python -m engine generate|weights|worker`` — a thin layer over the library.

    python -m engine generate IMAGE -o OUT.glb [--resolution 512|1024] [--seed N]
        [--steps-dense N] [--steps-512 N] [--steps-1024 N] [--guidance G]
        [--guidance-dense G] [--guidance-512 G] [--guidance-1024 G] [--target-faces N]
        [--keep-largest N] [--min-component-faces N] [--smooth N] [--no-remove-interior]
        [--weights DIR | --version v1.0|v1.1] [--cache-dir DIR] [--offline]
        [--device cuda:0] [--dtype fp16|bf16|fp32] [--memory-mode resident|sequential]
        [--background-removal DIR] [--stats-json PATH] [--quiet]
    python -m engine weights download [--version v1.1] [--cache-dir DIR] [--background-removal]
    python -m engine weights check [--version v1.1] [--dir DIR] [--cache-dir DIR] [--offline]
    python -m engine worker ...        (engine.worker.main, the Blender add-on's process)

Exit status: 0 success, 1 error (message on stderr), 2 bad arguments, 130 cancelled (Ctrl-C).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
MESH_SUFFIXES = (".glb", ".obj", ".ply")


def _int_at_least(minimum: int):
    """argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            wanted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {value}")
        return value
    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _guidance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"guidance must be in [0, 100], got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description="Direct3D-S2 image-to-mesh engine.")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="turn one image into a mesh file")
    gen.add_argument("image", help="input image (RGBA with the background removed, or any image with BiRefNet)")
    gen.add_argument("-o", "--output", required=True, help="output mesh: .glb, .obj or .ply")
    gen.add_argument("--resolution", type=int, choices=(512, 1024), default=1024)
    gen.add_argument("--seed", type=_non_negative_int, default=0)
    gen.add_argument("--steps-dense", type=_positive_int, default=50)
    gen.add_argument("--steps-512", type=_positive_int, default=30)
    gen.add_argument("--steps-1024", type=_positive_int, default=15)
    gen.add_argument("--guidance", type=_guidance, default=None, help="CFG scale of every stage (default 7)")
    gen.add_argument("--guidance-dense", type=_guidance, default=None)
    gen.add_argument("--guidance-512", type=_guidance, default=None)
    gen.add_argument("--guidance-1024", type=_guidance, default=None)
    gen.add_argument("--no-remove-interior", action="store_true",
                     help="skip the 1024 sign refiner (keeps interior surfaces, faster)")
    gen.add_argument("--target-faces", type=_positive_int, default=None, help="decimate to about N faces")
    gen.add_argument("--keep-largest", type=_positive_int, default=None, help="keep the N largest components")
    gen.add_argument("--min-component-faces", type=_non_negative_int, default=0,
                     help="drop components with fewer faces")
    gen.add_argument("--smooth", type=_non_negative_int, default=0, help="smoothing iterations")
    _add_weights_arguments(gen)
    gen.add_argument("--device", default=None, help="cuda, cuda:0, cpu (default: cuda when available)")
    gen.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                     help="compute dtype (default fp16 on CUDA, fp32 on CPU)")
    gen.add_argument("--memory-mode", choices=("resident", "sequential"), default="resident",
                     help="resident: all models on the GPU; sequential: each stage's models only while it runs")
    gen.add_argument("--background-removal", metavar="DIR", default=None,
                     help="local BiRefNet folder for images without transparency")
    gen.add_argument("--stats-json", metavar="PATH", default=None, help="also write the statistics as JSON")
    gen.add_argument("--quiet", action="store_true", help="no progress bars")

    weights = commands.add_parser("weights", help="download or check the model weights")
    weights_commands = weights.add_subparsers(dest="weights_command", required=True)
    download = weights_commands.add_parser("download", help="download a release into the Hugging Face cache")
    download.add_argument("--version", choices=("v1.0", "v1.1"), default="v1.1")
    download.add_argument("--cache-dir", default=None)
    download.add_argument("--background-removal", action="store_true", help="also download BiRefNet")
    check = weights_commands.add_parser("check", help="verify a weights folder or the cached release")
    check.add_argument("--version", choices=("v1.0", "v1.1"), default=None)
    check.add_argument("--dir", default=None, help="weights folder (default: the cached release)")
    check.add_argument("--cache-dir", default=None)
    check.add_argument("--offline", action="store_true", default=None)

    commands.add_parser("worker", help="run the JSON-lines worker used by the Blender add-on", add_help=False)
    return parser


def _add_weights_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--weights", metavar="DIR", default=None, help="folder with the official checkpoint files")
    source.add_argument("--version", choices=("v1.0", "v1.1"), default=None,
                        help="release to use from the cache / download (default v1.1)")
    parser.add_argument("--cache-dir", default=None, help="Hugging Face cache folder")
    parser.add_argument("--offline", action="store_true", default=None, help="never use the network")


# ---------------------------------------------------------------------------------------------- generate
class _ProgressBars:
    """One tqdm bar per stage, driven by the pipeline's Progress events."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.stage = None

    def __call__(self, progress) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm
        if progress.stage != self.stage:
            self.close()
            self.stage = progress.stage
            self.bar = tqdm(total=progress.total, desc=f"{progress.stage:<12}", unit="step", file=sys.stderr,
                            leave=True, dynamic_ncols=True)
        if self.bar.total != progress.total:
            self.bar.total = progress.total
            self.bar.refresh()
        self.bar.n = progress.step
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def format_summary(stats: dict) -> str:
    """A plain-text table of tokens, seconds per stage, peak GPU memory and mesh size."""
    rows = []
    tokens = stats.get("tokens", {})
    for stage, seconds in stats.get("seconds", {}).items():
        count = tokens.get(stage)
        rows.append((stage, f"{seconds:.2f}", "" if count is None else f"{count:,}"))
    width = max([len(r[0]) for r in rows] + [5])
    lines = [f"{'stage':<{width}}  {'seconds':>9}  {'tokens':>9}", "-" * (width + 22)]
    lines += [f"{name:<{width}}  {secs:>9}  {count:>9}" for name, secs, count in rows]
    lines.append("-" * (width + 22))
    lines.append(f"{'total':<{width}}  {stats.get('total_seconds', 0.0):>9.2f}")
    peak = stats.get("peak_gpu_memory_bytes")
    lines.append(f"peak GPU memory: {'n/a (CPU)' if peak is None else f'{peak / 2 ** 30:.2f} GiB'}")
    lines.append(f"mesh: {stats.get('vertices', 0):,} vertices, {stats.get('faces', 0):,} faces "
                 f"(Direct3D-S2 {stats.get('version')}, resolution {stats.get('resolution')}, seed {stats.get('seed')})")
    return "\n".join(lines)


def run_generate(args) -> int:
    # cheap checks before importing torch and the models
    output = Path(args.output)
    if output.suffix.lower() not in MESH_SUFFIXES:
        return _fail(f"the output must end in {', '.join(MESH_SUFFIXES)}; got {output.name!r}", 2)
    if not output.parent.exists():
        return _fail(f"the output folder {output.parent} does not exist", 2)
    if not Path(args.image).is_file():
        return _fail(f"image file not found: {args.image}", 2)

    import torch

    from engine.image import ImageError
    from engine.mesh import export_mesh
    from engine.pipeline import Direct3DS2Pipeline, GenerationError, GenerationSettings
    from engine.weights import WeightsError

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        return _fail(f"invalid --device {args.device!r} (use cuda, cuda:N or cpu)", 2)
    if device.type == "cuda" and not torch.cuda.is_available():
        return _fail(f"--device {device} requested but CUDA is not available (use --device cpu)", 2)
    dtype_name = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    dtype = getattr(torch, DTYPES[dtype_name])

    base = args.guidance if args.guidance is not None else 7.0
    settings = GenerationSettings(
        resolution=args.resolution, seed=args.seed,
        dense_steps=args.steps_dense, sparse_512_steps=args.steps_512, sparse_1024_steps=args.steps_1024,
        dense_guidance=args.guidance_dense if args.guidance_dense is not None else base,
        sparse_512_guidance=args.guidance_512 if args.guidance_512 is not None else base,
        sparse_1024_guidance=args.guidance_1024 if args.guidance_1024 is not None else base,
        remove_interior=not args.no_remove_interior, target_faces=args.target_faces,
        keep_largest_components=args.keep_largest, min_component_faces=args.min_component_faces,
        smooth_iterations=args.smooth)
    try:
        settings.validate()
    except ValueError as error:
        return _fail(str(error), 2)

    bars = _ProgressBars(enabled=not args.quiet)
    try:
        if not args.quiet:
            print(f"loading weights ({args.weights or 'release ' + (args.version or 'v1.1')}) on {device}, "
                  f"{dtype_name}, {args.memory_mode}", file=sys.stderr)
        pipeline = Direct3DS2Pipeline.from_pretrained(
            args.weights, device=device, dtype=dtype, memory_mode=args.memory_mode, version=args.version,
            offline=args.offline, cache_dir=args.cache_dir, background_removal_dir=args.background_removal)
        result = pipeline.generate(args.image, settings, on_progress=bars)  # Ctrl-C interrupts
        bars.close()
        export_mesh(result.mesh, output)
    except KeyboardInterrupt:
        bars.close()
        print("cancelled", file=sys.stderr)
        return 130
    except (ImageError, WeightsError, GenerationError, ValueError, RuntimeError) as error:
        bars.close()
        return _fail(str(error), 1)
    stats = dict(result.stats, output=str(output))
    print(format_summary(stats))
    print(f"wrote {output}")
    if args.stats_json:
        Path(args.stats_json).write_text(json.dumps(stats, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------- weights
def run_weights(args) -> int:
    from engine.weights import WeightsError, check_folder, download_weights, resolve_weights

    try:
        if args.weights_command == "download":
            location = download_weights(args.version, cache_dir=args.cache_dir,
                                        background_removal=args.background_removal)
            print(f"Direct3D-S2 {args.version}: {location.folder}")
            print(f"DINOv2: {location.image_encoder}")
            if location.background_removal:
                print(f"BiRefNet: {location.background_removal}")
        else:
            location = resolve_weights(args.dir, args.version if args.dir is None else None,
                                       cache_dir=args.cache_dir, offline=args.offline, download=False)
        # after a download too: every file loads tensors-only with the expected keys and shapes
        reports = check_folder(location, version=args.version)
    except WeightsError as error:
        return _fail(str(error), 1)
    for report in reports:
        status = "ok  " if report.ok else "FAIL"
        size = f"{report.size_bytes / 2 ** 20:9.1f} MiB" if report.size_bytes else " " * 13
        print(f"{status} {size}  {report.path}: {report.detail}")
    failed = sum(not r.ok for r in reports)
    print(f"{len(reports) - failed} ok, {failed} failed")
    return 0 if failed == 0 else 1


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        from engine import worker
        return worker.main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        return run_generate(args)
    if args.command == "weights":
        return run_weights(args)
    return 2
