"""Build the Blender extension zip from ``blender_addon/`` and validate it.

Building and validating use Blender's own ``blender_ext.py`` (the program behind
``blender --command extension build`` / ``validate``), which ships inside the ``bpy`` wheel and
runs under plain Python, together with Blender's list of valid tags. So the checks are the
same as Blender's without needing a Blender binary.

    python build_addon.py                       # writes dist/direct3d_s2-<version>.zip
    python build_addon.py --output-dir out --bpy-root /path/to/site-packages/bpy

The bpy installation is found, in order: ``--bpy-root``, ``$D3D_BPY_ROOT``, the ``bpy`` package of
this interpreter, the ``.venv-blender`` environment beside this file.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent
SOURCE = REPO / "blender_addon"
BLENDER_EXT = Path("scripts") / "addons_core" / "bl_pkg" / "cli" / "blender_ext.py"
TAGS = Path("scripts") / "modules" / "_bpy_internal" / "extensions" / "tags.py"


class BuildError(Exception):
    pass


def _bpy_roots(explicit: str | None):
    if explicit:
        yield Path(explicit)
    if os.environ.get("D3D_BPY_ROOT"):
        yield Path(os.environ["D3D_BPY_ROOT"])
    spec = importlib.util.find_spec("bpy")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            yield Path(location)
    for lib in sorted((REPO / ".venv-blender" / "lib").glob("python3*/site-packages/bpy")):
        yield lib


def find_blender_tools(explicit: str | None = None) -> tuple[Path, Path]:
    """Return (blender_ext.py, tags.py) from a bpy installation."""
    searched = []
    for root in _bpy_roots(explicit):
        searched.append(str(root))
        for version_dir in sorted(root.glob("[0-9]*.[0-9]*"), reverse=True):
            ext, tags = version_dir / BLENDER_EXT, version_dir / TAGS
            if ext.is_file() and tags.is_file():
                return ext, tags
    raise BuildError(
        "Blender's blender_ext.py was not found (looked in: "
        + (", ".join(searched) or "nothing")
        + "). Install the bpy wheel (pip install bpy==5.0.1) or pass --bpy-root.")


def manifest() -> dict:
    with open(SOURCE / "blender_manifest.toml", "rb") as file:
        return tomllib.load(file)


def run_blender_ext(blender_ext: Path, arguments: list[str]) -> str:
    command = [sys.executable, str(blender_ext), *arguments]
    completed = subprocess.run(command, capture_output=True, text=True)
    output = (completed.stdout + completed.stderr).strip()
    if completed.returncode != 0:
        raise BuildError(f"{' '.join(arguments[:1])} failed:\n{output}")
    return output


def build(output_dir: Path, bpy_root: str | None = None, verbose: bool = False) -> Path:
    if not (SOURCE / "blender_manifest.toml").is_file():
        raise BuildError(f"{SOURCE} has no blender_manifest.toml")
    blender_ext, tags = find_blender_tools(bpy_root)
    info = manifest()
    output_dir.mkdir(parents=True, exist_ok=True)
    zip_path = output_dir / f"{info['id']}-{info['version']}.zip"
    if zip_path.exists():
        zip_path.unlink()
    log = run_blender_ext(blender_ext, ["build", "--source-dir", str(SOURCE), "--output-filepath",
                                        str(zip_path), "--valid-tags", str(tags)])
    if verbose:
        print(log)
    if not zip_path.is_file():
        raise BuildError(f"the build reported success but {zip_path} is missing:\n{log}")
    log = run_blender_ext(blender_ext, ["validate", str(zip_path), "--valid-tags", str(tags)])
    if verbose:
        print(log)
    return zip_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default=str(REPO / "dist"), help="where the zip goes")
    parser.add_argument("--bpy-root", help="folder of an installed bpy package (site-packages/bpy)")
    parser.add_argument("--verbose", action="store_true")
    options = parser.parse_args(argv)
    try:
        zip_path = build(Path(options.output_dir), options.bpy_root, options.verbose)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"built and validated {zip_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
