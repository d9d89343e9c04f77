"""Render Blender's Suzanne to an RGBA PNG with a transparent background: the project's own
example input image.

    .venv-blender/bin/python examples/make_suzanne_image.py [out.png] [--size 512] [--engine WORKBENCH]
    blender --background --python examples/make_suzanne_image.py -- out.png

Needs the ``bpy`` wheel (or Blender). Workbench is tried first; where it cannot render (no
OpenGL/EGL context, e.g. a headless server without a GPU), Cycles on the CPU is used instead.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import bpy


def script_arguments() -> list[str]:
    if "--" in sys.argv:
        return sys.argv[sys.argv.index("--") + 1:]
    return sys.argv[1:]


def build_scene(size: int):
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    bpy.ops.mesh.primitive_monkey_add(size=2.0, location=(0.0, 0.0, 0.0))
    monkey = bpy.context.active_object
    monkey.name = "Suzanne"
    subdivision = monkey.modifiers.new("Subdivision", "SUBSURF")
    subdivision.levels = subdivision.render_levels = 2
    monkey.data.shade_smooth()
    # Turn it a little so the image shows depth, as a product shot would.
    monkey.rotation_euler = (0.0, 0.0, math.radians(-8.0))

    material = bpy.data.materials.new("Clay")
    material.diffuse_color = (0.8, 0.45, 0.25, 1.0)
    material.use_nodes = True
    principled = material.node_tree.nodes.get("Principled BSDF")
    if principled is not None:
        principled.inputs["Base Color"].default_value = (0.8, 0.45, 0.25, 1.0)
        principled.inputs["Roughness"].default_value = 0.6
    monkey.data.materials.append(material)

    camera_data = bpy.data.cameras.new("Camera")
    camera_data.lens = 75.0
    camera = bpy.data.objects.new("Camera", camera_data)
    scene.collection.objects.link(camera)
    camera.location = (0.0, -9.0, 0.25)
    camera.rotation_euler = (math.radians(86.0), 0.0, 0.0)
    scene.camera = camera

    for name, location, energy in (("Key", (3.0, -4.0, 5.0), 900.0), ("Fill", (-4.0, -3.0, 2.0), 300.0),
                                   ("Rim", (0.0, 4.0, 4.0), 500.0)):
        light_data = bpy.data.lights.new(name, "AREA")
        light_data.energy = energy
        light_data.size = 3.0
        light = bpy.data.objects.new(name, light_data)
        light.location = location
        direction = -light.location
        light.rotation_euler = direction.to_track_quat("-Z", "Y").to_euler()
        scene.collection.objects.link(light)

    world = bpy.data.worlds.new("World")
    world.color = (0.05, 0.05, 0.05)
    scene.world = world

    scene.render.resolution_x = scene.render.resolution_y = size
    scene.render.resolution_percentage = 100
    scene.render.film_transparent = True
    scene.render.image_settings.file_format = "PNG"
    scene.render.image_settings.color_mode = "RGBA"
    return scene


def use_workbench(scene) -> None:
    scene.render.engine = "BLENDER_WORKBENCH"
    shading = scene.display.shading
    shading.light = "STUDIO"
    shading.color_type = "MATERIAL"
    shading.show_cavity = True


def use_cycles(scene) -> None:
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = 24
    scene.cycles.use_denoising = False
    scene.render.threads_mode = "AUTO"


def render(output: Path, size: int, engine: str) -> str:
    scene = build_scene(size)
    output.parent.mkdir(parents=True, exist_ok=True)
    scene.render.filepath = str(output)
    attempts = [engine] if engine == "CYCLES" else [engine, "CYCLES"]
    last_error = None
    for attempt in attempts:
        (use_cycles if attempt == "CYCLES" else use_workbench)(scene)
        try:
            bpy.ops.render.render(write_still=True)
        except RuntimeError as exc:  # e.g. no OpenGL context for Workbench/Eevee
            last_error = exc
            print(f"{attempt} could not render ({exc}); trying the next engine", file=sys.stderr)
            continue
        if output.is_file() and output.stat().st_size > 0:
            return attempt
    raise RuntimeError(f"no render engine could render the image: {last_error}")


def main() -> int:
    parser = argparse.ArgumentParser(description="Render Suzanne to a transparent RGBA PNG.")
    parser.add_argument("output", nargs="?", default="suzanne.png")
    parser.add_argument("--size", type=int, default=512, help="image width and height in pixels")
    parser.add_argument("--engine", choices=["WORKBENCH", "CYCLES"], default="WORKBENCH")
    options = parser.parse_args(script_arguments())
    if not 64 <= options.size <= 4096:
        parser.error("--size must be between 64 and 4096")
    output = Path(options.output).resolve()
    used = render(output, options.size, "BLENDER_WORKBENCH" if options.engine == "WORKBENCH" else "CYCLES")
    print(f"wrote {output} ({options.size}x{options.size} RGBA, {used})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
