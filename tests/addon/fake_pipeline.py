"""A stand-in pipeline for the worker's test seam (``D3D_WORKER_PIPELINE``).

It honours the same calling convention as ``Direct3DS2Pipeline``: ``generate(image, settings,
on_progress, should_cancel)`` returning an object with ``mesh`` (a trimesh) and ``stats``. It
sleeps a little per step so tests can cancel mid-job, and it fails on purpose when the image
file name contains ``raise``. Used only where a deterministic engine is needed; the protocol
tests also run against the real tiny pipeline.
"""

from __future__ import annotations

import os
import time

from engine.pipeline import GenerationCancelled, GenerationResult, Progress


class FakePipeline:
    def __init__(self, weights_dir, device, dtype, memory_mode):
        self.weights_dir = weights_dir
        self.device = device
        self.released = False

    def generate(self, image, settings, on_progress=None, should_cancel=None):
        import trimesh
        from PIL import Image

        with Image.open(image) as picture:  # fail like the real pipeline on unreadable images
            picture.load()
        step_seconds = float(os.environ.get("D3D_FAKE_STEP_SECONDS", "0.05"))
        if "raise" in os.path.basename(str(image)):
            raise RuntimeError("fake pipeline failure requested by the image name")
        started = time.monotonic()
        total = settings.dense_steps
        for step in range(1, total + 1):
            if should_cancel is not None and should_cancel():
                raise GenerationCancelled()
            time.sleep(step_seconds)
            # Neither a Python print nor a C-level write to fd 1 may reach the protocol stream.
            print("stray print from the fake pipeline")
            os.write(1, b"stray write to file descriptor 1\n")
            if on_progress is not None:
                elapsed = time.monotonic() - started
                on_progress(Progress("dense", step, total, elapsed, elapsed / step * (total - step)))
        subdivisions = 3 if settings.resolution == 512 else 4
        mesh = trimesh.creation.icosphere(subdivisions=subdivisions, radius=0.5)
        if settings.target_faces is not None and len(mesh.faces) > settings.target_faces:
            mesh = trimesh.Trimesh(mesh.vertices, mesh.faces[: settings.target_faces], process=False)
            mesh.remove_unreferenced_vertices()
        return GenerationResult(mesh, {"faces": int(len(mesh.faces)), "seed": settings.seed})

    def release(self):
        self.released = True


def make_fake_pipeline(weights_dir, device="cpu", dtype=None, memory_mode="resident"):
    return FakePipeline(weights_dir, device, dtype, memory_mode)
