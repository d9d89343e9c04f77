"""How the tests drive the worker: through the fake pipeline seam (fast, deterministic timing)
or the real pipeline on tiny random weights (``tests/helpers/tiny_weights.py``)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ADDON_TESTS = Path(__file__).resolve().parent
ENGINE_PYTHON = os.environ.get("D3D_ENGINE_PYTHON", sys.executable)
TINY_WEIGHTS_HELPER = REPO / "tests" / "helpers" / "tiny_weights.py"


@dataclasses.dataclass
class EngineSetup:
    kind: str            # "tiny" (real pipeline, random tiny weights) or "fake"
    weights_dir: str
    env: dict            # extra environment for the worker process

    def settings(self, slow: bool = False, **overrides) -> dict:
        """Settings that keep a job short on CPU (or long enough to cancel when ``slow``)."""
        if self.kind == "tiny":
            steps = 200 if slow else 2
            values = {"resolution": 512, "seed": 1, "dense_steps": steps, "sparse_512_steps": 2,
                      "sparse_1024_steps": 2}
        else:
            values = {"resolution": 512, "seed": 1, "dense_steps": 200 if slow else 3}
        values.update(overrides)
        return values


def real_pipeline_available() -> bool:
    if os.environ.get("D3D_TEST_FAKE_PIPELINE") == "1":
        return False
    return (REPO / "engine" / "pipeline.py").is_file() and TINY_WEIGHTS_HELPER.is_file()


def prepare_engine(folder: Path, kind: str = "fake") -> EngineSetup:
    """``kind``: "fake" (the seam, deterministic and fast) or "tiny" (the real pipeline on tiny
    random weights; callers skip when ``real_pipeline_available()`` is false)."""
    if kind == "tiny":
        spec = importlib.util.spec_from_file_location("d3d_tiny_weights", TINY_WEIGHTS_HELPER)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        weights = module.make_tiny_weights(folder / "tiny-weights")
        return EngineSetup("tiny", str(weights), {"PYTHONPATH": str(REPO)})
    return EngineSetup(
        "fake",
        "",
        {
            "PYTHONPATH": str(REPO),
            "D3D_WORKER_PIPELINE": f"{ADDON_TESTS / 'fake_pipeline.py'}:make_fake_pipeline",
            "D3D_FAKE_STEP_SECONDS": "0.05",
        },
    )
