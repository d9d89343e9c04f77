"""The add-on's engine client (no bpy) against the real worker process: jobs, cancel, and a
worker that dies or cannot start."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "blender_addon"))
from engine_client import (  # noqa: E402
    EngineClient,
    EngineConfig,
    EngineDied,
    EngineError,
    Job,
    format_seconds,
    run_job,
)
from engine_setup import ENGINE_PYTHON, REPO, prepare_engine  # noqa: E402
from helpers.paths import SHARED

IMAGE = SHARED / "images" / "1.png"


@pytest.fixture(scope="module")
def fake_engine(tmp_path_factory):
    return prepare_engine(tmp_path_factory.mktemp("engine"), "fake")


@pytest.fixture
def image(tmp_path):
    if IMAGE.is_file():
        return str(IMAGE)
    from PIL import Image

    path = tmp_path / "square.png"
    Image.new("RGBA", (32, 32), (10, 200, 10, 255)).save(path)
    return str(path)


def make_client(setup, tmp_path, **overrides) -> EngineClient:
    config = EngineConfig(python=ENGINE_PYTHON, engine_path=str(REPO), weights_dir=setup.weights_dir,
                          device="cpu", dtype="float32", log_path=str(tmp_path / "logs" / "engine.log"),
                          extra_env=dict(setup.env))
    for key, value in overrides.items():
        setattr(config, key, value)
    client = EngineClient(config)
    client.start()
    return client


def test_config_validation_messages(tmp_path):
    with pytest.raises(EngineError, match="No engine Python"):
        EngineConfig(python="").validate()
    with pytest.raises(EngineError, match="does not exist"):
        EngineConfig(python=str(tmp_path / "nope" / "python")).validate()
    with pytest.raises(EngineError, match="no 'engine' package"):
        EngineConfig(python=ENGINE_PYTHON, engine_path=str(tmp_path)).validate()
    with pytest.raises(EngineError, match="weights folder does not exist"):
        EngineConfig(python=ENGINE_PYTHON, weights_dir=str(tmp_path / "w")).validate()
    EngineConfig(python=ENGINE_PYTHON, engine_path=str(REPO)).validate()


def test_environment_is_cleaned_for_the_engine(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    monkeypatch.setenv("PYTHONHOME", "/blender/python")
    env = EngineConfig(python=ENGINE_PYTHON, engine_path=str(REPO)).environment()
    assert env["PYTHONPATH"] == str(REPO)
    assert "PYTHONHOME" not in env and env["PYTHONNOUSERSITE"] == "1"
    command = EngineConfig(python=ENGINE_PYTHON, weights_dir="/w").command()
    assert command[:5] == [ENGINE_PYTHON, "-s", "-u", "-m", "engine.worker"]
    assert command[-2:] == ["--weights", "/w"]


def test_run_job_reports_progress_and_result(fake_engine, tmp_path, image):
    client = make_client(fake_engine, tmp_path)
    try:
        ready = client.wait_ready(timeout=120)
        assert ready["pid"] == client.process.pid
        seen = []
        job = run_job(client, image, str(tmp_path / "out" / "a.glb"), fake_engine.settings(),
                      on_progress=lambda j: seen.append((j.stage, j.step, j.total, j.status_text())))
        assert job.state == "done", job.error
        assert job.result["faces"] > 0
        arrays = np.load(job.result["arrays"])
        assert arrays["faces"].shape == (job.result["faces"], 3)
        stages = [stage for stage, *_ in seen]
        assert "load" in stages and "dense" in stages
        dense_steps = [step for stage, step, *_ in seen if stage == "dense"]
        assert dense_steps == sorted(dense_steps) and dense_steps[-1] == fake_engine.settings()["dense_steps"]
        assert any("Coarse shape: step" in text for *_, text in seen)
        reply = client.request("status")
        assert reply["event"] == "status" and reply["jobs_done"] == 1
        with pytest.raises(EngineError, match="unknown cmd"):
            client.request("teleport")
    finally:
        client.shutdown()
    assert client.process.returncode == 0
    assert "worker stopped" in Path(client.config.log_path).read_text()


def test_cancel_through_run_job(fake_engine, tmp_path, image):
    client = make_client(fake_engine, tmp_path)
    try:
        steps = []
        job = run_job(client, image, str(tmp_path / "c.glb"), fake_engine.settings(slow=True),
                      on_progress=lambda j: steps.append(j.step),
                      should_cancel=lambda: len(steps) >= 3)
        assert job.state == "cancelled"
        assert max(steps) < fake_engine.settings(slow=True)["dense_steps"]
        assert not (tmp_path / "c.glb").exists()
    finally:
        client.shutdown()


def test_worker_that_dies_mid_job_is_detected(fake_engine, tmp_path, image):
    client = make_client(fake_engine, tmp_path)
    client.wait_ready(timeout=120)
    job = client.start_job(image, str(tmp_path / "d.glb"), fake_engine.settings(slow=True))
    while job.stage != "dense":
        event = client.next_event(60)
        assert event is not None
        job.apply(event, client)
    os.kill(client.process.pid, signal.SIGKILL)
    while not job.finished:
        event = client.next_event(60)
        assert event is not None, "no exit event after the worker was killed"
        job.apply(event, client)
    assert job.state == "failed" and job.error_code == "engine_died"
    assert "exit code -9" in job.error and "engine.log" in job.error
    assert not client.running
    with pytest.raises(EngineDied):
        client.send("ping")


def test_worker_that_cannot_start_reports_its_stderr(tmp_path):
    broken = tmp_path / "checkout"
    # an engine checkout whose environment lacks a dependency: importing it fails at once (a regular
    # package on PYTHONPATH, so it shadows an installed engine, editable installs included)
    (broken / "engine").mkdir(parents=True)
    (broken / "engine" / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\")\n")
    config = EngineConfig(python=ENGINE_PYTHON, engine_path=str(broken), device="cpu",
                          log_path=str(tmp_path / "engine.log"))
    client = EngineClient(config)
    client.start()
    with pytest.raises(EngineDied, match="No module named"):
        client.wait_ready(timeout=60)


def test_job_state_texts():
    job = Job("j", "i.png", "o.glb", {})
    assert job.status_text() == "Starting the engine"
    job.apply({"event": "progress", "id": "j", "stage": "sparse_1024", "step": 3, "total": 15, "eta_s": 75.0})
    assert job.status_text() == "Detail (1024): step 3/15, about 1 min 15 s left in this stage"
    assert job.fraction == pytest.approx(0.2)
    assert job.apply({"event": "progress", "id": "other", "stage": "dense", "step": 1, "total": 2}) is False
    job.apply({"event": "error", "id": "j", "code": "out_of_memory", "message": "GPU full"})
    assert job.state == "failed" and job.status_text() == "Failed: GPU full"
    assert format_seconds(5.4) == "5 s" and format_seconds(3600) == "60 min 00 s"
