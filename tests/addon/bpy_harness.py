"""Helpers for running scenarios in a separate Python that has the bpy wheel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from engine_setup import REPO

SCENARIOS = Path(__file__).resolve().parent / "bpy_scenarios.py"


def find_bpy_python() -> str | None:
    """A Python with the bpy wheel: $D3D_BLENDER_PYTHON, else .venv-blender, else this one."""
    candidates = [os.environ.get("D3D_BLENDER_PYTHON", ""),
                  str(REPO / ".venv-blender" / "bin" / "python"),
                  str(REPO / ".venv-blender" / "Scripts" / "python.exe")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return candidate
    try:
        import importlib.util

        if importlib.util.find_spec("bpy") is not None:
            return sys.executable
    except (ImportError, ValueError):
        pass
    return None


def bpy_root(bpy_python: str) -> str:
    completed = subprocess.run(
        [bpy_python, "-c", "import importlib.util as u; print(list(u.find_spec('bpy').submodule_search_locations)[0])"],
        capture_output=True, text=True, check=True)
    return completed.stdout.strip()


def run_scenario(bpy_python: str, name: str, config: dict, home: Path, timeout: float = 600) -> dict:
    """Run one scenario in a fresh bpy process with its own HOME; return its RESULT dict."""
    home.mkdir(parents=True, exist_ok=True)
    config_path = home / f"{name}.json"
    config_path.write_text(json.dumps(config))
    env = {key: value for key, value in os.environ.items() if not key.startswith("D3D_")}
    env["HOME"] = str(home)
    env.pop("PYTHONPATH", None)
    completed = subprocess.run([bpy_python, str(SCENARIOS), name, str(config_path)],
                               capture_output=True, text=True, env=env, timeout=timeout, cwd=str(home))
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT: ")]
    assert lines, f"scenario {name} printed no result (rc {completed.returncode}):\n" \
                  f"{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
    facts = json.loads(lines[-1][len("RESULT: "):])
    assert "exception" not in facts, facts["exception"] + "\n" + completed.stdout[-3000:]
    facts["_stdout"] = completed.stdout
    return facts
