"""Generate one mesh per image of a folder, headless, with the Direct3D-S2 extension.

    blender --background --python examples/batch_generate.py -- \
        --images ./photos --save ./batch.blend --engine-python ~/d3d/.venv/bin/python \
        --weights ~/weights/direct3d-s2-v-1-1 --resolution 1024 --target-faces 100000

Works the same with the ``bpy`` wheel (``python examples/batch_generate.py --images ...``).
The extension must be installed (or pass ``--addon-zip dist/direct3d_s2-0.1.0.zip`` to install
it first). Results are lined up along +X, each ``--height`` tall and ``--spacing`` apart; each
object keeps its source image and settings as custom properties. The engine stays loaded
between images. With ``--export-dir`` every result is also written as ``<image>.glb``.

Exit status: 0 when every image produced an object, 1 when some failed, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import bpy  # first: with the bpy wheel, Blender's script modules are importable only after bpy

import addon_utils  # noqa: E402

EXTENSION_ID = "direct3d_s2"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tga", ".tif", ".tiff"}


def script_arguments() -> list[str]:
    if "--" in sys.argv:
        return sys.argv[sys.argv.index("--") + 1:]
    return sys.argv[1:]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="batch_generate.py", description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True, help="folder of reference images")
    parser.add_argument("--save", help="write the resulting .blend file here")
    parser.add_argument("--export-dir", help="also export each result as <image>.glb into this folder")
    parser.add_argument("--addon-zip", help="install this extension zip before running")
    parser.add_argument("--engine-python", help="the engine's Python (default: the preference)")
    parser.add_argument("--engine-path", help="checkout containing the 'engine' package, if not installed")
    parser.add_argument("--weights", help="weights folder (default: the preference)")
    parser.add_argument("--device", help="torch device, e.g. cuda, cuda:1, cpu")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--memory-mode", choices=["resident", "sequential"])
    parser.add_argument("--resolution", type=int, choices=[512, 1024], default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="sampler steps for every stage (default: official)")
    parser.add_argument("--target-faces", type=int, default=100_000, help="0 keeps every face")
    parser.add_argument("--height", type=float, default=2.0)
    parser.add_argument("--spacing", type=float, default=1.0, help="gap between results along X")
    parser.add_argument("--remesh", choices=["NONE", "VOXEL", "QUADRIFLOW"], default="NONE")
    parser.add_argument("--flat", action="store_true", help="flat instead of smooth shading")
    options = parser.parse_args(argv)
    if options.target_faces < 0:
        parser.error("--target-faces must be 0 or more")
    if options.height <= 0:
        parser.error("--height must be greater than 0")
    if options.steps is not None and options.steps < 1:
        parser.error("--steps must be at least 1")
    return options


def enable_extension(zip_path: str | None) -> str:
    if zip_path:
        if not Path(zip_path).is_file():
            raise SystemExit(f"error: extension zip not found: {zip_path}")
        bpy.ops.extensions.package_install_files(filepath=str(Path(zip_path).resolve()),
                                                 repo="user_default", enable_on_install=True)
    for module in addon_utils.modules(refresh=True):
        name = module.__name__
        if name == EXTENSION_ID or name.endswith("." + EXTENSION_ID):
            addon_utils.enable(name, default_set=True)
            return name
    raise SystemExit("error: the Direct3D-S2 extension is not installed; pass --addon-zip")


def configure(module_name: str, options: argparse.Namespace) -> None:
    prefs = bpy.context.preferences.addons[module_name].preferences
    for option, attribute in (("engine_python", "engine_python"), ("engine_path", "engine_path"),
                              ("weights", "weights_dir"), ("device", "device"), ("dtype", "dtype"),
                              ("memory_mode", "memory_mode")):
        value = getattr(options, option)
        if value:
            # absolute(), not resolve(): resolving a venv's python symlink would leave the venv
            setattr(prefs, attribute, str(Path(value).expanduser().absolute())
                    if option in ("engine_python", "engine_path", "weights") else value)
    settings = bpy.context.scene.d3d_settings
    settings.image_source = "FILE"
    settings.resolution = str(options.resolution)
    settings.seed = options.seed
    if options.steps:
        settings.dense_steps = settings.sparse_512_steps = settings.sparse_1024_steps = options.steps
    settings.use_target_faces = options.target_faces > 0
    if options.target_faces > 0:
        settings.target_faces = options.target_faces
    settings.placement = "CURSOR"
    settings.height = options.height
    settings.smooth_shading = not options.flat
    settings.remesh = options.remesh


def export_glb(obj, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for other in bpy.context.view_layer.objects:
        other.select_set(other == obj)
    bpy.ops.export_scene.gltf(filepath=str(folder / f"{obj.name}.glb"), export_format="GLB",
                              use_selection=True)


def main() -> int:
    options = parse(script_arguments())
    folder = Path(options.images).expanduser()
    if not folder.is_dir():
        print(f"error: image folder not found: {folder}", file=sys.stderr)
        return 2
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        print(f"error: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}", file=sys.stderr)
        return 2
    module_name = enable_extension(options.addon_zip)
    configure(module_name, options)
    scene = bpy.context.scene
    failures, x = [], 0.0
    started = time.monotonic()
    for index, image in enumerate(images, 1):
        print(f"[{index}/{len(images)}] {image.name}", flush=True)
        scene.d3d_settings.image_path = str(image.resolve())
        scene.cursor.location = (x, 0.0, 0.0)
        before = set(bpy.data.objects.keys())
        try:
            outcome = bpy.ops.d3d.generate()
        except RuntimeError as exc:  # the operator reported an error
            failures.append((image.name, str(exc).strip()))
            continue
        created = [bpy.data.objects[name] for name in set(bpy.data.objects.keys()) - before]
        if "FINISHED" not in outcome or len(created) != 1:
            failures.append((image.name, bpy.context.window_manager.d3d_job.last_error or str(outcome)))
            continue
        obj = created[0]
        width = obj.dimensions.x
        obj.location.x += width / 2.0  # line results up edge to edge
        x += width + options.spacing
        if options.export_dir:
            export_glb(obj, Path(options.export_dir).expanduser())
        print(f"    {obj.name}: {len(obj.data.polygons):,} faces", flush=True)
    session_module = sys.modules.get(f"{module_name}.session")
    if session_module is not None:
        session_module.session.stop()
    if options.save:
        bpy.ops.wm.save_as_mainfile(filepath=str(Path(options.save).expanduser().resolve()))
    done = len(images) - len(failures)
    print(f"{done} of {len(images)} images generated in {time.monotonic() - started:.1f} s")
    for name, message in failures:
        print(f"failed: {name}: {message}", file=sys.stderr)
    return 0 if not failures else 1


def finish(code: int) -> None:
    if not bpy.app.background:
        return  # run from Blender's UI: leave Blender open
    sys.stdout.flush()
    sys.stderr.flush()
    if not bpy.app.binary_path:
        # bpy as a Python module: the 4.2 wheel crashes while the interpreter shuts down once
        # an add-on class was registered (exit status -11), which would hide our status.
        import os

        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    finish(main())
